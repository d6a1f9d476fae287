//! The HTTP edge: routing, query parsing, content negotiation. Handlers stay thin.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::decode::FieldValidation;
use crate::discovery;
use crate::objects::{name_of, namespace_of};
use crate::ops::{self, Ctx, DeleteOpts, PatchType};
use crate::resources::{self, Resource};
use crate::selector::{FieldSelector, LabelSelector};
use crate::status::ApiError;
use crate::table;
use crate::watch;
use crate::ApiServer;

pub(crate) fn router(api: ApiServer) -> Router {
    Router::new()
        .route("/version", get(discovery::version))
        .route("/version/", get(discovery::version))
        .route("/healthz", get(ok_text))
        .route("/readyz", get(ok_text))
        .route("/livez", get(ok_text))
        .route("/api", get(discovery::api_versions))
        .route("/api/", get(discovery::api_versions))
        .route("/apis", get(discovery::api_groups))
        .route("/apis/", get(discovery::api_groups))
        .route("/api/v1", get(discovery::core_resources))
        .route("/apis/{group}", get(discovery::group))
        .route("/apis/{group}/{version}", get(discovery::group_resources))
        .route("/openapi/v2", get(discovery::openapi_v2))
        .route("/openapi/v3", get(discovery::openapi_v3_index))
        .route("/openapi/v3/{*path}", get(discovery::openapi_v3_doc))
        .fallback(dispatch)
        .with_state(api)
}

async fn ok_text() -> &'static str {
    "ok"
}

pub(crate) fn json_response(code: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(v).unwrap_or_default();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

pub(crate) fn error_response(e: &ApiError) -> Response {
    json_response(e.code, &e.to_status())
}

/// Query parameters (last value wins), percent-decoded.
pub(crate) fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k), percent_decode(v));
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a resource URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A collection; `ns` is None for all namespaces (or a cluster-scoped kind).
    Collection { res: Resource, ns: Option<String> },
    Object {
        res: Resource,
        ns: String,
        name: String,
        sub: Option<String>,
    },
}

/// Parses `/api/v1/...` and `/apis/<group>/<version>/...`.
pub(crate) fn parse_target(path: &str) -> Option<Target> {
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let (group, version, rest) = match segs.first().map(String::as_str) {
        Some("api") if segs.len() >= 3 => ("", segs[1].as_str(), &segs[2..]),
        Some("apis") if segs.len() >= 4 => (segs[1].as_str(), segs[2].as_str(), &segs[3..]),
        _ => return None,
    };
    let lookup = |r: &str| resources::lookup(group, version, r);
    if rest.len() >= 3 && rest[0] == "namespaces" {
        if let Some(res) = lookup(&rest[2]).filter(|r| r.namespaced) {
            let ns = rest[1].clone();
            return match rest.len() {
                3 => Some(Target::Collection { res, ns: Some(ns) }),
                4 => Some(Target::Object {
                    res,
                    ns,
                    name: rest[3].clone(),
                    sub: None,
                }),
                5 => Some(Target::Object {
                    res,
                    ns,
                    name: rest[3].clone(),
                    sub: Some(rest[4].clone()),
                }),
                _ => None,
            };
        }
    }
    let res = lookup(&rest[0])?;
    match rest.len() {
        1 => Some(Target::Collection { res, ns: None }),
        2 if !res.namespaced => Some(Target::Object {
            res,
            ns: String::new(),
            name: rest[1].clone(),
            sub: None,
        }),
        3 if !res.namespaced => Some(Target::Object {
            res,
            ns: String::new(),
            name: rest[1].clone(),
            sub: Some(rest[2].clone()),
        }),
        _ => None,
    }
}

/// Whether the client asked for a meta.k8s.io Table.
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

fn field_manager(q: &HashMap<String, String>, headers: &HeaderMap) -> String {
    if let Some(m) = q.get("fieldManager").filter(|m| !m.is_empty()) {
        return m.clone();
    }
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .filter(|s| !s.is_empty())
        .unwrap_or("unknown")
        .to_string()
}

