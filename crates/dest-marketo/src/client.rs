//! HTTP calls to Marketo: token, create import, batch status, result files.
//! Every request has bounded timeouts, is counted in telemetry once, sends
//! the token only as `Authorization: Bearer`, and never lets a URL (the
//! token request carries the client secret in its query) into an error.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::render::excerpt;
use batchrouter_core::{DestinationError, DestinationTelemetry, Secret};
use batchrouter_dest_kit::http::{self as kit, error_for_status, BodyError, TransportError};
use reqwest::multipart::{Form, Part};
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::auth::{CachedToken, TokenCache};
use crate::classify::{classify_errors, is_account_wide_status, ApiError, Failure};
use crate::config::Settings;

/// Largest JSON answer read into memory (status and error answers are tiny).
const MAX_JSON_BYTES: usize = 4 * 1024 * 1024;

/// Largest result file accepted: the uploaded file (< 10 MB) plus a reason per row.
pub const MAX_RESULT_BYTES: u64 = 64 * 1024 * 1024;

/// Chunk size used to stream import files from disk.
const UPLOAD_CHUNK: usize = 64 * 1024;

/// Marketo's answer envelope (`success`, `errors`, `result`).
#[derive(Debug, Deserialize)]
struct Envelope<T> {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<ApiError>,
    #[serde(default = "Vec::new")]
    result: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    error_description: Option<String>,
    #[serde(default)]
    errors: Vec<ApiError>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedImport {
    batch_id: Option<u64>,
    #[serde(default)]
    import_id: Option<String>,
    #[serde(default)]
    status: Option<String>,
}

/// A new import as Marketo acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportCreated {
    /// Marketo's batch id, used by every later call.
    pub batch_id: u64,
    /// Marketo's import id (the batch id as text in practice).
    pub import_id: String,
    /// Initial status (`Queued`).
    pub status: String,
}

/// `result[0]` of `GET /bulk/v1/leads/batch/{id}.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct BatchStatus {
    /// `Queued`, `Importing`, `Complete` or `Failed`.
    pub status: String,
    /// Rows processed so far.
    pub num_of_leads_processed: Option<u64>,
    /// Rows rejected (listed in failures.json).
    pub num_of_rows_failed: Option<u64>,
    /// Rows imported with a warning (listed in warnings.json).
    pub num_of_rows_with_warning: Option<u64>,
    /// Marketo's text, e.g. the failure reason of a `Failed` import.
    pub message: Option<String>,
}

/// Which per-row result file to fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultFile {
    /// `failures.json`: rows Marketo rejected.
    Failures,
    /// `warnings.json`: rows imported with a warning.
    Warnings,
}

impl ResultFile {
    fn path_suffix(self) -> &'static str {
        match self {
            ResultFile::Failures => "failures.json",
            ResultFile::Warnings => "warnings.json",
        }
    }
}

/// A request that did not work, and how far its answer reaches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestError {
    /// The classified error.
    pub error: DestinationError,
    /// The refusal applies to every request of the destination (bad
    /// credentials, access denied, wrong URL), not to this request's content.
    pub account_wide: bool,
}

impl From<DestinationError> for RequestError {
    fn from(error: DestinationError) -> Self {
        RequestError {
            error,
            account_wide: false,
        }
    }
}

impl RequestError {
    fn account_wide(error: DestinationError) -> Self {
        RequestError {
            error,
            account_wide: true,
        }
    }
}

/// The Marketo API client of one destination, shared by all its calls.
pub struct Client {
    http: reqwest::Client,
    settings: Arc<Settings>,
    telemetry: Arc<dyn DestinationTelemetry>,
    token: TokenCache,
}

impl Client {
    /// Builds the HTTP client with the configured timeouts (no I/O yet).
    pub fn new(
        settings: Arc<Settings>,
        telemetry: Arc<dyn DestinationTelemetry>,
    ) -> Result<Client, String> {
        // Redirects are refused: one would turn the import POST into a GET.
        let http = kit::build(
            kit::client_builder(settings.connect_timeout, settings.request_timeout)
                .pool_idle_timeout(Duration::from_secs(60)),
        )
        .map_err(|e| e.to_string())?;
        Ok(Client {
            http,
            settings,
            telemetry,
            token: TokenCache::default(),
        })
    }

