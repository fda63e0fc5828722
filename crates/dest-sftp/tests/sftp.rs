//! SFTP destination against a real OpenSSH server (testkit's throwaway sshd).
//! Without sshd these tests skip loudly, or fail when
//! BATCHROUTER_REQUIRE_REAL_SERVERS=1.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batchrouter_core::{
    validate_upload_output, ErrorCode, Outcome, Timestamp, UploadOutput, Uploader,
};
use batchrouter_testkit::sshd::{password_account, Sshd};
use common::{files_below, key_config, remote_dir, stage, uploader};
use serde_json::json;

/// 2024-02-29T23:59:58.007Z
const T: Timestamp = Timestamp(1_709_251_198_007);

fn sshd(test: &str) -> Option<Sshd> {
    Sshd::start_or_skip(test)
}

/// Every job got the same outcome; returns it.
fn sole_outcome(ids: &[i64], out: &UploadOutput) -> Outcome {
    validate_upload_output(ids, out).expect("every job named exactly once");
    let first = out.outcomes[0].1.clone();
    assert!(out.outcomes.iter().all(|(_, o)| *o == first), "{out:?}");
    first
}

fn failed_message(o: &Outcome, code: ErrorCode) -> String {
    match o {
        Outcome::Failed(e) if e.code == code => e.message.clone(),
        other => panic!("expected Failed({code}), got {other:?}"),
    }
}

fn aborted_message(o: &Outcome) -> String {
    match o {
        Outcome::Aborted(e) if e.code == ErrorCode::DestinationRejected => e.message.clone(),
        other => panic!("expected Aborted(destination_rejected), got {other:?}"),
    }
}

