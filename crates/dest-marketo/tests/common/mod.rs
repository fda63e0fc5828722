//! Shared helpers: build managers against the stand-in, stage jobs the way
//! the router does, and drive imports to their final outcomes.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, DestinationTelemetry, ImportHandle, Job, JobId,
    Outcome, PollStatus, StagedBatch, Timestamp, UploadOutput,
};
use batchrouter_testkit::marketo::MarketoStandIn;
use serde_json::{json, Value};

/// Records what the manager reports, so tests can assert on telemetry.
#[derive(Default)]
pub struct RecordingTelemetry {
    pub requests: Mutex<Vec<String>>,
}

impl DestinationTelemetry for RecordingTelemetry {
    fn request(&self, status: &str) {
        self.requests.lock().unwrap().push(status.to_string());
    }
}

impl RecordingTelemetry {
    pub fn count(&self, status: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|s| *s == status)
            .count()
    }
}

/// The config every test starts from, pointed at the stand-in.
pub fn base_config(standin: &MarketoStandIn) -> Value {
    json!({
        "munchkinId": "123-ABC-456",
        "clientId": standin.client_id(),
        "clientSecret": standin.client_secret(),
        "baseUrl": standin.base_url(),
        "columnFieldsMapping": [
            {"from": "email", "to": "email"},
            {"from": "first", "to": "firstName"},
            {"from": "last", "to": "lastName"}
        ],
        "passUnmappedFields": true,
        "connectTimeout": "2s",
        "requestTimeout": "10s",
    })
}

/// Builds a manager from `config` with recording telemetry.
pub fn manager_with(config: &Value) -> (Arc<dyn AsyncDestinationManager>, Arc<RecordingTelemetry>) {
    let telemetry = Arc::new(RecordingTelemetry::default());
    let ctx = DestinationContext {
        id: "marketo-test".into(),
        destination_type: batchrouter_dest_marketo::DESTINATION_TYPE.into(),
        telemetry: telemetry.clone(),
    };
    let m = batchrouter_dest_marketo::build(&ctx, config).expect("valid config");
    (m, telemetry)
}

/// Base config plus `extra` keys.
pub fn manager(
    standin: &MarketoStandIn,
    extra: Value,
) -> (Arc<dyn AsyncDestinationManager>, Arc<RecordingTelemetry>) {
    let mut c = base_config(standin);
    for (k, v) in extra.as_object().expect("extra is an object") {
        c[k] = v.clone();
    }
    manager_with(&c)
}

pub fn job(id: JobId, payload: &str) -> Job {
    Job {
        id,
        destination_id: "marketo-test".into(),
        payload: payload.to_string(),
        message_id: None,
        attempts: 0,
        retry_base: 0,
        first_attempt_at: None,
        created_at: Timestamp::now(),
    }
}

/// Transforms and stages jobs like the router: one line per job that
/// transformed; the others come back with their transform error.
pub fn stage(
    dir: &Path,
    m: &dyn AsyncDestinationManager,
    payloads: impl IntoIterator<Item = (JobId, String)>,
) -> (StagedBatch, Vec<(JobId, String)>) {
    let path = dir.join(format!("staged-{}.jsonl", fastrand::u64(..)));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut ids = Vec::new();
    let mut rejected = Vec::new();
    let mut bytes = 0u64;
    for (id, payload) in payloads {
        match m.transform(&job(id, &payload)) {
            Ok(line) => {
                assert!(!line.contains('\n'));
                out.write_all(line.as_bytes()).unwrap();
                out.write_all(b"\n").unwrap();
                bytes += line.len() as u64 + 1;
                ids.push(id);
            }
            Err(e) => rejected.push((id, e.0)),
        }
    }
    out.flush().unwrap();
    let batch = StagedBatch {
        batch_id: format!("b{}", fastrand::u32(..)),
        destination_id: "marketo-test".into(),
        destination_type: "MARKETO_BULK_UPLOAD".into(),
        path,
        job_ids: ids,
        bytes,
        attempt: 1,
        created_at: Timestamp::now(),
    };
    (batch, rejected)
}

/// Lead payloads `{"email": ..., "first": ..., "last": ..., "score": i}`.
pub fn leads(range: std::ops::Range<i64>, email: impl Fn(i64) -> String) -> Vec<(JobId, String)> {
    range
        .map(|i| (i, json!({"email": email(i), "first": format!("F{i}"), "last": "L", "score": i, "vip": i % 2 == 0}).to_string()))
        .collect()
}

/// The handles the router would persist for an upload's imports.
pub fn handles(out: &UploadOutput) -> Vec<ImportHandle> {
    out.imports
        .iter()
        .enumerate()
        .map(|(i, imp)| ImportHandle {
            id: i as i64 + 1,
            destination_id: "marketo-test".into(),
            batch_id: "b".into(),
            context: imp.context.clone(),
            job_ids: imp.job_ids.clone(),
            started_at: Timestamp::now(),
        })
        .collect()
}

/// Polls every import until it completes (round-robin, bounded), fetches
/// stats where needed, and returns every job's final outcome.
pub async fn drive(
    m: &dyn AsyncDestinationManager,
    handles: &[ImportHandle],
) -> HashMap<JobId, Outcome> {
    let mut outcomes = HashMap::new();
    let mut pending: Vec<&ImportHandle> = handles.iter().collect();
    for _round in 0..200 {
        if pending.is_empty() {
            break;
        }
        let mut still = Vec::new();
        for h in pending {
            match m.poll(h).await.expect("poll works") {
                PollStatus::InProgress { .. } => still.push(h),
                PollStatus::Complete { has_failures } => {
                    let mut named = HashMap::new();
                    if has_failures {
                        let stats = m.get_upload_stats(h).await.expect("stats work");
                        named.extend(stats.outcomes);
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
                PollStatus::Failed { error, .. } => panic!("import failed: {error:?}"),
            }
        }
        pending = still;
    }
    assert!(pending.is_empty(), "imports did not complete in 200 rounds");
    outcomes
}

/// Upload outcomes plus driven import outcomes, checking the partition.
pub async fn upload_and_drive(
    m: &dyn AsyncDestinationManager,
    batch: &StagedBatch,
) -> HashMap<JobId, Outcome> {
    let out = m.upload(batch).await;
    batchrouter_core::validate_upload_output(&batch.job_ids, &out)
        .expect("output names every job once");
    let mut all: HashMap<JobId, Outcome> = out.outcomes.iter().cloned().collect();
    all.extend(drive(m, &handles(&out)).await);
    all
}

/// A shared buffer that a tracing subscriber writes into.
#[derive(Clone, Default)]
pub struct LogBuffer(pub Arc<Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub const SHORT: Duration = Duration::from_millis(50);
