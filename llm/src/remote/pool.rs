//! The pool: replicas, their health and load, routing, failover, and the sessions.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::config::{RemoteConfig, ReplicaConfig};
use super::http::{self, Endpoint, Failure, HttpClient, Piece};
use super::wire::{Usage, ToolCallAccumulator, request_body};
use crate::toolcall::ToolCallFilter;
use crate::{ChatMessage, FinishReason, GenerateOptions, GenerationStats, LlmEngine, LlmError, LlmSession};

/// Parsed chunks buffered between the network task and the session: enough to
/// absorb a burst, small enough that a stalled consumer stops the read.
const CHUNK_CHANNEL_DEPTH: usize = 64;
/// Threads of the pool's runtime: the work is waiting on sockets and parsing small
/// JSON chunks, which one thread does for hundreds of streams.
const RUNTIME_THREADS: usize = 1;

/// A pool of OpenAI-compatible chat-completions replicas, used as one engine.
///
/// **Session routing**: a [`RemoteSession`] (one call) picks the healthy replica with
/// the fewest calls pinned to it (then the fewest requests in flight) at its first
/// request and keeps it for its life, so that replica's prefix cache holds the
/// conversation and each turn only prefills what is new. **Load routing**:
/// [`RemotePool::complete`] (no session) takes the healthy replica with the fewest
/// requests in flight.
///
/// **Health**: every replica's `GET {base_url}/models` is polled every
/// `health_interval_ms`; a replica that fails a request is marked unhealthy at once
/// and comes back when it answers the poll again.
///
/// **Failover**: if a request fails before any text reached the caller, the whole
/// conversation is resent to another healthy replica (which rebuilds the context)
/// and the session stays there. If it fails mid-reply the error is returned (the
/// agent apologises; the text already spoken cannot be unsaid) and the next turn
/// goes to another replica. With no healthy replica left, unhealthy ones are probed
/// once more before giving up with "no healthy LLM replica".
///
/// **Runtime**: the session trait is blocking, so the pool owns a small tokio runtime
/// of its own (one worker thread) for its HTTP client and health checks.
/// Compared with a runtime per request this keeps connections alive between turns
/// (no TCP handshake per turn) and lets health checks run in the background; compared
/// with borrowing the server's runtime it works from any thread, in the server,
/// benchmarks and tests alike. Sessions receive chunks through a bounded channel.
pub struct RemotePool {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    replicas: Vec<Arc<Replica>>,
    client: HttpClient,
    /// Silence limit of one request (headers, then each next chunk).
    silence: Duration,
    /// Limit of a probe made when no replica is healthy.
    probe_timeout: Duration,
    /// Rotates the starting point of the least-loaded search, so ties spread.
    rotation: AtomicUsize,
    runtime: OwnedRuntime,
}

/// Shuts the runtime down without blocking: a pool may be dropped from inside an
/// async task (the server's), where a blocking runtime drop would panic.
struct OwnedRuntime(Option<tokio::runtime::Runtime>);

impl OwnedRuntime {
    fn handle(&self) -> Option<&tokio::runtime::Handle> {
        self.0.as_ref().map(|r| r.handle())
    }
}

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

