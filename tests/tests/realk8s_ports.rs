//! sluice-cni's `portMappings` and `bandwidth` capabilities on real Kubernetes (a 2-node
//! `sluice lab up --kubernetes` lab): the real kubelet and containerd's CRI turn a pod's
//! `hostPort` and its `kubernetes.io/ingress-bandwidth` / `egress-bandwidth` annotations into
//! the `runtimeConfig` of the CNI ADD, as on any cluster.
//! - A pod with containerPort 8080 -> hostPort 30880 is reached from the other node's namespace
//!   at its node's address (the source kept), from its own node at that address and at
//!   127.0.0.1; the other node's address has no such port.
//! - A pod annotated 20M each way serves iperf3 (an image the test writes offline with `sluice
//!   lab image --tool iperf3` and imports with `sluice lab load`); the iperf3 client runs in the
//!   other node's namespace (the host's iperf3), to the pod and with `-R` from it: both
//!   directions within 10 % of 20 Mbit/s. The first seconds are omitted from the figure
//!   (`-O`): containerd asks for the largest burst the CNI field holds, which sluice caps at
//!   2^32 ns of the rate (~4.3 s' worth, as the bandwidth plugin), and that bucket drains at
//!   line rate first.
//!
//! Runs only when SLUICE_K8S_BIN names the binaries.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::bench::within_ten_percent;
use sluice_e2e::have_root;
use sluice_e2e::lab::{in_netns, k8s_bin, lab_cmd, output_text, Lab};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.43";
const IPERF_IMAGE: &str = "localhost/sluice-test-iperf3:1";
const HOST_PORT: u16 = 30880;
/// The annotations' rate, bits per second.
const LIMIT: f64 = 20e6;
/// iperf3's run, and the first seconds left out of its figure (the burst).
const IPERF_SECS: u32 = 9;
const IPERF_OMIT: u32 = 3;

fn node_ip(lab: &Lab, node: &str) -> Ipv4Addr {
    let v: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "node", node, "-o", "json"])).unwrap();
    v["status"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("{node}: no InternalIP: {v:#}"))
}

/// One HTTP GET of `path` at `to` from inside `netns`; the body, or the error.
fn get(netns: &str, to: SocketAddr, path: &str) -> Result<String, String> {
    let path = path.to_string();
    in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .map_err(|e| format!("read {to}: {e}"))?;
        match reply.split_once("\r\n\r\n") {
            Some((head, body)) if head.contains(" 200 ") => Ok(body.to_string()),
            _ => Err(format!("{to}: {reply}")),
        }
    })
}

