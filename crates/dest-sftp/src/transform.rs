//! Job payload → staged line. The line is the customer's record only (a
//! flat JSON object, field order kept, values verbatim): job ids travel in
//! `StagedBatch::job_ids`, never in the file that reaches the customer.
//!
//! Accepted payloads:
//! - a record event `{"fields": {…}, "action": "insert", …}`: the record is
//!   `fields` plus `action` (last) when present; other keys (`type`,
//!   `recordId`, `context`, …) are routing metadata and are dropped;
//! - any other JSON object: the object itself is the record.
//!
//! Whatever transform accepts, the upload can render: payloads nested deeper
//! than [`MAX_PAYLOAD_DEPTH`] are refused here, and for CSV the staged line
//! already holds every value rendered as its cell (a JSON string), so a
//! record that cannot become a cell (a number out of range, say) is refused
//! here too and aborts alone, instead of failing its whole batch at upload.

use std::fmt;

use batchrouter_core::job::json_depth;
use batchrouter_core::render::render_cell;
use batchrouter_core::{TransformError, MAX_PAYLOAD_DEPTH};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::config::FileFormat;

/// The staged line for one job payload in a file of `format`: for the JSON
/// formats the record as [`transform_payload`] gives it; for CSV the same
/// record with every value replaced by its rendered cell, which is exactly
/// what the upload writes into the row.
pub fn transform_record(payload: &str, format: FileFormat) -> Result<String, TransformError> {
    let record = Record::parse(payload)?;
    match format {
        FileFormat::Csv => record.write_cells(),
        FileFormat::Json | FileFormat::JsonArray => Ok(record.write()),
    }
}

/// The staged line for one job payload (the record as JSON, for the JSON
/// file formats; see [`transform_record`] for CSV).
pub fn transform_payload(payload: &str) -> Result<String, TransformError> {
    Ok(Record::parse(payload)?.write())
}

/// A payload's record: members in document order, values unparsed.
struct Record<'a> {
    members: Vec<(String, &'a RawValue)>,
    action: Option<&'a RawValue>,
}

impl<'a> Record<'a> {
    fn parse(payload: &'a str) -> Result<Record<'a>, TransformError> {
        // Measured without recursion before any parser sees the text.
        let depth = json_depth(payload);
        if depth > MAX_PAYLOAD_DEPTH {
            return Err(TransformError::new(format!(
                "payload nests objects/arrays {depth} levels deep; at most {MAX_PAYLOAD_DEPTH} are accepted"
            )));
        }
        let top: Object<'a> = serde_json::from_str(payload)
            .map_err(|e| TransformError::new(format!("payload is not a JSON object: {e}")))?;
        top.check_unique("payload")?;

        let fields = top
            .get("fields")
            .filter(|v| v.get().trim_start().starts_with('{'));
        let Some(fields) = fields else {
            // Flat record: the object itself.
            return Ok(Record {
                members: top.0,
                action: None,
            });
        };
        let fields: Object<'a> = serde_json::from_str(fields.get())
            .map_err(|e| TransformError::new(format!("`fields` is not a JSON object: {e}")))?;
        fields.check_unique("fields")?;
        let action = match top.get("action") {
            None => None,
            Some(v) if v.get() == "null" => None,
            Some(v) if v.get().starts_with('"') => Some(v),
            Some(v) => {
                return Err(TransformError::new(format!(
                    "`action` must be a string, not {}",
                    short(v.get())
                )))
            }
        };
        if action.is_some() && fields.get("action").is_some() {
            return Err(TransformError::new(
                "the record has both an `action` and a field named `action`; rename the field",
            ));
        }
        Ok(Record {
            members: fields.0,
            action,
        })
    }

    /// The record as one line of JSON, values verbatim.
    fn write(&self) -> String {
        write_object(&self.members, self.action)
    }

    /// The record with each value rendered as its CSV cell. Every value is
    /// parsed the way the CSV renderer parses it, so what fails there fails
    /// here, for this record alone.
    fn write_cells(&self) -> Result<String, TransformError> {
        let mut out = String::with_capacity(
            self.members
                .iter()
                .map(|(k, v)| k.len() + v.get().len() + 6)
                .sum::<usize>()
                + 32,
        );
        out.push('{');
        let action = self.action.map(|a| ("action".to_string(), a));
        for (i, (k, v)) in self.members.iter().chain(action.iter()).enumerate() {
            let value: serde_json::Value = serde_json::from_str(v.get()).map_err(|e| {
                TransformError::new(format!("field `{k}` cannot be rendered as a CSV cell: {e}"))
            })?;
            if i > 0 {
                out.push(',');
            }
            push_key(&mut out, k);
            // Serialising a str cannot fail.
            out.push_str(&serde_json::to_string(render_cell(&value).as_ref()).unwrap_or_default());
        }
        out.push('}');
        Ok(out)
    }
}

/// A JSON object with its members in document order and values unparsed.
struct Object<'a>(Vec<(String, &'a RawValue)>);

impl<'a> Object<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    fn check_unique(&self, what: &str) -> Result<(), TransformError> {
        let mut seen = std::collections::HashSet::with_capacity(self.0.len());
        for (k, _) in &self.0 {
            if !seen.insert(k.as_str()) {
                return Err(TransformError::new(format!(
                    "{what} has the key `{k}` twice"
                )));
            }
        }
        Ok(())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Object<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Object<'a>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Object<'a>, M::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<String>()? {
                    let v: &'de RawValue = map.next_value()?;
                    members.push((k, v));
                }
                Ok(Object(members))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

