//! The pharmacy desk on a database file, through the public API and a registry, as
//! the server uses it: first-run seeding, reopening, and changes that persist. The
//! file is inspected with SQLite directly, so the checks do not trust the tools.

use std::path::Path;
use std::sync::Arc;

use parley_agent::tools::pharmacy::{PharmacyDb, PharmacyError, pharmacy_tools};
use parley_agent::tools::{ToolError, ToolRegistry};
use serde_json::{Value, json};

fn registry(path: &Path) -> ToolRegistry {
    let db = Arc::new(PharmacyDb::open(path).expect("open the database"));
    let mut registry = ToolRegistry::default();
    for tool in pharmacy_tools(db) {
        registry.register(tool);
    }
    registry
}

async fn call(registry: &ToolRegistry, name: &str, arguments: Value) -> Result<Value, ToolError> {
    registry.get(name).unwrap_or_else(|| panic!("no tool {name}")).call(arguments).await
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
        ["get_order_details", "get_pickup_time", "get_refills_remaining", "list_orders", "lookup_member", "request_refill"]
    );
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members WHERE member_id = '1001'"), 1);

    let order = call(&registry, "get_order_details", json!({"order_id": "ord001"})).await.expect("order");
    assert_eq!(
        (&order["status"], &order["medication"], &order["strength"], &order["quantity"]),
        (&json!("processing"), &json!("Amoxicillin"), &json!("500 mg"), &json!(21))
    );
    let pickup = call(&registry, "get_pickup_time", json!({"order_id": "ORD001"})).await.expect("pickup");
    assert_eq!((&pickup["pickup_date"], &pickup["pickup_time"]), (&json!("2026-12-06"), &json!("10:00")));
    let member = call(&registry, "lookup_member", json!({"member_id": 1001})).await.expect("member");
    assert_eq!(member["name"], "Maria Lopez");
}

#[tokio::test]
async fn reopening_keeps_one_seed_and_earlier_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("pharmacy.sqlite");
    let members = count_after_open(&path);
    {
        let registry = registry(&path);
        let refill = call(&registry, "request_refill", json!({"rx_id": "RX1002"})).await.expect("refill");
        assert_eq!(refill["status"], "requested");
        assert_eq!(refill["refills_remaining_after"], 1);
    }
    // Opened again, twice: the seed is not inserted again and the refill is not undone.
    let _first = PharmacyDb::open(&path).expect("reopen");
    let registry = registry(&path);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members"), members);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM members WHERE member_id = '1001'"), 1);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM orders WHERE order_id = 'ORD001'"), 1);
    let refills = call(&registry, "get_refills_remaining", json!({"rx_id": "RX1002"})).await.expect("refills");
    assert_eq!(refills["refills_remaining"], 1);
    assert_eq!(count(&path, "SELECT COUNT(*) FROM refill_requests WHERE rx_id = 'RX1002'"), 1);
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
    let result = call(&registry, "request_refill", json!({"rx_id": " rx1001"})).await;
    assert_eq!(
        result,
        Err(ToolError::Failed("prescription RX1001 has no refills remaining; the prescriber must authorize more".into()))
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
