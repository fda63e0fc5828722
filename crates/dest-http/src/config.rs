//! What users write under `[destinations.config]` for an `HTTP` destination.

use std::collections::BTreeMap;
use std::time::Duration;

use batchrouter_core::{ConfigProblems, ConfigReader, Secret};

/// Every key this destination accepts.
pub const CONFIG_KEYS: &[&str] = &[
    "url",
    "method",
    "headers",
    "mode",
    "maxBatchSize",
    "maxInFlight",
    "timeout",
    "connectTimeout",
];

/// HTTP method for deliveries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `POST` (default).
    Post,
    /// `PUT`.
    Put,
}

/// How records map to requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// JSON arrays of up to `maxBatchSize` records per request (default).
    Batch,
    /// One request per record, at most `maxInFlight` at once.
    Single,
}

/// Records per request in batch mode when `maxBatchSize` is unset.
const DEFAULT_BATCH: u64 = 500;
/// Concurrent requests in single mode when `maxInFlight` is unset.
const DEFAULT_IN_FLIGHT: u64 = 32;
/// Whole-request timeout when `timeout` is unset.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Connect timeout when `connectTimeout` is unset.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A validated config. Header values are secrets (they usually carry
/// credentials) and the URL may hold a password or token, so `Debug` shows
/// neither.
#[derive(Clone)]
pub struct HttpConfig {
    /// Endpoint (http or https).
    pub url: reqwest::Url,
    /// Method.
    pub method: Method,
    /// Extra headers sent with every request.
    pub headers: BTreeMap<String, Secret>,
    /// Batch or single.
    pub mode: Mode,
    /// Records per request in batch mode.
    pub max_batch_size: usize,
    /// Concurrent requests in single mode.
    pub max_in_flight: usize,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field(
                "url",
                &batchrouter_core::secret::redact_url(self.url.as_str()),
            )
            .field("method", &self.method)
            .field("headers", &self.headers)
            .field("mode", &self.mode)
            .field("max_batch_size", &self.max_batch_size)
            .field("max_in_flight", &self.max_in_flight)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Checks everything and reports every problem at once.
pub fn validate(value: &serde_json::Value) -> Result<HttpConfig, ConfigProblems> {
    let mut p = ConfigReader::new(value, CONFIG_KEYS);
    let url = match p.url("url") {
        Some(u) => match reqwest::Url::parse(&u) {
            Ok(u) => Some(u),
            Err(e) => {
                p.push(format!("`url`: {e}"));
                None
            }
        },
        None => {
            if p.raw("url").is_none() {
                p.push("`url` is required (the endpoint, http or https)");
            }
            None
        }
    };
    let headers: BTreeMap<String, Secret> = p.value("headers").unwrap_or_default();
    for (name, value) in &headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            p.push(format!("`headers`: `{name}` is not a valid header name"));
        }
        if name.eq_ignore_ascii_case("idempotency-key") {
            // One fixed key would make a deduplicating receiver drop every
            // request after the first.
            p.push(format!(
                "`headers`: `{name}` is set by the destination itself, per request (a key per job set); remove it"
            ));
        }
        if reqwest::header::HeaderValue::from_str(value.expose()).is_err() {
            p.push(format!(
                "`headers`: the value of `{name}` is not a valid header value"
            ));
        }
    }
    let method = match p.choice("method", &["POST", "PUT"]) {
        Some("PUT") => Method::Put,
        _ => Method::Post,
    };
    let mode = match p.choice("mode", &["batch", "single"]) {
        Some("single") => Mode::Single,
        _ => Mode::Batch,
    };
    let max_batch_size = p
        .count("maxBatchSize", 1, u32::MAX.into())
        .unwrap_or(DEFAULT_BATCH) as usize;
    let max_in_flight = p
        .count("maxInFlight", 1, u32::MAX.into())
        .unwrap_or(DEFAULT_IN_FLIGHT) as usize;
    let timeout = p.timeout("timeout").unwrap_or(DEFAULT_TIMEOUT);
    let connect_timeout = p
        .timeout("connectTimeout")
        .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    p.finish()?;
    let Some(url) = url else {
        return Err(ConfigProblems::one("`url` is required"));
    };
    Ok(HttpConfig {
        url,
        method,
        headers,
        mode,
        max_batch_size,
        max_in_flight,
        timeout,
        connect_timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults() {
        let c = validate(&json!({"url": "http://127.0.0.1:9/x"})).unwrap();
        assert_eq!(c.method, Method::Post);
        assert_eq!(c.mode, Mode::Batch);
        assert_eq!((c.max_batch_size, c.max_in_flight), (500, 32));
        assert_eq!(c.timeout, Duration::from_secs(30));
    }

    #[test]
    fn bare_numbers_are_seconds_and_timeouts_are_capped() {
        let c = validate(&json!({
            "url": "http://x", "timeout": 30, "connectTimeout": "250ms",
            "method": "put", "mode": "single", "maxInFlight": "8"
        }))
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(
            (c.method, c.mode, c.max_in_flight),
            (Method::Put, Mode::Single, 8)
        );
        let err = validate(&json!({"url": "http://x", "timeout": "2h", "connectTimeout": 0}))
            .unwrap_err();
        assert_eq!(err.0.len(), 2, "{err:?}");
        assert!(
            err.0[0].contains("`timeout` = 7200s is longer than the 1h allowed"),
            "{err}"
        );
        assert!(
            err.0[1].contains("`connectTimeout` must be longer than zero"),
            "{err}"
        );
        let err = validate(&json!({})).unwrap_err();
        assert!(err.to_string().contains("`url` is required"), "{err}");
    }

    #[test]
    fn every_problem_is_listed() {
        let err = validate(&json!({
            "url": "ftp://x", "maxBatchSize": 0, "timeout": "soon",
            "headers": {"bad header": "v"}, "maxInFligth": 3
        }))
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("did you mean `maxInFlight`"), "{text}");
        let err = validate(&json!({
            "url": "ftp://x", "maxBatchSize": 0, "timeout": "soon", "headers": {"bad header": "v"}
        }))
        .unwrap_err();
        assert_eq!(err.0.len(), 4, "{err:?}");
        let err = validate(&json!({
            "url": "http://x", "headers": {"Idempotency-Key": "fixed"}
        }))
        .unwrap_err();
        assert!(
            err.to_string().contains("set by the destination itself"),
            "{err}"
        );
        let err = validate(&json!({"url": "http://x", "method": "GET"})).unwrap_err();
        assert!(
            err.to_string()
                .contains("`method` = \"GET\" is not allowed (one of POST, PUT)"),
            "{err}"
        );
    }

    #[test]
    fn header_values_are_redacted_in_debug() {
        let c = validate(&json!({
            "url": "http://u:pw0rd@x/in?token=t0k",
            "headers": {"Authorization": "Bearer s3cr3t"}
        }))
        .unwrap();
        let shown = format!("{c:?}");
        for secret in ["s3cr3t", "pw0rd", "t0k"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }
}
