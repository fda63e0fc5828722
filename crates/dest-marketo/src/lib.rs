//! `MARKETO_BULK_UPLOAD`: Marketo bulk lead import.
//!
//! Jobs are flat JSON objects of lead fields. `transform` maps them to
//! Marketo field names and renders values canonically; `upload` lays a staged
//! batch out as CSV files under Marketo's 10 MB limit (a lookup value at most
//! once per file) and creates one import per file, within a time budget;
//! `poll` follows each import by its batch id; `get_upload_stats` reads
//! failures.json / warnings.json and matches rows to jobs by the normalised
//! lookup value through the values and job ids stored in the import context.
//! The manager keeps no per-import state in memory, so another process can
//! finish what this one started.
//!
//! The behaviour, config keys and error classes are documented in
//! `docs/destinations/MARKETO_BULK_UPLOAD.md`.

pub mod auth;
pub mod classify;
pub mod client;
pub mod config;
pub mod context;
pub mod destination;
pub mod layout;
pub mod poll;
pub mod stats;
pub mod transform;
pub mod upload;

use std::sync::Arc;

use async_trait::async_trait;
use batchrouter_core::{
    AsyncDestinationManager, ConfigProblems, DestinationContext, DestinationError, ImportHandle,
    Job, ManagerLimits, PollStatus, StagedBatch, TransformError, UploadOutput, UploadStats,
};

pub use config::{Settings, CONFIG_KEYS};
pub use context::ImportContext;
pub use destination::MarketoDestination;

/// The type name users write and the registry lists this destination under.
pub const DESTINATION_TYPE: &str = "MARKETO_BULK_UPLOAD";

/// The largest staged batch reported to the router: half of what ten full
/// files hold. A file of rows that carry the same fields is never larger than
/// their staged JSON, and greedy filling leaves each file plus the next
/// file's first row over the limit, so such a batch never needs more than the
/// ten files Marketo queues (proof in [`layout`]). Rows with differing fields
/// or a lookup value repeated more than ten times can still need more; those
/// rows wait for a later upload.
pub fn max_upload_bytes(settings: &Settings) -> u64 {
    settings.max_file_bytes * upload::MAX_FILES_PER_UPLOAD as u64 / 2
}

/// The Marketo destination manager; cheap to share, safe to call concurrently.
pub struct MarketoManager {
    destination_id: String,
    settings: Arc<Settings>,
    transformer: transform::Transformer,
    client: client::Client,
}

impl MarketoManager {
    /// Builds a manager from validated settings (no network I/O).
    pub fn new(
        ctx: &DestinationContext,
        settings: Settings,
    ) -> Result<MarketoManager, ConfigProblems> {
        let settings = Arc::new(settings);
        let client = client::Client::new(settings.clone(), ctx.telemetry.clone())
            .map_err(ConfigProblems::one)?;
        Ok(MarketoManager {
            destination_id: ctx.id.clone(),
            transformer: transform::Transformer::new(&settings),
            settings,
            client,
        })
    }

    /// The validated settings, for diagnostics and tests.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }
}

#[async_trait]
impl AsyncDestinationManager for MarketoManager {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        let line = self.transformer.transform(&job.payload);
        if let Err(e) = &line {
            tracing::debug!(destination_id = %self.destination_id, job = job.id, reason = %e, "lead cannot be sent to Marketo");
        }
        line
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        upload::upload_batch(&self.client, &self.settings, batch).await
    }

    async fn poll(&self, import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        poll::poll_import(&self.client, import).await
    }

    async fn get_upload_stats(
        &self,
        import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        stats::upload_stats(&self.client, import).await
    }

    fn limits(&self) -> ManagerLimits {
        ManagerLimits {
            max_upload_bytes: Some(max_upload_bytes(&self.settings)),
            max_events: None,
        }
    }
}
