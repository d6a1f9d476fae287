//! The NetworkPolicy truth-table suite on IPv6: a dual-stack lab (`--ip-family dual`), the
//! same nine pods and the same cases as `netpol.rs` (shared in `sluice_e2e::netpol`), probed
//! with real TCP connects and UDP exchanges to the pods' IPv6 addresses from inside their
//! network namespaces, on both renderers (one lab each, side by side; they must agree).
//!
//! The shared cases whose peers are IPv4 addresses (`ipBlock`, `networks`) are measured over
//! IPv6 with what they mean there: an IPv4 block names no IPv6 peer (an isolated pod whose only
//! rule is one takes no IPv6 traffic; a Deny of an IPv4 network denies no IPv6 flow). IPv6
//! cases are added: `ipBlock` with IPv6 CIDRs and `except`s, one rule with a block of each
//! family, egress to an IPv6 block, and a ClusterNetworkPolicy Deny of an IPv6 network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::Ipv6Net;
use sluice_e2e::have_root;
use sluice_e2e::lab::{netns_with_prefix, Lab};
use sluice_e2e::netpol::*;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

/// The shared cases that name IPv4 addresses, and their truth over IPv6.
const IPV4_ADDRESS_CASES: [&str; 3] = [
    "allow x from the cluster CIDR except y/b (ipBlock with except)",
    "allow x from the cluster CIDR except x/a's node subnet (ipBlock except a /24)",
    "ClusterNetworkPolicy Admin Deny of egress from x to a CIDR (y/b's address)",
];

/// The truth tables run two 9-pod labs at once; beside them, on 2 cores, the cut test timed the
/// machine rather than the agent (iptables 1.6 s twice with them, 0.33 s without). A test that
/// times enforcement runs alone.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn setup(backend: &'static str) -> Env {
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "0",
        "--ip-family",
        "dual",
    ]);
    use_backend(&lab, backend);
    apply_yaml(
        &lab,
        &manifest(&|_, _| "  containers:\n  - name: cont\n    image: sluice-lab\n".into()),
    );
    let ips = wait_running(&lab, &all_pods());
    let ips6 = pod_ips6(&lab);
    let pods = all_pods()
        .into_iter()
        .map(|(ns, pod)| {
            let id = format!("{ns}/{pod}");
            P {
                ns,
                pod,
                ip: ips[&id],
                ip6: Some(
                    *ips6
                        .get(&id)
                        .unwrap_or_else(|| panic!("{id} has no IPv6 podIP: {ips6:?}")),
                ),
            }
        })
        .collect::<Vec<_>>();
    let mut netns = Vec::new();
    for p in &pods {
        let name = lab.pod_netns(p.ns, p.pod);
        assert!(netns_with_prefix(&name).contains(&name), "no {name}");
        netns.push(std::fs::File::open(format!("/run/netns/{name}")).unwrap());
    }
    let env = Env {
        backend,
        lab,
        pods,
        netns,
        deadline: ENFORCE_DEADLINE,
        ipv6: true,
    };
    for node in node_names(&env.lab) {
        let (nft, ipt) = kernel_has(&env.lab, &node);
        assert_eq!(
            (nft, ipt),
            (backend == "nftables", backend == "iptables"),
            "{node}: nft table {nft}, iptables chains {ipt}"
        );
        if backend == "iptables" {
            let v6 = ip6tables_save(&env.lab, &node);
            assert!(
                v6.contains(":SLUICE-FORWARD") && !v6.contains("SLUICE-V6-GUARD"),
                "{node}: the IPv6 chains are not sluice's policy chains:\n{v6}"
            );
        }
    }
    let open = env.expected(ALL_PORTS, &|_, _, _| true);
    let (got, _) = env.converge(&open);
    assert_eq!(
        got,
        open,
        "not all open over IPv6 at the start:\n{}",
        render(&env, &got, Some(&open))
    );
    env
}

fn ip6tables_save(lab: &Lab, node: &str) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.node_netns(node),
            "ip6tables-save",
            "-t",
            "filter",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip6(p: &P) -> Ipv6Addr {
    p.ip6.unwrap()
}

fn net64(ip: Ipv6Addr) -> Ipv6Net {
    Ipv6Net::new(ip, 64).unwrap().trunc()
}

