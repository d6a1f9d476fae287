//! The CNI plugin on a dual-stack node (subnet.env with the IPv6 pair, written here by hand as the
//! agent does not write it yet): the built binary ADDs two pods in namespaces this test made,
//! each gets an IPv4 /32 and an IPv6 /128, they reach each other over both families, and DEL
//! leaves nothing of either; every version of the conflist's `cniVersions` gets both families;
//! either family running out fails the ADD cleanly and gives the other family's address back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use sluice_e2e::cni::CniNode;
use sluice_e2e::lab::{tcp_ask, tcp_server};
use sluice_e2e::{have_root, run, Netns};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";
const SUBNET6: &str = "fd00:10:244:7::/64";

/// The pod's two addresses in an ADD result, checking their shape for `version` and that the
/// IPv6 one starts with `prefix6`.
fn addresses(result: &Value, version: &str, prefix6: &str) -> (Ipv4Addr, Ipv6Addr) {
    assert_eq!(result["cniVersion"], version);
    let ips = result["ips"].as_array().unwrap();
    assert_eq!(ips.len(), 2, "{version}: both families: {result}");
    let v4 = ips[0]["address"].as_str().unwrap();
    let v6 = ips[1]["address"].as_str().unwrap();
    assert_eq!(ips[0]["gateway"], "169.254.1.1", "{result}");
    assert_eq!(ips[1]["gateway"], GATEWAY_V6, "{result}");
    assert!(ips.iter().all(|ip| ip["interface"] == 1), "{result}");
    if version.starts_with("0.") {
        assert_eq!(
            (&ips[0]["version"], &ips[1]["version"]),
            (&json!("4"), &json!("6"))
        );
    } else {
        assert!(ips.iter().all(|ip| ip.get("version").is_none()), "{result}");
    }
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}, {"dst": "::/0", "gw": GATEWAY_V6}])
    );
    let v4: Ipv4Addr = v4.strip_suffix("/32").unwrap().parse().unwrap();
    let v6: Ipv6Addr = v6
        .strip_suffix("/128")
        .unwrap_or_else(|| panic!("not a /128: {v6}"))
        .parse()
        .unwrap();
    assert!(v6.to_string().starts_with(prefix6), "{v6}");
    (v4, v6)
}

/// One ping of `dst` (either family) from `ns`, bounded by 2 s; true when answered.
fn ping(ns: &Netns, dst: IpAddr) -> bool {
    let family = if dst.is_ipv6() { "-6" } else { "-4" };
    run(ns
        .command("ping")
        .args([family, "-c", "1", "-W", "2", "-q", &dst.to_string()]))
    .status
    .success()
}

