//! The uploaded file's content, rendered from the staged batch as a stream:
//! memory stays flat however large the batch (CSV reads the staged file
//! twice: once for the header, once for the rows).
//!
//! - `csv`: header = `columnOrder` first, then every other field name of the
//!   batch in first-seen order (sorted with `sortColumnNames`), `action`
//!   last; cells rendered canonically ([`batchrouter_core::render::render_cell`]),
//!   empty for a missing field; `\n` line ends, quotes only where needed.
//! - `json`: the records, one a line (NDJSON), exactly as staged.
//! - `jsonArray`: `[`, the records separated by `,` and a line break, `]`.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::Path;

use batchrouter_core::render::render_cell;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::config::FileFormat;

/// Read buffer for the staged file.
const READ_BUF: usize = 1 << 20;

/// What went wrong while rendering.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The staged file could not be read.
    #[error("reading the staged file: {0}")]
    Staged(io::Error),
    /// A staged line is not the JSON object transform wrote.
    #[error("staged line {line} is not a JSON object: {reason}")]
    BadLine {
        /// 1-based line number.
        line: usize,
        /// Parser message.
        reason: String,
    },
    /// The staged file and the batch's job list disagree.
    #[error("the staged file has {found} line(s) for {expected} job(s)")]
    LineCount {
        /// Lines found.
        found: usize,
        /// Jobs in the batch.
        expected: usize,
    },
    /// Writing the output failed (for an upload: the remote write).
    #[error("{0}")]
    Sink(io::Error),
}

/// How CSV columns are ordered.
#[derive(Clone, Copy, Debug)]
pub struct ColumnRules<'a> {
    /// Columns that come first, in this order, present even when no record has them.
    pub order: &'a [String],
    /// Sort the other columns by name instead of first-seen order.
    pub sort: bool,
}

/// Renders the staged file at `staged` (which must hold `jobs` lines) as
/// `format` into `out`.
pub fn render<W: Write>(
    format: FileFormat,
    staged: &Path,
    jobs: usize,
    rules: ColumnRules<'_>,
    out: &mut W,
) -> Result<(), RenderError> {
    match format {
        FileFormat::Csv => {
            let columns = csv_columns(staged, jobs, rules)?;
            write_csv(staged, &columns, out)
        }
        FileFormat::Json => write_ndjson(staged, jobs, out),
        FileFormat::JsonArray => write_json_array(staged, jobs, out),
    }
}

/// Reads staged lines into one reused buffer.
struct Lines {
    reader: BufReader<File>,
    buf: Vec<u8>,
    count: usize,
}

impl Lines {
    fn open(path: &Path) -> Result<Lines, RenderError> {
        Ok(Lines {
            reader: BufReader::with_capacity(
                READ_BUF,
                File::open(path).map_err(RenderError::Staged)?,
            ),
            buf: Vec::with_capacity(4096),
            count: 0,
        })
    }

    fn next_line(&mut self) -> Result<Option<&[u8]>, RenderError> {
        self.buf.clear();
        let n = self
            .reader
            .read_until(b'\n', &mut self.buf)
            .map_err(RenderError::Staged)?;
        if n == 0 {
            return Ok(None);
        }
        if self.buf.last() == Some(&b'\n') {
            self.buf.pop();
        }
        self.count += 1;
        Ok(Some(&self.buf))
    }

    /// Walks the next line's JSON object (false at end of file): `key` picks
    /// the cell a field's value renders into, or `None` to skip the value.
    fn next_object<F: FnMut(&str) -> Option<usize>>(
        &mut self,
        key: F,
        cells: &mut [String],
    ) -> Result<bool, RenderError> {
        let Some(line) = self.next_line()? else {
            return Ok(false);
        };
        let mut de = serde_json::Deserializer::from_slice(line);
        ObjectFields { key, cells }
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| RenderError::BadLine {
                line: self.count,
                reason: e.to_string(),
            })?;
        Ok(true)
    }

    fn finish(self, expected: usize) -> Result<(), RenderError> {
        if self.count == expected {
            Ok(())
        } else {
            Err(RenderError::LineCount {
                found: self.count,
                expected,
            })
        }
    }
}

