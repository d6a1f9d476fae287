//! A dual-stack lab (`--ip-family dual`) on real packets: every node holds an IPv4 and an IPv6
//! subnet lease, every pod an address of each, and every pod reaches every pod over both
//! families (ICMP, TCP, UDP) across nodes: through VXLAN (IPv6 inside IPv4), and through
//! WireGuard (and the live flip between them); IPv6 egress is masqueraded to the lab's internet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::{Ipv4Net, Ipv6Net};
use sluice_e2e::dual::*;
use sluice_e2e::lab::{lab_cmd, output_text, tcp_ask, tcp_server, Lab};
use sluice_e2e::{eventually, have_root};
use std::net::Ipv6Addr;
use std::time::Duration;

fn ping6(lab: &Lab, from: &Pod, to: Ipv6Addr) -> bool {
    let to = to.to_string();
    let out = lab_cmd(
        &[
            "exec", "--name", &lab.name, &from.id, "--", "ping", "-6", "-c", "1", "-W", "2", &to,
        ],
        30,
    );
    out.status.success()
}

/// The device the node routes `subnet` through (IPv6 routes).
fn route6_dev(lab: &Lab, node: &str, subnet: &str) -> String {
    let r = lab.ip_json(&lab.node_netns(node), &["-6", "route", "show", subnet]);
    r[0]["dev"].as_str().unwrap_or_default().to_string()
}

fn dual_lab_pods_reach_each_other(encryption: &str, device: &str) {
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--ip-family",
        "dual",
        "--encryption",
        encryption,
    ]);
    assert!(
        every_pair_reaches_over_both_families(&lab, Duration::from_secs(30)),
        "not every pair reached over both families: {:#}",
        lab.status()
    );
    let status = lab.status();
    let pods = pods(&status);
    assert_eq!(pods.len(), 3);
    // Each node holds one lease of each family, and its pod's addresses are in them.
    let cluster6: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
    for node in status["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        let leases: Vec<String> = node["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["subnet"].as_str().unwrap().to_string())
            .collect();
        let v4: Vec<Ipv4Net> = leases.iter().filter_map(|l| l.parse().ok()).collect();
        let v6: Vec<Ipv6Net> = leases.iter().filter_map(|l| l.parse().ok()).collect();
        assert_eq!((v4.len(), v6.len()), (1, 1), "{name}: {leases:?}");
        assert!(
            cluster6.contains(&v6[0]) && v6[0].prefix_len() == 64,
            "{v6:?}"
        );
        for p in pods.iter().filter(|p| p.node == name) {
            assert!(
                v4[0].contains(&p.ipv4()) && v6[0].contains(&p.v6),
                "{} {} {}",
                p.id,
                p.ipv4(),
                p.v6
            );
        }
        // The subnet file the plugin reads has the IPv6 pair.
        let env = std::fs::read_to_string(format!(
            "/run/sluice/lab/{}/nodes/{name}/subnet.env",
            lab.name
        ))
        .unwrap_or_default();
        assert!(env.contains(&format!("SLUICE_SUBNET6={}", v6[0])), "{env}");
    }
    for a in &pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            // The peer's IPv6 subnet goes through the tunnel under test.
            let sub6 = Ipv6Net::new(b.v6, 64).unwrap().trunc().to_string();
            assert_eq!(
                route6_dev(&lab, &a.node, &sub6),
                device,
                "{} -> {sub6}",
                a.node
            );
            assert!(ping6(&lab, a, b.v6), "ICMPv6 {} -> {}", a.id, b.id);
            for proto in ["tcp", "udp"] {
                assert!(
                    probe(&lab, a, b, proto, true),
                    "{proto}/IPv6 {} -> {}",
                    a.id,
                    b.id
                );
                assert!(
                    probe(&lab, a, b, proto, false),
                    "{proto}/IPv4 {} -> {}",
                    a.id,
                    b.id
                );
            }
        }
    }
    if encryption == "none" {
        ipv6_egress_is_masqueraded(&lab, &pods);
    }
    if encryption == "wireguard" {
        // The live flip: every IPv6 subnet moves to VXLAN and back, and stays reachable (an
        // IPv6 on-link gateway inside the subnet would be refused while the subnet is on
        // WireGuard: the link-local gateway is not).
        for (value, dev) in [("none", "sluice.vxlan"), ("wireguard", "sluice.wg")] {
            lab.set_config("encryption", value);
            for a in &pods {
                for b in pods.iter().filter(|b| b.node != a.node) {
                    let sub6 = Ipv6Net::new(b.v6, 64).unwrap().trunc().to_string();
                    assert!(
                        eventually(Duration::from_secs(20), || route6_dev(&lab, &a.node, &sub6)
                            == dev),
                        "encryption {value}: {} routes {sub6} via {}",
                        a.node,
                        route6_dev(&lab, &a.node, &sub6)
                    );
                }
            }
            assert!(
                eventually(Duration::from_secs(20), || all_true(
                    &lab.status()["reachabilityIpv6"]
                )),
                "encryption {value}: IPv6 not all reachable"
            );
            assert!(probe(&lab, &pods[0], &pods[1], "tcp", true));
        }
    }
    let down = lab.down();
    assert!(down.status.success(), "{}", output_text(&down));
}

