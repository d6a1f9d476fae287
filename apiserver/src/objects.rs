//! Pure object rules: validation, defaulting, metadata on create and update, generation.

use serde_json::{json, Map, Value};

use crate::resources::Resource;
use crate::status::{forbidden_field, invalid_value, required, ApiError, Cause};

const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_MSG: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const QUALIFIED_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";

/// The current time as kube-apiserver writes it (RFC 3339, whole seconds, UTC).
pub(crate) fn timestamp(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

pub(crate) fn parse_timestamp(s: &str) -> Option<jiff::Timestamp> {
    s.parse().ok()
}

pub(crate) fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|p| {
            let b = p.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b.first().is_some_and(u8::is_ascii_alphanumeric)
                && b.last().is_some_and(u8::is_ascii_alphanumeric)
        })
}

fn is_label_value(s: &str) -> bool {
    let b = s.as_bytes();
    b.is_empty()
        || (b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric))
}

fn qualified_name_error(key: &str) -> Option<String> {
    let (prefix, name) = match key.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() {
            return Some("prefix part must be non-empty".to_string());
        }
        if !is_dns_subdomain(p) {
            return Some(format!("prefix part {SUBDOMAIN_MSG}"));
        }
    }
    if name.is_empty() {
        return Some("name part must be non-empty".to_string());
    }
    if name.len() > 63 {
        return Some("name part must be no more than 63 characters".to_string());
    }
    if !is_label_value(name) {
        return Some(QUALIFIED_MSG.to_string());
    }
    None
}

fn meta<'a>(obj: &'a Value, field: &str) -> Option<&'a Value> {
    obj.get("metadata").and_then(|m| m.get(field))
}

