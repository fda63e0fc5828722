//! Upload throughput of a 200 MB staged batch through our manager versus the
//! OpenSSH `sftp` client's `put` of the same file, same key, same server,
//! in one run. `cargo bench -p batchrouter-dest-sftp`.
//!
//! Both write the identical bytes: with `fileFormat = json` our file is the
//! staged NDJSON itself. Ours runs on a warm session (the steady state of a
//! destination); `sftp` pays its connection set-up every time (a few ms out
//! of the ~seconds measured). A CSV run is reported for reference.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::io::{BufWriter, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    AsyncDestinationManager, DestinationContext, NoopTelemetry, Outcome, StagedBatch, Timestamp,
};
use batchrouter_testkit::sshd::Sshd;
use serde_json::json;

const TARGET_BYTES: u64 = 200 * 1000 * 1000;
const ROUNDS: usize = 5;

/// CPU seconds used so far by this process (`self`) and by its waited-for
/// children (`children`: the `sftp` client and the `ssh` it runs), from
/// `/proc/self/stat` (USER_HZ = 100 on Linux).
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rfind(')').map(|i| &stat[i + 2..]).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // Fields 14-17 (utime, stime, cutime, cstime) are 11-14 after the name.
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / 100.0;
    (get(11) + get(12), get(13) + get(14))
}

