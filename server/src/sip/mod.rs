//! The SIP bridge: a SIP user agent in `parley serve` that answers calls from SIP
//! trunks and PBXs (`[sip] listen`) and runs each through the call driver, with
//! G.711 RTP both ways and RFC 4733 key presses into the conversation.
//!
//! - the SIP stack (rsipstack) behind our own small surface is in [`stack`];
//! - offer/answer in [`sdp`];
//! - one call from INVITE to hang-up, and its driver transport, in [`call`];
//! - the call's RTP socket, receive and send loops in [`media`];
//! - the RTP pieces free of I/O in [`jitter`], [`packetizer`] and [`dtmf`];
//! - hand-off to a person (`transfer_call`, SIP REFER) in [`transfer`].

pub mod call;
pub mod dtmf;
pub mod jitter;
pub mod media;
pub mod packetizer;
pub mod sdp;
pub mod stack;
pub mod transfer;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info, info_span, warn};

use crate::app::App;

/// How long calls get, after the server is told to stop, to hang up (BYE) and end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(8);

/// Starts the bridge when `[sip] listen` is set: binds, then answers calls until the
/// server shuts down. The returned task ends once every call has hung up (bounded).
pub async fn start(app: Arc<App>) -> Result<Option<tokio::task::JoinHandle<()>>> {
    let sip = &app.config.sip;
    let Some(listen) = sip.listen_addr()? else { return Ok(None) };
    let public_ip = sip.public_ip()?.context("sip.public_address")?;
    let config = Arc::new(call::CallConfig {
        public_ip,
        bind_ip: listen.ip(),
        rtp_ports: sip.rtp_port_range()?,
        ring: Duration::from_millis(sip.ring_ms),
        media: media::MediaConfig { rtp_timeout: Duration::from_secs(sip.rtp_timeout_seconds) },
        greeting: sip.greeting.clone(),
        transfer: sip.transfer_uri()?.map(|target| call::TransferConfig { target, say: sip.transfer_say.trim().to_string() }),
    });
    let stack_stop = CancellationToken::new();
    let draining = stack::Draining { token: app.draining.clone(), retry_after_s: app.config.server.limits.retry_after_s };
    let mut stack = stack::start(listen, Some(public_ip), draining, stack_stop.clone()).await?;
    // Tests and scripts read this line to find the port.
    println!("parley sip listening on udp://{}", stack.local);
    let shutdown = app.shutdown.clone();
    let task = tokio::spawn(async move {
        let mut calls = JoinSet::new();
        loop {
            tokio::select! {
                c = stack.calls.recv() => match c {
                    Some(c) => {
                        let span = info_span!("sip", call_id = field::Empty, sip_call_id = %c.call_id);
                        calls.spawn(call::run(app.clone(), config.clone(), c).instrument(span));
                    }
                    None => break,
                },
                Some(_) = calls.join_next(), if !calls.is_empty() => {}
                _ = shutdown.cancelled() => break,
            }
        }
        // The calls end through their drivers (which see the shutdown) and hang up.
        if tokio::time::timeout(SHUTDOWN_GRACE, async { while calls.join_next().await.is_some() {} }).await.is_err() {
            warn!(calls = calls.len(), "SIP calls still open after {} s; dropping them", SHUTDOWN_GRACE.as_secs());
            calls.abort_all();
        }
        stack_stop.cancel();
        info!("SIP bridge stopped");
    });
    Ok(Some(task))
}
