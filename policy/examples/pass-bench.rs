//! `pass-bench`: the policy engine's share of one agent pass, without the kernel: compile,
//! render and diff (nftables and iptables) at bench-policy's scale (1,000 local pods, 10,000 in
//! the cluster, 1,000 NetworkPolicies, 100 ClusterNetworkPolicies, the same objects), for the
//! changes bench-policy and bench-k8s time: a NetworkPolicy changed, a ClusterNetworkPolicy
//! changed, a new local pod, and a pass with no change. Each figure is the median and maximum
//! of `--rounds` passes, wall time and this thread's CPU time (from
//! `/proc/thread-self/schedstat`, less sensitive to a shared machine's load), beside the
//! benchmarks' anchors (a change enforced in under 100 ms; a new pod reachable in under
//! 200 ms, all of a pass's work included).
//!
//! ```sh
//! CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo run -p sluice-policy --example pass-bench -- [--rounds N]
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{json, Value};
use sluice_policy::cnp::{ClusterNetworkPolicy, NodeAddrs};
use sluice_policy::{
    iptables, nft, ClusterPod, Compiler, LocalPod, NamedPort, PolicyInput, PolicyIr, Protocol,
};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOCAL: usize = 1_000;
const CLUSTER: usize = 10_000;
const POLICIES: usize = 1_000;
const CNPS: usize = 100;

fn cpu_now() -> Duration {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

fn pod(ns: &str, name: &str, node: &str, labels: &[(&str, String)], ip: Ipv4Addr) -> ClusterPod {
    ClusterPod {
        namespace: ns.into(),
        name: name.into(),
        uid: Some(format!("uid-{ns}-{name}")),
        resource_version: Some("1".into()),
        node_name: Some(node.into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        host_network: false,
        finished: false,
        ips: vec![ip.into()],
        ports: vec![NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }],
    }
}

fn pod_ip(i: usize, local: bool) -> Ipv4Addr {
    let base: u32 = if local { 0x0afa_0000 } else { 0x0afb_0000 };
    Ipv4Addr::from(base + u32::try_from(i).unwrap() + 1)
}

/// bench-policy's `bulk_policy`.
fn bulk_policy(i: usize, apps: usize) -> NetworkPolicy {
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
    serde_json::from_value(json!({
        "metadata": {"name": format!("p{i}"), "namespace": "bench", "uid": format!("np{i}"),
                     "resourceVersion": "1"},
        "spec": spec}))
    .unwrap()
}

fn probe_policy(open: bool, version: usize) -> NetworkPolicy {
    let ingress = if open {
        json!([{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}])
    } else {
        json!([])
    };
    serde_json::from_value(json!({
        "metadata": {"name": "probe", "namespace": "probe", "uid": "probe",
                     "resourceVersion": version.to_string()},
        "spec": {"podSelector": {"matchLabels": {"role": "server"}},
                 "policyTypes": ["Ingress"], "ingress": ingress}}))
    .unwrap()
}

fn ns_named(name: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": name}})
}

/// bench-policy's `bulk_cnp`.
fn bulk_cnp(i: usize, apps: usize) -> ClusterNetworkPolicy {
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
    serde_json::from_value(
        json!({"metadata": {"name": format!("c{i}"), "resourceVersion": "1"},
                                  "spec": spec}),
    )
    .unwrap()
}

fn probe_cnp(action: &str, version: usize) -> ClusterNetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": "probe-cnp", "resourceVersion": version.to_string()},
        "spec": {"tier": "Admin", "priority": 120,
                 "subject": {"pods": {"namespaceSelector": ns_named("probe"),
                                      "podSelector": {"matchLabels": {"role": "server"}}}},
                 "ingress": [{"name": "client", "action": action,
                              "from": [{"pods": {"namespaceSelector": ns_named("probe"),
                                                 "podSelector": {"matchLabels": {"role": "client"}}}}],
                              "protocols": [{"tcp": {"destinationPort": {"number": 8080}}}]}]}}))
    .unwrap()
}

struct World {
    pods: Vec<Arc<ClusterPod>>,
    namespaces: Vec<Namespace>,
    policies: Vec<NetworkPolicy>,
    cnps: Vec<ClusterNetworkPolicy>,
    nodes: Vec<NodeAddrs>,
    host: Vec<std::net::IpAddr>,
}

