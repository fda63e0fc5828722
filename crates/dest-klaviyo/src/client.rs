//! The one HTTP client of a destination: fixed headers (key, revision,
//! JSON:API media type), bounded timeouts, the shared rate limiter, one
//! telemetry count per request, and parsing of JSON:API error documents.

use std::sync::Arc;
use std::time::Duration;

use batchrouter_core::render::excerpt;
use batchrouter_core::{DestinationError, DestinationTelemetry};
use batchrouter_dest_kit::http::{
    self as kit, classify_status, BodyError, TransportError, TransportKind,
};
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use tokio::time::Instant;

use crate::config::KlaviyoConfig;
use crate::ratelimit::{RateLimiter, Refused, MAX_PAUSE};

/// JSON:API media type Klaviyo requires on requests and answers.
pub const JSON_API: &str = "application/vnd.api+json";
/// Largest answer read into memory; Klaviyo's answers are a few KB (a page
/// of 100 import errors echoing 100 KB profiles stays well under it).
pub const MAX_ANSWER_BYTES: usize = 8 << 20;

/// Why a request produced no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// A 429 pause is in force; nothing was sent.
    #[error("Klaviyo asked us to pause ({0:?} left after a 429)")]
    Paused(Duration),
    /// The rate limit has no free slot before the caller's deadline
    /// (`uploadTimeBudget`); nothing was sent. Holds the wait to the next slot.
    #[error("not sent: the destination's rate limit has no free request slot within uploadTimeBudget (next slot in {0:?})")]
    OutOfTime(Duration),
    /// The answer was larger than this client reads ([`MAX_ANSWER_BYTES`]);
    /// it was not read, rather than cut and misread as malformed JSON.
    #[error(
        "Klaviyo's answer (HTTP {status}) is too large: over {limit} bytes, so it was not read"
    )]
    TooLarge {
        /// HTTP status of the answer.
        status: u16,
        /// The cap that was exceeded.
        limit: usize,
    },
    /// The request did not finish within `requestTimeout` / `connectTimeout`.
    #[error("request to Klaviyo timed out: {0}")]
    Timeout(String),
    /// Connection refused or reset, TLS failure, answer cut short, …
    #[error("request to Klaviyo failed: {0}")]
    Transport(String),
}

impl RequestError {
    /// The class the router acts on: pauses throttle, the rest is transient.
    pub fn to_destination_error(&self) -> DestinationError {
        match self {
            RequestError::Paused(d) | RequestError::OutOfTime(d) => {
                DestinationError::throttled(self.to_string(), Some(*d))
            }
            RequestError::Timeout(_)
            | RequestError::Transport(_)
            | RequestError::TooLarge { .. } => DestinationError::retryable(self.to_string()),
        }
    }
}

/// An HTTP answer, whatever its status.
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The body, at most [`MAX_ANSWER_BYTES`].
    pub body: Bytes,
    /// Parsed `Retry-After`, when present.
    pub retry_after: Option<Duration>,
}

impl Answer {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The JSON:API `errors` of the body (empty when it has none or is not JSON).
    pub fn errors(&self) -> Vec<ApiErrorItem> {
        serde_json::from_slice::<ErrorDocument>(&self.body)
            .map(|d| d.errors)
            .unwrap_or_default()
    }

    /// A one-line summary: the errors' texts, else a body excerpt.
    pub fn summary(&self) -> String {
        let errors = self.errors();
        let text = if errors.is_empty() {
            excerpt(&String::from_utf8_lossy(&self.body), 200)
        } else {
            let joined: Vec<String> = errors.iter().map(ApiErrorItem::describe).collect();
            excerpt(&joined.join("; "), 500)
        };
        if text.is_empty() {
            format!("Klaviyo answered HTTP {}", self.status)
        } else {
            format!("Klaviyo answered HTTP {}: {text}", self.status)
        }
    }

    /// The generic class of a non-2xx answer (None for 2xx).
    pub fn to_destination_error(&self) -> Option<DestinationError> {
        classify_status(self.status).error(self.summary(), self.retry_after)
    }
}

/// A JSON:API error document.
#[derive(Debug, Deserialize)]
struct ErrorDocument {
    #[serde(default)]
    errors: Vec<ApiErrorItem>,
}

/// One JSON:API error object.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ApiErrorItem {
    /// Machine code, e.g. `invalid`.
    pub code: Option<String>,
    /// Short title.
    pub title: Option<String>,
    /// The explanation users need.
    pub detail: Option<String>,
    /// Where in the request the problem is.
    pub source: Option<ErrorSource>,
}

