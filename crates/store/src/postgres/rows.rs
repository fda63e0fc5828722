//! Row decoding and the column arrays bulk statements bind.

use std::collections::HashSet;

use batchrouter_core::store::{AttemptInfo, ImportRecord, ImportState, JobRecord, JobTransition};
use batchrouter_core::{Job, JobId, JobState, Timestamp};
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::common::{error_of, shown_next_attempt, TransitionColumns};

/// A decoding problem that is the data's fault, not the connection's.
fn data_error(msg: String) -> sqlx::Error {
    sqlx::Error::Decode(msg.into())
}

fn count(v: i32) -> u32 {
    v.max(0) as u32
}

/// A claimed job (columns of `CLAIM_JOBS`' RETURNING).
pub fn job(destination_id: &str, r: &PgRow) -> Result<Job, sqlx::Error> {
    Ok(Job {
        id: r.try_get(0)?,
        destination_id: destination_id.to_string(),
        payload: r.try_get(1)?,
        message_id: r.try_get(2)?,
        attempts: count(r.try_get(3)?),
        retry_base: count(r.try_get(4)?),
        first_attempt_at: r.try_get::<Option<i64>, _>(5)?.map(Timestamp),
        created_at: Timestamp(r.try_get(6)?),
    })
}

/// A job for the API (`job_record_columns!`).
pub fn job_record(r: &PgRow) -> Result<JobRecord, sqlx::Error> {
    let state: JobState = r.try_get::<String, _>(3)?.parse().map_err(data_error)?;
    Ok(JobRecord {
        id: r.try_get(0)?,
        destination_id: r.try_get(1)?,
        message_id: r.try_get(2)?,
        state,
        attempts: count(r.try_get(4)?),
        next_attempt_at: shown_next_attempt(state, r.try_get(5)?),
        error: error_of(r.try_get(6)?, r.try_get(7)?),
        note: r.try_get(8)?,
        external_id: r.try_get(9)?,
        import_id: r.try_get(10)?,
        created_at: Timestamp(r.try_get(11)?),
        updated_at: Timestamp(r.try_get(12)?),
        completed_at: r.try_get::<Option<i64>, _>(13)?.map(Timestamp),
    })
}

/// An import (`import_columns!`).
pub fn import(r: &PgRow) -> Result<ImportRecord, sqlx::Error> {
    let context_text: String = r.try_get(3)?;
    let context = serde_json::from_str(&context_text)
        .map_err(|e| data_error(format!("import context is not JSON: {e}")))?;
    let state =
        ImportState::parse(&r.try_get::<String, _>(4)?).map_err(|e| data_error(e.to_string()))?;
    let n = |i: usize| -> Result<u64, sqlx::Error> { Ok(r.try_get::<i64, _>(i)?.max(0) as u64) };
    Ok(ImportRecord {
        id: r.try_get(0)?,
        destination_id: r.try_get(1)?,
        batch_id: r.try_get(2)?,
        context,
        state,
        job_count: n(5)?,
        succeeded: n(6)?,
        failed: n(7)?,
        aborted: n(8)?,
        progress: r.try_get::<i32, _>(9)?.clamp(0, 100) as u8,
        error: error_of(r.try_get(10)?, r.try_get(11)?),
        poll_errors: count(r.try_get(12)?),
        started_at: Timestamp(r.try_get(13)?),
        updated_at: Timestamp(r.try_get(14)?),
        completed_at: r.try_get::<Option<i64>, _>(15)?.map(Timestamp),
        next_poll_at: Timestamp(r.try_get(16)?),
        deadline_at: Timestamp(r.try_get(17)?),
    })
}

/// Retry bookkeeping of an importing job (`IMPORTING_JOBS`).
pub fn attempt_info(r: &PgRow) -> Result<AttemptInfo, sqlx::Error> {
    Ok(AttemptInfo {
        job_id: r.try_get(0)?,
        attempts: count(r.try_get(1)?),
        retry_base: count(r.try_get(2)?),
        first_attempt_at: r.try_get::<Option<i64>, _>(3)?.map(Timestamp),
        created_at: Timestamp(r.try_get(4)?),
    })
}

/// The three counts (jobs, imports, slots) a lease statement answers.
pub fn three_counts(row: &PgRow) -> Result<[u64; 3], sqlx::Error> {
    let n = |i: usize| -> Result<u64, sqlx::Error> { Ok(row.try_get::<i64, _>(i)?.max(0) as u64) };
    Ok([n(0)?, n(1)?, n(2)?])
}

/// Column arrays of a bulk fenced transition (`transition_update!`), one
/// entry per distinct job; a job named again is rejected up front, as a
/// second write to the same job would be by the fence.
#[derive(Debug, Default)]
pub struct TransitionArrays {
    pub ids: Vec<i64>,
    pub states: Vec<&'static str>,
    pub codes: Vec<Option<&'static str>>,
    pub messages: Vec<Option<String>>,
    pub notes: Vec<Option<String>>,
    pub external_ids: Vec<Option<String>>,
    pub next_attempt_at: Vec<Option<i64>>,
    pub completed_at: Vec<Option<i64>>,
    pub attempted: Vec<i32>,
    /// Repeats of a job already in the arrays.
    pub repeated: Vec<JobId>,
}

impl TransitionArrays {
    /// Builds the arrays; jobs in `attempted` also count an upload attempt.
    pub fn new(transitions: &[JobTransition], attempted: &HashSet<JobId>, now: Timestamp) -> Self {
        let mut a = TransitionArrays::default();
        let mut seen = HashSet::with_capacity(transitions.len());
        for t in transitions {
            if !seen.insert(t.job_id) {
                a.repeated.push(t.job_id);
                continue;
            }
            let c = TransitionColumns::of(&t.to, now.0);
            a.ids.push(t.job_id);
            a.states.push(c.state.as_str());
            a.codes.push(c.error.map(|e| e.code.as_str()));
            a.messages.push(c.error.map(|e| storable(&e.message)));
            a.notes.push(c.note.map(storable));
            a.external_ids.push(c.external_id.map(storable));
            a.next_attempt_at.push(c.next_attempt_at);
            a.completed_at.push(c.completed_at);
            a.attempted.push(i32::from(attempted.contains(&t.job_id)));
        }
        a
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Text as PostgreSQL can store it: a NUL (which `text` rejects, and which
/// a destination's error body may carry) becomes U+FFFD.
pub fn storable(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}")
    } else {
        s.to_string()
    }
}