struct Replica {
    name: String,
    model: String,
    /// [`super::ReplicaConfig::forward_repeat_penalty`].
    forward_repeat_penalty: bool,
    endpoint: Endpoint,
    healthy: AtomicBool,
    /// Requests in flight.
    outstanding: AtomicUsize,
    /// Sessions pinned here.
    sessions: AtomicUsize,
    /// Requests sent (attempts, failed ones included).
    requests: AtomicU64,
    /// Requests that failed for the replica's sake (not cancelled, not a bad request).
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Replica {
    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    fn set_healthy(&self, healthy: bool, why: Option<&str>) {
        let was = self.healthy.swap(healthy, Ordering::SeqCst);
        if let Some(why) = why {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
        }
        if was != healthy {
            if healthy {
                tracing::info!(replica = %self.name, "LLM replica is healthy again");
            } else {
                tracing::warn!(replica = %self.name, error = why.unwrap_or(""), "LLM replica marked unhealthy");
            }
        }
    }

    fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Counts a request in flight for as long as it lives.
struct InFlight<'a>(&'a Replica);

impl<'a> InFlight<'a> {
    fn start(r: &'a Replica) -> Self {
        r.outstanding.fetch_add(1, Ordering::SeqCst);
        r.requests.fetch_add(1, Ordering::SeqCst);
        Self(r)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the network task when the session stops listening (barge-in, error).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A replica's state, for metrics, logs and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStats {
    /// The configured name.
    pub name: String,
    /// Whether requests are routed to it.
    pub healthy: bool,
    /// Requests in flight now.
    pub outstanding: usize,
    /// Sessions pinned to it now.
    pub sessions: usize,
    /// Requests sent to it so far (failed ones included).
    pub requests: u64,
    /// Requests it failed so far.
    pub failures: u64,
    /// Why it last failed a request or a health check.
    pub last_error: Option<String>,
}

/// How a replica is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    /// For a session's first request: fewest pinned sessions, then fewest in flight.
    Session,
    /// For a stateless request: fewest in flight, then fewest pinned sessions.
    Load,
}

/// A generation that failed, and whether the caller already got some of its text.
struct AttemptError {
    failure: Failure,
    emitted: bool,
}

impl RemotePool {
    /// Validates the configuration, starts the pool's runtime and its health
    /// checks. Replicas start out healthy (the first check runs at once; a replica
    /// that is down is also found by the first request sent to it).
    pub fn new(config: RemoteConfig) -> Result<Arc<Self>, LlmError> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("parley-llm-remote")
            .enable_all()
            .build()
            .map_err(|e| LlmError::Model(format!("cannot start the remote LLM client's runtime: {e}")))?;
        let replicas = config
            .replicas
            .iter()
            .map(|r: &ReplicaConfig| {
                let endpoint = Endpoint::parse(&r.base_url, r.api_key.as_deref()).map_err(|e| LlmError::Model(format!("replica {:?}: {e}", r.name)))?;
                Ok(Arc::new(Replica {
                    name: r.name.clone(),
                    model: r.model.clone(),
                    forward_repeat_penalty: r.forward_repeat_penalty,
                    endpoint,
                    healthy: AtomicBool::new(true),
                    outstanding: AtomicUsize::new(0),
                    sessions: AtomicUsize::new(0),
                    requests: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                }))
            })
            .collect::<Result<Vec<_>, LlmError>>()?;
        let mut models: Vec<&str> = replicas.iter().map(|r| r.model.as_str()).collect();
        models.dedup();
        let name = format!("remote:{}", models.join("+"));
        let silence = Duration::from_millis(config.request_timeout_ms);
        let connect = Duration::from_millis(config.connect_timeout_ms);
        let inner = Arc::new(Inner {
            name,
            replicas,
            client: http::client(connect),
            silence,
            probe_timeout: connect + silence.min(Duration::from_secs(5)),
            rotation: AtomicUsize::new(0),
            runtime: OwnedRuntime(Some(runtime)),
        });
        if let Some(handle) = inner.runtime.handle() {
            handle.spawn(health_loop(
                Arc::downgrade(&inner),
                inner.replicas.clone(),
                inner.client.clone(),
                Duration::from_millis(config.health_interval_ms),
                inner.probe_timeout,
            ));
        }
        tracing::info!(engine = %inner.name, replicas = inner.replicas.len(), "remote LLM pool started");
        Ok(Arc::new(Self { inner }))
    }

    /// A session with its concrete type, for callers that want to see which replica
    /// it is on ([`RemoteSession::replica_name`]).
    pub fn session(&self) -> RemoteSession {
        RemoteSession { inner: Arc::clone(&self.inner), pinned: None }
    }

    /// One stateless request with load routing (fewest requests in flight), failing
    /// over like a session does; returns the whole reply text and its stats.
    pub fn complete(&self, messages: &[ChatMessage], options: &GenerateOptions) -> Result<(String, GenerationStats), LlmError> {
        let mut text = String::new();
        let stats = self.complete_streaming(messages, options, &mut |piece| {
            text.push_str(piece);
            ControlFlow::Continue(())
        })?;
        Ok((text, stats))
    }

