//! An IPv6-only lab (`--ip-family ipv6`: `cluster-cidr` IPv6 only, the Nodes' podCIDRs IPv6
//! only, the tunnels over the IPv6 underlay): every pod holds one IPv6 /128 and no IPv4
//! address, each node's subnet.env has only the IPv6 pair, every pod reaches every other across
//! nodes over IPv6 (ICMPv6, TCP, UDP) through VXLAN and, after a live flip of `encryption`,
//! through WireGuard and back, with the outer packets IPv6 on the wire; IPv6 egress reaches
//! the lab's internet masqueraded to the node's address; and NetworkPolicy holds on IPv6
//! addresses (a deny-all, then an `ipBlock` allow with an `except`) on both renderers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::dual::*;
use sluice_e2e::eventually;
use sluice_e2e::have_root;
use sluice_e2e::lab::{output_text, up_is_refused, Lab};
use sluice_e2e::netpol::{agent_http, apply_yaml, kernel_has, use_backend};
use std::process::Command;
use std::time::Duration;

/// Every pair of the lab's pods answers the pings of `lab status` (over IPv6: the pods have no
/// other address) within `within`.
fn every_pair_reaches(lab: &Lab, within: Duration) -> bool {
    eventually(within, || all_true(&lab.status()["reachability"]))
}

/// The route to `subnet6` in `netns` goes through `dev`.
fn routed_via(lab: &Lab, netns: &str, subnet6: &str, dev: &str) -> bool {
    let r = lab.ip_json(netns, &["-6", "route", "show", subnet6]);
    r[0]["dev"] == dev
}

/// The pod's own addresses of `family` (`-4` or `-6`) on eth0, global scope, from `ip -j`.
fn pod_addresses(lab: &Lab, pod: &Pod, family: &str) -> Vec<String> {
    let (ns, name) = pod.id.split_once('/').unwrap();
    let v = lab.ip_json(
        &lab.pod_netns(ns, name),
        &[family, "addr", "show", "dev", "eth0", "scope", "global"],
    );
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| Some(format!("{}/{}", a["local"].as_str()?, a["prefixlen"])))
        .collect()
}

