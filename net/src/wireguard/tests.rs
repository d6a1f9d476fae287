use super::*;
use std::net::Ipv4Addr;

fn key(n: u8) -> String {
    KeyPair::from_bytes([n; 32]).public_base64()
}

fn rec(node: &str, third: u8, enc: &str, key_n: Option<u8>) -> NodeRecord {
    NodeRecord {
        node: node.into(),
        underlay_ip: Ipv4Addr::new(192, 168, 0, third).into(),
        underlay_ip_v6: None,
        vtep_mac: [2, 0, 0, 0, 0, third],
        wireguard_public_key: key_n.map(key),
        encryption: enc.into(),
        subnet: Some(format!("10.244.{third}.0/24").parse().unwrap()),
        subnet_v6: None,
    }
}

fn on(enabled: bool) -> WgSettings {
    WgSettings {
        enabled,
        port: 51820,
        keepalive_secs: 0,
    }
}

#[test]
fn all_none_means_no_device() {
    let me = rec("a", 1, "none", Some(1));
    let peers = [rec("b", 2, "none", Some(2)), rec("c", 3, "none", Some(3))];
    let p = plan(&me, &peers, &on(false));
    assert!(!p.device && p.peers.is_empty() && p.routes.is_empty());
}

#[test]
fn the_device_address_is_in_this_nodes_subnet() {
    // Node-sourced traffic leaves with it; every peer's allowed IPs for this node hold it.
    let me = rec("a", 1, "wireguard", Some(1));
    let p = plan(&me, &[rec("b", 2, "wireguard", Some(2))], &on(true));
    assert_eq!(p.address, Some(Ipv4Addr::new(10, 244, 1, 0)));
    assert!(me.subnet.unwrap().contains(&p.address.unwrap()));
}

#[test]
fn a_pair_uses_wireguard_only_when_both_run_it() {
    let me = rec("a", 1, "wireguard", Some(1));
    let peers = [
        rec("b", 2, "wireguard", Some(2)),
        rec("c", 3, "none", Some(3)),
        rec("d", 4, "wireguard", None),
    ];
    let p = plan(&me, &peers, &on(true));
    assert!(p.device);
    // c publishes a key but runs none: a peer on the device (it may switch first), but its
    // subnet stays on VXLAN. d has no key yet: neither.
    assert_eq!(p.peers.keys().collect::<Vec<_>>(), ["b", "c"]);
    assert_eq!(
        p.routes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        ["10.244.2.0/24"]
    );
    let b = &p.peers["b"];
    assert_eq!(b.endpoint.to_string(), "192.168.0.2:51820");
    assert_eq!(b.allowed_ips, vec!["10.244.2.0/24".parse().unwrap()]);
}

#[test]
fn a_node_still_running_none_keeps_a_device_for_peers_that_switched() {
    let me = rec("a", 1, "none", Some(1));
    let peers = [rec("b", 2, "wireguard", Some(2))];
    let p = plan(&me, &peers, &on(false));
    assert!(p.device, "b may already send WireGuard to a");
    assert!(p.peers.contains_key("b"));
    assert!(
        p.routes.is_empty(),
        "a sends to b over VXLAN until a switches"
    );
}

#[test]
fn bad_duplicate_and_own_keys_are_skipped_not_fatal() {
    let me = rec("a", 1, "wireguard", Some(1));
    let mut bad = rec("b", 2, "wireguard", None);
    bad.wireguard_public_key = Some("not-a-key".into());
    let peers = [
        bad,
        rec("c", 3, "wireguard", Some(1)),
        rec("d", 4, "wireguard", Some(4)),
        rec("e", 5, "wireguard", Some(4)),
    ];
    let p = plan(&me, &peers, &on(true));
    assert_eq!(p.peers.keys().collect::<Vec<_>>(), ["d"]);
    assert_eq!(
        p.skipped,
        vec![
            ("b".to_string(), PeerProblem::BadKey),
            ("c".to_string(), PeerProblem::KeyIsMine),
            ("e".to_string(), PeerProblem::KeyInUse { other: "d".into() }),
        ]
    );
}

#[test]
fn plan_is_the_same_whatever_the_order_of_peers() {
    let me = rec("a", 1, "wireguard", Some(1));
    let mut peers = vec![
        rec("b", 2, "wireguard", Some(2)),
        rec("c", 3, "wireguard", Some(3)),
        rec("a", 1, "wireguard", Some(1)),
    ];
    let p1 = plan(&me, &peers, &on(true));
    peers.reverse();
    assert_eq!(plan(&me, &peers, &on(true)), p1);
    assert!(!p1.peers.contains_key("a"));
}

#[test]
fn keepalive_reaches_every_peer() {
    let me = rec("a", 1, "wireguard", Some(1));
    let s = WgSettings {
        keepalive_secs: 25,
        ..on(true)
    };
    let p = plan(&me, &[rec("b", 2, "wireguard", Some(2))], &s);
    assert_eq!(p.peers["b"].keepalive_secs, 25);
}

