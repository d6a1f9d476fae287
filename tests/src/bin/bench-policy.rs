//! `bench-policy`: NetworkPolicy at scale, measured in one go, for each renderer.
//!
//! One node namespace runs the real agent against sluice's embedded API server (in this
//! process), holding `--local-pods` local pods (1,000 by default: two real pods in their own
//! namespaces, the rest veths with the /32 routes sluice's plugin makes), in a cluster of
//! `--cluster-pods` pods (10,000) and `--policies` NetworkPolicies (1,000; each selects one
//! app's pods and admits another app's on a port, some also limit egress to an `ipBlock` with
//! an `except`).
//!
//! 1. Enforcement latency: a policy on the real server pod is switched between "deny all
//!    ingress" and "admit the client pod" by a PATCH to the API; the time from sending the
//!    PATCH until a real TCP connect from the client pod first shows the new verdict (a
//!    connect attempt every millisecond; an attempt that times out means denied). p50, p99 and
//!    max, for each renderer. Anchor: p99 under 100 ms.
//! 2. Time from the agent's start until the first probe shows policy in force (1,000 local
//!    pods and 1,000 policies programmed from nothing).
//! 3. The agent's memory (VmRSS and its peak, VmHWM) with all of it in the cluster. Anchor:
//!    under 100 MiB.
//! 4. Per-packet cost: new connections a second and iperf3 throughput between the two real
//!    pods with the probe policy admitting 0 and 10,000 more peers, `--packet-rounds` (3) of
//!    each alternately, each once the agent is idle, medians compared. Anchor: at least 0.9.
//! 5. ClusterNetworkPolicy (`--cnps`, 100 by default; 0 skips it): that many
//!    ClusterNetworkPolicies put in force on top of the above (a mix of Admin and Baseline,
//!    priorities, namespace and pod subjects, Accept/Deny/Pass, ports by number, range and
//!    name, egress to networks and nodes; ten select every namespace, so the real pods' packets
//!    go through the tiers' lookups). First the flows of 4 with none and then with all of them
//!    in force (as many rounds; anchor: at least 0.9);
//!    they are made with the agent stopped, then it is started again, so that it takes them
//!    in one pass (see [`cnp_figures`]). Then, all in force, one of them, an Admin policy on the server pod, is
//!    switched between Deny and Accept of the client (the NetworkPolicy denies it all along),
//!    timed as in 1 (anchor: p99 under 100 ms).
//!
//! Everything it makes (namespaces, the agent) is removed on every exit path; traffic stays
//! inside namespaces made here; every wait is bounded.
//!
//! Usage: bench-policy [--sluice PATH] [--local-pods N] [--cluster-pods M] [--policies P]
//!                     [--cnps C] [--samples K] [--packet-rounds R] [--only nftables|iptables]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use sluice_e2e::bench::{
    cleanup_on_signals, http, ip, iperf, iperf_server, ms, pct, rss_mib, sysctl, Flags, Guard, Ns,
    IPERF_PORT,
};
use sluice_e2e::lab::in_netns;
use sluice_e2e::sh;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Args {
    sluice: PathBuf,
    local_pods: usize,
    cluster_pods: usize,
    policies: usize,
    cnps: usize,
    samples: usize,
    /// Rounds of each per-packet state, alternately (medians are compared).
    packet_rounds: usize,
    only: Option<String>,
}

const USAGE: &str = "\
usage: bench-policy [--sluice PATH] [--local-pods N] [--cluster-pods M] [--policies P]
                    [--cnps C] [--samples K] [--packet-rounds R] [--only nftables|iptables]";

fn parse_args() -> Args {
    let mut a = Args {
        sluice: sluice_e2e::sluice_bin(),
        local_pods: 1_000,
        cluster_pods: 10_000,
        policies: 1_000,
        cnps: 100,
        samples: 40,
        packet_rounds: 3,
        only: None,
    };
    let mut flags = Flags::from_env("bench-policy", USAGE);
    while let Some((flag, value)) = flags.next_pair() {
        match flag.as_str() {
            "--sluice" => a.sluice = PathBuf::from(value),
            "--local-pods" => a.local_pods = flags.number(&flag, &value),
            "--cluster-pods" => a.cluster_pods = flags.number(&flag, &value),
            "--policies" => a.policies = flags.number(&flag, &value),
            "--cnps" => a.cnps = flags.number(&flag, &value),
            "--samples" => a.samples = flags.number(&flag, &value),
            "--packet-rounds" => a.packet_rounds = flags.number(&flag, &value),
            "--only" => {
                flags.require(
                    value == "nftables" || value == "iptables",
                    &format!("--only takes nftables or iptables, not {value:?}"),
                );
                a.only = Some(value);
            }
            other => flags.fail(&format!("unknown flag {other}")),
        }
    }
    flags.require(
        (2..=20_000).contains(&a.local_pods),
        "--local-pods in 2..=20000",
    );
    flags.require(
        a.cluster_pods >= a.local_pods && a.cluster_pods <= 100_000,
        "--cluster-pods from --local-pods to 100000",
    );
    flags.require(
        (1..=10_000).contains(&a.policies),
        "--policies in 1..=10000",
    );
    flags.require(a.cnps <= 1_000, "--cnps in 0..=1000");
    flags.require((2..=1_000).contains(&a.samples), "--samples in 2..=1000");
    flags.require(
        (1..=20).contains(&a.packet_rounds),
        "--packet-rounds in 1..=20",
    );
    a
}

const NODE: &str = "bench-node";
const UNDERLAY: &str = "172.31.250.1";
const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
const GATEWAY: &str = "169.254.1.1";
const PORT: u16 = 8080;
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 249, 0, 1);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 249, 0, 2);

/// Address of bulk pod `i`: local ones in 10.250/16, the others in 10.251/16 and up.
fn pod_ip(i: usize, local: bool) -> Ipv4Addr {
    let base: u32 = if local { 0x0afa_0000 } else { 0x0afb_0000 };
    Ipv4Addr::from(base + u32::try_from(i).unwrap() + 1)
}

fn host_ifname(i: usize) -> String {
    format!("sl{i:013x}")
}

