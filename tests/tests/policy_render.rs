//! sluice-policy's renderers on real packets: a node namespace routing to pod namespaces over
//! veths named like sluice's (`sl` + 13 hex digits, /32 routes, the gateway as a static
//! neighbour), policies compiled by `sluice_policy::compile`, applied with `NftCli` and with
//! `IptablesRestore`, and the reachability matrix measured by TCP and UDP connects. Both
//! renderers must give the expected matrix (so the same one), a fourth veth the IR does not
//! know must drop (fail closed), the node must reach every pod (probes), rules of others
//! (`inet othertable`, an iptables chain `OTHER`) must survive every apply, and an established
//! connection must stop passing once a policy denies it (conntrack flush).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use sluice_e2e::lab::in_netns;
use sluice_e2e::{have_root, sh, Netns};
use sluice_policy::cnp::ClusterNetworkPolicy;
use sluice_policy::k8s_openapi::api::core::v1::{Namespace, Pod};
use sluice_policy::k8s_openapi::api::networking::v1::NetworkPolicy;
use sluice_policy::{
    compile, ClusterPod, ConntrackCli, Exec, Firewall, IptablesMode, IptablesRestore, LocalPod,
    NftCli, PolicyInput, PolicyIr,
};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";
const GATEWAY: &str = "169.254.1.1";
const NODE_IP: &str = "192.0.2.1";
const TIMEOUT: Duration = Duration::from_millis(800);

/// (k8s namespace, pod name, app label, address, host veth); the last one is never told to the
/// compiler: an unknown pod.
const PODS: [(&str, &str, &str, &str, &str); 4] = [
    ("x", "a", "a", "10.244.1.1", "sl00000000000a1"),
    ("x", "b", "b", "10.244.1.2", "sl00000000000b2"),
    ("y", "c", "c", "10.244.1.3", "sl00000000000c3"),
    ("x", "d", "d", "10.244.1.4", "sl00000000000d4"),
];
const KNOWN: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

/// One measurement: from, to, protocol, port, answered.
type Probe = (String, String, Proto, u16, bool);

const PORTS: [(Proto, u16); 3] = [(Proto::Tcp, 80), (Proto::Tcp, 81), (Proto::Udp, 53)];

struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Echo servers on every port of `PORTS` inside `netns`, until dropped.
fn serve(netns: &str) -> Servers {
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for (proto, port) in PORTS {
        let stop = stop.clone();
        match proto {
            Proto::Tcp => {
                let l = in_netns(netns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
                l.set_nonblocking(true).unwrap();
                threads.push(std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match l.accept() {
                            Ok((mut s, _)) => {
                                s.set_nonblocking(false).unwrap();
                                std::thread::spawn(move || {
                                    let mut buf = [0u8; 64];
                                    while let Ok(n) = s.read(&mut buf) {
                                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                                            break;
                                        }
                                    }
                                });
                            }
                            Err(_) => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                }));
            }
            Proto::Udp => {
                let u = in_netns(netns, move || UdpSocket::bind(("0.0.0.0", port)).unwrap());
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, peer)) = u.recv_from(&mut buf) {
                            let _ = u.send_to(&buf[..n], peer);
                        }
                    }
                }));
            }
        }
    }
    Servers { stop, threads }
}

/// Whether a connection from `netns` to `dst` got an answer within [`TIMEOUT`].
fn probe(netns: &str, dst: Ipv4Addr, proto: Proto, port: u16) -> bool {
    let to = SocketAddr::from((dst, port));
    in_netns(netns, move || match proto {
        Proto::Tcp => TcpStream::connect_timeout(&to, TIMEOUT).is_ok(),
        Proto::Udp => {
            let u = UdpSocket::bind("0.0.0.0:0").unwrap();
            u.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut buf = [0u8; 8];
            u.send_to(b"ping", to).is_ok() && u.recv_from(&mut buf).is_ok()
        }
    })
}

/// A node namespace and its pod namespaces, wired as sluice-cni wires them.
struct Node {
    pods: Vec<Netns>,
    _servers: Vec<Servers>,
    node: Netns,
}

