//! JSON patch, JSON merge patch and Kubernetes strategic merge patch, as pure functions.

use serde_json::{Map, Value};

/// How a list field merges (from the Go types' `patchStrategy`/`patchMergeKey` tags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ListKind {
    /// Atomic: a patch replaces the whole list.
    Replace,
    /// A list of objects merged by this key.
    MergeKey(&'static str),
    /// A list of primitives merged as a set.
    MergeSet,
}

/// The list strategy of the field at `path` (field names; list indices are transparent).
pub(crate) fn list_kind(path: &[&str]) -> ListKind {
    let Some((last, parents)) = path.split_last() else {
        return ListKind::Replace;
    };
    let parent = parents.last().copied().unwrap_or("");
    match *last {
        "containers" | "initContainers" | "ephemeralContainers" => ListKind::MergeKey("name"),
        "ports"
            if matches!(
                parent,
                "containers" | "initContainers" | "ephemeralContainers"
            ) =>
        {
            ListKind::MergeKey("containerPort")
        }
        "env" | "volumes" | "imagePullSecrets" | "resourceClaims" | "schedulingGates" => {
            ListKind::MergeKey("name")
        }
        "volumeMounts" => ListKind::MergeKey("mountPath"),
        "volumeDevices" => ListKind::MergeKey("devicePath"),
        "conditions" if parent == "status" => ListKind::MergeKey("type"),
        "ownerReferences" if parent == "metadata" => ListKind::MergeKey("uid"),
        "addresses" if parent == "status" => ListKind::MergeKey("type"),
        "taints" if parent == "spec" => ListKind::MergeKey("key"),
        "hostAliases" => ListKind::MergeKey("ip"),
        "podIPs" | "hostIPs" if parent == "status" => ListKind::MergeKey("ip"),
        "topologySpreadConstraints" => ListKind::MergeKey("topologyKey"),
        "finalizers" if parent == "metadata" => ListKind::MergeSet,
        "podCIDRs" if parent == "spec" => ListKind::MergeSet,
        _ => ListKind::Replace,
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// RFC 6902 JSON patch.
pub(crate) fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let p: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    json_patch::patch(target, &p).map_err(|e| e.to_string())
}

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ORDER: &str = "$setElementOrder/";
const DELETE_PRIMITIVE: &str = "$deleteFromPrimitiveList/";

/// Kubernetes strategic merge patch of `patch` onto `original`.
pub(crate) fn strategic_merge(original: &Value, patch: &Value) -> Result<Value, String> {
    let mut path = Vec::new();
    merge_value(Some(original), patch, &mut path).map(|v| v.unwrap_or(Value::Object(Map::new())))
}

/// Merges a patch value onto an (optional) original; `None` means "delete".
fn merge_value(
    original: Option<&Value>,
    patch: &Value,
    path: &mut Vec<String>,
) -> Result<Option<Value>, String> {
    match patch {
        Value::Object(p) => {
            match p.get(DIRECTIVE).and_then(Value::as_str) {
                Some("delete") => return Ok(None),
                Some("replace") => {
                    let mut clean = p.clone();
                    clean.remove(DIRECTIVE);
                    return Ok(Some(strip_directives(&Value::Object(clean))));
                }
                Some("merge") | None => {}
                Some(other) => return Err(format!("unknown patch type: {other}")),
            }
            let mut out = match original {
                Some(Value::Object(o)) => o.clone(),
                _ => Map::new(),
            };
            merge_map(&mut out, p, path)?;
            Ok(Some(Value::Object(out)))
        }
        Value::Array(items) => {
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            let orig = original.and_then(Value::as_array);
            let merged = match list_kind(&refs) {
                ListKind::Replace => strip_directives(patch),
                ListKind::MergeSet => {
                    let mut out = orig.cloned().unwrap_or_default();
                    for it in items {
                        if !out.contains(it) {
                            out.push(it.clone());
                        }
                    }
                    Value::Array(out)
                }
                ListKind::MergeKey(key) => {
                    Value::Array(merge_keyed_list(orig.map(Vec::as_slice), items, key, path)?)
                }
            };
            Ok(Some(merged))
        }
        other => Ok(Some(other.clone())),
    }
}

fn merge_map(
    out: &mut Map<String, Value>,
    p: &Map<String, Value>,
    path: &mut Vec<String>,
) -> Result<(), String> {
    // Deletions from primitive lists first, so that the same patch may also add.
    for (k, v) in p {
        if let Some(field) = k.strip_prefix(DELETE_PRIMITIVE) {
            if let (Some(Value::Array(list)), Value::Array(del)) = (out.get_mut(field), v) {
                list.retain(|x| !del.contains(x));
            }
        }
    }
    for (k, v) in p {
        if k == DIRECTIVE || k.starts_with(SET_ORDER) || k.starts_with(DELETE_PRIMITIVE) {
            continue;
        }
        if k == RETAIN_KEYS {
            continue;
        }
        if v.is_null() {
            out.remove(k);
            continue;
        }
        path.push(k.clone());
        let merged = merge_value(out.get(k), v, path);
        path.pop();
        match merged? {
            Some(m) => {
                out.insert(k.clone(), m);
            }
            None => {
                out.remove(k);
            }
        }
    }
    if let Some(Value::Array(keep)) = p.get(RETAIN_KEYS) {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        out.retain(|k, _| keep.contains(&k.as_str()));
    }
    for (k, v) in p {
        if let (Some(field), Value::Array(order)) = (k.strip_prefix(SET_ORDER), v) {
            if let Some(Value::Array(list)) = out.get_mut(field) {
                path.push(field.to_string());
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let kind = list_kind(&refs);
                path.pop();
                reorder(list, order, kind);
            }
        }
    }
    Ok(())
}

/// Orders `list` like `order` (elements named there first, in that order; the rest after).
fn reorder(list: &mut Vec<Value>, order: &[Value], kind: ListKind) {
    let matches = |item: &Value, o: &Value| match kind {
        ListKind::MergeKey(key) => item.get(key).is_some() && item.get(key) == o.get(key),
        _ => item == o,
    };
    let mut rest = std::mem::take(list);
    let mut ordered = Vec::with_capacity(rest.len());
    for o in order {
        if let Some(i) = rest.iter().position(|it| matches(it, o)) {
            ordered.push(rest.remove(i));
        }
    }
    ordered.extend(rest);
    *list = ordered;
}

fn merge_keyed_list(
    original: Option<&[Value]>,
    patch: &[Value],
    key: &str,
    path: &mut Vec<String>,
) -> Result<Vec<Value>, String> {
    // `{"$patch": "replace"}` as an element replaces the whole list with the other elements.
    if patch
        .iter()
        .any(|p| p.get(DIRECTIVE).and_then(Value::as_str) == Some("replace"))
    {
        return Ok(patch
            .iter()
            .filter(|p| p.get(DIRECTIVE).is_none())
            .map(strip_directives)
            .collect());
    }
    let mut out: Vec<Value> = original.map(<[Value]>::to_vec).unwrap_or_default();
    for p in patch {
        let Some(kv) = p.get(key) else {
            // Elements without the key cannot be merged; kube-apiserver rejects them.
            if p.is_object() {
                return Err(format!(
                    "map: {p} does not contain declared merge key: {key}"
                ));
            }
            out.push(p.clone());
            continue;
        };
        let pos = out.iter().position(|o| o.get(key) == Some(kv));
        if p.get(DIRECTIVE).and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                out.remove(i);
            }
            continue;
        }
        match pos {
            Some(i) => {
                let merged = merge_value(out.get(i), p, path)?;
                if let Some(m) = merged {
                    out[i] = m;
                } else {
                    out.remove(i);
                }
            }
            None => {
                if let Some(m) = merge_value(None, p, path)? {
                    out.push(m);
                }
            }
        }
    }
    Ok(out)
}

