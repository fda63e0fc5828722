//! The embedded SQLite job store: one file, WAL mode, owned by one daemon at
//! a time (an OS lock on `<db>.lock`, released when the process dies).
//!
//! Every call runs on tokio's blocking pool, never on the async workers.
//! Writes go through one connection (SQLite has one writer anyway); reads
//! for the API use separate connections so they never wait behind a write.

mod schema;

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use batchrouter_core::store::{
    AttemptInfo, CommitReport, DestinationCounts, ImportFinish, ImportRecord, ImportState,
    Inserted, JobRecord, JobTransition, LeaseRenewal, PollUpdate, RecoveryReport, RenewReport,
    RetryResult, SlotId, Transition, UploadCommit,
};
use batchrouter_core::{
    ErrorCode, ImportId, Job, JobError, JobId, JobState, JobStore, NewJob, StoreError, Timestamp,
};
use rusqlite::{
    params, Connection, OpenFlags, OptionalExtension, ToSql, Transaction, TransactionBehavior,
};

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

fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    db.with_file_name(name)
}

fn take_lock(db: &Path) -> Result<File, StoreError> {
    let path = lock_path(db);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot open lock file {}: {e}", path.display()))
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StoreError::Locked(format!(
                "{} is in use by another batchrouterd ({}); the SQLite store belongs to one daemon at a time — use PostgreSQL to run several",
                db.display(),
                if holder.is_empty() { "holder unknown" } else { holder }
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(StoreError::Unavailable(format!(
                "cannot lock {}: {e}",
                path.display()
            )))
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let info = format!(
        "pid {} on {} since {} ms",
        std::process::id(),
        host.trim(),
        Timestamp::now().as_millis()
    );
    let _ = file.set_len(0);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.write_all(info.as_bytes());
    Ok(file)
}

fn configure(conn: &Connection, opts: &SqliteOptions) -> Result<(), StoreError> {
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

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(backend)?;
    let known = schema::MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::Unavailable(format!(
            "database schema version {current} is newer than this batchrouterd understands ({known}); upgrade batchrouterd"
        )));
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(current as usize) {
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
        let lock = take_lock(&path)?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut writer = Connection::open_with_flags(&path, flags)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        configure(&writer, &opts)?;
        migrate(&mut writer)?;
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
}

fn immediate(conn: &mut Connection) -> Result<Transaction<'_>, StoreError> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(backend)
}

/// Which jobs a transition may touch: those still held in the expected state.
enum Fence<'a> {
    Executing { owner: &'a str },
    Importing { import_id: ImportId },
}

impl Fence<'_> {
    fn clause(&self) -> &'static str {
        match self {
            Fence::Executing { .. } => "state = 'executing' AND lease_owner = ?9",
            Fence::Importing { .. } => "state = 'importing' AND import_id = ?9",
        }
    }
}

/// The column values one transition writes.
struct TransitionRow<'a> {
    state: &'static str,
    error: Option<&'a JobError>,
    note: Option<&'a str>,
    external_id: Option<&'a str>,
    next_attempt_at: Option<i64>,
    completed_at: Option<i64>,
}

impl<'a> TransitionRow<'a> {
    fn of(t: &'a Transition, now: i64) -> Self {
        let base = TransitionRow {
            state: "",
            error: None,
            note: None,
            external_id: None,
            next_attempt_at: None,
            completed_at: None,
        };
        match t {
            Transition::Succeeded { note, external_id } => TransitionRow {
                state: "succeeded",
                note: note.as_deref(),
                external_id: external_id.as_deref(),
                completed_at: Some(now),
                ..base
            },
            Transition::Failed {
                error,
                next_attempt_at,
            } => TransitionRow {
                state: "failed",
                error: Some(error),
                next_attempt_at: Some(next_attempt_at.0),
                ..base
            },
            Transition::Aborted { error } => TransitionRow {
                state: "aborted",
                error: Some(error),
                completed_at: Some(now),
                ..base
            },
        }
    }
}

