//! The `[destinations.config]` table of a `KLAVIYO_BULK_UPLOAD` destination:
//! keys, defaults and every semantic check, so `check-config` lists all
//! problems at once instead of stopping at the first.

use std::time::Duration;

use batchrouter_core::{ConfigProblems, ConfigReader, ManagerLimits, Secret};
use serde_json::Value;

/// The vendor's API host, used when `baseUrl` is not set.
pub const DEFAULT_BASE_URL: &str = "https://a.klaviyo.com";
/// The dated API revision sent by default; a documented, current revision.
pub const DEFAULT_REVISION: &str = "2025-01-15";
/// The vendor's per-profile limit (100 KB), the safe default for `maxProfileBytes`.
pub const DEFAULT_MAX_PROFILE_BYTES: u64 = 100_000;
/// The vendor's hard cap on profiles in one bulk import request.
pub const VENDOR_MAX_PROFILES_PER_REQUEST: u64 = 10_000;
/// The vendor's hard cap on one request body (5 MB).
pub const VENDOR_MAX_REQUEST_BYTES: u64 = 5_000_000;
/// Default request body cap: 10% under the vendor's 5 MB, a margin for proxies.
pub const DEFAULT_MAX_REQUEST_BYTES: u64 = 4_500_000;
/// The vendor's documented burst rate for the bulk import endpoints.
pub const DEFAULT_RATE_LIMIT_PER_SECOND: u32 = 10;
/// The vendor's documented steady rate for the bulk import endpoints.
pub const DEFAULT_RATE_LIMIT_PER_MINUTE: u32 = 150;
/// Default TCP/TLS connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default whole-request timeout (a 5 MB upload over a slow link fits).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default `uploadTimeBudget`: with the default `requestTimeout` an upload
/// ends within 9 minutes, under the router's default `uploadCallTimeout`
/// (10 minutes), so the imports it created are always recorded.
pub const DEFAULT_UPLOAD_TIME_BUDGET: Duration = Duration::from_secs(8 * 60);
/// Smallest request body cap accepted: anything smaller cannot hold a real profile.
const MIN_REQUEST_BYTES: u64 = 4_096;
/// Bytes of request envelope around the profiles, list relationship excluded.
pub(crate) const ENVELOPE_OVERHEAD: u64 = 128;

/// Every key accepted under `[destinations.config]`.
pub const CONFIG_KEYS: &[&str] = &[
    "privateApiKey",
    "listId",
    "baseUrl",
    "revision",
    "maxProfileBytes",
    "maxProfilesPerRequest",
    "maxRequestBytes",
    "rateLimitPerSecond",
    "rateLimitPerMinute",
    "connectTimeout",
    "requestTimeout",
    "uploadTimeBudget",
];

/// A validated destination config; only [`KlaviyoConfig::from_value`] builds one.
#[derive(Clone, Debug)]
pub struct KlaviyoConfig {
    /// Sent as `Authorization: Klaviyo-API-Key …`; never printed.
    pub private_api_key: Secret,
    /// List the imported profiles are added to, when set.
    pub list_id: Option<String>,
    /// Scheme, host, port and optional path prefix, without a trailing slash.
    pub base_url: String,
    /// The `revision` header (`YYYY-MM-DD` or `YYYY-MM-DD.suffix`).
    pub revision: String,
    /// Largest staged profile (compact JSON bytes); larger ones are aborted at transform.
    pub max_profile_bytes: u64,
    /// Most profiles per bulk import request.
    pub max_profiles_per_request: usize,
    /// Largest encoded request body.
    pub max_request_bytes: u64,
    /// Requests allowed in any one-second window (burst).
    pub rate_limit_per_second: u32,
    /// Requests allowed in any one-minute window (steady).
    pub rate_limit_per_minute: u32,
    /// Bound on connecting to the API.
    pub connect_timeout: Duration,
    /// Bound on one whole request, body upload and answer included.
    pub request_timeout: Duration,
    /// No request of one upload (or one read of import errors) starts later
    /// than this after the call began; the rest is throttled unsent.
    pub upload_time_budget: Duration,
}

