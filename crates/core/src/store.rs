//! The job store contract, shaped so that both an embedded SQLite file and a
//! PostgreSQL database shared by many daemons (SKIP LOCKED claims, leases,
//! fenced transitions) implement it without change.

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::job::{ImportId, Job, JobId, JobState, NewJob, Timestamp};
use crate::outcome::JobError;

/// Result of inserting one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inserted {
    /// The new job's id, or the existing one for a duplicate message id.
    pub job_id: JobId,
    /// The message id was already known for this destination.
    pub duplicate: bool,
}

/// Where a job goes next; every transition is fenced on the current owner
/// and expected state, so a process that lost its lease cannot overwrite
/// what another did.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// Delivered.
    Succeeded {
        /// Kept on the job (e.g. a destination warning).
        note: Option<String>,
        /// The destination's id for the record.
        external_id: Option<String>,
    },
    /// Retry at `next_attempt_at`.
    Failed {
        /// Why.
        error: JobError,
        /// When the job becomes due again.
        next_attempt_at: Timestamp,
    },
    /// Give up for good.
    Aborted {
        /// Why.
        error: JobError,
    },
}

/// One job's transition.
#[derive(Clone, Debug, PartialEq)]
pub struct JobTransition {
    /// The job.
    pub job_id: JobId,
    /// Its new state and details.
    pub to: Transition,
}

/// An import to persist together with the upload's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportToCreate {
    /// The batch that produced it.
    pub batch_id: String,
    /// The manager's opaque context.
    pub context: serde_json::Value,
    /// Jobs it covers; they move to `importing`.
    pub job_ids: Vec<JobId>,
    /// First poll time.
    pub next_poll_at: Timestamp,
    /// After this the import fails with `deadline_exceeded`.
    pub deadline_at: Timestamp,
}

/// Everything an upload decided, written in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadCommit {
    /// Destination id (all jobs belong to it).
    pub destination_id: String,
    /// Lease owner that claimed the jobs.
    pub owner: String,
    /// Commit time.
    pub now: Timestamp,
    /// Jobs whose upload counts as an attempt (`attempts += 1`).
    pub attempted: Vec<JobId>,
    /// Imports started, with their jobs (they become `importing`).
    pub imports: Vec<ImportToCreate>,
    /// The other jobs' transitions out of `executing`.
    pub transitions: Vec<JobTransition>,
    /// The upload slot held for this upload, released in the same transaction.
    pub slot: Option<SlotId>,
    /// Lease for the new imports (the uploader polls them first).
    pub import_lease_until: Timestamp,
}

/// What a fenced write actually changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CommitReport {
    /// Job rows written.
    pub applied: usize,
    /// Jobs no longer held by this owner in the expected state (not written).
    pub rejected: Vec<JobId>,
    /// Ids of imports created, in the order given.
    pub import_ids: Vec<ImportId>,
}

/// Aggregate status of an import, as the API shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportState {
    /// Created, not yet seen running.
    Pending,
    /// The destination reports it running.
    Processing,
    /// Finished with every job succeeded.
    Completed,
    /// Finished and every job failed or aborted.
    Failed,
    /// Finished with a mix of outcomes.
    Partial,
}

impl ImportState {
    /// The contract word.
    pub fn as_str(self) -> &'static str {
        match self {
            ImportState::Pending => "pending",
            ImportState::Processing => "processing",
            ImportState::Completed => "completed",
            ImportState::Failed => "failed",
            ImportState::Partial => "partial",
        }
    }

    /// Parses a stored word.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "pending" => Ok(ImportState::Pending),
            "processing" => Ok(ImportState::Processing),
            "completed" => Ok(ImportState::Completed),
            "failed" => Ok(ImportState::Failed),
            "partial" => Ok(ImportState::Partial),
            other => Err(StoreError::Data(format!("unknown import state `{other}`"))),
        }
    }

    /// Still waiting for the destination.
    pub fn in_flight(self) -> bool {
        matches!(self, ImportState::Pending | ImportState::Processing)
    }
}

