//! Every statement the SQLite store runs, in one place so they can be read
//! (and `EXPLAIN QUERY PLAN`ed in tests) together, as the PostgreSQL side's
//! `sql.rs`. Statements are `const`s for `prepare_cached`; the state words
//! they quote are checked against `JobState::as_str()` and
//! `ImportState::as_str()` by a test in `tests.rs`, so they cannot drift.

/// Columns of a [`JobRecord`](batchrouter_core::store::JobRecord), in decode order.
macro_rules! job_record_columns {
    () => {
        "id, destination_id, message_id, state, attempts, next_attempt_at, \
         error_code, error_message, note, external_id, import_id, created_at, updated_at, completed_at"
    };
}

/// Columns of an [`ImportRecord`](batchrouter_core::store::ImportRecord), in decode order.
macro_rules! import_columns {
    () => {
        "id, destination_id, batch_id, context, state, job_count, succeeded, failed, aborted, \
         progress, error_code, error_message, poll_errors, started_at, updated_at, completed_at, \
         next_poll_at, deadline_at"
    };
}

/// A fenced transition of job `?1`: `?2` state, `?3`/`?4` error, `?5` note,
/// `?6` external id, `?7` next attempt (kept when NULL), `?8` completion,
/// `?9` the fence value, `?10` the write time, `?11` 1 when the upload's
/// attempt is counted. The retry window starts at the first transition out
/// of an upload, counted or throttled.
macro_rules! transition_update {
    ($fence:literal) => {
        concat!(
            "UPDATE jobs SET state = ?2, error_code = ?3, error_message = ?4, note = ?5, external_id = ?6, \
             next_attempt_at = COALESCE(?7, next_attempt_at), completed_at = ?8, updated_at = ?10, \
             attempts = attempts + ?11, first_attempt_at = COALESCE(first_attempt_at, ?10), \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND ",
            $fence
        )
    };
}

/// The columns a re-drive resets (`?1` is the write time).
macro_rules! redrive_set {
    () => {
        "UPDATE jobs SET state = 'waiting', retry_base = attempts, first_attempt_at = NULL, \
         next_attempt_at = 0, error_code = NULL, error_message = NULL, note = NULL, completed_at = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1"
    };
}

/// Inserts one job; a repeated `(destination_id, message_id)` is skipped
/// (no row returned).
pub const INSERT_JOB: &str = "INSERT INTO jobs (destination_id, payload, message_id, next_attempt_at, created_at, updated_at) \
     VALUES (?1, ?2, ?3, ?4, ?4, ?4) \
     ON CONFLICT (destination_id, message_id) WHERE message_id IS NOT NULL DO NOTHING \
     RETURNING id";

/// For a skipped insert: the job already holding the message id.
pub const EXISTING_BY_MESSAGE_ID: &str =
    "SELECT id FROM jobs WHERE destination_id = ?1 AND message_id = ?2";

/// Claims due jobs of `?4`, longest due first (ties in id order): `?1`
/// owner, `?2` lease expiry, `?3` now, `?5` limit.
pub const CLAIM_JOBS: &str = "UPDATE jobs SET state = 'executing', lease_owner = ?1, lease_expires_at = ?2, updated_at = ?3 \
     WHERE id IN (SELECT id FROM jobs WHERE destination_id = ?4 \
                  AND state IN ('waiting', 'failed') AND next_attempt_at <= ?3 \
                  ORDER BY next_attempt_at, id LIMIT ?5) \
     RETURNING id, payload, message_id, attempts, retry_base, first_attempt_at, created_at";

/// Renews the lease of job `?1` still held by `?2` to `?3`.
pub const EXTEND_JOB_LEASE: &str =
    "UPDATE jobs SET lease_expires_at = ?3 WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2";

/// Hands claimed job `?1` of owner `?2` back at `?3` without spending an attempt.
pub const RELEASE_JOB: &str = "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?3 \
     WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2";

/// Fenced transition out of `executing` (`?9` is the lease owner).
pub const TRANSITION_EXECUTING: &str =
    transition_update!("state = 'executing' AND lease_owner = ?9");

/// Fenced transition out of `importing` (`?9` is the import id).
pub const TRANSITION_IMPORTING: &str = transition_update!("state = 'importing' AND import_id = ?9");

/// Counts an upload attempt for job `?1` of owner `?2` (at `?3`) that
/// neither transitions nor imports.
pub const COUNT_ATTEMPT_ONLY: &str =
    "UPDATE jobs SET attempts = attempts + 1, first_attempt_at = COALESCE(first_attempt_at, ?3) \
     WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2";

/// Creates one import of an upload.
pub const INSERT_IMPORT: &str =
    "INSERT INTO imports (destination_id, batch_id, context, state, job_count, next_poll_at, \
     deadline_at, lease_owner, lease_expires_at, started_at, updated_at) \
     VALUES (?1, ?2, ?3, 'pending', ?4, ?5, ?6, ?7, ?8, ?9, ?9) RETURNING id";

