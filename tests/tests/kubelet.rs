//! The lab's kubelet: Pods applied with kubectl become real pods with servers on their
//! containerPorts, reachable pod to pod on every port and protocol; deletion frees everything; a
//! pod that cannot be wired says why and is retried.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::have_root;
use sluice_e2e::lab::{lab_cmd, netns_with_prefix, Lab};
use std::time::{Duration, Instant};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn manifest() -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        // Quoted: YAML 1.1 reads a bare y as true.
        out += &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\"}}\n---\n");
        for pod in PODS {
            out += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"{pod}\"\n  namespace: \"{ns}\"\n  labels: {{pod: \"{pod}\"}}\nspec:\n  containers:\n  - name: cont\n    image: sluice-lab\n    ports:\n"
            );
            for (port, proto) in [
                (80, "TCP"),
                (81, "TCP"),
                (80, "UDP"),
                (81, "UDP"),
                (80, "SCTP"),
                (81, "SCTP"),
            ] {
                out += &format!(
                    "    - {{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}\n",
                    proto.to_lowercase()
                );
            }
            out += "---\n";
        }
    }
    out
}

fn pods_json(lab: &Lab) -> Vec<Value> {
    let out = lab.kubectl(&["get", "pods", "-A", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["items"].as_array().cloned().unwrap_or_default()
}

fn wait_running(lab: &Lab, want: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods: Vec<Value> = pods_json(lab)
            .into_iter()
            .filter(|p| NAMESPACES.contains(&p["metadata"]["namespace"].as_str().unwrap_or("")))
            .collect();
        let running = pods
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
            .count();
        if running == want {
            return pods;
        }
        assert!(
            Instant::now() < deadline,
            "{running}/{want} running: {pods:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Probes every ordered pair of the 9 pods on one port; returns the failures and the time taken.
fn matrix(lab: &Lab, port: u16, proto: &str) -> (Vec<String>, Duration, Vec<i32>) {
    let pods: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect();
    let pairs: Vec<(String, String)> = pods
        .iter()
        .flat_map(|a| pods.iter().map(move |b| (a.clone(), b.clone())))
        .collect();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut codes = Vec::new();
    for chunk in pairs.chunks(16) {
        let results: Vec<(String, String, std::process::Output)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|(a, b)| {
                    let name = lab.name.clone();
                    let port = port.to_string();
                    s.spawn(move || {
                        let out = lab_cmd(
                            &[
                                "probe",
                                "--name",
                                &name,
                                a,
                                b,
                                &port,
                                "--protocol",
                                proto,
                                "--timeout",
                                "1s",
                            ],
                            20,
                        );
                        (a.clone(), b.clone(), out)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b, out) in results {
            let code = out.status.code().unwrap_or(-1);
            codes.push(code);
            let text = String::from_utf8_lossy(&out.stdout);
            if code != 0 || !text.contains(&format!("answered by {b}")) {
                failures.push(format!("{a} -> {b} {proto}/{port}: exit {code}: {text}"));
            }
        }
    }
    (failures, started.elapsed(), codes)
}

#[test]
fn kubectl_pods_become_real_and_reach_each_other_on_every_port() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "0"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pods.yaml");
    std::fs::write(&file, manifest()).unwrap();
    let out = lab.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pods = wait_running(&lab, 9);
    // Bound round-robin: every node has pods.
    let mut nodes: Vec<&str> = pods
        .iter()
        .map(|p| p["spec"]["nodeName"].as_str().unwrap())
        .collect();
    nodes.sort();
    nodes.dedup();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    // Running is written once the pod is wired, but a pod's veth drops (fail closed) until its
    // node's agent has seen the pod's address and put it in the policy rules: wait for that.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (failures, _, _) = matrix(&lab, 80, "tcp");
        if failures.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "{failures:#?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (port, proto) in [(80, "tcp"), (81, "tcp"), (80, "udp"), (81, "udp")] {
        let (failures, took, _) = matrix(&lab, port, proto);
        eprintln!(
            "9x9 {proto}/{port}: {} failures in {took:?}",
            failures.len()
        );
        assert!(failures.is_empty(), "{failures:#?}");
    }
    // SCTP: this kernel may lack it; then every probe says so with exit code 2.
    let sctp = std::path::Path::new("/proc/net/sctp").exists();
    let out = lab_cmd(
        &[
            "probe",
            "--name",
            &lab.name,
            "x/a",
            "y/b",
            "80",
            "--protocol",
            "sctp",
        ],
        20,
    );
    if sctp {
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    } else {
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stdout).contains("SCTP unsupported"));
    }
    // A probe to a port nobody serves fails with 1.
    let out = lab_cmd(
        &[
            "probe",
            "--name",
            &lab.name,
            "x/a",
            "y/b",
            "82",
            "--timeout",
            "500ms",
        ],
        20,
    );
    assert_eq!(out.status.code(), Some(1));
    // exec runs in the pod's namespace.
    let out = lab_cmd(
        &[
            "exec", "--name", &lab.name, "x/a", "--", "ip", "-j", "addr", "show", "eth0",
        ],
        20,
    );
    let ip_a = pods
        .iter()
        .find(|p| p["metadata"]["namespace"] == "x" && p["metadata"]["name"] == "a")
        .unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(String::from_utf8_lossy(&out.stdout).contains(&ip_a));
    // Deleting a pod removes its namespace and frees its address.
    let out = lab.kubectl(&["delete", "pod", "-n", "x", "a", "--timeout=30s"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let netns = format!("{}pod-x-a", lab.prefix());
    let deadline = Instant::now() + Duration::from_secs(10);
    while netns_with_prefix(&netns).contains(&netns) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !netns_with_prefix(&netns).contains(&netns),
        "pod namespace left"
    );
    let node_a = pods
        .iter()
        .find(|p| p["metadata"]["namespace"] == "x" && p["metadata"]["name"] == "a")
        .unwrap()["spec"]["nodeName"]
        .as_str()
        .unwrap()
        .to_string();
    let alloc = std::fs::read_to_string(format!(
        "/run/sluice/lab/{}/nodes/{node_a}/ipam/allocations.json",
        lab.name
    ))
    .unwrap();
    assert!(
        !alloc.contains(&format!("\"{ip_a}\"")),
        "{ip_a} still allocated: {alloc}"
    );
}

#[test]
fn a_pod_that_cannot_be_wired_says_why_and_is_retried() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "0"]);
    let node = format!("{}-node-2", lab.name);
    // The node's agent is down and its subnet file gone: the node has no subnet yet.
    let out = lab_cmd(&["agent", "--name", &lab.name, "stop", &node], 30);
    assert!(out.status.success());
    std::fs::remove_file(format!(
        "/run/sluice/lab/{}/nodes/{node}/subnet.env",
        lab.name
    ))
    .unwrap();
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: late, namespace: default}}\nspec:\n  nodeName: {node}\n  containers:\n  - {{name: c, image: sluice-lab}}\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pod.yaml");
    std::fs::write(&file, pod).unwrap();
    assert!(lab
        .kubectl(&["apply", "-f", file.to_str().unwrap()])
        .status
        .success());
    let get = || -> Value {
        let out = lab.kubectl(&["get", "pod", "late", "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let reason = loop {
        let p = get();
        let cond = p["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned());
        if let Some(c) = cond.filter(|c| c["reason"] == "FailedCreatePodSandBox") {
            break c["message"].as_str().unwrap_or("").to_string();
        }
        assert!(Instant::now() < deadline, "no failure reported: {p:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(reason.contains("no subnet"), "{reason}");
    // The agent comes back, writes the subnet, and the kubelet's retry wires the pod.
    assert!(lab_cmd(&["agent", "--name", &lab.name, "start", &node], 30)
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = get();
        if p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "not retried: {p:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issue 25, defect 3: a node turns Ready only once its agent has put the CNI config in place
/// (the agent writes it when its subnet and datapath are up); until then no pod is wired there.
#[test]
fn a_node_is_ready_only_once_its_agent_installed_the_cni_config() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "0"]);
    let node = format!("{}-node-2", lab.name);
    let dir = format!("/run/sluice/lab/{}/nodes/{node}", lab.name);
    let condition = |kind: &str| -> Value {
        let out = lab.kubectl(&["get", "node", &node, "-o", "json"]);
        let n: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        n["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == kind).cloned())
            .unwrap_or(Value::Null)
    };
    assert_eq!(
        condition("Ready")["status"],
        "True",
        "lab up returned before the node was Ready"
    );
    assert_eq!(condition("NetworkUnavailable")["status"], "False");
    assert_eq!(condition("NetworkUnavailable")["reason"], "SluiceIsUp");
    // A node whose network was never set up: no agent yet, no subnet, no CNI config.
    assert!(lab_cmd(&["agent", "--name", &lab.name, "stop", &node], 30)
        .status
        .success());
    std::fs::remove_file(format!("{dir}/subnet.env")).unwrap();
    std::fs::remove_file(format!("{dir}/10-sluice.conflist")).unwrap();
    assert!(
        sluice_e2e::eventually(Duration::from_secs(10), || condition("Ready")["status"]
            == "False"),
        "the node stayed Ready without a CNI config: {}",
        condition("Ready")
    );
    assert!(condition("Ready")["message"]
        .as_str()
        .unwrap_or("")
        .contains("NetworkPluginNotReady"));
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: early, namespace: default}}\nspec:\n  nodeName: {node}\n  containers:\n  - {{name: c, image: sluice-lab}}\n"
    );
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("pod.yaml");
    std::fs::write(&file, pod).unwrap();
    assert!(lab
        .kubectl(&["apply", "-f", file.to_str().unwrap()])
        .status
        .success());
    let get = || -> Value {
        let out = lab.kubectl(&["get", "pod", "early", "-o", "json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    // No sandbox is attempted on a node whose network is not ready: no failure, no address.
    std::thread::sleep(Duration::from_secs(3));
    let p = get();
    assert!(p["status"]["podIP"].is_null(), "{p:#}");
    assert!(!p.to_string().contains("FailedCreatePodSandBox"), "{p:#}");
    // The agent comes up: subnet, datapath, then the CNI config; the node turns Ready and the pod runs.
    assert!(lab_cmd(&["agent", "--name", &lab.name, "start", &node], 30)
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = get();
        if p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not wired after the agent came up: {p:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(condition("Ready")["status"], "True");
    assert_eq!(condition("NetworkUnavailable")["status"], "False");
    let conf: Value =
        serde_json::from_slice(&std::fs::read(format!("{dir}/10-sluice.conflist")).unwrap())
            .unwrap();
    assert_eq!(conf["cniVersion"], "1.0.0");
}
