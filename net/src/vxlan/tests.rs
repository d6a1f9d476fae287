#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::diff::{diff, Change, Observed};
use super::*;
use std::collections::BTreeSet;

/// A network of the family the use asks for (records hold `Ipv4Net`, plans `IpNet`).
fn net<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}

/// An address of the family the use asks for (`Ipv4Addr` or `IpAddr`).
fn ip<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().unwrap()
}

fn node(name: &str, underlay: &str, subnet: &str) -> NodeRecord {
    NodeRecord {
        node: name.into(),
        underlay_ip: ip(underlay),
        underlay_ip_v6: None,
        vtep_mac: vtep_mac(name),
        wireguard_public_key: None,
        encryption: "none".into(),
        subnet: Some(net(subnet)),
        subnet_v6: None,
    }
}

fn cfg() -> VxlanConfig {
    VxlanConfig::auto(2, ip("192.168.0.1"), 1500)
}

fn me() -> NodeRecord {
    node("a", "192.168.0.1", "10.244.1.0/24")
}

fn peers() -> Vec<NodeRecord> {
    vec![
        node("c", "192.168.0.3", "10.244.3.0/24"),
        node("b", "192.168.0.2", "10.244.2.0/24"),
    ]
}

#[test]
fn vtep_macs_are_stable_local_unicast_and_distinct() {
    let a = vtep_mac("node-a");
    assert_eq!(a, vtep_mac("node-a"));
    assert_eq!(a[0] & 0x01, 0, "unicast");
    assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    let all: BTreeSet<[u8; 6]> = (0..1000).map(|i| vtep_mac(&format!("node-{i}"))).collect();
    assert_eq!(all.len(), 1000);
}

#[test]
fn mtu_auto_is_the_underlay_less_the_overhead() {
    assert_eq!(auto_mtu(1500), 1450);
    assert_eq!(auto_mtu(9000), 8950);
    assert_eq!(cfg().mtu, 1450);
    assert_eq!(cfg().ifname.len(), 12);
    assert!(cfg().ifname.starts_with(crate::LINK_PREFIX));
}

#[test]
fn plan_routes_each_peer_via_its_vtep_with_neighbour_and_fdb() {
    let p = plan(&me(), &peers(), &cfg());
    assert_eq!(
        p.device,
        DeviceSpec {
            name: "sluice.vxlan".into(),
            vni: 1,
            port: 8472,
            local: ip("192.168.0.1"),
            underlay_ifindex: 2,
            mtu: 1450,
            mac: vtep_mac("a"),
            address: Some(ip("10.244.1.0")),
            address_v6: None,
            tx_checksum_offload: true,
        }
    );
    assert_eq!(
        p.routes,
        BTreeMap::from([
            (net("10.244.2.0/24"), ip("10.244.2.0")),
            (net("10.244.3.0/24"), ip("10.244.3.0")),
        ])
    );
    assert_eq!(
        p.neighbours,
        BTreeMap::from([
            (ip("10.244.2.0"), vtep_mac("b")),
            (ip("10.244.3.0"), vtep_mac("c")),
        ])
    );
    assert_eq!(
        p.fdb,
        BTreeMap::from([
            (vtep_mac("b"), ip("192.168.0.2")),
            (vtep_mac("c"), ip("192.168.0.3")),
        ])
    );
    assert!(p.skipped.is_empty());
    // The order of the peers does not matter, and the node itself among them is ignored.
    let mut shuffled = peers();
    shuffled.reverse();
    shuffled.push(me());
    assert_eq!(plan(&me(), &shuffled, &cfg()), p);
}

#[test]
fn conflicting_peers_are_skipped_with_a_reason() {
    let mut dup_mac = node("e", "192.168.0.5", "10.244.5.0/24");
    dup_mac.vtep_mac = vtep_mac("b");
    let mut all = peers();
    all.extend([
        node("x", "192.168.0.9", "10.244.1.0/25"),  // inside mine
        node("y", "192.168.0.1", "10.244.8.0/24"),  // my underlay address
        node("bb", "192.168.0.4", "10.244.2.0/24"), // b's subnet; b sorts first
        dup_mac,
    ]);
    let p = plan(&me(), &all, &cfg());
    assert_eq!(p.routes.len(), 2);
    let reasons: Vec<(&str, &PeerConflict)> = p
        .skipped
        .iter()
        .map(|s| (s.node.as_str(), &s.reason))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons
        .iter()
        .any(|(n, r)| *n == "x" && matches!(r, PeerConflict::OverlapsMine { .. })));
    assert!(reasons
        .iter()
        .any(|(n, r)| *n == "y" && matches!(r, PeerConflict::UnderlayIsMine { .. })));
    assert!(reasons.iter().any(|(n, r)| *n == "bb"
        && matches!(r, PeerConflict::OverlapsPeer { other, .. } if other == "b")));
    assert!(reasons
        .iter()
        .any(|(n, r)| *n == "e" && matches!(r, PeerConflict::MacInUse { other } if other == "b")));
}

