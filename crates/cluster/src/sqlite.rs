//! The embedded backend: one SQLite file in WAL mode, shared by every agent of one machine.
//!
//! Every write is one `BEGIN IMMEDIATE` transaction, so concurrent agents (processes) serialize
//! on the database lock; versions come from one counter that only grows, so a record deleted and
//! created again never reuses a version a stale compare-and-swap could match.
//!
//! Busy database: SQLite's busy handler (`busy_timeout`) covers only some of the ways another
//! connection can be in the way. A connection can still get `SQLITE_BUSY` or `SQLITE_LOCKED`
//! (or one of their extended codes) at once: switching a fresh file to WAL needs an exclusive
//! lock, a read that meets a WAL recovery gets `SQLITE_BUSY_RECOVERY`, a read transaction
//! that would have to become a write one gets `SQLITE_BUSY_SNAPSHOT`, and in rollback mode
//! (a file not yet switched to WAL) SQLite refuses to wait where waiting could deadlock. So
//! every step here, from opening the file to each read and write, runs in [`retry`]: on a busy
//! or locked database it is tried again after a short, jittered pause until [`BUSY_DEADLINE`]
//! has passed (the busy handler's own wait counts against the same deadline). Anything else,
//! and a database still busy at the deadline, is [`StoreError::Unavailable`] with the cause.

use crate::model::{now_ms, MigrationRecord, NodeInfo, NodeStatus, Versioned, VmRecord};
use crate::store::{from_json, to_json, Result, Store, StoreError};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one store operation may wait, in total, for a busy or locked database.
pub const BUSY_DEADLINE: Duration = Duration::from_secs(20);
/// First pause between two attempts; it doubles up to [`MAX_BACKOFF`] (each with jitter).
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// The schema; created (if missing) in one `BEGIN IMMEDIATE` transaction.
const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
     INSERT OR IGNORE INTO meta (k, v) VALUES ('version', 0);
     CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, info TEXT NOT NULL, lease_until_ms INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, record TEXT NOT NULL, version INTEGER NOT NULL);
     CREATE TABLE IF NOT EXISTS migrations (id TEXT PRIMARY KEY, record TEXT NOT NULL, started_ms INTEGER NOT NULL);";

/// SQLite-backed store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

/// Whether `e` says another connection is in the way (`SQLITE_BUSY`, `SQLITE_LOCKED` and their
/// extended codes: rusqlite's `code` is the primary code of the extended one).
fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e,
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn unavailable(what: &str, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {what}: {e}"))
}

/// A pause of about `base` (between half and one and a half of it), different for every call,
/// so connections that collided do not retry in lockstep.
fn jittered(base: Duration) -> Duration {
    // A fresh RandomState hashes with new keys every time; the clock adds to it.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos(),
    );
    let frac = (h.finish() % 1000) as u32; // 0..1000
    base / 2 + base * frac / 1000
}

