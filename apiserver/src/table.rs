//! `meta.k8s.io/v1` Table rendering (what `kubectl get` asks for), with kube-apiserver's columns.

use std::collections::HashMap;

use serde_json::{json, Value};

use crate::objects::parse_timestamp;
use crate::resources::Resource;

/// kube's `duration.HumanDuration`.
pub(crate) fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    if secs < 0 {
        return "0s".into();
    }
    if secs < 120 {
        return format!("{secs}s");
    }
    let minutes = secs / 60;
    if minutes < 10 {
        let s = secs % 60;
        return if s == 0 {
            format!("{minutes}m")
        } else {
            format!("{minutes}m{s}s")
        };
    }
    if minutes < 180 {
        return format!("{minutes}m");
    }
    let hours = secs / 3600;
    if hours < 8 {
        let m = minutes % 60;
        return if m == 0 {
            format!("{hours}h")
        } else {
            format!("{hours}h{m}m")
        };
    }
    if hours < 48 {
        return format!("{hours}h");
    }
    if hours < 24 * 8 {
        let h = hours % 24;
        return if h == 0 {
            format!("{}d", hours / 24)
        } else {
            format!("{}d{h}h", hours / 24)
        };
    }
    if hours < 24 * 365 * 2 {
        return format!("{}d", hours / 24);
    }
    if hours < 24 * 365 * 8 {
        let dy = (hours / 24) % 365;
        return if dy == 0 {
            format!("{}y", hours / 24 / 365)
        } else {
            format!("{}y{dy}d", hours / 24 / 365)
        };
    }
    format!("{}y", hours / 24 / 365)
}

fn col(name: &str, ty: &str, priority: i64, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": ty, "format": format, "description": description, "priority": priority})
}

fn columns(res: &Resource) -> Vec<Value> {
    let name = col(
        "Name",
        "string",
        0,
        "Name must be unique within a namespace.",
    );
    let age = col("Age", "string", 0, "CreationTimestamp is a timestamp representing the server time when this object was created.");
    match res.name {
        "pods" => vec![
            name,
            col("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."),
            col("Status", "string", 0, "The aggregate status of the containers in this pod."),
            col("Restarts", "string", 0, "The number of times the containers in this pod have been restarted and when the last container in this pod has restarted."),
            age,
            col("IP", "string", 1, "IP address allocated to the pod."),
            col("Node", "string", 1, "Name of the node the pod is assigned to."),
            col("Nominated Node", "string", 1, "Name of the node the pod is nominated to."),
            col("Readiness Gates", "string", 1, "The readiness gates of the pod."),
        ],
        "nodes" => vec![
            name,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            age,
            col("Version", "string", 0, "Kubelet Version reported by the node."),
            col("Internal-IP", "string", 1, "List of addresses reachable to the node."),
            col("External-IP", "string", 1, "List of addresses reachable to the node."),
            col("OS-Image", "string", 1, "OS Image reported by the node from /etc/os-release."),
            col("Kernel-Version", "string", 1, "Kernel Version reported by the node."),
            col("Container-Runtime", "string", 1, "Container Runtime Version reported by the node."),
        ],
        "namespaces" => vec![name, col("Status", "string", 0, "The status of the namespace"), age],
        "configmaps" => vec![name, col("Data", "string", 0, "Data contains the configuration data."), age],
        "networkpolicies" => vec![
            name,
            col("Pod-Selector", "string", 0, "Selects the pods to which this NetworkPolicy object applies."),
            age,
        ],
        "leases" => vec![name, col("Holder", "string", 0, "The holder of the lease."), age],
        "events" => vec![
            col("Last Seen", "string", 0, "Time when this Event was last seen"),
            col("Type", "string", 0, "Type of this event (Normal, Warning), new types could be added in the future."),
            col("Reason", "string", 0, "A machine-readable description of the cause of the event."),
            col("Object", "string", 0, "The object this Event is about."),
            col("Subobject", "string", 1, "The subobject this Event is about."),
            col("Source", "string", 1, "The component reporting this event."),
            col("Message", "string", 0, "A human-readable description of the status of this operation."),
            col("First Seen", "string", 1, "Time when this Event was first seen"),
            col("Count", "string", 1, "The number of times this event has occurred."),
            col("Name", "string", 1, "Name must be unique within a namespace."),
        ],
        _ => vec![name, age],
    }
}

