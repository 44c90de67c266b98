//! What the desk's results say, in words made for speech: every fact a caller may
//! hear (a date, a time, a quantity, a strength, an id) is written the way the voice
//! should say it, and each result carries a `say` sentence the model can read out
//! as it is. Nothing here is addressed to the model, so nothing here can leak
//! instructions into the call if it is read verbatim.

use serde_json::{Value, json};

use super::db::{Order, Prescription};
use crate::tools::spoken;

/// "Amoxicillin five hundred milligrams".
pub(super) fn medication(name: &str, strength: &str) -> String {
    format!("{name} {}", spoken::strength(strength))
}

/// The first name, for a greeting.
pub(super) fn first_name(name: &str) -> &str {
    name.split_whitespace().next().unwrap_or(name)
}

/// The pickup date and time as said, when the order has them.
fn pickup(order: &Order) -> Option<String> {
    match (&order.pickup_date, &order.pickup_time) {
        (Some(date), Some(time)) => Some(spoken::date_time(date, time)),
        _ => None,
    }
}

/// Where an order stands, as the end of a sentence about it.
fn standing(order: &Order) -> String {
    let when = pickup(order);
    match (order.status.as_str(), when) {
        ("processing", Some(when)) => format!("is still being processed; it will be ready for pickup on {when}"),
        ("processing", None) => "is still being processed".into(),
        ("ready", Some(when)) => format!("is ready for pickup; your pickup time is {when}"),
        ("ready", None) => "is ready for pickup".into(),
        ("shipped", _) => "has been shipped, so there is nothing to pick up; it is on its way to you by mail".into(),
        ("picked up", Some(when)) => format!("was already picked up, on {}", when.split(" at ").next().unwrap_or(&when)),
        ("picked up", None) => "was already picked up".into(),
        (other, _) => format!("is {other}"),
    }
}

/// One order in a sentence: "Order O R D zero zero one, Amoxicillin five hundred
/// milligrams, quantity twenty-one, is still being processed; …".
pub(super) fn order_sentence(order: &Order) -> String {
    sentence(format!(
        "Order {}, {}, quantity {}, {}",
        spoken::id(&order.order_id),
        medication(&order.medication, &order.strength),
        quantity(order.quantity),
        standing(order)
    ))
}

/// Ends a sentence with a period, unless it already ends with one ("ten a.m.").
fn sentence(mut text: String) -> String {
    if !text.ends_with('.') {
        text.push('.');
    }
    text
}

fn quantity(n: i64) -> String {
    spoken::cardinal(n.max(0) as u64)
}

/// One prescription in a sentence, with its refills and prescriber.
pub(super) fn prescription_sentence(rx: &Prescription) -> String {
    format!(
        "Prescription {} for {} {}, prescribed by {}.",
        spoken::id(&rx.rx_id),
        medication(&rx.medication, &rx.strength),
        refills_left(rx.refills_remaining),
        rx.prescriber
    )
}

/// "has two refills left", "has one refill left", "has no refills left".
fn refills_left(n: i64) -> String {
    match n {
        ..=0 => "has no refills left".into(),
        1 => "has one refill left".into(),
        n => format!("has {} refills left", quantity(n)),
    }
}

/// What an order's prescription adds to it: "It was prescribed by Dr. Priya Nair,
/// and the prescription has five refills left." An order's details carry its
/// prescription, as a pharmacist's screen shows them together, so "Who prescribed
/// my metformin?" is answered whichever of the two look-ups the model chose (the
/// 0.5B model often took the order's; eval).
fn prescription_clause(rx: &Prescription) -> String {
    format!("It was prescribed by {}, and the prescription {}.", rx.prescriber, refills_left(rx.refills_remaining))
}

/// One order with its prescription, when it has one.
fn order_with_prescription(order: &Order, rx: Option<&Prescription>) -> String {
    match rx {
        Some(rx) => format!("{} {}", order_sentence(order), prescription_clause(rx)),
        None => order_sentence(order),
    }
}

/// `get_order_details`, with the order's prescription when it has one.
pub(super) fn order_details(order: &Order, rx: Option<&Prescription>) -> Value {
    json!({
        "order_id": order.order_id,
        "rx_id": order.rx_id,
        "status": order.status,
        "medication": medication(&order.medication, &order.strength),
        "quantity": quantity(order.quantity),
        "pickup": pickup(order),
        "prescriber": rx.map(|rx| rx.prescriber.clone()),
        "refills_remaining": rx.map(|rx| quantity(rx.refills_remaining)),
        "say": order_with_prescription(order, rx),
    })
}

/// `get_pickup_time`.
pub(super) fn pickup_time(order: &Order) -> Value {
    let say = match (order.status.as_str(), pickup(order)) {
        ("shipped", _) | (_, None) => sentence(format!("Order {} {}", spoken::id(&order.order_id), standing(order))),
        ("picked up", Some(_)) => sentence(format!("Order {} {}", spoken::id(&order.order_id), standing(order))),
        (_, Some(when)) => sentence(format!("You can pick up order {} on {when}", spoken::id(&order.order_id))),
    };
    json!({ "order_id": order.order_id, "status": order.status, "pickup": pickup(order), "say": say })
}

/// `list_orders`. (Each order with its prescription made the list of a member
/// with two read out the other prescription's refills too; eval.)
pub(super) fn order_list(member_id: &str, orders: &[Order]) -> Value {
    let say = match orders.len() {
        0 => "You have no orders with us right now.".to_string(),
        1 => format!("You have one order. {}", order_sentence(&orders[0])),
        n => format!("You have {} orders. {}", quantity(n as i64), orders.iter().map(order_sentence).collect::<Vec<_>>().join(" ")),
    };
    let list: Vec<Value> = orders
        .iter()
        .map(|o| json!({ "order_id": o.order_id, "status": o.status, "medication": medication(&o.medication, &o.strength), "quantity": quantity(o.quantity) }))
        .collect();
    json!({ "member_id": member_id, "orders": list, "say": say })
}

