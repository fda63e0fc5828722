//! Typed lookup of router tunables: the destination's own `router` table,
//! then `BatchRouter.<TYPE>.<key>`, then `BatchRouter.<key>`, then the
//! built-in default. Values are durations, byte sizes or counts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Raw values by full dotted key (`BatchRouter.HTTP.maxRetries`). The config
/// crate implements it with environment variables in front of the file.
pub trait ConfigSource: Send + Sync {
    /// The raw value and a description of where it came from.
    fn get(&self, key: &str) -> Option<(String, String)>;
}

/// A source with nothing in it: every key falls back to its default.
pub struct EmptySource;

impl ConfigSource for EmptySource {
    fn get(&self, _key: &str) -> Option<(String, String)> {
        None
    }
}

impl ConfigSource for BTreeMap<String, String> {
    fn get(&self, key: &str) -> Option<(String, String)> {
        BTreeMap::get(self, key).map(|v| (v.clone(), "map".to_string()))
    }
}

/// A key's value could not be parsed; names the key, the value and its origin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key} = {value:?} (from {origin}): {reason}")]
pub struct LookupError {
    /// The key as written in the source.
    pub key: String,
    /// The raw value.
    pub value: String,
    /// Where the value came from.
    pub origin: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A byte size, printed the way users write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

/// Resolves router keys for one destination.
pub struct KeyLookup<'a> {
    source: &'a dyn ConfigSource,
    destination_type: &'a str,
    overrides: &'a BTreeMap<String, String>,
}

impl<'a> KeyLookup<'a> {
    /// Looks keys up for a destination of `destination_type` whose own
    /// `router` table is `overrides`.
    pub fn new(
        source: &'a dyn ConfigSource,
        destination_type: &'a str,
        overrides: &'a BTreeMap<String, String>,
    ) -> Self {
        KeyLookup {
            source,
            destination_type,
            overrides,
        }
    }

    /// The raw value and its origin, following the documented precedence.
    pub fn raw(&self, key: &str) -> Option<(String, String)> {
        if let Some(v) = self.overrides.get(key) {
            return Some((v.clone(), "destination router table".to_string()));
        }
        self.source
            .get(&format!("BatchRouter.{}.{key}", self.destination_type))
            .or_else(|| self.source.get(&format!("BatchRouter.{key}")))
    }

    /// A duration; a bare number is read in `bare_unit`.
    pub fn duration(
        &self,
        key: &str,
        default: Duration,
        bare_unit: Duration,
    ) -> Result<Duration, LookupError> {
        self.parse(key, default, |v| parse_duration(v, bare_unit))
    }

    /// A byte size (`32MB`, `512KiB`, `1048576`).
    pub fn bytes(&self, key: &str, default: u64) -> Result<u64, LookupError> {
        self.parse(key, default, parse_bytes)
    }

    /// A non-negative count.
    pub fn count(&self, key: &str, default: u64) -> Result<u64, LookupError> {
        self.parse(key, default, parse_count)
    }

    fn parse<T>(
        &self,
        key: &str,
        default: T,
        f: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, LookupError> {
        match self.raw(key) {
            None => Ok(default),
            Some((value, origin)) => f(value.trim()).map_err(|reason| LookupError {
                key: key.to_string(),
                value,
                origin,
                reason,
            }),
        }
    }
}

/// Parses `250ms`, `30s`, `5m`, `1h`, `2d`, `1h30m`; a bare number is `bare_unit`s.
pub fn parse_duration(s: &str, bare_unit: Duration) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = s.parse::<u32>() {
        return bare_unit
            .checked_mul(n)
            .ok_or_else(|| format!("`{s}` is too large a duration"));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{s}` lacks a unit (ms, s, m, h, d)"))?;
        if digits == 0 {
            return Err(format!("`{s}` is not a duration (e.g. 250ms, 30s, 5m, 1h)"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{s}` is not a duration"))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let unit = &after[..unit_len];
        let secs = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "unknown duration unit `{other}` in `{s}` (use ms, s, m, h, d)"
                ))
            }
        };
        total += Duration::from_secs_f64(number * secs);
        rest = &after[unit_len..];
    }
    Ok(total)
}

/// Parses byte sizes: plain integers, `KB`/`MB`/`GB` (powers of 1000) and
/// `KiB`/`MiB`/`GiB` (powers of 1024), case-insensitive, optional `B`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "`{s}` is not a byte size (e.g. 32MB, 512KiB, 1048576)"
        ));
    }
    let number: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a byte size"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "m" | "mb" => 1000 * 1000,
        "g" | "gb" => 1000 * 1000 * 1000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = number * mult as f64;
    if !(0.0..=u64::MAX as f64).contains(&bytes) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a non-negative integer count.
pub fn parse_count(s: &str) -> Result<u64, String> {
    s.trim()
        .replace('_', "")
        .parse::<u64>()
        .map_err(|_| format!("`{s}` is not a non-negative integer"))
}