/// The shared cases, those naming IPv4 addresses with their IPv6 truth, and the IPv6 ones.
fn cases_v6(env: &Env) -> Vec<Case> {
    let x = |t: &P| t.ns == "x";
    let mut out = Vec::new();
    let mut replaced = 0;
    for mut c in cases(env) {
        if IPV4_ADDRESS_CASES.contains(&c.name) {
            replaced += 1;
            assert_eq!(c.steps.len(), 1, "{}", c.name);
            c.steps[0].truth = if c.name.starts_with("ClusterNetworkPolicy") {
                // The Deny names an IPv4 network: no IPv6 flow is denied.
                Box::new(|_, _, _| true)
            } else {
                // x is isolated and its only peers are IPv4 addresses.
                Box::new(move |_, t, _| !x(t))
            };
        }
        out.push(c);
    }
    assert_eq!(
        replaced,
        IPV4_ADDRESS_CASES.len(),
        "a shared case was renamed"
    );
    let yb = ip6(env.pod("y/b"));
    let xa_net = net64(ip6(env.pod("x/a")));
    let y_pods: Vec<String> = env
        .pods
        .iter()
        .filter(|p| p.ns == "y")
        .map(|p| format!("{}/32", p.ip))
        .collect();
    let z_pods6: Vec<String> = env
        .pods
        .iter()
        .filter(|p| p.ns == "z")
        .map(|p| format!("{}/128", ip6(p)))
        .collect();
    out.extend([
        case(
            "IPv6: allow x from fd00::/8 except y/b's IPv6 address (ipBlock with except)",
            vec![step(
                np(
                    "ipblock6",
                    "x",
                    &format!("  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: \"fd00::/8\", except: [\"{yb}/128\"]}}}}]}}]"),
                ),
                BOTH,
                move |f, t, _| !x(t) || ip6(f) != yb,
            )],
        ),
        case(
            "IPv6: allow x from ::/0 except x/a's node's /64 (ipBlock except a subnet)",
            vec![step(
                np(
                    "ipblock6-net",
                    "x",
                    &format!("  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: \"::/0\", except: [\"{xa_net}\"]}}}}]}}]"),
                ),
                BASIC,
                move |f, t, _| !x(t) || !xa_net.contains(&ip6(f)),
            )],
        ),
        case(
            "IPv6: one rule with an IPv4 block (y's pods) and an IPv6 block (z's pods)",
            vec![step(
                np(
                    "mixed",
                    "x",
                    &format!(
                        "  podSelector: {{}}\n  ingress:\n  - from: [{}, {}]\n",
                        y_pods.iter().map(|c| format!("{{ipBlock: {{cidr: \"{c}\"}}}}")).collect::<Vec<_>>().join(", "),
                        z_pods6.iter().map(|c| format!("{{ipBlock: {{cidr: \"{c}\"}}}}")).collect::<Vec<_>>().join(", "),
                    ),
                ),
                BASIC,
                move |f, t, _| !x(t) || f.ns == "z",
            )],
        ),
        case(
            "IPv6: egress of x to an IPv6 block of z's pods on UDP 80 only",
            vec![step(
                np(
                    "egress6",
                    "x",
                    &format!(
                        "  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{}]\n    ports: [{{protocol: UDP, port: 80}}]\n",
                        z_pods6.iter().map(|c| format!("{{ipBlock: {{cidr: \"{c}\"}}}}")).collect::<Vec<_>>().join(", "),
                    ),
                ),
                ALL_PORTS,
                move |f, t, p| !x(f) || (t.ns == "z" && p == UDP80),
            )],
        ),
        cnp_case(
            "IPv6: ClusterNetworkPolicy Admin Deny of egress from x to y/b's IPv6 address",
            cnp_spec(
                "deny-cidr6",
                "Admin",
                1,
                "    namespaces:\n      matchLabels: {ns: \"x\"}",
                "egress",
                &format!("  - action: Deny\n    to:\n    - networks: [\"{yb}/128\"]"),
            ),
            move |f, t, _| !(f.ns == "x" && ip6(t) == yb),
        ),
    ]);
    out
}