    /// POSTs one CSV file as a new import, streaming it from disk. The error
    /// says whether the refusal concerns this file or every request.
    pub async fn create_import(
        &self,
        path: &Path,
        bytes: u64,
    ) -> Result<ImportCreated, RequestError> {
        let url = self.settings.endpoint("/bulk/v1/leads.json");
        self.authorized(|token| {
            let url = url.clone();
            async move {
                let file = tokio::fs::File::open(path).await.map_err(|e| {
                    DestinationError::retryable(format!("cannot reopen the import file: {e}"))
                })?;
                let body =
                    reqwest::Body::wrap_stream(ReaderStream::with_capacity(file, UPLOAD_CHUNK));
                let part = Part::stream_with_length(body, bytes)
                    .file_name("leads.csv")
                    .mime_str("text/csv")
                    .map_err(|e| {
                        DestinationError::retryable(format!(
                            "cannot build the upload: {}",
                            e.without_url()
                        ))
                    })?;
                let mut form = Form::new()
                    .text("format", "csv")
                    .text("lookupField", self.settings.lookup_field.clone());
                if let Some(list) = &self.settings.list_id {
                    form = form.text("listId", list.clone());
                }
                if let Some(p) = &self.settings.partition_name {
                    form = form.text("partitionName", p.clone());
                }
                let form = form.part("file", part);
                let resp = self
                    .send(
                        self.http
                            .post(url)
                            .bearer_auth(token.expose())
                            .multipart(form),
                    )
                    .await?;
                let result: Vec<CreatedImport> = read_envelope(resp, "create import").await?;
                let first = result.into_iter().next();
                match first.and_then(|r| r.batch_id.map(|id| (id, r))) {
                    Some((batch_id, r)) => Ok(ImportCreated {
                        batch_id,
                        import_id: r.import_id.unwrap_or_else(|| batch_id.to_string()),
                        status: r.status.unwrap_or_default(),
                    }),
                    None => Err(DestinationError::retryable(
                        "Marketo accepted the import but sent no batchId",
                    )
                    .into()),
                }
            }
        })
        .await
    }

    /// Reads an import's status and counts.
    pub async fn batch_status(&self, batch_id: u64) -> Result<BatchStatus, DestinationError> {
        let url = self
            .settings
            .endpoint(&format!("/bulk/v1/leads/batch/{batch_id}.json"));
        self.authorized(|token| {
            let url = url.clone();
            async move {
                let resp = self
                    .send(self.http.get(url).bearer_auth(token.expose()))
                    .await?;
                let result: Vec<BatchStatus> = read_envelope(resp, "import status").await?;
                result.into_iter().next().ok_or_else(|| {
                    DestinationError::retryable(format!(
                        "Marketo sent no status for batch {batch_id}"
                    ))
                    .into()
                })
            }
        })
        .await
        .map_err(|e| e.error)
    }

    /// Streams a result file (`failures.json` / `warnings.json`) into `dest`.
    /// Marketo answers CSV on success and its JSON error shape otherwise, so
    /// the content type decides how the body is read.
    pub async fn download_result(
        &self,
        batch_id: u64,
        which: ResultFile,
        dest: &Path,
    ) -> Result<u64, DestinationError> {
        let url = self.settings.endpoint(&format!(
            "/bulk/v1/leads/batch/{batch_id}/{}",
            which.path_suffix()
        ));
        self.authorized(|token| {
            let url = url.clone();
            async move {
                let mut resp = self
                    .send(self.http.get(url).bearer_auth(token.expose()))
                    .await?;
                let content_type = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_ascii_lowercase();
                if !resp.status().is_success() || !content_type.starts_with("text/csv") {
                    let what = format!("{} (content type {content_type:?})", which.path_suffix());
                    let err: Result<Vec<serde_json::Value>, Failure> =
                        read_envelope(resp, &what).await;
                    return Err(match err {
                        Err(f) => f,
                        Ok(_) => DestinationError::retryable(format!(
                            "Marketo answered {what} instead of a CSV file"
                        ))
                        .into(),
                    });
                }
                let mut out = tokio::fs::File::create(dest).await.map_err(|e| {
                    DestinationError::retryable(format!("cannot write the result file: {e}"))
                })?;
                let mut total = 0u64;
                while let Some(chunk) = resp.chunk().await.map_err(|e| {
                    transport_error(&TransportError::from_reqwest(e), "reading a result file")
                })? {
                    total += chunk.len() as u64;
                    if total > MAX_RESULT_BYTES {
                        return Err(DestinationError::retryable(format!(
                            "{} is larger than {MAX_RESULT_BYTES} bytes",
                            which.path_suffix()
                        ))
                        .into());
                    }
                    out.write_all(&chunk).await.map_err(|e| {
                        DestinationError::retryable(format!("cannot write the result file: {e}"))
                    })?;
                }
                out.flush().await.map_err(|e| {
                    DestinationError::retryable(format!("cannot write the result file: {e}"))
                })?;
                Ok(total)
            }
        })
        .await
        .map_err(|e| e.error)
    }

