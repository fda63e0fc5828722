//! `batchrouterd enqueue`: NDJSON payloads (one JSON object a line) into
//! the store. The whole input is validated (every line as the store and the
//! API judge a job) before anything is stored. When a running daemon owns
//! the SQLite file, the jobs go through its API.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context};
use batchrouter_config::LoadedConfig;
use batchrouter_core::{NewJob, StoreError, Timestamp};

/// Jobs per insert (each chunk is one transaction).
const CHUNK: usize = 10_000;

/// What `enqueue` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EnqueueReport {
    /// New jobs stored.
    pub inserted: u64,
    /// Lines whose message id was already known.
    pub duplicates: u64,
    /// Whether the running daemon's API was used.
    pub via_api: bool,
}

/// Reads `input` (a path, or stdin for `-`/none) and enqueues every line.
pub async fn run(
    cfg: &LoadedConfig,
    destination: &str,
    input: Option<&Path>,
    message_id_field: Option<&str>,
) -> anyhow::Result<EnqueueReport> {
    if cfg.destination(destination).is_none() {
        let known: Vec<&str> = cfg.destinations.iter().map(|d| d.id.as_str()).collect();
        bail!(
            "destination `{destination}` is not configured (configured: {})",
            known.join(", ")
        );
    }
    let mut file = open_input(input)?;
    // Which path the jobs take decides the largest line: through the API
    // each must fit in one request body.
    let store = match batchrouter_store::open(cfg.store.url.expose()).await {
        Ok(store) => Some(store),
        Err(StoreError::Locked(_)) => None,
        Err(e) => return Err(e).context("cannot open the job store"),
    };
    let max_request = store
        .is_none()
        .then(|| usize::try_from(cfg.server.max_body_bytes).unwrap_or(usize::MAX));
    let lines = validate(&mut file, destination, message_id_field, max_request)?;
    file.seek(SeekFrom::Start(0))?;
    match store {
        Some(store) => {
            let mut report = EnqueueReport::default();
            for_each_chunk(
                &mut file,
                destination,
                message_id_field,
                usize::MAX,
                |jobs| {
                    let store = store.clone();
                    async move {
                        let ins = store.insert_jobs(jobs, Timestamp::now()).await?;
                        let dups = ins.iter().filter(|i| i.duplicate).count() as u64;
                        Ok((ins.len() as u64 - dups, dups))
                    }
                },
                &mut report,
            )
            .await?;
            debug_assert_eq!(report.inserted + report.duplicates, lines);
            Ok(report)
        }
        None => {
            eprintln!(
                "The store is owned by a running batchrouterd; sending the jobs through its API."
            );
            via_api(cfg, &mut file, destination, message_id_field).await
        }
    }
}

fn open_input(input: Option<&Path>) -> anyhow::Result<File> {
    match input {
        Some(p) if p != Path::new("-") => {
            File::open(p).with_context(|| format!("cannot read {}", p.display()))
        }
        _ => {
            // Spool stdin so it can be validated whole before storing.
            let mut spool = tempfile::tempfile()?;
            std::io::copy(&mut std::io::stdin().lock(), &mut spool)?;
            spool.seek(SeekFrom::Start(0))?;
            Ok(spool)
        }
    }
}

fn message_id(v: &serde_json::Value, field: Option<&str>) -> Result<Option<String>, String> {
    let Some(f) = field else { return Ok(None) };
    match v.get(f) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
        _ => Err(format!(
            "field `{f}` (the message id) is missing or not a string/number"
        )),
    }
}

/// Bytes one job takes in an API request body (see [`write_api_line`]),
/// computed without building it.
fn api_line_len(destination: &str, message_id: Option<&str>, payload: &str) -> usize {
    let json_len = |s: &str| serde_json::Value::from(s).to_string().len();
    let envelope = match message_id {
        Some(m) => r#"{"destinationId":,"messageId":,"payload":}"#.len() + json_len(m),
        None => r#"{"destinationId":,"payload":}"#.len(),
    };
    envelope + json_len(destination) + payload.len() + 1
}

/// Appends one job to an NDJSON request body; the payload goes in as
/// written, with no re-serialisation.
fn write_api_line(body: &mut Vec<u8>, j: &NewJob) {
    let dest = serde_json::Value::String(j.destination_id.clone());
    let _ = match &j.message_id {
        Some(m) => writeln!(
            body,
            "{{\"destinationId\":{dest},\"messageId\":{},\"payload\":{}}}",
            serde_json::Value::String(m.clone()),
            j.payload
        ),
        None => writeln!(
            body,
            "{{\"destinationId\":{dest},\"payload\":{}}}",
            j.payload
        ),
    };
}