impl Node {
    fn new() -> Self {
        let node = Netns::new("pn");
        node.sysctl("net.ipv4.ip_forward", "1");
        node.ip(&["addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"]);
        let mut pods = Vec::new();
        for (_, _, _, ip, ifname) in PODS {
            let pod = Netns::new("pp");
            node.ip(&[
                "link", "add", ifname, "address", HOST_MAC, "type", "veth", "peer", "name", "eth0",
                "netns", &pod.name,
            ]);
            node.ip(&["link", "set", ifname, "up"]);
            node.ip(&[
                "route",
                "add",
                &format!("{ip}/32"),
                "dev",
                ifname,
                "proto",
                "77",
            ]);
            pod.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&[
                "neigh",
                "add",
                GATEWAY,
                "lladdr",
                HOST_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ]);
            pod.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"]);
            pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"]);
            pods.push(pod);
        }
        let servers = pods.iter().map(|p| serve(&p.name)).collect();
        Self {
            pods,
            _servers: servers,
            node,
        }
    }

    fn exec(&self) -> Exec {
        Exec::in_netns(&self.node.name)
    }

    /// Every probe: each pod to each other pod on each port, and the node to each pod on TCP 80.
    fn matrix(&self) -> Vec<Probe> {
        let mut jobs = Vec::new();
        for (i, src) in PODS.iter().enumerate() {
            for (j, dst) in PODS.iter().enumerate() {
                if i == j {
                    continue;
                }
                for (proto, port) in PORTS {
                    jobs.push((
                        self.pods[i].name.clone(),
                        format!("{}/{}", src.0, src.1),
                        dst,
                        proto,
                        port,
                    ));
                }
            }
        }
        for dst in &PODS {
            jobs.push((self.node.name.clone(), "node".into(), dst, Proto::Tcp, 80));
        }
        let handles: Vec<_> = jobs
            .into_iter()
            .map(|(netns, from, dst, proto, port)| {
                let to = format!("{}/{}", dst.0, dst.1);
                let ip: Ipv4Addr = dst.3.parse().unwrap();
                std::thread::spawn(move || (from, to, proto, port, probe(&netns, ip, proto, port)))
            })
            .collect();
        let mut out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        out.sort();
        out
    }

    fn assert_others_survive(&self, what: &str) {
        let nft = sh(&[
            "ip",
            "netns",
            "exec",
            &self.node.name,
            "nft",
            "list",
            "table",
            "inet",
            "othertable",
        ]);
        assert!(
            nft.contains("counter"),
            "{what}: othertable lost its rule: {nft}"
        );
        let save = sh(&[
            "ip",
            "netns",
            "exec",
            &self.node.name,
            "iptables-save",
            "-t",
            "filter",
        ]);
        assert!(
            save.contains(":OTHER")
                && save.contains("-A FORWARD -j OTHER")
                && save.contains("-A OTHER -j RETURN"),
            "{what}: the OTHER chain was touched: {save}"
        );
    }

    fn add_others(&self) {
        let n = &self.node.name;
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "nft",
            "add",
            "table",
            "inet",
            "othertable",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "nft",
            "add",
            "chain",
            "inet",
            "othertable",
            "c",
            "{ type filter hook forward priority 10; policy accept; }",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "nft",
            "add",
            "rule",
            "inet",
            "othertable",
            "c",
            "counter",
        ]);
        sh(&["ip", "netns", "exec", n, "iptables", "-w", "-N", "OTHER"]);
        sh(&[
            "ip", "netns", "exec", n, "iptables", "-w", "-A", "OTHER", "-j", "RETURN",
        ]);
        sh(&[
            "ip", "netns", "exec", n, "iptables", "-w", "-A", "FORWARD", "-j", "OTHER",
        ]);
    }
}

