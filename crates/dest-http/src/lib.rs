//! `HTTP`: fire-and-forget delivery of records to a user's own endpoint.
//!
//! Records are sent as they were enqueued, either as JSON arrays of up to
//! `maxBatchSize` records (`mode = "batch"`) or one request per record with
//! at most `maxInFlight` in flight (`mode = "single"`). Delivery is final when
//! the endpoint answers 2xx; 408/429/5xx, timeouts and dropped connections
//! are retried by the router; other 4xx abort the records with the status.
//! Every request carries an `Idempotency-Key` naming its job set, the same
//! on every re-send of that set ([`upload::idempotency_key`]), so receivers
//! can drop the repeats a crash after delivery causes.
//!
//! Layout: [`config`] (what users write) → [`transform`] (job → line) →
//! [`upload`] (requests and outcome classification).

pub mod config;
pub mod destination;
pub mod transform;
pub mod upload;

use async_trait::async_trait;
use batchrouter_core::{Job, StagedBatch, TransformError, UploadOutput, Uploader};

pub use config::{HttpConfig, Method, Mode, CONFIG_KEYS};
pub use destination::HttpDestination;

/// The type name users write in `[[destinations]] type = "HTTP"`.
pub const DESTINATION_TYPE: &str = "HTTP";

/// The fire-and-forget uploader behind the `HTTP` destination.
pub struct HttpUploader {
    destination_id: String,
    client: upload::Client,
}

#[async_trait]
impl Uploader for HttpUploader {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        transform::staged_line(job)
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        let out = self.client.send_batch(batch).await;
        tracing::debug!(destination_id = %self.destination_id, batch_id = %batch.batch_id, jobs = batch.job_ids.len(), "HTTP batch sent.");
        out
    }
}