/// An import as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportRecord {
    /// Store id.
    pub id: ImportId,
    /// Destination id.
    pub destination_id: String,
    /// Batch that started it.
    pub batch_id: String,
    /// The manager's context.
    pub context: serde_json::Value,
    /// Current aggregate state.
    pub state: ImportState,
    /// Jobs it covered at creation.
    pub job_count: u64,
    /// Outcome counts once finished.
    pub succeeded: u64,
    /// Outcome counts once finished.
    pub failed: u64,
    /// Outcome counts once finished.
    pub aborted: u64,
    /// Destination-reported progress, 0–100.
    pub progress: u8,
    /// Why it failed, or the last poll error while still in flight.
    pub error: Option<JobError>,
    /// Polls that errored (they never fail the import by themselves).
    pub poll_errors: u32,
    /// Creation time.
    pub started_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When it finished.
    pub completed_at: Option<Timestamp>,
    /// Next poll.
    pub next_poll_at: Timestamp,
    /// Deadline for the destination to finish.
    pub deadline_at: Timestamp,
}

/// A poll that did not finish the import: reschedule it.
#[derive(Clone, Debug, PartialEq)]
pub struct PollUpdate {
    /// The import.
    pub import_id: ImportId,
    /// Import lease owner (fence).
    pub owner: String,
    /// New state (pending or processing).
    pub state: ImportState,
    /// New progress, when known.
    pub progress: Option<u8>,
    /// Set when the poll itself errored (counts `poll_errors`).
    pub poll_error: Option<JobError>,
    /// Next poll time.
    pub next_poll_at: Timestamp,
    /// Lease extension.
    pub lease_until: Timestamp,
    /// Write time.
    pub now: Timestamp,
}

/// Final word on an import and its jobs, written in one transaction.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportFinish {
    /// The import.
    pub import_id: ImportId,
    /// Import lease owner (fence).
    pub owner: String,
    /// Completed, failed or partial.
    pub state: ImportState,
    /// Why the import failed as a whole, if it did.
    pub error: Option<JobError>,
    /// Transitions of its jobs out of `importing`.
    pub transitions: Vec<JobTransition>,
    /// Write time.
    pub now: Timestamp,
}

impl ImportFinish {
    /// Succeeded, failed and aborted counts of the transitions, which every
    /// store adds to the import's row.
    pub fn outcome_counts(&self) -> (i64, i64, i64) {
        let t = Tally::of(&self.transitions);
        (t.succeeded as i64, t.failed as i64, t.aborted as i64)
    }
}

/// Succeeded, failed (to be retried) and aborted counts of job transitions:
/// one count shared by the stores' import rows and the router's metrics,
/// logs and upload/import results, so they cannot disagree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Transitions to `succeeded`.
    pub succeeded: u64,
    /// Transitions back to `failed` (retried later).
    pub failed: u64,
    /// Transitions to `aborted`.
    pub aborted: u64,
}

impl Tally {
    /// Counts `transitions`.
    pub fn of(transitions: &[JobTransition]) -> Self {
        let mut t = Tally::default();
        for jt in transitions {
            t.add(&jt.to);
        }
        t
    }

    /// Counts one more transition.
    pub fn add(&mut self, to: &Transition) {
        match to {
            Transition::Succeeded { .. } => self.succeeded += 1,
            Transition::Failed { .. } => self.failed += 1,
            Transition::Aborted { .. } => self.aborted += 1,
        }
    }

    /// Every transition counted.
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed + self.aborted
    }
}

/// Retry bookkeeping of an importing job, to decide exhaustion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttemptInfo {
    /// The job.
    pub job_id: JobId,
    /// Uploads so far.
    pub attempts: u32,
    /// Attempts at the last re-drive.
    pub retry_base: u32,
    /// Start of the retry window.
    pub first_attempt_at: Option<Timestamp>,
    /// Creation time (window start when never attempted).
    pub created_at: Timestamp,
}

/// A job with everything the API shows.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Id.
    pub id: JobId,
    /// Destination id.
    pub destination_id: String,
    /// Message id, when given.
    pub message_id: Option<String>,
    /// Current state.
    pub state: JobState,
    /// Uploads tried.
    pub attempts: u32,
    /// Next attempt time, for waiting/failed jobs.
    pub next_attempt_at: Option<Timestamp>,
    /// Last error of a failed or aborted job.
    pub error: Option<JobError>,
    /// A note kept on success (e.g. a warning).
    pub note: Option<String>,
    /// Destination's id for the record.
    pub external_id: Option<String>,
    /// Import that decides (or decided) the job.
    pub import_id: Option<ImportId>,
    /// Creation time.
    pub created_at: Timestamp,
    /// Last change.
    pub updated_at: Timestamp,
    /// When it reached a terminal state.
    pub completed_at: Option<Timestamp>,
}