fn cluster() -> (Vec<Pod>, Vec<Namespace>, Vec<LocalPod>) {
    let mut pods = Vec::new();
    let mut local = Vec::new();
    for (i, (ns, name, app, ip, ifname)) in PODS.iter().enumerate() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 80},
                {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": ip}
        }))
        .unwrap();
        if i < KNOWN {
            local.push(LocalPod::from_pod(&ClusterPod::from(&pod), ifname).unwrap());
        }
        pods.push(pod);
    }
    let namespaces = ["x", "y"]
        .iter()
        .map(|n| {
            serde_json::from_value(json!({"metadata": {"name": n, "labels": {"team": n}}})).unwrap()
        })
        .collect();
    (pods, namespaces, local)
}

fn ir_for(policies: &[Value]) -> PolicyIr {
    ir_with_tiers(policies, &[])
}

/// With ClusterNetworkPolicies (`policy.networking.k8s.io/v1alpha2`) too.
fn ir_with_tiers(policies: &[Value], cnps: &[Value]) -> PolicyIr {
    let cnps: Vec<ClusterNetworkPolicy> = cnps
        .iter()
        .map(|p| serde_json::from_value(p.clone()).unwrap())
        .collect();
    let cnps: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
    let (pods, namespaces, local) = cluster();
    let policies: Vec<NetworkPolicy> = policies
        .iter()
        .map(|p| serde_json::from_value(p.clone()).unwrap())
        .collect();
    let host = [NODE_IP.parse().unwrap()];
    let pods: Vec<std::sync::Arc<ClusterPod>> = pods
        .iter()
        .map(|p| std::sync::Arc::new(ClusterPod::from(p)))
        .collect();
    let namespaces: Vec<&Namespace> = namespaces.iter().collect();
    let policies: Vec<&NetworkPolicy> = policies.iter().collect();
    let input = PolicyInput {
        pods: &pods,
        namespaces: &namespaces,
        policies: &policies,
        host_addrs: &host,
        cluster_policies: &cnps,
        ..Default::default()
    };
    compile(&input, &local)
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": ns, "name": name}, "spec": spec})
}

/// The cases: a name, the policies, and the pairs (`from>to:port`, ports as `t80`, `t81`,
/// `u53`) that must pass besides the always-true ones (the node to any pod).
fn cases() -> Vec<(&'static str, Vec<Value>, Vec<&'static str>)> {
    let known_open = vec![
        "x/a>x/b:t80",
        "x/a>x/b:t81",
        "x/a>x/b:u53",
        "x/a>y/c:t80",
        "x/a>y/c:t81",
        "x/a>y/c:u53",
        "x/b>x/a:t80",
        "x/b>x/a:t81",
        "x/b>x/a:u53",
        "x/b>y/c:t80",
        "x/b>y/c:t81",
        "x/b>y/c:u53",
        "y/c>x/a:t80",
        "y/c>x/a:t81",
        "y/c>x/a:u53",
        "y/c>x/b:t80",
        "y/c>x/b:t81",
        "y/c>x/b:u53",
    ];
    let deny_x = np(
        "x",
        "deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    );
    vec![
        (
            "no policy: known pods talk, the unknown veth drops",
            vec![],
            known_open,
        ),
        (
            "default deny ingress in x",
            vec![deny_x.clone()],
            vec![
                "x/a>y/c:t80",
                "x/a>y/c:t81",
                "x/a>y/c:u53",
                "x/b>y/c:t80",
                "x/b>y/c:t81",
                "x/b>y/c:u53",
            ],
        ),
        (
            "allow app=b to app=a on TCP 80 (by name) under default deny",
            vec![
                deny_x.clone(),
                np(
                    "x",
                    "allow-b",
                    json!({"podSelector": {"matchLabels": {"app": "a"}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}], "ports": [{"port": "http"}]}]}),
                ),
            ],
            vec![
                "x/b>x/a:t80",
                "x/a>y/c:t80",
                "x/a>y/c:t81",
                "x/a>y/c:u53",
                "x/b>y/c:t80",
                "x/b>y/c:t81",
                "x/b>y/c:u53",
            ],
        ),
        (
            "ipBlock with except into y/c, namespace team=y on UDP into x",
            vec![
                np(
                    "y",
                    "block",
                    json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/24", "except": ["10.244.1.2/32"]}}]}]}),
                ),
                np(
                    "x",
                    "dns",
                    json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}],
                    "ports": [{"protocol": "UDP", "port": 53}]}]}),
                ),
            ],
            vec![
                "x/a>y/c:t80",
                "x/a>y/c:t81",
                "x/a>y/c:u53",
                "y/c>x/a:u53",
                "y/c>x/b:u53",
            ],
        ),
        (
            "egress deny for x/a, egress to TCP 81 only for x/b",
            vec![
                np(
                    "x",
                    "egress-a",
                    json!({"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"]}),
                ),
                np(
                    "x",
                    "egress-b",
                    json!({"podSelector": {"matchLabels": {"app": "b"}}, "egress": [{"ports": [{"port": 81}]}]}),
                ),
            ],
            vec![
                "x/b>x/a:t81",
                "x/b>y/c:t81",
                "y/c>x/a:t80",
                "y/c>x/a:t81",
                "y/c>x/a:u53",
            ],
        ),
    ]
}

