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

    /// Of several names for one setting (preferred first), those set at the
    /// most specific level that sets any of them: the destination's `router`
    /// table, then `BatchRouter.<TYPE>.`, then `BatchRouter.`. Lets a
    /// RudderStack name and ours share one precedence.
    pub fn set_at_most_specific<'k>(&self, keys: &[&'k str]) -> Vec<&'k str> {
        let at_level = |set: &dyn Fn(&str) -> bool| -> Vec<&'k str> {
            keys.iter().copied().filter(|k| set(k)).collect()
        };
        let own = at_level(&|k| self.overrides.contains_key(k));
        if !own.is_empty() {
            return own;
        }
        let typed = at_level(&|k| {
            self.source
                .get(&format!("BatchRouter.{}.{k}", self.destination_type))
                .is_some()
        });
        if !typed.is_empty() {
            return typed;
        }
        at_level(&|k| self.source.get(&format!("BatchRouter.{k}")).is_some())
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
    // Exact integer nanoseconds, checked all the way: `99999999999999999999s`
    // or a sum past `Duration::MAX` is a problem to report, never a panic.
    let too_large = || format!("`{s}` is too large a duration");
    if s.bytes().all(|b| b.is_ascii_digit()) {
        // Only digits, so a failed parse means overflow.
        let n: u128 = s.parse().map_err(|_| too_large())?;
        let nanos = n.checked_mul(bare_unit.as_nanos()).ok_or_else(too_large)?;
        return nanos_to_duration(nanos).ok_or_else(too_large);
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("`{s}` lacks a unit (ms, s, m, h, d)"))?;
        if digits == 0 {
            return Err(format!("`{s}` is not a duration (e.g. 250ms, 30s, 5m, 1h)"));
        }
        let number = &rest[..digits];
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let unit_nanos: u128 = match &after[..unit_len] {
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3600 * NANOS_PER_SEC,
            "d" => 86400 * NANOS_PER_SEC,
            other => {
                return Err(format!(
                    "unknown duration unit `{other}` in `{s}` (use ms, s, m, h, d)"
                ))
            }
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
            return Err(format!("`{s}` is not a duration"));
        }
        // Only digits are left, so a failed parse means overflow.
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        let mut part = whole.checked_mul(unit_nanos).ok_or_else(too_large)?;
        // 18 fraction digits are finer than a nanosecond of a day, and keep
        // the product below u128::MAX.
        let fraction = &fraction[..fraction.len().min(18)];
        if !fraction.is_empty() {
            let f: u128 = fraction.parse().map_err(|_| too_large())?;
            part = part
                .checked_add(f * unit_nanos / 10u128.pow(fraction.len() as u32))
                .ok_or_else(too_large)?;
        }
        total = total.checked_add(part).ok_or_else(too_large)?;
        rest = &after[unit_len..];
    }
    nanos_to_duration(total).ok_or_else(too_large)
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// `None` past `Duration::MAX`.
fn nanos_to_duration(nanos: u128) -> Option<Duration> {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).ok()?;
    Some(Duration::new(secs, (nanos % NANOS_PER_SEC) as u32))
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
    // `u64::MAX as f64` is 2^64, one past the largest u64: exclude it.
    if !(0.0..u64::MAX as f64).contains(&bytes) {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(bytes.round() as u64)
}

