//! RudderStack compatibility of the router keys: RudderStack names keep
//! their RudderStack meaning, ours were renamed where they differed, and
//! RudderStack keys we do not use are accepted and reported (never silently).

use std::sync::Arc;
use std::time::Duration;

use batchrouter_config::{load_str, render_effective, Env, MapEnv};
use config::FileFormat;

fn env(vars: &[(&str, &str)]) -> Arc<dyn Env> {
    Arc::new(MapEnv::new(
        vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    ))
}

const WEB: &str = r#"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:1/x"
"#;

#[test]
fn rudderstack_variables_keep_their_rudderstack_meaning() {
    let c = load_str(
        WEB,
        FileFormat::Toml,
        env(&[
            // RudderStack: the age at which a staged batch is uploaded, in minutes.
            ("RSERVER_BATCH_ROUTER_ASYNC_UPLOAD_TIMEOUT", "5"),
            // RudderStack: attempts, not retries.
            ("RSERVER_BATCH_ROUTER_HTTP_MAX_FAILED_COUNT_FOR_JOB", "10"),
            ("RSERVER_BATCH_ROUTER_MAX_PAYLOAD_SIZE_IN_BYTES", "1048576"),
            // RudderStack: unprocessed jobs are aborted after this, in hours.
            ("RSERVER_BATCH_ROUTER_JOB_RETENTION", "48"),
        ]),
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
    assert!(c.ignored.is_empty(), "{:?}", c.ignored);
}

#[test]
fn renamed_keys_and_older_names_resolve() {
    let text = format!(
        "[BatchRouter]\nuploadCallTimeout = \"90s\"\nfinishedJobRetention = \"2d\"\nuploadFreq = \"3s\"\n{WEB}[destinations.router]\nuploadInterval = 2\n"
    );
    let c = load_str(&text, FileFormat::Toml, env(&[])).unwrap();
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
    let c = load_str(
        &text,
        FileFormat::Toml,
        env(&[
            ("RSERVER_BATCH_ROUTER_ASYNC_UPLOAD_WORKER_TIMEOUT", "10s"),
            (
                "RSERVER_BATCH_ROUTER_RSOURCES_MAX_FAILED_COUNT_FOR_JOB",
                "3",
            ),
        ]),
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
    let err = load_str(
        "[BatchRouter]\nisolationMod = 1\n[BatchRouter.Limiter.read]\nlimt = 5\n",
        FileFormat::Toml,
        env(&[]),
    )
    .unwrap_err();
    assert_eq!(err.0.len(), 2, "{err}");
}