fn expected(allowed: &[&str]) -> Vec<Probe> {
    let mut out = Vec::new();
    for src in &PODS {
        for dst in &PODS {
            if src == dst {
                continue;
            }
            for (proto, port) in PORTS {
                let from = format!("{}/{}", src.0, src.1);
                let to = format!("{}/{}", dst.0, dst.1);
                let tag = format!(
                    "{from}>{to}:{}{port}",
                    if proto == Proto::Tcp { "t" } else { "u" }
                );
                out.push((from, to, proto, port, allowed.contains(&tag.as_str())));
            }
        }
    }
    for dst in &PODS {
        out.push((
            "node".into(),
            format!("{}/{}", dst.0, dst.1),
            Proto::Tcp,
            80,
            true,
        ));
    }
    out.sort();
    out
}

fn diff(got: &[Probe], want: &[Probe]) -> Vec<String> {
    got.iter()
        .zip(want)
        .filter(|(g, w)| g != w)
        .map(|(g, _)| format!("{}>{} {:?}/{} measured {}", g.0, g.1, g.2, g.3, g.4))
        .collect()
}

/// Applies every case with `fw` on `node` and returns the measured matrices.
fn run_cases(node: &Node, fw: &dyn Firewall) -> Vec<Vec<Probe>> {
    let cases = cases()
        .into_iter()
        .map(|(name, policies, allowed)| (name, policies, Vec::new(), allowed))
        .collect();
    run_tier_cases(node, fw, cases)
}

type TierCase = (&'static str, Vec<Value>, Vec<Value>, Vec<&'static str>);

fn cnp(name: &str, tier: &str, priority: i32, subject: Value, ingress: Value) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "tier": tier, "priority": priority, "subject": subject, "ingress": ingress}})
}

