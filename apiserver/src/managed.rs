//! An approximation of server-side apply's field ownership (`metadata.managedFields`, FieldsV1).
//!
//! A field set is a set of leaf paths. Maps are `f:<name>`, elements of keyed lists `k:<json key>`,
//! elements of primitive sets `v:<json value>`; atomic lists and scalars are leaves.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

use crate::patch::{list_kind, ListKind};
use crate::status::{ApiError, Cause};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Step {
    Field(String),
    /// A keyed list element, by its key fields (JSON object text, sorted keys).
    Key(String),
    /// A primitive set element, by its JSON text.
    Value(String),
}

pub(crate) type Path = Vec<Step>;
pub(crate) type FieldSet = BTreeSet<Path>;

/// Metadata fields that are never owned.
const UNOWNED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
];

fn names(path: &[Step]) -> Vec<&str> {
    path.iter()
        .filter_map(|s| match s {
            Step::Field(f) => Some(f.as_str()),
            _ => None,
        })
        .collect()
}

fn key_of(elem: &Value, key: &str) -> Option<String> {
    let v = elem.get(key)?;
    let mut m = Map::new();
    m.insert(key.to_string(), v.clone());
    Some(Value::Object(m).to_string())
}

/// The leaf paths of `obj` (as owned by whoever wrote all of it).
pub(crate) fn fields_of(obj: &Value) -> FieldSet {
    let mut out = FieldSet::new();
    let mut path = Vec::new();
    if let Value::Object(m) = obj {
        for (k, v) in m {
            if k == "kind" || k == "apiVersion" {
                continue;
            }
            path.push(Step::Field(k.clone()));
            if k == "metadata" {
                if let Value::Object(md) = v {
                    for (mk, mv) in md {
                        if UNOWNED_META.contains(&mk.as_str()) {
                            continue;
                        }
                        path.push(Step::Field(mk.clone()));
                        walk(mv, &mut path, &mut out);
                        path.pop();
                    }
                }
            } else {
                walk(v, &mut path, &mut out);
            }
            path.pop();
        }
    }
    out
}

fn walk(v: &Value, path: &mut Path, out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, c) in m {
                path.push(Step::Field(k.clone()));
                walk(c, path, out);
                path.pop();
            }
        }
        Value::Array(items) => match list_kind(&names(path)) {
            ListKind::MergeKey(key) => {
                for it in items {
                    match key_of(it, key) {
                        Some(k) => {
                            path.push(Step::Key(k));
                            out.insert(path.clone());
                            if let Value::Object(m) = it {
                                for (f, c) in m {
                                    path.push(Step::Field(f.clone()));
                                    walk(c, path, out);
                                    path.pop();
                                }
                            }
                            path.pop();
                        }
                        None => {
                            out.insert(path.clone());
                        }
                    }
                }
                if items.is_empty() {
                    out.insert(path.clone());
                }
            }
            ListKind::MergeSet => {
                for it in items {
                    path.push(Step::Value(it.to_string()));
                    out.insert(path.clone());
                    path.pop();
                }
                if items.is_empty() {
                    out.insert(path.clone());
                }
            }
            ListKind::Replace => {
                out.insert(path.clone());
            }
        },
        _ => {
            out.insert(path.clone());
        }
    }
}

/// The value at `path` in `obj`.
pub(crate) fn get<'a>(obj: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = obj;
    for step in path {
        cur = match step {
            Step::Field(f) => cur.get(f)?,
            Step::Key(k) => {
                let km: Map<String, Value> = serde_json::from_str(k).ok()?;
                cur.as_array()?
                    .iter()
                    .find(|e| km.iter().all(|(f, v)| e.get(f) == Some(v)))?
            }
            Step::Value(v) => {
                let want: Value = serde_json::from_str(v).ok()?;
                cur.as_array()?.iter().find(|e| **e == want)?
            }
        };
    }
    Some(cur)
}

