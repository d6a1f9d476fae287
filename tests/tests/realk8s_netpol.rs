//! The NetworkPolicy truth-table suite on real pods: the cases of `tests/netpol.rs` (shared, in
//! `sluice_e2e::netpol`) against a 3-node `sluice lab up --kubernetes` lab, on both renderers.
//! The nine pods are made through `kubectl apply` in the real cluster (the real scheduler binds
//! them where each one's `nodeSelector` says, three per node; the real kubelets run them
//! through containerd and sluice-cni), each running `sluice lab serve` from the image the
//! DaemonSet runs, so that every answer names its pod. The probes connect from inside each
//! pod's network namespace (entered through its container's `/proc/PID/ns/net`), and the
//! measured 9x9 matrices are compared with the ones each case's truth table predicts.
//!
//! One lab for both renderers: `policy-backend` is switched in the ConfigMap and the
//! DaemonSet's agents are restarted (deleted; the DaemonSet makes new ones), which must leave
//! only the chosen renderer's rules in every node, beside kube-proxy's. The
//! ClusterNetworkPolicy cases need the API group: a real API server serves it only through a
//! CRD, so the test installs one (a minimal structural schema of its own that keeps every
//! field) before the agents start watching. Runs only when SLUICE_K8S_BIN names the binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::have_root;
use sluice_e2e::lab::{container_pid, k8s_bin, output_text, Lab};
use sluice_e2e::netpol::*;
use sluice_e2e::realk8s::{agent_pods, sluice_rolled_out, AgentPod};
use std::time::{Duration, Instant};

/// The image every container of the manifest's DaemonSet runs, which `lab up --kubernetes`
/// wrote and loaded into every node; its `sluice lab serve` is the pods' server.
const SLUICE_IMAGE: &str = "ghcr.io/sluice-net/sluice:v0.1.0";

/// How long a case may take to be measured as enforced: twice the embedded lab's. The agents
/// enforce within about a second here too (by hand on this lab, iptables: a deny in 0.3-0.5 s
/// after `kubectl apply`; the agents' passes took at most 1 s), but a round of 162 probes, many
/// of them timing out, takes seconds on a loaded 2-core machine running three real nodes, and
/// the first cases after a switch of renderer measured 7.5-10.1 s at a load of ~50 (1.3 s
/// unloaded).
const REAL_DEADLINE: Duration = Duration::from_secs(20);

/// A CRD for `policy.networking.k8s.io/v1alpha2` ClusterNetworkPolicy, cluster-scoped; its
/// schema keeps every field (the agent decodes and validates each object itself).
const CNP_CRD: &str = "apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: clusternetworkpolicies.policy.networking.k8s.io
  # A *.k8s.io group must say whether its API review approved it; this test's own CRD was not.
  annotations:
    api-approved.kubernetes.io: unapproved, a test CRD for the ClusterNetworkPolicy cases
spec:
  group: policy.networking.k8s.io
  scope: Cluster
  names:
    kind: ClusterNetworkPolicy
    listKind: ClusterNetworkPolicyList
    plural: clusternetworkpolicies
    singular: clusternetworkpolicy
  versions:
  - name: v1alpha2
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
";

/// The sluice-serving pod's spec lines for the manifest: on node `nodes[(i + j) % 3]` for
/// namespace i and pod j, so that every node holds one pod of each namespace and of each name.
fn container(nodes: &[String], ns: &str, pod: &str) -> String {
    let i = NAMESPACES.iter().position(|n| *n == ns).unwrap();
    let j = PODS.iter().position(|p| *p == pod).unwrap();
    let node = &nodes[(i + j) % nodes.len()];
    format!(
        "  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: cont\n    image: {SLUICE_IMAGE}\n    imagePullPolicy: Never\n    command: [/usr/local/bin/sluice, lab, serve, --identity, \"{ns}/{pod}\", --tcp, \"80\", --tcp, \"81\", --udp, \"80\", --udp, \"81\", --sctp, \"80\", --sctp, \"81\"]\n"
    )
}

