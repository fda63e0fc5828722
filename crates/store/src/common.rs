//! What both backends decide the same way, in one place so the SQLite and
//! PostgreSQL stores cannot drift apart: which inputs an insert refuses,
//! which columns a transition writes, which jobs a fenced write may touch,
//! which attempted jobs an upload counts on their own, which states a
//! re-drive accepts, and how stored rows turn back into contract values.
//! Each backend keeps only its SQL and how it binds these values.

use std::collections::HashSet;

use batchrouter_core::store::{DestinationCounts, RecoveryReport, Transition, UploadCommit};
use batchrouter_core::{
    ErrorCode, ImportId, JobError, JobId, JobState, NewJob, StoreError, Timestamp,
};

/// Checks every job with [`batchrouter_core::NewJob::validate`] before a
/// store writes any, so both backends refuse the same inputs, all or
/// nothing, and say which job of the request is wrong and why.
pub(crate) fn validate_new_jobs(jobs: &[NewJob]) -> Result<(), StoreError> {
    for (i, job) in jobs.iter().enumerate() {
        job.validate()
            .map_err(|e| StoreError::Invalid(format!("job #{i} of the request: {e}")))?;
    }
    Ok(())
}

/// What a claim asks for: up to `limit` rows of `dest` due at `now`,
/// leased to `owner` until `lease_until`. Each backend binds it in one
/// order for jobs and imports alike, so one helper runs both claims.
pub(crate) struct Claim {
    /// The destination whose rows are claimed.
    pub dest: String,
    /// The lease owner the rows are claimed for.
    pub owner: String,
    /// At most this many rows.
    pub limit: usize,
    /// Rows due by then; also the write time.
    pub now: Timestamp,
    /// When the new leases expire.
    pub lease_until: Timestamp,
}

impl Claim {
    /// The claim `JobStore::claim_jobs`/`claim_due_imports` were called with.
    pub(crate) fn new(
        dest: &str,
        owner: &str,
        limit: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Self {
        Claim {
            dest: dest.to_string(),
            owner: owner.to_string(),
            limit,
            now,
            lease_until,
        }
    }
}

/// Which jobs a transition may touch: those still held in the expected state.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Fence<'a> {
    /// `executing`, claimed by this lease owner.
    Executing(&'a str),
    /// `importing` under this import.
    Importing(ImportId),
}

/// The column values one transition writes (`error_code`/`error_message`
/// from `error`; `next_attempt_at` is left as it is when `None`).
#[derive(Debug, PartialEq)]
pub(crate) struct TransitionColumns<'a> {
    /// The job's new state.
    pub state: JobState,
    /// Why it failed or aborted.
    pub error: Option<&'a JobError>,
    /// Kept on a delivered job.
    pub note: Option<&'a str>,
    /// The destination's id for a delivered record.
    pub external_id: Option<&'a str>,
    /// When a failed job is due again.
    pub next_attempt_at: Option<i64>,
    /// Set when the job reaches a final state.
    pub completed_at: Option<i64>,
}

impl<'a> TransitionColumns<'a> {
    /// The columns `t` writes at `now` (milliseconds).
    pub fn of(t: &'a Transition, now: i64) -> Self {
        let base = TransitionColumns {
            state: JobState::Waiting,
            error: None,
            note: None,
            external_id: None,
            next_attempt_at: None,
            completed_at: None,
        };
        match t {
            Transition::Succeeded { note, external_id } => TransitionColumns {
                state: JobState::Succeeded,
                note: note.as_deref(),
                external_id: external_id.as_deref(),
                completed_at: Some(now),
                ..base
            },
            Transition::Failed {
                error,
                next_attempt_at,
            } => TransitionColumns {
                state: JobState::Failed,
                error: Some(error),
                next_attempt_at: Some(next_attempt_at.0),
                ..base
            },
            Transition::Aborted { error } => TransitionColumns {
                state: JobState::Aborted,
                error: Some(error),
                completed_at: Some(now),
                ..base
            },
        }
    }
}

/// Attempted jobs of an upload that neither transition nor import: their
/// attempt is still counted, by a write of its own.
pub(crate) fn attempted_only(commit: &UploadCommit, attempted: &HashSet<JobId>) -> Vec<JobId> {
    let covered: HashSet<JobId> = commit
        .transitions
        .iter()
        .map(|t| t.job_id)
        .chain(
            commit
                .imports
                .iter()
                .flat_map(|i| i.job_ids.iter().copied()),
        )
        .collect();
    let mut ids: Vec<JobId> = attempted
        .iter()
        .copied()
        .filter(|id| !covered.contains(id))
        .collect();
    ids.sort_unstable();
    ids
}

/// The states a re-drive may move back to `waiting`, as stored words; the
/// others asked for are ignored.
pub(crate) fn redrivable(states: &[JobState]) -> Vec<&'static str> {
    states
        .iter()
        .filter(|s| matches!(s, JobState::Aborted | JobState::Failed))
        .map(|s| s.as_str())
        .collect()
}