/// ClusterNetworkPolicy cases: a name, NetworkPolicies, ClusterNetworkPolicies, what passes.
fn tier_cases() -> Vec<TierCase> {
    let all_of = |from: &str, to: &[&str]| -> Vec<String> {
        to.iter()
            .flat_map(|t| ["t80", "t81", "u53"].map(|p| format!("{from}>{t}:{p}")))
            .collect()
    };
    let leak = |v: Vec<String>| -> Vec<&'static str> {
        v.into_iter()
            .map(|s| &*Box::leak(s.into_boxed_str()))
            .collect()
    };
    let ns = |n: &str| json!({"namespaces": {"matchLabels": {"team": n}}});
    let from = |n: &str| json!([{"namespaces": {"matchLabels": {"team": n}}}]);
    let every = json!([{"namespaces": {}}]);
    let open_x = np("x", "open", json!({"podSelector": {}, "ingress": [{}]}));
    let mut case1 = all_of("x/a", &["x/b", "y/c"]);
    case1.extend(all_of("x/b", &["x/a", "y/c"]));
    let mut refilled = all_of("x/a", &["y/c"]);
    refilled.extend(all_of("x/b", &["y/c"]));
    refilled.extend(all_of("y/c", &["x/a", "x/b"]));
    let mut case2 = vec!["y/c>x/a:t80".to_string(), "y/c>x/b:t80".to_string()];
    case2.extend(all_of("x/a", &["y/c"]));
    case2.extend(all_of("x/b", &["y/c"]));
    vec![
        (
            "Admin Deny from y overrides a NetworkPolicy that opens x",
            vec![open_x],
            vec![cnp(
                "deny-y",
                "Admin",
                10,
                ns("x"),
                json!([{"action": "Deny", "from": from("y")}]),
            )],
            leak(case1),
        ),
        (
            // The same policy, the same pods selected: the sets named after their group are
            // refilled in place (the renderers' unit tests show that no pod's rules are
            // written again), and the new peers are what is enforced.
            "The same Admin policy now denies x itself: y's pods are let in again",
            vec![np("x", "open", json!({"podSelector": {}, "ingress": [{}]}))],
            vec![cnp(
                "deny-y",
                "Admin",
                10,
                ns("x"),
                json!([{"action": "Deny", "from": from("x")}]),
            )],
            leak(refilled),
        ),
        (
            "Admin Pass for y defers to NetworkPolicy (TCP 80 only), Admin Deny for the rest",
            vec![np(
                "x",
                "y-web",
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}], "ports": [{"port": 80}]}]}),
            )],
            vec![
                cnp(
                    "pass-y",
                    "Admin",
                    1,
                    ns("x"),
                    json!([{"action": "Pass", "from": from("y")}]),
                ),
                cnp(
                    "deny-all",
                    "Admin",
                    2,
                    ns("x"),
                    json!([{"action": "Deny", "from": every.clone()}]),
                ),
            ],
            leak(case2),
        ),
        (
            "Baseline Deny everywhere, except where a NetworkPolicy selects (x/a from x/b)",
            vec![np(
                "x",
                "a-from-b",
                json!({"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]}),
            )],
            vec![cnp(
                "base-deny",
                "Baseline",
                1,
                json!({"namespaces": {}}),
                json!([{"action": "Deny", "from": every}]),
            )],
            leak(all_of("x/b", &["x/a"])),
        ),
    ]
}

#[test]
fn cluster_network_policy_tiers_on_both_renderers() {
    if !have_root() || !need("nft") || !need("ipset") || !need("iptables-restore") {
        return;
    }
    let nft_node = Node::new();
    nft_node.add_others();
    let nft = NftCli::new(nft_node.exec());
    let by_nft = run_tier_cases(&nft_node, &nft, tier_cases());
    nft.remove().unwrap();
    drop(nft_node);
    let ipt_node = Node::new();
    ipt_node.add_others();
    let ipt = IptablesRestore::detect(ipt_node.exec()).unwrap();
    let by_ipt = run_tier_cases(&ipt_node, &ipt, tier_cases());
    ipt.remove().unwrap();
    assert_eq!(by_nft, by_ipt, "the renderers disagree");
}

/// [`run_cases`] for cases with ClusterNetworkPolicies.
fn run_tier_cases(node: &Node, fw: &dyn Firewall, cases: Vec<TierCase>) -> Vec<Vec<Probe>> {
    let mut out = Vec::new();
    for (i, (name, policies, cnps, allowed)) in cases.into_iter().enumerate() {
        let ir = ir_with_tiers(&policies, &cnps);
        let rendered = fw.render(&ir);
        let applied = fw.apply(&rendered).unwrap();
        assert!(applied.written, "{name}: first apply writes");
        // The first case writes everything; every later one only its difference.
        assert_eq!(applied.incremental, i > 0, "{name}: written as a delta");
        assert!(
            !fw.apply(&rendered).unwrap().written,
            "{name}: unchanged rules are not rewritten"
        );
        assert_eq!(fw.observe().unwrap().hash.as_deref(), Some(rendered.hash()));
        node.assert_others_survive(name);
        let got = node.matrix();
        let want = expected(&allowed);
        let bad = diff(&got, &want);
        assert!(bad.is_empty(), "{:?} / {name}: {bad:#?}", fw.backend());
        // The IR's own reading agrees with the kernel for the pods it knows.
        for (from, to, proto, port, ok) in &got {
            let ip = |who: &str| -> Ipv4Addr {
                if who == "node" {
                    return NODE_IP.parse().unwrap();
                }
                PODS.iter()
                    .find(|p| format!("{}/{}", p.0, p.1) == who)
                    .unwrap()
                    .3
                    .parse()
                    .unwrap()
            };
            if to.ends_with("/d") || from.ends_with("/d") {
                continue;
            }
            let n = if *proto == Proto::Tcp { 6 } else { 17 };
            assert_eq!(
                ir.allows(ip(from), ip(to), n, Some(*port)),
                *ok,
                "{name}: oracle {from}>{to} {port}"
            );
        }
        out.push(got);
    }
    out
}

