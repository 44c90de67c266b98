//! The demo pharmacy desk: built-in tools over an embedded SQLite database, so a
//! caller can ask about their orders and prescriptions and the agent can answer from
//! real records (and change them: a refill request uses a refill).
//!
//! ```no_run
//! # fn demo() -> Result<(), parley_agent::tools::pharmacy::PharmacyError> {
//! use std::sync::Arc;
//! use parley_agent::tools::ToolRegistry;
//! use parley_agent::tools::pharmacy::{PharmacyDb, pharmacy_tools};
//!
//! let db = Arc::new(PharmacyDb::open(std::path::Path::new("pharmacy.sqlite"))?);
//! let mut registry = ToolRegistry::default();
//! for tool in pharmacy_tools(db) {
//!     registry.register(tool);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The desk works as a pharmacy's phone line must, whatever the model does:
//!
//! - **Identity before disclosure.** Orders and prescriptions are disclosed only
//!   after the caller gave a member ID and the matching date of birth in this call
//!   (`verify_member`; the state is per call, in its [`CallScope`]). Only the
//!   verified member's records are disclosed; another member's order reads as not
//!   found. Three failed checks end the attempts for the call. The phone number and
//!   the date of birth are never read out.
//! - **Refills only when confirmed.** `request_refill` first asks for confirmation;
//!   it places the refill only when called with `confirm: true` in a later response
//!   than the one that asked, i.e. after the caller answered. A look-up of a
//!   prescription with refills left offers one ("Would you like me to request a
//!   refill?", an `offer` in its result); a plain yes in the very next turn is the
//!   confirmation.
//! - **Words made for speech.** Results give facts in spoken form and a `say`
//!   sentence (see `say`); failures are sentences the caller may hear.
//!
//! Arguments are read leniently (see `args`); the wording the model sees (tool
//! descriptions, the desk's system prompt) lives in per-model-family files (see
//! `prompt`).

mod args;
mod db;
mod identity;
mod prompt;
mod say;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use parley_llm::ToolSpec;
use serde_json::{Value, json};

pub use db::{PharmacyDb, PharmacyError};

use self::args::{BIRTH_DATE_KEYS, CONFIRM_KEYS, IdKind, flag_argument, id_argument, optional_id, text_argument};
use self::db::RefillOutcome;
use self::identity::Identity;
use super::{CallScope, Tool, ToolError, ToolFuture};

/// The pharmacy desk's tools over `db`, ready to register: `verify_member`,
/// `list_orders`, `get_order_details`, `get_prescription`, `get_pickup_time` and
/// `request_refill`. They share the one database, so a refill requested in one call
/// is seen by the next; who the caller is stays with each call.
pub fn pharmacy_tools(db: Arc<PharmacyDb>) -> Vec<Arc<dyn Tool>> {
    Operation::ALL
        .iter()
        .map(|&operation| Arc::new(PharmacyTool { db: Arc::clone(&db), operation }) as Arc<dyn Tool>)
        .collect()
}

/// One desk operation; each is one tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    VerifyMember,
    ListOrders,
    GetOrderDetails,
    GetPrescription,
    GetPickupTime,
    RequestRefill,
}

impl Operation {
    const ALL: [Operation; 6] = [
        Operation::VerifyMember,
        Operation::ListOrders,
        Operation::GetOrderDetails,
        Operation::GetPrescription,
        Operation::GetPickupTime,
        Operation::RequestRefill,
    ];

