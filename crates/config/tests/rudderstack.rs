//! RudderStack compatibility of the router keys: RudderStack names keep
//! their RudderStack meaning, ours were renamed where they differed, and
//! RudderStack keys we do not use are accepted and reported (never silently).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::time::Duration;

use batchrouter_config::render_effective;
use common::{load_toml, problems};

const WEB: &str = r#"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:1/x"
"#;

#[test]
fn rudderstack_variables_keep_their_rudderstack_meaning() {
    let c = load_toml(
        WEB,
        &[
            // RudderStack: the age at which a staged batch is uploaded, in minutes.
            ("RSERVER_BATCH_ROUTER_ASYNC_UPLOAD_TIMEOUT", "5"),
            // RudderStack: attempts, not retries.
            ("RSERVER_BATCH_ROUTER_HTTP_MAX_FAILED_COUNT_FOR_JOB", "10"),
            ("RSERVER_BATCH_ROUTER_MAX_PAYLOAD_SIZE_IN_BYTES", "1048576"),
            // RudderStack: unprocessed jobs are aborted after this, in hours.
            ("RSERVER_BATCH_ROUTER_JOB_RETENTION", "48"),
        ],
    )
    .unwrap();
    let s = &c.destination("web").unwrap().settings;
    assert_eq!(s.upload_freq, Duration::from_secs(300));
    assert_eq!(
        s.upload_timeout,
        Duration::from_secs(600),
        "the call timeout is not what asyncUploadTimeout sets any more"
    );
    assert_eq!(s.max_retries, 9);
    assert_eq!(s.max_upload_bytes, 1 << 20);
    assert_eq!(c.global.job_retention, Duration::from_secs(48 * 3600));
    assert_eq!(
        c.global.finished_job_retention,
        Duration::from_secs(7 * 86400),
        "jobRetention no longer deletes finished jobs"
    );
    // Set without their new names: warned as meaning changes, nothing else.
    let keys: Vec<&str> = c.ignored.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        ["BatchRouter.asyncUploadTimeout", "BatchRouter.jobRetention"],
        "{:?}",
        c.ignored
    );
}

#[test]
fn renamed_keys_set_without_their_new_names_are_warned() {
    let toml = format!(
        "[BatchRouter]\nasyncUploadTimeout = \"10m\"\njobRetention = \"7d\"\n\
         [BatchRouter.HTTP]\nasyncUploadTimeout = \"1m\"\nuploadCallTimeout = \"2m\"\n{WEB}\
         [destinations.router]\nasyncUploadTimeout = \"3m\"\n"
    );
    let c = load_toml(&toml, &[]).unwrap();
    let lines: Vec<String> = c.ignored.iter().map(|i| i.to_string()).collect();
    // [BatchRouter.HTTP] and web's table are covered by HTTP's uploadCallTimeout.
    assert_eq!(lines.len(), 2, "{lines:#?}");
    for (line, (key, other)) in lines.iter().zip([
        ("BatchRouter.asyncUploadTimeout", "uploadCallTimeout"),
        ("BatchRouter.jobRetention", "finishedJobRetention"),
    ]) {
        assert!(line.starts_with(key), "{line}");
        assert!(line.contains(&format!("{other} is not")), "{line}");
        assert!(line.contains("used to be"), "{line}");
    }
    // A destination's own table, with the new name set nowhere.
    let toml = format!("{WEB}[destinations.router]\nasyncUploadTimeout = \"3m\"\n");
    let c = load_toml(&toml, &[]).unwrap();
    let lines: Vec<String> = c.ignored.iter().map(|i| i.to_string()).collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(
        lines[0].starts_with("asyncUploadTimeout is set (router table of destination `web`) and uploadCallTimeout is not"),
        "{}",
        lines[0]
    );
    // The new name set in a broader scope covers narrower ones.
    let toml = format!(
        "[BatchRouter]\nuploadCallTimeout = \"10m\"\n[BatchRouter.HTTP]\n\
         asyncUploadTimeout = \"1m\"\n{WEB}[destinations.router]\nasyncUploadTimeout = \"3m\"\n"
    );
    let c = load_toml(&toml, &[]).unwrap();
    assert!(c.ignored.is_empty(), "{:?}", c.ignored);
    // With the new names set too, the config is read as meant: no warning.
    let toml = "[BatchRouter]\nasyncUploadTimeout = \"10m\"\nuploadCallTimeout = \"10m\"\n\
                jobRetention = \"7d\"\nfinishedJobRetention = \"7d\"\n"
        .to_string()
        + WEB;
    let c = load_toml(&toml, &[]).unwrap();
    assert!(c.ignored.is_empty(), "{:?}", c.ignored);
}

