//! Staging: transformed lines go to a temp file, one line per job, until the
//! batch is cut. Runs on the blocking pool (transform is CPU work, writes
//! are file I/O); memory holds job ids and retry bookkeeping, never payloads.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use batchrouter_core::store::{AttemptInfo, JobTransition, Transition};
use batchrouter_core::{AsyncDestinationManager, ErrorCode, Job, JobError, JobId, Timestamp};
use tempfile::TempPath;

/// A staged line that did not fit the current file; it opens the next one.
pub struct Carry {
    /// Retry bookkeeping of the job.
    pub info: AttemptInfo,
    /// The transformed line.
    pub line: String,
}

/// A staging file being filled.
pub struct StagingFile {
    writer: BufWriter<File>,
    path: TempPath,
    /// Jobs in line order.
    pub jobs: Vec<AttemptInfo>,
    /// Bytes written, newlines included.
    pub bytes: u64,
    /// When the first line was written; `uploadFreq` counts from here.
    pub first_line_at: Option<Timestamp>,
}

/// What staging one chunk of claimed jobs produced.
#[derive(Default)]
pub struct ChunkResult {
    /// Jobs aborted before upload (bad payload, too large).
    pub aborted: Vec<JobTransition>,
    /// Transformed jobs that did not fit; they start the next file.
    pub carry: Vec<Carry>,
}

/// Limits a file is cut at.
#[derive(Clone, Copy, Debug)]
pub struct CutLimits {
    /// Lines per file.
    pub max_events: usize,
    /// Bytes per file.
    pub max_bytes: u64,
}

impl StagingFile {
    /// Creates an empty staging file under `dir` (deleted when dropped).
    pub fn create(dir: &Path) -> std::io::Result<StagingFile> {
        std::fs::create_dir_all(dir)?;
        let (file, path) = tempfile::Builder::new()
            .prefix("batch-")
            .suffix(".staged")
            .tempfile_in(dir)?
            .into_parts();
        Ok(StagingFile {
            writer: BufWriter::with_capacity(256 * 1024, file),
            path,
            jobs: Vec::new(),
            bytes: 0,
            first_line_at: None,
        })
    }

    /// Lines written.
    pub fn count(&self) -> usize {
        self.jobs.len()
    }

    /// Job ids in line order.
    pub fn job_ids(&self) -> Vec<JobId> {
        self.jobs.iter().map(|j| j.job_id).collect()
    }

    /// Whether another line of `len` bytes still fits.
    pub fn fits(&self, len: usize, limits: CutLimits) -> bool {
        self.jobs.is_empty()
            || (self.jobs.len() < limits.max_events && self.bytes + (len as u64) < limits.max_bytes)
    }

    fn write_line(&mut self, info: AttemptInfo, line: &str, now: Timestamp) -> std::io::Result<()> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\n")?;
        self.bytes += line.len() as u64 + 1;
        self.jobs.push(info);
        self.first_line_at.get_or_insert(now);
        Ok(())
    }

    /// Transforms `jobs` (after writing `carry`) into lines until the file is
    /// full; bad payloads and lines larger than a whole file are aborted.
    pub fn stage(
        &mut self,
        manager: &Arc<dyn AsyncDestinationManager>,
        carry: Vec<Carry>,
        jobs: Vec<Job>,
        limits: CutLimits,
        now: Timestamp,
    ) -> std::io::Result<ChunkResult> {
        let mut out = ChunkResult::default();
        let mut full = false;
        for c in carry {
            if full || !self.fits(c.line.len(), limits) {
                full = true;
                out.carry.push(c);
            } else {
                self.write_line(c.info, &c.line, now)?;
            }
        }
        for job in jobs {
            let info = AttemptInfo {
                job_id: job.id,
                attempts: job.attempts,
                retry_base: job.retry_base,
                first_attempt_at: job.first_attempt_at,
                created_at: job.created_at,
            };
            let line = match manager.transform(&job) {
                Ok(line) => line,
                Err(e) => {
                    out.aborted
                        .push(abort(job.id, ErrorCode::TransformFailed, e.to_string()));
                    continue;
                }
            };
            if line.contains('\n') {
                out.aborted.push(abort(
                    job.id,
                    ErrorCode::TransformFailed,
                    "destination produced a line containing a newline (bug in its transform)"
                        .into(),
                ));
                continue;
            }
            if line.len() as u64 + 1 > limits.max_bytes {
                out.aborted.push(abort(
                    job.id,
                    ErrorCode::TransformFailed,
                    format!(
                        "record is {} bytes after transform, more than this destination's upload limit of {} bytes",
                        line.len(),
                        limits.max_bytes
                    ),
                ));
                continue;
            }
            if full || !self.fits(line.len(), limits) {
                full = true;
                out.carry.push(Carry { info, line });
            } else {
                self.write_line(info, &line, now)?;
            }
        }
        Ok(out)
    }

    /// Flushes and hands over the file; the returned path deletes it on drop.
    pub fn finish(mut self) -> std::io::Result<(TempPath, Vec<AttemptInfo>, u64)> {
        self.writer.flush()?;
        Ok((self.path, self.jobs, self.bytes))
    }
}