    fn name(self) -> &'static str {
        match self {
            Operation::VerifyMember => "verify_member",
            Operation::ListOrders => "list_orders",
            Operation::GetOrderDetails => "get_order_details",
            Operation::GetPrescription => "get_prescription",
            Operation::GetPickupTime => "get_pickup_time",
            Operation::RequestRefill => "request_refill",
        }
    }

    fn id_kind(self) -> IdKind {
        match self {
            Operation::VerifyMember | Operation::ListOrders => IdKind::Member,
            Operation::GetOrderDetails | Operation::GetPickupTime => IdKind::Order,
            Operation::GetPrescription | Operation::RequestRefill => IdKind::Prescription,
        }
    }

    /// The JSON schema, its descriptions from the model family's prompt file.
    fn parameters(self, pack: &prompt::PromptPack) -> Value {
        let key = self.id_kind().key();
        let mut properties = serde_json::Map::new();
        // The id may only be one the caller said or a tool returned: the engine
        // narrows it to those (`x-parley-known`), so the model cannot invent one.
        properties.insert(
            key.into(),
            json!({ "type": "string", "description": pack.parameter(key), "pattern": self.id_kind().pattern(), parley_llm::known_ids::KNOWN: true }),
        );
        let mut required = vec![key];
        match self {
            Operation::VerifyMember => {
                // Only a date the caller said (`x-parley-heard`): never one from an example.
                properties.insert(
                    "date_of_birth".into(),
                    json!({ "type": "string", "description": pack.parameter("date_of_birth"), parley_llm::known_ids::HEARD: "date" }),
                );
                required.push("date_of_birth");
            }
            Operation::ListOrders => required.clear(),
            Operation::RequestRefill => {
                properties.insert("confirm".into(), json!({ "type": "boolean", "description": pack.parameter("confirm") }));
            }
            _ => {}
        }
        let mut schema = json!({ "type": "object", "properties": properties, "required": required });
        if self == Operation::RequestRefill {
            // "I'd like a refill of my prescription" from a member with one
            // prescription is a request for that one (`x-parley-asked`); "refills
            // left" is not a request ("refills" is another word).
            schema[parley_llm::known_ids::ASKED] = json!(r"\b(?:refill|renew)\b");
        }
        if self == Operation::VerifyMember {
            // Once it passes, it is not offered again, and the agent goes on to what
            // the caller asked (`x-parley-gate`).
            schema[parley_llm::known_ids::GATE] = json!(true);
        } else {
            // Only the identity check can come first: the look-ups are not callable
            // until it has succeeded in this call (the tools refuse anyway; this keeps
            // the model from trying).
            schema[parley_llm::known_ids::AFTER] = json!(Operation::VerifyMember.name());
        }
        schema
    }

    /// Reads the arguments this operation takes.
    fn request(self, arguments: &Value) -> Result<Request, ToolError> {
        let id = match self {
            // The check without a member ID says what it needs.
            Operation::ListOrders | Operation::VerifyMember => optional_id(arguments, IdKind::Member)?,
            _ => Some(id_argument(arguments, self.id_kind())?),
        };
        Ok(Request {
            id,
            birth_date: text_argument(arguments, BIRTH_DATE_KEYS),
            confirm: flag_argument(arguments, CONFIRM_KEYS),
        })
    }

    /// Runs the operation on a connection, given what this call has proved so far.
    fn execute(self, conn: &mut rusqlite::Connection, request: &Request, seen: &Seen) -> Result<(Result<Value, ToolError>, Change), rusqlite::Error> {
        let failed = |text: String| Ok((Err(ToolError::Declined(text)), Change::None));
        let Some(member_id) = seen.verified.as_deref().filter(|_| self != Operation::VerifyMember) else {
            return if self == Operation::VerifyMember { verify(conn, request, seen) } else { failed(say::VERIFY_FIRST.into()) };
        };
        let id = request.id.clone().unwrap_or_else(|| member_id.to_string());
        let ok = |value: Value| Ok((Ok(value), Change::None));
        match self {
            Operation::VerifyMember => verify(conn, request, seen),
            Operation::ListOrders if id != member_id => failed(say::other_member(member_id)),
            Operation::ListOrders => ok(say::order_list(member_id, &db::orders_of(conn, member_id)?)),
            Operation::GetOrderDetails | Operation::GetPickupTime => match db::order(conn, &id)?.filter(|o| o.member_id == member_id) {
                None => failed(say::no_such_order(&id)),
                Some(order) if self == Operation::GetOrderDetails => {
                    let rx = match order.rx_id.as_deref() {
                        Some(rx_id) => db::prescription(conn, rx_id)?.filter(|rx| rx.member_id == member_id),
                        None => None,
                    };
                    ok(say::order_details(&order, rx.as_ref()))
                }
                Some(order) => ok(say::pickup_time(&order)),
            },
            Operation::GetPrescription => match db::prescription(conn, &id)?.filter(|rx| rx.member_id == member_id) {
                None => failed(say::no_such_prescription(&id)),
                Some(rx) if rx.refills_remaining > 0 => Ok((Ok(say::refills(&rx)), Change::Offered(rx.rx_id))),
                Some(rx) => ok(say::refills(&rx)),
            },
            Operation::RequestRefill => refill(conn, &id, member_id, request, seen),
        }
    }
}

