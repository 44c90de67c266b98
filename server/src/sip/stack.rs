//! The SIP stack behind a small surface of ours: `rsipstack` (pinned) does the
//! parsing, the transactions (retransmission of our 200 until the ACK, 100 Trying,
//! 487 on CANCEL, absorbing retransmitted requests) and the dialogs (tags, CSeq,
//! routing in-dialog requests). The rest of the bridge sees [`IncomingCall`]s and
//! [`CallEvent`]s only, so another stack would replace this file alone.

use std::net::SocketAddr;
use std::sync::Arc;

use rsipstack::dialog::dialog::{Dialog, DialogState, DialogStateReceiver, TerminatedReason, TransactionHandle};
use rsipstack::dialog::dialog_layer::DialogLayer;
use rsipstack::dialog::invite_dialog::InviteDialog;
use rsipstack::sip::{Header, HeadersExt, Method, StatusCode};
use rsipstack::transport::TransportLayer;
use rsipstack::transport::udp::UdpConnection;
use rsipstack::{EndpointBuilder, Error as StackError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

/// Methods we answer (the `Allow` header).
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS";
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
                DialogState::Info(_, _, handle) | DialogState::Message(_, _, handle) | DialogState::Notify(_, _, handle) | DialogState::Publish(_, _, handle) | DialogState::Refer(_, _, handle) => {
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

/// Binds the SIP socket and runs the stack until `cancel`.
pub async fn start(listen: SocketAddr, contact_host: Option<std::net::IpAddr>, cancel: CancellationToken) -> Result<Stack, SipError> {
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
    tokio::spawn(dispatch(incoming, layer, contact, calls_tx, cancel).instrument(info_span!("sip")));
    info!(%local, "SIP listening (UDP)");
    Ok(Stack { local, calls })
}

/// Sorts incoming transactions: new INVITEs become calls, in-dialog requests go to
/// their dialog, OPTIONS is answered, the rest refused.
async fn dispatch(mut incoming: rsipstack::transaction::TransactionReceiver, layer: Arc<DialogLayer>, contact: rsipstack::sip::Uri, calls: mpsc::Sender<IncomingCall>, cancel: CancellationToken) {
    loop {
        let mut tx = tokio::select! {
            t = incoming.recv() => match t { Some(t) => t, None => break },
            _ = cancel.cancelled() => break,
        };
        let method = tx.original.method;
        let in_dialog = tx.original.to_header().ok().and_then(|t| t.tag().ok().flatten()).is_some();
        match method {
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
