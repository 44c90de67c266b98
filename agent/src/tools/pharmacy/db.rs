//! The pharmacy desk's SQLite database: schema, seed data and the queries the tools
//! run. Nothing here knows about JSON or the model; the tools in the parent module
//! turn these rows into results.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use crate::tools::ToolError;

/// Stored in SQLite's `user_version` once the schema exists and is seeded. A file at 0
/// is new; one above this was written by a newer server and is left alone; one below
/// is migrated: the schema is created where missing and the seed rows it lacks are
/// added (`INSERT OR IGNORE`), so records changed by earlier runs stay as they are.
/// Version 2 added members 1004 and 1005 with their prescriptions and orders.
const SCHEMA_VERSION: i32 = 2;

/// How long a statement waits for another process holding the write lock (two
/// servers on one file) before it fails instead of hanging a tool call.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the model is told when the database itself fails; the detail goes to the log.
const UNAVAILABLE: &str = "I'm sorry, I can't reach our pharmacy records right now. Please call back in a little while.";

/// Status of a refill request that the pharmacy has not handled yet.
const REFILL_PENDING: &str = "requested";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS members (
    member_id     TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    date_of_birth TEXT NOT NULL,
    phone         TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS prescriptions (
    rx_id             TEXT PRIMARY KEY,
    member_id         TEXT NOT NULL REFERENCES members(member_id),
    medication        TEXT NOT NULL,
    strength          TEXT NOT NULL,
    quantity          INTEGER NOT NULL CHECK (quantity > 0),
    refills_remaining INTEGER NOT NULL CHECK (refills_remaining >= 0),
    prescriber        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    order_id    TEXT PRIMARY KEY,
    member_id   TEXT NOT NULL REFERENCES members(member_id),
    rx_id       TEXT REFERENCES prescriptions(rx_id),
    status      TEXT NOT NULL,
    medication  TEXT NOT NULL,
    strength    TEXT NOT NULL,
    quantity    INTEGER NOT NULL CHECK (quantity > 0),
    created_at  TEXT NOT NULL,
    pickup_date TEXT,
    pickup_time TEXT
);
CREATE INDEX IF NOT EXISTS orders_by_member ON orders(member_id);
CREATE TABLE IF NOT EXISTS refill_requests (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    rx_id        TEXT NOT NULL REFERENCES prescriptions(rx_id),
    requested_at TEXT NOT NULL,
    status       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS refill_requests_by_rx ON refill_requests(rx_id);
";

/// (member_id, name, date_of_birth, phone)
const SEED_MEMBERS: &[(&str, &str, &str, &str)] = &[
    ("1001", "Maria Lopez", "1984-03-12", "555-0101"),
    ("1002", "James Chen", "1971-11-02", "555-0102"),
    ("1003", "Aisha Patel", "1990-07-25", "555-0103"),
    ("1004", "Robert Kim", "1958-01-30", "555-0104"),
    ("1005", "Sofia Rossi", "2001-05-19", "555-0105"),
];

/// (rx_id, member_id, medication, strength, quantity, refills_remaining, prescriber)
const SEED_PRESCRIPTIONS: &[(&str, &str, &str, &str, i64, i64, &str)] = &[
    ("RX1001", "1001", "Amoxicillin", "500 mg", 21, 0, "Dr. Hannah Reyes"),
    ("RX1002", "1002", "Lisinopril", "10 mg", 30, 2, "Dr. Samuel Okafor"),
    ("RX1003", "1003", "Metformin", "500 mg", 60, 5, "Dr. Priya Nair"),
    ("RX1004", "1004", "Atorvastatin", "20 mg", 30, 3, "Dr. Elena Petrova"),
    ("RX1005", "1004", "Levothyroxine", "50 mcg", 90, 1, "Dr. Elena Petrova"),
    ("RX1006", "1005", "Albuterol", "90 mcg", 1, 4, "Dr. Marcus Webb"),
];

/// (order_id, member_id, rx_id, status, medication, strength, quantity, created_at,
/// pickup_date, pickup_time)
#[allow(clippy::type_complexity)]
const SEED_ORDERS: &[(&str, &str, &str, &str, &str, &str, i64, &str, Option<&str>, Option<&str>)] = &[
    (
        "ORD001",
        "1001",
        "RX1001",
        "processing",
        "Amoxicillin",
        "500 mg",
        21,
        "2026-12-01T09:30:00Z",
        Some("2026-12-06"),
        Some("10:00"),
    ),
    ("ORD002", "1002", "RX1002", "ready", "Lisinopril", "10 mg", 30, "2026-11-28T15:10:00Z", Some("2026-12-02"), Some("14:30")),
    ("ORD003", "1003", "RX1003", "shipped", "Metformin", "500 mg", 60, "2026-11-25T11:00:00Z", None, None),
    ("ORD004", "1002", "RX1002", "picked up", "Lisinopril", "10 mg", 30, "2026-10-29T08:45:00Z", Some("2026-11-01"), Some("09:00")),
    ("ORD005", "1004", "RX1004", "ready", "Atorvastatin", "20 mg", 30, "2026-11-29T10:20:00Z", Some("2026-12-03"), Some("09:15")),
    ("ORD006", "1004", "RX1005", "processing", "Levothyroxine", "50 mcg", 90, "2026-12-01T16:05:00Z", Some("2026-12-08"), Some("16:45")),
    ("ORD007", "1005", "RX1006", "shipped", "Albuterol", "90 mcg", 1, "2026-11-27T13:40:00Z", None, None),
];

/// Why the pharmacy database could not be opened. Queries made by tools never return
/// this: their failures become a [`ToolError`] the model can explain.
#[derive(Debug, thiserror::Error)]
pub enum PharmacyError {
    /// The folder for the database file could not be created.
    #[error("cannot create the folder for the pharmacy database {path}: {source}; check the path and its permissions")]
    CreateDir {
        /// The folder that could not be created.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite could not open the file, or create or seed the schema in it.
    #[error("cannot open the pharmacy database {path}: {source}; check that the file is a SQLite database and is writable, or delete it to start fresh")]
    Open {
        /// The database file (`:memory:` for an in-memory one).
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer server whose schema this one does not know.
    #[error("the pharmacy database {path} has schema version {found}, newer than this server's {SCHEMA_VERSION}; upgrade parley or point it at another file")]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// The version found in the file.
        found: i32,
    },
    /// A read of the records at start-up failed.
    #[error("cannot read the pharmacy database: {source}")]
    Query {
        #[source]
        source: rusqlite::Error,
    },
}

/// The demo pharmacy's records (members, prescriptions, orders, refill requests) in an
/// embedded SQLite database, shared by every call. One connection behind a mutex is
/// plenty for a demo desk; every query runs on a blocking thread so a slow disk never
/// stalls the async runtime that carries the calls' audio.
pub struct PharmacyDb {
    conn: Mutex<Connection>,
}

impl std::fmt::Debug for PharmacyDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PharmacyDb").finish_non_exhaustive()
    }
}

impl PharmacyDb {
    /// Opens (or creates) the database file at `path`, creating its folder if needed.
    /// A new file gets the schema and the seed data; an existing one is used as it is,
    /// so refills requested in earlier runs persist and reopening never duplicates the
    /// seed.
    pub fn open(path: &Path) -> Result<Self, PharmacyError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| PharmacyError::CreateDir { path: dir.to_path_buf(), source })?;
        }
        let conn = Connection::open(path).map_err(|source| PharmacyError::Open { path: path.to_path_buf(), source })?;
        Self::initialize(conn, path)
    }

    /// A fresh seeded database in memory: for tests and evaluations, where every run
    /// must start from the same records whatever earlier runs changed.
    pub fn in_memory() -> Result<Self, PharmacyError> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| PharmacyError::Open { path: path.to_path_buf(), source })?;
        Self::initialize(conn, path)
    }

    /// Creates the schema and seeds it when the file is new, in one immediate
    /// transaction, so two servers opening the same new file seed it once.
    fn initialize(mut conn: Connection, path: &Path) -> Result<Self, PharmacyError> {
        let open_error = |source| PharmacyError::Open { path: path.to_path_buf(), source };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(open_error)?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(open_error)?;
        let found: i32 = tx.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(open_error)?;
        if found > SCHEMA_VERSION {
            return Err(PharmacyError::NewerSchema { path: path.to_path_buf(), found });
        }
        if found < SCHEMA_VERSION {
            tx.execute_batch(SCHEMA).map_err(open_error)?;
            seed(&tx).map_err(open_error)?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(open_error)?;
        }
        tx.commit().map_err(open_error)?;
        Ok(Self { conn: Mutex::new(conn) })
    }

    /// Words a caller of this desk says, as a speech-to-text prompt: how ids and
    /// dates sound, and the medications and prescribers on record (a drug name is
    /// otherwise heard as the nearest common words). Read once at start-up.
    pub fn vocabulary(&self) -> Result<String, PharmacyError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let read = |sql: &str| -> Result<Vec<String>, rusqlite::Error> {
            let mut statement = conn.prepare(sql)?;
            let names = statement.query_map([], |row| row.get::<_, String>(0))?.collect::<Result<Vec<_>, _>>()?;
            Ok(names)
        };
        let query_error = |source| PharmacyError::Query { source };
        let medications = read("SELECT DISTINCT medication FROM prescriptions ORDER BY medication LIMIT 40").map_err(query_error)?;
        let prescribers = read("SELECT DISTINCT prescriber FROM prescriptions ORDER BY prescriber LIMIT 20").map_err(query_error)?;
        let mut text = String::from(
            "Pharmacy phone call. My member ID is 1001 and my date of birth is March 12, 1984. \
             Order ORD001, prescription RX1001, a refill, pickup time.",
        );
        if !medications.is_empty() {
            text.push_str(&format!(" Medications: {}.", medications.join(", ")));
        }
        if !prescribers.is_empty() {
            text.push_str(&format!(" Prescribed by {}.", prescribers.join(", ")));
        }
        Ok(text)
    }

    /// Runs `query` with the connection on a blocking thread. Database failures are
    /// logged and become a generic [`ToolError::Failed`], so the model can apologize
    /// without seeing SQL.
    pub(super) async fn run<T, F>(self: Arc<Self>, query: F) -> Result<T, ToolError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    {
        let task = tokio::task::spawn_blocking(move || {
            // A panic while holding the lock left no transaction open (dropping a
            // transaction rolls it back), so the connection is still sound.
            let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            query(&mut conn)
        });
        match task.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                tracing::error!(%error, "pharmacy database query failed");
                Err(ToolError::Failed(UNAVAILABLE.to_string()))
            }
            Err(error) => {
                tracing::error!(%error, "pharmacy database task did not finish");
                Err(ToolError::Failed(UNAVAILABLE.to_string()))
            }
        }
    }
}

