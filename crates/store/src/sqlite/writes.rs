//! The SQLite store's write transactions that take more than one
//! statement, as plain blocking functions on an open transaction: inserts
//! with duplicate detection, claims, fenced transitions, an upload's
//! commit, an import's finish, slot accounting, recovery, re-drives and
//! expiry. `mod.rs` runs them in one `IMMEDIATE` transaction on the writer
//! connection, off the async threads, and commits.

use std::collections::{BTreeMap, HashSet};

use batchrouter_core::store::{
    CommitReport, ImportFinish, ImportRecord, Inserted, JobTransition, RecoveryReport, RetryResult,
    SlotId, UploadCommit,
};
use batchrouter_core::{ErrorCode, Job, JobId, NewJob, StoreError, Timestamp};
use rusqlite::{params, OptionalExtension, Row, ToSql, Transaction};

use super::{backend, rows, sql};
use crate::common::{
    attempted_only, error_columns, recovery_report, Claim, Fence, TransitionColumns,
};

/// Runs `sql` once per id with `(id, owner, at)` as `?1`..`?3`; answers how
/// many rows changed (a lease renewal or hand-back fenced on the owner).
pub(super) fn update_each(
    tx: &Transaction<'_>,
    sql: &str,
    ids: &[i64],
    owner: &str,
    at: i64,
) -> Result<usize, StoreError> {
    let mut stmt = tx.prepare_cached(sql).map_err(backend)?;
    let mut n = 0;
    for id in ids {
        n += stmt.execute(params![id, owner, at]).map_err(backend)?;
    }
    Ok(n)
}

/// Runs three statements (jobs, imports, slots), each with its
/// parameters, and reports their counts.
pub(super) fn release_three(
    tx: &Transaction<'_>,
    statements: [&str; 3],
    params: [&[&dyn ToSql]; 3],
) -> Result<RecoveryReport, StoreError> {
    let mut n = [0u64; 3];
    for ((count, sql), params) in n.iter_mut().zip(statements).zip(params) {
        *count = tx.execute(sql, params).map_err(backend)? as u64;
    }
    Ok(recovery_report(n[0], n[1], n[2]))
}

