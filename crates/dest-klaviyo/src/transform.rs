//! One job payload → one staged line: the compact JSON of a Klaviyo
//! `profile` resource, checked for shape and size so a bad record is
//! aborted alone with a clear reason instead of sinking a whole request.

use batchrouter_core::destination::json_kind;
use batchrouter_core::TransformError;
use serde_json::{Map, Value};

/// Profile attributes Klaviyo knows, besides `location` and `properties`.
pub const STRING_ATTRIBUTES: &[&str] = &[
    "email",
    "phone_number",
    "external_id",
    "anonymous_id",
    "first_name",
    "last_name",
    "organization",
    "locale",
    "title",
    "image",
];

/// Keys accepted inside `location`.
pub const LOCATION_KEYS: &[&str] = &[
    "address1",
    "address2",
    "city",
    "country",
    "latitude",
    "longitude",
    "region",
    "zip",
    "timezone",
    "ip",
];

/// The identifiers of which a profile needs at least one.
pub const IDENTIFIERS: &[&str] = &["email", "phone_number", "external_id"];

/// Turns a job payload into the staged line (compact JSON of the profile
/// resource), or says why the record cannot be sent.
///
/// Accepted shapes: a flat profile `{id?, email?, phone_number?, …,
/// location?, properties?}`, or a profile resource `{"type": "profile",
/// "id"?, "attributes": {…}}`. Keys that are not profile attributes are moved
/// into `properties`; `null` values are left out (Klaviyo's bulk import never
/// clears a field).
pub fn profile_line(payload: &str, max_profile_bytes: u64) -> Result<String, TransformError> {
    let value: Value = serde_json::from_str(payload)
        .map_err(|e| TransformError::new(format!("payload is not valid JSON: {e}")))?;
    let Value::Object(mut top) = value else {
        return Err(TransformError::new(format!(
            "payload must be one JSON object (a profile), not {}",
            kind(&value)
        )));
    };

    let is_resource = top.get("type").and_then(Value::as_str) == Some("profile")
        && top.get("attributes").is_some_and(Value::is_object);
    let (id, fields) = if is_resource {
        if let Some(extra) = top
            .keys()
            .find(|k| !matches!(k.as_str(), "type" | "id" | "attributes"))
        {
            return Err(TransformError::new(format!(
                "a profile resource has only `type`, `id` and `attributes`; found `{extra}`"
            )));
        }
        let id = top.remove("id");
        // `is_resource` checked that `attributes` is an object.
        let attrs = match top.remove("attributes") {
            Some(Value::Object(a)) => a,
            _ => Map::new(),
        };
        (id, attrs)
    } else {
        let id = top.remove("id");
        (id, top)
    };

    let mut out = Map::new();
    let mut properties: Option<Map<String, Value>> = None;
    let mut extras: Vec<(String, Value)> = Vec::new();
    for (key, value) in fields {
        if value.is_null() {
            continue;
        }
        match key.as_str() {
            "external_id" => {
                let text = match &value {
                    Value::String(s) => s.clone(),
                    // Numeric user ids are common upstream; Klaviyo wants text.
                    Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                    other => {
                        return Err(wrong_type("external_id", "a string or an integer", other))
                    }
                };
                if text.trim().is_empty() {
                    return Err(TransformError::new("`external_id` is empty"));
                }
                out.insert(key, Value::String(text));
            }
            k if STRING_ATTRIBUTES.contains(&k) => {
                let Value::String(s) = &value else {
                    return Err(wrong_type(k, "a string", &value));
                };
                if IDENTIFIERS.contains(&k) && s.trim().is_empty() {
                    return Err(TransformError::new(format!("`{k}` is empty")));
                }
                if k == "email" && !plausible_email(s) {
                    return Err(TransformError::new(format!(
                        "`email` {s:?} is not an email address"
                    )));
                }
                out.insert(key, value);
            }
            "location" => {
                let Value::Object(loc) = value else {
                    return Err(wrong_type("location", "an object", &value));
                };
                out.insert(key, Value::Object(check_location(loc)?));
            }
            "properties" => {
                let Value::Object(props) = value else {
                    return Err(wrong_type("properties", "an object", &value));
                };
                properties = Some(props);
            }
            _ => extras.push((key, value)),
        }
    }

    if !IDENTIFIERS.iter().any(|k| out.contains_key(*k)) {
        return Err(TransformError::new(
            "profile needs at least one of `email`, `phone_number` or `external_id`",
        ));
    }
    if !extras.is_empty() {
        let props = properties.get_or_insert_with(Map::new);
        for (key, value) in extras {
            if props.contains_key(&key) {
                return Err(TransformError::new(format!(
                    "`{key}` is both a top-level key and a key of `properties`; keep one"
                )));
            }
            props.insert(key, value);
        }
    }
    if let Some(props) = properties {
        if !props.is_empty() {
            out.insert("properties".into(), Value::Object(props));
        }
    }

    let mut resource = Map::new();
    resource.insert("type".into(), Value::String("profile".into()));
    match id {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if !s.trim().is_empty() => {
            resource.insert("id".into(), Value::String(s));
        }
        Some(other) => {
            return Err(wrong_type(
                "id",
                "a non-empty string (a Klaviyo profile id)",
                &other,
            ))
        }
    }
    resource.insert("attributes".into(), Value::Object(out));
    let line = serde_json::to_string(&Value::Object(resource))
        .map_err(|e| TransformError::new(format!("profile cannot be encoded: {e}")))?;
    if line.len() as u64 > max_profile_bytes {
        return Err(TransformError::new(format!(
            "profile is {} bytes as JSON, over the per-profile limit of {max_profile_bytes} bytes (maxProfileBytes)",
            line.len()
        )));
    }
    Ok(line)
}

