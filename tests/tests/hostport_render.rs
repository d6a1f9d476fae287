//! sluice-policy's hostPort rules (`sluice_policy::hostport`) on real packets, for both
//! renderers: a node namespace with a pod behind a veth and a client on another link. A mapping
//! 8080 -> pod:80 must be reached from the client through the node's address (with the client's
//! own source kept, so that the pod's ingress policy sees it), from the node itself, through
//! 127.0.0.1 and from the pod itself (hairpin); a hostIP-specific mapping only on its address;
//! rendering without the pod's entry must remove the path.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::lab::{tcp_ask, tcp_server};
use sluice_e2e::{have_root, sh, Netns};
use sluice_policy::hostport::{
    iptables_jumps, render_iptables, render_nft, HostportEntry, HpProtocol, PortMapping,
};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

const NODE_IP: &str = "172.31.252.1";
const CLIENT_IP: &str = "172.31.252.2";
const NODE_IP2: &str = "172.31.253.3";
const HOST_POD_SIDE: &str = "10.244.1.1";
const POD_IP: &str = "10.244.1.2";

struct World {
    node: Netns,
    pod: Netns,
    client: Netns,
}

fn world() -> World {
    let node = Netns::new("hpn");
    let pod = Netns::new("hpp");
    let client = Netns::new("hpc");
    let hv = sluice_e2e::unique("hv");
    let cv = sluice_e2e::unique("cv");
    node.ip(&[
        "link", "add", &hv, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ]);
    node.ip(&[
        "link",
        "add",
        &cv,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &client.name,
    ]);
    node.ip(&["addr", "add", &format!("{HOST_POD_SIDE}/24"), "dev", &hv]);
    node.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", &cv]);
    node.ip(&["addr", "add", &format!("{NODE_IP2}/32"), "dev", "lo"]);
    node.ip(&["link", "set", &hv, "up"]);
    node.ip(&["link", "set", &cv, "up"]);
    node.sysctl("net.ipv4.ip_forward", "1");
    // 127.0.0.1:hostPort: loopback-sourced packets may leave through the pod's veth.
    node.sysctl(&format!("net.ipv4.conf.{hv}.route_localnet"), "1");
    pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
    pod.ip(&["link", "set", "eth0", "up"]);
    pod.ip(&["route", "add", "default", "via", HOST_POD_SIDE]);
    client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
    client.ip(&["link", "set", "eth0", "up"]);
    client.ip(&["route", "add", "default", "via", NODE_IP]);
    World { node, pod, client }
}

fn entries(with_pod: bool) -> Vec<HostportEntry> {
    let mappings = if with_pod {
        vec![
            PortMapping::new(HpProtocol::Tcp, 8080, 80, None),
            PortMapping::new(HpProtocol::Tcp, 8081, 80, Some(NODE_IP2.parse().unwrap())),
        ]
    } else {
        vec![]
    };
    vec![HostportEntry {
        container_id: "c1".into(),
        ifname: "eth0".into(),
        pod_ip: Some(POD_IP.parse().unwrap()),
        pod_ip6: None,
        mappings,
    }]
}

fn feed(netns: &str, program: &str, args: &[&str], text: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{program}: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::from((ip.parse::<Ipv4Addr>().unwrap(), port))
}

/// Every path answers with the pod's reply; returns the sources the pod saw, in order.
fn reachable(w: &World, rx: &std::sync::mpsc::Receiver<SocketAddr>) -> Vec<String> {
    let mut seen = Vec::new();
    for (ns, to) in [
        (&w.client.name, at(NODE_IP, 8080)),
        (&w.node.name, at(NODE_IP, 8080)),
        (&w.node.name, at("127.0.0.1", 8080)),
        (&w.pod.name, at(NODE_IP, 8080)),
        (&w.client.name, at(NODE_IP2, 8081)),
    ] {
        let got = tcp_ask(ns, to);
        assert_eq!(got.as_deref().ok(), Some("pod"), "{ns} -> {to}: {got:?}");
        let peer = rx.recv_timeout(Duration::from_secs(3)).unwrap();
        seen.push(peer.ip().to_string());
    }
    seen
}

fn unreachable(w: &World) {
    for (ns, to) in [
        (&w.client.name, at(NODE_IP, 8080)),
        (&w.node.name, at("127.0.0.1", 8080)),
        (&w.pod.name, at(NODE_IP, 8080)),
        // The hostIP-specific mapping is not on the node's other address.
        (&w.client.name, at(NODE_IP, 8081)),
    ] {
        assert!(tcp_ask(ns, to).is_err(), "{ns} -> {to} still answers");
    }
}

fn expect_sources(seen: &[String]) {
    // The client's own address is kept (policy sees it); the node's and the hairpin are
    // masqueraded or the node's own; loopback is masqueraded to the veth's address.
    assert_eq!(seen[0], CLIENT_IP, "{seen:?}");
    assert_eq!(seen[2], HOST_POD_SIDE, "{seen:?}");
    assert_eq!(seen[3], HOST_POD_SIDE, "{seen:?}");
    assert_eq!(seen[4], CLIENT_IP, "{seen:?}");
}

#[test]
fn nft_hostport_rules_carry_real_connections_and_go_away() {
    if !have_root() {
        return;
    }
    let w = world();
    let (_, rx) = tcp_server(&w.pod.name, at("0.0.0.0", 80), "pod", 16);
    feed(
        &w.node.name,
        "nft",
        &["-f", "-"],
        &render_nft(&entries(true)),
    );
    // Applying the same script again is harmless (replaces, never duplicates).
    feed(
        &w.node.name,
        "nft",
        &["-f", "-"],
        &render_nft(&entries(true)),
    );
    let seen = reachable(&w, &rx);
    expect_sources(&seen);
    feed(
        &w.node.name,
        "nft",
        &["-f", "-"],
        &render_nft(&entries(false)),
    );
    let tables = sh(&["ip", "netns", "exec", &w.node.name, "nft", "list", "tables"]);
    assert!(!tables.contains("sluice-hostport"), "{tables}");
    unreachable(&w);
}

#[test]
fn iptables_hostport_rules_carry_real_connections_and_go_away() {
    if !have_root() {
        return;
    }
    let w = world();
    let (_, rx) = tcp_server(&w.pod.name, at("0.0.0.0", 80), "pod", 16);
    feed(
        &w.node.name,
        "iptables-restore",
        &["--noflush"],
        &render_iptables(&entries(true)),
    );
    for (chain, spec) in iptables_jumps() {
        let mut args = vec![
            "ip",
            "netns",
            "exec",
            &w.node.name,
            "iptables",
            "-t",
            "nat",
            "-A",
            chain,
        ];
        args.extend(spec);
        sh(&args);
    }
    let seen = reachable(&w, &rx);
    expect_sources(&seen);
    feed(
        &w.node.name,
        "iptables-restore",
        &["--noflush"],
        &render_iptables(&entries(false)),
    );
    let rules = sh(&[
        "ip",
        "netns",
        "exec",
        &w.node.name,
        "iptables-save",
        "-t",
        "nat",
    ]);
    assert!(!rules.contains("-j DNAT"), "{rules}");
    unreachable(&w);
}
