//! WireGuard in the lab, on real packets: encryption on the underlay (a capture between two nodes
//! sees only UDP 51820 and never the payload, while with `none` it sees VXLAN and the payload),
//! the live switch under a continuous ping with no agent or pod restart, the key's life (kept
//! across a restart, replaced when its file is removed, peers following) and its secrecy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::capture::Capture;
use sluice_e2e::lab::{in_netns, lab_cmd, tcp_ask, tcp_server, Lab};
use sluice_e2e::{eventually, have_root};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

const KEY_ANNOTATION: &str = "sluice.dev/wireguard-public-key";

struct Pod {
    ns: String,
    name: String,
    node: String,
    ip: Ipv4Addr,
}

fn pods(status: &Value) -> Vec<Pod> {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pod {
            ns: p["namespace"].as_str().unwrap().into(),
            name: p["name"].as_str().unwrap().into(),
            node: p["node"].as_str().unwrap().into(),
            ip: p["ip"].as_str().unwrap().parse().unwrap(),
        })
        .collect()
}

fn underlay_of(status: &Value, node: &str) -> String {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()["underlay"]
        .as_str()
        .unwrap()
        .to_string()
}

fn all_reach(lab: &Lab) -> bool {
    let s = lab.status();
    s["reachability"]
        .as_array()
        .unwrap()
        .iter()
        .all(|row| row.as_array().unwrap().iter().all(|c| c == true))
}

fn set_encryption(lab: &Lab, value: &str) {
    lab.set_config("encryption", value);
}

/// The device `node`'s route to `subnet` goes through.
fn route_dev(lab: &Lab, node: &str, subnet: &str) -> String {
    let routes = lab.ip_json(&lab.node_netns(node), &["-4", "route", "show", subnet]);
    routes[0]["dev"].as_str().unwrap_or_default().to_string()
}

fn subnet_of(status: &Value, node: &str) -> String {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()["subnet"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Sends `payload` from `server`'s pod to `client`'s pod over TCP, and returns what arrived.
fn exchange(lab: &Lab, server: &Pod, client: &Pod, payload: &'static str) -> String {
    let (addr, _) = tcp_server(
        &lab.pod_netns(&server.ns, &server.name),
        SocketAddr::from((server.ip, 0)),
        payload,
        1,
    );
    tcp_ask(&lab.pod_netns(&client.ns, &client.name), addr).unwrap_or_default()
}

#[test]
fn the_underlay_carries_only_wireguard_and_never_the_payload() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--encryption",
        "wireguard",
    ]);
    assert!(
        eventually(Duration::from_secs(20), || all_reach(&lab)),
        "not every pod reaches every pod through WireGuard"
    );
    let status = lab.status();
    let pods = pods(&status);
    let (a, b) = (&pods[0], &pods[1]);
    assert_ne!(a.node, b.node);
    let ua = underlay_of(&status, &a.node);
    let ub = underlay_of(&status, &b.node);
    let filter = format!("host {ua} and host {ub}");
    let node_ns = lab.node_netns(&a.node);

    const SECRET: &str = "sluice-wg-payload-7f3a9c-never-in-the-clear";
    let cap = Capture::start(&node_ns, "eth0", &filter);
    assert_eq!(exchange(&lab, a, b, SECRET), SECRET);
    let (lines, ascii) = cap.finish();
    assert!(lines.len() >= 4, "captured too little: {lines:?}");
    let not_wg: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains(" UDP") && l.contains(".51820")))
        .collect();
    assert!(
        not_wg.is_empty(),
        "non-WireGuard packets between nodes: {not_wg:?}"
    );
    assert!(
        !ascii.contains(SECRET),
        "the payload crossed the underlay in the clear"
    );

    // With `none`, the same capture sees VXLAN, and the payload (the capture can see it).
    set_encryption(&lab, "none");
    let subnet_a = subnet_of(&status, &a.node);
    assert!(eventually(Duration::from_secs(15), || route_dev(
        &lab, &b.node, &subnet_a
    ) == "sluice.vxlan"));
    assert!(
        eventually(Duration::from_secs(15), || {
            lab.ip_json(&node_ns, &["link", "show"])
                .as_array()
                .unwrap()
                .iter()
                .all(|l| l["ifname"] != "sluice.wg")
        }),
        "the WireGuard device outlived the switch to none"
    );
    const CLEAR: &str = "sluice-vxlan-payload-0b1d2e-in-the-clear";
    let cap = Capture::start(&node_ns, "eth0", &filter);
    assert_eq!(exchange(&lab, a, b, CLEAR), CLEAR);
    let (lines, ascii) = cap.finish();
    assert!(
        // tcpdump names UDP 8472 (flannel's VXLAN port) "OTV" and prints the inner packet.
        lines.iter().any(|l| l.contains(".8472: ")),
        "no VXLAN seen with encryption none: {lines:?}"
    );
    assert!(!lines.iter().any(|l| l.contains(".51820")), "{lines:?}");
    assert!(
        ascii.contains(CLEAR),
        "the capture could not see a clear payload"
    );
}

