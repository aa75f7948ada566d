//! The embedded backend: one SQLite file in WAL mode, shared by every agent of one machine.
//!
//! Every write is one `BEGIN IMMEDIATE` transaction, so concurrent agents (processes) serialize
//! on the database lock; versions come from one counter that only grows, so a record deleted and
//! created again never reuses a version a stale compare-and-swap could match.

use crate::model::{now_ms, MigrationRecord, NodeInfo, NodeStatus, Versioned, VmRecord};
use crate::store::{from_json, to_json, Result, Store, StoreError};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// SQLite-backed store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn db(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(format!("sqlite: {e}"))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
             INSERT OR IGNORE INTO meta (k, v) VALUES ('version', 0);
             CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, info TEXT NOT NULL, lease_until_ms INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS vms (name TEXT PRIMARY KEY, record TEXT NOT NULL, version INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS migrations (id TEXT PRIMARY KEY, record TEXT NOT NULL, started_ms INTEGER NOT NULL);",
        )
        .map_err(db)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        let mut c = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut c).map_err(db)
    }

    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<T>) -> Result<T> {
        self.with(|c| {
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
        let rows: Vec<String> = self.with(|c| {
            let mut st = c.prepare(
                "SELECT record FROM migrations ORDER BY started_ms DESC, id DESC LIMIT 1000",
            )?;
            let rows = st
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })?;
        rows.iter().map(|r| from_json("migration", r)).collect()
    }
}
