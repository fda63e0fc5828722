//! The planner: places rows into size-bounded import files, in order.
//!
//! [`Planner::offer`] decides each row's fate: the file being filled, a new
//! file (the current one would grow past `maxFileSize`), the wait file (its
//! lookup value is already in the current file, so it must land in a later
//! one), or an outcome of its own (too large even alone, or all ten files
//! taken). The current file's rows wait in a row file until its columns are
//! final; [`Planner::finish_current`] then writes the CSV, header first, and
//! checks the predicted size against the bytes written.

use std::collections::HashSet;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use batchrouter_core::render::CountingWriter;
use batchrouter_core::{ErrorCode, JobError, JobId, Outcome};

use super::columns::Columns;
use super::encoding::{csv_size, encode_cell};
use super::row::Row;
use super::row_file::RowFile;
use super::{ImportFile, MAX_FILES_PER_UPLOAD};
use crate::config::Settings;

/// Fills size-bounded CSV files in order.
pub(super) struct Planner {
    dir: PathBuf,
    max_bytes: u64,
    pub(super) columns: Columns,
    current: Option<OpenFile>,
    /// `in_file[col] == file_generation` while the column is in the current file.
    in_file: Vec<u32>,
    file_generation: u32,
    pub(super) files: Vec<ImportFile>,
    pub(super) decided: Vec<(JobId, Outcome)>,
    scratch: Row,
}

impl Planner {
    /// An empty plan writing its files into `dir`.
    pub(super) fn new(dir: &Path, settings: &Settings) -> Self {
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
    pub(super) fn offer(
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
        let f = match &mut self.current {
            Some(f) => f,
            None => {
                if self.files.len() >= MAX_FILES_PER_UPLOAD {
                    self.decided.push((row.id, queue_full()));
                    return Ok(());
                }
                self.file_generation += 1;
                self.current.insert(OpenFile {
                    pending: RowFile::create(&self.dir, "marketo-rows-")?,
                    cols: Vec::new(),
                    names_bytes: 0,
                    content_bytes: 0,
                    job_ids: Vec::new(),
                    keys: Vec::new(),
                    key_set: HashSet::new(),
                })
            }
        };
        let generation = self.file_generation;
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
    pub(super) fn finish_current(&mut self) -> io::Result<()> {
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

/// A row that finds all ten files taken: throttled, sent with a later upload.
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
