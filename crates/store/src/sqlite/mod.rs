//! The embedded SQLite job store: one file, WAL mode, owned by one daemon at
//! a time (an OS lock on `<db>.lock`, released when the process dies).
//!
//! Every call runs on tokio's blocking pool, never on the async workers.
//! Writes go through one connection (SQLite has one writer anyway); reads
//! for the API use separate connections so they never wait behind a write.
//!
//! This file is the async shell: opening, the connections, and the
//! [`JobStore`] methods. The statements live in `sql.rs`, row decoding in
//! `rows.rs`, multi-statement write transactions in `writes.rs`, the schema
//! and connection settings in `schema.rs`, the owner lock in `lock.rs`; what
//! both backends decide alike is in `crate::common`.

mod lock;
mod rows;
mod schema;
mod sql;
mod writes;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batchrouter_core::store::{
    AttemptInfo, CommitReport, DestinationCounts, ImportFinish, ImportRecord, Inserted, JobRecord,
    JobTransition, LeaseRenewal, PollUpdate, RecoveryReport, RenewReport, RetryResult, SlotId,
    UploadCommit,
};
use batchrouter_core::{ImportId, Job, JobId, JobState, JobStore, NewJob, StoreError, Timestamp};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior,
};

use crate::common::{error_columns, redrivable, validate_new_jobs, Claim, Fence};

/// Tuning for [`SqliteStore::open_with`].
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// How long a statement waits for a lock held by another connection.
    pub busy_timeout: Duration,
    /// `synchronous=FULL` (survives power loss) instead of `NORMAL`
    /// (survives process crashes; the default, much faster in WAL mode).
    pub synchronous_full: bool,
    /// Read-only connections for API queries.
    pub readers: usize,
    /// Page cache of the writer connection in KiB (bounds memory).
    pub writer_cache_kib: u32,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            busy_timeout: Duration::from_secs(10),
            synchronous_full: false,
            readers: 2,
            writer_cache_kib: 32 * 1024,
        }
    }
}

