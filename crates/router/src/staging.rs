//! Staging: transformed lines go to a temp file, one line per job, until the
//! batch is cut. Runs on the blocking pool (transform is CPU work, writes
//! are file I/O); memory holds job ids and retry bookkeeping, never payloads.
//!
//! Files live in a folder per daemon identity,
//! `<stagingDir>/by-owner/<owner>/<destination>/batch-*.staged`, whose
//! `owner.lock` the router holds locked while it runs. The kernel drops
//! that lock when the process dies (`kill -9` included), so at start a
//! router removes what its own identity left and the folders of every
//! identity no running process holds — never a live daemon's files, even
//! when several daemons share one staging directory.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// Folder of `<stagingDir>` holding one folder per daemon identity, so
/// cleanup can tell whose a staged file is.
pub const OWNERS_DIR: &str = "by-owner";
/// Lock file of an identity's folder, held by the running router.
pub const OWNER_LOCK_FILE: &str = "owner.lock";
/// Prefix of a dead identity's folder while it is being removed.
const TRASH_PREFIX: &str = ".removing-";

/// The staging folder of one daemon identity (readable name plus a hash,
/// so distinct identities never share a folder).
pub fn owner_dir(staging_dir: &Path, owner: &str) -> PathBuf {
    let label: String = owner
        .chars()
        .take(48)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    staging_dir
        .join(OWNERS_DIR)
        .join(format!("{label}-{h:016x}"))
}

/// What the start-up cleanup removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleanup {
    /// Staged files removed (this identity's and stopped identities').
    pub files: u64,
    /// Their size in bytes.
    pub bytes: u64,
    /// Folders of identities no running process holds, removed whole.
    pub stopped_owners: u64,
    /// Folders of other identities left alone because a process holds them.
    pub live_owners: u64,
}

/// This router's staging folder, locked for as long as the value lives so
/// no other daemon's start-up cleanup removes a file in it.
#[derive(Debug)]
pub struct OwnerStaging {
    dir: PathBuf,
    _lock: Option<File>,
}

impl OwnerStaging {
    /// Takes `owner`'s folder under `staging_dir` (waiting up to `wait` for
    /// an earlier holder of the same identity to go away), empties it and
    /// removes the folders of identities no running process holds. Blocking.
    pub fn open(
        staging_dir: &Path,
        owner: &str,
        wait: Duration,
    ) -> std::io::Result<(OwnerStaging, Cleanup)> {
        let dir = owner_dir(staging_dir, owner);
        let mut cleanup = Cleanup::default();
        let lock = match lock_own(&dir, wait)? {
            OwnLock::Held(f) => {
                empty_own(&dir, &mut cleanup);
                Some(f)
            }
            OwnLock::Unsupported(e) => {
                // Nobody can tell live from dead here, so only our own
                // folder (one identity = one running daemon) is emptied.
                tracing::warn!(dir = %dir.display(), error = %e, "The staging directory does not support file locks: staged files of stopped daemons with another identity are not removed.");
                empty_own(&dir, &mut cleanup);
                return Ok((OwnerStaging { dir, _lock: None }, cleanup));
            }
            OwnLock::HeldByOther => {
                tracing::warn!(owner, dir = %dir.display(), "Another running process holds this identity's staging folder (two daemons with one identity?): its files are kept.");
                None
            }
        };
        remove_stopped_owners(&staging_dir.join(OWNERS_DIR), &dir, &mut cleanup);
        Ok((OwnerStaging { dir, _lock: lock }, cleanup))
    }

    /// The folder this router stages into (one subfolder per destination).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

enum OwnLock {
    Held(File),
    HeldByOther,
    Unsupported(std::io::Error),
}

/// Whether `path` still names the file `f` has open (a folder being
/// removed by another daemon's cleanup is renamed away first).
fn still_at(f: &File, path: &Path) -> bool {
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn lock_own(dir: &Path, wait: Duration) -> std::io::Result<OwnLock> {
    let started = Instant::now();
    let path = dir.join(OWNER_LOCK_FILE);
    loop {
        std::fs::create_dir_all(dir)?;
        let f = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
        {
            Ok(f) => f,
            // Renamed away by a cleanup between create_dir_all and open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && started.elapsed() < wait => {
                continue
            }
            Err(e) => return Err(e),
        };
        match f.try_lock() {
            Ok(()) if still_at(&f, &path) => return Ok(OwnLock::Held(f)),
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                if started.elapsed() >= wait {
                    return Ok(OwnLock::HeldByOther);
                }
            }
            Err(std::fs::TryLockError::Error(e)) => return Ok(OwnLock::Unsupported(e)),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes everything in our own folder but the lock: files an earlier
/// run of this identity left behind (nothing of ours is in flight yet).
fn empty_own(dir: &Path, cleanup: &mut Cleanup) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name() == OWNER_LOCK_FILE {
            continue;
        }
        remove_counted(&entry.path(), cleanup);
    }
}

/// Removes the folders of identities whose lock nobody holds, and
/// half-removed folders of an interrupted cleanup.
fn remove_stopped_owners(owners: &Path, own: &Path, cleanup: &mut Cleanup) {
    let Ok(entries) = std::fs::read_dir(owners) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path == own || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(TRASH_PREFIX)
        {
            remove_counted(&path, cleanup);
            continue;
        }
        let lock_path = path.join(OWNER_LOCK_FILE);
        // No lock file: a daemon is creating this folder right now.
        let Ok(f) = OpenOptions::new().read(true).write(true).open(&lock_path) else {
            continue;
        };
        match f.try_lock() {
            Ok(()) if still_at(&f, &lock_path) => {}
            Ok(()) => continue,
            Err(std::fs::TryLockError::WouldBlock) => {
                cleanup.live_owners += 1;
                continue;
            }
            Err(std::fs::TryLockError::Error(_)) => continue,
        }
        // Renamed while locked: a restarting holder of this identity then
        // finds the path gone and starts a fresh folder instead.
        let trash = owners.join(format!("{TRASH_PREFIX}{:016x}", fastrand::u64(..)));
        match std::fs::rename(&path, &trash) {
            Ok(()) => {
                drop(f);
                remove_counted(&trash, cleanup);
                cleanup.stopped_owners += 1;
            }
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "Could not remove the staging folder of a stopped daemon.");
            }
        }
    }
}