/// The environment variable name RudderStack deployments use for a config
/// key, so their variables carry over: a key of only `A-Z`, digits and `_`
/// is its own name; otherwise `RSERVER_` + the key with `_` before an upper
/// case letter that follows a lower-case letter or digit, `.` → `_`, upper-cased.
pub fn env_name_for_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return key.to_string();
    }
    let mut out = String::with_capacity(key.len() + 12);
    out.push_str("RSERVER_");
    let mut prev: Option<char> = None;
    for c in key.chars() {
        if c.is_ascii_uppercase() {
            if let Some(p) = prev {
                if p.is_ascii_lowercase() || p.is_ascii_digit() {
                    out.push('_');
                }
            }
        }
        if c == '.' {
            out.push('_');
        } else {
            out.push(c.to_ascii_uppercase());
        }
        prev = Some(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_follow_the_rudderstack_rule() {
        let table = [
            (
                "BatchRouter.asyncUploadTimeout",
                "RSERVER_BATCH_ROUTER_ASYNC_UPLOAD_TIMEOUT",
            ),
            (
                "BatchRouter.MARKETO_BULK_UPLOAD.maxEventsInABatch",
                "RSERVER_BATCH_ROUTER_MARKETO_BULK_UPLOAD_MAX_EVENTS_IN_ABATCH",
            ),
            (
                "BatchRouter.RSources.maxFailedCountForJob",
                "RSERVER_BATCH_ROUTER_RSOURCES_MAX_FAILED_COUNT_FOR_JOB",
            ),
            (
                "BatchRouter.ELOQUA.MaxUploadLimit",
                "RSERVER_BATCH_ROUTER_ELOQUA_MAX_UPLOAD_LIMIT",
            ),
            (
                "JobsDB.batch_rt.jobMaxAge",
                "RSERVER_JOBS_DB_BATCH_RT_JOB_MAX_AGE",
            ),
            ("Router.jobRetention", "RSERVER_ROUTER_JOB_RETENTION"),
            (
                "BatchRouter.KLAVIYO_BULK_UPLOAD.maxRetries",
                "RSERVER_BATCH_ROUTER_KLAVIYO_BULK_UPLOAD_MAX_RETRIES",
            ),
            ("RUDDER_TMPDIR", "RUDDER_TMPDIR"),
            ("WORKSPACE_NAMESPACE", "WORKSPACE_NAMESPACE"),
            (
                "BatchRouter.HTTP.uploadFreq",
                "RSERVER_BATCH_ROUTER_HTTP_UPLOAD_FREQ",
            ),
            ("BatchRouter.maxRetries", "RSERVER_BATCH_ROUTER_MAX_RETRIES"),
        ];
        for (key, env) in table {
            assert_eq!(env_name_for_key(key), env, "{key}");
        }
    }

    #[test]
    fn durations() {
        let s = Duration::from_secs(1);
        assert_eq!(parse_duration("30s", s).unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m", s).unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h", s).unwrap(), Duration::from_secs(3600));
        assert_eq!(
            parse_duration("250ms", s).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            parse_duration("1h30m", s).unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_duration("1.5s", s).unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_duration("7", Duration::from_secs(60)).unwrap(),
            Duration::from_secs(420)
        );
        assert!(parse_duration("", s).is_err());
        assert!(parse_duration("5 parsecs", s).is_err());
        assert!(parse_duration("abc", s).is_err());
        assert!(parse_duration("10x", s)
            .unwrap_err()
            .contains("unknown duration unit"));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("32MB").unwrap(), 32_000_000);
        assert_eq!(parse_bytes("32MiB").unwrap(), 32 << 20);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("512kib").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("1048576").unwrap(), 1_048_576);
        assert_eq!(parse_bytes("10 MB").unwrap(), 10_000_000);
        assert!(parse_bytes("MB").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
        assert_eq!(ByteSize(32 << 20).to_string(), "32MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn precedence_is_destination_then_type_then_global_then_default() {
        let mut src = BTreeMap::new();
        src.insert("BatchRouter.maxRetries".to_string(), "5".to_string());
        let none = BTreeMap::new();
        let l = KeyLookup::new(&src, "HTTP", &none);
        assert_eq!(l.count("maxRetries", 3).unwrap(), 5);
        assert_eq!(l.count("maxEventsInABatch", 10_000).unwrap(), 10_000);
        src.insert("BatchRouter.HTTP.maxRetries".to_string(), "7".to_string());
        let l = KeyLookup::new(&src, "HTTP", &none);
        assert_eq!(l.count("maxRetries", 3).unwrap(), 7);
        let l = KeyLookup::new(&src, "SFTP", &none);
        assert_eq!(l.count("maxRetries", 3).unwrap(), 5);
        let mut own = BTreeMap::new();
        own.insert("maxRetries".to_string(), "9".to_string());
        let l = KeyLookup::new(&src, "HTTP", &own);
        assert_eq!(l.count("maxRetries", 3).unwrap(), 9);
        own.insert("uploadFreq".to_string(), "soon".to_string());
        let l = KeyLookup::new(&src, "HTTP", &own);
        let err = l
            .duration(
                "uploadFreq",
                Duration::from_secs(30),
                Duration::from_secs(1),
            )
            .unwrap_err();
        assert_eq!(err.key, "uploadFreq");
        assert!(
            err.to_string().contains("destination router table"),
            "{err}"
        );
    }
}
