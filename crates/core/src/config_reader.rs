//! One reader for every destination's `[destinations.config]` table, so
//! durations, byte sizes, counts, URLs and secrets read the same way (and
//! within the same bounds) in every destination, and `check-config` lists
//! every problem at once, each naming its key.

use std::time::Duration;

use serde_json::{Map, Value};

use crate::destination::{did_you_mean, edit_distance, json_kind};
use crate::lookup::{parse_bytes, parse_count, parse_duration};
use crate::{ConfigProblems, Secret};

/// A bare number for a timeout key means seconds.
pub const SECONDS: Duration = Duration::from_secs(1);
/// Shortest timeout any destination accepts: anything shorter is a typo.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest timeout any destination accepts: anything longer is a typo, not a wish.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Reads one key at a time from a destination's config table, recording a
/// problem (naming the key) instead of stopping at the first.
pub struct ConfigReader<'a> {
    map: Map<String, Value>,
    problems: ConfigProblems,
    known: &'a [&'a str],
}

impl<'a> ConfigReader<'a> {
    /// Starts reading `config`, recording every key not in `known` (with a
    /// "did you mean" for near misses) and a config that is not a table.
    pub fn new(config: &Value, known: &'a [&'a str]) -> Self {
        let mut problems = ConfigProblems(Vec::new());
        let map = match config {
            Value::Object(map) => map.clone(),
            Value::Null => Map::new(),
            other => {
                problems.push(format!(
                    "`config` must be a table, not {}",
                    json_kind(other)
                ));
                Map::new()
            }
        };
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                problems.push(match did_you_mean(key, known) {
                    Some(s) => format!("unknown key `{key}` (did you mean `{s}`?)"),
                    None => format!("unknown key `{key}` (known keys: {})", known.join(", ")),
                });
            }
        }
        ConfigReader {
            map,
            problems,
            known,
        }
    }

    /// Records a problem found by a destination's own checks.
    pub fn push(&mut self, problem: impl Into<String>) {
        self.problems.push(problem);
    }

    /// The problems recorded so far.
    pub fn problems(&self) -> &ConfigProblems {
        &self.problems
    }

    /// The problem list, for destination checks written against
    /// [`ConfigProblems`] (key files, path templates).
    pub fn problems_mut(&mut self) -> &mut ConfigProblems {
        &mut self.problems
    }

    /// Ok when nothing was found, every problem otherwise.
    pub fn finish(self) -> Result<(), ConfigProblems> {
        self.problems.into_result()
    }

    /// The raw value of a key (null counts as unset), for shapes the typed
    /// getters do not cover.
    pub fn raw(&self, key: &str) -> Option<&Value> {
        debug_assert!(self.known.contains(&key), "undeclared key {key}");
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Deserialises a key of any serde shape (lists, tables of headers);
    /// a type mismatch is recorded.
    pub fn value<T: serde::de::DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let v = self.raw(key)?.clone();
        match serde_json::from_value(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.push(format!("`{key}`: {e}"));
                None
            }
        }
    }

    /// A string key.
    pub fn string(&mut self, key: &str) -> Option<String> {
        match self.raw(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                let kind = json_kind(other);
                self.push(format!("`{key}` must be a string, not {kind}"));
                None
            }
        }
    }

    /// A string key that must be present and not blank.
    pub fn required_string(&mut self, key: &str, what: &str) -> Option<String> {
        match self.string(key) {
            None if self.raw(key).is_none() => {
                self.push(format!("`{key}` is required ({what})"));
                None
            }
            None => None,
            Some(s) if s.trim().is_empty() => {
                self.push(format!("`{key}` is empty ({what})"));
                None
            }
            Some(s) => Some(s),
        }
    }

    /// A credential (already `${ENV}`-expanded by the config loader). A
    /// blank value is reported as a likely unset variable; problems never
    /// echo the value. (Spaces are the destination's call: a password may
    /// hold them, an API key may not.)
    pub fn secret(&mut self, key: &str) -> Option<Secret> {
        match self.raw(key)?.clone() {
            Value::String(s) if s.trim().is_empty() => {
                self.push(format!(
                    "`{key}` is empty (is the environment variable it comes from set?)"
                ));
                None
            }
            Value::String(s) => Some(Secret::new(s)),
            other => {
                let kind = json_kind(&other);
                self.push(format!("`{key}` must be a string, not {kind}"));
                None
            }
        }
    }

    /// An `http`/`https` URL with a host; returned as written. Problems show
    /// the URL with its credentials redacted.
    pub fn url(&mut self, key: &str) -> Option<String> {
        let s = self.string(key)?;
        let shown = crate::secret::redact_url(&s);
        let rest = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"));
        let host = rest.map(|r| {
            let authority = r.split(['/', '?', '#']).next().unwrap_or("");
            let host_port = authority.rsplit('@').next().unwrap_or("");
            host_port.trim_start_matches('[').to_string()
        });
        match host {
            None => {
                self.push(format!("`{key}` {shown:?} must be an http or https URL"));
                None
            }
            Some(h) if h.is_empty() || h.starts_with(':') => {
                self.push(format!("`{key}` {shown:?} has no host"));
                None
            }
            Some(_) if s.chars().any(char::is_whitespace) => {
                self.push(format!("`{key}` {shown:?} contains whitespace"));
                None
            }
            Some(_) => Some(s),
        }
    }

    /// `true`/`false` (also as strings).
    pub fn bool(&mut self, key: &str) -> Option<bool> {
        match self.raw(key)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => {
                    self.push(format!("`{key}` must be true or false, not `{s}`"));
                    None
                }
            },
            other => {
                let kind = json_kind(other);
                self.push(format!("`{key}` must be true or false, not {kind}"));
                None
            }
        }
    }

    /// One of `choices` (case-insensitive); a near miss gets a suggestion.
    pub fn choice(&mut self, key: &str, choices: &[&'static str]) -> Option<&'static str> {
        let s = self.string(key)?;
        if let Some(c) = choices.iter().find(|c| c.eq_ignore_ascii_case(s.trim())) {
            return Some(c);
        }
        // Values are short: suggest only a one-letter slip (`batchh`), never
        // a different word (`GET` is not a misspelt `PUT`).
        let word = s.trim().to_ascii_lowercase();
        let near = choices
            .iter()
            .find(|c| edit_distance(&word, &c.to_ascii_lowercase()) <= 1);
        let hint = match near {
            Some(c) => format!("did you mean `{c}`?"),
            None => format!("one of {}", choices.join(", ")),
        };
        self.push(format!("`{key}` = {s:?} is not allowed ({hint})"));
        None
    }

    /// A whole number within `min..=max` (numbers, or strings like `"10_000"`).
    pub fn count(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        self.amount(key, min, max, parse_count, "a non-negative integer")
    }

    /// A byte size within `min..=max` (`32MB`, `512KiB`, or a number of bytes).
    pub fn bytes(&mut self, key: &str, min: u64, max: u64) -> Option<u64> {
        self.amount(
            key,
            min,
            max,
            parse_bytes,
            "a byte size (e.g. 100KB or 100000)",
        )
    }

    /// A non-negative integer given as a number or as a string `parse` reads.
    fn amount(
        &mut self,
        key: &str,
        min: u64,
        max: u64,
        parse: fn(&str) -> Result<u64, String>,
        expected: &str,
    ) -> Option<u64> {
        let n = match self.raw(key)? {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64()?,
            Value::String(s) => match parse(s) {
                Ok(n) => n,
                Err(e) => {
                    self.push(format!("`{key}`: {e}"));
                    return None;
                }
            },
            other => {
                let kind = json_kind(other);
                self.push(format!("`{key}` must be {expected}, not {kind}"));
                return None;
            }
        };
        self.within(key, n, min, max)
    }

    fn within(&mut self, key: &str, n: u64, min: u64, max: u64) -> Option<u64> {
        if n < min {
            self.push(format!("`{key}` must be at least {min}"));
            None
        } else if n > max {
            self.push(format!("`{key}` = {n} is more than the {max} allowed"));
            None
        } else {
            Some(n)
        }
    }

    /// A duration within `min..=max`: text (`250ms`, `30s`, `5m`, `1h`) or a
    /// bare number (integer or fraction) in `bare_unit`, the key's documented
    /// unit.
    pub fn duration(
        &mut self,
        key: &str,
        bare_unit: Duration,
        min: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let parsed = match self.raw(key)? {
            Value::Number(n) => match n.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 => {
                    let secs = x * bare_unit.as_secs_f64();
                    // Anything past the cap is reported as too long below.
                    Ok(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
                }
                _ => Err(format!("`{n}` is not a duration")),
            },
            Value::String(s) => parse_duration(s, bare_unit),
            other => Err(format!("{} is not a duration", json_kind(other))),
        };
        match parsed {
            Err(e) => {
                self.push(format!(
                    "`{key}` must be a duration (e.g. \"10s\", \"500ms\" or a number of {}): {e}",
                    unit_name(bare_unit)
                ));
                None
            }
            Ok(d) if d.is_zero() && min > Duration::ZERO => {
                self.push(format!(
                    "`{key}` must be longer than zero (at least {})",
                    human(min)
                ));
                None
            }
            Ok(d) if d < min => {
                self.push(format!(
                    "`{key}` = {d:?} is shorter than the {} allowed",
                    human(min)
                ));
                None
            }
            Ok(d) if d > max => {
                self.push(format!(
                    "`{key}` = {d:?} is longer than the {} allowed",
                    human(max)
                ));
                None
            }
            Ok(d) => Some(d),
        }
    }

    /// A timeout: a duration in [`MIN_TIMEOUT`]..=[`MAX_TIMEOUT`], bare numbers in seconds.
    pub fn timeout(&mut self, key: &str) -> Option<Duration> {
        self.duration(key, SECONDS, MIN_TIMEOUT, MAX_TIMEOUT)
    }
}

fn unit_name(unit: Duration) -> &'static str {
    match unit.as_millis() {
        1 => "milliseconds",
        1_000 => "seconds",
        60_000 => "minutes",
        3_600_000 => "hours",
        _ => "units",
    }
}