    /// [`RemotePool::complete`], streaming the text to `on_text` as it comes.
    pub fn complete_streaming(
        &self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, LlmError> {
        self.inner.generate(None, Routing::Load, messages, options, on_text)
    }

    /// Every replica's health and load, in configuration order.
    pub fn replica_stats(&self) -> Vec<ReplicaStats> {
        self.inner
            .replicas
            .iter()
            .map(|r| ReplicaStats {
                name: r.name.clone(),
                healthy: r.is_healthy(),
                outstanding: r.outstanding.load(Ordering::SeqCst),
                sessions: r.sessions.load(Ordering::SeqCst),
                requests: r.requests.load(Ordering::SeqCst),
                failures: r.failures.load(Ordering::SeqCst),
                last_error: r.last_error(),
            })
            .collect()
    }
}

impl LlmEngine for RemotePool {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn new_session(&self) -> Box<dyn LlmSession> {
        Box::new(self.session())
    }
}

/// Polls every replica until the pool is gone. Holds the replicas, not the pool, so
/// the pool is never dropped on its own runtime's thread.
async fn health_loop(pool: Weak<Inner>, replicas: Vec<Arc<Replica>>, client: HttpClient, every: Duration, timeout: Duration) {
    loop {
        if pool.strong_count() == 0 {
            return;
        }
        let checks: Vec<_> = replicas
            .iter()
            .map(|r| {
                let (r, client) = (Arc::clone(r), client.clone());
                tokio::spawn(async move {
                    match http::probe(&client, &r.endpoint, timeout).await {
                        Ok(()) => r.set_healthy(true, None),
                        Err(e) => r.set_healthy(false, Some(&e)),
                    }
                })
            })
            .collect();
        for c in checks {
            let _ = c.await;
        }
        tokio::time::sleep(every).await;
    }
}

impl Inner {
    fn handle(&self) -> Result<&tokio::runtime::Handle, LlmError> {
        self.runtime.handle().ok_or_else(|| LlmError::Model("the remote LLM pool has shut down".into()))
    }

    /// The least-loaded healthy replica not in `exclude`.
    fn pick(&self, routing: Routing, exclude: &[usize]) -> Option<usize> {
        let n = self.replicas.len();
        let start = self.rotation.fetch_add(1, Ordering::Relaxed) % n.max(1);
        (0..n)
            .map(|k| (start + k) % n)
            .filter(|i| !exclude.contains(i) && self.replicas[*i].is_healthy())
            .min_by_key(|&i| {
                let r = &self.replicas[i];
                let (sessions, outstanding) = (r.sessions.load(Ordering::SeqCst), r.outstanding.load(Ordering::SeqCst));
                match routing {
                    Routing::Session => (sessions, outstanding),
                    Routing::Load => (outstanding, sessions),
                }
            })
    }

    /// Probes the unhealthy replicas not in `exclude` (all at once, bounded by the
    /// probe timeout) so one that came back is used without waiting for the next
    /// health round.
    fn revive(&self, exclude: &[usize]) {
        let Ok(handle) = self.handle() else { return };
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        for (i, r) in self.replicas.iter().enumerate() {
            if exclude.contains(&i) || r.is_healthy() {
                continue;
            }
            let (r, client, timeout, tx) = (Arc::clone(r), self.client.clone(), self.probe_timeout, tx.clone());
            handle.spawn(async move {
                match http::probe(&client, &r.endpoint, timeout).await {
                    Ok(()) => r.set_healthy(true, None),
                    Err(e) => r.set_healthy(false, Some(&e)),
                }
                let _ = tx.send(());
            });
        }
        drop(tx);
        let deadline = Instant::now() + self.probe_timeout + Duration::from_millis(100);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if rx.recv_timeout(left).is_err() {
                break; // all answered (channel closed) or out of time
            }
        }
    }

    fn no_replica(&self) -> LlmError {
        let why: Vec<String> = self
            .replicas
            .iter()
            .map(|r| format!("{}: {}", r.name, r.last_error().unwrap_or_else(|| "busy".into())))
            .collect();
        LlmError::Unavailable(format!(
            "no healthy LLM replica ({}); check that the servers in the LLM replica list are running and reachable",
            why.join("; ")
        ))
    }

