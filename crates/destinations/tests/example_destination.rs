//! `docs/adding-a-destination.md`, followed for a tiny destination and
//! proven: `APPEND_FILE` appends each record as one JSON line to a local
//! file. Each step of the doc is marked `Step n` below; in a real
//! destination the module is its own crate folder (`crates/dest-<name>`)
//! and the registry line goes into `crates/destinations/src/lib.rs`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::path::PathBuf;
use std::sync::Arc;

use batchrouter_core::registry::TypedDestination;
use batchrouter_core::{
    AsyncDestinationManager, ConfigKey, ConfigProblems, DestinationContext, Registry,
};
use batchrouter_testkit::conformance::{run_all, Target};
use serde_json::{json, Value};

/// Step 1 (`crates/dest-<name>/src/lib.rs`, `config.rs`, `destination.rs`).
mod append_file {
    use super::*;
    use async_trait::async_trait;
    use batchrouter_core::{
        parse_destination_config, ErrorCode, Job, JobError, Secret, SimpleAsyncDestinationManager,
        StagedBatch, TransformError, UploadOutput, Uploader,
    };
    use tokio::io::AsyncWriteExt;

    /// The type name users write.
    pub const DESTINATION_TYPE: &str = "APPEND_FILE";

    /// Step 2: the names the parser accepts ("did you mean" hints)...
    pub const CONFIG_KEYS: &[&str] = &["path", "token"];

    /// ...and the keys, with defaults and one-line docs (the two must agree,
    /// checked when `APPEND_FILE` is compiled).
    pub const KEYS: &[ConfigKey] = &[
        ConfigKey {
            name: "path",
            default: "required",
            doc: "File the records are appended to, one JSON line each.",
        },
        ConfigKey {
            name: "token",
            default: "required, secret",
            doc: "Stands for a credential: checked to be non-empty, never printed.",
        },
    ];

    /// Step 3: validated settings; `Debug` never shows the secret.
    #[derive(Clone, Debug)]
    pub struct Settings {
        pub path: PathBuf,
        // A real destination sends its credential; the example only holds it.
        #[allow(dead_code)]
        pub token: Secret,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        path: String,
        token: String,
    }

    /// Step 3: every problem at once, no I/O.
    pub fn validate(config: &Value) -> Result<Settings, ConfigProblems> {
        let raw: Raw = parse_destination_config(config, CONFIG_KEYS)?;
        let mut problems = ConfigProblems(Vec::new());
        if raw.path.is_empty() {
            problems.push("`path` must not be empty");
        }
        if raw.token.is_empty() {
            problems.push("`token` must not be empty");
        }
        problems.into_result()?;
        Ok(Settings {
            path: raw.path.into(),
            token: Secret::new(raw.token),
        })
    }

    /// Step 4: the manager (fire-and-forget, so an `Uploader`), built from
    /// the settings without I/O.
    pub fn build(
        _ctx: &DestinationContext,
        settings: Settings,
    ) -> Result<SimpleAsyncDestinationManager<AppendFileUploader>, ConfigProblems> {
        Ok(SimpleAsyncDestinationManager::new(AppendFileUploader {
            settings,
        }))
    }

    /// The uploader `build` wraps.
    pub struct AppendFileUploader {
        settings: Settings,
    }

    #[async_trait]
    impl Uploader for AppendFileUploader {
        fn transform(&self, job: &Job) -> Result<String, TransformError> {
            let v: Value = serde_json::from_str(&job.payload)
                .map_err(|e| TransformError::new(format!("payload is not valid JSON: {e}")))?;
            Ok(v.to_string())
        }

        async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
            let result = async {
                let lines = tokio::fs::read(&batch.path).await?;
                let mut file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.settings.path)
                    .await?;
                file.write_all(&lines).await?;
                file.flush().await
            }
            .await;
            match result {
                Ok(()) => UploadOutput::all_succeeded(&batch.job_ids),
                Err(e) => UploadOutput::all_failed(
                    &batch.job_ids,
                    JobError::new(ErrorCode::DestinationUnavailable, format!("append: {e}")),
                ),
            }
        }
    }

    /// Step 5: the type the registry lists: the shared adapter over the
    /// keys, the accepted names and the two fns above (nothing copied from
    /// another destination).
    pub const APPEND_FILE: TypedDestination<
        Settings,
        SimpleAsyncDestinationManager<AppendFileUploader>,
    > = TypedDestination::new(DESTINATION_TYPE, KEYS, CONFIG_KEYS, validate, build);
}

/// Step 6: one line in the registry's list (here a copy of the shipped list
/// plus the new type, so the test does not ship `APPEND_FILE`).
fn registry() -> Registry {
    let mut types = batchrouter_destinations::TYPES.to_vec();
    types.push(&append_file::APPEND_FILE);
    Registry::new(Box::leak(types.into_boxed_slice()))
}

const TOKEN: &str = "append-file-t0ken-5b2e";

/// Step 7: the stand-in is the file itself; the conformance target.
struct AppendFileTarget {
    registry: Registry,
    path: PathBuf,
}

impl Target for AppendFileTarget {
    fn destination_type(&self) -> &str {
        append_file::DESTINATION_TYPE
    }

    fn config(&self) -> Value {
        json!({"path": self.path, "token": TOKEN})
    }

    fn build(
        &self,
        ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        // Through the registry, as the daemon does.
        self.registry.build(ctx, config).map_err(|e| match e {
            batchrouter_core::RegistryError::Config(p) => p,
            other => ConfigProblems::one(other.to_string()),
        })
    }

    fn payload(&self, key: &str) -> String {
        json!({"id": key, "n": 1}).to_string()
    }

    fn received(&self, key: &str) -> u32 {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let needle = format!("\"id\":\"{key}\"");
        text.lines().filter(|l| l.contains(&needle)).count() as u32
    }

    fn starts_imports(&self) -> bool {
        false
    }

    fn secrets(&self) -> Vec<String> {
        vec![TOKEN.into()]
    }

    fn debug_views(&self, config: &Value) -> Vec<String> {
        vec![format!("{:?}", append_file::validate(config))]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_destination_passes_the_manager_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let target = AppendFileTarget {
        registry: registry(),
        path: dir.path().join("records.ndjson"),
    };
    let report = run_all(&target).await;
    // Fire-and-forget, no per-record rejection, no throttling.
    assert_eq!(
        report.not_applicable(),
        ["restart", "stats_by_job_id", "throttling"],
        "{report:?}"
    );
}

#[test]
fn the_registry_validates_the_new_type_listing_every_problem() {
    let registry = registry();
    assert!(registry.names().contains(&"APPEND_FILE"));
    let t = registry.get("APPEND_FILE").unwrap();
    let err = t
        .validate(&json!({"path": "", "token": "", "pth": "x"}))
        .err()
        .unwrap();
    assert!(err.to_string().contains("did you mean `path`"), "{err}");
    let err = t.validate(&json!({"path": "", "token": ""})).err().unwrap();
    assert_eq!(err.0.len(), 2, "{err:?}");
}