#[test]
fn dual_stack_pods_reach_each_other_over_both_families_and_del_leaves_nothing() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(None);
    node.set_dual_subnet_env(
        "10.244.0.0/16",
        "10.244.7.0/24",
        "fd00:10:244::/56",
        SUBNET6,
    );
    // The node forwards IPv6 between its pods' veths (the agent will set this; IPv4's is set by
    // CniNode).
    node.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    let pods = [Netns::new("d"), Netns::new("d")];
    let versions = ["0.4.0", "1.0.0"];
    let mut addrs = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let conf = node.conf(versions[i], json!({}));
        let out = node
            .call("ADD", &format!("dual{i}"), Some(&pod.path()), &conf)
            .assert_ok()
            .json();
        addrs.push(addresses(&out, versions[i], "fd00:10:244:7:"));
        // CHECK with the result as prevResult finds both families in place.
        let mut checked = conf.clone();
        checked["prevResult"] = out;
        node.call("CHECK", &format!("dual{i}"), Some(&pod.path()), &checked)
            .assert_ok();
    }
    assert_ne!(addrs[0], addrs[1]);
    for (i, pod) in pods.iter().enumerate() {
        let (_, v6) = addrs[i];
        // The pod holds its /128 on eth0, usable at once (not tentative: no DAD), and ::/0 via
        // the host veth's link-local address.
        let eth0 = pod.ip_json(&["-6", "addr", "show", "dev", "eth0"]);
        let held: Vec<&Value> = eth0[0]["addr_info"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["local"] == v6.to_string().as_str())
            .collect();
        assert_eq!(held.len(), 1, "pod{i}: {eth0:?}");
        assert_eq!(held[0]["prefixlen"], 128);
        assert!(held[0].get("tentative").is_none(), "pod{i}: {held:?}");
        let default = pod.ip_json(&["-6", "route", "show", "default"]);
        assert_eq!(default.len(), 1, "pod{i}: {default:?}");
        assert_eq!(default[0]["gateway"], GATEWAY_V6);
        assert_eq!(default[0]["dev"], "eth0");
    }
    // The node routes each /128 to its pod's veth (proto 77, as the /32s), and every host veth
    // holds the gateway address.
    let routes = node.pod_routes_v6();
    assert_eq!(routes.len(), 2, "{routes:?}");
    for (_, v6) in &addrs {
        let route = routes
            .iter()
            .find(|r| r["dst"] == v6.to_string().as_str())
            .unwrap_or_else(|| panic!("no route to {v6}: {routes:?}"));
        let dev = route["dev"].as_str().unwrap();
        assert!(dev.starts_with("sl"), "{route}");
        let host = node.ns.ip_json(&["-6", "addr", "show", "dev", dev]);
        assert!(
            host[0]["addr_info"]
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["local"] == GATEWAY_V6 && a.get("tentative").is_none()),
            "{dev}: {host:?}"
        );
    }
    assert_eq!(node.pod_routes().len(), 2);
    // Each pod reaches the other over both families: ICMP, then TCP.
    for (from, to) in [(0, 1), (1, 0)] {
        let (v4, v6) = addrs[to];
        assert!(ping(&pods[from], v6.into()), "pod{from} cannot ping {v6}");
        assert!(ping(&pods[from], v4.into()), "pod{from} cannot ping {v4}");
    }
    let (server, peers) = tcp_server(
        &pods[1].name,
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 7070),
        "dual",
        2,
    );
    for (family, to) in [
        ("IPv6", IpAddr::V6(addrs[1].1)),
        ("IPv4", addrs[1].0.into()),
    ] {
        let answer = tcp_ask(&pods[0].name, SocketAddr::new(to, server.port()))
            .unwrap_or_else(|e| panic!("{family} TCP pod0 -> {to}: {e}"));
        assert_eq!(answer, "dual", "{family}");
    }
    let seen: Vec<IpAddr> = (0..2)
        .map(|_| {
            let peer = peers
                .recv_timeout(std::time::Duration::from_secs(3))
                .unwrap()
                .ip();
            // The IPv4 connection reaches the dual socket as a v4-mapped address.
            match peer {
                IpAddr::V6(a) => a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4),
                a => a,
            }
        })
        .collect();
    assert_eq!(
        seen,
        vec![IpAddr::V6(addrs[0].1), IpAddr::V4(addrs[0].0)],
        "the server saw pod0's own addresses: nothing translated on the way"
    );
    assert_eq!(node.allocations().len(), 2);
    assert_eq!(node.allocations_v6().len(), 2);
    for (i, pod) in pods.iter().enumerate() {
        let conf = node.conf(versions[i], json!({}));
        node.call("DEL", &format!("dual{i}"), Some(&pod.path()), &conf)
            .assert_ok();
        assert!(
            pod.links().iter().all(|l| l == "lo"),
            "pod{i} still has {:?}",
            pod.links()
        );
    }
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());
    assert!(node.pod_routes().is_empty(), "{:?}", node.pod_routes());
    assert!(
        node.pod_routes_v6().is_empty(),
        "{:?}",
        node.pod_routes_v6()
    );
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(
        node.allocations_v6().is_empty(),
        "{:?}",
        node.allocations_v6()
    );
}

