//! The import model of the Klaviyo stand-in, once a request has passed the
//! checks in `server.rs`: creating an import job (body limits, JSON:API
//! shape, per-profile validation that rejects the whole request), advancing
//! it poll by poll to `complete` or `cancelled`, counting what it applied
//! per profile key, and paging its per-profile errors by cursor.

use std::sync::atomic::Ordering;

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::server::{error, error_object, json_response, now_iso, query_param, Answer};
use super::{CreateRecord, Import, State, MAX_ERRORS_PAGE_SIZE};

const PROFILES_POINTER: &str = "/data/attributes/profiles/data";

/// Creates an import job from a request body, or answers why not.
pub(super) fn create(st: &State, body: &Bytes) -> Answer {
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
            errors.push(invalid_field(
                "`type` must be `profile`.",
                format!("{base}/type"),
            ));
            continue;
        }
        let Some(attrs) = p.get("attributes").filter(|a| a.is_object()) else {
            errors.push(invalid_field(
                "`attributes` must be an object.",
                format!("{base}/attributes"),
            ));
            continue;
        };
        if !["email", "phone_number", "external_id"]
            .iter()
            .any(|k| attrs.get(*k).is_some_and(|v| !v.is_null()))
        {
            errors.push(invalid_field(
                "One of `email`, `phone_number` or `external_id` is required.",
                format!("{base}/attributes"),
            ));
            continue;
        }
        let size = p.to_string().len();
        if size > st.opts.max_profile_bytes {
            errors.push(invalid_field(
                &format!(
                    "Profile is {size} bytes; a profile may be at most {} bytes.",
                    st.opts.max_profile_bytes
                ),
                base.clone(),
            ));
            continue;
        }
        if let Some(email) = attrs.get("email").and_then(Value::as_str) {
            if !email.contains('@') {
                errors.push(invalid_field(
                    &format!("Invalid email address: '{email}'."),
                    format!("{base}/attributes/email"),
                ));
                continue;
            }
        }
        for rule in &script.invalid {
            if let Some(v) = rule.hit(attrs) {
                errors.push(invalid_field(
                    &format!("Invalid {}: '{v}'.", rule.field),
                    format!("{base}/attributes/{}", rule.field),
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

/// Klaviyo's 404 for an import job id it does not know (status and errors).
fn import_not_found(id: &str) -> Answer {
    error(
        404,
        "not_found",
        "Not found.",
        &format!("Import job '{id}' does not exist."),
        None,
    )
}

/// The import job `id`, advancing it one poll.
pub(super) fn status(st: &State, id: &str) -> Answer {
    let mut imports = st.imports.lock().unwrap();
    let Some(import) = imports.get_mut(id) else {
        return import_not_found(id);
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

/// One page of the import's per-profile errors.
pub(super) fn errors_page(st: &State, id: &str, query: Option<&str>) -> Answer {
    let imports = st.imports.lock().unwrap();
    let Some(import) = imports.get(id) else {
        return import_not_found(id);
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

/// One JSON:API `invalid` error for the profile field at `pointer`.
fn invalid_field(detail: &str, pointer: String) -> Value {
    error_object(
        400,
        "invalid",
        "Invalid input.",
        detail,
        json!({ "pointer": pointer }),
    )
}
