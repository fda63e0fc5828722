//! The HTTP destination against the manager conformance suite
//! (`batchrouter_testkit::conformance`), in both delivery modes: batch
//! (arrays, where a refused request refuses its records together) and single
//! (one request per record, so records are rejected one by one).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;

use batchrouter_core::{AsyncDestinationManager, ConfigProblems, DestinationContext};
use batchrouter_testkit::conformance::{run_all, Target};
use batchrouter_testkit::http::{Fault, HttpStandIn};
use serde_json::{json, Value};

const TOKEN: &str = "Bearer conformance-http-s3cret-9d1f";

struct Http {
    standin: HttpStandIn,
    mode: &'static str,
}

impl Target for Http {
    fn destination_type(&self) -> &str {
        batchrouter_dest_http::DESTINATION_TYPE
    }

    fn config(&self) -> Value {
        json!({
            "url": self.standin.url(),
            "mode": self.mode,
            "maxBatchSize": 5,
            "maxInFlight": 4,
            "headers": {"Authorization": TOKEN},
            "timeout": "10s",
            "connectTimeout": "2s",
        })
    }

    fn build(
        &self,
        ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        batchrouter_dest_http::HttpDestination.validate_and_build(ctx, config)
    }

    fn payload(&self, key: &str) -> String {
        json!({"id": key, "name": "conformance", "n": 1}).to_string()
    }

    fn received(&self, key: &str) -> u32 {
        self.standin.accepted_count(key)
    }

    fn bad_payloads(&self) -> Vec<String> {
        let deep = "[".repeat(batchrouter_core::MAX_PAYLOAD_DEPTH + 1)
            + &"]".repeat(batchrouter_core::MAX_PAYLOAD_DEPTH + 1);
        vec![deep]
    }

    fn rejected_payload(&self, key: &str) -> Option<String> {
        // Only single mode can reject one record alone.
        (self.mode == "single").then(|| json!({"id": format!("reject-{key}")}).to_string())
    }

    fn throttle_next_upload(&self) -> bool {
        self.standin
            .push_fault(Fault::status(429).with_retry_after("1"));
        true
    }

    fn starts_imports(&self) -> bool {
        false
    }

    fn secrets(&self) -> Vec<String> {
        vec![TOKEN.into(), "conformance-http-s3cret".into()]
    }

    fn debug_views(&self, config: &Value) -> Vec<String> {
        vec![format!(
            "{:?}",
            batchrouter_dest_http::config::validate(config)
        )]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_conforms_in_batch_and_single_mode() {
    for mode in ["batch", "single"] {
        let standin = HttpStandIn::start().await;
        standin.reject_when("id", "reject-", 422);
        let report = run_all(&Http { standin, mode }).await;
        let mut expected = vec!["restart"];
        if mode == "batch" {
            expected.push("stats_by_job_id");
        }
        assert_eq!(report.not_applicable(), expected, "{mode}: {report:?}");
    }
}
