//! The pharmacy tools against a seeded in-memory database: identity before
//! disclosure, the seed facts in words made for speech, lenient arguments, failures
//! the caller may hear, and refills only when confirmed.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;

struct Desk {
    db: Arc<PharmacyDb>,
    tools: BTreeMap<String, Arc<dyn Tool>>,
    scope: CallScope,
}

fn desk() -> Desk {
    let db = Arc::new(PharmacyDb::in_memory().expect("in-memory database"));
    let tools = pharmacy_tools(Arc::clone(&db)).into_iter().map(|t| (t.spec().name, t)).collect();
    let scope = CallScope::default();
    scope.next_response();
    Desk { db, tools, scope }
}

impl Desk {
    async fn call(&self, name: &str, arguments: Value) -> Result<Value, ToolError> {
        self.tools.get(name).unwrap_or_else(|| panic!("no tool {name}")).call(arguments, &self.scope).await
    }

    /// A new call on the same database.
    fn new_call(&self) -> Desk {
        let scope = CallScope::default();
        scope.next_response();
        Desk { db: Arc::clone(&self.db), tools: self.tools.clone(), scope }
    }

    async fn verified(self, member_id: &str, born: &str) -> Self {
        let result = self.call("verify_member", json!({"member_id": member_id, "date_of_birth": born})).await.expect("verified");
        assert_eq!(result["verified"], true);
        self
    }

    /// The caller answers: what follows is a new response.
    fn next_turn(&self) {
        self.scope.next_response();
    }
}

fn failed(result: Result<Value, ToolError>) -> String {
    match result {
        Err(ToolError::Declined(message)) => message,
        other => panic!("expected Declined, got {other:?}"),
    }
}

async fn count(db: &Arc<PharmacyDb>, sql: &'static str) -> i64 {
    Arc::clone(db).run(move |conn| conn.query_row(sql, [], |row| row.get(0))).await.expect("count")
}

const ALL_TOOLS: [&str; 6] = ["get_order_details", "get_pickup_time", "get_prescription", "list_orders", "request_refill", "verify_member"];

#[test]
fn every_tool_has_a_schema_with_its_required_id() {
    let desk = desk();
    assert_eq!(desk.tools.keys().map(String::as_str).collect::<Vec<_>>(), ALL_TOOLS);
    for (name, tool) in &desk.tools {
        let spec = tool.spec();
        assert!(!spec.description.is_empty(), "{name}");
        assert_eq!(spec.parameters["type"], "object", "{name}");
        for (key, property) in spec.parameters["properties"].as_object().expect("properties") {
            assert!(property["description"].as_str().is_some_and(|d| !d.is_empty()), "{name}.{key}");
        }
        let required: Vec<&str> = spec.parameters["required"].as_array().expect("required").iter().filter_map(Value::as_str).collect();
        let expected: &[&str] = match name.as_str() {
            "verify_member" => &["member_id", "date_of_birth"],
            "list_orders" => &[],
            "get_order_details" | "get_pickup_time" => &["order_id"],
            _ => &["rx_id"],
        };
        assert_eq!(required, expected, "{name}");
        assert!(tool.guidance("").is_some_and(|g| g.contains("verify_member")), "{name}");
    }
}

#[tokio::test]
async fn nothing_is_disclosed_before_the_identity_check() {
    let desk = desk();
    for (name, arguments) in [
        ("list_orders", json!({"member_id": "1001"})),
        ("list_orders", json!({})),
        ("get_order_details", json!({"order_id": "ORD001"})),
        ("get_pickup_time", json!({"order_id": "ORD001"})),
        ("get_prescription", json!({"rx_id": "RX1001"})),
        ("request_refill", json!({"rx_id": "RX1002", "confirm": true})),
    ] {
        let message = failed(desk.call(name, arguments).await);
        assert_eq!(message, say::VERIFY_FIRST, "{name}");
    }
    assert_eq!(count(&desk.db, "SELECT COUNT(*) FROM refill_requests").await, 0);
}