impl KlaviyoConfig {
    /// Parses and checks a config table, reporting every problem found.
    pub fn from_value(config: &Value) -> Result<Self, ConfigProblems> {
        // The shared reader reports unknown keys (with did-you-mean) and
        // every per-key problem, so all are listed at once.
        let mut p = ConfigReader::new(config, CONFIG_KEYS);

        let private_api_key = p.secret("privateApiKey");
        if let Some(k) = &private_api_key {
            if k.expose()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                p.push("`privateApiKey` contains whitespace or control characters (check where it comes from)");
            }
        }
        let private_api_key = private_api_key.unwrap_or_else(|| {
            if p.raw("privateApiKey").is_none() {
                p.push("`privateApiKey` is required (the Klaviyo private API key, e.g. \"${KLAVIYO_PRIVATE_API_KEY}\")");
            }
            Secret::default()
        });

        let list_id = p.string("listId").and_then(|l| {
            if l.is_empty() {
                p.push("`listId` is empty: remove the key or name a Klaviyo list id");
                None
            } else if !l
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                p.push(format!(
                    "`listId` {l:?} is not a Klaviyo list id (letters, digits, `-`, `_`)"
                ));
                None
            } else {
                Some(l)
            }
        });

        let base_url = match p.string("baseUrl") {
            None => DEFAULT_BASE_URL.to_string(),
            Some(u) => match check_base_url(&u) {
                Ok(u) => u,
                Err(why) => {
                    p.push(format!("`baseUrl` {why}"));
                    DEFAULT_BASE_URL.to_string()
                }
            },
        };

        let revision = match p.string("revision") {
            None => DEFAULT_REVISION.to_string(),
            Some(r) => {
                if !is_revision(&r) {
                    p.push(format!(
                        "`revision` {r:?} is not an API revision (YYYY-MM-DD or YYYY-MM-DD.suffix, e.g. {DEFAULT_REVISION:?})"
                    ));
                }
                r
            }
        };

        let max_request_bytes = p
            .bytes("maxRequestBytes", 0, u64::MAX)
            .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
        if !(MIN_REQUEST_BYTES..=VENDOR_MAX_REQUEST_BYTES).contains(&max_request_bytes) {
            p.push(format!(
                "`maxRequestBytes` = {max_request_bytes} is outside {MIN_REQUEST_BYTES}..={VENDOR_MAX_REQUEST_BYTES} (Klaviyo refuses bodies over 5 MB)"
            ));
        }
        let list_overhead = list_id.as_ref().map_or(0, |l| l.len() as u64 + 64);
        let room = max_request_bytes.saturating_sub(ENVELOPE_OVERHEAD + list_overhead);
        // Unset, the vendor's figure, shrunk to fit a smaller request cap.
        let max_profile_bytes = p
            .bytes("maxProfileBytes", 0, u64::MAX)
            .unwrap_or_else(|| DEFAULT_MAX_PROFILE_BYTES.min(room.max(64)));
        if max_profile_bytes < 64 {
            p.push(format!("`maxProfileBytes` = {max_profile_bytes} is too small to hold a profile (at least 64)"));
        } else if max_profile_bytes > room
            && (MIN_REQUEST_BYTES..=VENDOR_MAX_REQUEST_BYTES).contains(&max_request_bytes)
        {
            p.push(format!(
                "`maxProfileBytes` = {max_profile_bytes} does not fit in one request of `maxRequestBytes` = {max_request_bytes} (at most {room})"
            ));
        }

        let max_profiles = p
            .count("maxProfilesPerRequest", 0, u64::MAX)
            .unwrap_or(VENDOR_MAX_PROFILES_PER_REQUEST);
        if !(1..=VENDOR_MAX_PROFILES_PER_REQUEST).contains(&max_profiles) {
            p.push(format!(
                "`maxProfilesPerRequest` = {max_profiles} is outside 1..={VENDOR_MAX_PROFILES_PER_REQUEST} (Klaviyo's limit)"
            ));
        }

        let mut rate = |key: &str, default: u32| {
            p.count(key, 1, u64::from(u32::MAX))
                .map_or(default, |n| u32::try_from(n).unwrap_or(default))
        };
        let per_second = rate("rateLimitPerSecond", DEFAULT_RATE_LIMIT_PER_SECOND);
        let per_minute = rate("rateLimitPerMinute", DEFAULT_RATE_LIMIT_PER_MINUTE);

        let connect_timeout = p
            .timeout("connectTimeout")
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let request_timeout = p
            .timeout("requestTimeout")
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let upload_time_budget = p
            .timeout("uploadTimeBudget")
            .unwrap_or(DEFAULT_UPLOAD_TIME_BUDGET);

        p.finish()?;
        Ok(KlaviyoConfig {
            private_api_key,
            list_id,
            base_url,
            revision,
            max_profile_bytes,
            max_profiles_per_request: max_profiles as usize,
            max_request_bytes,
            rate_limit_per_second: per_second,
            rate_limit_per_minute: per_minute,
            connect_timeout,
            request_timeout,
            upload_time_budget,
        })
    }

    /// Requests one upload can count on within `uploadTimeBudget`: half of
    /// what the burst and steady rates allow in that time (the other half is
    /// left to polls, result reads, 413 splits and resubmissions, and other
    /// uploads of the destination), at least 1.
    pub fn requests_in_budget(&self) -> u64 {
        let secs = self.upload_time_budget.as_secs_f64();
        let by_minute = secs / 60.0 * f64::from(self.rate_limit_per_minute);
        let by_second = secs * f64::from(self.rate_limit_per_second);
        ((by_minute.min(by_second) / 2.0).floor() as u64).max(1)
    }

    /// The batch limits that let one upload finish within
    /// `uploadTimeBudget`: [`requests_in_budget`](Self::requests_in_budget)
    /// full requests. Greedy packing puts more than `maxRequestBytes` minus
    /// the envelope into any two consecutive requests, so half of it per
    /// request is a floor.
    pub fn manager_limits(&self) -> ManagerLimits {
        let requests = self.requests_in_budget();
        let events = requests.saturating_mul(self.max_profiles_per_request as u64);
        let list_overhead = self.list_id.as_ref().map_or(0, |l| l.len() as u64 + 64);
        let per_request = (self
            .max_request_bytes
            .saturating_sub(ENVELOPE_OVERHEAD + list_overhead)
            / 2)
        .max(1);
        ManagerLimits {
            max_upload_bytes: Some(requests.saturating_mul(per_request)),
            max_events: Some(usize::try_from(events).unwrap_or(usize::MAX)),
        }
    }
}

