//! hostPorts over IPv6 through the built plugin, on a dual-stack node (subnet.env with the IPv6
//! pair), in each backend the agent may publish: a pod's mapping without `hostIP` is reached from
//! another namespace through the node's IPv6 address (the client's IPv6 source kept) and its IPv4
//! one, from the node itself and from the pod itself (hairpin); a mapping on an IPv6 `hostIP` only
//! there and not over IPv4; `[::1]:hostPort` is not mapped (IPv6 has no `route_localnet`, as the
//! portmap plugin says); CHECK sees lost IPv6 rules; an IPv6 `hostIP` on an IPv4-only node is a
//! clear error leaving nothing; DEL leaves no rule, chain or address of either family.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use sluice_e2e::cni::CniNode;
use sluice_e2e::hostport::{
    assert_del_left_nothing, assert_tcp_reaches, at, client, have, lose_ipv6_rules_and_repair,
    publish_backend, rules,
};
use sluice_e2e::lab::{tcp_ask, tcp_server};
use sluice_e2e::{have_root, Netns};
use std::time::Duration;

const NODE_IP: &str = "172.31.249.1";
const CLIENT_IP: &str = "172.31.249.2";
const NODE_IP6: &str = "fd00:31:249::1";
const CLIENT_IP6: &str = "fd00:31:249::2";
/// A second IPv6 address of the node (on lo), for the `hostIP` mapping.
const NODE_IP6_2: &str = "fd00:31:248::3";

fn ports() -> serde_json::Value {
    json!({"runtimeConfig": {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
        {"hostPort": 8081, "containerPort": 80, "protocol": "tcp", "hostIP": NODE_IP6_2}
    ]}})
}

fn dual_node(backend: &str, subnet: &str, subnet6: &str) -> CniNode {
    let node = CniNode::new(None);
    node.set_dual_subnet_env("10.244.0.0/16", subnet, "fd00:10:244::/56", subnet6);
    publish_backend(&node, backend);
    node.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    node
}

fn scenario(backend: &str, subnet: &str, subnet6: &str) {
    let node = dual_node(backend, subnet, subnet6);
    node.ns
        .ip(&["addr", "add", &format!("{NODE_IP6_2}/128"), "dev", "lo"]);
    let c = client(
        &node,
        "h6c",
        &[&format!("{NODE_IP}/24"), &format!("{NODE_IP6}/64")],
        &[&format!("{CLIENT_IP}/24"), &format!("{CLIENT_IP6}/64")],
        Some(NODE_IP6),
    );
    let (client, cv) = (&c.ns, &c.veth);

    let pod = Netns::new("h6p");
    let conf = node.conf("1.1.0", ports());
    let added = node
        .call("ADD", "hp6", Some(&pod.path()), &conf)
        .assert_ok()
        .json();
    let pod6 = added["ips"][1]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(pod6.contains(':'), "{added}");
    // A dual socket: IPv4 connections arrive as v4-mapped addresses.
    let (_, seen) = tcp_server(&pod.name, at("::", 80), "pod6", 16);
    let (r4, r6) = rules(&node, backend);
    assert_tcp_reaches(
        backend,
        &[
            (&client.name, at(NODE_IP6, 8080), Some(CLIENT_IP6)),
            (&client.name, at(NODE_IP, 8080), Some(CLIENT_IP)),
            (&client.name, at(NODE_IP6_2, 8081), Some(CLIENT_IP6)),
            (&node.ns.name, at(NODE_IP6, 8080), None),
            // Hairpin: the pod through its own hostPort, over IPv6.
            (&pod.name, at(NODE_IP6, 8080), None),
        ],
        "pod6",
        &seen,
        &format!("{r4}\n{r6}"),
    );
    // The IPv6 hostIP mapping is IPv6 only, and only on its address.
    for to in [at(NODE_IP, 8081), at(NODE_IP6, 8081)] {
        assert!(
            tcp_ask(&client.name, to).is_err(),
            "{backend}: {to} must not be mapped"
        );
    }
    // [::1]:hostPort is left to the node: nothing listens there, so the connection is refused
    // (not sent to the pod).
    assert!(
        tcp_ask(&node.ns.name, at("::1", 8080)).is_err(),
        "{backend}: [::1]:8080 must not be mapped"
    );
    assert!(
        seen.recv_timeout(Duration::from_millis(300)).is_err(),
        "{backend}: the pod saw a connection it should not have"
    );
    node.call("CHECK", "hp6", Some(&pod.path()), &conf)
        .assert_ok();

    // The IPv6 rules lost behind sluice's back: CHECK says so; a repeated ADD writes them back.
    lose_ipv6_rules_and_repair(
        &node,
        backend,
        ("hp6", &pod),
        &conf,
        &pod6,
        (&client.name, at(NODE_IP6, 8080)),
    );
    assert_eq!(
        tcp_ask(&client.name, at(NODE_IP6, 8080)).ok().as_deref(),
        Some("pod6")
    );

    // DEL: no path, no rule, no chain, no address of either family.
    node.call("DEL", "hp6", Some(&pod.path()), &conf)
        .assert_ok();
    for to in [at(NODE_IP6, 8080), at(NODE_IP, 8080), at(NODE_IP6_2, 8081)] {
        assert!(
            tcp_ask(&client.name, to).is_err(),
            "{backend}: DEL left {to}"
        );
    }
    let (r4, r6) = rules(&node, backend);
    for text in [&r4, &r6] {
        assert!(
            !text.contains("8080") && !text.contains("8081") && !text.contains(&pod6),
            "{backend}: {text}"
        );
    }
    if backend != "nftables" {
        assert!(
            !r6.contains("SLUICE-HP"),
            "{backend}: the ip6tables chains stay after the last IPv6 mapping: {r6}"
        );
    }
    // The client's veth is the test's (its name carries the run prefix, as sluice's do).
    assert_del_left_nothing(&node, &pod, cv);
}

#[test]
fn ipv6_hostports_with_nftables() {
    if !have_root() || !have("nft") {
        return;
    }
    scenario("nftables", "10.244.31.0/24", "fd00:10:244:31::/64");
}

#[test]
fn ipv6_hostports_with_iptables_nft() {
    if !have_root() || !have("ip6tables-nft") {
        return;
    }
    scenario("iptables-nft", "10.244.32.0/24", "fd00:10:244:32::/64");
}

#[test]
fn ipv6_hostports_with_iptables_legacy() {
    if !have_root() || !have("ip6tables-legacy") {
        return;
    }
    scenario("iptables-legacy", "10.244.33.0/24", "fd00:10:244:33::/64");
}

/// An IPv6 `hostIP` on a node whose pods get no IPv6 address: refused before anything is made.
#[test]
fn an_ipv6_host_ip_on_an_ipv4_only_node_is_refused_and_leaves_nothing() {
    if !have_root() || !have("nft") {
        return;
    }
    let node = CniNode::new(Some("10.244.34.0/24"));
    let pod = Netns::new("h6x");
    let out = node.call(
        "ADD",
        "hpx",
        Some(&pod.path()),
        &node.conf("1.1.0", ports()),
    );
    assert_eq!(out.error_code(), 7, "{out:?}");
    let msg = out.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains(NODE_IP6_2) && msg.contains("no IPv6 address"),
        "{msg}"
    );
    assert!(node.allocations().is_empty());
    assert!(node.pod_links().is_empty());
    assert!(pod.links().iter().all(|l| l == "lo"));
    let ruleset = node.ns.sh(&["nft", "list", "ruleset"]);
    assert!(!ruleset.contains("sluice-hostport"), "{ruleset}");
}