/// Checks every line as the store and the API will (JSON object, message
/// id, [`NewJob::validate`], and with `max_request` set, that it fits in one
/// API request body) before anything is sent, so no chunk can be refused
/// after earlier ones were stored; lists up to ten problems with line
/// numbers.
fn validate(
    file: &mut File,
    destination: &str,
    field: Option<&str>,
    max_request: Option<usize>,
) -> anyhow::Result<u64> {
    let mut problems = Vec::new();
    let mut count = 0u64;
    for (i, line) in BufReader::new(&mut *file).lines().enumerate() {
        let line = line.context("cannot read input")?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) if v.is_object() => match message_id(&v, field) {
                Ok(message_id) => {
                    let size = api_line_len(destination, message_id.as_deref(), &line);
                    if let Some(max) = max_request.filter(|&max| size > max) {
                        problems.push(format!(
                            "line {}: {size} bytes as a job, more than the running daemon accepts in one request (server.maxBodyBytes = {max})",
                            i + 1
                        ));
                        if problems.len() >= 10 {
                            break;
                        }
                        continue;
                    }
                    let job = NewJob {
                        destination_id: destination.to_string(),
                        payload: line,
                        message_id,
                    };
                    match job.validate() {
                        Ok(()) => count += 1,
                        Err(e) => problems.push(format!("line {}: {e}", i + 1)),
                    }
                }
                Err(e) => problems.push(format!("line {}: {e}", i + 1)),
            },
            Ok(_) => problems.push(format!("line {}: not a JSON object", i + 1)),
            Err(e) => problems.push(format!("line {}: {e}", i + 1)),
        }
        if problems.len() >= 10 {
            break;
        }
    }
    if !problems.is_empty() {
        bail!(
            "nothing was enqueued; fix these lines first:\n  {}",
            problems.join("\n  ")
        );
    }
    if count == 0 {
        bail!("the input holds no jobs");
    }
    Ok(count)
}

/// Feeds the input to `f` in chunks of at most [`CHUNK`] jobs and about
/// `max_bytes` of payload.
async fn for_each_chunk<F, Fut>(
    file: &mut File,
    destination: &str,
    field: Option<&str>,
    max_bytes: usize,
    mut f: F,
    report: &mut EnqueueReport,
) -> anyhow::Result<()>
where
    F: FnMut(Vec<NewJob>) -> Fut,
    Fut: std::future::Future<Output = Result<(u64, u64), StoreError>>,
{
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut bytes = 0usize;
    for line in BufReader::new(file).lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        // Validated already; parse again only to read the message id.
        let message_id = match field {
            Some(_) => {
                message_id(&serde_json::from_str(&line)?, field).map_err(anyhow::Error::msg)?
            }
            None => None,
        };
        // The job as it goes into a request body, envelope included.
        let size = api_line_len(destination, message_id.as_deref(), &line);
        if !chunk.is_empty() && bytes + size > max_bytes {
            let (n, d) = f(std::mem::take(&mut chunk)).await?;
            report.inserted += n;
            report.duplicates += d;
            bytes = 0;
        }
        bytes += size;
        chunk.push(NewJob {
            destination_id: destination.to_string(),
            payload: line,
            message_id,
        });
        if chunk.len() == CHUNK {
            let (n, d) = f(std::mem::take(&mut chunk)).await?;
            report.inserted += n;
            report.duplicates += d;
            bytes = 0;
        }
    }
    if !chunk.is_empty() {
        let (n, d) = f(chunk).await?;
        report.inserted += n;
        report.duplicates += d;
    }
    Ok(())
}

async fn via_api(
    cfg: &LoadedConfig,
    file: &mut File,
    destination: &str,
    field: Option<&str>,
) -> anyhow::Result<EnqueueReport> {
    let mut addr = cfg.server.listen;
    if addr.port() == 0 {
        bail!(
            "the store is owned by a running batchrouterd, but server.listen ({addr}) has no fixed port to reach its API; \
             set a port or stop the daemon"
        );
    }
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/v1/jobs");
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()?;
    let max_bytes = usize::try_from(cfg.server.max_body_bytes).unwrap_or(usize::MAX);
    let mut report = EnqueueReport {
        via_api: true,
        ..Default::default()
    };
    let token = cfg.server.auth_token.clone();
    for_each_chunk(
        file,
        destination,
        field,
        max_bytes,
        |jobs| {
            let mut body = Vec::new();
            for j in &jobs {
                write_api_line(&mut body, j);
            }
            let mut req = client
                .post(&url)
                .header("content-type", "application/x-ndjson")
                .body(body);
            if let Some(t) = &token {
                req = req.bearer_auth(t.expose());
            }
            async move {
                let resp = req
                    .send()
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("daemon API: {e}")))?;
                let status = resp.status();
                let v: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("daemon API: {e}")))?;
                if status.as_u16() != 202 {
                    return Err(StoreError::Invalid(format!(
                        "daemon API answered {status}: {v}"
                    )));
                }
                let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
                let dups = jobs.iter().filter(|j| j["duplicate"] == true).count() as u64;
                Ok((jobs.len() as u64 - dups, dups))
            }
        },
        &mut report,
    )
    .await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_computed_request_line_length_is_exact() {
        for (mid, payload) in [(Some("m-\u{1}\"😀"), r#"{"a":"\n"}"#), (None, r#"{"b":1}"#)] {
            let job = NewJob {
                destination_id: "we\"b".into(),
                payload: payload.into(),
                message_id: mid.map(str::to_string),
            };
            let mut body = Vec::new();
            write_api_line(&mut body, &job);
            assert_eq!(api_line_len("we\"b", mid, payload), body.len());
        }
    }
}
