//! Managers are built once, when the daemon starts: loading the config only
//! validates, and disabled destinations are never built.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use batchrouter_config::{load_str, FileFormat, MapEnv};
use batchrouter_core::{
    AsyncDestinationManager, ConfigKey, ConfigProblems, Destination, DestinationContext,
    DestinationSettings, Registry,
};
use batchrouter_destinations::REGISTRY;

/// The shipped `HTTP` type, counting validations and builds.
struct CountingHttp;

static VALIDATED: AtomicUsize = AtomicUsize::new(0);
static BUILT: AtomicUsize = AtomicUsize::new(0);

fn http() -> &'static dyn Destination {
    REGISTRY.find("HTTP").unwrap()
}

impl Destination for CountingHttp {
    fn name(&self) -> &'static str {
        http().name()
    }

    fn config_keys(&self) -> &'static [ConfigKey] {
        http().config_keys()
    }

    fn validate(&self, config: &serde_json::Value) -> Result<DestinationSettings, ConfigProblems> {
        VALIDATED.fetch_add(1, Ordering::SeqCst);
        http().validate(config)
    }

    fn build(
        &self,
        settings: &DestinationSettings,
        ctx: &DestinationContext,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        BUILT.fetch_add(1, Ordering::SeqCst);
        http().build(settings, ctx)
    }
}

static TYPES: &[&dyn Destination] = &[&CountingHttp];
const COUNTING: Registry = Registry::new(TYPES);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_enabled_destination_is_built_once_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{d}/jobs.db\"\nstagingDir = \"{d}/staging\"\n\
         [[destinations]]\nid = \"on\"\ntype = \"HTTP\"\nconfig = {{ url = \"http://127.0.0.1:1/in\" }}\n\
         [[destinations]]\nid = \"off\"\ntype = \"HTTP\"\nenabled = false\nconfig = {{ url = \"http://127.0.0.1:1/in\" }}\n",
        d = dir.path().display()
    );
    let env = Arc::new(MapEnv::new(Vec::<(String, String)>::new()));
    let cfg = load_str(&text, FileFormat::Toml, env, &COUNTING).unwrap();
    assert_eq!(VALIDATED.load(Ordering::SeqCst), 2);
    assert_eq!(BUILT.load(Ordering::SeqCst), 0, "loading builds nothing");
    let app = batchrouterd::app::start(&cfg).await.unwrap();
    assert_eq!(
        BUILT.load(Ordering::SeqCst),
        1,
        "only the enabled one, once"
    );
    assert_eq!(
        VALIDATED.load(Ordering::SeqCst),
        2,
        "start does not validate again"
    );
    app.shutdown().await;
}
