//! What the hostPort tests (`cni_hostport`, `cni_hostport_v6`, `cni_hostport_v6only`) share:
//! the backend the agent publishes, a client namespace on a link to the node, and the rules
//! sluice holds in the node, as text.

use crate::cni::CniNode;
use crate::{unique, Netns};
use std::net::{IpAddr, SocketAddr};

/// `ip:port`, of either family.
pub fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

/// Whether `tool` is installed; off CI a test without it skips, in CI it fails.
pub fn have(tool: &str) -> bool {
    let found = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have {tool} (README's test command installs it)"
        );
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// subnet.env's `SLUICE_POLICY_BACKEND`, as the agent publishes it, after what is there.
pub fn publish_backend(node: &CniNode, backend: &str) {
    let env = std::fs::read_to_string(node.subnet_file()).unwrap();
    std::fs::write(
        node.subnet_file(),
        format!("{env}SLUICE_POLICY_BACKEND={backend}\n"),
    )
    .unwrap();
}

/// sluice's IPv4 and IPv6 rules in the node for `backend`, as text (nftables: the whole
/// ruleset, twice).
pub fn rules(node: &CniNode, backend: &str) -> (String, String) {
    match backend {
        "nftables" => {
            let all = node.ns.sh(&["nft", "list", "ruleset"]);
            (all.clone(), all)
        }
        b => {
            let b6 = b.replacen("iptables", "ip6tables", 1);
            let save = |tool: &str| node.ns.sh(&[&format!("{tool}-save"), "-t", "nat"]);
            (save(b), save(&b6))
        }
    }
}

/// The hostPort mappings in the node's IPAM state.
pub fn in_state(node: &CniNode) -> Vec<serde_json::Value> {
    let b = std::fs::read(node.ipam_dir().join("allocations.json")).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
    v["hostports"].as_array().cloned().unwrap_or_default()
}

/// A client namespace behind a veth from the node (the node's end, named with this run's
/// prefix, is `veth`): `node_addrs` on the node's end, `client_addrs` on the client's `eth0`
/// (each `address/len`, IPv6 ones without duplicate detection, so usable at once), and the
/// client's IPv6 default route via `gateway6` when given.
pub struct Client {
    pub ns: Netns,
    pub veth: String,
}

pub fn client(
    node: &CniNode,
    tag: &str,
    node_addrs: &[&str],
    client_addrs: &[&str],
    gateway6: Option<&str>,
) -> Client {
    let ns = Netns::new(tag);
    let veth = unique(tag);
    node.ns.ip(&[
        "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ]);
    let add = |on: &Netns, dev: &str, a: &str| {
        let mut args = vec!["addr", "add", a, "dev", dev];
        if a.contains(':') {
            args.push("nodad");
        }
        on.ip(&args);
    };
    for a in node_addrs {
        add(&node.ns, &veth, a);
    }
    node.ns.ip(&["link", "set", &veth, "up"]);
    for a in client_addrs {
        add(&ns, "eth0", a);
    }
    ns.ip(&["link", "set", "eth0", "up"]);
    if let Some(gw) = gateway6 {
        ns.ip(&["-6", "route", "add", "default", "via", gw]);
    }
    Client { ns, veth }
}

/// Each `(from netns, to, source)` is answered over TCP with `reply` by the pod whose server
/// reports its peers to `seen`; where `source` is given, the pod saw that address (an IPv4 peer
/// of a dual socket unmapped). `context` is shown on failure (the rules, say).
pub fn assert_tcp_reaches(
    backend: &str,
    cases: &[(&str, SocketAddr, Option<&str>)],
    reply: &str,
    seen: &std::sync::mpsc::Receiver<SocketAddr>,
    context: &str,
) {
    for (ns, to, source) in cases {
        let got = crate::lab::tcp_ask(ns, *to);
        assert_eq!(
            got.as_deref().ok(),
            Some(reply),
            "{backend}: {ns} -> {to}: {got:?}\n{context}"
        );
        let peer = seen
            .recv_timeout(std::time::Duration::from_secs(3))
            .unwrap();
        if let Some(src) = source {
            let ip = match peer.ip() {
                IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
                a => a,
            };
            assert_eq!(
                ip.to_string(),
                *src,
                "{backend}: the client's source is kept"
            );
        }
    }
}

/// sluice's IPv6 hostPort rules lost behind its back (nftables: map `hp_any6` flushed;
/// iptables: ip6tables' `SLUICE-HP` chain flushed); then `client` (netns, hostPort address)
/// no longer reaches the pod, CHECK of attachment `id` fails naming `pod6`, and a repeated ADD
/// writes the rules back (CHECK passes again).
pub fn lose_ipv6_rules_and_repair(
    node: &CniNode,
    backend: &str,
    (id, pod): (&str, &Netns),
    conf: &serde_json::Value,
    pod6: &str,
    client: (&str, SocketAddr),
) {
    match backend {
        "nftables" => node
            .ns
            .sh(&["nft", "flush", "map", "inet", "sluice-hostport", "hp_any6"]),
        b => node.ns.sh(&[
            &b.replacen("iptables", "ip6tables", 1),
            "-t",
            "nat",
            "-F",
            "SLUICE-HP",
        ]),
    };
    assert!(
        crate::lab::tcp_ask(client.0, client.1).is_err(),
        "{backend}: {} still mapped",
        client.1
    );
    let check = node.call("CHECK", id, Some(&pod.path()), conf);
    assert_eq!(check.error_code(), 102, "{check:?}");
    let msg = check.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("hostPort rules missing") && msg.contains(pod6),
        "{backend}: {msg}"
    );
    node.call("ADD", id, Some(&pod.path()), conf).assert_ok();
    node.call("CHECK", id, Some(&pod.path()), conf).assert_ok();
}

/// What DEL of the node's last pod leaves: no address of either family, no veth (but
/// `client_veth`, the test's own), no IPv6 host route, nothing in the pod but `lo`, no mapping
/// in the state.
pub fn assert_del_left_nothing(node: &CniNode, pod: &Netns, client_veth: &str) {
    assert!(node.allocations().is_empty() && node.allocations_v6().is_empty());
    let links: Vec<String> = node
        .pod_links()
        .into_iter()
        .filter(|l| l != client_veth)
        .collect();
    assert!(links.is_empty(), "{links:?}");
    assert!(
        node.pod_routes_v6().is_empty(),
        "{:?}",
        node.pod_routes_v6()
    );
    assert!(pod.links().iter().all(|l| l == "lo"), "{:?}", pod.links());
    assert!(in_state(node).is_empty());
}
