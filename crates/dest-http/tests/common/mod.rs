//! Helpers shared by the HTTP destination's test files.

use std::sync::Arc;

use batchrouter_core::{AsyncDestinationManager, DestinationContext, NoopTelemetry};

/// Builds the HTTP manager from `config` the way the registry does, as destination `h`.
pub fn manager(config: serde_json::Value) -> Arc<dyn AsyncDestinationManager> {
    batchrouter_dest_http::HttpDestination
        .validate_and_build(
            &DestinationContext {
                id: "h".into(),
                destination_type: "HTTP".into(),
                telemetry: Arc::new(NoopTelemetry),
            },
            &config,
        )
        .unwrap()
}