fn write_object(members: &[(String, &RawValue)], action: Option<&RawValue>) -> String {
    let mut out = String::with_capacity(
        members
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum::<usize>()
            + 32,
    );
    out.push('{');
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_key(&mut out, k);
        minify_into(&mut out, v.get());
    }
    if let Some(a) = action {
        if !members.is_empty() {
            out.push(',');
        }
        out.push_str("\"action\":");
        minify_into(&mut out, a.get());
    }
    out.push('}');
    out
}

fn push_key(out: &mut String, key: &str) {
    // Serialising a str cannot fail.
    out.push_str(&serde_json::to_string(key).unwrap_or_default());
    out.push(':');
}

/// Copies valid JSON text without the whitespace between tokens, so a
/// pretty-printed payload still gives a one-line record and values (big
/// numbers, nested key order) stay exactly as sent.
pub(crate) fn minify_into(out: &mut String, json: &str) {
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
}

fn short(s: &str) -> String {
    let mut m = String::new();
    minify_into(&mut m, s);
    batchrouter_core::render::excerpt(&m, 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_events_keep_fields_in_order_and_action_last() {
        let p = r#"{"type":"record","action":"insert","recordId":"r1","fields":{"zeta":1,"alpha":"a","big":12345678901234567890123,"f":1e6},"context":{"x":1}}"#;
        assert_eq!(
            transform_payload(p).unwrap(),
            r#"{"zeta":1,"alpha":"a","big":12345678901234567890123,"f":1e6,"action":"insert"}"#
        );
    }

    #[test]
    fn flat_objects_are_the_record_and_pretty_payloads_become_one_line() {
        let p = "{\n  \"id\": \"u 1\",\n  \"tags\": [ 1, 2 ],\n  \"nested\": { \"b\": 1, \"a\": \"x y\\\" z\" }\n}";
        let line = transform_payload(p).unwrap();
        assert_eq!(
            line,
            r#"{"id":"u 1","tags":[1,2],"nested":{"b":1,"a":"x y\" z"}}"#
        );
        assert!(!line.contains('\n'));
        assert_eq!(transform_payload("{}").unwrap(), "{}");
        // `fields` that is not an object is an ordinary field.
        assert_eq!(
            transform_payload(r#"{"fields":"x"}"#).unwrap(),
            r#"{"fields":"x"}"#
        );
    }

    #[test]
    fn null_action_is_absent_and_empty_fields_still_carry_the_action() {
        assert_eq!(
            transform_payload(r#"{"fields":{"a":1},"action":null}"#).unwrap(),
            r#"{"a":1}"#
        );
        assert_eq!(
            transform_payload(r#"{"fields":{},"action":"delete"}"#).unwrap(),
            r#"{"action":"delete"}"#
        );
    }

    #[test]
    fn escaped_keys_survive() {
        assert_eq!(
            transform_payload(r#"{"fields":{"a\"b":1,"é\n":2}}"#).unwrap(),
            r#"{"a\"b":1,"é\n":2}"#
        );
    }

    #[test]
    fn payloads_deeper_than_the_limit_are_refused_in_every_format() {
        let nest = |levels: usize| {
            format!(
                "{{\"id\":1,\"deep\":{}{}}}",
                "[".repeat(levels - 1),
                "]".repeat(levels - 1)
            )
        };
        // The top-level object is one level: 64 in all is accepted.
        assert!(transform_payload(&nest(MAX_PAYLOAD_DEPTH)).is_ok());
        for levels in [MAX_PAYLOAD_DEPTH + 1, 200, 10_000] {
            for format in [FileFormat::Csv, FileFormat::Json, FileFormat::JsonArray] {
                let e = transform_record(&nest(levels), format).unwrap_err();
                assert!(
                    e.0.contains(&format!("{levels} levels deep")),
                    "{format:?}: {e}"
                );
            }
        }
    }

    #[test]
    fn csv_lines_hold_rendered_cells_and_unrenderable_values_are_refused() {
        let p = r#"{"fields":{"n":1e6,"ok":true,"nil":null,"tags":["a",1],"s":"x,\"y\""},"action":"insert"}"#;
        assert_eq!(
            transform_record(p, FileFormat::Csv).unwrap(),
            r#"{"n":"1000000","ok":"true","nil":"","tags":"[\"a\",1]","s":"x,\"y\"","action":"insert"}"#
        );
        // The JSON formats keep values verbatim.
        assert_eq!(
            transform_record(p, FileFormat::Json).unwrap(),
            transform_payload(p).unwrap()
        );
        // A number no renderer can hold passes a raw JSON scan but not CSV.
        let huge = r#"{"id":"u1","big":1e400}"#;
        assert!(transform_record(huge, FileFormat::Json).is_ok());
        let e = transform_record(huge, FileFormat::Csv).unwrap_err();
        assert!(e.0.contains("field `big` cannot be rendered"), "{e}");
    }

    #[test]
    fn bad_payloads_are_refused_with_a_reason() {
        for (p, why) in [
            ("[1,2]", "payload is not a JSON object"),
            ("{\"a\": 1", "payload is not a JSON object"),
            ("", "payload is not a JSON object"),
            (r#"{"a":1,"a":2}"#, "payload has the key `a` twice"),
            (
                r#"{"fields":{"a":1,"a":2}}"#,
                "fields has the key `a` twice",
            ),
            (
                r#"{"fields":{"a":1},"action":5}"#,
                "`action` must be a string, not 5",
            ),
            (
                r#"{"fields":{"action":"x"},"action":"insert"}"#,
                "field named `action`",
            ),
        ] {
            let e = transform_payload(p).unwrap_err();
            assert!(e.0.contains(why), "{p}: {e}");
        }
    }
}
