//! Packing a staged batch into request bodies, on a blocking thread.
//!
//! A body is the staged lines themselves, comma-separated inside a fixed
//! JSON:API envelope, so its size is known exactly before it is sent and
//! no profile is encoded twice. The reader streams the staged file, checks
//! each line (size, identifiers for the key map) and hands finished bodies
//! to the sender one ahead; a body can later be cut into a subset (profiles
//! Klaviyo refused removed) or halves (413) without re-reading the file.
//!
//! Apart from [`crate::upload`], which decides what each answer means,
//! because this half never talks to the network and is tested on its own.

use std::ops::Range;

use batchrouter_core::{ErrorCode, JobError, JobId, Outcome, StagedBatch};
use bytes::Bytes;
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::warn;

use crate::context::ProfileKeys;

const BODY_PREFIX: &str =
    r#"{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":["#;

/// The fixed text around the profiles of a request body.
#[derive(Clone, Debug)]
pub(crate) struct Envelope {
    prefix: &'static str,
    suffix: String,
}

impl Envelope {
    /// The envelope for an optional list association.
    pub(crate) fn new(list_id: Option<&str>) -> Self {
        let mut suffix = String::from("]}}");
        if let Some(list) = list_id {
            let id = serde_json::to_string(list).unwrap_or_else(|_| "\"\"".into());
            suffix.push_str(r#","relationships":{"lists":{"data":[{"type":"list","id":"#);
            suffix.push_str(&id);
            suffix.push_str("}]}}");
        }
        suffix.push_str("}}");
        Envelope {
            prefix: BODY_PREFIX,
            suffix,
        }
    }

    /// Bytes of envelope around the profiles.
    pub(crate) fn len(&self) -> u64 {
        (self.prefix.len() + self.suffix.len()) as u64
    }
}

/// Profiles bound for one request: the encoded body, each profile's span
/// in it, and its job and keys (lines are never held twice).
pub(crate) struct Chunk {
    pub(crate) jobs: Vec<JobId>,
    pub(crate) keys: Vec<ProfileKeys>,
    spans: Vec<Range<usize>>,
    pub(crate) body: Bytes,
}

impl Chunk {
    /// Profiles in the chunk.
    pub(crate) fn len(&self) -> usize {
        self.jobs.len()
    }

    /// A new chunk of the profiles whose index satisfies `keep`.
    pub(crate) fn subset(&self, envelope: &Envelope, keep: impl Fn(usize) -> bool) -> Chunk {
        let mut b = ChunkBuilder::new(envelope);
        for i in (0..self.len()).filter(|i| keep(*i)) {
            b.push(
                self.jobs[i],
                &self.body[self.spans[i].clone()],
                self.keys[i].clone(),
            );
        }
        b.finish(envelope)
    }

    /// Two chunks of the first and the second half of the profiles.
    pub(crate) fn split(&self, envelope: &Envelope) -> (Chunk, Chunk) {
        let mid = self.len() / 2;
        (
            self.subset(envelope, |i| i < mid),
            self.subset(envelope, |i| i >= mid),
        )
    }
}

/// Builds a chunk's body while lines are added.
struct ChunkBuilder {
    jobs: Vec<JobId>,
    keys: Vec<ProfileKeys>,
    spans: Vec<Range<usize>>,
    body: Vec<u8>,
}

impl ChunkBuilder {
    fn new(envelope: &Envelope) -> Self {
        let mut body = Vec::with_capacity(64 * 1024);
        body.extend_from_slice(envelope.prefix.as_bytes());
        ChunkBuilder {
            jobs: Vec::new(),
            keys: Vec::new(),
            spans: Vec::new(),
            body,
        }
    }

    fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The encoded size once `line_len` more bytes are added and the body closed.
    fn len_with(&self, line_len: usize, envelope: &Envelope) -> u64 {
        let comma = usize::from(!self.jobs.is_empty());
        (self.body.len() + comma + line_len + envelope.suffix.len()) as u64
    }

    fn push(&mut self, job: JobId, line: &[u8], keys: ProfileKeys) {
        if !self.jobs.is_empty() {
            self.body.push(b',');
        }
        let start = self.body.len();
        self.body.extend_from_slice(line);
        self.spans.push(start..self.body.len());
        self.jobs.push(job);
        self.keys.push(keys);
    }

