//! The import context persisted by the router before the first poll: the
//! Klaviyo job id and, per profile in request order, the job it came from
//! with its normalised identifiers. `poll` and `get_upload_stats` work from
//! this alone, so a restarted daemon (a new manager) loses nothing.

use std::collections::HashMap;

use batchrouter_core::JobId;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Version of the context layout, so a newer daemon can read older imports.
pub const CONTEXT_VERSION: u32 = 1;

/// Everything needed to poll one Klaviyo import job and map its errors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportContext {
    /// Layout version ([`CONTEXT_VERSION`]).
    pub v: u32,
    /// Klaviyo's id of the `profile-bulk-import-job`.
    #[serde(rename = "klaviyoJobId")]
    pub klaviyo_job_id: String,
    /// One entry per profile sent, in request order (index = pointer index).
    pub profiles: Vec<ProfileKeys>,
}

/// A profile's job and normalised identifiers. Persisted as a compact row
/// `[job, email, phone, external_id, id]` with trailing nulls left out
/// (e.g. `[12, "ada@example.com"]`): a 10,000-profile context stays small in
/// the router's memory and database.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProfileKeys {
    /// The job the profile came from.
    pub job: JobId,
    /// Lower-cased, trimmed email.
    pub email: Option<String>,
    /// Phone number reduced to `+` and digits.
    pub phone: Option<String>,
    /// Trimmed external id.
    pub external_id: Option<String>,
    /// Klaviyo profile id, when the job named one.
    pub id: Option<String>,
}

impl Serialize for ProfileKeys {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let fields = [&self.email, &self.phone, &self.external_id, &self.id];
        let used = fields
            .iter()
            .rposition(|f| f.is_some())
            .map_or(0, |i| i + 1);
        let mut seq = s.serialize_seq(Some(1 + used))?;
        seq.serialize_element(&self.job)?;
        for f in &fields[..used] {
            seq.serialize_element(f)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for ProfileKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Row;
        impl<'de> serde::de::Visitor<'de> for Row {
            type Value = ProfileKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a row [job, email, phone, external_id, id]")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ProfileKeys, A::Error> {
                let job: JobId = seq
                    .next_element()?
                    .ok_or_else(|| serde::de::Error::invalid_length(0, &self))?;
                let mut next = || -> Result<Option<String>, A::Error> {
                    Ok(seq.next_element::<Option<String>>()?.flatten())
                };
                let keys = ProfileKeys {
                    job,
                    email: next()?,
                    phone: next()?,
                    external_id: next()?,
                    id: next()?,
                };
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(serde::de::Error::invalid_length(6, &self));
                }
                Ok(keys)
            }
        }
        d.deserialize_seq(Row)
    }
}

/// Why a persisted context cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Not the JSON this crate writes.
    #[error("import context is not a Klaviyo import context: {0}")]
    Malformed(String),
    /// Written by a newer version of the daemon.
    #[error(
        "import context version {0} is newer than this daemon understands ({CONTEXT_VERSION})"
    )]
    Version(u32),
    /// The job id could not be put in a URL path safely.
    #[error("import context names an invalid Klaviyo job id {0:?}")]
    JobId(String),
}

impl ImportContext {
    /// Reads a persisted context back.
    pub fn from_value(v: &Value) -> Result<Self, ContextError> {
        let ctx: ImportContext = serde_json::from_value(v.clone())
            .map_err(|e| ContextError::Malformed(e.to_string()))?;
        if ctx.v > CONTEXT_VERSION {
            return Err(ContextError::Version(ctx.v));
        }
        if !valid_job_id(&ctx.klaviyo_job_id) {
            return Err(ContextError::JobId(ctx.klaviyo_job_id));
        }
        Ok(ctx)
    }

    /// The JSON persisted by the router.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Whether a Klaviyo job id is safe as one URL path segment.
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Emails compare case-insensitively without surrounding spaces.
pub fn normalize_email(s: &str) -> String {
    s.trim().to_lowercase()
}

/// Phone numbers compare by `+` and digits only (spaces, dashes, dots and
/// brackets are formatting).
pub fn normalize_phone(s: &str) -> String {
    let t = s.trim();
    let mut out = String::with_capacity(t.len());
    if t.starts_with('+') {
        out.push('+');
    }
    out.extend(t.chars().filter(char::is_ascii_digit));
    out
}

/// External ids and profile ids compare exactly, without surrounding spaces.
pub fn normalize_id(s: &str) -> String {
    s.trim().to_string()
}

impl ProfileKeys {
    /// Normalised keys from raw identifier values.
    pub fn new(
        job: JobId,
        id: Option<&str>,
        email: Option<&str>,
        phone: Option<&str>,
        external_id: Option<&str>,
    ) -> Self {
        ProfileKeys {
            job,
            email: email.map(normalize_email).filter(|s| !s.is_empty()),
            phone: phone.map(normalize_phone).filter(|s| !s.is_empty()),
            external_id: external_id.map(normalize_id).filter(|s| !s.is_empty()),
            id: id.map(normalize_id).filter(|s| !s.is_empty()),
        }
    }

