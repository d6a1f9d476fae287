//! Write semantics (create, update, patch, delete, bind, garbage collection) over the store,
//! free of HTTP.

use serde_json::{json, Value};

use crate::decode::{self, FieldValidation};
use crate::managed;
use crate::objects::{
    self, finalizers, metadata_mut, name_of, namespace_of, rv_of, timestamp, uid_of,
};
use crate::patch;
use crate::resources::{self, Resource, NAMESPACES, PODS};
use crate::status::{ApiError, Cause};
use crate::store::Store;

/// Per-request context.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ctx {
    pub now: jiff::Timestamp,
    pub dry_run: bool,
    /// Field manager (from `fieldManager` or the user agent).
    pub manager: String,
    /// What to do with fields the kind does not have (`fieldValidation`).
    pub validation: FieldValidation,
    /// What the response warns about (`Warning` headers).
    pub warnings: Warnings,
}

/// The warnings of one request, shared by the clones of its context.
#[derive(Debug, Clone, Default)]
pub(crate) struct Warnings(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl Warnings {
    pub fn push(&self, text: String) {
        let mut w = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !w.contains(&text) {
            w.push(text);
        }
    }

    pub fn take(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl Ctx {
    pub fn now_text(&self) -> String {
        timestamp(self.now)
    }
}

/// The PATCH flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchType {
    Json,
    Merge,
    Strategic,
    Apply { force: bool },
}

/// `DeleteOptions` (from the body and the query).
#[derive(Debug, Clone, Default)]
pub(crate) struct DeleteOpts {
    pub grace_period: Option<i64>,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub propagation: Option<String>,
}

/// Sets kind/apiVersion and the namespace from the URL; rejects a mismatched namespace.
fn normalize(res: &Resource, url_ns: &str, mut body: Value) -> Result<Value, ApiError> {
    let Value::Object(m) = &mut body else {
        return Err(ApiError::bad_request(format!(
            "Object '{}' is not a JSON object",
            res.kind
        )));
    };
    if let Some(kind) = m.get("kind").and_then(Value::as_str) {
        if !kind.is_empty() && kind != res.kind {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{}\" cannot be handled as a {}: the kind of the body does not match the resource",
                res.version, res.kind
            )));
        }
    }
    if let Some(av) = m.get("apiVersion").and_then(Value::as_str) {
        if !av.is_empty() && av != res.api_version() {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({av}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
    }
    m.insert("kind".into(), json!(res.kind));
    m.insert("apiVersion".into(), json!(res.api_version()));
    let md = metadata_mut(&mut body);
    if res.namespaced {
        match md.get("namespace").and_then(Value::as_str) {
            None | Some("") => {
                md.insert("namespace".into(), json!(url_ns));
            }
            Some(ns) if ns != url_ns => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ))
            }
            Some(_) => {}
        }
    } else {
        md.remove("namespace");
    }
    Ok(body)
}