fn s<'a>(o: &'a Value, ptr: &str) -> &'a str {
    o.pointer(ptr).and_then(Value::as_str).unwrap_or("")
}

fn or_none(v: &str) -> String {
    if v.is_empty() {
        "<none>".into()
    } else {
        v.into()
    }
}

fn selector_text(sel: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(m) = sel.get("matchLabels").and_then(Value::as_object) {
        let mut kv: Vec<String> = m
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        kv.sort();
        parts.extend(kv);
    }
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s(e, "/key");
        let vals: Vec<&str> = e
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        match s(e, "/operator") {
            "In" => parts.push(format!("{key} in ({})", vals.join(","))),
            "NotIn" => parts.push(format!("{key} notin ({})", vals.join(","))),
            "Exists" => parts.push(key.to_string()),
            "DoesNotExist" => parts.push(format!("!{key}")),
            _ => {}
        }
    }
    or_none(&parts.join(","))
}

/// kube's event printer: times from lastTimestamp / firstTimestamp (else eventTime, series).
fn event_cells(o: &Value, name: Value, now: jiff::Timestamp) -> Vec<Value> {
    let since = |ptrs: &[&str]| {
        ptrs.iter()
            .find_map(|p| parse_timestamp(s(o, p)))
            .map(|t| human_duration(now.as_second() - t.as_second()))
            .unwrap_or_else(|| "<unknown>".into())
    };
    let last = since(&[
        "/series/lastObservedTime",
        "/lastTimestamp",
        "/eventTime",
        "/firstTimestamp",
        "/metadata/creationTimestamp",
    ]);
    let first = since(&[
        "/firstTimestamp",
        "/eventTime",
        "/metadata/creationTimestamp",
    ]);
    let object = format!(
        "{}/{}",
        s(o, "/involvedObject/kind").to_lowercase(),
        s(o, "/involvedObject/name")
    );
    let mut source = s(o, "/source/component").to_string();
    if source.is_empty() {
        source = s(o, "/reportingController").to_string();
    }
    let host = s(o, "/source/host");
    if !host.is_empty() {
        source = format!("{source}, {host}");
    }
    let count = o
        .pointer("/series/count")
        .or_else(|| o.get("count"))
        .and_then(Value::as_i64)
        .unwrap_or(1);
    vec![
        json!(last),
        json!(s(o, "/type")),
        json!(s(o, "/reason")),
        json!(object),
        json!(s(o, "/involvedObject/fieldPath")),
        json!(source),
        json!(s(o, "/message").trim()),
        json!(first),
        json!(count),
        name,
    ]
}

