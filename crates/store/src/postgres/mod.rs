//! The PostgreSQL job store: one database shared by many daemons.
//!
//! Daemons never block each other on claims (`FOR UPDATE SKIP LOCKED`),
//! every write to a claimed job or a polled import is fenced on the lease
//! owner and the expected state, and leases of a daemon that stops renewing
//! are taken back only after they expire (never at another daemon's start).
//! Upload slots are counted under a per-destination row lock, so
//! `maxConcurrentImports` holds across the whole cluster. Bulk writes bind
//! arrays, so claiming or committing 10,000 jobs is a handful of statements.
//!
//! Connections come from a bounded pool with an acquire timeout, a
//! server-side `statement_timeout` and `idle_in_transaction_session_timeout`;
//! a transaction that loses a deadlock or serialization race is retried a
//! few times before the error is reported. Passwords never appear in errors
//! or logs.

mod rows;
mod schema;
mod sql;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use batchrouter_core::store::{
    AttemptInfo, CommitReport, DestinationCounts, ImportFinish, ImportRecord, Inserted, JobRecord,
    JobTransition, LeaseRenewal, PollUpdate, RecoveryReport, RenewReport, RetryResult, SlotId,
    UploadCommit,
};
use batchrouter_core::{
    ErrorCode, ImportId, Job, JobId, JobState, JobStore, NewJob, StoreError, Timestamp,
};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Row};

use self::rows::TransitionArrays;

pub use schema::{MIGRATIONS, MIGRATION_LOCK_KEY, VERSION_TABLE};

/// Tuning for [`PostgresStore::open_with`].
#[derive(Clone, Debug)]
pub struct PostgresOptions {
    /// Pool size: concurrent statements this daemon may run.
    pub max_connections: u32,
    /// Longest wait for a connection (including connecting) before a call fails.
    pub acquire_timeout: Duration,
    /// Server-side cap on one statement, so a stuck query cannot hold locks forever.
    pub statement_timeout: Duration,
    /// Shown in `pg_stat_activity`, so operators can tell daemons apart.
    pub application_name: String,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(10),
            statement_timeout: Duration::from_secs(60),
            application_name: "batchrouterd".into(),
        }
    }
}

/// The shared job store.
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    secrets: Arc<Secrets>,
}

/// What must never leak into an error message or a log line.
struct Secrets {
    redacted_url: String,
    /// The password as written in the URL (user info or `?password=`).
    passwords: Vec<String>,
}

impl Secrets {
    fn new(url: &str) -> Self {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let in_userinfo = base
            .split_once("://")
            .and_then(|(_, rest)| rest.split('/').next())
            .and_then(|auth| auth.rsplit_once('@'))
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .map(|(_, pw)| pw.to_string());
        let in_query = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .filter(|(k, _)| k.eq_ignore_ascii_case("password"))
            .map(|(_, v)| v.to_string());
        let mut passwords = Vec::new();
        for pw in in_userinfo
            .into_iter()
            .chain(in_query)
            .filter(|pw| !pw.is_empty())
        {
            // Messages may quote it as written or percent-decoded.
            let decoded = percent_decode(&pw);
            if decoded != pw && !decoded.is_empty() {
                passwords.push(decoded);
            }
            passwords.push(pw);
        }
        Secrets {
            redacted_url: crate::redact_url(url),
            passwords,
        }
    }

    fn scrub(&self, text: String) -> String {
        self.passwords
            .iter()
            .fold(text, |text, pw| text.replace(pw.as_str(), "***"))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("url", &self.secrets.redacted_url)
            .field("connections", &self.pool.size())
            .finish()
    }
}

/// SQLSTATEs of a transaction that lost a race and may simply run again.
fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("40001") | Some("40P01")))
}

/// Attempts of one operation when it loses a deadlock or serialization race.
const CONFLICT_ATTEMPTS: u32 = 4;

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