fn check_namespace(s: &Store, res: &Resource, ns: &str, name: &str) -> Result<(), ApiError> {
    if !res.namespaced {
        return Ok(());
    }
    match s.get(&NAMESPACES, "", ns) {
        None => Err(ApiError::not_found(&NAMESPACES, ns)),
        Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => Err(ApiError::forbidden(
            res,
            name,
            &format!(
                "unable to create new content in namespace {ns} because it is being terminated"
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// Fills what the server owns on a new object and stores it.
fn finish_create(
    s: &mut Store,
    res: &Resource,
    mut obj: Value,
    ctx: &Ctx,
    apply: bool,
) -> Result<Value, ApiError> {
    {
        let md = metadata_mut(&mut obj);
        if md
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            if let Some(prefix) = md.get("generateName").and_then(Value::as_str) {
                if !prefix.is_empty() {
                    let n = objects::generate_name(prefix);
                    md.insert("name".into(), json!(n));
                }
            }
        }
    }
    objects::apply_defaults(res, &mut obj);
    objects::prepare_for_create(res, &mut obj);
    objects::validate(res, &obj)?;
    let (ns, name) = (namespace_of(&obj).to_string(), name_of(&obj).to_string());
    check_namespace(s, res, &ns, &name)?;
    if s.get(res, &ns, &name).is_some() {
        return Err(ApiError::already_exists(res, &name));
    }
    let now = ctx.now_text();
    {
        let md = metadata_mut(&mut obj);
        md.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        md.insert("creationTimestamp".into(), json!(now));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            md.remove(f);
        }
        if res.generation {
            md.insert("generation".into(), json!(1));
        } else {
            md.remove("generation");
        }
    }
    if !apply {
        let mut stripped = obj.clone();
        if res.status_subresource {
            if let Some(m) = stripped.as_object_mut() {
                m.remove("status");
            }
        }
        managed::record_update(
            None,
            &mut stripped,
            &ctx.manager,
            &res.api_version(),
            "",
            &now,
        );
        let mf = stripped.pointer("/metadata/managedFields").cloned();
        let md = metadata_mut(&mut obj);
        match mf {
            Some(mf) => md.insert("managedFields".into(), mf),
            None => md.remove("managedFields"),
        };
    }
    if ctx.dry_run {
        return Ok(obj);
    }
    Ok(s.put(res, obj))
}

pub(crate) fn create(
    s: &mut Store,
    res: &Resource,
    url_ns: &str,
    body: Value,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let obj = normalize(res, url_ns, body)?;
    let mut obj = decode::body(res, &obj, ctx)?;
    metadata_mut(&mut obj).remove("managedFields");
    finish_create(s, res, obj, ctx, false)
}

/// The common tail of PUT and PATCH: carry-over, validation, no-op detection, finalizers, store.
fn commit_update(
    s: &mut Store,
    res: &Resource,
    old: &Value,
    mut new: Value,
    status_write: bool,
    record: bool,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let name = name_of(old).to_string();
    if name_of(&new) != name || namespace_of(&new) != namespace_of(old) {
        return Err(ApiError::invalid(
            res,
            &name,
            vec![Cause {
                reason: "FieldValueInvalid",
                message: format!("Invalid value: {:?}: field is immutable", name_of(&new)),
                field: "metadata.name".into(),
            }],
        ));
    }
    objects::apply_defaults(res, &mut new);
    objects::prepare_for_update(res, old, &mut new, status_write);
    objects::validate(res, &new)?;
    crate::validate::update_rules(res, old, &new)?;
    if res.name == "pods" && !status_write {
        objects::check_pod_update(old, &new).map_err(|c| ApiError::invalid(res, &name, vec![c]))?;
    }
    let now = ctx.now_text();
    if record {
        let sub = if status_write { "status" } else { "" };
        managed::record_update(
            Some(old),
            &mut new,
            &ctx.manager,
            &res.api_version(),
            sub,
            &now,
        );
    }
    metadata_mut(&mut new).insert("resourceVersion".into(), json!(rv_of(old)));
    if without_times(&new) == without_times(old) {
        return Ok(old.clone());
    }
    if ctx.dry_run {
        return Ok(new);
    }
    let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
    let grace_done = new
        .pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_none_or(|g| g == 0);
    if deleting && finalizers(&new).is_empty() && grace_done {
        s.put(res, new);
        return finalize(s, res, namespace_of(old), &name, ctx, true)
            .ok_or_else(|| ApiError::not_found(res, &name));
    }
    Ok(s.put(res, new))
}

/// Objects compared for no-op detection: managedFields timestamps do not count.
fn without_times(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(Value::Array(mf)) = v.pointer_mut("/metadata/managedFields") {
        for e in mf.iter_mut().filter_map(Value::as_object_mut) {
            e.remove("time");
        }
    }
    v
}

fn check_preconditions(res: &Resource, old: &Value, new: &Value) -> Result<(), ApiError> {
    let name = name_of(old);
    let rv = rv_of(new);
    if !rv.is_empty() && rv != rv_of(old) {
        return Err(ApiError::stale(res, name));
    }
    let uid = uid_of(new);
    if !uid.is_empty() && uid != uid_of(old) {
        return Err(ApiError::conflict(
            res,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                uid_of(old)
            ),
        ));
    }
    Ok(())
}

/// PUT. Returns the object and whether it was created.
pub(crate) fn update(
    s: &mut Store,
    res: &Resource,
    ns: &str,
    name: &str,
    body: Value,
    status_write: bool,
    ctx: &Ctx,
) -> Result<(Value, bool), ApiError> {
    let new = normalize(res, ns, body)?;
    let mut new = decode::body(res, &new, ctx)?;
    let body_name = name_of(&new).to_string();
    if body_name.is_empty() {
        metadata_mut(&mut new).insert("name".into(), json!(name));
    } else if body_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    let Some(old) = s.get(res, ns, name).cloned() else {
        if res.create_on_update && !status_write {
            if !rv_of(&new).is_empty() {
                return Err(ApiError::not_found(res, name));
            }
            return finish_create(s, res, new, ctx, false).map(|o| (o, true));
        }
        return Err(ApiError::not_found(res, name));
    };
    check_preconditions(res, &old, &new)?;
    // managedFields in the body are kept as sent (kubectl edit round-trips them).
    if new.pointer("/metadata/managedFields").is_none() {
        if let Some(mf) = old.pointer("/metadata/managedFields").cloned() {
            metadata_mut(&mut new).insert("managedFields".into(), mf);
        }
    }
    commit_update(s, res, &old, new, status_write, true, ctx).map(|o| (o, false))
}

/// Parses an apply body: JSON, or YAML.
pub(crate) fn parse_apply_body(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
}

/// PATCH. Returns the object and whether it was created (apply only).
#[allow(clippy::too_many_arguments)]
pub(crate) fn patch(
    s: &mut Store,
    res: &Resource,
    ns: &str,
    name: &str,
    ptype: PatchType,
    body: &[u8],
    status_write: bool,
    ctx: &Ctx,
) -> Result<(Value, bool), ApiError> {
    let patch_value = match ptype {
        PatchType::Apply { .. } => parse_apply_body(body)?,
        _ => serde_json::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?,
    };
    let old = s.get(res, ns, name).cloned();
    let sub = if status_write { "status" } else { "" };
    if let PatchType::Apply { force } = ptype {
        let applied = normalize(res, ns, patch_value)?;
        let mut applied = decode::apply_config(res, ns, name, &applied, ctx)?;
        let applied_name = name_of(&applied).to_string();
        if applied_name.is_empty() {
            metadata_mut(&mut applied).insert("name".into(), json!(name));
        } else if applied_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({applied_name}) does not match the name on the URL ({name})"
            )));
        }
        metadata_mut(&mut applied).remove("managedFields");
        let now = ctx.now_text();
        let Some(old) = old else {
            if status_write {
                return Err(ApiError::not_found(res, name));
            }
            let obj = managed::apply(None, &applied, &ctx.manager, force, sub, &now)?;
            return finish_create(s, res, obj, ctx, true).map(|o| (o, true));
        };
        check_preconditions(res, &old, &applied)?;
        let mut merged = managed::apply(Some(&old), &applied, &ctx.manager, force, sub, &now)?;
        metadata_mut(&mut merged).insert("resourceVersion".into(), json!(rv_of(&old)));
        return commit_update(s, res, &old, merged, status_write, false, ctx).map(|o| (o, false));
    }
    let Some(old) = old else {
        return Err(ApiError::not_found(res, name));
    };
    let mut new = match ptype {
        PatchType::Json => {
            let mut t = old.clone();
            patch::json_patch(&mut t, &patch_value).map_err(|e| {
                ApiError::invalid(
                    res,
                    name,
                    vec![Cause {
                        reason: "FieldValueInvalid",
                        message: e,
                        field: String::new(),
                    }],
                )
            })?;
            t
        }
        PatchType::Merge => {
            let mut t = old.clone();
            patch::merge_patch(&mut t, &patch_value);
            t
        }
        PatchType::Strategic => {
            patch::strategic_merge(&old, &patch_value).map_err(ApiError::bad_request)?
        }
        PatchType::Apply { .. } => return Err(ApiError::internal("unreachable patch type")),
    };
    if !new.is_object() {
        return Err(ApiError::bad_request("the patch did not produce an object"));
    }
    check_preconditions(res, &old, &new)?;
    let md = metadata_mut(&mut new);
    md.insert("resourceVersion".into(), json!(rv_of(&old)));
    if md.get("uid").is_none() {
        md.insert("uid".into(), json!(uid_of(&old)));
    }
    if let Some(m) = new.as_object_mut() {
        m.insert("kind".into(), json!(res.kind));
        m.insert("apiVersion".into(), json!(res.api_version()));
    }
    let new = decode::patched(res, name, &new, ctx)?;
    commit_update(s, res, &old, new, status_write, true, ctx).map(|o| (o, false))
}

