//! hostPorts on an IPv6-only node (subnet.env with only the IPv6 pair) through the built plugin,
//! on real packets, in each backend the agent may publish: a pod's TCP and UDP mappings are
//! reached from another namespace through the node's IPv6 address (the client's source kept),
//! from the node itself and from the pod itself (hairpin), a mapping on an IPv6 `hostIP` only
//! there; nothing is written for IPv4 (no IPv4 element in nftables, no iptables chain); CHECK
//! passes and sees lost rules; an IPv4 `hostIP` is a clear error leaving nothing; DEL leaves no
//! mapping, rule or address; the agent's start keeps a live pod's mappings, moves them on a
//! switch of backend, and sweeps them once the pod is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use sluice_e2e::cni::CniNode;
use sluice_e2e::hostport::{
    assert_del_left_nothing, assert_tcp_reaches, at, client, have, in_state,
    lose_ipv6_rules_and_repair, publish_backend, rules, Client,
};
use sluice_e2e::lab::{tcp_ask, tcp_server, udp_server};
use sluice_e2e::netpol::{probe, Proto};
use sluice_e2e::{have_root, Netns};
use std::collections::BTreeSet;
use std::time::Duration;

const NODE_IP6: &str = "fd00:31:247::1";
const CLIENT_IP6: &str = "fd00:31:247::2";
/// A second IPv6 address of the node (on lo), for the `hostIP` mapping.
const NODE_IP6_2: &str = "fd00:31:246::3";

fn ports() -> serde_json::Value {
    json!({"runtimeConfig": {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 8053, "containerPort": 53, "protocol": "udp", "hostIP": "::"},
        {"hostPort": 8081, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP6_2}
    ]}})
}

/// An IPv6-only node publishing `backend`, with a client namespace on an IPv6 link to it.
fn v6only_node(backend: &str, subnet6: &str) -> (CniNode, Client) {
    let node = CniNode::new(None);
    node.set_v6_only_subnet_env("fd00:10:244::/56", subnet6);
    publish_backend(&node, backend);
    node.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    node.ns
        .ip(&["addr", "add", &format!("{NODE_IP6_2}/128"), "dev", "lo"]);
    let c = client(
        &node,
        "h6oc",
        &[&format!("{NODE_IP6}/64")],
        &[&format!("{CLIENT_IP6}/64")],
        Some(NODE_IP6),
    );
    (node, c)
}

