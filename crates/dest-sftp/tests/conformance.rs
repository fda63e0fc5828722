//! The SFTP destination against the manager conformance suite
//! (`batchrouter_testkit::conformance`), uploading to a real OpenSSH sshd
//! (testkit's harness) whose upload root is read back from disk. SFTP
//! neither throttles nor rejects single records, and decides every job at
//! upload; the test pins those checks as not applicable.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::path::PathBuf;
use std::sync::Arc;

use batchrouter_core::{AsyncDestinationManager, ConfigProblems, DestinationContext};
use batchrouter_testkit::conformance::{occurrences_below, run_all, Target};
use batchrouter_testkit::sshd::Sshd;
use serde_json::{json, Value};

struct Sftp {
    sshd: Sshd,
    remote: PathBuf,
}

impl Target for Sftp {
    fn destination_type(&self) -> &str {
        batchrouter_dest_sftp::DESTINATION_TYPE
    }

    fn config(&self) -> Value {
        json!({
            "host": self.sshd.host(),
            "port": self.sshd.port(),
            "username": self.sshd.user(),
            "authMethod": "keyAuth",
            "privateKey": self.sshd.client_key(),
            "fileFormat": "csv",
            "filePath": format!("{}/{{batchID}}.csv", self.remote.display()),
            "knownHosts": self.sshd.known_hosts_path().to_str().unwrap(),
            "connectTimeout": "2s",
            "ioTimeout": "5s",
        })
    }

    fn build(
        &self,
        ctx: &DestinationContext,
        config: &Value,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        batchrouter_dest_sftp::SftpDestination.validate_and_build(ctx, config)
    }

    fn payload(&self, key: &str) -> String {
        json!({"id": key, "name": "conformance"}).to_string()
    }

    fn received(&self, key: &str) -> u32 {
        occurrences_below(&self.remote, key)
    }

    fn bad_payloads(&self) -> Vec<String> {
        vec!["[1, 2, 3]".into()]
    }

    fn starts_imports(&self) -> bool {
        false
    }

    fn secrets(&self) -> Vec<String> {
        let key = self.sshd.client_key();
        vec![
            key[40..80].to_string(),
            key[key.len() - 80..key.len() - 40].to_string(),
        ]
    }

    fn debug_views(&self, config: &Value) -> Vec<String> {
        vec![format!(
            "{:?}",
            batchrouter_dest_sftp::Settings::from_config(config)
        )]
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_conforms_against_real_sshd() {
    let Some(sshd) = Sshd::start_or_skip("sftp_conforms_against_real_sshd") else {
        return;
    };
    let remote = sshd.upload_root().join("conformance");
    let report = run_all(&Sftp { sshd, remote }).await;
    assert_eq!(
        report.not_applicable(),
        ["restart", "stats_by_job_id", "throttling"],
        "{report:?}"
    );
}