pub(crate) fn name_of(obj: &Value) -> &str {
    meta(obj, "name").and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn namespace_of(obj: &Value) -> &str {
    meta(obj, "namespace").and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn uid_of(obj: &Value) -> &str {
    meta(obj, "uid").and_then(Value::as_str).unwrap_or("")
}

pub(crate) fn rv_of(obj: &Value) -> &str {
    meta(obj, "resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub(crate) fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(m) = obj else {
        unreachable!("just made an object")
    };
    let md = m
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !md.is_object() {
        *md = Value::Object(Map::new());
    }
    match md {
        Value::Object(md) => md,
        _ => unreachable!("just made an object"),
    }
}

pub(crate) fn finalizers(obj: &Value) -> Vec<String> {
    meta(obj, "finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks the body's shape and every rule kube-apiserver enforces that sluice's kinds need.
pub(crate) fn validate(res: &Resource, obj: &Value) -> Result<(), ApiError> {
    let name = name_of(obj);
    let mut causes: Vec<Cause> = Vec::new();
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".to_string(),
            field: "metadata.name".to_string(),
        });
    } else if res.name == "namespaces" {
        if !is_dns_label(name) {
            causes.push(invalid_value("metadata.name", name, LABEL_MSG));
        }
    } else if !is_dns_subdomain(name) {
        causes.push(invalid_value("metadata.name", name, SUBDOMAIN_MSG));
    }
    if let Some(labels) = meta(obj, "labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Some(msg) = qualified_name_error(k) {
                causes.push(invalid_value("metadata.labels", k, msg.as_str()));
            }
            match v.as_str() {
                Some(s) if is_label_value(s) => {}
                Some(s) => causes.push(invalid_value("metadata.labels", s, LABEL_VALUE_MSG)),
                None => causes.push(invalid_value(
                    "metadata.labels",
                    &v.to_string(),
                    "must be a string",
                )),
            }
        }
    }
    if let Some(ann) = meta(obj, "annotations").and_then(Value::as_object) {
        for (k, v) in ann {
            if let Some(msg) = qualified_name_error(&k.to_lowercase()) {
                causes.push(invalid_value("metadata.annotations", k, msg.as_str()));
            }
            if !v.is_string() {
                causes.push(invalid_value("metadata.annotations", k, "must be a string"));
            }
        }
    }
    crate::validate::kind_rules(res, obj, &mut causes);
    match res.name {
        "pods" => validate_pod(obj, &mut causes),
        "configmaps" => {
            for field in ["data", "binaryData"] {
                if let Some(data) = obj.get(field).and_then(Value::as_object) {
                    for k in data.keys() {
                        let ok = !k.is_empty()
                            && k.len() <= 253
                            && k.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
                        if !ok {
                            causes.push(invalid_value(&format!("{field}[{k}]"), k, "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res, name, causes))
    }
}

fn validate_pod(obj: &Value, causes: &mut Vec<Cause>) {
    let containers = obj.pointer("/spec/containers").and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        causes.push(required("spec.containers"));
        return;
    };
    let mut seen = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        match c.get("name").and_then(Value::as_str) {
            None | Some("") => causes.push(required(&format!("spec.containers[{i}].name"))),
            Some(n) if !is_dns_label(n) => causes.push(invalid_value(
                &format!("spec.containers[{i}].name"),
                n,
                LABEL_MSG,
            )),
            Some(n) if seen.contains(&n) => causes.push(Cause {
                reason: "FieldValueDuplicate",
                message: format!("Duplicate value: {n:?}"),
                field: format!("spec.containers[{i}].name"),
            }),
            Some(n) => seen.push(n),
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            causes.push(required(&format!("spec.containers[{i}].image")));
        }
    }
}

fn set_default(m: &mut Map<String, Value>, key: &str, v: Value) {
    if m.get(key).is_none_or(Value::is_null) {
        m.insert(key.to_string(), v);
    }
}

fn object_field<'a>(obj: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    let m = obj.as_object_mut()?;
    let v = m.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if v.is_null() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut()
}

/// Fills in the defaults kube-apiserver's defaulting and default admission plugins add.
/// Idempotent, so it also runs on updates.
pub(crate) fn apply_defaults(res: &Resource, obj: &mut Value) {
    match res.name {
        "pods" => {
            default_pod(obj);
            if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
                mirror_ips(status, "podIP", "podIPs");
                mirror_ips(status, "hostIP", "hostIPs");
            }
        }
        "networkpolicies" => default_network_policy(obj),
        "leases" => {
            object_field(obj, "spec");
        }
        "namespaces" => {
            let name = name_of(obj).to_string();
            let md = metadata_mut(obj);
            if let Some(labels) = object_field_map(md, "labels") {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
        }
        "nodes" => {
            if let Some(status) = obj.get_mut("status").and_then(Value::as_object_mut) {
                if let Some(cap) = status.get("capacity").cloned() {
                    set_default(status, "allocatable", cap);
                }
            }
        }
        _ => {}
    }
}

/// `status.podIP` is `status.podIPs[0]` (the v1 conversion: when both are sent and differ, the
/// single field wins, as older kubelets send only it); likewise `hostIP` and `hostIPs`.
fn mirror_ips(status: &mut Map<String, Value>, single: &str, list: &str) {
    let one = status
        .get(single)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(String::from);
    let first = status
        .get(list)
        .and_then(|l| l.pointer("/0/ip"))
        .and_then(Value::as_str)
        .map(String::from);
    match (one, first) {
        (Some(ip), first) if first.as_deref() != Some(ip.as_str()) => {
            status.insert(list.into(), json!([{ "ip": ip }]));
        }
        (None, Some(ip)) => {
            status.insert(single.into(), json!(ip));
        }
        _ => {}
    }
}

fn object_field_map<'a>(
    m: &'a mut Map<String, Value>,
    key: &str,
) -> Option<&'a mut Map<String, Value>> {
    let v = m.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if v.is_null() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut()
}

fn default_pod(obj: &mut Value) {
    let Some(spec) = object_field(obj, "spec") else {
        return;
    };
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "enableServiceLinks", json!(true));
    set_default(spec, "priority", json!(0));
    set_default(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
    set_default(spec, "serviceAccountName", json!("default"));
    set_default(spec, "serviceAccount", json!("default"));
    let host_network = spec.get("hostNetwork").and_then(Value::as_bool) == Some(true);
    for list in ["containers", "initContainers"] {
        if let Some(Value::Array(cs)) = spec.get_mut(list) {
            for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
                set_default(c, "terminationMessagePolicy", json!("File"));
                set_default(c, "resources", json!({}));
                let image = c.get("image").and_then(Value::as_str).unwrap_or("");
                let last = image.rsplit('/').next().unwrap_or("");
                let tag = last.split_once(':').map(|(_, t)| t);
                let policy = if image.contains('@') || tag.is_some_and(|t| t != "latest") {
                    "IfNotPresent"
                } else {
                    "Always"
                };
                set_default(c, "imagePullPolicy", json!(policy));
                if let Some(Value::Array(ports)) = c.get_mut("ports") {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(p, "protocol", json!("TCP"));
                        if host_network {
                            if let Some(cp) = p.get("containerPort").cloned() {
                                set_default(p, "hostPort", cp);
                            }
                        }
                    }
                }
            }
        }
    }
    // The DefaultTolerationSeconds admission plugin.
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    if let Value::Array(ts) = tolerations {
        for key in [
            "node.kubernetes.io/not-ready",
            "node.kubernetes.io/unreachable",
        ] {
            let covered = ts.iter().any(|t| {
                let k = t.get("key").and_then(Value::as_str);
                let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
                (k == Some(key)
                    || (k.is_none() && t.get("operator").and_then(Value::as_str) == Some("Exists")))
                    && (effect.is_empty() || effect == "NoExecute")
            });
            if !covered {
                ts.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
            }
        }
    }
}