#[test]
fn an_exhausted_ipv6_subnet_fails_the_add_and_holds_no_ipv4_address() {
    if !have_root() {
        return;
    }
    // A /124 holds 15 pod addresses (the narrowest subnet-length-v6): the 16th pod finds no
    // IPv6 address while IPv4 has plenty.
    let node = CniNode::new(None);
    node.set_dual_subnet_env(
        "10.244.0.0/16",
        "10.244.9.0/24",
        "fd00:10:244::/56",
        "fd00:10:244:9::/124",
    );
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..16).map(|_| Netns::new("x")).collect();
    for (i, pod) in pods.iter().take(15).enumerate() {
        node.call("ADD", &format!("full{i}"), Some(&pod.path()), &conf)
            .assert_ok();
    }
    let out = node.call("ADD", "full15", Some(&pods[15].path()), &conf);
    assert_eq!(out.error_code(), 101, "{out:?}");
    assert!(out.stdout.contains("fd00:10:244:9::/124"), "{out:?}");
    assert_eq!(
        node.allocations().len(),
        15,
        "the failed ADD gave its IPv4 address back"
    );
    assert_eq!(node.allocations_v6().len(), 15);
    assert_eq!(node.pod_links().len(), 15);
    assert!(pods[15].links().iter().all(|l| l == "lo"));
    for (i, pod) in pods.iter().take(15).enumerate() {
        node.call("DEL", &format!("full{i}"), Some(&pod.path()), &conf)
            .assert_ok();
    }
    assert!(node.allocations().is_empty() && node.allocations_v6().is_empty());
    assert!(node.pod_routes().is_empty() && node.pod_routes_v6().is_empty());
}

#[test]
fn a_failed_dual_add_and_gc_leave_nothing_of_either_family() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(None);
    node.set_dual_subnet_env(
        "10.244.0.0/16",
        "10.244.10.0/24",
        "fd00:10:244::/56",
        "fd00:10:244:a::/64",
    );
    node.ns.sysctl("net.ipv6.conf.all.forwarding", "1");
    let conf = node.conf("1.1.0", json!({}));
    // A container that already has an eth0 sluice did not make: the ADD fails in the kernel,
    // after both addresses were allocated, and gives both back.
    let taken = Netns::new("t");
    taken.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    let out = node.call("ADD", "taken", Some(&taken.path()), &conf);
    assert_eq!(out.error_code(), 103, "{out:?}");
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(
        node.allocations_v6().is_empty(),
        "{:?}",
        node.allocations_v6()
    );
    assert!(node.pod_links().is_empty() && node.pod_routes_v6().is_empty());
    let mut left = taken.links();
    left.sort();
    assert_eq!(
        left,
        vec!["eth0", "lo", "other0"],
        "its own eth0 is left alone"
    );
    // GC keeps the valid attachment's addresses of both families and frees the other's.
    let pods = [Netns::new("g"), Netns::new("g")];
    let mut addrs = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let out = node
            .call("ADD", &format!("gc{i}"), Some(&pod.path()), &conf)
            .assert_ok()
            .json();
        addrs.push(addresses(&out, "1.1.0", "fd00:10:244:a:"));
    }
    let valid = json!({ "cni.dev/valid-attachments": [{"containerID": "gc1", "ifname": "eth0"}]});
    node.call_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        node.conf("1.1.0", valid).to_string().as_bytes(),
    )
    .assert_ok();
    let kept: Vec<String> = node.allocations_v6().keys().cloned().collect();
    assert_eq!(kept, vec![addrs[1].1.to_string()]);
    assert_eq!(node.allocations().len(), 1);
    assert_eq!(node.pod_links().len(), 1);
    let routes = node.pod_routes_v6();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!(routes[0]["dst"], addrs[1].1.to_string().as_str());
    assert!(pods[0].links().iter().all(|l| l == "lo"));
    node.call("DEL", "gc1", Some(&pods[1].path()), &conf)
        .assert_ok();
    assert!(node.allocations().is_empty() && node.allocations_v6().is_empty());
    assert!(node.pod_links().is_empty() && node.pod_routes_v6().is_empty());
}

