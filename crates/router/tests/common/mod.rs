//! Shared helpers for router tests: a store in a temp dir, fast settings,
//! scripted managers and waiting for jobs to settle.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use batchrouter_core::store::DestinationCounts;
use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, DestinationError, ErrorCode, ImportHandle, Job,
    JobError, JobState, JobStore, NewImport, NoopTelemetry, Outcome, PollStatus, StagedBatch,
    TransformError, UploadOutput, UploadStats,
};
use batchrouter_router::{Metrics, Router, RouterBuilder, RouterOptions, RouterSettings};
use batchrouter_store::SqliteStore;

/// Settings that make tests fast: short intervals, short backoffs.
pub fn fast() -> RouterSettings {
    RouterSettings {
        upload_freq: Duration::from_millis(100),
        min_idle_sleep: Duration::from_millis(20),
        poll_interval: Duration::from_millis(40),
        min_retry_backoff: Duration::from_millis(50),
        max_retry_backoff: Duration::from_millis(200),
        max_retries: 3,
        // A job is given up when both the budget and the window are spent:
        // no window here, so the budget alone decides, in milliseconds.
        retry_time_window: Duration::ZERO,
        upload_timeout: Duration::from_secs(10),
        lease_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(5),
        ..RouterSettings::default()
    }
}

pub async fn sqlite(dir: &Path) -> Arc<SqliteStore> {
    Arc::new(SqliteStore::open(dir.join("jobs.db")).await.unwrap())
}

/// Reopens a store whose previous owner was aborted: its lock goes away
/// once the aborted tasks have dropped it.
pub async fn reopen(path: &Path) -> Arc<SqliteStore> {
    let start = Instant::now();
    loop {
        match SqliteStore::open(path).await {
            Ok(s) => return Arc::new(s),
            Err(_) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("reopen failed: {e}"),
        }
    }
}

pub fn options(dir: &Path) -> RouterOptions {
    RouterOptions {
        staging_dir: dir.join("staging"),
        maintenance_interval: Duration::from_millis(200),
        ..RouterOptions::new()
    }
}

/// Builds an `HTTP` manager through the destination registry.
pub fn http_manager(id: &str, config: serde_json::Value) -> Arc<dyn AsyncDestinationManager> {
    batchrouter_destinations::REGISTRY
        .build(
            &DestinationContext {
                id: id.into(),
                destination_type: "HTTP".into(),
                telemetry: Arc::new(NoopTelemetry),
            },
            &config,
        )
        .unwrap()
}

pub async fn start(
    store: Arc<dyn JobStore>,
    dir: &Path,
    dests: Vec<(&str, &str, Arc<dyn AsyncDestinationManager>, RouterSettings)>,
) -> Router {
    let mut b = RouterBuilder::new(store, Metrics::new(), options(dir));
    for (id, kind, m, s) in dests {
        b = b.destination(id, kind, m, s);
    }
    b.start().await.unwrap()
}

pub async fn counts(store: &Arc<dyn JobStore>, dest: &str) -> DestinationCounts {
    store
        .destination_counts()
        .await
        .unwrap()
        .remove(dest)
        .unwrap_or_default()
}

pub fn n(c: &DestinationCounts, s: JobState) -> u64 {
    c.by_state.get(&s).copied().unwrap_or(0)
}

