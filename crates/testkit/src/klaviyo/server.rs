//! Request handling of the Klaviyo stand-in: checks in the order the real
//! API applies them (key, revision, media types, limits, per-profile
//! validation), then the import model.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{
    CreateRecord, Import, KlaviyoFault, RequestRecord, Route, State, MAX_ERRORS_PAGE_SIZE,
};

const JSON_API: &str = "application/vnd.api+json";
const PROFILES_POINTER: &str = "/data/attributes/profiles/data";

pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = stopped.changed() => return,
        };
        let st = state.clone();
        let mut stopped_conn = stopped.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let st = st.clone();
                async move { handle(st, req).await.map(crate::http::finish_answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = stopped_conn.changed() => {}
            }
        });
    }
}

/// A scripted connection drop: hyper closes the socket when the service errors.
#[derive(Debug)]
struct Dropped;

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("scripted connection drop")
    }
}

impl std::error::Error for Dropped {}

type Answer = Response<Full<Bytes>>;

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Answer, Dropped> {
    let at = Instant::now();
    let method = req.method().clone();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let (route, import_id) = route_of(&method, req.uri().path());
    *st.last_headers.lock().unwrap() = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let result = answer(&st, req, route, import_id).await;
    let status = result.as_ref().map(|r| r.status().as_u16()).unwrap_or(0);
    st.log.lock().unwrap().push(RequestRecord {
        at,
        method: method.to_string(),
        path: path_and_query,
        route,
        status,
    });
    result
}

fn route_of(method: &Method, path: &str) -> (Route, Option<String>) {
    let trimmed = path.trim_end_matches('/');
    let Some(rest) = trimmed.strip_prefix("/api/profile-bulk-import-jobs") else {
        return (Route::Other, None);
    };
    let parts: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    match (method, parts.as_slice()) {
        (&Method::POST, []) => (Route::Create, None),
        (&Method::GET, [id]) => (Route::Status, Some(id.to_string())),
        (&Method::GET, [id, "import-errors"]) => (Route::Errors, Some(id.to_string())),
        _ => (Route::Other, None),
    }
}

async fn answer(
    st: &State,
    req: Request<Incoming>,
    route: Route,
    import_id: Option<String>,
) -> Result<Answer, Dropped> {
    let fault = {
        let mut s = st.script.lock().unwrap();
        let pos = s
            .faults
            .iter()
            .position(|(r, _)| *r == Route::Any || *r == route);
        pos.and_then(|p| s.faults.remove(p)).map(|(_, f)| f)
    };
    if let Some(f) = fault.filter(|f| !f.pass) {
        return scripted(f).await;
    }
    if let Some(problem) = check_headers(st, &req, route) {
        return Ok(problem);
    }
    if let Some(limited) = enforce_rate(st) {
        return Ok(limited);
    }
    match route {
        Route::Create => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Err(Dropped),
            };
            Ok(create(st, &body))
        }
        Route::Status => Ok(status(st, import_id.as_deref().unwrap_or(""))),
        Route::Errors => Ok(errors_page(
            st,
            import_id.as_deref().unwrap_or(""),
            req.uri().query(),
        )),
        Route::Any | Route::Other => Ok(error(
            404,
            "not_found",
            "Not found.",
            "The requested resource was not found.",
            None,
        )),
    }
}

async fn scripted(f: KlaviyoFault) -> Result<Answer, Dropped> {
    if let Some(d) = f.delay {
        tokio::time::sleep(d).await;
    }
    if f.drop_connection {
        return Err(Dropped);
    }
    let mut resp = match f.body {
        Some(body) => raw(f.status, body),
        None => match f.status {
            429 => error(
                429,
                "throttled",
                "Request was throttled.",
                "Request was throttled. Expected available in a few seconds.",
                None,
            ),
            s if s >= 500 => error(
                s,
                "error",
                "A server error occurred.",
                "A server error occurred.",
                None,
            ),
            s => error(s, "invalid", "Invalid input.", "Scripted error.", None),
        },
    };
    if let Some(ra) = f.retry_after {
        if let Ok(v) = ra.parse() {
            resp.headers_mut().insert("retry-after", v);
        }
    }
    if f.truncate_body {
        resp.extensions_mut().insert(crate::http::CutMidBody);
    }
    Ok(resp)
}