fn need(program: &str) -> bool {
    if Exec::host().has(program) {
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI must have {program}");
    eprintln!("skipping: {program} is missing");
    false
}

#[test]
fn both_renderers_enforce_the_same_matrix_and_leave_others_alone() {
    if !have_root() || !need("nft") || !need("ipset") || !need("iptables-restore") {
        return;
    }
    let nft_node = Node::new();
    nft_node.add_others();
    let nft = NftCli::new(nft_node.exec());
    let by_nft = run_cases(&nft_node, &nft);
    // A restarted agent sees its table and does not rewrite it.
    let again = NftCli::new(nft_node.exec());
    let last = again.render(&ir_for(&cases().pop().unwrap().1));
    assert!(!again.apply(&last).unwrap().written);
    nft.remove().unwrap();
    nft_node.assert_others_survive("nft remove");
    drop(nft_node);

    let ipt_node = Node::new();
    ipt_node.add_others();
    let ipt = IptablesRestore::detect(ipt_node.exec()).unwrap();
    assert_eq!(
        ipt.mode,
        IptablesMode::Nft,
        "this host's iptables is nf_tables and holds the test's rules"
    );
    let by_ipt = run_cases(&ipt_node, &ipt);
    ipt.remove().unwrap();
    ipt_node.assert_others_survive("iptables remove");
    let save = sh(&[
        "ip",
        "netns",
        "exec",
        &ipt_node.node.name,
        "iptables-save",
        "-t",
        "filter",
    ]);
    assert!(
        !save.contains("SLUICE-"),
        "remove left sluice's chains: {save}"
    );
    let sets = sh(&[
        "ip",
        "netns",
        "exec",
        &ipt_node.node.name,
        "ipset",
        "list",
        "-n",
    ]);
    assert!(
        !sets.contains("SLUICE-"),
        "remove left sluice's sets: {sets}"
    );

    assert_eq!(by_nft, by_ipt, "the renderers disagree");
}

/// `nft list table` of sluice's table in `node`, handles left out, as its sets, maps and
/// chains in name order (nft lists them in the order they were made).
fn nft_listing(node: &Node) -> Vec<String> {
    let text = sh(&[
        "ip",
        "netns",
        "exec",
        &node.node.name,
        "nft",
        "list",
        "table",
        "inet",
        sluice_policy::nft::TABLE,
    ]);
    let head = format!("table inet {} {{\n", sluice_policy::nft::TABLE);
    let body = text
        .strip_prefix(&head)
        .and_then(|b| b.strip_suffix("}\n"))
        .unwrap_or_else(|| panic!("not sluice's table: {text}"));
    let mut blocks: Vec<String> = body.split("\n\n").map(|b| b.trim().to_string()).collect();
    blocks.sort();
    assert!(blocks.len() >= 7, "not sluice's table: {text}");
    blocks
}

/// Walks the renderer suite's cases forwards, then back (so each change is met in both
/// directions) with `incremental`, and checks that each change is written as a delta, that
/// `observed` then reads its hash, and that it leaves what an applier that knows nothing
/// (`fresh`) writes in full, as `listing` reads the kernel. The cases' IRs are returned.
fn every_delta_leaves_what_a_full_write_would<F: Firewall, L: PartialEq + std::fmt::Debug>(
    node: &Node,
    incremental: &F,
    fresh: impl Fn() -> F,
    observed: impl Fn() -> Option<String>,
    listing: impl Fn(&Node) -> L,
) -> Vec<PolicyIr> {
    let cases = cases();
    let irs: Vec<PolicyIr> = cases.iter().map(|c| ir_for(&c.1)).collect();
    let order: Vec<usize> = (0..irs.len()).chain((0..irs.len()).rev()).collect();
    for pair in order.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        incremental.apply(&incremental.render(&irs[from])).unwrap();
        let wanted = incremental.render(&irs[to]);
        let applied = incremental.apply(&wanted).unwrap();
        assert_eq!(observed().as_deref(), Some(wanted.hash()));
        if from == to {
            assert!(!applied.written);
            continue;
        }
        assert!(applied.incremental, "{} -> {}", cases[from].0, cases[to].0);
        let by_delta = listing(node);
        let fresh = fresh();
        fresh.remove().unwrap();
        assert_eq!(observed(), None);
        let full = fresh.apply(&fresh.render(&irs[to])).unwrap();
        assert!(full.written && !full.incremental);
        assert_eq!(
            by_delta,
            listing(node),
            "{} -> {}: the delta left other rules than a full write",
            cases[from].0,
            cases[to].0
        );
        node.assert_others_survive(cases[to].0);
    }
    irs
}