fn default_network_policy(obj: &mut Value) {
    let Some(spec) = object_field(obj, "spec") else {
        return;
    };
    set_default(spec, "podSelector", json!({}));
    for dir in ["ingress", "egress"] {
        if let Some(Value::Array(rules)) = spec.get_mut(dir) {
            for r in rules.iter_mut() {
                if let Some(Value::Array(ports)) = r.get_mut("ports") {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(p, "protocol", json!("TCP"));
                    }
                }
            }
        }
    }
    if spec
        .get("policyTypes")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        let mut types = vec![json!("Ingress")];
        if spec
            .get("egress")
            .and_then(Value::as_array)
            .is_some_and(|e| !e.is_empty())
        {
            types.push(json!("Egress"));
        }
        spec.insert("policyTypes".into(), Value::Array(types));
    }
}

/// The pod's QoS class, as kube-apiserver computes it at create time.
fn qos_class(pod: &Value) -> &'static str {
    let cs: Vec<&Value> = ["containers", "initContainers"]
        .iter()
        .filter_map(|l| pod.pointer(&format!("/spec/{l}")).and_then(Value::as_array))
        .flatten()
        .collect();
    let res = |c: &Value, kind: &str| {
        c.pointer(&format!("/resources/{kind}"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let any = cs
        .iter()
        .any(|c| !res(c, "requests").is_empty() || !res(c, "limits").is_empty());
    if !any {
        return "BestEffort";
    }
    let guaranteed = cs.iter().all(|c| {
        let limits = res(c, "limits");
        let requests = res(c, "requests");
        ["cpu", "memory"].iter().all(|r| {
            limits.contains_key(*r) && requests.get(*r).is_none_or(|q| limits.get(*r) == Some(q))
        })
    });
    if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

/// The kind-specific reset of a new object (`PrepareForCreate`).
pub(crate) fn prepare_for_create(res: &Resource, obj: &mut Value) {
    match res.name {
        "pods" => {
            let qos = qos_class(obj);
            if let Some(m) = obj.as_object_mut() {
                m.insert(
                    "status".into(),
                    json!({"phase": "Pending", "qosClass": qos}),
                );
            }
        }
        "namespaces" => {
            if let Some(spec) = object_field(obj, "spec") {
                let fins = spec.entry("finalizers").or_insert_with(|| json!([]));
                if let Value::Array(f) = fins {
                    if !f.iter().any(|x| x == "kubernetes") {
                        f.push(json!("kubernetes"));
                    }
                }
            }
            if let Some(m) = obj.as_object_mut() {
                m.insert("status".into(), json!({"phase": "Active"}));
            }
        }
        _ => {}
    }
}

/// Everything but metadata and status (what bumps `metadata.generation` when it changes).
fn spec_part(obj: &Value) -> Map<String, Value> {
    obj.as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "metadata" | "status" | "kind" | "apiVersion")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn spec_changed(old: &Value, new: &Value) -> bool {
    spec_part(old) != spec_part(new)
}

/// Carries over what an update may not change (`BeforeUpdate` + `PrepareForUpdate`).
/// `status_write` is true for the `status` subresource.
pub(crate) fn prepare_for_update(res: &Resource, old: &Value, new: &mut Value, status_write: bool) {
    if status_write {
        // Only .status changes (pods may also change labels and annotations).
        let mut merged = old.clone();
        if let (Some(m), Some(s)) = (merged.as_object_mut(), new.get("status")) {
            m.insert("status".into(), s.clone());
        }
        // managedFields are the request's (server-side apply computed them for this write).
        let mf = meta(new, "managedFields").cloned();
        {
            let md = metadata_mut(&mut merged);
            match mf {
                Some(v) => md.insert("managedFields".into(), v),
                None => md.remove("managedFields"),
            };
        }
        if res.name == "pods" {
            for f in ["labels", "annotations"] {
                let v = meta(new, f).cloned();
                let md = metadata_mut(&mut merged);
                match v {
                    Some(v) => md.insert(f.into(), v),
                    None => md.remove(f),
                };
            }
        }
        *new = merged;
        return;
    }
    if res.status_subresource {
        if let Some(m) = new.as_object_mut() {
            match old.get("status") {
                Some(s) => m.insert("status".into(), s.clone()),
                None => m.remove("status"),
            };
        }
    }
    let md = metadata_mut(new);
    for keep in [
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        match meta(old, keep) {
            Some(v) => md.insert(keep.into(), v.clone()),
            None => md.remove(keep),
        };
    }
    if md
        .get("uid")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        md.insert("uid".into(), json!(uid_of(old)));
    }
    md.remove("selfLink");
    if res.generation && spec_changed(old, new) {
        let g = meta(old, "generation").and_then(Value::as_i64).unwrap_or(1);
        metadata_mut(new).insert("generation".into(), json!(g + 1));
    }
}

/// Pod spec fields an update may change; anything else is 422 Forbidden.
pub(crate) fn check_pod_update(old: &Value, new: &Value) -> Result<(), Cause> {
    let (Some(os), Some(ns)) = (old.get("spec"), new.get("spec")) else {
        return Ok(());
    };
    let mut masked = ns.clone();
    for list in ["containers", "initContainers"] {
        let old_list = os.get(list).and_then(Value::as_array);
        if let (Some(Value::Array(cs)), Some(ol)) = (masked.get_mut(list), old_list) {
            for (c, o) in cs.iter_mut().zip(ol) {
                if let (Some(c), Some(img)) = (c.as_object_mut(), o.get("image")) {
                    c.insert("image".into(), img.clone());
                }
            }
        }
    }
    if let Some(m) = masked.as_object_mut() {
        for f in ["activeDeadlineSeconds", "tolerations", "schedulingGates"] {
            match os.get(f) {
                Some(v) => m.insert(f.into(), v.clone()),
                None => m.remove(f),
            };
        }
    }
    if &masked == os {
        Ok(())
    } else {
        Err(forbidden_field(
            "spec",
            "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
        ))
    }
}

/// A name from `generateName`: the prefix plus five random characters.
pub(crate) fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let suffix: String = bytes
        .iter()
        .take(5)
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    // kube-apiserver keeps at most 58 characters of the prefix (by character, never mid-UTF-8).
    let prefix: String = prefix.chars().take(58).collect();
    format!("{prefix}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{NAMESPACES, NETWORK_POLICIES, PODS};

    #[test]
    fn names() {
        assert!(is_dns_subdomain("a.b-c.d"));
        assert!(!is_dns_subdomain("A"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain("-a"));
        assert!(is_dns_label("kube-system"));
        assert!(!is_dns_label("a.b"));
        let e = validate(&NAMESPACES, &json!({"metadata": {"name": "a.b"}}));
        assert!(e.is_err_and(|e| e.code == 422));
        let e = validate(
            &PODS,
            &json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}]}}),
        );
        assert!(e.is_err_and(
            |e| e.message == "Pod \"p\" is invalid: spec.containers[0].image: Required value"
        ));
        assert!(validate(
            &PODS,
            &json!({"metadata": {"name": "p", "labels": {"a": "b c"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}})
        )
        .is_err());
        assert!(validate(
            &PODS,
            &json!({"metadata": {"name": "p", "labels": {"app.kubernetes.io/name": "x"}},
            "spec": {"containers": [{"name": "c", "image": "i"}]}})
        )
        .is_ok());
    }

    #[test]
    fn generation_rules() {
        let old = json!({"metadata": {"name": "n", "generation": 1, "uid": "u", "creationTimestamp": "t"},
            "spec": {"podSelector": {}}});
        let mut same =
            json!({"metadata": {"name": "n", "labels": {"a": "b"}}, "spec": {"podSelector": {}}});
        prepare_for_update(&NETWORK_POLICIES, &old, &mut same, false);
        assert_eq!(same["metadata"]["generation"], 1);
        assert_eq!(same["metadata"]["uid"], "u");
        assert_eq!(same["metadata"]["creationTimestamp"], "t");
        let mut changed = json!({"metadata": {"name": "n", "generation": 7}, "spec": {"podSelector": {"matchLabels": {"a": "b"}}}});
        prepare_for_update(&NETWORK_POLICIES, &old, &mut changed, false);
        assert_eq!(changed["metadata"]["generation"], 2);
    }

    #[test]
    fn status_writes_touch_only_status() {
        let old = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "a"}, "status": {"phase": "Pending"}});
        let mut new = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "b"}, "status": {"phase": "Running"}});
        prepare_for_update(&PODS, &old, &mut new, true);
        assert_eq!(new["spec"]["nodeName"], "a");
        assert_eq!(new["status"]["phase"], "Running");
        let mut main = json!({"metadata": {"name": "p"}, "spec": {"nodeName": "a"}, "status": {"phase": "Failed"}});
        prepare_for_update(&PODS, &old, &mut main, false);
        assert_eq!(main["status"]["phase"], "Pending");
    }

    #[test]
    fn defaults() {
        let mut np =
            json!({"metadata": {"name": "n"}, "spec": {"egress": [{"ports": [{"port": 53}]}]}});
        apply_defaults(&NETWORK_POLICIES, &mut np);
        assert_eq!(np["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
        assert_eq!(np["spec"]["egress"][0]["ports"][0]["protocol"], "TCP");
        assert_eq!(np["spec"]["podSelector"], json!({}));
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}, {"name": "d", "image": "busybox"}]}});
        apply_defaults(&PODS, &mut pod);
        prepare_for_create(&PODS, &mut pod);
        assert_eq!(
            pod["spec"]["containers"][0]["imagePullPolicy"],
            "IfNotPresent"
        );
        assert_eq!(pod["spec"]["containers"][1]["imagePullPolicy"], "Always");
        assert_eq!(
            pod["status"],
            json!({"phase": "Pending", "qosClass": "BestEffort"})
        );
        let again = pod.clone();
        apply_defaults(&PODS, &mut pod);
        assert_eq!(pod, again, "defaulting is idempotent");
    }

    #[test]
    fn pod_updates_are_restricted() {
        let old = json!({"spec": {"containers": [{"name": "c", "image": "a"}], "nodeName": "n"}});
        assert!(check_pod_update(
            &old,
            &json!({"spec": {"containers": [{"name": "c", "image": "b"}], "nodeName": "n"}})
        )
        .is_ok());
        assert!(check_pod_update(
            &old,
            &json!({"spec": {"containers": [{"name": "c", "image": "a"}], "nodeName": "m"}})
        )
        .is_err());
    }

    #[test]
    fn generated_names() {
        let n = generate_name("web-");
        assert_eq!(n.len(), 9);
        assert!(n.starts_with("web-") && is_dns_subdomain(&n));
        assert_eq!(generate_name(&"é".repeat(100)).chars().count(), 63);
    }
}