fn check_headers(st: &State, req: &Request<Incoming>, route: Route) -> Option<Answer> {
    let h = req.headers();
    let expected = format!("Klaviyo-API-Key {}", st.opts.api_key);
    let revoked = st.script.lock().unwrap().key_revoked;
    if revoked || h.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Some(error(
            401,
            "not_authenticated",
            "Authentication credentials were not provided.",
            "Missing or invalid private key.",
            Some(json!({"pointer": "/data/"})),
        ));
    }
    match h.get("revision").and_then(|v| v.to_str().ok()) {
        None => {
            return Some(error(
                400,
                "invalid",
                "Invalid input.",
                "The `revision` header is required.",
                Some(json!({"parameter": "revision"})),
            ))
        }
        Some(rev) => {
            let date = rev.split('.').next().unwrap_or("");
            if !is_date(date) || date < st.opts.oldest_revision.as_str() {
                return Some(error(
                    400,
                    "invalid",
                    "Invalid input.",
                    &format!("'{rev}' is not a valid revision."),
                    Some(json!({"parameter": "revision"})),
                ));
            }
        }
    }
    if let Some(accept) = h.get("accept").and_then(|v| v.to_str().ok()) {
        let ok = accept
            .split(',')
            .map(|a| a.split(';').next().unwrap_or("").trim())
            .any(|a| a == JSON_API || a == "application/json" || a == "*/*");
        if !ok {
            return Some(error(
                406,
                "not_acceptable",
                "Not acceptable.",
                "Accept must be application/vnd.api+json.",
                None,
            ));
        }
    }
    if route == Route::Create {
        let ct = h
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.split(';').next().unwrap_or("").trim() != JSON_API {
            return Some(error(
                415,
                "unsupported_media_type",
                "Unsupported media type.",
                &format!("Unsupported media type \"{ct}\" in request."),
                None,
            ));
        }
    }
    None
}

fn enforce_rate(st: &State) -> Option<Answer> {
    let (per_second, per_minute) = st.opts.rate_limit?;
    let now = Instant::now();
    let mut recent = st.recent.lock().unwrap();
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
    {
        recent.pop_front();
    }
    let last_second = recent
        .iter()
        .filter(|t| now.duration_since(**t) < Duration::from_secs(1))
        .count();
    if last_second >= per_second as usize || recent.len() >= per_minute as usize {
        st.limited.fetch_add(1, Ordering::Relaxed);
        let mut resp = error(
            429,
            "throttled",
            "Request was throttled.",
            "Request was throttled. Expected available in 1 second.",
            None,
        );
        resp.headers_mut()
            .insert("retry-after", "1".parse().unwrap());
        return Some(resp);
    }
    recent.push_back(now);
    None
}

