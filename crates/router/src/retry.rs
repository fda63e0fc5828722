//! Retry decisions: exponential backoff with jitter, until both the attempt
//! budget and the retry window are spent. Pure functions, so they are tested exactly.

use std::time::Duration;

use batchrouter_core::store::{AttemptInfo, Transition};
use batchrouter_core::{ErrorCode, JobError, Timestamp};

use crate::settings::RouterSettings;

/// The backoff before attempt `attempt + 1`: `min * 2^(attempt-1)` capped at
/// `max`, then "equal jitter" (half fixed, half random) so retries of a
/// batch spread out without ever retrying immediately.
pub fn backoff(settings: &RouterSettings, attempt: u32, rand01: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = settings
        .min_retry_backoff
        .saturating_mul(1u32 << exp)
        .min(settings.max_retry_backoff);
    let half = base / 2;
    half + half.mul_f64(rand01.clamp(0.0, 1.0))
}

/// Where a job goes after a retryable failure: back to `failed` with a due
/// time, or `aborted` with `retries_exhausted` once the budget **and** the
/// window are both spent (RudderStack's rule: a job is given up only after
/// more than `maxRetries` retries and `retryTimeWindow` since its first
/// upload). `attempts` already counts the upload that just failed.
pub fn after_failure(
    settings: &RouterSettings,
    job: &AttemptInfo,
    error: JobError,
    now: Timestamp,
    not_before: Option<Timestamp>,
    rand01: f64,
) -> Transition {
    let used = job.attempts.saturating_sub(job.retry_base);
    let window_start = job.first_attempt_at.unwrap_or(job.created_at);
    let budget_spent = used > settings.max_retries;
    let window_spent = now.since(window_start) >= settings.retry_time_window;
    if budget_spent && window_spent {
        return Transition::Aborted {
            error: JobError::new(
                ErrorCode::RetriesExhausted,
                format!(
                    "gave up after {used} upload attempt(s) over {} (maxRetries {} and \
                     retryTimeWindow {} both spent); last error ({}): {}",
                    crate::settings::fmt_duration(Duration::from_secs(
                        now.since(window_start).as_secs()
                    )),
                    settings.max_retries,
                    crate::settings::fmt_duration(settings.retry_time_window),
                    error.code,
                    error.message
                ),
            ),
        };
    }
    let mut next = now + backoff(settings, used.max(1), rand01);
    if let Some(nb) = not_before {
        next = next.max(nb);
    }
    Transition::Failed {
        error,
        next_attempt_at: next,
    }
}

/// Asserts that `t` gives a job up with `retries_exhausted` and a message
/// naming every one of `parts` (shared by the retry and decision tests).
#[cfg(test)]
pub(crate) fn assert_exhausted(t: &Transition, parts: &[&str]) {
    match t {
        Transition::Aborted { error } => {
            assert_eq!(error.code, ErrorCode::RetriesExhausted);
            for part in parts {
                assert!(error.message.contains(part), "{part}: {}", error.message);
            }
        }
        other => panic!("expected abort, got {other:?}"),
    }
}

/// The settings the retry and decision tests share: backoff 10 s to 5 min,
/// 3 retries, a 1 h window.
#[cfg(test)]
pub(crate) fn test_settings() -> RouterSettings {
    RouterSettings {
        min_retry_backoff: Duration::from_secs(10),
        max_retry_backoff: Duration::from_secs(300),
        max_retries: 3,
        retry_time_window: Duration::from_secs(3600),
        ..RouterSettings::default()
    }
}

#[cfg(test)]
mod tests {
    use super::test_settings as settings;
    use super::*;

    fn info(attempts: u32, retry_base: u32, first: i64) -> AttemptInfo {
        AttemptInfo {
            job_id: 1,
            attempts,
            retry_base,
            first_attempt_at: Some(Timestamp(first)),
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn backoff_doubles_with_equal_jitter_and_caps() {
        let s = settings();
        assert_eq!(backoff(&s, 1, 0.0), Duration::from_secs(5));
        assert_eq!(backoff(&s, 1, 1.0), Duration::from_secs(10));
        assert_eq!(backoff(&s, 2, 1.0), Duration::from_secs(20));
        assert_eq!(backoff(&s, 3, 0.5), Duration::from_secs(30));
        assert_eq!(backoff(&s, 6, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&s, 60, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&s, 60, 0.0), Duration::from_secs(150));
    }

    #[test]
    fn budget_allows_one_plus_max_retries_uploads_once_the_window_is_spent() {
        let s = RouterSettings {
            retry_time_window: Duration::ZERO,
            ..settings()
        };
        let err = JobError::new(ErrorCode::DestinationUnavailable, "HTTP 503");
        let now = Timestamp(1000);
        for attempts in 1..=3 {
            assert!(matches!(
                after_failure(&s, &info(attempts, 0, 0), err.clone(), now, None, 0.5),
                Transition::Failed { .. }
            ));
        }
        // The last reason is kept.
        assert_exhausted(
            &after_failure(&s, &info(4, 0, 0), err.clone(), now, None, 0.5),
            &["4 upload attempt(s)", "HTTP 503"],
        );
        // A re-drive gives a fresh budget while attempts keep the history.
        assert!(matches!(
            after_failure(&s, &info(5, 4, 0), err, now, None, 0.5),
            Transition::Failed { .. }
        ));
    }

    #[test]
    fn a_job_is_given_up_only_when_budget_and_window_are_both_spent() {
        let s = settings(); // 3 retries, 1 h window
        let err = JobError::new(ErrorCode::DestinationUnavailable, "HTTP 503");
        let early = Timestamp(60_000);
        let late = Timestamp(3_600_000);
        // Budget spent, window not: retried (RudderStack's rule).
        assert!(matches!(
            after_failure(&s, &info(10, 0, 0), err.clone(), early, None, 0.5),
            Transition::Failed { .. }
        ));
        // Window spent, budget not: retried.
        assert!(matches!(
            after_failure(&s, &info(2, 0, 0), err.clone(), late, None, 0.5),
            Transition::Failed { .. }
        ));
        // Both: aborted, saying why.
        assert_exhausted(
            &after_failure(&s, &info(4, 0, 0), err, late, None, 0.5),
            &["both spent", "over 1h"],
        );
    }

    #[test]
    fn retry_after_is_honoured() {
        let s = settings();
        let err = JobError::new(ErrorCode::Throttled, "429");
        let now = Timestamp(10_000);
        match after_failure(&s, &info(1, 0, 0), err, now, Some(Timestamp(100_000)), 0.0) {
            Transition::Failed {
                next_attempt_at, ..
            } => assert_eq!(next_attempt_at, Timestamp(100_000)),
            other => panic!("{other:?}"),
        }
    }
}
