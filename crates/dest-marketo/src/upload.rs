//! From a staged batch to Marketo imports: lay the rows out as CSV files
//! (stable header, RFC 4180, under the size limit, each lookup value at most
//! once per file) on a blocking thread, then POST the files one by one,
//! streamed from disk.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use batchrouter_core::{
    DestinationError, ErrorCode, JobError, JobId, NewImport, Outcome, StagedBatch, UploadOutput,
};
use serde_json::{Map, Value};
use tempfile::TempPath;

use crate::client::Client;
use crate::config::Settings;
use crate::context::{ImportContext, CONTEXT_VERSION};
use crate::transform::normalise_key;

/// Marketo queues at most 10 imports per instance: one upload never needs more files.
pub const MAX_FILES_PER_UPLOAD: usize = 10;

/// One CSV file ready to become one import.
#[derive(Debug)]
pub struct ImportFile {
    /// The file on disk; deleted when dropped.
    pub path: TempPath,
    /// Its size in bytes (header included).
    pub bytes: u64,
    /// Jobs in row order.
    pub job_ids: Vec<JobId>,
    /// Normalised lookup value → job, unique within the file.
    pub keys: BTreeMap<String, JobId>,
}

/// The files of one upload plus the jobs decided while laying them out.
#[derive(Debug, Default)]
pub struct Plan {
    /// The CSV header shared by every file of the upload.
    pub columns: Vec<String>,
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
    /// Writing an import file failed.
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
    let lookup = settings.lookup_field.as_str();

    // Pass 1: which columns exist, which lines are unusable.
    let mapped: Vec<&str> = settings.mapping.iter().map(|m| m.to.as_str()).collect();
    let mut present: HashSet<String> = HashSet::new();
    let mut extras: BTreeSet<String> = BTreeSet::new();
    let mut plan = Plan::default();
    let mut bad: HashSet<JobId> = HashSet::new();
    for item in batch.lines().map_err(staged)? {
        let (id, line) = item.map_err(staged)?;
        match parse_row(&line, lookup) {
            Ok(row) => {
                for k in row.keys() {
                    if mapped.contains(&k.as_str()) {
                        present.insert(k.clone());
                    } else {
                        extras.insert(k.clone());
                    }
                }
            }
            Err(reason) => {
                bad.insert(id);
                plan.decided.push((
                    id,
                    Outcome::Aborted(JobError::new(ErrorCode::TransformFailed, reason)),
                ));
            }
        }
    }
    plan.columns = mapped
        .iter()
        .filter(|c| present.contains(**c))
        .map(|c| c.to_string())
        .chain(extras)
        .collect();

    // Pass 2 (and more when a lookup value repeats): write the files.
    let mut writer =
        FileWriter::new(&dir, &plan.columns, settings.max_file_bytes).map_err(|source| {
            PlanError::Write {
                dir: dir.clone(),
                source,
            }
        })?;
    let write_err = |source| PlanError::Write {
        dir: dir.clone(),
        source,
    };
    let mut input = RoundInput::Staged(batch.lines().map_err(staged)?);
    loop {
        let mut spill: Option<Spill> = None;
        let mut spilled_keys: HashSet<String> = HashSet::new();
        for item in input.by_ref() {
            let (id, line) = item.map_err(staged)?;
            if bad.contains(&id) {
                continue;
            }
            let row = match parse_row(&line, lookup) {
                Ok(r) => r,
                Err(_) => continue,
            };
            let key = normalise_key(row.get(lookup).and_then(Value::as_str).unwrap_or(""));
            // A repeated value waits for a later file; once a value waits, all
            // its later rows wait too, so the last write still lands last.
            if spilled_keys.contains(&key) || writer.current_has(&key) {
                let s = match spill.as_mut() {
                    Some(s) => s,
                    None => spill.insert(Spill::create(&dir).map_err(write_err)?),
                };
                s.push(id, &line).map_err(write_err)?;
                spilled_keys.insert(key);
                continue;
            }
            match writer.add(id, key, &row).map_err(write_err)? {
                Added::Yes => {}
                Added::TooLarge(size) => plan.decided.push((
                    id,
                    Outcome::Aborted(JobError::new(
                        ErrorCode::RecordRejected,
                        format!(
                            "the lead is {size} bytes as a CSV row, more than the {}-byte import file limit",
                            settings.max_file_bytes
                        ),
                    )),
                )),
                Added::NoRoom => plan.decided.push((id, queue_full())),
            }
        }
        match spill {
            None => break,
            Some(s) => {
                // Rows that waited go to a new file after every file so far.
                writer.finish_current().map_err(write_err)?;
                input = RoundInput::Spilled(s.into_reader().map_err(write_err)?);
            }
        }
    }
    writer.finish_current().map_err(write_err)?;
    plan.files = writer.files;
    Ok(plan)
}