#[test]
fn every_version_the_conflist_lists_gets_both_families_and_del_leaves_nothing() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(None);
    node.set_dual_subnet_env(
        "10.244.0.0/16",
        "10.244.11.0/24",
        "fd00:10:244::/56",
        "fd00:10:244:b::/64",
    );
    // The agent's conflist: cniVersion 1.0.0, cniVersions [0.3.1, 0.4.0, 1.0.0, 1.1.0].
    let versions = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    let pods: Vec<Netns> = versions.iter().map(|_| Netns::new("v")).collect();
    let mut seen = std::collections::BTreeSet::new();
    for (version, pod) in versions.iter().zip(&pods) {
        let conf = node.conf(version, json!({}));
        let id = format!("ver{}", version.replace('.', ""));
        let out = node
            .call("ADD", &id, Some(&pod.path()), &conf)
            .assert_ok()
            .json();
        let (v4, v6) = addresses(&out, version, "fd00:10:244:b:");
        assert!(seen.insert(v4) && seen.len() <= versions.len());
        assert_eq!(
            node.allocations_v6()[&v6.to_string()]["containerID"],
            id.as_str()
        );
        // CHECK exists from 0.4.0 on; with the result as prevResult it finds both families.
        if *version != "0.3.1" {
            let mut checked = conf.clone();
            checked["prevResult"] = out.clone();
            node.call("CHECK", &id, Some(&pod.path()), &checked)
                .assert_ok();
        }
    }
    assert_eq!(node.allocations().len(), versions.len());
    assert_eq!(node.allocations_v6().len(), versions.len());
    assert_eq!(node.pod_routes_v6().len(), versions.len());
    for (version, pod) in versions.iter().zip(&pods) {
        let id = format!("ver{}", version.replace('.', ""));
        node.call(
            "DEL",
            &id,
            Some(&pod.path()),
            &node.conf(version, json!({})),
        )
        .assert_ok();
        assert!(pod.links().iter().all(|l| l == "lo"), "{version}");
    }
    assert!(node.allocations().is_empty() && node.allocations_v6().is_empty());
    assert!(node.pod_links().is_empty());
    assert!(node.pod_routes().is_empty() && node.pod_routes_v6().is_empty());
}

#[test]
fn an_exhausted_ipv4_subnet_fails_the_add_and_holds_no_ipv6_address() {
    if !have_root() {
        return;
    }
    // A /28 of IPv4 beside a /64 of IPv6: IPv4 runs out first.
    let node = CniNode::new(None);
    node.set_dual_subnet_env(
        "10.244.0.0/16",
        "10.244.12.0/28",
        "fd00:10:244::/56",
        "fd00:10:244:c::/64",
    );
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..17).map(|_| Netns::new("y")).collect();
    let mut added = 0;
    let mut refused = None;
    for (i, pod) in pods.iter().enumerate() {
        let out = node.call("ADD", &format!("v4full{i}"), Some(&pod.path()), &conf);
        if out.exit != 0 {
            refused = Some((i, out));
            break;
        }
        out.assert_ok();
        added += 1;
    }
    let (failed, out) = refused.expect("a /28 cannot hold 17 pods");
    assert!(added >= 1, "no pod fitted at all: {out:?}");
    assert_eq!(out.error_code(), 101, "{out:?}");
    assert!(out.stdout.contains("10.244.12.0/28"), "{out:?}");
    // Nothing of the failed ADD: no IPv6 address held for it, no veth, no route.
    assert_eq!(node.allocations().len(), added);
    assert_eq!(
        node.allocations_v6().len(),
        added,
        "the failed ADD holds no IPv6 address"
    );
    assert!(node
        .allocations_v6()
        .values()
        .all(|o| o["containerID"] != format!("v4full{failed}").as_str()));
    assert_eq!(node.pod_links().len(), added);
    assert_eq!(node.pod_routes_v6().len(), added);
    assert!(pods[failed].links().iter().all(|l| l == "lo"));
    // A DEL frees an address of each family; the next ADD fits again.
    node.call("DEL", "v4full0", Some(&pods[0].path()), &conf)
        .assert_ok();
    node.call(
        "ADD",
        &format!("v4full{failed}"),
        Some(&pods[failed].path()),
        &conf,
    )
    .assert_ok();
    assert_eq!(node.allocations().len(), added);
    assert_eq!(node.allocations_v6().len(), added);
    for (i, pod) in pods.iter().enumerate().take(failed + 1).skip(1) {
        node.call("DEL", &format!("v4full{i}"), Some(&pod.path()), &conf)
            .assert_ok();
    }
    assert!(node.allocations().is_empty() && node.allocations_v6().is_empty());
    assert!(node.pod_links().is_empty());
    assert!(node.pod_routes().is_empty() && node.pod_routes_v6().is_empty());
}
