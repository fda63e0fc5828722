//! The `[destinations.config]` table of a `MARKETO_BULK_UPLOAD` destination
//! and its validation into [`Settings`], reporting every problem at once.

use std::collections::HashSet;
use std::time::Duration;

use batchrouter_core::{ConfigProblems, ConfigReader, Secret};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;

/// Every key accepted under `[destinations.config]`, for did-you-mean hints.
pub const CONFIG_KEYS: &[&str] = &[
    "munchkinId",
    "clientId",
    "clientSecret",
    "deDuplicationField",
    "columnFieldsMapping",
    "passUnmappedFields",
    "listId",
    "partitionName",
    "baseUrl",
    "connectTimeout",
    "requestTimeout",
    "maxFileSize",
    "uploadTimeBudget",
];

/// Marketo refuses import files of 10 MB or more; we never configure above it.
pub const MARKETO_MAX_FILE_BYTES: u64 = 10_000_000;

/// Default per-file ceiling: a margin under Marketo's limit.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 9_500_000;

/// Smallest accepted per-file ceiling, so a typo cannot produce one import per row.
pub const MIN_MAX_FILE_BYTES: u64 = 1_000;

/// Default TCP/TLS connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default whole-request timeout (a 10 MB upload on a slow link fits in it).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Default longest time one upload (all its files) may take: a margin under
/// the router's default `uploadCallTimeout` of 10 minutes.
pub const DEFAULT_UPLOAD_TIME_BUDGET: Duration = Duration::from_secs(8 * 60);

/// One `{from, to}` entry: job payload key → Marketo field API name.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    /// Key in the job payload.
    #[serde(default)]
    pub from: String,
    /// Marketo field API name (CSV column).
    #[serde(default)]
    pub to: String,
}

/// A validated configuration: everything the manager needs, nothing unchecked.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Marketo instance id (`123-ABC-456`).
    pub munchkin_id: String,
    /// OAuth client id.
    pub client_id: String,
    /// OAuth client secret; only sent to the token endpoint.
    pub client_secret: Secret,
    /// Marketo `lookupField`, also the column results are matched by.
    pub lookup_field: String,
    /// Payload key → Marketo field, in header order.
    pub mapping: Vec<FieldMapping>,
    /// Whether unmapped payload keys become columns under their own names.
    pub pass_unmapped: bool,
    /// Static list to add the leads to.
    pub list_id: Option<String>,
    /// Lead partition to import into.
    pub partition_name: Option<String>,
    /// API root without trailing slash (`https://<munchkinId>.mktorest.com`).
    pub base_url: Url,
    /// TCP/TLS connect timeout for every request.
    pub connect_timeout: Duration,
    /// Whole-request timeout for every request.
    pub request_timeout: Duration,
    /// Largest CSV file sent in one import.
    pub max_file_bytes: u64,
    /// Longest time one upload may spend before files not yet sent wait for
    /// a later upload; keep it under the router's `uploadCallTimeout`.
    pub upload_time_budget: Duration,
}

impl Settings {
    /// Parses and checks a config table, listing every problem found.
    pub fn from_config(config: &Value) -> Result<Settings, ConfigProblems> {
        // The shared reader reports unknown keys (with did-you-mean) and
        // every per-key problem, so all are listed at once.
        let mut problems = ConfigReader::new(config, CONFIG_KEYS);
        let munchkin_id = problems
            .string("munchkinId")
            .unwrap_or_default()
            .trim()
            .to_string();
        if munchkin_id.is_empty() {
            problems.push("`munchkinId` is required (the Marketo instance id, e.g. `123-ABC-456`)");
        } else if !munchkin_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            problems.push(format!(
                "`munchkinId` = {munchkin_id:?} may only contain letters, digits and `-` (e.g. `123-ABC-456`)"
            ));
        }
        let client_id = problems
            .string("clientId")
            .unwrap_or_default()
            .trim()
            .to_string();
        if client_id.is_empty() {
            problems.push("`clientId` is required (the LaunchPoint service's client id)");
        }
        let client_secret = problems.secret("clientSecret").unwrap_or_else(|| {
            if problems.raw("clientSecret").is_none() {
                problems.push(
                    "`clientSecret` is required (use `${ENV_NAME}` to keep it out of the file)",
                );
            }
            Secret::default()
        });

        let de_duplication_field = problems.string("deDuplicationField");
        let lookup_field = match de_duplication_field.as_deref().map(str::trim) {
            None => "email".to_string(),
            Some("") => {
                problems.push("`deDuplicationField` must not be empty (default `email`)");
                "email".to_string()
            }
            Some(f) => f.to_string(),
        };