/// Per-destination counts for the API and the gauges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DestinationCounts {
    /// Jobs per state (every state present, zero when none).
    pub by_state: BTreeMap<JobState, u64>,
    /// Imports still pending or processing.
    pub imports_in_flight: u64,
}

/// What start-up or expiry recovery took back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// `executing` jobs put back to `waiting`.
    pub jobs_released: u64,
    /// Imports whose lease was freed for polling.
    pub imports_released: u64,
    /// Upload slots freed.
    pub slots_released: u64,
}

/// Leases a running daemon renews while their work runs (a heartbeat), so
/// every lease can be short (`leaseTimeout`) however long an upload or a
/// poll takes. Only leases still held by `owner` are renewed (fenced).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseRenewal {
    /// The lease owner (this daemon's identity).
    pub owner: String,
    /// Claimed jobs (`executing`) to keep.
    pub jobs: Vec<JobId>,
    /// Imports in flight being polled to keep.
    pub imports: Vec<ImportId>,
    /// Upload slots held to keep.
    pub slots: Vec<SlotId>,
    /// New expiry of every renewed lease.
    pub lease_until: Timestamp,
}

/// How many of the asked-for leases were still ours and were renewed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenewReport {
    /// Jobs renewed.
    pub jobs: u64,
    /// Imports renewed.
    pub imports: u64,
    /// Slots renewed.
    pub slots: u64,
}

/// The outcome of asking to retry one job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryResult {
    /// Back to `waiting` with a fresh budget.
    Retried,
    /// No such job.
    NotFound,
    /// The job is neither aborted nor failed.
    Conflict(JobState),
}

/// Handle of a held upload slot (see [`JobStore::acquire_upload_slot`]).
pub type SlotId = i64;

