//! NetworkPolicy end to end, on real packets, in the style of the Kubernetes e2e netpol suite:
//! namespaces x, y, z (labelled `ns=x` …) with pods a, b, c (labelled `pod=a` …) serving TCP,
//! UDP and SCTP on ports 80 and 81; each case applies policies, waits (bounded) until the full
//! 9×9 reachability matrix equals the one its own little truth table predicts, then removes
//! them. The suite runs once per renderer (`policy-backend: nftables` and `iptables`, one lab
//! each, side by side) and the two must measure the same matrices.
//!
//! Also: a pod made while its node's agent is stopped is unreachable (and cannot send) until the
//! agent is back and has programmed it; an established TCP connection that a new policy denies
//! stops passing within 1 s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::have_root;
use sluice_e2e::lab::{in_netns, lab_cmd, netns_with_prefix, Lab};
use sluice_e2e::netpol::*;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// The embedded lab's pods run `sluice lab serve` (image `sluice-lab`), placed by the lab.
fn manifest() -> String {
    sluice_e2e::netpol::manifest(&|_, _| {
        "  containers:\n  - name: cont\n    image: sluice-lab\n".into()
    })
}

/// SCTP: measured where the kernel has it, else every probe must say so (exit 2).
fn check_sctp(env: &Env) -> Option<String> {
    if std::path::Path::new("/proc/net/sctp").exists() {
        // Not reached on this machine kind; SCTP rules are proven by the renderers' tests.
        return None;
    }
    let out = lab_cmd(
        &[
            "probe",
            "--name",
            &env.lab.name,
            "x/a",
            "y/b",
            "80",
            "--protocol",
            "sctp",
            "--timeout",
            "1s",
        ],
        20,
    );
    (out.status.code() != Some(2)).then(|| {
        format!(
            "sctp probe: exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn setup(backend: &'static str) -> Env {
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "0"]);
    use_backend(&lab, backend);
    apply_yaml(&lab, &manifest());
    let ips = wait_running(&lab, &all_pods());
    let pods = all_pods()
        .into_iter()
        .map(|(ns, pod)| P {
            ns,
            pod,
            ip: ips[&format!("{ns}/{pod}")],
            ip6: None,
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
        ipv6: false,
    };
    // Only the chosen renderer's rules are in the kernel (the other was swept at the switch).
    for node in node_names(&env.lab) {
        let (nft, ipt) = kernel_has(&env.lab, &node);
        assert_eq!(
            (nft, ipt),
            (backend == "nftables", backend == "iptables"),
            "{node}: nft table {nft}, iptables chains {ipt}"
        );
    }
    let open = env.expected(ALL_PORTS, &|_, _, _| true);
    let (got, _) = env.converge(&open);
    assert_eq!(
        got,
        open,
        "not all open at the start:\n{}",
        render(&env, &got, Some(&open))
    );
    // SCTP: measured where the kernel has it; here every probe must say it is unsupported.
    if let Some(e) = check_sctp(&env) {
        panic!("{e}");
    }
    env
}

fn suite(backend: &'static str) -> Vec<Outcome> {
    let env = setup(backend);
    // The lab goes with `env`: the agents' logs are kept for the post-mortem.
    run_all(&env, &|node| {
        std::fs::read_to_string(format!(
            "/run/sluice/lab/{}/nodes/{node}/agent.log",
            env.lab.name
        ))
        .ok()
    })
}

#[test]
fn truth_tables_hold_and_agree_on_both_renderers() {
    if !have_root() {
        return;
    }
    both_renderers_agree(suite, 25);
}

fn pod_yaml(ns: &str, name: &str, label: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: \"{ns}\"\n  labels: {{pod: {label}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: cont\n    image: sluice-lab\n    ports:\n    - {{name: http, containerPort: 80, protocol: TCP}}\n---\n"
    )
}

fn namespace_yaml(ns: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\"}}\n---\n")
}

/// A TCP probe from pod `from` to `to`'s port 80, answered with `to`'s identity.
fn reaches(lab: &Lab, from: &str, to: &str, ips: &BTreeMap<String, Ipv4Addr>) -> bool {
    let (ns, name) = from.split_once('/').unwrap();
    probe(
        &lab.pod_netns(ns, name),
        SocketAddrV4::new(ips[to], 80),
        Proto::Tcp,
        to,
    )
}