#[tokio::test]
async fn the_right_birth_date_unlocks_that_member_only() {
    let desk = desk().verified("1001", "March 12, 1984").await;
    let orders = desk.call("list_orders", json!({})).await.expect("orders");
    assert_eq!(orders["orders"][0]["order_id"], "ORD001");
    let order = desk.call("get_order_details", json!({"order_id": "ORD001"})).await.expect("own order");
    assert_eq!(order["status"], "processing");
    // Another member's records read as not found; their member ID is refused.
    let message = failed(desk.call("get_order_details", json!({"order_id": "ORD002"})).await);
    assert_eq!(message, "I couldn't find order O R D zero zero two on your account. Could you check the number?");
    assert_eq!(failed(desk.call("get_order_details", json!({"order_id": "ORD999"})).await), say::no_such_order("ORD999"));
    assert!(failed(desk.call("get_prescription", json!({"rx_id": "RX1002"})).await).contains("R X one zero zero two"));
    assert!(failed(desk.call("list_orders", json!({"member_id": "1002"})).await).starts_with("I can only discuss"));
    // A new call starts unverified.
    assert_eq!(failed(desk.new_call().call("list_orders", json!({})).await), say::VERIFY_FIRST);
}

#[tokio::test]
async fn a_wrong_birth_date_is_refused_and_three_failures_lock_the_call() {
    let desk = desk();
    let wrong = desk.call("verify_member", json!({"member_id": "1002", "date_of_birth": "1971-11-03"})).await;
    assert_eq!(failed(wrong), say::NO_MATCH);
    // The same pair again (however written) is refused, but is no new guess.
    for _ in 0..3 {
        let again = desk.call("verify_member", json!({"member_id": "1002", "date_of_birth": "November 3rd, 1971"})).await;
        assert_eq!(failed(again), say::NO_MATCH);
    }
    // Unknown members get the same answer: the desk does not confirm who is a member.
    let unknown = desk.call("verify_member", json!({"member_id": "9999", "date_of_birth": "1971-11-02"})).await;
    assert_eq!(failed(unknown), say::NO_MATCH);
    assert_eq!(failed(desk.call("list_orders", json!({"member_id": "1002"})).await), say::VERIFY_FIRST);
    // No date of birth: asked for, not counted as a failure.
    assert_eq!(failed(desk.call("verify_member", json!({"member_id": "1002"})).await), say::NEED_BIRTH_DATE);
    let third = desk.call("verify_member", json!({"member_id": "1002", "date_of_birth": "1 January 1970"})).await;
    assert_eq!(failed(third), say::NO_MATCH);
    // Locked now, even with the right date.
    let right = desk.call("verify_member", json!({"member_id": "1002", "date_of_birth": "11/02/1971"})).await;
    assert_eq!(failed(right), say::LOCKED);
    // A date that is not a date asks the model to fix it and is no failed check.
    let other = desk.new_call();
    match other.call("verify_member", json!({"member_id": "1002", "date_of_birth": "last spring"})).await {
        Err(ToolError::InvalidArguments(message)) => assert!(message.contains("YYYY-MM-DD"), "{message}"),
        result => panic!("expected InvalidArguments, got {result:?}"),
    }
    other.verified("1002", "November 2nd, 1971").await;
}