impl World {
    fn new() -> Self {
        let apps = POLICIES;
        let mut pods = vec![
            Arc::new(pod(
                "probe",
                "client",
                "n",
                &[("role", "client".into())],
                Ipv4Addr::new(10, 249, 0, 1),
            )),
            Arc::new(pod(
                "probe",
                "server",
                "n",
                &[("role", "server".into())],
                Ipv4Addr::new(10, 249, 0, 2),
            )),
        ];
        for i in 0..CLUSTER - 2 {
            let local = i < LOCAL - 2;
            let (node, index) = if local {
                ("n".to_string(), i)
            } else {
                (format!("remote-{}", i % 50), i - (LOCAL - 2))
            };
            pods.push(Arc::new(pod(
                "bench",
                &format!("b{i}"),
                &node,
                &[("app", format!("a{}", i % apps))],
                pod_ip(index, local),
            )));
        }
        let namespaces = ["bench", "probe", "kube-system", "default"]
            .iter()
            .map(|n| serde_json::from_value(json!({"metadata": {"name": n}})).unwrap())
            .collect();
        let mut policies: Vec<NetworkPolicy> =
            (0..POLICIES).map(|i| bulk_policy(i, apps)).collect();
        policies.push(probe_policy(false, 1));
        let mut cnps: Vec<ClusterNetworkPolicy> =
            (0..CNPS - 1).map(|i| bulk_cnp(i, apps)).collect();
        cnps.push(probe_cnp("Deny", 1));
        let nodes = (0..51)
            .map(|i| NodeAddrs {
                labels: Default::default(),
                addrs: vec![Ipv4Addr::new(172, 31, 250, 1 + i).into()],
            })
            .collect();
        Self {
            pods,
            namespaces,
            policies,
            cnps,
            nodes,
            host: vec![Ipv4Addr::new(172, 31, 250, 1).into()],
        }
    }

    /// bench-k8s's reachability world: 1,000 NetworkPolicies of the default namespace that all
    /// select the probed pods (`app: reach`), each admitting the pods labelled `peer: pI`; the
    /// prober carries the last one's label; 3 nodes, this one "n".
    fn k8s() -> Self {
        let mut w = Self::new();
        w.pods = vec![Arc::new(pod(
            "default",
            "prober",
            "n",
            &[("peer", format!("p{}", POLICIES - 1))],
            Ipv4Addr::new(10, 244, 0, 2),
        ))];
        w.cnps.clear();
        w.policies = (0..POLICIES)
            .map(|i| {
                serde_json::from_value(json!({
                    "metadata": {"name": format!("bench-{i:04}"), "namespace": "default",
                                 "uid": format!("k{i}"), "resourceVersion": "1"},
                    "spec": {"podSelector": {"matchLabels": {"app": "reach"}},
                             "policyTypes": ["Ingress"],
                             "ingress": [{"from": [{"podSelector": {"matchLabels": {"peer": format!("p{i}")}}}]}]}}))
                .unwrap()
            })
            .collect();
        w.nodes.truncate(3);
        w
    }

    fn local(&self) -> Vec<LocalPod> {
        self.pods
            .iter()
            .filter(|p| p.node_name.as_deref() == Some("n"))
            .enumerate()
            .filter_map(|(i, p)| LocalPod::from_pod(p, &format!("sl{i:013x}")))
            .collect()
    }
}

/// The engine's state across passes, as the agent keeps it.
#[derive(Default)]
struct Engine {
    compiler: Compiler,
    nft_memo: nft::RenderMemo,
    ipt_memo: iptables::RenderMemo,
    last_nft: Option<nft::NftScript>,
    last_ipt: Option<iptables::IptablesScript>,
    /// The last pass's nft delta (or full text on the first pass), and iptables delta.
    last_delta: String,
    last_ipt_delta: Option<iptables::IptablesDelta>,
}

/// One pass's times: compile, nft render + delta, iptables render + delta (wall, CPU) and the
/// size of the nft delta in commands.
#[derive(Default, Clone, Copy)]
struct Times {
    compile: (Duration, Duration),
    nft: (Duration, Duration),
    ipt: (Duration, Duration),
    commands: usize,
    /// The nft delta's bytes, chains flushed, sets and maps added.
    bytes: usize,
    flushed: usize,
    added_sets: usize,
    /// The iptables delta (IPv4 script): chains written, ipset lines.
    ipt_chains: usize,
    ipt_set_lines: usize,
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, (Duration, Duration)) {
    let (w, c) = (Instant::now(), cpu_now());
    let out = f();
    (out, (w.elapsed(), cpu_now().saturating_sub(c)))
}