/// Sets `policy-backend` in the ConfigMap and restarts the DaemonSet's agents (the key is read
/// at start): deletes them, waits for the rollout and until every node's new agent reports the
/// backend and is ready.
fn use_backend(lab: &Lab, backend: &str) {
    let started = Instant::now();
    lab.set_config("policy-backend", backend);
    let before: Vec<AgentPod> = agent_pods(lab)
        .into_iter()
        .filter(|a| !a.deleting)
        .collect();
    lab.kubectl_ok(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/name=sluice",
        "--wait=true",
        "--timeout=50s",
    ]);
    sluice_rolled_out(lab, Duration::from_secs(55));
    let nodes = node_names(lab);
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = agent_http(lab, node, "/status");
            let ready = agent_http(lab, node, "/readyz");
            let replaced = agent_pods(lab).iter().any(|a| {
                !a.deleting && a.node == *node && !before.iter().any(|old| old.pod == a.pod)
            });
            if replaced
                && status.contains(&format!("\"backend\":\"{backend}\""))
                && ready.contains(" 200 ")
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent of {node} not ready with {backend}: {status}\n{ready}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    eprintln!(
        "realk8s-netpol: policy-backend {backend}: agents restarted and ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The nine pods with their addresses and open network namespaces (their containers'), once
/// all run; and where each landed.
fn pods(lab: &Lab, nodes: &[String]) -> (Vec<P>, Vec<std::fs::File>) {
    let ips = wait_running(lab, &all_pods());
    let list: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "pods", "-A", "-o", "json"])).unwrap();
    let items = list["items"].as_array().unwrap();
    let mut pods = Vec::new();
    let mut netns = Vec::new();
    for (ns, pod) in all_pods() {
        let item = items
            .iter()
            .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == pod)
            .unwrap();
        let want = container(nodes, ns, pod);
        let node = item["spec"]["nodeName"].as_str().unwrap();
        assert!(
            want.contains(&format!("hostname: {node}}}")),
            "{ns}/{pod} on {node}"
        );
        let id = item["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .unwrap_or_else(|| panic!("{ns}/{pod}: no container: {item:#}"));
        let pid = container_pid(id).unwrap_or_else(|| panic!("{ns}/{pod}: no process of {id}"));
        netns.push(std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap());
        pods.push(P {
            ns,
            pod,
            ip: ips[&format!("{ns}/{pod}")],
            ip6: None,
        });
    }
    (pods, netns)
}

/// Switches the lab to `backend`, checks that only its rules are in the nodes and that every
/// pod reaches every other on every port, then runs every case.
fn suite(env: &mut Env, backend: &'static str) -> Vec<Outcome> {
    use_backend(&env.lab, backend);
    env.backend = backend;
    for node in node_names(&env.lab) {
        let (nft, ipt) = kernel_has(&env.lab, &node);
        assert_eq!(
            (nft, ipt),
            (backend == "nftables", backend == "iptables"),
            "{node}: nft table {nft}, iptables chains {ipt}"
        );
    }
    let open = env.expected(ALL_PORTS, &|_, _, _| true);
    let (got, took) = env.converge(&open);
    assert_eq!(
        got,
        open,
        "{backend}: not all open at the start:\n{}",
        render(env, &got, Some(&open))
    );
    eprintln!("realk8s-netpol: {backend}: all 9x9 open on TCP and UDP 80, 81 after {took:?}");
    let lab = &env.lab;
    run_all(env, &|node| {
        let out = lab.kubectl(&[
            "-n",
            "kube-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=sluice",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "--tail=-1",
        ]);
        Some(output_text(&out))
    })
}

#[test]
fn truth_tables_hold_on_real_pods_on_both_renderers() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin("realk8s-netpol") else {
        return;
    };
    let started = Instant::now();
    let lab = Lab::up(&["--nodes", "3", "--kubernetes", &bin]);
    eprintln!(
        "realk8s-netpol: lab up (3 nodes) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sluice_rolled_out(&lab, Duration::from_secs(55));
    let crd = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(crd.path(), CNP_CRD).unwrap();
    lab.kubectl_ok(&["apply", "-f", crd.path().to_str().unwrap()]);
    lab.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "crd/clusternetworkpolicies.policy.networking.k8s.io",
        "--timeout=30s",
    ]);
    let mut nodes = node_names(&lab);
    nodes.sort();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    let made = Instant::now();
    apply_yaml(&lab, &manifest(&|ns, pod| container(&nodes, ns, pod)));
    let (pods, netns) = pods(&lab, &nodes);
    eprintln!(
        "realk8s-netpol: 9 pods running {:.1} s after kubectl apply",
        made.elapsed().as_secs_f64()
    );
    let mut env = Env {
        backend: "nftables",
        lab,
        pods,
        netns,
        deadline: REAL_DEADLINE,
        ipv6: false,
    };
    let started = Instant::now();
    let nft = suite(&mut env, "nftables");
    let nft_took = started.elapsed();
    let started = Instant::now();
    let ipt = suite(&mut env, "iptables");
    let ipt_took = started.elapsed();
    // The ClusterNetworkPolicy watch ran on the real API server (through the CRD).
    for node in node_names(&env.lab) {
        let status = agent_http(&env.lab, &node, "/status");
        assert!(
            status.contains("\"watch\":\"watching\""),
            "{node}: {status}"
        );
    }
    assert!(nft.len() >= 25, "{} cases", nft.len());
    let failures = compare(&nft, &ipt);
    eprintln!(
        "realk8s-netpol: {} cases: nftables {:.1} s, iptables {:.1} s; {} failures",
        nft.len(),
        nft_took.as_secs_f64(),
        ipt_took.as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let out = env.lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
}
