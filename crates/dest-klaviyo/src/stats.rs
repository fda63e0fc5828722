//! Per-job results of a completed import: every page of
//! `/import-errors` (following `links.next` to the end) is mapped back to
//! jobs through the key map persisted in the import context, so the answer
//! is the same in a freshly started daemon.
//!
//! Pages are asked for at the documented maximum of 100 errors (`page[size]`;
//! default 20), and a 429 pause between two pages is waited out (at most
//! [`MAX_PAGE_WAIT`] at a time, within `uploadTimeBudget` overall) before
//! going on from the same cursor: under load the read still ends instead of
//! starting over at page 1 after every throttle.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use batchrouter_core::{
    DestinationError, ErrorCode, ImportHandle, JobError, JobId, Outcome, UploadStats,
};
use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::client::{describe, profile_index, ErrorSource, RequestError};
use crate::context::{ImportContext, Match, Matcher, ProfileKeys};
use crate::poll::{gone_for_good, job_path, not_found_yet, JobDocument};
use crate::KlaviyoManager;

/// Import errors asked for per page: Klaviyo's documented maximum for
/// `page[size]` on this endpoint (default 20, min 1, max 100).
pub const ERRORS_PAGE_SIZE: u32 = 100;
/// The longest single wait for a 429 pause between two pages.
pub const MAX_PAGE_WAIT: Duration = Duration::from_secs(60);
/// The wait after a 429 that named no `Retry-After`.
const DEFAULT_PAGE_WAIT: Duration = Duration::from_secs(1);

/// One page of `import-error` resources.
#[derive(Debug, Deserialize)]
struct ErrorsPage {
    #[serde(default)]
    data: Vec<ImportError>,
    #[serde(default)]
    links: Option<Links>,
}