fn create(st: &State, body: &Bytes) -> Answer {
    if body.len() > st.opts.max_body_bytes {
        return error(
            413,
            "request_too_large",
            "Request entity too large.",
            &format!(
                "The request body is {} bytes; the maximum is {}.",
                body.len(),
                st.opts.max_body_bytes
            ),
            None,
        );
    }
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return error(
                400,
                "invalid",
                "Invalid input.",
                &format!("Malformed JSON: {e}"),
                Some(json!({"pointer": "/data"})),
            )
        }
    };
    if doc.pointer("/data/type").and_then(Value::as_str) != Some("profile-bulk-import-job") {
        return error(
            400,
            "invalid",
            "Invalid input.",
            "`data.type` must be `profile-bulk-import-job`.",
            Some(json!({"pointer": "/data/type"})),
        );
    }
    let Some(profiles) = doc.pointer(PROFILES_POINTER).and_then(Value::as_array) else {
        return error(
            400,
            "invalid",
            "Invalid input.",
            "`profiles.data` must be a list of profiles.",
            Some(json!({"pointer": PROFILES_POINTER})),
        );
    };
    if profiles.is_empty() || profiles.len() > st.opts.max_profiles {
        return error(
            400,
            "invalid",
            "Invalid input.",
            &format!(
                "A job must contain between 1 and {} profiles; got {}.",
                st.opts.max_profiles,
                profiles.len()
            ),
            Some(json!({"pointer": PROFILES_POINTER})),
        );
    }
    let list_ids: Option<Vec<String>> = doc
        .pointer("/data/relationships/lists/data")
        .and_then(Value::as_array)
        .map(|l| {
            l.iter()
                .map(|x| {
                    x.get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                })
                .collect()
        });

    let script = st.script.lock().unwrap();
    if let (Some(known), Some(ids)) = (&script.known_lists, &list_ids) {
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| !known.contains(*id)) {
            return error(
                400,
                "invalid",
                "Invalid input.",
                &format!("List '{id}' does not exist."),
                Some(json!({"pointer": format!("/data/relationships/lists/data/{i}/id")})),
            );
        }
    }
    let mut errors = Vec::new();
    for (i, p) in profiles.iter().enumerate() {
        let base = format!("{PROFILES_POINTER}/{i}");
        if p.get("type").and_then(Value::as_str) != Some("profile") {
            errors.push(error_object(
                400,
                "invalid",
                "Invalid input.",
                "`type` must be `profile`.",
                json!({"pointer": format!("{base}/type")}),
            ));
            continue;
        }
        let Some(attrs) = p.get("attributes").filter(|a| a.is_object()) else {
            errors.push(error_object(
                400,
                "invalid",
                "Invalid input.",
                "`attributes` must be an object.",
                json!({"pointer": format!("{base}/attributes")}),
            ));
            continue;
        };
        if !["email", "phone_number", "external_id"]
            .iter()
            .any(|k| attrs.get(*k).is_some_and(|v| !v.is_null()))
        {
            errors.push(error_object(
                400,
                "invalid",
                "Invalid input.",
                "One of `email`, `phone_number` or `external_id` is required.",
                json!({"pointer": format!("{base}/attributes")}),
            ));
            continue;
        }
        let size = p.to_string().len();
        if size > st.opts.max_profile_bytes {
            errors.push(error_object(
                400,
                "invalid",
                "Invalid input.",
                &format!(
                    "Profile is {size} bytes; a profile may be at most {} bytes.",
                    st.opts.max_profile_bytes
                ),
                json!({"pointer": base}),
            ));
            continue;
        }
        if let Some(email) = attrs.get("email").and_then(Value::as_str) {
            if !email.contains('@') {
                errors.push(error_object(
                    400,
                    "invalid",
                    "Invalid input.",
                    &format!("Invalid email address: '{email}'."),
                    json!({"pointer": format!("{base}/attributes/email")}),
                ));
                continue;
            }
        }
        for rule in &script.invalid {
            if let Some(v) = rule.hit(attrs) {
                errors.push(error_object(
                    400,
                    "invalid",
                    "Invalid input.",
                    &format!("Invalid {}: '{v}'.", rule.field),
                    json!({"pointer": format!("{base}/attributes/{}", rule.field)}),
                ));
            }
        }
    }
    if !errors.is_empty() {
        return json_response(400, &json!({"errors": errors}));
    }

    let n = st.next_import.fetch_add(1, Ordering::Relaxed);
    let id = format!("IMP{n:08}");
    let mut import = Import {
        id: id.clone(),
        status: "queued",
        total: profiles.len() as u64,
        errors: Vec::new(),
        ok_keys: Vec::new(),
        ok_count: 0,
        polls: 0,
        cancel: false,
        created_at: now_iso(),
        completed_at: None,
    };
    for (i, p) in profiles.iter().enumerate() {
        let attrs = p.get("attributes").unwrap_or(&Value::Null);
        if let Some((rule, v)) = script
            .fail_in_import
            .iter()
            .find_map(|r| r.hit(attrs).map(|v| (r, v)))
        {
            let mut original: Map<String, Value> = attrs.as_object().cloned().unwrap_or_default();
            if let Some(pid) = p.get("id") {
                original.insert("id".into(), pid.clone());
            }
            let mut error = json!({
                "type": "import-error",
                "id": format!("{id}-E{i}"),
                "attributes": {
                    "code": "invalid",
                    "title": "Invalid profile.",
                    "detail": format!("Invalid {}: '{v}'.", rule.field),
                    "source": {"pointer": format!("{PROFILES_POINTER}/{i}/attributes/{}", rule.field)},
                    "original_payload": Value::Object(original),
                }
            });
            if script.omit_original_payload {
                if let Some(a) = error["attributes"].as_object_mut() {
                    a.remove("original_payload");
                }
            }
            import.errors.push(error);
        } else {
            import.ok_count += 1;
            if st.opts.track_keys {
                import.ok_keys.push(profile_key(attrs));
            }
        }
    }
    drop(script);
    {
        let mut s = st.script.lock().unwrap();
        if s.cancel_next > 0 {
            s.cancel_next -= 1;
            import.cancel = true;
        }
    }
    if st.opts.polls_to_complete == 0 {
        finish(st, &mut import);
    }
    let resource = job_resource(&import, st.opts.polls_to_complete, list_ids.as_deref());
    st.creates.lock().unwrap().push(CreateRecord {
        import_id: id.clone(),
        profiles: profiles.len(),
        body_bytes: body.len(),
        list_ids,
    });
    st.imports.lock().unwrap().insert(id, import);
    json_response(202, &json!({"data": resource}))
}

