//! What the dual-stack, IPv6-underlay and IPv6-only lab suites share: the pods `lab status`
//! lists with an address of each family they have, reaching one from another over each family
//! through `lab exec` and `lab probe`, the tunnel's outer packets on the wire, and IPv6 egress
//! to the lab's internet.

use crate::capture::Capture;
use crate::eventually;
use crate::lab::{lab_cmd, output_text, tcp_ask, tcp_server, Lab};
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

pub struct Pod {
    pub id: String,
    pub node: String,
    /// None in an IPv6-only lab.
    pub v4: Option<Ipv4Addr>,
    pub v6: Ipv6Addr,
}

impl Pod {
    /// The /64 the pod's IPv6 address is in (its node's IPv6 subnet in the lab).
    pub fn subnet6(&self) -> String {
        ipnet::Ipv6Net::new(self.v6, 64)
            .map(|n| n.trunc().to_string())
            .unwrap_or_default()
    }

    /// The pod's IPv4 address, which a dual-stack lab's pods have.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.v4
            .unwrap_or_else(|| panic!("pod {} has no IPv4 address", self.id))
    }

    /// The lab's underlay address of the pod's node with `--underlay ipv6` (`fd00:31::I` for
    /// node I on the first segment).
    pub fn node_underlay_v6(&self) -> String {
        format!(
            "fd00:31::{}",
            self.node.rsplit('-').next().unwrap_or_default()
        )
    }
}

pub fn pods(status: &Value) -> Vec<Pod> {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pod {
            id: format!(
                "{}/{}",
                p["namespace"].as_str().unwrap(),
                p["name"].as_str().unwrap()
            ),
            node: p["node"].as_str().unwrap().into(),
            v4: p["ip"].as_str().unwrap().parse().ok(),
            v6: p["ipv6"]
                .as_str()
                .unwrap_or_else(|| panic!("pod without IPv6: {p}"))
                .parse()
                .unwrap(),
        })
        .collect()
}

pub fn all_true(m: &Value) -> bool {
    m.as_array().is_some_and(|rows| {
        rows.iter()
            .flat_map(|r| r.as_array().unwrap())
            .all(|b| b == true)
    })
}

/// `sluice status -o FORMAT` inside a node's namespace.
pub fn node_status(lab: &Lab, node: &str, format: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.node_netns(node)])
        .arg(crate::sluice_bin())
        .args(["status", "-o", format])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ping(lab: &Lab, from: &Pod, to: &str, family: &str) -> bool {
    let out = lab_cmd(
        &[
            "exec", "--name", &lab.name, &from.id, "--", "ping", family, "-c", "1", "-W", "2", to,
        ],
        30,
    );
    out.status.success()
}

/// `lab probe FROM TO PORT` over TCP or UDP, IPv6 or IPv4; true when answered by `to`.
pub fn probe(lab: &Lab, from: &Pod, to: &Pod, proto: &str, ipv6: bool) -> bool {
    let port = if proto == "udp" { "53" } else { "80" };
    let mut args = vec![
        "probe",
        "--name",
        &lab.name,
        &from.id,
        &to.id,
        port,
        "--protocol",
        proto,
        "--timeout",
        "2s",
    ];
    if ipv6 {
        args.push("--ipv6");
    }
    let out = lab_cmd(&args, 30);
    out.status.success() && output_text(&out).contains(&format!("answered by {}", to.id))
}

/// `a` and `b` reach each other over IPv6: ICMPv6, TCP and UDP both ways.
pub fn reach_ipv6(lab: &Lab, a: &Pod, b: &Pod) {
    for (x, y) in [(a, b), (b, a)] {
        assert!(
            eventually(Duration::from_secs(10), || ping(
                lab,
                x,
                &y.v6.to_string(),
                "-6"
            )),
            "ICMPv6 {} -> {}",
            x.id,
            y.id
        );
        for proto in ["tcp", "udp"] {
            assert!(
                probe(lab, x, y, proto, true),
                "{proto} over IPv6 {} -> {}",
                x.id,
                y.id
            );
        }
    }
}