/// Column names in first-seen order with a lookup index.
#[derive(Default)]
struct ColumnSet {
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl ColumnSet {
    fn insert(&mut self, name: &str) {
        if !self.index.contains_key(name) {
            self.index.insert(name.to_string(), self.names.len());
            self.names.push(name.to_string());
        }
    }
}

/// First pass of CSV: the header.
pub fn csv_columns(
    staged: &Path,
    jobs: usize,
    rules: ColumnRules<'_>,
) -> Result<Vec<String>, RenderError> {
    let mut seen = ColumnSet::default();
    let mut lines = Lines::open(staged)?;
    let mut collect = |k: &str| {
        seen.insert(k);
        None
    };
    while lines.next_object(&mut collect, &mut [])? {}
    lines.finish(jobs)?;

    let mut columns: Vec<String> = rules.order.to_vec();
    let mut rest: Vec<String> = seen
        .names
        .into_iter()
        .filter(|n| !rules.order.contains(n))
        .collect();
    if rules.sort {
        rest.sort();
    }
    let action = rest
        .iter()
        .position(|n| n == "action")
        .map(|i| rest.remove(i));
    columns.extend(rest);
    columns.extend(action);
    Ok(columns)
}

/// Second pass of CSV: header and rows.
fn write_csv<W: Write>(staged: &Path, columns: &[String], out: &mut W) -> Result<(), RenderError> {
    let index: HashMap<&str, usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut wtr = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .buffer_capacity(64 * 1024)
        .from_writer(out);
    wtr.write_record(columns).map_err(csv_error)?;
    let mut cells: Vec<String> = vec![String::new(); columns.len()];
    let mut lines = Lines::open(staged)?;
    loop {
        for c in cells.iter_mut() {
            c.clear();
        }
        if !lines.next_object(|k| index.get(k).copied(), &mut cells)? {
            break;
        }
        wtr.write_record(&cells).map_err(csv_error)?;
    }
    wtr.flush().map_err(RenderError::Sink)?;
    Ok(())
}

fn csv_error(e: csv::Error) -> RenderError {
    match e.into_kind() {
        csv::ErrorKind::Io(io) => RenderError::Sink(io),
        other => RenderError::Sink(io::Error::other(format!("CSV encoding failed: {other:?}"))),
    }
}

/// NDJSON: the staged lines are the records already; copied in large blocks.
fn write_ndjson<W: Write>(staged: &Path, jobs: usize, out: &mut W) -> Result<(), RenderError> {
    let mut file = File::open(staged).map_err(RenderError::Staged)?;
    let mut buf = vec![0u8; READ_BUF];
    let mut newlines = 0usize;
    let mut last = b'\n';
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(RenderError::Staged(e)),
        };
        newlines += buf[..n].iter().filter(|&&b| b == b'\n').count();
        last = buf[n - 1];
        out.write_all(&buf[..n]).map_err(RenderError::Sink)?;
    }
    let lines = if last != b'\n' {
        out.write_all(b"\n").map_err(RenderError::Sink)?;
        newlines + 1
    } else {
        newlines
    };
    if lines != jobs {
        return Err(RenderError::LineCount {
            found: lines,
            expected: jobs,
        });
    }
    Ok(())
}

fn write_json_array<W: Write>(staged: &Path, jobs: usize, out: &mut W) -> Result<(), RenderError> {
    let mut lines = Lines::open(staged)?;
    let mut first = true;
    while let Some(line) = lines.next_line()? {
        let sep: &[u8] = if first { b"[\n" } else { b",\n" };
        first = false;
        out.write_all(sep).map_err(RenderError::Sink)?;
        out.write_all(line).map_err(RenderError::Sink)?;
    }
    lines.finish(jobs)?;
    let end: &[u8] = if first { b"[]\n" } else { b"\n]\n" };
    out.write_all(end).map_err(RenderError::Sink)
}

/// Visits an object's fields, rendering the ones `key` selects into `cells`.
struct ObjectFields<'s, F> {
    key: F,
    cells: &'s mut [String],
}