fn profile_key(attrs: &Value) -> String {
    ["email", "phone_number", "external_id"]
        .iter()
        .find_map(|k| attrs.get(*k).and_then(Value::as_str))
        .unwrap_or("<no key>")
        .to_string()
}

fn finish(st: &State, import: &mut Import) {
    import.completed_at = Some(now_iso());
    if import.cancel {
        import.status = "cancelled";
        return;
    }
    import.status = "complete";
    st.imported_total
        .fetch_add(import.ok_count, Ordering::Relaxed);
    if !import.ok_keys.is_empty() {
        let mut imported = st.imported.lock().unwrap();
        for k in import.ok_keys.drain(..) {
            *imported.entry(k).or_insert(0) += 1;
        }
    }
}

fn status(st: &State, id: &str) -> Answer {
    let mut imports = st.imports.lock().unwrap();
    let Some(import) = imports.get_mut(id) else {
        return error(
            404,
            "not_found",
            "Not found.",
            &format!("Import job '{id}' does not exist."),
            None,
        );
    };
    if matches!(import.status, "queued" | "processing") {
        import.polls += 1;
        if import.polls >= st.opts.polls_to_complete {
            finish(st, import);
        } else {
            import.status = "processing";
        }
    }
    json_response(
        200,
        &json!({"data": job_resource(import, st.opts.polls_to_complete, None)}),
    )
}

fn job_resource(i: &Import, polls_to_complete: u32, list_ids: Option<&[String]>) -> Value {
    let failed = i.errors.len() as u64;
    // Progress grows with each poll; a cancelled import stops part-way.
    let partial = i.total * u64::from(i.polls) / u64::from(polls_to_complete.max(1) + 1);
    let (completed, failed_count) = match i.status {
        "complete" => (i.total - failed, failed),
        "cancelled" | "processing" => (partial, 0),
        _ => (0, 0),
    };
    let mut r = json!({
        "type": "profile-bulk-import-job",
        "id": i.id,
        "attributes": {
            "status": i.status,
            "created_at": i.created_at,
            "total_count": i.total,
            "completed_count": completed,
            "failed_count": failed_count,
            "completed_at": i.completed_at,
            "expires_at": null,
            "started_at": if i.status == "queued" { Value::Null } else { Value::String(i.created_at.clone()) },
        },
        "links": {"self": format!("/api/profile-bulk-import-jobs/{}/", i.id)},
    });
    if let Some(ids) = list_ids {
        r["relationships"] = json!({"lists": {"data": ids.iter().map(|id| json!({"type": "list", "id": id})).collect::<Vec<_>>()}});
    }
    r
}

