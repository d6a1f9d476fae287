//! The CNI plugin on an IPv6-only node (subnet.env with only the IPv6 pair, written here as
//! the agent writes it): the built binary ADDs pods in namespaces this test made, each gets one
//! IPv6 /128 and no IPv4 address, in every version of the conflist's `cniVersions`; they reach
//! each other over IPv6 (ICMPv6, TCP, the server seeing the peer's own address), CHECK passes,
//! and DEL leaves nothing; the subnet running out fails the ADD with code 101 and a DEL makes
//! room.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use sluice_e2e::cni::CniNode;
use sluice_e2e::lab::{tcp_ask, tcp_server};
use sluice_e2e::{have_root, run, Netns};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";

/// The pod's one IPv6 address in an ADD result, its shape checked for `version`.
fn address(result: &Value, version: &str) -> Ipv6Addr {
    assert_eq!(result["cniVersion"], version);
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 1, "{version}: one IPv6 address only: {result}");
    assert_eq!(ips[0]["gateway"], GATEWAY_V6, "{result}");
    assert_eq!(
        ips[0].get("version").and_then(Value::as_str),
        version.starts_with("0.").then_some("6"),
        "{result}"
    );
    assert_eq!(result["routes"], json!([{"dst": "::/0", "gw": GATEWAY_V6}]));
    let v6 = ips[0]["address"].as_str().unwrap();
    v6.strip_suffix("/128")
        .unwrap_or_else(|| panic!("not a /128: {v6}"))
        .parse()
        .unwrap()
}

fn setup() -> CniNode {
    let node = CniNode::new(None);
    node.set_v6_only_subnet_env("fd00:10:244::/56", "fd00:10:244:7::/64");
    node.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    node
}

#[test]
fn ipv6_only_pods_reach_each_other_in_every_version_and_del_leaves_nothing() {
    if !have_root() {
        return;
    }
    let node = setup();
    let versions = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    let pods: Vec<Netns> = versions.iter().map(|_| Netns::new("v6o")).collect();
    let mut addrs = Vec::new();
    for (i, (pod, version)) in pods.iter().zip(versions).enumerate() {
        let conf = node.conf(version, json!({}));
        let id = format!("v6only{i}");
        let out = node
            .call("ADD", &id, Some(&pod.path()), &conf)
            .assert_ok()
            .json();
        let v6 = address(&out, version);
        assert!(v6.to_string().starts_with("fd00:10:244:7:"), "{v6}");
        if version != "0.3.1" {
            let mut checked = conf.clone();
            checked["prevResult"] = out;
            node.call("CHECK", &id, Some(&pod.path()), &checked)
                .assert_ok();
        }
        // No IPv4 address and no IPv4 route in the pod; its /128 usable at once.
        let v4 = pod.ip_json(&["-4", "addr", "show", "dev", "eth0"]);
        assert!(
            v4.iter()
                .all(|x| x["addr_info"].as_array().is_none_or(Vec::is_empty)),
            "pod{i} has IPv4: {v4:?}"
        );
        let routes4 = pod.ip_json(&["-4", "route", "show"]);
        assert!(routes4.is_empty(), "pod{i}: IPv4 routes {routes4:?}");
        let eth0 = pod.ip_json(&["-6", "addr", "show", "dev", "eth0", "scope", "global"]);
        let held = &eth0[0]["addr_info"][0];
        assert_eq!(held["local"], v6.to_string().as_str(), "pod{i}: {eth0:?}");
        assert_eq!(held["prefixlen"], 128);
        assert!(held.get("tentative").is_none(), "pod{i}: {held:?}");
        addrs.push(v6);
    }
    assert_eq!(node.allocations().len(), 0);
    assert_eq!(node.allocations_v6().len(), versions.len());
    assert_eq!(node.pod_routes().len(), 0, "no IPv4 host route");
    assert_eq!(node.pod_routes_v6().len(), versions.len());
    // ICMPv6 between every pair; TCP with the server seeing the peer's own address.
    for (i, from) in pods.iter().enumerate() {
        for (j, to) in addrs.iter().enumerate().filter(|(j, _)| *j != i) {
            let ok =
                run(from
                    .command("ping")
                    .args(["-6", "-c", "1", "-W", "2", "-q", &to.to_string()]))
                .status
                .success();
            assert!(ok, "pod{i} cannot ping pod{j} {to}");
        }
    }
    let (server, peers) = tcp_server(
        &pods[1].name,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 7070),
        "six",
        2,
    );
    let answer = tcp_ask(
        &pods[0].name,
        SocketAddr::new(addrs[1].into(), server.port()),
    )
    .unwrap();
    assert_eq!(answer, "six");
    let seen = peers
        .recv_timeout(std::time::Duration::from_secs(3))
        .unwrap()
        .ip();
    assert_eq!(seen, IpAddr::V6(addrs[0]), "nothing translated on the way");
    for (i, (pod, version)) in pods.iter().zip(versions).enumerate() {
        node.call(
            "DEL",
            &format!("v6only{i}"),
            Some(&pod.path()),
            &node.conf(version, json!({})),
        )
        .assert_ok();
        assert!(
            pod.links().iter().all(|l| l == "lo"),
            "pod{i}: {:?}",
            pod.links()
        );
    }
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());
    assert!(
        node.pod_routes_v6().is_empty(),
        "{:?}",
        node.pod_routes_v6()
    );
    assert!(
        node.allocations_v6().is_empty(),
        "{:?}",
        node.allocations_v6()
    );
}

#[test]
fn an_exhausted_ipv6_only_subnet_fails_the_add_and_a_del_makes_room() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(None);
    // A /124 holds 15 pod addresses.
    node.set_v6_only_subnet_env("fd00:10:244::/56", "fd00:10:244:7::/124");
    let conf = node.conf("1.0.0", json!({}));
    let pods: Vec<Netns> = (0..16).map(|_| Netns::new("v6x")).collect();
    for (i, pod) in pods.iter().take(15).enumerate() {
        node.call("ADD", &format!("x{i}"), Some(&pod.path()), &conf)
            .assert_ok();
    }
    let full = node.call("ADD", "x15", Some(&pods[15].path()), &conf);
    assert_eq!(full.error_code(), 101, "{}", full.json());
    assert!(
        pods[15].links().iter().all(|l| l == "lo"),
        "{:?}",
        pods[15].links()
    );
    assert_eq!(node.allocations_v6().len(), 15);
    assert_eq!(node.pod_links().len(), 15);
    node.call("DEL", "x3", Some(&pods[3].path()), &conf)
        .assert_ok();
    node.call("ADD", "x15", Some(&pods[15].path()), &conf)
        .assert_ok();
    assert_eq!(node.allocations_v6().len(), 15);
    for (i, pod) in pods.iter().enumerate().filter(|(i, _)| *i != 3) {
        node.call("DEL", &format!("x{i}"), Some(&pod.path()), &conf)
            .assert_ok();
    }
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());
    assert!(node.allocations_v6().is_empty());
}