    fn finish(mut self, envelope: &Envelope) -> Chunk {
        self.body.extend_from_slice(envelope.suffix.as_bytes());
        Chunk {
            jobs: self.jobs,
            keys: self.keys,
            spans: self.spans,
            body: Bytes::from(self.body),
        }
    }
}

/// The part of a staged line needed for the key map.
#[derive(Deserialize)]
struct StagedProfile {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    attributes: Option<StagedAttributes>,
}

#[derive(Deserialize)]
struct StagedAttributes {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone_number: Option<String>,
    #[serde(default)]
    external_id: Option<String>,
}

/// What the reader thread hands the sender.
pub(crate) enum Item {
    /// A request body, ready to send.
    Chunk(Chunk),
    /// A line that cannot be sent, with its outcome.
    Decided(JobId, Outcome),
    /// The staged file could not be read (further); jobs not yet handed over fail.
    Broken(String),
}

/// Limits the reader packs requests to.
#[derive(Clone)]
pub(crate) struct Packing {
    pub(crate) envelope: Envelope,
    pub(crate) max_profiles: usize,
    pub(crate) max_bytes: u64,
}

/// Streams the staged file into request bodies (runs on a blocking thread).
pub(crate) fn read_staged(batch: StagedBatch, packing: Packing, tx: mpsc::Sender<Item>) {
    let send = |item: Item| tx.blocking_send(item).is_ok();
    let lines = match batch.lines() {
        Ok(l) => l,
        Err(e) => {
            send(Item::Broken(format!(
                "cannot open the staged file {}: {e}",
                batch.path.display()
            )));
            return;
        }
    };
    let env = &packing.envelope;
    let room = packing.max_bytes.saturating_sub(env.len());
    let mut chunk = ChunkBuilder::new(env);
    for next in lines {
        let (job, line) = match next {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // More lines than jobs: every job is already covered.
                warn!(batch_id = %batch.batch_id, error = %e, "staged file has extra lines; ignored");
                break;
            }
            Err(e) => {
                if !chunk.is_empty() && !send(Item::Chunk(chunk.finish(env))) {
                    return;
                }
                send(Item::Broken(format!(
                    "staged file {}: {e}",
                    batch.path.display()
                )));
                return;
            }
        };
        let keys = match check_line(job, &line, room, packing.max_bytes) {
            Ok(k) => k,
            Err(outcome) => {
                if !send(Item::Decided(job, outcome)) {
                    return;
                }
                continue;
            }
        };
        let fits = chunk.jobs.len() < packing.max_profiles
            && chunk.len_with(line.len(), env) <= packing.max_bytes;
        if !fits {
            let full = std::mem::replace(&mut chunk, ChunkBuilder::new(env));
            if !send(Item::Chunk(full.finish(env))) {
                return;
            }
        }
        chunk.push(job, line.as_bytes(), keys);
    }
    if !chunk.is_empty() {
        send(Item::Chunk(chunk.finish(env)));
    }
}

/// Reads a staged line's identifiers; a line that cannot be sent gets its outcome.
fn check_line(job: JobId, line: &str, room: u64, max_bytes: u64) -> Result<ProfileKeys, Outcome> {
    if line.len() as u64 > room {
        return Err(Outcome::Aborted(JobError::new(
            ErrorCode::DestinationRejected,
            format!(
                "profile is {} bytes, more than fits in one request of maxRequestBytes = {max_bytes}",
                line.len()
            ),
        )));
    }
    match serde_json::from_str::<StagedProfile>(line) {
        Ok(p) if p.kind == "profile" => {
            let a = p.attributes.as_ref();
            Ok(ProfileKeys::new(
                job,
                p.id.as_deref(),
                a.and_then(|a| a.email.as_deref()),
                a.and_then(|a| a.phone_number.as_deref()),
                a.and_then(|a| a.external_id.as_deref()),
            ))
        }
        Ok(p) => Err(staged_line_error(format!("resource type {:?}", p.kind))),
        Err(e) => Err(staged_line_error(e.to_string())),
    }
}