#[test]
fn peer_diff_touches_only_what_changed() {
    let me = rec("a", 1, "wireguard", Some(1));
    let before = plan(
        &me,
        &[
            rec("b", 2, "wireguard", Some(2)),
            rec("c", 3, "wireguard", Some(3)),
            rec("d", 4, "wireguard", Some(4)),
        ],
        &on(true),
    );
    assert_eq!(
        diff_peers(&before.peers, &before.peers),
        PeerDiff::default()
    );
    // c changed its key, d left, e joined, b moved its underlay address.
    let mut b = rec("b", 2, "wireguard", Some(2));
    b.underlay_ip = Ipv4Addr::new(192, 168, 9, 2).into();
    let after = plan(
        &me,
        &[
            b,
            rec("c", 3, "wireguard", Some(33)),
            rec("e", 5, "wireguard", Some(5)),
        ],
        &on(true),
    );
    let d = diff_peers(&before.peers, &after.peers);
    assert_eq!(
        d.remove,
        [[3u8; 32], [4u8; 32]]
            .iter()
            .map(|k| KeyPair::from_bytes(*k).public_bytes())
            .collect::<Vec<_>>()
    );
    assert_eq!(
        d.upsert.iter().map(|p| p.node.as_str()).collect::<Vec<_>>(),
        ["b", "c", "e"]
    );
}

#[test]
fn public_keys_parse_only_as_32_bytes_of_base64() {
    let k = KeyPair::from_bytes([7; 32]);
    assert_eq!(
        parse_public_key(&k.public_base64()).unwrap(),
        k.public_bytes()
    );
    assert!(parse_public_key("").is_err());
    assert!(parse_public_key("AAAA").is_err());
    assert!(parse_public_key("!!!!").is_err());
}

#[test]
fn the_key_file_is_made_0600_kept_and_never_replaced_when_bad() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/wireguard.key");
    let first = load_or_create_key(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let again = load_or_create_key(&path).unwrap();
    assert_eq!(again.public_base64(), first.public_base64());
    // The Debug form never shows the private key.
    let secret = std::fs::read_to_string(&path).unwrap();
    assert!(!format!("{first:?}").contains(secret.trim()));
    // Readable by others: narrowed, same key.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        load_or_create_key(&path).unwrap().public_base64(),
        first.public_base64()
    );
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Removed: a new key.
    std::fs::remove_file(&path).unwrap();
    assert_ne!(
        load_or_create_key(&path).unwrap().public_base64(),
        first.public_base64()
    );
    // Garbage: an error, and the file is left as it is.
    std::fs::write(&path, "garbage").unwrap();
    assert!(load_or_create_key(&path).is_err());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1,
        "no temp file left"
    );
}

#[test]
fn a_dual_stack_pair_allows_and_routes_both_families() {
    let v6 = |r: NodeRecord, s: &str| NodeRecord {
        subnet_v6: Some(s.parse().unwrap()),
        ..r
    };
    let me = v6(rec("a", 1, "wireguard", Some(1)), "fd00:10:244:1::/64");
    let peers = [
        v6(rec("b", 2, "wireguard", Some(2)), "fd00:10:244:2::/64"),
        rec("c", 3, "wireguard", Some(3)),
    ];
    let p = plan(&me, &peers, &on(true));
    assert_eq!(p.address_v6, Some("fd00:10:244:1::".parse().unwrap()));
    let allowed = |n: &str| -> Vec<String> {
        p.peers[n]
            .allowed_ips
            .iter()
            .map(|a| a.to_string())
            .collect()
    };
    assert_eq!(allowed("b"), ["10.244.2.0/24", "fd00:10:244:2::/64"]);
    assert_eq!(allowed("c"), ["10.244.3.0/24"]);
    assert_eq!(
        p.routes_v6
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>(),
        ["fd00:10:244:2::/64"]
    );
    // An IPv4-only node neither allows nor routes its peers' IPv6.
    let p4 = plan(&rec("a", 1, "wireguard", Some(1)), &peers, &on(true));
    assert_eq!(p4.peers["b"].allowed_ips.len(), 1);
    assert!(p4.routes_v6.is_empty() && p4.address_v6.is_none());
}

#[test]
fn over_an_ipv6_underlay_endpoints_are_ipv6_and_the_mtu_allows_for_the_longer_header() {
    let me = rec("a", 1, "wireguard", Some(1));
    let mut b = rec("b", 2, "wireguard", Some(2));
    b.underlay_ip = "fd00:31::2".parse().unwrap();
    let p = plan(&me, &[b], &on(true));
    assert_eq!(p.peers["b"].endpoint.to_string(), "[fd00:31::2]:51820");
    assert_eq!(auto_mtu_for(1500, false), 1440);
    assert_eq!(auto_mtu_for(1500, true), 1420);
}
