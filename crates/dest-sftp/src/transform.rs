//! Job payload → staged line. The line is the customer's record only (a
//! flat JSON object, field order kept, values verbatim): job ids travel in
//! `StagedBatch::job_ids`, never in the file that reaches the customer.
//!
//! Accepted payloads:
//! - a record event `{"fields": {…}, "action": "insert", …}`: the record is
//!   `fields` plus `action` (last) when present; other keys (`type`,
//!   `recordId`, `context`, …) are routing metadata and are dropped;
//! - any other JSON object: the object itself is the record.

use std::fmt;

use batchrouter_core::TransformError;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The staged line for one job payload.
pub fn transform_payload(payload: &str) -> Result<String, TransformError> {
    let top: Object<'_> = serde_json::from_str(payload)
        .map_err(|e| TransformError::new(format!("payload is not a JSON object: {e}")))?;
    top.check_unique("payload")?;

    let fields = top
        .get("fields")
        .filter(|v| v.get().trim_start().starts_with('{'));
    let Some(fields) = fields else {
        // Flat record: the object itself.
        return Ok(write_object(&top.0, None));
    };
    let fields: Object<'_> = serde_json::from_str(fields.get())
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
    Ok(write_object(&fields.0, action))
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
    batchrouter_core::classify::excerpt(&m, 40)
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