impl Engine {
    fn pass(&mut self, w: &World) -> (PolicyIr, Times) {
        let ns: Vec<&Namespace> = w.namespaces.iter().collect();
        let nps: Vec<&NetworkPolicy> = w.policies.iter().collect();
        let cnps: Vec<&ClusterNetworkPolicy> = w.cnps.iter().collect();
        let mut t = Times::default();
        let (ir, c) = timed(|| {
            let local = w.local();
            let input = PolicyInput {
                pods: &w.pods,
                namespaces: &ns,
                policies: &nps,
                host_addrs: &w.host,
                cluster_policies: &cnps,
                nodes: &w.nodes,
                attribute_drops: false,
            };
            self.compiler.compile(&input, &local)
        });
        t.compile = c;
        let ((script, text), c) = timed(|| {
            let script = nft::render_with(&ir, &mut self.nft_memo);
            let text = match &self.last_nft {
                Some(old) => nft::delta(&old.table, &script.table, &script.hash)
                    .unwrap_or_else(|| script.text()),
                None => script.text(),
            };
            (script, text)
        });
        t.nft = c;
        t.commands = text.lines().count();
        t.bytes = text.len();
        t.flushed = text
            .lines()
            .filter(|l| l.starts_with("flush chain"))
            .count();
        t.added_sets = text
            .lines()
            .filter(|l| l.starts_with("add set") || l.starts_with("add map"))
            .count();
        self.last_delta = text;
        self.last_nft = Some(script);
        let ((script, d), c) = timed(|| {
            let script = iptables::render_with(&ir, &mut self.ipt_memo);
            let d = self
                .last_ipt
                .as_ref()
                .map(|old| iptables::delta(old, &script));
            (script, d)
        });
        t.ipt = c;
        if let Some(d) = &d {
            t.ipt_chains = d.filter.lines().filter(|l| l.starts_with(':')).count();
            t.ipt_set_lines = d.ipsets.lines().count();
        }
        self.last_ipt_delta = d;
        self.last_ipt = Some(script);
        (ir, t)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(label: &str, runs: &[Times]) {
    let pick = |f: &dyn Fn(&Times) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let total_wall = pick(&|t| t.compile.0 + t.nft.0);
    let total_cpu = pick(&|t| t.compile.1 + t.nft.1);
    let compile = pick(&|t| t.compile.1);
    let nft = pick(&|t| t.nft.1);
    let ipt = pick(&|t| t.ipt.1);
    if std::env::var_os("PASS_BENCH_EACH").is_some() {
        for t in runs {
            println!(
                "    compile {:.1} nft {:.1} ipt {:.1} ms CPU, {} nft commands",
                ms(t.compile.1),
                ms(t.nft.1),
                ms(t.ipt.1),
                t.commands
            );
        }
    }
    let med = |f: &dyn Fn(&Times) -> usize| {
        let mut v: Vec<usize> = runs.iter().map(f).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let cmds = [med(&|t| t.commands)];
    println!(
        "{label:<22} {:>7.1} / {:>7.1}  {:>7.1} / {:>7.1}  {:>7.1} / {:>7.1}  {:>7.1} / {:>7.1}  {:>7.1} / {:>7.1}  {:>6}",
        ms(total_wall.0),
        ms(total_wall.1),
        ms(total_cpu.0),
        ms(total_cpu.1),
        ms(compile.0),
        ms(compile.1),
        ms(nft.0),
        ms(nft.1),
        ms(ipt.0),
        ms(ipt.1),
        cmds[0],
    );
    // The CPU clock may advance by scheduler ticks: the mean over the rounds is the finer figure.
    let mean = |f: &dyn Fn(&Times) -> Duration| {
        ms(runs.iter().map(f).sum::<Duration>()) / runs.len() as f64
    };
    println!(
        "{:<22} CPU means: compile+nft {:.1}, compile {:.1}, nft {:.1}, iptables {:.1}",
        "",
        mean(&|t| t.compile.1 + t.nft.1),
        mean(&|t| t.compile.1),
        mean(&|t| t.nft.1),
        mean(&|t| t.ipt.1),
    );
    println!(
        "{:<22} nft delta: {} bytes, {} chains flushed, {} sets/maps added; iptables delta: {} chains, {} ipset lines",
        "",
        med(&|t| t.bytes),
        med(&|t| t.flushed),
        med(&|t| t.added_sets),
        med(&|t| t.ipt_chains),
        med(&|t| t.ipt_set_lines),
    );
}

fn main() {
    let mut rounds = 10usize;
    let mut only: Option<String> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--rounds", Some(n)) => rounds = n.parse().expect("--rounds takes a number"),
            ("--only", Some(label)) => only = Some(label),
            _ => {
                eprintln!("usage: pass-bench [--rounds N] [--only LABEL]");
                std::process::exit(2);
            }
        }
    }
    let mut w = World::new();
    let mut e = Engine::default();
    let (ir, first) = e.pass(&w);
    println!(
        "# pass-bench: {LOCAL} local pods, {CLUSTER} in the cluster, {POLICIES} NetworkPolicies, {CNPS} ClusterNetworkPolicies; {} pods in the IR",
        ir.pods.len()
    );
    println!(
        "first pass: compile {:.1} ms CPU, nft {:.1} ms CPU, iptables {:.1} ms CPU",
        ms(first.compile.1),
        ms(first.nft.1),
        ms(first.ipt.1)
    );
    println!(
        "\nms, median / max of {rounds}    compile+nft wall   compile+nft CPU       compile CPU     nft render+delta   ipt render+delta  nft cmds"
    );
    // PASS_BENCH_DUMP=DIR: the full table before each change (`LABEL.full.nft`) and the
    // change's last delta (`LABEL.delta.nft`, iptables `LABEL.ipt-filter`, `LABEL.ipt-sets`),
    // for timing `nft -f` on them in a scratch network namespace.
    let dump = std::env::var_os("PASS_BENCH_DUMP").map(std::path::PathBuf::from);
    let mut version = 1;
    let mut change =
        |label: &str, w: &mut World, e: &mut Engine, f: &mut dyn FnMut(&mut World, usize)| {
            let mut runs = Vec::new();
            if only.as_deref().is_some_and(|o| o != label) {
                return;
            }
            let file = |ext: &str| {
                dump.as_ref()
                    .map(|d| d.join(format!("{}.{ext}", label.replace([' ', ':'], "-"))))
            };
            for _ in 0..rounds {
                if let (Some(path), Some(s)) = (file("full.nft"), &e.last_nft) {
                    std::fs::write(path, s.text()).unwrap();
                }
                version += 1;
                f(w, version);
                runs.push(e.pass(w).1);
            }
            if let Some(path) = file("delta.nft") {
                std::fs::write(path, &e.last_delta).unwrap();
            }
            if let (Some(fp), Some(sp), Some(d)) =
                (file("ipt-filter"), file("ipt-sets"), &e.last_ipt_delta)
            {
                std::fs::write(fp, &d.filter).unwrap();
                std::fs::write(sp, &d.ipsets).unwrap();
            }
            row(label, &runs);
        };
    change("no change", &mut w, &mut e, &mut |_, _| {});
    change("NetworkPolicy", &mut w, &mut e, &mut |w, v| {
        let last = w.policies.len() - 1;
        w.policies[last] = probe_policy(v % 2 == 0, v);
    });
    change("ClusterNetworkPolicy", &mut w, &mut e, &mut |w, v| {
        let last = w.cnps.len() - 1;
        w.cnps[last] = probe_cnp(if v % 2 == 0 { "Accept" } else { "Deny" }, v);
    });
    let mut added = 0usize;
    change("new local pod", &mut w, &mut e, &mut |w, _| {
        let i = LOCAL - 2 + added;
        added += 1;
        // A new pod of the bench namespace on this node, selected by one policy.
        let p = pod(
            "bench",
            &format!("new{i}"),
            "n",
            &[("app", format!("a{}", i % POLICIES))],
            pod_ip(i + 5000, true),
        );
        w.pods.push(Arc::new(p));
    });
    change("remote pod", &mut w, &mut e, &mut |w, v| {
        let p = pod(
            "bench",
            &format!("remote-new{v}"),
            "remote-1",
            &[("app", format!("a{}", v % POLICIES))],
            pod_ip(20_000 + v, false),
        );
        w.pods.push(Arc::new(p));
    });
    // bench-k8s: the same engine state as the agent of the prober's node would have.
    let mut w = World::k8s();
    let mut e = Engine::default();
    e.pass(&w);
    let mut n = 0usize;
    change("k8s: new probed pod", &mut w, &mut e, &mut |w, _| {
        n += 1;
        let node = ["n", "m", "o"][n % 3];
        let ip = Ipv4Addr::new(
            10,
            244,
            u8::try_from(n % 3).unwrap(),
            u8::try_from(10 + n).unwrap(),
        );
        w.pods.push(Arc::new(pod(
            "default",
            &format!("reach{n}"),
            node,
            &[("app", "reach".into())],
            ip,
        )));
    });
    println!(
        "\nanchors: a change enforced in < 100 ms (bench-policy), a new pod reachable in < 200 ms (bench-k8s), whole pass with the kernel's share"
    );
}