/// IPv6 pod traffic leaving the cluster CIDR reaches the lab's internet (`fdff:203::1`, which
/// has no route to pods) from the node's IPv6 address, and not at all with masquerade off.
fn ipv6_egress_is_masqueraded(lab: &Lab, pods: &[Pod]) {
    let internet = format!("{}internet", lab.prefix());
    let (addr, peers) = tcp_server(&internet, "[fdff:203::1]:0".parse().unwrap(), "world", 64);
    let nodes: Vec<String> = (1..=3).map(|i| format!("fd00:31::{i}")).collect();
    for p in pods {
        let netns = lab.pod_netns(
            p.id.split('/').next().unwrap(),
            p.id.split('/').nth(1).unwrap(),
        );
        let mut answer = String::new();
        assert!(
            eventually(Duration::from_secs(10), || {
                answer = tcp_ask(&netns, addr).unwrap_or_default();
                answer == "world"
            }),
            "{} cannot reach the internet over IPv6",
            p.id
        );
        let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
        while peers.try_recv().is_ok() {}
        assert!(
            nodes.contains(&seen.ip().to_string()),
            "{} reached the internet as {seen}, not as a node",
            p.id
        );
        assert_ne!(seen.ip(), std::net::IpAddr::V6(p.v6));
    }
    // Without masquerade the pod's own address goes out, and nothing comes back.
    lab.set_config("masquerade", "false");
    let netns = lab.pod_netns(
        pods[0].id.split('/').next().unwrap(),
        pods[0].id.split('/').nth(1).unwrap(),
    );
    assert!(
        eventually(Duration::from_secs(20), || tcp_ask(&netns, addr).is_err()),
        "IPv6 egress still answered with masquerade off"
    );
    lab.set_config("masquerade", "true");
    assert!(
        eventually(Duration::from_secs(20), || tcp_ask(&netns, addr)
            .is_ok_and(|a| a == "world")),
        "IPv6 egress not back with masquerade on"
    );
}

#[test]
fn dual_stack_pods_reach_each_other_over_vxlan() {
    if !have_root() {
        return;
    }
    dual_lab_pods_reach_each_other("none", "sluice.vxlan");
}

#[test]
fn dual_stack_pods_reach_each_other_over_wireguard() {
    if !have_root() {
        return;
    }
    dual_lab_pods_reach_each_other("wireguard", "sluice.wg");
}

/// A NetworkPolicy that selects a pod closes its IPv6 as well as its IPv4, on both policy
/// backends: node 2 runs `iptables` (its policy chains in `ip6tables` too), node 3 `nftables`
/// (an `inet` table).
#[test]
fn selected_pods_fail_closed_on_ipv6_with_both_policy_backends() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--ip-family",
        "dual",
    ]);
    let node2 = format!("{}-node-2", lab.name);
    lab.set_config("policy-backend", "iptables");
    for action in ["stop", "start"] {
        let out = lab_cmd(&["agent", "--name", &lab.name, action, &node2], 30);
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let status = lab.status();
    let pods = pods(&status);
    let from = pods.iter().find(|p| p.node.ends_with("-node-1")).unwrap();
    let targets: Vec<&Pod> = pods.iter().filter(|p| p.node != from.node).collect();
    for to in &targets {
        assert!(
            eventually(Duration::from_secs(20), || probe(
                &lab, from, to, "tcp", true
            )),
            "before any policy: {} -> {} over IPv6",
            from.id,
            to.id
        );
    }
    let guard_jump = || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.node_netns(&node2),
                "ip6tables",
                "-S",
                "FORWARD",
            ])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout).into_owned();
        rules.contains("-j SLUICE-FORWARD") && !rules.contains("SLUICE-V6-GUARD")
    };
    assert!(
        eventually(Duration::from_secs(20), guard_jump),
        "no IPv6 policy chains on {node2}"
    );
    let ns = from.id.split('/').next().unwrap();
    let file = std::env::temp_dir().join(format!("{}-deny.yaml", lab.name));
    std::fs::write(
        &file,
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny-ingress, namespace: {ns}}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
        ),
    )
    .unwrap();
    lab.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    for to in &targets {
        for (proto, ipv6) in [("tcp", true), ("udp", true), ("tcp", false)] {
            assert!(
                eventually(Duration::from_secs(20), || !probe(
                    &lab, from, to, proto, ipv6
                )),
                "deny-ingress: {} -> {} ({proto}, ipv6={ipv6}) still answered",
                from.id,
                to.id
            );
        }
    }
    lab.kubectl_ok(&["delete", "networkpolicy", "-n", ns, "deny-ingress"]);
    for to in &targets {
        assert!(
            eventually(Duration::from_secs(20), || probe(
                &lab, from, to, "tcp", true
            )),
            "policy gone: {} -> {} over IPv6",
            from.id,
            to.id
        );
    }
    let down = lab.down();
    assert!(down.status.success(), "{}", output_text(&down));
}
