//! The SIP stack behind a small surface of ours: `rsipstack` (pinned) does the
//! parsing, the transactions (retransmission of our 200 until the ACK, 100 Trying,
//! 487 on CANCEL, absorbing retransmitted requests) and the dialogs (tags, CSeq,
//! routing in-dialog requests). The rest of the bridge sees [`IncomingCall`]s and
//! [`CallEvent`]s only, so another stack would replace this file alone.
//!
//! Transfers (RFC 3515): [`IncomingCall::referrer`] sends REFER in the call's dialog;
//! the NOTIFYs that report how it went (a `message/sipfrag` status line) come back
//! as [`CallEvent::TransferProgress`]. rsipstack builds and sends the REFER and
//! routes the NOTIFYs to the dialog; reading them is ours ([`read_notify`], [`sipfrag_status`]):
//! the stack's own reader (`ReferStatus::parse`) looks for `Event` among untyped
//! headers, where its parser never puts it.

use std::net::SocketAddr;
use std::sync::Arc;

use rsipstack::dialog::dialog::{Dialog, DialogState, DialogStateReceiver, TerminatedReason, TransactionHandle};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::{Header, HeadersExt, Method, Request, StatusCode};
use rsipstack::transport::TransportLayer;
use rsipstack::transport::udp::UdpConnection;
use rsipstack::{EndpointBuilder, Error as StackError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Methods we answer (the `Allow` header).
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY";
/// New calls waiting for the bridge.
const CALL_QUEUE: usize = 64;

/// Why the stack could not start or act.
#[derive(Debug, thiserror::Error)]
pub enum SipError {
    /// The SIP socket could not be bound.
    #[error("cannot listen for SIP on {addr}: {reason}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The stack's reason.
        reason: String,
    },
    /// The stack refused an action on a dialog.
    #[error("SIP: {0}")]
    Stack(String),
}

impl From<StackError> for SipError {
    fn from(e: StackError) -> Self {
        SipError::Stack(e.to_string())
    }
}

/// A final status we send on a new INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// 486 Busy Here: `server.max_calls` reached.
    Busy,
    /// 488 Not Acceptable Here: no codec in common, no audio.
    NotAcceptable,
    /// 503 Service Unavailable: the models are not loaded yet.
    Unavailable,
    /// 400 Bad Request: the offer does not parse.
    BadRequest,
}

/// Refuses new calls while the server drains: 503 with `Retry-After`, so a trunk
/// or PBX tries another instance (or this one later).
#[derive(Debug, Clone)]
pub struct Draining {
    /// Cancelled when the server starts draining.
    pub token: CancellationToken,
    /// The `Retry-After` seconds sent with the 503.
    pub retry_after_s: u64,
}

impl Refuse {
    fn status(self) -> StatusCode {
        match self {
            Refuse::Busy => StatusCode::BusyHere,
            Refuse::NotAcceptable => StatusCode::NotAcceptableHere,
            Refuse::Unavailable => StatusCode::ServiceUnavailable,
            Refuse::BadRequest => StatusCode::BadRequest,
        }
    }
}

/// How a dialog ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The caller hung up (BYE).
    Bye,
    /// The caller gave up before we answered (CANCEL).
    Cancel,
    /// We hung up or refused the call.
    Local,
    /// No ACK (or another transaction timeout).
    Timeout,
    /// Anything else the stack reports.
    Other(String),
}

/// What happens in an established (or ringing) call.
#[derive(Debug)]
pub enum CallEvent {
    /// The caller's ACK arrived; its body (the answer to our offer, when the INVITE
    /// had none).
    Acked {
        /// The ACK's body; empty when it has none.
        sdp: Vec<u8>,
    },
    /// A re-INVITE (hold, resume, a new address): answer it with [`Reoffer::answer`].
    Reoffer(Reoffer),
    /// A NOTIFY about our REFER (already answered 200): the status the transfer
    /// target answered so far (100 trying, 180 ringing, 200 connected, 486 busy…).
    TransferProgress {
        /// The sipfrag's status code.
        status: u16,
        /// Whether the subscription ended with it (`Subscription-State: terminated`).
        terminated: bool,
    },
    /// The dialog is over.
    Ended(EndReason),
}

