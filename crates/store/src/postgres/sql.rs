//! Every statement the PostgreSQL store runs, in one place so their plans
//! can be reviewed (and `EXPLAIN`ed in tests) together. Bulk statements take
//! arrays (`= ANY($n)`, `UNNEST(...)`): one statement per call, never one
//! per job. `jobs` is aliased `j` and `imports` `i` everywhere. The state
//! words they quote are checked against `JobState::as_str()` and
//! `ImportState::as_str()` by a test in `tests.rs`, so they cannot drift.

/// Columns of an [`ImportRecord`](batchrouter_core::store::ImportRecord), in decode order.
macro_rules! import_columns {
    () => {
        "i.id, i.destination_id, i.batch_id, i.context::text, i.state, i.job_count, i.succeeded, \
         i.failed, i.aborted, i.progress, i.error_code, i.error_message, i.poll_errors, i.started_at, \
         i.updated_at, i.completed_at, i.next_poll_at, i.deadline_at"
    };
}

/// Columns of a [`JobRecord`](batchrouter_core::store::JobRecord), in decode order.
macro_rules! job_record_columns {
    () => {
        "j.id, j.destination_id, j.message_id, j.state, j.attempts, j.next_attempt_at, j.error_code, \
         j.error_message, j.note, j.external_id, j.import_id, j.created_at, j.updated_at, j.completed_at"
    };
}

/// The SET list of a fenced transition out of `executing` or `importing`;
/// `$2` is the write time, the arrays come from [`super::rows::TransitionArrays`].
/// The retry window starts at the first such transition, counted or not
/// (a throttled upload starts it too).
macro_rules! transition_update {
    ($fence:literal) => {
        concat!(
            "UPDATE jobs j SET state = t.state, error_code = t.code, error_message = t.message, \
             note = t.note, external_id = t.external_id, \
             next_attempt_at = COALESCE(t.next_attempt_at, j.next_attempt_at), \
             completed_at = t.completed_at, updated_at = $2, \
             attempts = j.attempts + t.attempted, \
             first_attempt_at = COALESCE(j.first_attempt_at, $2), \
             lease_owner = NULL, lease_expires_at = NULL \
             FROM UNNEST($3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
                         $9::bigint[], $10::bigint[], $11::int[]) \
                  AS t(id, state, code, message, note, external_id, next_attempt_at, completed_at, attempted) \
             WHERE j.id = t.id AND ",
            $fence,
            " RETURNING j.id"
        )
    };
}

/// Preallocates job ids (`$1` of them) so each inserted row's id is known
/// by position even when duplicates are skipped.
pub const NEXT_JOB_IDS: &str = "SELECT nextval('jobs_id_seq') FROM generate_series(1, $1::bigint)";

/// Inserts jobs; a repeated `(destination_id, message_id)` is skipped.
pub const INSERT_JOBS: &str = "INSERT INTO jobs (id, destination_id, payload, message_id, next_attempt_at, \
         created_at, updated_at) \
     OVERRIDING SYSTEM VALUE \
     SELECT t.id, t.destination_id, t.payload, t.message_id, $5, $5, $5 \
     FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[]) AS t(id, destination_id, payload, message_id) \
     ORDER BY t.id \
     ON CONFLICT (destination_id, message_id) WHERE message_id IS NOT NULL DO NOTHING \
     RETURNING id";

/// For skipped inserts: the id of the job already holding the message id.
pub const EXISTING_BY_MESSAGE_ID: &str = "SELECT t.wanted, j.id \
     FROM UNNEST($1::bigint[], $2::text[], $3::text[]) AS t(wanted, destination_id, message_id) \
     JOIN jobs j ON j.destination_id = t.destination_id AND j.message_id = t.message_id";

/// Claims due jobs, longest due first (ties in id order, so new jobs go in
/// arrival order): rows another transaction is claiming are
/// skipped, never waited for. The chosen ids are updated through the
/// primary key (`= ANY(ARRAY(...))`), so the planner never joins them
/// against a scan of the whole table. `$1` owner, `$2` lease expiry, `$3`
/// destination, `$4` now, `$5` limit (the order of every claim).
pub const CLAIM_JOBS: &str = "WITH due AS ( \
         SELECT id FROM jobs \
         WHERE destination_id = $3 AND state IN ('waiting', 'failed') AND next_attempt_at <= $4 \
         ORDER BY next_attempt_at, id LIMIT $5 \
         FOR UPDATE SKIP LOCKED) \
     UPDATE jobs j SET state = 'executing', lease_owner = $1, lease_expires_at = $2, updated_at = $4 \
     WHERE j.id = ANY(ARRAY(SELECT id FROM due)) \
     RETURNING j.id, j.payload, j.message_id, j.attempts, j.retry_base, j.first_attempt_at, j.created_at";