/// Durable home of jobs and imports. Every method that changes several rows
/// does so in one transaction, in a bounded number of statements.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Inserts jobs all or nothing; a repeated `(destination_id, message_id)`
    /// answers the existing job with `duplicate = true`.
    async fn insert_jobs(
        &self,
        jobs: Vec<NewJob>,
        now: Timestamp,
    ) -> Result<Vec<Inserted>, StoreError>;

    /// Claims up to `limit` due `waiting`/`failed` jobs of a destination,
    /// longest due first (`next_attempt_at`, then id), moving them to
    /// `executing` under `owner`'s lease. One statement.
    async fn claim_jobs(
        &self,
        destination_id: &str,
        owner: &str,
        limit: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Vec<Job>, StoreError>;

    /// Extends the lease of jobs still held by `owner`; returns how many.
    async fn extend_job_leases(
        &self,
        owner: &str,
        job_ids: &[JobId],
        lease_until: Timestamp,
    ) -> Result<usize, StoreError>;

    /// Puts claimed jobs back to `waiting` without consuming an attempt.
    async fn release_jobs(
        &self,
        owner: &str,
        job_ids: &[JobId],
        now: Timestamp,
    ) -> Result<usize, StoreError>;

    /// Moves claimed jobs out of `executing` without an upload (e.g. transform
    /// failures), fenced on `owner`.
    async fn transition_executing(
        &self,
        owner: &str,
        transitions: Vec<JobTransition>,
        now: Timestamp,
    ) -> Result<CommitReport, StoreError>;

    /// Takes an upload slot for a destination if fewer than `max` uploads and
    /// imports are in flight (across every process sharing the store).
    async fn acquire_upload_slot(
        &self,
        destination_id: &str,
        owner: &str,
        max: u32,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Option<SlotId>, StoreError>;

    /// Frees a slot taken for an upload that ended without a commit.
    async fn release_upload_slot(&self, slot: SlotId) -> Result<(), StoreError>;

    /// Writes an upload's outcome: attempts, imports, transitions, slot release.
    async fn commit_upload(&self, commit: UploadCommit) -> Result<CommitReport, StoreError>;

    /// Claims imports of a destination that are due for a poll.
    async fn claim_due_imports(
        &self,
        destination_id: &str,
        owner: &str,
        limit: usize,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<Vec<ImportRecord>, StoreError>;

    /// Retry bookkeeping of the jobs still importing under an import.
    async fn importing_jobs(&self, import_id: ImportId) -> Result<Vec<AttemptInfo>, StoreError>;

    /// Reschedules an unfinished import; false when the lease was lost.
    async fn record_poll(&self, update: PollUpdate) -> Result<bool, StoreError>;

    /// Finishes an import and its jobs; rejects everything if the lease was lost.
    async fn finish_import(&self, finish: ImportFinish) -> Result<CommitReport, StoreError>;

    /// Earliest next poll among the destination's imports in flight.
    async fn next_poll_due(&self, destination_id: &str) -> Result<Option<Timestamp>, StoreError>;

    /// Start-up recovery. An exclusive store (SQLite) takes back every lease
    /// at once; a shared one (PostgreSQL) only expired leases.
    async fn recover(&self, now: Timestamp) -> Result<RecoveryReport, StoreError>;

    /// Takes back leases that expired (work held by a dead process).
    async fn reclaim_expired(&self, now: Timestamp) -> Result<RecoveryReport, StoreError>;

    /// Renews the given leases still held by `renewal.owner` (jobs still
    /// `executing`, imports still in flight, slots), in one transaction.
    async fn renew_leases(&self, renewal: LeaseRenewal) -> Result<RenewReport, StoreError>;

    /// Takes back at once every lease held by an earlier run of one daemon
    /// instance: owners spelled `prefix` followed by exactly `nonce_chars`
    /// more characters (a per-start nonce), except `current` (this run). A
    /// restarted daemon knows nothing they held is in progress, and a still
    /// running earlier run (a zombie pod) is fenced out of it from then on.
    async fn release_earlier_runs(
        &self,
        prefix: &str,
        nonce_chars: usize,
        current: &str,
        now: Timestamp,
    ) -> Result<RecoveryReport, StoreError>;

    /// Aborts (code `expired`, with `message`) `waiting` and `failed` jobs
    /// created before `before` and unchanged since (a re-drive
    /// restarts the clock), whatever their destination (configured or not),
    /// at most `limit` per call; answers how many per destination id.
    async fn expire_jobs(
        &self,
        before: Timestamp,
        message: &str,
        now: Timestamp,
        limit: usize,
    ) -> Result<BTreeMap<String, u64>, StoreError>;

    /// One job, for the API.
    async fn get_job(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// One import, for the API.
    async fn get_import(&self, id: ImportId) -> Result<Option<ImportRecord>, StoreError>;

    /// Counts per destination and state, for the API and gauges.
    async fn destination_counts(&self) -> Result<BTreeMap<String, DestinationCounts>, StoreError>;

    /// Puts an aborted or failed job back to `waiting` with a fresh budget.
    async fn retry_job(&self, id: JobId, now: Timestamp) -> Result<RetryResult, StoreError>;

    /// Puts every job of a destination in one of `states` back to `waiting`.
    async fn redrive(
        &self,
        destination_id: &str,
        states: &[JobState],
        now: Timestamp,
    ) -> Result<u64, StoreError>;

    /// Deletes terminal jobs (and finished imports) completed before `before`,
    /// at most `limit` rows per call so no lock is held long.
    async fn sweep_terminal(&self, before: Timestamp, limit: usize) -> Result<u64, StoreError>;

    /// Cheap liveness check for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Commits a tiny write that changes no data, so `/readyz` reports a
    /// store that answers reads but refuses writes (disk full, read-only).
    async fn probe_write(&self) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, JobError};

    #[test]
    fn one_tally_counts_import_rows_and_metrics_alike() {
        let err = || JobError::new(ErrorCode::DestinationUnavailable, "503");
        let to = [
            Transition::Succeeded {
                note: None,
                external_id: None,
            },
            Transition::Failed {
                error: err(),
                next_attempt_at: Timestamp(1),
            },
            Transition::Aborted { error: err() },
            Transition::Aborted { error: err() },
        ];
        let transitions: Vec<JobTransition> = to
            .into_iter()
            .enumerate()
            .map(|(i, to)| JobTransition {
                job_id: i as JobId + 1,
                to,
            })
            .collect();
        let t = Tally::of(&transitions);
        assert_eq!(
            t,
            Tally {
                succeeded: 1,
                failed: 1,
                aborted: 2
            }
        );
        assert_eq!(t.total(), 4);
        let f = ImportFinish {
            import_id: 1,
            owner: "o".into(),
            state: ImportState::Partial,
            error: None,
            transitions,
            now: Timestamp(0),
        };
        assert_eq!(f.outcome_counts(), (1, 1, 2));
    }
}
