//! One listener for every wire: HTTP/1.1, HTTP/2 in the clear (prior knowledge, what
//! service-to-service callers and `curl --http2-prior-knowledge` speak) and, with
//! `[server.tls]`, TLS with ALPN `h2` and `http/1.1`. The protocol of each connection
//! is detected from its first bytes (hyper-util's auto builder), so one port serves
//! browsers, phone gateways, HTTP/2 streams and RFC 8441 WebSockets alike.
//!
//! Every limit that protects the server from a misbehaving peer is a named setting
//! in `[server.http]` ([`HttpLimits`]), with a default chosen for a voice server: few
//! long-lived streams per connection, small headers.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tracing::{Instrument, debug, info, info_span, warn};

/// `[server.tls]`: serve TLS on the listener (both HTTP/1.1 and HTTP/2, by ALPN).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The certificate chain, PEM (leaf first). Empty (with `key`) means plain TCP.
    pub cert: String,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

impl TlsConfig {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert.is_empty() || !self.key.is_empty()
    }
}

/// `[server.http]`: the listener's protocol limits, each one a defence against a
/// known way a peer can tie a server up.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// HTTP/2 streams (calls, requests) one connection may have open at once; more
    /// are refused with `REFUSED_STREAM`.
    pub h2_max_concurrent_streams: u32,
    /// Largest HTTP/2 header list (decoded), in bytes: stops header floods
    /// (CONTINUATION floods are also bounded by it).
    pub h2_max_header_list_size: u32,
    /// Streams a client may open and reset before the server accepted them, per
    /// connection, before the connection is closed (the "rapid reset" attack,
    /// CVE-2023-44487).
    pub h2_max_pending_accept_reset_streams: usize,
    /// Streams the server itself may reset for protocol errors, per connection,
    /// before it closes the connection.
    pub h2_max_local_error_reset_streams: usize,
    /// Seconds between HTTP/2 PINGs on an idle-looking connection; 0 turns pings
    /// off. Finds dead peers behind load balancers that keep TCP open.
    pub h2_keep_alive_interval_s: u64,
    /// Seconds to wait for a PING's answer before closing the connection.
    pub h2_keep_alive_timeout_s: u64,
    /// Milliseconds an HTTP/1 client may take to send a request's headers
    /// (slowloris).
    pub h1_header_read_timeout_ms: u64,
    /// Milliseconds a client may take to finish the TLS handshake.
    pub tls_handshake_timeout_ms: u64,
    /// Kernel send buffer per connection, in bytes (`SO_SNDBUF`); 0 leaves it to the
    /// kernel's autotuning (up to `net.ipv4.tcp_wmem`'s maximum, 4 MiB by default,
    /// that is half a minute of 48 kHz audio). A cap bounds each connection's kernel
    /// memory and how much a client that stopped reading can absorb before
    /// `server.write_timeout_ms` cuts it off.
    pub tcp_send_buffer_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            h2_max_concurrent_streams: 64,
            h2_max_header_list_size: 16 * 1024,
            h2_max_pending_accept_reset_streams: 20,
            h2_max_local_error_reset_streams: 256,
            h2_keep_alive_interval_s: 30,
            h2_keep_alive_timeout_s: 20,
            h1_header_read_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            tcp_send_buffer_bytes: 0,
        }
    }
}

impl HttpLimits {
    /// Checks values that parse but would break the server.
    pub fn validate(&self) -> Result<()> {
        if self.h2_max_concurrent_streams == 0 {
            bail!("server.http.h2_max_concurrent_streams must be at least 1");
        }
        if self.h2_max_header_list_size < 1024 {
            bail!("server.http.h2_max_header_list_size must be at least 1024 bytes");
        }
        if self.h1_header_read_timeout_ms == 0 || self.tls_handshake_timeout_ms == 0 {
            bail!("server.http timeouts must be above 0");
        }
        Ok(())
    }

    /// A connection builder with these limits; RFC 8441 extended CONNECT on.
    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut b = auto::Builder::new(TokioExecutor::new());
        b.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_millis(self.h1_header_read_timeout_ms));
        let keep_alive = (self.h2_keep_alive_interval_s > 0).then(|| Duration::from_secs(self.h2_keep_alive_interval_s));
        b.http2()
            .timer(TokioTimer::new())
            .enable_connect_protocol()
            .max_concurrent_streams(self.h2_max_concurrent_streams)
            .max_header_list_size(self.h2_max_header_list_size)
            .max_pending_accept_reset_streams(self.h2_max_pending_accept_reset_streams)
            .max_local_error_reset_streams(self.h2_max_local_error_reset_streams)
            .keep_alive_interval(keep_alive)
            .keep_alive_timeout(Duration::from_secs(self.h2_keep_alive_timeout_s.max(1)));
        b
    }
}

