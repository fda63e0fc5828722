//! Job generators for tests, benchmarks and the demo.

use batchrouter_core::NewJob;
use serde_json::json;

/// `n` jobs for `destination_id` whose payloads are `{"id": "<prefix>-<i>", …}`
/// with a little filler, so stand-ins can count each record by its id.
pub fn numbered_jobs(destination_id: &str, prefix: &str, n: usize) -> Vec<NewJob> {
    (0..n)
        .map(|i| NewJob {
            destination_id: destination_id.to_string(),
            payload: json!({
                "id": format!("{prefix}-{i}"),
                "email": format!("user{i}@example.com"),
                "n": i,
                "flag": i % 2 == 0,
            })
            .to_string(),
            message_id: None,
        })
        .collect()
}

/// A job whose payload is not valid JSON (as an upstream SQL insert might write).
pub fn malformed_job(destination_id: &str, i: usize) -> NewJob {
    NewJob {
        destination_id: destination_id.to_string(),
        payload: format!("{{\"id\": \"bad-{i}\", oops"),
        message_id: None,
    }
}