impl PostgresStore {
    /// Connects with default options and migrates.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, PostgresOptions::default()).await
    }

    /// Connects, applies pending migrations under the advisory lock, and
    /// sets up the pool (which connects lazily from then on).
    pub async fn open_with(url: &str, opts: PostgresOptions) -> Result<Self, StoreError> {
        let secrets = Arc::new(Secrets::new(url));
        let base = PgConnectOptions::from_str(url)
            .map_err(|e| {
                StoreError::Invalid(secrets.scrub(format!(
                    "store URL {} is not valid: {e}",
                    secrets.redacted_url
                )))
            })?
            .application_name(&opts.application_name)
            .disable_statement_logging();
        let migrate_opts = base.clone().options([("statement_timeout", "0")]);
        let connect = PgConnection::connect_with(&migrate_opts);
        let mut conn = match tokio::time::timeout(opts.acquire_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(StoreError::Unavailable(secrets.scrub(format!(
                    "cannot connect to PostgreSQL at {}: {e}",
                    secrets.redacted_url
                ))))
            }
            Err(_) => {
                return Err(StoreError::Unavailable(format!(
                    "cannot connect to PostgreSQL at {}: no answer within {:?}",
                    secrets.redacted_url, opts.acquire_timeout
                )))
            }
        };
        let migrated = schema::migrate(&mut conn).await;
        let _ = conn.close().await;
        let applied = migrated.map_err(|e| match e {
            StoreError::Backend(m) => StoreError::Backend(secrets.scrub(m)),
            other => other,
        })?;
        let pool_opts = base.options([
            ("statement_timeout", millis(opts.statement_timeout)),
            (
                "idle_in_transaction_session_timeout",
                millis(opts.statement_timeout),
            ),
        ]);
        let pool = PgPoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .acquire_timeout(opts.acquire_timeout)
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(pool_opts);
        tracing::info!(
            url = %secrets.redacted_url,
            migrations_applied = applied,
            max_connections = opts.max_connections,
            "Opened PostgreSQL job store."
        );
        Ok(PostgresStore { pool, secrets })
    }

    /// The connection pool, for diagnostics and tests (e.g. `EXPLAIN`).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection (waits for statements in progress).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn error(&self, op: &'static str, e: sqlx::Error) -> StoreError {
        let text = match &e {
            sqlx::Error::Database(d) => match d.code() {
                Some(code) => format!("{op}: {} (SQLSTATE {code})", d.message()),
                None => format!("{op}: {}", d.message()),
            },
            other => format!("{op}: {other}"),
        };
        let text = self.secrets.scrub(text);
        match e {
            sqlx::Error::Decode(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::ColumnNotFound(_) => StoreError::Data(text),
            _ => StoreError::Backend(text),
        }
    }

    /// Runs `f`, again when it loses a deadlock or serialization race (the
    /// transaction was rolled back whole, so running it again is safe).
    async fn run<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, sqlx::Error>>,
    {
        let mut attempt = 1;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < CONFLICT_ATTEMPTS && is_conflict(&e) => {
                    let jitter = u64::from(
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.subsec_nanos())
                            .unwrap_or(0)
                            % 10,
                    );
                    let wait = Duration::from_millis(5 * u64::from(attempt) + jitter);
                    tracing::debug!(op, attempt, error = %self.error(op, e), "Store transaction lost a race; running it again.");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(self.error(op, e)),
            }
        }
    }

    async fn insert_once(
        &self,
        jobs: &[NewJob],
        now: Timestamp,
    ) -> Result<Vec<Inserted>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut ids: Vec<i64> = sqlx::query_scalar(sql::NEXT_JOB_IDS)
            .bind(jobs.len() as i64)
            .fetch_all(&mut *tx)
            .await?;
        ids.sort_unstable();
        let dests: Vec<&str> = jobs.iter().map(|j| j.destination_id.as_str()).collect();
        let payloads: Vec<&str> = jobs.iter().map(|j| j.payload.as_str()).collect();
        let mids: Vec<Option<&str>> = jobs.iter().map(|j| j.message_id.as_deref()).collect();
        let inserted: HashSet<i64> = sqlx::query_scalar(sql::INSERT_JOBS)
            .bind(&ids)
            .bind(&dests)
            .bind(&payloads)
            .bind(&mids)
            .bind(now.0)
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
        let mut existing: HashMap<i64, i64> = HashMap::new();
        if inserted.len() < jobs.len() {
            let skipped: Vec<usize> = (0..jobs.len())
                .filter(|&i| !inserted.contains(&ids[i]))
                .collect();
            let wanted: Vec<i64> = skipped.iter().map(|&i| ids[i]).collect();
            let d: Vec<&str> = skipped.iter().map(|&i| dests[i]).collect();
            let m: Vec<Option<&str>> = skipped.iter().map(|&i| mids[i]).collect();
            for r in sqlx::query(sql::EXISTING_BY_MESSAGE_ID)
                .bind(&wanted)
                .bind(&d)
                .bind(&m)
                .fetch_all(&mut *tx)
                .await?
            {
                existing.insert(r.try_get(0)?, r.try_get(1)?);
            }
        }
        let mut out = Vec::with_capacity(jobs.len());
        for id in &ids {
            if inserted.contains(id) {
                out.push(Inserted {
                    job_id: *id,
                    duplicate: false,
                });
            } else {
                let job_id = *existing.get(id).ok_or_else(|| {
                    sqlx::Error::Protocol(format!(
                        "insert of job {id} was skipped but no job holds its message id"
                    ))
                })?;
                out.push(Inserted {
                    job_id,
                    duplicate: true,
                });
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn transition_once(
        &self,
        owner: &str,
        arrays: &TransitionArrays,
        now: Timestamp,
    ) -> Result<CommitReport, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let written = apply_transitions(&mut conn, Fence::Executing(owner), arrays, now).await?;
        Ok(report_of(arrays, &written, CommitReport::default()))
    }

    async fn commit_once(
        &self,
        c: &UploadCommit,
        contexts: &[String],
    ) -> Result<CommitReport, sqlx::Error> {
        let now = c.now;
        let attempted: HashSet<JobId> = c.attempted.iter().copied().collect();
        let mut report = CommitReport::default();
        let mut tx = self.pool.begin().await?;

        // Attempted jobs that neither transition nor import still count.
        let covered: HashSet<JobId> = c
            .transitions
            .iter()
            .map(|t| t.job_id)
            .chain(c.imports.iter().flat_map(|i| i.job_ids.iter().copied()))
            .collect();
        let count_only: Vec<i64> = attempted
            .iter()
            .copied()
            .filter(|id| !covered.contains(id))
            .collect();
        if !count_only.is_empty() {
            sqlx::query(sql::COUNT_ATTEMPT_ONLY)
                .bind(&count_only)
                .bind(&c.owner)
                .bind(now.0)
                .execute(&mut *tx)
                .await?;
        }

        if !c.imports.is_empty() {
            let batch_ids: Vec<&str> = c.imports.iter().map(|i| i.batch_id.as_str()).collect();
            let counts: Vec<i64> = c.imports.iter().map(|i| i.job_ids.len() as i64).collect();
            let next_polls: Vec<i64> = c.imports.iter().map(|i| i.next_poll_at.0).collect();
            let deadlines: Vec<i64> = c.imports.iter().map(|i| i.deadline_at.0).collect();
            let mut import_ids: Vec<i64> = sqlx::query_scalar(sql::INSERT_IMPORTS)
                .bind(&c.destination_id)
                .bind(&c.owner)
                .bind(c.import_lease_until.0)
                .bind(now.0)
                .bind(&batch_ids)
                .bind(contexts)
                .bind(&counts)
                .bind(&next_polls)
                .bind(&deadlines)
                .fetch_all(&mut *tx)
                .await?;
            import_ids.sort_unstable();
            if import_ids.len() != c.imports.len() {
                return Err(sqlx::Error::Protocol(format!(
                    "created {} imports for {} requested",
                    import_ids.len(),
                    c.imports.len()
                )));
            }
            // One entry per job: a job named twice is rejected the second time.
            let mut seen = HashSet::new();
            let (mut ids, mut owners, mut flags, mut repeated) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (imp, import_id) in c.imports.iter().zip(&import_ids) {
                for id in &imp.job_ids {
                    if seen.insert(*id) {
                        ids.push(*id);
                        owners.push(*import_id);
                        flags.push(i32::from(attempted.contains(id)));
                    } else {
                        repeated.push(*id);
                    }
                }
            }
            let moved: HashSet<i64> = sqlx::query_scalar(sql::MOVE_TO_IMPORTING)
                .bind(&ids)
                .bind(&c.owner)
                .bind(now.0)
                .bind(&owners)
                .bind(&flags)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let mut fix_ids = Vec::new();
            let mut fix_counts = Vec::new();
            let mut seen = HashSet::new();
            for (imp, import_id) in c.imports.iter().zip(&import_ids) {
                let mut n = 0i64;
                for id in &imp.job_ids {
                    if seen.insert(*id) && moved.contains(id) {
                        report.applied += 1;
                        n += 1;
                    } else {
                        report.rejected.push(*id);
                    }
                }
                if n != imp.job_ids.len() as i64 {
                    fix_ids.push(*import_id);
                    fix_counts.push(n);
                }
            }
            debug_assert!(repeated.iter().all(|id| report.rejected.contains(id)));
            if !fix_ids.is_empty() {
                sqlx::query(sql::FIX_IMPORT_COUNTS)
                    .bind(&fix_ids)
                    .bind(&fix_counts)
                    .execute(&mut *tx)
                    .await?;
            }
            report.import_ids = import_ids;
        }

        let arrays = TransitionArrays::new(&c.transitions, &attempted, now);
        let written = apply_transitions(&mut tx, Fence::Executing(&c.owner), &arrays, now).await?;
        report = report_of(&arrays, &written, report);

        if let Some(slot) = c.slot {
            sqlx::query(sql::RELEASE_SLOT)
                .bind(slot)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(report)
    }

    async fn finish_once(
        &self,
        f: &ImportFinish,
        arrays: &TransitionArrays,
    ) -> Result<CommitReport, sqlx::Error> {
        let (s, fl, a) = f.outcome_counts();
        let (code, message) = match &f.error {
            Some(e) => (Some(e.code.as_str()), Some(rows::storable(&e.message))),
            None => (None, None),
        };
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(sql::FINISH_IMPORT)
            .bind(f.import_id)
            .bind(&f.owner)
            .bind(f.state.as_str())
            .bind(s)
            .bind(fl)
            .bind(a)
            .bind(code)
            .bind(message)
            .bind(f.now.0)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n != 1 {
            // Lease lost: another daemon owns this import now.
            tx.rollback().await?;
            return Ok(CommitReport {
                rejected: f.transitions.iter().map(|t| t.job_id).collect(),
                ..CommitReport::default()
            });
        }
        let written =
            apply_transitions(&mut tx, Fence::Importing(f.import_id), arrays, f.now).await?;
        tx.commit().await?;
        Ok(report_of(arrays, &written, CommitReport::default()))
    }

    async fn slot_once(
        &self,
        destination_id: &str,
        owner: &str,
        max: u32,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Option<SlotId>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(sql::ENSURE_DESTINATION)
            .bind(destination_id)
            .bind(now.0)
            .execute(&mut *tx)
            .await?;
        sqlx::query(sql::LOCK_DESTINATION)
            .bind(destination_id)
            .execute(&mut *tx)
            .await?;
        let slot: Option<i64> = sqlx::query_scalar(sql::TAKE_SLOT)
            .bind(destination_id)
            .bind(now.0)
            .bind(owner)
            .bind(lease_until.0)
            .bind(i64::from(max))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(slot)
    }

    async fn reclaim(&self, now: Timestamp) -> Result<RecoveryReport, sqlx::Error> {
        // Three short statements rather than one transaction: each is atomic
        // on its own and holds its locks no longer than it runs.
        let jobs = sqlx::query(sql::RECLAIM_JOBS)
            .bind(now.0)
            .execute(&self.pool)
            .await?;
        let imports = sqlx::query(sql::RECLAIM_IMPORTS)
            .bind(now.0)
            .execute(&self.pool)
            .await?;
        let slots = sqlx::query(sql::RECLAIM_SLOTS)
            .bind(now.0)
            .execute(&self.pool)
            .await?;
        Ok(RecoveryReport {
            jobs_released: jobs.rows_affected(),
            imports_released: imports.rows_affected(),
            slots_released: slots.rows_affected(),
        })
    }
}

/// Which jobs a transition may touch: those still held in the expected state.
#[derive(Clone, Copy)]
enum Fence<'a> {
    /// Claimed by this lease owner.
    Executing(&'a str),
    /// Importing under this import.
    Importing(ImportId),
}

/// Writes a bulk fenced transition; answers the ids actually written.
async fn apply_transitions(
    conn: &mut PgConnection,
    fence: Fence<'_>,
    a: &TransitionArrays,
    now: Timestamp,
) -> Result<HashSet<i64>, sqlx::Error> {
    if a.is_empty() {
        return Ok(HashSet::new());
    }
    let q = match fence {
        Fence::Executing(owner) => {
            sqlx::query_scalar(sql::TRANSITION_EXECUTING).bind(owner.to_string())
        }
        Fence::Importing(import_id) => {
            sqlx::query_scalar(sql::TRANSITION_IMPORTING).bind(import_id)
        }
    };
    let written: Vec<i64> = q
        .bind(now.0)
        .bind(&a.ids)
        .bind(&a.states)
        .bind(&a.codes)
        .bind(&a.messages)
        .bind(&a.notes)
        .bind(&a.external_ids)
        .bind(&a.next_attempt_at)
        .bind(&a.completed_at)
        .bind(&a.attempted)
        .fetch_all(&mut *conn)
        .await?;
    Ok(written.into_iter().collect())
}

/// Adds a bulk transition's result to `report`, in the order given.
fn report_of(
    a: &TransitionArrays,
    written: &HashSet<i64>,
    mut report: CommitReport,
) -> CommitReport {
    for id in &a.ids {
        if written.contains(id) {
            report.applied += 1;
        } else {
            report.rejected.push(*id);
        }
    }
    report.rejected.extend(a.repeated.iter().copied());
    report
}

fn empty_counts() -> DestinationCounts {
    DestinationCounts {
        by_state: JobState::ALL.into_iter().map(|s| (s, 0)).collect(),
        imports_in_flight: 0,
    }
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl JobStore for PostgresStore {
    async fn insert_jobs(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError> {
        crate::validate_new_jobs(&jobs)?;
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.run("insert_jobs", || self.insert_once(&jobs, now))
            .await
    }

    async fn claim_jobs(
        &self,
        destination_id: &str,
        owner: &str,
        limit_n: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Vec<Job>, StoreError> {
        if limit_n == 0 {
            return Ok(Vec::new());
        }
        let mut jobs = self
            .run("claim_jobs", || async {
                let rows = sqlx::query(sql::CLAIM_JOBS)
                    .bind(destination_id)
                    .bind(now.0)
                    .bind(limit(limit_n))
                    .bind(owner)
                    .bind(lease_until.0)
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| rows::job(destination_id, r))
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        jobs.sort_unstable_by_key(|j| j.id);
        Ok(jobs)
    }

    async fn extend_job_leases(
        &self,
        owner: &str,
        job_ids: &[JobId],
        lease_until: Timestamp,
    ) -> Result<usize, StoreError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        self.run("extend_job_leases", || async {
            let r = sqlx::query(sql::EXTEND_JOB_LEASES)
                .bind(job_ids)
                .bind(owner)
                .bind(lease_until.0)
                .execute(&self.pool)
                .await?;
            Ok(r.rows_affected() as usize)
        })
        .await
    }

    async fn release_jobs(
        &self,
        owner: &str,
        job_ids: &[JobId],
        now: Timestamp,
    ) -> Result<usize, StoreError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        self.run("release_jobs", || async {
            let r = sqlx::query(sql::RELEASE_JOBS)
                .bind(job_ids)
                .bind(owner)
                .bind(now.0)
                .execute(&self.pool)
                .await?;
            Ok(r.rows_affected() as usize)
        })
        .await
    }

    async fn transition_executing(
        &self,
        owner: &str,
        transitions: Vec<JobTransition>,
        now: Timestamp,
    ) -> Result<CommitReport, StoreError> {
        let arrays = TransitionArrays::new(&transitions, &HashSet::new(), now);
        self.run("transition_executing", || {
            self.transition_once(owner, &arrays, now)
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
        self.run("acquire_upload_slot", || {
            self.slot_once(destination_id, owner, max, now, lease_until)
        })
        .await
    }

    async fn release_upload_slot(&self, slot: SlotId) -> Result<(), StoreError> {
        self.run("release_upload_slot", || async {
            sqlx::query(sql::RELEASE_SLOT)
                .bind(slot)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }

    async fn commit_upload(&self, commit: UploadCommit) -> Result<CommitReport, StoreError> {
        let contexts = commit
            .imports
            .iter()
            .map(|i| serde_json::to_string(&i.context))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Invalid(format!("import context: {e}")))?;
        self.run("commit_upload", || self.commit_once(&commit, &contexts))
            .await
    }

    async fn claim_due_imports(
        &self,
        destination_id: &str,
        owner: &str,
        limit_n: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Vec<ImportRecord>, StoreError> {
        if limit_n == 0 {
            return Ok(Vec::new());
        }
        let mut out = self
            .run("claim_due_imports", || async {
                let rows = sqlx::query(sql::CLAIM_DUE_IMPORTS)
                    .bind(owner)
                    .bind(lease_until.0)
                    .bind(destination_id)
                    .bind(now.0)
                    .bind(limit(limit_n))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(rows::import).collect::<Result<Vec<_>, _>>()
            })
            .await?;
        out.sort_by_key(|i| (i.next_poll_at, i.id));
        Ok(out)
    }

    async fn importing_jobs(&self, import_id: ImportId) -> Result<Vec<AttemptInfo>, StoreError> {
        self.run("importing_jobs", || async {
            let rows = sqlx::query(sql::IMPORTING_JOBS)
                .bind(import_id)
                .fetch_all(&self.pool)
                .await?;
            rows.iter()
                .map(rows::attempt_info)
                .collect::<Result<Vec<_>, _>>()
        })
        .await
    }

    async fn record_poll(&self, u: PollUpdate) -> Result<bool, StoreError> {
        let (code, message) = match &u.poll_error {
            Some(e) => (Some(e.code.as_str()), Some(rows::storable(&e.message))),
            None => (None, None),
        };
        self.run("record_poll", || async {
            let r = sqlx::query(sql::RECORD_POLL)
                .bind(u.import_id)
                .bind(&u.owner)
                .bind(u.state.as_str())
                .bind(u.progress.map(i32::from))
                .bind(i32::from(u.poll_error.is_some()))
                .bind(code)
                .bind(message.as_deref())
                .bind(u.next_poll_at.0)
                .bind(u.lease_until.0)
                .bind(u.now.0)
                .execute(&self.pool)
                .await?;
            Ok(r.rows_affected() == 1)
        })
        .await
    }

    async fn finish_import(&self, f: ImportFinish) -> Result<CommitReport, StoreError> {
        let arrays = TransitionArrays::new(&f.transitions, &HashSet::new(), f.now);
        self.run("finish_import", || self.finish_once(&f, &arrays))
            .await
    }

    async fn next_poll_due(&self, destination_id: &str) -> Result<Option<Timestamp>, StoreError> {
        self.run("next_poll_due", || async {
            let v: Option<i64> = sqlx::query_scalar(sql::NEXT_POLL_DUE)
                .bind(destination_id)
                .fetch_one(&self.pool)
                .await?;
            Ok(v.map(Timestamp))
        })
        .await
    }

    async fn recover(&self, now: Timestamp) -> Result<RecoveryReport, StoreError> {
        // A shared store: other daemons' live leases are theirs. Only work
        // whose lease ran out (its holder died) is taken back.
        self.run("recover", || self.reclaim(now)).await
    }

    async fn reclaim_expired(&self, now: Timestamp) -> Result<RecoveryReport, StoreError> {
        self.run("reclaim_expired", || self.reclaim(now)).await
    }

    async fn renew_leases(&self, r: LeaseRenewal) -> Result<RenewReport, StoreError> {
        if r.jobs.is_empty() && r.imports.is_empty() && r.slots.is_empty() {
            return Ok(RenewReport::default());
        }
        self.run("renew_leases", || async {
            let row = sqlx::query(sql::RENEW_LEASES)
                .bind(&r.owner)
                .bind(&r.jobs)
                .bind(&r.imports)
                .bind(&r.slots)
                .bind(r.lease_until.0)
                .fetch_one(&self.pool)
                .await?;
            Ok(RenewReport {
                jobs: row.try_get::<i64, _>(0)? as u64,
                imports: row.try_get::<i64, _>(1)? as u64,
                slots: row.try_get::<i64, _>(2)? as u64,
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
        let mut pattern = String::with_capacity(prefix.len() + nonce_chars + 8);
        for c in prefix.chars() {
            if matches!(c, '\\' | '%' | '_') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.extend(std::iter::repeat_n('_', nonce_chars));
        self.run("release_earlier_runs", || async {
            let row = sqlx::query(sql::RELEASE_EARLIER_RUNS)
                .bind(pattern.as_str())
                .bind(now.0)
                .bind(current)
                .fetch_one(&self.pool)
                .await?;
            Ok(RecoveryReport {
                jobs_released: row.try_get::<i64, _>(0)? as u64,
                imports_released: row.try_get::<i64, _>(1)? as u64,
                slots_released: row.try_get::<i64, _>(2)? as u64,
            })
        })
        .await
    }

    async fn expire_jobs(
        &self,
        created_before: Timestamp,
        message: &str,
        now: Timestamp,
        limit_n: usize,
    ) -> Result<BTreeMap<String, u64>, StoreError> {
        if limit_n == 0 {
            return Ok(BTreeMap::new());
        }
        let message = rows::storable(message);
        self.run("expire_jobs", || async {
            let mut out = BTreeMap::new();
            for r in sqlx::query(sql::EXPIRE_JOBS)
                .bind(created_before.0)
                .bind(limit(limit_n))
                .bind(ErrorCode::Expired.as_str())
                .bind(message.as_str())
                .bind(now.0)
                .fetch_all(&self.pool)
                .await?
            {
                out.insert(r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)? as u64);
            }
            Ok(out)
        })
        .await
    }

    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.run("get_job", || async {
            match sqlx::query(sql::GET_JOB)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
            {
                Some(r) => rows::job_record(&r).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn get_import(&self, id: ImportId) -> Result<Option<ImportRecord>, StoreError> {
        self.run("get_import", || async {
            match sqlx::query(sql::GET_IMPORT)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
            {
                Some(r) => rows::import(&r).map(Some),
                None => Ok(None),
            }
        })
        .await
    }

    async fn destination_counts(&self) -> Result<BTreeMap<String, DestinationCounts>, StoreError> {
        self.run("destination_counts", || async {
            let mut out: BTreeMap<String, DestinationCounts> = BTreeMap::new();
            for r in sqlx::query(sql::COUNT_JOBS).fetch_all(&self.pool).await? {
                let dest: String = r.try_get(0)?;
                let state: JobState = r
                    .try_get::<String, _>(1)?
                    .parse()
                    .map_err(|e: String| sqlx::Error::Decode(e.into()))?;
                let n: i64 = r.try_get(2)?;
                out.entry(dest)
                    .or_insert_with(empty_counts)
                    .by_state
                    .insert(state, n as u64);
            }
            for r in sqlx::query(sql::COUNT_IMPORTS)
                .fetch_all(&self.pool)
                .await?
            {
                let dest: String = r.try_get(0)?;
                let n: i64 = r.try_get(1)?;
                out.entry(dest)
                    .or_insert_with(empty_counts)
                    .imports_in_flight = n as u64;
            }
            Ok(out)
        })
        .await
    }

    async fn retry_job(&self, id: JobId, now: Timestamp) -> Result<RetryResult, StoreError> {
        self.run("retry_job", || async {
            let r = sqlx::query(sql::RETRY_JOB)
                .bind(now.0)
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
            let changed: i64 = r.try_get(0)?;
            let state: Option<String> = r.try_get(1)?;
            Ok(match (changed, state) {
                (1, _) => RetryResult::Retried,
                (_, None) => RetryResult::NotFound,
                (_, Some(s)) => RetryResult::Conflict(
                    s.parse()
                        .map_err(|e: String| sqlx::Error::Decode(e.into()))?,
                ),
            })
        })
        .await
    }

    async fn redrive(
        &self,
        destination_id: &str,
        states: &[JobState],
        now: Timestamp,
    ) -> Result<u64, StoreError> {
        let states: Vec<String> = states
            .iter()
            .filter(|s| matches!(s, JobState::Aborted | JobState::Failed))
            .map(|s| s.as_str().to_string())
            .collect();
        if states.is_empty() {
            return Ok(0);
        }
        self.run("redrive", || async {
            let r = sqlx::query(sql::REDRIVE)
                .bind(now.0)
                .bind(destination_id)
                .bind(&states)
                .execute(&self.pool)
                .await?;
            Ok(r.rows_affected())
        })
        .await
    }

    async fn sweep_terminal(&self, before: Timestamp, limit_n: usize) -> Result<u64, StoreError> {
        self.run("sweep_terminal", || async {
            let jobs = sqlx::query(sql::SWEEP_JOBS)
                .bind(before.0)
                .bind(limit(limit_n))
                .execute(&self.pool)
                .await?;
            sqlx::query(sql::SWEEP_IMPORTS)
                .bind(before.0)
                .bind(limit(limit_n))
                .execute(&self.pool)
                .await?;
            Ok(jobs.rows_affected())
        })
        .await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.run("ping", || async {
            sqlx::query(sql::PING).execute(&self.pool).await?;
            Ok(())
        })
        .await
    }

    async fn probe_write(&self) -> Result<(), StoreError> {
        // Assigning a transaction id is a write: it fails on a hot standby,
        // and its commit record goes through the WAL.
        self.run("probe_write", || async {
            sqlx::query("SELECT txid_current()")
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests;