fn seed(tx: &rusqlite::Transaction<'_>) -> Result<(), rusqlite::Error> {
    let mut member = tx.prepare("INSERT OR IGNORE INTO members (member_id, name, date_of_birth, phone) VALUES (?1, ?2, ?3, ?4)")?;
    for (id, name, dob, phone) in SEED_MEMBERS {
        member.execute(params![id, name, dob, phone])?;
    }
    let mut rx = tx.prepare(
        "INSERT OR IGNORE INTO prescriptions (rx_id, member_id, medication, strength, quantity, refills_remaining, prescriber)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    for (rx_id, member_id, medication, strength, quantity, refills, prescriber) in SEED_PRESCRIPTIONS {
        rx.execute(params![rx_id, member_id, medication, strength, quantity, refills, prescriber])?;
    }
    let mut order = tx.prepare(
        "INSERT OR IGNORE INTO orders
         (order_id, member_id, rx_id, status, medication, strength, quantity, created_at, pickup_date, pickup_time)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?;
    for (order_id, member_id, rx_id, status, medication, strength, quantity, created, date, time) in SEED_ORDERS {
        order.execute(params![order_id, member_id, rx_id, status, medication, strength, quantity, created, date, time])?;
    }
    Ok(())
}

/// A member as the tools see them. The phone number stays in the database: the
/// desk never reads it out, so it is never loaded.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Member {
    pub member_id: String,
    pub name: String,
    pub date_of_birth: String,
}

