//! `sluice lab up`, `status`, `down` end to end: namespaces, the embedded API server, pods wired
//! by the real sluice-cni, real pings, and nothing left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::Ipv4Net;
use serde_json::Value;
use sluice_e2e::have_root;
use sluice_e2e::lab::{lab_cmd, netns_with_prefix, status_pods, Lab};

fn assert_gone(lab: &Lab) {
    assert!(
        netns_with_prefix(&lab.prefix()).is_empty(),
        "namespaces left: {:?}",
        netns_with_prefix(&lab.prefix())
    );
    assert!(
        !std::path::Path::new(&format!("/run/sluice/lab/{}", lab.name)).exists(),
        "state dir left"
    );
    let daemon_args = format!("__daemon\0--name\0{}\0", lab.name);
    let left: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&daemon_args))
        })
        .collect();
    assert!(left.is_empty(), "lab daemon still running");
}

#[test]
fn three_nodes_two_pods_each_status_and_down() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "2"]);
    let status = lab.status();
    assert_eq!(status["daemon"]["running"], true, "{status:#}");
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let cidr_of = |node: &str| -> Ipv4Net {
        nodes.iter().find(|n| n["name"] == node).unwrap()["subnet"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let pods = status_pods(&status);
    assert_eq!(pods.len(), 6, "{status:#}");
    let mut ips: Vec<_> = pods.iter().map(|p| p.2).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 6, "pod addresses must be distinct");
    for (pod, node, ip) in &pods {
        assert!(
            cidr_of(node).contains(ip),
            "{pod} has {ip}, outside {node}'s subnet"
        );
    }
    // Every pod reaches every pod, on its node and across nodes (the agents' VXLAN).
    let m = status["reachability"].as_array().unwrap();
    for (i, a) in pods.iter().enumerate() {
        for (j, b) in pods.iter().enumerate() {
            assert_eq!(
                m[i][j], true,
                "{} ({}) -> {} ({}) unreachable",
                a.0, a.1, b.0, b.1
            );
        }
    }
    // kubectl sees the lab's cluster.
    let out = lab.kubectl(&["get", "nodes", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 3);
    let out = lab.kubectl(&["get", "pods", "-A", "-o", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let running = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
        .count();
    assert_eq!(running, 6);
    // Each agent tells its plugin where hostPort rules go: the firewall policy-backend
    // (auto) resolved to, nftables where nft works.
    let nodes_dir = format!("/run/sluice/lab/{}/nodes", lab.name);
    let published = || -> Vec<String> {
        std::fs::read_dir(&nodes_dir)
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("subnet.env")).ok())
            .filter_map(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("SLUICE_POLICY_BACKEND=").map(str::to_string))
            })
            .collect()
    };
    assert!(
        sluice_e2e::wait_until(std::time::Duration::from_secs(30), || published().len()
            == 3),
        "not every agent published its backend: {:?}",
        published()
    );
    assert!(
        published().iter().all(|b| b == "nftables"),
        "{:?}",
        published()
    );
    // A second `up` of the same name is refused without touching the running lab.
    let again = lab_cmd(&["up", "--name", &lab.name], 60);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    // `lab restart` is for real node components: refused on this lab, and for a node or a
    // component that does not exist, each with a reason, nothing stopped.
    let (node1, node9) = (
        format!("{}-node-1", lab.name),
        format!("{}-node-9", lab.name),
    );
    for (args, why) in [
        (
            [node1.as_str(), "kubelet"],
            "embedded API server".to_string(),
        ),
        ([node9.as_str(), "kubelet"], format!("has no node {node9}")),
        ([node1.as_str(), "etcd"], "invalid value".to_string()),
    ] {
        let mut all = vec!["restart", "--name", &lab.name];
        all.extend(args);
        let out = lab_cmd(&all, 30);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "lab {all:?} succeeded");
        assert!(err.contains(&why), "lab {all:?}: {err}");
    }
    // underlay, internet, 3 nodes, 6 pods
    assert_eq!(netns_with_prefix(&lab.prefix()).len(), 2 + 3 + 6);

    let out = lab.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(&lab);
}