/// Everything the plan wants, as the kernel would show it.
fn converged(p: &VxlanPlan) -> Observed {
    let mut o = Observed::default();
    for c in diff(p, &Observed::default()) {
        o.apply(p, &c);
    }
    o
}

#[test]
fn from_nothing_the_device_comes_first_then_fdb_neighbours_routes() {
    let p = plan(&me(), &peers(), &cfg());
    let changes = diff(&p, &Observed::default());
    let b = vtep_mac("b");
    let c = vtep_mac("c");
    assert_eq!(
        changes,
        vec![
            Change::CreateDevice,
            Change::AddAddress(ip("10.244.1.0")),
            Change::ReplaceFdb {
                mac: b.min(c),
                dst: if b < c {
                    ip("192.168.0.2")
                } else {
                    ip("192.168.0.3")
                }
            },
            Change::ReplaceFdb {
                mac: b.max(c),
                dst: if b < c {
                    ip("192.168.0.3")
                } else {
                    ip("192.168.0.2")
                }
            },
            Change::ReplaceNeighbour {
                ip: ip("10.244.2.0"),
                mac: b
            },
            Change::ReplaceNeighbour {
                ip: ip("10.244.3.0"),
                mac: c
            },
            Change::ReplaceRoute {
                dst: net("10.244.2.0/24"),
                via: ip("10.244.2.0")
            },
            Change::ReplaceRoute {
                dst: net("10.244.3.0/24"),
                via: ip("10.244.3.0")
            },
        ]
    );
    assert_eq!(diff(&p, &converged(&p)), vec![]);
}

#[test]
fn diff_table() {
    let p = plan(&me(), &peers(), &cfg());
    type Edit = fn(&mut Observed);
    let table: Vec<(&str, Edit, Vec<Change>)> = vec![
        ("in sync", |_| {}, vec![]),
        (
            "a deleted route comes back",
            |o| {
                o.routes.remove(&net("10.244.2.0/24"));
            },
            vec![Change::ReplaceRoute {
                dst: net("10.244.2.0/24"),
                via: ip("10.244.2.0"),
            }],
        ),
        (
            "a deleted fdb entry comes back",
            |o| {
                o.fdb.remove(&vtep_mac("b"));
            },
            vec![Change::ReplaceFdb {
                mac: vtep_mac("b"),
                dst: ip("192.168.0.2"),
            }],
        ),
        (
            "entries of a gone peer are swept",
            |o| {
                o.routes
                    .insert(net("10.244.9.0/24"), Some(ip("10.244.9.0")));
                o.neighbours.insert(ip("10.244.9.0"), [0x02, 0, 0, 0, 0, 9]);
                o.fdb
                    .insert([0x02, 0, 0, 0, 0, 9], BTreeSet::from([ip("192.168.0.9")]));
            },
            vec![
                Change::DelRoute {
                    dst: net("10.244.9.0/24"),
                },
                Change::DelNeighbour {
                    ip: ip("10.244.9.0"),
                },
                Change::DelFdb {
                    mac: [0x02, 0, 0, 0, 0, 9],
                    dst: ip("192.168.0.9"),
                },
            ],
        ),
        (
            "a peer's new MAC replaces neighbour and fdb",
            |o| {
                o.neighbours.insert(ip("10.244.2.0"), [0x02, 0, 0, 0, 0, 9]);
                let dst = o.fdb.remove(&vtep_mac("b")).unwrap();
                o.fdb.insert([0x02, 0, 0, 0, 0, 9], dst);
            },
            vec![
                Change::DelFdb {
                    mac: [0x02, 0, 0, 0, 0, 9],
                    dst: ip("192.168.0.2"),
                },
                Change::ReplaceFdb {
                    mac: vtep_mac("b"),
                    dst: ip("192.168.0.2"),
                },
                Change::ReplaceNeighbour {
                    ip: ip("10.244.2.0"),
                    mac: vtep_mac("b"),
                },
            ],
        ),
        (
            "a peer's new underlay address replaces its fdb entry",
            |o| {
                o.fdb
                    .insert(vtep_mac("b"), BTreeSet::from([ip("192.168.0.99")]));
            },
            vec![
                Change::DelFdb {
                    mac: vtep_mac("b"),
                    dst: ip("192.168.0.99"),
                },
                Change::ReplaceFdb {
                    mac: vtep_mac("b"),
                    dst: ip("192.168.0.2"),
                },
            ],
        ),
        (
            "a route with the wrong gateway is replaced",
            |o| {
                o.routes.insert(net("10.244.3.0/24"), None);
            },
            vec![Change::ReplaceRoute {
                dst: net("10.244.3.0/24"),
                via: ip("10.244.3.0"),
            }],
        ),
        (
            "MTU, MAC, down, offload off, stray address",
            |o| {
                let d = o.device.as_mut().unwrap();
                d.mtu = Some(1500);
                d.mac = Some([0x02, 0, 0, 0, 0, 1]);
                d.up = false;
                d.tx_checksum = Some(false);
                d.addresses.insert((ip("10.0.0.1"), 8));
            },
            vec![
                Change::SetMtu(1450),
                Change::SetMac(vtep_mac("a")),
                Change::SetUp,
                Change::SetTxChecksum(true),
                Change::DelAddress(ip("10.0.0.1"), 8),
            ],
        ),
    ];
    for (what, edit, want) in table {
        let mut o = converged(&p);
        edit(&mut o);
        let got = diff(&p, &o);
        assert_eq!(got, want, "{what}");
        for c in &got {
            o.apply(&p, c);
        }
        assert_eq!(diff(&p, &o), vec![], "{what}: converged after applying");
    }
}

