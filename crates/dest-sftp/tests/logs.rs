//! What the destination logs: the insecure-mode warning at build, loud
//! rejections, and never a secret.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use batchrouter_core::{Outcome, Timestamp, Uploader};
use batchrouter_testkit::sshd::Sshd;
use common::{key_config, stage, uploader};
use serde_json::json;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

fn subscriber(out: &Captured) -> impl tracing::Subscriber + Send + Sync {
    tracing_subscriber::fmt()
        .with_writer(out.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .finish()
}

#[test]
fn insecure_mode_warns_at_build() {
    let out = Captured::default();
    let cfg = json!({
        "host": "127.0.0.1", "username": "u", "authMethod": "passwordAuth", "password": "hunter2-secret",
        "fileFormat": "csv", "filePath": "{batchID}.csv", "insecureSkipHostKeyCheck": true,
    });
    tracing::subscriber::with_default(subscriber(&out), || {
        let _ = uploader(&cfg);
    });
    let text = out.text();
    assert!(text.contains("WARN"), "{text}");
    assert!(text.contains("insecureSkipHostKeyCheck = true"), "{text}");
    assert!(!text.contains("hunter2-secret"));

    // A verified config logs nothing at build.
    let out = Captured::default();
    let mut cfg = cfg;
    cfg["insecureSkipHostKeyCheck"] = json!(false);
    cfg["hostKeyFingerprint"] = json!("SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU");
    tracing::subscriber::with_default(subscriber(&out), || {
        let _ = uploader(&cfg);
    });
    assert_eq!(out.text(), "");
}

#[tokio::test(flavor = "current_thread")]
async fn rejections_are_loud_and_secrets_never_logged() {
    let Some(sshd) = Sshd::start_or_skip("rejections_are_loud_and_secrets_never_logged") else {
        return;
    };
    let out = Captured::default();
    let _guard = tracing::subscriber::set_default(subscriber(&out));
    let dir = sshd.upload_root().join("logs");
    let local = tempfile::tempdir().unwrap();
    let payloads = || vec![r#"{"id":"u1"}"#.to_string()];

    // Success with an inline key: one info line, no key material.
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
        text.contains("INFO") && text.contains("SFTP upload complete"),
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
