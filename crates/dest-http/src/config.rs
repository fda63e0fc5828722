//! What users write under `[destinations.config]` for an `HTTP` destination.

use std::collections::BTreeMap;
use std::time::Duration;

use batchrouter_core::lookup::parse_duration;
use batchrouter_core::{parse_destination_config, ConfigProblems, Secret};
use serde::Deserialize;

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Method {
    /// `POST` (default).
    Post,
    /// `PUT`.
    Put,
}

/// How records map to requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// JSON arrays of up to `maxBatchSize` records per request (default).
    Batch,
    /// One request per record, at most `maxInFlight` at once.
    Single,
}

/// The raw config as written (durations still text).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    url: String,
    #[serde(default = "default_method")]
    method: Method,
    #[serde(default)]
    headers: BTreeMap<String, Secret>,
    #[serde(default = "default_mode")]
    mode: Mode,
    #[serde(default = "default_batch")]
    max_batch_size: usize,
    #[serde(default = "default_in_flight")]
    max_in_flight: usize,
    #[serde(default = "default_timeout")]
    timeout: String,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: String,
}

fn default_method() -> Method {
    Method::Post
}
fn default_mode() -> Mode {
    Mode::Batch
}
fn default_batch() -> usize {
    500
}
fn default_in_flight() -> usize {
    32
}
fn default_timeout() -> String {
    "30s".into()
}
fn default_connect_timeout() -> String {
    "5s".into()
}

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
    let raw: Raw = parse_destination_config(value, CONFIG_KEYS)?;
    let mut p = ConfigProblems(Vec::new());
    let url = match reqwest::Url::parse(&raw.url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Some(u),
        Ok(u) => {
            p.push(format!("url: scheme `{}` is not http or https", u.scheme()));
            None
        }
        Err(e) => {
            p.push(format!("url: {e}"));
            None
        }
    };
    for (name, value) in &raw.headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            p.push(format!("headers: `{name}` is not a valid header name"));
        }
        if name.eq_ignore_ascii_case("idempotency-key") {
            // One fixed key would make a deduplicating receiver drop every
            // request after the first.
            p.push(format!(
                "headers: `{name}` is set by the destination itself, per request (a key per job set); remove it"
            ));
        }
        if reqwest::header::HeaderValue::from_str(value.expose()).is_err() {
            p.push(format!(
                "headers: the value of `{name}` is not a valid header value"
            ));
        }
    }
    if raw.max_batch_size == 0 {
        p.push("maxBatchSize must be at least 1");
    }
    if raw.max_in_flight == 0 {
        p.push("maxInFlight must be at least 1");
    }
    let mut dur = |key: &str, v: &str| match parse_duration(v, Duration::from_secs(1)) {
        Ok(d) if !d.is_zero() => d,
        Ok(_) => {
            p.push(format!("{key} must be greater than zero"));
            Duration::from_secs(1)
        }
        Err(e) => {
            p.push(format!("{key}: {e}"));
            Duration::from_secs(1)
        }
    };
    let timeout = dur("timeout", &raw.timeout);
    let connect_timeout = dur("connectTimeout", &raw.connect_timeout);
    p.clone().into_result()?;
    Ok(HttpConfig {
        url: url.expect("checked above"),
        method: raw.method,
        headers: raw.headers,
        mode: raw.mode,
        max_batch_size: raw.max_batch_size,
        max_in_flight: raw.max_in_flight,
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
        assert!(err.to_string().contains("unknown variant `GET`"), "{err}");
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
