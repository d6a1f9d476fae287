//! Kind-specific validation (the subset of kube-apiserver's rules sluice's kinds need).

use std::net::IpAddr;

use serde_json::Value;

use crate::objects::finalizers;
use crate::resources::Resource;
use crate::status::{forbidden_field, invalid_value, ApiError, Cause};

fn not_supported(field: &str, value: &str, supported: &[&str]) -> Cause {
    let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
    Cause {
        reason: "FieldValueNotSupported",
        message: format!(
            "Unsupported value: {value:?}: supported values: {}",
            list.join(", ")
        ),
        field: field.to_string(),
    }
}

fn one_of(v: &Value, field: &str, allowed: &[&str], causes: &mut Vec<Cause>) {
    if let Some(s) = v
        .get(field.rsplit('.').next().unwrap_or(field))
        .and_then(Value::as_str)
    {
        if !allowed.contains(&s) {
            causes.push(not_supported(field, s, allowed));
        }
    }
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = (usize, &'a Value)> {
    v.get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
}

pub(crate) fn is_cidr(s: &str) -> bool {
    let Some((ip, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.parse::<u8>().is_ok_and(|l| l <= max) && !len.starts_with('+')
}

const PROTOCOLS: &[&str] = &["SCTP", "TCP", "UDP"];
const PORT_RANGE: &str = "must be between 1 and 65535, inclusive";

fn port_ok(v: &Value) -> bool {
    v.as_i64().is_some_and(|p| (1..=65535).contains(&p))
}

const IP_MSG: &str = "must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)";

/// `status.podIPs` and `status.hostIPs`: addresses, at most one of each family (kube's
/// `validatePodIPs`, `validateHostIPs`). `status.podIP` is `podIPs[0]` by then (defaulting).
fn pod_status_rules(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(status) = obj.get("status") else {
        return;
    };
    for list in ["podIPs", "hostIPs"] {
        let field = format!("status.{list}");
        let mut families = Vec::new();
        let mut all_valid = true;
        for (i, entry) in items(status, list) {
            let ip = str_at(entry, "ip").unwrap_or("");
            match ip.parse::<IpAddr>() {
                Ok(a) => families.push(a.is_ipv4()),
                Err(_) => {
                    all_valid = false;
                    causes.push(invalid_value(&format!("{field}[{i}]"), ip, IP_MSG));
                }
            }
        }
        let dual = families.len() == 2 && families[0] != families[1];
        if all_valid && families.len() > 1 && !dual {
            causes.push(invalid_value(
                &field,
                &status.get(list).map(Value::to_string).unwrap_or_default(),
                "may specify no more than one IP for each IP family",
            ));
        }
    }
}

fn pod_rules(obj: &Value, causes: &mut Vec<Cause>) {
    pod_status_rules(obj, causes);
    let Some(spec) = obj.get("spec") else { return };
    one_of(
        spec,
        "spec.restartPolicy",
        &["Always", "Never", "OnFailure"],
        causes,
    );
    one_of(
        spec,
        "spec.dnsPolicy",
        &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        causes,
    );
    for list in ["containers", "initContainers"] {
        for (i, c) in items(spec, list) {
            let base = format!("spec.{list}[{i}]");
            one_of(
                c,
                &format!("{base}.imagePullPolicy"),
                &["Always", "IfNotPresent", "Never"],
                causes,
            );
            for (j, p) in items(c, "ports") {
                let f = format!("{base}.ports[{j}]");
                match p.get("containerPort") {
                    Some(v) if port_ok(v) => {}
                    Some(v) => causes.push(invalid_value(
                        &format!("{f}.containerPort"),
                        &v.to_string(),
                        PORT_RANGE,
                    )),
                    None => causes.push(crate::status::required(&format!("{f}.containerPort"))),
                }
                if let Some(h) = p.get("hostPort").filter(|h| h.as_i64() != Some(0)) {
                    if !port_ok(h) {
                        causes.push(invalid_value(
                            &format!("{f}.hostPort"),
                            &h.to_string(),
                            PORT_RANGE,
                        ));
                    }
                }
                one_of(p, &format!("{f}.protocol"), PROTOCOLS, causes);
            }
        }
    }
}

fn node_rules(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(spec) = obj.get("spec") else { return };
    if let Some(c) = str_at(spec, "podCIDR").filter(|c| !c.is_empty()) {
        if !is_cidr(c) {
            causes.push(invalid_value(
                "spec.podCIDR",
                c,
                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
            ));
        }
    }
    for (i, c) in items(spec, "podCIDRs") {
        let c = c.as_str().unwrap_or("");
        if !is_cidr(c) {
            causes.push(invalid_value(
                &format!("spec.podCIDRs[{i}]"),
                c,
                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
            ));
        }
    }
    for (i, t) in items(spec, "taints") {
        one_of(
            t,
            &format!("spec.taints[{i}].effect"),
            &["NoExecute", "NoSchedule", "PreferNoSchedule"],
            causes,
        );
    }
}

fn lease_rules(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(spec) = obj.get("spec") else { return };
    if let Some(d) = spec.get("leaseDurationSeconds").and_then(Value::as_i64) {
        if d <= 0 {
            causes.push(invalid_value(
                "spec.leaseDurationSeconds",
                &d.to_string(),
                "must be greater than 0",
            ));
        }
    }
    if let Some(t) = spec.get("leaseTransitions").and_then(Value::as_i64) {
        if t < 0 {
            causes.push(invalid_value(
                "spec.leaseTransitions",
                &t.to_string(),
                "must be greater than or equal to 0",
            ));
        }
    }
}

/// kube's `ValidateEventCreate` for core v1 (the rules a hand-written event can break).
fn event_rules(obj: &Value, causes: &mut Vec<Cause>) {
    let ns = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let involved_ns = obj
        .pointer("/involvedObject/namespace")
        .and_then(Value::as_str)
        .unwrap_or("");
    let mismatch = || {
        invalid_value(
            "involvedObject.namespace",
            involved_ns,
            "does not match event.namespace",
        )
    };
    let event_time = obj
        .get("eventTime")
        .is_some_and(|t| t.as_str().is_some_and(|t| !t.is_empty()));
    if !event_time {
        // An "old" event: its namespace is its object's (or empty/default for cluster objects).
        let ok = if involved_ns.is_empty() {
            ns.is_empty() || ns == "default"
        } else {
            ns == involved_ns
        };
        if !ok {
            causes.push(mismatch());
        }
        return;
    }
    if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
        causes.push(mismatch());
    }
    for (key, field) in [
        ("reportingController", "reportingComponent"),
        ("reportingInstance", "reportingInstance"),
        ("action", "action"),
        ("reason", "reason"),
    ] {
        if str_at(obj, key).is_none_or(str::is_empty) {
            causes.push(crate::status::required(field));
        }
    }
}

fn selector_rules(sel: &Value, field: &str, causes: &mut Vec<Cause>) {
    for (i, e) in items(sel, "matchExpressions") {
        let f = format!("{field}.matchExpressions[{i}]");
        one_of(
            e,
            &format!("{f}.operator"),
            &["DoesNotExist", "Exists", "In", "NotIn"],
            causes,
        );
        let n = e
            .get("values")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        match str_at(e, "operator") {
            Some("In" | "NotIn") if n == 0 => {
                causes.push(crate::status::required(&format!("{f}.values")))
            }
            Some("Exists" | "DoesNotExist") if n > 0 => causes.push(forbidden_field(
                &format!("{f}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            _ => {}
        }
    }
}

fn network_policy_rules(obj: &Value, causes: &mut Vec<Cause>) {
    let Some(spec) = obj.get("spec") else { return };
    if let Some(sel) = spec.get("podSelector") {
        selector_rules(sel, "spec.podSelector", causes);
    }
    for (i, t) in items(spec, "policyTypes") {
        let t = t.as_str().unwrap_or("");
        if !["Egress", "Ingress"].contains(&t) {
            causes.push(not_supported(
                &format!("spec.policyTypes[{i}]"),
                t,
                &["Egress", "Ingress"],
            ));
        }
    }
    for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in items(spec, dir) {
            let base = format!("spec.{dir}[{i}]");
            for (j, p) in items(rule, "ports") {
                let f = format!("{base}.ports[{j}]");
                one_of(p, &format!("{f}.protocol"), PROTOCOLS, causes);
                match p.get("port") {
                    Some(Value::String(name)) => {
                        let ok = !name.is_empty()
                            && name.len() <= 15
                            && name
                                .chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                            && name.chars().any(|c| c.is_ascii_lowercase());
                        if !ok {
                            causes.push(invalid_value(&format!("{f}.port"), name, "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"));
                        }
                        if p.get("endPort").is_some() {
                            causes.push(forbidden_field(
                                &format!("{f}.endPort"),
                                "may not be specified when `port` is non-numeric",
                            ));
                        }
                    }
                    Some(v) if !v.is_null() => {
                        if !port_ok(v) {
                            causes.push(invalid_value(
                                &format!("{f}.port"),
                                &v.to_string(),
                                PORT_RANGE,
                            ));
                        }
                        if let Some(end) = p.get("endPort").and_then(Value::as_i64) {
                            if end < v.as_i64().unwrap_or(0) || end > 65535 {
                                causes.push(invalid_value(
                                    &format!("{f}.endPort"),
                                    &end.to_string(),
                                    "must be greater than or equal to `port`",
                                ));
                            }
                        }
                    }
                    _ => {
                        if p.get("endPort").is_some() {
                            causes.push(crate::status::required(&format!("{f}.port")));
                        }
                    }
                }
            }
            for (j, peer) in items(rule, peers_key) {
                let f = format!("{base}.{peers_key}[{j}]");
                for key in ["podSelector", "namespaceSelector"] {
                    if let Some(sel) = peer.get(key) {
                        selector_rules(sel, &format!("{f}.{key}"), causes);
                    }
                }
                if let Some(b) = peer.get("ipBlock") {
                    let cidr = str_at(b, "cidr").unwrap_or("");
                    if !is_cidr(cidr) {
                        causes.push(invalid_value(
                            &format!("{f}.ipBlock.cidr"),
                            cidr,
                            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                        ));
                    }
                    for (k, e) in items(b, "except") {
                        let e = e.as_str().unwrap_or("");
                        if !is_cidr(e) {
                            causes.push(invalid_value(
                                &format!("{f}.ipBlock.except[{k}]"),
                                e,
                                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                            ));
                        }
                    }
                    if ["podSelector", "namespaceSelector"]
                        .iter()
                        .any(|k| peer.get(*k).is_some())
                    {
                        causes.push(forbidden_field(&f, "may not specify more than 1 from type"));
                    }
                }
            }
        }
    }
}

/// The rules for `res` on a whole object (create and update).
pub(crate) fn kind_rules(res: &Resource, obj: &Value, causes: &mut Vec<Cause>) {
    for (i, f) in finalizers(obj).iter().enumerate() {
        let ok = f.split_once('/').map_or(
            crate::objects::is_dns_label(f)
                || f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')),
            |(p, n)| crate::objects::is_dns_subdomain(p) && !n.is_empty() && n.len() <= 63,
        );
        if !ok || f.is_empty() {
            causes.push(invalid_value(
                &format!("metadata.finalizers[{i}]"),
                f,
                "name part must consist of alphanumeric characters, '-', '_' or '.'",
            ));
        }
    }
    match res.name {
        "pods" => pod_rules(obj, causes),
        "nodes" => node_rules(obj, causes),
        "leases" => lease_rules(obj, causes),
        "networkpolicies" => network_policy_rules(obj, causes),
        "events" => event_rules(obj, causes),
        _ => {}
    }
}

/// Rules that compare the update with the stored object.
pub(crate) fn update_rules(res: &Resource, old: &Value, new: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    if old.pointer("/metadata/deletionTimestamp").is_some() {
        let before = finalizers(old);
        let added: Vec<String> = finalizers(new)
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if !added.is_empty() {
            causes.push(forbidden_field(
                "metadata.finalizers",
                &format!("no new finalizers can be added if the object is being deleted, found new finalizers {added:?}"),
            ));
        }
    }
    if res.name == "configmaps" && old.get("immutable").and_then(Value::as_bool) == Some(true) {
        for field in ["data", "binaryData"] {
            let empty = |v: Option<&Value>| {
                v.is_none_or(|v| v.is_null() || v.as_object().is_some_and(|m| m.is_empty()))
            };
            let (a, b) = (old.get(field), new.get(field));
            if a != b && !(empty(a) && empty(b)) {
                causes.push(forbidden_field(
                    field,
                    "field is immutable when `immutable` is set",
                ));
            }
        }
        if new.get("immutable").and_then(Value::as_bool) != Some(true) {
            causes.push(forbidden_field(
                "immutable",
                "field is immutable when `immutable` is set",
            ));
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res, crate::objects::name_of(old), causes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{CONFIGMAPS, EVENTS, NETWORK_POLICIES, NODES, PODS};
    use serde_json::json;

    fn errs(res: &Resource, obj: Value) -> usize {
        let mut c = Vec::new();
        kind_rules(res, &obj, &mut c);
        c.len()
    }

    #[test]
    fn kind_rules_table() {
        let ev = |ns: &str, involved: &str| json!({"metadata": {"namespace": ns}, "involvedObject": {"namespace": involved}});
        assert_eq!(errs(&EVENTS, ev("a", "a")), 0);
        assert_eq!(errs(&EVENTS, ev("a", "b")), 1);
        assert_eq!(errs(&EVENTS, ev("default", "")), 0);
        let mut new_style = ev("a", "a");
        new_style["eventTime"] = json!("2026-01-01T00:00:00.000000Z");
        assert_eq!(errs(&EVENTS, new_style), 4);
        assert!(is_cidr("10.0.0.0/8") && is_cidr("fd00::/64"));
        assert!(!is_cidr("10.0.0.300/8") && !is_cidr("10.0.0.0/33") && !is_cidr("10.0.0.0"));
        assert_eq!(
            errs(&NODES, json!({"spec": {"podCIDR": "10.244.300.0/24"}})),
            1
        );
        assert_eq!(
            errs(
                &NODES,
                json!({"spec": {"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24"]}})
            ),
            0
        );
        let c =
            |p: Value| json!({"spec": {"containers": [{"name": "c", "image": "i", "ports": [p]}]}});
        assert_eq!(errs(&PODS, c(json!({"containerPort": 0}))), 1);
        assert_eq!(
            errs(&PODS, c(json!({"containerPort": 80, "protocol": "FOO"}))),
            1
        );
        assert_eq!(
            errs(&PODS, c(json!({"containerPort": 80, "protocol": "UDP"}))),
            0
        );
        assert_eq!(
            errs(&PODS, json!({"spec": {"restartPolicy": "Sometimes"}})),
            1
        );
        let ips = |list: Value| json!({"status": {"podIPs": list}});
        assert_eq!(errs(&PODS, ips(json!([{"ip": "not-an-ip"}]))), 1);
        assert_eq!(
            errs(&PODS, ips(json!([{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]))),
            0
        );
        assert_eq!(
            errs(&PODS, ips(json!([{"ip": "10.0.0.1"}, {"ip": "10.0.0.2"}]))),
            1
        );
        assert_eq!(
            errs(&PODS, json!({"status": {"hostIPs": [{"ip": "bad"}]}})),
            1
        );
        let np = |spec: Value| json!({"spec": spec});
        assert_eq!(
            errs(&NETWORK_POLICIES, np(json!({"policyTypes": ["Sideways"]}))),
            1
        );
        assert_eq!(
            errs(
                &NETWORK_POLICIES,
                np(json!({"ingress": [{"ports": [{"port": 0}]}]}))
            ),
            1
        );
        assert_eq!(
            errs(
                &NETWORK_POLICIES,
                np(json!({"ingress": [{"ports": [{"port": "http"}]}]}))
            ),
            0
        );
        assert_eq!(
            errs(
                &NETWORK_POLICIES,
                np(
                    json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}]}]})
                )
            ),
            0
        );
        assert_eq!(
            errs(
                &CONFIGMAPS,
                json!({"metadata": {"finalizers": ["example.com/x", "kubernetes"]}})
            ),
            0
        );
    }

    #[test]
    fn update_rules_table() {
        let frozen = json!({"metadata": {"name": "f"}, "immutable": true, "data": {"a": "1"}});
        let mut changed = frozen.clone();
        changed["data"]["a"] = json!("2");
        assert!(update_rules(&CONFIGMAPS, &frozen, &changed).is_err());
        let mut relabeled = frozen.clone();
        relabeled["metadata"]["labels"] = json!({"x": "y"});
        assert!(update_rules(&CONFIGMAPS, &frozen, &relabeled).is_ok());
        let deleting =
            json!({"metadata": {"name": "d", "deletionTimestamp": "t", "finalizers": ["a"]}});
        let more = json!({"metadata": {"name": "d", "finalizers": ["a", "b"]}});
        assert!(update_rules(&CONFIGMAPS, &deleting, &more)
            .is_err_and(|e| e.message.contains("finalizers")));
        let fewer = json!({"metadata": {"name": "d", "finalizers": []}});
        assert!(update_rules(&CONFIGMAPS, &deleting, &fewer).is_ok());
    }
}