/// A re-INVITE waiting for our answer.
#[derive(Debug)]
pub struct Reoffer {
    /// Its body (empty for a re-INVITE without an offer).
    pub sdp: Vec<u8>,
    handle: TransactionHandle,
}

impl Reoffer {
    /// Answers 200 with our description.
    pub async fn answer(self, sdp: String) {
        let headers = vec![Header::ContentType("application/sdp".into())];
        if self.handle.respond(StatusCode::OK, Some(headers), Some(sdp.into_bytes())).await.is_err() {
            debug!("the re-INVITE's transaction ended before our answer");
        }
    }

    /// Refuses it (488 for an offer we cannot take); the call goes on as it was.
    pub async fn refuse(self, why: Refuse) {
        let _ = self.handle.respond(why.status(), None, None).await;
    }
}

/// A new INVITE: answer it ([`ringing`](Self::ringing), [`accept`](Self::accept)) or
/// [`refuse`](Self::refuse) it, then follow it with [`next_event`](Self::next_event).
pub struct IncomingCall {
    dialog: InviteDialog,
    states: DialogStateReceiver,
    layer: Arc<DialogLayer>,
    acked: bool,
    /// The INVITE's body (empty: the caller wants our offer).
    pub sdp: Vec<u8>,
    /// Call-ID, for the logs.
    pub call_id: String,
    /// The From header's URI, for the logs.
    pub from: String,
    /// The Request-URI (who was called), for the logs.
    pub to: String,
    /// Where the INVITE came from.
    pub source: Option<SocketAddr>,
}

impl IncomingCall {
    /// Sends 180 Ringing.
    pub fn ringing(&self) -> Result<(), SipError> {
        Ok(self.dialog.ringing(None, None)?)
    }

    /// Sends 200 OK with our description (retransmitted until the ACK).
    pub fn accept(&self, sdp: String) -> Result<(), SipError> {
        let headers = vec![Header::ContentType("application/sdp".into())];
        Ok(self.dialog.accept(Some(headers), Some(sdp.into_bytes()))?)
    }

    /// Sends a final error status.
    pub fn refuse(&self, why: Refuse) -> Result<(), SipError> {
        Ok(self.dialog.reject(Some(why.status()), None)?)
    }

    /// Hangs up an established call (BYE) and waits for its answer.
    pub async fn bye(&self) -> Result<(), SipError> {
        Ok(self.dialog.bye().await?)
    }

    /// A handle that sends REFER in this call's dialog, usable while
    /// [`next_event`](Self::next_event) is awaited.
    pub fn referrer(&self) -> Referrer {
        Referrer { dialog: self.dialog.clone() }
    }

    /// The next thing that happens in the call; `Ended` is the last.
    pub async fn next_event(&mut self) -> CallEvent {
        loop {
            let Some(state) = self.states.recv().await else { return CallEvent::Ended(EndReason::Other("the stack dropped the dialog".into())) };
            match state {
                DialogState::Confirmed(..) if !self.acked => {
                    // Only the first confirmation (the INVITE's ACK) is reported; later
                    // ones follow re-INVITEs and other in-dialog requests.
                    self.acked = true;
                    let sdp = self.dialog.last_remote_ack().map(|ack| ack.body().clone()).unwrap_or_default();
                    return CallEvent::Acked { sdp };
                }
                DialogState::Confirmed(..) => {}
                DialogState::Updated(_, req, handle) => {
                    if req.method == Method::Invite {
                        return CallEvent::Reoffer(Reoffer { sdp: req.body().clone(), handle });
                    }
                    // UPDATE without our support for it: refuse, the call goes on.
                    let _ = handle.respond(StatusCode::NotImplemented, None, None).await;
                }
                DialogState::Options(_, _, handle) => {
                    let _ = handle.respond(StatusCode::OK, Some(vec![Header::Allow(ALLOW.into())]), None).await;
                }
                DialogState::Notify(_, req, handle) => match read_notify(&req) {
                    NotifyReading::OtherEvent => {
                        // RFC 6665: an event package we did not subscribe to.
                        let _ = handle.respond(StatusCode::BadEvent, None, None).await;
                    }
                    NotifyReading::NoStatus => {
                        let _ = handle.respond(StatusCode::BadRequest, None, None).await;
                        debug!("a NOTIFY for our REFER without a sipfrag status line: 400");
                    }
                    NotifyReading::Progress { status, terminated } => {
                        let _ = handle.respond(StatusCode::OK, None, None).await;
                        return CallEvent::TransferProgress { status, terminated };
                    }
                },
                DialogState::Info(_, _, handle) | DialogState::Message(_, _, handle) | DialogState::Publish(_, _, handle) | DialogState::Refer(_, _, handle) => {
                    let _ = handle.respond(StatusCode::NotImplemented, None, None).await;
                }
                DialogState::Terminated(_, reason) => {
                    return CallEvent::Ended(match reason {
                        TerminatedReason::UacBye => EndReason::Bye,
                        TerminatedReason::UacCancel => EndReason::Cancel,
                        TerminatedReason::UasBye | TerminatedReason::UasBusy | TerminatedReason::UasDecline | TerminatedReason::UasOther(_) => EndReason::Local,
                        TerminatedReason::Timeout => EndReason::Timeout,
                        other => EndReason::Other(format!("{other:?}")),
                    });
                }
                DialogState::Calling(_) | DialogState::Trying(_) | DialogState::Early(..) | DialogState::WaitAck(..) => {}
            }
        }
    }
}