/// Renews leases still held by `$2`.
pub const EXTEND_JOB_LEASES: &str = "UPDATE jobs SET lease_expires_at = $3 \
     WHERE id = ANY($1) AND state = 'executing' AND lease_owner = $2";

/// Hands claimed jobs back without spending an attempt.
pub const RELEASE_JOBS: &str =
    "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, \
     updated_at = $3 WHERE id = ANY($1) AND state = 'executing' AND lease_owner = $2";

/// Fenced transitions out of `executing` (`$1` is the lease owner).
pub const TRANSITION_EXECUTING: &str =
    transition_update!("j.state = 'executing' AND j.lease_owner = $1::text");

/// Fenced transitions out of `importing` (`$1` is the import id).
pub const TRANSITION_IMPORTING: &str =
    transition_update!("j.state = 'importing' AND j.import_id = $1::bigint");

/// Counts an upload attempt for jobs that neither transition nor import.
pub const COUNT_ATTEMPT_ONLY: &str = "UPDATE jobs SET attempts = attempts + 1, \
     first_attempt_at = COALESCE(first_attempt_at, $3) \
     WHERE id = ANY($1) AND state = 'executing' AND lease_owner = $2";

/// Creates an upload's imports; ids are assigned in `ord` order.
pub const INSERT_IMPORTS: &str = "INSERT INTO imports (destination_id, batch_id, context, state, job_count, \
         next_poll_at, deadline_at, lease_owner, lease_expires_at, started_at, updated_at) \
     SELECT $1, t.batch_id, t.context::json, 'pending', t.job_count, t.next_poll_at, t.deadline_at, $2, $3, $4, $4 \
     FROM UNNEST($5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[]) WITH ORDINALITY \
          AS t(batch_id, context, job_count, next_poll_at, deadline_at, ord) \
     ORDER BY t.ord \
     RETURNING id";

/// Moves an upload's jobs to `importing` under their import (fenced on `$2`).
pub const MOVE_TO_IMPORTING: &str =
    "UPDATE jobs j SET state = 'importing', import_id = t.import_id, \
         error_code = NULL, error_message = NULL, attempts = j.attempts + t.attempted, \
         first_attempt_at = CASE WHEN t.attempted = 1 THEN COALESCE(j.first_attempt_at, $3) \
                                 ELSE j.first_attempt_at END, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = $3 \
     FROM UNNEST($1::bigint[], $4::bigint[], $5::int[]) AS t(id, import_id, attempted) \
     WHERE j.id = t.id AND j.state = 'executing' AND j.lease_owner = $2 \
     RETURNING j.id";

/// Corrects `job_count` of imports whose jobs were not all still held.
pub const FIX_IMPORT_COUNTS: &str = "UPDATE imports i SET job_count = t.n \
     FROM UNNEST($1::bigint[], $2::bigint[]) AS t(id, n) WHERE i.id = t.id";

/// Creates the destination's lock row on first use.
pub const ENSURE_DESTINATION: &str =
    "INSERT INTO destinations (id, created_at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING";

/// Serializes slot decisions for one destination across every daemon.
pub const LOCK_DESTINATION: &str = "SELECT id FROM destinations WHERE id = $1 FOR UPDATE";

/// Under the destination lock: drops expired slots and takes one when fewer
/// than `$5` uploads plus imports are in flight.
pub const TAKE_SLOT: &str = "WITH expired AS ( \
         DELETE FROM upload_slots WHERE destination_id = $1 AND lease_expires_at < $2 RETURNING id), \
     busy AS ( \
         SELECT (SELECT count(*) FROM upload_slots WHERE destination_id = $1 AND lease_expires_at >= $2) \
              + (SELECT count(*) FROM imports WHERE destination_id = $1 AND state IN ('pending', 'processing')) AS n) \
     INSERT INTO upload_slots (destination_id, owner, lease_expires_at, created_at) \
     SELECT $1, $3, $4, $2 FROM busy WHERE busy.n < $5 \
     RETURNING id";