fn queue_full() -> Outcome {
    Outcome::Throttled(JobError::new(
        ErrorCode::Throttled,
        format!(
            "this batch needs more than {MAX_FILES_PER_UPLOAD} import files and Marketo queues at most \
             {MAX_FILES_PER_UPLOAD} imports; the job is sent again later"
        ),
    ))
}

/// A staged line back into its row; a line `transform` wrote always parses.
fn parse_row(line: &str, lookup: &str) -> Result<Map<String, Value>, String> {
    let row: Map<String, Value> = serde_json::from_str(line)
        .map_err(|e| format!("staged line is not a mapped lead row: {e}"))?;
    match row.get(lookup).and_then(Value::as_str) {
        Some(v) if !v.trim().is_empty() => Ok(row),
        _ => Err(format!(
            "staged row has no value for the lookup field `{lookup}`"
        )),
    }
}

enum RoundInput {
    Staged(batchrouter_core::manager::StagedLines),
    Spilled(SpillReader),
}

impl Iterator for RoundInput {
    type Item = io::Result<(JobId, String)>;
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            RoundInput::Staged(lines) => lines.next(),
            RoundInput::Spilled(r) => r.next(),
        }
    }
}

/// Rows deferred to a later file: `job_id<TAB>line` per line in a temp file.
struct Spill {
    out: BufWriter<File>,
    path: TempPath,
}

impl Spill {
    fn create(dir: &Path) -> io::Result<Spill> {
        let (file, path) = tempfile::Builder::new()
            .prefix("marketo-spill-")
            .tempfile_in(dir)?
            .into_parts();
        Ok(Spill {
            out: BufWriter::new(file),
            path,
        })
    }

    fn push(&mut self, id: JobId, line: &str) -> io::Result<()> {
        writeln!(self.out, "{id}\t{line}")
    }

    fn into_reader(mut self) -> io::Result<SpillReader> {
        self.out.flush()?;
        let reader = BufReader::new(File::open(&self.path)?);
        Ok(SpillReader {
            reader,
            _path: self.path,
        })
    }
}

struct SpillReader {
    reader: BufReader<File>,
    _path: TempPath,
}

impl Iterator for SpillReader {
    type Item = io::Result<(JobId, String)>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => {
                let line = line.trim_end_matches('\n');
                let parsed = line.split_once('\t').and_then(|(id, rest)| {
                    id.parse::<JobId>().ok().map(|id| (id, rest.to_string()))
                });
                Some(parsed.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "corrupt spill line")
                }))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

enum Added {
    Yes,
    TooLarge(usize),
    NoRoom,
}

/// A `Write` whose bytes the owner takes back after each record.
#[derive(Clone, Default)]
struct SharedBuf(Rc<RefCell<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct OpenFile {
    out: BufWriter<File>,
    path: TempPath,
    bytes: u64,
    job_ids: Vec<JobId>,
    keys: BTreeMap<String, JobId>,
}

/// Writes rows into size-bounded CSV files, starting a new one when full.
struct FileWriter {
    dir: PathBuf,
    columns: Vec<String>,
    header: Vec<u8>,
    max_bytes: u64,
    encoder: csv::Writer<SharedBuf>,
    buf: SharedBuf,
    current: Option<OpenFile>,
    files: Vec<ImportFile>,
    index: HashMap<String, usize>,
}

impl FileWriter {
    fn new(dir: &Path, columns: &[String], max_bytes: u64) -> io::Result<FileWriter> {
        let buf = SharedBuf::default();
        let mut encoder = csv::WriterBuilder::new()
            .terminator(csv::Terminator::CRLF)
            .buffer_capacity(16 * 1024)
            .from_writer(buf.clone());
        encoder.write_record(columns)?;
        encoder.flush()?;
        let header = std::mem::take(&mut *buf.0.borrow_mut());
        Ok(FileWriter {
            dir: dir.to_path_buf(),
            columns: columns.to_vec(),
            header,
            max_bytes,
            encoder,
            buf,
            current: None,
            files: Vec::new(),
            index: columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), i))
                .collect(),
        })
    }

    fn current_has(&self, key: &str) -> bool {
        self.current
            .as_ref()
            .is_some_and(|f| f.keys.contains_key(key))
    }

    fn add(&mut self, id: JobId, key: String, row: &Map<String, Value>) -> io::Result<Added> {
        let mut cells: Vec<&str> = vec![""; self.columns.len()];
        for (k, v) in row {
            if let Some(&i) = self.index.get(k) {
                cells[i] = v.as_str().unwrap_or("");
            }
        }
        self.encoder.write_record(&cells)?;
        self.encoder.flush()?;
        let record = std::mem::take(&mut *self.buf.0.borrow_mut());
        let size = record.len() as u64;
        if self.header.len() as u64 + size > self.max_bytes {
            return Ok(Added::TooLarge(record.len()));
        }
        if self
            .current
            .as_ref()
            .is_some_and(|f| f.bytes + size > self.max_bytes)
        {
            self.finish_current()?;
        }
        if self.current.is_none() {
            if self.files.len() >= MAX_FILES_PER_UPLOAD {
                return Ok(Added::NoRoom);
            }
            let (file, path) = tempfile::Builder::new()
                .prefix("marketo-import-")
                .suffix(".csv")
                .tempfile_in(&self.dir)?
                .into_parts();
            let mut out = BufWriter::with_capacity(256 * 1024, file);
            out.write_all(&self.header)?;
            self.current = Some(OpenFile {
                out,
                path,
                bytes: self.header.len() as u64,
                job_ids: Vec::new(),
                keys: BTreeMap::new(),
            });
        }
        let f = self
            .current
            .as_mut()
            .expect("a current file was just opened");
        f.out.write_all(&record)?;
        f.bytes += size;
        f.job_ids.push(id);
        f.keys.insert(key, id);
        Ok(Added::Yes)
    }

    fn finish_current(&mut self) -> io::Result<()> {
        if let Some(mut f) = self.current.take() {
            f.out.flush()?;
            f.out.get_ref().sync_data()?;
            self.files.push(ImportFile {
                path: f.path,
                bytes: f.bytes,
                job_ids: f.job_ids,
                keys: f.keys,
            });
        }
        Ok(())
    }
}

