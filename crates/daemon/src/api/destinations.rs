//! Per-destination endpoints: the job counts listing and the dead-letter
//! pair (retry one job, redrive a destination's aborted or failed jobs).
//! Split from `api.rs` so the operator-facing handlers read on their own.

use std::collections::BTreeSet;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchrouter_core::store::RetryResult;
use batchrouter_core::{JobState, Timestamp};
use serde_json::{json, Value};

use super::{parse_id, ApiError, ApiState};

pub(super) async fn list_destinations(State(st): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let counts = st
        .store
        .destination_counts()
        .await
        .map_err(ApiError::store)?;
    let list: Vec<Value> = st
        .destinations
        .iter()
        .map(|(id, info)| {
            let c = counts.get(id);
            let by_state: serde_json::Map<String, Value> = JobState::ALL
                .iter()
                .map(|s| {
                    let n = c.and_then(|c| c.by_state.get(s)).copied().unwrap_or(0);
                    (s.as_str().to_string(), json!(n))
                })
                .collect();
            json!({
                "id": id,
                "type": info.kind,
                "enabled": info.enabled,
                "counts": by_state,
                "importsInFlight": c.map_or(0, |c| c.imports_in_flight),
            })
        })
        .collect();
    Ok(Json(json!({ "destinations": list })))
}

pub(super) async fn retry_job(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id, "job")?;
    match st
        .store
        .retry_job(id, Timestamp::now())
        .await
        .map_err(ApiError::store)?
    {
        RetryResult::Retried => {
            if let Ok(Some(j)) = st.store.get_job(id).await {
                st.router.wake(&j.destination_id);
            }
            tracing::info!(job_id = id, "Job re-driven through the API.");
            Ok((StatusCode::ACCEPTED, Json(json!({"count": 1}))).into_response())
        }
        RetryResult::NotFound => Err(ApiError::not_found(format!("no job {id}"))),
        RetryResult::Conflict(state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("job {id} is {state}; only aborted or failed jobs can be retried"),
        )),
    }
}

pub(super) async fn redrive(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Query(q): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    if !st.destinations.contains_key(&id) {
        return Err(ApiError::not_found(format!(
            "destination `{id}` is not configured"
        )));
    }
    // `state` may repeat (`?state=aborted&state=failed`) or list states
    // (`?state=aborted,failed`); both mean the union.
    let mut asked = Vec::new();
    for (key, value) in &q {
        match key.as_str() {
            "state" => asked.extend(value.split(',').map(str::trim)),
            other => {
                return Err(ApiError::malformed(format!(
                    "unknown query parameter `{other}` (redrive takes `state`)"
                )))
            }
        }
    }
    if asked.is_empty() {
        asked.push("aborted");
    }
    let mut states = BTreeSet::new();
    for s in asked {
        match s {
            "aborted" => states.insert(JobState::Aborted),
            "failed" => states.insert(JobState::Failed),
            other => {
                return Err(ApiError::malformed(format!(
                    "state `{other}` cannot be re-driven (use aborted, failed or aborted,failed)"
                )))
            }
        };
    }
    let states: Vec<JobState> = states.into_iter().collect();
    let n = st
        .store
        .redrive(&id, &states, Timestamp::now())
        .await
        .map_err(ApiError::store)?;
    st.router.wake(&id);
    tracing::info!(destination_id = %id, count = n, "Jobs re-driven through the API.");
    Ok((StatusCode::ACCEPTED, Json(json!({"count": n}))).into_response())
}
