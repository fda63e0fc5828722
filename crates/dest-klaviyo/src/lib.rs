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
//!   No request starts later than `uploadTimeBudget` into the call, and
//!   [`limits`](AsyncDestinationManager::limits) sizes batches so one fits
//!   in that budget at the configured rate, so an upload always returns (and
//!   its imports are recorded) before the router's `uploadCallTimeout`.
//! * `poll` maps `queued`/`processing`/`complete`/`cancelled` to the router's
//!   poll states; a poll that did not work is an error, never a failed import
//!   (a 404 too, until the import is [`poll::NOT_FOUND_GRACE`] old).
//! * `get_upload_stats` reads every page of `import-errors` (100 per page,
//!   waiting out a 429 between pages) and aborts the jobs whose profiles
//!   Klaviyo rejected; fewer errors listed than failed profiles is an error,
//!   so the results are read again rather than the rest reported succeeded.
//!
//! Every request of a destination goes through one sliding-window limiter
//! (burst per second, steady per minute; a 429's `Retry-After` pauses all).

pub mod client;
pub mod config;
pub mod context;
pub mod destination;
mod pack;
pub mod poll;
pub mod ratelimit;
pub mod stats;
pub mod transform;
pub mod upload;

use async_trait::async_trait;
use batchrouter_core::{
    AsyncDestinationManager, ConfigProblems, DestinationContext, DestinationError, ImportHandle,
    Job, ManagerLimits, PollStatus, StagedBatch, TransformError, UploadOutput, UploadStats,
};

pub use config::{KlaviyoConfig, CONFIG_KEYS};
pub use destination::KlaviyoDestination;

/// The destination type name users write and the registry lists.
pub const DESTINATION_TYPE: &str = "KLAVIYO_BULK_UPLOAD";

/// The manager of one Klaviyo destination; holds only the client and the
/// rate limiter, never per-import state.
pub struct KlaviyoManager {
    pub(crate) cfg: KlaviyoConfig,
    pub(crate) client: client::KlaviyoClient,
    pub(crate) destination_id: String,
}

impl KlaviyoManager {
    /// Builds the concrete manager (tests and benchmarks use it directly).
    pub fn new(
        ctx: &DestinationContext,
        config: &serde_json::Value,
    ) -> Result<Self, ConfigProblems> {
        Self::from_settings(ctx, KlaviyoConfig::from_value(config)?)
    }

    /// Builds the manager from an already validated config (no network I/O).
    pub fn from_settings(
        ctx: &DestinationContext,
        cfg: KlaviyoConfig,
    ) -> Result<Self, ConfigProblems> {
        let client =
            client::KlaviyoClient::new(&cfg, ctx.telemetry.clone()).map_err(ConfigProblems::one)?;
        Ok(KlaviyoManager {
            cfg,
            client,
            destination_id: ctx.id.clone(),
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
        // A batch is split into as many imports as needed, but all of them
        // must be sent within `uploadTimeBudget` at the configured rate.
        self.cfg.manager_limits()
    }
}