// ---------------------------------------------------------------------------------------------
// The API server, in this process.

/// Serves sluice's embedded API server on the host's loopback and on the node namespace's, at
/// the same address (one kubeconfig for both); runs until the process ends.
fn api_server(node_ns: &str) -> SocketAddr {
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = host.local_addr().unwrap();
    let inside = in_netns(node_ns, move || TcpListener::bind(addr).unwrap());
    for l in [&host, &inside] {
        l.set_nonblocking(true).unwrap();
    }
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let api =
                sluice_apiserver::ApiServer::open(sluice_apiserver::Options::default()).unwrap();
            let host = tokio::net::TcpListener::from_std(host).unwrap();
            let inside = tokio::net::TcpListener::from_std(inside).unwrap();
            tokio::spawn(api.clone().serve(inside));
            let _ = api.serve(host).await;
        });
    });
    addr
}

fn create(api: SocketAddr, path: &str, body: &Value) {
    let (code, text) = http(api, "POST", path, "application/json", &body.to_string());
    assert_eq!(code, 201, "POST {path}: {text}");
}

fn merge_patch(api: SocketAddr, path: &str, body: &Value) {
    let (code, text) = http(
        api,
        "PATCH",
        path,
        "application/merge-patch+json",
        &body.to_string(),
    );
    assert_eq!(code, 200, "PATCH {path}: {text}");
}

fn namespace(api: SocketAddr, name: &str) {
    create(
        api,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": {"bench": name}}}),
    );
}

fn config(backend: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "sluice-config", "namespace": "kube-system"},
           "data": {"cluster-cidr": "10.244.0.0/16", "subnet-length": "24",
                    "subnet-source": "lease", "encryption": "none",
                    "masquerade": "false", "policy-backend": backend}})
}

fn pod(api: SocketAddr, ns: &str, name: &str, node: &str, labels: Value, ip: Ipv4Addr) {
    create(
        api,
        &format!("/api/v1/namespaces/{ns}/pods"),
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none",
                         "ports": [{"name": "http", "containerPort": PORT}]}]}}),
    );
    merge_patch(
        api,
        &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
        &json!({"status": {"phase": "Running", "podIP": ip.to_string(),
                           "podIPs": [{"ip": ip.to_string()}]}}),
    );
}

/// Policy `i`: app `a{i}` admits app `a{i+7}` on the named port and the node range on 9000-9100;
/// every tenth also limits its egress to 10.0.0.0/8 less 10.250.0.0/16's first /24.
fn bulk_policy(i: usize, apps: usize) -> Value {
    let mut spec = json!({
        "podSelector": {"matchLabels": {"app": format!("a{i}")}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (i + 7) % apps)}}}],
             "ports": [{"protocol": "TCP", "port": "http"}]},
            {"from": [{"ipBlock": {"cidr": "172.31.0.0/16"}}],
             "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9100}]}
        ]
    });
    if i.is_multiple_of(10) {
        spec["policyTypes"] = json!(["Ingress", "Egress"]);
        spec["egress"] = json!([{"to": [{"ipBlock": {"cidr": "10.0.0.0/8",
                                                     "except": ["10.250.0.0/24"]}}]}]);
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": format!("p{i}"), "namespace": "bench"}, "spec": spec})
}

const PROBE_POLICY: &str = "/apis/networking.k8s.io/v1/namespaces/probe/networkpolicies/probe";

fn probe_ingress(open: bool) -> Value {
    if open {
        json!([{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}])
    } else {
        json!([])
    }
}

/// The probe policy with the client admitted on the echo and iperf3 ports, and with `extra`
/// more peers (scattered /32s, so that none merge: each is its own set element) that are
/// also admitted on the marker port [`MARKER`].
fn probe_peers(extra: usize) -> Value {
    let mut from = vec![json!({"podSelector": {"matchLabels": {"role": "client"}}})];
    let mut ports = vec![
        json!({"protocol": "TCP", "port": PORT}),
        json!({"protocol": "TCP", "port": IPERF_PORT}),
    ];
    if extra > 0 {
        for i in 0..extra {
            let a = Ipv4Addr::from(0x0ac8_0001 + 2 * u32::try_from(i).unwrap());
            from.push(json!({"ipBlock": {"cidr": format!("{a}/32")}}));
        }
        ports.push(json!({"protocol": "TCP", "port": MARKER}));
    }
    json!([{"from": from, "ports": ports}])
}

/// A port nothing listens on: admitted (a reset comes back) only with the many-peers policy,
/// so its answer says which of the two is in force.
const MARKER: u16 = 9;

/// Waits until the marker port answers as the policy with `many` peers says; false on timeout.
fn until_marker(client: &str, many: bool, limit: Duration) -> bool {
    in_netns(client, move || {
        let dst = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, MARKER));
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let refused = matches!(
                TcpStream::connect_timeout(&dst, Duration::from_millis(20)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            );
            if refused == many {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    })
}

// ---------------------------------------------------------------------------------------------
// ClusterNetworkPolicies.

const CNPS: &str = "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies";
/// The ClusterNetworkPolicy on the server pod whose changes are timed.
const PROBE_CNP: &str = "probe-cnp";

/// A selector of the namespace `name` (the label the API server gives every namespace).
fn ns_named(name: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": name}})
}

