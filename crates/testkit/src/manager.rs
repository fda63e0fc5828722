//! Driving a destination manager the way the router does, for destination
//! tests and the [conformance suite](crate::conformance): jobs, staging
//! (transform, one line per job in a temp file), the handles the router
//! persists, and polling imports to their final per-job outcomes.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use batchrouter_core::{
    AsyncDestinationManager, DestinationError, DestinationTelemetry, ImportHandle, Job, JobId,
    NewImport, Outcome, PollStatus, StagedBatch, Timestamp, TransformError, UploadOutput,
};

/// Telemetry that remembers every request status it is told, so tests can
/// assert on what a manager reported.
#[derive(Default)]
pub struct RecordingTelemetry {
    /// Statuses in call order (`200`, `429`, `timeout`, …).
    pub requests: Mutex<Vec<String>>,
}

impl DestinationTelemetry for RecordingTelemetry {
    fn request(&self, status: &str) {
        self.requests.lock().unwrap().push(status.to_string());
    }
}

impl RecordingTelemetry {
    /// Every status so far, in order.
    pub fn statuses(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// How many times `status` was reported.
    pub fn count(&self, status: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == status)
            .count()
    }
}

/// A fresh job as the store would hand it to the router.
pub fn job(
    destination_id: &str,
    id: JobId,
    payload: impl Into<String>,
    created_at: Timestamp,
) -> Job {
    Job {
        id,
        destination_id: destination_id.into(),
        payload: payload.into(),
        message_id: None,
        attempts: 0,
        retry_base: 0,
        first_attempt_at: None,
        created_at,
    }
}

/// Who a staged batch is for, and the ids and times it carries.
#[derive(Clone, Debug)]
pub struct BatchSpec {
    /// Configured destination id.
    pub destination_id: String,
    /// Destination type name.
    pub destination_type: String,
    /// Batch id (also the staged file's name); unique per process by default.
    pub batch_id: String,
    /// Creation time of every job (and of the batch).
    pub created_at: Timestamp,
}

impl BatchSpec {
    /// A batch with a process-unique id, created now.
    pub fn new(destination_id: &str, destination_type: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        BatchSpec {
            destination_id: destination_id.into(),
            destination_type: destination_type.into(),
            batch_id: format!("batch-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            created_at: Timestamp::now(),
        }
    }

    /// The same batch under another id.
    pub fn with_batch_id(mut self, batch_id: impl Into<String>) -> Self {
        self.batch_id = batch_id.into();
        self
    }

    /// The same batch with another creation time.
    pub fn with_created_at(mut self, created_at: Timestamp) -> Self {
        self.created_at = created_at;
        self
    }
}

/// Transforms `jobs` like the router's staging and writes the lines to
/// `dir/<batch id>.staged`: a job whose transform fails is left out of the
/// batch and returned with its error (the router aborts it alone).
pub fn stage(
    dir: &Path,
    spec: &BatchSpec,
    transform: impl Fn(&Job) -> Result<String, TransformError>,
    jobs: impl IntoIterator<Item = (JobId, String)>,
) -> (StagedBatch, Vec<(JobId, TransformError)>) {
    let path = dir.join(format!("{}.staged", spec.batch_id));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut ids = Vec::new();
    let mut rejected = Vec::new();
    let mut bytes = 0u64;
    for (id, payload) in jobs {
        match transform(&job(&spec.destination_id, id, payload, spec.created_at)) {
            Ok(line) => {
                assert!(
                    !line.contains('\n'),
                    "job {id}: staged line holds a newline"
                );
                file.write_all(line.as_bytes()).unwrap();
                file.write_all(b"\n").unwrap();
                bytes += line.len() as u64 + 1;
                ids.push(id);
            }
            Err(e) => rejected.push((id, e)),
        }
    }
    file.flush().unwrap();
    let batch = StagedBatch {
        batch_id: spec.batch_id.clone(),
        destination_id: spec.destination_id.clone(),
        destination_type: spec.destination_type.clone(),
        path,
        job_ids: ids,
        bytes,
        attempt: 1,
        created_at: spec.created_at,
    };
    (batch, rejected)
}

/// [`stage`] through a manager's own transform.
pub fn stage_for(
    dir: &Path,
    spec: &BatchSpec,
    m: &dyn AsyncDestinationManager,
    jobs: impl IntoIterator<Item = (JobId, String)>,
) -> (StagedBatch, Vec<(JobId, TransformError)>) {
    stage(dir, spec, |j| m.transform(j), jobs)
}

/// The handle the router would persist for the `i`-th import of an upload.
pub fn handle(destination_id: &str, i: usize, import: &NewImport) -> ImportHandle {
    ImportHandle {
        id: i as i64 + 1,
        destination_id: destination_id.into(),
        batch_id: "batch".into(),
        context: import.context.clone(),
        job_ids: import.job_ids.clone(),
        started_at: Timestamp::now(),
    }
}

/// Handles for every import of an upload.
pub fn handles(destination_id: &str, out: &UploadOutput) -> Vec<ImportHandle> {
    out.imports
        .iter()
        .enumerate()
        .map(|(i, imp)| handle(destination_id, i, imp))
        .collect()
}

/// Polls one import until it leaves `InProgress` (at most `max_polls`);
/// returns the final status and the number of polls it took. A poll error
/// panics: use it where polls are expected to work.
pub async fn poll_to_end(
    m: &dyn AsyncDestinationManager,
    h: &ImportHandle,
    max_polls: usize,
) -> (PollStatus, usize) {
    for n in 1..=max_polls {
        match poll_patiently(m, h).await {
            PollStatus::InProgress { .. } => continue,
            other => return (other, n),
        }
    }
    panic!("import {} never ended in {max_polls} polls", h.id);
}

/// One poll, waiting out throttling as the router does (a throttled poll is
/// asked again after the destination's hint, never counted as a failure);
/// any other error panics.
async fn poll_patiently(m: &dyn AsyncDestinationManager, h: &ImportHandle) -> PollStatus {
    for _ in 0..100 {
        match m.poll(h).await {
            Ok(status) => return status,
            Err(DestinationError::Throttled { retry_after, .. }) => {
                let wait = retry_after
                    .unwrap_or(Duration::from_millis(100))
                    .min(Duration::from_secs(2));
                tokio::time::sleep(wait).await;
            }
            Err(e) => panic!("poll of import {} failed: {e}", h.id),
        }
    }
    panic!("poll of import {} stayed throttled for 100 tries", h.id);
}

/// When [`drive_with`] reads an import's per-job stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatsFetch {
    /// Only when the poll said `has_failures`, as the router does.
    LikeRouter,
    /// Always, checking that `has_failures: false` means no outcomes.
    Always,
}