/// Checks an http(s) base URL and returns it without a trailing slash.
fn check_base_url(raw: &str) -> Result<String, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{raw:?} must use http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials (the API key goes in `privateApiKey`)".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{raw:?} must not have a query or fragment"));
    }
    if url.host_str().is_none() {
        return Err(format!("{raw:?} has no host"));
    }
    Ok(url.as_str().trim_end_matches('/').to_string())
}

/// `YYYY-MM-DD` with a plausible month and day, optionally `.suffix`.
fn is_revision(r: &str) -> bool {
    let (date, suffix) = match r.split_once('.') {
        Some((d, s)) => (d, Some(s)),
        None => (r, None),
    };
    if let Some(s) = suffix {
        if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphanumeric()) {
            return false;
        }
    }
    let parts: Vec<&str> = date.split('-').collect();
    if parts.len() != 3 || parts[0].len() != 4 || parts[1].len() != 2 || parts[2].len() != 2 {
        return false;
    }
    let nums: Option<Vec<u32>> = parts.iter().map(|p| p.parse::<u32>().ok()).collect();
    match nums.as_deref() {
        Some([y, m, d]) => *y >= 2000 && (1..=12).contains(m) && (1..=31).contains(d),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_fill_everything_but_the_key() {
        let c = KlaviyoConfig::from_value(&json!({"privateApiKey": "pk_abc"})).unwrap();
        assert_eq!(c.private_api_key.expose(), "pk_abc");
        assert_eq!(c.base_url, DEFAULT_BASE_URL);
        assert_eq!(c.revision, DEFAULT_REVISION);
        assert_eq!(c.max_profile_bytes, 100_000);
        assert_eq!(c.max_profiles_per_request, 10_000);
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        assert_eq!(
            (c.rate_limit_per_second, c.rate_limit_per_minute),
            (10, 150)
        );
        assert_eq!(c.connect_timeout, Duration::from_secs(10));
        assert_eq!(c.request_timeout, Duration::from_secs(60));
        assert_eq!(c.upload_time_budget, Duration::from_secs(480));
        assert_eq!(c.list_id, None);
        assert!(
            !format!("{c:?}").contains("pk_abc"),
            "Debug must redact the key"
        );
    }

    #[test]
    fn explicit_values_are_parsed_in_their_units() {
        let c = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "pk_abc",
            "listId": "Xy12ab",
            "baseUrl": "http://127.0.0.1:8080/",
            "revision": "2024-10-15.pre",
            "maxProfileBytes": "50KB",
            "maxProfilesPerRequest": 500,
            "maxRequestBytes": "1MB",
            "rateLimitPerSecond": 3,
            "rateLimitPerMinute": "60",
            "connectTimeout": "2s",
            "requestTimeout": 30,
            "uploadTimeBudget": "5m"
        }))
        .unwrap();
        assert_eq!(c.base_url, "http://127.0.0.1:8080");
        assert_eq!(c.list_id.as_deref(), Some("Xy12ab"));
        assert_eq!(c.revision, "2024-10-15.pre");
        assert_eq!(c.max_profile_bytes, 50_000);
        assert_eq!(c.max_profiles_per_request, 500);
        assert_eq!(c.max_request_bytes, 1_000_000);
        assert_eq!((c.rate_limit_per_second, c.rate_limit_per_minute), (3, 60));
        assert_eq!(c.connect_timeout, Duration::from_secs(2));
        assert_eq!(c.request_timeout, Duration::from_secs(30));
        assert_eq!(c.upload_time_budget, Duration::from_secs(300));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let err = KlaviyoConfig::from_value(&json!({
            "privateApiKy": "pk_abc",
            "listId": "has space",
            "baseUrl": "ftp://example.com",
            "revision": "latest",
            "maxProfileBytes": "huge",
            "maxProfilesPerRequest": 20000,
            "maxRequestBytes": "6MB",
            "rateLimitPerSecond": 0,
            "rateLimitPerMinute": "fast",
            "connectTimeout": "0s",
            "requestTimeout": true,
            "uploadTimeBudget": "2h"
        }))
        .unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "unknown key `privateApiKy` (did you mean `privateApiKey`?)",
            "`privateApiKey` is required",
            "`listId` \"has space\"",
            "`baseUrl` \"ftp://example.com\" must use http or https",
            "`revision` \"latest\"",
            "`maxProfileBytes`:",
            "`maxProfilesPerRequest` = 20000",
            "`maxRequestBytes` = 6000000",
            "`rateLimitPerSecond` must be at least 1",
            "`rateLimitPerMinute`:",
            "`connectTimeout` must be longer than zero",
            "`requestTimeout` must be a duration",
            "`uploadTimeBudget` = 7200s is longer than the 1h allowed",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(err.0.len(), 13, "{all}");
    }

    #[test]
    fn key_problems_never_echo_the_key() {
        let err =
            KlaviyoConfig::from_value(&json!({"privateApiKey": "pk_secret value"})).unwrap_err();
        assert!(err.0[0].contains("whitespace"), "{err:?}");
        assert!(!err.to_string().contains("pk_secret"), "{err}");
        let err = KlaviyoConfig::from_value(&json!({"privateApiKey": "  "})).unwrap_err();
        assert!(err.0[0].contains("empty"), "{err:?}");
        let err = KlaviyoConfig::from_value(&json!({"privateApiKey": "k", "requestTimeout": "2h"}))
            .unwrap_err();
        assert!(err.0[0].contains("longer than the 1h allowed"), "{err:?}");
    }

    #[test]
    fn profile_limit_must_fit_in_a_request_and_urls_carry_no_credentials() {
        let c =
            KlaviyoConfig::from_value(&json!({"privateApiKey": "k", "maxRequestBytes": 20_000}))
                .unwrap();
        assert_eq!(
            c.max_profile_bytes,
            20_000 - ENVELOPE_OVERHEAD,
            "unset: shrunk to fit"
        );
        let err = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "k", "maxRequestBytes": 10_000, "maxProfileBytes": 20_000
        }))
        .unwrap_err();
        assert!(err.0[0].contains("does not fit in one request"), "{err:?}");
        let err = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "k", "baseUrl": "https://user:pw@example.com"
        }))
        .unwrap_err();
        assert!(err.0[0].contains("must not carry credentials"), "{err:?}");
        assert!(!err.0[0].contains("pw@"), "{err:?}");
    }

    #[test]
    fn revisions() {
        for ok in ["2025-01-15", "2024-10-15.pre", "2023-02-22"] {
            assert!(is_revision(ok), "{ok}");
        }
        for bad in [
            "",
            "2025-1-15",
            "2025-13-01",
            "25-01-15",
            "2025-01-15.",
            "2025-01-15.a b",
            "1999-01-01",
        ] {
            assert!(!is_revision(bad), "{bad}");
        }
    }

    #[test]
    fn batch_limits_fit_one_upload_in_its_time_budget() {
        let c = KlaviyoConfig::from_value(&json!({"privateApiKey": "k"})).unwrap();
        // 8 min at 150/min (burst 10/s allows more): 1,200 requests, half planned.
        assert_eq!(c.requests_in_budget(), 600);
        let l = c.manager_limits();
        assert_eq!(l.max_events, Some(6_000_000));
        assert_eq!(
            l.max_upload_bytes,
            Some(600 * ((DEFAULT_MAX_REQUEST_BYTES - ENVELOPE_OVERHEAD) / 2))
        );

        // A slow account: 12 requests/min for 1 minute → 6 requests.
        let slow = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "k", "rateLimitPerMinute": 12, "uploadTimeBudget": "1m",
            "maxProfilesPerRequest": 1000
        }))
        .unwrap();
        assert_eq!(slow.requests_in_budget(), 6);
        assert_eq!(slow.manager_limits().max_events, Some(6_000));
        // The burst rate binds when it is the tighter one.
        let bursty = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "k", "rateLimitPerSecond": 1, "uploadTimeBudget": "10s"
        }))
        .unwrap();
        assert_eq!(bursty.requests_in_budget(), 5);
        // Never zero, never overflowing.
        let tiny = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "k", "rateLimitPerMinute": 1, "uploadTimeBudget": "1s"
        }))
        .unwrap();
        assert_eq!(tiny.requests_in_budget(), 1);
        let huge = KlaviyoConfig::from_value(&json!({
            "privateApiKey": "k", "rateLimitPerSecond": 4_000_000_000u64,
            "rateLimitPerMinute": 4_000_000_000u64, "uploadTimeBudget": "1h"
        }))
        .unwrap();
        assert!(huge.manager_limits().max_events.unwrap() > 1_000_000_000);
    }
}