#[test]
fn every_nft_delta_leaves_the_table_a_full_write_would() {
    if !have_root() || !need("nft") {
        return;
    }
    let node = Node::new();
    node.add_others();
    // The hash read over netlink, as the agent reads it, is the one written.
    every_delta_leaves_what_a_full_write_would(
        &node,
        &NftCli::new(node.exec()),
        || NftCli::new(node.exec()),
        || sluice_policy::nft::observe::state_hash(Some(&node.node.name)).unwrap(),
        nft_listing,
    );
}

/// sluice's iptables rules and ipset members in `node`, sorted, counters left out.
fn iptables_listing(node: &Node) -> (Vec<String>, Vec<String>) {
    let n = &node.node.name;
    let save = sh(&["ip", "netns", "exec", n, "iptables-save", "-t", "filter"]);
    let mut rules: Vec<String> = save
        .lines()
        .filter(|l| l.contains("SLUICE-"))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect();
    rules.sort();
    let sets = sh(&["ip", "netns", "exec", n, "ipset", "save"]);
    let mut members: Vec<String> = sets
        .lines()
        .filter(|l| l.contains("SLUICE-"))
        // A set's hash seed (`initval`) differs from one creation to the next.
        .map(|l| match l.strip_prefix("create ") {
            Some(rest) => rest.split(' ').next().unwrap_or(rest).to_string(),
            None => l.to_string(),
        })
        .collect();
    members.sort();
    assert!(rules.len() >= 10, "not sluice's chains: {save}");
    (rules, members)
}

#[test]
fn every_iptables_delta_leaves_the_rules_a_full_write_would() {
    if !have_root() || !need("ipset") || !need("iptables-restore") {
        return;
    }
    let node = Node::new();
    node.add_others();
    let incremental = IptablesRestore::detect(node.exec()).unwrap();
    let irs = every_delta_leaves_what_a_full_write_would(
        &node,
        &incremental,
        || IptablesRestore::detect(node.exec()).unwrap(),
        || incremental.observe().unwrap().hash,
        iptables_listing,
    );
    // A jump to sluice's chains removed by hand: the rules are not in force, and the next
    // apply puts it back, whether it has a change to write or not.
    let last = incremental.render(&irs[0]);
    for change in [true, false] {
        let n = &node.node.name;
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "iptables",
            "-D",
            "FORWARD",
            "-j",
            "SLUICE-FORWARD",
        ]);
        assert_eq!(incremental.observe().unwrap().hash, None);
        let wanted = if change {
            incremental.render(&irs[1])
        } else {
            last.clone()
        };
        assert!(incremental.apply(&wanted).unwrap().written);
        assert_eq!(
            incremental.observe().unwrap().hash.as_deref(),
            Some(wanted.hash())
        );
        if change {
            incremental.apply(&last).unwrap();
        }
    }
}

