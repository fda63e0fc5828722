//! SQLite schema and its migrations, applied in order at open, and the
//! connection settings (WAL, synchronous, cache) every open applies first.
//!
//! Times are integer milliseconds since the Unix epoch (UTC). Upstream
//! systems may insert into `jobs` directly: only `destination_id` and
//! `payload` are required; every other column has a default.

use batchrouter_core::StoreError;
use rusqlite::{Connection, TransactionBehavior};

use super::{backend, SqliteOptions};

/// Ordered migrations; the database's `user_version` counts those applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, imports and upload slots.
    r#"
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    destination_id   TEXT    NOT NULL CHECK (destination_id <> ''),
    payload          TEXT    NOT NULL,
    message_id       TEXT,
    state            TEXT    NOT NULL DEFAULT 'waiting'
                     CHECK (state IN ('waiting','executing','importing','succeeded','failed','aborted')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    retry_base       INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    first_attempt_at INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    import_id        INTEGER,
    error_code       TEXT,
    error_message    TEXT,
    note             TEXT,
    external_id      TEXT,
    created_at       INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    updated_at       INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000 AS INTEGER)),
    completed_at     INTEGER
);
CREATE UNIQUE INDEX jobs_message_id ON jobs (destination_id, message_id) WHERE message_id IS NOT NULL;
CREATE INDEX jobs_due ON jobs (destination_id, next_attempt_at, id) WHERE state IN ('waiting', 'failed');
CREATE INDEX jobs_state ON jobs (state, destination_id);
CREATE INDEX jobs_importing ON jobs (import_id) WHERE state = 'importing';
CREATE INDEX jobs_completed ON jobs (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE imports (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    destination_id   TEXT    NOT NULL,
    batch_id         TEXT    NOT NULL,
    context          TEXT    NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending','processing','completed','failed','partial')),
    job_count        INTEGER NOT NULL,
    succeeded        INTEGER NOT NULL DEFAULT 0,
    failed           INTEGER NOT NULL DEFAULT 0,
    aborted          INTEGER NOT NULL DEFAULT 0,
    progress         INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    poll_errors      INTEGER NOT NULL DEFAULT 0,
    next_poll_at     INTEGER NOT NULL,
    deadline_at      INTEGER NOT NULL,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    started_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    completed_at     INTEGER
);
CREATE INDEX imports_in_flight ON imports (destination_id, next_poll_at) WHERE state IN ('pending', 'processing');
CREATE INDEX imports_completed ON imports (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE upload_slots (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    destination_id   TEXT    NOT NULL,
    owner            TEXT    NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    created_at       INTEGER NOT NULL
);
CREATE INDEX upload_slots_destination ON upload_slots (destination_id);
"#,
];

/// Settings of the writer connection: busy timeout, WAL (required), sync
/// level, page cache, statement cache.
pub(super) fn configure(conn: &Connection, opts: &SqliteOptions) -> Result<(), StoreError> {
    conn.busy_timeout(opts.busy_timeout).map_err(backend)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(backend)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "could not enable WAL mode (got {mode})"
        )));
    }
    let sync = if opts.synchronous_full {
        "FULL"
    } else {
        "NORMAL"
    };
    conn.execute_batch(&format!(
        "PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY; \
         PRAGMA cache_size=-{}; PRAGMA wal_autocheckpoint=4000;",
        opts.writer_cache_kib
    ))
    .map_err(backend)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Applies the migrations the database lacks, each in its own transaction;
/// a database newer than this build is refused.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is newer than this batchrouterd understands ({known}); upgrade batchrouterd"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Exclusive)
            .map_err(backend)?;
        tx.execute_batch(sql).map_err(backend)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        tracing::info!(version = i + 1, "Applied SQLite schema migration.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use batchrouter_core::JobState;

    #[test]
    fn the_state_check_allows_every_job_state() {
        let jobs = super::MIGRATIONS[0];
        for s in JobState::ALL {
            assert!(jobs.contains(&format!("'{}'", s.as_str())), "{s:?}");
        }
    }
}
