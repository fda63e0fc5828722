//! Each destination's docs page lists exactly the keys (and defaults) its
//! registry entry declares, so the two cannot drift.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a panic is the failure report"
)]

use std::path::Path;

use batchrouter_destinations::REGISTRY;

/// The `| key | default | meaning |` table of a docs page: (key, default)
/// with backticks removed.
fn key_table(page: &str) -> Vec<(String, String)> {
    let mut rows = page
        .lines()
        .skip_while(|l| l.trim() != "| key | default | meaning |")
        .skip(2);
    let mut out = Vec::new();
    for line in rows.by_ref() {
        let Some(inner) = line
            .trim()
            .strip_prefix('|')
            .and_then(|l| l.strip_suffix('|'))
        else {
            break;
        };
        let cells: Vec<&str> = inner.split('|').map(str::trim).collect();
        out.push((cells[0].replace('`', ""), cells[1].replace('`', "")));
    }
    out
}

#[test]
fn docs_pages_list_the_declared_keys_and_defaults() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/destinations");
    for t in REGISTRY.types() {
        let path = docs.join(format!("{}.md", t.name()));
        let page =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let documented = key_table(&page);
        let declared: Vec<(String, String)> = t
            .config_keys()
            .iter()
            .map(|k| (k.name.to_string(), k.default.to_string()))
            .collect();
        assert_eq!(documented, declared, "{}", path.display());
    }
}
