//! Direct routing per address family in a dual-stack lab (`--ip-family dual --overlay never`,
//! nodes on two routed segments): a peer's IPv6 subnet is routed straight to its IPv6 underlay
//! address when both nodes share an IPv6 underlay prefix, exactly as its IPv4 subnet is to its
//! IPv4 one; a peer with no IPv6 underlay neighbour is said unreachable over IPv6 (route, status
//! and /readyz), and rides VXLAN over the IPv4 underlay once `overlay` is `cross-subnet`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::dual::*;
use sluice_e2e::lab::{lab_cmd, output_text, Lab};
use sluice_e2e::{eventually, have_root};
use std::process::Command;
use std::time::Duration;

/// `node`'s route to `subnet` in `family` (`-4`/`-6`): (device, gateway, type).
fn route(lab: &Lab, node: &str, family: &str, subnet: &str) -> (String, String, String) {
    let r = lab.ip_json(&lab.node_netns(node), &[family, "route", "show", subnet]);
    let get = |k: &str| r[0][k].as_str().unwrap_or_default().to_string();
    (get("dev"), get("gateway"), get("type"))
}

/// (pathV6, whyV6) of `peer` in `node`'s status document.
fn peer_v6(lab: &Lab, node: &str, peer: &str) -> (String, String) {
    let doc: Value = serde_json::from_str(&node_status(lab, node, "json")).unwrap_or(Value::Null);
    let p = doc["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["node"] == peer).cloned())
        .unwrap_or(Value::Null);
    (
        p["pathV6"].as_str().unwrap_or_default().into(),
        p["whyV6"].as_str().unwrap_or_default().into(),
    )
}

#[test]
fn ipv6_subnets_are_routed_directly_via_ipv6_underlay_neighbours() {
    if !have_root() {
        return;
    }
    // node-1 and node-3 on segment 0 (172.31.0.0/24, fd00:31::/64), node-2 on segment 1.
    let lab = Lab::up(&[
        "--nodes",
        "3",
        "--segments",
        "2",
        "--pods-per-node",
        "1",
        "--ip-family",
        "dual",
        "--overlay",
        "never",
    ]);
    let status = lab.status();
    let pods = pods(&status);
    let on = |n: &str| {
        pods.iter()
            .find(|p| p.node.ends_with(&format!("-node-{n}")))
            .unwrap()
    };
    let (p1, p2, p3) = (on("1"), on("2"), on("3"));
    // Both families direct between the nodes of segment 0, each via the peer's own address of
    // that family on eth0: plain IP, no tunnel.
    for (me, peer, gw6, gw4) in [
        (p1, p3, "fd00:31::3", "172.31.0.3"),
        (p3, p1, "fd00:31::1", "172.31.0.1"),
    ] {
        let sub6 = peer.subnet6();
        assert!(
            eventually(Duration::from_secs(20), || route(
                &lab, &me.node, "-6", &sub6
            ) == (
                "eth0".into(),
                gw6.into(),
                "unicast".into()
            ) || route(
                &lab, &me.node, "-6", &sub6
            ) == (
                "eth0".into(),
                gw6.into(),
                String::new()
            )),
            "{}: IPv6 route to {sub6}: {:?}",
            me.node,
            route(&lab, &me.node, "-6", &sub6)
        );
        let sub4 = ipnet::Ipv4Net::new(peer.ipv4(), 24)
            .unwrap()
            .trunc()
            .to_string();
        assert_eq!(route(&lab, &me.node, "-4", &sub4).1, gw4);
        assert_eq!(
            peer_v6(&lab, &me.node, &peer.node),
            ("direct".into(), "same IPv6 underlay subnet".into())
        );
    }
    reach_both_families(&lab, p1, p3);
    // No VXLAN device at all with overlay never: nothing was encapsulated.
    let links = lab.ip_json(&lab.node_netns(&p1.node), &["link", "show"]);
    assert!(
        !links
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["ifname"] == "sluice.vxlan"),
        "{links:#}"
    );
    // node-2 is on another segment: unreachable over both families, route and status say so.
    let sub2 = p2.subnet6();
    assert!(
        eventually(Duration::from_secs(10), || route(
            &lab, &p1.node, "-6", &sub2
        )
        .2 == "unreachable"),
        "{:?}",
        route(&lab, &p1.node, "-6", &sub2)
    );
    assert!(!ping(&lab, p1, &p2.v6.to_string(), "-6"));

    // node-3 loses its IPv6 underlay address and its agent restarts: it publishes none, so
    // node-1 cannot route node-3's IPv6 subnet directly and says so on /readyz and /status
    // (IPv4 stays direct and working).
    let ns3 = lab.node_netns(&p3.node);
    let del = Command::new("ip")
        .args(["-n", &ns3, "addr", "del", "fd00:31::3/64", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(del.status.success(), "{}", output_text(&del));
    for action in ["stop", "start"] {
        let out = lab_cmd(&["agent", "--name", &lab.name, action, &p3.node], 30);
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let sub3 = p3.subnet6();
    assert!(
        eventually(Duration::from_secs(30), || peer_v6(
            &lab, &p1.node, &p3.node
        ) == (
            "unreachable".into(),
            "the peer publishes no IPv6 underlay address".into()
        )),
        "{:?}",
        peer_v6(&lab, &p1.node, &p3.node)
    );
    assert!(
        eventually(Duration::from_secs(10), || route(
            &lab, &p1.node, "-6", &sub3
        )
        .2 == "unreachable"),
        "{:?}",
        route(&lab, &p1.node, "-6", &sub3)
    );
    let table = node_status(&lab, &p1.node, "table");
    assert!(
        table.contains("peer unreachable")
            && table.contains(&format!(
                "IPv6 subnet {sub3}: the peer publishes no IPv6 underlay address"
            )),
        "{table}"
    );
    assert!(
        eventually(Duration::from_secs(20), || peer_v6(
            &lab, &p3.node, &p1.node
        ) == (
            "unreachable".into(),
            "this node has no IPv6 underlay address".into()
        )),
        "{:?}",
        peer_v6(&lab, &p3.node, &p1.node)
    );
    assert!(ping(&lab, p1, &p3.ipv4().to_string(), "-4"));
    assert!(!ping(&lab, p1, &p3.v6.to_string(), "-6"));

    // overlay cross-subnet: the IPv6 subnet without a direct neighbour rides VXLAN (over the
    // IPv4 underlay), its IPv4 subnet stays direct.
    lab.set_config("overlay", "cross-subnet");
    assert!(
        eventually(Duration::from_secs(20), || route(
            &lab, &p1.node, "-6", &sub3
        )
        .0 == "sluice.vxlan"),
        "{:?}",
        route(&lab, &p1.node, "-6", &sub3)
    );
    assert_eq!(
        peer_v6(&lab, &p1.node, &p3.node),
        (
            "vxlan".into(),
            "the peer publishes no IPv6 underlay address".into()
        )
    );
    let sub4 = ipnet::Ipv4Net::new(p3.ipv4(), 24)
        .unwrap()
        .trunc()
        .to_string();
    assert_eq!(route(&lab, &p1.node, "-4", &sub4).0, "eth0");
    reach_both_families(&lab, p1, p3);
    let down = lab.down();
    assert!(down.status.success(), "{}", output_text(&down));
}