    /// Runs one generation with failover. `pin` is the session's replica (None for
    /// a stateless request): kept when healthy, else replaced by a fresh pick.
    fn generate(
        self: &Arc<Self>,
        mut pin: Option<&mut Pin>,
        routing: Routing,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, LlmError> {
        let started = Instant::now();
        let mut tried: Vec<usize> = Vec::new();
        let mut revived = false;
        loop {
            let current = pin.as_ref().and_then(|p| p.replica).filter(|&i| self.replicas[i].is_healthy() && !tried.contains(&i));
            let idx = match current {
                Some(i) => i,
                None => {
                    let choice = match self.pick(routing, &tried) {
                        Some(i) => Some(i),
                        None if !revived => {
                            revived = true;
                            self.revive(&tried);
                            self.pick(routing, &tried)
                        }
                        None => None,
                    };
                    let Some(i) = choice else {
                        if let Some(p) = pin.as_mut() {
                            p.set(None);
                        }
                        return Err(self.no_replica());
                    };
                    if let Some(p) = pin.as_mut() {
                        p.set(Some(i));
                    }
                    i
                }
            };
            let replica = &self.replicas[idx];
            let span = tracing::debug_span!("llm.remote", replica = %replica.name, attempt = tried.len() + 1);
            let _enter = span.enter();
            match self.attempt(idx, messages, options, on_text, started) {
                Ok(stats) => return Ok(stats),
                Err(AttemptError { failure, emitted }) => {
                    let message = failure.message().to_string();
                    match &failure {
                        Failure::Request(_) => {
                            return Err(LlmError::Model(format!("the LLM replica {} refused the request: {message}", replica.name)));
                        }
                        Failure::Replica(_) => {
                            replica.failures.fetch_add(1, Ordering::SeqCst);
                            replica.set_healthy(false, Some(&message));
                        }
                        Failure::Busy(_) => {
                            *replica.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message.clone());
                        }
                    }
                    tried.push(idx);
                    if let Some(p) = pin.as_mut() {
                        p.set(None); // the next pick (this turn's retry or the next turn) moves it
                    }
                    if emitted {
                        return Err(LlmError::Model(format!(
                            "the LLM replica {} failed mid-reply ({message}); the next turn goes to another replica",
                            replica.name
                        )));
                    }
                    tracing::warn!(replica = %replica.name, error = %message, "LLM request failed before any text; resending the conversation to another replica");
                }
            }
        }
    }

    /// One request to one replica, streamed to `on_text`.
    fn attempt(
        &self,
        idx: usize,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
        started: Instant,
    ) -> Result<GenerationStats, AttemptError> {
        let fail = |failure| AttemptError { failure, emitted: false };
        let replica = &self.replicas[idx];
        let body = serde_json::to_vec(&request_body(&replica.model, messages, options, replica.forward_repeat_penalty))
            .map_err(|e| fail(Failure::Request(format!("cannot encode the request: {e}"))))?;
        let handle = self.handle().map_err(|e| fail(Failure::Replica(e.to_string())))?;
        let _in_flight = InFlight::start(replica);
        let (tx, mut rx) = mpsc::channel(CHUNK_CHANNEL_DEPTH);
        let _task = AbortOnDrop(handle.spawn(http::stream_chat(
            self.client.clone(),
            replica.endpoint.clone(),
            Bytes::from(body),
            self.silence,
            tx,
        )));

        let mut out = Output { on_text, emitted: false, first_text_ms: None, started };
        // Content goes through the lenient parser when tools are offered: servers
        // that do not parse the model's calls (llama.cpp with the 0.5B model) pass
        // its untagged call JSON through as text, which must not be spoken.
        let mut filter = (!options.tools.is_empty()).then(|| ToolCallFilter::new(options.tools.iter().map(|t| t.name.clone()).collect()));
        let mut calls = ToolCallAccumulator::default();
        let mut usage: Option<Usage> = None;
        let mut finish_reason: Option<String> = None;
        let mut first_delta_ms: Option<f64> = None;
        let mut content_chunks = 0usize;

        let cancelled = loop {
            // Blocking: the session runs on a blocking thread (trait contract).
            let piece = rx.blocking_recv();
            let chunk = match piece {
                Some(Piece::Chunk(chunk)) => chunk,
                Some(Piece::Done) => break false,
                Some(Piece::Failed(failure)) => return Err(AttemptError { failure, emitted: out.emitted }),
                None => {
                    return Err(AttemptError { failure: Failure::Replica("the stream task stopped without a result".into()), emitted: out.emitted });
                }
            };
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
            // Parley asks for one choice; take the first (index 0) only.
            let Some(choice) = chunk.choices.into_iter().next() else { continue };
            if choice.delta.content.is_some() || !choice.delta.tool_calls.is_empty() {
                first_delta_ms.get_or_insert_with(|| ms_since(started));
            }
            for fragment in &choice.delta.tool_calls {
                calls.push(fragment);
            }
            if let Some(reason) = choice.finish_reason {
                finish_reason = Some(reason);
            }
            let call_fragments = !choice.delta.tool_calls.is_empty();
            if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                content_chunks += 1;
                let speakable = match filter.as_mut() {
                    Some(f) => f.push(&text),
                    None => text,
                };
                // Empty while the filter holds a possible call: still handed over.
                if out.emit(&speakable).is_break() {
                    break true;
                }
            } else if call_fragments && out.emit("").is_break() {
                break true;
            }
        };