/// JSON:API `source` of an error.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ErrorSource {
    /// JSON pointer into the request body.
    pub pointer: Option<String>,
    /// Query parameter or header at fault.
    pub parameter: Option<String>,
}

impl ApiErrorItem {
    /// `detail (code)`, or the title when there is no detail.
    pub fn describe(&self) -> String {
        describe(
            self.code.as_deref(),
            self.title.as_deref(),
            self.detail.as_deref(),
        )
    }

    /// The pointer, when the error has one.
    pub fn pointer(&self) -> Option<&str> {
        self.source.as_ref()?.pointer.as_deref()
    }
}

/// Human text of an error from its code, title and detail.
pub fn describe(code: Option<&str>, title: Option<&str>, detail: Option<&str>) -> String {
    let main = detail
        .filter(|d| !d.trim().is_empty())
        .or(title.filter(|t| !t.trim().is_empty()))
        .unwrap_or("no detail given");
    match code.filter(|c| !c.is_empty()) {
        Some(c) => format!("{main} ({c})"),
        None => main.to_string(),
    }
}

/// The profile index a pointer names (`…/profiles/data/<n>[/…]`).
pub fn profile_index(pointer: &str) -> Option<usize> {
    let rest = &pointer[pointer.find("/profiles/data/")? + "/profiles/data/".len()..];
    let digits = rest.split('/').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Sends requests to one Klaviyo account.
pub struct KlaviyoClient {
    http: reqwest::Client,
    base: String,
    origin: String,
    limiter: RateLimiter,
    telemetry: Arc<dyn DestinationTelemetry>,
}

impl KlaviyoClient {
    /// Builds the client; no network I/O happens here.
    pub fn new(
        cfg: &KlaviyoConfig,
        telemetry: Arc<dyn DestinationTelemetry>,
    ) -> Result<Self, String> {
        let mut headers = HeaderMap::new();
        let mut auth =
            HeaderValue::from_str(&format!("Klaviyo-API-Key {}", cfg.private_api_key.expose()))
                .map_err(|_| "`privateApiKey` cannot be sent in a header".to_string())?;
        auth.set_sensitive(true);
        headers.insert(AUTHORIZATION, auth);
        headers.insert(
            "revision",
            HeaderValue::from_str(&cfg.revision)
                .map_err(|_| "`revision` cannot be sent in a header".to_string())?,
        );
        headers.insert(ACCEPT, HeaderValue::from_static(JSON_API));
        // Redirects are refused: one could carry the key to another host.
        let http = kit::build(
            kit::client_builder(cfg.connect_timeout, cfg.request_timeout)
                .default_headers(headers)
                .pool_idle_timeout(Duration::from_secs(50)),
        )
        .map_err(|e| e.to_string())?;
        Ok(KlaviyoClient {
            http,
            base: cfg.base_url.clone(),
            origin: origin_of(&cfg.base_url).unwrap_or_default(),
            limiter: RateLimiter::new(cfg.rate_limit_per_second, cfg.rate_limit_per_minute),
            telemetry,
        })
    }

    /// `base` + `path` (path starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Whether `url` points at the configured API (scheme, host and port),
    /// so the key is never sent to a host a pagination link names.
    pub fn same_origin(&self, url: &str) -> bool {
        origin_of(url).is_some_and(|o| o == self.origin)
    }

    /// POSTs a JSON:API body; it is not sent when the rate limit has no
    /// slot before `deadline` ([`RequestError::OutOfTime`]).
    pub async fn post(
        &self,
        url: &str,
        body: Bytes,
        deadline: Option<Instant>,
    ) -> Result<Answer, RequestError> {
        let req = self
            .http
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static(JSON_API))
            .body(body);
        self.send(req, deadline).await
    }

    /// GETs a resource; see [`KlaviyoClient::post`] for `deadline`.
    pub async fn get(&self, url: &str, deadline: Option<Instant>) -> Result<Answer, RequestError> {
        self.send(self.http.get(url), deadline).await
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        deadline: Option<Instant>,
    ) -> Result<Answer, RequestError> {
        self.limiter
            .acquire(deadline)
            .await
            .map_err(|refused| match refused {
                Refused::Paused(d) => RequestError::Paused(d),
                Refused::NoSlotBefore(d) => RequestError::OutOfTime(d),
            })?;
        let resp = kit::send(self.telemetry.as_ref(), req)
            .await
            .map_err(|e| transport_error(e, ""))?;
        let status = resp.status().as_u16();
        let retry_after = kit::retry_after(resp.headers()).map(|d| d.min(MAX_PAUSE));
        if status == 429 {
            if let Some(d) = retry_after {
                self.limiter.pause_for(d);
            }
        }
        // The status was already counted; a body error is the answer cut short.
        let body = match kit::read_capped(resp, MAX_ANSWER_BYTES).await {
            Ok(b) => b,
            Err(BodyError::TooLarge { limit }) => {
                return Err(RequestError::TooLarge { status, limit })
            }
            Err(BodyError::Transport(e)) => return Err(transport_error(e, "reading the answer: ")),
        };
        Ok(Answer {
            status,
            body,
            retry_after,
        })
    }
}