    /// Runs `op` with a token; on 601/602 drops the token, fetches a new one
    /// and repeats once. A second token rejection is a transient failure.
    async fn authorized<'a, T, F, Fut>(&'a self, op: F) -> Result<T, RequestError>
    where
        F: Fn(Secret) -> Fut,
        Fut: Future<Output = Result<T, Failure>> + 'a,
    {
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            match op(token.clone()).await {
                Ok(v) => return Ok(v),
                Err(Failure::Destination(e)) => return Err(e.into()),
                Err(Failure::AccountWide(e)) => return Err(RequestError::account_wide(e)),
                Err(Failure::Token(reason)) if !refreshed => {
                    tracing::debug!(reason = %reason, "Marketo rejected the access token; refreshing it once");
                    self.token.invalidate(&token).await;
                    refreshed = true;
                }
                Err(Failure::Token(reason)) => {
                    return Err(DestinationError::retryable(format!(
                        "{reason} (again with a freshly issued access token)"
                    ))
                    .into())
                }
            }
        }
    }

    async fn token(&self) -> Result<Secret, RequestError> {
        self.token.get(|| self.fetch_token()).await
    }

    async fn fetch_token(&self) -> Result<CachedToken, RequestError> {
        let url = self.settings.endpoint("/identity/oauth/token");
        let request = self.http.get(url).query(&[
            ("grant_type", "client_credentials"),
            ("client_id", self.settings.client_id.as_str()),
            ("client_secret", self.settings.client_secret.expose()),
        ]);
        let started = Instant::now();
        let resp = self.send(request).await?;
        let status = resp.status();
        let retry_after = kit::retry_after(resp.headers());
        let body = read_limited(resp, "token").await?;
        let answer: Option<TokenAnswer> = serde_json::from_slice(&body).ok();
        if !status.is_success() {
            let detail = answer
                .as_ref()
                .map(|a| {
                    let parts: Vec<&str> = [a.error.as_deref(), a.error_description.as_deref()]
                        .into_iter()
                        .flatten()
                        .collect();
                    excerpt(&parts.join(": "), 200)
                })
                .unwrap_or_default();
            if matches!(
                status,
                StatusCode::UNAUTHORIZED | StatusCode::BAD_REQUEST | StatusCode::FORBIDDEN
            ) {
                return Err(RequestError::account_wide(DestinationError::permanent(
                    format!(
                    "Marketo refused the client credentials of clientId `{}` (HTTP {}{}{detail})",
                    self.settings.client_id,
                    status.as_u16(),
                    if detail.is_empty() { "" } else { ": " }
                ),
                )));
            }
            let e = error_for_status(status.as_u16(), &detail, retry_after).unwrap_or_else(|| {
                DestinationError::retryable(format!("token request: HTTP {status}"))
            });
            return Err(status_error(e, status.as_u16()));
        }
        let Some(answer) = answer else {
            return Err(
                DestinationError::retryable("Marketo sent a malformed token answer").into(),
            );
        };
        match (
            answer.access_token.filter(|t| !t.is_empty()),
            answer.errors.is_empty(),
        ) {
            (Some(token), _) => {
                let expires_in = Duration::from_secs(answer.expires_in.unwrap_or(0));
                tracing::debug!(
                    expires_in_s = expires_in.as_secs(),
                    "fetched a Marketo access token"
                );
                Ok(CachedToken::new(Secret::new(token), expires_in, started))
            }
            (None, false) => match classify_errors(&answer.errors, retry_after) {
                Failure::AccountWide(e) => Err(RequestError::account_wide(e)),
                other => Err(other.into_error().into()),
            },
            (None, true) => Err(DestinationError::retryable(
                "Marketo sent a token answer without access_token",
            )
            .into()),
        }
    }

    /// Sends one request, counting it once in telemetry; errors carry no URL.
    async fn send(&self, request: RequestBuilder) -> Result<Response, DestinationError> {
        kit::send(self.telemetry.as_ref(), request)
            .await
            .map_err(|e| transport_error(&e, "sending a request"))
    }
}

