//! The engine's decisions in one place: what each job becomes after an
//! upload answered, after an import's per-record results came back, or
//! after an import failed as a whole. Pure functions of the outcome, the
//! jobs' retry bookkeeping, the settings, `now` and a random source (for
//! jitter), so the worker and the poller share one set of rules and every
//! rule is tested exactly, table-style.
//!
//! The rules:
//! - `Succeeded` → `succeeded`; `Aborted` → `aborted` (never retried).
//! - `Failed` → retried with backoff ([`retry::after_failure`]) until the
//!   attempt budget **and** the retry window are both spent, then `aborted`
//!   with `retries_exhausted`, the last error kept in the message.
//! - `Throttled` in an upload's answer is not an attempt: the store does not
//!   count it (it is left out of `attempted`) and neither does the decision;
//!   it pauses the destination (for `Retry-After`, or one backoff step) and
//!   the job is not due before the pause ends. The retry window still starts
//!   at the first try.
//! - `Throttled` in an import's per-record results comes after an upload the
//!   destination accepted, which the store counted as an attempt at commit:
//!   it is retried like `Failed` (the attempt stays spent) and pauses
//!   nothing, since the throttle is long past by the time results are read.
//! - A job an import's results do not name succeeded; results naming a job
//!   outside the batch are ignored and counted (`unknown`).
//! - One jitter per batch or import, so its retried jobs come due together
//!   and a retry forms the same batch (same batch id, same remote file).

use std::collections::BTreeMap;
use std::time::Duration;

use batchrouter_core::store::{AttemptInfo, ImportState, JobTransition, Tally, Transition};
use batchrouter_core::{JobError, JobId, Outcome, Timestamp, UploadOutput, UploadStats};

use crate::events::UploadResult;
use crate::retry;
use crate::settings::RouterSettings;

/// The jobs of one batch or import by id, built once and used by the
/// decision and by the latency metric (their creation times).
#[derive(Clone, Debug, Default)]
pub struct JobInfos(BTreeMap<JobId, AttemptInfo>);

impl JobInfos {
    /// Indexes `jobs` by id.
    pub fn new(jobs: &[AttemptInfo]) -> Self {
        JobInfos(jobs.iter().map(|j| (j.job_id, *j)).collect())
    }

    /// The bookkeeping of job `id`, if it belongs here.
    pub fn get(&self, id: JobId) -> Option<&AttemptInfo> {
        self.0.get(&id)
    }

    /// When job `id` was created (for the latency metric).
    pub fn created_at(&self, id: JobId) -> Option<Timestamp> {
        self.0.get(&id).map(|j| j.created_at)
    }

    /// How many jobs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The jobs, by id.
    pub fn iter(&self) -> impl Iterator<Item = &AttemptInfo> {
        self.0.values()
    }
}

/// What every decision depends on besides the outcome: the settings, the
/// time and a random source in `[0, 1)` (injected so tests are exact).
pub struct Context<'a> {
    /// The destination's router settings (retry budget, window, backoff).
    pub settings: &'a RouterSettings,
    /// The decision time.
    pub now: Timestamp,
    /// Random numbers for jitter.
    pub random: &'a mut dyn FnMut() -> f64,
}

/// What an upload's answer decides.
#[derive(Clone, Debug, PartialEq)]
pub struct UploadDecision {
    /// Transitions of the jobs the upload decided.
    pub transitions: Vec<JobTransition>,
    /// Jobs that count an upload attempt (everything but throttled jobs).
    pub attempted: Vec<JobId>,
    /// Jobs moved to `importing`.
    pub importing: usize,
    /// Jobs the destination throttled.
    pub throttled: usize,
    /// The destination is paused until then (throttling or `Retry-After`).
    pub pause_until: Option<Timestamp>,
    /// Counts of `transitions`.
    pub tally: Tally,
}

impl UploadDecision {
    /// The upload's `result` label for a batch of `jobs` jobs.
    pub fn result(&self, jobs: usize) -> UploadResult {
        if self.throttled == jobs {
            UploadResult::Throttled
        } else if self.tally.failed + self.tally.aborted == 0 {
            UploadResult::Success
        } else if self.tally.succeeded as usize + self.importing == 0 {
            UploadResult::Failed
        } else {
            UploadResult::Partial
        }
    }
}