/// Frees one slot.
pub const RELEASE_SLOT: &str = "DELETE FROM upload_slots WHERE id = $1";

/// Claims imports due for a poll whose lease is free, ours, or expired.
pub const CLAIM_DUE_IMPORTS: &str = concat!(
    "WITH due AS ( \
         SELECT id FROM imports \
         WHERE destination_id = $3 AND state IN ('pending', 'processing') AND next_poll_at <= $4 \
           AND (lease_owner IS NULL OR lease_owner = $1 OR lease_expires_at < $4) \
         ORDER BY next_poll_at, id LIMIT $5 \
         FOR UPDATE SKIP LOCKED) \
     UPDATE imports i SET lease_owner = $1, lease_expires_at = $2 WHERE i.id = ANY(ARRAY(SELECT id FROM due)) \
     RETURNING ",
    import_columns!()
);

/// Retry bookkeeping of an import's jobs still importing.
pub const IMPORTING_JOBS: &str =
    "SELECT id, attempts, retry_base, first_attempt_at, created_at FROM jobs \
     WHERE import_id = $1 AND state = 'importing' ORDER BY id";

/// Reschedules an unfinished import (fenced on the lease owner).
pub const RECORD_POLL: &str = "UPDATE imports SET state = $3, progress = COALESCE($4, progress), \
         poll_errors = poll_errors + $5, \
         error_code = CASE WHEN $5 = 1 THEN $6 ELSE error_code END, \
         error_message = CASE WHEN $5 = 1 THEN $7 ELSE error_message END, \
         next_poll_at = $8, lease_expires_at = $9, updated_at = $10 \
     WHERE id = $1 AND lease_owner = $2 AND state IN ('pending', 'processing')";

/// Closes an import (fenced on the lease owner).
pub const FINISH_IMPORT: &str =
    "UPDATE imports SET state = $3, succeeded = succeeded + $4, failed = failed + $5, \
         aborted = aborted + $6, error_code = $7, error_message = $8, progress = 100, \
         completed_at = $9, updated_at = $9, lease_owner = NULL, lease_expires_at = NULL \
     WHERE id = $1 AND lease_owner = $2 AND state IN ('pending', 'processing')";

/// Earliest next poll of the destination's imports in flight.
pub const NEXT_POLL_DUE: &str = "SELECT MIN(next_poll_at) FROM imports \
     WHERE destination_id = $1 AND state IN ('pending', 'processing')";

/// Expired job leases back to `waiting` (their holder stopped renewing).
pub const RECLAIM_JOBS: &str =
    "UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, \
     updated_at = $1 WHERE state = 'executing' AND lease_expires_at < $1";

/// Expired import leases freed for another poller.
pub const RECLAIM_IMPORTS: &str = "UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
     WHERE state IN ('pending', 'processing') AND lease_expires_at < $1";

/// Expired upload slots freed.
pub const RECLAIM_SLOTS: &str = "DELETE FROM upload_slots WHERE lease_expires_at < $1";

/// One job for the API.
pub const GET_JOB: &str = concat!(
    "SELECT ",
    job_record_columns!(),
    " FROM jobs j WHERE j.id = $1"
);

/// One import for the API.
pub const GET_IMPORT: &str = concat!(
    "SELECT ",
    import_columns!(),
    " FROM imports i WHERE i.id = $1"
);

/// Jobs per destination and state: settled states from `jobs_settled`
/// (index-only once vacuumed), due ones from `jobs_due`.
pub const COUNT_JOBS: &str = "SELECT destination_id, state, count(*) FROM jobs \
         WHERE state NOT IN ('waiting', 'failed') GROUP BY destination_id, state \
     UNION ALL \
     SELECT destination_id, state, count(*) FROM jobs \
         WHERE state IN ('waiting', 'failed') GROUP BY destination_id, state";

/// Imports in flight per destination.
pub const COUNT_IMPORTS: &str = "SELECT destination_id, count(*) FROM imports \
     WHERE state IN ('pending', 'processing') GROUP BY destination_id";

/// The columns a re-drive resets (`$1` is the write time).
macro_rules! redrive_set {
    () => {
        "UPDATE jobs SET state = 'waiting', retry_base = attempts, first_attempt_at = NULL, \
         next_attempt_at = 0, error_code = NULL, error_message = NULL, note = NULL, completed_at = NULL, \
         lease_owner = NULL, lease_expires_at = NULL, updated_at = $1"
    };
}