/// [`get`] until it answers (bounded); the last result.
fn get_until_ok(
    netns: &str,
    to: SocketAddr,
    path: &str,
    limit: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + limit;
    loop {
        let r = get(netns, to, path);
        if r.is_ok() || Instant::now() > deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The host's iperf3 client in the named namespace `netns` against `server`, `-R` when
/// `reverse` (the server sends); the receiver's bits per second over the run past the omitted
/// seconds, and iperf3's JSON.
fn iperf(netns: &str, server: Ipv4Addr, reverse: bool) -> (f64, Value) {
    // The server answers "busy" until it has closed the previous run's test, which it does
    // a moment after the client has its result: a bounded retry, not a failure.
    for attempt in 1..=IPERF_BUSY_TRIES {
        let mut cmd = std::process::Command::new("timeout");
        cmd.args(["-k", "5", "60", "nsenter"])
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["iperf3", "-J", "-c", &server.to_string(), "-p", "5201"])
            .args(["-t", &IPERF_SECS.to_string(), "-O", &IPERF_OMIT.to_string()]);
        if reverse {
            cmd.arg("-R");
        }
        let out = cmd.output().unwrap();
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("iperf3 printed no JSON ({e}): {}", output_text(&out)));
        let busy = v["error"]
            .as_str()
            .is_some_and(|e| e.contains("server is busy"));
        if busy && attempt < IPERF_BUSY_TRIES {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        assert!(
            out.status.success() && v["error"].is_null(),
            "iperf3 (attempt {attempt}): {v:#}"
        );
        let bps = v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or_else(|| panic!("no end.sum_received in {v:#}"));
        return (bps, v);
    }
    unreachable!("the last attempt returns or panics")
}

/// How many times a client asks a busy iperf3 server, a second apart.
const IPERF_BUSY_TRIES: u32 = 10;

#[test]
fn host_port_and_bandwidth_on_real_kubernetes() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin("realk8s-ports") else {
        return;
    };
    // The iperf3 image, written offline before the lab (it does not need one).
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("iperf3.tar");
    let out = lab_cmd(
        &[
            "image",
            "--out",
            archive.to_str().unwrap(),
            "--tag",
            IPERF_IMAGE,
            "--tool",
            "iperf3",
        ],
        120,
    );
    assert!(out.status.success(), "lab image: {}", output_text(&out));

    let started = Instant::now();
    let lab = Lab::up(&["--nodes", "2", "--kubernetes", &bin]);
    eprintln!(
        "realk8s-ports: lab up (2 nodes) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let out = lab_cmd(
        &["load", "--name", &lab.name, archive.to_str().unwrap()],
        120,
    );
    assert!(out.status.success(), "lab load: {}", output_text(&out));
    let (n1, n2) = (
        format!("{}-node-1", lab.name),
        format!("{}-node-2", lab.name),
    );
    let pods = format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: hp
  labels: {{app: hp}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {n1}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: {AGNHOST}
    args: [netexec, --http-port=8080]
    ports:
    - {{containerPort: 8080, hostPort: {HOST_PORT}, protocol: TCP}}
---
apiVersion: v1
kind: Pod
metadata:
  name: bw
  annotations:
    kubernetes.io/ingress-bandwidth: 20M
    kubernetes.io/egress-bandwidth: 20M
spec:
  nodeSelector: {{kubernetes.io/hostname: {n1}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: iperf
    image: {IPERF_IMAGE}
    imagePullPolicy: Never
    command: [/usr/bin/iperf3, -s, -p, \"5201\"]
"
    );
    let file = dir.path().join("pods.yaml");
    std::fs::write(&file, pods).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    lab.kubectl_ok(&[
        "wait",
        "--for=condition=Ready",
        "pod/hp",
        "pod/bw",
        "--timeout=50s",
    ]);
    let bw_ip: Ipv4Addr = lab
        .kubectl_ok(&["get", "pod", "bw", "-o", "jsonpath={.status.podIP}"])
        .trim()
        .parse()
        .unwrap();
    let (ip1, ip2) = (node_ip(&lab, &n1), node_ip(&lab, &n2));
    let (ns1, ns2) = (lab.node_netns(&n1), lab.node_netns(&n2));

    // hostPort: from the other node, at the pod's node address; the pod sees node 2's address.
    let at_node1 = SocketAddr::from((ip1, HOST_PORT));
    let name = get_until_ok(&ns2, at_node1, "/hostname", Duration::from_secs(20));
    assert_eq!(name.as_deref(), Ok("hp"), "node 2 -> {at_node1}");
    let client = get(&ns2, at_node1, "/clientip").unwrap();
    assert_eq!(
        client.rsplit_once(':').map(|(ip, _)| ip),
        Some(ip2.to_string().as_str()),
        "the pod saw {client} for node 2 ({ip2})"
    );
    // From the pod's own node: its address and 127.0.0.1.
    for to in [at_node1, SocketAddr::from(([127, 0, 0, 1], HOST_PORT))] {
        let r = get_until_ok(&ns1, to, "/hostname", Duration::from_secs(10));
        assert_eq!(r.as_deref(), Ok("hp"), "node 1 -> {to}");
    }
    // Not on the other node's address: the mapping is the pod's node's only.
    let at_node2 = SocketAddr::from((ip2, HOST_PORT));
    assert!(
        get(&ns1, at_node2, "/hostname").is_err(),
        "{at_node2} answered"
    );
    eprintln!("realk8s-ports: hostPort {HOST_PORT} of hp on {n1} answered from {n2} at {at_node1} (source {client}), from {n1} at its address and 127.0.0.1");

    // Bandwidth: node 2 -> the pod (its ingress), then the pod -> node 2 (its egress).
    let ingress = within_ten_percent("realk8s-ports: ingress", LIMIT, || {
        iperf(&ns2, bw_ip, false).0
    });
    let egress = within_ten_percent("realk8s-ports: egress", LIMIT, || {
        iperf(&ns2, bw_ip, true).0
    });
    eprintln!(
        "realk8s-ports: bandwidth 20M annotations: ingress {:.2?} Mbit/s, egress {:.2?} Mbit/s of {:.0} Mbit/s (iperf3 -t {IPERF_SECS} -O {IPERF_OMIT})",
        ingress.iter().map(|b| b / 1e6).collect::<Vec<_>>(),
        egress.iter().map(|b| b / 1e6).collect::<Vec<_>>(),
        LIMIT / 1e6
    );

    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
}
