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
//! Every tool takes one id and reads it leniently (see `args`); a result is a small
//! JSON object whose keys a 0.5B model can read back to the caller, and a failure is
//! a sentence the model can say ("no member with ID 1234").

mod args;
mod db;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use parley_llm::ToolSpec;
use serde_json::{Value, json};

pub use db::{PharmacyDb, PharmacyError};

use self::args::{IdKind, id_argument};
use self::db::{Order, RefillOutcome};
use super::{Tool, ToolError, ToolFuture};

/// The pharmacy desk's tools over `db`, ready to register: `lookup_member`,
/// `list_orders`, `get_order_details`, `get_refills_remaining`, `get_pickup_time` and
/// `request_refill`. They share the one database, so a refill requested in one call
/// is seen by the next.
pub fn pharmacy_tools(db: Arc<PharmacyDb>) -> Vec<Arc<dyn Tool>> {
    Operation::ALL
        .iter()
        .map(|&operation| Arc::new(PharmacyTool { db: Arc::clone(&db), operation }) as Arc<dyn Tool>)
        .collect()
}

/// One desk operation; each is one tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    LookupMember,
    ListOrders,
    GetOrderDetails,
    GetRefillsRemaining,
    GetPickupTime,
    RequestRefill,
}

impl Operation {
    const ALL: [Operation; 6] = [
        Operation::LookupMember,
        Operation::ListOrders,
        Operation::GetOrderDetails,
        Operation::GetRefillsRemaining,
        Operation::GetPickupTime,
        Operation::RequestRefill,
    ];

    fn name(self) -> &'static str {
        match self {
            Operation::LookupMember => "lookup_member",
            Operation::ListOrders => "list_orders",
            Operation::GetOrderDetails => "get_order_details",
            Operation::GetRefillsRemaining => "get_refills_remaining",
            Operation::GetPickupTime => "get_pickup_time",
            Operation::RequestRefill => "request_refill",
        }
    }

    /// Short and plain: the 0.5B model picks tools from these sentences.
    fn description(self) -> &'static str {
        match self {
            Operation::LookupMember => "Find a pharmacy member by their member ID. Returns the member's name.",
            Operation::ListOrders => "List a member's orders with each order's ID, status, medication and quantity.",
            Operation::GetOrderDetails => {
                "Get one order's status, medication, strength, quantity, prescription ID and pickup time."
            }
            Operation::GetRefillsRemaining => "Get how many refills are left on a prescription.",
            Operation::GetPickupTime => "Get the date and time an order will be ready for pickup.",
            Operation::RequestRefill => "Request a refill of a prescription. This uses one of its remaining refills.",
        }
    }

    fn id_kind(self) -> IdKind {
        match self {
            Operation::LookupMember | Operation::ListOrders => IdKind::Member,
            Operation::GetOrderDetails | Operation::GetPickupTime => IdKind::Order,
            Operation::GetRefillsRemaining | Operation::RequestRefill => IdKind::Prescription,
        }
    }

    fn parameters(self) -> Value {
        let (key, description) = match self.id_kind() {
            IdKind::Member => ("member_id", "The member ID the caller gives, for example 1001."),
            IdKind::Order => ("order_id", "The order ID, for example ORD001."),
            IdKind::Prescription => ("rx_id", "The prescription ID, for example RX1001."),
        };
        json!({
            "type": "object",
            "properties": { key: { "type": "string", "description": description } },
            "required": [key],
        })
    }

    /// Runs the operation for `id` (already normalized) on a connection.
    fn execute(self, conn: &mut rusqlite::Connection, id: &str) -> Result<Result<Value, ToolError>, rusqlite::Error> {
        Ok(match self {
            Operation::LookupMember => db::member(conn, id)?
                .map(|m| {
                    json!({
                        "member_id": m.member_id,
                        "name": m.name,
                        "date_of_birth": m.date_of_birth,
                        "phone": m.phone,
                    })
                })
                .ok_or_else(|| no_member(id)),
            Operation::ListOrders => match db::member(conn, id)? {
                None => Err(no_member(id)),
                Some(member) => {
                    let orders: Vec<Value> = db::orders_of(conn, id)?
                        .into_iter()
                        .map(|o| {
                            json!({
                                "order_id": o.order_id,
                                "status": o.status,
                                "medication": o.medication,
                                "strength": o.strength,
                                "quantity": o.quantity,
                            })
                        })
                        .collect();
                    Ok(json!({ "member_id": member.member_id, "name": member.name, "orders": orders }))
                }
            },
            Operation::GetOrderDetails => db::order(conn, id)?.map(order_details).ok_or_else(|| no_order(id)),
            Operation::GetPickupTime => match db::order(conn, id)? {
                None => Err(no_order(id)),
                Some(order) => pickup(&order),
            },
            Operation::GetRefillsRemaining => db::prescription(conn, id)?
                .map(|rx| {
                    json!({
                        "rx_id": rx.rx_id,
                        "medication": rx.medication,
                        "strength": rx.strength,
                        "refills_remaining": rx.refills_remaining,
                        "prescriber": rx.prescriber,
                    })
                })
                .ok_or_else(|| no_prescription(id)),
            Operation::RequestRefill => refill_result(db::request_refill(conn, id)?, id),
        })
    }
}

