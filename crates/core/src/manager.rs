//! The destination manager contract: transform, upload, poll, get_upload_stats.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;

use async_trait::async_trait;

use crate::error::{DestinationError, TransformError};
use crate::job::{ImportId, Job, JobId, Timestamp};
use crate::outcome::{PollStatus, UploadOutput, UploadStats};

/// A batch staged on local disk, one transformed line per job, ready to upload.
#[derive(Clone, Debug, PartialEq)]
pub struct StagedBatch {
    /// Deterministic id derived from the job ids, so a retry of the same jobs
    /// gets the same id (idempotent file names, request ids).
    pub batch_id: String,
    /// Configured destination id.
    pub destination_id: String,
    /// Destination type name (e.g. `HTTP`).
    pub destination_type: String,
    /// The staged file: line `i` belongs to `job_ids[i]`.
    pub path: PathBuf,
    /// Job ids in line order.
    pub job_ids: Vec<JobId>,
    /// Size of the staged file in bytes, newlines included.
    pub bytes: u64,
    /// Upload attempt number of this batch (1 for the first try).
    pub attempt: u32,
    /// Creation time of the batch's earliest job: the same for every retry
    /// of the same jobs, so date macros in remote paths stay put.
    pub created_at: Timestamp,
}

impl StagedBatch {
    /// Streams the staged lines with their job ids, without loading the file.
    /// Blocking I/O: call it from a blocking thread or for small files only.
    pub fn lines(&self) -> io::Result<StagedLines> {
        Ok(StagedLines {
            reader: BufReader::with_capacity(256 * 1024, File::open(&self.path)?),
            job_ids: self.job_ids.clone(),
            next: 0,
        })
    }
}

/// Iterator over `(job id, line)` of a staged file; see [`StagedBatch::lines`].
pub struct StagedLines {
    reader: BufReader<File>,
    job_ids: Vec<JobId>,
    next: usize,
}

impl Iterator for StagedLines {
    type Item = io::Result<(JobId, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => {
                if self.next < self.job_ids.len() {
                    let missing = self.job_ids.len() - self.next;
                    self.next = self.job_ids.len();
                    return Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("staged file ended {missing} line(s) early"),
                    )));
                }
                None
            }
            Ok(_) => {
                if line.ends_with('\n') {
                    line.pop();
                }
                let Some(&id) = self.job_ids.get(self.next) else {
                    return Some(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "staged file has more lines than jobs",
                    )));
                };
                self.next += 1;
                Some(Ok((id, line)))
            }
            Err(e) => Some(Err(e)),
        }
    }
}

/// One import in flight, as persisted by the router and handed back to `poll`
/// and `get_upload_stats` (possibly by a different process after a restart).
#[derive(Clone, Debug, PartialEq)]
pub struct ImportHandle {
    /// Store id of the import.
    pub id: ImportId,
    /// Configured destination id.
    pub destination_id: String,
    /// The batch that started it.
    pub batch_id: String,
    /// The opaque context the manager returned from `upload`.
    pub context: serde_json::Value,
    /// Jobs still waiting for this import's verdict.
    pub job_ids: Vec<JobId>,
    /// When the import was created.
    pub started_at: Timestamp,
}

/// Limits a destination imposes below the router's own settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ManagerLimits {
    /// Largest staged file the destination accepts in one upload.
    pub max_upload_bytes: Option<u64>,
    /// Most jobs the destination accepts in one upload.
    pub max_events: Option<usize>,
}

/// A destination that may start asynchronous imports. The router persists
/// everything between calls, so implementations keep no per-import state in
/// memory: `poll` and `get_upload_stats` work from the handle alone.
#[async_trait]
pub trait AsyncDestinationManager: Send + Sync + 'static {
    /// Turns one job into one staged line (no newline inside). An error
    /// aborts that job alone with the message as reason.
    fn transform(&self, job: &Job) -> Result<String, TransformError>;

    /// Uploads a staged batch. The output must name every job exactly once:
    /// importing (under an import), succeeded, failed, aborted or throttled.
    async fn upload(&self, batch: &StagedBatch) -> UploadOutput;

    /// Asks how an import is doing. An `Err` is a poll that did not work
    /// (network, 5xx, throttle): the import is kept and polled again later.
    async fn poll(&self, import: &ImportHandle) -> Result<PollStatus, DestinationError>;

    /// Per-job results of a completed import; jobs not named succeeded. An
    /// `Err` means "try again later", never "the import failed".
    async fn get_upload_stats(
        &self,
        import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError>;

    /// Destination limits tighter than the router's settings.
    fn limits(&self) -> ManagerLimits {
        ManagerLimits::default()
    }

    /// Releases connections at shutdown.
    async fn close(&self) {}
}

