//! Job → staged line: `<created_at ms> <record>`, where the record is the
//! payload as enqueued, checked to be JSON and kept on one line. The job's
//! creation time travels in the line because single mode's
//! `Idempotency-Key` names it (see [`crate::upload::idempotency_key`]) and
//! the staged batch carries only the earliest job's; the upload strips it
//! ([`split_line`]) before sending.
//!
//! A record nested deeper than [`MAX_PAYLOAD_DEPTH`] is refused here: a
//! batch body carries it one level deeper still, and receivers' parsers
//! refuse such bodies whole (serde_json stops at 128 levels), which would
//! fail every record of the request instead of this one.

use batchrouter_core::job::json_depth;
use batchrouter_core::{Job, Timestamp, TransformError, MAX_PAYLOAD_DEPTH};

/// The staged line for a job: its creation time, a space, its record.
pub fn staged_line(job: &Job) -> Result<String, TransformError> {
    let record = to_line(&job.payload)?;
    Ok(format!("{} {record}", job.created_at.0))
}

/// Splits a staged line into the job's creation time and its record; `None`
/// when the line was not written by [`staged_line`].
pub fn split_line(line: &str) -> Option<(Timestamp, &str)> {
    let (ms, record) = line.split_once(' ')?;
    Some((Timestamp(ms.parse().ok()?), record))
}

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
    fn staged_lines_carry_the_creation_time_and_split_back() {
        let job = Job {
            id: 7,
            destination_id: "h".into(),
            payload: "{\"a\": 1,\n \"b\": \"x y\"}".into(),
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at: Timestamp(1_764_460_800_123),
        };
        let line = staged_line(&job).unwrap();
        assert_eq!(line, "1764460800123 {\"a\": 1,  \"b\": \"x y\"}");
        assert_eq!(
            split_line(&line),
            Some((Timestamp(1_764_460_800_123), "{\"a\": 1,  \"b\": \"x y\"}"))
        );
        for bad in ["{\"a\": 1}", "", "x {}", "12{}"] {
            assert_eq!(split_line(bad), None, "{bad}");
        }
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