fn ctx_for(q: &HashMap<String, String>, headers: &HeaderMap, body_dry_run: bool) -> Ctx {
    Ctx {
        now: jiff::Timestamp::now(),
        dry_run: body_dry_run || q.get("dryRun").is_some_and(|d| d == "All"),
        manager: field_manager(q, headers),
        ..Ctx::default()
    }
}

/// The context of a write that sends an object: it also reads `fieldValidation` (`options` is
/// the options kind kube-apiserver names in its error: `CreateOptions`, `PatchOptions`...).
fn write_ctx(
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    options: &str,
) -> Result<Ctx, ApiError> {
    let validation = FieldValidation::parse(q.get("fieldValidation").map(String::as_str))
        .map_err(|c| ApiError::invalid_options(options, vec![c]))?;
    Ok(Ctx {
        validation,
        ..ctx_for(q, headers, false)
    })
}

/// kube-apiserver's `Warning` header value: code 299, no agent, the text quoted.
fn warning_header(text: &str) -> Option<HeaderValue> {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if c.is_control() => quoted.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    HeaderValue::from_bytes(format!("299 - {quoted}").as_bytes()).ok()
}

/// `r` with the request's warnings as `Warning` headers.
fn warned(mut r: Response, ctx: &Ctx) -> Response {
    for w in ctx.warnings.take() {
        if let Some(v) = warning_header(&w) {
            r.headers_mut().append(header::WARNING, v);
        }
    }
    r
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

fn parse_body(headers: &HeaderMap, body: &Bytes) -> Result<Value, ApiError> {
    let ct = content_type(headers);
    if ct == "application/vnd.kubernetes.protobuf" {
        return crate::proto::decode_body(body).map_err(ApiError::bad_request);
    }
    if ct.contains("protobuf") || ct.contains("cbor") {
        return Err(ApiError::unsupported_media_type_body(&ct));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty"));
    }
    ops::parse_apply_body(body)
}

async fn dispatch(
    State(api): State<ApiServer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(target) = parse_target(uri.path()) else {
        return error_response(&crate::unserved::path(uri.path()));
    };
    let q = parse_query(uri.query());
    let table = wants_table(&headers);
    match handle(&api, &method, target, &q, &headers, &body, table).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(method = %method, path = %uri.path(), code = e.code, reason = e.reason, "request failed");
            error_response(&e)
        }
    }
}

