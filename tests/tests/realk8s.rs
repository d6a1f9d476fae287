//! `sluice lab up --kubernetes DIR` on real Kubernetes binaries (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler on the host's loopback, kube-proxy in every node):
//! pods on different nodes reach each other, a ClusterIP Service answers through the real
//! kube-proxy, a NetworkPolicy is enforced, and `lab down` leaves no process, namespace or file.
//! Runs only when SLUICE_K8S_BIN names the binaries (CI unpacks them from ../shared/realk8s).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::have_root;
use sluice_e2e::lab::{lab_cmd, netns_with_prefix, output_text, status_pods, Lab};

use std::time::{Duration, Instant};

fn k8s_bin() -> Option<String> {
    match std::env::var("SLUICE_K8S_BIN") {
        Ok(dir) if !dir.is_empty() => Some(dir),
        _ => {
            eprintln!(
                "realk8s: skipped: SLUICE_K8S_BIN is not set (it names a directory with the \
                 Kubernetes server binaries; .ci/run sets it when ../shared/realk8s exists)"
            );
            None
        }
    }
}

/// `lab probe` from pod `from` to `to` (a pod or an address) on TCP `port`: true if answered.
fn probe(lab: &Lab, from: &str, to: &str, port: u16) -> bool {
    let out = lab_cmd(
        &[
            "probe",
            "--name",
            &lab.name,
            from,
            to,
            &port.to_string(),
            "--timeout",
            "2s",
        ],
        30,
    );
    out.status.success()
}

/// Polls `probe` until it says `want`, bounded.
fn eventually(lab: &Lab, from: &str, to: &str, port: u16, want: bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if probe(lab, from, to, port) == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Processes whose command line names the lab's directory (its control plane, kube-proxies).
fn lab_processes(lab: &Lab) -> Vec<String> {
    let marker = format!("/run/sluice/lab/{}/", lab.name);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(&marker).then_some(c)
        })
        .collect()
}