/// Polls every import round-robin until it completes (at most 200 rounds),
/// reads stats like the router, and returns every job's final outcome (jobs
/// not named by stats succeeded). Panics when an import fails, a job is
/// decided twice or stats name a job outside their import.
pub async fn drive(
    m: &dyn AsyncDestinationManager,
    handles: &[ImportHandle],
) -> HashMap<JobId, Outcome> {
    drive_with(m, handles, StatsFetch::LikeRouter).await
}

/// [`drive`] with a choice of when stats are read.
pub async fn drive_with(
    m: &dyn AsyncDestinationManager,
    handles: &[ImportHandle],
    fetch: StatsFetch,
) -> HashMap<JobId, Outcome> {
    let mut outcomes = HashMap::new();
    let mut pending: Vec<&ImportHandle> = handles.iter().collect();
    for _round in 0..200 {
        if pending.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for h in pending {
            match poll_patiently(m, h).await {
                PollStatus::InProgress { .. } => still.push(h),
                PollStatus::Complete { has_failures } => {
                    let mut named = HashMap::new();
                    if has_failures || fetch == StatsFetch::Always {
                        let stats = m.get_upload_stats(h).await.expect("stats work");
                        if !has_failures {
                            assert!(
                                stats.outcomes.is_empty(),
                                "import {}: no failures but outcomes {:?}",
                                h.id,
                                stats.outcomes
                            );
                        }
                        for (id, o) in stats.outcomes {
                            assert!(named.insert(id, o).is_none(), "stats named job {id} twice");
                        }
                    }
                    for id in &h.job_ids {
                        let o = named.remove(id).unwrap_or_else(Outcome::succeeded);
                        assert!(outcomes.insert(*id, o).is_none(), "job {id} decided twice");
                    }
                    assert!(
                        named.is_empty(),
                        "stats named jobs outside the import: {named:?}"
                    );
                }
                PollStatus::Failed { error, .. } => panic!("import {} failed: {error:?}", h.id),
            }
        }
        pending = still;
    }
    assert!(pending.is_empty(), "imports did not complete in 200 rounds");
    outcomes
}

/// Uploads `batch`, checks the output names every job exactly once, drives
/// its imports, and returns every job's final outcome.
pub async fn upload_and_drive(
    m: &dyn AsyncDestinationManager,
    batch: &StagedBatch,
) -> HashMap<JobId, Outcome> {
    let out = m.upload(batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out)
        .expect("output names every job once");
    let mut all: HashMap<JobId, Outcome> = out.outcomes.iter().cloned().collect();
    all.extend(drive(m, &handles(&batch.destination_id, &out)).await);
    all
}