#[test]
fn a_mismatched_device_is_recreated_and_everything_reprogrammed() {
    let p = plan(&me(), &peers(), &cfg());
    for (what, edit) in [
        (
            "vni",
            (|d| d.vni = Some(2)) as fn(&mut super::diff::ObservedDevice),
        ),
        ("port", |d| d.port = Some(4789)),
        ("local", |d| d.local = Some(ip("192.168.0.7"))),
        ("learning", |d| d.learning = Some(true)),
        ("kind", |d| d.is_vxlan = false),
    ] {
        let mut o = converged(&p);
        edit(o.device.as_mut().unwrap());
        let got = diff(&p, &o);
        assert!(
            matches!(&got[0], Change::DeleteDevice { index: 1000, reason } if reason.contains(what) || what == "kind"),
            "{what}: {got:?}"
        );
        assert_eq!(got[1], Change::CreateDevice, "{what}");
        assert_eq!(
            got.len(),
            1 + diff(&p, &Observed::default()).len(),
            "{what}"
        );
        assert!(
            !got.iter().any(|c| matches!(c, Change::DelRoute { .. })),
            "{what}"
        );
    }
}

#[test]
fn converging_through_a_history_of_peer_changes_leaves_nothing_to_do() {
    let mut o = Observed::default();
    let history: Vec<Vec<NodeRecord>> = vec![
        peers(),
        vec![node("b", "192.168.0.2", "10.244.2.0/24")],
        vec![],
        (2..60)
            .map(|i| {
                node(
                    &format!("n{i}"),
                    &format!("192.168.1.{i}"),
                    &format!("10.244.{i}.0/24"),
                )
            })
            .collect(),
        vec![node("b", "192.168.0.22", "10.244.7.0/24")],
    ];
    for peers in history {
        let p = plan(&me(), &peers, &cfg());
        for c in diff(&p, &o) {
            o.apply(&p, &c);
        }
        assert_eq!(diff(&p, &o), vec![]);
        assert_eq!(o.routes.len(), peers.len());
        assert_eq!(o.fdb.len(), peers.len());
        assert_eq!(o.neighbours.len(), peers.len());
    }
}

/// The agent runs these on a multi-threaded runtime: their futures must be `Send`.
#[allow(dead_code)]
fn futures_are_send(
    k: &mut super::apply::VxlanKernel,
    p: &VxlanPlan,
    leases: &crate::lease::store::FakeLeases,
    req: &crate::lease::store::AcquireRequest,
    nft: &crate::masq::NftCli,
    m: &crate::masq::MasqPlan,
) {
    fn is_send<T: Send>(_: &T) {}
    is_send(&crate::lease::store::acquire(
        leases,
        req,
        std::time::SystemTime::now,
    ));
    is_send(&nft.sync(m));
    is_send(&k.sync(p));
}