/// Parses a non-negative integer count.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let digits = s.trim().replace('_', "");
    digits.parse::<u64>().map_err(|_| {
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            format!("`{s}` is too large (at most {})", u64::MAX)
        } else {
            format!("`{s}` is not a non-negative integer")
        }
    })
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
    fn oversized_durations_are_errors_not_panics() {
        let s = Duration::from_secs(1);
        for text in [
            "99999999999999999999s",
            "99999999999999999999d",
            "18446744073709551615s1s",
            "184467440737095516150000ms",
            "99999999999999999999",
            "999999999999999999999999999999999999999999",
            "213503982334602",
            // The whole part fits; adding its fraction does not.
            "340282366920938463463374607431.9s",
            "3938453320844195178974243.5d",
        ] {
            let err = parse_duration(text, Duration::from_secs(86400)).unwrap_err();
            assert!(err.contains("too large a duration"), "{text}: {err}");
        }
        let digits = "9".repeat(400);
        assert!(parse_duration(&format!("{digits}s"), s).is_err());
        assert!(parse_duration(&format!("{digits}.5ms"), s).is_err());
        assert!(parse_duration(".", s).is_err());
        assert!(parse_duration("1..5s", s).is_err());
        assert_eq!(
            parse_duration("4294967295", s).unwrap().as_secs(),
            4294967295
        );
        assert_eq!(
            parse_duration("18446744073709551615s", s).unwrap(),
            Duration::from_secs(u64::MAX)
        );
        assert_eq!(
            parse_duration("0.000000001s", s).unwrap(),
            Duration::from_nanos(1)
        );
        assert_eq!(parse_duration(".5m", s).unwrap(), Duration::from_secs(30));
    }

    #[test]
    fn oversized_byte_sizes_and_counts_are_errors() {
        assert!(parse_bytes("18446744073709551616").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
        assert!(parse_bytes(&"9".repeat(400)).is_err());
        assert!(parse_count("99999999999999999999999")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_count("-1").is_err());
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

/// Whatever text a user or an environment variable supplies, the parsers
/// answer `Ok` or `Err`: a typo in config never panics the daemon.
#[cfg(test)]
mod never_panic {
    use super::*;
    use proptest::prelude::*;

    /// Text shaped like values (digits, dots, units, separators), so the
    /// search reaches the arithmetic instead of stopping at the first
    /// character, mixed with arbitrary Unicode.
    fn value_like() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            "[0-9]{1,40}",
            "[0-9]{0,25}\\.[0-9]{0,25}",
            Just(".".to_string()),
            Just("_".to_string()),
            Just(" ".to_string()),
            prop_oneof![
                Just("ms"),
                Just("s"),
                Just("m"),
                Just("h"),
                Just("d"),
                Just("B"),
                Just("KiB"),
                Just("MB"),
                Just("GiB"),
                Just("gb"),
            ]
            .prop_map(str::to_string),
            "\\PC{0,3}",
        ];
        prop::collection::vec(piece, 0..8).prop_map(|parts| parts.concat())
    }

    fn bare_unit() -> impl Strategy<Value = Duration> {
        prop_oneof![
            Just(Duration::ZERO),
            Just(Duration::from_millis(1)),
            Just(Duration::from_secs(1)),
            Just(Duration::from_secs(86400)),
            Just(Duration::MAX),
            any::<u64>().prop_map(Duration::from_secs),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn parsers_never_panic_on_any_text(s in "\\PC*", unit in bare_unit()) {
            let _ = parse_duration(&s, unit);
            let _ = parse_bytes(&s);
            let _ = parse_count(&s);
        }

        #[test]
        fn parsers_never_panic_on_value_like_text(s in value_like(), unit in bare_unit()) {
            let _ = parse_duration(&s, unit);
            let _ = parse_bytes(&s);
            let _ = parse_count(&s);
        }

        #[test]
        fn lookups_report_instead_of_panicking(s in value_like(), unit in bare_unit()) {
            let mut src = BTreeMap::new();
            src.insert("BatchRouter.uploadFreq".to_string(), s.clone());
            src.insert("BatchRouter.MaxUploadLimit".to_string(), s.clone());
            src.insert("BatchRouter.maxRetries".to_string(), s);
            let none = BTreeMap::new();
            let l = KeyLookup::new(&src, "HTTP", &none);
            if let Err(e) = l.duration("uploadFreq", Duration::ZERO, unit) {
                prop_assert_eq!(e.key, "uploadFreq");
            }
            if let Err(e) = l.bytes("MaxUploadLimit", 0) {
                prop_assert_eq!(e.key, "MaxUploadLimit");
            }
            if let Err(e) = l.count("maxRetries", 0) {
                prop_assert_eq!(e.key, "maxRetries");
            }
        }
    }
}
