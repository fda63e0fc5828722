//! The Marketo destination against the manager conformance suite
//! (`batchrouter_testkit::conformance`), with the Marketo stand-in failing
//! rows per record in the import results and throttling with code 606.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;

use batchrouter_core::{AsyncDestinationManager, ConfigProblems, DestinationContext};
use batchrouter_testkit::conformance::{run_all, Target};
use batchrouter_testkit::marketo::{Endpoint, MarketoFault, MarketoStandIn};
use serde_json::{json, Value};

struct Marketo {
    standin: MarketoStandIn,
}

impl Target for Marketo {
    fn destination_type(&self) -> &str {
        batchrouter_dest_marketo::DESTINATION_TYPE
    }

    fn config(&self) -> Value {
        json!({
            "munchkinId": "123-ABC-456",
            "clientId": self.standin.client_id(),
            "clientSecret": self.standin.client_secret(),
            "baseUrl": self.standin.base_url(),
            "columnFieldsMapping": [
                {"from": "email", "to": "email"},
                {"from": "first", "to": "firstName"}
            ],
            "passUnmappedFields": true,
            "connectTimeout": "2s",
            "requestTimeout": "10s",
        })
    }

    fn build(
        &self,
        ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        batchrouter_dest_marketo::MarketoDestination.validate_and_build(ctx, config)
    }

    fn payload(&self, key: &str) -> String {
        json!({"email": format!("{key}@conformance.test"), "first": "Conf", "score": 3}).to_string()
    }

    fn received(&self, key: &str) -> u32 {
        self.standin
            .imported_count(&format!("{key}@conformance.test"))
    }

    fn bad_payloads(&self) -> Vec<String> {
        vec![json!({"first": "no lookup field"}).to_string()]
    }

    fn rejected_payload(&self, key: &str) -> Option<String> {
        Some(json!({"email": format!("reject-{key}@conformance.test"), "first": "R"}).to_string())
    }

    fn throttle_next_upload(&self) -> bool {
        self.standin.push_fault(
            Endpoint::CreateImport,
            MarketoFault::http_retry_after(429, "1"),
        );
        true
    }

    fn starts_imports(&self) -> bool {
        true
    }

    fn secrets(&self) -> Vec<String> {
        let mut s = vec![self.standin.client_secret().to_string()];
        s.extend(self.standin.issued_tokens());
        s
    }

    fn debug_views(&self, config: &Value) -> Vec<String> {
        vec![format!(
            "{:?}",
            batchrouter_dest_marketo::Settings::from_config(config)
        )]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marketo_conforms() {
    let standin = MarketoStandIn::start().await;
    standin.fail_rows_matching("reject-", "1004 Lead not found");
    let target = Marketo { standin };
    let report = run_all(&target).await;
    assert!(report.not_applicable().is_empty(), "{report:?}");
    assert!(
        !target.standin.issued_tokens().is_empty(),
        "tokens were issued and searched for"
    );
}