/// Polls `reaches` until it equals `want`; false if the deadline passed first.
fn until_reach(
    lab: &Lab,
    from: &str,
    to: &str,
    ips: &BTreeMap<String, Ipv4Addr>,
    want: bool,
    deadline: Duration,
) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if reaches(lab, from, to, ips) == want {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pod_made_while_the_agent_is_stopped_is_isolated_until_programmed() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "0"]);
    let (n1, n2) = (
        format!("{}-node-1", lab.name),
        format!("{}-node-2", lab.name),
    );
    apply_yaml(
        &lab,
        &(namespace_yaml("q")
            + &namespace_yaml("open")
            + &pod_yaml("open", "sink", "sink", &n1)
            + &pod_yaml("q", "client", "client", &n1)
            + &pod_yaml("q", "other", "other", &n1)
            + &pod_yaml("q", "server1", "server", &n2)
            + &np(
                "default-deny",
                "q",
                "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: client}}}]}]",
            )),
    );
    let ips = wait_running(
        &lab,
        &[
            ("open", "sink"),
            ("q", "client"),
            ("q", "other"),
            ("q", "server1"),
        ],
    );
    let wait = Duration::from_secs(15);
    assert!(until_reach(&lab, "q/client", "q/server1", &ips, true, wait));
    assert!(until_reach(&lab, "q/other", "q/server1", &ips, false, wait));
    assert!(until_reach(
        &lab,
        "q/server1",
        "open/sink",
        &ips,
        true,
        wait
    ));

    // The agent of node 2 stops; a pod is made there meanwhile.
    let out = lab_cmd(&["agent", "--name", &lab.name, "stop", &n2], 30);
    assert!(out.status.success());
    apply_yaml(&lab, &pod_yaml("q", "server2", "server", &n2));
    let ips = wait_running(
        &lab,
        &[
            ("open", "sink"),
            ("q", "client"),
            ("q", "other"),
            ("q", "server1"),
            ("q", "server2"),
        ],
    );
    // Its veth is unknown to the rules in force: nothing in, nothing out, for as long as we look.
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert!(
            !reaches(&lab, "q/client", "q/server2", &ips),
            "server2 reachable before its agent programmed it"
        );
        assert!(
            !reaches(&lab, "q/server2", "open/sink", &ips),
            "server2 could send before its agent programmed it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The agent comes back and programs it: exactly the policy's flows pass.
    let back = Instant::now();
    let out = lab_cmd(&["agent", "--name", &lab.name, "start", &n2], 30);
    assert!(out.status.success());
    assert!(
        until_reach(
            &lab,
            "q/client",
            "q/server2",
            &ips,
            true,
            Duration::from_secs(30)
        ),
        "server2 not reachable after its agent came back"
    );
    eprintln!(
        "server2 programmed {:?} after the agent's start",
        back.elapsed()
    );
    // Its egress is open (no policy selects it for egress): it can send now.
    assert!(until_reach(
        &lab,
        "q/server2",
        "open/sink",
        &ips,
        true,
        wait
    ));
    assert!(!reaches(&lab, "q/other", "q/server2", &ips));
}

#[test]
fn a_denied_established_tcp_connection_stops_within_a_second() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "0"]);
    let (n1, n2) = (
        format!("{}-node-1", lab.name),
        format!("{}-node-2", lab.name),
    );
    apply_yaml(
        &lab,
        &(namespace_yaml("r") + &pod_yaml("r", "cl", "cl", &n1) + &pod_yaml("r", "sv", "sv", &n2)),
    );
    let ips = wait_running(&lab, &[("r", "cl"), ("r", "sv")]);
    let sv = ips["r/sv"];
    let passed_for = established_cut(&lab, sv.into(), 7070);
    eprintln!("the established connection passed for {passed_for:?} after the policy was applied");
    assert!(
        passed_for < Duration::from_secs(1),
        "echoes kept passing for {passed_for:?} after the deny"
    );
    // And a new connection is denied too.
    assert!(!reaches(&lab, "r/cl", "r/sv", &ips));
}