        let mut stats = GenerationStats {
            prompt_tokens: usage.as_ref().and_then(|u| u.prompt_tokens).unwrap_or(0),
            cached_tokens: usage.as_ref().and_then(|u| u.prompt_tokens_details.as_ref()).and_then(|d| d.cached_tokens).unwrap_or(0),
            generated_tokens: usage.as_ref().and_then(|u| u.completion_tokens).unwrap_or(content_chunks),
            ..GenerationStats::default()
        };
        if cancelled {
            // Dropping the task's handle (on return) aborts it, which drops the
            // response and closes the connection: the server stops generating.
            stats.finish = FinishReason::Cancelled;
        } else {
            if let Some(mut f) = filter {
                let (rest, text_calls) = f.finish();
                // Generation is over; a Break here has nothing left to stop.
                let _ = out.emit(&rest);
                stats.tool_calls = calls.finish();
                stats.tool_calls.extend(text_calls.into_iter().map(|c| c.into_tool_call()));
            } else {
                stats.tool_calls = calls.finish();
            }
            stats.finish = match finish_reason.as_deref() {
                Some("length") => FinishReason::Length,
                _ => FinishReason::Stop,
            };
        }
        stats.total_ms = ms_since(started);
        stats.first_token_ms = out.first_text_ms.or(first_delta_ms).unwrap_or(stats.total_ms);
        // The replica does not report its prefill time; its time to first token (the
        // prefill plus the network) is the closest measure.
        stats.prefill_ms = first_delta_ms.unwrap_or(stats.first_token_ms);
        tracing::debug!(
            replica = %replica.name,
            prompt_tokens = stats.prompt_tokens,
            cached_tokens = stats.cached_tokens,
            first_token_ms = stats.first_token_ms,
            total_ms = stats.total_ms,
            tool_calls = stats.tool_calls.len(),
            "remote generation finished"
        );
        Ok(stats)
    }
}

/// The caller's text callback, with what the failover logic must know about it.
struct Output<'a> {
    on_text: &'a mut dyn FnMut(&str) -> ControlFlow<()>,
    /// Whether any text reached the caller (then a failure cannot be retried
    /// silently).
    emitted: bool,
    first_text_ms: Option<f64>,
    started: Instant,
}

impl Output<'_> {
    /// Hands `text` to the caller. Empty text (a chunk the tool-call filter holds, or
    /// a tool-call fragment) goes through too, as with the embedded engine: the
    /// callback is where the caller stops a generation, and a reply that is all tool
    /// call (llama.cpp streams the 0.5B model's call as dozens of content chunks)
    /// must stop on a barge-in as well, not keep the replica and the session busy.
    fn emit(&mut self, text: &str) -> ControlFlow<()> {
        if !text.is_empty() {
            self.emitted = true;
            self.first_text_ms.get_or_insert_with(|| ms_since(self.started));
        }
        (self.on_text)(text)
    }
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// A session's replica, counted in that replica's `sessions` while pinned.
struct Pin {
    inner: Arc<Inner>,
    replica: Option<usize>,
}

impl Pin {
    fn set(&mut self, replica: Option<usize>) {
        if self.replica == replica {
            return;
        }
        if let Some(old) = self.replica {
            self.inner.replicas[old].sessions.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(new) = replica {
            self.inner.replicas[new].sessions.fetch_add(1, Ordering::SeqCst);
        }
        self.replica = replica;
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.set(None);
    }
}

/// One call's conversation with the pool: it sticks to one replica (chosen at its
/// first request) so the replica's prefix cache keeps the conversation, and moves
/// only when that replica fails or is found unhealthy.
pub struct RemoteSession {
    inner: Arc<Inner>,
    pinned: Option<Pin>,
}

impl RemoteSession {
    /// The replica this session's next turn goes to, if one is chosen yet.
    pub fn replica_name(&self) -> Option<&str> {
        let i = self.pinned.as_ref()?.replica?;
        Some(&self.inner.replicas[i].name)
    }
}

impl LlmSession for RemoteSession {
    fn generate(
        &mut self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> ControlFlow<()>,
    ) -> Result<GenerationStats, LlmError> {
        let inner = Arc::clone(&self.inner);
        let pin = self.pinned.get_or_insert_with(|| Pin { inner: Arc::clone(&inner), replica: None });
        inner.generate(Some(pin), Routing::Session, messages, options, on_text)
    }
}