fn suite(backend: &'static str) -> Vec<Outcome> {
    let env = setup(backend);
    let started = std::time::Instant::now();
    let outcomes: Vec<Outcome> = cases_v6(&env).iter().map(|c| run_case(&env, c)).collect();
    eprintln!(
        "{backend} over IPv6: {} cases in {:?}",
        outcomes.len(),
        started.elapsed()
    );
    if outcomes.iter().any(|o| o.failure.is_some()) {
        let dir = std::env::temp_dir().join(format!("netpol6-{}-{backend}", env.lab.name));
        let _ = std::fs::create_dir_all(&dir);
        for node in node_names(&env.lab) {
            let log = format!("/run/sluice/lab/{}/nodes/{node}/agent.log", env.lab.name);
            if let Ok(text) = std::fs::read_to_string(log) {
                let _ = std::fs::write(dir.join(format!("{node}.log")), text);
            }
            let _ = std::fs::write(
                dir.join(format!("{node}.ip6tables")),
                ip6tables_save(&env.lab, &node),
            );
        }
        eprintln!("{backend}: agent logs kept in {}", dir.display());
    }
    outcomes
}

#[test]
fn truth_tables_hold_over_ipv6_and_agree_on_both_renderers() {
    if !have_root() {
        return;
    }
    let _alone = one_at_a_time();
    both_renderers_agree(suite, 30);
}

fn namespace_yaml(ns: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n---\n")
}

/// A lab pod (serving TCP and UDP on 80 and 81, on both families) labelled `pod: NAME`.
fn pod_yaml(ns: &str, name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: \"{ns}\"\n  labels: {{pod: {name}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: cont\n    image: sluice-lab\n    ports:\n    - {{name: http, containerPort: 80, protocol: TCP}}\n---\n"
    )
}

/// An established IPv6 TCP connection that a new policy denies stops passing within a second
/// (its conntrack entry is cut, and the pick-up of the flow from either end is dropped), and a
/// new one is refused; on each renderer in turn, in one dual lab.
#[test]
fn a_denied_established_ipv6_connection_stops_within_a_second_on_both_renderers() {
    if !have_root() {
        return;
    }
    let _alone = one_at_a_time();
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--pods-per-node",
        "0",
        "--ip-family",
        "dual",
    ]);
    let (n1, n2) = (
        format!("{}-node-1", lab.name),
        format!("{}-node-2", lab.name),
    );
    apply_yaml(
        &lab,
        &(namespace_yaml("r") + &pod_yaml("r", "cl", &n1) + &pod_yaml("r", "sv", &n2)),
    );
    wait_running(&lab, &[("r", "cl"), ("r", "sv")]);
    let sv = pod_ips6(&lab)["r/sv"];
    for (round, backend) in ["iptables", "nftables"].into_iter().enumerate() {
        use_backend(&lab, backend);
        let passed_for = established_cut(&lab, sv.into(), 7070 + round as u16);
        eprintln!(
            "{backend}: the established IPv6 connection passed for {passed_for:?} after the deny"
        );
        assert!(
            passed_for < Duration::from_secs(1),
            "{backend}: echoes kept passing for {passed_for:?} after the deny"
        );
        assert!(
            !probe(
                &lab.pod_netns("r", "cl"),
                std::net::SocketAddr::new(sv.into(), 80),
                Proto::Tcp,
                "r/sv"
            ),
            "{backend}: a new IPv6 connection passed the deny"
        );
        kubectl_ok(&lab, &["delete", "networkpolicy", "-n", "r", "deny"]);
    }
}

