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
        underlay_ip: Ipv4Addr::new(172, 31, seg, 10 + n),
        vtep_mac: vtep_mac(name),
        wireguard_public_key: Some(key(n)),
        encryption: enc.into(),
        subnet: format!("10.244.{n}.0/24").parse().unwrap(),
        subnet_v6: None,
    }
}

fn cfg(overlay: Overlay, encryption: bool) -> DatapathConfig {
    DatapathConfig {
        overlay,
        underlay: "172.31.0.11/24".parse().unwrap(),
        underlay_ifindex: 2,
        vxlan: VxlanConfig::auto(2, Ipv4Addr::new(172, 31, 0, 11), 1500),
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
        let s = peer.subnet;
        assert_eq!(
            p.vxlan.routes.contains_key(&ipnet::IpNet::from(s)),
            want == Vxlan,
            "{case}"
        );
        assert_eq!(p.wireguard.routes.contains(&s), want == Wireguard, "{case}");
        assert_eq!(
            p.direct.routes.get(&s) == Some(&peer.underlay_ip),
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
    assert!(!p.direct.routes.contains_key(&me.subnet));
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