fn subnet_env(lab: &Lab, node: &str) -> String {
    let path = format!("/run/sluice/lab/{}/nodes/{node}/subnet.env", lab.name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Whether `from` reaches `to` over TCP and over UDP, each as `want`, within `within` (policy
/// changes take effect within a few seconds).
fn reaches_as(lab: &Lab, from: &Pod, to: &Pod, want: bool, within: Duration) -> bool {
    eventually(within, || {
        ["tcp", "udp"]
            .iter()
            .all(|proto| probe(lab, from, to, proto, true) == want)
    })
}

/// A deny-all ingress in the pods' namespace, then an allow from the cluster's IPv6 range
/// except the first pod's node's /64: the first pod is cut off, the second let through.
fn policy_on_ipv6(lab: &Lab, pods: &[Pod]) {
    let (a, b, target) = (&pods[0], &pods[1], &pods[2]);
    let ns = target.id.split_once('/').unwrap().0;
    let within = Duration::from_secs(15);
    assert!(
        reaches_as(lab, a, target, true, within),
        "before any policy"
    );
    apply_yaml(
        lab,
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-all\n  namespace: {ns}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
        ),
    );
    for from in [a, b] {
        assert!(
            reaches_as(lab, from, target, false, within),
            "deny-all: {} still reaches {}",
            from.id,
            target.id
        );
    }
    apply_yaml(
        lab,
        &format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-v6-block\n  namespace: {ns}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: fd00:10:244::/56\n        except: [\"{}\"]\n",
            a.subnet6()
        ),
    );
    assert!(
        reaches_as(lab, b, target, true, within),
        "ipBlock allow: {} ({}) does not reach {}",
        b.id,
        b.v6,
        target.id
    );
    assert!(
        reaches_as(lab, a, target, false, within),
        "ipBlock except {}: {} still reaches {}",
        a.subnet6(),
        a.id,
        target.id
    );
    // Policies gone: everyone reaches everyone again.
    lab.kubectl_ok(&[
        "delete",
        "networkpolicy",
        "-n",
        ns,
        "deny-all",
        "allow-v6-block",
    ]);
    assert!(
        reaches_as(lab, a, target, true, within),
        "after the policies went"
    );
}

/// Each node holds exactly one lease, of its IPv6 subnet (the one its pod is in), and its
/// agent is ready.
fn one_ipv6_lease_per_node_and_ready(lab: &Lab, pods: &[Pod]) {
    let status = lab.status();
    for node in status["nodes"].as_array().unwrap() {
        let name = node["name"].as_str().unwrap();
        let leases: Vec<String> = node["leases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["subnet"].as_str().unwrap().to_string())
            .collect();
        let mine: Vec<String> = pods
            .iter()
            .filter(|p| p.node == name)
            .map(Pod::subnet6)
            .collect();
        assert_eq!(leases, mine, "{name}: {node}");
        let ready = agent_http(lab, name, "/readyz");
        assert!(ready.starts_with("HTTP/1.1 200"), "{name} /readyz: {ready}");
    }
}

#[test]
fn an_ipv6_only_lab_runs_vxlan_and_wireguard_over_ipv6_with_egress_and_policy() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--ip-family",
        "ipv6",
    ]);
    assert!(
        every_pair_reaches(&lab, Duration::from_secs(30)),
        "not every pair reached: {:#}",
        lab.status()
    );
    let status = lab.status();
    let pods = pods(&status);
    assert_eq!(pods.len(), 3);
    assert!(
        status["reachabilityIpv6"].is_null(),
        "one matrix only: {status:#}"
    );
    one_ipv6_lease_per_node_and_ready(&lab, &pods);
    for p in &pods {
        // One IPv6 /128 in its node's subnet, no IPv4 at all, the default route via the
        // link-local gateway.
        assert_eq!(p.v4, None, "{} has an IPv4 podIP", p.id);
        assert!(p.v6.to_string().starts_with("fd00:10:244:"), "{}", p.v6);
        assert_eq!(
            pod_addresses(&lab, p, "-4"),
            Vec::<String>::new(),
            "{}",
            p.id
        );
        assert_eq!(
            pod_addresses(&lab, p, "-6"),
            vec![format!("{}/128", p.v6)],
            "{}",
            p.id
        );
        let (ns, name) = p.id.split_once('/').unwrap();
        let r = lab.ip_json(
            &lab.pod_netns(ns, name),
            &["-6", "route", "show", "default"],
        );
        assert_eq!(
            r[0]["gateway"], "fe80::ecee:eeff:feee:eeee",
            "{}: {r}",
            p.id
        );
        // The node: the IPv6 pair only in subnet.env; its record IPv6 only.
        let env = subnet_env(&lab, &p.node);
        assert!(
            !env.contains("SLUICE_NETWORK=") && !env.contains("SLUICE_SUBNET="),
            "{}: {env}",
            p.node
        );
        assert!(env.contains("SLUICE_NETWORK6=fd00:10:244::/56\n"), "{env}");
        assert!(
            env.contains(&format!("SLUICE_SUBNET6={}\n", p.subnet6())),
            "{env}"
        );
        assert!(
            env.contains("SLUICE_MTU=") && env.contains("SLUICE_IPMASQ=true"),
            "{env}"
        );
        let doc = node_doc(&lab, &p.node);
        assert_eq!(doc["subnet"], serde_json::Value::Null, "{doc:#}");
        assert_eq!(doc["subnetV6"], p.subnet6(), "{doc:#}");
        assert_eq!(doc["underlay"], p.node_underlay_v6(), "{doc:#}");
        assert_eq!(doc["peers"].as_array().map(Vec::len), Some(2), "{doc:#}");
        let table = node_status(&lab, &p.node, "table");
        assert!(
            table.contains(&format!("subnet      {}\n", p.subnet6()))
                && table.contains("ready       yes"),
            "{table}"
        );
        // The VXLAN packets over the IPv6 underlay are kept out of conntrack, as over IPv4.
        let nft = Command::new("ip")
            .args(["netns", "exec", &lab.node_netns(&p.node)])
            .args(["nft", "list", "table", "ip6", "sluice-nat"])
            .output()
            .unwrap();
        let nft = String::from_utf8_lossy(&nft.stdout);
        assert!(
            nft.contains(&format!(
                "ip6 daddr {} udp dport 8472 notrack",
                p.node_underlay_v6()
            )),
            "{}: {nft}",
            p.node
        );
        // Nothing of IPv4 is routed for pods: no sluice IPv4 table.
        let tables = Command::new("ip")
            .args(["netns", "exec", &lab.node_netns(&p.node)])
            .args(["nft", "list", "tables"])
            .output()
            .unwrap();
        let tables = String::from_utf8_lossy(&tables.stdout);
        assert!(
            tables.contains("table ip6 sluice-nat") && !tables.contains("table ip sluice-nat"),
            "{}: {tables}",
            p.node
        );
    }
    // A pod's /128 host route deleted by hand is put back by its agent (drift repair).
    let n0 = lab.node_netns(&pods[0].node);
    let host_route = || {
        lab.ip_json(
            &n0,
            &["-6", "route", "show", &format!("{}/128", pods[0].v6)],
        )
    };
    let dev = host_route()[0]["dev"].as_str().unwrap().to_string();
    assert!(dev.starts_with("sl"), "{dev}");
    let del = Command::new("ip")
        .args(["netns", "exec", &n0, "ip", "-6", "route", "del"])
        .arg(format!("{}/128", pods[0].v6))
        .output()
        .unwrap();
    assert!(del.status.success(), "{}", output_text(&del));
    assert!(
        eventually(Duration::from_secs(20), || host_route()[0]["dev"]
            == dev.as_str()),
        "the /128 route to {} did not come back",
        pods[0].v6
    );
    // VXLAN over IPv6: every pair across nodes, ICMPv6/TCP/UDP; the wire carries outer IPv6.
    for a in &pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            assert!(
                routed_via(&lab, &lab.node_netns(&a.node), &b.subnet6(), "sluice.vxlan"),
                "{} -> {}",
                a.node,
                b.subnet6()
            );
        }
    }
    for (i, a) in pods.iter().enumerate() {
        for b in &pods[i + 1..] {
            reach_ipv6(&lab, a, b);
        }
    }
    let (u0, u1) = (pods[0].node_underlay_v6(), pods[1].node_underlay_v6());
    outer_packets_are_ipv6(&lab, &pods[0], &pods[1], 8472, &u0, &u1);
    ipv6_egress_is_masqueraded(&lab, &pods);
    // The live flip: WireGuard over IPv6 takes over, then VXLAN comes back.
    for (value, dev, port) in [
        ("wireguard", "sluice.wg", 51820),
        ("none", "sluice.vxlan", 8472),
    ] {
        lab.set_config("encryption", value);
        assert!(
            eventually(Duration::from_secs(20), || pods[1..]
                .iter()
                .all(|b| routed_via(&lab, &n0, &b.subnet6(), dev))),
            "encryption {value}: peers not via {dev}"
        );
        // (Its peers' allowed IPs, their IPv6 subnets only, are the datapath plan's unit test;
        // here the pods' IPv6 traffic crossing the device shows them.)
        assert!(
            every_pair_reaches(&lab, Duration::from_secs(20)),
            "encryption {value}: not all reachable: {:#}",
            lab.status()
        );
        for (i, a) in pods.iter().enumerate() {
            for b in &pods[i + 1..] {
                reach_ipv6(&lab, a, b);
            }
        }
        outer_packets_are_ipv6(&lab, &pods[0], &pods[1], port, &u0, &u1);
    }
    // NetworkPolicy on IPv6 on both renderers: nftables (what `auto` takes here), then
    // iptables (ip6tables and inet6 ipsets) after the agents restart with it.
    assert!(kernel_has(&lab, &pods[2].node).0, "nftables first");
    policy_on_ipv6(&lab, &pods);
    use_backend(&lab, "iptables");
    assert_eq!(
        kernel_has(&lab, &pods[2].node),
        (false, true),
        "iptables now"
    );
    assert!(
        every_pair_reaches(&lab, Duration::from_secs(30)),
        "iptables: not all reachable: {:#}",
        lab.status()
    );
    policy_on_ipv6(&lab, &pods);
    let down = lab.down();
    assert!(down.status.success(), "{}", output_text(&down));
}