/// A classified HTTP status error, marked account-wide when the status
/// refuses every request alike (see [`is_account_wide_status`]).
fn status_error(e: DestinationError, status: u16) -> RequestError {
    if matches!(e, DestinationError::Permanent { .. }) && is_account_wide_status(status) {
        RequestError::account_wide(e)
    } else {
        e.into()
    }
}

/// A transport error as a retryable destination error (it carries no URL).
fn transport_error(e: &TransportError, doing: &str) -> DestinationError {
    e.to_destination_error(format!(
        "Marketo {} while {doing}: {}",
        e.kind.phrase(),
        e.detail
    ))
}

/// Reads a JSON answer of at most [`MAX_JSON_BYTES`]; a longer one is an
/// error, never cut.
async fn read_limited(resp: Response, what: &str) -> Result<bytes::Bytes, DestinationError> {
    kit::read_capped(resp, MAX_JSON_BYTES)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { limit } => DestinationError::retryable(format!(
                "Marketo's {what} answer is larger than {limit} bytes"
            )),
            BodyError::Transport(e) => transport_error(&e, &format!("reading the {what} answer")),
        })
}

/// Reads Marketo's envelope: HTTP status first, then `success`/`errors`.
async fn read_envelope<T: DeserializeOwned>(resp: Response, what: &str) -> Result<Vec<T>, Failure> {
    let status = resp.status();
    let hint = kit::retry_after(resp.headers());
    let body = read_limited(resp, what).await?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        let e = error_for_status(status.as_u16(), &text, hint)
            .unwrap_or_else(|| DestinationError::retryable(format!("{what}: HTTP {status}")));
        return Err(
            if matches!(e, DestinationError::Permanent { .. })
                && is_account_wide_status(status.as_u16())
            {
                Failure::AccountWide(e)
            } else {
                Failure::Destination(e)
            },
        );
    }
    let envelope: Envelope<T> = serde_json::from_slice(&body).map_err(|e| {
        DestinationError::retryable(format!(
            "Marketo sent a malformed {what} answer ({e}): {}",
            excerpt(&String::from_utf8_lossy(&body), 120)
        ))
    })?;
    if envelope.success && envelope.errors.is_empty() {
        return Ok(envelope.result);
    }
    Err(classify_errors(&envelope.errors, hint))
}

#[cfg(test)]
mod tests {
    use super::*;

    use batchrouter_core::NoopTelemetry;
    use batchrouter_testkit::http::{Fault, HttpStandIn};

    #[tokio::test]
    async fn the_import_post_is_never_redirected_into_a_get() {
        let marketo = HttpStandIn::start().await;
        let elsewhere = HttpStandIn::start().await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("leads.csv");
        std::fs::write(&file, "email\na@example.com\n").unwrap();
        let settings = Settings::from_config(&serde_json::json!({
            "munchkinId": "123-ABC-456",
            "clientId": "cid",
            "clientSecret": "shh",
            "passUnmappedFields": true,
            "baseUrl": marketo.url(),
        }))
        .unwrap();
        let client = Client::new(Arc::new(settings), Arc::new(NoopTelemetry)).unwrap();
        // A token is at hand, so the first request is the import POST.
        client
            .token
            .get(|| async {
                Ok::<_, RequestError>(CachedToken::new(
                    Secret::new("tok".to_string()),
                    Duration::from_secs(3600),
                    Instant::now(),
                ))
            })
            .await
            .unwrap();
        for (n, status) in [301, 302, 303, 307, 308].into_iter().enumerate() {
            marketo.push_fault(Fault::redirect(status, elsewhere.url()));
            let e = client.create_import(&file, 20).await.unwrap_err();
            assert!(
                matches!(e.error, DestinationError::Permanent { .. }),
                "{status}: {e:?}"
            );
            assert!(
                e.error.message().starts_with(&format!("HTTP {status}")),
                "{status}: {e:?}"
            );
            assert_eq!(marketo.requests(), n as u64 + 1, "{status}");
            assert_eq!(marketo.last_method(), "POST", "{status}");
            assert_eq!(
                elsewhere.requests(),
                0,
                "{status}: the redirect was followed"
            );
        }
    }
}