/// One pharmacy operation as a [`Tool`].
struct PharmacyTool {
    db: Arc<PharmacyDb>,
    operation: Operation,
}

impl Tool for PharmacyTool {
    fn spec(&self) -> ToolSpec {
        ToolSpec {
            name: self.operation.name().to_string(),
            description: self.operation.description().to_string(),
            parameters: self.operation.parameters(),
        }
    }

    fn call(&self, arguments: Value) -> ToolFuture<'_> {
        let operation = self.operation;
        let db = Arc::clone(&self.db);
        Box::pin(async move {
            let id = id_argument(&arguments, operation.id_kind())?;
            tracing::debug!(tool = operation.name(), %id, "pharmacy tool");
            db.run(move |conn| operation.execute(conn, &id)).await?
        })
    }
}

fn no_member(id: &str) -> ToolError {
    ToolError::Failed(format!("no member with ID {id}; ask the caller to check their member ID"))
}

fn no_order(id: &str) -> ToolError {
    ToolError::Failed(format!("no order with ID {id}; ask the caller to check the order ID, or list the member's orders"))
}

fn no_prescription(id: &str) -> ToolError {
    ToolError::Failed(format!("no prescription with ID {id}; ask the caller to check the prescription number"))
}

fn order_details(order: Order) -> Value {
    let spoken = pickup_spoken(&order);
    json!({
        "order_id": order.order_id,
        "member_id": order.member_id,
        "status": order.status,
        "medication": order.medication,
        "strength": order.strength,
        "quantity": order.quantity,
        "rx_id": order.rx_id,
        "pickup_date": order.pickup_date,
        "pickup_time": order.pickup_time,
        "pickup_spoken": spoken,
    })
}

fn pickup(order: &Order) -> Result<Value, ToolError> {
    match (&order.pickup_date, &order.pickup_time) {
        (Some(date), Some(time)) => Ok(json!({
            "order_id": order.order_id,
            "status": order.status,
            "pickup_date": date,
            "pickup_time": time,
            "spoken": spoken_date_time(date, time),
        })),
        _ => Err(ToolError::Failed(format!(
            "order {} has no pickup time because its status is \"{}\"",
            order.order_id, order.status
        ))),
    }
}

fn pickup_spoken(order: &Order) -> Option<String> {
    match (&order.pickup_date, &order.pickup_time) {
        (Some(date), Some(time)) => Some(spoken_date_time(date, time)),
        _ => None,
    }
}

fn refill_result(outcome: RefillOutcome, id: &str) -> Result<Value, ToolError> {
    match outcome {
        RefillOutcome::UnknownRx => Err(no_prescription(id)),
        RefillOutcome::NoRefills(rx) => Err(ToolError::Failed(format!(
            "prescription {} has no refills remaining; the prescriber must authorize more",
            rx.rx_id
        ))),
        RefillOutcome::AlreadyRequested { prescription: rx, request_id, requested_at } => Ok(json!({
            "status": "already_requested",
            "rx_id": rx.rx_id,
            "medication": rx.medication,
            "request_id": request_id,
            "requested_at": requested_at,
            "refills_remaining_after": rx.refills_remaining,
            "note": "a refill of this prescription is already waiting; no new refill was used",
        })),
        RefillOutcome::Requested { prescription: rx, request_id } => Ok(json!({
            "status": "requested",
            "rx_id": rx.rx_id,
            "medication": rx.medication,
            "request_id": request_id,
            "refills_remaining_after": rx.refills_remaining,
        })),
    }
}

/// `2026-12-06` and `10:00` as a caller hears them: "December 6 at 10:00 AM". Falls
/// back to the stored text when it is not in that form.
fn spoken_date_time(date: &str, time: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let day = || -> Option<String> {
        let mut parts = date.splitn(3, '-');
        let (_year, month, day) = (parts.next()?, parts.next()?.parse::<usize>().ok()?, parts.next()?.parse::<u32>().ok()?);
        let month = MONTHS.get(month.checked_sub(1)?)?;
        (1..=31).contains(&day).then(|| format!("{month} {day}"))
    };
    let clock = || -> Option<String> {
        let (hour, minute) = time.split_once(':')?;
        let (hour, minute) = (hour.parse::<u32>().ok()?, minute.parse::<u32>().ok()?);
        if hour > 23 || minute > 59 {
            return None;
        }
        let half = if hour < 12 { "AM" } else { "PM" };
        let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
        Some(format!("{hour12}:{minute:02} {half}"))
    };
    format!("{} at {}", day().unwrap_or_else(|| date.to_string()), clock().unwrap_or_else(|| time.to_string()))
}