/// Loads the certificate and key into a TLS acceptor offering `h2` and `http/1.1`.
pub fn tls_acceptor(tls: &TlsConfig) -> Result<TlsAcceptor> {
    if tls.cert.is_empty() || tls.key.is_empty() {
        bail!("server.tls needs both `cert` and `key` (PEM files)");
    }
    let certs = load_certs(Path::new(&tls.cert))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key).with_context(|| format!("cannot read a private key (PEM) from server.tls.key = {}", tls.key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("server.tls: the key does not match the certificate, or is of an unsupported kind")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open server.tls.cert = {}", path.display()))?;
    let certs = CertificateDer::pem_reader_iter(BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert = {} is not a PEM certificate chain", path.display()))?;
    if certs.is_empty() {
        bail!("server.tls.cert = {} holds no certificate", path.display());
    }
    Ok(certs)
}

/// Accepts connections until `shutdown` resolves, then lets open connections finish
/// their requests (calls are ended by their driver through `App::shutdown`) for at
/// most `drain`. A connection from an address that holds
/// `server.limits.connections_per_ip` already is answered 503 with `Retry-After`
/// on each request.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<TlsAcceptor>,
    app: Arc<crate::app::App>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> Result<()> {
    let busy = busy_router(app.config.server.limits.retry_after_s);
    let builder = Arc::new(limits.builder());
    let handshake_timeout = Duration::from_millis(limits.tls_handshake_timeout_ms);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        if limits.tcp_send_buffer_bytes > 0
            && let Err(e) = socket2::SockRef::from(&tcp).set_send_buffer_size(limits.tcp_send_buffer_bytes)
        {
            debug!(error = %e, "cannot set the send buffer size");
        }
        let permit = app.limiter.connect(peer.ip());
        let service = match &permit {
            Some(_) => TowerToHyperService::new(router.clone()),
            None => {
                app.metrics.connections_refused.inc();
                debug!(%peer, held = app.limiter.connections_held(peer.ip()), "connection refused: its address holds server.limits.connections_per_ip");
                TowerToHyperService::new(busy.clone())
            }
        };
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let span = info_span!("conn", %peer, tls = tls.is_some());
        tokio::spawn(
            async move {
                // Held for the connection's life.
                let _permit = permit;
                match tls {
                    Some(acceptor) => match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let alpn = stream.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                            debug!(alpn = alpn.as_deref().unwrap_or("none"), "TLS handshake done");
                            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                            if let Err(e) = watcher.watch(conn.into_owned()).await {
                                debug!(error = %e, "connection ended with an error");
                            }
                        }
                        Ok(Err(e)) => debug!(error = %e, "TLS handshake failed"),
                        Err(_) => debug!("TLS handshake timed out"),
                    },
                    None => {
                        let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                        if let Err(e) = watcher.watch(conn.into_owned()).await {
                            debug!(error = %e, "connection ended with an error");
                        }
                    }
                }
            }
            .instrument(span),
        );
    }
    drop(listener);
    info!("no longer accepting connections; draining");
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        warn!("connections still open after {} s; exiting anyway", drain.as_secs());
    }
    Ok(())
}

/// What a connection over its address's cap gets for every request: 503 and when to
/// retry.
fn busy_router(retry_after_s: u64) -> Router {
    Router::new().fallback(move || async move {
        let body = serde_json::json!({"error": {"type": "invalid_request_error", "code": 503, "message": "too many connections from this address (server.limits.connections_per_ip); close some and retry"}});
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [
                (axum::http::header::CONTENT_TYPE, "application/json".to_string()),
                (axum::http::header::RETRY_AFTER, retry_after_s.max(1).to_string()),
            ],
            body.to_string(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounded() {
        let l = HttpLimits::default();
        l.validate().expect("defaults validate");
        assert!(l.h2_max_pending_accept_reset_streams <= 100);
        assert!(HttpLimits { h2_max_concurrent_streams: 0, ..l }.validate().is_err());
    }

    #[test]
    fn tls_needs_both_files_and_says_which_is_wrong() {
        assert!(!TlsConfig::default().enabled());
        let half = TlsConfig { cert: "/nonexistent.pem".into(), key: String::new() };
        assert!(half.enabled());
        let e = tls_acceptor(&half).err().expect("refused");
        assert!(e.to_string().contains("both"), "{e}");
        let missing = TlsConfig { cert: "/nonexistent.pem".into(), key: "/nonexistent.key".into() };
        let e = format!("{:#}", tls_acceptor(&missing).err().expect("refused"));
        assert!(e.contains("/nonexistent.pem"), "{e}");
    }
}