/// The embedded job store.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    // Held for the store's lifetime: the OS drops the lock when we exit.
    _lock: File,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` with default options.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default()).await
    }

    /// Opens the database: takes the owner lock, enables WAL, migrates.
    pub async fn open_with(
        path: impl AsRef<Path>,
        opts: SqliteOptions,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || Self::open_blocking(path, opts))
            .await
            .map_err(|e| StoreError::Backend(format!("open task failed: {e}")))?
    }

    fn open_blocking(path: PathBuf, opts: SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        let lock = lock::take_lock(&path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut writer = Connection::open_with_flags(&path, flags)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        schema::configure(&writer, &opts)?;
        schema::migrate(&mut writer)?;
        let mut readers = Vec::new();
        for _ in 0..opts.readers.max(1) {
            let r = Connection::open_with_flags(
                &path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(backend)?;
            r.busy_timeout(opts.busy_timeout).map_err(backend)?;
            r.execute_batch("PRAGMA cache_size=-8192;")
                .map_err(backend)?;
            readers.push(Mutex::new(r));
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                writer: Mutex::new(writer),
                readers,
                next_reader: AtomicUsize::new(0),
                _lock: lock,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// Runs `f` in an `IMMEDIATE` transaction on the writer and commits it
    /// when `f` succeeds (an error rolls it back).
    async fn write_tx<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        self.write(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(backend)?;
            let out = f(&tx)?;
            tx.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let i = inner.next_reader.fetch_add(1, Ordering::Relaxed) % inner.readers.len();
            let conn = inner.readers[i].lock().unwrap_or_else(|p| p.into_inner());
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// One row of `sql` with `id` as `?1`, decoded by `decode`, or `None`.
    async fn get_one<T, D>(
        &self,
        sql: &'static str,
        id: i64,
        decode: D,
    ) -> Result<Option<T>, StoreError>
    where
        T: Send + 'static,
        D: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<Result<T, StoreError>> + Send + 'static,
    {
        self.read(move |conn| {
            conn.query_row(sql, params![id], decode)
                .optional()
                .map_err(backend)?
                .transpose()
        })
        .await
    }
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert_jobs(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        validate_new_jobs(&jobs)?;
        self.write_tx(move |tx| writes::insert_jobs(tx, &jobs, now))
            .await
    }

    async fn claim_jobs(
        &self,
        destination_id: &str,
        owner: &str,
        limit: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Vec<Job>, StoreError> {
        let claim = Claim::new(destination_id, owner, limit, now, lease_until);
        self.write_tx(move |tx| writes::claim_jobs(tx, &claim))
            .await
    }

    async fn extend_job_leases(
        &self,
        owner: &str,
        job_ids: &[JobId],
        lease_until: Timestamp,
    ) -> Result<usize, StoreError> {
        let (owner, ids) = (owner.to_string(), job_ids.to_vec());
        self.write_tx(move |tx| {
            writes::update_each(tx, sql::EXTEND_JOB_LEASE, &ids, &owner, lease_until.0)
        })
        .await
    }

    async fn release_jobs(
        &self,
        owner: &str,
        job_ids: &[JobId],
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        let (owner, ids) = (owner.to_string(), job_ids.to_vec());
        self.write_tx(move |tx| writes::update_each(tx, sql::RELEASE_JOB, &ids, &owner, now.0))
            .await
    }

    async fn transition_executing(
        &self,
        owner: &str,
        transitions: Vec<JobTransition>,
        now: Timestamp,
    ) -> Result<CommitReport, StoreError> {
        let owner = owner.to_string();
        self.write_tx(move |tx| {
            let mut report = CommitReport::default();
            let fence = Fence::Executing(&owner);
            writes::apply_transitions(
                tx,
                fence,
                &transitions,
                &HashSet::new(),
                now.0,
                &mut report,
            )?;
            Ok(report)
        })
        .await
    }

    async fn acquire_upload_slot(
        &self,
        destination_id: &str,
        owner: &str,
        max: u32,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Option<SlotId>, StoreError> {
        let (dest, owner) = (destination_id.to_string(), owner.to_string());
        self.write_tx(move |tx| writes::take_slot(tx, &dest, &owner, max, now, lease_until))
            .await
    }

    async fn release_upload_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute(sql::RELEASE_SLOT, params![slot])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn commit_upload(&self, commit: UploadCommit) -> Result<CommitReport, StoreError> {
        self.write_tx(move |tx| writes::commit_upload(tx, &commit))
            .await
    }

    async fn claim_due_imports(
        &self,
        destination_id: &str,
        owner: &str,
        limit: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Vec<ImportRecord>, StoreError> {
        let claim = Claim::new(destination_id, owner, limit, now, lease_until);
        self.write_tx(move |tx| writes::claim_imports(tx, &claim))
            .await
    }

    async fn importing_jobs(&self, import_id: ImportId) -> Result<Vec<AttemptInfo>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(sql::IMPORTING_JOBS).map_err(backend)?;
            let rows = stmt
                .query_map(params![import_id], rows::attempt_info)
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn record_poll(&self, u: PollUpdate) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let (code, message) = error_columns(u.poll_error.as_ref());
            let n = conn
                .execute(
                    sql::RECORD_POLL,
                    params![
                        u.import_id,
                        u.owner,
                        u.state.as_str(),
                        u.progress.map(i64::from),
                        i64::from(u.poll_error.is_some()),
                        code,
                        message,
                        u.next_poll_at.0,
                        u.lease_until.0,
                        u.now.0
                    ],
                )
                .map_err(backend)?;
            Ok(n == 1)
        })
        .await
    }

    async fn finish_import(&self, f: ImportFinish) -> Result<CommitReport, StoreError> {
        self.write_tx(move |tx| writes::finish_import(tx, &f)).await
    }

    async fn next_poll_due(&self, destination_id: &str) -> Result<Option<Timestamp>, StoreError> {
        let dest = destination_id.to_string();
        self.read(move |conn| {
            conn.query_row(sql::NEXT_POLL_DUE, params![dest], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.map(Timestamp))
            .map_err(backend)
        })
        .await
    }

    async fn recover(&self, now: Timestamp) -> Result<RecoveryReport, StoreError> {
        // The OS lock makes this process the only owner: every lease is stale.
        self.write_tx(move |tx| writes::release_three(tx, sql::RECOVER, [params![now.0], &[], &[]]))
            .await
    }

    async fn reclaim_expired(&self, now: Timestamp) -> Result<RecoveryReport, StoreError> {
        self.write_tx(move |tx| writes::release_three(tx, sql::RECLAIM, [params![now.0]; 3]))
            .await
    }

    async fn renew_leases(&self, r: LeaseRenewal) -> Result<RenewReport, StoreError> {
        if r.jobs.is_empty() && r.imports.is_empty() && r.slots.is_empty() {
            return Ok(RenewReport::default());
        }
        self.write_tx(move |tx| {
            let renew = |sql, ids: &[i64]| {
                writes::update_each(tx, sql, ids, &r.owner, r.lease_until.0).map(|n| n as u64)
            };
            Ok(RenewReport {
                jobs: renew(sql::RENEW_JOB, &r.jobs)?,
                imports: renew(sql::RENEW_IMPORT, &r.imports)?,
                slots: renew(sql::RENEW_SLOT, &r.slots)?,
            })
        })
        .await
    }

    async fn release_earlier_runs(
        &self,
        prefix: &str,
        nonce_chars: usize,
        current: &str,
        now: Timestamp,
    ) -> Result<RecoveryReport, StoreError> {
        let (prefix, current) = (prefix.to_string(), current.to_string());
        let prefix_chars = prefix.chars().count() as i64;
        let total_chars = prefix_chars + nonce_chars as i64;
        self.write_tx(move |tx| {
            let owned = params![prefix, prefix_chars, total_chars, current];
            let jobs = params![prefix, prefix_chars, total_chars, current, now.0];
            writes::release_three(tx, sql::RELEASE_EARLIER, [jobs, owned, owned])
        })
        .await
    }

    async fn expire_jobs(
        &self,
        created_before: Timestamp,
        message: &str,
        now: Timestamp,
        limit: usize,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        if limit == 0 {
            return Ok(BTreeMap::new());
        }
        let message = message.to_string();
        self.write_tx(move |tx| writes::expire_jobs(tx, created_before, &message, now, limit))
            .await
    }

    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.get_one(sql::GET_JOB, id, rows::job_record).await
    }

    async fn get_import(&self, id: ImportId) -> Result<Option<ImportRecord>, StoreError> {
        self.get_one(sql::GET_IMPORT, id, rows::import).await
    }

    async fn destination_counts(&self) -> Result<BTreeMap<String, DestinationCounts>, StoreError> {
        self.read(rows::destination_counts).await
    }

    async fn retry_job(&self, id: JobId, now: Timestamp) -> Result<RetryResult, StoreError> {
        self.write_tx(move |tx| writes::retry_job(tx, id, now))
            .await
    }

    async fn redrive(
        &self,
        destination_id: &str,
        states: &[JobState],
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let dest = destination_id.to_string();
        let states = redrivable(states);
        if states.is_empty() {
            return Ok(0);
        }
        self.write_tx(move |tx| writes::redrive(tx, &dest, &states, now))
            .await
    }

    async fn sweep_terminal(&self, before: Timestamp, limit: usize) -> Result<u64, StoreError> {
        self.write_tx(move |tx| {
            let p = params![before.0, limit as i64];
            let jobs = tx.execute(sql::SWEEP_JOBS, p).map_err(backend)?;
            tx.execute(sql::SWEEP_IMPORTS, p).map_err(backend)?;
            Ok(jobs as u64)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row(sql::PING, [], |r| r.get::<_, i64>(0))
                .map(|_| ())
                .map_err(backend)
        })
        .await
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        // Rewrites the schema version with its own value: a real committed
        // write (page 1 goes to the WAL) that changes nothing.
        self.write_tx(|tx| {
            let version: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(backend)?;
            tx.execute_batch(&format!("PRAGMA user_version = {version}"))
                .map_err(backend)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