/// Writes transitions; jobs in `attempted` also count an upload attempt in
/// the same row write (one write per job, not two). The retry window starts
/// at the first transition out of an upload, counted or throttled.
fn apply_transitions(
    tx: &Transaction<'_>,
    fence: &Fence<'_>,
    transitions: &[JobTransition],
    attempted: &HashSet<JobId>,
    now: i64,
    report: &mut CommitReport,
) -> Result<(), StoreError> {
    let sql = format!(
        "UPDATE jobs SET state = ?2, error_code = ?3, error_message = ?4, note = ?5, external_id = ?6, \
         next_attempt_at = COALESCE(?7, next_attempt_at), completed_at = ?8, updated_at = ?10, \
         attempts = attempts + ?11, first_attempt_at = COALESCE(first_attempt_at, ?10), \
         lease_owner = NULL, lease_expires_at = NULL \
         WHERE id = ?1 AND {}",
        fence.clause()
    );
    let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
    let owner_param: Box<dyn ToSql> = match fence {
        Fence::Executing { owner } => Box::new(owner.to_string()),
        Fence::Importing { import_id } => Box::new(*import_id),
    };
    for t in transitions {
        let w = TransitionRow::of(&t.to, now);
        let changed = stmt
            .execute(params![
                t.job_id,
                w.state,
                w.error.map(|e| e.code.as_str()),
                w.error.map(|e| e.message.as_str()),
                w.note,
                w.external_id,
                w.next_attempt_at,
                w.completed_at,
                owner_param,
                now,
                i64::from(attempted.contains(&t.job_id)),
            ])
            .map_err(backend)?;
        if changed == 1 {
            report.applied += 1;
        } else {
            report.rejected.push(t.job_id);
        }
    }
    Ok(())
}

fn row_to_job(destination_id: &str, r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        destination_id: destination_id.to_string(),
        payload: r.get(1)?,
        message_id: r.get(2)?,
        attempts: r.get(3)?,
        retry_base: r.get(4)?,
        first_attempt_at: r.get::<_, Option<i64>>(5)?.map(Timestamp),
        created_at: Timestamp(r.get(6)?),
    })
}

const JOB_RECORD_COLUMNS: &str =
    "id, destination_id, message_id, state, attempts, next_attempt_at, \
     error_code, error_message, note, external_id, import_id, created_at, updated_at, completed_at";

fn row_to_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let state_s: String = r.get(3)?;
    let state = match state_s.parse::<JobState>() {
        Ok(s) => s,
        Err(e) => return Ok(Err(StoreError::Data(e))),
    };
    let code: Option<String> = r.get(6)?;
    let message: Option<String> = r.get(7)?;
    let next: i64 = r.get(5)?;
    Ok(Ok(JobRecord {
        id: r.get(0)?,
        destination_id: r.get(1)?,
        message_id: r.get(2)?,
        state,
        attempts: r.get(4)?,
        next_attempt_at: matches!(state, JobState::Waiting | JobState::Failed)
            .then_some(Timestamp(next)),
        error: code.map(|c| JobError::new(ErrorCode::parse(&c), message.unwrap_or_default())),
        note: r.get(8)?,
        external_id: r.get(9)?,
        import_id: r.get(10)?,
        created_at: Timestamp(r.get(11)?),
        updated_at: Timestamp(r.get(12)?),
        completed_at: r.get::<_, Option<i64>>(13)?.map(Timestamp),
    }))
}

const IMPORT_COLUMNS: &str = "id, destination_id, batch_id, context, state, job_count, succeeded, failed, aborted, \
     progress, error_code, error_message, poll_errors, started_at, updated_at, completed_at, next_poll_at, deadline_at";

