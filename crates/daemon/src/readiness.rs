//! What `/readyz` means: the store accepts a write and the staging directory
//! can take a new file, answered within a second. Probes run in a task of
//! their own and their result is kept briefly, so a burst of readiness
//! checks costs one probe and a hung store (PostgreSQL down, a writer stuck
//! on a full disk) answers "not ready" at once instead of after its timeout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batchrouter_core::JobStore;
use futures::future::{BoxFuture, FutureExt, Shared};

/// How long a probe result answers `/readyz` before a new probe runs.
pub const FRESH_FOR: Duration = Duration::from_secs(1);
/// Longest a readiness check waits for a running probe before answering
/// "not ready" (the probe keeps running and its result is kept).
pub const ANSWER_WITHIN: Duration = Duration::from_millis(900);
/// Bytes the staging probe writes: a file system that cannot take one block
/// cannot take a batch either.
const STAGING_PROBE_BYTES: usize = 4096;

/// Short reasons `/readyz` gives: it is open to anyone, so paths and raw
/// store errors stay in the log.
const STORE_REFUSES: &str = "the store refuses writes";
const STAGING_REFUSES: &str = "the staging directory cannot take a file";

/// Why a probe failed: a generic reason for the open endpoint and the
/// detail (paths, driver errors) for the log only.
#[derive(Clone, Debug, PartialEq)]
struct Unready {
    reason: String,
    detail: String,
}

type Probe = Shared<BoxFuture<'static, Result<(), Unready>>>;

/// Cached write probes of the store and the staging directory.
#[derive(Clone)]
pub struct Readiness {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn JobStore>,
    staging_dir: PathBuf,
    fresh_for: Duration,
    answer_within: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    last: Option<(Instant, Result<(), Unready>)>,
    running: Option<Probe>,
}

impl Readiness {
    /// Probes `store` and `staging_dir` on demand with the default timings.
    pub fn new(store: Arc<dyn JobStore>, staging_dir: PathBuf) -> Self {
        Self::with_timings(store, staging_dir, FRESH_FOR, ANSWER_WITHIN)
    }

    /// Same, with explicit cache lifetime and answer deadline.
    pub fn with_timings(
        store: Arc<dyn JobStore>,
        staging_dir: PathBuf,
        fresh_for: Duration,
        answer_within: Duration,
    ) -> Self {
        Readiness {
            inner: Arc::new(Inner {
                store,
                staging_dir,
                fresh_for,
                answer_within,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// `Ok` when the store took a write and staging took a file recently;
    /// otherwise why not. Never waits longer than the answer deadline.
    pub async fn check(&self) -> Result<(), String> {
        let probe = {
            let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, result)) = &st.last {
                if at.elapsed() < self.inner.fresh_for {
                    return result.clone().map_err(|u| u.reason);
                }
            }
            match &st.running {
                Some(p) => p.clone(),
                None => {
                    let p = self.spawn_probe();
                    st.running = Some(p.clone());
                    p
                }
            }
        };
        match tokio::time::timeout(self.inner.answer_within, probe).await {
            Ok(result) => result.map_err(|u| u.reason),
            Err(_) => Err(format!(
                "the store or the staging directory did not accept a test write within {:?}",
                self.inner.answer_within
            )),
        }
    }

    /// Starts one probe in its own task (it finishes even when nobody
    /// waits) that records its result; called with the state locked, so the
    /// task cannot clear `running` before it is set.
    fn spawn_probe(&self) -> Probe {
        let inner = self.inner.clone();
        let task = tokio::spawn(async move {
            let result = probe(&inner).await;
            let mut st = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            // The detail goes to the log once per change, not per probe.
            if let Err(u) = &result {
                let same = matches!(&st.last, Some((_, Err(prev))) if prev == u);
                if !same {
                    tracing::warn!(detail = %u.detail, "Not ready: {}.", u.reason);
                }
            }
            st.last = Some((Instant::now(), result.clone()));
            st.running = None;
            result
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Unready {
                    reason: "the readiness probe failed".into(),
                    detail: e.to_string(),
                })
            })
        }
        .boxed()
        .shared()
    }
}

async fn probe(inner: &Inner) -> Result<(), Unready> {
    let dir = inner.staging_dir.clone();
    let staging = tokio::task::spawn_blocking(move || probe_staging(&dir));
    let store = inner.store.probe_write().await;
    let staging = staging
        .await
        .unwrap_or_else(|e| Err(format!("staging probe failed: {e}")));
    let mut reasons = Vec::new();
    let mut details = Vec::new();
    if let Err(e) = store {
        reasons.push(STORE_REFUSES);
        details.push(format!("{STORE_REFUSES}: {e}"));
    }
    if let Err(e) = staging {
        reasons.push(STAGING_REFUSES);
        details.push(e);
    }
    if reasons.is_empty() {
        Ok(())
    } else {
        Err(Unready {
            reason: reasons.join("; "),
            detail: details.join("; "),
        })
    }
}

/// Creates, fills and deletes one small file where batches are staged.
fn probe_staging(dir: &std::path::Path) -> Result<(), String> {
    let fail = |e: std::io::Error| {
        format!(
            "the staging directory {} cannot take a file: {e}",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut file = tempfile::Builder::new()
        .prefix("readyz-")
        .suffix(".probe")
        .tempfile_in(dir)
        .map_err(fail)?;
    file.write_all(&[b'\n'; STAGING_PROBE_BYTES])
        .and_then(|_| file.flush())
        .map_err(fail)?;
    file.close().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_probe_needs_a_writable_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe_staging(&dir.path().join("staging")), Ok(()));
        // The probe leaves nothing behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .collect();
        assert!(left.is_empty());
        // A path under a regular file can never hold a directory, even for root.
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = probe_staging(&file.join("staging")).unwrap_err();
        assert!(e.contains("cannot take a file"), "{e}");
    }

    #[test]
    fn the_open_answer_names_no_path_and_the_log_keeps_the_detail() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let staging = file.join("staging");
        let logs = batchrouter_testkit::logs::LogCapture::default();
        let _guard = tracing::subscriber::set_default(logs.subscriber(tracing::Level::INFO));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reason = rt.block_on(async {
            let url = format!("sqlite://{}/jobs.db", dir.path().display());
            let store = batchrouter_store::open(&url).await.unwrap();
            let r = Readiness::new(store, staging.clone());
            let first = r.check().await.unwrap_err();
            // Twice: the cached answer is as short as the fresh one.
            assert_eq!(r.check().await.unwrap_err(), first);
            first
        });
        assert_eq!(reason, STAGING_REFUSES);
        let text = logs.text();
        assert!(
            text.contains("WARN") && text.contains(&staging.display().to_string()),
            "{text}"
        );
        assert_eq!(text.matches("Not ready").count(), 1, "{text}");
    }
}