/// Uploads a staged batch: plans the files off the runtime, then creates one
/// import per file in order. When a POST fails, the imports already created
/// stay importing and every later job gets that failure's outcome.
pub async fn upload_batch(
    client: &Client,
    settings: &Arc<Settings>,
    batch: &StagedBatch,
) -> UploadOutput {
    let started = Instant::now();
    let (b, s) = (batch.clone(), settings.clone());
    let plan = match tokio::task::spawn_blocking(move || plan_import_files(&b, &s)).await {
        Ok(Ok(plan)) => plan,
        Ok(Err(e)) => {
            tracing::error!(destination = %batch.destination_id, batch = %batch.batch_id, error = %e, "cannot prepare Marketo import files");
            return internal_failure(batch, e.to_string());
        }
        Err(e) => {
            tracing::error!(destination = %batch.destination_id, batch = %batch.batch_id, error = %e, "preparing Marketo import files panicked");
            return internal_failure(batch, format!("preparing import files failed: {e}"));
        }
    };
    let mut out = UploadOutput {
        outcomes: plan.decided,
        ..Default::default()
    };
    let parts = plan.files.len() as u32;
    let mut done: Vec<TempPath> = Vec::with_capacity(plan.files.len());
    let mut files = plan.files.into_iter().enumerate();
    let mut failure: Option<DestinationError> = None;
    while let Some((i, file)) = files.next() {
        let result = client.create_import(&file.path, file.bytes).await;
        done.push(file.path);
        match result {
            Ok(created) => {
                tracing::debug!(destination = %batch.destination_id, batch_id = created.batch_id, rows = file.job_ids.len(), bytes = file.bytes, "created a Marketo import");
                let context = ImportContext {
                    version: CONTEXT_VERSION,
                    batch_id: created.batch_id,
                    import_id: created.import_id,
                    lookup_field: settings.lookup_field.clone(),
                    rows: file.job_ids.len() as u64,
                    file_bytes: file.bytes,
                    part: i as u32 + 1,
                    parts,
                    keys: file.keys,
                };
                out.imports.push(NewImport {
                    context: context.to_value(),
                    job_ids: file.job_ids,
                });
            }
            Err(e) => {
                let outcome = Outcome::from_destination_error(&e);
                out.note_retry_after(e.retry_after());
                for id in file.job_ids {
                    out.push(id, outcome.clone());
                }
                for (_, rest) in files.by_ref() {
                    done.push(rest.path);
                    for id in rest.job_ids {
                        out.push(id, outcome.clone());
                    }
                }
                failure = Some(e);
            }
        }
    }
    // Deleting files is blocking I/O: keep it off the runtime's workers.
    let _ = tokio::task::spawn_blocking(move || drop(done)).await;
    let importing: usize = out.imports.iter().map(|i| i.job_ids.len()).sum();
    match &failure {
        None => tracing::info!(
            destination = %batch.destination_id, batch = %batch.batch_id, jobs = batch.job_ids.len(),
            imports = out.imports.len(), importing, decided = out.outcomes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64, "uploaded batch to Marketo"
        ),
        Some(e) => tracing::warn!(
            destination = %batch.destination_id, batch = %batch.batch_id, jobs = batch.job_ids.len(),
            imports = out.imports.len(), importing, decided = out.outcomes.len(), error = %e,
            retry_after_s = e.retry_after().map(|d| d.as_secs()),
            elapsed_ms = started.elapsed().as_millis() as u64, "Marketo upload stopped by an error"
        ),
    }
    out
}