        let mapping: Vec<FieldMapping> = problems.value("columnFieldsMapping").unwrap_or_default();
        let pass_unmapped = problems.bool("passUnmappedFields").unwrap_or(false);
        let mut targets = HashSet::new();
        for (i, m) in mapping.iter().enumerate() {
            if m.from.trim().is_empty() {
                problems.push(format!(
                    "`columnFieldsMapping[{i}].from` must name a payload key"
                ));
            }
            if m.to.trim().is_empty() {
                problems.push(format!(
                    "`columnFieldsMapping[{i}].to` must name a Marketo field"
                ));
            } else if !targets.insert(m.to.as_str()) {
                problems.push(format!(
                    "`columnFieldsMapping[{i}].to` = {:?} is mapped twice; each Marketo field may appear once",
                    m.to
                ));
            }
        }
        if !pass_unmapped && !targets.contains(lookup_field.as_str()) {
            problems.push(format!(
                "no `columnFieldsMapping` entry produces the deDuplicationField `{lookup_field}` and \
                 `passUnmappedFields` is false, so every job would be aborted: map a payload key to \
                 `{lookup_field}` or set `passUnmappedFields = true`"
            ));
        }

        let list_id = match problems.raw("listId").cloned() {
            None => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => Some(n.to_string()),
            Some(Value::String(s))
                if !s.trim().is_empty() && s.trim().chars().all(|c| c.is_ascii_digit()) =>
            {
                Some(s.trim().to_string())
            }
            Some(other) => {
                problems.push(format!(
                    "`listId` = {other} must be a numeric Marketo static list id"
                ));
                None
            }
        };
        let partition_name = problems.string("partitionName");
        let partition_name = match partition_name.as_deref().map(str::trim) {
            None => None,
            Some("") => {
                problems.push("`partitionName` must not be empty when given (leave it out for the default partition)");
                None
            }
            Some(p) => Some(p.to_string()),
        };

        let raw_base_url = problems.string("baseUrl");
        let base_url = resolve_base_url(raw_base_url.as_deref(), &munchkin_id, &mut problems);

        let connect_timeout = problems
            .timeout("connectTimeout")
            .unwrap_or(DEFAULT_CONNECT_TIMEOUT);
        let request_timeout = problems
            .timeout("requestTimeout")
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let upload_time_budget = problems
            .timeout("uploadTimeBudget")
            .unwrap_or(DEFAULT_UPLOAD_TIME_BUDGET);

        let max_file_bytes = match problems.bytes("maxFileSize", 0, u64::MAX) {
            None => DEFAULT_MAX_FILE_BYTES,
            Some(b) if (MIN_MAX_FILE_BYTES..MARKETO_MAX_FILE_BYTES).contains(&b) => b,
            Some(b) => {
                problems.push(format!(
                    "`maxFileSize` = {b} bytes must be at least {MIN_MAX_FILE_BYTES} and below \
                     Marketo's limit of {MARKETO_MAX_FILE_BYTES} bytes"
                ));
                DEFAULT_MAX_FILE_BYTES
            }
        };

        problems.finish()?;
        let Some(base_url) = base_url else {
            return Err(ConfigProblems::one("`baseUrl` could not be resolved"));
        };
        Ok(Settings {
            munchkin_id,
            client_id,
            client_secret,
            lookup_field,
            mapping,
            pass_unmapped,
            list_id,
            partition_name,
            base_url,
            connect_timeout,
            request_timeout,
            max_file_bytes,
            upload_time_budget,
        })
    }

    /// `base_url` joined with an absolute API path (`/bulk/v1/leads.json`).
    pub fn endpoint(&self, path: &str) -> Url {
        let mut url = self.base_url.clone();
        let base_path = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base_path}{path}"));
        url
    }
}

