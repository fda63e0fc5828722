//! Payload → staged line: the record is sent as enqueued, so the line is the
//! payload itself, checked to be JSON and kept on one line.
//!
//! A record nested deeper than [`MAX_PAYLOAD_DEPTH`] is refused here: a
//! batch body carries it one level deeper still, and receivers' parsers
//! refuse such bodies whole (serde_json stops at 128 levels), which would
//! fail every record of the request instead of this one.

use batchrouter_core::job::json_depth;
use batchrouter_core::{TransformError, MAX_PAYLOAD_DEPTH};

/// The staged line for a payload; invalid or too deeply nested JSON aborts
/// the job.
pub fn to_line(payload: &str) -> Result<String, TransformError> {
    // Measured without recursion before any parser sees the text.
    let depth = json_depth(payload);
    if depth > MAX_PAYLOAD_DEPTH {
        return Err(TransformError::new(format!(
            "payload nests objects/arrays {depth} levels deep; at most {MAX_PAYLOAD_DEPTH} are accepted"
        )));
    }
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

    #[test]
    fn records_deeper_than_the_limit_are_refused() {
        let nest = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        assert!(to_line(&nest(MAX_PAYLOAD_DEPTH)).is_ok());
        for levels in [MAX_PAYLOAD_DEPTH + 1, 10_000] {
            let e = to_line(&nest(levels)).unwrap_err();
            assert!(
                e.to_string().contains(&format!("{levels} levels deep")),
                "{e}"
            );
        }
    }
}
