//! `overlay` in a lab, on real packets (issue 22): `cross-subnet` routes pod traffic as plain IP
//! between nodes of one underlay segment and as VXLAN across segments; `never` uses no VXLAN at
//! all and gives pods the underlay's MTU, and reports a peer it cannot reach instead of
//! black-holing it; a live switch between the three under a continuous ping loses under a second
//! per switch; WireGuard still carries every pair that runs it; a direct route deleted by hand
//! comes back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::capture::Capture;
use sluice_e2e::lab::{in_netns, tcp_ask, tcp_server, Lab};
use sluice_e2e::{eventually, have_root};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;

struct Pod {
    netns: String,
    node: String,
    ip: Ipv4Addr,
}

fn pods(lab: &Lab, status: &Value) -> Vec<Pod> {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pod {
            netns: lab.pod_netns(
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap(),
            ),
            node: p["node"].as_str().unwrap().into(),
            ip: p["ip"].as_str().unwrap().parse().unwrap(),
        })
        .collect()
}

fn node_field(status: &Value, node: &str, key: &str) -> String {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()[key]
        .as_str()
        .unwrap()
        .to_string()
}

fn all_reach(lab: &Lab) -> bool {
    lab.status()["reachability"]
        .as_array()
        .unwrap()
        .iter()
        .all(|row| row.as_array().unwrap().iter().all(|c| c == true))
}

/// `node`'s route to `subnet`: (device, gateway, type).
fn route(lab: &Lab, node: &str, subnet: &str) -> (String, String, String) {
    let r = lab.ip_json(&lab.node_netns(node), &["-4", "route", "show", subnet]);
    let get = |k: &str| r[0][k].as_str().unwrap_or_default().to_string();
    (get("dev"), get("gateway"), get("type"))
}

/// `sluice status -o json` inside a node's namespace.
fn node_status(lab: &Lab, node: &str) -> Value {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.node_netns(node)])
        .arg(sluice_e2e::sluice_bin())
        .args(["status", "-o", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn peer_path(doc: &Value, peer: &str) -> (String, String) {
    let p = doc["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == peer)
        .unwrap_or_else(|| panic!("no peer {peer} in {doc:#}"));
    (
        p["path"].as_str().unwrap().into(),
        p["why"].as_str().unwrap().into(),
    )
}

/// Sends `payload` from `from` to a server in `to` over TCP; what the server answered.
fn exchange(from: &Pod, to: &Pod, payload: &'static str) -> String {
    let (addr, _) = tcp_server(&to.netns, SocketAddr::from((to.ip, 0)), payload, 1);
    tcp_ask(&from.netns, addr).unwrap_or_default()
}

#[test]
fn cross_subnet_routes_directly_within_a_segment_and_encapsulates_across() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--segments",
        "2",
        "--pods-per-node",
        "1",
        "--overlay",
        "cross-subnet",
    ]);
    assert!(
        eventually(Duration::from_secs(20), || all_reach(&lab)),
        "{:#}",
        lab.status()
    );
    let status = lab.status();
    let pods = pods(&lab, &status);
    // Nodes alternate between the segments: node-1 and node-3 share one, node-2 is across.
    let (p1, p2, p3) = (&pods[0], &pods[1], &pods[2]);
    let (n1, n2, n3) = (&p1.node, &p2.node, &p3.node);
    let (u2, u3) = (
        node_field(&status, n2, "underlay"),
        node_field(&status, n3, "underlay"),
    );
    let s3 = node_field(&status, n3, "subnet");
    let s2 = node_field(&status, n2, "subnet");
    assert_eq!(route(&lab, n1, &s3), ("eth0".into(), u3.clone(), "".into()));
    assert_eq!(route(&lab, n1, &s2).0, "sluice.vxlan");
    let doc = node_status(&lab, n1);
    assert_eq!(doc["overlay"], "cross-subnet");
    assert_eq!(
        peer_path(&doc, n3),
        (
            "direct".into(),
            "same underlay subnet (overlay: cross-subnet)".into()
        )
    );
    assert_eq!(
        peer_path(&doc, n2),
        (
            "vxlan".into(),
            "other underlay subnet (overlay: cross-subnet)".into()
        )
    );

    // Within the segment: plain IP between the pods' addresses, no VXLAN.
    let ns1 = lab.node_netns(n1);
    // Direct packets carry the pods' addresses (node-3 is only their next hop's MAC), VXLAN
    // ones the nodes': both kinds are caught.
    let cap = Capture::start(&ns1, "eth0", &format!("host {u3} or host {}", p3.ip));
    const NEAR: &str = "sluice-direct-7d01-plain-ip";
    assert_eq!(exchange(p1, p3, NEAR), NEAR);
    let (lines, ascii) = cap.finish();
    // tcpdump prints a VXLAN packet's inner packet on a line of its own, without a timestamp:
    // the outer headers are the lines that start with one.
    let outer = |lines: Vec<String>| -> Vec<String> {
        lines
            .into_iter()
            .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .collect()
    };
    let lines = outer(lines);
    assert!(
        !lines.iter().any(|l| l.contains(".8472")),
        "VXLAN within a segment: {lines:?}"
    );
    let pod_to_pod = format!("{}.", p1.ip);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&pod_to_pod) && l.contains(&format!("> {}.", p3.ip))),
        "no plain IP between the pods: {lines:?}"
    );
    assert!(ascii.contains(NEAR));
    // Across the segments: VXLAN between the nodes' underlay addresses.
    let cap = Capture::start(&ns1, "eth0", &format!("host {u2}"));
    const FAR: &str = "sluice-vxlan-2c9e-across";
    assert_eq!(exchange(p1, p2, FAR), FAR);
    let (lines, _) = cap.finish();
    let lines = outer(lines);
    assert!(
        lines.iter().any(|l| l.contains(".8472: ")),
        "no VXLAN across segments: {lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains(&pod_to_pod)),
        "pod addresses on the underlay: {lines:?}"
    );

    // Drift: the direct route deleted by hand is back within 10 s.
    let del = Command::new("ip")
        .args(["-n", &ns1, "route", "del", &s3])
        .status()
        .unwrap();
    assert!(del.success());
    assert!(
        eventually(Duration::from_secs(10), || route(&lab, n1, &s3)
            == ("eth0".into(), u3.clone(), "".into())),
        "the direct route was not restored"
    );
    assert_eq!(exchange(p1, p3, NEAR), NEAR);
    // A node deleted: its direct routes go from every node.
    let out = lab.kubectl(&["delete", "node", n3]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        eventually(Duration::from_secs(15), || route(&lab, n1, &s3)
            .0
            .is_empty()),
        "the deleted node's route stayed: {:?}",
        route(&lab, n1, &s3)
    );
}