/// A tool's arguments, read.
#[derive(Debug, Clone)]
struct Request {
    /// The operation's id (member, order or prescription), normalized.
    id: Option<String>,
    /// A date of birth as the model wrote it.
    birth_date: Option<String>,
    /// The caller confirmed (refills).
    confirm: bool,
}

/// What the call had proved when the tool ran.
#[derive(Debug, Clone)]
struct Seen {
    verified: Option<String>,
    locked: bool,
    /// The response that offered this request's refill for confirmation, if any.
    proposed_at: Option<u64>,
    /// The response whose look-up offered this prescription's refill, if any.
    offered_at: Option<u64>,
    /// The caller's turn before this response was a plain yes.
    said_yes: bool,
    /// The response in progress.
    response: u64,
}

/// What the tool changes in the call's identity state.
#[derive(Debug, Clone, PartialEq)]
enum Change {
    None,
    Verified(String),
    /// A check that did not match, with the pair tried (member, date).
    FailedCheck(String),
    /// A refill was offered for confirmation in this response.
    Proposed(String),
    /// A look-up offered the prescription's refill in this response.
    Offered(String),
    /// A refill was placed (or found placed): the offer is used up.
    Settled(String),
}

fn verify(conn: &rusqlite::Connection, request: &Request, seen: &Seen) -> Result<(Result<Value, ToolError>, Change), rusqlite::Error> {
    if seen.locked {
        return Ok((Err(ToolError::Declined(say::LOCKED.into())), Change::None));
    }
    let Some(member_id) = request.id.clone() else {
        return Ok((Err(ToolError::Declined(say::VERIFY_FIRST.into())), Change::None));
    };
    let Some(raw_date) = request.birth_date.as_deref() else {
        return Ok((Err(ToolError::Declined(say::NEED_BIRTH_DATE.into())), Change::None));
    };
    let Some(given) = identity::parse_date(raw_date) else {
        return Ok((
            Err(ToolError::InvalidArguments(format!(
                "date_of_birth \"{raw_date}\" is not a whole date; call again with it as YYYY-MM-DD, or ask the caller to say it again"
            ))),
            Change::None,
        ));
    };
    let member = db::member(conn, &member_id)?;
    let matches = member.as_ref().is_some_and(|m| crate::tools::spoken::ymd(&m.date_of_birth) == Some(given));
    match member.filter(|_| matches) {
        None => Ok((Err(ToolError::Declined(say::NO_MATCH.into())), Change::FailedCheck(format!("{member_id} {given:?}")))),
        Some(member) => {
            let orders = db::orders_of(conn, &member.member_id)?;
            let prescriptions = db::prescriptions_of(conn, &member.member_id)?;
            Ok((Ok(say::verified(&member.member_id, &member.name, &orders, &prescriptions)), Change::Verified(member.member_id)))
        }
    }
}