/// `get_prescription`. With refills left it offers one: callers who look a
/// prescription up are often after a refill, and the 1.5B model, asked for one,
/// looked the prescription up instead of requesting it (eval). The `offer` names the
/// call a plain yes makes (see `confirmed_call` in the agent's response loop).
pub(super) fn refills(rx: &Prescription) -> Value {
    let mut result = json!({
        "rx_id": rx.rx_id,
        "medication": medication(&rx.medication, &rx.strength),
        "refills_remaining": quantity(rx.refills_remaining),
        "prescriber": rx.prescriber,
    });
    if rx.refills_remaining <= 0 {
        result["say"] = json!(format!("{} {} would need to authorize more.", prescription_sentence(rx), rx.prescriber));
    } else {
        result["say"] = json!(format!("{} {REFILL_OFFER}", prescription_sentence(rx)));
        result["offer"] = json!({ "name": "request_refill", "arguments": { "rx_id": rx.rx_id } });
    }
    result
}

/// The question a look-up ends with when a refill could be requested.
pub(super) const REFILL_OFFER: &str = "Would you like me to request a refill?";

/// `verify_member` when the check passed: who it is, and what they have (the ids
/// the next look-up takes, each with a sentence saying what it is).
pub(super) fn verified(member_id: &str, name: &str, orders: &[Order], prescriptions: &[Prescription]) -> Value {
    json!({
        "verified": true,
        "member_id": member_id,
        "name": first_name(name),
        "orders": orders.iter().map(|o| json!({ "order_id": o.order_id, "about": order_sentence(o) })).collect::<Vec<_>>(),
        "prescriptions": prescriptions.iter().map(|rx| json!({ "rx_id": rx.rx_id, "about": prescription_sentence(rx) })).collect::<Vec<_>>(),
        "say": verified_sentence(name),
    })
}

/// What the check's result says: only who was verified. The agent speaks it at once
/// and goes on to a look-up for what the caller asked (the check is a gate, see
/// `x-parley-gate`). A sentence listing every order here was what the 0.5B model
/// said, in that turn and the next, whatever the caller had asked (a refill, the
/// prescriber; eval, session 6), and read out one order when asked about another.
fn verified_sentence(name: &str) -> String {
    format!("Thank you, {}, you're verified.", first_name(name))
}

/// `request_refill` before the caller confirmed.
pub(super) fn refill_needs_confirmation(rx: &Prescription) -> Value {
    json!({
        "status": "needs_confirmation",
        "rx_id": rx.rx_id,
        "say": format!(
            "Just to confirm: you'd like a refill of {}, prescription {}? It {}.",
            medication(&rx.medication, &rx.strength),
            spoken::id(&rx.rx_id),
            refills_left(rx.refills_remaining)
        ),
    })
}

/// `request_refill` placed.
pub(super) fn refill_requested(rx: &Prescription, request_id: i64) -> Value {
    json!({
        "status": "requested",
        "rx_id": rx.rx_id,
        "request_id": request_id,
        "refills_remaining_after": quantity(rx.refills_remaining),
        "say": format!(
            "Done: I've requested a refill of {}. After this one, the prescription {}.",
            medication(&rx.medication, &rx.strength),
            refills_left(rx.refills_remaining)
        ),
    })
}

/// `request_refill` when one is already waiting.
pub(super) fn refill_already_requested(rx: &Prescription, request_id: i64) -> Value {
    json!({
        "status": "already_requested",
        "rx_id": rx.rx_id,
        "request_id": request_id,
        "say": format!(
            "A refill of {} is already requested and waiting at the pharmacy, so I didn't request another one.",
            medication(&rx.medication, &rx.strength)
        ),
    })
}

/// Why a refill cannot be requested: none left.
pub(super) fn no_refills(rx: &Prescription) -> String {
    format!(
        "Your prescription for {} has no refills left. {} would need to authorize more.",
        medication(&rx.medication, &rx.strength),
        rx.prescriber
    )
}

/// Asked before the caller proved who they are.
pub(super) const VERIFY_FIRST: &str =
    "Before I can help with that, I need to verify your identity. Please tell me your member ID and your date of birth.";

/// Given a member ID but no date of birth.
pub(super) const NEED_BIRTH_DATE: &str = "Thank you. To protect your privacy, I also need your date of birth. What is it?";

/// The member ID and date of birth do not match (or there is no such member: the
/// two are not told apart, so the desk does not confirm who is a member).
pub(super) const NO_MATCH: &str =
    "Sorry, that member ID and date of birth don't match our records. Could you check them and tell me again?";

/// Too many failed checks in this call.
pub(super) const LOCKED: &str =
    "Sorry, I can't verify your identity over the phone after several tries. Please visit the pharmacy counter with a photo ID.";

/// An order that is not on the verified member's account (missing or someone
/// else's: the two are not told apart).
pub(super) fn no_such_order(order_id: &str) -> String {
    format!("I couldn't find order {} on your account. Could you check the number?", spoken::id(order_id))
}

/// A prescription that is not on the verified member's account.
pub(super) fn no_such_prescription(rx_id: &str) -> String {
    format!("I couldn't find prescription {} on your account. Could you check the number?", spoken::id(rx_id))
}

/// A member ID other than the verified one.
pub(super) fn other_member(verified: &str) -> String {
    format!(
        "I can only discuss the account verified on this call, member {}. For another member's account, that member needs to call us.",
        spoken::id(verified)
    )
}