#[test]
fn an_old_kernel_gets_the_device_without_tx_checksum_offload() {
    let old = VxlanConfig {
        tx_checksum_offload: false,
        ..cfg()
    };
    let p = plan(&me(), &peers(), &old);
    let changes = diff(&p, &Observed::default());
    assert_eq!(
        changes[..2],
        [Change::CreateDevice, Change::SetTxChecksum(false)]
    );
    let mut o = converged(&p);
    assert_eq!(o.device.as_ref().and_then(|d| d.tx_checksum), Some(false));
    o.device.as_mut().unwrap().tx_checksum = Some(true);
    assert_eq!(diff(&p, &o), vec![Change::SetTxChecksum(false)]);
}

#[test]
fn tx_checksum_offload_is_safe_from_linux_5_7() {
    for (release, safe) in [
        ("6.18.0-sluice", true),
        ("5.7.0", true),
        ("5.10.0-32-amd64", true),
        ("10.0", true),
        ("5.6.19", false),
        ("4.19.0-27-amd64", false),
        ("3.10.0-1160.el7.x86_64", false),
        ("", false),
        ("garbage", false),
        ("6", false),
    ] {
        assert_eq!(tx_checksum_offload_safe(release), safe, "{release:?}");
    }
}

fn dual(name: &str, underlay: &str, subnet: &str, v6: &str) -> NodeRecord {
    NodeRecord {
        subnet_v6: Some(v6.parse().unwrap()),
        ..node(name, underlay, subnet)
    }
}

#[test]
fn the_ipv6_gateway_is_the_macs_modified_eui64_link_local_address() {
    assert_eq!(
        vtep_gateway_v6([0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]).to_string(),
        "fe80::81b:2cff:fe3d:4e5f"
    );
    let g = vtep_gateway_v6(vtep_mac("node-a"));
    assert!(g.is_unicast_link_local());
    assert_ne!(g, vtep_gateway_v6(vtep_mac("node-b")));
}