/// Removes an object for good and collects its dependents (unless `cascade` is false).
fn finalize(
    s: &mut Store,
    res: &Resource,
    ns: &str,
    name: &str,
    ctx: &Ctx,
    cascade: bool,
) -> Option<Value> {
    if !cascade {
        let uid = uid_of(s.get(res, ns, name)?).to_string();
        orphan_dependents(s, &uid, ctx);
    }
    let removed = s.remove(res, ns, name)?;
    if cascade {
        collect_dependents(s, uid_of(&removed), ctx);
    }
    Some(removed)
}

/// Like the garbage collector for an orphaning deletion: the dependents of `uid` lose their
/// references to it (before the owner goes, so that they are not collected).
fn orphan_dependents(s: &mut Store, uid: &str, ctx: &Ctx) {
    if uid.is_empty() {
        return;
    }
    let refers = |r: &Value| r.get("uid").and_then(Value::as_str) == Some(uid);
    let dependents: Vec<(&'static str, Value)> = s
        .all()
        .filter(|(_, o)| {
            o.pointer("/metadata/ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(refers))
        })
        .map(|(r, o)| (r, o.clone()))
        .collect();
    for (r, old) in dependents {
        let Some(res) = resources::by_name(r) else {
            continue;
        };
        let mut obj = old.clone();
        let md = metadata_mut(&mut obj);
        let kept: Vec<Value> = md
            .get("ownerReferences")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter(|r| !refers(r)).cloned().collect())
            .unwrap_or_default();
        if kept.is_empty() {
            md.remove("ownerReferences");
        } else {
            md.insert("ownerReferences".into(), Value::Array(kept));
        }
        put_as_controller(s, &res, &old, obj, ctx);
    }
}

/// Stores a controller's change to `old` (the fields it removed lose their managers).
fn put_as_controller(s: &mut Store, res: &Resource, old: &Value, mut new: Value, ctx: &Ctx) {
    managed::record_update(
        Some(old),
        &mut new,
        "kube-controller-manager",
        &res.api_version(),
        "",
        &ctx.now_text(),
    );
    s.put(res, new);
}

/// What the garbage collector makes of one ownerReference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnerState {
    /// An object of that kind, name and uid exists.
    Present,
    /// None does (not found, or found with another uid): the reference dangles.
    Absent,
    /// The reference cannot be resolved (a kind this server does not serve, a namespaced owner
    /// of a cluster-scoped dependent, no uid); the collector leaves such dependents alone.
    Unresolvable,
}