#[test]
fn never_on_one_segment_uses_no_vxlan_and_gives_pods_the_underlays_mtu() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "1", "--overlay", "never"]);
    assert!(
        eventually(Duration::from_secs(20), || all_reach(&lab)),
        "{:#}",
        lab.status()
    );
    let status = lab.status();
    let pods = pods(&lab, &status);
    let (p1, p2) = (&pods[0], &pods[1]);
    let ns1 = lab.node_netns(&p1.node);
    let links: Vec<String> = lab
        .ip_json(&ns1, &["link", "show"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["ifname"].as_str().map(String::from))
        .collect();
    assert!(
        !links.iter().any(|l| l == "sluice.vxlan"),
        "a VXLAN device under never: {links:?}"
    );
    let mtu = |netns: &str, dev: &str| {
        lab.ip_json(netns, &["link", "show", dev])[0]["mtu"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(
        mtu(&p1.netns, "eth0"),
        mtu(&ns1, "eth0"),
        "pods do not get the underlay's MTU"
    );
    let cap = Capture::start(&ns1, "eth0", "udp port 8472");
    const PAYLOAD: &str = "sluice-never-0a1b";
    assert_eq!(exchange(p1, p2, PAYLOAD), PAYLOAD);
    assert!(all_reach(&lab));
    let (lines, _) = cap.finish();
    assert!(lines.is_empty(), "VXLAN under never: {lines:?}");

    // A tunnel comes in live: the running pods keep the underlay's MTU, and their new
    // connections' MSS is clamped to the tunnel's, so large transfers still pass.
    lab.set_config("overlay", "always");
    let subnet2 = node_field(&status, &p2.node, "subnet");
    assert!(eventually(Duration::from_secs(10), || route(
        &lab, &p1.node, &subnet2
    )
    .0 == "sluice.vxlan"));
    let syn = Capture::start(&ns1, "sluice.vxlan", "tcp[tcpflags] & tcp-syn != 0");
    let sent = bulk(p1, p2, 4 << 20);
    assert_eq!(
        sent,
        4 << 20,
        "a 4 MiB transfer from a pod of the underlay's MTU did not pass"
    );
    let (lines, _) = syn.finish();
    let vxlan_mtu = mtu(&ns1, "sluice.vxlan");
    let mss = format!("mss {}", vxlan_mtu - 40);
    assert!(
        lines.iter().any(|l| l.contains(&mss)),
        "no SYN clamped to {mss}: {lines:?}"
    );
}

/// Streams `bytes` from `from` to a sink in `to`; how many the sink received (bounded by 20 s).
fn bulk(from: &Pod, to: &Pod, bytes: usize) -> usize {
    let listener = in_netns(&to.netns, {
        let ip = to.ip;
        move || std::net::TcpListener::bind((ip, 0)).unwrap()
    });
    let addr = listener.local_addr().unwrap();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    in_netns(&from.netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let chunk = vec![0x5au8; 65536];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            if s.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n;
        }
    });
    sink.join().unwrap()
}

