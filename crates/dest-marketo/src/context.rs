//! The import context persisted by the router before the first poll: all a
//! (possibly restarted) process needs to poll the import and map its
//! per-row results back to jobs. Nothing about an import lives in memory.

use std::collections::BTreeMap;

use batchrouter_core::JobId;
use serde::{Deserialize, Serialize};

/// Version written into new contexts; bump when the shape changes.
pub const CONTEXT_VERSION: u32 = 1;

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
    /// Normalised lookup value → job; unique within one import by design.
    pub keys: BTreeMap<String, JobId>,
}

impl ImportContext {
    /// Reads a persisted context, explaining what is wrong when it cannot.
    pub fn from_value(value: &serde_json::Value) -> Result<ImportContext, String> {
        let ctx: ImportContext = serde_json::from_value(value.clone())
            .map_err(|e| format!("unreadable Marketo import context: {e}"))?;
        if ctx.version != CONTEXT_VERSION {
            return Err(format!(
                "Marketo import context version {} is not supported (this build reads {CONTEXT_VERSION})",
                ctx.version
            ));
        }
        Ok(ctx)
    }

    /// The JSON the router persists.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("an import context always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_foreign_shapes() {
        let ctx = ImportContext {
            version: CONTEXT_VERSION,
            batch_id: 7,
            import_id: "7".into(),
            lookup_field: "email".into(),
            rows: 1,
            file_bytes: 20,
            part: 1,
            parts: 1,
            keys: BTreeMap::from([("a@b.c".to_string(), 42)]),
        };
        let v = ctx.to_value();
        assert_eq!(v["batchId"], 7);
        assert_eq!(v["keys"]["a@b.c"], 42);
        assert_eq!(ImportContext::from_value(&v).unwrap(), ctx);
        let mut newer = v.clone();
        newer["version"] = 99.into();
        assert!(ImportContext::from_value(&newer)
            .unwrap_err()
            .contains("version 99"));
        assert!(ImportContext::from_value(&serde_json::json!({"x": 1})).is_err());
    }
}