/// A request without a (complete) answer as this client's error; `doing`
/// prefixes the cause (empty for the request itself).
fn transport_error(e: TransportError, doing: &str) -> RequestError {
    let text = format!("{doing}{}", e.detail);
    match e.kind {
        TransportKind::Timeout => RequestError::Timeout(text),
        TransportKind::Connect | TransportKind::Other => RequestError::Transport(text),
    }
}

/// `scheme://host:port` of a URL, with the default port made explicit.
fn origin_of(url: &str) -> Option<String> {
    let u = reqwest::Url::parse(url).ok()?;
    Some(format!(
        "{}://{}:{}",
        u.scheme(),
        u.host_str()?,
        u.port_or_known_default()?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> Answer {
        Answer {
            status,
            body: Bytes::from(body.to_string()),
            retry_after: None,
        }
    }

    #[test]
    fn pointers_name_profile_indices() {
        assert_eq!(
            profile_index("/data/attributes/profiles/data/3/attributes/email"),
            Some(3)
        );
        assert_eq!(profile_index("/data/attributes/profiles/data/12"), Some(12));
        assert_eq!(profile_index("/data/attributes/profiles/data/"), None);
        assert_eq!(
            profile_index("/data/attributes/profiles/data/x/attributes"),
            None
        );
        assert_eq!(profile_index("/data/relationships/lists/data/0/id"), None);
    }

    #[test]
    fn json_api_errors_are_summarised_and_classified() {
        let a = answer(
            400,
            r#"{"errors":[{"id":"1","status":400,"code":"invalid","title":"Invalid input.","detail":"The email is bad","source":{"pointer":"/data/attributes/profiles/data/0/attributes/email"}}]}"#,
        );
        let errs = a.errors();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].describe(), "The email is bad (invalid)");
        assert_eq!(
            a.summary(),
            "Klaviyo answered HTTP 400: The email is bad (invalid)"
        );
        assert!(matches!(
            a.to_destination_error(),
            Some(DestinationError::Permanent { .. })
        ));

        let html = answer(502, "<html>\nBad gateway</html>");
        assert!(html.errors().is_empty());
        assert_eq!(
            html.summary(),
            "Klaviyo answered HTTP 502: <html> Bad gateway</html>"
        );
        assert!(matches!(
            html.to_destination_error(),
            Some(DestinationError::Retryable { .. })
        ));

        let mut t = answer(429, "");
        t.retry_after = Some(Duration::from_secs(3));
        assert_eq!(
            t.to_destination_error(),
            Some(DestinationError::throttled(
                "Klaviyo answered HTTP 429",
                Some(Duration::from_secs(3))
            ))
        );
        assert!(answer(202, "{}").to_destination_error().is_none());
        assert_eq!(describe(None, Some("Title"), Some(" ")), "Title");
    }

    #[tokio::test]
    async fn redirects_are_refused_so_the_key_stays_home() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0u8; 16 * 1024];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                log.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or_default().to_string());
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 301 Moved\r\nlocation: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                let _ = sock.shutdown().await;
            }
        });
        let cfg = KlaviyoConfig::from_value(&serde_json::json!({
            "privateApiKey": "pk_abc",
            "baseUrl": base,
        }))
        .unwrap();
        let c = KlaviyoClient::new(&cfg, Arc::new(batchrouter_core::NoopTelemetry)).unwrap();
        let a = c
            .get(&c.url("/api/profile-bulk-import-jobs/1"), None)
            .await
            .unwrap();
        assert_eq!(a.status, 301);
        assert!(matches!(
            a.to_destination_error(),
            Some(DestinationError::Permanent { .. })
        ));
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "the redirect was followed: {seen:?}");
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert_eq!(
            origin_of("https://a.klaviyo.com/api/x?y=1").as_deref(),
            Some("https://a.klaviyo.com:443")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(origin_of("not a url"), None);
    }
}
