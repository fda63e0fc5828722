//! The PostgreSQL store's statements run as one unit of work each (a
//! transaction or a few short statements): inserts with duplicate
//! detection, fenced transitions, an upload's commit, an import's finish,
//! and lease take-back. They
//! answer `sqlx` errors; `mod.rs` runs them again when they lose a race and
//! turns their errors into [`StoreError`]s with the secrets scrubbed.

use std::collections::{HashMap, HashSet};

use batchrouter_core::store::{CommitReport, ImportFinish, Inserted, RecoveryReport, UploadCommit};
use batchrouter_core::{JobId, NewJob, StoreError, Timestamp};
use sqlx::postgres::PgConnection;
use sqlx::Row;

use super::rows::{self, TransitionArrays};
use super::{sql, PostgresStore};
use crate::common::{attempted_only, error_columns, recovery_report, Fence};

impl PostgresStore {
    pub(super) async fn insert_once(
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

    pub(super) async fn transition_once(
        &self,
        owner: &str,
        arrays: &TransitionArrays,
        now: Timestamp,
    ) -> Result<CommitReport, sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        let written = apply_transitions(&mut conn, Fence::Executing(owner), arrays, now).await?;
        Ok(report_of(arrays, &written, CommitReport::default()))
    }

    pub(super) async fn commit_once(
        &self,
        c: &UploadCommit,
        contexts: &[String],
    ) -> Result<CommitReport, sqlx::Error> {
        let now = c.now;
        let attempted: HashSet<JobId> = c.attempted.iter().copied().collect();
        let mut report = CommitReport::default();
        let mut tx = self.pool.begin().await?;

        // Attempted jobs that neither transition nor import still count.
        let count_only = attempted_only(c, &attempted);
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

    pub(super) async fn finish_once(
        &self,
        f: &ImportFinish,
        arrays: &TransitionArrays,
    ) -> Result<CommitReport, sqlx::Error> {
        let (s, fl, a) = f.outcome_counts();
        let (code, message) = error_columns(f.error.as_ref());
        let message = message.map(rows::storable);
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

    /// Runs `sql` on the jobs `ids` still held by `owner` (`$1` ids, `$2`
    /// owner, `$3` time); answers how many it changed.
    pub(super) async fn owned_update(
        &self,
        op: &'static str,
        sql: &'static str,
        ids: &[JobId],
        owner: &str,
        at: Timestamp,
    ) -> Result<usize, StoreError> {
        self.run(op, || async {
            let r = sqlx::query(sql)
                .bind(ids)
                .bind(owner)
                .bind(at.0)
                .execute(&self.pool)
                .await?;
            Ok(r.rows_affected() as usize)
        })
        .await
    }

    pub(super) async fn reclaim(&self, now: Timestamp) -> Result<RecoveryReport, sqlx::Error> {
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
        Ok(recovery_report(
            jobs.rows_affected(),
            imports.rows_affected(),
            slots.rows_affected(),
        ))
    }
}

/// Writes a bulk fenced transition; answers the ids actually written.
pub(super) async fn apply_transitions(
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
pub(super) fn report_of(
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