fn refill(
    conn: &mut rusqlite::Connection,
    rx_id: &str,
    member_id: &str,
    request: &Request,
    seen: &Seen,
) -> Result<(Result<Value, ToolError>, Change), rusqlite::Error> {
    let Some(rx) = db::prescription(conn, rx_id)?.filter(|rx| rx.member_id == member_id) else {
        return Ok((Err(ToolError::Declined(say::no_such_prescription(rx_id))), Change::None));
    };
    if rx.refills_remaining <= 0 {
        return Ok((Err(ToolError::Declined(say::no_refills(&rx))), Change::None));
    }
    // Confirmed means: asked in an earlier response, and now called with confirm; or
    // offered by the look-up just before, and answered with a plain yes.
    let asked = seen.proposed_at.is_some_and(|at| at < seen.response);
    let offered = seen.said_yes && seen.offered_at.is_some_and(|at| at + 1 == seen.response);
    let confirmed = request.confirm && (asked || offered);
    if !confirmed {
        return Ok((Ok(say::refill_needs_confirmation(&rx)), Change::Proposed(rx.rx_id)));
    }
    Ok(match db::request_refill(conn, rx_id)? {
        RefillOutcome::UnknownRx => (Err(ToolError::Declined(say::no_such_prescription(rx_id))), Change::None),
        RefillOutcome::NoRefills(rx) => (Err(ToolError::Declined(say::no_refills(&rx))), Change::Settled(rx.rx_id)),
        RefillOutcome::AlreadyRequested { prescription, request_id, .. } => {
            (Ok(say::refill_already_requested(&prescription, request_id)), Change::Settled(prescription.rx_id))
        }
        RefillOutcome::Requested { prescription, request_id } => {
            (Ok(say::refill_requested(&prescription, request_id)), Change::Settled(prescription.rx_id))
        }
    })
}

/// One pharmacy operation as a [`Tool`].
struct PharmacyTool {
    db: Arc<PharmacyDb>,
    operation: Operation,
}

impl Tool for PharmacyTool {
    fn spec(&self) -> ToolSpec {
        self.spec_for("")
    }

    fn spec_for(&self, model: &str) -> ToolSpec {
        let pack = prompt::for_model(model);
        ToolSpec {
            name: self.operation.name().to_string(),
            description: pack.tool(self.operation.name()),
            parameters: self.operation.parameters(pack),
        }
    }

    fn guidance(&self, model: &str) -> Option<String> {
        Some(prompt::for_model(model).system_text())
    }

    fn call(&self, arguments: Value, scope: &CallScope) -> ToolFuture<'_> {
        let operation = self.operation;
        let db = Arc::clone(&self.db);
        let scope = scope.clone();
        Box::pin(async move {
            let request = operation.request(&arguments)?;
            let response = scope.response();
            let seen = scope.with(|identity: &mut Identity| Seen {
                verified: identity.verified.clone(),
                locked: identity.locked(),
                proposed_at: request.id.as_ref().and_then(|id| identity.proposed_refills.get(id).copied()),
                offered_at: request.id.as_ref().and_then(|id| identity.offered_refills.get(id).copied()),
                said_yes: scope.caller_said_yes(),
                response,
            });
            tracing::debug!(tool = operation.name(), verified = seen.verified.is_some(), "pharmacy tool");
            let (result, change) = {
                let request = request.clone();
                db.run(move |conn| operation.execute(conn, &request, &seen)).await?
            };
            scope.with(|identity: &mut Identity| match change {
                Change::None => {}
                Change::Verified(member) => {
                    if identity.verified.as_ref() != Some(&member) {
                        identity.proposed_refills.clear();
                        identity.offered_refills.clear();
                    }
                    identity.verified = Some(member);
                }
                // The same wrong pair again is no new guess (the agent asks the check
                // again when the caller goes on without correcting it).
                Change::FailedCheck(pair) => {
                    if !identity.failed_pairs.contains(&pair) {
                        identity.failures += 1;
                        identity.failed_pairs.push(pair);
                    }
                }
                // The latest offer counts: a confirmation must follow the last question.
                Change::Proposed(rx) => {
                    identity.proposed_refills.insert(rx, response);
                }
                Change::Offered(rx) => {
                    identity.offered_refills.insert(rx, response);
                }
                Change::Settled(rx) => {
                    identity.proposed_refills.remove(&rx);
                    identity.offered_refills.remove(&rx);
                }
            });
            result
        })
    }
}