async fn handle(
    api: &ApiServer,
    method: &Method,
    target: Target,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
    table: bool,
) -> Result<Response, ApiError> {
    match target {
        Target::Collection { res, ns } => match *method {
            Method::GET => {
                let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
                if watching {
                    let params = watch::Params::from_query(&res, q, table)?;
                    return Ok(watch::serve(api.clone(), res, ns, params));
                }
                list(api, &res, ns.as_deref(), q, table).await
            }
            Method::POST => {
                let ns = match (res.namespaced, ns) {
                    (true, Some(ns)) => ns,
                    (true, None) => return Err(ApiError::method_not_allowed()),
                    (false, _) => String::new(),
                };
                let obj = parse_body(headers, body)?;
                let ctx = write_ctx(q, headers, "CreateOptions")?;
                let created = api.with_store(|s| ops::create(s, &res, &ns, obj, &ctx))?;
                Ok(warned(json_response(201, &created), &ctx))
            }
            Method::DELETE => delete_collection(api, &res, ns.as_deref(), q, headers, body),
            _ => Err(ApiError::method_not_allowed()),
        },
        Target::Object { res, ns, name, sub } => {
            let status_write = match sub.as_deref() {
                None => false,
                Some("status") if res.status_subresource => true,
                Some("binding") if res.name == "pods" => {
                    if *method != Method::POST {
                        return Err(ApiError::method_not_allowed());
                    }
                    let b = parse_body(headers, body)?;
                    let ctx = ctx_for(q, headers, false);
                    let st = api.with_store(|s| ops::bind(s, &ns, &name, &b, &ctx))?;
                    return Ok(json_response(201, &st));
                }
                Some("log") if res.name == "pods" => {
                    if *method != Method::GET {
                        return Err(ApiError::method_not_allowed());
                    }
                    return crate::logs::serve(api, &ns, &name, q);
                }
                Some(sub) => return Err(crate::unserved::subresource(&res, sub, &ns, &name)),
            };
            match *method {
                Method::GET => {
                    let obj = api
                        .with_store(|s| s.get(&res, &ns, &name).cloned())
                        .ok_or_else(|| ApiError::not_found(&res, &name))?;
                    if table {
                        let rv = crate::objects::rv_of(&obj).to_string();
                        return Ok(json_response(
                            200,
                            &table::table(&res, &[&obj], &rv, q, jiff::Timestamp::now()),
                        ));
                    }
                    Ok(json_response(200, &obj))
                }
                Method::PUT => {
                    let obj = parse_body(headers, body)?;
                    let ctx = write_ctx(q, headers, "UpdateOptions")?;
                    let (o, created) = api.with_store(|s| {
                        ops::update(s, &res, &ns, &name, obj, status_write, &ctx)
                    })?;
                    Ok(warned(
                        json_response(if created { 201 } else { 200 }, &o),
                        &ctx,
                    ))
                }
                Method::PATCH => {
                    let ptype = match content_type(headers).as_str() {
                        "application/json-patch+json" => PatchType::Json,
                        "application/merge-patch+json" => PatchType::Merge,
                        "application/strategic-merge-patch+json" => PatchType::Strategic,
                        "application/apply-patch+yaml" | "application/apply-patch+cbor" => {
                            if q.get("fieldManager").is_none_or(String::is_empty) {
                                return Err(ApiError::bad_request(
                                    "PATCH /apply requires fieldManager to be set",
                                ));
                            }
                            PatchType::Apply {
                                force: q.get("force").is_some_and(|f| f == "true" || f == "1"),
                            }
                        }
                        other => return Err(ApiError::unsupported_media_type(other)),
                    };
                    let ctx = write_ctx(q, headers, "PatchOptions")?;
                    let (o, created) = api.with_store(|s| {
                        ops::patch(s, &res, &ns, &name, ptype, body, status_write, &ctx)
                    })?;
                    Ok(warned(
                        json_response(if created { 201 } else { 200 }, &o),
                        &ctx,
                    ))
                }
                Method::DELETE if !status_write => {
                    let (opts, body_dry_run) = delete_options(q, body)?;
                    let ctx = ctx_for(q, headers, body_dry_run);
                    let o = api.with_store(|s| ops::delete(s, &res, &ns, &name, &opts, &ctx))?;
                    Ok(json_response(200, &o))
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
    }
}

fn delete_options(
    q: &HashMap<String, String>,
    body: &Bytes,
) -> Result<(DeleteOpts, bool), ApiError> {
    let b: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("invalid DeleteOptions: {e}")))?
    };
    let grace = match q.get("gracePeriodSeconds") {
        Some(g) => Some(
            g.parse::<i64>()
                .map_err(|_| ApiError::bad_request(format!("invalid gracePeriodSeconds {g:?}")))?,
        ),
        None => b.get("gracePeriodSeconds").and_then(Value::as_i64),
    };
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(String::from);
    let opts = DeleteOpts {
        grace_period: grace,
        uid: s(b.pointer("/preconditions/uid")),
        resource_version: s(b.pointer("/preconditions/resourceVersion")),
        propagation: q
            .get("propagationPolicy")
            .cloned()
            .or_else(|| s(b.get("propagationPolicy")))
            .or_else(
                || match b.get("orphanDependents").and_then(Value::as_bool) {
                    Some(true) => Some("Orphan".into()),
                    _ => None,
                },
            ),
    };
    let dry = b
        .get("dryRun")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|x| x == "All"));
    Ok((opts, dry))
}