fn main() {
    let sshd = match Sshd::start() {
        Ok(s) => s,
        Err(why) => {
            if batchrouter_testkit::real_servers_required() {
                panic!("no OpenSSH server: {why}");
            }
            eprintln!("*** SKIPPED sftp_upload bench: no OpenSSH server: {why} ***");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let local = tempfile::tempdir().unwrap();
    let remote_dir = sshd.upload_root().join("bench");
    std::fs::create_dir_all(&remote_dir).unwrap();

    // ~1 KB records, written as transform stages them.
    let staged = local.path().join("batch.staged");
    let mut w = BufWriter::with_capacity(1 << 20, std::fs::File::create(&staged).unwrap());
    let pad = "p".repeat(900);
    let (mut bytes, mut n) = (0u64, 0usize);
    while bytes < TARGET_BYTES {
        let line = format!(
            "{{\"id\":\"u{n}\",\"email\":\"user{n}@example.com\",\"n\":{n},\"flag\":{},\"pad\":\"{pad}\"}}\n",
            n & 1 == 0
        );
        bytes += line.len() as u64;
        w.write_all(line.as_bytes()).unwrap();
        n += 1;
    }
    w.flush().unwrap();
    drop(w);
    let batch = |id: &str| StagedBatch {
        batch_id: id.into(),
        destination_id: "bench".into(),
        destination_type: "SFTP".into(),
        path: staged.clone(),
        job_ids: (1..=n as i64).collect(),
        bytes,
        attempt: 1,
        created_at: Timestamp::now(),
    };
    let ctx = DestinationContext {
        id: "bench".into(),
        destination_type: "SFTP".into(),
        telemetry: Arc::new(NoopTelemetry),
    };
    let config = |format: &str, ext: &str| {
        json!({
            "host": sshd.host(), "port": sshd.port(), "username": sshd.user(),
            "authMethod": "keyAuth", "privateKeyPath": sshd.client_key_path().to_str().unwrap(),
            "fileFormat": format, "filePath": format!("{}/ours-{{batchID}}.{ext}", remote_dir.display()),
            "knownHosts": sshd.known_hosts_path().to_str().unwrap(),
        })
    };
    let json_manager = batchrouter_dest_sftp::SftpDestination
        .validate_and_build(&ctx, &config("json", "json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let csv_manager = batchrouter_dest_sftp::SftpDestination
        .validate_and_build(&ctx, &config("csv", "csv"))
        .unwrap_or_else(|e| panic!("{e}"));

    let upload = |m: &Arc<dyn AsyncDestinationManager>, id: &str| -> (Duration, f64) {
        let b = batch(id);
        let cpu = cpu_seconds().0;
        let started = Instant::now();
        let out = rt.block_on(m.upload(&b));
        let elapsed = started.elapsed();
        let cpu = cpu_seconds().0 - cpu;
        assert!(
            out.outcomes
                .iter()
                .all(|(_, o)| matches!(o, Outcome::Succeeded { .. })),
            "upload failed: {:?}",
            out.outcomes.first()
        );
        (elapsed, cpu)
    };
    // Warm the session (and the server's page cache for the target dir).
    upload(&json_manager, "warmup");

    let cli_put = |i: usize| -> (Duration, f64) {
        let target = remote_dir.join(format!("cli-{i}.json"));
        let cpu = cpu_seconds().1;
        let started = Instant::now();
        sshd.sftp_batch(&format!(
            "put \"{}\" \"{}\"\n",
            staged.display(),
            target.display()
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let elapsed = started.elapsed();
        let cpu = cpu_seconds().1 - cpu;
        assert_eq!(std::fs::metadata(&target).unwrap().len(), bytes);
        (elapsed, cpu)
    };
    let mut ours = Vec::new();
    let mut cli = Vec::new();
    for i in 0..ROUNDS {
        ours.push(upload(&json_manager, &format!("r{i}")));
        assert_eq!(
            std::fs::metadata(remote_dir.join(format!("ours-r{i}.json")))
                .unwrap()
                .len(),
            bytes
        );
        cli.push(cli_put(i));
        clean(&remote_dir);
    }
    let csv: Vec<(Duration, f64)> = (0..ROUNDS)
        .map(|i| {
            let d = upload(&csv_manager, &format!("c{i}"));
            clean(&remote_dir);
            d
        })
        .collect();

    let mbps = |d: &Duration| bytes as f64 / 1e6 / d.as_secs_f64();
    let best = |v: &[(Duration, f64)]| v.iter().map(|(d, _)| mbps(d)).fold(0.0, f64::max);
    let median = |v: &[(Duration, f64)]| {
        let mut r: Vec<f64> = v.iter().map(|(d, _)| mbps(d)).collect();
        r.sort_by(|a, b| a.total_cmp(b));
        r[r.len() / 2]
    };
    // Client CPU per GB: insensitive to other load on the machine.
    let cpu_per_gb = |v: &[(Duration, f64)]| {
        let mut r: Vec<f64> = v.iter().map(|(_, c)| c / (bytes as f64 / 1e9)).collect();
        r.sort_by(|a, b| a.total_cmp(b));
        r[r.len() / 2]
    };
    println!(
        "sftp_upload: {n} jobs, {:.1} MB staged, {ROUNDS} rounds, {}",
        bytes as f64 / 1e6,
        sshd_version()
    );
    println!(
        "  ours (json, warm session)  best {:7.1} MB/s  median {:7.1} MB/s  client CPU {:5.2} s/GB",
        best(&ours),
        median(&ours),
        cpu_per_gb(&ours)
    );
    println!(
        "  OpenSSH sftp put           best {:7.1} MB/s  median {:7.1} MB/s  client CPU {:5.2} s/GB (sftp + ssh)",
        best(&cli),
        median(&cli),
        cpu_per_gb(&cli)
    );
    println!(
        "  ratio ours/sftp            best {:7.2}x      median {:7.2}x",
        best(&ours) / best(&cli),
        median(&ours) / median(&cli)
    );
    println!(
        "  ours (csv, rendered)       best {:7.1} MB/s  median {:7.1} MB/s  client CPU {:5.2} s/GB (staged bytes)",
        best(&csv),
        median(&csv),
        cpu_per_gb(&csv)
    );
    rt.block_on(json_manager.close());
    rt.block_on(csv_manager.close());
}

fn clean(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
}

fn sshd_version() -> String {
    Command::new(batchrouter_testkit::sshd::SSHD)
        .arg("-V")
        .stdin(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .split(',')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}
