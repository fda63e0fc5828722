//! The manager factory: the one place that knows every destination type.

use std::sync::Arc;

use batchrouter_core::{AsyncDestinationManager, ConfigProblems, DestinationContext};

/// Builds a manager from a validated context and config table.
type Constructor = fn(
    &DestinationContext,
    &serde_json::Value,
) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems>;

/// One registered destination type.
struct Entry {
    name: &'static str,
    keys: &'static [&'static str],
    build: Constructor,
}

const TYPES: &[Entry] = &[
    Entry {
        name: batchrouter_dest_http::DESTINATION_TYPE,
        keys: batchrouter_dest_http::CONFIG_KEYS,
        build: batchrouter_dest_http::build,
    },
    Entry {
        name: batchrouter_dest_marketo::DESTINATION_TYPE,
        keys: batchrouter_dest_marketo::CONFIG_KEYS,
        build: batchrouter_dest_marketo::build,
    },
    Entry {
        name: batchrouter_dest_klaviyo::DESTINATION_TYPE,
        keys: batchrouter_dest_klaviyo::CONFIG_KEYS,
        build: batchrouter_dest_klaviyo::build,
    },
    Entry {
        name: batchrouter_dest_sftp::DESTINATION_TYPE,
        keys: batchrouter_dest_sftp::CONFIG_KEYS,
        build: batchrouter_dest_sftp::build,
    },
];

/// Why a destination could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FactoryError {
    /// The type name is not one we know.
    #[error("unknown destination type `{kind}` (known types: {known})")]
    UnknownType {
        /// What the config said.
        kind: String,
        /// Every known type, comma-separated.
        known: String,
    },
    /// The destination rejected its config.
    #[error("{0}")]
    Config(#[from] ConfigProblems),
}

/// Every destination type this build supports.
pub fn known_types() -> Vec<&'static str> {
    TYPES.iter().map(|t| t.name).collect()
}

/// The config keys a destination type accepts.
pub fn config_keys(kind: &str) -> Option<&'static [&'static str]> {
    TYPES.iter().find(|t| t.name == kind).map(|t| t.keys)
}

/// Validates a destination's config and builds its manager (no network I/O).
pub fn build_manager(
    ctx: &DestinationContext,
    config: &serde_json::Value,
) -> Result<Arc<dyn AsyncDestinationManager>, FactoryError> {
    let entry = TYPES
        .iter()
        .find(|t| t.name == ctx.destination_type)
        .ok_or_else(|| FactoryError::UnknownType {
            kind: ctx.destination_type.clone(),
            known: known_types().join(", "),
        })?;
    Ok((entry.build)(ctx, config)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchrouter_core::NoopTelemetry;

    fn ctx(kind: &str) -> DestinationContext {
        DestinationContext {
            id: "d".into(),
            destination_type: kind.into(),
            telemetry: Arc::new(NoopTelemetry),
        }
    }

    #[test]
    fn unknown_types_name_the_known_ones() {
        let err = build_manager(&ctx("FAX"), &serde_json::json!({}))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.contains("unknown destination type `FAX`"), "{text}");
        assert!(text.contains("HTTP"), "{text}");
    }

    #[test]
    fn builds_and_validates_known_types() {
        assert!(build_manager(
            &ctx("HTTP"),
            &serde_json::json!({"url": "http://127.0.0.1:1/x"})
        )
        .is_ok());
        let err = build_manager(&ctx("HTTP"), &serde_json::json!({"ulr": "x"}))
            .err()
            .unwrap();
        assert!(err.to_string().contains("did you mean `url`"), "{err}");
        assert!(config_keys("HTTP").unwrap().contains(&"maxInFlight"));
    }
}