#[test]
fn two_routed_segments_and_down_after_a_crash() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1", "--segments", "2"]);
    let status = lab.status();
    let nodes = status["nodes"].as_array().unwrap();
    let (n1, n2) = (&nodes[0], &nodes[1]);
    assert_ne!(
        n1["underlay"].as_str().unwrap().rsplit_once('.').unwrap().0,
        n2["underlay"].as_str().unwrap().rsplit_once('.').unwrap().0,
        "nodes should be on different segments"
    );
    // The nodes reach each other through the underlay's router.
    let ping = std::process::Command::new("ip")
        .args(["netns", "exec", n1["netns"].as_str().unwrap()])
        .args([
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            n2["underlay"].as_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "node-1 cannot reach node-2 across segments"
    );
    // The daemon dies hard; `down` still finds and removes everything.
    let pid = status["daemon"]["pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = lab.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(&lab);
    // A second down is a no-op that says so.
    let out = lab.down();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to remove"));
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if !have_root() {
        return;
    }
    for (args, says) in [
        (&["--nodes", "0"][..], "--nodes 0"),
        (&["--segments", "3"][..], "--segments 3"),
    ] {
        sluice_e2e::lab::up_is_refused(args, says);
    }
    let out = lab_cmd(&["up", "--name", "Bad-Name"], 30);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lab name"));
}

/// The lab pointed at an API server that is not its own (as `SLUICE_E2E_KUBECONFIG` points it at
/// a real kube-apiserver on the host's loopback): no embedded server is started, the API is
/// forwarded into the node namespaces, the agents lease there, and `down` removes the lab's
/// Nodes and Pods from it.
#[test]
fn lab_uses_an_external_api_server() {
    if !have_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_test-apiserver"));
    let mut server = std::process::Command::new(bin)
        .arg(&kubeconfig)
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let server = Kill(&mut server);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !kubeconfig.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kc = kubeconfig.to_str().unwrap();
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1", "--kubeconfig", kc]);
    let status = lab.status();
    let m = status["reachability"].as_array().unwrap();
    assert_eq!(m.len(), 2, "{status:#}");
    assert!(
        m.iter()
            .flat_map(|r| r.as_array().unwrap())
            .all(|v| v == true),
        "{status:#}"
    );
    let kubectl = |args: &[&str]| -> Value {
        let out = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .args(["-o", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let leases = kubectl(&["get", "leases", "-n", "sluice-system"]);
    assert_eq!(leases["items"].as_array().unwrap().len(), 2, "{leases:#}");
    let out = lab.down();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_gone(&lab);
    let nodes = kubectl(&["get", "nodes"]);
    assert_eq!(nodes["items"].as_array().unwrap().len(), 0, "{nodes:#}");
    drop(server);
}

/// `subnet-source: node-podcidr`: each agent takes its Node's spec.podCIDR and still publishes
/// its record in a lease named from it, so peers find it the same way.
#[test]
fn node_podcidr_mode_uses_each_nodes_pod_cidr() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--subnet-source",
        "node-podcidr",
    ]);
    let status = lab.status();
    for n in status["nodes"].as_array().unwrap() {
        assert_eq!(n["subnet"], n["podCIDR"], "{n}");
    }
    let m = status["reachability"].as_array().unwrap();
    assert_eq!(m.len(), 3);
    assert!(
        m.iter()
            .flat_map(|r| r.as_array().unwrap())
            .all(|v| v == true),
        "{status:#}"
    );
    let out = lab.kubectl(&["get", "leases", "-n", "sluice-system", "-o", "json"]);
    let leases: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<&str> = leases["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    let want: Vec<String> = (0..3).map(|i| format!("sluice-10-244-{i}-0-24")).collect();
    assert_eq!(names, want);
}

/// kubectl against a lab, for each kind sluice uses: apply -f, get -o yaml, label, get -w, delete.
#[test]
fn kubectl_works_against_a_lab_for_every_kind() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "1", "--pods-per-node", "0"]);
    let manifest = r#"apiVersion: v1
kind: Namespace
metadata: {name: kk}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm1, namespace: kk}
data: {a: "1"}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np1, namespace: kk}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: l1, namespace: kk}
spec: {holderIdentity: someone, leaseDurationSeconds: 30}
---
apiVersion: v1
kind: Node
metadata: {name: extra-node}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: kk}
spec:
  containers: [{name: c, image: sluice-lab}]
"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("all.yaml");
    std::fs::write(&file, manifest).unwrap();
    let ok = |args: &[&str]| -> String {
        let out = lab.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    /// kubectl's arguments, with `-n` for a namespaced object.
    fn in_ns<'a>(ns: Option<&'a str>, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = args.to_vec();
        all.extend(ns.into_iter().flat_map(|ns| ["-n", ns]));
        all
    }
    let objects = [
        ("namespace", "kk", None),
        ("configmap", "cm1", Some("kk")),
        ("networkpolicy", "np1", Some("kk")),
        ("lease", "l1", Some("kk")),
        ("node", "extra-node", None),
        ("pod", "p1", Some("kk")),
    ];
    let applied = ok(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(applied.matches(" created").count(), 6, "{applied}");
    // A watch sees the change made next.
    let mut watch = std::process::Command::new("timeout")
        .args(["-k", "2", "20", "kubectl", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .args([
            "get",
            "configmaps",
            "-n",
            "kk",
            "-w",
            "-o",
            "json",
            "--output-watch-events",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for &(kind, name, ns) in &objects {
        let yaml = ok(&in_ns(ns, &["get", kind, name, "-o", "yaml"]));
        assert!(yaml.contains(&format!("name: {name}")), "{yaml}");
        ok(&in_ns(ns, &["label", kind, name, "tier=lab"]));
        let labelled = ok(&in_ns(ns, &["get", kind, "-l", "tier=lab", "-o", "name"]));
        assert!(labelled.contains(name));
    }
    // The lab's kubelet made the pod real.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ok(&[
        "get",
        "pod",
        "p1",
        "-n",
        "kk",
        "-o",
        "jsonpath={.status.phase}",
    ])
    .contains("Running")
    {
        assert!(std::time::Instant::now() < deadline, "pod never ran");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // The namespace comes first in the file, and its deletion takes what is in it, the pod
    // once the kubelet has torn it down: as on a real cluster, a later delete of that content
    // may find it gone already, so the check that all of it is gone comes after.
    ok(&[
        "delete",
        "-f",
        file.to_str().unwrap(),
        "--wait=true",
        "--timeout=30s",
        "--ignore-not-found",
    ]);
    for &(kind, name, ns) in &objects {
        let left = ok(&in_ns(
            ns,
            &["get", kind, name, "--ignore-not-found", "-o", "name"],
        ));
        assert_eq!(left.trim(), "", "{kind} {name} is still there");
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    // TERM to timeout(1), which passes it on to kubectl (a KILL would orphan kubectl).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watch.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = watch.wait();
    let mut seen = String::new();
    use std::io::Read;
    watch
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut seen)
        .unwrap();
    assert!(
        seen.contains("\"ADDED\"") && seen.contains("\"cm1\""),
        "{seen}"
    );
    assert!(
        seen.contains("MODIFIED"),
        "the label was not watched: {seen}"
    );
    assert!(
        seen.contains("DELETED"),
        "the delete was not watched: {seen}"
    );
}