fn errors_page(st: &State, id: &str, query: Option<&str>) -> Answer {
    let imports = st.imports.lock().unwrap();
    let Some(import) = imports.get(id) else {
        return error(
            404,
            "not_found",
            "Not found.",
            &format!("Import job '{id}' does not exist."),
            None,
        );
    };
    let cursor = query_param(query, "page[cursor]");
    let size = match query_param(query, "page[size]") {
        None => st.opts.errors_page_size.max(1),
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_ERRORS_PAGE_SIZE).contains(&n) => n,
            _ => {
                return error(
                    400,
                    "invalid",
                    "Invalid input.",
                    &format!("Page size must be between 1 and {MAX_ERRORS_PAGE_SIZE}; got '{v}'."),
                    Some(json!({"parameter": "page[size]"})),
                )
            }
        },
    };
    // Links keep an explicit size, as the vendor's do.
    let size_param = query_param(query, "page[size]")
        .map(|_| format!("&page%5Bsize%5D={size}"))
        .unwrap_or_default();
    let offset = match cursor
        .as_deref()
        .map(|c| c.strip_prefix('c').and_then(|n| n.parse::<usize>().ok()))
    {
        None => 0,
        Some(Some(n)) => n,
        Some(None) => {
            return error(
                400,
                "invalid",
                "Invalid input.",
                "Invalid page cursor.",
                Some(json!({"parameter": "page[cursor]"})),
            )
        }
    };
    // Errors are listed once the import has ended.
    let all: &[Value] = if import.status == "complete" {
        &import.errors
    } else {
        &[]
    };
    let page: Vec<Value> = all.iter().skip(offset).take(size).cloned().collect();
    let origin = st
        .script
        .lock()
        .unwrap()
        .links_origin
        .clone()
        .unwrap_or_else(|| format!("http://{}", st.addr));
    let link = |off: usize| {
        format!("{origin}/api/profile-bulk-import-jobs/{id}/import-errors?page%5Bcursor%5D=c{off}{size_param}")
    };
    let next = (offset + size < all.len()).then(|| link(offset + size));
    let prev = (offset > 0).then(|| link(offset.saturating_sub(size)));
    json_response(
        200,
        &json!({
            "data": page,
            "links": {
                "self": link(offset),
                "first": format!("{origin}/api/profile-bulk-import-jobs/{id}/import-errors"),
                "last": null,
                "prev": prev,
                "next": next,
            }
        }),
    )
}

/// A query parameter's value; bracketed names match encoded or not.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.replace("%5B", "[").replace("%5D", "]") == name)
        .map(|(_, v)| v.to_string())
}

fn error_object(status: u16, code: &str, title: &str, detail: &str, source: Value) -> Value {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut e = json!({
        "id": format!("00000000-0000-4000-8000-{n:012}"),
        "status": status,
        "code": code,
        "title": title,
        "detail": detail,
    });
    if !source.is_null() {
        e["source"] = source;
    }
    e
}

fn error(status: u16, code: &str, title: &str, detail: &str, source: Option<Value>) -> Answer {
    json_response(
        status,
        &json!({"errors": [error_object(status, code, title, detail, source.unwrap_or(Value::Null))]}),
    )
}

fn json_response(status: u16, body: &Value) -> Answer {
    raw(status, body.to_string())
}

fn raw(status: u16, body: String) -> Answer {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", JSON_API)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

/// Now as `YYYY-MM-DDTHH:MM:SS+00:00`, the way Klaviyo writes times.
fn now_iso() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(
            route_of(&Method::POST, "/api/profile-bulk-import-jobs/"),
            (Route::Create, None)
        );
        assert_eq!(
            route_of(&Method::POST, "/api/profile-bulk-import-jobs"),
            (Route::Create, None)
        );
        assert_eq!(
            route_of(&Method::GET, "/api/profile-bulk-import-jobs/X1/"),
            (Route::Status, Some("X1".into()))
        );
        assert_eq!(
            route_of(
                &Method::GET,
                "/api/profile-bulk-import-jobs/X1/import-errors"
            ),
            (Route::Errors, Some("X1".into()))
        );
        assert_eq!(
            route_of(&Method::GET, "/api/profiles"),
            (Route::Other, None)
        );
    }

    #[test]
    fn query_params_match_encoded_and_plain_brackets() {
        let q = Some("page%5Bcursor%5D=c20&page[size]=100");
        assert_eq!(query_param(q, "page[cursor]").as_deref(), Some("c20"));
        assert_eq!(query_param(q, "page[size]").as_deref(), Some("100"));
        assert_eq!(query_param(q, "page[other]"), None);
        assert_eq!(query_param(None, "page[size]"), None);
    }

    #[test]
    fn dates() {
        assert!(is_date("2025-01-15"));
        assert!(!is_date("2025-1-15"));
        let now = now_iso();
        assert_eq!(now.len(), 25, "{now}");
        assert!(now.starts_with("20"), "{now}");
    }
}
