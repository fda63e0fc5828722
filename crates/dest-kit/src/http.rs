//! The HTTP toolkit of every HTTP-based destination, so they all behave the
//! same way where the protocol, not their API, decides:
//!
//! - [`client_builder`]: rustls, redirects refused, connect and whole-request
//!   timeouts, a `batchrouter/<version>` user agent;
//! - [`send`]: sends a request and counts it once in telemetry, under its
//!   status code or [`TransportKind::telemetry_label`];
//! - [`read_capped`]: reads an answer of at most a given size and fails
//!   loudly past it (a cut body would be misread later);
//! - [`retry_after`] / [`parse_retry_after`]: `Retry-After` as delta-seconds
//!   or an HTTP date;
//! - [`classify_status`] / [`error_for_status`] and [`TransportError`]:
//!   status codes and transport failures as retryable, throttled or
//!   permanent [`DestinationError`]s, which a destination refines with its
//!   own error codes.

use std::time::{Duration, SystemTime};

use batchrouter_core::render::excerpt;
use batchrouter_core::{DestinationError, DestinationTelemetry};
use bytes::Bytes;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, Response};

/// The `User-Agent` of every request, so receivers can tell batchrouter
/// (and its version) apart in their logs.
pub const USER_AGENT: &str = concat!("batchrouter/", env!("CARGO_PKG_VERSION"));

/// Longest body excerpt [`error_for_status`] puts into a job's reason.
pub const EXCERPT_CHARS: usize = 200;

/// A client builder with the settings every destination needs: rustls,
/// no redirects (a redirect turns a POST into a GET, dropping the records
/// while answering 2xx, and can carry credentials to another host), the
/// given connect and whole-request timeouts, and [`USER_AGENT`]. Callers add
/// their own pool settings and default headers, then [`build`].
pub fn client_builder(
    connect_timeout: Duration,
    request_timeout: Duration,
) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(connect_timeout)
        .timeout(request_timeout)
        .user_agent(USER_AGENT)
}

/// Why [`build`] could not make a client (a TLS backend that fails to load).
#[derive(Debug, thiserror::Error)]
#[error("cannot build the HTTP client: {0}")]
pub struct ClientBuildError(String);

/// Builds a client from a [`client_builder`], with an error carrying no URL.
pub fn build(builder: reqwest::ClientBuilder) -> Result<reqwest::Client, ClientBuildError> {
    builder
        .build()
        .map_err(|e| ClientBuildError(error_chain(&e.without_url())))
}

/// What kind of transport failure a request met; decides the telemetry
/// label and the wording of the job's reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// The connect or request timeout elapsed.
    Timeout,
    /// No connection could be made (refused, DNS, TLS handshake).
    Connect,
    /// Anything else: a connection dropped, an answer cut short, …
    Other,
}

impl TransportKind {
    /// The kind of a `reqwest` error.
    pub fn of(e: &reqwest::Error) -> Self {
        if e.is_timeout() {
            TransportKind::Timeout
        } else if e.is_connect() {
            TransportKind::Connect
        } else {
            TransportKind::Other
        }
    }

    /// The label a request without an HTTP answer is counted under in
    /// `batchrouter_destination_requests_total` (answered ones use the status).
    pub fn telemetry_label(self) -> &'static str {
        match self {
            TransportKind::Timeout => "timeout",
            TransportKind::Connect | TransportKind::Other => "error",
        }
    }

    /// How a job's reason names the failure: `timed out`, `could not
    /// connect` or `transport error`.
    pub fn phrase(self) -> &'static str {
        match self {
            TransportKind::Timeout => "timed out",
            TransportKind::Connect => "could not connect",
            TransportKind::Other => "transport error",
        }
    }
}

/// A request that got no (complete) HTTP answer: its kind and the cause
/// chain on one line, never the URL (a URL may carry a secret in its query).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct TransportError {
    /// What kind of failure it was.
    pub kind: TransportKind,
    /// The error and its causes, URL removed.
    pub detail: String,
}

impl TransportError {
    /// Classifies a `reqwest` error and drops its URL.
    pub fn from_reqwest(e: reqwest::Error) -> Self {
        TransportError {
            kind: TransportKind::of(&e),
            detail: error_chain(&e.without_url()),
        }
    }

    /// The router's view: a transport failure is always retryable (the next
    /// attempt may well get through); `message` is the destination's wording
    /// (usually naming [`TransportKind::phrase`] and [`TransportError::detail`]).
    pub fn to_destination_error(&self, message: impl Into<String>) -> DestinationError {
        DestinationError::retryable(message)
    }
}

/// Sends a request and counts it once in telemetry: under its status code
/// when an answer arrived, else under [`TransportKind::telemetry_label`].
pub async fn send(
    telemetry: &dyn DestinationTelemetry,
    request: RequestBuilder,
) -> Result<Response, TransportError> {
    match request.send().await {
        Ok(resp) => {
            telemetry.request(resp.status().as_str());
            Ok(resp)
        }
        Err(e) => {
            let e = TransportError::from_reqwest(e);
            telemetry.request(e.kind.telemetry_label());
            Err(e)
        }
    }
}