/// Like kube's garbage collector (`isDangling`): the owner is looked up by the reference's
/// apiVersion, kind and name (in the dependent's namespace for a namespaced kind), and must
/// have the reference's uid.
fn owner_state(s: &Store, dependent_ns: &str, r: &Value) -> OwnerState {
    let text = |k: &str| r.get(k).and_then(Value::as_str).filter(|v| !v.is_empty());
    let (Some(api_version), Some(kind), Some(name), Some(uid)) =
        (text("apiVersion"), text("kind"), text("name"), text("uid"))
    else {
        return OwnerState::Unresolvable;
    };
    let Some(owner_res) = resources::ALL
        .iter()
        .find(|x| x.kind == kind && x.api_version() == api_version)
    else {
        return OwnerState::Unresolvable;
    };
    let ns = if owner_res.namespaced {
        if dependent_ns.is_empty() {
            return OwnerState::Unresolvable;
        }
        dependent_ns
    } else {
        ""
    };
    match s.get(owner_res, ns, name) {
        Some(o) if uid_of(o) == uid => OwnerState::Present,
        _ => OwnerState::Absent,
    }
}

/// What the collector does with one dependent.
enum Verdict {
    Keep,
    /// Every owner is gone: delete it (with this propagation policy).
    Delete(&'static str),
    /// Some owners remain: drop the references to the ones that are gone.
    DropDangling(Vec<Value>),
}

fn verdict(s: &Store, obj: &Value) -> Verdict {
    let Some(refs) = obj
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .filter(|a| !a.is_empty())
    else {
        return Verdict::Keep;
    };
    // Objects already being deleted are left to their finalizers.
    if obj.pointer("/metadata/deletionTimestamp").is_some() {
        return Verdict::Keep;
    }
    let ns = namespace_of(obj);
    let states: Vec<OwnerState> = refs.iter().map(|r| owner_state(s, ns, r)).collect();
    if states.contains(&OwnerState::Unresolvable) || !states.contains(&OwnerState::Absent) {
        return Verdict::Keep;
    }
    if states.contains(&OwnerState::Present) {
        let kept = refs
            .iter()
            .zip(&states)
            .filter(|(_, st)| **st == OwnerState::Present)
            .map(|(r, _)| r.clone())
            .collect();
        return Verdict::DropDangling(kept);
    }
    let fins = finalizers(obj);
    let policy = if fins.iter().any(|f| f == "orphan") {
        "Orphan"
    } else if fins.iter().any(|f| f == "foregroundDeletion") {
        "Foreground"
    } else {
        "Background"
    };
    Verdict::Delete(policy)
}

/// Garbage collection over the objects selected by `pick`: deletes those whose owners are all
/// gone, and removes references to gone owners from those that still have one.
fn collect_where(s: &mut Store, ctx: &Ctx, pick: impl Fn(&Value) -> bool) {
    let work: Vec<(&'static str, String, String, Verdict)> = s
        .all()
        .filter(|(_, o)| pick(o))
        .filter_map(|(r, o)| match verdict(s, o) {
            Verdict::Keep => None,
            v => Some((r, namespace_of(o).to_string(), name_of(o).to_string(), v)),
        })
        .collect();
    for (r, ns, name, v) in work {
        let Some(res) = resources::by_name(r) else {
            continue;
        };
        // An earlier step (a cascade) may have changed things: decide again on the live object.
        let Some(current) = s.get(&res, &ns, &name) else {
            continue;
        };
        match (v, verdict(s, current)) {
            (_, Verdict::Delete(policy)) => {
                let opts = DeleteOpts {
                    propagation: Some(policy.to_string()),
                    ..DeleteOpts::default()
                };
                if let Err(e) = delete(s, &res, &ns, &name, &opts, ctx) {
                    tracing::debug!(resource = r, namespace = %ns, name = %name, error = %e.message, "garbage collection skipped");
                }
            }
            (_, Verdict::DropDangling(kept)) => {
                let old = current.clone();
                let mut new = old.clone();
                metadata_mut(&mut new).insert("ownerReferences".into(), Value::Array(kept));
                put_as_controller(s, &res, &old, new, ctx);
            }
            (_, Verdict::Keep) => {}
        }
    }
}

/// Garbage collection after the object with `uid` went: its dependents.
fn collect_dependents(s: &mut Store, uid: &str, ctx: &Ctx) {
    if uid.is_empty() {
        return;
    }
    collect_where(s, ctx, |o| {
        o.pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|r| r.get("uid").and_then(Value::as_str) == Some(uid))
            })
    });
}