#[test]
fn never_across_segments_reports_the_peer_it_cannot_reach() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--segments",
        "2",
        "--pods-per-node",
        "1",
        "--overlay",
        "never",
    ]);
    let status = lab.status();
    let pods = pods(&lab, &status);
    let (p1, p2) = (&pods[0], &pods[1]);
    let s2 = node_field(&status, &p2.node, "subnet");
    assert!(
        eventually(Duration::from_secs(10), || route(&lab, &p1.node, &s2).2
            == "unreachable"),
        "no unreachable route: {:?}",
        route(&lab, &p1.node, &s2)
    );
    let doc = node_status(&lab, &p1.node);
    assert_eq!(
        peer_path(&doc, &p2.node),
        (
            "unreachable".into(),
            "other underlay subnet (overlay: never)".into()
        )
    );
    let ns1 = lab.node_netns(&p1.node);
    let readyz = Command::new("ip")
        .args(["netns", "exec", &ns1])
        .arg(sluice_e2e::sluice_bin())
        .args(["status", "-o", "table"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&readyz.stdout);
    assert!(
        table.contains("peer unreachable") && table.contains(&p2.node),
        "{table}"
    );
    // The sender is told, not left waiting: ping sees the node's ICMP error at once.
    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &p1.netns,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &p2.ip.to_string(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(!ping.status.success());
    assert!(text.contains("Unreachable"), "{text}");
}

#[test]
fn switching_overlay_live_loses_under_a_second_per_switch() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let status = lab.status();
    let pods = pods(&lab, &status);
    let (p1, p2) = (&pods[0], &pods[1]);
    let s2 = node_field(&status, &p2.node, "subnet");
    // 900 pings 20 ms apart (18 s); a switch every 4 s.
    let pinger = sluice_e2e::ping::Pinger::start(&p1.netns, &p2.ip.to_string(), 900, "0.02");
    for (overlay, dev) in [
        ("cross-subnet", "eth0"),
        ("never", "eth0"),
        ("always", "sluice.vxlan"),
    ] {
        std::thread::sleep(Duration::from_secs(4));
        lab.set_config("overlay", overlay);
        assert!(
            eventually(Duration::from_secs(5), || route(&lab, &p1.node, &s2).0
                == dev),
            "under {overlay} the route did not move to {dev}: {:?}",
            route(&lab, &p1.node, &s2)
        );
    }
    let (lost, text) = pinger.lost();
    // Three switches, each allowed under 1 s (50 pings) of loss.
    assert!(
        lost < 150,
        "lost {lost} of 900 across three switches:\n{text}"
    );
}

#[test]
fn wireguard_carries_every_pair_whatever_overlay_says() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--segments",
        "2",
        "--pods-per-node",
        "1",
        "--overlay",
        "cross-subnet",
        "--encryption",
        "wireguard",
    ]);
    assert!(eventually(Duration::from_secs(20), || all_reach(&lab)));
    let status = lab.status();
    let pods = pods(&lab, &status);
    let (p1, p2, p3) = (&pods[0], &pods[1], &pods[2]);
    for peer in [p2, p3] {
        let subnet = node_field(&status, &peer.node, "subnet");
        assert_eq!(route(&lab, &p1.node, &subnet).0, "sluice.wg");
    }
    let u1 = node_field(&status, &p1.node, "underlay");
    let cap = Capture::start(
        &lab.node_netns(&p1.node),
        "eth0",
        &format!("host {u1} and not arp"),
    );
    const SECRET: &str = "sluice-wg-overlay-5e77";
    assert_eq!(exchange(p1, p3, SECRET), SECRET);
    assert_eq!(exchange(p1, p2, SECRET), SECRET);
    let (lines, ascii) = cap.finish();
    let not_wg: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains(" UDP") && l.contains(".51820")))
        .collect();
    assert!(
        not_wg.is_empty(),
        "non-WireGuard packets between nodes: {not_wg:?}"
    );
    assert!(!ascii.contains(SECRET));
}