/// The pod's one IPv6 address in an ADD result.
fn pod_address(added: &serde_json::Value) -> String {
    let ips = added["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 1, "one IPv6 address only: {added}");
    let a = ips[0]["address"].as_str().unwrap();
    assert!(a.contains(':'), "{added}");
    a.split('/').next().unwrap().to_string()
}

/// Whether sluice's nftables table holds an element in an IPv4 map or set.
fn nft_has_ipv4_elements(node: &CniNode) -> bool {
    ["hp_ip", "hp_any", "hairpin"].iter().any(|set| {
        let kind = if *set == "hairpin" { "set" } else { "map" };
        node.ns
            .sh(&["nft", "list", kind, "inet", "sluice-hostport", set])
            .contains("elements")
    })
}

/// Sluice's IPv4 side for `backend` is empty: no IPv4 element in nftables, no iptables chain.
fn assert_no_ipv4_rules(node: &CniNode, backend: &str) {
    if backend == "nftables" {
        assert!(!nft_has_ipv4_elements(node), "{}", rules(node, backend).0);
    } else {
        let (r4, _) = rules(node, backend);
        assert!(
            !r4.contains("SLUICE-HP"),
            "{backend}: iptables written: {r4}"
        );
    }
}

fn scenario(backend: &str, subnet6: &str) {
    let (node, c) = v6only_node(backend, subnet6);
    let pod = Netns::new("h6op");
    let conf = node.conf("1.1.0", ports());
    let added = node
        .call("ADD", "hp6o", Some(&pod.path()), &conf)
        .assert_ok()
        .json();
    let pod6 = pod_address(&added);
    let (_, seen_tcp) = tcp_server(&pod.name, at("::", 80), "pod6", 16);
    let (_, seen_udp) = udp_server(&pod.name, at("::", 53), "pod6", 64);
    let (_, r6) = rules(&node, backend);
    assert_tcp_reaches(
        backend,
        &[
            (&c.ns.name, at(NODE_IP6, 8080), Some(CLIENT_IP6)),
            (&c.ns.name, at(NODE_IP6_2, 8081), Some(CLIENT_IP6)),
            (&node.ns.name, at(NODE_IP6, 8080), None),
            // Hairpin: the pod through its own hostPort.
            (&pod.name, at(NODE_IP6, 8080), None),
        ],
        "pod6",
        &seen_tcp,
        &r6,
    );
    for (ns, source) in [(&c.ns.name, Some(CLIENT_IP6)), (&pod.name, None)] {
        assert!(
            probe(ns, at(NODE_IP6, 8053), Proto::Udp, "pod6"),
            "{backend}: UDP {ns} -> [{NODE_IP6}]:8053\n{r6}"
        );
        let peer = seen_udp.recv_timeout(Duration::from_secs(3)).unwrap();
        if let Some(src) = source {
            assert_eq!(
                peer.ip().to_string(),
                src,
                "{backend}: the client's source is kept"
            );
        }
        // The probe may have sent again before the answer came.
        while seen_udp.try_recv().is_ok() {}
    }
    // The hostIP mapping is only on its address.
    assert!(
        tcp_ask(&c.ns.name, at(NODE_IP6, 8081)).is_err(),
        "{backend}: [{NODE_IP6}]:8081 must not be mapped"
    );
    assert!(seen_tcp.recv_timeout(Duration::from_millis(300)).is_err());
    assert_no_ipv4_rules(&node, backend);
    let state = in_state(&node);
    assert_eq!(state.len(), 1, "{state:?}");
    assert!(state[0].get("podIp").is_none(), "{state:?}");
    assert_eq!(state[0]["podIP6"], pod6.as_str());
    node.call("CHECK", "hp6o", Some(&pod.path()), &conf)
        .assert_ok();

    // The rules lost behind sluice's back: CHECK says so; a repeated ADD writes them back.
    lose_ipv6_rules_and_repair(
        &node,
        backend,
        ("hp6o", &pod),
        &conf,
        &pod6,
        (&c.ns.name, at(NODE_IP6, 8080)),
    );
    assert_eq!(
        tcp_ask(&c.ns.name, at(NODE_IP6, 8080)).ok().as_deref(),
        Some("pod6")
    );
    assert_no_ipv4_rules(&node, backend);

    // DEL: no path, no rule, no address.
    node.call("DEL", "hp6o", Some(&pod.path()), &conf)
        .assert_ok();
    for to in [at(NODE_IP6, 8080), at(NODE_IP6_2, 8081)] {
        assert!(tcp_ask(&c.ns.name, to).is_err(), "{backend}: DEL left {to}");
    }
    assert!(
        !probe(&c.ns.name, at(NODE_IP6, 8053), Proto::Udp, "pod6"),
        "{backend}: DEL left UDP 8053"
    );
    let (r4, r6) = rules(&node, backend);
    for text in [&r4, &r6] {
        for gone in ["8080", "8053", "8081", pod6.as_str()] {
            assert!(!text.contains(gone), "{backend}: {gone} left: {text}");
        }
    }
    if backend != "nftables" {
        assert!(
            !r4.contains("SLUICE-HP") && !r6.contains("SLUICE-HP"),
            "{backend}: chains left after the last mapping: {r4}\n{r6}"
        );
    }
    assert_del_left_nothing(&node, &pod, &c.veth);
}

#[test]
fn ipv6_only_hostports_with_nftables() {
    if !have_root() || !have("nft") {
        return;
    }
    scenario("nftables", "fd00:10:244:41::/64");
}

#[test]
fn ipv6_only_hostports_with_iptables_nft() {
    if !have_root() || !have("ip6tables-nft") {
        return;
    }
    scenario("iptables-nft", "fd00:10:244:42::/64");
}

#[test]
fn ipv6_only_hostports_with_iptables_legacy() {
    if !have_root() || !have("ip6tables-legacy") {
        return;
    }
    scenario("iptables-legacy", "fd00:10:244:43::/64");
}

/// An IPv4 `hostIP` on an IPv6-only node: refused before anything is made.
#[test]
fn an_ipv4_host_ip_on_an_ipv6_only_node_is_refused_and_leaves_nothing() {
    if !have_root() || !have("nft") {
        return;
    }
    let (node, _c) = v6only_node("nftables", "fd00:10:244:44::/64");
    let pod = Netns::new("h6ox");
    let conf = node.conf(
        "1.1.0",
        json!({"runtimeConfig": {"portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 8082, "containerPort": 80, "protocol": "tcp", "hostIP": "192.0.2.1"}
        ]}}),
    );
    let out = node.call("ADD", "hp6x", Some(&pod.path()), &conf);
    assert_eq!(out.error_code(), 7, "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("192.0.2.1") && msg.contains("IPv6-only"),
        "{msg}"
    );
    assert!(node.allocations_v6().is_empty());
    assert!(pod.links().iter().all(|l| l == "lo"));
    assert!(!rules(&node, "nftables").0.contains("sluice-hostport"));
}

