//! Loading a config validates each destination through the registry it is
//! given and builds nothing: the types are the registry's, not a list the
//! loader knows.

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

/// A destination type that only counts how often it is asked to validate
/// and to build.
struct Counting {
    validated: &'static AtomicUsize,
    built: &'static AtomicUsize,
}

const KEYS: &[ConfigKey] = &[ConfigKey {
    name: "size",
    default: "required",
    doc: "A number.",
}];

impl Destination for Counting {
    fn name(&self) -> &'static str {
        "COUNTING"
    }

    fn config_keys(&self) -> &'static [ConfigKey] {
        KEYS
    }

    fn validate(&self, config: &serde_json::Value) -> Result<DestinationSettings, ConfigProblems> {
        self.validated.fetch_add(1, Ordering::SeqCst);
        match config.get("size").and_then(serde_json::Value::as_u64) {
            Some(n) => Ok(DestinationSettings::new("COUNTING", n)),
            None => Err(ConfigProblems(vec![
                "`size` must be a number".into(),
                "and another problem".into(),
            ])),
        }
    }

    fn build(
        &self,
        _: &DestinationSettings,
        _: &DestinationContext,
    ) -> Result<Arc<dyn AsyncDestinationManager>, ConfigProblems> {
        self.built.fetch_add(1, Ordering::SeqCst);
        Err(ConfigProblems::one("never built by the loader"))
    }
}

static VALIDATED: AtomicUsize = AtomicUsize::new(0);
static BUILT: AtomicUsize = AtomicUsize::new(0);
static COUNTING: Counting = Counting {
    validated: &VALIDATED,
    built: &BUILT,
};
static TYPES: &[&dyn Destination] = &[&COUNTING];
const REGISTRY: Registry = Registry::new(TYPES);

fn load(text: &str) -> Result<batchrouter_config::LoadedConfig, batchrouter_config::ConfigErrors> {
    load_str(
        text,
        FileFormat::Toml,
        Arc::new(MapEnv::new(Vec::<(String, String)>::new())),
        &REGISTRY,
    )
}

#[test]
fn loading_validates_through_the_given_registry_and_builds_nothing() {
    let ok = "[[destinations]]\nid = \"a\"\ntype = \"COUNTING\"\nconfig = { size = 3 }\n\
              [[destinations]]\nid = \"b\"\ntype = \"COUNTING\"\nenabled = false\nconfig = { size = 4 }\n";
    let before = VALIDATED.load(Ordering::SeqCst);
    let cfg = load(ok).unwrap();
    assert_eq!(
        VALIDATED.load(Ordering::SeqCst) - before,
        2,
        "each destination validated once"
    );
    assert_eq!(BUILT.load(Ordering::SeqCst), 0, "loading builds no manager");
    let a = cfg.destination("a").unwrap();
    assert_eq!(a.destination.name(), "COUNTING");
    assert_eq!(*a.validated.get::<u64>().unwrap(), 3);

    // Every problem of a type's validation is listed, under its destination.
    let bad = "[[destinations]]\nid = \"c\"\ntype = \"COUNTING\"\nconfig = { size = \"x\" }\n";
    let err = load(bad).unwrap_err().0;
    assert!(
        err.contains(&"destination `c` config: `size` must be a number".to_string()),
        "{err:?}"
    );
    assert!(
        err.contains(&"destination `c` config: and another problem".to_string()),
        "{err:?}"
    );

    // The known types are the registry's, not the shipped list.
    let err = load("[[destinations]]\nid = \"d\"\ntype = \"HTTP\"\n")
        .unwrap_err()
        .0;
    assert!(
        err[0].contains("unknown type `HTTP`") && err[0].contains("known types: COUNTING"),
        "{err:?}"
    );
    assert_eq!(BUILT.load(Ordering::SeqCst), 0);
}