/// Why [`read_capped`] returned no body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Longer than the cap, announced by `Content-Length` or found while
    /// reading; nothing is returned rather than a cut body.
    #[error("the answer is larger than {limit} bytes, so it was not read")]
    TooLarge {
        /// The cap that was exceeded.
        limit: usize,
    },
    /// The connection failed while the body was read.
    #[error("reading the answer failed: {0}")]
    Transport(TransportError),
}

/// Reads a body of at most `limit` bytes. A longer one is an error, never
/// silently cut: a cut body surfaces later as "malformed JSON" or as a
/// misleading excerpt.
pub async fn read_capped(mut resp: Response, limit: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Transport(TransportError::from_reqwest(e)))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// The `Retry-After` of an answer, relative to now (see [`parse_retry_after`]).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// Parses a `Retry-After` value (RFC 9110 §10.2.3): delta-seconds or an
/// HTTP date; a date in the past means "now" (zero), garbage means no hint.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// What an HTTP status means for the records in the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpClass {
    /// 2xx: delivered.
    Success,
    /// 408, 5xx except 501: try again later.
    Retryable,
    /// 429: slow down, do not burn attempts.
    Throttled,
    /// Any other status (3xx included: redirects are not followed):
    /// retrying cannot help.
    Permanent,
}

impl HttpClass {
    /// The destination error of this class with `message` (None for 2xx);
    /// `retry_after` is kept where the class has a wait.
    pub fn error(self, message: String, retry_after: Option<Duration>) -> Option<DestinationError> {
        match self {
            HttpClass::Success => None,
            HttpClass::Retryable => Some(DestinationError::Retryable {
                message,
                retry_after,
            }),
            HttpClass::Throttled => Some(DestinationError::Throttled {
                message,
                retry_after,
            }),
            HttpClass::Permanent => Some(DestinationError::Permanent { message }),
        }
    }
}

/// Classifies a status code by the conventions users expect.
pub fn classify_status(status: u16) -> HttpClass {
    match status {
        200..=299 => HttpClass::Success,
        429 => HttpClass::Throttled,
        408 => HttpClass::Retryable,
        501 => HttpClass::Permanent,
        500..=599 => HttpClass::Retryable,
        _ => HttpClass::Permanent,
    }
}

/// The destination error for a non-success status (`HTTP <status>: <body
/// excerpt>`), None for 2xx.
pub fn error_for_status(
    status: u16,
    body: &str,
    retry_after: Option<Duration>,
) -> Option<DestinationError> {
    let text = if body.trim().is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {}", excerpt(body, EXCERPT_CHARS))
    };
    classify_status(status).error(text, retry_after)
}

