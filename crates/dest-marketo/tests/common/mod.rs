//! Marketo-specific helpers: the config and manager for the stand-in and
//! lead payloads. Staging, handles and driving imports come from
//! `batchrouter_testkit::manager`, shared with every destination's tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, ImportHandle, JobId, Outcome, StagedBatch,
    UploadOutput,
};
use batchrouter_testkit::manager::{self as kit, BatchSpec};
pub use batchrouter_testkit::manager::{drive, RecordingTelemetry};
use batchrouter_testkit::marketo::MarketoStandIn;
use serde_json::{json, Value};

const DESTINATION_ID: &str = "marketo-test";

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
        id: DESTINATION_ID.into(),
        destination_type: batchrouter_dest_marketo::DESTINATION_TYPE.into(),
        telemetry: telemetry.clone(),
    };
    let m = batchrouter_dest_marketo::MarketoDestination
        .validate_and_build(&ctx, config)
        .expect("valid config");
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

/// Transforms and stages jobs like the router: one line per job that
/// transformed; the others come back with their transform error's text.
pub fn stage(
    dir: &Path,
    m: &dyn AsyncDestinationManager,
    payloads: impl IntoIterator<Item = (JobId, String)>,
) -> (StagedBatch, Vec<(JobId, String)>) {
    let spec = BatchSpec::new(DESTINATION_ID, batchrouter_dest_marketo::DESTINATION_TYPE);
    let (batch, rejected) = kit::stage_for(dir, &spec, m, payloads);
    (
        batch,
        rejected.into_iter().map(|(id, e)| (id, e.0)).collect(),
    )
}

/// Lead payloads `{"email": ..., "first": ..., "last": ..., "score": i}`.
pub fn leads(range: std::ops::Range<i64>, email: impl Fn(i64) -> String) -> Vec<(JobId, String)> {
    range
        .map(|i| (i, json!({"email": email(i), "first": format!("F{i}"), "last": "L", "score": i, "vip": i % 2 == 0}).to_string()))
        .collect()
}

/// The handles the router would persist for an upload's imports.
pub fn handles(out: &UploadOutput) -> Vec<ImportHandle> {
    kit::handles(DESTINATION_ID, out)
}

/// Upload outcomes plus driven import outcomes, checking the partition.
pub async fn upload_and_drive(
    m: &dyn AsyncDestinationManager,
    batch: &StagedBatch,
) -> HashMap<JobId, Outcome> {
    kit::upload_and_drive(m, batch).await
}

pub const SHORT: Duration = Duration::from_millis(50);
