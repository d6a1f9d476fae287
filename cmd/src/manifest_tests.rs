//! `manifests/sluice.yaml` against the code: it parses, it validates against the Kubernetes
//! schema (PyPI's kubernetes-validate), its ConfigMap has exactly the keys the agent reads with
//! values the agent accepts, and its RBAC grants exactly the agent's API calls.

use crate::agent::{config, API_CALLS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const MANIFEST: &str = include_str!("../../manifests/sluice.yaml");

fn documents() -> Vec<Value> {
    MANIFEST
        .split("\n---\n")
        .map(|doc| serde_saphyr::from_str::<Value>(doc).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

#[test]
fn every_object_parses_and_has_its_design_name() {
    let docs = documents();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Role",
            "RoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    for d in &docs {
        let name = d["metadata"]["name"].as_str().unwrap();
        match d["kind"].as_str().unwrap() {
            "Namespace" => assert_eq!(name, "sluice-system"),
            "ClusterRole" | "ClusterRoleBinding" => assert_eq!(name, "sluice"),
            // sluice's Roles: its config in kube-system, its leases in sluice-system.
            "Role" | "RoleBinding" => {
                assert_eq!(name, "sluice");
                let ns = d["metadata"]["namespace"].as_str().unwrap();
                assert!(ns == "kube-system" || ns == "sluice-system", "{ns}");
            }
            _ => {
                assert!(name == "sluice" || name == "sluice-config", "{name}");
                assert_eq!(d["metadata"]["namespace"], "kube-system");
            }
        }
    }
}

#[test]
fn validates_against_the_kubernetes_schema() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/sluice.yaml");
    let out = match std::process::Command::new("kubernetes-validate")
        .args(["--strict", path])
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have kubernetes-validate (pip install kubernetes-validate): {e}"
            );
            eprintln!("skipping: kubernetes-validate is not installed");
            return;
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(" passed for resource ").count(), 10, "{text}");
}

#[test]
fn configmap_has_exactly_the_agents_keys_with_values_it_accepts() {
    let docs = documents();
    let cm = find(&docs, "ConfigMap")[0];
    let data: BTreeMap<String, String> = serde_json::from_value(cm["data"].clone()).unwrap();
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, config::KEYS.into_iter().collect());
    // The manifest's values are the defaults, and they parse.
    assert_eq!(
        config::parse(&data).unwrap(),
        config::AgentConfig::default()
    );
}

#[test]
fn rbac_grants_exactly_the_agents_api_calls() {
    let docs = documents();
    let mut granted = BTreeSet::new();
    for role in find(&docs, "ClusterRole")
        .into_iter()
        .chain(find(&docs, "Role"))
    {
        let ns = role["metadata"]["namespace"].as_str().unwrap_or("");
        for rule in role["rules"].as_array().unwrap() {
            for group in rule["apiGroups"].as_array().unwrap() {
                for res in rule["resources"].as_array().unwrap() {
                    for verb in rule["verbs"].as_array().unwrap() {
                        assert_ne!(verb, "*", "no wildcards");
                        granted.insert((
                            group.as_str().unwrap().to_string(),
                            res.as_str().unwrap().to_string(),
                            verb.as_str().unwrap().to_string(),
                            ns.to_string(),
                        ));
                    }
                }
            }
        }
    }
    let needed: BTreeSet<(String, String, String, String)> = API_CALLS
        .iter()
        .map(|(g, r, v, ns)| (g.to_string(), r.to_string(), v.to_string(), ns.to_string()))
        .collect();
    assert_eq!(granted, needed);
    // Every binding names sluice's ServiceAccount, and no agent may write a Lease in kube-system.
    for binding in find(&docs, "RoleBinding")
        .into_iter()
        .chain(find(&docs, "ClusterRoleBinding"))
    {
        assert_eq!(binding["subjects"][0]["name"], "sluice");
        assert_eq!(binding["subjects"][0]["namespace"], "kube-system");
    }
    assert!(!needed
        .iter()
        .any(|(_, r, v, ns)| r == "leases" && ns == "kube-system" && v != "list" && v != "watch"));
}

#[test]
fn daemonset_runs_install_cni_first_and_probes_the_health_port() {
    let docs = documents();
    let spec = &find(&docs, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["serviceAccountName"], "sluice");
    assert_eq!(spec["tolerations"][0]["operator"], "Exists");
    assert_eq!(
        spec["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let init = &spec["initContainers"][0];
    assert_eq!(init["command"][1], "install-cni");
    assert_eq!(init["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert!(init["securityContext"]["capabilities"]["add"].is_null());
    let agent = &spec["containers"][0];
    // The agent writes the CNI config itself, once the node's network is up.
    let mounts: Vec<&str> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert!(mounts.contains(&"/etc/cni/net.d"), "{mounts:?}");
    assert!(mounts.contains(&"/host/proc/sys/net"), "{mounts:?}");
    let caps: Vec<&str> = agent["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(agent["command"][1], "agent");
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["livenessProbe"]["httpGet"]["port"], 9099);
    assert_eq!(agent["securityContext"]["capabilities"]["drop"][0], "ALL");
    assert_ne!(agent["securityContext"]["privileged"], true);
}
