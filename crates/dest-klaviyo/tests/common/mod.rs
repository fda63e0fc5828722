//! Shared helpers: a manager pointed at the stand-in, staging like the
//! router does (transform, one line per job in a temp file), and driving
//! imports through poll and stats.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, DestinationTelemetry, ImportHandle, Job, JobId,
    NewImport, Outcome, PollStatus, StagedBatch, Timestamp, TransformError, UploadOutput,
    UploadStats,
};
use batchrouter_dest_klaviyo::KlaviyoManager;
use batchrouter_testkit::klaviyo::KlaviyoStandIn;
use serde_json::{json, Value};

/// Telemetry that remembers what it was told.
#[derive(Default)]
pub struct Recorder {
    pub requests: Mutex<Vec<String>>,
}

impl DestinationTelemetry for Recorder {
    fn request(&self, status: &str) {
        self.requests.lock().unwrap().push(status.to_string());
    }
}

impl Recorder {
    pub fn statuses(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// The config for the stand-in, with `extra` keys merged over it.
pub fn config(standin: &KlaviyoStandIn, extra: Value) -> Value {
    let mut c = json!({
        "privateApiKey": standin.api_key(),
        "baseUrl": standin.base_url(),
        "rateLimitPerSecond": 50,
        "rateLimitPerMinute": 3000,
        "requestTimeout": "10s",
        "connectTimeout": "2s",
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        c[k] = v;
    }
    c
}

/// A manager for `config` with recording telemetry.
pub fn manager_with(config: Value) -> (Arc<KlaviyoManager>, Arc<Recorder>) {
    let telemetry = Arc::new(Recorder::default());
    let ctx = DestinationContext {
        id: "klaviyo-test".into(),
        destination_type: batchrouter_dest_klaviyo::DESTINATION_TYPE.into(),
        telemetry: telemetry.clone(),
    };
    let m = KlaviyoManager::new(&ctx, &config).expect("valid config");
    (Arc::new(m), telemetry)
}

/// A manager for the stand-in with `extra` config keys.
pub fn manager(standin: &KlaviyoStandIn, extra: Value) -> (Arc<KlaviyoManager>, Arc<Recorder>) {
    manager_with(config(standin, extra))
}

/// A job for a payload.
pub fn job(id: JobId, payload: &Value) -> Job {
    Job {
        id,
        destination_id: "klaviyo-test".into(),
        payload: payload.to_string(),
        message_id: None,
        attempts: 0,
        retry_base: 0,
        first_attempt_at: None,
        created_at: Timestamp::now(),
    }
}

/// A typical profile payload for job `i` with email `email`.
pub fn profile(i: usize, email: &str) -> Value {
    json!({
        "email": email,
        "first_name": format!("First{i}"),
        "last_name": "Tester",
        "location": {"city": "Lyon", "country": "FR"},
        "properties": {"plan": if i.is_multiple_of(3) { "pro" } else { "free" }},
        "visits": i,
    })
}

/// Transforms `payloads` like the router (job ids 1..), staging the lines in
/// `dir`; jobs whose transform failed are returned apart.
pub fn stage(
    dir: &Path,
    m: &dyn AsyncDestinationManager,
    payloads: impl IntoIterator<Item = Value>,
) -> (StagedBatch, Vec<(JobId, TransformError)>) {
    stage_jobs(
        dir,
        m,
        payloads
            .into_iter()
            .enumerate()
            .map(|(i, p)| (i as JobId + 1, p)),
    )
}

/// Like [`stage`] with explicit job ids.
pub fn stage_jobs(
    dir: &Path,
    m: &dyn AsyncDestinationManager,
    jobs: impl IntoIterator<Item = (JobId, Value)>,
) -> (StagedBatch, Vec<(JobId, TransformError)>) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("batch-{n}.jsonl"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut ids = Vec::new();
    let mut rejected = Vec::new();
    let mut bytes = 0u64;
    for (id, payload) in jobs {
        match m.transform(&job(id, &payload)) {
            Ok(line) => {
                assert!(!line.contains('\n'));
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
        batch_id: format!("batch-{n}"),
        destination_id: "klaviyo-test".into(),
        destination_type: batchrouter_dest_klaviyo::DESTINATION_TYPE.into(),
        path,
        job_ids: ids,
        bytes,
        attempt: 1,
        created_at: Timestamp::now(),
    };
    (batch, rejected)
}

/// The handle the router would build for the `i`-th import of an upload.
pub fn handle(i: usize, import: &NewImport) -> ImportHandle {
    ImportHandle {
        id: i as i64 + 1,
        destination_id: "klaviyo-test".into(),
        batch_id: "batch".into(),
        context: import.context.clone(),
        job_ids: import.job_ids.clone(),
        started_at: Timestamp::now(),
    }
}

/// Handles for every import of an upload.
pub fn handles(out: &UploadOutput) -> Vec<ImportHandle> {
    out.imports
        .iter()
        .enumerate()
        .map(|(i, imp)| handle(i, imp))
        .collect()
}

/// Polls until the import leaves `InProgress` (at most 50 polls).
pub async fn poll_to_end(m: &dyn AsyncDestinationManager, h: &ImportHandle) -> (PollStatus, usize) {
    for n in 1..=50 {
        match m.poll(h).await.expect("poll works") {
            PollStatus::InProgress { .. } => continue,
            other => return (other, n),
        }
    }
    panic!("import {} never ended", h.id);
}

/// Polls every import to its end and reads stats of completed ones; returns
/// every job's outcome (jobs not named by stats succeeded).
pub async fn drive(
    m: &dyn AsyncDestinationManager,
    hs: &[ImportHandle],
) -> HashMap<JobId, Outcome> {
    let mut all = HashMap::new();
    for h in hs {
        let (status, _) = poll_to_end(m, h).await;
        match status {
            PollStatus::Complete { has_failures } => {
                let stats: UploadStats = m.get_upload_stats(h).await.expect("stats work");
                if !has_failures {
                    assert!(
                        stats.outcomes.is_empty(),
                        "no failures but outcomes: {:?}",
                        stats.outcomes
                    );
                }
                for &j in &h.job_ids {
                    all.insert(j, Outcome::succeeded());
                }
                for (j, o) in stats.outcomes {
                    assert!(
                        h.job_ids.contains(&j),
                        "stats named job {j} outside the import"
                    );
                    all.insert(j, o);
                }
            }
            other => panic!("import {} ended {other:?}", h.id),
        }
    }
    all
}

/// Outcomes of an upload by job.
pub fn outcomes(out: &UploadOutput) -> HashMap<JobId, Outcome> {
    out.outcomes.iter().cloned().collect()
}

/// Jobs under an import in an upload output.
pub fn importing(out: &UploadOutput) -> usize {
    out.imports.iter().map(|i| i.job_ids.len()).sum()
}

/// Seconds as a Duration, for readability.
pub fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
