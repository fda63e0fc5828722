//! The factory entry point: `validate_and_build` validates everything and does no I/O.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::Arc;

use batchrouter_core::{DestinationContext, NoopTelemetry};
use batchrouter_dest_klaviyo::{KlaviyoDestination, CONFIG_KEYS, DESTINATION_TYPE};
use serde_json::json;

fn ctx() -> DestinationContext {
    DestinationContext {
        id: "k1".into(),
        destination_type: DESTINATION_TYPE.into(),
        telemetry: Arc::new(NoopTelemetry),
    }
}

#[test]
fn build_lists_every_problem_of_a_bad_config() {
    let err = KlaviyoDestination.validate_and_build(
        &ctx(),
        &json!({"privateApiKey": "", "revison": "2025-01-15", "baseUrl": "not a url", "maxProfilesPerRequest": 0}),
    )
    .err()
    .expect("refused");
    let all = err.0.join("\n");
    assert_eq!(err.0.len(), 4, "{all}");
    assert!(
        all.contains("unknown key `revison` (did you mean `revision`?)"),
        "{all}"
    );
    assert!(all.contains("`privateApiKey` is empty"), "{all}");
    assert!(
        all.contains("`baseUrl` \"not a url\" is not a URL"),
        "{all}"
    );
    assert!(all.contains("`maxProfilesPerRequest` = 0"), "{all}");
}

#[test]
fn build_needs_no_network_and_every_documented_key_is_accepted() {
    // An unroutable base URL is fine: nothing connects until the first upload.
    let config = json!({
        "privateApiKey": "pk_x", "listId": "L1", "baseUrl": "https://klaviyo.invalid",
        "revision": "2025-01-15", "maxProfileBytes": "100KB", "maxProfilesPerRequest": 10000,
        "maxRequestBytes": "4.5MB", "rateLimitPerSecond": 10, "rateLimitPerMinute": 150,
        "connectTimeout": "10s", "requestTimeout": "1m", "uploadTimeBudget": "8m"
    });
    let keys: Vec<&str> = config
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut documented = CONFIG_KEYS.to_vec();
    documented.sort();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(sorted, documented);
    let m = KlaviyoDestination
        .validate_and_build(&ctx(), &config)
        .expect("valid");
    // One batch must fit in uploadTimeBudget at the configured rate: 8 min at
    // 150/min is 1,200 requests, half of them planned, of 10,000 profiles.
    assert_eq!(m.limits().max_events, Some(6_000_000));
    assert!(m.limits().max_upload_bytes.is_some());
    let slow = KlaviyoDestination
        .validate_and_build(
            &ctx(),
            &json!({"privateApiKey": "pk_x", "rateLimitPerMinute": 10, "uploadTimeBudget": "1m"}),
        )
        .expect("valid");
    assert_eq!(
        slow.limits().max_events,
        Some(50_000),
        "5 requests in a minute at 10/min, halved"
    );
}
