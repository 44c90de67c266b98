//! SIP datagrams as the bridge's UDP socket receives them: rsipstack's own path
//! (pinned =0.7.14, as the server): `SipMessage::try_from(&[u8])`, the Via
//! `received`/`rport` update, the transaction key and the dialog id; then what the
//! server reads from a request: the dispatcher's To tag, Call-ID, From URI and
//! Request-URI (server/src/sip/stack.rs, `dispatch`), and for a NOTIFY our reading
//! of its Event, Subscription-State and `message/sipfrag` body
//! (`stack::read_notify`, compiled in from server/src/sip/stack.rs). A body is also
//! read as a sipfrag by itself (`stack::sipfrag_status`).
//!
//! Beyond "no panic": a sipfrag status is in 100..=699; a NOTIFY read as transfer
//! progress has a body whose status line gives that status; a parsed message
//! serialises, and what it serialises to parses again as the same kind of message
//! with the same method or status and the same body.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use rsipstack::dialog::DialogId;
use rsipstack::sip::{HeadersExt, Method, SipMessage, Transport};
use rsipstack::transaction::key::{TransactionKey, TransactionRole};
use rsipstack::transport::SipConnection;

#[allow(dead_code)]
#[path = "../../../server/src/sip/stack.rs"]
mod stack;

use stack::NotifyReading;

fuzz_target!(|data: &[u8]| {
    if let Some(status) = stack::sipfrag_status(data) {
        assert!((100..700).contains(&status));
    }
    let Ok(msg) = SipMessage::try_from(data) else { return };
    let from: SocketAddr = "198.51.100.7:5062".parse().expect("addr");
    let Ok(msg) = SipConnection::update_msg_received(msg, from, Transport::Udp) else { return };
    let again = SipMessage::try_from(msg.to_bytes().as_slice()).unwrap_or_else(|e| panic!("a parsed message does not parse again: {e}\n{:?}", String::from_utf8_lossy(&msg.to_bytes())));
    match (&msg, &again) {
        (SipMessage::Request(a), SipMessage::Request(b)) => {
            assert_eq!(a.method, b.method);
            assert_eq!(a.body(), b.body());
        }
        (SipMessage::Response(a), SipMessage::Response(b)) => {
            assert_eq!(a.status_code.code(), b.status_code.code());
            assert_eq!(a.body(), b.body());
        }
        _ => panic!("a message changed kind when written out"),
    }
    let _ = msg.to_string();
    match msg {
        SipMessage::Request(req) => {
            let _ = TransactionKey::from_request(&req, TransactionRole::Server);
            let _ = DialogId::try_from((&req, TransactionRole::Server));
            // The dispatcher's reads (stack.rs `dispatch`).
            let _in_dialog = req.to_header().ok().and_then(|t| t.tag().ok().flatten()).is_some();
            let _call_id = req.call_id_header().map(|h| h.value().to_string()).unwrap_or_default();
            let _from = req.from_header().ok().and_then(|f| f.uri().ok()).map(|u| u.to_string()).unwrap_or_default();
            let _to = req.uri.to_string();
            if req.method == Method::Notify {
                match stack::read_notify(&req) {
                    NotifyReading::Progress { status, .. } => {
                        assert!((100..700).contains(&status));
                        assert_eq!(stack::sipfrag_status(req.body()), Some(status));
                    }
                    NotifyReading::NoStatus => assert_eq!(stack::sipfrag_status(req.body()), None),
                    NotifyReading::OtherEvent => {}
                }
            }
        }
        SipMessage::Response(resp) => {
            let _ = TransactionKey::from_response(&resp, TransactionRole::Client);
            let _ = DialogId::try_from((&resp, TransactionRole::Client));
            let _ = resp.reason_phrase();
        }
    }
});