fn row_to_import(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<ImportRecord, StoreError>> {
    let context_s: String = r.get(3)?;
    let context = match serde_json::from_str(&context_s) {
        Ok(c) => c,
        Err(e) => {
            return Ok(Err(StoreError::Data(format!(
                "import context is not JSON: {e}"
            ))))
        }
    };
    let state_s: String = r.get(4)?;
    let state = match ImportState::parse(&state_s) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e)),
    };
    let code: Option<String> = r.get(10)?;
    let message: Option<String> = r.get(11)?;
    Ok(Ok(ImportRecord {
        id: r.get(0)?,
        destination_id: r.get(1)?,
        batch_id: r.get(2)?,
        context,
        state,
        job_count: r.get::<_, i64>(5)?.max(0) as u64,
        succeeded: r.get::<_, i64>(6)?.max(0) as u64,
        failed: r.get::<_, i64>(7)?.max(0) as u64,
        aborted: r.get::<_, i64>(8)?.max(0) as u64,
        progress: r.get::<_, i64>(9)?.clamp(0, 100) as u8,
        error: code.map(|c| JobError::new(ErrorCode::parse(&c), message.unwrap_or_default())),
        poll_errors: r.get(12)?,
        started_at: Timestamp(r.get(13)?),
        updated_at: Timestamp(r.get(14)?),
        completed_at: r.get::<_, Option<i64>>(15)?.map(Timestamp),
        next_poll_at: Timestamp(r.get(16)?),
        deadline_at: Timestamp(r.get(17)?),
    }))
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert_jobs(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        crate::validate_new_jobs(&jobs)?;
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut out = Vec::with_capacity(jobs.len());
            {
                let mut ins = tx
                    .prepare_cached(
                        "INSERT INTO jobs (destination_id, payload, message_id, next_attempt_at, created_at, updated_at) \
                         VALUES (?1, ?2, ?3, ?4, ?4, ?4) \
                         ON CONFLICT (destination_id, message_id) WHERE message_id IS NOT NULL DO NOTHING \
                         RETURNING id",
                    )
                    .map_err(backend)?;
                let mut existing = tx
                    .prepare_cached("SELECT id FROM jobs WHERE destination_id = ?1 AND message_id = ?2")
                    .map_err(backend)?;
                for j in &jobs {
                    let id: Option<i64> = ins
                        .query_row(params![j.destination_id, j.payload, j.message_id, now.0], |r| r.get(0))
                        .optional()
                        .map_err(backend)?;
                    match id {
                        Some(job_id) => out.push(Inserted {
                            job_id,
                            duplicate: false,
                        }),
                        None => {
                            let job_id: i64 = existing
                                .query_row(params![j.destination_id, j.message_id], |r| r.get(0))
                                .map_err(backend)?;
                            out.push(Inserted {
                                job_id,
                                duplicate: true,
                            });
                        }
                    }
                }
            }
            tx.commit().map_err(backend)?;
            Ok(out)
        })
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
        let dest = destination_id.to_string();
        let owner = owner.to_string();
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut jobs = {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'executing', lease_owner = ?1, lease_expires_at = ?2, updated_at = ?3 \
                         WHERE id IN (SELECT id FROM jobs WHERE destination_id = ?4 \
                                      AND state IN ('waiting', 'failed') AND next_attempt_at <= ?3 \
                                      ORDER BY next_attempt_at, id LIMIT ?5) \
                         RETURNING id, payload, message_id, attempts, retry_base, first_attempt_at, created_at",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(params![owner, lease_until.0, now.0, dest, limit as i64], |r| {
                        row_to_job(&dest, r)
                    })
                    .map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)?
            };
            tx.commit().map_err(backend)?;
            jobs.sort_unstable_by_key(|j| j.id);
            Ok(jobs)
        })
        .await
    }

    async fn extend_job_leases(
        &self,
        owner: &str,
        job_ids: &[JobId],
        lease_until: Timestamp,
    ) -> Result<usize, StoreError> {
        let owner = owner.to_string();
        let ids = job_ids.to_vec();
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut n = 0;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE jobs SET lease_expires_at = ?3 WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2",
                    )
                    .map_err(backend)?;
                for id in ids {
                    n += stmt.execute(params![id, owner, lease_until.0]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn release_jobs(
        &self,
        owner: &str,
        job_ids: &[JobId],
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        let owner = owner.to_string();
        let ids = job_ids.to_vec();
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut n = 0;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3 \
                         WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2",
                    )
                    .map_err(backend)?;
                for id in ids {
                    n += stmt.execute(params![id, owner, now.0]).map_err(backend)?;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(n)
        })
        .await
    }

    async fn transition_executing(
        &self,
        owner: &str,
        transitions: Vec<JobTransition>,
        now: Timestamp,
    ) -> Result<CommitReport, StoreError> {
        let owner = owner.to_string();
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut report = CommitReport::default();
            apply_transitions(
                &tx,
                &Fence::Executing { owner: &owner },
                &transitions,
                &HashSet::new(),
                now.0,
                &mut report,
            )?;
            tx.commit().map_err(backend)?;
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
        let dest = destination_id.to_string();
        let owner = owner.to_string();
        self.write(move |conn| {
            let tx = immediate(conn)?;
            tx.execute(
                "DELETE FROM upload_slots WHERE destination_id = ?1 AND lease_expires_at < ?2",
                params![dest, now.0],
            )
            .map_err(backend)?;
            let busy: i64 = tx
                .query_row(
                    "SELECT (SELECT COUNT(*) FROM upload_slots WHERE destination_id = ?1) + \
                            (SELECT COUNT(*) FROM imports WHERE destination_id = ?1 AND state IN ('pending', 'processing'))",
                    params![dest],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            let slot = if busy < max as i64 {
                Some(
                    tx.query_row(
                        "INSERT INTO upload_slots (destination_id, owner, lease_expires_at, created_at) \
                         VALUES (?1, ?2, ?3, ?4) RETURNING id",
                        params![dest, owner, lease_until.0, now.0],
                        |r| r.get(0),
                    )
                    .map_err(backend)?,
                )
            } else {
                None
            };
            tx.commit().map_err(backend)?;
            Ok(slot)
        })
        .await
    }

    async fn release_upload_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        self.write(move |conn| {
            conn.execute("DELETE FROM upload_slots WHERE id = ?1", params![slot])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn commit_upload(&self, commit: UploadCommit) -> Result<CommitReport, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let now = commit.now.0;
            let mut report = CommitReport::default();
            let attempted: HashSet<JobId> = commit.attempted.iter().copied().collect();
            {
                // Attempted jobs that neither transition nor import still count.
                let covered: HashSet<JobId> = commit
                    .transitions
                    .iter()
                    .map(|t| t.job_id)
                    .chain(commit.imports.iter().flat_map(|i| i.job_ids.iter().copied()))
                    .collect();
                let mut count_only = tx
                    .prepare_cached(
                        "UPDATE jobs SET attempts = attempts + 1, first_attempt_at = COALESCE(first_attempt_at, ?3) \
                         WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2",
                    )
                    .map_err(backend)?;
                for id in attempted.iter().filter(|id| !covered.contains(id)) {
                    count_only
                        .execute(params![id, commit.owner, now])
                        .map_err(backend)?;
                }
                let mut create = tx
                    .prepare_cached(
                        "INSERT INTO imports (destination_id, batch_id, context, state, job_count, next_poll_at, \
                         deadline_at, lease_owner, lease_expires_at, started_at, updated_at) \
                         VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?7, ?8, ?9, ?9) RETURNING id",
                    )
                    .map_err(backend)?;
                let mut importing = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'importing', import_id = ?3, error_code = NULL, error_message = NULL, \
                         attempts = attempts + ?5, \
                         first_attempt_at = CASE WHEN ?5 = 1 THEN COALESCE(first_attempt_at, ?4) ELSE first_attempt_at END, \
                         lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4 \
                         WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2",
                    )
                    .map_err(backend)?;
                for imp in &commit.imports {
                    let context = serde_json::to_string(&imp.context)
                        .map_err(|e| StoreError::Invalid(format!("import context: {e}")))?;
                    let import_id: i64 = create
                        .query_row(
                            params![
                                commit.destination_id,
                                imp.batch_id,
                                context,
                                imp.job_ids.len() as i64,
                                imp.next_poll_at.0,
                                imp.deadline_at.0,
                                commit.owner,
                                commit.import_lease_until.0,
                                now
                            ],
                            |r| r.get(0),
                        )
                        .map_err(backend)?;
                    report.import_ids.push(import_id);
                    let mut moved = 0i64;
                    for id in &imp.job_ids {
                        let n = importing
                            .execute(params![id, commit.owner, import_id, now, i64::from(attempted.contains(id))])
                            .map_err(backend)?;
                        if n == 1 {
                            report.applied += 1;
                            moved += 1;
                        } else {
                            report.rejected.push(*id);
                        }
                    }
                    if moved != imp.job_ids.len() as i64 {
                        tx.execute(
                            "UPDATE imports SET job_count = ?2 WHERE id = ?1",
                            params![import_id, moved],
                        )
                        .map_err(backend)?;
                    }
                }
            }
            apply_transitions(
                &tx,
                &Fence::Executing { owner: &commit.owner },
                &commit.transitions,
                &attempted,
                now,
                &mut report,
            )?;
            if let Some(slot) = commit.slot {
                tx.execute("DELETE FROM upload_slots WHERE id = ?1", params![slot])
                    .map_err(backend)?;
            }
            tx.commit().map_err(backend)?;
            Ok(report)
        })
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
        let dest = destination_id.to_string();
        let owner = owner.to_string();
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut out = {
                let sql = format!(
                    "UPDATE imports SET lease_owner = ?1, lease_expires_at = ?2 \
                     WHERE id IN (SELECT id FROM imports WHERE destination_id = ?3 \
                                  AND state IN ('pending', 'processing') AND next_poll_at <= ?4 \
                                  AND (lease_owner IS NULL OR lease_owner = ?1 OR lease_expires_at < ?4) \
                                  ORDER BY next_poll_at, id LIMIT ?5) \
                     RETURNING {IMPORT_COLUMNS}"
                );
                let mut stmt = tx.prepare_cached(&sql).map_err(backend)?;
                let rows = stmt
                    .query_map(params![owner, lease_until.0, dest, now.0, limit as i64], row_to_import)
                    .map_err(backend)?;
                let mut v = Vec::new();
                for r in rows {
                    v.push(r.map_err(backend)??);
                }
                v
            };
            tx.commit().map_err(backend)?;
            out.sort_by_key(|i| (i.next_poll_at, i.id));
            Ok(out)
        })
        .await
    }

    async fn importing_jobs(&self, import_id: ImportId) -> Result<Vec<AttemptInfo>, StoreError> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, attempts, retry_base, first_attempt_at, created_at FROM jobs \
                     WHERE import_id = ?1 AND state = 'importing' ORDER BY id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(params![import_id], |r| {
                    Ok(AttemptInfo {
                        job_id: r.get(0)?,
                        attempts: r.get(1)?,
                        retry_base: r.get(2)?,
                        first_attempt_at: r.get::<_, Option<i64>>(3)?.map(Timestamp),
                        created_at: Timestamp(r.get(4)?),
                    })
                })
                .map_err(backend)?;
            rows.collect::<Result<Vec<_>, _>>().map_err(backend)
        })
        .await
    }

    async fn record_poll(&self, u: PollUpdate) -> Result<bool, StoreError> {
        self.write(move |conn| {
            let (code, message) = match &u.poll_error {
                Some(e) => (Some(e.code.as_str()), Some(e.message.clone())),
                None => (None, None),
            };
            let n = conn
                .execute(
                    "UPDATE imports SET state = ?3, progress = COALESCE(?4, progress), \
                     poll_errors = poll_errors + ?5, \
                     error_code = CASE WHEN ?5 = 1 THEN ?6 ELSE error_code END, \
                     error_message = CASE WHEN ?5 = 1 THEN ?7 ELSE error_message END, \
                     next_poll_at = ?8, lease_expires_at = ?9, updated_at = ?10 \
                     WHERE id = ?1 AND lease_owner = ?2 AND state IN ('pending', 'processing')",
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
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let (s, fl, a) = f.outcome_counts();
            let (code, message) = match &f.error {
                Some(e) => (Some(e.code.as_str()), Some(e.message.clone())),
                None => (None, None),
            };
            let n = tx
                .execute(
                    "UPDATE imports SET state = ?3, succeeded = succeeded + ?4, failed = failed + ?5, \
                     aborted = aborted + ?6, error_code = ?7, error_message = ?8, progress = 100, \
                     completed_at = ?9, updated_at = ?9, lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ?1 AND lease_owner = ?2 AND state IN ('pending', 'processing')",
                    params![f.import_id, f.owner, f.state.as_str(), s, fl, a, code, message, f.now.0],
                )
                .map_err(backend)?;
            let mut report = CommitReport::default();
            if n != 1 {
                // Lease lost: another process owns this import now.
                report.rejected = f.transitions.iter().map(|t| t.job_id).collect();
                return Ok(report);
            }
            apply_transitions(
                &tx,
                &Fence::Importing {
                    import_id: f.import_id,
                },
                &f.transitions,
                &HashSet::new(),
                f.now.0,
                &mut report,
            )?;
            tx.commit().map_err(backend)?;
            Ok(report)
        })
        .await
    }

    async fn next_poll_due(&self, destination_id: &str) -> Result<Option<Timestamp>, StoreError> {
        let dest = destination_id.to_string();
        self.read(move |conn| {
            conn.query_row(
                "SELECT MIN(next_poll_at) FROM imports WHERE destination_id = ?1 AND state IN ('pending', 'processing')",
                params![dest],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(Timestamp))
            .map_err(backend)
        })
        .await
    }

    async fn recover(&self, now: Timestamp) -> Result<RecoveryReport, StoreError> {
        // The OS lock makes this process the only owner: every lease is stale.
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let jobs = tx
                .execute(
                    "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1 \
                     WHERE state = 'executing'",
                    params![now.0],
                )
                .map_err(backend)?;
            let imports = tx
                .execute(
                    "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE state IN ('pending', 'processing') AND lease_owner IS NOT NULL",
                    [],
                )
                .map_err(backend)?;
            let slots = tx.execute("DELETE FROM upload_slots", []).map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(RecoveryReport {
                jobs_released: jobs as u64,
                imports_released: imports as u64,
                slots_released: slots as u64,
            })
        })
        .await
    }

    async fn reclaim_expired(&self, now: Timestamp) -> Result<RecoveryReport, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let jobs = tx
                .execute(
                    "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1 \
                     WHERE state = 'executing' AND lease_expires_at < ?1",
                    params![now.0],
                )
                .map_err(backend)?;
            let imports = tx
                .execute(
                    "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE state IN ('pending', 'processing') AND lease_expires_at < ?1",
                    params![now.0],
                )
                .map_err(backend)?;
            let slots = tx
                .execute("DELETE FROM upload_slots WHERE lease_expires_at < ?1", params![now.0])
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(RecoveryReport {
                jobs_released: jobs as u64,
                imports_released: imports as u64,
                slots_released: slots as u64,
            })
        })
        .await
    }

    async fn renew_leases(&self, r: LeaseRenewal) -> Result<RenewReport, StoreError> {
        if r.jobs.is_empty() && r.imports.is_empty() && r.slots.is_empty() {
            return Ok(RenewReport::default());
        }
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut report = RenewReport::default();
            for (sql, ids, count) in [
                (
                    "UPDATE jobs SET lease_expires_at = ?3 \
                     WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2",
                    &r.jobs,
                    &mut report.jobs,
                ),
                (
                    "UPDATE imports SET lease_expires_at = ?3 \
                     WHERE id = ?1 AND state IN ('pending', 'processing') AND lease_owner = ?2",
                    &r.imports,
                    &mut report.imports,
                ),
                (
                    "UPDATE upload_slots SET lease_expires_at = ?3 WHERE id = ?1 AND owner = ?2",
                    &r.slots,
                    &mut report.slots,
                ),
            ] {
                let mut stmt = tx.prepare_cached(sql).map_err(backend)?;
                for id in ids {
                    *count += stmt
                        .execute(params![id, r.owner, r.lease_until.0])
                        .map_err(backend)? as u64;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(report)
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
        // substr/length count characters; `=` is exact (LIKE would be
        // case-insensitive here and need escaping).
        let (prefix, current) = (prefix.to_string(), current.to_string());
        let prefix_chars = prefix.chars().count() as i64;
        let total_chars = prefix_chars + nonce_chars as i64;
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let jobs = tx
                .execute(
                    "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5 \
                     WHERE state = 'executing' AND substr(lease_owner, 1, ?2) = ?1 \
                     AND length(lease_owner) = ?3 AND lease_owner <> ?4",
                    params![prefix, prefix_chars, total_chars, current, now.0],
                )
                .map_err(backend)?;
            let imports = tx
                .execute(
                    "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
                     WHERE state IN ('pending', 'processing') AND substr(lease_owner, 1, ?2) = ?1 \
                     AND length(lease_owner) = ?3 AND lease_owner <> ?4",
                    params![prefix, prefix_chars, total_chars, current],
                )
                .map_err(backend)?;
            let slots = tx
                .execute(
                    "DELETE FROM upload_slots WHERE substr(owner, 1, ?2) = ?1 \
                     AND length(owner) = ?3 AND owner <> ?4",
                    params![prefix, prefix_chars, total_chars, current],
                )
                .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(RecoveryReport {
                jobs_released: jobs as u64,
                imports_released: imports as u64,
                slots_released: slots as u64,
            })
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
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut out: BTreeMap<String, u64> = BTreeMap::new();
            {
                let mut stmt = tx
                    .prepare_cached(
                        "UPDATE jobs SET state = 'aborted', error_code = ?3, error_message = ?4, \
                         completed_at = ?5, updated_at = ?5, lease_owner = NULL, lease_expires_at = NULL \
                         WHERE id IN (SELECT id FROM jobs WHERE state IN ('waiting', 'failed') \
                                      AND created_at < ?1 AND updated_at < ?1 ORDER BY id LIMIT ?2) \
                         RETURNING destination_id",
                    )
                    .map_err(backend)?;
                let rows = stmt
                    .query_map(
                        params![
                            created_before.0,
                            limit as i64,
                            ErrorCode::Expired.as_str(),
                            message,
                            now.0
                        ],
                        |r| r.get::<_, String>(0),
                    )
                    .map_err(backend)?;
                for dest in rows {
                    *out.entry(dest.map_err(backend)?).or_default() += 1;
                }
            }
            tx.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }

    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.read(move |conn| {
            let sql = format!("SELECT {JOB_RECORD_COLUMNS} FROM jobs WHERE id = ?1");
            match conn
                .query_row(&sql, params![id], row_to_record)
                .optional()
                .map_err(backend)?
            {
                None => Ok(None),
                Some(r) => r.map(Some),
            }
        })
        .await
    }

    async fn get_import(&self, id: ImportId) -> Result<Option<ImportRecord>, StoreError> {
        self.read(move |conn| {
            let sql = format!("SELECT {IMPORT_COLUMNS} FROM imports WHERE id = ?1");
            match conn
                .query_row(&sql, params![id], row_to_import)
                .optional()
                .map_err(backend)?
            {
                None => Ok(None),
                Some(r) => r.map(Some),
            }
        })
        .await
    }

    async fn destination_counts(&self) -> Result<BTreeMap<String, DestinationCounts>, StoreError> {
        self.read(move |conn| {
            let mut out: BTreeMap<String, DestinationCounts> = BTreeMap::new();
            let mut stmt = conn
                .prepare_cached("SELECT destination_id, state, COUNT(*) FROM jobs GROUP BY destination_id, state")
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
                .map_err(backend)?;
            for row in rows {
                let (dest, state, n) = row.map_err(backend)?;
                let state = state.parse::<JobState>().map_err(StoreError::Data)?;
                let entry = out.entry(dest).or_insert_with(empty_counts);
                entry.by_state.insert(state, n as u64);
            }
            let mut stmt = conn
                .prepare_cached(
                    "SELECT destination_id, COUNT(*) FROM imports WHERE state IN ('pending', 'processing') GROUP BY destination_id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                .map_err(backend)?;
            for row in rows {
                let (dest, n) = row.map_err(backend)?;
                out.entry(dest).or_insert_with(empty_counts).imports_in_flight = n as u64;
            }
            Ok(out)
        })
        .await
    }

    async fn retry_job(&self, id: JobId, now: Timestamp) -> Result<RetryResult, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let n = tx
                .execute(
                    &format!("{REDRIVE_SET} WHERE id = ?2 AND state IN ('aborted', 'failed')"),
                    params![now.0, id],
                )
                .map_err(backend)?;
            let result = if n == 1 {
                RetryResult::Retried
            } else {
                let state: Option<String> = tx
                    .query_row("SELECT state FROM jobs WHERE id = ?1", params![id], |r| {
                        r.get(0)
                    })
                    .optional()
                    .map_err(backend)?;
                match state {
                    None => RetryResult::NotFound,
                    Some(s) => RetryResult::Conflict(s.parse().map_err(StoreError::Data)?),
                }
            };
            tx.commit().map_err(backend)?;
            Ok(result)
        })
        .await
    }

    async fn redrive(
        &self,
        destination_id: &str,
        states: &[JobState],
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let dest = destination_id.to_string();
        let states: Vec<&'static str> = states
            .iter()
            .filter(|s| matches!(s, JobState::Aborted | JobState::Failed))
            .map(|s| s.as_str())
            .collect();
        if states.is_empty() {
            return Ok(0);
        }
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let mut total = 0u64;
            for state in states {
                total += tx
                    .execute(
                        &format!("{REDRIVE_SET} WHERE destination_id = ?2 AND state = ?3"),
                        params![now.0, dest, state],
                    )
                    .map_err(backend)? as u64;
            }
            tx.commit().map_err(backend)?;
            Ok(total)
        })
        .await
    }

    async fn sweep_terminal(&self, before: Timestamp, limit: usize) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let tx = immediate(conn)?;
            let jobs = tx
                .execute(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE completed_at IS NOT NULL \
                     AND completed_at < ?1 AND state IN ('succeeded', 'aborted') LIMIT ?2)",
                    params![before.0, limit as i64],
                )
                .map_err(backend)?;
            tx.execute(
                "DELETE FROM imports WHERE id IN (SELECT id FROM imports i WHERE completed_at IS NOT NULL \
                 AND completed_at < ?1 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.import_id = i.id AND j.state = 'importing') \
                 LIMIT ?2)",
                params![before.0, limit as i64],
            )
            .map_err(backend)?;
            tx.commit().map_err(backend)?;
            Ok(jobs as u64)
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.read(|conn| {
            conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                .map(|_| ())
                .map_err(backend)
        })
        .await
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        // Rewrites the schema version with its own value: a real committed
        // write (page 1 goes to the WAL) that changes nothing.
        self.write(|conn| {
            let tx = immediate(conn)?;
            let version: i64 = tx
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(backend)?;
            tx.execute_batch(&format!("PRAGMA user_version = {version}"))
                .map_err(backend)?;
            tx.commit().map_err(backend)
        })
        .await
    }
}

