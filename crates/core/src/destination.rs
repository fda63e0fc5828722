//! What every destination crate shares: how it is built from its config
//! table, and how unknown or misspelt keys are reported.

use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::telemetry::DestinationTelemetry;

/// Everything a destination constructor gets besides its config table.
#[derive(Clone)]
pub struct DestinationContext {
    /// Configured destination id (used in paths, logs and metrics).
    pub id: String,
    /// Destination type name (`HTTP`, `SFTP`, …).
    pub destination_type: String,
    /// Metrics sink with this destination's labels bound.
    pub telemetry: Arc<dyn DestinationTelemetry>,
}

impl std::fmt::Debug for DestinationContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DestinationContext")
            .field("id", &self.id)
            .field("destination_type", &self.destination_type)
            .finish_non_exhaustive()
    }
}

/// Every problem found in one destination's config, so `check-config` can
/// list them all at once instead of stopping at the first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ConfigProblems(pub Vec<String>);

impl ConfigProblems {
    /// A single problem.
    pub fn one(message: impl Into<String>) -> Self {
        ConfigProblems(vec![message.into()])
    }

    /// Ok when nothing was found, the problems otherwise.
    pub fn into_result(self) -> Result<(), ConfigProblems> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// Records a problem.
    pub fn push(&mut self, message: impl Into<String>) {
        self.0.push(message.into());
    }
}

/// Deserialises a destination's `config` table into `T`, first reporting
/// every key not in `known` (with a "did you mean" for near misses).
pub fn parse_destination_config<T: DeserializeOwned>(
    value: &serde_json::Value,
    known: &[&str],
) -> Result<T, ConfigProblems> {
    let mut problems = ConfigProblems::default_empty();
    match value {
        serde_json::Value::Object(map) => {
            for key in map.keys() {
                if !known.contains(&key.as_str()) {
                    match did_you_mean(key, known) {
                        Some(s) => {
                            problems.push(format!("unknown key `{key}` (did you mean `{s}`?)"))
                        }
                        None => problems.push(format!(
                            "unknown key `{key}` (known keys: {})",
                            known.join(", ")
                        )),
                    }
                }
            }
        }
        serde_json::Value::Null => {}
        other => problems.push(format!(
            "`config` must be a table, not {}",
            json_kind(other)
        )),
    }
    let value = if value.is_null() {
        serde_json::Value::Object(Default::default())
    } else {
        value.clone()
    };
    match serde_json::from_value::<T>(value) {
        Ok(v) if problems.0.is_empty() => Ok(v),
        Ok(_) => Err(problems),
        Err(e) => {
            let msg = e.to_string();
            // Unknown keys were already reported with suggestions.
            if !msg.starts_with("unknown field") {
                problems.push(msg);
            }
            Err(problems)
        }
    }
}

impl ConfigProblems {
    fn default_empty() -> Self {
        ConfigProblems(Vec::new())
    }
}

/// How a JSON value's type reads in an error message ("a string", "a table").
pub fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "a table",
    }
}

/// The closest candidate within a small edit distance (case-insensitive).
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&w, &c.to_ascii_lowercase()), *c))
        .filter(|(d, c)| *d <= (c.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, for suggestions.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Cfg {
        url: String,
        #[serde(default)]
        max_in_flight: Option<u32>,
    }

    const KEYS: &[&str] = &["url", "maxInFlight"];

    #[test]
    fn reports_every_unknown_key_with_suggestions() {
        let v = serde_json::json!({"url": "http://x", "maxInFligth": 3, "zzz": 1});
        let err = parse_destination_config::<Cfg>(&v, KEYS).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err:?}");
        assert!(err.0[0].contains("did you mean `maxInFlight`"), "{err:?}");
        assert!(err.0[1].contains("known keys: url, maxInFlight"), "{err:?}");
    }

    #[test]
    fn reports_type_errors_and_missing_fields() {
        let err = parse_destination_config::<Cfg>(&serde_json::json!({}), KEYS).unwrap_err();
        assert!(err.0[0].contains("missing field `url`"), "{err:?}");
        let err = parse_destination_config::<Cfg>(&serde_json::json!("x"), KEYS).unwrap_err();
        assert!(err.0[0].contains("must be a table"), "{err:?}");
        let ok: Cfg =
            parse_destination_config(&serde_json::json!({"url": "u", "maxInFlight": 2}), KEYS)
                .unwrap();
        assert_eq!((ok.url.as_str(), ok.max_in_flight), ("u", Some(2)));
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("clientSecert", &["clientId", "clientSecret"]),
            Some("clientSecret")
        );
        assert_eq!(did_you_mean("completely", &["url"]), None);
    }
}