/// Moves job `?1` of owner `?2` to `importing` under import `?3` at `?4`;
/// `?5` is 1 when the upload's attempt is counted.
pub const MOVE_TO_IMPORTING: &str = "UPDATE jobs SET state = 'importing', import_id = ?3, error_code = NULL, error_message = NULL, \
     attempts = attempts + ?5, \
     first_attempt_at = CASE WHEN ?5 = 1 THEN COALESCE(first_attempt_at, ?4) ELSE first_attempt_at END, \
     lease_owner = NULL, lease_expires_at = NULL, updated_at = ?4 \
     WHERE id = ?1 AND state = 'executing' AND lease_owner = ?2";

/// Corrects `job_count` of an import whose jobs were not all still held.
pub const FIX_IMPORT_COUNT: &str = "UPDATE imports SET job_count = ?2 WHERE id = ?1";

/// Drops the destination's expired slots.
pub const DROP_EXPIRED_SLOTS: &str =
    "DELETE FROM upload_slots WHERE destination_id = ?1 AND lease_expires_at < ?2";

/// Uploads plus imports in flight for the destination.
pub const BUSY_SLOTS: &str = "SELECT (SELECT COUNT(*) FROM upload_slots WHERE destination_id = ?1) + \
            (SELECT COUNT(*) FROM imports WHERE destination_id = ?1 AND state IN ('pending', 'processing'))";

/// Takes a slot.
pub const INSERT_SLOT: &str =
    "INSERT INTO upload_slots (destination_id, owner, lease_expires_at, created_at) \
     VALUES (?1, ?2, ?3, ?4) RETURNING id";

/// Frees one slot.
pub const RELEASE_SLOT: &str = "DELETE FROM upload_slots WHERE id = ?1";

/// Claims imports of `?4` due at `?3` whose lease is free, ours (`?1`), or
/// expired; `?2` lease expiry, `?5` limit (the parameters of `CLAIM_JOBS`).
pub const CLAIM_DUE_IMPORTS: &str = concat!(
    "UPDATE imports SET lease_owner = ?1, lease_expires_at = ?2 \
     WHERE id IN (SELECT id FROM imports WHERE destination_id = ?4 \
                  AND state IN ('pending', 'processing') AND next_poll_at <= ?3 \
                  AND (lease_owner IS NULL OR lease_owner = ?1 OR lease_expires_at < ?3) \
                  ORDER BY next_poll_at, id LIMIT ?5) \
     RETURNING ",
    import_columns!()
);

/// Retry bookkeeping of an import's jobs still importing.
pub const IMPORTING_JOBS: &str =
    "SELECT id, attempts, retry_base, first_attempt_at, created_at FROM jobs \
     WHERE import_id = ?1 AND state = 'importing' ORDER BY id";

/// Reschedules an unfinished import (fenced on the lease owner).
pub const RECORD_POLL: &str = "UPDATE imports SET state = ?3, progress = COALESCE(?4, progress), \
     poll_errors = poll_errors + ?5, \
     error_code = CASE WHEN ?5 = 1 THEN ?6 ELSE error_code END, \
     error_message = CASE WHEN ?5 = 1 THEN ?7 ELSE error_message END, \
     next_poll_at = ?8, lease_expires_at = ?9, updated_at = ?10 \
     WHERE id = ?1 AND lease_owner = ?2 AND state IN ('pending', 'processing')";

/// Closes an import (fenced on the lease owner).
pub const FINISH_IMPORT: &str =
    "UPDATE imports SET state = ?3, succeeded = succeeded + ?4, failed = failed + ?5, \
     aborted = aborted + ?6, error_code = ?7, error_message = ?8, progress = 100, \
     completed_at = ?9, updated_at = ?9, lease_owner = NULL, lease_expires_at = NULL \
     WHERE id = ?1 AND lease_owner = ?2 AND state IN ('pending', 'processing')";

/// Earliest next poll of the destination's imports in flight.
pub const NEXT_POLL_DUE: &str = "SELECT MIN(next_poll_at) FROM imports WHERE destination_id = ?1 \
     AND state IN ('pending', 'processing')";

/// At open (the OS lock makes this process the only owner): every claimed job back to `waiting`.
pub const RECOVER_JOBS: &str = "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1 \
     WHERE state = 'executing'";

/// At open: every import lease freed.
pub const RECOVER_IMPORTS: &str = "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
     WHERE state IN ('pending', 'processing') AND lease_owner IS NOT NULL";

/// At open: every slot freed.
pub const RECOVER_SLOTS: &str = "DELETE FROM upload_slots";

/// Expired job leases back to `waiting`.
pub const RECLAIM_JOBS: &str = "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1 \
     WHERE state = 'executing' AND lease_expires_at < ?1";

/// Expired import leases freed for another poller.
pub const RECLAIM_IMPORTS: &str = "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
     WHERE state IN ('pending', 'processing') AND lease_expires_at < ?1";

/// Expired upload slots freed.
pub const RECLAIM_SLOTS: &str = "DELETE FROM upload_slots WHERE lease_expires_at < ?1";