/// The garbage collector's periodic pass: every object with ownerReferences (so that objects
/// created with a reference to an owner that is already gone are collected too).
pub(crate) fn collect_garbage(s: &mut Store, ctx: &Ctx) {
    collect_where(s, ctx, |o| {
        o.pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
    });
}

/// DELETE of one object. Returns the object as deleted (or as marked for deletion).
pub(crate) fn delete(
    s: &mut Store,
    res: &Resource,
    ns: &str,
    name: &str,
    opts: &DeleteOpts,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let Some(old) = s.get(res, ns, name).cloned() else {
        return Err(ApiError::not_found(res, name));
    };
    if let Some(uid) = opts.uid.as_deref().filter(|u| !u.is_empty()) {
        if uid != uid_of(&old) {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    uid_of(&old)
                ),
            ));
        }
    }
    if let Some(rv) = opts.resource_version.as_deref().filter(|r| !r.is_empty()) {
        if rv != rv_of(&old) {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                    rv_of(&old)
                ),
            ));
        }
    }
    if res.name == "namespaces" && matches!(name, "default" | "kube-system" | "kube-public") {
        return Err(ApiError::forbidden(
            res,
            name,
            "this namespace may not be deleted",
        ));
    }
    if ctx.dry_run {
        return Ok(old);
    }
    let cascade = opts.propagation.as_deref() != Some("Orphan");
    let now = ctx.now_text();
    if res.name == "namespaces" {
        // Like the namespace controller: mark it Terminating now; `reap` empties and removes it.
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            return Ok(old);
        }
        let mut term = old.clone();
        metadata_mut(&mut term).insert("deletionTimestamp".into(), json!(now));
        metadata_mut(&mut term).insert("deletionGracePeriodSeconds".into(), json!(0));
        if let Some(m) = term.as_object_mut() {
            m.insert("status".into(), json!({"phase": "Terminating"}));
        }
        return Ok(s.put(res, term));
    }
    if res.name == "pods" {
        let bound = old
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty());
        let done = matches!(
            old.pointer("/status/phase").and_then(Value::as_str),
            Some("Succeeded" | "Failed")
        );
        let default_grace = old
            .pointer("/spec/terminationGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(30);
        let mut grace = opts.grace_period.unwrap_or(default_grace).max(0);
        if !bound || done {
            grace = 0;
        }
        let current = old
            .pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64);
        if grace > 0 {
            if current.is_some_and(|c| c <= grace) {
                return Ok(old);
            }
            let mut marked = old.clone();
            let at = ctx
                .now
                .checked_add(jiff::SignedDuration::from_secs(grace))
                .unwrap_or(ctx.now);
            let md = metadata_mut(&mut marked);
            md.insert("deletionTimestamp".into(), json!(timestamp(at)));
            md.insert("deletionGracePeriodSeconds".into(), json!(grace));
            return Ok(s.put(res, marked));
        }
    }
    if !finalizers(&old).is_empty() {
        let mut marked = old.clone();
        let md = metadata_mut(&mut marked);
        if md.get("deletionTimestamp").is_none() {
            md.insert("deletionTimestamp".into(), json!(now));
        }
        md.insert("deletionGracePeriodSeconds".into(), json!(0));
        if marked == old {
            return Ok(old);
        }
        return Ok(s.put(res, marked));
    }
    finalize(s, res, ns, name, ctx, cascade).ok_or_else(|| ApiError::not_found(res, name))
}