/// An order's row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Order {
    pub order_id: String,
    pub member_id: String,
    pub rx_id: Option<String>,
    pub status: String,
    pub medication: String,
    pub strength: String,
    pub quantity: i64,
    pub pickup_date: Option<String>,
    pub pickup_time: Option<String>,
}

/// A prescription's row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Prescription {
    pub rx_id: String,
    pub member_id: String,
    pub medication: String,
    pub strength: String,
    pub refills_remaining: i64,
    pub prescriber: String,
}

/// What a refill request did.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum RefillOutcome {
    /// No prescription has this id.
    UnknownRx,
    /// None left; nothing was changed.
    NoRefills(Prescription),
    /// A request is already waiting for the pharmacy; nothing was changed, so asking
    /// twice (a retried call, a caller repeating themselves) uses one refill.
    AlreadyRequested { prescription: Prescription, request_id: i64, requested_at: String },
    /// One refill was used and a request recorded.
    Requested { prescription: Prescription, request_id: i64 },
}

pub(super) fn member(conn: &Connection, member_id: &str) -> Result<Option<Member>, rusqlite::Error> {
    conn.query_row(
        "SELECT member_id, name, date_of_birth FROM members WHERE member_id = ?1",
        [member_id],
        |row| Ok(Member { member_id: row.get(0)?, name: row.get(1)?, date_of_birth: row.get(2)? }),
    )
    .optional()
}