fn internal_failure(batch: &StagedBatch, reason: String) -> UploadOutput {
    let outcome = Outcome::Failed(JobError::new(ErrorCode::Internal, reason));
    UploadOutput {
        outcomes: batch
            .job_ids
            .iter()
            .map(|&id| (id, outcome.clone()))
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use batchrouter_core::Timestamp;
    use serde_json::json;

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
            .from_path(&f.path)
            .unwrap();
        r.records()
            .map(|rec| rec.unwrap().iter().map(String::from).collect())
            .collect()
    }

    #[test]
    fn header_is_mapping_order_then_sorted_extras_and_quoting_is_rfc4180() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            json!({"email": "a@x.io", "firstName": "A", "zeta": "1"}).to_string(),
            json!({"email": "b@x.io", "lastName": "Quote \"me\", please", "alpha": "line\nbreak"})
                .to_string(),
        ];
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({}))).unwrap();
        assert_eq!(
            plan.columns,
            vec!["email", "lastName", "firstName", "alpha", "zeta"]
        );
        assert_eq!(plan.files.len(), 1);
        let raw = std::fs::read_to_string(&plan.files[0].path).unwrap();
        assert!(
            raw.starts_with("email,lastName,firstName,alpha,zeta\r\n"),
            "{raw}"
        );
        assert!(raw.contains("\"Quote \"\"me\"\", please\""), "{raw}");
        assert_eq!(raw.len() as u64, plan.files[0].bytes);
        let rows = read(&plan.files[0]);
        assert_eq!(rows[1], vec!["a@x.io", "", "A", "", "1"]);
        assert_eq!(
            rows[2],
            vec!["b@x.io", "Quote \"me\", please", "", "line\nbreak", ""]
        );
        assert_eq!(plan.files[0].keys.get("b@x.io"), Some(&2));
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
        for f in &plan.files {
            assert_eq!(f.keys.len(), f.job_ids.len(), "keys unique within a file");
        }

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
        for f in &plan.files {
            assert!(f.bytes <= 2000, "{}", f.bytes);
            assert_eq!(std::fs::metadata(&f.path).unwrap().len(), f.bytes);
        }
        let placed: usize = plan.files.iter().map(|f| f.job_ids.len()).sum();
        assert_eq!(placed + plan.decided.len(), 200);
        assert!(plan
            .decided
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Throttled(_))));
    }

    #[test]
    fn oversized_rows_and_unreadable_lines_are_decided_alone() {
        let dir = tempfile::tempdir().unwrap();
        let lines = vec![
            json!({"email": "ok@x.io"}).to_string(),
            json!({"email": "big@x.io", "notes": "n".repeat(3000)}).to_string(),
            "not json".to_string(),
            json!({"firstName": "no key"}).to_string(),
        ];
        let batch = stage(dir.path(), &lines);
        let plan = plan_import_files(&batch, &settings(json!({"maxFileSize": 2000}))).unwrap();
        assert_eq!(plan.files.len(), 1);
        assert_eq!(plan.files[0].job_ids, vec![1]);
        let mut decided = plan.decided.clone();
        decided.sort_by_key(|(id, _)| *id);
        assert_eq!(decided.len(), 3);
        assert!(
            matches!(&decided[0].1, Outcome::Aborted(e) if e.code == ErrorCode::RecordRejected && e.message.contains("import file limit"))
        );
        assert!(
            matches!(&decided[1].1, Outcome::Aborted(e) if e.code == ErrorCode::TransformFailed)
        );
        assert!(
            matches!(&decided[2].1, Outcome::Aborted(e) if e.message.contains("lookup field `email`"))
        );
    }

    #[test]
    fn a_short_staged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut batch = stage(dir.path(), &[json!({"email": "a@b.c"}).to_string()]);
        batch.job_ids.push(99);
        let err = plan_import_files(&batch, &settings(json!({}))).unwrap_err();
        assert!(err.to_string().contains("ended 1 line(s) early"), "{err}");
    }
}