/// Retries one job; answers whether it changed and the state it had.
pub const RETRY_JOB: &str = concat!(
    "WITH changed AS (",
    redrive_set!(),
    " WHERE id = $2 AND state IN ('aborted', 'failed') RETURNING id) \
     SELECT (SELECT count(*) FROM changed), (SELECT state FROM jobs WHERE id = $2)"
);

/// Re-drives every job of a destination in the given states.
pub const REDRIVE: &str = concat!(
    redrive_set!(),
    " WHERE destination_id = $2 AND state = ANY($3)"
);

/// Deletes up to `$2` terminal jobs completed before `$1`; rows locked by
/// someone else are skipped, so the sweep never waits or blocks for long.
pub const SWEEP_JOBS: &str = "DELETE FROM jobs WHERE id IN ( \
         SELECT id FROM jobs WHERE completed_at IS NOT NULL AND completed_at < $1 \
           AND state IN ('succeeded', 'aborted') \
         LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Deletes up to `$2` finished imports none of whose jobs still import.
pub const SWEEP_IMPORTS: &str = "DELETE FROM imports WHERE id IN ( \
         SELECT i.id FROM imports i WHERE i.completed_at IS NOT NULL AND i.completed_at < $1 \
           AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.import_id = i.id AND j.state = 'importing') \
         LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Liveness.
pub const PING: &str = "SELECT 1";

/// Heartbeat: renews the given leases still held by `$1` (`$2` jobs, `$3`
/// imports, `$4` slots) to `$5`, in one statement; answers how many of each.
pub const RENEW_LEASES: &str = "WITH j AS ( \
         UPDATE jobs SET lease_expires_at = $5 \
         WHERE id = ANY($2::bigint[]) AND state = 'executing' AND lease_owner = $1 RETURNING 1), \
     i AS ( \
         UPDATE imports SET lease_expires_at = $5 \
         WHERE id = ANY($3::bigint[]) AND state IN ('pending', 'processing') AND lease_owner = $1 RETURNING 1), \
     s AS ( \
         UPDATE upload_slots SET lease_expires_at = $5 \
         WHERE id = ANY($4::bigint[]) AND owner = $1 RETURNING 1) \
     SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM i), (SELECT count(*) FROM s)";

/// A daemon instance restarted takes back everything its earlier runs held
/// at once: owners matching the LIKE pattern `$1` (escaped prefix plus one
/// `_` per nonce character, escape character `\`) other than `$3` (this
/// run); `$2` is the write time. Answers how many of each.
pub const RELEASE_EARLIER_RUNS: &str = "WITH j AS ( \
         UPDATE jobs SET state = 'waiting', lease_owner = NULL, lease_expires_at = NULL, updated_at = $2 \
         WHERE state = 'executing' AND lease_owner LIKE $1 ESCAPE '\\' AND lease_owner <> $3 RETURNING 1), \
     i AS ( \
         UPDATE imports SET lease_owner = NULL, lease_expires_at = NULL \
         WHERE state IN ('pending', 'processing') AND lease_owner LIKE $1 ESCAPE '\\' AND lease_owner <> $3 RETURNING 1), \
     s AS (DELETE FROM upload_slots WHERE owner LIKE $1 ESCAPE '\\' AND owner <> $3 RETURNING 1) \
     SELECT (SELECT count(*) FROM j), (SELECT count(*) FROM i), (SELECT count(*) FROM s)";

/// Aborts up to `$2` unprocessed (`waiting`/`failed`) jobs created and last
/// changed (e.g. re-driven) before `$1`, with code `$3` and message `$4` at
/// `$5`; rows someone is claiming are skipped. Answers the count per destination.
pub const EXPIRE_JOBS: &str = "WITH old AS ( \
         SELECT id FROM jobs WHERE state IN ('waiting', 'failed') AND created_at < $1 AND updated_at < $1 \
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED), \
     done AS ( \
         UPDATE jobs j SET state = 'aborted', error_code = $3, error_message = $4, \
             completed_at = $5, updated_at = $5, lease_owner = NULL, lease_expires_at = NULL \
         WHERE j.id = ANY(ARRAY(SELECT id FROM old)) RETURNING j.destination_id) \
     SELECT destination_id, count(*) FROM done GROUP BY destination_id";