/// Bulk ClusterNetworkPolicy `i` (of the `--cnps` less the probe one), about the bench
/// namespace's `apps` apps. The mix, by `i`: a quarter Baseline, the rest Admin; priorities
/// 0..=240 in steps of 10 (four policies to a priority, so that equal priorities meet); a tenth
/// select every namespace (the real pods' too), three tenths the bench namespace, the rest
/// one app's pods; the ingress rule Deny, Accept or Pass (Pass only in Admin, as the API
/// allows), from one app's pods or the bench namespace, on every port, on 8080, on 9000-9100
/// and UDP 53, or on the named port; every fifth also denies (Admin) egress to the metadata
/// address or accepts (Baseline) egress to every node, and every tenth more passes or accepts
/// egress to the remote pods' range on 8080. No rule names the probe namespace's pods or
/// addresses: the real pods' traffic goes through the tiers and is decided by NetworkPolicy.
fn bulk_cnp(i: usize, apps: usize) -> Value {
    let baseline = i % 4 == 3;
    let app = |k: usize| json!({"matchLabels": {"app": format!("a{}", k % apps)}});
    let subject = match i % 10 {
        0 => json!({"namespaces": {}}),
        1..=3 => json!({"namespaces": ns_named("bench")}),
        _ => json!({"pods": {"namespaceSelector": ns_named("bench"), "podSelector": app(i * 7)}}),
    };
    let action = match (i % 3, baseline) {
        (0, _) => "Deny",
        (1, _) | (2, true) => "Accept",
        _ => "Pass",
    };
    let from = if i.is_multiple_of(2) {
        json!([{"pods": {"namespaceSelector": ns_named("bench"), "podSelector": app(i * 13 + 1)}}])
    } else {
        json!([{"namespaces": {"matchLabels": {"bench": "bench"}}}])
    };
    let mut rule = json!({"name": format!("in-{i}"), "action": action, "from": from});
    match i % 4 {
        0 => {}
        1 => rule["protocols"] = json!([{"tcp": {"destinationPort": {"number": 8080}}}]),
        2 => {
            rule["protocols"] = json!([
                {"tcp": {"destinationPort": {"range": {"start": 9000, "end": 9100}}}},
                {"udp": {"destinationPort": {"number": 53}}}
            ])
        }
        _ => rule["protocols"] = json!([{"destinationNamedPort": "http"}]),
    }
    let mut spec = json!({
        "tier": if baseline { "Baseline" } else { "Admin" },
        "priority": 10 * (i % 25),
        "subject": subject,
        "ingress": [rule],
    });
    let mut egress = Vec::new();
    if i.is_multiple_of(5) {
        egress.push(if baseline {
            json!({"name": "nodes", "action": "Accept", "to": [{"nodes": {}}]})
        } else {
            json!({"name": "metadata", "action": "Deny",
                   "to": [{"networks": ["169.254.169.254/32"]}]})
        });
    }
    if i % 10 == 7 {
        egress.push(
            json!({"name": "remote", "action": if baseline { "Accept" } else { "Pass" },
                           "to": [{"networks": ["10.251.0.0/16"]}],
                           "protocols": [{"tcp": {"destinationPort": {"number": 8080}}}]}),
        );
    }
    if !egress.is_empty() {
        spec["egress"] = Value::Array(egress);
    }
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": format!("c{i}")}, "spec": spec})
}

/// The probe ClusterNetworkPolicy's ingress: `action` for the client pod on TCP `port`.
fn probe_cnp_ingress(action: &str, port: u16) -> Value {
    json!([{"name": "client", "action": action,
            "from": [{"pods": {"namespaceSelector": ns_named("probe"),
                               "podSelector": {"matchLabels": {"role": "client"}}}}],
            "protocols": [{"tcp": {"destinationPort": {"number": port}}}]}])
}

/// The probe ClusterNetworkPolicy: Admin, mid-range priority, on the server pod.
fn probe_cnp(ingress: Value) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": PROBE_CNP},
           "spec": {"tier": "Admin", "priority": 120,
                    "subject": {"pods": {"namespaceSelector": ns_named("probe"),
                                         "podSelector": {"matchLabels": {"role": "server"}}}},
                    "ingress": ingress}})
}

/// Creates the `count - 1` bulk ClusterNetworkPolicies, then the probe one with `ingress` (last,
/// so that once it shows in force the others are in the agent's view too).
fn create_cnps(api: SocketAddr, count: usize, apps: usize, ingress: Value) {
    for i in 0..count.saturating_sub(1) {
        create(api, CNPS, &bulk_cnp(i, apps));
    }
    create(api, CNPS, &probe_cnp(ingress));
}

/// Deletes what [`create_cnps`] made, the probe one last.
fn delete_cnps(api: SocketAddr, count: usize) {
    let names = (0..count.saturating_sub(1))
        .map(|i| format!("c{i}"))
        .chain([PROBE_CNP.to_string()]);
    for name in names {
        let (code, text) = http(
            api,
            "DELETE",
            &format!("{CNPS}/{name}"),
            "application/json",
            "",
        );
        assert!(code == 200 || code == 202, "DELETE {name}: {text}");
    }
}

/// New connections a second from the client pod to the server pod: each one connects, sends a
/// byte, reads the echo and resets (no TIME_WAIT), for `secs`.
fn conn_rate(client: &str, secs: f64) -> (f64, u64) {
    in_netns(client, move || {
        let dst = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, PORT));
        let (mut ok, mut failed) = (0u64, 0u64);
        let started = Instant::now();
        let span = Duration::from_secs_f64(secs);
        while started.elapsed() < span {
            let done = (|| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_millis(200))?;
                s.set_read_timeout(Some(Duration::from_millis(200)))?;
                s.write_all(&[7])?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                let linger = nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
                    .map_err(std::io::Error::from)?;
                Ok(())
            })();
            if done.is_ok() {
                ok += 1;
            } else {
                failed += 1;
            }
        }
        (ok as f64 / started.elapsed().as_secs_f64(), failed)
    })
}

// ---------------------------------------------------------------------------------------------
// The node.

/// A real pod: namespace, veth from the node, address, the gateway as a static neighbour.
fn real_pod(node: &Ns, index: usize, ip_addr: Ipv4Addr) -> Ns {
    let pod = Ns::new("bpp");
    let host = host_ifname(index);
    ip(
        &node.name,
        &format!(
            "link add {host} address {HOST_MAC} type veth peer name eth0 netns {}",
            pod.name
        ),
    );
    ip(&node.name, &format!("link set {host} up"));
    ip(
        &node.name,
        &format!("route add {ip_addr}/32 dev {host} proto 77"),
    );
    ip(&pod.name, &format!("addr add {ip_addr}/32 dev eth0"));
    ip(&pod.name, "link set eth0 up");
    ip(
        &pod.name,
        &format!("neigh add {GATEWAY} lladdr {HOST_MAC} dev eth0 nud permanent"),
    );
    ip(
        &pod.name,
        &format!("route add {GATEWAY}/32 dev eth0 scope link"),
    );
    ip(
        &pod.name,
        &format!("route add default via {GATEWAY} dev eth0"),
    );
    pod
}