/// Payloads with fields in a deliberate (non-alphabetical) order.
fn record_payloads() -> Vec<String> {
    vec![
        r#"{"type":"record","action":"insert","recordId":"r1","context":{"sources":{"job_run_id":"x"}},"fields":{"id":"u1","name":"Ann, \"A\"","score":1e6,"vip":true}}"#.to_string(),
        r#"{"type":"record","action":"update","fields":{"id":"u2","email":"b@example.com","score":2.5,"tags":["a",1]}}"#.to_string(),
        r#"{"id":"u3","name":"line
break","vip":null}"#
            .replace('\n', "\\n"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_auth_csv_arrives_byte_for_byte() {
    let Some(sshd) = sshd("key_auth_csv_arrives_byte_for_byte") else {
        return;
    };
    let dir = remote_dir(&sshd, "csv");
    let cfg = key_config(&sshd, "csv", &format!("{}/{{batchID}}.csv", dir.display()));
    let ctx_rec = Arc::new(common::Recorder::default());
    let manager = batchrouter_dest_sftp::SftpDestination
        .validate_and_build(&common::ctx(&ctx_rec), &cfg)
        .unwrap_or_else(|e| panic!("{e}"));
    let (u, _) = uploader(&cfg);
    let local = tempfile::tempdir().unwrap();
    let batch = stage(&u, local.path(), "b-csv", T, record_payloads());

    let out = manager.upload(&batch).await;
    let remote = dir.join("b-csv.csv");
    assert_eq!(
        sole_outcome(&batch.job_ids, &out),
        Outcome::Succeeded {
            note: None,
            external_id: Some(remote.display().to_string())
        }
    );
    let bytes = sshd.download(&remote).unwrap();
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        "id,name,score,vip,email,tags,action\n\
         u1,\"Ann, \"\"A\"\"\",1000000,true,,,insert\n\
         u2,,2.5,,b@example.com,\"[\"\"a\"\",1]\",update\n\
         u3,\"line\nbreak\",,,,,\n"
    );
    assert_eq!(files_below(&dir), vec!["b-csv.csv"], "no .part left");
    assert_eq!(ctx_rec.statuses(), vec!["ok"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_formats_write_records_only() {
    let Some(sshd) = sshd("json_formats_write_records_only") else {
        return;
    };
    let dir = remote_dir(&sshd, "json");
    let local = tempfile::tempdir().unwrap();

    let (nd, _) = uploader(&key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.ndjson", dir.display()),
    ));
    let batch = stage(&nd, local.path(), "b-nd", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &nd.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    let ndjson = String::from_utf8(sshd.download(&dir.join("b-nd.ndjson")).unwrap()).unwrap();
    assert_eq!(
        ndjson,
        "{\"id\":\"u1\",\"name\":\"Ann, \\\"A\\\"\",\"score\":1e6,\"vip\":true,\"action\":\"insert\"}\n\
         {\"id\":\"u2\",\"email\":\"b@example.com\",\"score\":2.5,\"tags\":[\"a\",1],\"action\":\"update\"}\n\
         {\"id\":\"u3\",\"name\":\"line\\nbreak\",\"vip\":null}\n"
    );

    let (arr, _) = uploader(&key_config(
        &sshd,
        "jsonArray",
        &format!("{}/{{batchID}}.json", dir.display()),
    ));
    let batch = stage(&arr, local.path(), "b-arr", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &arr.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    let array = String::from_utf8(sshd.download(&dir.join("b-arr.json")).unwrap()).unwrap();
    let expected = format!("[\n{}\n]\n", ndjson.trim_end().replace('\n', ",\n"));
    assert_eq!(array, expected);
    let parsed: Vec<serde_json::Value> = serde_json::from_str(&array).unwrap();
    assert_eq!(parsed.len(), 3);
    assert!(
        !array.contains("job_id") && !array.contains("recordId") && !array.contains("metadata")
    );
    assert_eq!(files_below(&dir), vec!["b-arr.json", "b-nd.ndjson"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_macros_expand_in_utc_and_directories_are_created() {
    let Some(sshd) = sshd("path_macros_expand_in_utc_and_directories_are_created") else {
        return;
    };
    let dir = remote_dir(&sshd, "macros");
    let local = tempfile::tempdir().unwrap();
    let template = format!(
        "{}/{{YYYY}}/{{MM}}/{{DD}}/{{hh}}{{mm}}{{ss}}-{{ms}}-{{timestampInSec}}-{{timestampInMS}}-{{destinationID}}-{{jobRunID}}.csv",
        dir.display()
    );
    let (u, _) = uploader(&key_config(&sshd, "csv", &template));
    let batch = stage(&u, local.path(), "b-mac", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    // Without {batchID}/{jobRunID} the batch id goes before the extension.
    let (daily, _) = uploader(&key_config(
        &sshd,
        "json",
        &format!("{}/daily/{{YYYY}}{{MM}}{{DD}}.json", dir.display()),
    ));
    let batch = stage(&daily, local.path(), "b-day", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &daily.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    assert_eq!(
        files_below(&dir),
        vec![
            "2024/02/29/235958-007-1709251198-1709251198007-sftp-test-b-mac.csv".to_string(),
            "daily/20240229_b-day.json".to_string(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_uploads_into_the_accounts_home() {
    let Some(sshd) = sshd("password_auth_uploads_into_the_accounts_home") else {
        return;
    };
    let account = match password_account() {
        Ok(a) => a,
        Err(why) => {
            batchrouter_testkit::skip_or_fail("password_auth_uploads_into_the_accounts_home", &why);
            return;
        }
    };
    let sub = format!("br-test-{}", fastrand_suffix());
    let mut cfg = json!({
        "host": sshd.host(),
        "port": sshd.port().to_string(),
        "username": account.user,
        "authMethod": "passwordAuth",
        "password": account.password,
        "fileFormat": "json",
        // Relative: SFTP resolves it against the login (home) directory.
        "filePath": format!("{sub}/{{batchID}}.json"),
        "hostKeyFingerprint": sshd.host_key_fingerprint(),
        "connectTimeout": 2,
        "ioTimeout": "5s",
    });
    let local = tempfile::tempdir().unwrap();
    let (u, rec) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-pw", T, record_payloads());
    let out = u.upload(&batch).await;
    assert_eq!(
        sole_outcome(&batch.job_ids, &out),
        Outcome::Succeeded {
            note: None,
            external_id: Some(format!("{sub}/b-pw.json"))
        }
    );
    let landed = account.home.join(&sub).join("b-pw.json");
    let content = std::fs::read_to_string(&landed).unwrap();
    assert!(content.starts_with("{\"id\":\"u1\""), "{content}");
    assert_eq!(rec.statuses(), vec!["ok"]);

    // The account may not write outside its home: permission problems abort.
    cfg["filePath"] = json!(format!(
        "{}/denied/{{batchID}}.json",
        sshd.upload_root().display()
    ));
    let (denied, _) = uploader(&cfg);
    let out = denied.upload(&batch).await;
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &out));
    assert!(
        msg.contains("permission denied (SSH_FX_PERMISSION_DENIED)"),
        "{msg}"
    );

    // A wrong password aborts at once with a clear reason.
    cfg["password"] = json!("not-the-password");
    let (wrong, rec) = uploader(&cfg);
    let out = wrong.upload(&batch).await;
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &out));
    assert!(
        msg.contains(&format!(
            "refused password authentication for user `{}`",
            account.user
        )),
        "{msg}"
    );
    assert!(!msg.contains("not-the-password"));
    assert_eq!(rec.statuses(), vec!["rejected"]);

    std::fs::remove_dir_all(account.home.join(&sub)).unwrap();
}

fn fastrand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{nanos}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_key_mismatch_aborts_and_sends_nothing() {
    let Some(sshd) = sshd("host_key_mismatch_aborts_and_sends_nothing") else {
        return;
    };
    let dir = remote_dir(&sshd, "mismatch");
    let local = tempfile::tempdir().unwrap();
    let other = sshd.generate_key("impostor", "ed25519", "", false).unwrap();
    let other_pub = other.with_extension("pub");
    let other_fp = Sshd::fingerprint_of(&other_pub).unwrap();

    // Pinned fingerprint of another key.
    let mut cfg = key_config(&sshd, "csv", &format!("{}/{{batchID}}.csv", dir.display()));
    cfg.as_object_mut().unwrap().remove("knownHosts");
    cfg["hostKeyFingerprint"] = json!(other_fp);
    let (u, rec) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-mm", T, record_payloads());
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &u.upload(&batch).await));
    assert!(msg.contains("host key mismatch"), "{msg}");
    assert!(
        msg.contains(sshd.host_key_fingerprint()),
        "names the presented key: {msg}"
    );
    assert!(msg.contains(&other_fp), "names the expected key: {msg}");
    assert_eq!(rec.statuses(), vec!["rejected"]);

    // known_hosts recording another key for this host:port.
    let other_line = std::fs::read_to_string(&other_pub).unwrap();
    let other_b64 = other_line.split_whitespace().nth(1).unwrap();
    let kh = local.path().join("known_hosts_wrong");
    std::fs::write(
        &kh,
        format!("[127.0.0.1]:{} ssh-ed25519 {other_b64}\n", sshd.port()),
    )
    .unwrap();
    let mut cfg = key_config(&sshd, "csv", &format!("{}/{{batchID}}.csv", dir.display()));
    cfg["knownHosts"] = json!(kh.to_str().unwrap());
    let (u, _) = uploader(&cfg);
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &u.upload(&batch).await));
    assert!(
        msg.contains("host key mismatch") && msg.contains("differs from the key recorded"),
        "{msg}"
    );
    assert!(msg.contains(sshd.host_key_fingerprint()), "{msg}");

    // known_hosts without this host at all.
    let real = std::fs::read_to_string(sshd.known_hosts_path()).unwrap();
    let elsewhere = local.path().join("known_hosts_elsewhere");
    std::fs::write(
        &elsewhere,
        real.replace(&format!("]:{} ", sshd.port()), "]:1 "),
    )
    .unwrap();
    cfg["knownHosts"] = json!(elsewhere.to_str().unwrap());
    let (u, _) = uploader(&cfg);
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &u.upload(&batch).await));
    assert!(msg.contains("is not in knownHosts"), "{msg}");

    assert_eq!(
        sshd.accepted_logins(),
        0,
        "no credentials may be sent to an unverified server"
    );
    assert!(!dir.exists(), "nothing may be uploaded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correct_fingerprints_hashed_known_hosts_and_insecure_mode_connect() {
    let Some(sshd) = sshd("correct_fingerprints_hashed_known_hosts_and_insecure_mode_connect")
    else {
        return;
    };
    let dir = remote_dir(&sshd, "verified");
    let local = tempfile::tempdir().unwrap();

    let mut cfg = key_config(
        &sshd,
        "json",
        &format!("{}/fp-{{batchID}}.json", dir.display()),
    );
    cfg.as_object_mut().unwrap().remove("knownHosts");
    cfg["hostKeyFingerprint"] = json!(sshd.host_key_fingerprint());
    let (u, _) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b1", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    let hashed = local.path().join("known_hosts_hashed");
    std::fs::copy(sshd.known_hosts_path(), &hashed).unwrap();
    let st = std::process::Command::new("ssh-keygen")
        .arg("-H")
        .arg("-f")
        .arg(&hashed)
        .output()
        .unwrap();
    assert!(st.status.success());
    assert!(
        !std::fs::read_to_string(&hashed)
            .unwrap()
            .contains("127.0.0.1"),
        "names are hashed"
    );
    let mut cfg = key_config(
        &sshd,
        "json",
        &format!("{}/kh-{{batchID}}.json", dir.display()),
    );
    cfg["knownHosts"] = json!(hashed.to_str().unwrap());
    let (u, _) = uploader(&cfg);
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    let mut cfg = key_config(
        &sshd,
        "json",
        &format!("{}/in-{{batchID}}.json", dir.display()),
    );
    cfg.as_object_mut().unwrap().remove("knownHosts");
    cfg["insecureSkipHostKeyCheck"] = json!(true);
    let (u, _) = uploader(&cfg);
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    assert_eq!(
        files_below(&dir),
        vec!["fp-b1.json", "in-b1.json", "kh-b1.json"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_variants_rsa_encrypted_and_refused_keys() {
    let Some(sshd) = sshd("key_variants_rsa_encrypted_and_refused_keys") else {
        return;
    };
    let dir = remote_dir(&sshd, "keys");
    let local = tempfile::tempdir().unwrap();
    let base = key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.json", dir.display()),
    );
    let with_key_path = |path: &Path, passphrase: Option<&str>| {
        let mut c = base.clone();
        c.as_object_mut().unwrap().remove("privateKey");
        c["privateKeyPath"] = json!(path.to_str().unwrap());
        if let Some(p) = passphrase {
            c["privateKeyPassphrase"] = json!(p);
        }
        c
    };

    // RSA: the bundled libssh2 signs with rsa-sha2, which OpenSSH 9 accepts.
    let rsa = sshd.generate_key("rsa", "rsa", "", true).unwrap();
    let (u, _) = uploader(&with_key_path(&rsa, None));
    let batch = stage(&u, local.path(), "b-rsa", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    // An encrypted ed25519 key with its passphrase.
    let locked = sshd
        .generate_key("locked", "ed25519", "correct horse", true)
        .unwrap();
    let (u, _) = uploader(&with_key_path(&locked, Some("correct horse")));
    let batch = stage(&u, local.path(), "b-locked", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));

    // The same key with a wrong passphrase: aborted, the reason says why.
    let (u, _) = uploader(&with_key_path(&locked, Some("battery staple")));
    let batch = stage(&u, local.path(), "b-wrongpass", T, record_payloads());
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &u.upload(&batch).await));
    assert!(
        msg.contains("could not be used (wrong privateKeyPassphrase"),
        "{msg}"
    );
    assert!(!msg.contains("battery staple"));

    // A key the server does not know.
    let stranger = sshd.generate_key("stranger", "ed25519", "", false).unwrap();
    let (u, rec) = uploader(&with_key_path(&stranger, None));
    let batch = stage(&u, local.path(), "b-stranger", T, record_payloads());
    let msg = aborted_message(&sole_outcome(&batch.job_ids, &u.upload(&batch).await));
    assert!(
        msg.contains(&format!(
            "refused public key authentication for user `{}`",
            sshd.user()
        )),
        "{msg}"
    );
    assert_eq!(rec.statuses(), vec!["rejected"]);

    assert_eq!(files_below(&dir), vec!["b-locked.json", "b-rsa.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_session_is_reused_and_replaced_after_a_server_restart() {
    let Some(mut sshd) = sshd("one_session_is_reused_and_replaced_after_a_server_restart") else {
        return;
    };
    let dir = remote_dir(&sshd, "reuse");
    let local = tempfile::tempdir().unwrap();
    let (u, rec) = uploader(&key_config(
        &sshd,
        "csv",
        &format!("{}/{{batchID}}.csv", dir.display()),
    ));
    assert_eq!(u.sessions_opened(), 0, "no connection at build time");
    for i in 0..3 {
        let batch = stage(&u, local.path(), &format!("b{i}"), T, record_payloads());
        assert!(matches!(
            sole_outcome(&batch.job_ids, &u.upload(&batch).await),
            Outcome::Succeeded { .. }
        ));
    }
    assert_eq!(u.sessions_opened(), 1);
    assert_eq!(sshd.accepted_logins(), 1, "one login for three uploads");

    sshd.restart().unwrap();
    let batch = stage(&u, local.path(), "b3", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(u.sessions_opened(), 2, "the dead session was replaced");
    assert_eq!(sshd.accepted_logins(), 2);
    assert_eq!(rec.statuses(), vec!["ok", "ok", "ok", "error", "ok"]);
    assert_eq!(
        files_below(&dir),
        vec!["b0.csv", "b1.csv", "b2.csv", "b3.csv"]
    );

    // Shutdown says goodbye properly; a later upload opens a new session.
    u.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sshd.log().contains("Received disconnect from 127.0.0.1") {
        assert!(
            Instant::now() < deadline,
            "no disconnect in the server log:\n{}",
            sshd.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let batch = stage(&u, local.path(), "b4", T, record_payloads());
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(u.sessions_opened(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_down_at_first_fails_retryably_then_delivers() {
    let Some(mut sshd) = sshd("a_server_down_at_first_fails_retryably_then_delivers") else {
        return;
    };
    let dir = remote_dir(&sshd, "late");
    let local = tempfile::tempdir().unwrap();
    let cfg = key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.json", dir.display()),
    );
    sshd.stop();
    let (u, rec) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-late", T, record_payloads());
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        ErrorCode::DestinationUnavailable,
    );
    assert!(msg.contains("cannot connect to 127.0.0.1:"), "{msg}");
    sshd.restart().unwrap();
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(rec.statuses(), vec!["error", "ok"]);
}

/// Writes `n` staged NDJSON lines of about `pad` bytes each directly (they
/// are exactly what transform produces for these flat payloads).
fn big_batch(local: &Path, batch_id: &str, n: usize, pad: usize) -> batchrouter_core::StagedBatch {
    use std::io::Write;
    let path = local.join(format!("{batch_id}.staged"));
    let mut w = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let filler = "x".repeat(pad);
    for i in 0..n {
        writeln!(w, "{{\"id\":\"u{i}\",\"pad\":\"{filler}\"}}").unwrap();
    }
    w.flush().unwrap();
    drop(w);
    batchrouter_core::StagedBatch {
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

/// Starts uploading `batch`, kills the server once more than 2 MiB of
/// `part` arrived, and returns the failed upload's output.
async fn kill_server_mid_upload(
    sshd: &mut Sshd,
    u: &Arc<batchrouter_dest_sftp::SftpUploader>,
    batch: &Arc<batchrouter_core::StagedBatch>,
    part: &Path,
) -> UploadOutput {
    let task = {
        let (u, batch) = (u.clone(), batch.clone());
        tokio::spawn(async move { u.upload(&batch).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::metadata(part)
            .map(|m| m.len() > 2 << 20)
            .unwrap_or(false)
        {
            break;
        }
        assert!(
            !task.is_finished(),
            "the upload finished before the server could be killed"
        );
        assert!(
            Instant::now() < deadline,
            "the upload never started writing"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    sshd.stop();
    task.await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_killed_mid_upload_fails_then_the_retry_leaves_one_file() {
    let Some(mut sshd) = sshd("server_killed_mid_upload_fails_then_the_retry_leaves_one_file")
    else {
        return;
    };
    let dir = remote_dir(&sshd, "killed");
    let local = tempfile::tempdir().unwrap();
    let (u, _) = uploader(&key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.json", dir.display()),
    ));
    let u = Arc::new(u);
    let batch = Arc::new(big_batch(local.path(), "b-big", 400_000, 200));
    let part = dir.join("b-big.json.part");
    let out = kill_server_mid_upload(&mut sshd, &u, &batch, &part).await;
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &out),
        ErrorCode::DestinationUnavailable,
    );
    assert!(
        msg.contains("b-big.json.part") || msg.contains("connection lost"),
        "{msg}"
    );
    assert!(
        !dir.join("b-big.json").exists(),
        "no final file from a broken upload"
    );

    sshd.restart().unwrap();
    let out = u.upload(&batch).await;
    assert!(matches!(
        sole_outcome(&batch.job_ids, &out),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(
        files_below(&dir),
        vec!["b-big.json"],
        "exactly one final file, no .part"
    );
    assert_eq!(
        std::fs::metadata(dir.join("b-big.json")).unwrap().len(),
        batch.bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_left_by_a_killed_upload_is_removed_after_the_next_connect() {
    let Some(mut sshd) = sshd("a_part_left_by_a_killed_upload_is_removed_after_the_next_connect")
    else {
        return;
    };
    let dir = remote_dir(&sshd, "orphan");
    let local = tempfile::tempdir().unwrap();
    let (u, rec) = uploader(&key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.json", dir.display()),
    ));
    let u = Arc::new(u);
    let big = Arc::new(big_batch(local.path(), "b-orphan", 400_000, 200));
    let part = dir.join("b-orphan.json.part");
    let out = kill_server_mid_upload(&mut sshd, &u, &big, &part).await;
    failed_message(
        &sole_outcome(&big.job_ids, &out),
        ErrorCode::DestinationUnavailable,
    );
    assert!(part.exists(), "the killed upload left its .part");

    // The server is still down: nothing can be cleaned yet, nothing is lost.
    let other = stage(&u, local.path(), "b-other", T, record_payloads());
    failed_message(
        &sole_outcome(&other.job_ids, &u.upload(&other).await),
        ErrorCode::DestinationUnavailable,
    );
    assert!(part.exists());

    // Back up: a DIFFERENT batch is delivered, and the stray .part is gone.
    sshd.restart().unwrap();
    assert!(matches!(
        sole_outcome(&other.job_ids, &u.upload(&other).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(
        files_below(&dir),
        vec!["b-other.json"],
        "the killed upload's .part was removed"
    );
    assert_eq!(rec.statuses(), vec!["error", "error", "ok"]);

    // Forgotten once removed: a later session does not try again.
    sshd.restart().unwrap();
    let third = stage(&u, local.path(), "b-third", T, record_payloads());
    assert!(matches!(
        sole_outcome(&third.job_ids, &u.upload(&third).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(files_below(&dir), vec!["b-other.json", "b-third.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_host_name_fails_within_connect_timeout() {
    let local = tempfile::tempdir().unwrap();
    // `.invalid` never resolves (RFC 2606); with a hanging resolver the
    // lookup would block for the resolver's own timeouts, not connectTimeout.
    let cfg = json!({
        "host": "batchrouter-no-such-host.invalid",
        "username": "nobody",
        "authMethod": "passwordAuth",
        "password": "x",
        "fileFormat": "csv",
        "filePath": "x/{batchID}.csv",
        "insecureSkipHostKeyCheck": true,
        "connectTimeout": "1s",
        "ioTimeout": "1s",
    });
    let (u, rec) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-dns", T, record_payloads());
    let started = Instant::now();
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        ErrorCode::DestinationUnavailable,
    );
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "bounded by connectTimeout (1s): took {took:?}"
    );
    assert!(
        msg.starts_with("cannot connect to batchrouter-no-such-host.invalid:22: ")
            && (msg.contains("cannot resolve the host name")
                || msg.contains("resolving the host name timed out after 1s")),
        "{msg}"
    );
    assert_eq!(rec.statuses().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_replaces_its_own_file_atomically() {
    let Some(sshd) = sshd("a_retried_batch_replaces_its_own_file_atomically") else {
        return;
    };
    let dir = remote_dir(&sshd, "retry");
    let local = tempfile::tempdir().unwrap();
    let (u, _) = uploader(&key_config(
        &sshd,
        "csv",
        &format!("{}/{{batchID}}.csv", dir.display()),
    ));
    let first = stage(
        &u,
        local.path(),
        "b-same",
        T,
        vec![r#"{"v":"first"}"#.to_string()],
    );
    assert!(matches!(
        sole_outcome(&first.job_ids, &u.upload(&first).await),
        Outcome::Succeeded { .. }
    ));
    let second = stage(
        &u,
        local.path(),
        "b-same",
        T,
        vec![r#"{"v":"second"}"#.to_string()],
    );
    assert!(matches!(
        sole_outcome(&second.job_ids, &u.upload(&second).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(dir.join("b-same.csv")).unwrap(),
        "v\nsecond\n"
    );

    // Servers without posix-rename get the two-step replacement.
    u.set_posix_rename(false);
    let third = stage(
        &u,
        local.path(),
        "b-same",
        T,
        vec![r#"{"v":"third"}"#.to_string()],
    );
    assert!(matches!(
        sole_outcome(&third.job_ids, &u.upload(&third).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(
        std::fs::read_to_string(dir.join("b-same.csv")).unwrap(),
        "v\nthird\n"
    );
    assert_eq!(files_below(&dir), vec!["b-same.csv"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_retryable_remote_write_failure() {
    let Some(sshd) = sshd("a_full_disk_is_a_retryable_remote_write_failure") else {
        return;
    };
    let dir = remote_dir(&sshd, "full");
    std::fs::create_dir_all(&dir).unwrap();
    // Writes to /dev/full fail with ENOSPC, which OpenSSH answers with SSH_FX_FAILURE.
    let part = dir.join("b-full.csv.part");
    std::os::unix::fs::symlink("/dev/full", &part).unwrap();
    let local = tempfile::tempdir().unwrap();
    let (u, rec) = uploader(&key_config(
        &sshd,
        "csv",
        &format!("{}/{{batchID}}.csv", dir.display()),
    ));
    let batch = stage(&u, local.path(), "b-full", T, record_payloads());
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        ErrorCode::DestinationUnavailable,
    );
    assert!(msg.contains("remote write failed for"), "{msg}");
    assert!(msg.contains(&part.display().to_string()), "{msg}");
    assert!(msg.contains("SSH_FX_FAILURE"), "{msg}");
    assert_eq!(
        files_below(&dir),
        Vec::<String>::new(),
        "the half-written .part was removed"
    );
    assert_eq!(rec.statuses(), vec!["error"]);

    // Space again: the retry delivers.
    assert!(matches!(
        sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        Outcome::Succeeded { .. }
    ));
    assert_eq!(files_below(&dir), vec!["b-full.csv"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_failures_are_retryable_and_bounded() {
    let local = tempfile::tempdir().unwrap();
    let base = json!({
        "host": "127.0.0.1",
        "username": "nobody",
        "authMethod": "passwordAuth",
        "password": "x",
        "fileFormat": "csv",
        "filePath": "x/{batchID}.csv",
        "insecureSkipHostKeyCheck": true,
        "connectTimeout": "1s",
        "ioTimeout": "500ms",
    });

    // Nothing listening: refused.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = base.clone();
    cfg["port"] = json!(port);
    let (u, rec) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-t", T, record_payloads());
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        ErrorCode::DestinationUnavailable,
    );
    assert!(
        msg.contains(&format!("cannot connect to 127.0.0.1:{port}")),
        "{msg}"
    );
    assert_eq!(rec.statuses(), vec!["error"]);

    // A server that accepts and never speaks: the handshake times out.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    cfg["port"] = json!(silent.local_addr().unwrap().port());
    let (u, rec) = uploader(&cfg);
    let started = Instant::now();
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        ErrorCode::DestinationUnavailable,
    );
    assert!(
        msg.contains("SSH handshake") && msg.contains("timed out"),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "bounded by ioTimeout: {:?}",
        started.elapsed()
    );
    assert_eq!(rec.statuses(), vec!["timeout"]);

    // Not an SSH server at all.
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    cfg["port"] = json!(http.local_addr().unwrap().port());
    let server = std::thread::spawn(move || {
        use std::io::Write;
        let (mut s, _) = http.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    });
    let (u, _) = uploader(&cfg);
    let msg = failed_message(
        &sole_outcome(&batch.job_ids, &u.upload(&batch).await),
        ErrorCode::DestinationUnavailable,
    );
    assert!(msg.contains("SSH handshake with 127.0.0.1"), "{msg}");
    server.join().unwrap();
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_upload_releases_the_session_quickly() {
    let Some(sshd) = sshd("a_cancelled_upload_releases_the_session_quickly") else {
        return;
    };
    let dir = remote_dir(&sshd, "cancel");
    let local = tempfile::tempdir().unwrap();
    let (u, _) = uploader(&key_config(
        &sshd,
        "json",
        &format!("{}/{{batchID}}.json", dir.display()),
    ));
    let big = big_batch(local.path(), "b-huge", 400_000, 200);
    let part = dir.join("b-huge.json.part");
    let cancelled = tokio::time::timeout(Duration::from_secs(20), async {
        let upload = u.upload(&big);
        tokio::pin!(upload);
        loop {
            tokio::select! {
                _ = &mut upload => panic!("finished before it could be cancelled"),
                _ = tokio::time::sleep(Duration::from_millis(1)) => {
                    if std::fs::metadata(&part).map(|m| m.len() > 2 << 20).unwrap_or(false) {
                        break;
                    }
                }
            }
        }
        // Dropping the future is what the router's upload timeout does.
    })
    .await;
    assert!(cancelled.is_ok(), "the upload never started");

    let started = Instant::now();
    let small = stage(&u, local.path(), "b-small", T, record_payloads());
    assert!(matches!(
        sole_outcome(&small.job_ids, &u.upload(&small).await),
        Outcome::Succeeded { .. }
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited {:?} for the cancelled upload",
        started.elapsed()
    );
    assert_eq!(
        u.sessions_opened(),
        2,
        "the interrupted session was not reused"
    );
    // The cancelled upload never completed, and the .part it left was
    // removed once the next session was up.
    assert_eq!(files_below(&dir), vec!["b-small.json"]);
}

#[test]
fn build_lists_every_config_problem_and_does_no_io() {
    let rec = Arc::new(common::Recorder::default());
    let ctx = common::ctx(&rec);
    let bad = json!({
        "host": "127.0.0.1",
        "authMethod": "passwordAuth",
        "fileFormat": "parquet",
        "filePath": "out/{date}/{batchID}.csv",
        "hostKeyFingerprint": "SHA256:nope",
    });
    match batchrouter_dest_sftp::SftpDestination.validate_and_build(&ctx, &bad) {
        Ok(_) => panic!("bad config accepted"),
        Err(p) => {
            let all = p.0.join("\n");
            for needle in [
                "`username` is required",
                "needs `password`",
                "`fileFormat` = `parquet`",
                "unknown macro `{date}`",
                "`hostKeyFingerprint`",
            ] {
                assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
            }
        }
    }
    // A valid config pointing nowhere builds at once: no connection at build.
    let good = json!({
        "host": "127.0.0.1", "port": 1, "username": "u", "authMethod": "passwordAuth", "password": "p",
        "fileFormat": "csv", "filePath": "{batchID}.csv", "insecureSkipHostKeyCheck": true,
    });
    let started = Instant::now();
    let m = batchrouter_dest_sftp::SftpDestination
        .validate_and_build(&ctx, &good)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(m.limits().max_upload_bytes.is_none());
    assert!(rec.statuses().is_empty(), "no request at build");
}

#[test]
fn bad_records_fail_alone_in_transform() {
    let rec = Arc::new(common::Recorder::default());
    let good = json!({
        "host": "127.0.0.1", "username": "u", "authMethod": "passwordAuth", "password": "p",
        "fileFormat": "csv", "filePath": "{batchID}.csv", "insecureSkipHostKeyCheck": true,
    });
    let m = batchrouter_dest_sftp::SftpDestination
        .validate_and_build(&common::ctx(&rec), &good)
        .unwrap_or_else(|e| panic!("{e}"));
    let job = |payload: &str| batchrouter_core::Job {
        id: 1,
        destination_id: "d".into(),
        payload: payload.into(),
        message_id: None,
        attempts: 0,
        retry_base: 0,
        first_attempt_at: None,
        created_at: T,
    };
    assert_eq!(
        m.transform(&job(r#"{"fields":{"a":1},"action":"insert"}"#))
            .unwrap(),
        r#"{"a":"1","action":"insert"}"#,
        "a CSV line holds the rendered cells"
    );
    let e = m.transform(&job(r#"{"id": "bad-1", oops"#)).unwrap_err();
    assert!(e.0.contains("payload is not a JSON object"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deep_record_aborts_alone_and_the_rest_of_its_batch_is_delivered() {
    let Some(sshd) = sshd("a_deep_record_aborts_alone_and_the_rest_of_its_batch_is_delivered")
    else {
        return;
    };
    let local = tempfile::tempdir().unwrap();
    let deep = format!(
        "{{\"id\":\"deep\",\"v\":{}1{}}}",
        "[".repeat(199),
        "]".repeat(199)
    );
    let huge_number = r#"{"id":"huge","v":1e400}"#.to_string();
    for format in ["csv", "json", "jsonArray"] {
        let dir = remote_dir(&sshd, &format!("poison-{format}"));
        let (u, _) = uploader(&key_config(
            &sshd,
            format,
            &format!("{}/{{batchID}}.out", dir.display()),
        ));
        let mut payloads: Vec<String> = (0..5).map(|i| format!("{{\"id\":\"u{i}\"}}")).collect();
        payloads.insert(2, deep.clone());
        if format == "csv" {
            payloads.insert(4, huge_number.clone());
        }
        let (batch, aborted) =
            common::stage_like_router(&u, local.path(), &format!("b-{format}"), T, payloads);
        let expected_aborted: Vec<i64> = if format == "csv" { vec![3, 5] } else { vec![3] };
        assert_eq!(
            aborted.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            expected_aborted,
            "{format}"
        );
        for (_, e) in &aborted {
            assert_eq!(e.code, ErrorCode::TransformFailed, "{format}");
        }
        assert!(
            aborted[0].1.message.contains("200 levels deep"),
            "{aborted:?}"
        );
        assert_eq!(batch.job_ids.len(), 5, "{format}");

        let out = u.upload(&batch).await;
        assert!(
            matches!(
                sole_outcome(&batch.job_ids, &out),
                Outcome::Succeeded { .. }
            ),
            "{format}: {out:?}"
        );
        let text = String::from_utf8(sshd.download(&dir.join(format!("b-{format}.out"))).unwrap())
            .unwrap();
        for i in 0..5 {
            assert!(text.contains(&format!("u{i}")), "{format}: {text}");
        }
        assert!(
            !text.contains("deep") && !text.contains("huge"),
            "{format}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staged_line_that_cannot_be_rendered_aborts_only_its_own_job() {
    let Some(sshd) = sshd("a_staged_line_that_cannot_be_rendered_aborts_only_its_own_job") else {
        return;
    };
    // Transform never stages such a line; this is the safety net behind it.
    let dir = remote_dir(&sshd, "unrenderable");
    let local = tempfile::tempdir().unwrap();
    let (u, _) = uploader(&key_config(
        &sshd,
        "csv",
        &format!("{}/{{batchID}}.csv", dir.display()),
    ));
    let path = local.path().join("b-bad.staged");
    let deep = format!("{{\"v\":{}1{}}}", "[".repeat(199), "]".repeat(199));
    std::fs::write(
        &path,
        format!("{{\"id\":\"u1\"}}\n{deep}\n{{\"id\":\"u3\"}}\n"),
    )
    .unwrap();
    let batch = batchrouter_core::StagedBatch {
        batch_id: "b-bad".into(),
        destination_id: "sftp-test".into(),
        destination_type: "SFTP".into(),
        bytes: std::fs::metadata(&path).unwrap().len(),
        path,
        job_ids: vec![11, 12, 13],
        attempt: 1,
        created_at: T,
    };
    let out = u.upload(&batch).await;
    validate_upload_output(&batch.job_ids, &out).unwrap();
    for (id, o) in &out.outcomes {
        match (id, o) {
            (12, Outcome::Aborted(e)) => {
                assert_eq!(e.code, ErrorCode::TransformFailed);
                assert!(e.message.contains("staged line 2"), "{}", e.message);
            }
            (11 | 13, Outcome::Failed(e)) => assert_eq!(e.code, ErrorCode::Internal),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(files_below(&dir), Vec::<String>::new(), "nothing published");
}