/// `policy-log-drops`, switched live: a connect denied by a policy is logged by the agent with
/// the pod, the direction, the stage (NetworkPolicy, then an Admin ClusterNetworkPolicy
/// denying first), the policy and the flow; switched off, nothing more is logged.
fn logged_drops(backend: &'static str) {
    let lab = Lab::up(&["--nodes", "1", "--pods-per-node", "0"]);
    use_backend(&lab, backend);
    let node = format!("{}-node-1", lab.name);
    apply_yaml(
        &lab,
        &(namespace_yaml("d")
            + &pod_yaml("d", "cl", "cl", &node)
            + &pod_yaml("d", "sv", "sv", &node)),
    );
    let ips = wait_running(&lab, &[("d", "cl"), ("d", "sv")]);
    assert!(until_reach(
        &lab,
        "d/cl",
        "d/sv",
        &ips,
        true,
        Duration::from_secs(20)
    ));
    set_log_drops(&lab, true);
    apply_yaml(
        &lab,
        &np(
            "deny-sv",
            "d",
            "  podSelector: {matchLabels: {pod: sv}}\n  policyTypes: [Ingress]",
        ),
    );
    assert!(until_reach(
        &lab,
        "d/cl",
        "d/sv",
        &ips,
        false,
        Duration::from_secs(20)
    ));
    let sv = ips["d/sv"].to_string();
    let cl = ips["d/cl"].to_string();
    let want = |l: &String| {
        l.contains("pod=d/sv")
            && l.contains("direction=ingress")
            && l.contains("policies=d/deny-sv")
            && l.contains(&format!("src={cl}"))
            && l.contains(&format!("dst={sv}"))
            && l.contains("protocol=tcp")
    };
    let found = sluice_e2e::eventually(Duration::from_secs(15), || {
        // Each probe is a new connect, dropped and so logged.
        let _ = reaches(&lab, "d/cl", "d/sv", &ips);
        drop_lines(&lab, &node).iter().any(want)
    });
    assert!(
        found,
        "{backend}: no drop logged for d/cl -> d/sv; drop lines: {:#?}",
        drop_lines(&lab, &node)
    );
    assert!(
        drop_lines(&lab, &node)
            .iter()
            .filter(|l| want(l))
            .all(|l| l.contains("tier=NetworkPolicy")),
        "{backend}: a NetworkPolicy drop not logged as tier=NetworkPolicy: {:#?}",
        drop_lines(&lab, &node)
    );
    // An Admin ClusterNetworkPolicy denying first: its drops name the tier and the policy.
    apply_yaml(
        &lab,
        &cnp(
            "deny-into-d",
            "Admin",
            1,
            "d",
            "  - action: Deny\n    from:\n    - namespaces: {}",
        ),
    );
    let want_admin = |l: &String| {
        l.contains("pod=d/sv")
            && l.contains("direction=ingress")
            && l.contains("tier=Admin")
            && l.contains("policies=deny-into-d")
            && l.contains(&format!("src={cl}"))
    };
    let found = sluice_e2e::eventually(Duration::from_secs(15), || {
        let _ = reaches(&lab, "d/cl", "d/sv", &ips);
        drop_lines(&lab, &node).iter().any(want_admin)
    });
    assert!(
        found,
        "{backend}: no Admin-tier drop logged for d/cl -> d/sv; drop lines: {:#?}",
        drop_lines(&lab, &node)
    );
    // Off again (live): the rules stop logging.
    set_log_drops(&lab, false);
    let rules_clean = sluice_e2e::eventually(Duration::from_secs(15), || {
        let netns = lab.node_netns(&node);
        let text = if backend == "nftables" {
            sluice_e2e::sh(&[
                "ip",
                "netns",
                "exec",
                &netns,
                "nft",
                "list",
                "table",
                "inet",
                "sluice-policy",
            ])
        } else {
            sluice_e2e::sh(&[
                "ip",
                "netns",
                "exec",
                &netns,
                "iptables-save",
                "-t",
                "filter",
            ])
        };
        !text.contains("sluice-drop:")
    });
    assert!(
        rules_clean,
        "{backend}: the log rules stayed after policy-log-drops: false"
    );
    // Drops logged before the switch may still be on their way to the log file.
    std::thread::sleep(Duration::from_secs(1));
    let before = drop_lines(&lab, &node).len();
    for _ in 0..5 {
        assert!(!reaches(&lab, "d/cl", "d/sv", &ips));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = drop_lines(&lab, &node);
    assert_eq!(
        after.len(),
        before,
        "{backend}: drops still logged after policy-log-drops: false: {after:#?}"
    );
}

/// The node's InternalIP, from its Node object.
fn node_ip(lab: &Lab, node: &str) -> Ipv4Addr {
    let v: Value =
        serde_json::from_slice(&lab.kubectl(&["get", "node", node, "-o", "json"]).stdout)
            .unwrap_or(Value::Null);
    v["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str()?.parse().ok())
        .unwrap_or_else(|| panic!("node {node} has no InternalIP: {v}"))
}

/// An Admin ClusterNetworkPolicy denying egress from namespace `ns` to the nodes `selector`
/// picks.
fn cnp_deny_to_nodes(name: &str, ns: &str, selector: &str) -> String {
    cnp_spec(
        name,
        "Admin",
        1,
        &format!("    namespaces:\n      matchLabels: {{kubernetes.io/metadata.name: \"{ns}\"}}"),
        "egress",
        &format!("  - action: Deny\n    to:\n    - nodes: {selector}"),
    )
}

/// Egress `nodes` peers as the agent reads the cluster's Nodes: a pod's connect to its node's
/// address (the agent's health port) is denied by an Admin Deny to every node, and allowed
/// again once the policy's node selector matches no node; then denied again when the Node
/// gets the label the selector asks for.
fn egress_to_nodes(backend: &'static str) {
    let lab = Lab::up(&["--nodes", "1", "--pods-per-node", "0"]);
    use_backend(&lab, backend);
    let node = format!("{}-node-1", lab.name);
    apply_yaml(
        &lab,
        &(namespace_yaml("d") + &pod_yaml("d", "cl", "cl", &node)),
    );
    wait_running(&lab, &[("d", "cl")]);
    let to = SocketAddr::from((node_ip(&lab, &node), 9099));
    let netns = lab.pod_netns("d", "cl");
    let connects = |want: bool| {
        sluice_e2e::eventually(Duration::from_secs(20), || {
            let netns = netns.clone();
            in_netns(&netns, move || {
                std::net::TcpStream::connect_timeout(&to, Duration::from_millis(500)).is_ok()
            }) == want
        })
    };
    assert!(
        connects(true),
        "{backend}: d/cl cannot reach {to} before any policy"
    );
    apply_yaml(&lab, &cnp_deny_to_nodes("no-nodes", "d", "{}"));
    assert!(
        connects(false),
        "{backend}: d/cl still reaches {to} past an Admin Deny to all nodes"
    );
    apply_yaml(
        &lab,
        &cnp_deny_to_nodes("no-nodes", "d", "{matchLabels: {sluice-test: blocked}}"),
    );
    assert!(
        connects(true),
        "{backend}: d/cl denied {to} by a node selector matching no node"
    );
    kubectl_ok(&lab, &["label", "node", &node, "sluice-test=blocked"]);
    assert!(
        connects(false),
        "{backend}: d/cl still reaches {to} once its Node has the label"
    );
}

#[test]
fn cluster_network_policy_egress_to_nodes_on_both_renderers() {
    if !have_root() {
        return;
    }
    std::thread::scope(|s| {
        let n = s.spawn(|| egress_to_nodes("nftables"));
        let i = s.spawn(|| egress_to_nodes("iptables"));
        n.join().expect("nftables");
        i.join().expect("iptables");
    });
}

#[test]
fn dropped_packets_are_logged_with_pod_and_policy_on_both_renderers() {
    if !have_root() {
        return;
    }
    std::thread::scope(|s| {
        let n = s.spawn(|| logged_drops("nftables"));
        let i = s.spawn(|| logged_drops("iptables"));
        n.join().expect("nftables");
        i.join().expect("iptables");
    });
}