#[tokio::test]
async fn verification_answers_with_the_members_records_but_no_phone_or_birth_date() {
    let desk = desk();
    let result = desk.call("verify_member", json!({"memberId": 1002, "dob": "1971-11-02"})).await.expect("verified");
    assert_eq!(result["name"], "James");
    let say = result["say"].as_str().expect("say");
    assert_eq!(say, "Thank you, James, you're verified.");
    let orders: Vec<&str> = result["orders"].as_array().expect("orders").iter().filter_map(|o| o["order_id"].as_str()).collect();
    assert_eq!(orders, ["ORD002", "ORD004"]);
    assert_eq!(result["prescriptions"][0]["rx_id"], "RX1002");
    let text = result.to_string();
    for secret in ["555", "1971", "Chen"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[tokio::test]
async fn seed_facts_come_in_words_made_for_speech() {
    let desk = desk().verified("1001", "1984-03-12").await;
    let order = desk.call("get_order_details", json!({"order_id": "ord001"})).await.expect("order");
    assert_eq!(order["medication"], "Amoxicillin five hundred milligrams");
    assert_eq!(order["quantity"], "twenty-one");
    assert_eq!(order["rx_id"], "RX1001");
    assert_eq!(order["pickup"], "December sixth at ten a.m.");
    assert_eq!(
        order["say"],
        "Order O R D zero zero one, Amoxicillin five hundred milligrams, quantity twenty-one, is still being processed; it will be ready for pickup on December sixth at ten a.m. It was prescribed by Dr. Hannah Reyes, and the prescription has no refills left."
    );
    assert_eq!(order["prescriber"], "Dr. Hannah Reyes");
    let pickup = desk.call("get_pickup_time", json!("{\"orderId\": \"ord-001\"}")).await.expect("pickup");
    assert_eq!(pickup["say"], "You can pick up order O R D zero zero one on December sixth at ten a.m.");
    let refills = desk.call("get_prescription", json!({"rx_id": "rx1001"})).await.expect("refills");
    assert_eq!(refills["refills_remaining"], "zero");
    assert_eq!(refills["prescriber"], "Dr. Hannah Reyes");
    assert!(refills["say"].as_str().expect("say").contains("has no refills left"), "{refills}");

    let james = desk.new_call().verified("1002", "1971-11-02").await;
    let list = james.call("list_orders", json!({"member_id": 1002})).await.expect("orders");
    let statuses: Vec<&str> = list["orders"].as_array().expect("list").iter().filter_map(|o| o["status"].as_str()).collect();
    assert_eq!(statuses, ["ready", "picked up"]);
    assert!(list["say"].as_str().expect("say").starts_with("You have two orders. Order O R D zero zero two"), "{list}");
    let picked = james.call("get_pickup_time", json!({"order_id": "ORD004"})).await.expect("picked up");
    assert_eq!(picked["say"], "Order O R D zero zero four was already picked up, on November first.");
    let ready = james.call("get_pickup_time", json!({"order_id": "ORD002"})).await.expect("ready");
    assert_eq!(ready["say"], "You can pick up order O R D zero zero two on December second at two thirty p.m.");

    let aisha = desk.new_call().verified("1003", "July 25, 1990").await;
    let shipped = aisha.call("get_pickup_time", json!({"order_id": "ORD003"})).await.expect("shipped");
    assert_eq!(shipped["pickup"], Value::Null);
    assert!(shipped["say"].as_str().expect("say").contains("shipped, so there is nothing to pick up"), "{shipped}");
}

#[tokio::test]
async fn a_refill_is_placed_only_when_confirmed_in_a_later_turn() {
    let desk = desk().verified("1002", "1971-11-02").await;
    // Asked, even with confirm already set: the caller has not answered yet.
    let first = desk.call("request_refill", json!({"rx_id": "RX1002", "confirm": true})).await.expect("question");
    assert_eq!(first["status"], "needs_confirmation");
    assert_eq!(first["say"], "Just to confirm: you'd like a refill of Lisinopril ten milligrams, prescription R X one zero zero two? It has two refills left.");
    let again = desk.call("request_refill", json!({"rx_id": "RX1002", "confirm": true})).await.expect("still a question");
    assert_eq!(again["status"], "needs_confirmation", "the same response cannot confirm its own question");
    assert_eq!(count(&desk.db, "SELECT COUNT(*) FROM refill_requests").await, 0);

    desk.next_turn();
    // Not confirmed: asked again, nothing placed.
    let unconfirmed = desk.call("request_refill", json!({"rx_id": "RX1002"})).await.expect("question");
    assert_eq!(unconfirmed["status"], "needs_confirmation");
    desk.next_turn();
    let placed = desk.call("request_refill", json!({"rx_id": "rx1002", "confirm": "yes"})).await.expect("placed");
    assert_eq!(placed["status"], "requested");
    assert_eq!(placed["refills_remaining_after"], "one");
    assert_eq!(count(&desk.db, "SELECT refills_remaining FROM prescriptions WHERE rx_id = 'RX1002'").await, 1);
    // The confirmation is used up: the next one is asked again, and a pending
    // request is never doubled.
    desk.next_turn();
    let next = desk.call("request_refill", json!({"rx_id": "RX1002", "confirm": true})).await.expect("question");
    assert_eq!(next["status"], "needs_confirmation");
    desk.next_turn();
    let pending = desk.call("request_refill", json!({"rx_id": "RX1002", "confirm": true})).await.expect("pending");
    assert_eq!(pending["status"], "already_requested");
    assert_eq!(count(&desk.db, "SELECT COUNT(*) FROM refill_requests").await, 1);
}

#[tokio::test]
async fn a_looked_up_prescription_offers_a_refill_and_only_a_plain_yes_next_takes_it() {
    let desk = desk().verified("1002", "1971-11-02").await;
    let rx = desk.call("get_prescription", json!({"rx_id": "RX1002"})).await.expect("look-up");
    assert!(rx["say"].as_str().expect("say").ends_with("Would you like me to request a refill?"), "{rx}");
    assert_eq!(rx["offer"], json!({"name": "request_refill", "arguments": {"rx_id": "RX1002"}}));
    // Not a plain yes ("please request one" is the model's to handle): the usual question.
    desk.next_turn();
    desk.scope.set_caller_answer(None);
    let asked = desk.call("request_refill", json!({"rx_id": "RX1002", "confirm": true})).await.expect("question");
    assert_eq!(asked["status"], "needs_confirmation");
    assert_eq!(count(&desk.db, "SELECT COUNT(*) FROM refill_requests").await, 0);

    // A fresh look-up, then a plain yes in the next turn: placed.
    let desk = desk.new_call().verified("1002", "1971-11-02").await;
    desk.call("get_prescription", json!({"rx_id": "RX1002"})).await.expect("look-up");
    desk.next_turn();
    desk.scope.set_caller_answer(Some(true));
    let placed = desk.call("request_refill", json!({"rx_id": "RX1002", "confirm": true})).await.expect("placed");
    assert_eq!(placed["status"], "requested");

    // A yes two turns after the offer is not an answer to it.
    let desk = desk.new_call().verified("1003", "1990-07-25").await;
    desk.call("get_prescription", json!({"rx_id": "RX1003"})).await.expect("look-up");
    desk.next_turn();
    desk.next_turn();
    desk.scope.set_caller_answer(Some(true));
    let late = desk.call("request_refill", json!({"rx_id": "RX1003", "confirm": true})).await.expect("question");
    assert_eq!(late["status"], "needs_confirmation");
    // No refills left: nothing is offered.
    let desk = desk.new_call().verified("1001", "1984-03-12").await;
    let none = desk.call("get_prescription", json!({"rx_id": "RX1001"})).await.expect("look-up");
    assert_eq!(none["offer"], Value::Null);
}

#[tokio::test]
async fn a_refill_without_refills_is_refused_before_any_question() {
    let desk = desk().verified("1001", "1984-03-12").await;
    let message = failed(desk.call("request_refill", json!({"rx_id": "RX1001"})).await);
    assert_eq!(message, "Your prescription for Amoxicillin five hundred milligrams has no refills left. Dr. Hannah Reyes would need to authorize more.");
    assert_eq!(count(&desk.db, "SELECT COUNT(*) FROM refill_requests").await, 0);
}

#[tokio::test]
async fn concurrent_confirmed_refills_never_take_more_than_there_are() {
    let desk = desk().verified("1003", "1990-07-25").await;
    desk.call("request_refill", json!({"rx_id": "RX1003"})).await.expect("question");
    desk.next_turn();
    let tool = desk.tools.get("request_refill").cloned().expect("tool");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (tool, scope) = (Arc::clone(&tool), desk.scope.clone());
            tokio::spawn(async move { tool.call(json!({"rx_id": "RX1003", "confirm": true}), &scope).await })
        })
        .collect();
    let mut requested = 0;
    for task in tasks {
        let result = task.await.expect("task").expect("refill");
        if result["status"] == "requested" {
            requested += 1;
        }
    }
    assert_eq!(requested, 1);
    assert_eq!(count(&desk.db, "SELECT refills_remaining FROM prescriptions WHERE rx_id = 'RX1003'").await, 4);
}

