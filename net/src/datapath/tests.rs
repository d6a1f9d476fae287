#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::vxlan::vtep_mac;
use crate::wireguard::KeyPair;

fn key(n: u8) -> String {
    KeyPair::from_bytes([n; 32]).public_base64()
}

/// A node on underlay segment `seg` (172.31.seg.0/24) with subnet 10.244.n.0/24.
fn node(name: &str, n: u8, seg: u8, enc: &str) -> NodeRecord {
    NodeRecord {
        node: name.into(),
        underlay_ip: Ipv4Addr::new(172, 31, seg, 10 + n).into(),
        underlay_ip_v6: None,
        vtep_mac: vtep_mac(name),
        wireguard_public_key: Some(key(n)),
        encryption: enc.into(),
        subnet: Some(format!("10.244.{n}.0/24").parse().unwrap()),
        subnet_v6: None,
    }
}

fn cfg(overlay: Overlay, encryption: bool) -> DatapathConfig {
    DatapathConfig {
        overlay,
        underlay: "172.31.0.11/24".parse().unwrap(),
        underlay_v6: None,
        underlay_ifindex: 2,
        vxlan: VxlanConfig::auto(2, Ipv4Addr::new(172, 31, 0, 11).into(), 1500),
        wireguard: WgSettings {
            enabled: encryption,
            port: 51820,
            keepalive_secs: 0,
        },
    }
}

fn enc(on: bool) -> &'static str {
    if on {
        "wireguard"
    } else {
        "none"
    }
}

/// Every combination of overlay, where the peer is, and who runs WireGuard: the path, and
/// which backend's share carries the peer's subnet.
#[test]
fn the_path_for_every_combination_of_overlay_segment_and_encryption() {
    use Overlay::*;
    use Path::*;
    // (overlay, peer on my subnet, I encrypt, peer encrypts) -> path
    let table = [
        (Always, true, false, false, Vxlan),
        (Always, false, false, false, Vxlan),
        (CrossSubnet, true, false, false, Direct),
        (CrossSubnet, false, false, false, Vxlan),
        (Never, true, false, false, Direct),
        (Never, false, false, false, Unreachable),
        // Both run WireGuard: it carries the pair whatever overlay says.
        (Always, true, true, true, Wireguard),
        (Always, false, true, true, Wireguard),
        (CrossSubnet, true, true, true, Wireguard),
        (CrossSubnet, false, true, true, Wireguard),
        (Never, true, true, true, Wireguard),
        (Never, false, true, true, Wireguard),
        // Mid-switch, one end only: overlay decides, as if neither ran it.
        (Always, true, true, false, Vxlan),
        (Always, false, false, true, Vxlan),
        (CrossSubnet, true, true, false, Direct),
        (CrossSubnet, false, false, true, Vxlan),
        (CrossSubnet, true, false, true, Direct),
        (CrossSubnet, false, true, false, Vxlan),
        (Never, true, false, true, Direct),
        (Never, false, true, false, Unreachable),
        (Never, true, true, false, Direct),
        (Never, false, false, true, Unreachable),
        (Always, true, false, true, Vxlan),
        (Always, false, true, false, Vxlan),
    ];
    assert_eq!(table.len(), 24);
    for (overlay, same, mine, theirs, want) in table {
        let me = node("a", 1, 0, enc(mine));
        let peer = node("b", 2, if same { 0 } else { 1 }, enc(theirs));
        let p = plan(&me, std::slice::from_ref(&peer), &cfg(overlay, mine));
        let case = format!("{overlay:?} same={same} me={mine} peer={theirs}");
        assert_eq!(p.paths.len(), 1, "{case}");
        assert_eq!(p.paths[0].path, want, "{case}");
        let s = peer.subnet.unwrap();
        assert_eq!(
            p.vxlan.routes.contains_key(&ipnet::IpNet::from(s)),
            want == Vxlan,
            "{case}"
        );
        assert_eq!(p.wireguard.routes.contains(&s), want == Wireguard, "{case}");
        assert_eq!(
            p.direct.routes.get(&s).map(|a| std::net::IpAddr::V4(*a)) == Some(peer.underlay_ip),
            want == Direct,
            "{case}"
        );
        assert_eq!(
            p.direct.unreachable.contains(&s),
            want == Unreachable,
            "{case}"
        );
        // The VXLAN device stays unless overlay is never; WireGuard's exists while anyone runs it.
        assert_eq!(p.vxlan.wanted, overlay != Never, "{case}");
        assert_eq!(p.wireguard.device, mine || theirs, "{case}");
        // Only a VXLAN peer has VXLAN entries.
        assert_eq!(
            p.vxlan.fdb.contains_key(&peer.vtep_mac),
            want == Vxlan,
            "{case}"
        );
    }
}