#[test]
fn a_dual_stack_plan_routes_ipv6_inside_the_same_device() {
    let me = dual("a", "192.168.0.1", "10.244.1.0/24", "fd00:10:244:1::/64");
    let peers = [
        dual("b", "192.168.0.2", "10.244.2.0/24", "fd00:10:244:2::/64"),
        // An IPv4-only peer (older, or an IPv4 cluster it came from).
        node("c", "192.168.0.3", "10.244.3.0/24"),
    ];
    let p = plan(&me, &peers, &cfg());
    assert_eq!(
        p.device.address_v6,
        Some("fd00:10:244:1::".parse().unwrap())
    );
    let routes: Vec<(String, String)> = p
        .routes
        .iter()
        .map(|(d, v)| (d.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        routes,
        [
            ("10.244.2.0/24".into(), "10.244.2.0".into()),
            ("10.244.3.0/24".into(), "10.244.3.0".into()),
            (
                "fd00:10:244:2::/64".into(),
                vtep_gateway_v6(vtep_mac("b")).to_string()
            ),
        ]
    );
    // b's IPv4 VTEP address and IPv6 gateway name its one MAC; one FDB entry per peer.
    let b_mac = vtep_mac("b");
    assert_eq!(
        p.neighbours[&"10.244.2.0".parse::<IpAddr>().unwrap()],
        b_mac
    );
    assert_eq!(p.neighbours[&IpAddr::V6(vtep_gateway_v6(b_mac))], b_mac);
    assert_eq!(p.fdb.len(), 2);
    // An IPv4-only node routes no IPv6, whatever its peers have.
    let v4 = plan(&node("a", "192.168.0.1", "10.244.1.0/24"), &peers, &cfg());
    assert!(v4.routes.keys().all(|d| matches!(d, IpNet::V4(_))));
    assert_eq!(v4.device.address_v6, None);
    // A peer whose IPv6 subnet overlaps this node's is skipped, whole.
    let bad = dual("d", "192.168.0.4", "10.244.4.0/24", "fd00:10:244:1::/64");
    let p = plan(&me, &[bad], &cfg());
    assert!(p.routes.is_empty() && p.fdb.is_empty());
    assert!(matches!(
        p.skipped[0].reason,
        PeerConflict::OverlapsMine { .. }
    ));
}

#[test]
fn a_dual_stack_device_gets_its_ipv6_address_and_entries_by_diff() {
    let me = dual("a", "192.168.0.1", "10.244.1.0/24", "fd00:10:244:1::/64");
    let peers = [dual(
        "b",
        "192.168.0.2",
        "10.244.2.0/24",
        "fd00:10:244:2::/64",
    )];
    let want = plan(&me, &peers, &cfg());
    let mut seen = Observed::default();
    let changes = diff(&want, &seen);
    assert!(changes.contains(&Change::AddAddress("fd00:10:244:1::".parse().unwrap())));
    let gw6 = IpAddr::V6(vtep_gateway_v6(vtep_mac("b")));
    assert!(changes.contains(&Change::ReplaceRoute {
        dst: "fd00:10:244:2::/64".parse().unwrap(),
        via: gw6,
    }));
    for c in &changes {
        seen.apply(&want, c);
    }
    assert_eq!(diff(&want, &seen), [], "converged");
    // b goes IPv4 only: its IPv6 route and neighbour go, the FDB entry stays.
    let v4_only = plan(&me, &[node("b", "192.168.0.2", "10.244.2.0/24")], &cfg());
    let changes = diff(&v4_only, &seen);
    assert_eq!(
        changes,
        [
            Change::DelRoute {
                dst: "fd00:10:244:2::/64".parse().unwrap()
            },
            Change::DelNeighbour { ip: gw6 },
        ]
    );
}

#[test]
fn the_published_ipv6_underlay_is_the_lowest_global_address_of_the_link() {
    use crate::vxlan::apply::underlay_v6;
    let a = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap();
    assert_eq!(underlay_v6(&[]), None);
    // Link-local only (every IPv6 link has one): none to publish.
    assert_eq!(underlay_v6(&[(a("fe80::1"), 64)]), None);
    let got = underlay_v6(&[
        (a("fe80::1"), 64),
        (a("fd00:31::9"), 64),
        (a("fd00:31::3"), 64),
        (a("ff02::1"), 128),
    ]);
    assert_eq!(got.map(|n| n.to_string()).as_deref(), Some("fd00:31::3/64"));
}

/// Over an IPv6 underlay the device's `local` and every FDB `dst` are IPv6 (the inner
/// families are unchanged), the MTU allows for the 20 bytes longer outer header, and a peer
/// whose underlay is of the other family is left out, said why: no tunnel joins the two.
#[test]
fn an_ipv6_underlay_makes_ipv6_vtep_endpoints() {
    let mut cfg6 = VxlanConfig::auto(2, ip("fd00:31::1"), 1500);
    cfg6.ifname = "sluice.vxlan".into();
    assert_eq!(cfg6.mtu, 1430);
    assert_eq!(VxlanConfig::auto(2, ip("172.31.0.1"), 1500).mtu, 1450);
    let mut me6 = dual("a", "172.31.0.1", "10.244.1.0/24", "fd00:10:244:1::/64");
    me6.underlay_ip = ip("fd00:31::1");
    let mut b = dual("b", "172.31.0.2", "10.244.2.0/24", "fd00:10:244:2::/64");
    b.underlay_ip = ip("fd00:31::2");
    let c = dual("c", "172.31.0.3", "10.244.3.0/24", "fd00:10:244:3::/64");
    let p = plan(&me6, &[b.clone(), c], &cfg6);
    assert_eq!(p.device.local, ip::<IpAddr>("fd00:31::1"));
    assert_eq!(p.fdb.get(&b.vtep_mac), Some(&ip::<IpAddr>("fd00:31::2")));
    // Both of b's families go through the device over IPv6.
    assert!(p.routes.contains_key(&"10.244.2.0/24".parse().unwrap()));
    assert!(p
        .routes
        .contains_key(&"fd00:10:244:2::/64".parse().unwrap()));
    assert_eq!(p.skipped.len(), 1);
    assert_eq!(p.skipped[0].node, "c");
    assert!(matches!(
        p.skipped[0].reason,
        PeerConflict::UnderlayFamily { .. }
    ));
    // The diff writes an IPv6 FDB destination, and finds it again once written.
    let changes = diff(&p, &Observed::default());
    assert!(changes.contains(&Change::ReplaceFdb {
        mac: b.vtep_mac,
        dst: ip("fd00:31::2"),
    }));
}