#[test]
fn iptables_legacy_backend_when_the_host_uses_it() {
    if !have_root() || !need("ipset") || !need("iptables-legacy-restore") {
        return;
    }
    let node = Node::new();
    let n = &node.node.name;
    // The host's rules live in legacy: detection must follow them.
    sh(&[
        "ip",
        "netns",
        "exec",
        n,
        "iptables-legacy",
        "-w",
        "-N",
        "LEGACY-ONLY",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        n,
        "iptables-legacy",
        "-w",
        "-A",
        "FORWARD",
        "-j",
        "LEGACY-ONLY",
    ]);
    let ipt = IptablesRestore::detect(node.exec()).unwrap();
    assert_eq!(ipt.mode, IptablesMode::Legacy);
    let (_, policies, allowed) = cases().swap_remove(2);
    let r = ipt.render(&ir_for(&policies));
    assert!(ipt.apply(&r).unwrap().written);
    let bad = diff(&node.matrix(), &expected(&allowed));
    assert!(bad.is_empty(), "legacy: {bad:#?}");
    let legacy = sh(&[
        "ip",
        "netns",
        "exec",
        n,
        "iptables-legacy-save",
        "-t",
        "filter",
    ]);
    assert!(
        legacy.contains("-A FORWARD -j SLUICE-FORWARD")
            && legacy.contains("-A FORWARD -j LEGACY-ONLY")
    );
    let nft = sh(&["ip", "netns", "exec", n, "iptables-nft-save"]);
    assert!(
        !nft.contains("SLUICE-"),
        "rules landed in the other backend: {nft}"
    );
}

/// A flow the new policy denies stops within 1 s, with each renderer.
#[test]
fn a_denied_established_connection_is_cut() {
    if !have_root() || !need("conntrack") || !need("ipset") {
        return;
    }
    for backend in ["nftables", "iptables"] {
        let node = Node::new();
        let fw = sluice_policy::auto(node.exec(), backend).unwrap();
        let ct = ConntrackCli::new(node.exec());
        // `policy-backend: auto` picks nftables where it works.
        let auto = sluice_policy::auto(node.exec(), "auto").unwrap();
        assert_eq!(auto.backend(), sluice_policy::Backend::Nftables);
        fw.apply(&fw.render(&ir_for(&[]))).unwrap();
        let mut conn = in_netns(&node.pods[1].name, || {
            TcpStream::connect_timeout(&SocketAddr::from(([10, 244, 1, 1], 80)), TIMEOUT).unwrap()
        });
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 4];
        conn.write_all(b"ping").unwrap();
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");

        let deny = ir_for(&[np(
            "x",
            "deny",
            json!({"podSelector": {"matchLabels": {"app": "a"}}}),
        )]);
        fw.apply(&fw.render(&deny)).unwrap();
        // Without the flush, the established flow still passes (ct state established).
        conn.write_all(b"late").unwrap();
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"late", "{backend}");
        assert!(
            ct.flush_denied(&deny).unwrap() >= 1,
            "{backend}: the flow's entry was found"
        );
        let start = std::time::Instant::now();
        conn.write_all(b"pong").unwrap();
        let got = conn.read(&mut buf);
        assert!(
            !matches!(got, Ok(n) if n > 0),
            "{backend}: the denied connection still passes: {got:?}"
        );
        assert!(start.elapsed() < Duration::from_millis(1500));
        // Other flows are left alone: x/b to y/c is still allowed and keeps its entry.
        assert!(probe(
            &node.pods[1].name,
            "10.244.1.3".parse().unwrap(),
            Proto::Tcp,
            80
        ));
    }
}