#[test]
fn reasons_say_why() {
    let me = node("a", 1, 0, "none");
    let near = node("b", 2, 0, "none");
    let far = node("c", 3, 1, "none");
    let p = plan(
        &me,
        &[far.clone(), near.clone()],
        &cfg(Overlay::Never, false),
    );
    let by: BTreeMap<&str, &PeerPath> = p.paths.iter().map(|x| (x.peer.node.as_str(), x)).collect();
    assert_eq!(
        by["b"].reason.to_string(),
        "same underlay subnet (overlay: never)"
    );
    assert_eq!(
        by["c"].reason.to_string(),
        "other underlay subnet (overlay: never)"
    );
    assert_eq!(
        p.unreachable()
            .map(|x| x.peer.node.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );
    let e = plan(
        &node("a", 1, 0, "wireguard"),
        &[node("b", 2, 1, "wireguard")],
        &cfg(Overlay::Never, true),
    );
    assert_eq!(
        e.paths[0].reason.to_string(),
        "both nodes run encryption: wireguard"
    );
}

/// Mixed peers in one plan, mid-switch: each takes its own path, in node order, whatever the
/// order they came in.
#[test]
fn mixed_peers_mid_switch_each_take_their_own_path() {
    let me = node("a", 1, 0, "wireguard");
    let peers = vec![
        node("e", 5, 1, "none"),      // other subnet, not switched yet
        node("b", 2, 0, "wireguard"), // switched
        node("d", 4, 0, "none"),      // same subnet, not switched yet
        node("c", 3, 1, "wireguard"), // other subnet, switched
    ];
    let c = cfg(Overlay::CrossSubnet, true);
    let p = plan(&me, &peers, &c);
    let got: Vec<(&str, Path)> = p
        .paths
        .iter()
        .map(|x| (x.peer.node.as_str(), x.path))
        .collect();
    assert_eq!(
        got,
        [
            ("b", Path::Wireguard),
            ("c", Path::Wireguard),
            ("d", Path::Direct),
            ("e", Path::Vxlan)
        ]
    );
    let mut reversed = peers.clone();
    reversed.reverse();
    assert_eq!(plan(&me, &reversed, &c), p);
    assert_eq!(
        (
            p.count(Path::Wireguard),
            p.count(Path::Direct),
            p.count(Path::Vxlan)
        ),
        (2, 1, 1)
    );
}

#[test]
fn a_peer_whose_key_is_unusable_falls_back_to_the_overlay() {
    let me = node("a", 1, 0, "wireguard");
    let mut bad = node("b", 2, 1, "wireguard");
    bad.wireguard_public_key = Some("not-a-key".into());
    let p = plan(&me, &[bad], &cfg(Overlay::CrossSubnet, true));
    assert_eq!(p.paths[0].path, Path::Vxlan);
    assert!(p
        .skipped
        .iter()
        .any(|(n, r)| n == "b" && r.contains("WireGuard")));
}

#[test]
fn a_conflicting_peer_takes_no_path() {
    let me = node("a", 1, 0, "none");
    let mut overlapping = node("b", 2, 0, "none");
    overlapping.subnet = me.subnet;
    let p = plan(
        &me,
        &[overlapping, node("c", 3, 0, "none")],
        &cfg(Overlay::CrossSubnet, false),
    );
    assert_eq!(
        p.paths
            .iter()
            .map(|x| x.peer.node.as_str())
            .collect::<Vec<_>>(),
        ["c"]
    );
    assert_eq!(p.skipped.len(), 1);
    assert!(!p.direct.routes.contains_key(&me.subnet.unwrap()));
}

#[test]
fn pods_get_the_underlays_mtu_only_where_nothing_is_encapsulated() {
    assert_eq!(auto_pod_mtu(Overlay::Never, false, 1500), 1500);
    assert_eq!(auto_pod_mtu(Overlay::Never, true, 1500), 1440);
    assert_eq!(auto_pod_mtu(Overlay::CrossSubnet, false, 1500), 1440);
    assert_eq!(auto_pod_mtu(Overlay::Always, false, 9000), 8940);
}

#[test]
fn overlay_values_parse_and_print() {
    for o in [Overlay::Always, Overlay::CrossSubnet, Overlay::Never] {
        assert_eq!(Overlay::parse(o.as_str()), Some(o));
    }
    assert_eq!(Overlay::parse("host-gw"), None);
    assert_eq!(Overlay::default(), Overlay::Always);
}

/// A dual-stack node `node(name, n, seg)` with IPv6 subnet fd00:10:244:n::/64 and, when
/// `v6_seg` is given, the IPv6 underlay address fd00:31:v6_seg::(10+n).
fn dual(name: &str, n: u8, seg: u8, v6_seg: Option<u16>) -> NodeRecord {
    NodeRecord {
        subnet_v6: Some(format!("fd00:10:244:{n}::/64").parse().unwrap()),
        underlay_ip_v6: v6_seg.map(|s| format!("fd00:31:{s}::{}", 10 + n).parse().unwrap()),
        ..node(name, n, seg, "none")
    }
}

fn cfg_v6(overlay: Overlay, underlay_v6: Option<&str>) -> DatapathConfig {
    DatapathConfig {
        underlay_v6: underlay_v6.map(|s| s.parse().unwrap()),
        ..cfg(overlay, false)
    }
}

/// A direct peer's IPv6 subnet is routed via its IPv6 underlay address only when that is on
/// this node's IPv6 prefix; else it rides VXLAN (cross-subnet) or is unreachable, said why
/// (never). Tunnelled peers carry both families whatever the IPv6 underlay.
#[test]
fn ipv6_subnets_take_a_direct_route_only_via_an_ipv6_underlay_neighbour() {
    use Overlay::*;
    use Path::*;
    let mine = Some("fd00:31:0::11/64");
    // (overlay, my IPv6 underlay, peer's IPv4 segment, peer's IPv6 segment) -> (v4, v6, why)
    let table = [
        (
            Never,
            mine,
            0,
            Some(0),
            Direct,
            Direct,
            ReasonV6::SameSubnet,
        ),
        (
            Never,
            mine,
            0,
            Some(1),
            Direct,
            Unreachable,
            ReasonV6::OtherSubnet,
        ),
        (
            Never,
            mine,
            0,
            None,
            Direct,
            Unreachable,
            ReasonV6::NoPeerUnderlay,
        ),
        (
            Never,
            None,
            0,
            Some(0),
            Direct,
            Unreachable,
            ReasonV6::NoLocalUnderlay,
        ),
        (
            Never,
            mine,
            1,
            Some(1),
            Unreachable,
            Unreachable,
            ReasonV6::AsIpv4,
        ),
        (
            CrossSubnet,
            mine,
            0,
            Some(0),
            Direct,
            Direct,
            ReasonV6::SameSubnet,
        ),
        (
            CrossSubnet,
            mine,
            0,
            None,
            Direct,
            Vxlan,
            ReasonV6::NoPeerUnderlay,
        ),
        (
            CrossSubnet,
            mine,
            0,
            Some(1),
            Direct,
            Vxlan,
            ReasonV6::OtherSubnet,
        ),
        (
            CrossSubnet,
            mine,
            1,
            Some(1),
            Vxlan,
            Vxlan,
            ReasonV6::AsIpv4,
        ),
        (Always, mine, 0, Some(0), Vxlan, Vxlan, ReasonV6::AsIpv4),
    ];
    for (overlay, local, seg, v6_seg, want4, want6, why) in table {
        let case = format!("{overlay:?} local={local:?} seg={seg} v6_seg={v6_seg:?}");
        let me = dual("a", 1, 0, local.map(|_| 0));
        let peer = dual("b", 2, seg, v6_seg);
        let p = plan(&me, std::slice::from_ref(&peer), &cfg_v6(overlay, local));
        let got = &p.paths[0];
        assert_eq!((got.path, got.v6), (want4, Some((want6, why))), "{case}");
        let s6 = peer.subnet_v6.unwrap();
        assert_eq!(
            p.direct.routes_v6.get(&s6).copied(),
            (want6 == Direct).then(|| peer.underlay_ip_v6.unwrap()),
            "{case}"
        );
        assert_eq!(
            p.direct.unreachable_v6.contains(&s6),
            want6 == Unreachable,
            "{case}"
        );
        assert_eq!(
            p.vxlan.routes.contains_key(&ipnet::IpNet::from(s6)),
            want6 == Vxlan,
            "{case}"
        );
        assert_eq!(
            p.vxlan
                .routes
                .contains_key(&ipnet::IpNet::from(peer.subnet.unwrap())),
            want4 == Vxlan,
            "{case}"
        );
        // VXLAN keeps the peer's FDB entry while either family goes through it.
        assert_eq!(
            p.vxlan.fdb.contains_key(&peer.vtep_mac),
            want4 == Vxlan || want6 == Vxlan,
            "{case}"
        );
        // /readyz names a peer either of whose families is unreachable, and why.
        let why_ready = got.unreachable_why();
        assert_eq!(
            why_ready.is_some(),
            want4 == Unreachable || want6 == Unreachable,
            "{case}"
        );
        if want4 == Direct && want6 == Unreachable {
            let text = why_ready.unwrap();
            assert!(
                text.contains("fd00:10:244:2::/64") && text.contains(&why.to_string()),
                "{case}: {text}"
            );
        }
    }
    // An IPv4-only peer has no IPv6 path at all.
    let p = plan(
        &dual("a", 1, 0, Some(0)),
        &[node("c", 3, 0, "none")],
        &cfg_v6(Never, mine),
    );
    assert_eq!(p.paths[0].v6, None);
    assert!(p.unreachable().next().is_none());
}

/// Over an IPv6 underlay (the node's first InternalIP is IPv6) a peer's IPv4 subnet has no
/// IPv4 neighbour to be routed to: never a route via an IPv6 address; with cross-subnet the
/// peer (both families) goes by VXLAN over IPv6.
#[test]
fn over_an_ipv6_underlay_only_ipv6_subnets_are_routed_directly() {
    let v6 = |name: &str, n: u8| NodeRecord {
        underlay_ip: format!("fd00:31::{}", 10 + n).parse().unwrap(),
        ..dual(name, n, 0, Some(0))
    };
    let c = DatapathConfig {
        underlay: "fd00:31::11/64".parse().unwrap(),
        vxlan: VxlanConfig::auto(2, "fd00:31::11".parse().unwrap(), 1500),
        ..cfg_v6(Overlay::CrossSubnet, Some("fd00:31::11/64"))
    };
    let peer = v6("b", 2);
    let p = plan(&v6("a", 1), std::slice::from_ref(&peer), &c);
    assert_eq!(
        (p.paths[0].path, p.paths[0].v6),
        (Path::Vxlan, Some((Path::Vxlan, ReasonV6::AsIpv4)))
    );
    assert!(p.direct.routes.is_empty());
    assert_eq!(
        auto_pod_mtu_for(Overlay::CrossSubnet, false, 1500, true),
        1420
    );
}

/// An IPv6-only node (no IPv4 subnet) on an IPv6 underlay fd00:31::/64.
fn node_v6_only(name: &str, n: u8, enc: &str) -> NodeRecord {
    let underlay: std::net::Ipv6Addr = format!("fd00:31::{n}").parse().unwrap();
    NodeRecord {
        underlay_ip: underlay.into(),
        underlay_ip_v6: Some(underlay),
        subnet: None,
        subnet_v6: Some(format!("fd00:10:244:{n}::/64").parse().unwrap()),
        ..node(name, n, 0, enc)
    }
}

fn cfg_v6_only(overlay: Overlay, encryption: bool) -> DatapathConfig {
    let mut c = cfg(overlay, encryption);
    c.underlay = "fd00:31::1/64".parse().unwrap();
    c.underlay_v6 = Some("fd00:31::1/64".parse().unwrap());
    c.vxlan = VxlanConfig::auto(2, "fd00:31::1".parse().unwrap(), 1500);
    c
}

#[test]
fn an_ipv6_only_node_reaches_its_peers_ipv6_subnets_on_every_path() {
    let me = node_v6_only("a", 1, "wireguard");
    let peer = node_v6_only("b", 2, "wireguard");
    let s6: ipnet::Ipv6Net = "fd00:10:244:2::/64".parse().unwrap();
    // VXLAN: the IPv6 subnet via the peer's link-local VTEP gateway, over the IPv6 underlay.
    let p = plan(
        &me,
        std::slice::from_ref(&peer),
        &cfg_v6_only(Overlay::Always, false),
    );
    assert_eq!(p.paths[0].path, Path::Vxlan);
    // Its IPv6 subnet is the one the path was decided for: there is no IPv4 subnet to follow.
    assert_eq!(p.paths[0].v6, Some((Path::Vxlan, ReasonV6::OwnPath)));
    let why = ReasonV6::OwnPath.to_string();
    assert!(why.contains("IPv6-only") && !why.contains("IPv4"), "{why}");
    assert_eq!(
        p.vxlan.routes.keys().copied().collect::<Vec<_>>(),
        vec![ipnet::IpNet::from(s6)]
    );
    assert_eq!(
        p.vxlan.fdb.get(&peer.vtep_mac),
        Some(&"fd00:31::2".parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(p.vxlan.device.address, None, "no IPv4 VTEP address");
    assert!(p.vxlan.device.address_v6.is_some());
    assert!(p.direct.routes.is_empty() && p.direct.unreachable.is_empty());
    // WireGuard: allowed IPs and routes of IPv6 only.
    let p = plan(
        &me,
        std::slice::from_ref(&peer),
        &cfg_v6_only(Overlay::Always, true),
    );
    assert_eq!(p.paths[0].path, Path::Wireguard);
    assert_eq!(p.paths[0].v6, Some((Path::Wireguard, ReasonV6::OwnPath)));
    let spec = &p.wireguard.peers["b"];
    assert_eq!(spec.allowed_ips, vec![ipnet::IpNet::from(s6)]);
    assert!(spec.endpoint.is_ipv6());
    assert!(p.wireguard.routes.is_empty());
    assert_eq!(
        p.wireguard.routes_v6.iter().copied().collect::<Vec<_>>(),
        vec![s6]
    );
    assert_eq!(p.wireguard.address, None);
    assert!(p.vxlan.routes.is_empty(), "the subnet left VXLAN");
    // Direct: a peer on this node's IPv6 underlay prefix gets a direct IPv6 route.
    let p = plan(
        &me,
        std::slice::from_ref(&peer),
        &cfg_v6_only(Overlay::Never, false),
    );
    assert_eq!(p.paths[0].path, Path::Direct);
    assert_eq!(p.paths[0].v6, Some((Path::Direct, ReasonV6::SameSubnet)));
    assert_eq!(
        p.direct.routes_v6.get(&s6),
        Some(&"fd00:31::2".parse().unwrap())
    );
    assert!(p.unreachable().next().is_none());
    // Off this node's underlay prefix with overlay: never, unreachable for its own reason (the
    // underlay subnet), which /readyz gives.
    let far = NodeRecord {
        underlay_ip: "fd00:32::2".parse().unwrap(),
        underlay_ip_v6: Some("fd00:32::2".parse().unwrap()),
        ..peer.clone()
    };
    let p = plan(&me, &[far], &cfg_v6_only(Overlay::Never, false));
    assert_eq!(
        (p.paths[0].path, p.paths[0].v6),
        (
            Path::Unreachable,
            Some((Path::Unreachable, ReasonV6::OwnPath))
        )
    );
    assert_eq!(
        p.paths[0].unreachable_why().as_deref(),
        Some("other underlay subnet (overlay: never)")
    );
}