/// What a NOTIFY in a call's dialog says, read from its headers and body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyReading {
    /// An event package other than `refer` (answered 489 Bad Event).
    OtherEvent,
    /// A NOTIFY for our REFER without a sipfrag status line (answered 400).
    NoStatus,
    /// A NOTIFY for our REFER (answered 200): the transfer target's status so far.
    Progress {
        /// The sipfrag's status code.
        status: u16,
        /// Whether the subscription ended with it (`Subscription-State: terminated`).
        terminated: bool,
    },
}

/// Reads a NOTIFY: its `Event` package (`o` in compact form), `Subscription-State`
/// and `message/sipfrag` body.
pub fn read_notify(req: &Request) -> NotifyReading {
    let event = header_value(req.headers.iter(), &["event", "o"]).unwrap_or_default();
    let package = event.split(';').next().unwrap_or_default().trim();
    if !package.eq_ignore_ascii_case("refer") {
        return NotifyReading::OtherEvent;
    }
    let terminated = header_value(req.headers.iter(), &["subscription-state"]).is_some_and(|s| s.trim().to_ascii_lowercase().starts_with("terminated"));
    match sipfrag_status(req.body()) {
        Some(status) => NotifyReading::Progress { status, terminated },
        None => NotifyReading::NoStatus,
    }
}

/// The value of the first header named one of `names` (lowercase; compact forms too).
fn header_value<'a>(headers: impl Iterator<Item = &'a Header>, names: &[&str]) -> Option<String> {
    headers.into_iter().find(|h| names.iter().any(|n| h.name().eq_ignore_ascii_case(n))).map(|h| h.value().to_string())
}

/// The status code of a `message/sipfrag` body's status line (`SIP/2.0 200 OK`).
pub fn sipfrag_status(body: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(body).ok()?;
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.eq_ignore_ascii_case("SIP/2.0") {
        return None;
    }
    let code: u16 = parts.next()?.parse().ok()?;
    (100..700).contains(&code).then_some(code)
}

/// Sends REFER in one call's dialog (RFC 3515 blind transfer).
#[derive(Clone)]
pub struct Referrer {
    dialog: InviteDialog,
}

impl Referrer {
    /// Asks the caller's side to call `target` instead (Refer-To), with extra
    /// headers (name, value); returns the REFER's final status (202 when accepted).
    /// How the transfer goes comes later as [`CallEvent::TransferProgress`].
    pub async fn refer(&self, target: &str, extra: Vec<(String, String)>) -> Result<u16, SipError> {
        let headers: Vec<Header> = extra.into_iter().map(|(name, value)| Header::Other(name, value)).collect();
        let refer_to = format!("<{target}>");
        match self.dialog.refer(refer_to, Some(headers), None).await? {
            Some(response) => Ok(u16::from(response.status_code.clone())),
            None => Err(SipError::Stack("the call is not established: REFER not sent".into())),
        }
    }
}