/// Decides every job of an upload's (validated) answer. `jobs` holds the
/// batch's bookkeeping *before* this upload; outcomes for jobs outside it
/// are skipped.
pub fn upload(ctx: &mut Context<'_>, jobs: &JobInfos, output: &UploadOutput) -> UploadDecision {
    let s = ctx.settings;
    let now = ctx.now;
    let throttled = output
        .outcomes
        .iter()
        .filter(|(id, o)| matches!(o, Outcome::Throttled(_)) && jobs.get(*id).is_some())
        .count();
    let pause_until = if throttled > 0 || output.retry_after.is_some() {
        let wait = match output.retry_after {
            Some(w) => w,
            None => retry::backoff(s, 1, (ctx.random)()),
        };
        Some(now + wait)
    } else {
        None
    };
    let jitter = (ctx.random)();
    let mut d = UploadDecision {
        transitions: Vec::with_capacity(output.outcomes.len()),
        attempted: Vec::with_capacity(jobs.len()),
        importing: 0,
        throttled,
        pause_until,
        tally: Tally::default(),
    };
    for (id, outcome) in &output.outcomes {
        let Some(info) = jobs.get(*id) else { continue };
        let mut counted = *info;
        let to = match outcome {
            Outcome::Succeeded { note, external_id } => Transition::Succeeded {
                note: note.clone(),
                external_id: external_id.clone(),
            },
            Outcome::Aborted(e) => Transition::Aborted { error: e.clone() },
            Outcome::Failed(e) => {
                counted.attempts += 1;
                counted.first_attempt_at.get_or_insert(now);
                retry::after_failure(s, &counted, e.clone(), now, pause_until, jitter)
            }
            Outcome::Throttled(e) => {
                counted.first_attempt_at.get_or_insert(now);
                retry::after_failure(s, &counted, e.clone(), now, pause_until, jitter)
            }
        };
        if !matches!(outcome, Outcome::Throttled(_)) {
            d.attempted.push(*id);
        }
        d.tally.add(&to);
        d.transitions.push(JobTransition { job_id: *id, to });
    }
    for imp in &output.imports {
        d.attempted.extend(imp.job_ids.iter().copied());
        d.importing += imp.job_ids.len();
    }
    d
}

/// What an import's per-record results decide.
#[derive(Clone, Debug, PartialEq)]
pub struct ImportDecision {
    /// One transition per job of the import.
    pub transitions: Vec<JobTransition>,
    /// The import's final state.
    pub state: ImportState,
    /// Results naming jobs outside the import (ignored).
    pub unknown: u64,
    /// Counts of `transitions`.
    pub tally: Tally,
}

/// Decides every job of a completed import from its per-record `stats`.
/// `jobs` holds their bookkeeping as stored (the upload already counted).
pub fn import_stats(ctx: &mut Context<'_>, jobs: &JobInfos, stats: UploadStats) -> ImportDecision {
    let mut decided: BTreeMap<JobId, Outcome> = BTreeMap::new();
    let mut unknown = 0u64;
    for (id, outcome) in stats.outcomes {
        if jobs.get(id).is_some() {
            decided.insert(id, outcome);
        } else {
            unknown += 1;
        }
    }
    let jitter = (ctx.random)();
    let transitions: Vec<JobTransition> = jobs
        .iter()
        .map(|j| {
            let to = match decided.remove(&j.job_id) {
                None => Transition::Succeeded {
                    note: None,
                    external_id: None,
                },
                Some(Outcome::Succeeded { note, external_id }) => {
                    Transition::Succeeded { note, external_id }
                }
                Some(Outcome::Aborted(error)) => Transition::Aborted { error },
                Some(Outcome::Failed(error)) | Some(Outcome::Throttled(error)) => {
                    retry::after_failure(ctx.settings, j, error, ctx.now, None, jitter)
                }
            };
            JobTransition {
                job_id: j.job_id,
                to,
            }
        })
        .collect();
    let tally = Tally::of(&transitions);
    ImportDecision {
        state: import_state(&tally, jobs.len()),
        transitions,
        unknown,
        tally,
    }
}