const REDRIVE_SET: &str = "UPDATE jobs SET state = 'waiting', retry_base = attempts, first_attempt_at = NULL, \
     next_attempt_at = 0, error_code = NULL, error_message = NULL, note = NULL, completed_at = NULL, \
     lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1";

fn empty_counts() -> DestinationCounts {
    DestinationCounts {
        by_state: JobState::ALL.into_iter().map(|s| (s, 0)).collect(),
        imports_in_flight: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_open_of_the_same_file_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        let first = SqliteStore::open(&path).await.unwrap();
        let err = SqliteStore::open(&path).await.unwrap_err().to_string();
        assert!(err.contains("in use by another batchrouterd"), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(first);
        SqliteStore::open(&path)
            .await
            .expect("lock released on drop");
    }

    #[tokio::test]
    async fn claim_uses_the_due_index_in_id_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("jobs.db")).await.unwrap();
        let plan: Vec<String> = store
            .read(|conn| {
                let mut stmt = conn
                    .prepare(
                        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE destination_id = 'd' \
                         AND state IN ('waiting', 'failed') AND next_attempt_at <= 5 ORDER BY next_attempt_at, id LIMIT 10",
                    )
                    .map_err(backend)?;
                let rows = stmt.query_map([], |r| r.get::<_, String>(3)).map_err(backend)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(backend)
            })
            .await
            .unwrap();
        let plan = plan.join(" | ");
        assert!(plan.contains("jobs_due"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "claim must not sort: {plan}");
    }

    #[tokio::test]
    async fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch("PRAGMA user_version = 999").unwrap();
        }
        let err = SqliteStore::open(&path).await.unwrap_err().to_string();
        assert!(err.contains("newer than this batchrouterd"), "{err}");
    }
}