/// Like the namespace controller: deletes everything in a terminating namespace, and removes
/// the namespace once its content is gone (objects with finalizers are only marked for
/// deletion, and hold the namespace until their finalizers are removed).
fn reap_namespaces(s: &mut Store, ctx: &Ctx) {
    let terminating: Vec<String> = s
        .list(&NAMESPACES, None)
        .filter(|n| n.pointer("/metadata/deletionTimestamp").is_some())
        .map(|n| name_of(n).to_string())
        .collect();
    // The namespace controller deletes with default options: a pod bound to a node gets its
    // grace period, so its kubelet tears it down and confirms, as for any other deletion.
    let opts = DeleteOpts::default();
    for ns in terminating {
        let contents: Vec<(&'static str, String)> = s
            .all()
            .filter(|(r, o)| {
                *r != "namespaces"
                    && *r != "nodes"
                    && namespace_of(o) == ns
                    && (o.pointer("/metadata/deletionTimestamp").is_none()
                        || finalizers(o).is_empty())
            })
            .map(|(r, o)| (r, name_of(o).to_string()))
            .collect();
        for (r, n) in contents {
            if let Some(cres) = resources::by_name(r) {
                if let Err(e) = delete(s, &cres, &ns, &n, &opts, ctx) {
                    tracing::debug!(resource = r, namespace = %ns, name = %n, error = %e.message, "namespace cleanup skipped");
                }
            }
        }
        let remaining: Vec<(&'static str, Vec<String>)> = s
            .all()
            .filter(|(r, o)| *r != "namespaces" && *r != "nodes" && namespace_of(o) == ns)
            .map(|(r, o)| (r, finalizers(o)))
            .collect();
        let left = s
            .get(&NAMESPACES, "", &ns)
            .is_some_and(|n| finalizers(n).is_empty());
        if remaining.is_empty() {
            if left {
                finalize(s, &NAMESPACES, "", &ns, ctx, true);
            }
        } else {
            report_remaining(s, &ns, &remaining, ctx);
        }
    }
}

/// The namespace controller's deletion conditions on a namespace whose content is not gone yet
/// (kube's `namespaceConditionUpdater`; a condition keeps its transition time while unchanged).
fn report_remaining(s: &mut Store, ns: &str, remaining: &[(&'static str, Vec<String>)], ctx: &Ctx) {
    use std::collections::BTreeMap;
    let Some(old) = s.get(&NAMESPACES, "", ns).cloned() else {
        return;
    };
    let mut by_resource: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_finalizer: BTreeMap<String, usize> = BTreeMap::new();
    for (r, fins) in remaining {
        let group = resources::by_name(r).map_or("", |res| res.group);
        *by_resource.entry(format!("{r}.{group}")).or_default() += 1;
        for f in fins {
            *by_finalizer.entry(f.clone()).or_default() += 1;
        }
    }
    let join = |m: &BTreeMap<String, usize>, what: &str| {
        let mut parts: Vec<String> = m
            .iter()
            .map(|(k, n)| format!("{k} {what} {n} resource instances"))
            .collect();
        parts.sort();
        parts.join(", ")
    };
    let ok = |t: &str, reason: &str, message: &str| {
        (
            t.to_string(),
            "False",
            reason.to_string(),
            message.to_string(),
        )
    };
    let mut wanted = vec![
        ok(
            "NamespaceDeletionDiscoveryFailure",
            "ResourcesDiscovered",
            "All resources successfully discovered",
        ),
        ok(
            "NamespaceDeletionGroupVersionParsingFailure",
            "ParsedGroupVersions",
            "All legacy kube types successfully parsed",
        ),
        ok(
            "NamespaceDeletionContentFailure",
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization",
        ),
        (
            "NamespaceContentRemaining".to_string(),
            "True",
            "SomeResourcesRemain".to_string(),
            format!(
                "Some resources are remaining: {}",
                join(&by_resource, "has")
            ),
        ),
    ];
    wanted.push(if by_finalizer.is_empty() {
        ok(
            "NamespaceFinalizersRemaining",
            "ContentHasNoFinalizers",
            "All content-preserving finalizers finished",
        )
    } else {
        (
            "NamespaceFinalizersRemaining".to_string(),
            "True",
            "SomeFinalizersRemain".to_string(),
            format!(
                "Some content in the namespace has finalizers remaining: {}",
                join(&by_finalizer, "in")
            ),
        )
    });
    let current: Vec<Value> = old
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let now = ctx.now_text();
    let conditions: Vec<Value> = wanted
        .into_iter()
        .map(|(t, status, reason, message)| {
            let same = current.iter().find(|c| {
                c.get("type").and_then(Value::as_str) == Some(t.as_str())
                    && c.get("status").and_then(Value::as_str) == Some(status)
                    && c.get("reason").and_then(Value::as_str) == Some(reason.as_str())
                    && c.get("message").and_then(Value::as_str) == Some(message.as_str())
            });
            match same {
                Some(c) => c.clone(),
                None => json!({"type": t, "status": status, "lastTransitionTime": now,
                    "reason": reason, "message": message}),
            }
        })
        .collect();
    if conditions == current {
        return;
    }
    let mut new = old;
    if let Some(st) = new.get_mut("status").and_then(Value::as_object_mut) {
        st.insert("conditions".into(), Value::Array(conditions));
    } else if let Some(m) = new.as_object_mut() {
        m.insert(
            "status".into(),
            json!({"phase": "Terminating", "conditions": conditions}),
        );
    }
    s.put(&NAMESPACES, new);
}

/// Background work: finishes graceful pod deletions whose grace period (capped at 30 s) has
/// passed, empties terminating namespaces, and collects garbage.
pub(crate) fn reap(s: &mut Store, ctx: &Ctx) {
    reap_namespaces(s, ctx);
    collect_garbage(s, ctx);
    let due: Vec<(String, String)> = s
        .list(&PODS, None)
        .filter(|p| {
            let Some(at) = p
                .pointer("/metadata/deletionTimestamp")
                .and_then(Value::as_str)
                .and_then(objects::parse_timestamp)
            else {
                return false;
            };
            let grace = p
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            if grace <= 0 {
                return false;
            }
            let extra = grace - grace.min(30);
            let deadline = at
                .checked_sub(jiff::SignedDuration::from_secs(extra))
                .unwrap_or(at);
            ctx.now >= deadline
        })
        .map(|p| (namespace_of(p).to_string(), name_of(p).to_string()))
        .collect();
    for (ns, name) in due {
        if let Some(pod) = s.get(&PODS, &ns, &name).cloned() {
            if finalizers(&pod).is_empty() {
                finalize(s, &PODS, &ns, &name, ctx, true);
            } else {
                let mut marked = pod;
                metadata_mut(&mut marked).insert("deletionGracePeriodSeconds".into(), json!(0));
                s.put(&PODS, marked);
            }
        }
    }
}

/// POST pods/<name>/binding.
pub(crate) fn bind(
    s: &mut Store,
    ns: &str,
    name: &str,
    binding: &Value,
    ctx: &Ctx,
) -> Result<Value, ApiError> {
    let target = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(&PODS, name, vec![crate::status::required("target.name")])
        })?;
    let bname = binding
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or(name);
    if bname != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({bname}) does not match the name on the URL ({name})"
        )));
    }
    let Some(old) = s.get(&PODS, ns, name).cloned() else {
        return Err(ApiError::not_found(&PODS, name));
    };
    if old.pointer("/metadata/deletionTimestamp").is_some() {
        return Err(ApiError::conflict_plain(format!(
            "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is being deleted, cannot be assigned to a host"
        )));
    }
    if let Some(node) = old
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        let mut e = ApiError::conflict_plain(format!(
            "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{node}\""
        ));
        e.name = Some(name.to_string());
        e.kind = Some("pods/binding".into());
        return Err(e);
    }
    let mut new = old.clone();
    if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
        spec.insert("nodeName".into(), json!(target));
    }
    if let Some(ann) = binding
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let md = metadata_mut(&mut new);
        let a = md.entry("annotations").or_insert_with(|| json!({}));
        if let Some(a) = a.as_object_mut() {
            for (k, v) in ann {
                a.insert(k.clone(), v.clone());
            }
        }
    }
    let cond = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": ctx.now_text()});
    if let Some(st) = new.get_mut("status").and_then(Value::as_object_mut) {
        let conds = st.entry("conditions").or_insert_with(|| json!([]));
        if let Value::Array(c) = conds {
            c.retain(|x| x.get("type").and_then(Value::as_str) != Some("PodScheduled"));
            c.push(cond);
        }
    }
    if !ctx.dry_run {
        s.put(&PODS, new);
    }
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}

#[cfg(test)]
mod tests;
