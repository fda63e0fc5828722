//! Row decoding for the SQLite store: each function reads the columns of
//! one statement in `sql.rs`, in the order that statement names them (the
//! per-destination counts fold two such queries into one answer).
//! A stored word that is not a contract word is the data's fault
//! ([`StoreError::Data`]), kept apart from a failed read.

use std::collections::BTreeMap;

use batchrouter_core::store::{
    AttemptInfo, DestinationCounts, ImportRecord, ImportState, JobRecord,
};
use batchrouter_core::{Job, JobState, StoreError, Timestamp};
use rusqlite::{Connection, Row};

use super::{backend, sql};
use crate::common::{empty_counts, error_of, shown_next_attempt};

/// A claimed job (columns of `CLAIM_JOBS`' RETURNING).
pub(super) fn job(destination_id: &str, r: &Row<'_>) -> rusqlite::Result<Job> {
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

/// A job for the API (`job_record_columns!`).
pub(super) fn job_record(r: &Row<'_>) -> rusqlite::Result<Result<JobRecord, StoreError>> {
    let state_s: String = r.get(3)?;
    let state = match state_s.parse::<JobState>() {
        Ok(s) => s,
        Err(e) => return Ok(Err(StoreError::Data(e))),
    };
    Ok(Ok(JobRecord {
        id: r.get(0)?,
        destination_id: r.get(1)?,
        message_id: r.get(2)?,
        state,
        attempts: r.get(4)?,
        next_attempt_at: shown_next_attempt(state, r.get(5)?),
        error: error_of(r.get(6)?, r.get(7)?),
        note: r.get(8)?,
        external_id: r.get(9)?,
        import_id: r.get(10)?,
        created_at: Timestamp(r.get(11)?),
        updated_at: Timestamp(r.get(12)?),
        completed_at: r.get::<_, Option<i64>>(13)?.map(Timestamp),
    }))
}

/// An import (`import_columns!`).
pub(super) fn import(r: &Row<'_>) -> rusqlite::Result<Result<ImportRecord, StoreError>> {
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
        error: error_of(r.get(10)?, r.get(11)?),
        poll_errors: r.get(12)?,
        started_at: Timestamp(r.get(13)?),
        updated_at: Timestamp(r.get(14)?),
        completed_at: r.get::<_, Option<i64>>(15)?.map(Timestamp),
        next_poll_at: Timestamp(r.get(16)?),
        deadline_at: Timestamp(r.get(17)?),
    }))
}

/// Retry bookkeeping of an importing job (`IMPORTING_JOBS`).
pub(super) fn attempt_info(r: &Row<'_>) -> rusqlite::Result<AttemptInfo> {
    Ok(AttemptInfo {
        job_id: r.get(0)?,
        attempts: r.get(1)?,
        retry_base: r.get(2)?,
        first_attempt_at: r.get::<_, Option<i64>>(3)?.map(Timestamp),
        created_at: Timestamp(r.get(4)?),
    })
}

/// Jobs per destination and state, and imports in flight, every state of a
/// destination present (zero when it has no job in it).
pub(super) fn destination_counts(
    conn: &Connection,
) -> Result<BTreeMap<String, DestinationCounts>, StoreError> {
    let mut out: BTreeMap<String, DestinationCounts> = BTreeMap::new();
    let mut stmt = conn.prepare_cached(sql::COUNT_JOBS).map_err(backend)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(backend)?;
    for row in rows {
        let (dest, state, n) = row.map_err(backend)?;
        let state = state.parse::<JobState>().map_err(StoreError::Data)?;
        let entry = out.entry(dest).or_insert_with(empty_counts);
        entry.by_state.insert(state, n as u64);
    }
    let mut stmt = conn.prepare_cached(sql::COUNT_IMPORTS).map_err(backend)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
        .map_err(backend)?;
    for row in rows {
        let (dest, n) = row.map_err(backend)?;
        out.entry(dest)
            .or_insert_with(empty_counts)
            .imports_in_flight = n as u64;
    }
    Ok(out)
}