/// Waits until `dest` has no job left outside terminal states, or panics
/// after `limit` with the counts it saw.
pub async fn settle(store: &Arc<dyn JobStore>, dest: &str, limit: Duration) -> DestinationCounts {
    let start = Instant::now();
    loop {
        let c = counts(store, dest).await;
        let open = n(&c, JobState::Waiting)
            + n(&c, JobState::Executing)
            + n(&c, JobState::Importing)
            + n(&c, JobState::Failed);
        if open == 0 && !c.by_state.is_empty() {
            return c;
        }
        if start.elapsed() > limit {
            panic!("{dest} did not settle within {limit:?}: {:?}", c.by_state);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for a condition, panicking with `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        if start.elapsed() > limit {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A manager that records the batches it saw and answers as scripted.
#[derive(Default)]
pub struct Recording {
    pub batches: Mutex<Vec<Vec<i64>>>,
    pub batch_bytes: Mutex<Vec<u64>>,
    pub uploads: AtomicUsize,
    pub polls: AtomicUsize,
    pub stats_calls: AtomicUsize,
    pub behaviour: Mutex<Behaviour>,
    /// When set, every `get_upload_stats` call fails with this error.
    pub stats_error: Mutex<Option<DestinationError>>,
    /// The next this many `get_upload_stats` calls fail (HTTP 503).
    pub stats_failures_left: AtomicUsize,
}

/// What a [`Recording`] manager does on upload and poll.
#[derive(Clone, Debug, Default)]
pub enum Behaviour {
    /// Fire-and-forget success.
    #[default]
    Succeed,
    /// Start one import per batch, complete after `polls` polls.
    Import { polls: usize },
    /// Start an import that never finishes.
    ImportForever,
    /// Drop the first job id from the output (contract violation).
    OmitOne,
    /// Name the first job twice.
    DuplicateOne,
    /// Start an import that completes after `polls` polls reporting
    /// failures: stats abort the first job of the import (`record_rejected`).
    ImportWithFailures { polls: usize },
    /// Start an import whose first poll says it failed as a whole.
    ImportFails { retryable: bool },
}

#[async_trait]
impl AsyncDestinationManager for Recording {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        serde_json::from_str::<serde_json::Value>(&job.payload)
            .map(|v| v.to_string())
            .map_err(|e| TransformError::new(format!("payload is not valid JSON: {e}")))
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        self.uploads.fetch_add(1, Ordering::SeqCst);
        self.batches.lock().unwrap().push(batch.job_ids.clone());
        self.batch_bytes.lock().unwrap().push(batch.bytes);
        let on_disk = std::fs::metadata(&batch.path).map(|m| m.len()).unwrap_or(0);
        assert_eq!(on_disk, batch.bytes, "staged file size matches the batch");
        let behaviour = self.behaviour.lock().unwrap().clone();
        match behaviour {
            Behaviour::Succeed => UploadOutput::all_succeeded(&batch.job_ids),
            Behaviour::Import { .. }
            | Behaviour::ImportForever
            | Behaviour::ImportWithFailures { .. }
            | Behaviour::ImportFails { .. } => UploadOutput {
                imports: vec![NewImport {
                    context: serde_json::json!({"batch": batch.batch_id, "polls": 0}),
                    job_ids: batch.job_ids.clone(),
                }],
                ..Default::default()
            },
            Behaviour::OmitOne => UploadOutput::all_succeeded(&batch.job_ids[1..]),
            Behaviour::DuplicateOne => {
                let mut out = UploadOutput::all_succeeded(&batch.job_ids);
                out.push(batch.job_ids[0], Outcome::succeeded());
                out
            }
        }
    }

    async fn poll(&self, _import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        let seen = self.polls.fetch_add(1, Ordering::SeqCst) + 1;
        let behaviour = self.behaviour.lock().unwrap().clone();
        match behaviour {
            Behaviour::Import { polls } if seen >= polls => Ok(PollStatus::Complete {
                has_failures: false,
            }),
            Behaviour::ImportWithFailures { polls } if seen >= polls => {
                Ok(PollStatus::Complete { has_failures: true })
            }
            Behaviour::ImportFails { retryable } => Ok(PollStatus::Failed {
                retryable,
                error: JobError::new(ErrorCode::ImportFailed, "the import failed as a whole"),
            }),
            _ => Ok(PollStatus::InProgress {
                processed: Some(seen as u64),
                total: Some(100),
            }),
        }
    }

    async fn get_upload_stats(
        &self,
        import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        self.stats_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(e) = self.stats_error.lock().unwrap().clone() {
            return Err(e);
        }
        let failing =
            self.stats_failures_left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(DestinationError::retryable(
                "results endpoint answered HTTP 503",
            ));
        }
        let behaviour = self.behaviour.lock().unwrap().clone();
        match (behaviour, import.job_ids.first()) {
            (Behaviour::ImportWithFailures { .. }, Some(&first)) => Ok(UploadStats {
                outcomes: vec![(
                    first,
                    Outcome::Aborted(JobError::new(
                        ErrorCode::RecordRejected,
                        "the destination rejected this record",
                    )),
                )],
                unmatched: 0,
            }),
            _ => Ok(UploadStats::default()),
        }
    }
}

/// Counts per state as a readable map (for assertion messages).
pub fn readable(c: &DestinationCounts) -> BTreeMap<String, u64> {
    c.by_state
        .iter()
        .map(|(k, v)| (k.to_string(), *v))
        .collect()
}

/// A SQLite store in `dir` holding `jobs` jobs for destination `d`, and a
/// router sending them with `settings` to a [`Recording`] that behaves as
/// `behaviour`, run until every job is settled (its counts answered last).
pub async fn recording_run_settled(
    dir: &Path,
    jobs: usize,
    behaviour: Behaviour,
    settings: RouterSettings,
) -> (Arc<dyn JobStore>, Arc<Recording>, Router, DestinationCounts) {
    let store: Arc<dyn JobStore> = sqlite(dir).await;
    store
        .insert_jobs(
            batchrouter_testkit::jobs::numbered_jobs("d", "x", jobs),
            batchrouter_core::Timestamp::now(),
        )
        .await
        .unwrap();
    let m = Arc::new(Recording::default());
    *m.behaviour.lock().unwrap() = behaviour;
    let router = start(store.clone(), dir, vec![("d", "TEST", m.clone(), settings)]).await;
    let c = settle(&store, "d", Duration::from_secs(60)).await;
    (store, m, router, c)
}