impl Drop for IncomingCall {
    fn drop(&mut self) {
        self.layer.remove_dialog(&self.dialog.id());
    }
}

/// The running stack: new calls arrive on [`Stack::calls`].
pub struct Stack {
    /// Where SIP is received.
    pub local: SocketAddr,
    /// New INVITEs.
    pub calls: mpsc::Receiver<IncomingCall>,
}

/// Binds the SIP socket and runs the stack until `cancel`; new calls (and OPTIONS)
/// get 503 once `draining` is cancelled.
pub async fn start(listen: SocketAddr, contact_host: Option<std::net::IpAddr>, draining: Draining, cancel: CancellationToken) -> Result<Stack, SipError> {
    let transport = TransportLayer::new(cancel.clone());
    let udp = UdpConnection::create_connection(listen, None, Some(cancel.child_token())).await.map_err(|e| SipError::Bind { addr: listen, reason: e.to_string() })?;
    let local = udp.get_addr().get_socketaddr().map_err(|e| SipError::Bind { addr: listen, reason: e.to_string() })?;
    transport.add_transport(udp.into());
    let endpoint = EndpointBuilder::new().with_cancel_token(cancel.clone()).with_transport_layer(transport).with_user_agent("Parley").build();
    let incoming = endpoint.incoming_transactions()?;
    let layer = Arc::new(DialogLayer::new(endpoint.inner.clone()));
    let host = contact_host.unwrap_or(local.ip());
    let contact = rsipstack::sip::Uri::try_from(format!("sip:parley@{}", SocketAddr::new(host, local.port())).as_str()).map_err(|e| SipError::Stack(e.to_string()))?;
    let (calls_tx, calls) = mpsc::channel(CALL_QUEUE);
    tokio::spawn(async move { endpoint.serve().await }.instrument(info_span!("sip_endpoint")));
    tokio::spawn(dispatch(incoming, layer, contact, calls_tx, draining, cancel).instrument(info_span!("sip")));
    info!(%local, "SIP listening (UDP)");
    Ok(Stack { local, calls })
}