fn resolve_base_url(
    raw: Option<&str>,
    munchkin_id: &str,
    problems: &mut ConfigReader,
) -> Option<Url> {
    let text = match raw.map(str::trim) {
        Some(s) if !s.is_empty() => s.to_string(),
        Some(_) => {
            problems.push(
                "`baseUrl` must not be empty (leave it out for https://<munchkinId>.mktorest.com)",
            );
            return None;
        }
        None if munchkin_id.is_empty() => return None,
        None => format!("https://{munchkin_id}.mktorest.com"),
    };
    let url = match Url::parse(&text) {
        Ok(u) => u,
        Err(e) => {
            problems.push(format!("`baseUrl` = {text:?} is not a URL: {e}"));
            return None;
        }
    };
    let mut ok = true;
    if url.scheme() != "https" && url.scheme() != "http" {
        problems.push(format!(
            "`baseUrl` must use https (or http for a local stand-in), not `{}`",
            url.scheme()
        ));
        ok = false;
    }
    if !url.username().is_empty() || url.password().is_some() {
        problems.push("`baseUrl` must not carry credentials; use `clientId` and `clientSecret`");
        ok = false;
    }
    if url.query().is_some() || url.fragment().is_some() {
        problems.push("`baseUrl` must not have a query string or fragment");
        ok = false;
    }
    if url.path().trim_end_matches('/').ends_with("/rest") {
        problems
            .push("`baseUrl` must be the instance root: the bulk endpoints are not under `/rest`");
        ok = false;
    }
    ok.then_some(url)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal() -> Value {
        json!({
            "munchkinId": "123-ABC-456",
            "clientId": "cid",
            "clientSecret": "shh",
            "passUnmappedFields": true,
        })
    }

    #[test]
    fn defaults_are_applied() {
        let s = Settings::from_config(&minimal()).unwrap();
        assert_eq!(s.lookup_field, "email");
        assert_eq!(s.base_url.as_str(), "https://123-abc-456.mktorest.com/");
        assert_eq!(
            s.endpoint("/bulk/v1/leads.json").as_str(),
            "https://123-abc-456.mktorest.com/bulk/v1/leads.json"
        );
        assert_eq!(s.max_file_bytes, DEFAULT_MAX_FILE_BYTES);
        assert_eq!(s.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(s.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(s.upload_time_budget, Duration::from_secs(480));
        assert!(s.list_id.is_none() && s.partition_name.is_none());
    }

    #[test]
    fn explicit_values_are_parsed() {
        let mut c = minimal();
        c["baseUrl"] = json!("http://127.0.0.1:9/prefix/");
        c["listId"] = json!(1234);
        c["partitionName"] = json!("EMEA");
        c["connectTimeout"] = json!("250ms");
        c["requestTimeout"] = json!(5);
        c["maxFileSize"] = json!("2MB");
        c["deDuplicationField"] = json!("externalId");
        c["uploadTimeBudget"] = json!("90s");
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.upload_time_budget, Duration::from_secs(90));
        assert_eq!(
            s.endpoint("/x.json").as_str(),
            "http://127.0.0.1:9/prefix/x.json"
        );
        assert_eq!(s.list_id.as_deref(), Some("1234"));
        assert_eq!(s.partition_name.as_deref(), Some("EMEA"));
        assert_eq!(s.connect_timeout, Duration::from_millis(250));
        assert_eq!(s.request_timeout, Duration::from_secs(5));
        assert_eq!(s.max_file_bytes, 2_000_000);
        assert_eq!(s.lookup_field, "externalId");
    }

    #[test]
    fn every_problem_is_listed_with_did_you_mean() {
        let c = json!({
            "munchkinId": "bad id!",
            "clientSecert": "x",
            "columnFieldsMapping": [{"from": "e", "to": "emailAddress"}, {"from": "", "to": "emailAddress"}],
            "listId": "abc",
            "requestTimeout": "soon",
            "maxFileSize": "20MB",
            "uploadTimeBudget": "0s",
            "baseUrl": "ftp://example.com"
        });
        let err = Settings::from_config(&c).unwrap_err();
        // Unknown keys are listed with the rest, in one pass.
        assert!(err.0[0].contains("did you mean `clientSecret`"), "{err:?}");
        assert_eq!(err.0.len(), 12, "{err:?}");

        let mut c = c;
        c.as_object_mut().unwrap().remove("clientSecert");
        let err = Settings::from_config(&c).unwrap_err();
        let all = err.0.join("\n");
        for needle in [
            "`munchkinId` = \"bad id!\"",
            "`clientId` is required",
            "`clientSecret` is required",
            "`columnFieldsMapping[1].from`",
            "\"emailAddress\" is mapped twice",
            "deDuplicationField `email`",
            "`listId`",
            "`requestTimeout`",
            "`maxFileSize` = 20000000 bytes",
            "`uploadTimeBudget` must be longer than zero",
            "`baseUrl` must use https",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert_eq!(err.0.len(), 11, "{all}");
    }

    #[test]
    fn secrets_never_appear_in_problems() {
        let c = json!({"munchkinId": "1", "clientId": "c", "clientSecret": "topsecretvalue", "maxFileSize": "x"});
        let err = Settings::from_config(&c).unwrap_err();
        assert!(!err.to_string().contains("topsecretvalue"));
    }

    #[test]
    fn base_url_must_not_be_the_rest_root_or_carry_credentials() {
        let mut c = minimal();
        c["baseUrl"] = json!("https://u:p@x.mktorest.com/rest");
        let err = Settings::from_config(&c).unwrap_err();
        assert_eq!(err.0.len(), 2, "{err:?}");
        assert!(!err.to_string().contains("u:p"), "{err:?}");
    }
}
