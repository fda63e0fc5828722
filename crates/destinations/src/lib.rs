//! The one list of destination types this build ships. The daemon hands
//! [`REGISTRY`] to the config loader (which validates every destination
//! with it) and builds each manager from it once, at `run`; the router
//! only ever sees the manager trait.
//!
//! Adding a destination type is its crate folder plus one line in [`TYPES`]
//! (and the workspace member and dependency lines): see
//! `docs/adding-a-destination.md`.

use batchrouter_core::{Destination, Registry};

/// Every destination type, in the order `check-config` names them.
pub const TYPES: &[&dyn Destination] = &[
    &batchrouter_dest_http::HttpDestination,
    &batchrouter_dest_marketo::MarketoDestination,
    &batchrouter_dest_klaviyo::KlaviyoDestination,
    &batchrouter_dest_sftp::SftpDestination,
];

/// The registry of [`TYPES`].
pub const REGISTRY: Registry = Registry::new(TYPES);

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use batchrouter_core::{DestinationContext, NoopTelemetry};

    fn ctx(kind: &str) -> DestinationContext {
        DestinationContext {
            id: "d".into(),
            destination_type: kind.into(),
            telemetry: Arc::new(NoopTelemetry),
        }
    }

    #[test]
    fn names_are_unique() {
        let names = REGISTRY.names();
        let unique: BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        assert_eq!(
            names,
            ["HTTP", "MARKETO_BULK_UPLOAD", "KLAVIYO_BULK_UPLOAD", "SFTP"]
        );
    }

    #[test]
    fn unknown_types_name_the_known_ones() {
        let err = REGISTRY
            .build(&ctx("FAX"), &serde_json::json!({}))
            .err()
            .unwrap();
        let text = err.to_string();
        assert!(text.contains("unknown destination type `FAX`"), "{text}");
        assert!(text.contains("HTTP, MARKETO_BULK_UPLOAD"), "{text}");
    }

    #[test]
    fn validates_without_building_and_builds_from_the_settings() {
        let http = REGISTRY.get("HTTP").unwrap();
        let settings = http
            .validate(&serde_json::json!({"url": "http://127.0.0.1:1/x"}))
            .unwrap();
        assert_eq!(settings.kind(), "HTTP");
        assert!(http.build(&settings, &ctx("HTTP")).is_ok());
        let err = http
            .validate(&serde_json::json!({"ulr": "x"}))
            .err()
            .unwrap();
        assert!(err.to_string().contains("did you mean `url`"), "{err}");
    }

    #[test]
    fn settings_of_one_type_are_refused_by_another() {
        let settings = REGISTRY
            .get("HTTP")
            .unwrap()
            .validate(&serde_json::json!({"url": "http://127.0.0.1:1/x"}))
            .unwrap();
        let err = REGISTRY
            .get("SFTP")
            .unwrap()
            .build(&settings, &ctx("SFTP"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("validated by `HTTP`"), "{err}");
    }

    #[test]
    fn every_type_declares_keys_with_docs() {
        for t in REGISTRY.types() {
            assert!(!t.config_keys().is_empty(), "{}", t.name());
            for k in t.config_keys() {
                assert!(!k.doc.is_empty(), "{}.{} has no doc", t.name(), k.name);
            }
        }
    }
}
