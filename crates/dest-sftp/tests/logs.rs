//! What the destination logs: the insecure-mode warning at build, loud
//! rejections, and never a secret.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use batchrouter_core::{Outcome, Timestamp, Uploader};
use batchrouter_testkit::logs::LogCapture;
use batchrouter_testkit::sshd::Sshd;
use common::{key_config, stage, uploader};
use serde_json::json;

#[test]
fn insecure_mode_warns_at_build() {
    let out = LogCapture::default();
    let cfg = json!({
        "host": "127.0.0.1", "username": "u", "authMethod": "passwordAuth", "password": "hunter2-secret",
        "fileFormat": "csv", "filePath": "{batchID}.csv", "insecureSkipHostKeyCheck": true,
    });
    tracing::subscriber::with_default(out.subscriber(tracing::Level::DEBUG), || {
        let _ = uploader(&cfg);
    });
    let text = out.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("insecureSkipHostKeyCheck = true"), "{text}");
    assert!(!text.contains("hunter2-secret"));

    // A verified config logs nothing at build.
    let out = LogCapture::default();
    let mut cfg = cfg;
    cfg["insecureSkipHostKeyCheck"] = json!(false);
    cfg["hostKeyFingerprint"] = json!("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU");
    tracing::subscriber::with_default(out.subscriber(tracing::Level::DEBUG), || {
        let _ = uploader(&cfg);
    });
    assert_eq!(out.text(), "");
}

#[tokio::test(flavor = "current_thread")]
async fn rejections_are_loud_and_secrets_never_logged() {
    let Some(sshd) = Sshd::start_or_skip("rejections_are_loud_and_secrets_never_logged") else {
        return;
    };
    let out = LogCapture::default();
    let _guard = tracing::subscriber::set_default(out.subscriber(tracing::Level::DEBUG));
    let dir = sshd.upload_root().join("logs");
    let local = tempfile::tempdir().unwrap();
    let payloads = || vec![r#"{"id":"u1"}"#.to_string()];

    // Success with an inline key: one debug line (the router logs the upload
    // at info), no key material.
    let cfg = key_config(&sshd, "csv", &format!("{}/{{batchID}}.csv", dir.display()));
    let (u, _) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-ok", Timestamp(0), payloads());
    assert!(matches!(
        u.upload(&batch).await.outcomes[0].1,
        Outcome::Succeeded { .. }
    ));

    // A wrong passphrase: aborted, logged at error level, passphrase hidden.
    let locked = sshd
        .generate_key("locked", "ed25519", "right words", true)
        .unwrap();
    let mut cfg = cfg.clone();
    cfg.as_object_mut().unwrap().remove("privateKey");
    cfg["privateKeyPath"] = json!(locked.to_str().unwrap());
    cfg["privateKeyPassphrase"] = json!("wrong words");
    let (u, _) = uploader(&cfg);
    let batch = stage(&u, local.path(), "b-bad", Timestamp(0), payloads());
    assert!(matches!(
        u.upload(&batch).await.outcomes[0].1,
        Outcome::Aborted(_)
    ));

    let text = out.text();
    assert!(
        text.lines()
            .any(|l| l.contains("DEBUG") && l.contains("SFTP upload complete")),
        "{text}"
    );
    assert!(
        text.contains("ERROR") && text.contains("rejected the upload"),
        "{text}"
    );
    for secret in [
        "wrong words",
        "right words",
        "PRIVATE KEY",
        &sshd.client_key()[40..80],
    ] {
        assert!(
            !text.contains(secret),
            "`{secret}` leaked into the logs:\n{text}"
        );
    }
}
