//! The batchrouter contract shared by every other crate.
//!
//! Destinations implement [`AsyncDestinationManager`] (or the smaller
//! [`Uploader`] wrapped in [`SimpleAsyncDestinationManager`]); job stores
//! implement [`JobStore`]; the router drives both. Nothing here knows about a
//! concrete destination or database, so each side can change independently.

pub mod config_reader;
pub mod destination;
pub mod error;
pub mod job;
pub mod lookup;
pub mod manager;
pub mod outcome;
pub mod registry;
pub mod render;
pub mod secret;
pub mod store;
pub mod telemetry;

pub use config_reader::ConfigReader;
pub use destination::{parse_destination_config, ConfigProblems, DestinationContext};
pub use error::{DestinationError, ErrorCode, StoreError, TransformError};
pub use job::{
    ImportId, Job, JobId, JobState, JobValidationError, NewJob, Timestamp, MAX_MESSAGE_ID_CHARS,
    MAX_PAYLOAD_DEPTH,
};
pub use lookup::{ByteSize, ConfigSource, KeyLookup, LookupError};
pub use manager::{
    AsyncDestinationManager, ImportHandle, ManagerLimits, SimpleAsyncDestinationManager,
    StagedBatch, Uploader,
};
pub use outcome::{
    validate_upload_output, JobError, NewImport, Outcome, OutputViolation, PollStatus,
    UploadOutput, UploadStats,
};
pub use registry::{ConfigKey, Destination, DestinationSettings, Registry, RegistryError};
pub use secret::Secret;
pub use store::JobStore;
pub use telemetry::{DestinationTelemetry, NoopTelemetry};