/// `policy-log-drops` over IPv6, on each renderer in turn in one dual lab: denied IPv6 TCP and
/// UDP connects are logged by the agent with the pod, the direction, `tier=NetworkPolicy`, the
/// policy and the IPv6 flow (both addresses, the protocol, the destination port), and no drop
/// line lacks its addresses; with two Admin ClusterNetworkPolicies denying egress to IPv6
/// networks, a drop names the one whose network holds the flow's IPv6 destination.
#[test]
fn denied_ipv6_connects_are_logged_with_their_flow_on_both_renderers() {
    if !have_root() {
        return;
    }
    let _alone = one_at_a_time();
    let lab = Lab::up(&[
        "--nodes",
        "1",
        "--pods-per-node",
        "0",
        "--ip-family",
        "dual",
    ]);
    let node = format!("{}-node-1", lab.name);
    apply_yaml(
        &lab,
        &(namespace_yaml("d") + &pod_yaml("d", "cl", &node) + &pod_yaml("d", "sv", &node)),
    );
    wait_running(&lab, &[("d", "cl"), ("d", "sv")]);
    let ips6 = pod_ips6(&lab);
    let (cl, sv) = (ips6["d/cl"], ips6["d/sv"]);
    let cl_netns = lab.pod_netns("d", "cl");
    let connect = |proto: Proto| probe(&cl_netns, SocketAddr::new(sv.into(), 80), proto, "d/sv");
    let wait_for = |want: bool| {
        sluice_e2e::eventually(Duration::from_secs(20), || connect(Proto::Tcp) == want)
    };
    set_log_drops(&lab, true);
    for backend in ["iptables", "nftables"] {
        use_backend(&lab, backend);
        assert!(
            wait_for(true),
            "{backend}: d/cl does not reach d/sv over IPv6"
        );
        let seen = drop_lines(&lab, &node).len();
        let new_lines = || drop_lines(&lab, &node).split_off(seen);
        // Each connect is new, dropped and so logged; wait for a line `want` accepts.
        let logged = |proto: Proto, want: &dyn Fn(&String) -> bool| {
            sluice_e2e::eventually(Duration::from_secs(15), || {
                let _ = connect(proto);
                new_lines().iter().any(want)
            })
        };
        apply_yaml(
            &lab,
            &np(
                "deny-sv",
                "d",
                "  podSelector: {matchLabels: {pod: sv}}\n  policyTypes: [Ingress]",
            ),
        );
        assert!(wait_for(false), "{backend}: the deny never held over IPv6");
        for (proto, name) in [(Proto::Tcp, "tcp"), (Proto::Udp, "udp")] {
            let want = |l: &String| {
                l.contains("pod=d/sv")
                    && l.contains("direction=ingress")
                    && l.contains("tier=NetworkPolicy")
                    && l.contains("policies=d/deny-sv ")
                    && l.contains(&format!("src={cl} "))
                    && l.contains(&format!("dst={sv} "))
                    && l.contains(&format!("protocol={name} "))
                    && l.contains("dport=Some(80)")
            };
            assert!(
                logged(proto, &want),
                "{backend}: no {name} drop logged for d/cl -> d/sv over IPv6; new drop lines: {:#?}",
                new_lines()
            );
        }
        kubectl_ok(&lab, &["delete", "networkpolicy", "-n", "d", "deny-sv"]);
        // Two Admin denies of d's egress to IPv6 networks: the drop names the one holding sv.
        let deny_to = |name: &str, priority: i32, network: &str| {
            cnp_spec(
                name,
                "Admin",
                priority,
                "    namespaces:\n      matchLabels: {kubernetes.io/metadata.name: \"d\"}",
                "egress",
                &format!("  - action: Deny\n    to:\n    - networks: [\"{network}\"]"),
            )
        };
        apply_yaml(
            &lab,
            &(deny_to("deny-elsewhere6", 1, "fd00:dead:beef::/64")
                + &deny_to("deny-sv6", 2, &format!("{sv}/128"))),
        );
        assert!(
            wait_for(false),
            "{backend}: the Admin deny never held over IPv6"
        );
        let want_admin = |l: &String| {
            l.contains("pod=d/cl")
                && l.contains("direction=egress")
                && l.contains("tier=Admin")
                && l.contains("policies=deny-sv6 ")
                && l.contains(&format!("src={cl} "))
                && l.contains(&format!("dst={sv} "))
                && l.contains("protocol=tcp ")
                && l.contains("dport=Some(80)")
        };
        assert!(
            logged(Proto::Tcp, &want_admin),
            "{backend}: no Admin-tier drop naming deny-sv6 for d/cl -> d/sv over IPv6; new drop lines: {:#?}",
            new_lines()
        );
        kubectl_ok(
            &lab,
            &[
                "delete",
                "clusternetworkpolicies",
                "deny-elsewhere6",
                "deny-sv6",
            ],
        );
        let unread: Vec<String> = new_lines()
            .into_iter()
            .filter(|l| l.contains("src= ") || l.contains("protocol= "))
            .collect();
        assert!(
            unread.is_empty(),
            "{backend}: drops logged without their flow: {unread:#?}"
        );
        eprintln!(
            "{backend}: {} IPv6 drops logged, e.g. {}",
            new_lines().len(),
            new_lines().first().map(String::as_str).unwrap_or("")
        );
    }
}