#[tokio::test]
async fn bad_ids_are_invalid_arguments() {
    let desk = desk();
    for (name, arguments) in [("verify_member", json!({"member_id": "maria", "date_of_birth": "1984-03-12"}))] {
        match desk.call(name, arguments.clone()).await {
            Err(ToolError::InvalidArguments(message)) => assert!(message.contains("member"), "{message}"),
            other => panic!("{name} {arguments}: expected InvalidArguments, got {other:?}"),
        }
    }
    // No member ID at all: the check says, for the caller, what it needs, and that
    // counts as no failed attempt.
    for _ in 0..4 {
        assert_eq!(failed(desk.call("verify_member", json!({})).await), say::VERIFY_FIRST);
    }
    assert!(desk.call("verify_member", json!({"member_id": "1001", "date_of_birth": "1984-03-12"})).await.is_ok());
}

#[test]
fn the_vocabulary_names_the_medications_and_prescribers_on_record() {
    let db = PharmacyDb::in_memory().expect("in-memory database");
    let words = db.vocabulary().expect("vocabulary");
    for expected in ["member ID", "date of birth", "RX1001", "ORD001", "Amoxicillin", "Metformin", "Dr. Priya Nair"] {
        assert!(words.contains(expected), "{expected} missing from {words}");
    }
}