/// The error and its causes on one line, each cause once (`reqwest` wraps
/// `hyper` wraps `io`, and the useful part is in the sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-purpose HTTP/1.1 server on 127.0.0.1 answering every request
    /// with `answer` (raw bytes) and keeping the head of every request.
    async fn server(answer: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let answer = answer.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = Vec::new();
                    // Read the head (and whatever body came with it).
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&got).to_ascii_lowercase());
                    let _ = sock.write_all(&answer).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (url, seen)
    }

    fn client() -> reqwest::Client {
        build(client_builder(
            Duration::from_secs(2),
            Duration::from_secs(5),
        ))
        .unwrap()
    }

    #[derive(Default)]
    struct Labels(Mutex<Vec<String>>);

    impl DestinationTelemetry for Labels {
        fn request(&self, label: &str) {
            self.0.lock().unwrap().push(label.to_string());
        }
    }

    #[test]
    fn retry_after_takes_seconds_future_and_past_dates_and_ignores_garbage() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        for garbage in ["soon", "", "-5", "1.5", "Tomorrow, 99 Foo 2026"] {
            assert_eq!(parse_retry_after(garbage, now), None, "{garbage:?}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "12".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(12)));
    }

    #[test]
    fn statuses_classify_into_the_routers_classes() {
        let table: &[(u16, HttpClass)] = &[
            (200, HttpClass::Success),
            (202, HttpClass::Success),
            (204, HttpClass::Success),
            (301, HttpClass::Permanent),
            (302, HttpClass::Permanent),
            (307, HttpClass::Permanent),
            (400, HttpClass::Permanent),
            (401, HttpClass::Permanent),
            (404, HttpClass::Permanent),
            (408, HttpClass::Retryable),
            (413, HttpClass::Permanent),
            (429, HttpClass::Throttled),
            (500, HttpClass::Retryable),
            (501, HttpClass::Permanent),
            (502, HttpClass::Retryable),
            (503, HttpClass::Retryable),
            (599, HttpClass::Retryable),
        ];
        for (status, class) in table {
            assert_eq!(classify_status(*status), *class, "{status}");
        }
        let hint = Some(Duration::from_secs(3));
        assert_eq!(
            error_for_status(429, "", hint),
            Some(DestinationError::throttled("HTTP 429", hint))
        );
        assert_eq!(
            error_for_status(503, "busy\nnow", hint),
            Some(DestinationError::Retryable {
                message: "HTTP 503: busy now".into(),
                retry_after: hint
            })
        );
        assert_eq!(
            error_for_status(400, &"x".repeat(500), hint),
            Some(DestinationError::permanent(format!(
                "HTTP 400: {}…",
                "x".repeat(EXCERPT_CHARS)
            )))
        );
        assert_eq!(error_for_status(201, "ok", None), None);
        assert_eq!(TransportKind::Timeout.telemetry_label(), "timeout");
        assert_eq!(TransportKind::Connect.telemetry_label(), "error");
        assert_eq!(TransportKind::Other.telemetry_label(), "error");
    }

    #[tokio::test]
    async fn redirects_are_refused_and_the_user_agent_names_batchrouter() {
        let (target, target_seen) =
            server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec())
                .await;
        for status in [301, 302, 307, 308] {
            let (url, seen) = server(
                format!(
                    "HTTP/1.1 {status} Moved\r\nlocation: {target}/x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                )
                .into_bytes(),
            )
            .await;
            let labels = Labels::default();
            let resp = send(&labels, client().post(&url).body("[1]"))
                .await
                .unwrap();
            assert_eq!(resp.status().as_u16(), status);
            let heads = seen.lock().unwrap().clone();
            assert_eq!(heads.len(), 1, "{heads:?}");
            assert!(
                heads[0].contains(&format!("user-agent: {}", USER_AGENT.to_ascii_lowercase())),
                "{heads:?}"
            );
            assert_eq!(*labels.0.lock().unwrap(), vec![status.to_string()]);
            assert!(matches!(classify_status(status), HttpClass::Permanent));
        }
        assert!(
            target_seen.lock().unwrap().is_empty(),
            "a redirect was followed"
        );
        assert!(USER_AGENT.starts_with("batchrouter/"));
    }

    #[tokio::test]
    async fn the_capped_reader_fails_loudly_past_the_cap() {
        let body = "y".repeat(100);
        // Announced length over the cap.
        let (url, _) = server(
            format!("HTTP/1.1 500 Oops\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{body}")
                .into_bytes(),
        )
        .await;
        let resp = client().get(&url).send().await.unwrap();
        assert_eq!(
            read_capped(resp, 99).await,
            Err(BodyError::TooLarge { limit: 99 })
        );
        // Exactly the cap is fine.
        let resp = client().get(&url).send().await.unwrap();
        assert_eq!(read_capped(resp, 100).await.unwrap(), body.as_bytes());
        // No length announced: found while reading.
        let (url, _) =
            server(format!("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{body}").into_bytes())
                .await;
        let resp = client().get(&url).send().await.unwrap();
        let err = read_capped(resp, 10).await.unwrap_err();
        assert_eq!(err, BodyError::TooLarge { limit: 10 });
        assert!(err.to_string().contains("larger than 10 bytes"), "{err}");
        // Cut short: a transport error, not a short body.
        let (url, _) = server(
            format!("HTTP/1.1 200 OK\r\ncontent-length: 500\r\nconnection: close\r\n\r\n{body}")
                .into_bytes(),
        )
        .await;
        let resp = client().get(&url).send().await.unwrap();
        assert!(matches!(
            read_capped(resp, 1000).await,
            Err(BodyError::Transport(_))
        ));
    }

    #[tokio::test]
    async fn transport_failures_are_counted_once_without_the_url() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/p?secret=s3cr3t", listener.local_addr().unwrap());
        drop(listener);
        let labels = Labels::default();
        let e = send(&labels, client().get(&url)).await.unwrap_err();
        assert_eq!(e.kind, TransportKind::Connect);
        assert!(!e.detail.contains("s3cr3t"), "{}", e.detail);
        assert_eq!(e.kind.phrase(), "could not connect");
        assert!(e.detail.contains("onnect"), "{}", e.detail);
        assert!(matches!(
            e.to_destination_error(e.detail.clone()),
            DestinationError::Retryable { .. }
        ));
        assert_eq!(*labels.0.lock().unwrap(), vec!["error".to_string()]);

        let (slow, _) = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let hold = tokio::spawn(async move {
                let (_sock, _) = listener.accept().await.unwrap();
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
            (url, hold)
        };
        let quick = build(client_builder(
            Duration::from_secs(1),
            Duration::from_millis(200),
        ))
        .unwrap();
        let e = send(&labels, quick.get(&slow)).await.unwrap_err();
        assert_eq!(e.kind, TransportKind::Timeout);
        assert_eq!(
            *labels.0.lock().unwrap(),
            vec!["error".to_string(), "timeout".to_string()]
        );
    }
}
