//! Staged files a crash (`kill -9`) left behind are removed at start: this
//! identity's and those of identities no running process holds, never the
//! files of a daemon that is still running on the same staging directory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use batchrouter_core::{
    AsyncDestinationManager, DestinationError, ImportHandle, Job, JobState, JobStore, PollStatus,
    StagedBatch, Timestamp, TransformError, UploadOutput, UploadStats,
};
use batchrouter_router::staging::{owner_dir, OwnerStaging, OWNER_LOCK_FILE};
use batchrouter_router::{instance_owner, Metrics, Router, RouterBuilder, RouterOptions};
use batchrouter_testkit::jobs::numbered_jobs;
use batchrouter_testkit::logs::LogCapture;
use common::*;
use tokio::sync::Semaphore;

const LIMIT: Duration = Duration::from_secs(30);

fn logs() -> &'static LogCapture {
    static LOGS: OnceLock<LogCapture> = OnceLock::new();
    LOGS.get_or_init(|| LogCapture::install_global(tracing::Level::INFO))
}

/// Records where each batch was staged; uploads wait for a permit.
struct PathRecorder {
    paths: Mutex<Vec<PathBuf>>,
    permits: Semaphore,
}

impl PathRecorder {
    fn new(open: bool) -> Arc<Self> {
        Arc::new(PathRecorder {
            paths: Mutex::new(Vec::new()),
            permits: Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }),
        })
    }
}

#[async_trait]
impl AsyncDestinationManager for PathRecorder {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        Ok(job.payload.clone())
    }
    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        self.paths.lock().unwrap().push(batch.path.clone());
        self.permits.acquire().await.unwrap().forget();
        UploadOutput::all_succeeded(&batch.job_ids)
    }
    async fn poll(&self, _: &ImportHandle) -> Result<PollStatus, DestinationError> {
        unreachable!("uploads finish synchronously")
    }
    async fn get_upload_stats(&self, _: &ImportHandle) -> Result<UploadStats, DestinationError> {
        unreachable!("uploads finish synchronously")
    }
}

async fn start_as(
    store: Arc<dyn JobStore>,
    staging: &Path,
    owner: &str,
    manager: Arc<PathRecorder>,
) -> Router {
    let options = RouterOptions {
        owner: owner.into(),
        staging_dir: staging.into(),
        maintenance_interval: Duration::from_millis(200),
        ..RouterOptions::new()
    };
    RouterBuilder::new(store, Metrics::new(), options)
        .destination("d", "TEST", manager, fast())
        .start()
        .await
        .unwrap()
}

/// A staged file as a killed daemon leaves it: its folder, its (now
/// unlocked) lock file and a batch under the destination's folder.
fn plant(dir: &Path, name: &str, bytes: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("d")).unwrap();
    std::fs::write(dir.join(OWNER_LOCK_FILE), b"").unwrap();
    let file = dir.join("d").join(name);
    std::fs::write(&file, vec![b'x'; bytes]).unwrap();
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_this_and_of_stopped_identities_go_and_a_running_daemons_stay() {
    let logs = logs();
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let owner = instance_owner("pod-0");

    // A daemon still running on the same staging directory (PostgreSQL);
    // it started first, so its own start-up cleanup is not what is tested.
    let root = staging.clone();
    let (live, _) = tokio::task::spawn_blocking(move || {
        OwnerStaging::open(&root, &instance_owner("pod-1"), Duration::ZERO)
    })
    .await
    .unwrap()
    .unwrap();
    std::fs::create_dir_all(live.dir().join("d")).unwrap();
    let live_file = live.dir().join("d").join("batch-live.staged");
    std::fs::write(&live_file, b"in flight").unwrap();

    // What this identity's killed run left.
    let ours = plant(&owner_dir(&staging, &owner), "batch-ours.staged", 1000);
    // A daemon killed for good, under a per-process identity nobody reuses.
    let stopped_dir = owner_dir(&staging, "host-a:4242:0badcafe");
    let stopped = plant(&stopped_dir, "batch-stopped.staged", 24);
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    let manager = PathRecorder::new(true);
    let router = start_as(store.clone(), &staging, &owner, manager.clone()).await;

    assert!(!ours.exists(), "this identity's leftover is removed");
    assert!(
        !stopped_dir.exists(),
        "a stopped identity's folder is removed"
    );
    assert!(!stopped.exists());
    assert!(live_file.exists(), "a running daemon's staged file is kept");
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("Removed staged files left by stopped runs") && l.contains("pod-0"))
        .unwrap_or_else(|| panic!("one info line about the cleanup:\n{text}"));
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("files_removed=2"), "{line}");
    assert!(line.contains("bytes_removed=1024"), "{line}");
    assert!(line.contains("stopped_owners_removed=1"), "{line}");
    assert!(line.contains("live_owners_kept=1"), "{line}");

    // Staging still works, into this identity's folder.
    store
        .insert_jobs(numbered_jobs("d", "x", 3), Timestamp::now())
        .await
        .unwrap();
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 3);
    let paths = manager.paths.lock().unwrap().clone();
    assert!(!paths.is_empty());
    for p in &paths {
        assert!(
            p.starts_with(owner_dir(&staging, &owner).join("d")),
            "{} is staged under its owner's folder",
            p.display()
        );
        assert!(!p.exists(), "a delivered batch's file is deleted");
    }
    assert!(router.shutdown().await.clean);
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_starting_beside_a_running_one_keeps_its_batch_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let store: Arc<dyn JobStore> = sqlite(dir.path()).await;
    store
        .insert_jobs(numbered_jobs("d", "y", 5), Timestamp::now())
        .await
        .unwrap();
    // Its upload waits: the staged file stays on disk meanwhile.
    let manager = PathRecorder::new(false);
    let router = start_as(store.clone(), &staging, "daemon-a", manager.clone()).await;
    wait_for("an upload in flight", LIMIT, || {
        let m = manager.clone();
        async move { !m.paths.lock().unwrap().is_empty() }
    })
    .await;
    let in_flight = manager.paths.lock().unwrap()[0].clone();
    assert!(in_flight.exists());

    // Another daemon starts on the same staging directory.
    let root = staging.clone();
    let (other, removed) =
        tokio::task::spawn_blocking(move || OwnerStaging::open(&root, "daemon-b", Duration::ZERO))
            .await
            .unwrap()
            .unwrap();
    assert_eq!((removed.files, removed.stopped_owners), (0, 0));
    assert_eq!(removed.live_owners, 1);
    assert!(
        in_flight.exists(),
        "the running daemon's batch is untouched"
    );

    manager.permits.add_permits(Semaphore::MAX_PERMITS / 2);
    let c = settle(&store, "d", LIMIT).await;
    assert_eq!(n(&c, JobState::Succeeded), 5);
    assert!(router.shutdown().await.clean);
    drop(other);
}
