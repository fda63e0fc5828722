//! SQLite schema and its migrations, applied in order at open.
//!
//! Times are integer milliseconds since the Unix epoch (UTC). Upstream
//! systems may insert into `jobs` directly: only `destination_id` and
//! `payload` are required; every other column has a default.

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