fn agent_pid(lab: &Lab, node: &str) -> i32 {
    std::fs::read_to_string(format!(
        "/run/sluice/lab/{}/nodes/{node}/agent.pid",
        lab.name
    ))
    .unwrap()
    .trim()
    .parse()
    .unwrap()
}

fn netns_inode(netns: &str) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/run/netns/{netns}"))
        .unwrap()
        .ino()
}

#[test]
fn flipping_encryption_live_loses_under_two_seconds_and_restarts_nothing() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let status = lab.status();
    let pods = pods(&status);
    let (a, b) = (&pods[0], &pods[1]);
    assert_ne!(a.node, b.node);
    let pids: Vec<i32> = [&a.node, &b.node]
        .iter()
        .map(|n| agent_pid(&lab, n))
        .collect();
    let pod_ns = [lab.pod_netns(&a.ns, &a.name), lab.pod_netns(&b.ns, &b.name)];
    let inodes: Vec<u64> = pod_ns.iter().map(|n| netns_inode(n)).collect();
    let subnet_b = subnet_of(&status, &b.node);

    // 700 pings 20 ms apart (14 s); none -> wireguard at 2 s, wireguard -> none at 8 s.
    let pinger = sluice_e2e::ping::Pinger::start(&pod_ns[0], &b.ip.to_string(), 700, "0.02");
    std::thread::sleep(Duration::from_secs(2));
    set_encryption(&lab, "wireguard");
    assert!(
        eventually(Duration::from_secs(5), || route_dev(
            &lab, &a.node, &subnet_b
        ) == "sluice.wg"),
        "the route did not move to WireGuard"
    );
    std::thread::sleep(Duration::from_secs(4));
    set_encryption(&lab, "none");
    assert!(
        eventually(Duration::from_secs(5), || route_dev(
            &lab, &a.node, &subnet_b
        ) == "sluice.vxlan"),
        "the route did not move back to VXLAN"
    );
    let (lost, text) = pinger.lost();
    // Two flips, each allowed under 2 s (100 pings) of loss.
    assert!(lost < 100, "lost {lost} of 700 across two flips:\n{text}");
    for (node, pid) in [&a.node, &b.node].iter().zip(&pids) {
        assert_eq!(agent_pid(&lab, node), *pid, "the agent of {node} restarted");
    }
    let after: Vec<u64> = pod_ns.iter().map(|n| netns_inode(n)).collect();
    assert_eq!(after, inodes, "a pod was restarted");
    // An orderly close of the device is no error (gotatun complained twice per close).
    for node in [&a.node, &b.node] {
        let log = agent_log(&lab, node);
        let errors: Vec<&str> = log.lines().filter(|l| l.contains(" ERROR ")).collect();
        assert!(
            errors.is_empty(),
            "the agent of {node} logged errors: {errors:#?}"
        );
        assert_eq!(log.matches("WireGuard device closed").count(), 1, "{log}");
    }
}

