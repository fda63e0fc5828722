//! The config rules users rely on: precedence, `${ENV}`, unknown keys with
//! suggestions, every problem at once, formats and redaction.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

mod common;

use std::time::Duration;

use batchrouter_config::{render_effective, LogFormat};
use common::{env, load, load_str, load_toml, problems};
use config::FileFormat;

const BASE: &str = r#"
[store]
url = "sqlite:///tmp/x.db"

[BatchRouter]
maxRetries = 1
uploadFreq = "20s"

[BatchRouter.HTTP]
maxRetries = 2

[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:9/in"

[[destinations]]
id = "own"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:9/in"
[destinations.router]
maxRetries = 9
"#;

fn retries(vars: &[(&str, &str)], id: &str) -> u32 {
    let c = load_toml(BASE, vars).unwrap();
    c.destination(id).unwrap().settings.max_retries
}

#[test]
fn router_keys_follow_the_documented_precedence() {
    // file [BatchRouter.HTTP] beats file [BatchRouter]
    assert_eq!(retries(&[], "web"), 2);
    // the destination's own router table beats everything
    assert_eq!(retries(&[("BatchRouter.HTTP.maxRetries", "5")], "own"), 9);
    // env (dotted name) beats the file
    assert_eq!(retries(&[("BatchRouter.HTTP.maxRetries", "5")], "web"), 5);
    // env (RudderStack name) beats the file too
    assert_eq!(
        retries(&[("RSERVER_BATCH_ROUTER_HTTP_MAX_RETRIES", "6")], "web"),
        6
    );
    // a global env value does not beat the file's per-type value...
    assert_eq!(
        retries(&[("RSERVER_BATCH_ROUTER_MAX_RETRIES", "7")], "web"),
        2
    );
    // ...but beats the file's global value
    let c = load_toml(BASE, &[("RSERVER_BATCH_ROUTER_UPLOAD_FREQ", "45")]).unwrap();
    assert_eq!(
        c.destination("web").unwrap().settings.upload_freq,
        Duration::from_secs(45)
    );
    assert_eq!(
        c.destination("web").unwrap().settings.upload_freq,
        c.global.upload_freq
    );
    // and the built-in default is last
    assert_eq!(
        c.destination("web").unwrap().settings.max_events_in_batch,
        10_000
    );
    // RudderStack's ABATCH spelling reaches maxEventsInABatch
    let c = load_toml(
        BASE,
        &[("RSERVER_BATCH_ROUTER_HTTP_MAX_EVENTS_IN_ABATCH", "77")],
    )
    .unwrap();
    assert_eq!(
        c.destination("web").unwrap().settings.max_events_in_batch,
        77
    );
}

#[test]
fn missing_environment_variables_are_named() {
    let text = r#"
[server]
authToken = "${BR_TOKEN}"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "${BR_URL}"
headers = { Authorization = "Bearer ${BR_SECRET}" }
"#;
    let err = load_toml(text, &[("BR_URL", "http://127.0.0.1:1/x")]).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("`BR_TOKEN` is not set"), "{msg}");
    assert!(msg.contains("`BR_SECRET` is not set"), "{msg}");
    assert!(msg.contains("server.authToken"), "says where: {msg}");
    let ok = load_toml(
        text,
        &[
            ("BR_URL", "http://127.0.0.1:1/x"),
            ("BR_TOKEN", "t"),
            ("BR_SECRET", "s"),
        ],
    )
    .unwrap();
    assert_eq!(ok.server.auth_token.unwrap().expose(), "t");
}

#[test]
fn unknown_keys_get_suggestions_and_every_problem_is_listed() {
    let text = r#"
[sever]
listen = "x"
[store]
ulr = "sqlite://a.db"
[BatchRouter]
maxRetrys = 3
[BatchRouter.HTTTP]
maxRetries = 1
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:1/x"
maxInFligth = 3
[[destinations]]
id = "two"
type = "KLAVIYO"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://127.0.0.1:1/x"
"#;
    let err = load_toml(text, &[]).unwrap_err();
    let all = err.0.join("\n");
    for expected in [
        "unknown key `sever` (did you mean `server`?)",
        "unknown key `ulr` (did you mean `url`?)",
        "unknown router key `maxRetrys` (did you mean `maxRetries`?)",
        "[BatchRouter.HTTTP]: not a destination type (did you mean `HTTP`?)",
        "destination `web` config: unknown key `maxInFligth` (did you mean `maxInFlight`?)",
        "destination `two`: unknown type `KLAVIYO`",
        "id `web` is used twice",
    ] {
        assert!(all.contains(expected), "missing `{expected}` in:\n{all}");
    }
    assert!(err.0.len() >= 7, "{all}");
}