/// A destination's counts before any row is seen: every state at zero.
pub(crate) fn empty_counts() -> DestinationCounts {
    DestinationCounts {
        by_state: JobState::ALL.into_iter().map(|s| (s, 0)).collect(),
        imports_in_flight: 0,
    }
}

/// A stored error code and message as the contract's error.
pub(crate) fn error_of(code: Option<String>, message: Option<String>) -> Option<JobError> {
    code.map(|c| JobError::new(ErrorCode::parse(&c), message.unwrap_or_default()))
}

/// `next_attempt_at` as the API shows it: only while the job waits for it.
pub(crate) fn shown_next_attempt(state: JobState, next_attempt_at: i64) -> Option<Timestamp> {
    matches!(state, JobState::Waiting | JobState::Failed).then_some(Timestamp(next_attempt_at))
}

/// The `error_code` and `error_message` columns of an optional error.
pub(crate) fn error_columns(error: Option<&JobError>) -> (Option<&'static str>, Option<&str>) {
    match error {
        Some(e) => (Some(e.code.as_str()), Some(e.message.as_str())),
        None => (None, None),
    }
}

/// What a recovery took back, from the three row counts in the order jobs,
/// imports, slots.
pub(crate) fn recovery_report(jobs: u64, imports: u64, slots: u64) -> RecoveryReport {
    RecoveryReport {
        jobs_released: jobs,
        imports_released: imports,
        slots_released: slots,
    }
}

/// The quoted words in `sql` that are not state words of `JobState` or
/// `ImportState` (besides `allowed`), so a test can pin the literals that
/// static SQL keeps to `as_str()`.
#[cfg(test)]
pub(crate) fn unknown_state_words<'s>(sql: &'s str, allowed: &[&str]) -> Vec<&'s str> {
    use batchrouter_core::store::ImportState;
    sql.split('\'')
        .skip(1)
        .step_by(2)
        .filter(|w| !allowed.contains(w))
        .filter(|w| {
            !JobState::ALL.iter().any(|s| s.as_str() == *w) && ImportState::parse(w).is_err()
        })
        .collect()
}

/// Fails naming the statement when one of `statements` quotes a word that
/// is not a state word (nor in `allowed`).
#[cfg(test)]
pub(crate) fn assert_state_words(statements: &[&str], allowed: &[&str]) {
    for sql in statements {
        let unknown = unknown_state_words(sql, allowed);
        assert!(unknown.is_empty(), "{unknown:?} in {sql}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchrouter_core::store::ImportToCreate;

    #[test]
    fn transitions_map_to_their_columns() {
        let error = JobError::new(ErrorCode::DestinationRejected, "no");
        let ok = Transition::Succeeded {
            note: Some("n".into()),
            external_id: Some("x".into()),
        };
        let c = TransitionColumns::of(&ok, 7);
        assert_eq!(
            (
                c.state,
                c.note,
                c.external_id,
                c.error,
                c.next_attempt_at,
                c.completed_at
            ),
            (
                JobState::Succeeded,
                Some("n"),
                Some("x"),
                None,
                None,
                Some(7)
            )
        );
        let failed = Transition::Failed {
            error: error.clone(),
            next_attempt_at: Timestamp(9),
        };
        let c = TransitionColumns::of(&failed, 7);
        assert_eq!(
            (c.state, c.error, c.next_attempt_at, c.completed_at),
            (JobState::Failed, Some(&error), Some(9), None)
        );
        let aborted = Transition::Aborted {
            error: error.clone(),
        };
        let c = TransitionColumns::of(&aborted, 7);
        assert_eq!(
            (c.state, c.error, c.next_attempt_at, c.completed_at),
            (JobState::Aborted, Some(&error), None, Some(7))
        );
    }

    #[test]
    fn only_uncovered_attempts_are_counted_alone() {
        let commit = UploadCommit {
            destination_id: "d".into(),
            owner: "o".into(),
            attempted: vec![1, 2, 3, 4],
            transitions: vec![batchrouter_core::store::JobTransition {
                job_id: 1,
                to: Transition::Succeeded {
                    note: None,
                    external_id: None,
                },
            }],
            imports: vec![ImportToCreate {
                batch_id: "b".into(),
                context: serde_json::json!({}),
                job_ids: vec![2],
                next_poll_at: Timestamp(0),
                deadline_at: Timestamp(0),
            }],
            slot: None,
            import_lease_until: Timestamp(0),
            now: Timestamp(0),
        };
        let attempted = commit.attempted.iter().copied().collect();
        assert_eq!(attempted_only(&commit, &attempted), vec![3, 4]);
    }

    #[test]
    fn only_failed_and_aborted_are_redriven() {
        assert_eq!(
            redrivable(&JobState::ALL),
            vec![JobState::Failed.as_str(), JobState::Aborted.as_str()]
        );
    }

    #[test]
    fn state_word_check_finds_strangers() {
        assert_eq!(
            unknown_state_words(
                "state IN ('waiting', 'pending', 'done') AND x = 'y'",
                &["y"]
            ),
            vec!["done"]
        );
    }
}
