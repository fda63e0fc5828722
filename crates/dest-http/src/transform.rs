//! Payload → staged line: the record is sent as enqueued, so the line is the
//! payload itself, checked to be JSON and kept on one line.

use batchrouter_core::TransformError;

/// The staged line for a payload; invalid JSON aborts the job.
pub fn to_line(payload: &str) -> Result<String, TransformError> {
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(payload) {
        return Err(TransformError::new(format!(
            "payload is not valid JSON: {e}"
        )));
    }
    if payload.contains(['\n', '\r']) {
        // In valid JSON a raw line break can only be whitespace (inside
        // strings it is escaped), so spaces keep every other byte as sent.
        return Ok(payload.replace(['\n', '\r'], " "));
    }
    Ok(payload.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_payload_bytes_flattens_line_breaks_rejects_bad_json() {
        assert_eq!(to_line(r#"{"a": 1}"#).unwrap(), r#"{"a": 1}"#);
        assert_eq!(
            to_line("{\n  \"a\": \"x\\ny\"\n}").unwrap(),
            r#"{   "a": "x\ny" }"#
        );
        // Key order and big numbers stay exactly as sent.
        let odd = "{\"z\": 1,\r\n \"a\": 12345678901234567890123}";
        assert_eq!(
            to_line(odd).unwrap(),
            "{\"z\": 1,   \"a\": 12345678901234567890123}"
        );
        let e = to_line("{\"a\": ").unwrap_err();
        assert!(
            e.to_string().starts_with("payload is not valid JSON"),
            "{e}"
        );
        assert_eq!(to_line("[1,2]").unwrap(), "[1,2]");
    }
}