/// Runs `f` until it succeeds, fails with something other than a busy or locked database, or
/// [`BUSY_DEADLINE`] has passed; before each attempt the connection's busy handler gets what
/// is left of the deadline. `what` names the step in errors.
fn retry<T>(
    conn: &mut Connection,
    what: &str,
    mut f: impl FnMut(&mut Connection) -> rusqlite::Result<T>,
) -> Result<T> {
    let t0 = Instant::now();
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let left = BUSY_DEADLINE.saturating_sub(t0.elapsed());
        conn.busy_timeout(left.max(Duration::from_millis(1)))
            .map_err(|e| unavailable(what, e))?;
        let e = match f(conn) {
            Ok(v) => return Ok(v),
            Err(e) if is_busy(&e) => e,
            Err(e) => return Err(unavailable(what, e)),
        };
        let pause = jittered(backoff);
        if t0.elapsed() + pause >= BUSY_DEADLINE {
            return Err(StoreError::Unavailable(format!(
                "sqlite: {what}: {e} (still busy after {:.1} s, {attempts} attempts)",
                t0.elapsed().as_secs_f64()
            )));
        }
        std::thread::sleep(pause);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`: switches it to WAL (unless it is
    /// already) and creates the schema, waiting for other connections doing the same.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let t0 = Instant::now();
        let mut conn = loop {
            match Connection::open(path) {
                Ok(c) => break c,
                Err(e) if is_busy(&e) && t0.elapsed() < BUSY_DEADLINE => {
                    std::thread::sleep(jittered(MAX_BACKOFF))
                }
                Err(e) => return Err(unavailable(&format!("open {}", path.display()), e)),
            }
        };
        // Switching to WAL needs the database to itself; a file already in WAL (every open but
        // the very first) needs no switch.
        let mode = retry(&mut conn, "switch to WAL", |c| {
            let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            if mode.eq_ignore_ascii_case("wal") {
                return Ok(mode);
            }
            c.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get::<_, String>(0))
        })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "sqlite: {} cannot be switched to WAL (journal mode stays {mode:?})",
                path.display()
            )));
        }
        retry(&mut conn, "set synchronous", |c| {
            c.pragma_update(None, "synchronous", "FULL")
        })?;
        retry(&mut conn, "create the schema", |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA)?;
            tx.commit()
        })?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    /// A read (or any statement outside a transaction), retried while the database is busy.
    fn with<T>(&self, f: impl FnMut(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        retry(&mut c, "read", f)
    }

    /// One `BEGIN IMMEDIATE` transaction, started again from scratch while the database is busy
    /// (a failed attempt is rolled back).
    fn write<T>(
        &self,
        mut f: impl FnMut(&rusqlite::Transaction) -> rusqlite::Result<T>,
    ) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        retry(&mut c, "write", |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let r = f(&tx)?;
            tx.commit()?;
            Ok(r)
        })
    }
}

fn next_version(tx: &rusqlite::Transaction) -> rusqlite::Result<u64> {
    tx.execute("UPDATE meta SET v = v + 1 WHERE k = 'version'", [])?;
    tx.query_row("SELECT v FROM meta WHERE k = 'version'", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
}

impl Store for SqliteStore {
    fn register_node(&self, info: &NodeInfo, ttl: Duration) -> Result<()> {
        crate::store::check_name("node", &info.name)?;
        let until = (now_ms() + ttl.as_millis() as u64) as i64;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO nodes (name, info, lease_until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET info = excluded.info, lease_until_ms = excluded.lease_until_ms",
                params![info.name, to_json(info), until],
            )
            .map(|_| ())
        })
    }

    fn keepalive(&self, node: &str, ttl: Duration) -> Result<()> {
        let until = (now_ms() + ttl.as_millis() as u64) as i64;
        let n = self.write(|tx| {
            tx.execute(
                "UPDATE nodes SET lease_until_ms = ?2 WHERE name = ?1",
                params![node, until],
            )
        })?;
        if n == 0 {
            return Err(StoreError::UnknownNode(node.into()));
        }
        Ok(())
    }

    fn set_schedulable(&self, node: &str, schedulable: bool) -> Result<()> {
        let info: Option<String> = self.write(|tx| {
            let cur: Option<String> = tx
                .query_row(
                    "SELECT info FROM nodes WHERE name = ?1",
                    params![node],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(cur) = cur else { return Ok(None) };
            let mut v: serde_json::Value = serde_json::from_str(&cur).unwrap_or_default();
            v["schedulable"] = serde_json::Value::Bool(schedulable);
            tx.execute(
                "UPDATE nodes SET info = ?2 WHERE name = ?1",
                params![node, v.to_string()],
            )?;
            Ok(Some(cur))
        })?;
        info.map(|_| ())
            .ok_or_else(|| StoreError::UnknownNode(node.into()))
    }

    fn nodes(&self) -> Result<Vec<NodeStatus>> {
        let now = now_ms() as i64;
        let rows: Vec<(String, i64)> = self.with(|c| {
            let mut st = c.prepare("SELECT info, lease_until_ms FROM nodes ORDER BY name")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(info, until)| {
                Ok(NodeStatus {
                    info: from_json("node", &info)?,
                    alive: until > now,
                })
            })
            .collect()
    }

    fn create_vm(&self, rec: &VmRecord) -> Result<()> {
        crate::store::check_vm_record(&rec.spec.name, rec)?;
        let name = rec.spec.name.clone();
        let created = self.write(|tx| {
            let exists: Option<i64> = tx
                .query_row("SELECT 1 FROM vms WHERE name = ?1", params![name], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_some() {
                return Ok(false);
            }
            let v = next_version(tx)?;
            tx.execute(
                "INSERT INTO vms (name, record, version) VALUES (?1, ?2, ?3)",
                params![name, to_json(rec), v as i64],
            )?;
            Ok(true)
        })?;
        if created {
            Ok(())
        } else {
            Err(StoreError::Exists(format!("VM {name:?}")))
        }
    }

    fn vm(&self, name: &str) -> Result<Option<Versioned<VmRecord>>> {
        let row: Option<(String, i64)> = self.with(|c| {
            c.query_row(
                "SELECT record, version FROM vms WHERE name = ?1",
                params![name],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        row.map(|(rec, v)| {
            Ok(Versioned {
                value: from_json("vm", &rec)?,
                version: v as u64,
            })
        })
        .transpose()
    }

    fn vms(&self) -> Result<Vec<Versioned<VmRecord>>> {
        let rows: Vec<(String, i64)> = self.with(|c| {
            let mut st = c.prepare("SELECT record, version FROM vms ORDER BY name")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.into_iter()
            .map(|(rec, v)| {
                Ok(Versioned {
                    value: from_json("vm", &rec)?,
                    version: v as u64,
                })
            })
            .collect()
    }

    fn update_vm(&self, name: &str, expected: u64, rec: &VmRecord) -> Result<bool> {
        crate::store::check_vm_record(name, rec)?;
        self.write(|tx| {
            let cur: Option<i64> = tx
                .query_row(
                    "SELECT version FROM vms WHERE name = ?1",
                    params![name],
                    |r| r.get(0),
                )
                .optional()?;
            if cur != Some(expected as i64) {
                return Ok(false);
            }
            let v = next_version(tx)?;
            tx.execute(
                "UPDATE vms SET record = ?2, version = ?3 WHERE name = ?1",
                params![name, to_json(rec), v as i64],
            )?;
            Ok(true)
        })
    }

    fn delete_vm(&self, name: &str, expected: u64) -> Result<bool> {
        self.write(|tx| {
            let n = tx.execute(
                "DELETE FROM vms WHERE name = ?1 AND version = ?2",
                params![name, expected as i64],
            )?;
            Ok(n == 1)
        })
    }

    fn put_migration(&self, m: &MigrationRecord) -> Result<()> {
        crate::store::check_migration_record(m)?;
        self.write(|tx| {
            tx.execute(
                "INSERT INTO migrations (id, record, started_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![m.id, to_json(m), m.started_ms as i64],
            )
            .map(|_| ())
        })
    }

    fn delete_migration(&self, id: &str) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM migrations WHERE id = ?1", params![id])
                .map(|_| ())
        })
    }

    fn migrations(&self) -> Result<Vec<MigrationRecord>> {
        self.query_migrations(
            "SELECT record FROM migrations ORDER BY started_ms DESC, id DESC LIMIT 1000",
            [],
        )
    }

    fn migration(&self, id: &str) -> Result<Option<MigrationRecord>> {
        Ok(self
            .query_migrations("SELECT record FROM migrations WHERE id = ?1", [id])?
            .pop())
    }

    fn running_migrations(&self) -> Result<Vec<MigrationRecord>> {
        // However old: a running migration holds capacity on its destination.
        self.query_migrations(
            "SELECT record FROM migrations WHERE json_extract(record, '$.outcome') = 'running'
             ORDER BY started_ms DESC, id DESC",
            [],
        )
    }

    fn migrations_of(&self, vm: &str, limit: usize) -> Result<Vec<MigrationRecord>> {
        self.query_migrations(
            "SELECT record FROM migrations WHERE json_extract(record, '$.vm') = ?1
             ORDER BY started_ms DESC, id DESC LIMIT ?2",
            params![vm, limit as i64],
        )
    }
}

impl SqliteStore {
    fn query_migrations(
        &self,
        sql: &str,
        args: impl rusqlite::Params + Clone,
    ) -> Result<Vec<MigrationRecord>> {
        let rows: Vec<String> = self.with(|c| {
            let mut st = c.prepare(sql)?;
            let rows = st
                .query_map(args.clone(), |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.iter().map(|r| from_json("migration", r)).collect()
    }
}
