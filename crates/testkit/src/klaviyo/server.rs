//! Request handling of the Klaviyo stand-in: checks in the order the real
//! API applies them (scripted faults, key, revision, media types, rate
//! limits), then the import model in `imports.rs` (body limits, per-profile
//! validation, polls, error pages), and the JSON:API answer shapes both use.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::imports::{create, errors_page, status};
use super::{KlaviyoFault, RequestRecord, Route, State};
use crate::http::Dropped;

const JSON_API: &str = "application/vnd.api+json";

/// Serves the Klaviyo stand-in until `stopped` flips.
pub(super) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    stopped: watch::Receiver<bool>,
) {
    crate::http::serve(listener, state, stopped, handle).await
}

pub(super) type Answer = Response<Full<Bytes>>;

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

/// A query parameter's value; bracketed names match encoded or not.
pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.replace("%5B", "[").replace("%5D", "]") == name)
        .map(|(_, v)| v.to_string())
}

pub(super) fn error_object(
    status: u16,
    code: &str,
    title: &str,
    detail: &str,
    source: Value,
) -> Value {
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

pub(super) fn error(
    status: u16,
    code: &str,
    title: &str,
    detail: &str,
    source: Option<Value>,
) -> Answer {
    json_response(
        status,
        &json!({"errors": [error_object(status, code, title, detail, source.unwrap_or(Value::Null))]}),
    )
}

pub(super) fn json_response(status: u16, body: &Value) -> Answer {
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
pub(super) fn now_iso() -> String {
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