/// An import's final state from its jobs' transitions: `completed` when
/// every job (or none) succeeded, `failed` when none did, else `partial`.
pub fn import_state(tally: &Tally, jobs: usize) -> ImportState {
    if tally.succeeded as usize == jobs {
        ImportState::Completed
    } else if tally.succeeded == 0 {
        ImportState::Failed
    } else {
        ImportState::Partial
    }
}

/// Every job of an import that failed as a whole (or ran past its
/// deadline): retried under the usual budget when `retryable`, else aborted.
pub fn import_failed(
    ctx: &mut Context<'_>,
    jobs: &JobInfos,
    error: &JobError,
    retryable: bool,
) -> Vec<JobTransition> {
    let jitter = if retryable { (ctx.random)() } else { 0.0 };
    jobs.iter()
        .map(|j| JobTransition {
            job_id: j.job_id,
            to: if retryable {
                retry::after_failure(ctx.settings, j, error.clone(), ctx.now, None, jitter)
            } else {
                Transition::Aborted {
                    error: error.clone(),
                }
            },
        })
        .collect()
}

/// How long to wait before polling again after a poll or results fetch
/// errored: the destination's `Retry-After` when longer than `pollInterval`.
pub fn poll_retry_wait(settings: &RouterSettings, retry_after: Option<Duration>) -> Duration {
    retry_after
        .unwrap_or(settings.poll_interval)
        .max(settings.poll_interval)
}