/// `count` veths of local pods whose far ends idle in `sink`, each with its /32 route.
fn bulk_veths(node: &Ns, sink: &Ns, first: usize, count: usize, dir: &Path) {
    let mut batch = String::new();
    for i in 0..count {
        let host = host_ifname(first + i);
        batch.push_str(&format!(
            "link add {host} type veth peer name p{i} netns {}\nlink set {host} up\nroute add {}/32 dev {host} proto 77\n",
            sink.name,
            pod_ip(i, true)
        ));
    }
    let file = dir.join("veths.batch");
    std::fs::write(&file, batch).unwrap();
    sh(&["ip", "-n", &node.name, "-batch", file.to_str().unwrap()]);
}

/// Accepts and closes connections on `PORT` inside `netns` until dropped.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    netns: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = in_netns(&self.netns, || {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], PORT)),
                Duration::from_secs(1),
            )
        });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes one byte per connection on `PORT` inside `netns`, one connection at a time, until
/// dropped (the drop wakes `accept` with a connection of its own over the pod's loopback).
fn serve(netns: &str) -> Server {
    let stop = Arc::new(AtomicBool::new(false));
    let l = in_netns(netns, || TcpListener::bind(("0.0.0.0", PORT)).unwrap());
    let s = stop.clone();
    let thread = std::thread::spawn(move || {
        while !s.load(Ordering::Relaxed) {
            let Ok((mut c, _)) = l.accept() else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
            let mut byte = [0u8; 1];
            if c.read(&mut byte).is_ok_and(|n| n == 1) {
                let _ = c.write_all(&byte);
                // The client closes first (with a reset), so no TIME_WAIT piles up here.
                let _ = c.read(&mut byte);
            }
        }
    });
    Server {
        stop,
        thread: Some(thread),
        netns: netns.to_string(),
    }
}

/// From inside `client`: connect attempts to the server until one shows `open` (a connect that
/// succeeds) or not (one that times out), or `limit` passes. When the verdict showed: for
/// "open", the success; for "denied", the start of the attempt that timed out (the rule was in
/// force by then).
fn until_verdict(client: &str, open: bool, limit: Duration) -> Option<Instant> {
    in_netns(client, move || {
        let dst = SocketAddr::V4(SocketAddrV4::new(SERVER_IP, PORT));
        let timeout = Duration::from_millis(if open { 3 } else { 10 });
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let start = Instant::now();
            let ok = TcpStream::connect_timeout(&dst, timeout).is_ok();
            if ok == open {
                return Some(if open { Instant::now() } else { start });
            }
            if ok {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        None
    })
}

/// `samples` changes, each sent by `change(open)` once the previous verdict has held a while,
/// alternately admitting the client pod to the server pod (`open`) and not, starting from
/// "denied"; each timed from the send until a real connect from the client shows the new
/// verdict (see [`until_verdict`]). Returns (deny → allow, allow → deny).
fn enforcement_latency(
    client: &str,
    samples: usize,
    mut change: impl FnMut(bool),
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut opened, mut denied) = (Vec::new(), Vec::new());
    for s in 0..samples {
        let open = s % 2 == 0;
        // Settle: the previous verdict holds before the next change is sent.
        std::thread::sleep(Duration::from_millis(150));
        let sent = Instant::now();
        change(open);
        let seen = until_verdict(client, open, Duration::from_secs(30))
            .unwrap_or_else(|| panic!("sample {s}: the verdict never changed (open={open})"));
        let took = seen.saturating_duration_since(sent);
        if open {
            opened.push(took);
        } else {
            denied.push(took);
        }
    }
    (opened, denied)
}

/// Per-packet cost: the same flows from the client pod to the server pod (new connections a
/// second for 2 s, iperf3 for 3 s) with the cluster in its plain state and in its `loaded`
/// one, each put in force by `set(loaded)` (which returns once it is, and the agent's PID),
/// `rounds` times each, alternately. Each measurement waits for the agent to go idle first:
/// a pass still running (or a restarted agent's first programming) takes a core of the two
/// and would be measured as the rules' cost. Returns the medians, plain then loaded:
/// (connections/s, Gbit/s).
fn per_packet(
    client: &str,
    what: &str,
    rounds: usize,
    mut set: impl FnMut(bool) -> i32,
) -> [(f64, f64); 2] {
    let mut runs: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for _round in 0..rounds {
        for (loaded, (rates, gbps)) in [false, true].into_iter().zip(runs.iter_mut()) {
            let pid = set(loaded);
            assert!(
                until_verdict(client, true, Duration::from_secs(10)).is_some(),
                "the client is not admitted (loaded with {what}: {loaded})"
            );
            if let Err(busy) = until_idle(pid, Duration::from_secs(60)) {
                println!("  (the agent never went idle before this measurement: {busy})");
            }
            let (rate, failed) = conn_rate(client, 2.0);
            assert!(
                failed < 10,
                "{failed} connections failed (loaded with {what}: {loaded})"
            );
            rates.push(rate);
            gbps.push(iperf(client, SERVER_IP, 3, 1));
        }
    }
    runs.map(|(rates, gbps)| (median(&rates), median(&gbps)))
}