/// Selectors and paging from the query.
pub(crate) struct ListQuery {
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

pub(crate) fn selectors(
    res: &Resource,
    q: &HashMap<String, String>,
) -> Result<ListQuery, ApiError> {
    let ls = q.get("labelSelector").map(String::as_str).unwrap_or("");
    let fs = q.get("fieldSelector").map(String::as_str).unwrap_or("");
    let labels = LabelSelector::parse(ls).map_err(ApiError::bad_request)?;
    // kube-apiserver answers with the conversion error alone ("field label not supported: x");
    // kubectl adds the "Unable to find ... that match ..." context itself.
    let fields = FieldSelector::parse(fs, res).map_err(ApiError::bad_request)?;
    Ok(ListQuery { labels, fields })
}

fn continue_token(rv: u64, ns: &str, name: &str) -> String {
    let raw =
        json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{ns}/{name}\u{0}")}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_continue(token: &str) -> Result<(u64, String, String), ApiError> {
    let bad = || {
        ApiError::bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)")
    };
    if !token.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let v: Value = serde_json::from_slice(&bytes.ok_or_else(bad)?).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let start = v.get("start").and_then(Value::as_str).ok_or_else(bad)?;
    let start = start.trim_end_matches('\u{0}');
    let (ns, name) = start.split_once('/').ok_or_else(bad)?;
    Ok((rv, ns.to_string(), name.to_string()))
}

const CONTINUE_EXPIRED: &str = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.";

async fn list(
    api: &ApiServer,
    res: &Resource,
    ns: Option<&str>,
    q: &HashMap<String, String>,
    table: bool,
) -> Result<Response, ApiError> {
    let sel = selectors(res, q)?;
    let limit: usize = match q.get("limit") {
        Some(l) => l
            .parse::<i64>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {l:?}")))?
            .max(0) as usize,
        None => 0,
    };
    let cont = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_continue(c)?),
        None => None,
    };
    // resourceVersion semantics: "" latest, "0" any, N not older than N (or exactly N).
    let rv_param = q.get("resourceVersion").filter(|r| !r.is_empty()).cloned();
    let exact = q.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
    let wanted = match &rv_param {
        Some(r) => Some(
            r.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {r:?}")))?,
        ),
        None => None,
    };
    if let Some(w) = wanted.filter(|w| *w > 0) {
        // Wait up to 3 s for a resourceVersion from the future, like the watch cache does.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let cur = api.with_store(|s| s.current_rv());
            if cur >= w {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::too_large_rv(w, cur));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let snapshot_rv = match (&cont, wanted) {
        (Some((r, _, _)), _) => Some(*r),
        (None, Some(w)) if exact => Some(w),
        _ => None,
    };
    let (items, rv, next, remaining) = api.with_store(|s| {
        let rv = s.current_rv();
        let base: Vec<Value> = match snapshot_rv.filter(|r| *r != rv) {
            Some(r) => s.snapshot_at(res, ns, r).ok_or_else(|| {
                if cont.is_some() {
                    ApiError::expired(CONTINUE_EXPIRED)
                } else {
                    ApiError::expired(format!("too old resource version: {r} ({rv})"))
                }
            })?,
            None => s.list(res, ns).cloned().collect(),
        };
        let mut matched: Vec<Value> = base
            .into_iter()
            .filter(|o| {
                cont.as_ref().is_none_or(|(_, cns, cname)| {
                    (namespace_of(o), name_of(o)) > (cns.as_str(), cname.as_str())
                })
            })
            .filter(|o| sel.labels.matches_object(o) && sel.fields.matches(o))
            .collect();
        let list_rv = snapshot_rv.unwrap_or(rv);
        let mut next = None;
        let mut remaining = 0;
        if limit > 0 && matched.len() > limit {
            remaining = matched.len() - limit;
            matched.truncate(limit);
            if let Some(last) = matched.last() {
                next = Some(continue_token(list_rv, namespace_of(last), name_of(last)));
            }
        }
        Ok::<_, ApiError>((matched, list_rv, next, remaining))
    })?;
    if table {
        let refs: Vec<&Value> = items.iter().collect();
        let mut t = table::table(res, &refs, &rv.to_string(), q, jiff::Timestamp::now());
        if let Some(n) = &next {
            t["metadata"]["continue"] = json!(n);
        }
        return Ok(json_response(200, &t));
    }
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(n) = next {
        meta["continue"] = json!(n);
        meta["remainingItemCount"] = json!(remaining);
    }
    let list = json!({
        "kind": res.list_kind(),
        "apiVersion": res.api_version(),
        "metadata": meta,
        "items": items,
    });
    Ok(json_response(200, &list))
}

