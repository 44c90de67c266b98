//! The pharmacy desk on a database file, through the public API and a registry, as
//! the server uses it: first-run seeding, reopening, migrating an older file, and
//! changes that persist. The file is inspected with SQLite directly, so the checks
//! do not trust the tools.

use std::path::Path;
use std::sync::Arc;

use parley_agent::tools::pharmacy::{PharmacyDb, PharmacyError, pharmacy_tools};
use parley_agent::tools::{CallScope, ToolError, ToolRegistry};
use serde_json::{Value, json};

fn registry(path: &Path) -> ToolRegistry {
    let db = Arc::new(PharmacyDb::open(path).expect("open the database"));
    let mut registry = ToolRegistry::default();
    for tool in pharmacy_tools(db) {
        registry.register(tool);
    }
    registry
}

async fn call_in(registry: &ToolRegistry, scope: &CallScope, name: &str, arguments: Value) -> Result<Value, ToolError> {
    registry.get(name).unwrap_or_else(|| panic!("no tool {name}")).call(arguments, scope).await
}

/// A call's scope in which `member_id` (born `born`) proved who they are.
async fn verified(registry: &ToolRegistry, member_id: &str, born: &str) -> CallScope {
    let scope = CallScope::default();
    scope.next_response();
    let result = call_in(registry, &scope, "verify_member", json!({"member_id": member_id, "date_of_birth": born})).await;
    assert_eq!(result.expect("verified")["verified"], true);
    scope
}

/// Requests a refill the way a call does: asked in one response, confirmed in the next.
async fn confirmed_refill(registry: &ToolRegistry, scope: &CallScope, rx_id: &str) -> Result<Value, ToolError> {
    let question = call_in(registry, scope, "request_refill", json!({"rx_id": rx_id})).await?;
    assert_eq!(question["status"], "needs_confirmation");
    scope.next_response();
    call_in(registry, scope, "request_refill", json!({"rx_id": rx_id, "confirm": true})).await
}

fn count(path: &Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(path).expect("open with sqlite");
    conn.query_row(sql, [], |row| row.get(0)).expect("count")
}

#[tokio::test]
async fn first_open_creates_and_seeds_a_new_file_in_a_new_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("cache/parley/pharmacy.sqlite");
    let registry = registry(&path);
    assert!(path.exists());
    assert_eq!(
        registry.specs().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["get_order_details", "get_pickup_time", "get_prescription", "list_orders", "request_refill", "verify_member"]
    );
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members WHERE member_id = '1001'"), 1);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members"), 5);

    let scope = verified(&registry, "1001", "1984-03-12").await;
    let order = call_in(&registry, &scope, "get_order_details", json!({"order_id": "ord001"})).await.expect("order");
    assert_eq!(
        (&order["status"], &order["medication"], &order["quantity"]),
        (&json!("processing"), &json!("Amoxicillin five hundred milligrams"), &json!("twenty-one"))
    );
    let pickup = call_in(&registry, &scope, "get_pickup_time", json!({"order_id": "ORD001"})).await.expect("pickup");
    assert_eq!(pickup["pickup"], "December sixth at ten a.m.");
}

#[tokio::test]
async fn reopening_keeps_one_seed_and_earlier_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pharmacy.sqlite");
    let members = count_after_open(&path);
    {
        let registry = registry(&path);
        let scope = verified(&registry, "1002", "1971-11-02").await;
        let refill = confirmed_refill(&registry, &scope, "RX1002").await.expect("refill");
        assert_eq!(refill["status"], "requested");
        assert_eq!(refill["refills_remaining_after"], "one");
    }
    // Opened again, twice: the seed is not inserted again and the refill is not undone.
    let _first = PharmacyDb::open(&path).expect("reopen");
    let registry = registry(&path);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members"), members);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members WHERE member_id = '1001'"), 1);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM orders WHERE order_id = 'ORD001'"), 1);
    let scope = verified(&registry, "1002", "1971-11-02").await;
    let refills = call_in(&registry, &scope, "get_prescription", json!({"rx_id": "RX1002"})).await.expect("refills");
    assert_eq!(refills["refills_remaining"], "one");
    assert_eq!(count(&path, "SELECT COUNT(*) FROM refill_requests WHERE rx_id = 'RX1002'"), 1);
}

#[tokio::test]
async fn a_file_from_the_first_schema_gets_the_new_seed_and_keeps_its_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pharmacy.sqlite");
    drop(PharmacyDb::open(&path).expect("create"));
    {
        // Make it look like a version 1 file that a run has changed.
        let conn = rusqlite::Connection::open(&path).expect("open with sqlite");
        conn.execute_batch(
            "DELETE FROM orders WHERE member_id IN ('1004', '1005');
             DELETE FROM prescriptions WHERE member_id IN ('1004', '1005');
             DELETE FROM members WHERE member_id IN ('1004', '1005');
             UPDATE prescriptions SET refills_remaining = 1 WHERE rx_id = 'RX1002';
             PRAGMA user_version = 1;",
        )
        .expect("downgrade");
    }
    let registry = registry(&path);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members"), 5);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM orders WHERE member_id = '1004'"), 2);
    assert_eq!(count(&path, "SELECT refills_remaining FROM prescriptions WHERE rx_id = 'RX1002'"), 1);
    assert_eq!(count(&path, "PRAGMA user_version"), 2);
    let scope = verified(&registry, "1004", "January 30, 1958").await;
    let orders = call_in(&registry, &scope, "list_orders", json!({})).await.expect("orders");
    assert_eq!(orders["orders"].as_array().map(Vec::len), Some(2));
}

fn count_after_open(path: &Path) -> i64 {
    drop(PharmacyDb::open(path).expect("open"));
    count(path, "SELECT COUNT(*) FROM members")
}

#[tokio::test]
async fn a_refill_without_refills_changes_nothing_on_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pharmacy.sqlite");
    let registry = registry(&path);
    let scope = verified(&registry, "1001", "1984-03-12").await;
    let result = call_in(&registry, &scope, "request_refill", json!({"rx_id": " rx1001", "confirm": true})).await;
    assert_eq!(
        result,
        Err(ToolError::Declined(
            "Your prescription for Amoxicillin five hundred milligrams has no refills left. Dr. Hannah Reyes would need to authorize more.".into()
        ))
    );
    assert_eq!(count(&path, "SELECT refills_remaining FROM prescriptions WHERE rx_id = 'RX1001'"), 0);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM refill_requests"), 0);
}

#[test]
fn a_file_that_is_not_a_database_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pharmacy.sqlite");
    std::fs::write(&path, "this is not sqlite, just some text long enough to have a header").expect("write");
    match PharmacyDb::open(&path) {
        Err(error @ PharmacyError::Open { .. }) => assert!(error.to_string().contains("pharmacy.sqlite"), "{error}"),
        other => panic!("expected an open error, got {other:?}"),
    }
}

#[test]
fn a_newer_schema_is_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pharmacy.sqlite");
    {
        let conn = rusqlite::Connection::open(&path).expect("create");
        conn.pragma_update(None, "user_version", 99).expect("set version");
    }
    match PharmacyDb::open(&path) {
        Err(PharmacyError::NewerSchema { found, .. }) => assert_eq!(found, 99),
        other => panic!("expected NewerSchema, got {other:?}"),
    }
}