#[test]
fn bad_values_are_reported_with_their_origin() {
    let err = load_toml(BASE, &[("RSERVER_BATCH_ROUTER_HTTP_MAX_RETRIES", "lots")]).unwrap_err();
    let all = err.0.join("\n");
    assert!(
        all.contains("environment variable RSERVER_BATCH_ROUTER_HTTP_MAX_RETRIES"),
        "{all}"
    );
    let both = problems("[server]\nlisten = \"localhost\"\nmaxBodyBytes = \"big\"\n");
    assert_eq!(both.len(), 2, "{both:?}");
}

#[test]
fn defaults_apply_when_sections_are_missing() {
    let c = load_toml("", &[]).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.max_body_bytes, 16 << 20);
    assert!(c.server.auth_token.is_none());
    assert_eq!(c.store.url.expose(), "sqlite://./data/batchrouter.db");
    assert_eq!(c.logging.format, LogFormat::Text);
    assert_eq!(
        c.global.finished_job_retention,
        Duration::from_secs(7 * 86400)
    );
    assert!(c.destinations.is_empty());
}

#[test]
fn yaml_and_json_are_accepted_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("c.yaml");
    std::fs::write(
        &yaml,
        "server:\n  maxBodyBytes: 1MiB\nBatchRouter:\n  HTTP:\n    maxRetries: 4\ndestinations:\n  - id: web\n    type: HTTP\n    config:\n      url: http://127.0.0.1:1/x\n",
    )
    .unwrap();
    let c = load(&yaml, env(&[])).unwrap();
    assert_eq!(c.server.max_body_bytes, 1 << 20);
    assert_eq!(c.destination("web").unwrap().settings.max_retries, 4);
    let json = dir.path().join("c.json");
    std::fs::write(&json, r#"{"destinations": [{"id": "web", "type": "HTTP", "enabled": false, "config": {"url": "http://127.0.0.1:1/x"}}]}"#).unwrap();
    let c = load(&json, env(&[])).unwrap();
    assert!(!c.destination("web").unwrap().enabled);
    let err = load(&dir.path().join("c.ini"), env(&[])).unwrap_err();
    assert!(err.to_string().contains("unknown config format"), "{err}");
}

#[test]
fn effective_config_redacts_every_secret() {
    let text = r#"
[server]
authToken = "tok-SECRET-1"
[store]
url = "postgres://br:pw-SECRET-2@127.0.0.1:5432/br"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "http://user:SECRET-5@127.0.0.1:1/x?key=SECRET-6"
headers = { Authorization = "Bearer SECRET-3", X-Api-Key = "SECRET-4" }
"#;
    let c = load_toml(text, &[]).unwrap();
    let out = render_effective(&c);
    assert!(!out.contains("SECRET"), "{out}");
    assert!(out.contains("postgres://br:***@127.0.0.1:5432/br"), "{out}");
    assert!(out.contains("maxRetries = \"3\"  # default"), "{out}");
    assert!(!format!("{c:?}").contains("SECRET"));
    assert!(!format!("{:?}", c.destinations[0]).contains("SECRET"));
}

#[test]
fn the_example_config_documents_a_valid_configuration() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config/batchrouter.example.toml"
    );
    let vars = [
        ("WEBHOOK_TOKEN", "t"),
        ("MARKETO_CLIENT_ID", "id"),
        ("MARKETO_CLIENT_SECRET", "secret"),
        ("KLAVIYO_API_KEY", "pk_test"),
    ];
    // Only the SFTP key and known_hosts files, which do not exist on this
    // machine, may be reported.
    match load(std::path::Path::new(path), env(&vars)) {
        Ok(c) => assert_eq!(c.destinations.len(), 4),
        Err(e) => {
            for p in &e.0 {
                assert!(
                    p.starts_with("destination `partner-drop` config: `privateKeyPath`")
                        || p.contains("`knownHosts`"),
                    "{p}"
                );
            }
        }
    }
    let text = std::fs::read_to_string(path).unwrap();
    for key in batchrouter_router::settings::KEYS {
        assert!(
            text.contains(&format!("\n{} = ", key.name)),
            "example config lacks {}",
            key.name
        );
    }
}

