//! Jobs as the router and the destinations see them.

use std::fmt;
use std::ops::{Add, Sub};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Store-assigned job identifier; stable for the job's whole life so outcomes
/// can always be matched back to it.
pub type JobId = i64;

/// Store-assigned identifier of one asynchronous import in flight.
pub type ImportId = i64;

/// Milliseconds since the Unix epoch (UTC): one integer column in every store
/// and cheap to compare, so deadlines and due times need no calendar maths.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The wall clock now; every deadline and due time starts here.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(since.as_millis() as i64)
    }

    /// Raw milliseconds, for storage and for formatting by callers.
    pub fn as_millis(self) -> i64 {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, zero when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_millis((self.0 - earlier.0).max(0) as u64)
    }

    /// How long until `self` from `now`, zero when already past.
    pub fn until(self, now: Timestamp) -> Duration {
        self.since(now)
    }
}

impl Add<Duration> for Timestamp {
    type Output = Timestamp;
    fn add(self, rhs: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_add(rhs.as_millis().min(i64::MAX as u128) as i64),
        )
    }
}

impl Sub<Duration> for Timestamp {
    type Output = Timestamp;
    fn sub(self, rhs: Duration) -> Timestamp {
        Timestamp(
            self.0
                .saturating_sub(rhs.as_millis().min(i64::MAX as u128) as i64),
        )
    }
}

/// The lifecycle of a job; the words are part of the store and API contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// New, or due again at its next attempt time.
    Waiting,
    /// Claimed under a lease and being staged or uploaded.
    Executing,
    /// Uploaded; the destination's asynchronous import is in progress.
    Importing,
    /// Delivered (terminal).
    Succeeded,
    /// Failed but retryable; due again after backoff.
    Failed,
    /// Given up for good (terminal) with a code and a reason.
    Aborted,
}

impl JobState {
    /// Every state, in lifecycle order, for per-state counts and gauges.
    pub const ALL: [JobState; 6] = [
        JobState::Waiting,
        JobState::Executing,
        JobState::Importing,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Aborted,
    ];

    /// The contract word stored in the database and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Waiting => "waiting",
            JobState::Executing => "executing",
            JobState::Importing => "importing",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Aborted => "aborted",
        }
    }

    /// Terminal states never change again unless an operator re-drives them.
    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Aborted)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown job state `{s}`"))
    }
}

/// A job as handed to a destination's `transform`: its payload plus the
/// bookkeeping the router needs to decide retries.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Store identifier.
    pub id: JobId,
    /// Configured destination the job is bound for.
    pub destination_id: String,
    /// The record as JSON text, exactly as it was enqueued.
    pub payload: String,
    /// Upstream's idempotency key, unique per destination when present.
    pub message_id: Option<String>,
    /// Uploads tried so far (0 while new).
    pub attempts: u32,
    /// `attempts` at the last re-drive: the retry budget counts from here.
    pub retry_base: u32,
    /// First upload since the last re-drive; the retry window counts from here.
    pub first_attempt_at: Option<Timestamp>,
    /// When the job entered the store.
    pub created_at: Timestamp,
}

/// A job to insert, from the API, the CLI or a test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NewJob {
    /// Configured destination id.
    pub destination_id: String,
    /// The record as JSON text.
    pub payload: String,
    /// Optional idempotency key; a repeat for the same destination is a duplicate.
    pub message_id: Option<String>,
}