fn abort(job_id: JobId, code: ErrorCode, message: String) -> JobTransition {
    JobTransition {
        job_id,
        to: Transition::Aborted {
            error: JobError::new(code, message),
        },
    }
}

/// A deterministic batch id for a set of jobs (FNV-1a over the ids), so a
/// retry of the same jobs gets the same id and destinations can overwrite
/// their own earlier partial attempt instead of duplicating it.
pub fn batch_id(job_ids: &[JobId]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for id in job_ids {
        for b in id.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    let first = job_ids.first().copied().unwrap_or(0);
    format!("{first}-{}-{h:016x}", job_ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use batchrouter_core::{
        DestinationError, ImportHandle, PollStatus, StagedBatch, TransformError, UploadOutput,
        UploadStats,
    };

    struct Lines;

    #[async_trait]
    impl AsyncDestinationManager for Lines {
        fn transform(&self, job: &Job) -> Result<String, TransformError> {
            match job.payload.as_str() {
                "bad" => Err(TransformError::new("not a record")),
                "nl" => Ok("a\nb".into()),
                p => Ok(p.to_string()),
            }
        }
        async fn upload(&self, b: &StagedBatch) -> UploadOutput {
            UploadOutput::all_succeeded(&b.job_ids)
        }
        async fn poll(&self, _: &ImportHandle) -> Result<PollStatus, DestinationError> {
            unreachable!()
        }
        async fn get_upload_stats(
            &self,
            _: &ImportHandle,
        ) -> Result<UploadStats, DestinationError> {
            unreachable!()
        }
    }

    fn job(id: i64, payload: &str) -> Job {
        Job {
            id,
            destination_id: "d".into(),
            payload: payload.into(),
            message_id: None,
            attempts: 0,
            retry_base: 0,
            first_attempt_at: None,
            created_at: Timestamp(0),
        }
    }

    #[test]
    fn stages_lines_aborts_bad_ones_and_carries_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let m: Arc<dyn AsyncDestinationManager> = Arc::new(Lines);
        let mut f = StagingFile::create(dir.path()).unwrap();
        let limits = CutLimits {
            max_events: 3,
            max_bytes: 12,
        };
        let big = "x".repeat(20);
        let jobs = vec![
            job(1, "aaa"),
            job(2, "bad"),
            job(3, "nl"),
            job(4, &big),
            job(5, "bbb"),
            job(6, "ccc"),
            job(7, "ddd"),
        ];
        let r = f.stage(&m, vec![], jobs, limits, Timestamp(5)).unwrap();
        assert_eq!(
            f.job_ids(),
            vec![1, 5, 6],
            "12 bytes hold three 4-byte lines"
        );
        assert_eq!(f.bytes, 12);
        assert_eq!(f.first_line_at, Some(Timestamp(5)));
        let aborted: Vec<_> = r.aborted.iter().map(|t| t.job_id).collect();
        assert_eq!(aborted, vec![2, 3, 4]);
        assert_eq!(
            r.carry.iter().map(|c| c.info.job_id).collect::<Vec<_>>(),
            vec![7]
        );
        let (path, jobs, bytes) = f.finish().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "aaa\nbbb\nccc\n");
        assert_eq!((jobs.len(), bytes), (3, 12));
        let p = path.to_path_buf();
        drop(path);
        assert!(!p.exists(), "staged files are deleted when done");
        let mut next = StagingFile::create(dir.path()).unwrap();
        let r = next
            .stage(&m, r.carry, vec![], limits, Timestamp(9))
            .unwrap();
        assert!(r.carry.is_empty());
        assert_eq!(next.job_ids(), vec![7]);
    }

    #[test]
    fn batch_ids_are_deterministic() {
        assert_eq!(batch_id(&[1, 2, 3]), batch_id(&[1, 2, 3]));
        assert_ne!(batch_id(&[1, 2, 3]), batch_id(&[1, 2, 4]));
        assert!(batch_id(&[10, 11]).starts_with("10-2-"));
    }
}
