//! The pharmacy tools against a seeded in-memory database: the seed facts, lenient
//! arguments, failures the model can explain, and refills.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use super::*;

fn tools() -> (Arc<PharmacyDb>, BTreeMap<String, Arc<dyn Tool>>) {
    let db = Arc::new(PharmacyDb::in_memory().expect("in-memory database"));
    let tools = pharmacy_tools(Arc::clone(&db)).into_iter().map(|t| (t.spec().name, t)).collect();
    (db, tools)
}

async fn call(tools: &BTreeMap<String, Arc<dyn Tool>>, name: &str, arguments: Value) -> Result<Value, ToolError> {
    tools.get(name).unwrap_or_else(|| panic!("no tool {name}")).call(arguments).await
}

fn failed(result: Result<Value, ToolError>) -> String {
    match result {
        Err(ToolError::Failed(message)) => message,
        other => panic!("expected Failed, got {other:?}"),
    }
}

async fn count(db: &Arc<PharmacyDb>, sql: &'static str) -> i64 {
    Arc::clone(db).run(move |conn| conn.query_row(sql, [], |row| row.get(0))).await.expect("count")
}

#[test]
fn every_tool_has_a_schema_with_its_required_id() {
    let (_db, tools) = tools();
    let names: Vec<&str> = tools.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["get_order_details", "get_pickup_time", "get_refills_remaining", "list_orders", "lookup_member", "request_refill"]
    );
    for (name, tool) in &tools {
        let spec = tool.spec();
        assert!(!spec.description.is_empty(), "{name}");
        assert_eq!(spec.parameters["type"], "object", "{name}");
        let required = spec.parameters["required"].as_array().expect("required list");
        assert_eq!(required.len(), 1, "{name}");
        let key = required[0].as_str().expect("key");
        assert_eq!(spec.parameters["properties"][key]["type"], "string", "{name}");
    }
}

#[tokio::test]
async fn seed_facts_for_member_1001() {
    let (_db, tools) = tools();
    let member = call(&tools, "lookup_member", json!({"member_id": "1001"})).await.expect("member");
    assert_eq!(member["member_id"], "1001");
    assert_eq!(member["name"], "Maria Lopez");

    let orders = call(&tools, "list_orders", json!({"member_id": "1001"})).await.expect("orders");
    assert_eq!(
        orders["orders"],
        json!([{"order_id": "ORD001", "status": "processing", "medication": "Amoxicillin", "strength": "500 mg", "quantity": 21}])
    );

    let order = call(&tools, "get_order_details", json!({"order_id": "ORD001"})).await.expect("order");
    assert_eq!(order["status"], "processing");
    assert_eq!(order["medication"], "Amoxicillin");
    assert_eq!(order["strength"], "500 mg");
    assert_eq!(order["quantity"], 21);
    assert_eq!(order["rx_id"], "RX1001");
    assert_eq!(order["pickup_date"], "2026-12-06");
    assert_eq!(order["pickup_time"], "10:00");

    let refills = call(&tools, "get_refills_remaining", json!({"rx_id": "RX1001"})).await.expect("refills");
    assert_eq!(refills["rx_id"], "RX1001");
    assert_eq!(refills["medication"], "Amoxicillin");
    assert_eq!(refills["refills_remaining"], 0);

    let pickup = call(&tools, "get_pickup_time", json!({"order_id": "ORD001"})).await.expect("pickup");
    assert_eq!(pickup["order_id"], "ORD001");
    assert_eq!(pickup["pickup_date"], "2026-12-06");
    assert_eq!(pickup["pickup_time"], "10:00");
    assert_eq!(pickup["spoken"], "December 6 at 10:00 AM");
}

#[tokio::test]
async fn other_members_are_told_apart() {
    let (_db, tools) = tools();
    let orders = call(&tools, "list_orders", json!({"member_id": 1002})).await.expect("orders");
    let statuses: Vec<&str> = orders["orders"].as_array().expect("list").iter().filter_map(|o| o["status"].as_str()).collect();
    assert_eq!(statuses, ["ready", "picked up"]);
    let shipped = call(&tools, "get_order_details", json!({"order_id": "ORD003"})).await.expect("order");
    assert_eq!(shipped["status"], "shipped");
    assert_eq!(shipped["pickup_date"], Value::Null);
    let message = failed(call(&tools, "get_pickup_time", json!({"order_id": "ORD003"})).await);
    assert!(message.contains("shipped"), "{message}");
}

#[tokio::test]
async fn lenient_arguments_reach_the_same_records() {
    let (_db, tools) = tools();
    let member = call(&tools, "lookup_member", json!({"member_id": 1001})).await.expect("number id");
    assert_eq!(member["name"], "Maria Lopez");
    let order = call(&tools, "get_order_details", json!({"order_id": " ord001 "})).await.expect("lower-case id");
    assert_eq!(order["order_id"], "ORD001");
    let pickup = call(&tools, "get_pickup_time", json!("{\"orderId\": \"ord-001\"}")).await.expect("arguments as text");
    assert_eq!(pickup["pickup_time"], "10:00");
    let refills = call(&tools, "get_refills_remaining", json!({"rx_id": "rx1002"})).await.expect("rx id");
    assert_eq!(refills["refills_remaining"], 2);
}

