//! SFTP-specific helpers of the integration tests: configs pointing at a
//! throwaway sshd and remote directories. Staging through the real
//! transform and the telemetry recorder come from
//! `batchrouter_testkit::manager`, shared with every destination's tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use batchrouter_core::{
    DestinationContext, ErrorCode, JobError, JobId, StagedBatch, Timestamp, Uploader,
};
use batchrouter_dest_sftp::SftpUploader;
pub use batchrouter_testkit::manager::RecordingTelemetry as Recorder;
use batchrouter_testkit::manager::{self as kit, BatchSpec};
use batchrouter_testkit::sshd::Sshd;
use serde_json::{json, Value};

const DESTINATION_ID: &str = "sftp-test";

pub fn ctx(recorder: &Arc<Recorder>) -> DestinationContext {
    DestinationContext {
        id: DESTINATION_ID.into(),
        destination_type: "SFTP".into(),
        telemetry: recorder.clone(),
    }
}

/// Key-auth config for `sshd`, pinned by its known_hosts file.
pub fn key_config(sshd: &Sshd, format: &str, file_path: &str) -> Value {
    json!({
        "host": sshd.host(),
        "port": sshd.port(),
        "username": sshd.user(),
        "authMethod": "keyAuth",
        "privateKey": sshd.client_key(),
        "fileFormat": format,
        "filePath": file_path,
        "knownHosts": sshd.known_hosts_path().to_str().unwrap(),
        "connectTimeout": "2s",
        "ioTimeout": "5s",
    })
}

pub fn uploader(config: &Value) -> (SftpUploader, Arc<Recorder>) {
    let rec = Arc::new(Recorder::default());
    let u = SftpUploader::from_config(&ctx(&rec), config).unwrap_or_else(|e| panic!("config: {e}"));
    (u, rec)
}

/// The batch spec of a test batch, jobs numbered 1.. in `payloads` order.
fn numbered(
    batch_id: &str,
    created_at: Timestamp,
    payloads: impl IntoIterator<Item = String>,
) -> (BatchSpec, impl Iterator<Item = (JobId, String)>) {
    let spec = BatchSpec::new(DESTINATION_ID, batchrouter_dest_sftp::DESTINATION_TYPE)
        .with_batch_id(batch_id)
        .with_created_at(created_at);
    let jobs = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as JobId + 1, p));
    (spec, jobs)
}

/// Stages `payloads` through the uploader's own transform, as the router
/// does; every payload must transform.
pub fn stage(
    uploader: &SftpUploader,
    dir: &Path,
    batch_id: &str,
    created_at: Timestamp,
    payloads: impl IntoIterator<Item = String>,
) -> StagedBatch {
    let (spec, jobs) = numbered(batch_id, created_at, payloads);
    let (batch, refused) = kit::stage(dir, &spec, |j| uploader.transform(j), jobs);
    assert!(refused.is_empty(), "transform: {refused:?}");
    batch
}

/// Stages `payloads` the way the router's staging does: a job whose
/// transform fails is aborted alone (`transform_failed`) and left out of the
/// batch. Job ids are 1-based positions in `payloads`.
pub fn stage_like_router(
    uploader: &SftpUploader,
    dir: &Path,
    batch_id: &str,
    created_at: Timestamp,
    payloads: impl IntoIterator<Item = String>,
) -> (StagedBatch, Vec<(JobId, JobError)>) {
    let (spec, jobs) = numbered(batch_id, created_at, payloads);
    let (batch, refused) = kit::stage(dir, &spec, |j| uploader.transform(j), jobs);
    let aborted = refused
        .into_iter()
        .map(|(id, e)| (id, JobError::new(ErrorCode::TransformFailed, e.to_string())))
        .collect();
    (batch, aborted)
}

/// Every file below `dir`, relative, sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// A unique absolute directory below the server's upload root.
pub fn remote_dir(sshd: &Sshd, name: &str) -> PathBuf {
    sshd.upload_root().join(name)
}