/// The agent's start on an IPv6-only node (`sluice_net::cni::hostport::restore`): a live pod's
/// mapping stays reachable; a switch of backend to iptables writes ip6tables only; once the pod
/// is gone its mapping is swept from state and kernel.
#[test]
fn the_agent_start_on_an_ipv6_only_node_restores_and_sweeps() {
    if !have_root() || !have("nft") || !have("ip6tables-nft") {
        return;
    }
    use sluice_policy::hostport::HostportBackend;
    use sluice_policy::{Exec, IptablesMode};
    let (node, c) = v6only_node("nftables", "fd00:10:244:45::/64");
    let pod = Netns::new("h6or");
    node.call(
        "ADD",
        "live",
        Some(&pod.path()),
        &node.conf("1.1.0", ports()),
    )
    .assert_ok();
    let (_, _seen) = tcp_server(&pod.name, at("::", 80), "live", 16);
    let links: BTreeSet<String> = node.pod_links().into_iter().collect();
    let store = sluice_net::ipam::IpamStore::new(node.ipam_dir());
    let exec = Exec::in_netns(&node.ns.name);
    let r = sluice_net::cni::hostport::restore(&store, &exec, HostportBackend::Nftables, &links)
        .unwrap();
    assert_eq!((r.kept, r.swept), (1, 0));
    assert_eq!(
        tcp_ask(&c.ns.name, at(NODE_IP6, 8080)).ok().as_deref(),
        Some("live")
    );
    assert_no_ipv4_rules(&node, "nftables");
    let ipt = HostportBackend::Iptables(IptablesMode::Nft);
    let r = sluice_net::cni::hostport::restore(&store, &exec, ipt, &links).unwrap();
    assert_eq!((r.kept, r.swept), (1, 0));
    assert!(!rules(&node, "nftables").0.contains("sluice-hostport"));
    let (r4, r6) = rules(&node, "iptables-nft");
    assert!(r6.contains("--dport 8080"), "{r6}");
    assert!(!r4.contains("SLUICE-HP"), "{r4}");
    assert_eq!(
        tcp_ask(&c.ns.name, at(NODE_IP6, 8080)).ok().as_deref(),
        Some("live")
    );
    // The pod gone without a DEL (its veth went with it): swept everywhere.
    node.ns.ip(&[
        "link",
        "del",
        &sluice_net::podnet::host_ifname("live", "eth0"),
    ]);
    let r = sluice_net::cni::hostport::restore(&store, &exec, ipt, &BTreeSet::new()).unwrap();
    assert_eq!((r.kept, r.swept), (0, 1));
    let (r4, r6) = rules(&node, "iptables-nft");
    assert!(
        !r4.contains("SLUICE-HP") && !r6.contains("SLUICE-HP"),
        "{r4}\n{r6}"
    );
    assert!(in_state(&node).is_empty());
    assert!(tcp_ask(&c.ns.name, at(NODE_IP6, 8080)).is_err());
}
