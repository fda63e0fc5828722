//! Canonical rendering of JSON values into text cells (CSV and friends), so
//! no destination writes `1e+06`, `<nil>` or Go-style maps into a user's file.

use std::borrow::Cow;
use std::io::{self, Write};

use serde_json::Value;

/// Renders one value as a cell: null → empty, booleans `true`/`false`,
/// integers without exponent or `.0`, other numbers in plain decimal,
/// strings as they are, arrays and objects as compact JSON text.
pub fn render_cell(value: &Value) -> Cow<'_, str> {
    match value {
        Value::Null => Cow::Borrowed(""),
        Value::Bool(true) => Cow::Borrowed("true"),
        Value::Bool(false) => Cow::Borrowed("false"),
        Value::String(s) => Cow::Borrowed(s.as_str()),
        Value::Number(n) => Cow::Owned(render_number(n)),
        Value::Array(_) | Value::Object(_) => Cow::Owned(value.to_string()),
    }
}

fn render_number(n: &serde_json::Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    let f = n.as_f64().unwrap_or(f64::NAN);
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 9.007_199_254_740_992e15 {
        return format!("{}", f as i64);
    }
    // Rust's shortest round-trip Display never uses exponent notation.
    format!("{f}")
}

/// A short single-line excerpt of a text (an answer's body, a parse error)
/// for a job's reason: control characters become spaces, and a text longer
/// than `max_chars` is cut and ends in `…`.
pub fn excerpt(body: &str, max_chars: usize) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.chars().count() <= max_chars {
        flat.to_string()
    } else {
        let cut: String = flat.chars().take(max_chars).collect();
        format!("{cut}…")
    }
}

/// Passes writes on and counts the bytes accepted, so a destination knows
/// the size of a file as actually written (and can check its estimate).
#[derive(Debug)]
pub struct CountingWriter<W> {
    /// Where the bytes go.
    pub inner: W,
    /// Bytes `inner` accepted so far.
    pub bytes: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_render_canonically() {
        assert_eq!(render_cell(&json!(null)), "");
        assert_eq!(render_cell(&json!(true)), "true");
        assert_eq!(render_cell(&json!(1000000)), "1000000");
        assert_eq!(render_cell(&json!(1e6)), "1000000");
        assert_eq!(render_cell(&json!(-2.5)), "-2.5");
        assert_eq!(render_cell(&json!(1e21)), "1000000000000000000000");
        assert_eq!(render_cell(&json!(0.000001)), "0.000001");
        assert_eq!(render_cell(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(render_cell(&json!("a,b")), "a,b");
        assert_eq!(render_cell(&json!({"k": [1, 2]})), "{\"k\":[1,2]}");
    }

    #[test]
    fn excerpts_are_short_and_single_line() {
        assert_eq!(excerpt(" a\nb\t", 10), "a b");
        assert_eq!(excerpt(&"x".repeat(300), 5), "xxxxx…");
        assert_eq!(excerpt("ééé", 3), "ééé");
    }
}
