//! Shared helpers of the SFTP integration tests: configs pointing at a
//! throwaway sshd, staged batches built through the real transform, and a
//! telemetry recorder.

#![allow(dead_code)]

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use batchrouter_core::{
    DestinationContext, DestinationTelemetry, ErrorCode, Job, JobError, JobId, StagedBatch,
    Timestamp, Uploader,
};
use batchrouter_dest_sftp::SftpUploader;
use batchrouter_testkit::sshd::Sshd;
use serde_json::{json, Value};

/// Records every telemetry call.
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

pub fn ctx(recorder: &Arc<Recorder>) -> DestinationContext {
    DestinationContext {
        id: "sftp-test".into(),
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

/// Stages `payloads` through the uploader's own transform, as the router does.
pub fn stage(
    uploader: &SftpUploader,
    dir: &Path,
    batch_id: &str,
    created_at: Timestamp,
    payloads: impl IntoIterator<Item = String>,
) -> StagedBatch {
    let path = dir.join(format!("{batch_id}.staged"));
    let mut w = BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut ids = Vec::new();
    for (i, payload) in payloads.into_iter().enumerate() {
        let job = Job {
            id: i as i64 + 1,
            destination_id: "sftp-test".into(),
            payload,
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at,
        };
        let line = uploader.transform(&job).expect("transform");
        w.write_all(line.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        ids.push(job.id);
    }
    w.flush().unwrap();
    drop(w);
    StagedBatch {
        batch_id: batch_id.into(),
        destination_id: "sftp-test".into(),
        destination_type: "SFTP".into(),
        bytes: std::fs::metadata(&path).unwrap().len(),
        path,
        job_ids: ids,
        attempt: 1,
        created_at,
    }
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
    let path = dir.join(format!("{batch_id}.staged"));
    let mut w = BufWriter::new(std::fs::File::create(&path).unwrap());
    let (mut ids, mut aborted) = (Vec::new(), Vec::new());
    for (i, payload) in payloads.into_iter().enumerate() {
        let job = Job {
            id: i as i64 + 1,
            destination_id: "sftp-test".into(),
            payload,
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at,
        };
        match uploader.transform(&job) {
            Ok(line) => {
                assert!(!line.contains('\n'));
                w.write_all(line.as_bytes()).unwrap();
                w.write_all(b"\n").unwrap();
                ids.push(job.id);
            }
            Err(e) => aborted.push((
                job.id,
                JobError::new(ErrorCode::TransformFailed, e.to_string()),
            )),
        }
    }
    w.flush().unwrap();
    drop(w);
    let batch = StagedBatch {
        batch_id: batch_id.into(),
        destination_id: "sftp-test".into(),
        destination_type: "SFTP".into(),
        bytes: std::fs::metadata(&path).unwrap().len(),
        path,
        job_ids: ids,
        attempt: 1,
        created_at,
    };
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