/// Recovery at open, in the order jobs, imports, slots.
pub const RECOVER: [&str; 3] = [RECOVER_JOBS, RECOVER_IMPORTS, RECOVER_SLOTS];

/// Reclaim of expired leases, in the order jobs, imports, slots.
pub const RECLAIM: [&str; 3] = [RECLAIM_JOBS, RECLAIM_IMPORTS, RECLAIM_SLOTS];

/// Heartbeat of job `?1` held by `?2`, to `?3`.
pub const RENEW_JOB: &str = EXTEND_JOB_LEASE;

/// Heartbeat of import `?1` held by `?2`, to `?3`.
pub const RENEW_IMPORT: &str = "UPDATE imports SET lease_expires_at = ?3 \
     WHERE id = ?1 AND state IN ('pending', 'processing') AND lease_owner = ?2";

/// Heartbeat of slot `?1` held by `?2`, to `?3`.
pub const RENEW_SLOT: &str =
    "UPDATE upload_slots SET lease_expires_at = ?3 WHERE id = ?1 AND owner = ?2";

/// A restarted instance takes back the jobs of its earlier runs: owners
/// whose first `?2` characters are `?1`, `?3` characters long, other than
/// `?4` (this run); `?5` is the write time. `substr`/`length` count
/// characters; `=` is exact (LIKE would be case-insensitive here and need
/// escaping).
pub const RELEASE_EARLIER_JOBS: &str = "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = ?5 \
     WHERE state = 'executing' AND substr(lease_owner, 1, ?2) = ?1 \
     AND length(lease_owner) = ?3 AND lease_owner <> ?4";

/// The same for imports.
pub const RELEASE_EARLIER_IMPORTS: &str =
    "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
     WHERE state IN ('pending', 'processing') AND substr(lease_owner, 1, ?2) = ?1 \
     AND length(lease_owner) = ?3 AND lease_owner <> ?4";

/// The same for slots.
pub const RELEASE_EARLIER_SLOTS: &str = "DELETE FROM upload_slots WHERE substr(owner, 1, ?2) = ?1 \
     AND length(owner) = ?3 AND owner <> ?4";

/// Take-back of earlier runs, in the order jobs, imports, slots.
pub const RELEASE_EARLIER: [&str; 3] = [
    RELEASE_EARLIER_JOBS,
    RELEASE_EARLIER_IMPORTS,
    RELEASE_EARLIER_SLOTS,
];

/// Aborts up to `?2` unprocessed jobs created and last changed before `?1`,
/// with code `?3` and message `?4` at `?5`; answers each one's destination.
pub const EXPIRE_JOBS: &str =
    "UPDATE jobs SET state = 'aborted', error_code = ?3, error_message = ?4, \
     completed_at = ?5, updated_at = ?5, lease_owner = NULL, lease_expires_at = NULL \
     WHERE id IN (SELECT id FROM jobs WHERE state IN ('waiting', 'failed') \
                  AND created_at < ?1 AND updated_at < ?1 ORDER BY id LIMIT ?2) \
     RETURNING destination_id";

/// One job for the API.
pub const GET_JOB: &str = concat!("SELECT ", job_record_columns!(), " FROM jobs WHERE id = ?1");

/// One import for the API.
pub const GET_IMPORT: &str = concat!("SELECT ", import_columns!(), " FROM imports WHERE id = ?1");

/// Jobs per destination and state.
pub const COUNT_JOBS: &str =
    "SELECT destination_id, state, COUNT(*) FROM jobs GROUP BY destination_id, state";

/// Imports in flight per destination.
pub const COUNT_IMPORTS: &str = "SELECT destination_id, COUNT(*) FROM imports \
     WHERE state IN ('pending', 'processing') GROUP BY destination_id";

/// Retries job `?2` at `?1` if it failed or aborted.
pub const RETRY_JOB: &str = concat!(
    redrive_set!(),
    " WHERE id = ?2 AND state IN ('aborted', 'failed')"
);

/// The state of job `?1`.
pub const JOB_STATE: &str = "SELECT state FROM jobs WHERE id = ?1";

/// Re-drives every job of destination `?2` in state `?3` at `?1`.
pub const REDRIVE: &str = concat!(redrive_set!(), " WHERE destination_id = ?2 AND state = ?3");

/// Deletes up to `?2` terminal jobs completed before `?1`.
pub const SWEEP_JOBS: &str =
    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE completed_at IS NOT NULL \
     AND completed_at < ?1 AND state IN ('succeeded', 'aborted') LIMIT ?2)";

/// Deletes up to `?2` finished imports none of whose jobs still import.
pub const SWEEP_IMPORTS: &str = "DELETE FROM imports WHERE id IN (SELECT id FROM imports i WHERE completed_at IS NOT NULL \
     AND completed_at < ?1 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.import_id = i.id AND j.state = 'importing') \
     LIMIT ?2)";

/// Liveness.
pub const PING: &str = "SELECT 1";
