//! A lab whose tunnels run over an IPv6 underlay (`--underlay ipv6`: each Node's first
//! InternalIP is its `fd00:31:S::I` address, which the agent takes and publishes as its
//! underlay): VXLAN with IPv6 local and remote VTEP endpoints (FDB entries with an IPv6 `dst`),
//! WireGuard with `[v6]:51820` endpoints, both carrying the pods' IPv4 and IPv6 across nodes
//! (ICMP, TCP, UDP), seen on the wire as outer IPv6; the live switch between them; IPv6
//! egress masqueraded to the lab's internet as the node's address.
//!
//! The pods here are dual-stack (`--ip-family dual`); an IPv6-only cluster over the same
//! underlay is `lab_v6only.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::Ipv6Net;
use sluice_e2e::dual::*;
use sluice_e2e::lab::{output_text, Lab};
use sluice_e2e::{eventually, have_root};
use std::process::Command;
use std::time::Duration;

fn v6_underlay_lab(encryption: &str) {
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--pods-per-node",
        "1",
        "--ip-family",
        "dual",
        "--underlay",
        "ipv6",
        "--encryption",
        encryption,
    ]);
    assert!(
        every_pair_reaches_over_both_families(&lab, Duration::from_secs(30)),
        "not every pair reached over both families: {:#}",
        lab.status()
    );
    let pods = pods(&lab.status());
    assert_eq!(pods.len(), 3);
    let underlay_of = |p: &Pod| p.node_underlay_v6();
    // Each agent took its IPv6 InternalIP as its underlay and publishes it; its peers' are IPv6.
    for p in &pods {
        let doc = node_doc(&lab, &p.node);
        assert_eq!(doc["underlay"], underlay_of(p), "{doc:#}");
        let lab_node = lab.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == p.node.as_str())
            .cloned()
            .unwrap();
        assert_eq!(
            lab_node["underlay"],
            underlay_of(p),
            "lab status: {lab_node}"
        );
        for peer in doc["peers"].as_array().unwrap() {
            assert!(
                peer["underlay"].as_str().unwrap().starts_with("fd00:31::"),
                "{peer}"
            );
        }
    }
    let device = if encryption == "wireguard" {
        "sluice.wg"
    } else {
        "sluice.vxlan"
    };
    let n1 = lab.node_netns(&pods[0].node);
    if encryption == "none" {
        // The VXLAN device's local VTEP is the node's IPv6 address; each peer's FDB entry
        // has its IPv6 address as dst.
        let link = lab.ip_json(&n1, &["-d", "link", "show", "sluice.vxlan"]);
        let info = &link[0]["linkinfo"]["info_data"];
        assert_eq!(info["local6"], underlay_of(&pods[0]), "{link:#}");
        let fdb = Command::new("ip")
            .args([
                "netns",
                "exec",
                &n1,
                "bridge",
                "fdb",
                "show",
                "dev",
                "sluice.vxlan",
            ])
            .output()
            .unwrap();
        let fdb = String::from_utf8_lossy(&fdb.stdout);
        for p in &pods[1..] {
            assert!(
                fdb.contains(&format!("dst {} ", underlay_of(p))),
                "no IPv6 FDB entry for {}: {fdb}",
                p.node
            );
        }
    }
    // (WireGuard's endpoints, `[v6]:51820`, show on the wire below: outer IPv6 to port 51820.)
    for a in &pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            let sub6 = Ipv6Net::new(b.v6, 64).unwrap().trunc().to_string();
            let r = lab.ip_json(&lab.node_netns(&a.node), &["-6", "route", "show", &sub6]);
            assert_eq!(r[0]["dev"], device, "{} -> {sub6}: {r}", a.node);
            reach_both_families(&lab, a, b);
        }
    }
    let port = if encryption == "wireguard" {
        51820
    } else {
        8472
    };
    outer_packets_are_ipv6(
        &lab,
        &pods[0],
        &pods[1],
        port,
        &underlay_of(&pods[0]),
        &underlay_of(&pods[1]),
    );
    if encryption == "none" {
        ipv6_egress_is_masqueraded(&lab, &pods);
    } else {
        // The live switch: VXLAN over IPv6 takes over, and WireGuard over IPv6 comes back.
        for (value, dev, port) in [
            ("none", "sluice.vxlan", 8472),
            ("wireguard", "sluice.wg", 51820),
        ] {
            lab.set_config("encryption", value);
            let sub6 = Ipv6Net::new(pods[1].v6, 64).unwrap().trunc().to_string();
            assert!(
                eventually(Duration::from_secs(20), || {
                    let r = lab.ip_json(&n1, &["-6", "route", "show", &sub6]);
                    r[0]["dev"] == dev
                }),
                "encryption {value}: {sub6} not via {dev}"
            );
            assert!(
                every_pair_reaches_over_both_families(&lab, Duration::from_secs(20)),
                "encryption {value}: not all reachable"
            );
            outer_packets_are_ipv6(
                &lab,
                &pods[0],
                &pods[1],
                port,
                &underlay_of(&pods[0]),
                &underlay_of(&pods[1]),
            );
        }
    }
    let down = lab.down();
    assert!(down.status.success(), "{}", output_text(&down));
}

#[test]
fn pods_reach_each_other_through_vxlan_over_an_ipv6_underlay() {
    if !have_root() {
        return;
    }
    v6_underlay_lab("none");
}

#[test]
fn pods_reach_each_other_through_wireguard_over_an_ipv6_underlay() {
    if !have_root() {
        return;
    }
    v6_underlay_lab("wireguard");
}
