//! Laying a staged batch out as Marketo import files, on a blocking thread.
//!
//! Each staged line is parsed once: its cells are CSV-encoded right away and
//! the row is kept in a compact binary form in temp files from then on (the
//! pending rows of the file being filled, and the rows waiting for a later
//! file because their lookup value is already in the current one). A file's
//! header holds the columns its own rows use (mapping order, then the other
//! columns sorted by name), so sparse rows do not pay a cell for every column
//! of the whole batch. A file is written out once it is full.
//!
//! Size reasoning: a file of rows that all carry the same fields is never
//! larger, header included, than those rows' staged JSON lines: per field the
//! CSV cell and header cell cost at most the JSON value and key with their
//! quotes, colon and comma. With greedy filling, a file and the row that did
//! not fit into it exceed the file limit together, so ten files of such rows
//! hold more than five file limits of staged JSON: a staged batch of at most
//! `5 × maxFileSize` never needs more than ten files (see `limits()`). Rows
//! whose fields differ cost one extra byte per absent cell, and a lookup value
//! repeated more than ten times needs more than ten files; rows that do not
//! fit into ten files wait for a later upload (throttled), never lost.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use batchrouter_core::{ErrorCode, JobError, JobId, Outcome, StagedBatch};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use tempfile::TempPath;

use crate::config::Settings;
use crate::transform::normalise_key;

/// Marketo queues at most 10 imports per instance: one upload never sends more files.
pub const MAX_FILES_PER_UPLOAD: usize = 10;

/// One CSV file ready to become one import.
#[derive(Debug)]
pub struct ImportFile {
    /// The file on disk; deleted when dropped.
    pub path: TempPath,
    /// Its size in bytes (header included).
    pub bytes: u64,
    /// Its header: the columns its rows use.
    pub columns: Vec<String>,
    /// Jobs in row order.
    pub job_ids: Vec<JobId>,
    /// Normalised lookup value of each row, paired with `job_ids`; unique
    /// within the file.
    pub keys: Vec<String>,
}

/// The files of one upload plus the jobs decided while laying them out.
#[derive(Debug, Default)]
pub struct Plan {
    /// Files in import order: a later duplicate is always in a later file.
    pub files: Vec<ImportFile>,
    /// Jobs that cannot be sent (unreadable line, row over the size limit,
    /// more files than Marketo queues).
    pub decided: Vec<(JobId, Outcome)>,
}