fn check_location(loc: Map<String, Value>) -> Result<Map<String, Value>, TransformError> {
    let mut out = Map::new();
    for (key, value) in loc {
        if value.is_null() {
            continue;
        }
        if !LOCATION_KEYS.contains(&key.as_str()) {
            return Err(TransformError::new(format!(
                "`location.{key}` is not a Klaviyo location field (known: {})",
                LOCATION_KEYS.join(", ")
            )));
        }
        let ok = match key.as_str() {
            "latitude" | "longitude" => value.is_number() || value.is_string(),
            _ => value.is_string(),
        };
        if !ok {
            let want = if matches!(key.as_str(), "latitude" | "longitude") {
                "a number or a string"
            } else {
                "a string"
            };
            return Err(wrong_type(&format!("location.{key}"), want, &value));
        }
        out.insert(key, value);
    }
    Ok(out)
}

fn plausible_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty() && !domain.is_empty() && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

fn wrong_type(key: &str, want: &str, got: &Value) -> TransformError {
    TransformError::new(format!("`{key}` must be {want}, not {}", kind(got)))
}

/// A payload value's kind for error messages: the config wording, except
/// that a payload holds objects, not tables.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Object(_) => "an object",
        other => json_kind(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line(v: Value) -> Result<Value, String> {
        profile_line(&v.to_string(), 100_000)
            .map(|l| {
                assert!(!l.contains('\n'));
                serde_json::from_str(&l).unwrap()
            })
            .map_err(|e| e.0)
    }

    #[test]
    fn flat_profile_becomes_a_resource_with_unknown_keys_in_properties() {
        let out = line(json!({
            "id": "01ABC",
            "email": "a@example.com",
            "first_name": "Ada",
            "location": {"city": "Paris", "latitude": 48.85},
            "properties": {"plan": "pro"},
            "favourite_colour": "green",
            "visits": 3,
            "phone_number": null
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({
                "type": "profile",
                "id": "01ABC",
                "attributes": {
                    "email": "a@example.com",
                    "first_name": "Ada",
                    "location": {"city": "Paris", "latitude": 48.85},
                    "properties": {"plan": "pro", "favourite_colour": "green", "visits": 3}
                }
            })
        );
    }

    #[test]
    fn resource_form_is_accepted_and_numeric_external_ids_become_text() {
        let out = line(json!({
            "type": "profile",
            "attributes": {"external_id": 42, "last_name": "Lovelace"}
        }))
        .unwrap();
        assert_eq!(
            out,
            json!({"type": "profile", "attributes": {"external_id": "42", "last_name": "Lovelace"}})
        );
        // A `type` that is user data (not a resource) is just a property.
        let out = line(json!({"email": "b@example.com", "type": "vip"})).unwrap();
        assert_eq!(out["attributes"]["properties"], json!({"type": "vip"}));
    }

    #[test]
    fn wrong_shapes_are_refused_with_a_reason() {
        let cases = [
            (json!([1, 2]), "must be one JSON object"),
            (
                json!({"first_name": "x"}),
                "at least one of `email`, `phone_number` or `external_id`",
            ),
            (
                json!({"email": 5}),
                "`email` must be a string, not a number",
            ),
            (json!({"email": ""}), "`email` is empty"),
            (
                json!({"email": "not-an-address"}),
                "is not an email address",
            ),
            (
                json!({"email": "a@b.c", "location": "Paris"}),
                "`location` must be an object",
            ),
            (
                json!({"email": "a@b.c", "location": {"planet": "Mars"}}),
                "`location.planet` is not a Klaviyo location field",
            ),
            (
                json!({"email": "a@b.c", "location": {"city": 3}}),
                "`location.city` must be a string",
            ),
            (
                json!({"email": "a@b.c", "properties": [1]}),
                "`properties` must be an object",
            ),
            (
                json!({"email": "a@b.c", "plan": 1, "properties": {"plan": 2}}),
                "`plan` is both a top-level key",
            ),
            (
                json!({"email": "a@b.c", "id": 7}),
                "`id` must be a non-empty string",
            ),
            (
                json!({"external_id": 1.5}),
                "`external_id` must be a string or an integer",
            ),
            (
                json!({"type": "profile", "attributes": {"email": "a@b.c"}, "extra": 1}),
                "found `extra`",
            ),
        ];
        for (payload, needle) in cases {
            let err = line(payload.clone()).unwrap_err();
            assert!(err.contains(needle), "{payload}: {err}");
        }
        let err = profile_line("{\"email\": ", 1000).unwrap_err();
        assert!(err.0.contains("not valid JSON"), "{err}");
    }

    #[test]
    fn oversized_profiles_are_refused_with_their_size() {
        let payload = json!({"email": "a@b.c", "bio": "x".repeat(2_000)}).to_string();
        let err = profile_line(&payload, 1_000).unwrap_err();
        assert!(
            err.0.contains("over the per-profile limit of 1000 bytes"),
            "{err}"
        );
        assert!(profile_line(&payload, 3_000).is_ok());
    }

    #[test]
    fn newlines_in_values_stay_escaped() {
        let l = profile_line(
            &json!({"email": "a@b.c", "note": "two\nlines"}).to_string(),
            1000,
        )
        .unwrap();
        assert!(!l.contains('\n'));
        assert!(l.contains("two\\nlines"));
    }
}