#[tokio::test]
async fn unknown_ids_fail_with_a_sentence_and_bad_ids_are_invalid() {
    let (_db, tools) = tools();
    let message = failed(call(&tools, "lookup_member", json!({"member_id": "9999"})).await);
    assert!(message.starts_with("no member with ID 9999"), "{message}");
    let message = failed(call(&tools, "list_orders", json!({"member_id": "9999"})).await);
    assert!(message.starts_with("no member with ID 9999"), "{message}");
    let message = failed(call(&tools, "get_order_details", json!({"order_id": "ORD999"})).await);
    assert!(message.starts_with("no order with ID ORD999"), "{message}");
    let message = failed(call(&tools, "get_pickup_time", json!({"order_id": "ORD999"})).await);
    assert!(message.starts_with("no order with ID ORD999"), "{message}");
    let message = failed(call(&tools, "get_refills_remaining", json!({"rx_id": "RX9"})).await);
    assert!(message.starts_with("no prescription with ID RX9"), "{message}");
    let message = failed(call(&tools, "request_refill", json!({"rx_id": "RX9"})).await);
    assert!(message.starts_with("no prescription with ID RX9"), "{message}");

    for (name, arguments) in [("lookup_member", json!({})), ("lookup_member", json!({"member_id": "maria"}))] {
        match call(&tools, name, arguments.clone()).await {
            Err(ToolError::InvalidArguments(message)) => assert!(message.contains("member"), "{message}"),
            other => panic!("{name} {arguments}: expected InvalidArguments, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn refill_without_refills_fails_and_changes_nothing() {
    let (db, tools) = tools();
    let message = failed(call(&tools, "request_refill", json!({"rx_id": "RX1001"})).await);
    assert_eq!(message, "prescription RX1001 has no refills remaining; the prescriber must authorize more");
    let refills = call(&tools, "get_refills_remaining", json!({"rx_id": "RX1001"})).await.expect("refills");
    assert_eq!(refills["refills_remaining"], 0);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM refill_requests").await, 0);
}

#[tokio::test]
async fn refill_uses_one_refill_once_until_handled() {
    let (db, tools) = tools();
    let first = call(&tools, "request_refill", json!({"rx_id": "RX1002"})).await.expect("refill");
    assert_eq!(first["status"], "requested");
    assert_eq!(first["refills_remaining_after"], 1);
    let refills = call(&tools, "get_refills_remaining", json!({"rx_id": "RX1002"})).await.expect("refills");
    assert_eq!(refills["refills_remaining"], 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM refill_requests WHERE rx_id = 'RX1002'").await, 1);

    // Asked again (a retry, or the caller repeating): no second refill is used.
    let again = call(&tools, "request_refill", json!({"rx_id": "rx1002"})).await.expect("repeat");
    assert_eq!(again["status"], "already_requested");
    assert_eq!(again["request_id"], first["request_id"]);
    assert_eq!(again["refills_remaining_after"], 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM refill_requests").await, 1);

    // Once the pharmacy has handled it, the next request uses another refill.
    Arc::clone(&db)
        .run(|conn| conn.execute("UPDATE refill_requests SET status = 'filled'", []))
        .await
        .expect("mark filled");
    let next = call(&tools, "request_refill", json!({"rx_id": "RX1002"})).await.expect("refill");
    assert_eq!(next["status"], "requested");
    assert_eq!(next["refills_remaining_after"], 0);
    Arc::clone(&db)
        .run(|conn| conn.execute("UPDATE refill_requests SET status = 'filled'", []))
        .await
        .expect("mark filled");
    let message = failed(call(&tools, "request_refill", json!({"rx_id": "RX1002"})).await);
    assert_eq!(message, "prescription RX1002 has no refills remaining; the prescriber must authorize more");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM refill_requests").await, 2);
}

#[tokio::test]
async fn concurrent_refills_never_take_more_than_there_are() {
    let (db, tools) = tools();
    let tool = tools.get("request_refill").cloned().expect("tool");
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let tool = Arc::clone(&tool);
            tokio::spawn(async move { tool.call(json!({"rx_id": "RX1003"})).await })
        })
        .collect();
    let mut requested = 0;
    for task in tasks {
        if task.await.expect("task").expect("refill")["status"] == "requested" {
            requested += 1;
        }
    }
    assert_eq!(requested, 1);
    assert_eq!(count(&db, "SELECT refills_remaining FROM prescriptions WHERE rx_id = 'RX1003'").await, 4);
}

#[test]
fn spoken_times_read_naturally() {
    assert_eq!(spoken_date_time("2026-12-06", "10:00"), "December 6 at 10:00 AM");
    assert_eq!(spoken_date_time("2026-01-31", "14:30"), "January 31 at 2:30 PM");
    assert_eq!(spoken_date_time("2026-07-04", "00:05"), "July 4 at 12:05 AM");
    assert_eq!(spoken_date_time("2026-07-04", "12:00"), "July 4 at 12:00 PM");
    assert_eq!(spoken_date_time("soon", "later"), "soon at later");
    assert_eq!(spoken_date_time("2026-13-01", "25:00"), "2026-13-01 at 25:00");
}