/// Sorts incoming transactions: new INVITEs become calls, in-dialog requests go to
/// their dialog, OPTIONS is answered, the rest refused.
async fn dispatch(
    mut incoming: rsipstack::transaction::TransactionReceiver,
    layer: Arc<DialogLayer>,
    contact: rsipstack::sip::Uri,
    calls: mpsc::Sender<IncomingCall>,
    draining: Draining,
    cancel: CancellationToken,
) {
    loop {
        let mut tx = tokio::select! {
            t = incoming.recv() => match t { Some(t) => t, None => break },
            _ = cancel.cancelled() => break,
        };
        let method = tx.original.method;
        let in_dialog = tx.original.to_header().ok().and_then(|t| t.tag().ok().flatten()).is_some();
        match method {
            Method::Invite | Method::Options if !in_dialog && draining.token.is_cancelled() => {
                // Before any dialog exists: the stack's reject takes no Retry-After.
                info!(%method, retry_after_s = draining.retry_after_s, "refused: the server is shutting down (503)");
                let headers = vec![Header::RetryAfter(draining.retry_after_s.max(1).to_string().into())];
                if let Err(e) = tx.reply_with(StatusCode::ServiceUnavailable, headers, None).await {
                    debug!(error = %e, "503 not sent");
                }
            }
            Method::Invite if !in_dialog => {
                let (states_tx, states) = layer.new_dialog_state_channel();
                let dialog = match layer.get_or_create_server_invite(&tx, states_tx, None, Some(contact.clone())) {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "INVITE refused: cannot make a dialog of it");
                        let _ = tx.reply(StatusCode::BadRequest).await;
                        continue;
                    }
                };
                let call = IncomingCall {
                    sdp: tx.original.body().clone(),
                    call_id: tx.original.call_id_header().map(|h| h.value().to_string()).unwrap_or_default(),
                    from: tx.original.from_header().ok().and_then(|f| f.uri().ok()).map(|u| u.to_string()).unwrap_or_default(),
                    to: tx.original.uri.to_string(),
                    source: tx.connection.as_ref().and_then(|c| c.get_addr().get_socketaddr().ok()),
                    dialog: dialog.clone(),
                    states,
                    layer: layer.clone(),
                    acked: false,
                };
                let mut handler = dialog;
                tokio::spawn(async move {
                    if let Err(e) = handler.handle(&mut tx).await {
                        debug!(error = %e, "INVITE transaction ended with an error");
                    }
                });
                if calls.try_send(call).is_err() {
                    warn!("the SIP bridge is not taking calls (queue full or closed)");
                }
            }
            Method::Options if !in_dialog => {
                let headers = vec![Header::Allow(ALLOW.into()), Header::Accept("application/sdp".into())];
                if let Err(e) = tx.reply_with(StatusCode::OK, headers, None).await {
                    debug!(error = %e, "OPTIONS answer not sent");
                }
            }
            Method::Ack => {
                // An ACK outside any transaction (a late one): nothing to answer.
                if let Some(Dialog::Invite(mut d)) = layer.match_dialog(&tx) {
                    let _ = d.handle(&mut tx).await;
                }
            }
            _ => match layer.match_dialog(&tx) {
                Some(Dialog::Invite(mut d)) => {
                    tokio::spawn(async move {
                        if let Err(e) = d.handle(&mut tx).await {
                            debug!(error = %e, "in-dialog request ended with an error");
                        }
                    });
                }
                _ if in_dialog || matches!(method, Method::Bye | Method::Cancel) => {
                    debug!(%method, "request for a dialog we do not have: 481");
                    let _ = tx.reply(StatusCode::CallTransactionDoesNotExist).await;
                }
                _ => {
                    debug!(%method, "method not supported: 405");
                    let _ = tx.reply_with(StatusCode::MethodNotAllowed, vec![Header::Allow(ALLOW.into())], None).await;
                }
            },
        }
    }
    debug!("SIP dispatch stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Request {
        Request::try_from(text).expect("a request")
    }

    #[test]
    fn a_notify_is_read_by_its_event_package_state_and_sipfrag() {
        let head = "NOTIFY sip:parley@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.2;branch=z9hG4bK1\r\nFrom: <sip:a@192.0.2.2>;tag=1\r\nTo: <sip:parley@192.0.2.1>;tag=2\r\nCall-ID: c1\r\nCSeq: 2 NOTIFY\r\n";
        let notify = |headers: &str, body: &str| request(&format!("{head}{headers}Content-Length: {}\r\n\r\n{body}", body.len()));
        assert_eq!(
            read_notify(&notify("Event: refer;id=7\r\nSubscription-State: terminated;reason=noresource\r\n", "SIP/2.0 200 OK\r\n")),
            NotifyReading::Progress { status: 200, terminated: true }
        );
        assert_eq!(read_notify(&notify("o: REFER\r\nSubscription-State: active\r\n", "SIP/2.0 180 Ringing\r\n")), NotifyReading::Progress { status: 180, terminated: false });
        assert_eq!(read_notify(&notify("Event: dialog\r\n", "SIP/2.0 200 OK\r\n")), NotifyReading::OtherEvent);
        assert_eq!(read_notify(&notify("", "SIP/2.0 200 OK\r\n")), NotifyReading::OtherEvent);
        assert_eq!(read_notify(&notify("Event: refer\r\n", "")), NotifyReading::NoStatus);
    }

    #[test]
    fn a_sipfrag_gives_its_status_line_code() {
        assert_eq!(sipfrag_status(b"SIP/2.0 200 OK\r\n"), Some(200));
        assert_eq!(sipfrag_status(b"\r\nSIP/2.0 100 Trying"), Some(100));
        assert_eq!(sipfrag_status(b"sip/2.0 486 Busy Here\r\nContent-Length: 0\r\n"), Some(486));
        for bad in [&b""[..], b"SIP/2.0", b"SIP/2.0 abc OK", b"HTTP/1.1 200 OK", b"SIP/2.0 99 Low", b"\xff\xfe"] {
            assert_eq!(sipfrag_status(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