#[cfg(test)]
// Table rows are plain tuples on purpose: one line per rule.
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;
    use batchrouter_core::{ErrorCode, NewImport};

    const NOW: Timestamp = Timestamp(10_000_000);
    const HOUR_MS: i64 = 3_600_000;

    fn settings() -> RouterSettings {
        RouterSettings {
            poll_interval: Duration::from_secs(10),
            ..retry::test_settings()
        }
    }

    /// Job 1 with `attempts` uploads, its window opened `window_age_ms` ago
    /// (`None`: never tried).
    fn info(id: JobId, attempts: u32, window_age_ms: Option<i64>) -> AttemptInfo {
        AttemptInfo {
            job_id: id,
            attempts,
            retry_base: 0,
            first_attempt_at: window_age_ms.map(|a| Timestamp(NOW.0 - a)),
            created_at: Timestamp(NOW.0 - 2 * HOUR_MS),
        }
    }

    fn err(code: ErrorCode, msg: &str) -> JobError {
        JobError::new(code, msg)
    }

    fn fixed(v: f64) -> impl FnMut() -> f64 {
        move || v
    }

    /// The settings and random source a test's decision context borrows.
    struct Env<R> {
        settings: RouterSettings,
        random: R,
    }

    impl<R: FnMut() -> f64> Env<R> {
        fn new(random: R) -> Self {
            Env {
                settings: settings(),
                random,
            }
        }

        /// A context deciding at `NOW`.
        fn ctx(&mut self) -> Context<'_> {
            Context {
                settings: &self.settings,
                now: NOW,
                random: &mut self.random,
            }
        }
    }

    /// The shape of a transition, for tables.
    #[derive(Debug, PartialEq)]
    enum To {
        Ok,
        Retry { due_ms: i64 },
        Abort(ErrorCode),
    }

    fn shape(t: &Transition) -> To {
        match t {
            Transition::Succeeded { .. } => To::Ok,
            Transition::Failed {
                next_attempt_at, ..
            } => To::Retry {
                due_ms: next_attempt_at.0 - NOW.0,
            },
            Transition::Aborted { error } => To::Abort(error.code),
        }
    }

    fn decide_upload(
        job: AttemptInfo,
        outcome: Outcome,
        retry_after: Option<Duration>,
    ) -> UploadDecision {
        let out = UploadOutput {
            outcomes: vec![(job.job_id, outcome)],
            retry_after,
            ..Default::default()
        };
        upload(
            &mut Env::new(fixed(1.0)).ctx(),
            &JobInfos::new(&[job]),
            &out,
        )
    }

    #[test]
    fn upload_outcomes_table() {
        let e503 = || Outcome::Failed(err(ErrorCode::DestinationUnavailable, "HTTP 503"));
        let e429 = || Outcome::Throttled(err(ErrorCode::Throttled, "HTTP 429"));
        let bad = || Outcome::Aborted(err(ErrorCode::RecordRejected, "bad"));
        let ra = Some(Duration::from_secs(60));
        // (outcome, attempts before, window age, Retry-After) →
        // (transition, counts an attempt, pause in ms)
        #[rustfmt::skip]
        let table: Vec<(Outcome, u32, Option<i64>, Option<Duration>, To, bool, Option<i64>)> = vec![
            (Outcome::succeeded(), 0, None, None, To::Ok, true, None),
            (bad(), 0, None, None, To::Abort(ErrorCode::RecordRejected), true, None),
            // First failure: backoff 10 s (jitter 1.0) from now.
            (e503(), 0, None, None, To::Retry { due_ms: 10_000 }, true, None),
            // Third failure: 40 s.
            (e503(), 2, Some(HOUR_MS), None, To::Retry { due_ms: 40_000 }, true, None),
            // 4th failure, window spent: budget (1 + 3 retries) spent too → abort.
            (e503(), 3, Some(HOUR_MS), None, To::Abort(ErrorCode::RetriesExhausted), true, None),
            // 4th failure, window not spent: retried.
            (e503(), 3, Some(60_000), None, To::Retry { due_ms: 80_000 }, true, None),
            // Never tried and the window would be spent from creation, but the
            // window starts at the first try: retried.
            (e503(), 3, None, None, To::Retry { due_ms: 80_000 }, true, None),
            // Retry-After on a failure pauses and delays the retry.
            (e503(), 0, None, ra, To::Retry { due_ms: 60_000 }, true, Some(60_000)),
            // Throttled: no attempt counted, pause one backoff step (10 s).
            (e429(), 0, None, None, To::Retry { due_ms: 10_000 }, false, Some(10_000)),
            // Throttled at the budget edge with the window spent: still
            // retried, since throttling spends no attempt.
            (e429(), 3, Some(HOUR_MS), None, To::Retry { due_ms: 40_000 }, false, Some(10_000)),
            // Throttled with Retry-After: due when the pause ends.
            (e429(), 0, None, ra, To::Retry { due_ms: 60_000 }, false, Some(60_000)),
            // Success with Retry-After: pauses the destination only.
            (Outcome::succeeded(), 0, None, ra, To::Ok, true, Some(60_000)),
        ];
        for (i, (outcome, attempts, age, retry_after, want, counts, pause)) in
            table.into_iter().enumerate()
        {
            let d = decide_upload(info(1, attempts, age), outcome, retry_after);
            assert_eq!(d.transitions.len(), 1, "row {i}");
            assert_eq!(shape(&d.transitions[0].to), want, "row {i}");
            assert_eq!(d.attempted == vec![1], counts, "row {i}");
            assert_eq!(d.pause_until.map(|t| t.0 - NOW.0), pause, "row {i}");
            assert_eq!(d.tally.total(), 1, "row {i}");
        }
    }

    #[test]
    fn exhaustion_keeps_the_last_reason() {
        let d = decide_upload(
            info(1, 3, Some(HOUR_MS)),
            Outcome::Failed(err(ErrorCode::DestinationUnavailable, "HTTP 503 upstream")),
            None,
        );
        retry::assert_exhausted(
            &d.transitions[0].to,
            &[
                "4 upload attempt(s)",
                "HTTP 503 upstream",
                "destination_unavailable",
            ],
        );
    }

    #[test]
    fn a_failed_upload_opens_the_retry_window_now() {
        let d = decide_upload(
            info(1, 0, None),
            Outcome::Failed(err(ErrorCode::DestinationUnavailable, "x")),
            None,
        );
        assert!(matches!(d.transitions[0].to, Transition::Failed { .. }));
        // A throttled one too (the store records it the same way).
        let d = decide_upload(
            info(1, 0, None),
            Outcome::Throttled(err(ErrorCode::Throttled, "x")),
            None,
        );
        assert!(matches!(d.transitions[0].to, Transition::Failed { .. }));
    }

    #[test]
    fn upload_results_imports_and_strangers() {
        let mut env = Env::new(fixed(0.5));
        let mut ctx = env.ctx();
        let jobs = JobInfos::new(&[
            info(1, 0, None),
            info(2, 0, None),
            info(3, 0, None),
            info(4, 0, None),
        ]);
        let throttled = || Outcome::Throttled(err(ErrorCode::Throttled, "429"));
        let failed = || Outcome::Failed(err(ErrorCode::DestinationUnavailable, "503"));
        // (outcomes, imported jobs) → result
        #[rustfmt::skip]
        let table: Vec<(Vec<(JobId, Outcome)>, Vec<JobId>, UploadResult)> = vec![
            ((1..=4).map(|i| (i, Outcome::succeeded())).collect(), vec![], UploadResult::Success),
            (vec![], vec![1, 2, 3, 4], UploadResult::Success),
            ((1..=4).map(|i| (i, throttled())).collect(), vec![], UploadResult::Throttled),
            ((1..=4).map(|i| (i, failed())).collect(), vec![], UploadResult::Failed),
            (vec![(1, failed()), (2, throttled())], vec![3, 4], UploadResult::Partial),
            (vec![(1, failed()), (2, throttled()), (3, failed()), (4, failed())], vec![], UploadResult::Failed),
            (vec![(1, Outcome::succeeded()), (2, throttled()), (3, failed()), (4, failed())], vec![], UploadResult::Partial),
        ];
        for (i, (outcomes, imported, want)) in table.into_iter().enumerate() {
            let out = UploadOutput {
                outcomes,
                imports: if imported.is_empty() {
                    vec![]
                } else {
                    vec![NewImport {
                        context: serde_json::Value::Null,
                        job_ids: imported.clone(),
                    }]
                },
                retry_after: None,
            };
            let d = upload(&mut ctx, &jobs, &out);
            assert_eq!(d.result(4), want, "row {i}");
            assert_eq!(d.importing, imported.len(), "row {i}");
        }
        // An outcome for a job outside the batch is skipped.
        let out = UploadOutput {
            outcomes: vec![(1, Outcome::succeeded()), (99, throttled())],
            ..Default::default()
        };
        let d = upload(&mut ctx, &JobInfos::new(&[info(1, 0, None)]), &out);
        assert_eq!(d.transitions.len(), 1);
        assert_eq!(d.throttled, 0);
        assert_eq!(d.pause_until, None);
    }

    #[test]
    fn a_batch_shares_one_jitter() {
        let mut n = 0.0;
        let mut env = Env::new(move || {
            n += 0.25;
            n
        });
        let mut ctx = env.ctx();
        let out = UploadOutput {
            outcomes: (1..=3)
                .map(|i| {
                    (
                        i,
                        Outcome::Failed(err(ErrorCode::DestinationUnavailable, "x")),
                    )
                })
                .collect(),
            ..Default::default()
        };
        let jobs = JobInfos::new(&[info(1, 0, None), info(2, 0, None), info(3, 0, None)]);
        let d = upload(&mut ctx, &jobs, &out);
        let due: Vec<To> = d.transitions.iter().map(|t| shape(&t.to)).collect();
        // One draw (0.25): 5 s + 2.5 s * 0.25... equal jitter of 10 s base.
        assert_eq!(
            due,
            (0..3)
                .map(|_| To::Retry { due_ms: 6_250 })
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn import_stats_table() {
        let mut env = Env::new(fixed(1.0));
        let mut ctx = env.ctx();
        let e503 = || Outcome::Failed(err(ErrorCode::DestinationUnavailable, "503"));
        let e429 = || Outcome::Throttled(err(ErrorCode::Throttled, "429"));
        let bad = || Outcome::Aborted(err(ErrorCode::RecordRejected, "bad"));
        // (result for job 1 or none, attempts as stored, window age) → transition
        #[rustfmt::skip]
        let table: Vec<(Option<Outcome>, u32, Option<i64>, To)> = vec![
            (None, 1, Some(0), To::Ok),
            (Some(Outcome::succeeded()), 1, Some(0), To::Ok),
            (Some(bad()), 1, Some(0), To::Abort(ErrorCode::RecordRejected)),
            (Some(e503()), 1, Some(0), To::Retry { due_ms: 10_000 }),
            // The upload was counted at commit: 4 uploads, window spent → abort.
            (Some(e503()), 4, Some(HOUR_MS), To::Abort(ErrorCode::RetriesExhausted)),
            (Some(e503()), 4, Some(60_000), To::Retry { due_ms: 80_000 }),
            // A throttled record in the results is an ordinary retryable
            // failure of an upload that was counted.
            (Some(e429()), 1, Some(0), To::Retry { due_ms: 10_000 }),
            (Some(e429()), 4, Some(HOUR_MS), To::Abort(ErrorCode::RetriesExhausted)),
        ];
        for (i, (outcome, attempts, age, want)) in table.into_iter().enumerate() {
            let stats = UploadStats {
                outcomes: outcome.into_iter().map(|o| (1, o)).collect(),
                unmatched: 0,
            };
            let d = import_stats(&mut ctx, &JobInfos::new(&[info(1, attempts, age)]), stats);
            assert_eq!(d.transitions.len(), 1, "row {i}");
            assert_eq!(shape(&d.transitions[0].to), want, "row {i}");
        }
    }

    #[test]
    fn import_state_and_strangers() {
        let mut env = Env::new(fixed(0.0));
        let mut ctx = env.ctx();
        let jobs = JobInfos::new(&[info(1, 1, Some(0)), info(2, 1, Some(0))]);
        let bad = || Outcome::Aborted(err(ErrorCode::RecordRejected, "bad"));
        #[rustfmt::skip]
        let table: Vec<(Vec<(JobId, Outcome)>, ImportState, u64)> = vec![
            (vec![], ImportState::Completed, 0),
            (vec![(7, bad())], ImportState::Completed, 1),
            (vec![(1, bad())], ImportState::Partial, 0),
            (vec![(1, bad()), (2, bad()), (8, bad())], ImportState::Failed, 1),
        ];
        for (i, (outcomes, state, unknown)) in table.into_iter().enumerate() {
            let d = import_stats(
                &mut ctx,
                &jobs,
                UploadStats {
                    outcomes,
                    unmatched: 0,
                },
            );
            assert_eq!(d.state, state, "row {i}");
            assert_eq!(d.unknown, unknown, "row {i}");
            assert_eq!(d.tally.total(), 2, "row {i}");
        }
        assert_eq!(
            import_state(&Tally::default(), 0),
            ImportState::Completed,
            "an import with no jobs left is complete"
        );
    }

    #[test]
    fn import_failed_table() {
        let mut env = Env::new(fixed(1.0));
        let mut ctx = env.ctx();
        let e = err(ErrorCode::DeadlineExceeded, "import 7 still in progress");
        // (attempts as stored, window age, retryable) → transition
        #[rustfmt::skip]
        let table: Vec<(u32, Option<i64>, bool, To)> = vec![
            (1, Some(0), true, To::Retry { due_ms: 10_000 }),
            (4, Some(60_000), true, To::Retry { due_ms: 80_000 }),
            (4, Some(HOUR_MS), true, To::Abort(ErrorCode::RetriesExhausted)),
            (1, Some(0), false, To::Abort(ErrorCode::DeadlineExceeded)),
            (4, Some(HOUR_MS), false, To::Abort(ErrorCode::DeadlineExceeded)),
        ];
        for (i, (attempts, age, retryable, want)) in table.into_iter().enumerate() {
            let jobs = JobInfos::new(&[info(1, attempts, age), info(2, attempts, age)]);
            let ts = import_failed(&mut ctx, &jobs, &e, retryable);
            assert_eq!(ts.len(), 2, "row {i}");
            for t in &ts {
                assert_eq!(shape(&t.to), want, "row {i}");
            }
        }
    }

    #[test]
    fn poll_retry_waits_at_least_the_poll_interval() {
        let s = settings();
        assert_eq!(poll_retry_wait(&s, None), Duration::from_secs(10));
        assert_eq!(
            poll_retry_wait(&s, Some(Duration::from_secs(1))),
            Duration::from_secs(10)
        );
        assert_eq!(
            poll_retry_wait(&s, Some(Duration::from_secs(90))),
            Duration::from_secs(90)
        );
    }
}
