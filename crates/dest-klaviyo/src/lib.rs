//! `KLAVIYO_BULK_UPLOAD`: profiles imported through Klaviyo's bulk profile
//! import API (`/api/profile-bulk-import-jobs`).
//!
//! * [`transform`](AsyncDestinationManager::transform) turns a job payload
//!   (one profile) into the compact JSON of a Klaviyo `profile` resource,
//!   refusing wrong shapes and profiles over `maxProfileBytes`
//!   ([`transform::profile_line`]).
//! * `upload` streams the staged file into requests of at most 10,000
//!   profiles and `maxRequestBytes` encoded bytes; each accepted request is
//!   its own import whose context holds the Klaviyo job id and the
//!   profile-key→job map ([`context::ImportContext`]), so polls and stats
//!   need nothing from memory and survive a restart.
//! * `poll` maps `queued`/`processing`/`complete`/`cancelled` to the router's
//!   poll states; a poll that did not work is an error, never a failed import.
//! * `get_upload_stats` reads every page of `import-errors` and aborts the
//!   jobs whose profiles Klaviyo rejected.
//!
//! Every request of a destination goes through one sliding-window limiter
//! (burst per second, steady per minute; a 429's `Retry-After` pauses all).

pub mod client;
pub mod config;
pub mod context;
pub mod poll;
pub mod ratelimit;
pub mod stats;
pub mod transform;
pub mod upload;

use std::sync::Arc;

use async_trait::async_trait;
use batchrouter_core::{
    AsyncDestinationManager, ConfigProblems, DestinationContext, DestinationError,
    DestinationTelemetry, ImportHandle, Job, ManagerLimits, PollStatus, StagedBatch,
    TransformError, UploadOutput, UploadStats,
};

pub use config::{KlaviyoConfig, CONFIG_KEYS};

/// The destination type name the router's factory registers.
pub const DESTINATION_TYPE: &str = "KLAVIYO_BULK_UPLOAD";

/// Validates `config` fully (every problem, not just the first) and builds
/// the manager. No network I/O: the client connects on first use.
pub fn build(
    ctx: &DestinationContext,
    config: &serde_json::Value,
) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
    Ok(Arc::new(KlaviyoManager::new(ctx, config)?))
}

/// The manager of one Klaviyo destination; holds only the client and the
/// rate limiter, never per-import state.
pub struct KlaviyoManager {
    pub(crate) cfg: KlaviyoConfig,
    pub(crate) client: client::KlaviyoClient,
    pub(crate) destination_id: String,
    pub(crate) telemetry: Arc<dyn DestinationTelemetry>,
}

impl KlaviyoManager {
    /// Builds the concrete manager (tests and benchmarks use it directly).
    pub fn new(
        ctx: &DestinationContext,
        config: &serde_json::Value,
    ) -> Result<Self, ConfigProblems> {
        let cfg = KlaviyoConfig::from_value(config)?;
        let client =
            client::KlaviyoClient::new(&cfg, ctx.telemetry.clone()).map_err(ConfigProblems::one)?;
        Ok(KlaviyoManager {
            cfg,
            client,
            destination_id: ctx.id.clone(),
            telemetry: ctx.telemetry.clone(),
        })
    }

    /// The validated config (secrets stay redacted when printed).
    pub fn config(&self) -> &KlaviyoConfig {
        &self.cfg
    }
}

impl std::fmt::Debug for KlaviyoManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KlaviyoManager")
            .field("destination_id", &self.destination_id)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl AsyncDestinationManager for KlaviyoManager {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        transform::profile_line(&job.payload, self.cfg.max_profile_bytes)
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        upload::upload(self, batch).await
    }

    async fn poll(&self, import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        poll::poll(self, import).await
    }

    async fn get_upload_stats(
        &self,
        import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        stats::get_upload_stats(self, import).await
    }

    fn limits(&self) -> ManagerLimits {
        // Batches of any size are split into as many imports as needed.
        ManagerLimits::default()
    }
}
