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
//!
//! This file is the async shell: options, the pool, retries of lost races,
//! error mapping and the [`JobStore`] methods. The statements live in
//! `sql.rs`, row decoding and bound arrays in `rows.rs`, multi-statement
//! units of work in `writes.rs`, migrations in `schema.rs`, URL secrets in
//! `secrets.rs`; what both backends decide alike is in `crate::common`.

mod rows;
mod schema;
mod secrets;
mod sql;
mod writes;

use std::collections::{BTreeMap, HashSet};
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
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Row};

use self::rows::TransitionArrays;
#[cfg(test)]
use self::secrets::percent_decode;
use self::secrets::Secrets;
use crate::common::{
    empty_counts, error_columns, recovery_report, redrivable, validate_new_jobs, Claim,
};

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
}

impl PostgresStore {
    /// Runs a claim statement (`$1` owner, `$2` lease expiry, `$3`
    /// destination, `$4` now, `$5` limit) and decodes its rows; with a limit
    /// of 0 it claims nothing without asking the server.
    async fn claim_rows<T>(
        &self,
        op: &'static str,
        statement: &'static str,
        c: &Claim,
        decode: impl Fn(&PgRow) -> Result<T, sqlx::Error>,
    ) -> Result<Vec<T>, StoreError> {
        if c.limit == 0 {
            return Ok(Vec::new());
        }
        let decode = &decode;
        self.run(op, move || async move {
            sqlx::query(statement)
                .bind(c.owner.as_str())
                .bind(c.lease_until.0)
                .bind(c.dest.as_str())
                .bind(c.now.0)
                .bind(limit(c.limit))
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(decode)
                .collect()
        })
        .await
    }

    /// Reads the one row `statement` finds for the id `$1`, if there is one.
    async fn by_id<T>(
        &self,
        op: &'static str,
        statement: &'static str,
        id: i64,
        decode: fn(&PgRow) -> Result<T, sqlx::Error>,
    ) -> Result<Option<T>, StoreError> {
        self.run(op, || async {
            sqlx::query(statement)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| decode(&r))
                .transpose()
        })
        .await
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
        validate_new_jobs(&jobs)?;
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
        let claim = Claim::new(destination_id, owner, limit_n, now, lease_until);
        let mut jobs = self
            .claim_rows("claim_jobs", sql::CLAIM_JOBS, &claim, |r| {
                rows::job(destination_id, r)
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
        self.owned_update(
            "extend_job_leases",
            sql::EXTEND_JOB_LEASES,
            job_ids,
            owner,
            lease_until,
        )
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
        self.owned_update("release_jobs", sql::RELEASE_JOBS, job_ids, owner, now)
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
        // Under the destination's row lock, so the count holds across daemons.
        self.run("acquire_upload_slot", || async {
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
        let claim = Claim::new(destination_id, owner, limit_n, now, lease_until);
        let mut out = self
            .claim_rows(
                "claim_due_imports",
                sql::CLAIM_DUE_IMPORTS,
                &claim,
                rows::import,
            )
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
        let (code, message) = error_columns(u.poll_error.as_ref());
        let message = message.map(rows::storable);
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
            let [jobs, imports, slots] = rows::three_counts(&row)?;
            Ok(RenewReport {
                jobs,
                imports,
                slots,
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
            let [jobs, imports, slots] = rows::three_counts(&row)?;
            Ok(recovery_report(jobs, imports, slots))
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
        self.by_id("get_job", sql::GET_JOB, id, rows::job_record)
            .await
    }

    async fn get_import(&self, id: ImportId) -> Result<Option<ImportRecord>, StoreError> {
        self.by_id("get_import", sql::GET_IMPORT, id, rows::import)
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
        let states = redrivable(states);
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