/// Removes `path` (file or folder), counting the staged files and bytes.
fn remove_counted(path: &Path, cleanup: &mut Cleanup) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if meta.is_dir() {
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                remove_counted(&entry.path(), cleanup);
            }
        }
        if let Err(e) = std::fs::remove_dir(path) {
            tracing::warn!(dir = %path.display(), error = %e, "Could not remove a staging folder.");
        }
    } else {
        match std::fs::remove_file(path) {
            Ok(()) if path.file_name().is_some_and(|n| n != OWNER_LOCK_FILE) => {
                cleanup.files += 1;
                cleanup.bytes += meta.len();
            }
            Ok(()) => {}
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "Could not remove a leftover staged file.");
            }
        }
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
    fn owner_folders_are_safe_names_and_distinct_per_identity() {
        let root = Path::new("/s");
        let a = owner_dir(root, "instance:pod/../0");
        assert_eq!(a.parent(), Some(Path::new("/s/by-owner")));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("instance_pod____0-"), "{name}");
        assert_ne!(owner_dir(root, "a:b"), owner_dir(root, "a_b"));
        assert_eq!(owner_dir(root, "a:b"), owner_dir(root, "a:b"));
    }

    #[test]
    fn each_run_of_an_instance_stages_apart_and_stopped_runs_folders_go() {
        let root = tempfile::tempdir().unwrap();
        let id = "pod-with-a-rather-long-statefulset-name-0123456789";
        let (o1, o2, o3) = (
            crate::instance_owner(id),
            crate::instance_owner(id),
            crate::instance_owner(id),
        );
        let (run1, _) = OwnerStaging::open(root.path(), &o1, Duration::ZERO).unwrap();
        let (run2, _) = OwnerStaging::open(root.path(), &o2, Duration::ZERO).unwrap();
        assert_ne!(run1.dir(), run2.dir(), "the nonce separates the runs");
        let (f1, f2) = (run1.dir().join("b.staged"), run2.dir().join("b.staged"));
        std::fs::write(&f1, b"1").unwrap();
        std::fs::write(&f2, b"22").unwrap();
        // Run 1 is still alive (a zombie) when run 2 stopped and run 3 starts.
        drop(run2);
        let (_run3, removed) = OwnerStaging::open(root.path(), &o3, Duration::ZERO).unwrap();
        assert!(f1.exists(), "a live earlier run's files are kept");
        assert!(!f2.exists(), "a stopped earlier run's folder is removed");
        assert_eq!((removed.stopped_owners, removed.live_owners), (1, 1));
        assert_eq!((removed.files, removed.bytes), (1, 2));
    }

    #[test]
    fn a_held_identity_keeps_its_files_and_interrupted_removals_finish() {
        let root = tempfile::tempdir().unwrap();
        let (first, _) = OwnerStaging::open(root.path(), "x", Duration::ZERO).unwrap();
        std::fs::create_dir_all(first.dir().join("d")).unwrap();
        let file = first.dir().join("d").join("batch-1.staged");
        std::fs::write(&file, b"abc").unwrap();
        let trash = root.path().join(OWNERS_DIR).join(".removing-0001");
        std::fs::create_dir_all(trash.join("d")).unwrap();
        std::fs::write(trash.join("d").join("batch-2.staged"), b"12345").unwrap();
        // A second process claiming the same identity while the first runs.
        let (second, removed) =
            OwnerStaging::open(root.path(), "x", Duration::from_millis(60)).unwrap();
        assert!(file.exists(), "the running holder's file is kept");
        assert!(!trash.exists(), "a half-removed folder is finished off");
        assert_eq!((removed.files, removed.bytes), (1, 5));
        drop((first, second));
        // The holder died: the identity's next start empties its folder.
        let (_third, removed) = OwnerStaging::open(root.path(), "x", Duration::ZERO).unwrap();
        assert!(!file.exists());
        assert_eq!((removed.files, removed.bytes), (1, 3));
    }

    #[test]
    fn batch_ids_are_deterministic() {
        assert_eq!(batch_id(&[1, 2, 3]), batch_id(&[1, 2, 3]));
        assert_ne!(batch_id(&[1, 2, 3]), batch_id(&[1, 2, 4]));
        assert!(batch_id(&[10, 11]).starts_with("10-2-"));
    }
}