#[test]
fn store_wide_retention_keys_are_refused_per_type_and_per_destination() {
    for (toml, vars, at) in [
        (
            format!("[BatchRouter.HTTP]\njobRetention = \"1h\"\n{WEB}"),
            vec![],
            "[BatchRouter.HTTP]",
        ),
        (
            format!("{WEB}[destinations.router]\nfinishedJobRetention = \"1h\"\n"),
            vec![],
            "destination `web`",
        ),
        (
            WEB.to_string(),
            vec![("BatchRouter.HTTP.finishedJobRetention", "1h")],
            "BatchRouter.HTTP.finishedJobRetention",
        ),
    ] {
        let err = load_toml(&toml, &vars).unwrap_err().to_string();
        assert!(err.contains("global-only"), "{err}");
        assert!(err.contains("Retention"), "{err}");
        assert!(err.contains(at), "{at}: {err}");
    }
}

#[test]
fn renamed_keys_and_older_names_resolve() {
    let text = format!(
        "[BatchRouter]\nuploadCallTimeout = \"90s\"\nfinishedJobRetention = \"2d\"\nuploadFreq = \"3s\"\n{WEB}[destinations.router]\nuploadInterval = 2\n"
    );
    let c = load_toml(&text, &[]).unwrap();
    assert_eq!(c.global.upload_timeout, Duration::from_secs(90));
    assert_eq!(
        c.global.finished_job_retention,
        Duration::from_secs(2 * 86400)
    );
    assert_eq!(
        c.global.upload_freq,
        Duration::from_secs(3),
        "uploadFreq still sets the batch age"
    );
    let web = &c.destination("web").unwrap().settings;
    assert_eq!(
        web.upload_freq,
        Duration::from_secs(120),
        "uploadInterval is in minutes"
    );
    let out = render_effective(&c);
    assert!(
        out.contains(
            "asyncUploadTimeout = \"3s\"  # config file BatchRouter.uploadFreq, as uploadFreq"
        ),
        "{out}"
    );
    assert!(
        out.contains("asyncUploadTimeout = \"2m\"  # destination router table, as uploadInterval"),
        "{out}"
    );
}

#[test]
fn ignored_rudderstack_keys_are_accepted_and_reported_by_name() {
    let text = format!(
        "[BatchRouter]\nisolationMode = \"workspace\"\n[BatchRouter.Limiter.read]\nlimit = 5\n[BatchRouter.HTTP.partitionWorker]\nconcurrency = 4\n{WEB}[destinations.router]\nmaxConsecutiveFailures = 3\n"
    );
    let c = load_toml(
        &text,
        &[
            ("RSERVER_BATCH_ROUTER_ASYNC_UPLOAD_WORKER_TIMEOUT", "10s"),
            (
                "RSERVER_BATCH_ROUTER_RSOURCES_MAX_FAILED_COUNT_FOR_JOB",
                "3",
            ),
        ],
    )
    .unwrap();
    let keys: Vec<&str> = c.ignored.iter().map(|i| i.key.as_str()).collect();
    for key in [
        "BatchRouter.isolationMode",
        "BatchRouter.Limiter.read.limit",
        "BatchRouter.HTTP.partitionWorker.concurrency",
        "BatchRouter.asyncUploadWorkerTimeout",
        "BatchRouter.RSources.maxFailedCountForJob",
        "maxConsecutiveFailures",
    ] {
        assert!(keys.contains(&key), "{key} reported: {keys:?}");
    }
    let env_one = c
        .ignored
        .iter()
        .find(|i| i.key == "BatchRouter.asyncUploadWorkerTimeout")
        .unwrap();
    assert!(
        env_one
            .to_string()
            .contains("RSERVER_BATCH_ROUTER_ASYNC_UPLOAD_WORKER_TIMEOUT"),
        "says where it was set: {env_one}"
    );
    // Keys that are neither ours nor RudderStack's stay errors.
    let both = problems("[BatchRouter]\nisolationMod = 1\n[BatchRouter.Limiter.read]\nlimt = 5\n");
    assert_eq!(both.len(), 2, "{both:?}");
}
