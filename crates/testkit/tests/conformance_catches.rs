//! The conformance suite itself: a small in-memory destination passes it,
//! and each way of breaking the manager contract is caught by the check
//! that guards it, so no check can pass without looking.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::collections::{HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use batchrouter_core::{
    AsyncDestinationManager, ConfigProblems, DestinationContext, DestinationError, ErrorCode,
    ImportHandle, Job, JobError, JobId, NewImport, Outcome, PollStatus, StagedBatch,
    TransformError, UploadOutput, UploadStats,
};
use batchrouter_testkit::conformance::{run_all, Report, Target};
use futures::FutureExt;
use serde_json::{json, Value};

/// How the in-memory manager breaks the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// The last job of a batch is named nowhere.
    LosesAJob,
    /// The first job is both imported and succeeded.
    NamesAJobTwice,
    /// Stats name jobs by line index instead of job id.
    StatsByLineIndex,
    /// The key→job map lives in memory: after a restart rejected rows read
    /// as succeeded.
    ForgetsAtRestart,
    /// A rate limit fails the jobs instead of throttling them.
    ThrottleAsFailure,
    /// The transform accepts invalid JSON (and the upload then aborts it).
    AcceptsBadRecords,
    /// The API key is logged.
    LogsTheKey,
    /// The API key is kept in the import context (persisted, shown).
    KeyInContext,
}

/// The "remote side": imports (keys, completed) and what it received.
#[derive(Default)]
struct Remote {
    imports: Vec<(Vec<String>, bool)>,
    received: HashMap<String, u32>,
    throttle_next: bool,
}

struct Memory {
    remote: Arc<Mutex<Remote>>,
    bug: Bug,
    key: String,
    in_memory_maps: Mutex<HashMap<u64, Vec<JobId>>>,
}

fn key_of(line: &str) -> Option<String> {
    serde_json::from_str::<Value>(line).ok()?["key"]
        .as_str()
        .map(String::from)
}

#[async_trait]
impl AsyncDestinationManager for Memory {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        match serde_json::from_str::<Value>(&job.payload) {
            Ok(v) if v["key"].is_string() => Ok(v.to_string()),
            _ if self.bug == Bug::AcceptsBadRecords => Ok("<unparsed>".into()),
            _ => Err(TransformError::new("payload needs a string `key`")),
        }
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        if self.bug == Bug::LogsTheKey {
            tracing::debug!(api_key = %self.key, "uploading");
        }
        let mut remote = self.remote.lock().unwrap();
        if std::mem::take(&mut remote.throttle_next) {
            return if self.bug == Bug::ThrottleAsFailure {
                UploadOutput::all_failed(
                    &batch.job_ids,
                    JobError::new(ErrorCode::DestinationUnavailable, "429"),
                )
            } else {
                let e = DestinationError::throttled("429 Too Many Requests", None);
                UploadOutput::all_from_error(&batch.job_ids, &e)
            };
        }
        let mut out = UploadOutput::default();
        let (mut keys, mut ids) = (Vec::new(), Vec::new());
        for item in batch.lines().unwrap() {
            let (id, line) = item.unwrap();
            match key_of(&line) {
                Some(k) => {
                    keys.push(k);
                    ids.push(id);
                }
                None => out.push(
                    id,
                    Outcome::Aborted(JobError::new(ErrorCode::RecordRejected, "unparsable")),
                ),
            }
        }
        if self.bug == Bug::LosesAJob {
            ids.pop();
            keys.pop();
        }
        if self.bug == Bug::NamesAJobTwice {
            out.push(ids[0], Outcome::succeeded());
        }
        let import = remote.imports.len() as u64;
        remote.imports.push((keys, false));
        let context = if self.bug == Bug::ForgetsAtRestart {
            self.in_memory_maps
                .lock()
                .unwrap()
                .insert(import, ids.clone());
            json!({"import": import})
        } else if self.bug == Bug::KeyInContext {
            json!({"import": import, "jobs": ids, "auth": self.key})
        } else {
            json!({"import": import, "jobs": ids})
        };
        out.imports.push(NewImport {
            context,
            job_ids: ids,
        });
        out
    }

    async fn poll(&self, import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        let n = import.context["import"].as_u64().unwrap() as usize;
        let mut remote = self.remote.lock().unwrap();
        let remote = &mut *remote;
        let (keys, done) = &mut remote.imports[n];
        if !*done {
            *done = true;
            for k in keys.iter().filter(|k| !k.starts_with("reject-")) {
                *remote.received.entry(k.clone()).or_default() += 1;
            }
        }
        Ok(PollStatus::Complete {
            has_failures: keys.iter().any(|k| k.starts_with("reject-")),
        })
    }

    async fn get_upload_stats(
        &self,
        import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        let n = import.context["import"].as_u64().unwrap();
        let ids: Vec<JobId> = match import.context.get("jobs") {
            Some(v) => serde_json::from_value(v.clone()).unwrap(),
            // Nothing in memory after a restart: the bug reads "all fine".
            None => match self.in_memory_maps.lock().unwrap().get(&n) {
                Some(ids) => ids.clone(),
                None => return Ok(UploadStats::default()),
            },
        };
        let remote = self.remote.lock().unwrap();
        let mut stats = UploadStats::default();
        for (i, k) in remote.imports[n as usize].0.iter().enumerate() {
            if k.starts_with("reject-") {
                let id = if self.bug == Bug::StatsByLineIndex {
                    i as JobId + 1
                } else {
                    ids[i]
                };
                stats.outcomes.push((
                    id,
                    Outcome::Aborted(JobError::new(ErrorCode::RecordRejected, "bad row")),
                ));
            }
        }
        Ok(stats)
    }
}