impl<'de, F: FnMut(&str) -> Option<usize>> DeserializeSeed<'de> for ObjectFields<'_, F> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(&str) -> Option<usize>> Visitor<'de> for ObjectFields<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'de>>(mut self, mut map: M) -> Result<(), M::Error> {
        while let Some(col) = map.next_key_seed(FieldName(&mut self.key))? {
            match col {
                Some(i) => {
                    let v: serde_json::Value = map.next_value()?;
                    self.cells[i].push_str(&render_cell(&v));
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// Reads a field name as a borrowed `str` (no allocation) and maps it.
struct FieldName<F>(F);

impl<'de, T, F: FnOnce(&str) -> T> DeserializeSeed<'de> for FieldName<F> {
    type Value = T;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<T, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de, T, F: FnOnce(&str) -> T> Visitor<'de> for FieldName<F> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E>(self, v: &str) -> Result<T, E> {
        Ok((self.0)(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::transform_payload;

    fn staged(payloads: &[&str]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for p in payloads {
            writeln!(f, "{}", transform_payload(p).unwrap()).unwrap();
        }
        f.flush().unwrap();
        f
    }

    fn run(
        format: FileFormat,
        f: &tempfile::NamedTempFile,
        jobs: usize,
        order: &[String],
        sort: bool,
    ) -> String {
        let mut out = Vec::new();
        render(
            format,
            f.path(),
            jobs,
            ColumnRules { order, sort },
            &mut out,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    const PAYLOADS: &[&str] = &[
        r#"{"fields":{"name":"Ann, \"A\"","n":1e6,"ok":true},"action":"insert"}"#,
        r#"{"fields":{"n":2.5,"email":"b@x","tags":["a",1],"nil":null},"action":"update"}"#,
        r#"{"fields":{"name":"line\nbreak"}}"#,
    ];

    #[test]
    fn csv_header_is_the_union_in_first_seen_order_with_action_last() {
        let f = staged(PAYLOADS);
        assert_eq!(
            run(FileFormat::Csv, &f, 3, &[], false),
            "name,n,ok,email,tags,nil,action\n\
             \"Ann, \"\"A\"\"\",1000000,true,,,,insert\n\
             ,2.5,,b@x,\"[\"\"a\"\",1]\",,update\n\
             \"line\nbreak\",,,,,,\n"
        );
    }

    #[test]
    fn csv_from_pre_rendered_cells_is_byte_for_byte_the_csv_of_raw_records() {
        let mut g = tempfile::NamedTempFile::new().unwrap();
        for p in PAYLOADS {
            let line = crate::transform::transform_record(p, FileFormat::Csv).unwrap();
            writeln!(g, "{line}").unwrap();
        }
        g.flush().unwrap();
        let raw = staged(PAYLOADS);
        for sort in [false, true] {
            assert_eq!(
                run(FileFormat::Csv, &g, 3, &[], sort),
                run(FileFormat::Csv, &raw, 3, &[], sort)
            );
        }
    }

    #[test]
    fn csv_sorting_and_configured_order() {
        let f = staged(PAYLOADS);
        assert_eq!(
            run(FileFormat::Csv, &f, 3, &[], true)
                .lines()
                .next()
                .unwrap(),
            "email,n,name,nil,ok,tags,action"
        );
        let order = vec![
            "email".to_string(),
            "missing".to_string(),
            "action".to_string(),
        ];
        assert_eq!(
            run(FileFormat::Csv, &f, 3, &order, false)
                .lines()
                .take(2)
                .collect::<Vec<_>>(),
            vec![
                "email,missing,action,name,n,ok,tags,nil",
                ",,insert,\"Ann, \"\"A\"\"\",1000000,true,,"
            ]
        );
    }

    #[test]
    fn json_formats_write_records_only() {
        let f = staged(PAYLOADS);
        let ndjson = run(FileFormat::Json, &f, 3, &[], false);
        assert_eq!(
            ndjson,
            "{\"name\":\"Ann, \\\"A\\\"\",\"n\":1e6,\"ok\":true,\"action\":\"insert\"}\n\
             {\"n\":2.5,\"email\":\"b@x\",\"tags\":[\"a\",1],\"nil\":null,\"action\":\"update\"}\n\
             {\"name\":\"line\\nbreak\"}\n"
        );
        let array = run(FileFormat::JsonArray, &f, 3, &[], false);
        let parsed: Vec<serde_json::Value> = serde_json::from_str(&array).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1]["action"], "update");
        assert!(
            array.starts_with("[\n{\"name\"") && array.ends_with("}\n]\n"),
            "{array}"
        );
        for v in &parsed {
            assert!(v.get("job_id").is_none() && v.get("metadata").is_none());
        }
    }

    #[test]
    fn empty_batches_and_missing_final_newline() {
        let f = staged(&[]);
        assert_eq!(run(FileFormat::JsonArray, &f, 0, &[], false), "[]\n");
        assert_eq!(run(FileFormat::Json, &f, 0, &[], false), "");
        let mut g = tempfile::NamedTempFile::new().unwrap();
        write!(g, "{{\"a\":1}}\n{{\"a\":2}}").unwrap();
        assert_eq!(
            run(FileFormat::Json, &g, 2, &[], false),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        assert_eq!(run(FileFormat::Csv, &g, 2, &[], false), "a\n1\n2\n");
    }

    #[test]
    fn line_count_mismatches_and_bad_lines_are_errors() {
        let f = staged(PAYLOADS);
        for format in [FileFormat::Csv, FileFormat::Json, FileFormat::JsonArray] {
            let mut out = Vec::new();
            let e = render(
                format,
                f.path(),
                4,
                ColumnRules {
                    order: &[],
                    sort: false,
                },
                &mut out,
            )
            .unwrap_err();
            assert!(
                matches!(
                    e,
                    RenderError::LineCount {
                        found: 3,
                        expected: 4
                    }
                ),
                "{format:?}: {e}"
            );
        }
        let mut g = tempfile::NamedTempFile::new().unwrap();
        write!(g, "{{\"a\":1}}\nnot json\n").unwrap();
        let mut out = Vec::new();
        let e = render(
            FileFormat::Csv,
            g.path(),
            2,
            ColumnRules {
                order: &[],
                sort: false,
            },
            &mut out,
        )
        .unwrap_err();
        assert!(matches!(e, RenderError::BadLine { line: 2, .. }), "{e}");
    }

    #[test]
    fn sink_errors_are_reported_as_such() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let f = staged(PAYLOADS);
        for format in [FileFormat::Csv, FileFormat::Json, FileFormat::JsonArray] {
            let e = render(
                format,
                f.path(),
                3,
                ColumnRules {
                    order: &[],
                    sort: false,
                },
                &mut Full,
            )
            .unwrap_err();
            assert!(
                matches!(e, RenderError::Sink(ref io) if io.to_string() == "disk full"),
                "{format:?}: {e}"
            );
        }
    }
}