fn agent_log(lab: &Lab, node: &str) -> String {
    std::fs::read_to_string(format!(
        "/run/sluice/lab/{}/nodes/{node}/agent.log",
        lab.name
    ))
    .unwrap()
}

fn published_key(lab: &Lab, node: &str) -> Option<String> {
    let out = lab.kubectl(&["-n", "sluice-system", "get", "leases", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v["items"].as_array()?.iter().find_map(|l| {
        let a = &l["metadata"]["annotations"];
        (a["sluice.dev/node"] == node).then(|| a[KEY_ANNOTATION].as_str().map(str::to_string))?
    })
}

#[test]
fn the_key_survives_a_restart_is_replaced_when_removed_and_never_leaks() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--pods-per-node",
        "1",
        "--encryption",
        "wireguard",
    ]);
    assert!(eventually(Duration::from_secs(20), || all_reach(&lab)));
    let node = format!("{}-node-1", lab.name);
    let key_file = format!("/run/sluice/lab/{}/nodes/{node}/wireguard.key", lab.name);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&key_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "key file mode");
    let first = published_key(&lab, &node).expect("a published public key");

    // Restart: the same key.
    for action in ["stop", "start"] {
        let out = lab_cmd(&["agent", "--name", &lab.name, action, &node], 30);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(eventually(Duration::from_secs(20), || all_reach(&lab)));
    assert_eq!(published_key(&lab, &node).as_deref(), Some(first.as_str()));

    // Removed: a new key is published, and the peer follows (traffic flows again).
    let old_private = std::fs::read_to_string(&key_file).unwrap();
    std::fs::remove_file(&key_file).unwrap();
    assert!(
        eventually(Duration::from_secs(20), || published_key(&lab, &node)
            .is_some_and(|k| k != first)),
        "no new key published after the key file was removed"
    );
    assert!(
        eventually(Duration::from_secs(20), || all_reach(&lab)),
        "peers did not follow the new key"
    );

    // Neither private key appears in any API object, agent log or /metrics.
    let private = [old_private, std::fs::read_to_string(&key_file).unwrap()];
    let out = lab.kubectl(&["get", "leases,configmaps,nodes,pods", "-A", "-o", "json"]);
    assert!(out.status.success());
    let api = String::from_utf8_lossy(&out.stdout);
    let mut logs = String::new();
    for entry in std::fs::read_dir(format!("/run/sluice/lab/{}/nodes", lab.name)).unwrap() {
        let dir = entry.unwrap().path();
        logs.push_str(&std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default());
    }
    logs.push_str(
        &std::fs::read_to_string(format!("/run/sluice/lab/{}/daemon.log", lab.name))
            .unwrap_or_default(),
    );
    let metrics = in_netns(&lab.node_netns(&node), || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9099)),
            Duration::from_secs(5),
        )
        .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(metrics.contains("sluice_peer_rx_bytes{"), "{metrics}");
    assert!(logs.contains("WireGuard key pair created"));
    // This kernel has no WireGuard module: the agent tried it and fell back to userspace.
    assert!(logs.contains("no kernel WireGuard; using the userspace device"));
    assert!(logs.contains("backend=userspace (gotatun)"));
    for p in &private {
        let p = p.trim();
        assert_eq!(p.len(), 44, "a base64 key");
        assert!(!api.contains(p), "a private key is in an API object");
        assert!(!logs.contains(p), "a private key is in a log");
        assert!(!metrics.contains(p), "a private key is in /metrics");
    }
}