/// A staged line that is not a profile: transformed again on a retry.
fn staged_line_error(why: String) -> Outcome {
    Outcome::Failed(JobError::new(
        ErrorCode::Internal,
        format!("staged line is not a Klaviyo profile ({why}); it will be transformed again"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The request body of `lines`, built as the reader builds it.
    fn body<S: AsRef<[u8]>>(env: &Envelope, lines: &[S]) -> Bytes {
        let mut b = ChunkBuilder::new(env);
        for (i, l) in lines.iter().enumerate() {
            b.push(i as JobId, l.as_ref(), ProfileKeys::default());
        }
        b.finish(env).body
    }

    #[test]
    fn body_is_json_api_and_its_length_is_exact() {
        for list in [None, Some("Xy12")] {
            let env = Envelope::new(list);
            let lines = vec![
                r#"{"type":"profile","attributes":{"email":"a@b.c"}}"#.to_string(),
                r#"{"type":"profile","id":"01P","attributes":{"phone_number":"+1555"}}"#
                    .to_string(),
            ];
            let body = body(&env, &lines);
            let bytes: u64 = lines.iter().map(|l| l.len() as u64).sum();
            // Exact: envelope, lines, and one comma between two lines.
            assert_eq!(
                body.len() as u64,
                env.len() + bytes + lines.len() as u64 - 1
            );
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["data"]["type"], "profile-bulk-import-job");
            assert_eq!(
                v["data"]["attributes"]["profiles"]["data"]
                    .as_array()
                    .unwrap()
                    .len(),
                2
            );
            assert_eq!(v["data"]["attributes"]["profiles"]["data"][1]["id"], "01P");
            match list {
                Some(id) => assert_eq!(
                    v["data"]["relationships"],
                    serde_json::json!({"lists": {"data": [{"type": "list", "id": id}]}})
                ),
                None => assert!(v["data"].get("relationships").is_none()),
            }
            assert!(
                env.len()
                    <= crate::config::ENVELOPE_OVERHEAD + list.map_or(0, |l| l.len() as u64 + 64)
            );
        }
        let one = Envelope::new(None);
        assert_eq!(body::<&str>(&one, &[]).len() as u64, one.len());
    }

    #[test]
    fn subsets_and_halves_rebuild_exact_bodies() {
        let env = Envelope::new(Some("L1"));
        let mut b = ChunkBuilder::new(&env);
        for i in 0..5 {
            let line = format!(r#"{{"type":"profile","attributes":{{"email":"u{i}@x.io"}}}}"#);
            assert_eq!(b.len_with(line.len(), &env), {
                let mut probe = ChunkBuilder::new(&env);
                for j in 0..i {
                    let l = format!(r#"{{"type":"profile","attributes":{{"email":"u{j}@x.io"}}}}"#);
                    probe.push(j, l.as_bytes(), ProfileKeys::default());
                }
                probe.push(i, line.as_bytes(), ProfileKeys::default());
                probe.finish(&env).body.len() as u64
            });
            b.push(
                i,
                line.as_bytes(),
                ProfileKeys::new(i, None, Some(&format!("u{i}@x.io")), None, None),
            );
        }
        let chunk = b.finish(&env);
        let emails = |c: &Chunk| -> Vec<String> {
            let v: Value = serde_json::from_slice(&c.body).unwrap();
            v["data"]["attributes"]["profiles"]["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["attributes"]["email"].as_str().unwrap().to_string())
                .collect()
        };
        let odd = chunk.subset(&env, |i| i % 2 == 1);
        assert_eq!(emails(&odd), vec!["u1@x.io", "u3@x.io"]);
        assert_eq!(odd.jobs, vec![1, 3]);
        assert_eq!(odd.keys[1].email.as_deref(), Some("u3@x.io"));
        let (l, r) = chunk.split(&env);
        assert_eq!(
            (emails(&l), emails(&r).len()),
            (vec!["u0@x.io".to_string(), "u1@x.io".into()], 3)
        );
        assert_eq!(r.jobs, vec![2, 3, 4]);
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["data"]["relationships"]["lists"]["data"][0]["id"], "L1");
    }
}
