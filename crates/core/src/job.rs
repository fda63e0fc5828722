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

/// Longest accepted `messageId`, in characters (Unicode scalar values), so an
/// id of emoji is judged like an id of ASCII letters.
pub const MAX_MESSAGE_ID_CHARS: usize = 256;

/// Deepest nesting of objects and arrays accepted in a payload: deeper
/// records break receivers' parsers and renderers, so they are refused at the
/// door instead of poisoning a batch later.
pub const MAX_PAYLOAD_DEPTH: usize = 64;

/// Why a job cannot be stored; every entry point (API, `enqueue`, both
/// stores) refuses the same inputs with the same words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobValidationError {
    /// The destination id is empty.
    #[error("destinationId must not be empty")]
    EmptyDestination,
    /// The payload text is not a JSON object.
    #[error("payload must be a JSON object")]
    PayloadNotObject,
    /// The payload nests objects/arrays deeper than [`MAX_PAYLOAD_DEPTH`].
    #[error("payload nests objects/arrays deeper than {MAX_PAYLOAD_DEPTH} levels")]
    PayloadTooDeep,
    /// The message id is empty or longer than [`MAX_MESSAGE_ID_CHARS`].
    #[error("messageId must be 1 to {MAX_MESSAGE_ID_CHARS} characters")]
    MessageIdLength,
    /// A field holds a NUL character, which PostgreSQL text cannot store.
    #[error("{0} contains a NUL character")]
    Nul(&'static str),
}

impl NewJob {
    /// Checks what every store and entry point requires of a job, so a job
    /// accepted by one path is accepted by all and none fails half-way.
    /// The payload is assumed to be JSON text already (parsing is the
    /// caller's, which also reports where the syntax broke).
    pub fn validate(&self) -> Result<(), JobValidationError> {
        if self.destination_id.is_empty() {
            return Err(JobValidationError::EmptyDestination);
        }
        if self.destination_id.contains('\0') {
            return Err(JobValidationError::Nul("destinationId"));
        }
        if !self.payload.trim_start().starts_with('{') {
            return Err(JobValidationError::PayloadNotObject);
        }
        if self.payload.contains('\0') {
            return Err(JobValidationError::Nul("payload"));
        }
        if json_depth(&self.payload) > MAX_PAYLOAD_DEPTH {
            return Err(JobValidationError::PayloadTooDeep);
        }
        if let Some(m) = &self.message_id {
            let chars = m.chars().count();
            if chars == 0 || chars > MAX_MESSAGE_ID_CHARS {
                return Err(JobValidationError::MessageIdLength);
            }
            if m.contains('\0') {
                return Err(JobValidationError::Nul("messageId"));
            }
        }
        Ok(())
    }
}

/// Deepest nesting of `{}`/`[]` in JSON text, found by one scan without
/// recursion (so a hostile document cannot exhaust the stack measuring it).
pub fn json_depth(text: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in text.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

#[cfg(test)]
mod validation_tests {
    use super::*;

    fn job(payload: &str, mid: Option<&str>) -> NewJob {
        NewJob {
            destination_id: "d".into(),
            payload: payload.into(),
            message_id: mid.map(str::to_string),
        }
    }

    #[test]
    fn measures_depth_outside_strings() {
        assert_eq!(json_depth("{}"), 1);
        assert_eq!(json_depth(r#"{"a":[{"b":1}]}"#), 3);
        assert_eq!(json_depth(r#"{"a":"[[[[{{\"]]"}"#), 1);
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(json_depth(&deep), 10_000);
    }

    #[test]
    fn refuses_what_no_store_can_take() {
        assert_eq!(job("{}", None).validate(), Ok(()));
        let at_limit = format!(
            "{}{}",
            "{\"a\":".repeat(MAX_PAYLOAD_DEPTH - 1) + "{",
            "}".repeat(MAX_PAYLOAD_DEPTH)
        );
        assert_eq!(job(&at_limit, None).validate(), Ok(()));
        let too_deep = format!("{{\"a\":{}", at_limit) + "}";
        assert_eq!(
            job(&too_deep, None).validate(),
            Err(JobValidationError::PayloadTooDeep)
        );
        assert_eq!(
            job("[1]", None).validate(),
            Err(JobValidationError::PayloadNotObject)
        );
        assert_eq!(
            job("{}", Some("")).validate(),
            Err(JobValidationError::MessageIdLength)
        );
        // 256 emoji are 256 characters (1,024 bytes): accepted.
        let emoji = "😀".repeat(MAX_MESSAGE_ID_CHARS);
        assert_eq!(job("{}", Some(&emoji)).validate(), Ok(()));
        let long = "😀".repeat(MAX_MESSAGE_ID_CHARS + 1);
        assert_eq!(
            job("{}", Some(&long)).validate(),
            Err(JobValidationError::MessageIdLength)
        );
        assert_eq!(
            job("{}", Some("a\0b")).validate(),
            Err(JobValidationError::Nul("messageId"))
        );
        let mut empty_dest = job("{}", None);
        empty_dest.destination_id.clear();
        assert_eq!(
            empty_dest.validate(),
            Err(JobValidationError::EmptyDestination)
        );
    }
}