fn delete_collection(
    api: &ApiServer,
    res: &Resource,
    ns: Option<&str>,
    q: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    if res.name == "namespaces" {
        return Err(ApiError::method_not_allowed());
    }
    let sel = selectors(res, q)?;
    let (opts, body_dry_run) = delete_options(q, body)?;
    let ctx = ctx_for(q, headers, body_dry_run);
    let deleted = api.with_store(|s| {
        let rv = s.current_rv();
        let names: Vec<(String, String)> = s
            .list(res, ns)
            .filter(|o| sel.labels.matches_object(o) && sel.fields.matches(o))
            .map(|o| (namespace_of(o).to_string(), name_of(o).to_string()))
            .collect();
        let mut out = Vec::new();
        for (n, name) in names {
            match ops::delete(s, res, &n, &name, &opts, &ctx) {
                Ok(o) => out.push(o),
                Err(e) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok((out, rv))
    })?;
    let (items, rv) = deleted;
    Ok(json_response(
        200,
        &json!({"kind": res.list_kind(), "apiVersion": res.api_version(),
            "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
    ))
}

/// The plain body for a response stream.
pub(crate) fn stream_body<S>(s: S) -> Body
where
    S: futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
    Body::from_stream(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{NAMESPACES, NETWORK_POLICIES, PODS};

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("/api/v1/pods"),
            Some(Target::Collection {
                res: PODS,
                ns: None
            })
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/default/pods/p/status"),
            Some(Target::Object {
                res: PODS,
                ns: "default".into(),
                name: "p".into(),
                sub: Some("status".into())
            })
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/default"),
            Some(Target::Object {
                res: NAMESPACES,
                ns: String::new(),
                name: "default".into(),
                sub: None
            })
        );
        assert_eq!(
            parse_target("/api/v1/namespaces/default/status"),
            Some(Target::Object {
                res: NAMESPACES,
                ns: String::new(),
                name: "default".into(),
                sub: Some("status".into())
            })
        );
        assert_eq!(
            parse_target("/apis/networking.k8s.io/v1/namespaces/a/networkpolicies"),
            Some(Target::Collection {
                res: NETWORK_POLICIES,
                ns: Some("a".into())
            })
        );
        assert_eq!(parse_target("/api/v1/pods/x"), None);
        assert_eq!(parse_target("/apis/networking.k8s.io/v1/pods"), None);
        assert_eq!(parse_target("/api/v2/pods"), None);
    }

    #[test]
    fn query_and_continue() {
        let q = parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1"));
        assert_eq!(
            q.get("labelSelector").map(String::as_str),
            Some("app=web,tier in (a)")
        );
        let t = continue_token(7, "ns", "b");
        assert_eq!(parse_continue(&t).ok(), Some((7, "ns".into(), "b".into())));
        assert!(parse_continue("zz").is_err());
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