#[test]
fn a_directory_without_the_binaries_is_refused_and_nothing_is_made() {
    if !have_root() || k8s_bin().is_none() {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let name = sluice_e2e::lab::unique_lab_name();
    let dir = empty.path().to_str().unwrap();
    let out = lab_cmd(&["up", "--name", &name, "--kubernetes", dir], 60);
    assert!(!out.status.success());
    let msg = output_text(&out);
    assert!(
        msg.contains(
            "lacks kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy"
        ),
        "{msg}"
    );
    assert!(netns_with_prefix(&format!("slab-{name}-")).is_empty());
    assert!(!std::path::Path::new(&format!("/run/sluice/lab/{name}")).exists());
}

#[test]
fn pods_services_and_policy_on_real_kubernetes() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin() else { return };
    let started = Instant::now();
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "1", "--kubernetes", &bin]);
    eprintln!(
        "realk8s: lab up took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(!lab_processes(&lab).is_empty());

    // The real controller-manager handed every node a podCIDR.
    let nodes: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    let items = nodes["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    for n in items {
        assert!(n["spec"]["podCIDR"].is_string(), "no podCIDR: {n:#}");
    }
    let ver = lab.kubectl_ok(&["version", "-o", "json"]);
    assert!(ver.contains("\"gitVersion\": \"v1."), "{ver}");

    let status = lab.status();
    let pods: Vec<(String, String)> = status_pods(&status)
        .into_iter()
        .map(|(pod, node, _)| (pod, node))
        .collect();
    assert_eq!(pods.len(), 3, "{status:#}");
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    assert!(a.1 != b.1 && b.1 != c.1 && a.1 != c.1, "{pods:?}");

    // Pod to pod across nodes.
    for (from, to) in [(a, b), (b, c), (c, a)] {
        assert!(
            eventually(&lab, &from.0, &to.0, 80, true, Duration::from_secs(20)),
            "{} ({}) -> {} ({}) unreachable",
            from.0,
            from.1,
            to.0,
            to.1
        );
    }

    // A ClusterIP Service in front of pod b, through kube-proxy's rules in a's node.
    let (ns, b_name) = b.0.split_once('/').unwrap();
    lab.kubectl_ok(&["-n", ns, "label", "pod", b_name, "role=backend"]);
    let svc = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: backend\n  namespace: {ns}\nspec:\n  selector:\n    role: backend\n  ports:\n  - port: 8080\n    targetPort: 80\n    protocol: TCP\n"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), svc).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.path().to_str().unwrap()]);
    let vip = lab.kubectl_ok(&[
        "-n",
        ns,
        "get",
        "service",
        "backend",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    assert!(vip.starts_with("10."), "{vip}");
    assert!(
        eventually(&lab, &a.0, vip.trim(), 8080, true, Duration::from_secs(40)),
        "{} -> Service backend {vip}:8080 unanswered",
        a.0
    );

    // A NetworkPolicy admitting nobody to b: the Service and the pod both fall silent.
    let policy = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-backend\n  namespace: {ns}\nspec:\n  podSelector:\n    matchLabels:\n      role: backend\n  policyTypes: [Ingress]\n"
    );
    std::fs::write(file.path(), policy).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.path().to_str().unwrap()]);
    assert!(
        eventually(&lab, &a.0, &b.0, 80, false, Duration::from_secs(20)),
        "deny-all ingress to {} not enforced",
        b.0
    );
    assert!(!probe(&lab, &a.0, vip.trim(), 8080));
    // Other pods are untouched.
    assert!(probe(&lab, &b.0, &c.0, 80));
    lab.kubectl_ok(&["-n", ns, "delete", "networkpolicy", "deny-backend"]);
    assert!(
        eventually(&lab, &a.0, &b.0, 80, true, Duration::from_secs(20)),
        "{} still blocked after the policy went",
        b.0
    );

    // A Deployment: the real controller-manager makes its pods, the real scheduler spreads them,
    // and every one of them is reachable from pod a.
    let started = Instant::now();
    lab.kubectl_ok(&[
        "-n",
        ns,
        "create",
        "deployment",
        "web",
        "--image=sluice-lab",
        "--replicas=6",
        "--port=80",
    ]);
    let running = loop {
        let list: Value = serde_json::from_str(
            &lab.kubectl_ok(&["-n", ns, "get", "pods", "-l", "app=web", "-o", "json"]),
        )
        .unwrap();
        let running: Vec<(String, String)> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
            .map(|p| {
                (
                    format!("{ns}/{}", p["metadata"]["name"].as_str().unwrap()),
                    p["spec"]["nodeName"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        if running.len() == 6 {
            break running;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "{} of 6 replicas running after 90 s: {list:#}",
            running.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "realk8s: 6 replicas running {:.1} s after kubectl create deployment",
        started.elapsed().as_secs_f64()
    );
    let mut spread: Vec<&str> = running.iter().map(|(_, n)| n.as_str()).collect();
    spread.sort_unstable();
    spread.dedup();
    assert_eq!(
        spread.len(),
        3,
        "replicas not spread over the nodes: {running:?}"
    );
    for (pod, node) in &running {
        assert!(
            eventually(&lab, &a.0, pod, 80, true, Duration::from_secs(20)),
            "{} -> {pod} ({node}) unreachable",
            a.0
        );
    }

    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(netns_with_prefix(&lab.prefix()).is_empty());
    assert!(
        lab_processes(&lab).is_empty(),
        "left running: {:?}",
        lab_processes(&lab)
    );
    assert!(!std::path::Path::new(&format!("/run/sluice/lab/{}", lab.name)).exists());
}

/// The external-API mode (`--kubeconfig`, as `SLUICE_E2E_KUBECONFIG`) against a real
/// kube-apiserver with no controller-manager: the lab makes what the controllers would (its
/// namespace's default ServiceAccount), else the API server refuses its pods ("error looking up
/// service account"). The API server is a first lab's, its controller-manager killed first.
#[test]
fn external_mode_on_a_real_api_server_without_controllers() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin() else { return };
    let host = Lab::up(&["--nodes", "1", "--pods-per-node", "1", "--kubernetes", &bin]);
    let marker = format!("/run/sluice/lab/{}/", host.name);
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        if c.contains(&marker) && c.contains("kube-controller-manager") {
            // A process this test's lab started, found by its lab path, killed by PID.
            let ok = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            killed += usize::from(ok);
        }
    }
    assert_eq!(killed, 1, "no kube-controller-manager of lab {}", host.name);
    let kc = host.kubeconfig();
    let lab = Lab::up(&[
        "--nodes",
        "1",
        "--pods-per-node",
        "1",
        "--kubeconfig",
        kc.to_str().unwrap(),
    ]);
    let status = lab.status();
    let pods = status_pods(&status);
    assert_eq!(pods.len(), 1, "{status:#}");
    let sa = host.kubectl_ok(&[
        "get",
        "serviceaccount",
        "default",
        "-n",
        &lab.name,
        "-o",
        "jsonpath={.metadata.name}",
    ]);
    assert_eq!(sa.trim(), "default");
    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
    let out = host.down();
    assert!(out.status.success(), "{}", output_text(&out));
}