/// Removes the value at `path` from `obj` (no-op if absent).
pub(crate) fn remove(obj: &mut Value, path: &[Step]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for step in parents {
        let next = match step {
            Step::Field(f) => cur.get_mut(f),
            Step::Key(_) | Step::Value(_) => {
                let idx = index_in(cur, step);
                match (idx, cur.as_array_mut()) {
                    (Some(i), Some(a)) => a.get_mut(i),
                    _ => None,
                }
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    match last {
        Step::Field(f) => {
            if let Some(m) = cur.as_object_mut() {
                m.remove(f);
            }
        }
        _ => {
            if let Some(i) = index_in(cur, last) {
                if let Some(a) = cur.as_array_mut() {
                    a.remove(i);
                }
            }
        }
    }
}

fn index_in(list: &Value, step: &Step) -> Option<usize> {
    let items = list.as_array()?;
    match step {
        Step::Key(k) => {
            let km: Map<String, Value> = serde_json::from_str(k).ok()?;
            items
                .iter()
                .position(|e| km.iter().all(|(f, v)| e.get(f) == Some(v)))
        }
        Step::Value(v) => {
            let want: Value = serde_json::from_str(v).ok()?;
            items.iter().position(|e| *e == want)
        }
        Step::Field(_) => None,
    }
}

fn step_text(s: &Step) -> String {
    match s {
        Step::Field(f) => format!("f:{f}"),
        Step::Key(k) => format!("k:{k}"),
        Step::Value(v) => format!("v:{v}"),
    }
}

/// FieldsV1 JSON for a set.
pub(crate) fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut cur = &mut root;
        for (i, step) in path.iter().enumerate() {
            let entry = cur
                .entry(step_text(step))
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = entry else { break };
            cur = next;
            let is_last = i + 1 == path.len();
            if is_last && matches!(step, Step::Key(_)) {
                cur.insert(".".into(), json!({}));
            }
        }
    }
    Value::Object(root)
}

/// Parses FieldsV1 JSON back to a set (unknown entries are skipped).
pub(crate) fn from_fields_v1(v: &Value) -> FieldSet {
    fn go(m: &Map<String, Value>, path: &mut Path, out: &mut FieldSet) {
        for (k, c) in m {
            if k == "." {
                out.insert(path.clone());
                continue;
            }
            let step = if let Some(f) = k.strip_prefix("f:") {
                Step::Field(f.to_string())
            } else if let Some(f) = k.strip_prefix("k:") {
                Step::Key(f.to_string())
            } else if let Some(f) = k.strip_prefix("v:") {
                Step::Value(f.to_string())
            } else {
                continue;
            };
            path.push(step);
            match c.as_object() {
                Some(cm) if !cm.is_empty() => go(cm, path, out),
                _ => {
                    out.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    if let Some(m) = v.as_object() {
        go(m, &mut Vec::new(), &mut out);
    }
    out
}

/// The `.spec.containers[name="c"].image` rendering kube-apiserver uses in conflict messages.
fn path_text(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Field(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::Key(k) => {
                let km: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
                let parts: Vec<String> = km.iter().map(|(f, v)| format!("{f}={v}")).collect();
                s.push_str(&format!("[{}]", parts.join(",")));
            }
            Step::Value(v) => s.push_str(&format!("[={v}]")),
        }
    }
    s
}

/// One `managedFields` entry.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub manager: String,
    pub operation: String,
    pub api_version: String,
    pub time: String,
    pub subresource: String,
    pub fields: FieldSet,
}

pub(crate) fn entries(obj: &Value) -> Vec<Entry> {
    obj.pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| {
                    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                    Entry {
                        manager: s("manager"),
                        operation: s("operation"),
                        api_version: s("apiVersion"),
                        time: s("time"),
                        subresource: s("subresource"),
                        fields: e.get("fieldsV1").map(from_fields_v1).unwrap_or_default(),
                    }
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn set_entries(obj: &mut Value, list: &[Entry]) {
    let arr: Vec<Value> = list
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), json!(e.manager));
            m.insert("operation".into(), json!(e.operation));
            m.insert("apiVersion".into(), json!(e.api_version));
            m.insert("time".into(), json!(e.time));
            m.insert("fieldsType".into(), json!("FieldsV1"));
            m.insert("fieldsV1".into(), to_fields_v1(&e.fields));
            if !e.subresource.is_empty() {
                m.insert("subresource".into(), json!(e.subresource));
            }
            Value::Object(m)
        })
        .collect();
    let md = crate::objects::metadata_mut(obj);
    if arr.is_empty() {
        md.remove("managedFields");
    } else {
        md.insert("managedFields".into(), Value::Array(arr));
    }
}

fn upsert(list: &mut Vec<Entry>, e: Entry) {
    if let Some(x) = list.iter_mut().find(|x| {
        x.manager == e.manager && x.operation == e.operation && x.subresource == e.subresource
    }) {
        *x = e;
    } else {
        list.push(e);
    }
}

/// Records a non-apply write by `manager`: it takes the fields it changed, others lose them,
/// and removed fields are owned by nobody.
pub(crate) fn record_update(
    old: Option<&Value>,
    new: &mut Value,
    manager: &str,
    api_version: &str,
    subresource: &str,
    now: &str,
) {
    // A request that rewrites managedFields itself (kubectl's client-side to server-side apply
    // upgrade does) is taken as written.
    let sent = new.pointer("/metadata/managedFields");
    let mut list = match old {
        Some(o) if o.pointer("/metadata/managedFields") == sent => entries(o),
        _ => entries(new),
    };
    let new_fields = fields_of(new);
    let changed: FieldSet = new_fields
        .iter()
        .filter(|p| old.is_none_or(|o| get(o, p) != get(new, p)))
        .filter(|p| {
            let is_status = p.first() == Some(&Step::Field("status".into()));
            is_status == (subresource == "status")
        })
        .cloned()
        .collect();
    for e in &mut list {
        e.fields
            .retain(|p| !changed.contains(p) && get(new, p).is_some());
    }
    if !changed.is_empty() {
        let mut fields = list
            .iter()
            .find(|x| {
                x.manager == manager && x.operation == "Update" && x.subresource == subresource
            })
            .map(|x| x.fields.clone())
            .unwrap_or_default();
        fields.extend(changed);
        upsert(
            &mut list,
            Entry {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                time: now.to_string(),
                subresource: subresource.to_string(),
                fields,
            },
        );
    }
    set_entries(new, &list);
}

/// Server-side apply of `applied` by `manager` onto `live` (None: the object is new).
/// Returns the merged object with managedFields updated, or a 409 listing conflicts.
pub(crate) fn apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    subresource: &str,
    now: &str,
) -> Result<Value, ApiError> {
    let api_version = applied
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("v1")
        .to_string();
    let mut applied_fields = fields_of(applied);
    applied_fields.retain(|p| {
        let is_status = p.first() == Some(&Step::Field("status".into()));
        is_status == (subresource == "status")
    });
    let Some(live) = live else {
        let mut obj = applied.clone();
        set_entries(
            &mut obj,
            &[Entry {
                manager: manager.to_string(),
                operation: "Apply".into(),
                api_version,
                time: now.to_string(),
                subresource: subresource.to_string(),
                fields: applied_fields,
            }],
        );
        return Ok(obj);
    };
    let mut list = entries(live);
    let mine =
        |e: &Entry| e.manager == manager && e.operation == "Apply" && e.subresource == subresource;
    // Conflicts: another manager owns a field this apply sets to a different value.
    let mut conflicts: Vec<(String, String)> = Vec::new();
    for e in list.iter().filter(|e| !mine(e)) {
        for p in e.fields.intersection(&applied_fields) {
            let (lv, av) = (get(live, p), get(applied, p));
            if lv.is_some() && lv != av && !matches!(p.last(), Some(Step::Key(_) | Step::Value(_)))
            {
                conflicts.push((e.manager.clone(), path_text(p)));
            }
        }
    }
    if !conflicts.is_empty() && !force {
        let n = conflicts.len();
        let causes: Vec<Cause> = conflicts
            .iter()
            .map(|(m, f)| Cause {
                reason: "FieldManagerConflict",
                message: format!("conflict with \"{m}\""),
                field: f.clone(),
            })
            .collect();
        let lines: Vec<String> = conflicts
            .iter()
            .map(|(m, f)| format!("- {m}: {f}"))
            .collect();
        let mut e = ApiError::conflict_plain(format!(
            "Apply failed with {n} conflict{}: {}",
            if n == 1 { "" } else { "s" },
            if n == 1 {
                format!("conflict with \"{}\": {}", conflicts[0].0, conflicts[0].1)
            } else {
                format!("conflicts with managers:\n{}", lines.join("\n"))
            }
        ));
        e.causes = causes;
        return Err(e);
    }
    // Fields this manager applied before and no longer does are removed, unless someone else owns them.
    let previous: FieldSet = list
        .iter()
        .find(|e| mine(e))
        .map(|e| e.fields.clone())
        .unwrap_or_default();
    let others: FieldSet = list
        .iter()
        .filter(|e| !mine(e))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut obj = live.clone();
    let dropped: Vec<&Path> = previous
        .difference(&applied_fields)
        .filter(|p| !others.contains(*p) && !others.iter().any(|o| o.starts_with(p)))
        .collect();
    // A dropped list element goes whole: its own dropped fields (its key among them) are not
    // removed one by one first, or the element could no longer be found by its key.
    let mut outermost: Vec<&Path> = dropped
        .iter()
        .filter(|p| {
            !dropped
                .iter()
                .any(|q| q.len() < p.len() && p.starts_with(q))
        })
        .copied()
        .collect();
    outermost.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in outermost {
        remove(&mut obj, p);
    }
    let mut cleaned = applied.clone();
    if let Some(m) = cleaned.as_object_mut() {
        if subresource == "status" {
            m.retain(|k, _| k == "status" || k == "metadata" || k == "kind" || k == "apiVersion");
        } else {
            m.remove("status");
        }
    }
    let merged = crate::patch::strategic_merge(&obj, &cleaned).map_err(ApiError::bad_request)?;
    if force {
        for e in list.iter_mut().filter(|e| !mine(e)) {
            e.fields.retain(|p| !applied_fields.contains(p));
        }
    }
    upsert(
        &mut list,
        Entry {
            manager: manager.to_string(),
            operation: "Apply".into(),
            api_version,
            time: now.to_string(),
            subresource: subresource.to_string(),
            fields: applied_fields,
        },
    );
    let mut merged = merged;
    set_entries(&mut merged, &list);
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_v1_round_trip() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"a": "b"}, "finalizers": ["x"]},
            "spec": {"containers": [{"name": "c", "image": "i"}], "tolerations": [{"key": "k"}]}});
        let f = fields_of(&pod);
        let v1 = to_fields_v1(&f);
        assert_eq!(
            v1,
            json!({"f:metadata": {"f:labels": {"f:a": {}}, "f:finalizers": {"v:\"x\"": {}}},
                "f:spec": {"f:containers": {"k:{\"name\":\"c\"}": {".": {}, "f:image": {}, "f:name": {}}},
                    "f:tolerations": {}}})
        );
        assert_eq!(from_fields_v1(&v1), f);
    }

    #[test]
    fn apply_is_idempotent_and_drops_fields() {
        let m1 = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"a": "1", "b": "2"}}, "data": {"x": "1", "y": "2"}});
        let live = apply(None, &m1, "me", false, "", "t").unwrap();
        let again = apply(Some(&live), &m1, "me", false, "", "t").unwrap();
        assert_eq!(live, again);
        let m2 = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c", "labels": {"a": "1"}}, "data": {"x": "3"}});
        let next = apply(Some(&again), &m2, "me", false, "", "t").unwrap();
        assert_eq!(next["data"], json!({"x": "3"}));
        assert_eq!(next["metadata"]["labels"], json!({"a": "1"}));
    }

    #[test]
    fn apply_conflicts_with_other_managers() {
        let m1 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "1"}});
        let live = apply(None, &m1, "a", false, "", "t").unwrap();
        let m2 = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"x": "2"}});
        let err = apply(Some(&live), &m2, "b", false, "", "t").unwrap_err();
        assert_eq!(err.code, 409);
        assert!(
            err.message.contains("conflict with \"a\""),
            "{}",
            err.message
        );
        let forced = apply(Some(&live), &m2, "b", true, "", "t").unwrap();
        assert_eq!(forced["data"]["x"], "2");
        // Same value: shared ownership, no conflict.
        assert!(apply(Some(&live), &m1, "b", false, "", "t").is_ok());
    }

    #[test]
    fn updates_take_ownership() {
        let old = json!({"metadata": {"name": "c"}, "data": {"x": "1"}});
        let mut created = old.clone();
        record_update(None, &mut created, "kubectl-create", "v1", "", "t");
        let mut new = created.clone();
        new["data"]["y"] = json!("2");
        record_update(Some(&created), &mut new, "kubectl-edit", "v1", "", "t");
        let e = entries(&new);
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].manager, "kubectl-edit");
        assert_eq!(e[1].fields.len(), 1);
    }
}
