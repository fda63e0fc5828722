//! Job intake (`POST /v1/jobs`: body reading, JSON and NDJSON parsing,
//! validation) and the job and import status endpoints. Split from `api.rs`
//! so the request handling for jobs reads on its own.

use std::collections::BTreeMap;

use axum::body::{to_bytes, Body};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use batchrouter_core::store::{ImportRecord, JobRecord};
use batchrouter_core::{JobError, NewJob, Timestamp};
use batchrouter_router::events::JobsReceived;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{parse_id, rfc3339, ApiError, ApiState};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JobIn {
    destination_id: String,
    payload: Box<RawValue>,
    #[serde(default)]
    message_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    jobs: Vec<JobIn>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Accepted {
    job_id: i64,
    status_url: String,
    duplicate: bool,
}

async fn read_body(
    st: &ApiState,
    headers: &HeaderMap,
    body: Body,
) -> Result<axum::body::Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {} bytes", st.max_body_bytes),
        )
    };
    let too_slow = || {
        let mut e = ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {:?}",
                st.body_read_timeout
            ),
        );
        e.close = true;
        e
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_body_bytes as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(st.body_read_timeout, to_bytes(body, st.max_body_bytes)).await {
        Err(_) => Err(too_slow()),
        Ok(r) => r.map_err(|_| too_large()),
    }
}

fn parse_jobs(headers: &HeaderMap, body: &[u8]) -> Result<Vec<JobIn>, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::malformed("request body is not UTF-8"))?;
    let jobs = if ct == "application/x-ndjson" || ct == "application/jsonl" {
        let mut jobs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let job: JobIn = serde_json::from_str(line)
                .map_err(|e| ApiError::malformed(format!("line {}: {e}", i + 1)))?;
            jobs.push(job);
        }
        jobs
    } else {
        serde_json::from_str::<Envelope>(text)
            .map_err(|e| {
                ApiError::malformed(format!("body is not a {{\"jobs\": [...]}} envelope: {e}"))
            })?
            .jobs
    };
    if jobs.is_empty() {
        return Err(ApiError::malformed("no jobs in the request"));
    }
    Ok(jobs)
}

pub(super) async fn submit_jobs(
    State(st): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&st, &headers, body).await?;
    let jobs = parse_jobs(&headers, &bytes)?;
    let mut new_jobs = Vec::with_capacity(jobs.len());
    for (i, j) in jobs.into_iter().enumerate() {
        if !st.destinations.contains_key(&j.destination_id) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_destination",
                format!(
                    "job {}: destination `{}` is not configured",
                    i + 1,
                    j.destination_id
                ),
            ));
        }
        let job = NewJob {
            destination_id: j.destination_id,
            payload: j.payload.get().to_string(),
            message_id: j.message_id,
        };
        job.validate()
            .map_err(|e| ApiError::malformed(format!("job {}: {e}", i + 1)))?;
        new_jobs.push(job);
    }
    let dests: Vec<String> = new_jobs.iter().map(|j| j.destination_id.clone()).collect();
    let inserted = st
        .store
        .insert_jobs(new_jobs, Timestamp::now())
        .await
        .map_err(ApiError::store)?;
    let mut fresh: BTreeMap<&str, u64> = BTreeMap::new();
    for (d, ins) in dests.iter().zip(&inserted) {
        if !ins.duplicate {
            *fresh.entry(d.as_str()).or_default() += 1;
        }
    }
    for (d, n) in &fresh {
        let kind = st
            .destinations
            .get(*d)
            .map(|i| i.kind.as_str())
            .unwrap_or("");
        JobsReceived {
            destination_id: d,
            destination_type: kind,
            count: *n,
        }
        .emit(&st.metrics);
        st.router.wake(d);
    }
    tracing::debug!(
        jobs = inserted.len(),
        new = fresh.values().sum::<u64>(),
        "Jobs accepted."
    );
    let body = json!({
        "status": "accepted",
        "jobs": inserted.iter().map(|i| Accepted {
            job_id: i.job_id,
            status_url: format!("/v1/jobs/{}", i.job_id),
            duplicate: i.duplicate,
        }).collect::<Vec<_>>(),
    });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

fn error_json(e: &JobError) -> Value {
    json!({"code": e.code.as_str(), "message": e.message})
}

fn job_json(j: &JobRecord) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("jobId".into(), json!(j.id));
    m.insert("destinationId".into(), json!(j.destination_id));
    m.insert("state".into(), json!(j.state.as_str()));
    m.insert("attempts".into(), json!(j.attempts));
    m.insert("createdAt".into(), json!(rfc3339(j.created_at)));
    m.insert("updatedAt".into(), json!(rfc3339(j.updated_at)));
    if let Some(mid) = &j.message_id {
        m.insert("messageId".into(), json!(mid));
    }
    if let Some(t) = j.next_attempt_at {
        m.insert("nextAttemptAt".into(), json!(rfc3339(t)));
    }
    if let Some(e) = &j.error {
        m.insert("error".into(), error_json(e));
    }
    if let Some(n) = &j.note {
        m.insert("note".into(), json!(n));
    }
    if let Some(x) = &j.external_id {
        m.insert("externalId".into(), json!(x));
    }
    if let Some(i) = j.import_id {
        m.insert("importId".into(), json!(i));
    }
    if let Some(t) = j.completed_at {
        m.insert("completedAt".into(), json!(rfc3339(t)));
    }
    Value::Object(m)
}

pub(super) async fn get_job(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "job")?;
    match st.store.get_job(id).await.map_err(ApiError::store)? {
        Some(j) => Ok(Json(job_json(&j))),
        None => Err(ApiError::not_found(format!("no job {id}"))),
    }
}

fn import_json(i: &ImportRecord) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("importId".into(), json!(i.id));
    m.insert("destinationId".into(), json!(i.destination_id));
    m.insert("batchId".into(), json!(i.batch_id));
    m.insert("status".into(), json!(i.state.as_str()));
    m.insert("progress".into(), json!(i.progress));
    m.insert(
        "counts".into(),
        json!({
            "total": i.job_count,
            "succeeded": i.succeeded,
            "failed": i.failed,
            "aborted": i.aborted,
        }),
    );
    m.insert("pollErrors".into(), json!(i.poll_errors));
    m.insert("startedAt".into(), json!(rfc3339(i.started_at)));
    m.insert("deadlineAt".into(), json!(rfc3339(i.deadline_at)));
    if let Some(t) = i.completed_at {
        m.insert("completedAt".into(), json!(rfc3339(t)));
    } else {
        m.insert("nextPollAt".into(), json!(rfc3339(i.next_poll_at)));
    }
    if let Some(e) = &i.error {
        let key = if i.state.in_flight() {
            "lastPollError"
        } else {
            "error"
        };
        m.insert(key.into(), error_json(e));
    }
    Value::Object(m)
}

pub(super) async fn get_import(
    State(st): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id, "import")?;
    match st.store.get_import(id).await.map_err(ApiError::store)? {
        Some(i) => Ok(Json(import_json(&i))),
        None => Err(ApiError::not_found(format!("no import {id}"))),
    }
}