/// Issue 25, defect 2: traffic that starts on a node (a hostNetwork pod, the kubelet, a NodePort
/// that kube-proxy source-NATs to the node) and goes to a pod on another node. Over WireGuard it
/// was lost: it left with the node's underlay address, which no peer's allowed IPs hold. Now it
/// must answer, and still cross the underlay only as WireGuard.
#[test]
fn traffic_from_a_node_to_a_remote_pod_crosses_wireguard_encrypted() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--encryption",
        "wireguard",
    ]);
    assert!(
        eventually(Duration::from_secs(20), || all_reach(&lab)),
        "not every pod reaches every pod through WireGuard"
    );
    let status = lab.status();
    let pods = pods(&status);
    let b = &pods[1];
    let (node_a, node_c) = (&pods[0].node, &pods[2].node);
    assert!(node_a != &b.node && node_c != &b.node && node_a != node_c);
    let ns_a = lab.node_netns(node_a);
    let (ua, ub) = (underlay_of(&status, node_a), underlay_of(&status, &b.node));
    let capture = Capture::start(&ns_a, "eth0", &format!("host {ua} and host {ub}"));

    // A process in node A's own namespace (what a hostNetwork pod is) to pod B: ICMP and TCP.
    let ping = in_netns(&ns_a, {
        let ip = b.ip.to_string();
        move || {
            Command::new("ping")
                .args(["-c", "3", "-i", "0.2", "-W", "2", &ip])
                .output()
                .unwrap()
        }
    });
    assert!(
        ping.status.success(),
        "node {node_a} cannot ping pod {} over WireGuard: {}",
        b.ip,
        String::from_utf8_lossy(&ping.stdout)
    );
    const SECRET: &str = "sluice-node-sourced-4be1-never-in-the-clear";
    let (addr, peers) = tcp_server(
        &lab.pod_netns(&b.ns, &b.name),
        SocketAddr::from((b.ip, 0)),
        SECRET,
        4,
    );
    assert_eq!(tcp_ask(&ns_a, addr).unwrap_or_default(), SECRET);
    // Pod B saw node A's tunnel address, inside A's subnet, not its underlay address.
    let seen = peers.recv_timeout(Duration::from_secs(3)).unwrap();
    let subnet_a: ipnet::Ipv4Net = subnet_of(&status, node_a).parse().unwrap();
    let std::net::IpAddr::V4(seen_v4) = seen.ip() else {
        panic!("pod B saw {seen}");
    };
    assert!(
        subnet_a.contains(&seen_v4),
        "pod B saw {seen}, not an address of {subnet_a}"
    );

    // A NodePort as kube-proxy makes it: node A DNATs its port 30080 to pod B and masquerades,
    // and node C is the client.
    let table = sluice_e2e::unique("np");
    let rules = format!(
        "table ip {table} {{\n chain pre {{ type nat hook prerouting priority -100; tcp dport 30080 dnat to {addr}; }}\n chain post {{ type nat hook postrouting priority 100; ip daddr {} tcp dport {} masquerade; }}\n}}\n",
        b.ip,
        addr.port()
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &ns_a, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write as _;
            c.stdin.take().unwrap().write_all(rules.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_port = SocketAddr::from((ua.parse::<Ipv4Addr>().unwrap(), 30080));
    let answered = tcp_ask(&lab.node_netns(node_c), node_port).unwrap_or_default();
    let _ = Command::new("ip")
        .args([
            "netns", "exec", &ns_a, "nft", "delete", "table", "ip", &table,
        ])
        .status();
    assert_eq!(
        answered, SECRET,
        "the NodePort on {node_a} did not reach pod B"
    );

    let (lines, ascii) = capture.finish();
    assert!(lines.len() >= 4, "captured too little: {lines:?}");
    let not_wg: Vec<&String> = lines
        .iter()
        .filter(|l| !(l.contains(" UDP") && l.contains(".51820")))
        .collect();
    assert!(
        not_wg.is_empty(),
        "non-WireGuard packets between nodes: {not_wg:?}"
    );
    assert!(
        !ascii.contains(SECRET),
        "the payload crossed the underlay in the clear"
    );
}