/// Runs a claim statement (`?1` owner, `?2` lease expiry, `?3` now, `?4`
/// destination, `?5` limit) and decodes what it returns.
fn claim_rows<T>(
    tx: &Transaction<'_>,
    sql: &str,
    c: &Claim,
    decode: impl FnMut(&Row<'_>) -> rusqlite::Result<Result<T, StoreError>>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = tx.prepare_cached(sql).map_err(backend)?;
    let p = params![c.owner, c.lease_until.0, c.now.0, c.dest, c.limit as i64];
    let rows = stmt.query_map(p, decode).map_err(backend)?;
    rows.map(|r| r.map_err(backend)?).collect()
}

/// Claims due jobs, in id order.
pub(super) fn claim_jobs(tx: &Transaction<'_>, c: &Claim) -> Result<Vec<Job>, StoreError> {
    let mut jobs = claim_rows(tx, sql::CLAIM_JOBS, c, |r| Ok(Ok(rows::job(&c.dest, r)?)))?;
    jobs.sort_unstable_by_key(|j| j.id);
    Ok(jobs)
}

/// Claims imports due for a poll, soonest first.
pub(super) fn claim_imports(
    tx: &Transaction<'_>,
    c: &Claim,
) -> Result<Vec<ImportRecord>, StoreError> {
    let mut out = claim_rows(tx, sql::CLAIM_DUE_IMPORTS, c, rows::import)?;
    out.sort_by_key(|i| (i.next_poll_at, i.id));
    Ok(out)
}

/// Retries one failed or aborted job; otherwise answers why not.
pub(super) fn retry_job(
    tx: &Transaction<'_>,
    id: JobId,
    now: Timestamp,
) -> Result<RetryResult, StoreError> {
    let n = tx
        .execute(sql::RETRY_JOB, params![now.0, id])
        .map_err(backend)?;
    if n == 1 {
        return Ok(RetryResult::Retried);
    }
    let state: Option<String> = tx
        .query_row(sql::JOB_STATE, params![id], |r| r.get(0))
        .optional()
        .map_err(backend)?;
    Ok(match state {
        None => RetryResult::NotFound,
        Some(s) => RetryResult::Conflict(s.parse().map_err(StoreError::Data)?),
    })
}

/// Re-drives every job of `dest` in the given (re-drivable) states.
pub(super) fn redrive(
    tx: &Transaction<'_>,
    dest: &str,
    states: &[&str],
    now: Timestamp,
) -> Result<u64, StoreError> {
    let mut total = 0u64;
    for state in states {
        total += tx
            .execute(sql::REDRIVE, params![now.0, dest, state])
            .map_err(backend)? as u64;
    }
    Ok(total)
}

/// Inserts jobs in order; a repeated message id answers the job holding it.
pub(super) fn insert_jobs(
    tx: &Transaction<'_>,
    jobs: &[NewJob],
    now: Timestamp,
) -> Result<Vec<Inserted>, StoreError> {
    let mut out = Vec::with_capacity(jobs.len());
    let mut ins = tx.prepare_cached(sql::INSERT_JOB).map_err(backend)?;
    let mut existing = tx
        .prepare_cached(sql::EXISTING_BY_MESSAGE_ID)
        .map_err(backend)?;
    for j in jobs {
        let id: Option<i64> = ins
            .query_row(
                params![j.destination_id, j.payload, j.message_id, now.0],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        let (job_id, duplicate) = match id {
            Some(job_id) => (job_id, false),
            None => {
                let job_id: i64 = existing
                    .query_row(params![j.destination_id, j.message_id], |r| r.get(0))
                    .map_err(backend)?;
                (job_id, true)
            }
        };
        out.push(Inserted { job_id, duplicate });
    }
    Ok(out)
}

/// Writes transitions fenced by `fence`; jobs in `attempted` also count an
/// upload attempt in the same row write (one write per job, not two).
pub(super) fn apply_transitions(
    tx: &Transaction<'_>,
    fence: Fence<'_>,
    transitions: &[JobTransition],
    attempted: &HashSet<JobId>,
    now: i64,
    report: &mut CommitReport,
) -> Result<(), StoreError> {
    let (sql, fence_value): (&str, Box<dyn ToSql>) = match fence {
        Fence::Executing(owner) => (sql::TRANSITION_EXECUTING, Box::new(owner.to_string())),
        Fence::Importing(import_id) => (sql::TRANSITION_IMPORTING, Box::new(import_id)),
    };
    let mut stmt = tx.prepare_cached(sql).map_err(backend)?;
    for t in transitions {
        let w = TransitionColumns::of(&t.to, now);
        let changed = stmt
            .execute(params![
                t.job_id,
                w.state.as_str(),
                w.error.map(|e| e.code.as_str()),
                w.error.map(|e| e.message.as_str()),
                w.note,
                w.external_id,
                w.next_attempt_at,
                w.completed_at,
                fence_value,
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

/// An upload's outcome in one transaction: attempts counted, imports
/// created with their jobs moved under them, transitions written, the
/// slot freed.
pub(super) fn commit_upload(
    tx: &Transaction<'_>,
    commit: &UploadCommit,
) -> Result<CommitReport, StoreError> {
    let now = commit.now.0;
    let mut report = CommitReport::default();
    let attempted: HashSet<JobId> = commit.attempted.iter().copied().collect();
    let count_only = attempted_only(commit, &attempted);
    update_each(tx, sql::COUNT_ATTEMPT_ONLY, &count_only, &commit.owner, now)?;
    let mut create = tx.prepare_cached(sql::INSERT_IMPORT).map_err(backend)?;
    let mut importing = tx.prepare_cached(sql::MOVE_TO_IMPORTING).map_err(backend)?;
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
            let flag = i64::from(attempted.contains(id));
            let n = importing
                .execute(params![id, commit.owner, import_id, now, flag])
                .map_err(backend)?;
            if n == 1 {
                report.applied += 1;
                moved += 1;
            } else {
                report.rejected.push(*id);
            }
        }
        if moved != imp.job_ids.len() as i64 {
            tx.execute(sql::FIX_IMPORT_COUNT, params![import_id, moved])
                .map_err(backend)?;
        }
    }
    apply_transitions(
        tx,
        Fence::Executing(&commit.owner),
        &commit.transitions,
        &attempted,
        now,
        &mut report,
    )?;
    if let Some(slot) = commit.slot {
        tx.execute(sql::RELEASE_SLOT, params![slot])
            .map_err(backend)?;
    }
    Ok(report)
}

/// Closes an import (fenced on its lease owner) and writes its jobs'
/// transitions; a lost lease rejects them all and writes nothing.
pub(super) fn finish_import(
    tx: &Transaction<'_>,
    f: &ImportFinish,
) -> Result<CommitReport, StoreError> {
    let (s, fl, a) = f.outcome_counts();
    let (code, message) = error_columns(f.error.as_ref());
    let (id, owner, state, now) = (f.import_id, &f.owner, f.state.as_str(), f.now.0);
    let p = params![id, owner, state, s, fl, a, code, message, now];
    let n = tx.execute(sql::FINISH_IMPORT, p).map_err(backend)?;
    let mut report = CommitReport::default();
    if n != 1 {
        // Lease lost: another process owns this import now.
        report.rejected = f.transitions.iter().map(|t| t.job_id).collect();
        return Ok(report);
    }
    apply_transitions(
        tx,
        Fence::Importing(f.import_id),
        &f.transitions,
        &HashSet::new(),
        f.now.0,
        &mut report,
    )?;
    Ok(report)
}

/// Takes an upload slot of the destination when fewer than `max` uploads
/// plus imports are in flight (expired slots dropped first).
pub(super) fn take_slot(
    tx: &Transaction<'_>,
    dest: &str,
    owner: &str,
    max: u32,
    now: Timestamp,
    lease_until: Timestamp,
) -> Result<Option<SlotId>, StoreError> {
    tx.execute(sql::DROP_EXPIRED_SLOTS, params![dest, now.0])
        .map_err(backend)?;
    let busy: i64 = tx
        .query_row(sql::BUSY_SLOTS, params![dest], |r| r.get(0))
        .map_err(backend)?;
    if busy >= i64::from(max) {
        return Ok(None);
    }
    tx.query_row(
        sql::INSERT_SLOT,
        params![dest, owner, lease_until.0, now.0],
        |r| r.get(0),
    )
    .map(Some)
    .map_err(backend)
}

/// Aborts up to `limit` unprocessed jobs older than `created_before` as
/// expired; answers the count per destination.
pub(super) fn expire_jobs(
    tx: &Transaction<'_>,
    created_before: Timestamp,
    message: &str,
    now: Timestamp,
    limit: usize,
) -> Result<BTreeMap<String, u64>, StoreError> {
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    let mut stmt = tx.prepare_cached(sql::EXPIRE_JOBS).map_err(backend)?;
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
    Ok(out)
}
