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
//!
//! The story, one file per step:
//! - `row.rs`: a staged line becomes a `Row` (cells encoded once), its
//!   field names interned by `columns.rs`;
//! - `planner.rs`: each row goes into the file being filled, a new file, a
//!   later round, or is decided on its own; a full file is written out;
//! - `row_file.rs`: where rows wait meanwhile, in a compact binary form;
//! - `encoding.rs`: how cells and files are spelled as CSV, and the size
//!   arithmetic the planner decides with.
//!
//! This file holds what the rest of the crate sees ([`plan_import_files`]
//! and its results) and the rounds that drive the planner.

mod columns;
mod encoding;
mod planner;
mod row;
mod row_file;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use batchrouter_core::{ErrorCode, JobError, JobId, Outcome, StagedBatch};
use tempfile::TempPath;

pub use self::encoding::encode_cell;
use self::planner::Planner;
use self::row::{LineParser, Row};
use self::row_file::RowFile;
use crate::config::Settings;

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
