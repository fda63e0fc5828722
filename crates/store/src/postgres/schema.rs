//! PostgreSQL schema and its migrations, applied in order at open under a
//! session advisory lock, so daemons starting together migrate once.
//!
//! The shape mirrors the SQLite schema: integer millisecond timestamps
//! (UTC), the same column names and state words, ids that are never reused
//! (identity columns backed by sequences). Upstream systems may insert into
//! `jobs` directly: only `destination_id` and `payload` are required; the
//! defaults fill the rest, with times taken from `now()`.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use batchrouter_core::StoreError;

/// Key of the session advisory lock held while migrating ("batchrou").
pub const MIGRATION_LOCK_KEY: i64 = 0x6261_7463_6872_6f75;

/// Table recording the applied migrations.
pub const VERSION_TABLE: &str = "batchrouter_schema_migrations";

/// Ordered migrations; `batchrouter_schema_migrations` records those applied.
pub const MIGRATIONS: &[&str] = &[
    // 1: jobs, imports, upload slots and per-destination lock rows.
    r#"
CREATE TABLE jobs (
    id               BIGINT  GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME jobs_id_seq) PRIMARY KEY,
    destination_id   TEXT    NOT NULL CHECK (destination_id <> ''),
    payload          TEXT    NOT NULL,
    message_id       TEXT,
    state            TEXT    NOT NULL DEFAULT 'waiting'
                     CHECK (state IN ('waiting','executing','importing','succeeded','failed','aborted')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    retry_base       INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT  NOT NULL DEFAULT (floor(extract(epoch FROM now()) * 1000)::BIGINT),
    first_attempt_at BIGINT,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    import_id        BIGINT,
    error_code       TEXT,
    error_message    TEXT,
    note             TEXT,
    external_id      TEXT,
    created_at       BIGINT  NOT NULL DEFAULT (floor(extract(epoch FROM now()) * 1000)::BIGINT),
    updated_at       BIGINT  NOT NULL DEFAULT (floor(extract(epoch FROM now()) * 1000)::BIGINT),
    completed_at     BIGINT
);
CREATE UNIQUE INDEX jobs_message_id ON jobs (destination_id, message_id) WHERE message_id IS NOT NULL;
-- The claim walks this in due order and stops at its LIMIT; jobs still
-- backing off lie beyond the range and are never visited.
CREATE INDEX jobs_due ON jobs (destination_id, next_attempt_at, id) WHERE state IN ('waiting', 'failed');
-- Counts of the other states (index-only once vacuumed) and re-drives of
-- aborted jobs. Partial so that it can never compete with jobs_due for the claim.
CREATE INDEX jobs_settled ON jobs (destination_id, state) WHERE state NOT IN ('waiting', 'failed');
-- Lease reclaim looks only at claimed jobs.
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'executing';
CREATE INDEX jobs_importing ON jobs (import_id) WHERE state = 'importing';
CREATE INDEX jobs_completed ON jobs (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE imports (
    id               BIGINT  GENERATED ALWAYS AS IDENTITY (SEQUENCE NAME imports_id_seq) PRIMARY KEY,
    destination_id   TEXT    NOT NULL,
    batch_id         TEXT    NOT NULL,
    context          JSON    NOT NULL,
    state            TEXT    NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending','processing','completed','failed','partial')),
    job_count        BIGINT  NOT NULL,
    succeeded        BIGINT  NOT NULL DEFAULT 0,
    failed           BIGINT  NOT NULL DEFAULT 0,
    aborted          BIGINT  NOT NULL DEFAULT 0,
    progress         INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    poll_errors      INTEGER NOT NULL DEFAULT 0,
    next_poll_at     BIGINT  NOT NULL,
    deadline_at      BIGINT  NOT NULL,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    started_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    completed_at     BIGINT
);
CREATE INDEX imports_in_flight ON imports (destination_id, next_poll_at, id) WHERE state IN ('pending', 'processing');
CREATE INDEX imports_completed ON imports (completed_at) WHERE completed_at IS NOT NULL;

CREATE TABLE upload_slots (
    id               BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination_id   TEXT    NOT NULL,
    owner            TEXT    NOT NULL,
    lease_expires_at BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL
);
CREATE INDEX upload_slots_destination ON upload_slots (destination_id);

-- One row per destination, locked (FOR UPDATE) while an upload slot is
-- counted and taken, so concurrency caps hold across daemons.
CREATE TABLE destinations (
    id               TEXT    PRIMARY KEY,
    created_at       BIGINT  NOT NULL
);
"#,
];

fn backend(e: sqlx::Error) -> StoreError {
    StoreError::Backend(format!("migration: {e}"))
}

/// Applies the migrations this build knows that the database lacks, under
/// `pg_advisory_lock` on a connection of its own; refuses a database whose
/// schema is newer than this build.
pub async fn migrate(conn: &mut PgConnection) -> Result<u32, StoreError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *conn)
        .await
        .map_err(backend)?;
    let result = migrate_locked(conn).await;
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK_KEY)
        .execute(&mut *conn)
        .await;
    let applied = result?;
    unlock.map_err(backend)?;
    Ok(applied)
}

async fn migrate_locked(conn: &mut PgConnection) -> Result<u32, StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS batchrouter_schema_migrations (\
            version INTEGER PRIMARY KEY, \
            applied_at BIGINT NOT NULL DEFAULT (floor(extract(epoch FROM now()) * 1000)::BIGINT))",
    )
    .execute(&mut *conn)
    .await
    .map_err(backend)?;
    let current: i32 =
        sqlx::query("SELECT COALESCE(MAX(version), 0) FROM batchrouter_schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(backend)?
            .try_get(0)
            .map_err(backend)?;
    let known = MIGRATIONS.len() as i32;
    if current > known {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is newer than this batchrouterd understands ({known}); upgrade batchrouterd"
        )));
    }
    let mut applied = 0;
    for (i, &sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let version = i as i32 + 1;
        let mut tx = conn.begin().await.map_err(backend)?;
        sqlx::raw_sql(sql)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        sqlx::query("INSERT INTO batchrouter_schema_migrations (version) VALUES ($1)")
            .bind(version)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        tx.commit().await.map_err(backend)?;
        applied += 1;
        tracing::info!(version, "Applied PostgreSQL schema migration.");
    }
    Ok(applied)
}