    /// Keys of a profile attribute object (`email`, `phone_number`, `external_id`) and id.
    pub fn from_parts(job: JobId, id: Option<&str>, attributes: Option<&Value>) -> Self {
        let text = |key: &str| -> Option<String> {
            match attributes?.get(key)? {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        };
        ProfileKeys::new(
            job,
            id,
            text("email").as_deref(),
            text("phone_number").as_deref(),
            text("external_id").as_deref(),
        )
    }

    /// Keys of an `original_payload` echoed by Klaviyo: flat attributes, or a
    /// profile resource with `attributes`; the profile id at the top level.
    pub fn from_original_payload(payload: &Value) -> Self {
        let attrs = match payload.get("attributes") {
            Some(a @ Value::Object(_)) => a,
            _ => payload,
        };
        let id = payload.get("id").and_then(Value::as_str);
        ProfileKeys::from_parts(0, id, Some(attrs))
    }

    fn keys(&self) -> impl Iterator<Item = (Kind, &str)> {
        [
            (Kind::Email, self.email.as_deref()),
            (Kind::Phone, self.phone.as_deref()),
            (Kind::ExternalId, self.external_id.as_deref()),
            (Kind::Id, self.id.as_deref()),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Email,
    Phone,
    ExternalId,
    Id,
}

/// What an import error matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Match {
    /// Exactly one job.
    One(JobId),
    /// Several jobs sent the same identifiers and nothing tells them apart.
    Ambiguous(Vec<JobId>),
    /// No job sent these identifiers.
    None,
}

/// Finds the job behind an import error by its identifiers.
pub struct Matcher<'a> {
    profiles: &'a [ProfileKeys],
    index: HashMap<(Kind, &'a str), Vec<usize>>,
}

impl<'a> Matcher<'a> {
    /// Indexes a context's profiles.
    pub fn new(profiles: &'a [ProfileKeys]) -> Self {
        let mut index: HashMap<(Kind, &'a str), Vec<usize>> =
            HashMap::with_capacity(profiles.len() * 2);
        for (i, p) in profiles.iter().enumerate() {
            for key in p.keys() {
                index.entry(key).or_default().push(i);
            }
        }
        Matcher { profiles, index }
    }

    /// The job(s) whose profile shares the most identifiers with `keys`;
    /// among equals, the error's pointer index (when it names one of them)
    /// decides. An error that carries no identifier at all (no
    /// `original_payload`, or one without email, phone, external id or id)
    /// is matched by its pointer index alone: profiles are kept in request
    /// order, so the index names the profile. Identifiers that match nothing
    /// stay unmatched (the pointer is not trusted against them).
    pub fn find(&self, keys: &ProfileKeys, pointer_index: Option<usize>) -> Match {
        if keys.keys().next().is_none() {
            return match pointer_index.and_then(|i| self.profiles.get(i)) {
                Some(p) => Match::One(p.job),
                None => Match::None,
            };
        }
        let mut score: HashMap<usize, usize> = HashMap::new();
        for key in keys.keys() {
            for &i in self.index.get(&key).map(Vec::as_slice).unwrap_or(&[]) {
                *score.entry(i).or_default() += 1;
            }
        }
        let Some(best) = score.values().copied().max() else {
            return Match::None;
        };
        let mut tied: Vec<usize> = score
            .into_iter()
            .filter(|(_, s)| *s == best)
            .map(|(i, _)| i)
            .collect();
        tied.sort_unstable();
        if tied.len() == 1 {
            return Match::One(self.profiles[tied[0]].job);
        }
        if let Some(p) = pointer_index.filter(|p| tied.contains(p)) {
            return Match::One(self.profiles[p].job);
        }
        let mut jobs: Vec<JobId> = tied.iter().map(|&i| self.profiles[i].job).collect();
        jobs.dedup();
        if jobs.len() == 1 {
            Match::One(jobs[0])
        } else {
            Match::Ambiguous(jobs)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_are_normalised() {
        assert_eq!(normalize_email("  Ada@Example.COM "), "ada@example.com");
        assert_eq!(normalize_phone("+1 (555) 010-2030"), "+15550102030");
        assert_eq!(normalize_phone("555.010.2030"), "5550102030");
        assert_eq!(normalize_id(" u-1 "), "u-1");
    }

    #[test]
    fn context_round_trips_and_refuses_foreign_json() {
        let ctx = ImportContext {
            v: CONTEXT_VERSION,
            klaviyo_job_id: "AbC_12-x".into(),
            profiles: vec![ProfileKeys {
                job: 7,
                email: Some("a@b.c".into()),
                ..Default::default()
            }],
        };
        let v = ctx.to_value();
        assert_eq!(
            v,
            json!({"v": 1, "klaviyoJobId": "AbC_12-x", "profiles": [[7, "a@b.c"]]})
        );
        assert_eq!(ImportContext::from_value(&v).unwrap(), ctx);
        let full = ProfileKeys::new(8, Some("01P"), None, Some("+1 555"), None);
        let row = serde_json::to_value(&full).unwrap();
        assert_eq!(row, json!([8, null, "+1555", null, "01P"]));
        assert_eq!(serde_json::from_value::<ProfileKeys>(row).unwrap(), full);
        assert_eq!(
            serde_json::to_value(ProfileKeys {
                job: 9,
                ..Default::default()
            })
            .unwrap(),
            json!([9])
        );
        for bad in [
            json!([]),
            json!(["x"]),
            json!([1, 2]),
            json!([1, null, null, null, null, "extra"]),
        ] {
            let v = json!({"v": 1, "klaviyoJobId": "x", "profiles": [bad]});
            assert!(
                matches!(
                    ImportContext::from_value(&v),
                    Err(ContextError::Malformed(_))
                ),
                "{v}"
            );
        }
        assert!(matches!(
            ImportContext::from_value(&json!({"batchId": 1})),
            Err(ContextError::Malformed(_))
        ));
        let newer = json!({"v": 9, "klaviyoJobId": "x", "profiles": []});
        assert!(matches!(
            ImportContext::from_value(&newer),
            Err(ContextError::Version(9))
        ));
        let evil = json!({"v": 1, "klaviyoJobId": "../../lists", "profiles": []});
        assert!(matches!(
            ImportContext::from_value(&evil),
            Err(ContextError::JobId(_))
        ));
    }

    #[test]
    fn errors_match_by_any_identifier_flat_or_resource() {
        let profiles = vec![
            ProfileKeys::from_parts(1, None, Some(&json!({"email": "A@x.io"}))),
            ProfileKeys::from_parts(2, None, Some(&json!({"phone_number": "+1 555 0100"}))),
            ProfileKeys::from_parts(3, Some("01PROF"), Some(&json!({"external_id": 99}))),
        ];
        let m = Matcher::new(&profiles);
        let find = |payload: Value| m.find(&ProfileKeys::from_original_payload(&payload), None);
        assert_eq!(find(json!({"email": "a@x.io "})), Match::One(1));
        assert_eq!(find(json!({"phone_number": "+15550100"})), Match::One(2));
        assert_eq!(find(json!({"external_id": "99"})), Match::One(3));
        assert_eq!(
            find(json!({"id": "01PROF", "attributes": {"first_name": "x"}})),
            Match::One(3)
        );
        assert_eq!(
            find(json!({"type": "profile", "attributes": {"email": "A@X.IO"}})),
            Match::One(1)
        );
        assert_eq!(find(json!({"email": "nobody@x.io"})), Match::None);
        assert_eq!(find(json!({"anonymous_id": "zzz"})), Match::None);
    }

    #[test]
    fn shared_identifiers_prefer_the_closest_profile_then_the_pointer() {
        let profiles = vec![
            ProfileKeys::from_parts(
                1,
                None,
                Some(&json!({"email": "same@x.io", "external_id": "e1"})),
            ),
            ProfileKeys::from_parts(
                2,
                None,
                Some(&json!({"email": "same@x.io", "external_id": "e2"})),
            ),
            ProfileKeys::from_parts(3, None, Some(&json!({"email": "same@x.io"}))),
        ];
        let m = Matcher::new(&profiles);
        let keys = |v: Value| ProfileKeys::from_original_payload(&v);
        assert_eq!(
            m.find(
                &keys(json!({"email": "same@x.io", "external_id": "e2"})),
                None
            ),
            Match::One(2)
        );
        assert_eq!(
            m.find(&keys(json!({"email": "same@x.io"})), Some(2)),
            Match::One(3)
        );
        assert_eq!(
            m.find(&keys(json!({"email": "same@x.io"})), None),
            Match::Ambiguous(vec![1, 2, 3])
        );
        // A pointer outside the tie does not override the identifiers.
        assert_eq!(
            m.find(
                &keys(json!({"email": "same@x.io", "external_id": "e1"})),
                Some(2)
            ),
            Match::One(1)
        );
    }

    #[test]
    fn errors_without_identifiers_are_matched_by_their_pointer_index() {
        let profiles = vec![
            ProfileKeys::from_parts(10, None, Some(&json!({"email": "a@x.io"}))),
            ProfileKeys::from_parts(11, None, Some(&json!({"email": "b@x.io"}))),
        ];
        let m = Matcher::new(&profiles);
        let none = ProfileKeys::default();
        assert_eq!(m.find(&none, Some(1)), Match::One(11));
        assert_eq!(m.find(&none, Some(0)), Match::One(10));
        assert_eq!(m.find(&none, Some(2)), Match::None, "outside the request");
        assert_eq!(m.find(&none, None), Match::None);
        // A payload without identifiers counts as none.
        let anon = ProfileKeys::from_original_payload(&json!({"first_name": "x"}));
        assert_eq!(m.find(&anon, Some(1)), Match::One(11));
        // Identifiers that match nothing are not overridden by the pointer.
        let foreign = ProfileKeys::from_original_payload(&json!({"email": "c@x.io"}));
        assert_eq!(m.find(&foreign, Some(1)), Match::None);
    }
}