#[test]
fn an_ipv6_only_lab_with_leased_subnets_reaches_across_nodes() {
    if !have_root() {
        return;
    }
    // subnet-source lease: the agents take IPv6 leases themselves (not the Nodes' podCIDRs).
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
        "--ip-family",
        "ipv6",
        "--subnet-source",
        "lease",
    ]);
    assert!(
        every_pair_reaches(&lab, Duration::from_secs(30)),
        "not every pair reached: {:#}",
        lab.status()
    );
    let pods = pods(&lab.status());
    assert_eq!(pods.len(), 2);
    assert_ne!(pods[0].subnet6(), pods[1].subnet6());
    one_ipv6_lease_per_node_and_ready(&lab, &pods);
    reach_ipv6(&lab, &pods[0], &pods[1]);
    let down = lab.down();
    assert!(down.status.success(), "{}", output_text(&down));
}

#[test]
fn an_ipv6_only_lab_refuses_an_ipv4_underlay_and_real_kubernetes() {
    if !have_root() {
        return;
    }
    up_is_refused(
        &["--ip-family", "ipv6", "--underlay", "ipv4"],
        "--underlay ipv4 contradicts it",
    );
    up_is_refused(
        &["--ip-family", "ipv6", "--kubernetes", "/nonexistent"],
        "--ip-family ipv6 is for the embedded API server's labs",
    );
}
