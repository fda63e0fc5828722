//! The Klaviyo destination against the manager conformance suite
//! (`batchrouter_testkit::conformance`), with the Klaviyo stand-in failing
//! profiles inside the import (import-errors) and throttling with 429.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;

use batchrouter_core::{AsyncDestinationManager, ConfigProblems, DestinationContext};
use batchrouter_testkit::conformance::{run_all, Target};
use batchrouter_testkit::klaviyo::{KlaviyoFault, KlaviyoStandIn, KlaviyoStandInOptions, Route};
use serde_json::{json, Value};

const KEY: &str = "pk_CONFORMANCE_s3cret_4e8a1b";

struct Klaviyo {
    standin: KlaviyoStandIn,
}

impl Target for Klaviyo {
    fn destination_type(&self) -> &str {
        batchrouter_dest_klaviyo::DESTINATION_TYPE
    }

    fn config(&self) -> Value {
        json!({
            "privateApiKey": KEY,
            "baseUrl": self.standin.base_url(),
            "rateLimitPerSecond": 50,
            "rateLimitPerMinute": 3000,
            "requestTimeout": "10s",
            "connectTimeout": "2s",
        })
    }

    fn build(
        &self,
        ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        batchrouter_dest_klaviyo::KlaviyoDestination.validate_and_build(ctx, config)
    }

    fn payload(&self, key: &str) -> String {
        json!({"email": format!("{key}@conformance.test"), "first_name": "Conf", "visits": 2})
            .to_string()
    }

    fn received(&self, key: &str) -> u32 {
        self.standin
            .imported_count(&format!("{key}@conformance.test"))
    }

    fn bad_payloads(&self) -> Vec<String> {
        vec![json!({"first_name": "no identifier"}).to_string()]
    }

    fn rejected_payload(&self, key: &str) -> Option<String> {
        Some(json!({"email": format!("reject-{key}@conformance.test")}).to_string())
    }

    fn throttle_next_upload(&self) -> bool {
        self.standin
            .push_fault(Route::Create, KlaviyoFault::throttled(1));
        true
    }

    fn starts_imports(&self) -> bool {
        true
    }

    fn secrets(&self) -> Vec<String> {
        vec![KEY.into(), "CONFORMANCE_s3cret".into()]
    }

    fn debug_views(&self, config: &Value) -> Vec<String> {
        vec![
            format!(
                "{:?}",
                batchrouter_dest_klaviyo::KlaviyoConfig::from_value(config)
            ),
            format!(
                "{:?}",
                batchrouter_dest_klaviyo::KlaviyoManager::new(
                    &DestinationContext {
                        id: "conformance".into(),
                        destination_type: self.destination_type().into(),
                        telemetry: Arc::new(batchrouter_core::NoopTelemetry),
                    },
                    config
                )
            ),
        ]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn klaviyo_conforms() {
    let standin = KlaviyoStandIn::start_with(KlaviyoStandInOptions {
        api_key: KEY.into(),
        polls_to_complete: 2,
        ..Default::default()
    })
    .await;
    standin.fail_in_import_where("email", "reject-");
    let report = run_all(&Klaviyo { standin }).await;
    assert!(report.not_applicable().is_empty(), "{report:?}");
}
