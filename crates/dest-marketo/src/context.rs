//! The import context persisted by the router before the first poll: all a
//! (possibly restarted) process needs to poll the import and map its
//! per-row results back to jobs. Nothing about an import lives in memory.
//!
//! Version 2 (written now) keeps the normalised lookup values as a list in
//! row order beside the job ids, which costs a fraction of the memory of the
//! key→job object version 1 used; version 1 contexts, already persisted by
//! earlier releases, are still read.

use std::collections::{BTreeMap, HashMap};

use batchrouter_core::JobId;
use serde::{Deserialize, Serialize};

/// Version written into new contexts; bump when the shape changes.
pub const CONTEXT_VERSION: u32 = 2;

/// The first version, whose `keys` is an object of lookup value → job id.
pub const LEGACY_CONTEXT_VERSION: u32 = 1;

/// One Marketo import as stored with the router's import row.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportContext {
    /// Shape version, so a future release can read old contexts.
    pub version: u32,
    /// Marketo batch id, the key of every later call.
    pub batch_id: u64,
    /// Marketo import id, for operators correlating with Marketo's UI.
    pub import_id: String,
    /// The lookup field (CSV column) result rows are matched by.
    pub lookup_field: String,
    /// Rows in the uploaded file, the progress total.
    pub rows: u64,
    /// Bytes of the uploaded file.
    pub file_bytes: u64,
    /// Position of this file among the batch's import files (1-based).
    pub part: u32,
    /// Number of import files the batch was split into.
    pub parts: u32,
    /// The jobs of the file in row order (version 2). The router hands back
    /// only the jobs still importing, sorted by id, so the order that pairs
    /// them with `keys` has to be kept here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_ids: Vec<JobId>,
    /// The normalised lookup values: a list paired with `job_ids`
    /// (version 2), or an object of value → job (version 1).
    pub keys: Keys,
}

/// The lookup values of an import's rows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Keys {
    /// Version 2: one value per row, in the order of `job_ids`.
    InRowOrder(Vec<String>),
    /// Version 1: value → job.
    ByValue(BTreeMap<String, JobId>),
}

/// The part of a context `poll` needs; the keys are skipped, not decoded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContextHeader {
    /// Shape version.
    pub version: u32,
    /// Marketo batch id.
    pub batch_id: u64,
    /// Rows in the uploaded file.
    pub rows: u64,
}

impl ContextHeader {
    /// Reads the header of a persisted context without copying it.
    pub fn from_value(value: &serde_json::Value) -> Result<ContextHeader, String> {
        let header = ContextHeader::deserialize(value)
            .map_err(|e| format!("unreadable Marketo import context: {e}"))?;
        check_version(header.version)?;
        Ok(header)
    }
}

fn check_version(version: u32) -> Result<(), String> {
    if version == CONTEXT_VERSION || version == LEGACY_CONTEXT_VERSION {
        Ok(())
    } else {
        Err(format!(
            "Marketo import context version {version} is not supported (this build reads \
             {LEGACY_CONTEXT_VERSION} and {CONTEXT_VERSION})"
        ))
    }
}

impl ImportContext {
    /// Reads a persisted context (without copying it), explaining what is
    /// wrong when it cannot.
    pub fn from_value(value: &serde_json::Value) -> Result<ImportContext, String> {
        let ctx = ImportContext::deserialize(value)
            .map_err(|e| format!("unreadable Marketo import context: {e}"))?;
        check_version(ctx.version)?;
        match (&ctx.keys, ctx.version) {
            (Keys::InRowOrder(keys), CONTEXT_VERSION) if keys.len() == ctx.job_ids.len() => {}
            (Keys::InRowOrder(keys), CONTEXT_VERSION) => {
                return Err(format!(
                    "Marketo import context lists {} lookup values for {} jobs",
                    keys.len(),
                    ctx.job_ids.len()
                ))
            }
            (Keys::ByValue(_), LEGACY_CONTEXT_VERSION) => {}
            _ => {
                return Err(format!(
                    "Marketo import context version {} has keys of the other version's shape",
                    ctx.version
                ))
            }
        }
        Ok(ctx)
    }

    /// The JSON the router persists.
    #[allow(
        clippy::expect_used,
        reason = "derived Serialize over numbers, strings and string-keyed data cannot fail"
    )]
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("an import context always serialises")
    }

    /// Normalised lookup value → job, built when results are matched.
    pub fn lookup(&self) -> HashMap<&str, JobId> {
        match &self.keys {
            Keys::InRowOrder(keys) => keys
                .iter()
                .zip(&self.job_ids)
                .map(|(k, id)| (k.as_str(), *id))
                .collect(),
            Keys::ByValue(map) => map.iter().map(|(k, id)| (k.as_str(), *id)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> ImportContext {
        ImportContext {
            version: CONTEXT_VERSION,
            batch_id: 7,
            import_id: "7".into(),
            lookup_field: "email".into(),
            rows: 2,
            file_bytes: 20,
            part: 1,
            parts: 1,
            job_ids: vec![42, 9],
            keys: Keys::InRowOrder(vec!["a@b.c".into(), "z@b.c".into()]),
        }
    }

    #[test]
    fn round_trips_and_rejects_foreign_shapes() {
        let ctx = ctx();
        let v = ctx.to_value();
        assert_eq!(v["batchId"], 7);
        assert_eq!(v["keys"], json!(["a@b.c", "z@b.c"]));
        assert_eq!(v["jobIds"], json!([42, 9]));
        assert_eq!(ImportContext::from_value(&v).unwrap(), ctx);
        assert_eq!(
            ContextHeader::from_value(&v).unwrap(),
            ContextHeader {
                version: 2,
                batch_id: 7,
                rows: 2
            }
        );
        let mut newer = v.clone();
        newer["version"] = 99.into();
        assert!(ImportContext::from_value(&newer)
            .unwrap_err()
            .contains("version 99"));
        assert!(ContextHeader::from_value(&newer)
            .unwrap_err()
            .contains("version 99"));
        assert!(ImportContext::from_value(&json!({"x": 1})).is_err());
        let mut short = v.clone();
        short["jobIds"] = json!([42]);
        assert!(ImportContext::from_value(&short)
            .unwrap_err()
            .contains("2 lookup values for 1 jobs"));
        let mut mixed = v;
        mixed["keys"] = json!({"a@b.c": 42});
        assert!(ImportContext::from_value(&mixed)
            .unwrap_err()
            .contains("other version's shape"));
    }

    #[test]
    fn version_1_contexts_persisted_by_earlier_releases_are_still_read() {
        let v1 = json!({
            "version": 1, "batchId": 7, "importId": "7", "lookupField": "email",
            "rows": 2, "fileBytes": 20, "part": 1, "parts": 1,
            "keys": {"a@b.c": 42, "z@b.c": 9}
        });
        let ctx = ImportContext::from_value(&v1).unwrap();
        assert_eq!(ctx.version, LEGACY_CONTEXT_VERSION);
        let lookup = ctx.lookup();
        assert_eq!(lookup.len(), 2);
        assert_eq!(lookup.get("a@b.c"), Some(&42));
        assert_eq!(lookup.get("z@b.c"), Some(&9));
        assert_eq!(ContextHeader::from_value(&v1).unwrap().batch_id, 7);
    }

    #[test]
    fn the_lookup_pairs_keys_with_jobs_by_position() {
        let ctx = ctx();
        let lookup = ctx.lookup();
        assert_eq!(lookup.len(), 2);
        assert_eq!(lookup.get("a@b.c"), Some(&42));
        assert_eq!(lookup.get("z@b.c"), Some(&9));
    }
}