const ORDER_COLUMNS: &str =
    "order_id, member_id, rx_id, status, medication, strength, quantity, pickup_date, pickup_time";

fn order_from_row(row: &rusqlite::Row<'_>) -> Result<Order, rusqlite::Error> {
    Ok(Order {
        order_id: row.get(0)?,
        member_id: row.get(1)?,
        rx_id: row.get(2)?,
        status: row.get(3)?,
        medication: row.get(4)?,
        strength: row.get(5)?,
        quantity: row.get(6)?,
        pickup_date: row.get(7)?,
        pickup_time: row.get(8)?,
    })
}

/// A member's orders, newest first.
pub(super) fn orders_of(conn: &Connection, member_id: &str) -> Result<Vec<Order>, rusqlite::Error> {
    let mut statement =
        conn.prepare(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE member_id = ?1 ORDER BY created_at DESC, order_id"))?;
    let rows = statement.query_map([member_id], order_from_row)?;
    rows.collect()
}

pub(super) fn order(conn: &Connection, order_id: &str) -> Result<Option<Order>, rusqlite::Error> {
    conn.query_row(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = ?1"), [order_id], order_from_row).optional()
}

const PRESCRIPTION_COLUMNS: &str = "rx_id, member_id, medication, strength, refills_remaining, prescriber";

fn prescription_from_row(row: &rusqlite::Row<'_>) -> Result<Prescription, rusqlite::Error> {
    Ok(Prescription {
        rx_id: row.get(0)?,
        member_id: row.get(1)?,
        medication: row.get(2)?,
        strength: row.get(3)?,
        refills_remaining: row.get(4)?,
        prescriber: row.get(5)?,
    })
}

pub(super) fn prescription(conn: &Connection, rx_id: &str) -> Result<Option<Prescription>, rusqlite::Error> {
    conn.query_row(&format!("SELECT {PRESCRIPTION_COLUMNS} FROM prescriptions WHERE rx_id = ?1"), [rx_id], prescription_from_row)
        .optional()
}

/// A member's prescriptions, by id.
pub(super) fn prescriptions_of(conn: &Connection, member_id: &str) -> Result<Vec<Prescription>, rusqlite::Error> {
    let mut statement = conn.prepare(&format!("SELECT {PRESCRIPTION_COLUMNS} FROM prescriptions WHERE member_id = ?1 ORDER BY rx_id"))?;
    let rows = statement.query_map([member_id], prescription_from_row)?;
    rows.collect()
}

/// Uses one refill and records a request, unless none is left or one is already
/// pending; the check and the change are one immediate transaction, so two calls
/// asking at once cannot both take the last refill.
pub(super) fn request_refill(conn: &mut Connection, rx_id: &str) -> Result<RefillOutcome, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let Some(prescription) = prescription(&tx, rx_id)? else {
        return Ok(RefillOutcome::UnknownRx);
    };
    let pending: Option<(i64, String)> = tx
        .query_row(
            "SELECT id, requested_at FROM refill_requests WHERE rx_id = ?1 AND status = ?2 ORDER BY id DESC LIMIT 1",
            params![rx_id, REFILL_PENDING],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    if let Some((request_id, requested_at)) = pending {
        return Ok(RefillOutcome::AlreadyRequested { prescription, request_id, requested_at });
    }
    if prescription.refills_remaining <= 0 {
        return Ok(RefillOutcome::NoRefills(prescription));
    }
    tx.execute("UPDATE prescriptions SET refills_remaining = refills_remaining - 1 WHERE rx_id = ?1", [rx_id])?;
    tx.execute(
        "INSERT INTO refill_requests (rx_id, requested_at, status) VALUES (?1, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'), ?2)",
        params![rx_id, REFILL_PENDING],
    )?;
    let request_id = tx.last_insert_rowid();
    let after = Prescription { refills_remaining: prescription.refills_remaining - 1, ..prescription };
    tx.commit()?;
    Ok(RefillOutcome::Requested { prescription: after, request_id })
}