pub fn reach_both_families(lab: &Lab, a: &Pod, b: &Pod) {
    reach_ipv6(lab, a, b);
    for (x, y) in [(a, b), (b, a)] {
        assert!(
            ping(lab, x, &y.ipv4().to_string(), "-4"),
            "ICMP {} -> {}",
            x.id,
            y.id
        );
        for proto in ["tcp", "udp"] {
            assert!(
                probe(lab, x, y, proto, false),
                "{proto} over IPv4 {} -> {}",
                x.id,
                y.id
            );
        }
    }
}

/// Every pair of the lab's pods reaches each other over IPv4 and IPv6 (its `lab status`
/// matrices) within `within`.
pub fn every_pair_reaches_over_both_families(lab: &Lab, within: Duration) -> bool {
    eventually(within, || {
        let s = lab.status();
        all_true(&s["reachability"]) && all_true(&s["reachabilityIpv6"])
    })
}

/// `sluice status -o json` of `node`, parsed.
pub fn node_doc(lab: &Lab, node: &str) -> Value {
    serde_json::from_str(&node_status(lab, node, "json")).unwrap_or(Value::Null)
}

/// The outer packets `a`'s node's eth0 carries on `port` while pod `a` talks to pod `b` (over
/// IPv6, and over IPv4 too when both have it): each an IPv6 packet between the two nodes'
/// IPv6 underlay addresses `u_a` and `u_b`.
pub fn outer_packets_are_ipv6(lab: &Lab, a: &Pod, b: &Pod, port: u16, u_a: &str, u_b: &str) {
    let ns = lab.node_netns(&a.node);
    let cap = Capture::start(&ns, "eth0", &format!("udp port {port}"));
    assert!(ping(lab, a, &b.v6.to_string(), "-6"));
    if let (Some(_), Some(v4)) = (a.v4, b.v4) {
        assert!(ping(lab, a, &v4.to_string(), "-4"));
        assert!(probe(lab, a, b, "tcp", false));
    } else {
        assert!(probe(lab, a, b, "tcp", true));
    }
    let (lines, _) = cap.finish();
    // Outer headers are the lines with a timestamp (tcpdump prints a VXLAN packet's inner one
    // on a line of its own).
    let outer: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_digit()))
        .collect();
    assert!(
        outer.len() >= 4,
        "too few tunnel packets on port {port}: {lines:?}"
    );
    for l in &outer {
        assert!(
            l.contains(" IP6 ")
                && (l.contains(&format!("{u_a}.")) && l.contains(&format!("{u_b}.{port}"))
                    || l.contains(&format!("{u_b}.")) && l.contains(&format!("{u_a}.{port}"))),
            "not IPv6 between {u_a} and {u_b} on port {port}: {l}"
        );
    }
}

/// IPv6 pod traffic leaving the cluster CIDR reaches the lab's internet (`fdff:203::1`, no
/// route to pods) from its node's IPv6 address (`fd00:31::I`), not the pod's.
pub fn ipv6_egress_is_masqueraded(lab: &Lab, pods: &[Pod]) {
    let internet = format!("{}internet", lab.prefix());
    let (addr, peers) = tcp_server(&internet, "[fdff:203::1]:0".parse().unwrap(), "world", 64);
    for p in pods {
        let (ns, name) = p.id.split_once('/').unwrap();
        let netns = lab.pod_netns(ns, name);
        assert!(
            eventually(Duration::from_secs(10), || tcp_ask(&netns, addr)
                .is_ok_and(|a| a == "world")),
            "{} cannot reach the internet over IPv6",
            p.id
        );
        let seen = peers.recv_timeout(Duration::from_secs(5)).unwrap();
        while peers.try_recv().is_ok() {}
        assert_eq!(
            seen.ip().to_string(),
            p.node_underlay_v6(),
            "{} seen as",
            p.id
        );
        assert_ne!(
            seen.ip(),
            std::net::IpAddr::V6(p.v6),
            "{} not masqueraded",
            p.id
        );
    }
}
