//! Klaviyo-specific helpers: the config and manager for the stand-in and
//! profile payloads. Staging, handles and driving imports come from
//! `batchrouter_testkit::manager`, shared with every destination's tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, ImportHandle, Job, JobId, NewImport, Outcome,
    PollStatus, StagedBatch, Timestamp, TransformError, UploadOutput,
};
use batchrouter_dest_klaviyo::KlaviyoManager;
use batchrouter_testkit::klaviyo::KlaviyoStandIn;
pub use batchrouter_testkit::manager::RecordingTelemetry as Recorder;
use batchrouter_testkit::manager::{self as kit, BatchSpec, StatsFetch};
use serde_json::{json, Value};

const DESTINATION_ID: &str = "klaviyo-test";

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
        id: DESTINATION_ID.into(),
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
    kit::job(DESTINATION_ID, id, payload.to_string(), Timestamp::now())
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
    let spec = BatchSpec::new(DESTINATION_ID, batchrouter_dest_klaviyo::DESTINATION_TYPE);
    kit::stage_for(
        dir,
        &spec,
        m,
        jobs.into_iter().map(|(id, p)| (id, p.to_string())),
    )
}

/// The handle the router would build for the `i`-th import of an upload.
pub fn handle(i: usize, import: &NewImport) -> ImportHandle {
    kit::handle(DESTINATION_ID, i, import)
}

/// Handles for every import of an upload.
pub fn handles(out: &UploadOutput) -> Vec<ImportHandle> {
    kit::handles(DESTINATION_ID, out)
}

/// Polls until the import leaves `InProgress` (at most 50 polls).
pub async fn poll_to_end(m: &dyn AsyncDestinationManager, h: &ImportHandle) -> (PollStatus, usize) {
    kit::poll_to_end(m, h, 50).await
}

/// Polls every import to its end and reads stats of completed ones (even
/// without failures, checking there are none); returns every job's outcome.
pub async fn drive(
    m: &dyn AsyncDestinationManager,
    hs: &[ImportHandle],
) -> HashMap<JobId, Outcome> {
    kit::drive_with(m, hs, StatsFetch::Always).await
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
