//! Job payload → staged line: the mapped lead row as compact JSON whose
//! values are already rendered as CSV cells, so `upload` only lays them out.

use std::collections::HashSet;

use batchrouter_core::destination::json_kind;
use batchrouter_core::render::render_cell;
use batchrouter_core::TransformError;
use serde_json::{Map, Value};

use crate::config::Settings;

/// Precomputed mapping lookups, built once per manager so `transform` stays cheap.
#[derive(Debug)]
pub struct Transformer {
    mapping: Vec<(String, String)>,
    mapped_from: HashSet<String>,
    mapped_to: HashSet<String>,
    pass_unmapped: bool,
    lookup_field: String,
    lookup_source: Option<String>,
}

impl Transformer {
    /// Prepares the lookups for one destination's settings.
    pub fn new(settings: &Settings) -> Self {
        let mapping: Vec<(String, String)> = settings
            .mapping
            .iter()
            .map(|m| (m.from.clone(), m.to.clone()))
            .collect();
        let lookup_source = mapping
            .iter()
            .find(|(_, to)| *to == settings.lookup_field)
            .map(|(from, _)| from.clone());
        Transformer {
            mapped_from: mapping.iter().map(|(f, _)| f.clone()).collect(),
            mapped_to: mapping.iter().map(|(_, t)| t.clone()).collect(),
            mapping,
            pass_unmapped: settings.pass_unmapped,
            lookup_field: settings.lookup_field.clone(),
            lookup_source,
        }
    }

    /// Maps one payload to its staged line, or says why the job cannot be sent.
    pub fn transform(&self, payload: &str) -> Result<String, TransformError> {
        let value: Value = serde_json::from_str(payload)
            .map_err(|e| TransformError::new(format!("payload is not valid JSON: {e}")))?;
        let Value::Object(fields) = value else {
            return Err(TransformError::new(format!(
                "payload must be a JSON object of lead fields, not {}",
                kind(&value)
            )));
        };
        let row = self.map_row(&fields)?;
        Ok(Value::Object(row).to_string())
    }

    fn map_row(&self, fields: &Map<String, Value>) -> Result<Map<String, Value>, TransformError> {
        let mut row = Map::new();
        for (from, to) in &self.mapping {
            if let Some(v) = fields.get(from) {
                row.insert(to.clone(), Value::String(render_cell(v).into_owned()));
            }
        }
        if self.pass_unmapped {
            for (key, v) in fields {
                // A mapped key is renamed, never duplicated; a mapped target wins over
                // an unmapped key of the same name.
                if self.mapped_from.contains(key) || self.mapped_to.contains(key) {
                    continue;
                }
                if key.trim().is_empty() {
                    return Err(TransformError::new(
                        "payload has an empty field name, which cannot be a Marketo column",
                    ));
                }
                row.insert(key.clone(), Value::String(render_cell(v).into_owned()));
            }
        }
        let has_key = row
            .get(&self.lookup_field)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty());
        if !has_key {
            return Err(TransformError::new(match &self.lookup_source {
                Some(from) if *from != self.lookup_field => format!(
                    "payload lacks a value for `{from}` (mapped to `{}`, the deDuplicationField Marketo matches leads by)",
                    self.lookup_field
                ),
                _ => format!(
                    "payload lacks a value for `{}`, the deDuplicationField Marketo matches leads by",
                    self.lookup_field
                ),
            }));
        }
        Ok(row)
    }
}

/// The value Marketo matches result rows by: trimmed and lower-cased, as
/// Marketo normalises emails and other lookup values in its result files.
pub fn normalise_key(value: &str) -> String {
    value.trim().to_lowercase()
}

/// A payload value's kind for error messages, in JSON's words (Marketo's
/// docs speak of arrays and objects, not lists and tables).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
        other => json_kind(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn transformer(config: Value) -> Transformer {
        let mut base = json!({"munchkinId": "1-A", "clientId": "c", "clientSecret": "s"});
        for (k, v) in config.as_object().unwrap() {
            base[k] = v.clone();
        }
        Transformer::new(&Settings::from_config(&base).unwrap())
    }

    fn row(line: &str) -> Map<String, Value> {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn values_render_canonically() {
        let t = transformer(json!({"passUnmappedFields": true}));
        let line = t
            .transform(
                r#"{"email":"a@b.c","n":1e6,"i":1000000,"f":-2.5,"b":true,"z":null,"o":{"k":[1]}}"#,
            )
            .unwrap();
        let r = row(&line);
        assert_eq!(r["n"], "1000000");
        assert_eq!(r["i"], "1000000");
        assert_eq!(r["f"], "-2.5");
        assert_eq!(r["b"], "true");
        assert_eq!(r["z"], "");
        assert_eq!(r["o"], "{\"k\":[1]}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn mapping_renames_and_drops_unmapped_unless_passed() {
        let t = transformer(json!({
            "columnFieldsMapping": [{"from": "mail", "to": "email"}, {"from": "first", "to": "firstName"}]
        }));
        let r = row(&t
            .transform(r#"{"mail":"x@y.z","first":"Ann","extra":"no"}"#)
            .unwrap());
        assert_eq!(r.len(), 2);
        assert_eq!(r["email"], "x@y.z");
        assert_eq!(r["firstName"], "Ann");

        let t = transformer(json!({
            "columnFieldsMapping": [{"from": "mail", "to": "email"}],
            "passUnmappedFields": true
        }));
        let r = row(&t
            .transform(r#"{"mail":"x@y.z","email":"shadowed","extra":"yes"}"#)
            .unwrap());
        assert_eq!(r["email"], "x@y.z", "the mapped value wins");
        assert_eq!(r["extra"], "yes");
        assert!(!r.contains_key("mail"));
    }

    #[test]
    fn malformed_payloads_are_refused_with_a_reason() {
        let t = transformer(json!({"columnFieldsMapping": [{"from": "mail", "to": "email"}]}));
        let cases = [
            (
                "[1,2]",
                "must be a JSON object of lead fields, not an array",
            ),
            ("\"x\"", "not a string"),
            ("{\"mail\": ", "not valid JSON"),
            (
                "{\"other\": 1}",
                "lacks a value for `mail` (mapped to `email`",
            ),
            ("{\"mail\": \"  \"}", "lacks a value for `mail`"),
            ("{\"mail\": null}", "lacks a value for `mail`"),
        ];
        for (payload, needle) in cases {
            let e = t.transform(payload).unwrap_err();
            assert!(e.0.contains(needle), "{payload}: {e}");
        }
        let t = transformer(json!({"passUnmappedFields": true}));
        assert!(t
            .transform("{\"name\":1}")
            .unwrap_err()
            .0
            .contains("lacks a value for `email`, the deDuplicationField"));
        assert!(t
            .transform("{\"email\":\"a@b\",\"\":1}")
            .unwrap_err()
            .0
            .contains("empty field name"));
    }

    #[test]
    fn keys_normalise_by_trim_and_case() {
        assert_eq!(normalise_key("  User@Example.COM "), "user@example.com");
        assert_eq!(normalise_key("ÄBC"), "äbc");
    }
}