fn cells(res: &Resource, o: &Value, now: jiff::Timestamp) -> Vec<Value> {
    let name = json!(s(o, "/metadata/name"));
    let age = parse_timestamp(s(o, "/metadata/creationTimestamp"))
        .map(|t| human_duration(now.as_second() - t.as_second()))
        .unwrap_or_else(|| "<unknown>".into());
    match res.name {
        "pods" => {
            let total = o
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let statuses: Vec<&Value> = o
                .pointer("/status/containerStatuses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .collect();
            let ready = statuses
                .iter()
                .filter(|c| c.get("ready").and_then(Value::as_bool) == Some(true))
                .count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c.get("restartCount").and_then(Value::as_i64))
                .sum();
            let mut reason = s(o, "/status/reason").to_string();
            if reason.is_empty() {
                reason = s(o, "/status/phase").to_string();
            }
            for c in &statuses {
                let w = s(c, "/state/waiting/reason");
                let t = s(c, "/state/terminated/reason");
                if !w.is_empty() {
                    reason = w.to_string();
                } else if !t.is_empty() {
                    reason = t.to_string();
                }
            }
            if o.pointer("/metadata/deletionTimestamp").is_some() {
                reason = "Terminating".into();
            }
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(reason),
                json!(restarts),
                json!(age),
                json!(or_none(s(o, "/status/podIP"))),
                json!(or_none(s(o, "/spec/nodeName"))),
                json!(or_none(s(o, "/status/nominatedNodeName"))),
                json!("<none>"),
            ]
        }
        "nodes" => {
            let conds: Vec<&Value> = o
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .collect();
            let mut status = match conds
                .iter()
                .find(|c| s(c, "/type") == "Ready")
                .map(|c| s(c, "/status"))
            {
                Some("True") => "Ready".to_string(),
                Some("False") => "NotReady".to_string(),
                _ => "Unknown".to_string(),
            };
            if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = o
                .pointer("/metadata/labels")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(k, _)| k.strip_prefix("node-role.kubernetes.io/").map(String::from))
                .filter(|r| !r.is_empty())
                .collect();
            roles.sort();
            let addr = |t: &str| {
                o.pointer("/status/addresses")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .find(|a| s(a, "/type") == t)
                    .map(|a| s(a, "/address").to_string())
                    .unwrap_or_else(|| "<none>".into())
            };
            vec![
                name,
                json!(status),
                json!(or_none(&roles.join(","))),
                json!(age),
                json!(s(o, "/status/nodeInfo/kubeletVersion")),
                json!(addr("InternalIP")),
                json!(addr("ExternalIP")),
                json!(or_none(s(o, "/status/nodeInfo/osImage"))),
                json!(or_none(s(o, "/status/nodeInfo/kernelVersion"))),
                json!(or_none(s(o, "/status/nodeInfo/containerRuntimeVersion"))),
            ]
        }
        "namespaces" => vec![name, json!(s(o, "/status/phase")), json!(age)],
        "configmaps" => {
            let n = ["data", "binaryData"]
                .iter()
                .filter_map(|f| o.get(*f).and_then(Value::as_object))
                .map(|m| m.len())
                .sum::<usize>();
            vec![name, json!(n), json!(age)]
        }
        "networkpolicies" => vec![
            name,
            json!(selector_text(
                o.pointer("/spec/podSelector").unwrap_or(&Value::Null)
            )),
            json!(age),
        ],
        "leases" => vec![name, json!(s(o, "/spec/holderIdentity")), json!(age)],
        "events" => event_cells(o, name, now),
        _ => vec![name, json!(age)],
    }
}

/// A Table of `objs`; `includeObject` (None, Metadata (default), Object) from the query.
pub(crate) fn table(
    res: &Resource,
    objs: &[&Value],
    rv: &str,
    q: &HashMap<String, String>,
    now: jiff::Timestamp,
) -> Value {
    let include = q
        .get("includeObject")
        .map(String::as_str)
        .unwrap_or("Metadata");
    let rows: Vec<Value> = objs
        .iter()
        .map(|o| {
            let mut row = json!({"cells": cells(res, o, now)});
            match include {
                "None" => {}
                "Object" => row["object"] = (*o).clone(),
                _ => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                        "metadata": o.get("metadata").cloned().unwrap_or(json!({}))});
                }
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
        "columnDefinitions": columns(res), "rows": rows})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{NETWORK_POLICIES, PODS};

    #[test]
    fn durations() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(150), "2m30s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3600 * 5 + 60 * 3), "5h3m");
        assert_eq!(human_duration(86400 * 3), "3d");
    }

    #[test]
    fn pod_and_policy_rows() {
        let now = jiff::Timestamp::from_second(1_000_000).unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "1970-01-12T13:46:30Z"},
            "spec": {"containers": [{"name": "c"}], "nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.2",
                "containerStatuses": [{"ready": true, "restartCount": 2}]}});
        let t = table(&PODS, &[&pod], "9", &HashMap::new(), now);
        assert_eq!(
            t["rows"][0]["cells"],
            json!(["p", "1/1", "Running", 2, "10s", "10.0.0.2", "n1", "<none>", "<none>"])
        );
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        let np = json!({"metadata": {"name": "n"}, "spec": {"podSelector": {"matchLabels": {"b": "2", "a": "1"}}}});
        let t = table(&NETWORK_POLICIES, &[&np], "9", &HashMap::new(), now);
        assert_eq!(t["rows"][0]["cells"][1], "a=1,b=2");
    }
}