struct MemoryTarget {
    remote: Arc<Mutex<Remote>>,
    bug: Bug,
    key: String,
}

impl MemoryTarget {
    fn new(bug: Bug) -> Self {
        MemoryTarget {
            remote: Arc::default(),
            bug,
            // Unique per target: tests of this binary share the log capture.
            key: format!("mem-key-{:016x}", fastrand::u64(..)),
        }
    }
}

impl Target for MemoryTarget {
    fn destination_type(&self) -> &str {
        "MEMORY"
    }

    fn config(&self) -> Value {
        json!({"apiKey": self.key})
    }

    fn build(
        &self,
        _ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        let known: HashSet<&str> = ["apiKey"].into();
        if let Some(k) = config
            .as_object()
            .unwrap()
            .keys()
            .find(|k| !known.contains(k.as_str()))
        {
            return Err(ConfigProblems::one(format!("unknown key `{k}`")));
        }
        Ok(Arc::new(Memory {
            remote: self.remote.clone(),
            bug: self.bug,
            key: config["apiKey"].as_str().unwrap().into(),
            in_memory_maps: Mutex::default(),
        }))
    }

    fn payload(&self, key: &str) -> String {
        json!({"key": key}).to_string()
    }

    fn received(&self, key: &str) -> u32 {
        self.remote
            .lock()
            .unwrap()
            .received
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    fn rejected_payload(&self, key: &str) -> Option<String> {
        Some(json!({"key": format!("reject-{key}")}).to_string())
    }

    fn throttle_next_upload(&self) -> bool {
        self.remote.lock().unwrap().throttle_next = true;
        true
    }

    fn starts_imports(&self) -> bool {
        true
    }

    fn secrets(&self) -> Vec<String> {
        vec![self.key.clone()]
    }
}

/// Runs the suite and returns the report, or the panic message of the
/// check that failed.
async fn run(bug: Bug) -> Result<Report, String> {
    let target = MemoryTarget::new(bug);
    AssertUnwindSafe(run_all(&target))
        .catch_unwind()
        .await
        .map_err(|p| {
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        })
}

#[tokio::test]
async fn a_correct_manager_passes_every_check() {
    let report = run(Bug::None).await.expect("conforms");
    assert!(report.not_applicable().is_empty(), "{report:?}");
    assert_eq!(report.verdicts.len(), 6);
}

#[tokio::test]
async fn each_broken_contract_is_caught_by_its_check() {
    for (bug, expected) in [
        (
            Bug::LosesAJob,
            "[conformance:accounting] manager output violates the contract: 1 job(s) missing",
        ),
        (
            Bug::NamesAJobTwice,
            "[conformance:accounting] manager output violates the contract: 0 job(s) missing, 1 duplicated",
        ),
        (Bug::StatsByLineIndex, "stats named jobs outside the import"),
        (
            Bug::ForgetsAtRestart,
            "[conformance:restart] after the restart job",
        ),
        (
            Bug::AcceptsBadRecords,
            "[conformance:bad_records] transform refused []",
        ),
        (Bug::ThrottleAsFailure, "[conformance:throttling] job"),
        (Bug::LogsTheKey, "[conformance:secrets] secret \"mem-key-"),
        (Bug::KeyInContext, "is in a Debug view"),
    ] {
        let err = run(bug)
            .await
            .expect_err(&format!("{bug:?} must be caught"));
        assert!(err.contains(expected), "{bug:?}: {err}");
    }
}