/// A fire-and-forget destination: transform and upload only; delivery is
/// final when `upload` returns.
#[async_trait]
pub trait Uploader: Send + Sync + 'static {
    /// See [`AsyncDestinationManager::transform`].
    fn transform(&self, job: &Job) -> Result<String, TransformError>;

    /// Delivers the batch; the output must not start imports.
    async fn upload(&self, batch: &StagedBatch) -> UploadOutput;

    /// See [`AsyncDestinationManager::limits`].
    fn limits(&self) -> ManagerLimits {
        ManagerLimits::default()
    }

    /// See [`AsyncDestinationManager::close`].
    async fn close(&self) {}
}

/// Adapts an [`Uploader`] to the full contract: there is never anything to
/// poll, so poll answers complete and stats answer "all succeeded".
pub struct SimpleAsyncDestinationManager<U> {
    inner: U,
}

impl<U: Uploader> SimpleAsyncDestinationManager<U> {
    /// Wraps a fire-and-forget uploader.
    pub fn new(inner: U) -> Self {
        SimpleAsyncDestinationManager { inner }
    }

    /// The wrapped uploader, for tests and diagnostics.
    pub fn inner(&self) -> &U {
        &self.inner
    }
}

#[async_trait]
impl<U: Uploader> AsyncDestinationManager for SimpleAsyncDestinationManager<U> {
    fn transform(&self, job: &Job) -> Result<String, TransformError> {
        self.inner.transform(job)
    }

    async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
        let mut out = self.inner.upload(batch).await;
        // A fire-and-forget uploader has nothing to poll: anything it put
        // under an import is delivered as far as it can know.
        for import in std::mem::take(&mut out.imports) {
            for id in import.job_ids {
                out.push(id, crate::outcome::Outcome::succeeded());
            }
        }
        out
    }

    async fn poll(&self, _import: &ImportHandle) -> Result<PollStatus, DestinationError> {
        Ok(PollStatus::Complete {
            has_failures: false,
        })
    }

    async fn get_upload_stats(
        &self,
        _import: &ImportHandle,
    ) -> Result<UploadStats, DestinationError> {
        Ok(UploadStats::default())
    }

    fn limits(&self) -> ManagerLimits {
        self.inner.limits()
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Outcome;

    struct Echo;

    #[async_trait]
    impl Uploader for Echo {
        fn transform(&self, job: &Job) -> Result<String, TransformError> {
            Ok(job.payload.clone())
        }
        async fn upload(&self, batch: &StagedBatch) -> UploadOutput {
            UploadOutput::all_succeeded(&batch.job_ids)
        }
    }

    #[tokio::test]
    async fn adapter_answers_complete_and_passes_upload_through() {
        let m = SimpleAsyncDestinationManager::new(Echo);
        let batch = StagedBatch {
            batch_id: "b".into(),
            destination_id: "d".into(),
            destination_type: "HTTP".into(),
            path: PathBuf::from("/nonexistent"),
            job_ids: vec![1, 2],
            bytes: 0,
            attempt: 1,
            created_at: Timestamp(0),
        };
        let out = m.upload(&batch).await;
        assert_eq!(out.outcomes.len(), 2);
        assert!(out.outcomes.iter().all(|(_, o)| *o == Outcome::succeeded()));
        let handle = ImportHandle {
            id: 1,
            destination_id: "d".into(),
            batch_id: "b".into(),
            context: serde_json::Value::Null,
            job_ids: vec![1],
            started_at: Timestamp(0),
        };
        assert_eq!(
            m.poll(&handle).await.unwrap(),
            PollStatus::Complete {
                has_failures: false
            }
        );
        assert!(m
            .get_upload_stats(&handle)
            .await
            .unwrap()
            .outcomes
            .is_empty());
    }

    #[test]
    fn staged_lines_pair_ids_and_detect_short_files() {
        let dir = std::env::temp_dir().join(format!("br-core-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.txt");
        std::fs::write(&path, "a\nb\n").unwrap();
        let mut batch = StagedBatch {
            batch_id: "b".into(),
            destination_id: "d".into(),
            destination_type: "HTTP".into(),
            path: path.clone(),
            job_ids: vec![7, 9],
            bytes: 4,
            attempt: 1,
            created_at: Timestamp(0),
        };
        let lines: Vec<_> = batch.lines().unwrap().map(|r| r.unwrap()).collect();
        assert_eq!(lines, vec![(7, "a".to_string()), (9, "b".to_string())]);
        batch.job_ids.push(11);
        let last = batch.lines().unwrap().last().unwrap();
        assert_eq!(last.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
