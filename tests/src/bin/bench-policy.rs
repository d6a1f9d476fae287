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
//!
//! Everything it makes (namespaces, the agent) is removed on every exit path; traffic stays
//! inside namespaces made here; every wait is bounded.
//!
//! Usage: bench-policy [--sluice PATH] [--local-pods N] [--cluster-pods M] [--policies P]
//!                     [--samples K] [--only nftables|iptables]

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
    samples: usize,
    only: Option<String>,
}

const USAGE: &str = "\
usage: bench-policy [--sluice PATH] [--local-pods N] [--cluster-pods M] [--policies P]
                    [--samples K] [--only nftables|iptables]";

fn parse_args() -> Args {
    let mut a = Args {
        sluice: sluice_e2e::sluice_bin(),
        local_pods: 1_000,
        cluster_pods: 10_000,
        policies: 1_000,
        samples: 40,
        only: None,
    };
    let mut flags = Flags::from_env("bench-policy", USAGE);
    while let Some((flag, value)) = flags.next_pair() {
        match flag.as_str() {
            "--sluice" => a.sluice = PathBuf::from(value),
            "--local-pods" => a.local_pods = flags.number(&flag, &value),
            "--cluster-pods" => a.cluster_pods = flags.number(&flag, &value),
            "--policies" => a.policies = flags.number(&flag, &value),
            "--samples" => a.samples = flags.number(&flag, &value),
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
    flags.require((2..=1_000).contains(&a.samples), "--samples in 2..=1000");
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
        "{} local pods (2 real), {} pods in the cluster, {} policies; {} latency samples per renderer; sluice {}",
        args.local_pods,
        args.cluster_pods,
        args.policies,
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
    // kube-system (and default) come with the server.
    for ns in ["bench", "probe"] {
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

    let log = dir.path().join("agent.log");
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
        let agent = start_agent(&args, &node, &kubeconfig, dir.path(), &log);
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
        let (mut opened, mut denied) = (Vec::new(), Vec::new());
        for s in 0..args.samples {
            let open = s % 2 == 0;
            // Settle: the previous verdict holds before the next change is sent.
            std::thread::sleep(Duration::from_millis(150));
            let sent = Instant::now();
            merge_patch(
                api,
                PROBE_POLICY,
                &json!({"spec": {"ingress": probe_ingress(open)}}),
            );
            let seen = until_verdict(&client.name, open, Duration::from_secs(10))
                .unwrap_or_else(|| panic!("sample {s}: the verdict never changed (open={open})"));
            let took = seen.saturating_duration_since(sent);
            if open {
                opened.push(took);
            } else {
                denied.push(took);
            }
        }
        let all: Vec<Duration> = opened.iter().chain(&denied).copied().collect();
        let (rss_after, hwm_after) = rss_mib(agent.pid);
        println!("{}", summary("change → enforced (all)", all.clone()));
        println!("{}", summary("  deny → allow", opened));
        println!("{}", summary("  allow → deny", denied));
        println!(
            "agent memory after the samples: VmRSS {rss_after:.1} MiB, VmHWM {hwm_after:.1} MiB"
        );
        // Per-packet cost: the same flows with 0 and with `PEERS` more allowed peers in force.
        let mut per_peers: Vec<(usize, Vec<f64>, Vec<f64>)> =
            vec![(0, Vec::new(), Vec::new()), (PEERS, Vec::new(), Vec::new())];
        for _round in 0..2 {
            for entry in per_peers.iter_mut() {
                let extra = entry.0;
                merge_patch(
                    api,
                    PROBE_POLICY,
                    &json!({"spec": {"ingress": probe_peers(extra)}}),
                );
                assert!(
                    until_marker(&client.name, extra > 0, Duration::from_secs(60)),
                    "the policy with {extra} more peers never came into force"
                );
                assert!(
                    until_verdict(&client.name, true, Duration::from_secs(10)).is_some(),
                    "the client is not admitted"
                );
                std::thread::sleep(Duration::from_millis(300));
                let (rate, failed) = conn_rate(&client.name, 2.0);
                assert!(failed < 10, "{failed} connections failed at {extra} peers");
                entry.1.push(rate);
                entry.2.push(iperf(&client.name, SERVER_IP, 3, 1));
            }
        }
        let med = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (rate0, gbps0) = (med(&per_peers[0].1), med(&per_peers[0].2));
        let (rate_n, gbps_n) = (med(&per_peers[1].1), med(&per_peers[1].2));
        println!(
            "per packet, 0 more peers:      {rate0:>8.0} new connections/s  {gbps0:>6.2} Gbit/s"
        );
        println!(
            "per packet, {PEERS} more peers: {rate_n:>8.0} new connections/s  {gbps_n:>6.2} Gbit/s   ratio {:.3} / {:.3}",
            rate_n / rate0,
            gbps_n / gbps0
        );
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
        });
        drop(agent);
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
    for r in rows {
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
    // The agent's own account (pass times, rule counts) goes with the figures.
    let kept = std::env::temp_dir().join("bench-policy-agent.log");
    if std::fs::copy(&log, &kept).is_ok() {
        println!("\nthe agent's log: {}", kept.display());
    }
    let _ = std::io::stdout().flush();
}