/// Removes `$`-directives from a value that is used as-is.
fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_ops() {
        let mut t = json!({"metadata": {"labels": {"a": "1"}}});
        json_patch(
            &mut t,
            &json!([{"op": "add", "path": "/metadata/labels/b", "value": "2"},
                    {"op": "remove", "path": "/metadata/labels/a"}]),
        )
        .unwrap();
        assert_eq!(t, json!({"metadata": {"labels": {"b": "2"}}}));
        assert!(json_patch(&mut t, &json!([{"op": "test", "path": "/x", "value": 1}])).is_err());
        assert!(json_patch(&mut t, &json!({"not": "a patch"})).is_err());
    }

    #[test]
    fn smp_merges_containers_by_name() {
        let pod = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]},
            {"name": "c", "image": "c:1"}]}});
        let got = strategic_merge(&pod, &patch).unwrap();
        assert_eq!(
            got,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                {"name": "b", "image": "b:1"},
                {"name": "c", "image": "c:1"}]}})
        );
    }

    #[test]
    fn smp_directives() {
        let pod = json!({"metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
            "spec": {"containers": [{"name": "a", "image": "1"}, {"name": "b", "image": "2"}],
                     "tolerations": [{"key": "k"}]}});
        // Delete an element, delete from a primitive list, null removes a key, atomic list replaced.
        let patch = json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["a"],
                "finalizers": ["c"], "labels": {"x": null}},
            "spec": {"containers": [{"name": "a", "$patch": "delete"}],
                     "tolerations": [{"key": "j"}]}});
        let got = strategic_merge(&pod, &patch).unwrap();
        assert_eq!(
            got,
            json!({"metadata": {"finalizers": ["b", "c"], "labels": {"y": "2"}},
                "spec": {"containers": [{"name": "b", "image": "2"}], "tolerations": [{"key": "j"}]}})
        );
        // Replace a map, replace a keyed list.
        let patch = json!({"metadata": {"labels": {"$patch": "replace", "z": "3"}},
            "spec": {"containers": [{"name": "n", "image": "9"}, {"$patch": "replace"}]}});
        let got = strategic_merge(&pod, &patch).unwrap();
        assert_eq!(got["metadata"]["labels"], json!({"z": "3"}));
        assert_eq!(
            got["spec"]["containers"],
            json!([{"name": "n", "image": "9"}])
        );
        // Set element order.
        let patch = json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [{"name": "a", "image": "3"}]}});
        let got = strategic_merge(&pod, &patch).unwrap();
        assert_eq!(
            got["spec"]["containers"],
            json!([{"name": "b", "image": "2"}, {"name": "a", "image": "3"}])
        );
        // Retain keys.
        let v = json!({"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}});
        let patch = json!({"spec": {"volumes": [{"name": "v", "$retainKeys": ["name", "hostPath"], "hostPath": {"path": "/x"}}]}});
        let got = strategic_merge(&v, &patch).unwrap();
        assert_eq!(
            got["spec"]["volumes"],
            json!([{"name": "v", "hostPath": {"path": "/x"}}])
        );
    }

    #[test]
    fn smp_container_ports_and_conditions() {
        let pod = json!({"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 80}]}]},
            "status": {"conditions": [{"type": "Ready", "status": "False"}, {"type": "Initialized", "status": "True"}]}});
        let patch = json!({"spec": {"containers": [{"name": "a", "ports": [{"containerPort": 81}]}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let got = strategic_merge(&pod, &patch).unwrap();
        assert_eq!(
            got["spec"]["containers"][0]["ports"],
            json!([{"containerPort": 80}, {"containerPort": 81}])
        );
        assert_eq!(
            got["status"]["conditions"],
            json!([{"type": "Ready", "status": "True"}, {"type": "Initialized", "status": "True"}])
        );
        // Network policy ports are atomic.
        let np = json!({"spec": {"ingress": [{"ports": [{"port": 80}]}]}});
        let got = strategic_merge(
            &np,
            &json!({"spec": {"ingress": [{"ports": [{"port": 81}]}]}}),
        )
        .unwrap();
        assert_eq!(got["spec"]["ingress"], json!([{"ports": [{"port": 81}]}]));
        assert!(strategic_merge(&pod, &json!({"spec": {"containers": [{"image": "x"}]}})).is_err());
    }
}