#[derive(Debug, Deserialize)]
struct Links {
    #[serde(default)]
    next: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ImportError {
    #[serde(default)]
    attributes: ImportErrorAttributes,
}

#[derive(Debug, Default, Deserialize)]
struct ImportErrorAttributes {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<String>,
    #[serde(default)]
    source: Option<ErrorSource>,
    #[serde(default)]
    original_payload: Option<Value>,
}

/// Reads the results of a completed import and maps them to jobs.
pub async fn get_upload_stats(
    m: &KlaviyoManager,
    import: &ImportHandle,
) -> Result<UploadStats, DestinationError> {
    let ctx = match ImportContext::from_value(&import.context) {
        Ok(c) => c,
        Err(e) => {
            warn!(destination_id = %m.destination_id, import_id = import.id, error = %e, "klaviyo import context unreadable");
            return Ok(all_failed(
                &import.job_ids,
                format!(
                    "cannot map Klaviyo's results to jobs: {e}; the jobs will be uploaded again"
                ),
            ));
        }
    };
    let job_url = m.client.url(&job_path(&ctx.klaviyo_job_id));
    let answer = m
        .client
        .get(&job_url, None)
        .await
        .map_err(|e| e.to_destination_error())?;
    if answer.status == 404 && !gone_for_good(import) {
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, "klaviyo import job not found (yet) when reading results; asking again later");
        return Err(not_found_yet(import, &ctx.klaviyo_job_id));
    }
    if answer.status == 404 {
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, "klaviyo import job not found when reading results");
        return Ok(all_failed(
            &import.job_ids,
            format!(
                "Klaviyo no longer knows import job {} (HTTP 404), so its per-profile results are lost; the jobs will be uploaded again",
                ctx.klaviyo_job_id
            ),
        ));
    }
    if let Some(e) = answer.to_destination_error() {
        return Err(e);
    }
    let doc = JobDocument::parse(&answer).map_err(DestinationError::retryable)?;
    let status = doc.data.attributes.status.as_deref().unwrap_or("");
    if status != "complete" {
        return Err(DestinationError::retryable(format!(
            "Klaviyo import job {} is {status:?}, not complete; results are read once it is",
            ctx.klaviyo_job_id
        )));
    }
    let failed_count = doc.data.attributes.failed_count.unwrap_or(0);
    if failed_count == 0 {
        debug!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, jobs = import.job_ids.len(), "klaviyo upload stats: no failed profiles");
        return Ok(UploadStats::default());
    }

    let matcher = Matcher::new(&ctx.profiles);
    let pending: HashSet<JobId> = import.job_ids.iter().copied().collect();
    let mut reasons: BTreeMap<JobId, Vec<String>> = BTreeMap::new();
    let mut unmatched = 0u64;
    let mut listed = 0u64;
    let mut pages = 0u64;
    // Every page but the last holds at least one error, so more pages than
    // failed profiles (plus slack) means the links go round in circles.
    let max_pages = failed_count + 2;
    let mut seen: HashSet<String> = HashSet::new();
    let mut url = format!("{job_url}/import-errors?page[size]={ERRORS_PAGE_SIZE}");
    let deadline = tokio::time::Instant::now() + m.cfg.upload_time_budget;
    let mut waits = 0u32;
    loop {
        // A 429 pause (seen here or by another caller) is waited out and the
        // same page asked again: the pages read so far are kept.
        let pause = match m.client.get(&url, Some(deadline)).await {
            Ok(a) if a.status == 429 => Err(a.retry_after.unwrap_or(DEFAULT_PAGE_WAIT)),
            Ok(a) => Ok(a),
            Err(RequestError::Paused(d)) => Err(d),
            Err(e) => {
                warn!(destination_id = %m.destination_id, import_id = import.id, page = pages + 1, error = %e, "klaviyo import-errors page not read");
                return Err(e.to_destination_error());
            }
        };
        let answer = match pause {
            Ok(a) => a,
            Err(pause) => {
                let wait = pause.clamp(Duration::from_millis(10), MAX_PAGE_WAIT);
                if tokio::time::Instant::now() + wait > deadline {
                    warn!(destination_id = %m.destination_id, import_id = import.id, page = pages + 1, pause_ms = pause.as_millis() as u64, "klaviyo import-errors paused past uploadTimeBudget; reading again later");
                    return Err(DestinationError::throttled(
                        format!("Klaviyo paused reading import errors (page {}) past uploadTimeBudget; reading again later", pages + 1),
                        Some(pause),
                    ));
                }
                waits += 1;
                info!(destination_id = %m.destination_id, import_id = import.id, page = pages + 1, wait_ms = wait.as_millis() as u64, "klaviyo import-errors paused by a 429; waiting, then going on from the same page");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        pages += 1;
        if let Some(e) = answer.to_destination_error() {
            warn!(destination_id = %m.destination_id, import_id = import.id, page = pages, status = answer.status, error = %e, "klaviyo import-errors page refused");
            return Err(e);
        }
        let page: ErrorsPage = serde_json::from_slice(&answer.body).map_err(|e| {
            DestinationError::retryable(format!(
                "malformed import-errors page {pages} from Klaviyo: {e}"
            ))
        })?;
        for err in page.data {
            listed += 1;
            let a = err.attributes;
            let text = format!(
                "Klaviyo rejected the profile: {}",
                describe(a.code.as_deref(), a.title.as_deref(), a.detail.as_deref())
            );
            let pointer = a.source.as_ref().and_then(|s| s.pointer.as_deref());
            let keys = a
                .original_payload
                .as_ref()
                .map(ProfileKeys::from_original_payload)
                .unwrap_or_default();
            match matcher.find(&keys, pointer.and_then(profile_index)) {
                Match::One(job) if pending.contains(&job) => {
                    reasons.entry(job).or_default().push(text)
                }
                Match::Ambiguous(jobs) => {
                    let mine: Vec<JobId> =
                        jobs.into_iter().filter(|j| pending.contains(j)).collect();
                    if mine.is_empty() {
                        unmatched += 1;
                    }
                    let n = mine.len();
                    for job in mine {
                        reasons.entry(job).or_default().push(format!(
                            "{text} (ambiguous: {n} jobs of this import sent the same identifiers)"
                        ));
                    }
                }
                Match::One(_) | Match::None => {
                    unmatched += 1;
                    debug!(destination_id = %m.destination_id, import_id = import.id, pointer, code = a.code.as_deref(), "klaviyo import error matches no pending job");
                }
            }
        }
        let next = page.links.and_then(|l| l.next).filter(|n| !n.is_empty());
        let Some(next) = next else { break };
        if !m.client.same_origin(&next) {
            return Err(DestinationError::permanent(
                "Klaviyo's import-errors `links.next` points at another host; refusing to send the API key there",
            ));
        }
        if !seen.insert(next.clone()) || pages >= max_pages {
            return Err(DestinationError::retryable(format!(
                "Klaviyo's import-errors pagination does not end after {pages} pages"
            )));
        }
        url = next;
    }

    if listed < failed_count {
        // The unlisted failed profiles would end `succeeded`: read again
        // later (the router retries until the import deadline).
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, failed_count, listed, pages, "klaviyo listed fewer import errors than failed profiles; results will be read again");
        return Err(DestinationError::retryable(format!(
            "Klaviyo reports {failed_count} failed profiles for import job {} but lists {listed} import errors; reading the results again later",
            ctx.klaviyo_job_id
        )));
    }
    if unmatched > 0 {
        warn!(destination_id = %m.destination_id, import_id = import.id, klaviyo_job = %ctx.klaviyo_job_id, unmatched, "klaviyo import errors matched no job");
    }
    debug!(
        destination_id = %m.destination_id,
        import_id = import.id,
        klaviyo_job = %ctx.klaviyo_job_id,
        failed_count,
        errors = listed,
        pages,
        waits,
        rejected_jobs = reasons.len(),
        unmatched,
        "klaviyo upload stats"
    );
    let outcomes = reasons
        .into_iter()
        .map(|(job, texts)| {
            debug!(destination_id = %m.destination_id, job, reason = %texts.join("; "), "klaviyo profile rejected");
            (
                job,
                Outcome::Aborted(JobError::new(ErrorCode::RecordRejected, texts.join("; "))),
            )
        })
        .collect();
    Ok(UploadStats {
        outcomes,
        unmatched,
    })
}

fn all_failed(jobs: &[JobId], message: String) -> UploadStats {
    let e = JobError::new(ErrorCode::ImportFailed, message);
    UploadStats {
        outcomes: jobs
            .iter()
            .map(|&j| (j, Outcome::Failed(e.clone())))
            .collect(),
        unmatched: 0,
    }
}