/// `1h`, `5m`, `30s`, `100ms`: how a bound reads in a message.
fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1_000) && d.subsec_nanos() == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{d:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const KEYS: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "timeout", "maxInFlight"];

    fn reader(v: Value) -> ConfigReader<'static> {
        ConfigReader::new(&v, KEYS)
    }

    #[test]
    fn counts_and_byte_sizes_read_numbers_and_text_and_name_bad_values() {
        let mut r = reader(json!({
            "a": 7, "b": "10_000", "c": "2KiB", "d": true, "e": [1], "f": "x", "g": 9
        }));
        assert_eq!(r.count("a", 0, 10), Some(7));
        assert_eq!(r.count("b", 0, 20_000), Some(10_000));
        assert_eq!(r.bytes("c", 0, 1 << 20), Some(2048));
        assert_eq!(r.bytes("a", 0, 10), Some(7));
        assert_eq!(r.count("d", 0, 10), None);
        assert_eq!(r.bytes("e", 0, 10), None);
        assert_eq!(r.count("f", 0, 10), None);
        assert_eq!(r.count("g", 0, 5), None);
        let problems = r.finish().unwrap_err().0;
        assert_eq!(problems.len(), 4, "{problems:?}");
        assert_eq!(
            problems[0],
            "`d` must be a non-negative integer, not a boolean"
        );
        assert_eq!(
            problems[1],
            "`e` must be a byte size (e.g. 100KB or 100000), not a list"
        );
        assert!(problems[2].starts_with("`f`: "), "{}", problems[2]);
        assert_eq!(problems[3], "`g` = 9 is more than the 5 allowed");
    }

    #[test]
    fn durations_accept_text_and_bare_numbers_in_the_keys_unit() {
        let mut r = reader(json!({
            "a": "250ms", "b": "30s", "c": "5m", "d": "1h", "e": 30, "f": 1.5, "g": "2"
        }));
        let ms = Duration::from_millis(1);
        let get = |r: &mut ConfigReader, k| r.timeout(k);
        assert_eq!(get(&mut r, "a"), Some(Duration::from_millis(250)));
        assert_eq!(get(&mut r, "b"), Some(Duration::from_secs(30)));
        assert_eq!(get(&mut r, "c"), Some(Duration::from_secs(300)));
        assert_eq!(get(&mut r, "d"), Some(Duration::from_secs(3600)));
        assert_eq!(get(&mut r, "e"), Some(Duration::from_secs(30)));
        assert_eq!(get(&mut r, "f"), Some(Duration::from_millis(1500)));
        // A key documented in milliseconds reads bare numbers as milliseconds.
        assert_eq!(
            r.duration("g", ms, ms, MAX_TIMEOUT),
            Some(Duration::from_millis(2))
        );
        assert_eq!(r.timeout("timeout"), None, "unset is None, no problem");
        r.finish().unwrap();
    }

    #[test]
    fn duration_bounds_are_inclusive_and_named() {
        let mut r = reader(json!({
            "a": "100ms", "b": "99ms", "c": "1h", "d": 3601, "e": "0s", "f": "soon", "g": true
        }));
        assert_eq!(r.timeout("a"), Some(MIN_TIMEOUT));
        assert_eq!(r.timeout("b"), None);
        assert_eq!(r.timeout("c"), Some(MAX_TIMEOUT));
        assert_eq!(r.timeout("d"), None);
        assert_eq!(r.timeout("e"), None);
        assert_eq!(r.timeout("f"), None);
        assert_eq!(r.timeout("g"), None);
        let all = r.finish().unwrap_err().0;
        assert_eq!(all.len(), 5, "{all:?}");
        assert!(
            all[0].contains("`b` = 99ms is shorter than the 100ms allowed"),
            "{all:?}"
        );
        assert!(
            all[1].contains("`d` = 3601s is longer than the 1h allowed"),
            "{all:?}"
        );
        assert!(all[2].contains("`e` must be longer than zero"), "{all:?}");
        assert!(all[3].starts_with("`f` must be a duration"), "{all:?}");
        assert!(all[4].starts_with("`g` must be a duration"), "{all:?}");
    }

    #[test]
    fn counts_and_bytes_respect_their_bounds() {
        let mut r = reader(json!({
            "a": 1, "b": "10_000", "c": 0, "d": 10_001, "e": "32KB", "f": "1KiB", "g": "lots"
        }));
        assert_eq!(r.count("a", 1, 10_000), Some(1));
        assert_eq!(r.count("b", 1, 10_000), Some(10_000));
        assert_eq!(r.count("c", 1, 10_000), None);
        assert_eq!(r.count("d", 1, 10_000), None);
        assert_eq!(r.bytes("e", 1, 32_000), Some(32_000));
        assert_eq!(r.bytes("f", 1_025, u64::MAX), None);
        assert_eq!(r.bytes("g", 0, u64::MAX), None);
        let all = r.finish().unwrap_err().0;
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(all[0].contains("`c` must be at least 1"), "{all:?}");
        assert!(
            all[1].contains("`d` = 10001 is more than the 10000 allowed"),
            "{all:?}"
        );
        assert!(all[2].contains("`f` must be at least 1025"), "{all:?}");
        assert!(all[3].starts_with("`g`:"), "{all:?}");
    }

    #[test]
    fn strings_secrets_urls_bools_and_choices() {
        let mut r = reader(json!({
            "a": "text", "b": "s3cr3t value", "c": "", "d": "ftp://u:pw@host",
            "e": "https://u:pw@host:8080/x", "f": "TRUE", "g": "batchh"
        }));
        assert_eq!(r.string("a").as_deref(), Some("text"));
        assert_eq!(
            r.secret("b").map(|s| s.expose().to_string()).as_deref(),
            Some("s3cr3t value")
        );
        assert_eq!(r.secret("c"), None);
        assert_eq!(r.url("d"), None);
        assert_eq!(r.url("e").as_deref(), Some("https://u:pw@host:8080/x"));
        assert_eq!(r.bool("f"), Some(true));
        assert_eq!(r.choice("g", &["batch", "single"]), None);
        assert_eq!(r.choice("f", &["TRUE", "FALSE"]), Some("TRUE"));
        assert_eq!(r.required_string("timeout", "the endpoint"), None);
        let all = r.finish().unwrap_err().0;
        let text = all.join("\n");
        assert_eq!(all.len(), 4, "{text}");
        assert!(all[0].contains("`c` is empty"), "{text}");
        assert!(
            all[1].contains("`d`") && all[1].contains("http or https"),
            "{text}"
        );
        assert!(all[2].contains("`g` = \"batchh\"") && all[2].contains("did you mean `batch`"));
        assert!(all[3].contains("`timeout` is required"), "{text}");
        for secret in ["s3cr3t", "pw@"] {
            assert!(!text.contains(secret), "{text}");
        }
        let mut r = reader(json!({"a": 3, "f": "maybe"}));
        assert_eq!((r.string("a"), r.bool("f")), (None, None));
        assert_eq!(r.finish().unwrap_err().0.len(), 2);
    }

    #[test]
    fn unknown_keys_get_did_you_mean_and_every_problem_is_collected() {
        let mut r = reader(json!({"maxInFligth": 3, "zzzzzzzzzz": 1, "timeout": "x", "a": 0}));
        r.timeout("timeout");
        r.count("a", 1, 2);
        let all = r.finish().unwrap_err().0;
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(all[0].contains("unknown key `maxInFligth` (did you mean `maxInFlight`?)"));
        assert!(
            all[1].contains("unknown key `zzzzzzzzzz` (known keys: a, b,"),
            "{all:?}"
        );
        assert!(all[2].starts_with("`timeout`"), "{all:?}");
        assert!(all[3].starts_with("`a`"), "{all:?}");
        let r = ConfigReader::new(&json!("x"), KEYS);
        assert!(r.finish().unwrap_err().0[0].contains("must be a table"));
        ConfigReader::new(&Value::Null, KEYS).finish().unwrap();
    }
}