/// The problems as one text, checked never to carry a keyless parser error.
fn problems_of(text: &str, format: FileFormat, vars: &[(&str, &str)]) -> String {
    let err = load_str(text, format, env(vars)).unwrap_err();
    let all = err.0.join("\n");
    assert!(
        !all.contains("cannot parse config: number too large"),
        "keyless: {all}"
    );
    all
}

#[test]
fn out_of_range_numbers_in_the_file_name_their_key() {
    let toml = "[BatchRouter]\nmaxRetries = 2\nmaxEventsInABatch = 99999999999999999999999\nuploadFreq = \"99999999999999999999s\"\n";
    let all = problems_of(toml, FileFormat::Toml, &[]);
    assert!(
        all.contains(
            "BatchRouter.maxEventsInABatch (line 3): 99999999999999999999999 is out of range"
        ),
        "{all}"
    );
    assert!(all.contains("uploadFreq"), "{all}");
    assert!(all.contains("too large a duration"), "{all}");
    assert_eq!(all.lines().count(), 2, "every problem, each once: {all}");

    let yaml = "BatchRouter:\n  maxEventsInABatch: 99999999999999999999999\n";
    let all = problems_of(yaml, FileFormat::Yaml, &[]);
    assert!(all.contains("maxEventsInABatch"), "{all}");
    let json = r#"{"BatchRouter": {"maxEventsInABatch": 99999999999999999999999}}"#;
    let all = problems_of(json, FileFormat::Json, &[]);
    assert!(all.contains("maxEventsInABatch"), "{all}");

    // Destination tables and the server section too.
    let toml = "[server]\nmaxBodyBytes = 99999999999999999999\n[[destinations]]\nid = \"web\"\ntype = \"HTTP\"\n[destinations.config]\nurl = \"http://127.0.0.1:1/x\"\nmaxInFlight = 99999999999999999999\n";
    let all = problems_of(toml, FileFormat::Toml, &[]);
    assert!(all.contains("server.maxBodyBytes (line 2)"), "{all}");
    assert!(
        all.contains("destinations[0].config.maxInFlight (line 8)"),
        "{all}"
    );
}

#[test]
fn out_of_range_values_from_the_environment_name_their_key() {
    for (var, key) in [
        (
            "RSERVER_BATCH_ROUTER_MAX_EVENTS_IN_ABATCH",
            "maxEventsInABatch",
        ),
        ("RSERVER_BATCH_ROUTER_HTTP_UPLOAD_FREQ", "uploadFreq"),
        ("BatchRouter.leaseTimeout", "leaseTimeout"),
        ("RSERVER_BATCH_ROUTER_MAX_UPLOAD_LIMIT", "MaxUploadLimit"),
    ] {
        for value in ["99999999999999999999999", "99999999999999999999s"] {
            let all = problems_of(BASE, FileFormat::Toml, &[(var, value)]);
            assert!(all.contains(key), "{var}={value}: {all}");
            assert!(
                all.contains(&format!("environment variable {var}")),
                "{var}={value}: {all}"
            );
        }
    }
}

#[test]
fn urls_in_problems_and_output_keep_no_secrets() {
    // A Klaviyo baseUrl with its key in the query is refused; the problem
    // names the key but not the secret.
    let text = r#"
[[destinations]]
id = "kl"
type = "KLAVIYO_BULK_UPLOAD"
[destinations.config]
privateApiKey = "pk_SECRET_1"
baseUrl = "https://a.klaviyo.test/api?key=pk_SECRET_2&x=1"
"#;
    let all = problems_of(text, FileFormat::Toml, &[]);
    assert!(all.contains("baseUrl"), "{all}");
    assert!(!all.contains("SECRET"), "{all}");
    assert!(
        all.contains("https://a.klaviyo.test/api?key=***&x=***"),
        "{all}"
    );

    // What check-config prints keeps query keys and masks their values.
    let text = r#"
[store]
url = "postgres://br:SECRET_3@127.0.0.1:5432/br?sslmode=disable&password=SECRET_4"
[[destinations]]
id = "web"
type = "HTTP"
[destinations.config]
url = "https://hooks.test/in?key=SECRET_5&team=SECRET_6#SECRET_7"
"#;
    let c = load_toml(text, &[]).unwrap();
    let out = render_effective(&c);
    assert!(!out.contains("SECRET"), "{out}");
    assert!(
        out.contains("url = \"https://hooks.test/in?key=***&team=***#***\""),
        "{out}"
    );
    assert!(
        out.contains("postgres://br:***@127.0.0.1:5432/br?sslmode=***&password=***"),
        "{out}"
    );
    assert!(!format!("{c:?}").contains("SECRET"));
}
