//! Typed errors with stable, documented codes.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a job failed or was aborted, as a stable machine-readable word. These
/// strings are stored with the job and shown by the API, so dashboards and
/// scripts can rely on them; never rename one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The destination could not turn the payload into a line (bad record).
    TransformFailed,
    /// The destination refused the request or record for good (4xx, auth, host key).
    DestinationRejected,
    /// The destination imported the batch but rejected this record.
    RecordRejected,
    /// A transient destination or transport problem (5xx, reset, timeout); retried.
    DestinationUnavailable,
    /// The destination asked us to slow down (429, rate-limit codes); retried later.
    Throttled,
    /// The destination reported its asynchronous import as failed.
    ImportFailed,
    /// An upload or import took longer than its configured deadline.
    DeadlineExceeded,
    /// `maxRetries` and `retryTimeWindow` both ran out; the last reason is kept.
    RetriesExhausted,
    /// The import completed but its per-record results could not be read
    /// before `asyncImportDeadline`; not re-uploaded, re-drivable.
    ResultsUnavailable,
    /// Waited longer than `jobRetention` without being delivered (unknown destination, or a backlog that never drained).
    Expired,
    /// The manager's output broke the contract (lost or duplicated a job): a bug.
    InvalidOutput,
    /// The destination could not be set up (bad config, init failure).
    DestinationMisconfigured,
    /// Something inside batchrouter failed (staging I/O, store); retried.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation and exhaustive tests.
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::TransformFailed,
        ErrorCode::DestinationRejected,
        ErrorCode::RecordRejected,
        ErrorCode::DestinationUnavailable,
        ErrorCode::Throttled,
        ErrorCode::ImportFailed,
        ErrorCode::DeadlineExceeded,
        ErrorCode::RetriesExhausted,
        ErrorCode::ResultsUnavailable,
        ErrorCode::Expired,
        ErrorCode::InvalidOutput,
        ErrorCode::DestinationMisconfigured,
        ErrorCode::Internal,
    ];

    /// The stable word stored with the job.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TransformFailed => "transform_failed",
            ErrorCode::DestinationRejected => "destination_rejected",
            ErrorCode::RecordRejected => "record_rejected",
            ErrorCode::DestinationUnavailable => "destination_unavailable",
            ErrorCode::Throttled => "throttled",
            ErrorCode::ImportFailed => "import_failed",
            ErrorCode::DeadlineExceeded => "deadline_exceeded",
            ErrorCode::RetriesExhausted => "retries_exhausted",
            ErrorCode::ResultsUnavailable => "results_unavailable",
            ErrorCode::Expired => "expired",
            ErrorCode::InvalidOutput => "invalid_output",
            ErrorCode::DestinationMisconfigured => "destination_misconfigured",
            ErrorCode::Internal => "internal_error",
        }
    }

    /// Parses a stored code; unknown words (from a newer version) map to `Internal`.
    pub fn parse(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Internal)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A payload a destination cannot turn into a staged line; aborts that job alone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransformError(pub String);

impl TransformError {
    /// Builds the error from any message, so call sites stay one line.
    pub fn new(message: impl Into<String>) -> Self {
        TransformError(message.into())
    }
}

/// A classified failure talking to a destination. The class decides what
/// happens to the jobs: retry later, slow down, or give up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// Transient (5xx, reset, timeout, malformed answer); try again later.
    #[error("destination unavailable: {message}")]
    Retryable {
        /// Human explanation, free of secrets.
        message: String,
        /// The destination's own hint, when it gave one.
        retry_after: Option<Duration>,
    },
    /// Rate limited or over quota; try again after the hint or the backoff.
    #[error("throttled by destination: {message}")]
    Throttled {
        /// Human explanation, free of secrets.
        message: String,
        /// The destination's own hint, when it gave one.
        retry_after: Option<Duration>,
    },
    /// Refused for good (bad request, auth, host key); retrying cannot help.
    #[error("rejected by destination: {message}")]
    Permanent {
        /// Human explanation, free of secrets.
        message: String,
    },
}

impl DestinationError {
    /// A transient error without a hint.
    pub fn retryable(message: impl Into<String>) -> Self {
        DestinationError::Retryable {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A throttle with an optional hint.
    pub fn throttled(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        DestinationError::Throttled {
            message: message.into(),
            retry_after,
        }
    }

    /// A permanent refusal.
    pub fn permanent(message: impl Into<String>) -> Self {
        DestinationError::Permanent {
            message: message.into(),
        }
    }

    /// The job error code this class maps to.
    pub fn code(&self) -> ErrorCode {
        match self {
            DestinationError::Retryable { .. } => ErrorCode::DestinationUnavailable,
            DestinationError::Throttled { .. } => ErrorCode::Throttled,
            DestinationError::Permanent { .. } => ErrorCode::DestinationRejected,
        }
    }

    /// The destination's hint for when to try again.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DestinationError::Retryable { retry_after, .. }
            | DestinationError::Throttled { retry_after, .. } => *retry_after,
            DestinationError::Permanent { .. } => None,
        }
    }

    /// The explanation without the class prefix.
    pub fn message(&self) -> &str {
        match self {
            DestinationError::Retryable { message, .. }
            | DestinationError::Throttled { message, .. }
            | DestinationError::Permanent { message } => message,
        }
    }
}

/// A job store failure. Stores never lose data on error: the transaction that
/// failed is rolled back whole.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("store backend error: {0}")]
    Backend(String),
    /// Stored data could not be decoded (corruption or a newer schema).
    #[error("store data error: {0}")]
    Data(String),
    /// The store cannot be used (unreachable, incompatible schema).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Another process owns the store (the SQLite file lock).
    #[error("store locked: {0}")]
    Locked(String),
    /// The caller asked for something invalid (e.g. an empty destination id).
    #[error("invalid store request: {0}")]
    Invalid(String),
}
