//! CSV text: the one place that knows how a cell, a line and a whole import
//! file are spelled (RFC 4180 fields, commas, CRLF).
//!
//! The planner decides whether a row still fits a file from byte counts
//! alone, before anything is written, so the encoding and the arithmetic
//! that predicts its size live side by side: change one, and the other is in
//! view. [`batchrouter_core::render::CountingWriter`] measures what was actually written so the
//! prediction is checked against every file.

/// Appends `value` as an RFC 4180 field: quoted (with doubled quotes) when
/// it holds a comma, quote, CR or LF, as is otherwise.
pub fn encode_cell(value: &str, out: &mut Vec<u8>) {
    if value
        .bytes()
        .any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'))
    {
        out.push(b'"');
        for (i, part) in value.split('"').enumerate() {
            if i > 0 {
                out.extend_from_slice(b"\"\"");
            }
            out.extend_from_slice(part.as_bytes());
        }
        out.push(b'"');
    } else {
        out.extend_from_slice(value.as_bytes());
    }
}

/// Bytes of a CSV file with `cols` columns whose names encode to
/// `names_bytes`, and `rows` rows whose present cells encode to
/// `content_bytes`: every line has `cols - 1` commas and CRLF.
pub(super) fn csv_size(names_bytes: u64, cols: u64, content_bytes: u64, rows: u64) -> u64 {
    (names_bytes + cols + 1) + content_bytes + rows * (cols + 1)
}
