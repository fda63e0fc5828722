//! The SFTP cells of the fault matrix (docs/operations.md, "What each
//! destination fault leads to") that `sftp.rs` does not cover already: a
//! server that stops answering mid-upload (hang past `ioTimeout`) and
//! credentials revoked between uploads. Against a real OpenSSH server;
//! without sshd these tests skip loudly, or fail when
//! BATCHROUTER_REQUIRE_REAL_SERVERS=1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    validate_upload_output, ErrorCode, Outcome, StagedBatch, Timestamp, UploadOutput, Uploader,
};
use batchrouter_testkit::sshd::Sshd;
use common::{files_below, key_config, remote_dir, uploader};

const T: Timestamp = Timestamp(1_709_251_198_007);

/// Every job got the same outcome; returns it.
fn sole_outcome(ids: &[i64], out: &UploadOutput) -> Outcome {
    validate_upload_output(ids, out).expect("every job named exactly once");
    let first = out.outcomes[0].1.clone();
    assert!(out.outcomes.iter().all(|(_, o)| *o == first), "{out:?}");
    first
}

/// `n` staged NDJSON lines of about `pad` bytes (what transform stages for
/// these flat records).
fn big_batch(local: &Path, batch_id: &str, n: usize, pad: usize) -> StagedBatch {
    let path = local.join(format!("{batch_id}.staged"));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let filler = "x".repeat(pad);
    for i in 0..n {
        writeln!(w, "{{\"id\":\"u{i}\",\"pad\":\"{filler}\"}}").unwrap();
    }
    w.flush().unwrap();
    drop(w);
    StagedBatch {
        batch_id: batch_id.into(),
        destination_id: "sftp-test".into(),
        destination_type: "SFTP".into(),
        bytes: std::fs::metadata(&path).unwrap().len(),
        path,
        job_ids: (1..=n as i64).collect(),
        attempt: 1,
        created_at: T,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_hangs_mid_upload_fails_the_batch_within_io_timeout() {
    let Some(mut sshd) =
        Sshd::start_or_skip("a_server_that_hangs_mid_upload_fails_the_batch_within_io_timeout")
    else {
        return;
    };
    let dir = remote_dir(&sshd, "hang");
    let local = tempfile::tempdir().unwrap();
    let mut cfg = key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.json", dir.display()),
    );
    cfg["ioTimeout"] = serde_json::json!("1s");
    let (u, rec) = uploader(&cfg);
    let u = Arc::new(u);
    let batch = Arc::new(big_batch(local.path(), "b-hang", 100_000, 200));
    let part = dir.join("b-hang.json.part");

    let task = {
        let (u, batch) = (u.clone(), batch.clone());
        tokio::spawn(async move { u.upload(&batch).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::metadata(&part)
        .map(|m| m.len() > 2 << 20)
        .unwrap_or(false)
    {
        assert!(!task.is_finished(), "finished before the server could hang");
        assert!(
            Instant::now() < deadline,
            "the upload never started writing"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sshd.freeze();
    let frozen_at = Instant::now();
    let out = task.await.unwrap();
    let waited = frozen_at.elapsed();
    sshd.thaw();

    match sole_outcome(&batch.job_ids, &out) {
        Outcome::Failed(e) => {
            assert_eq!(e.code, ErrorCode::DestinationUnavailable);
            assert!(e.message.contains("timed out"), "{}", e.message);
        }
        other => panic!("expected a retryable failure, got {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(10),
        "bounded by ioTimeout, waited {waited:?}"
    );
    assert!(
        rec.statuses().contains(&"timeout".to_string()),
        "{:?}",
        rec.statuses()
    );
    assert!(!dir.join("b-hang.json").exists(), "nothing published");

    // The server answers again: the retry delivers one complete file.
    let out = u.upload(&batch).await;
    assert!(matches!(
        sole_outcome(&batch.job_ids, &out),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(files_below(&dir), vec!["b-hang.json"]);
    assert_eq!(
        std::fs::metadata(dir.join("b-hang.json")).unwrap().len(),
        batch.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_revoked_between_uploads_abort_the_next_batch_with_the_reason() {
    let Some(sshd) = Sshd::start_or_skip(
        "credentials_revoked_between_uploads_abort_the_next_batch_with_the_reason",
    ) else {
        return;
    };
    let dir = remote_dir(&sshd, "revoked");
    let local = tempfile::tempdir().unwrap();
    let cfg = key_config(&sshd, "csv", &format!("{}/{{batchID}}.csv", dir.display()));
    let payloads = || (0..3).map(|i| format!("{{\"id\":\"u{i}\"}}"));

    // A first uploader delivers; then the key is removed from the server.
    let (u, _) = uploader(&cfg);
    let batch = common::stage(&u, local.path(), "b-before", T, payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    let authorized = sshd
        .client_key_path()
        .parent()
        .unwrap()
        .join("authorized_keys");
    std::fs::write(&authorized, "").unwrap();

    // A new session (a restarted daemon, or after any error) cannot log in:
    // aborted at once with the reason, never retried until exhausted.
    let (fresh, _) = uploader(&cfg);
    let batch = common::stage(&fresh, local.path(), "b-after", T, payloads());
    match sole_outcome(&batch.job_ids, &fresh.upload(&batch).await) {
        Outcome::Aborted(e) => {
            assert_eq!(e.code, ErrorCode::DestinationRejected);
            assert!(e.message.to_lowercase().contains("auth"), "{}", e.message);
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    assert_eq!(files_below(&dir), vec!["b-before.csv"]);
}