/// CPU time (user + system, clock ticks) process `pid` has used so far.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5): utime and stime; `rest` starts at field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Waits until the agent used under 5 % of a core over a whole second, at most `limit`;
/// the error says how busy it still was.
fn until_idle(pid: i32, limit: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut before = cpu_ticks(pid).ok_or("the agent's /proc/PID/stat is unreadable")?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_ticks(pid).ok_or("the agent's /proc/PID/stat is unreadable")?;
        // 100 ticks a second on Linux (USER_HZ): under 5 is under 5 %.
        if now.saturating_sub(before) < 5 {
            return Ok(());
        }
        if started.elapsed() >= limit {
            return Err(format!(
                "{} % of a core in the last second after {}",
                now.saturating_sub(before),
                ms(started.elapsed())
            ));
        }
        before = now;
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The agent in the node namespace, logging to `log`; killed by its guard.
struct Agent {
    pid: i32,
    _guard: Guard,
}

fn start_agent(args: &Args, node: &Ns, kubeconfig: &Path, dir: &Path, log: &Path) -> Agent {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &node.name])
        .arg(&args.sluice)
        .args(["agent", "--node-name", NODE, "--underlay-ip", UNDERLAY])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--subnet-file")
        .arg(dir.join("subnet.env"))
        .arg("--ipam-dir")
        .arg(dir.join("ipam"))
        .arg("--wireguard-key")
        .arg(dir.join("wireguard.key"))
        // `ip netns exec` shares the host's /etc: the CNI config goes to the run's directory.
        .arg("--cni-conf-dir")
        .arg(dir.join("net.d"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("starting the agent");
    let pid = i32::try_from(child.id()).unwrap();
    let guard = Guard::new(move || {
        let mut child = child;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    });
    Agent { pid, _guard: guard }
}

/// More allowed peer addresses for the per-packet comparison.
const PEERS: usize = 10_000;

/// One renderer's figures.
struct Row {
    backend: String,
    p50: Duration,
    p99: Duration,
    start: Duration,
    peak_rss: f64,
    rates: (f64, f64),
    gbps: (f64, f64),
    cnp: Option<CnpRow>,
}

/// One renderer's ClusterNetworkPolicy figures.
struct CnpRow {
    p50: Duration,
    p99: Duration,
    /// VmHWM after the samples, MiB.
    peak_rss: f64,
    /// (none in force, all in force).
    rates: (f64, f64),
    gbps: (f64, f64),
}

/// Section 5 of the module's notes, with the agent running and no ClusterNetworkPolicy yet.
/// The ClusterNetworkPolicies are made and deleted with the agent stopped, and it is started
/// again (`start`), so that it takes them in one pass: with the agent running, 100 arriving at
/// once land a few to a pass, each pass rewriting every local pod's tier rules, which takes
/// minutes at this scale. Returns the figures and the agent now running.
fn cnp_figures(
    api: SocketAddr,
    client: &str,
    args: &Args,
    agent: Agent,
    start: &dyn Fn() -> Agent,
) -> (CnpRow, Agent) {
    let (count, apps) = (args.cnps, args.policies);
    let probe = format!("{CNPS}/{PROBE_CNP}");
    let set_probe = |action: &str, port: u16| {
        merge_patch(
            api,
            &probe,
            &json!({"spec": {"ingress": probe_cnp_ingress(action, port)}}),
        );
    };
    // Per-packet cost: the client admitted by the NetworkPolicy on the echo and iperf3 ports;
    // the probe ClusterNetworkPolicy admits it on the marker port, which so says whether the
    // ClusterNetworkPolicies are in force (the probe one is made last and deleted last).
    merge_patch(
        api,
        PROBE_POLICY,
        &json!({"spec": {"ingress": probe_peers(0)}}),
    );
    let mut agent = Some(agent);
    let [(rate0, gbps0), (rate_n, gbps_n)] = per_packet(
        client,
        "ClusterNetworkPolicies",
        args.packet_rounds,
        |loaded| {
            let made = http(api, "GET", &probe, "application/json", "").0 == 200;
            if !loaded && !made {
                // The first round: none yet, the agent as it runs.
                return agent.as_ref().map_or(0, |a| a.pid);
            }
            drop(agent.take());
            if loaded {
                create_cnps(api, count, apps, probe_cnp_ingress("Accept", MARKER));
            } else {
                delete_cnps(api, count);
            }
            let started = Instant::now();
            agent = Some(start());
            assert!(
                until_marker(client, loaded, Duration::from_secs(180)),
                "the {count} ClusterNetworkPolicies never came into force (or out of it: {loaded})"
            );
            println!(
                "agent restarted with {} ClusterNetworkPolicies: in force {} after its start",
                if loaded { count } else { 0 },
                ms(started.elapsed())
            );
            agent.as_ref().map_or(0, |a| a.pid)
        },
    );
    let agent = agent.take().expect("per_packet leaves an agent running");
    println!(
        "per packet, {:<27} {rate0:>8.0} new connections/s  {gbps0:>6.2} Gbit/s",
        "no ClusterNetworkPolicy:"
    );
    println!(
        "per packet, {:<27} {rate_n:>8.0} new connections/s  {gbps_n:>6.2} Gbit/s   ratio {:.3} / {:.3}",
        format!("{count} ClusterNetworkPolicies:"),
        rate_n / rate0,
        gbps_n / gbps0
    );
    // Latency, all of them in force: the NetworkPolicy denies the client all along, the
    // Admin tier decides.
    merge_patch(
        api,
        PROBE_POLICY,
        &json!({"spec": {"ingress": probe_ingress(false)}}),
    );
    set_probe("Deny", PORT);
    assert!(
        until_verdict(client, false, Duration::from_secs(30)).is_some(),
        "the probe NetworkPolicy's deny never came into force"
    );
    // The agent's pass for the Deny may still be running: let it end.
    std::thread::sleep(Duration::from_secs(3));
    let (opened, denied) = enforcement_latency(client, args.samples, |open| {
        set_probe(if open { "Accept" } else { "Deny" }, PORT);
    });
    let mut all: Vec<Duration> = opened.iter().chain(&denied).copied().collect();
    println!(
        "{}",
        summary("ClusterNetworkPolicy change → enforced (all)", all.clone())
    );
    println!("{}", summary("  Deny → Accept", opened));
    println!("{}", summary("  Accept → Deny", denied));
    let (rss, hwm) = rss_mib(agent.pid);
    println!(
        "agent memory with {count} ClusterNetworkPolicies: VmRSS {rss:.1} MiB, VmHWM {hwm:.1} MiB"
    );
    all.sort();
    let row = CnpRow {
        p50: pct(&all, 50.0),
        p99: pct(&all, 99.0),
        peak_rss: hwm,
        rates: (rate0, rate_n),
        gbps: (gbps0, gbps_n),
    };
    (row, agent)
}

fn summary(label: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    if v.is_empty() {
        return format!("{label}: no sample");
    }
    format!(
        "{label}: p50 {}  p99 {}  max {}  (n={})",
        ms(pct(&v, 50.0)),
        ms(pct(&v, 99.0)),
        ms(*v.last().unwrap()),
        v.len()
    )
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "bench-policy needs root (it makes network namespaces)"
    );
    cleanup_on_signals();
    let args = parse_args();
    let backends: Vec<&str> = match args.only.as_deref() {
        None => vec!["nftables", "iptables"],
        Some(b) => vec![b],
    };
    println!("# bench-policy");
    println!(
        "{} local pods (2 real), {} pods in the cluster, {} policies, {} ClusterNetworkPolicies; {} latency samples per renderer; sluice {}",
        args.local_pods,
        args.cluster_pods,
        args.policies,
        args.cnps,
        args.samples,
        args.sluice.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let node = Ns::new("bpn");
    let sink = Ns::new("bps");
    sysctl(&node.name, "net.ipv4.ip_forward=1");
    ip(
        &node.name,
        &format!("link add ul0 type veth peer name ul0 netns {}", sink.name),
    );
    ip(&node.name, &format!("addr add {UNDERLAY}/24 dev ul0"));
    ip(&node.name, "link set ul0 up");
    ip(&sink.name, "link set ul0 up");
    let client = real_pod(&node, 0, CLIENT_IP);
    let server = real_pod(&node, 1, SERVER_IP);
    let _server = serve(&server.name);
    let _iperf = iperf_server(&server.name);
    // Connections end with a reset; their conntrack entries need not outlive the run.
    let _ = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node.name,
            "sysctl",
            "-qw",
            "net.netfilter.nf_conntrack_tcp_timeout_close=1",
        ])
        .output();
    let started = Instant::now();
    bulk_veths(&node, &sink, 2, args.local_pods - 2, dir.path());
    println!(
        "node: {} veths with their routes made in {:.1} s",
        args.local_pods,
        started.elapsed().as_secs_f64()
    );

    let api = api_server(&node.name);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        sluice_apiserver::kubeconfig(&format!("http://{api}"), "bench"),
    )
    .unwrap();
    // kube-system (and default) come with the server; the agent's subnet lease lives in
    // sluice-system, which the manifest makes on a real cluster.
    for ns in ["bench", "probe", sluice_net::lease::LEASE_NAMESPACE] {
        namespace(api, ns);
    }
    create(
        api,
        "/api/v1/namespaces/kube-system/configmaps",
        &config(backends[0]),
    );
    create(
        api,
        "/api/v1/nodes",
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}}),
    );
    merge_patch(
        api,
        &format!("/api/v1/nodes/{NODE}/status"),
        &json!({"status": {"addresses": [{"type": "InternalIP", "address": UNDERLAY}]}}),
    );
    let started = Instant::now();
    pod(
        api,
        "probe",
        "client",
        NODE,
        json!({"role": "client"}),
        CLIENT_IP,
    );
    pod(
        api,
        "probe",
        "server",
        NODE,
        json!({"role": "server"}),
        SERVER_IP,
    );
    let apps = args.policies;
    for i in 0..args.cluster_pods - 2 {
        let local = i < args.local_pods - 2;
        let (node_name, index) = if local {
            (NODE.to_string(), i)
        } else {
            (format!("remote-{}", i % 50), i - (args.local_pods - 2))
        };
        pod(
            api,
            "bench",
            &format!("b{i}"),
            &node_name,
            json!({"app": format!("a{}", i % apps)}),
            pod_ip(index, local),
        );
    }
    for i in 0..args.policies {
        create(
            api,
            "/apis/networking.k8s.io/v1/namespaces/bench/networkpolicies",
            &bulk_policy(i, apps),
        );
    }
    create(
        api,
        "/apis/networking.k8s.io/v1/namespaces/probe/networkpolicies",
        &json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "probe", "namespace": "probe"},
                "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                         "policyTypes": ["Ingress"], "ingress": probe_ingress(false)}}),
    );
    println!(
        "API: {} pods and {} policies made in {:.1} s",
        args.cluster_pods,
        args.policies + 1,
        started.elapsed().as_secs_f64()
    );

    // The agent's own account (pass times, rule counts) goes with the figures, and outlives a
    // failed run.
    let log = std::env::temp_dir().join("bench-policy-agent.log");
    let _ = std::fs::remove_file(&log);
    let mut rows = Vec::new();
    for (round, backend) in backends.iter().enumerate() {
        if round > 0 {
            merge_patch(
                api,
                "/api/v1/namespaces/kube-system/configmaps/sluice-config",
                &json!({"data": {"policy-backend": backend}}),
            );
        }
        println!("\n## {backend}");
        let t0 = Instant::now();
        let start = || start_agent(&args, &node, &kubeconfig, dir.path(), &log);
        let agent = start();
        let Some(first) = until_verdict(&client.name, false, Duration::from_secs(180)) else {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            panic!(
                "the agent never put policy in force; its log ends:\n{}",
                tail.lines().rev().take(30).collect::<Vec<_>>().join("\n")
            );
        };
        let programmed = first - t0;
        println!(
            "start: agent process to the first probe denied by its policy: {}",
            ms(programmed)
        );
        let (rss, hwm) = rss_mib(agent.pid);
        println!("agent memory after programming: VmRSS {rss:.1} MiB, VmHWM {hwm:.1} MiB");
        let (opened, denied) = enforcement_latency(&client.name, args.samples, |open| {
            merge_patch(
                api,
                PROBE_POLICY,
                &json!({"spec": {"ingress": probe_ingress(open)}}),
            );
        });
        let all: Vec<Duration> = opened.iter().chain(&denied).copied().collect();
        let (rss_after, hwm_after) = rss_mib(agent.pid);
        println!("{}", summary("change → enforced (all)", all.clone()));
        println!("{}", summary("  deny → allow", opened));
        println!("{}", summary("  allow → deny", denied));
        println!(
            "agent memory after the samples: VmRSS {rss_after:.1} MiB, VmHWM {hwm_after:.1} MiB"
        );
        // Per-packet cost: the same flows with 0 and with `PEERS` more allowed peers in force.
        let [(rate0, gbps0), (rate_n, gbps_n)] =
            per_packet(&client.name, "10k more peers", args.packet_rounds, |many| {
                let extra = if many { PEERS } else { 0 };
                merge_patch(
                    api,
                    PROBE_POLICY,
                    &json!({"spec": {"ingress": probe_peers(extra)}}),
                );
                assert!(
                    until_marker(&client.name, many, Duration::from_secs(60)),
                    "the policy with {extra} more peers never came into force"
                );
                agent.pid
            });
        println!(
            "per packet, 0 more peers:      {rate0:>8.0} new connections/s  {gbps0:>6.2} Gbit/s"
        );
        println!(
            "per packet, {PEERS} more peers: {rate_n:>8.0} new connections/s  {gbps_n:>6.2} Gbit/s   ratio {:.3} / {:.3}",
            rate_n / rate0,
            gbps_n / gbps0
        );
        let (cnp, agent) = if args.cnps > 0 {
            let (row, agent) = cnp_figures(api, &client.name, &args, agent, &start);
            (Some(row), agent)
        } else {
            (None, agent)
        };
        merge_patch(
            api,
            PROBE_POLICY,
            &json!({"spec": {"ingress": probe_ingress(false)}}),
        );
        let mut sorted = all;
        sorted.sort();
        rows.push(Row {
            backend: backend.to_string(),
            p50: pct(&sorted, 50.0),
            p99: pct(&sorted, 99.0),
            start: programmed,
            peak_rss: hwm.max(hwm_after),
            rates: (rate0, rate_n),
            gbps: (gbps0, gbps_n),
            cnp,
        });
        drop(agent);
        // The next renderer starts as this one did: no ClusterNetworkPolicy (deleted with no
        // agent running, see `cnp_figures`).
        if args.cnps > 0 {
            delete_cnps(api, args.cnps);
        }
        // The next renderer starts from no rules at all, so that its start is measured whole
        // (a real switch keeps these in force until the new ones are in).
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &node.name, "nft", "delete", "table", "inet",
            ])
            .arg("sluice-policy")
            .output();
    }

    println!(
        "\n## Summary (anchors: enforcement p99 under 100 ms; agent memory under 100 MiB; at {PEERS} peers at least 0.9 of the rate at 0)"
    );
    println!(
        "{:<10} {:>10} {:>10} {:>15} {:>10}   {:>22}   {:>18}",
        "renderer",
        "p50",
        "p99",
        "start→in force",
        "peak RSS",
        "conn/s 0 → 10k (ratio)",
        "Gbit/s 0 → 10k (ratio)"
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    for r in &rows {
        let (rr, gr) = (r.rates.1 / r.rates.0, r.gbps.1 / r.gbps.0);
        println!(
            "{:<10} {:>10} {:>10} {:>15} {:>6.1} MiB   {:>6.0} → {:>6.0} ({rr:.3})   {:>5.2} → {:>5.2} ({gr:.3})",
            r.backend,
            ms(r.p50),
            ms(r.p99),
            ms(r.start),
            r.peak_rss,
            r.rates.0,
            r.rates.1,
            r.gbps.0,
            r.gbps.1,
        );
        println!(
            "{:<10} latency {}, memory {}, connection rate {}, throughput {}",
            "",
            verdict(r.p99 < Duration::from_millis(100)),
            verdict(r.peak_rss < 100.0),
            verdict(rr >= 0.9),
            verdict(gr >= 0.9),
        );
    }
    if args.cnps > 0 {
        let n = args.cnps;
        println!(
            "\nClusterNetworkPolicy, {n} in force on top of the above (anchors: change → enforced p99 under 100 ms; with {n} at least 0.9 of the rate with none)"
        );
        println!(
            "{:<10} {:>10} {:>10} {:>10}   {:>24}   {:>22}",
            "renderer",
            "p50",
            "p99",
            "peak RSS",
            format!("conn/s 0 → {n} (ratio)"),
            format!("Gbit/s 0 → {n} (ratio)")
        );
        for r in &rows {
            let Some(c) = &r.cnp else { continue };
            let (rr, gr) = (c.rates.1 / c.rates.0, c.gbps.1 / c.gbps.0);
            println!(
                "{:<10} {:>10} {:>10} {:>6.1} MiB   {:>6.0} → {:>6.0} ({rr:.3})     {:>5.2} → {:>5.2} ({gr:.3})",
                r.backend,
                ms(c.p50),
                ms(c.p99),
                c.peak_rss,
                c.rates.0,
                c.rates.1,
                c.gbps.0,
                c.gbps.1,
            );
            println!(
                "{:<10} latency {}, connection rate {}, throughput {}",
                "",
                verdict(c.p99 < Duration::from_millis(100)),
                verdict(rr >= 0.9),
                verdict(gr >= 0.9),
            );
        }
    }
    println!("\nthe agent's log: {}", log.display());
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_policy::cnp::{Action, ClusterNetworkPolicy, Peer, Tier};
    use sluice_policy::selector::{matches, Labels};
    use std::collections::BTreeSet;

    fn decode(v: Value) -> ClusterNetworkPolicy {
        serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"))
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn one_field(p: &Peer) -> bool {
        [
            p.namespaces.is_some(),
            p.pods.is_some(),
            p.networks.is_some(),
            p.nodes.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count()
            == 1
    }

    /// Whether `p` (a pods or namespaces peer) takes in a pod of namespace `ns` with `pod`'s
    /// labels.
    fn peer_takes(p: &Peer, ns: &str, pod: &Labels) -> bool {
        let ns_labels = labels(&[("kubernetes.io/metadata.name", ns), ("bench", ns)]);
        match (&p.namespaces, &p.pods) {
            (Some(n), _) => matches(n, &ns_labels),
            (_, Some(pp)) => {
                matches(&pp.namespace_selector, &ns_labels) && matches(&pp.pod_selector, pod)
            }
            _ => false,
        }
    }

    /// The bulk mix decodes as the agent decodes it, within the API's bounds, and is the mix
    /// the notes promise.
    #[test]
    fn bulk_cnps_are_valid_and_mixed() {
        let cnps: Vec<ClusterNetworkPolicy> = (0..99).map(|i| decode(bulk_cnp(i, 1_000))).collect();
        let names: BTreeSet<&str> = cnps.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), 99, "names are unique");
        assert!(!names.contains(PROBE_CNP));
        let (mut tiers, mut priorities, mut actions) =
            (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        let (mut ns_subjects, mut pod_subjects, mut all_ns) = (0, 0, 0);
        let (mut numbers, mut ranges, mut named, mut networks, mut nodes) = (0, 0, 0, 0, 0);
        for c in &cnps {
            let s = &c.spec;
            tiers.insert(s.tier);
            priorities.insert(s.priority);
            assert!((0..=1000).contains(&s.priority), "{}", c.name());
            assert_ne!(
                s.subject.namespaces.is_some(),
                s.subject.pods.is_some(),
                "{}: exactly one subject",
                c.name()
            );
            if let Some(n) = &s.subject.namespaces {
                ns_subjects += 1;
                all_ns += usize::from(n.match_labels.is_none() && n.match_expressions.is_none());
            } else {
                pod_subjects += 1;
            }
            assert!(!s.ingress.is_empty());
            for r in &s.ingress {
                actions.insert(r.action);
                assert!(!(s.tier == Tier::Baseline && r.action == Action::Pass));
                assert!(!r.from.is_empty() && r.from.iter().all(one_field));
                assert!(r
                    .from
                    .iter()
                    .all(|p| p.networks.is_none() && p.nodes.is_none()));
                for p in r.protocols.iter().flatten() {
                    let dest = p.tcp.as_ref().or(p.udp.as_ref());
                    named += usize::from(p.destination_named_port.is_some());
                    match dest.and_then(|d| d.destination_port.as_ref()) {
                        Some(port) if port.number.is_some() => numbers += 1,
                        Some(port) => {
                            let r = port.range.as_ref().unwrap();
                            assert!(r.start <= r.end);
                            ranges += 1;
                        }
                        None => assert!(p.destination_named_port.is_some()),
                    }
                }
            }
            for r in &s.egress {
                actions.insert(r.action);
                assert!(!(s.tier == Tier::Baseline && r.action == Action::Pass));
                assert!(!r.to.is_empty() && r.to.iter().all(one_field));
                networks += r.to.iter().filter(|p| p.networks.is_some()).count();
                nodes += r.to.iter().filter(|p| p.nodes.is_some()).count();
            }
        }
        assert_eq!(tiers.len(), 2, "both tiers");
        assert!(priorities.len() >= 10, "several priorities: {priorities:?}");
        assert!(priorities.len() < 99, "some equal priorities");
        assert_eq!(actions.len(), 3, "Accept, Deny and Pass");
        assert!(ns_subjects > 0 && pod_subjects > 0);
        assert_eq!(all_ns, 10, "a tenth select every namespace");
        assert!(numbers > 0 && ranges > 0 && named > 0 && networks > 0 && nodes > 0);
    }

    /// No bulk rule takes in the probe pods (by selector or address): the real pods' traffic
    /// is decided by NetworkPolicy and the probe ClusterNetworkPolicy alone, so the per-packet
    /// comparison and the latency samples measure what they say.
    #[test]
    fn bulk_cnps_leave_the_probe_pods_alone() {
        let client = labels(&[("role", "client")]);
        let server = labels(&[("role", "server")]);
        let mut selecting_probe = 0;
        for i in 0..99 {
            let c = decode(bulk_cnp(i, 1_000));
            let subject_probe = match (&c.spec.subject.namespaces, &c.spec.subject.pods) {
                (Some(n), _) => matches(n, &labels(&[("kubernetes.io/metadata.name", "probe")])),
                (_, Some(p)) => peer_takes(
                    &Peer {
                        pods: Some(p.clone()),
                        ..Default::default()
                    },
                    "probe",
                    &server,
                ),
                _ => false,
            };
            selecting_probe += usize::from(subject_probe);
            for r in &c.spec.ingress {
                for p in &r.from {
                    assert!(!peer_takes(p, "probe", &client), "{}: {p:?}", c.name());
                }
            }
            for r in &c.spec.egress {
                for p in &r.to {
                    assert!(!peer_takes(p, "probe", &server), "{}: {p:?}", c.name());
                    for n in p.networks.iter().flatten() {
                        let net: ipnet::Ipv4Net = n.parse().unwrap();
                        assert!(
                            !net.contains(&SERVER_IP) && !net.contains(&CLIENT_IP),
                            "{n}"
                        );
                    }
                }
            }
        }
        assert_eq!(
            selecting_probe, 10,
            "the every-namespace ones put the probe pods in the tiers"
        );
    }

    /// The probe ClusterNetworkPolicy decodes, selects the server pod only, and admits or
    /// denies the client pod on the port asked.
    #[test]
    fn probe_cnp_selects_the_server_and_names_the_client() {
        for (action, want) in [("Accept", Action::Accept), ("Deny", Action::Deny)] {
            let c = decode(probe_cnp(probe_cnp_ingress(action, MARKER)));
            assert_eq!(c.name(), PROBE_CNP);
            assert_eq!(c.spec.tier, Tier::Admin);
            let subject = Peer {
                pods: c.spec.subject.pods.clone(),
                ..Default::default()
            };
            assert!(peer_takes(
                &subject,
                "probe",
                &labels(&[("role", "server")])
            ));
            assert!(!peer_takes(
                &subject,
                "probe",
                &labels(&[("role", "client")])
            ));
            assert!(!peer_takes(
                &subject,
                "bench",
                &labels(&[("role", "server")])
            ));
            let rule = &c.spec.ingress[0];
            assert_eq!(rule.action, want);
            assert!(peer_takes(
                &rule.from[0],
                "probe",
                &labels(&[("role", "client")])
            ));
            let port = rule.protocols.as_ref().unwrap()[0].tcp.as_ref().unwrap();
            assert_eq!(
                port.destination_port.as_ref().unwrap().number,
                Some(i32::from(MARKER))
            );
        }
    }
}