/// Why a plan could not be made at all (staged file unreadable, disk full).
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Reading the staged file failed.
    #[error("cannot read the staged file {path}: {source}")]
    Staged {
        /// The staged file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Writing an import file (or a temp file of rows) failed.
    #[error("cannot write an import file in {dir}: {source}")]
    Write {
        /// Where the file was written.
        dir: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

/// Lays a staged batch out as import files. Blocking: run it on a blocking thread.
pub fn plan_import_files(batch: &StagedBatch, settings: &Settings) -> Result<Plan, PlanError> {
    let staged = |source| PlanError::Staged {
        path: batch.path.clone(),
        source,
    };
    let dir = batch
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let write_err = |source| PlanError::Write {
        dir: dir.clone(),
        source,
    };
    let mut planner = Planner::new(&dir, settings);
    let mut parser = LineParser::new(settings);
    let mut row = Row::default();

    // Round 1: the staged lines, each parsed once.
    let mut spill: Option<RowFile> = None;
    let mut spilled_keys: HashSet<String> = HashSet::new();
    for item in batch.lines().map_err(staged)? {
        let (id, line) = item.map_err(staged)?;
        match parser.parse(id, &line, &mut planner.columns, &mut row) {
            Ok(()) => planner
                .offer(&row, &mut spill, &mut spilled_keys)
                .map_err(write_err)?,
            Err(reason) => planner.decided.push((
                id,
                Outcome::Aborted(JobError::new(ErrorCode::TransformFailed, reason)),
            )),
        }
    }
    // Later rounds: rows whose lookup value was already in the file being
    // filled go to files after every file so far, in their original order.
    while let Some(waiting) = spill.take() {
        planner.finish_current().map_err(write_err)?;
        spilled_keys.clear();
        let mut reader = waiting.into_reader().map_err(write_err)?;
        while reader.next_into(&mut row).map_err(write_err)? {
            planner
                .offer(&row, &mut spill, &mut spilled_keys)
                .map_err(write_err)?;
        }
    }
    planner.finish_current().map_err(write_err)?;
    Ok(Plan {
        files: planner.files,
        decided: planner.decided,
    })
}

fn queue_full() -> Outcome {
    Outcome::Throttled(JobError::new(
        ErrorCode::Throttled,
        format!(
            "not sent: this batch needs more than {MAX_FILES_PER_UPLOAD} import files (rows with \
             differing fields cost a cell per absent field, and a lookup value repeated more than \
             {MAX_FILES_PER_UPLOAD} times needs a file per repeat) and Marketo queues at most \
             {MAX_FILES_PER_UPLOAD} imports; the job is sent with a later upload"
        ),
    ))
}

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
fn csv_size(names_bytes: u64, cols: u64, content_bytes: u64, rows: u64) -> u64 {
    (names_bytes + cols + 1) + content_bytes + rows * (cols + 1)
}

/// Every column seen in the batch, by a small id, with its header order rank.
struct Columns {
    ids: HashMap<String, u32>,
    names: Vec<String>,
    encoded_len: Vec<u64>,
    rank: Vec<usize>,
    mapping: HashMap<String, usize>,
}

impl Columns {
    fn new(settings: &Settings) -> Self {
        Columns {
            ids: HashMap::new(),
            names: Vec::new(),
            encoded_len: Vec::new(),
            rank: Vec::new(),
            mapping: settings
                .mapping
                .iter()
                .enumerate()
                .map(|(i, m)| (m.to.clone(), i))
                .collect(),
        }
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        let id = self.names.len() as u32;
        let mut enc = Vec::new();
        encode_cell(name, &mut enc);
        self.encoded_len.push(enc.len() as u64);
        self.rank
            .push(self.mapping.get(name).copied().unwrap_or(usize::MAX));
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    /// Header order: mapping targets in mapping order, then by name.
    fn order(&self, cols: &mut [u32]) {
        cols.sort_by(|&a, &b| {
            let (a, b) = (a as usize, b as usize);
            self.rank[a]
                .cmp(&self.rank[b])
                .then_with(|| self.names[a].cmp(&self.names[b]))
        });
    }
}

/// One lead row, parsed once: its present cells already CSV-encoded back to
/// back in `data`, each with its column id and end offset.
#[derive(Debug, Default)]
struct Row {
    id: JobId,
    key: String,
    data: Vec<u8>,
    cells: Vec<(u32, u32)>,
}

impl Row {
    fn clear(&mut self, id: JobId) {
        self.id = id;
        self.key.clear();
        self.data.clear();
        self.cells.clear();
    }

    fn content_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// `(column, start, end)` of every present cell.
    fn spans(&self) -> impl Iterator<Item = (u32, usize, usize)> + '_ {
        let mut start = 0usize;
        self.cells.iter().map(move |&(col, end)| {
            let s = start;
            start = end as usize;
            (col, s, end as usize)
        })
    }
}

/// A staged line's fields, borrowed from the line where no escape forces a copy.
struct Fields<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FieldsVisitor;
        impl<'de> Visitor<'de> for FieldsVisitor {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object of text fields")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some((k, v)) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    fields.push((k.0, v.0));
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(FieldsVisitor)
    }
}

/// Turns staged lines into rows.
struct LineParser {
    lookup: String,
    seen: Vec<u32>,
    generation: u32,
}

impl LineParser {
    fn new(settings: &Settings) -> Self {
        LineParser {
            lookup: settings.lookup_field.clone(),
            seen: Vec::new(),
            generation: 0,
        }
    }

    /// Parses one staged line into `row`; a line `transform` wrote always parses.
    fn parse(
        &mut self,
        id: JobId,
        line: &str,
        columns: &mut Columns,
        row: &mut Row,
    ) -> Result<(), String> {
        let fields: Fields = serde_json::from_str(line)
            .map_err(|e| format!("staged line is not a mapped lead row: {e}"))?;
        row.clear(id);
        self.generation = self.generation.wrapping_add(1).max(1);
        let mut key = None;
        for (name, value) in &fields.0 {
            let col = columns.intern(name);
            let slot = col as usize;
            if slot >= self.seen.len() {
                self.seen.resize(slot + 1, 0);
            }
            if self.seen[slot] == self.generation {
                return Err(format!("staged row names the field `{name}` twice"));
            }
            self.seen[slot] = self.generation;
            if *name == self.lookup {
                key = Some(value);
            }
            encode_cell(value, &mut row.data);
            row.cells.push((col, row.data.len() as u32));
        }
        match key {
            Some(v) if !v.trim().is_empty() => {
                row.key.push_str(&normalise_key(v));
                Ok(())
            }
            _ => Err(format!(
                "staged row has no value for the lookup field `{}`",
                self.lookup
            )),
        }
    }
}

/// The file being filled: its rows wait in a temp file until its columns
/// are final, then the CSV is written.
struct OpenFile {
    pending: RowFile,
    cols: Vec<u32>,
    names_bytes: u64,
    content_bytes: u64,
    job_ids: Vec<JobId>,
    keys: Vec<String>,
    key_set: HashSet<String>,
}

impl OpenFile {
    fn size(&self) -> u64 {
        csv_size(
            self.names_bytes,
            self.cols.len() as u64,
            self.content_bytes,
            self.job_ids.len() as u64,
        )
    }
}

/// Fills size-bounded CSV files in order.
struct Planner {
    dir: PathBuf,
    max_bytes: u64,
    columns: Columns,
    current: Option<OpenFile>,
    /// `in_file[col] == file_generation` while the column is in the current file.
    in_file: Vec<u32>,
    file_generation: u32,
    files: Vec<ImportFile>,
    decided: Vec<(JobId, Outcome)>,
    scratch: Row,
}

impl Planner {
    fn new(dir: &Path, settings: &Settings) -> Self {
        Planner {
            dir: dir.to_path_buf(),
            max_bytes: settings.max_file_bytes,
            columns: Columns::new(settings),
            current: None,
            in_file: Vec::new(),
            file_generation: 0,
            files: Vec::new(),
            decided: Vec::new(),
            scratch: Row::default(),
        }
    }

    fn in_current(&self, col: u32) -> bool {
        self.current.is_some() && self.in_file.get(col as usize) == Some(&self.file_generation)
    }

    /// Places `row` into the current file, a new one, a later round (a
    /// repeated lookup value), or decides it (too large, no file left).
    fn offer(
        &mut self,
        row: &Row,
        spill: &mut Option<RowFile>,
        spilled_keys: &mut HashSet<String>,
    ) -> io::Result<()> {
        // Once a value waits, all its later rows wait too, so the last
        // write still lands last.
        let repeated = self
            .current
            .as_ref()
            .is_some_and(|f| f.key_set.contains(&row.key));
        if repeated || spilled_keys.contains(&row.key) {
            let s = match spill {
                Some(s) => s,
                None => spill.insert(RowFile::create(&self.dir, "marketo-wait-")?),
            };
            s.push(row)?;
            if !spilled_keys.contains(&row.key) {
                spilled_keys.insert(row.key.clone());
            }
            return Ok(());
        }
        let own_names: u64 = row
            .cells
            .iter()
            .map(|&(c, _)| self.columns.encoded_len[c as usize])
            .sum();
        let alone = csv_size(own_names, row.cells.len() as u64, row.content_bytes(), 1);
        if alone > self.max_bytes {
            self.decided.push((
                row.id,
                Outcome::Aborted(JobError::new(
                    ErrorCode::RecordRejected,
                    format!(
                        "the lead is {alone} bytes as a CSV file of its own (header and row), more \
                         than the {}-byte import file limit",
                        self.max_bytes
                    ),
                )),
            ));
            return Ok(());
        }
        if let Some(f) = &self.current {
            let (mut new_names, mut new_cols) = (0u64, 0u64);
            for &(c, _) in &row.cells {
                if !self.in_current(c) {
                    new_names += self.columns.encoded_len[c as usize];
                    new_cols += 1;
                }
            }
            let grown = csv_size(
                f.names_bytes + new_names,
                f.cols.len() as u64 + new_cols,
                f.content_bytes + row.content_bytes(),
                f.job_ids.len() as u64 + 1,
            );
            if grown > self.max_bytes {
                self.finish_current()?;
            }
        }
        if self.current.is_none() {
            if self.files.len() >= MAX_FILES_PER_UPLOAD {
                self.decided.push((row.id, queue_full()));
                return Ok(());
            }
            self.file_generation += 1;
            self.current = Some(OpenFile {
                pending: RowFile::create(&self.dir, "marketo-rows-")?,
                cols: Vec::new(),
                names_bytes: 0,
                content_bytes: 0,
                job_ids: Vec::new(),
                keys: Vec::new(),
                key_set: HashSet::new(),
            });
        }
        let generation = self.file_generation;
        let f = self.current.as_mut().expect("a current file exists");
        for &(c, _) in &row.cells {
            let slot = c as usize;
            if slot >= self.in_file.len() {
                self.in_file.resize(slot + 1, 0);
            }
            if self.in_file[slot] != generation {
                self.in_file[slot] = generation;
                f.cols.push(c);
                f.names_bytes += self.columns.encoded_len[slot];
            }
        }
        f.pending.push(row)?;
        f.content_bytes += row.content_bytes();
        f.job_ids.push(row.id);
        f.keys.push(row.key.clone());
        f.key_set.insert(row.key.clone());
        Ok(())
    }

    /// Writes the current file's CSV (header of its own columns, then its rows).
    fn finish_current(&mut self) -> io::Result<()> {
        let Some(mut f) = self.current.take() else {
            return Ok(());
        };
        let expected = f.size();
        let mut order = std::mem::take(&mut f.cols);
        self.columns.order(&mut order);
        let mut position = vec![u32::MAX; self.columns.names.len()];
        for (i, &c) in order.iter().enumerate() {
            position[c as usize] = i as u32;
        }
        let (file, path) = tempfile::Builder::new()
            .prefix("marketo-import-")
            .suffix(".csv")
            .tempfile_in(&self.dir)?
            .into_parts();
        let mut out = CountingWriter {
            inner: BufWriter::with_capacity(256 * 1024, file),
            bytes: 0,
        };
        let mut cell = Vec::new();
        for (i, &c) in order.iter().enumerate() {
            if i > 0 {
                out.write_all(b",")?;
            }
            cell.clear();
            encode_cell(&self.columns.names[c as usize], &mut cell);
            out.write_all(&cell)?;
        }
        out.write_all(b"\r\n")?;
        let mut slots: Vec<(usize, usize)> = vec![(0, 0); order.len()];
        let mut reader = f.pending.into_reader()?;
        let row = &mut self.scratch;
        while reader.next_into(row)? {
            slots.fill((0, 0));
            for (col, start, end) in row.spans() {
                slots[position[col as usize] as usize] = (start, end);
            }
            for (i, &(start, end)) in slots.iter().enumerate() {
                if i > 0 {
                    out.write_all(b",")?;
                }
                out.write_all(&row.data[start..end])?;
            }
            out.write_all(b"\r\n")?;
        }
        let bytes = out.bytes;
        let file = out.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()?;
        debug_assert_eq!(bytes, expected, "import file size estimate");
        if bytes > self.max_bytes {
            return Err(io::Error::other(format!(
                "an import file came out at {bytes} bytes, over the {}-byte limit",
                self.max_bytes
            )));
        }
        self.files.push(ImportFile {
            path,
            bytes,
            columns: order
                .iter()
                .map(|&c| self.columns.names[c as usize].clone())
                .collect(),
            job_ids: f.job_ids,
            keys: f.keys,
        });
        Ok(())
    }
}

struct CountingWriter<W> {
    inner: W,
    bytes: u64,
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

/// Rows in a compact binary form in a temp file (deleted when dropped):
/// per row `id: i64, key length: u32, cells: u32, data length: u32`, the
/// key, `(column: u32, end: u32)` per cell, then the encoded cells.
struct RowFile {
    out: BufWriter<File>,
    path: TempPath,
}

impl RowFile {
    fn create(dir: &Path, prefix: &str) -> io::Result<RowFile> {
        let (file, path) = tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in(dir)?
            .into_parts();
        Ok(RowFile {
            out: BufWriter::with_capacity(64 * 1024, file),
            path,
        })
    }

    fn push(&mut self, row: &Row) -> io::Result<()> {
        let w = &mut self.out;
        w.write_all(&row.id.to_le_bytes())?;
        w.write_all(&(row.key.len() as u32).to_le_bytes())?;
        w.write_all(&(row.cells.len() as u32).to_le_bytes())?;
        w.write_all(&(row.data.len() as u32).to_le_bytes())?;
        w.write_all(row.key.as_bytes())?;
        for &(col, end) in &row.cells {
            w.write_all(&col.to_le_bytes())?;
            w.write_all(&end.to_le_bytes())?;
        }
        w.write_all(&row.data)
    }

    fn into_reader(mut self) -> io::Result<RowReader> {
        self.out.flush()?;
        Ok(RowReader {
            reader: BufReader::with_capacity(64 * 1024, File::open(&self.path)?),
            _path: self.path,
        })
    }
}

struct RowReader {
    reader: BufReader<File>,
    _path: TempPath,
}

impl RowReader {
    /// Reads the next row into `row`; false at the end.
    fn next_into(&mut self, row: &mut Row) -> io::Result<bool> {
        if self.reader.fill_buf()?.is_empty() {
            return Ok(false);
        }
        let mut head = [0u8; 20];
        self.reader.read_exact(&mut head)?;
        let u32_at = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().expect("4 bytes"));
        let id = JobId::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let (key_len, cells, data_len) = (u32_at(8), u32_at(12), u32_at(16));
        row.clear(id);
        let mut key = vec![0u8; key_len as usize];
        self.reader.read_exact(&mut key)?;
        row.key = String::from_utf8(key)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "corrupt row file"))?;
        let mut pair = [0u8; 8];
        for _ in 0..cells {
            self.reader.read_exact(&mut pair)?;
            row.cells.push((
                u32::from_le_bytes(pair[..4].try_into().expect("4 bytes")),
                u32::from_le_bytes(pair[4..].try_into().expect("4 bytes")),
            ));
        }
        row.data.resize(data_len as usize, 0);
        self.reader.read_exact(&mut row.data)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchrouter_core::Timestamp;
    use serde_json::{json, Value};

    fn settings(extra: Value) -> Settings {
        let mut c = json!({
            "munchkinId": "1-A", "clientId": "c", "clientSecret": "s",
            "columnFieldsMapping": [{"from": "email", "to": "email"}, {"from": "last", "to": "lastName"}, {"from": "first", "to": "firstName"}],
            "passUnmappedFields": true,
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        Settings::from_config(&c).unwrap()
    }

    fn stage(dir: &Path, lines: &[String]) -> StagedBatch {
        let path = dir.join("staged.jsonl");
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(&path, &text).unwrap();
        StagedBatch {
            batch_id: "b".into(),
            destination_id: "m".into(),
            destination_type: "MARKETO_BULK_UPLOAD".into(),
            path,
            job_ids: (1..=lines.len() as i64).collect(),
            bytes: text.len() as u64,
            attempt: 1,
            created_at: Timestamp(0),
        }
    }

    fn read(f: &ImportFile) -> Vec<Vec<String>> {
        let mut r = csv::ReaderBuilder::new()
            .has_headers(false)
            .flexible(false)
            .from_path(&f.path)
            .unwrap();
        r.records()
            .map(|rec| rec.unwrap().iter().map(String::from).collect())
            .collect()
    }

    fn check_sizes(plan: &Plan, max: u64) {
        for f in &plan.files {
            assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.bytes);
            assert!(f.bytes <= max, "{} > {max}", f.bytes);
            assert_eq!(f.keys.len(), f.job_ids.len());
            let unique: HashSet<&String> = f.keys.iter().collect();
            assert_eq!(unique.len(), f.keys.len(), "keys unique within a file");
        }
    }

    #[test]
    fn header_is_mapping_order_then_sorted_extras_and_quoting_is_rfc4180() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            json!({"email": "a@x.io", "firstName": "A", "zeta": "1"}).to_string(),
            json!({"email": "B@x.io", "lastName": "Quote \"me\", please", "alpha": "line\nbreak", "we,ird": "\r"})
                .to_string(),
        ];
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
        assert_eq!(plan.files.len(), 1);
        let f = &plan.files[0];
        assert_eq!(
            f.columns,
            vec!["email", "lastName", "firstName", "alpha", "we,ird", "zeta"]
        );
        let raw = std::fs::read_to_string(&f.path).unwrap();
        assert!(
            raw.starts_with("email,lastName,firstName,alpha,\"we,ird\",zeta\r\n"),
            "{raw}"
        );
        assert!(raw.contains("\"Quote \"\"me\"\", please\""), "{raw}");
        assert_eq!(raw.len() as u64, f.bytes);
        let rows = read(f);
        assert_eq!(rows[1], vec!["a@x.io", "", "A", "", "", "1"]);
        assert_eq!(
            rows[2],
            vec![
                "B@x.io",
                "Quote \"me\", please",
                "",
                "line\nbreak",
                "\r",
                ""
            ]
        );
        assert_eq!(f.job_ids, vec![1, 2]);
        assert_eq!(f.keys, vec!["a@x.io", "b@x.io"]);
    }

    #[test]
    fn the_csv_matches_what_the_csv_crate_writes() {
        let dir = tempfile::tempdir().unwrap();
        let values = [
            "plain", "", " spaced ", "a,b", "q\"q", "\"", "x\r\ny", "ünï", "#hash", "'",
        ];
        let lines: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| json!({"email": format!("k{i}@x.io"), "v": v}).to_string())
            .collect();
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
        let mut w = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .from_writer(Vec::new());
        w.write_record(["email", "v"]).unwrap();
        for (i, v) in values.iter().enumerate() {
            w.write_record([format!("k{i}@x.io").as_str(), v]).unwrap();
        }
        let expected = w.into_inner().unwrap();
        assert_eq!(std::fs::read(&plan.files[0].path).unwrap(), expected);
    }

    #[test]
    fn duplicates_move_to_later_files_in_order_and_size_splits() {
        let dir = tempfile::tempdir().unwrap();
        // Job 1, 3, 5 share a key (differently cased); job 3 must land after 1, and 5 after 3.
        let lines: Vec<String> = [
            "Dup@x.io",
            "u1@x.io",
            " dup@x.io",
            "u2@x.io",
            "DUP@X.IO",
            "u3@x.io",
        ]
        .iter()
        .map(|e| json!({"email": e}).to_string())
        .collect();
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
        assert!(plan.decided.is_empty());
        let ids: Vec<Vec<JobId>> = plan.files.iter().map(|f| f.job_ids.clone()).collect();
        assert_eq!(ids, vec![vec![1, 2, 4, 6], vec![3], vec![5]]);
        check_sizes(&plan, 9_500_000);

        // A tiny limit splits by size and keeps every file under it.
        let many: Vec<String> = (0..200)
            .map(|i| {
                json!({"email": format!("user{i}@example.com"), "firstName": "x".repeat(100)})
                    .to_string()
            })
            .collect();
        let batch = stage(dir.path(), &many);
        let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": 2000}))).unwrap();
        assert_eq!(plan.files.len(), MAX_FILES_PER_UPLOAD);
        check_sizes(&plan, 2000);
        let placed: usize = plan.files.iter().map(|f| f.job_ids.len()).sum();
        assert_eq!(placed + plan.decided.len(), 200);
        assert!(plan
            .decided
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Throttled(e) if e.message.starts_with("not sent"))));
        // Files are filled: each one plus the next file's first row is over the limit.
        for pair in plan.files.windows(2) {
            assert!(pair[0].bytes + 140 > 2000, "{}", pair[0].bytes);
        }
    }

    #[test]
    fn oversized_rows_and_unreadable_lines_are_decided_alone() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            json!({"email": "ok@x.io"}).to_string(),
            json!({"email": "big@x.io", "notes": "n".repeat(3000)}).to_string(),
            "not json".to_string(),
            json!({"firstName": "no key"}).to_string(),
            json!({"email": "n@x.io", "score": 5}).to_string(),
            r#"{"email": "t@x.io", "email": "u@x.io"}"#.to_string(),
        ];
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": 2000}))).unwrap();
        assert_eq!(plan.files.len(), 1);
        assert_eq!(plan.files[0].job_ids, vec![1]);
        let mut decided = plan.decided.clone();
        decided.sort_by_key(|(id, _)| *id);
        let reasons: Vec<(JobId, ErrorCode, String)> = decided
            .into_iter()
            .map(|(id, o)| match o {
                Outcome::Aborted(e) => (id, e.code, e.message),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reasons.len(), 5, "{reasons:?}");
        assert_eq!(reasons[0].1, ErrorCode::RecordRejected);
        assert!(reasons[0].2.contains("import file limit"), "{reasons:?}");
        assert_eq!(reasons[1].1, ErrorCode::TransformFailed);
        assert!(reasons[2].2.contains("lookup field `email`"), "{reasons:?}");
        assert!(
            reasons[3].2.contains("not a mapped lead row"),
            "{reasons:?}"
        );
        assert!(reasons[4].2.contains("`email` twice"), "{reasons:?}");
    }

    #[test]
    fn a_short_staged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut batch = stage(dir.path(), &[json!({"email": "a@b.c"}).to_string()]);
        batch.job_ids.push(99);
        let err = plan_import_files(&batch, &settings(json!({}))).unwrap_err();
        assert!(err.to_string().contains("ended 1 line(s) early"), "{err}");
    }

    /// The bound `limits()` relies on: rows that carry the same fields fit
    /// into ten files whenever their staged JSON is at most five file limits,
    /// whatever their sizes (up to the file limit) and their escaping.
    #[test]
    fn same_field_batches_up_to_five_file_limits_fit_in_ten_files() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4_000u64;
        for seed in 0..40u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut lines = Vec::new();
            let mut bytes = 0u64;
            let mut i = 0;
            loop {
                let len = match rng.u8(..4) {
                    0 => rng.usize(1..30),
                    1 => rng.usize(30..400),
                    2 => rng.usize(400..2_000),
                    _ => rng.usize(2_000..3_900),
                };
                let filler: String = (0..len)
                    .map(|_| ['a', ',', '"', '\n', 'é', ' '][rng.usize(..6)])
                    .collect();
                let line = json!({"email": format!("p{i}@x.io"), "notes": filler}).to_string();
                if bytes + line.len() as u64 + 1 > 5 * max {
                    break;
                }
                bytes += line.len() as u64 + 1;
                lines.push(line);
                i += 1;
            }
            let batch = stage(dir.path(), &lines);
            assert!(batch.bytes <= 5 * max);
            let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": max}))).unwrap();
            check_sizes(&plan, max);
            let throttled = plan
                .decided
                .iter()
                .filter(|(_, o)| matches!(o, Outcome::Throttled(_)))
                .count();
            assert_eq!(throttled, 0, "seed {seed}: {} files", plan.files.len());
            assert!(plan.files.len() <= MAX_FILES_PER_UPLOAD);
        }
    }

    /// Rows with differing fields: each file's header holds only its own
    /// columns, so a batch whose rows each carry an extra field of their own
    /// costs far less than with one header for the whole batch.
    #[test]
    fn sparse_rows_pay_only_for_the_columns_of_their_own_file() {
        let dir = tempfile::tempdir().unwrap();
        let max = 9_000u64;
        let lines: Vec<String> = (0..300)
            .map(|i| json!({"email": format!("s{i}@x.io"), format!("field{i}"): "v"}).to_string())
            .collect();
        let batch = stage(dir.path(), &lines);
        assert!(batch.bytes < 5 * max, "{} staged bytes", batch.bytes);
        // One header for all 301 columns would be ~2.7 KB and every row
        // ~310 bytes: over 90 KB, far more than ten 9 KB files.
        let one_header_bytes: u64 = 300 * (12 + 300 + 2) + 2_700;
        assert!(one_header_bytes > 10 * max);
        let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": max}))).unwrap();
        check_sizes(&plan, max);
        assert!(plan.decided.is_empty(), "{:?}", plan.decided.first());
        assert!(plan.files.len() <= MAX_FILES_PER_UPLOAD);
        for f in &plan.files {
            assert_eq!(f.columns.len(), f.job_ids.len() + 1, "email + one per row");
            let rows = read(f);
            assert_eq!(rows[0], f.columns);
            assert_eq!(rows.len(), f.job_ids.len() + 1);
        }
        let placed: Vec<JobId> = plan
            .files
            .iter()
            .flat_map(|f| f.job_ids.iter().copied())
            .collect();
        assert_eq!(placed, (1..=300).collect::<Vec<_>>());
    }

    /// Rows so sparse that even per-file headers need more than ten files:
    /// the rest waits for a later upload with a reason that says why.
    #[test]
    fn rows_beyond_ten_files_wait_for_a_later_upload() {
        let dir = tempfile::tempdir().unwrap();
        let max = 2_000u64;
        let lines: Vec<String> = (0..400)
            .map(|i| json!({"email": format!("s{i}@x.io"), format!("field{i}"): "v"}).to_string())
            .collect();
        let batch = stage(dir.path(), &lines);
        // Under the 10 × maxFileSize this destination used to report.
        assert!(batch.bytes <= 10 * max, "{}", batch.bytes);
        let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": max}))).unwrap();
        check_sizes(&plan, max);
        assert_eq!(plan.files.len(), MAX_FILES_PER_UPLOAD);
        let placed: usize = plan.files.iter().map(|f| f.job_ids.len()).sum();
        assert!(placed > 0 && placed < 400);
        assert_eq!(placed + plan.decided.len(), 400, "no job lost");
        for (_, o) in &plan.decided {
            match o {
                Outcome::Throttled(e) => {
                    assert_eq!(e.code, ErrorCode::Throttled);
                    assert!(e.message.contains("cost a cell per absent field"), "{e:?}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn waiting_rows_keep_their_order_across_many_rounds() {
        let dir = tempfile::tempdir().unwrap();
        // Four values, each repeated five times with other leads between them.
        let lines: Vec<String> = (0..40)
            .map(|i| {
                let email = if i % 2 == 0 {
                    format!("k{}@x.io", (i / 2) % 4)
                } else {
                    format!("solo{i}@x.io")
                };
                json!({"email": email, "n": i.to_string()}).to_string()
            })
            .collect();
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
        assert_eq!(plan.files.len(), 5);
        check_sizes(&plan, 9_500_000);
        let mut last_file: HashMap<String, usize> = HashMap::new();
        let mut last_n: HashMap<String, i64> = HashMap::new();
        for (i, f) in plan.files.iter().enumerate() {
            for (row, key) in read(f).iter().skip(1).zip(&f.keys) {
                assert_eq!(row[0].to_lowercase(), *key);
                let n: i64 = row[1].parse().unwrap();
                if let Some(prev) = last_file.insert(key.clone(), i) {
                    assert!(prev < i, "{key} twice in a file or out of order");
                    assert!(last_n[key] < n, "{key} out of order");
                }
                last_n.insert(key.clone(), n);
            }
        }
    }
}
