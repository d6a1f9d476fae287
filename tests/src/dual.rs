//! What the dual-stack and IPv6-underlay lab suites share: the pods `lab status` lists with an
//! address of each family, and reaching one from another over each family through `lab exec` and
//! `lab probe`.

use crate::eventually;
use crate::lab::{lab_cmd, output_text, Lab};
use serde_json::Value;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::time::Duration;

pub struct Pod {
    pub id: String,
    pub node: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Pod {
    /// The /64 the pod's IPv6 address is in (its node's IPv6 subnet in the lab).
    pub fn subnet6(&self) -> String {
        ipnet::Ipv6Net::new(self.v6, 64)
            .map(|n| n.trunc().to_string())
            .unwrap_or_default()
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
            v4: p["ip"].as_str().unwrap().parse().unwrap(),
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

pub fn reach_both_families(lab: &Lab, a: &Pod, b: &Pod) {
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
        assert!(
            ping(lab, x, &y.v4.to_string(), "-4"),
            "ICMP {} -> {}",
            x.id,
            y.id
        );
        for proto in ["tcp", "udp"] {
            for ipv6 in [true, false] {
                assert!(
                    probe(lab, x, y, proto, ipv6),
                    "{proto} ipv6={ipv6} {} -> {}",
                    x.id,
                    y.id
                );
            }
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
