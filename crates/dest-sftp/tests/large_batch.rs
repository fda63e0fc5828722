//! A 200 MB batch streams through with flat memory. Alone in its own test
//! binary so the process's peak RSS measures this upload only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::time::Instant;

use batchrouter_core::{validate_upload_output, Outcome, StagedBatch, Timestamp, Uploader};
use batchrouter_testkit::measure::{peak_rss_kib, rss_kib};
use batchrouter_testkit::sshd::Sshd;
use common::{key_config, uploader};

const TARGET_BYTES: u64 = 200 * 1000 * 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200mb_csv_batch_streams_with_flat_memory() {
    let Some(sshd) = Sshd::start_or_skip("a_200mb_csv_batch_streams_with_flat_memory") else {
        return;
    };
    let dir = sshd.upload_root().join("large");
    let (u, _) = uploader(&key_config(
        &sshd,
        "csv",
        &format!("{}/{{batchID}}.csv", dir.display()),
    ));

    // Staged lines written directly: transform's output for flat payloads.
    let local = tempfile::tempdir().unwrap();
    let staged = local.path().join("big.staged");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&staged).unwrap());
    // ~2 KB records: 200 MB in ~100k jobs. (The upload output holds one
    // outcome per job, which is the contract's per-job cost, not the file's.)
    let pad = "p".repeat(1900);
    let mut staged_bytes = 0u64;
    let mut csv_bytes = "id,email,n,flag,pad\n".len() as u64;
    let mut n = 0usize;
    while staged_bytes < TARGET_BYTES {
        let flag = n & 1 == 0;
        let line = format!("{{\"id\":\"u{n}\",\"email\":\"user{n}@example.com\",\"n\":{n},\"flag\":{flag},\"pad\":\"{pad}\"}}\n");
        staged_bytes += line.len() as u64;
        csv_bytes += format!("u{n},user{n}@example.com,{n},{flag},{pad}\n").len() as u64;
        w.write_all(line.as_bytes()).unwrap();
        n += 1;
    }
    w.flush().unwrap();
    drop(w);
    let batch = StagedBatch {
        batch_id: "b-large".into(),
        destination_id: "sftp-test".into(),
        destination_type: "SFTP".into(),
        path: staged,
        job_ids: (1..=n as i64).collect(),
        bytes: staged_bytes,
        attempt: 1,
        created_at: Timestamp(1_709_251_198_007),
    };

    // Reset the peak-RSS mark (Linux: writing 5 to clear_refs), then measure.
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
    let before = rss_kib().unwrap();
    let started = Instant::now();
    let out = u.upload(&batch).await;
    let elapsed = started.elapsed();
    let peak = peak_rss_kib().unwrap();
    validate_upload_output(&batch.job_ids, &out).unwrap();
    assert!(
        matches!(out.outcomes[0].1, Outcome::Succeeded { .. }),
        "{:?}",
        out.outcomes[0].1
    );

    let growth_mib = peak.saturating_sub(before) as f64 / 1024.0;
    eprintln!(
        "200 MB CSV batch: {n} jobs, staged {staged_bytes} B, csv {csv_bytes} B, {:.1} s ({:.1} MB/s), \
         RSS before {before} KiB, peak {peak} KiB, growth {growth_mib:.1} MiB",
        elapsed.as_secs_f64(),
        csv_bytes as f64 / 1e6 / elapsed.as_secs_f64()
    );
    assert!(
        growth_mib < 32.0,
        "peak RSS grew by {growth_mib:.1} MiB for a {} MB batch: not streaming",
        staged_bytes / 1_000_000
    );

    let remote = dir.join("b-large.csv");
    assert_eq!(std::fs::metadata(&remote).unwrap().len(), csv_bytes);
    let mut f = std::fs::File::open(&remote).unwrap();
    let expected_head = format!("id,email,n,flag,pad\nu0,user0@example.com,0,true,{pad}\n");
    let mut head = vec![0u8; expected_head.len()];
    f.read_exact(&mut head).unwrap();
    assert_eq!(String::from_utf8(head).unwrap(), expected_head);
    let last = n - 1;
    let tail_line = format!(
        "u{last},user{last}@example.com,{last},{},{pad}\n",
        last & 1 == 0
    );
    f.seek(SeekFrom::End(-(tail_line.len() as i64))).unwrap();
    let mut tail = String::new();
    f.read_to_string(&mut tail).unwrap();
    assert_eq!(tail, tail_line);
    assert!(!dir.join("b-large.csv.part").exists());
    std::fs::remove_file(&remote).unwrap();
}
