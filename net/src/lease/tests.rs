#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::store::{
    acquire, publish, renew, AcquireError, AcquireRequest, AcquiredBy, FakeLeases, LeaseStore,
    StoreError,
};
use super::*;
use std::collections::BTreeSet;
use std::time::UNIX_EPOCH;

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn record(node: &str, subnet: &str) -> NodeRecord {
    NodeRecord {
        node: node.into(),
        underlay_ip: Ipv4Addr::new(192, 168, 0, 1).into(),
        underlay_ip_v6: None,
        vtep_mac: [0x0a, 1, 2, 3, 4, 5],
        wireguard_public_key: None,
        encryption: "none".into(),
        subnet: Some(net(subnet)),
        subnet_v6: None,
    }
}

/// A lease of `subnet` held by `holder`, renewed at `renewed` for 40 s.
fn lease(subnet: &str, holder: &str, renewed: u64) -> LeaseView {
    let mut l = LeaseView::new_held(&record(holder, subnet), None, 40, at(renewed));
    l.resource_version = Some(format!("rv-{subnet}"));
    l
}

#[test]
fn lease_names_round_trip_and_reject_non_canonical_forms() {
    assert_eq!(lease_name(net("10.244.3.0/24")), "sluice-10-244-3-0-24");
    assert_eq!(
        parse_lease_name("sluice-10-244-3-0-24").unwrap(),
        net("10.244.3.0/24")
    );
    for bad in [
        "sluice-10-244-3-1-24",  // host bits
        "sluice-10-244-03-0-24", // leading zero
        "sluice-10-244-3-0",
        "sluice-10-244-3-0-33",
        "sluice-10-244-3-0-24-1",
        "other-10-244-3-0-24",
        "sluice-256-0-0-0-8",
        "sluice-",
    ] {
        assert!(parse_lease_name(bad).is_err(), "{bad} must not parse");
    }
}

#[test]
fn records_round_trip_and_bad_annotations_are_typed() {
    let mut r = record("node-a", "10.244.3.0/24");
    r.wireguard_public_key = Some("abc=".into());
    let a = r.to_annotations();
    assert_eq!(a[ANN_VTEP_MAC], "0a:01:02:03:04:05");
    assert_eq!(NodeRecord::from_annotations(&a).unwrap(), r);

    let with = |key: &str, value: &str| {
        let mut a = r.to_annotations();
        a.insert(key.into(), value.into());
        NodeRecord::from_annotations(&a)
    };
    assert!(matches!(
        with(ANN_UNDERLAY_IP, "fe80::1"),
        Err(RecordError::Bad {
            key: ANN_UNDERLAY_IP,
            ..
        })
    ));
    assert!(matches!(
        with(ANN_VTEP_MAC, "01:00:00:00:00:01"),
        Err(RecordError::Bad {
            key: ANN_VTEP_MAC,
            ..
        })
    ));
    assert!(matches!(
        with(ANN_VTEP_MAC, "0a:01:02:03:04"),
        Err(RecordError::Bad {
            key: ANN_VTEP_MAC,
            ..
        })
    ));
    assert!(matches!(
        with(ANN_SUBNET, "10.244.3.1/24"),
        Err(RecordError::Bad {
            key: ANN_SUBNET,
            ..
        })
    ));
    let mut missing = r.to_annotations();
    missing.remove(ANN_NODE);
    assert_eq!(
        NodeRecord::from_annotations(&missing),
        Err(RecordError::Missing { key: ANN_NODE })
    );
}

#[test]
fn expiry_and_renewal_follow_the_lease_times() {
    let l = lease("10.244.0.0/24", "a", 100);
    assert!(!is_expired(&l, at(100)));
    assert!(!is_expired(&l, at(139)));
    assert!(is_expired(&l, at(140)));
    let mut unheld = l.clone();
    unheld.holder = None;
    assert!(is_expired(&unheld, at(100)));
    let mut timeless = l.clone();
    timeless.renew_time = None;
    timeless.acquire_time = None;
    assert!(is_expired(&timeless, at(0)));

    assert!(!renew_due(&l, at(112)));
    assert!(renew_due(&l, at(113)));
    assert!(
        !renew_due(&l, at(50)),
        "a clock behind the lease does not renew"
    );
    assert!(renew_due(&timeless, at(0)));
}

#[test]
fn choose_subnet_table() {
    let pool = SubnetPool::new(net("10.244.0.0/22"), 24).unwrap();
    let now = at(1000);
    let keep = |s: &str| Decision::Keep {
        name: lease_name(net(s)),
        subnet: net(s),
        resource_version: Some(format!("rv-{s}")),
    };
    let take = |s: &str| Decision::TakeExpired {
        name: lease_name(net(s)),
        subnet: net(s),
        resource_version: Some(format!("rv-{s}")),
    };
    let create = |s: &str| Decision::CreateNew { subnet: net(s) };
    let valid = |s: &str, h: &str| lease(s, h, 990);
    let stale = |s: &str, h: &str| lease(s, h, 100);
    let foreign = LeaseView {
        name: "kube-node-lease-x".into(),
        ..Default::default()
    };

    #[allow(clippy::type_complexity)]
    let table: Vec<(&str, Vec<LeaseView>, Option<&str>, Decision)> = vec![
        (
            "empty cluster: lowest",
            vec![],
            None,
            create("10.244.0.0/24"),
        ),
        (
            "lowest free skips taken",
            vec![valid("10.244.0.0/24", "b"), valid("10.244.2.0/24", "c")],
            None,
            create("10.244.1.0/24"),
        ),
        (
            "restart keeps its subnet",
            vec![valid("10.244.0.0/24", "b"), valid("10.244.2.0/24", "me")],
            None,
            keep("10.244.2.0/24"),
        ),
        (
            "its own expired lease is still its",
            vec![stale("10.244.3.0/24", "me")],
            None,
            keep("10.244.3.0/24"),
        ),
        (
            "prefer among several of its own",
            vec![valid("10.244.1.0/24", "me"), valid("10.244.3.0/24", "me")],
            Some("10.244.3.0/24"),
            keep("10.244.3.0/24"),
        ),
        (
            "prefer honoured when free",
            vec![valid("10.244.0.0/24", "b")],
            Some("10.244.3.0/24"),
            create("10.244.3.0/24"),
        ),
        (
            "prefer held validly by another is not taken",
            vec![valid("10.244.3.0/24", "b")],
            Some("10.244.3.0/24"),
            create("10.244.0.0/24"),
        ),
        (
            "prefer expired is reclaimed",
            vec![stale("10.244.3.0/24", "b")],
            Some("10.244.3.0/24"),
            take("10.244.3.0/24"),
        ),
        (
            "prefer outside the pool is ignored",
            vec![],
            Some("10.245.0.0/24"),
            create("10.244.0.0/24"),
        ),
        (
            "free before expired",
            vec![stale("10.244.0.0/24", "b")],
            None,
            create("10.244.1.0/24"),
        ),
        (
            "expired reclaimed when nothing is free",
            vec![
                valid("10.244.0.0/24", "a"),
                valid("10.244.1.0/24", "b"),
                stale("10.244.2.0/24", "c"),
                valid("10.244.3.0/24", "d"),
            ],
            None,
            take("10.244.2.0/24"),
        ),
        (
            "valid leases are never taken: exhausted",
            vec![
                valid("10.244.0.0/24", "a"),
                valid("10.244.1.0/24", "b"),
                valid("10.244.2.0/24", "c"),
                valid("10.244.3.0/24", "d"),
            ],
            None,
            Decision::Exhausted,
        ),
        (
            "a lease of another length blocks what it overlaps",
            vec![valid("10.244.0.0/23", "old")],
            None,
            create("10.244.2.0/24"),
        ),
        (
            "foreign and unparsable leases are ignored",
            vec![foreign],
            None,
            create("10.244.0.0/24"),
        ),
    ];
    for (what, leases, prefer, want) in table {
        let got = choose_subnet(&pool, "me", &leases, now, prefer.map(net));
        assert_eq!(got, want, "{what}");
        // Deterministic whatever the order of the input.
        let mut reversed = leases.clone();
        reversed.reverse();
        assert_eq!(
            choose_subnet(&pool, "me", &reversed, now, prefer.map(net)),
            want,
            "{what} (reversed)"
        );
    }
}

#[test]
fn pools_reject_lengths_that_do_not_fit() {
    assert!(SubnetPool::new(net("10.244.0.0/16"), 15).is_err());
    assert!(SubnetPool::new(net("10.244.0.0/16"), 31).is_err());
    assert_eq!(
        SubnetPool::new(net("10.244.0.0/16"), 24)
            .unwrap()
            .subnets()
            .count(),
        256
    );
}

#[test]
fn peers_skip_bad_records_with_a_reason() {
    let mut bad_mac = lease("10.244.2.0/24", "c", 10);
    bad_mac.annotations.insert(ANN_VTEP_MAC.into(), "zz".into());
    let mut mismatch = lease("10.244.3.0/24", "d", 10);
    mismatch
        .annotations
        .insert(ANN_SUBNET.into(), "10.244.9.0/24".into());
    let mut unheld = lease("10.244.4.0/24", "e", 10);
    unheld.holder = None;
    // Node b moved from .1 to .5: the newer lease wins.
    let leases = vec![
        lease("10.244.0.0/24", "me", 10),
        lease("10.244.1.0/24", "b", 10),
        lease("10.244.5.0/24", "b", 20),
        bad_mac,
        mismatch,
        unheld,
    ];
    let (peers, skipped) = peers_from_leases("me", &leases);
    assert_eq!(
        peers
            .iter()
            .map(|p| (p.node.as_str(), p.subnet.unwrap().to_string()))
            .collect::<Vec<_>>(),
        vec![("b", "10.244.5.0/24".to_string())]
    );
    let reasons: Vec<&str> = skipped.iter().map(|s| s.lease.as_str()).collect();
    assert_eq!(
        reasons,
        vec![
            "sluice-10-244-2-0-24",
            "sluice-10-244-3-0-24",
            "sluice-10-244-4-0-24"
        ]
    );
    assert!(matches!(skipped[0].reason, RecordError::Bad { .. }));
    assert!(matches!(
        skipped[1].reason,
        RecordError::SubnetMismatch { .. }
    ));
    assert!(matches!(skipped[2].reason, RecordError::NoHolder { .. }));
}

fn request(node: &str, cidr: &str, len: u8) -> AcquireRequest {
    AcquireRequest {
        pool: SubnetPool::new(net(cidr), len).unwrap(),
        record: record(node, "0.0.0.0/0"),
        owner: Some(NodeOwner {
            name: node.into(),
            uid: format!("uid-{node}"),
        }),
        duration_secs: 40,
        prefer: None,
        max_attempts: 64,
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn acquire_creates_keeps_after_restart_reclaims_and_exhausts() {
    block_on(async {
        let store = FakeLeases::default();
        let a = acquire(&store, &request("a", "10.244.0.0/23", 24), || at(100))
            .await
            .unwrap();
        assert_eq!(
            (a.subnet, a.by),
            (net("10.244.0.0/24"), AcquiredBy::Created)
        );
        assert_eq!(
            NodeRecord::from_annotations(&a.lease.annotations).unwrap(),
            a.record
        );
        assert_eq!(a.lease.owner.as_ref().unwrap().uid, "uid-a");

        // Restarted: the same subnet back, renewed.
        let again = acquire(&store, &request("a", "10.244.0.0/23", 24), || at(110))
            .await
            .unwrap();
        assert_eq!((again.subnet, again.by), (a.subnet, AcquiredBy::Kept));
        assert_eq!(again.lease.renew_time, Some(at(110)));
        assert_eq!(again.lease.acquire_time, Some(at(100)));

        let b = acquire(&store, &request("b", "10.244.0.0/23", 24), || at(110))
            .await
            .unwrap();
        assert_eq!(b.subnet, net("10.244.1.0/24"));

        // Full while both are valid.
        let c = acquire(&store, &request("c", "10.244.0.0/23", 24), || at(120)).await;
        assert!(matches!(c, Err(AcquireError::Exhausted { .. })), "{c:?}");

        // b renews; a does not and expires: c reclaims a's subnet.
        let b2 = renew(&store, &b.lease, &b.record, at(140)).await.unwrap();
        assert_eq!(b2.renew_time, Some(at(140)));
        let c = acquire(&store, &request("c", "10.244.0.0/23", 24), || at(151))
            .await
            .unwrap();
        assert_eq!(
            (c.subnet, c.by),
            (net("10.244.0.0/24"), AcquiredBy::Reclaimed)
        );
        assert_eq!(c.lease.holder.as_deref(), Some("c"));
        assert_eq!(c.lease.owner.as_ref().unwrap().name, "c");
        assert_eq!(c.lease.annotations[ANN_NODE], "c");

        // a's stale renewal now conflicts: it must acquire again, and gets nothing.
        let stale = renew(&store, &again.lease, &again.record, at(152)).await;
        assert!(
            matches!(stale, Err(StoreError::Conflict { .. })),
            "{stale:?}"
        );
    });
}

#[test]
fn concurrent_acquirers_never_share_a_subnet() {
    for round in 0..20 {
        let store = FakeLeases::default();
        // A stale lease of a deleted node is in the pool too, to race reclaims as well as creates.
        store.insert(lease("10.244.0.0/24", "gone", 0));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    block_on(acquire(
                        &store,
                        &request(&format!("n{i}"), "10.244.0.0/21", 24),
                        || at(1000),
                    ))
                })
            })
            .collect();
        let got: Vec<Ipv4Net> = threads
            .into_iter()
            .map(|t| t.join().unwrap().unwrap().subnet)
            .collect();
        let distinct: BTreeSet<_> = got.iter().collect();
        assert_eq!(distinct.len(), 8, "round {round}: {got:?}");
        // The store agrees: every lease names its holder's subnet, one holder per subnet.
        let held: Vec<_> = store
            .snapshot()
            .into_values()
            .filter_map(|l| l.holder)
            .collect();
        assert_eq!(held.len(), 8, "round {round}: {held:?}");
    }
}

#[test]
fn concurrent_acquirers_on_a_small_pool_split_it_and_the_rest_are_told_exhausted() {
    for _ in 0..20 {
        let store = FakeLeases::default();
        let threads: Vec<_> = (0..6)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    block_on(acquire(
                        &store,
                        &request(&format!("n{i}"), "10.244.0.0/26", 28),
                        || at(1000),
                    ))
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let won: BTreeSet<Ipv4Net> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|a| a.subnet))
            .collect();
        assert_eq!(won.len(), 4);
        assert_eq!(
            results
                .iter()
                .filter(|r| matches!(r, Err(AcquireError::Exhausted { .. })))
                .count(),
            2
        );
    }
}

#[test]
fn publish_creates_then_overwrites_the_podcidr_lease() {
    block_on(async {
        let store = FakeLeases::default();
        let r = record("a", "10.244.7.0/24");
        let first = publish(&store, &podcidr_lease(&r, None, 40, at(1)), at(1), 4)
            .await
            .unwrap();
        assert_eq!(first.name, "sluice-10-244-7-0-24");
        let mut moved = r.clone();
        moved.underlay_ip = Ipv4Addr::new(192, 168, 0, 9).into();
        let second = publish(&store, &podcidr_lease(&moved, None, 40, at(5)), at(5), 4)
            .await
            .unwrap();
        assert_eq!(second.acquire_time, Some(at(1)));
        assert_eq!(second.renew_time, Some(at(5)));
        let stored = store.list().await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            NodeRecord::from_annotations(&stored[0].annotations).unwrap(),
            moved
        );
    });
}

#[test]
fn a_name_taken_by_an_object_the_store_does_not_list_is_skipped() {
    block_on(async {
        // A store whose list hides one lease (as a label selector hides an unlabelled one).
        struct Hiding(FakeLeases, &'static str);
        impl LeaseStore for Hiding {
            async fn list(&self) -> Result<Vec<LeaseView>, StoreError> {
                let all = self.0.list().await?;
                Ok(all.into_iter().filter(|l| l.name != self.1).collect())
            }
            async fn create(&self, l: &LeaseView) -> Result<LeaseView, StoreError> {
                self.0.create(l).await
            }
            async fn update(&self, l: &LeaseView) -> Result<LeaseView, StoreError> {
                self.0.update(l).await
            }
            async fn delete(&self, n: &str, rv: Option<&str>) -> Result<(), StoreError> {
                self.0.delete(n, rv).await
            }
        }
        let inner = FakeLeases::default();
        inner.insert(lease("10.244.0.0/24", "someone", 1));
        let store = Hiding(inner, "sluice-10-244-0-0-24");
        let req = AcquireRequest {
            pool: SubnetPool::new(net("10.244.0.0/16"), 24).unwrap(),
            record: record("a", "10.244.0.0/24"),
            owner: None,
            duration_secs: 40,
            prefer: None,
            max_attempts: 4,
        };
        let got = acquire(&store, &req, || at(2)).await.unwrap();
        assert_eq!(got.subnet, net("10.244.1.0/24"));
    });
}

#[test]
fn publish_never_takes_a_subnet_another_node_still_holds() {
    block_on(async {
        let store = FakeLeases::default();
        // node b leased 10.244.7.0/24 itself; the controller-manager gave a the same podCIDR.
        store.insert(lease("10.244.7.0/24", "b", 1));
        let a = record("a", "10.244.7.0/24");
        let refused = publish(&store, &podcidr_lease(&a, None, 40, at(2)), at(2), 4).await;
        assert!(
            matches!(&refused, Err(AcquireError::HeldByOther { holder, .. }) if holder == "b"),
            "{refused:?}"
        );
        let held = &store.list().await.unwrap()[0];
        assert_eq!(held.holder.as_deref(), Some("b"));
        // Once b's lease has expired, a may publish its record there.
        let later = at(1 + 41);
        let taken = publish(&store, &podcidr_lease(&a, None, 40, later), later, 4)
            .await
            .unwrap();
        assert_eq!(taken.holder.as_deref(), Some("a"));
    });
}

#[test]
fn the_fake_store_has_the_api_servers_preconditions() {
    block_on(async {
        let store = FakeLeases::default();
        let l = lease("10.244.0.0/24", "a", 1);
        let stored = store.create(&l).await.unwrap();
        assert!(matches!(
            store.create(&l).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        let updated = store.update(&stored).await.unwrap();
        assert_ne!(updated.resource_version, stored.resource_version);
        assert!(matches!(
            store.update(&stored).await,
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            store
                .delete(&l.name, stored.resource_version.as_deref())
                .await,
            Err(StoreError::Conflict { .. })
        ));
        store
            .delete(&l.name, updated.resource_version.as_deref())
            .await
            .unwrap();
        assert!(matches!(
            store.update(&updated).await,
            Err(StoreError::NotFound { .. })
        ));
    });
}

fn net6(s: &str) -> Ipv6Net {
    s.parse().unwrap()
}

/// A lease of the IPv6 `subnet` held by `holder`, renewed at `renewed` for 40 s.
fn lease6(subnet: &str, holder: &str, renewed: u64) -> LeaseView {
    LeaseView {
        name: lease_name_v6(net6(subnet)),
        holder: Some(holder.into()),
        acquire_time: Some(at(renewed)),
        renew_time: Some(at(renewed)),
        duration_secs: Some(40),
        resource_version: Some(format!("rv-{subnet}")),
        ..Default::default()
    }
}

#[test]
fn ipv6_lease_names_round_trip_and_never_read_as_the_other_family() {
    assert_eq!(
        lease_name_v6(net6("fd00:10:244:3::/64")),
        "sluice-fd00-10-244-3---64"
    );
    assert_eq!(lease_name_v6(net6("2001:db8::/48")), "sluice-2001-db8---48");
    for subnet in [
        "fd00:10:244:3::/64",
        "2001:db8:0:1:2:3:4:0/120",
        "fd00::/16",
    ] {
        let n = net6(subnet);
        assert_eq!(parse_lease_name_v6(&lease_name_v6(n)), Ok(n), "{subnet}");
        assert!(parse_lease_name(&lease_name_v6(n)).is_err(), "{subnet}");
    }
    assert!(parse_lease_name_v6(&lease_name(net("10.244.3.0/24"))).is_err());
    for bad in [
        "sluice-FD00-10-244-3---64",       // upper case
        "sluice-fd00-10-244-3-0-0-0-0-64", // not the shortest form
        "sluice-fd00-10-244-3--1-64",      // host bits
        "sluice-fd00-10-244-3---129",
        "sluice-fd00-10-244-3--",
        "sluice-fd00-10-244-3---064",
        "other-fd00---64",
        "sluice-",
    ] {
        assert!(parse_lease_name_v6(bad).is_err(), "{bad} must not parse");
    }
}

#[test]
fn ipv6_subnet_choice_follows_the_ipv4_rules() {
    let pool = SubnetPool::new(net6("fd00:10:244::/56"), 64).unwrap();
    let now = at(1000);
    let fresh = |s: &str, holder: &str| lease6(s, holder, 990);
    let got = |leases: &[LeaseView], prefer: Option<&str>| {
        choose_subnet(&pool, "me", leases, now, prefer.map(net6))
    };
    assert_eq!(
        got(&[], None),
        Decision::CreateNew {
            subnet: net6("fd00:10:244::/64")
        }
    );
    // The lowest free one, past the taken ones; IPv4 leases are not in the way.
    let taken = [
        fresh("fd00:10:244::/64", "a"),
        fresh("fd00:10:244:1::/64", "b"),
        lease("10.244.0.0/24", "c", 990),
    ];
    assert_eq!(
        got(&taken, None),
        Decision::CreateNew {
            subnet: net6("fd00:10:244:2::/64")
        }
    );
    // Its own lease is kept; a preferred free one is created; another node's valid one is not.
    let mut with_mine = taken.to_vec();
    with_mine.push(fresh("fd00:10:244:7::/64", "me"));
    assert!(matches!(
        got(&with_mine, None),
        Decision::Keep { subnet, .. } if subnet == net6("fd00:10:244:7::/64")
    ));
    assert_eq!(
        got(&taken, Some("fd00:10:244:9::/64")),
        Decision::CreateNew {
            subnet: net6("fd00:10:244:9::/64")
        }
    );
    assert_eq!(
        got(&taken, Some("fd00:10:244:1::/64")),
        Decision::CreateNew {
            subnet: net6("fd00:10:244:2::/64")
        }
    );
    // A preference outside the pool (another length) is no preference.
    assert_eq!(
        got(&taken, Some("fd00:10:244:9::/80")),
        Decision::CreateNew {
            subnet: net6("fd00:10:244:2::/64")
        }
    );
    // A lease of another length (subnet-length-v6 was changed) blocks what it overlaps.
    let odd = [fresh("fd00:10:244::/62", "a")];
    assert_eq!(
        got(&odd, None),
        Decision::CreateNew {
            subnet: net6("fd00:10:244:4::/64")
        }
    );
}

#[test]
fn a_slash_64_cluster_cidr_cut_into_slash_64s_is_one_node() {
    let pool = SubnetPool::new(net6("fd00:10:244::/64"), 64).unwrap();
    let now = at(1000);
    let first = choose_subnet(&pool, "a", &[], now, None);
    assert_eq!(
        first,
        Decision::CreateNew {
            subnet: net6("fd00:10:244::/64")
        }
    );
    let held = [lease6("fd00:10:244::/64", "a", 990)];
    assert_eq!(
        choose_subnet(&pool, "b", &held, now, None),
        Decision::Exhausted
    );
    assert!(matches!(
        choose_subnet(&pool, "a", &held, now, None),
        Decision::Keep { .. }
    ));
    // Once a's lease has expired, b may take it over.
    let gone = [lease6("fd00:10:244::/64", "a", 100)];
    assert!(matches!(
        choose_subnet(&pool, "b", &gone, now, None),
        Decision::TakeExpired { subnet, .. } if subnet == net6("fd00:10:244::/64")
    ));
}

#[test]
fn ipv6_pools_check_their_lengths() {
    assert!(SubnetPool::new(net6("fd00:10:244::/56"), 55).is_err());
    assert!(SubnetPool::new(net6("fd00:10:244::/56"), 125).is_err());
    assert!(SubnetPool::new(net6("fd00:10:244::/56"), 124).is_ok());
    let e = SubnetPool::new(net6("fd00:10:244::/56"), 48).unwrap_err();
    assert!(e.to_string().contains("fd00:10:244::/56"), "{e}");
    // The IPv4 pool's bounds are as before.
    assert!(SubnetPool::new(net("10.244.0.0/16"), 16).is_ok());
}

#[test]
fn the_free_subnet_search_jumps_over_what_is_taken() {
    let cidr: IpNet = "fd00::/16".parse().unwrap();
    // 2^48 candidates; a /20 and a run of /64s in the way are jumped over, not walked.
    let mut taken: Vec<IpNet> = vec!["fd00::/20".parse().unwrap()];
    taken.extend((0..1000u16).map(|i| format!("fd00:1000:0:{i:x}::/64").parse::<IpNet>().unwrap()));
    let started = std::time::Instant::now();
    assert_eq!(
        lowest_free(cidr, 64, &taken),
        Some("fd00:1000:0:3e8::/64".parse().unwrap())
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    // The whole range taken by one wider range: nothing free.
    assert_eq!(lowest_free(cidr, 64, &["fd00::/12".parse().unwrap()]), None);
    // The last subnet of the range.
    assert_eq!(
        lowest_free(
            "fd00:10:244::/62".parse().unwrap(),
            64,
            &[
                "fd00:10:244::/63".parse().unwrap(),
                "fd00:10:244:2::/64".parse().unwrap()
            ]
        ),
        Some("fd00:10:244:3::/64".parse().unwrap())
    );
    // The other family's ranges never block.
    assert_eq!(
        lowest_free(
            "10.244.0.0/16".parse().unwrap(),
            24,
            &["fd00::/16".parse().unwrap()]
        ),
        Some("10.244.0.0/24".parse().unwrap())
    );
    // A length the range cannot be cut into.
    assert_eq!(lowest_free(cidr, 8, &[]), None);
    assert_eq!(lowest_free(cidr, 129, &[]), None);
}

proptest::proptest! {
    /// For IPv4 the jumping search finds what walking every subnet finds.
    #[test]
    fn the_free_subnet_search_agrees_with_walking_every_subnet(
        taken in proptest::collection::vec((0u32..64, 20u8..=28), 0..24),
        len in 22u8..=26,
    ) {
        let cluster: Ipv4Net = "10.244.0.0/20".parse().unwrap();
        let taken: Vec<IpNet> = taken
            .into_iter()
            .map(|(i, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(u32::from(cluster.network()) + i * 64), l).unwrap().trunc()))
            .collect();
        let walked = cluster.subnets(len).unwrap().find(|c| {
            let c = IpNet::V4(*c);
            !taken.iter().any(|t| t.contains(&c.network()) || c.contains(&t.network()))
        });
        proptest::prop_assert_eq!(lowest_free(cluster.into(), len, &taken), walked.map(IpNet::V4));
    }
}

/// A dual-stack node's two leases, both carrying its record with both subnets.
fn dual_leases(node: &str, v4: &str, v6: &str, renewed: u64) -> [LeaseView; 2] {
    let mut r = record(node, v4);
    r.subnet_v6 = Some(net6(v6));
    [
        LeaseView::new_held(&r, None, 40, at(renewed)),
        LeaseView::new_held_of(net6(v6), &r, None, 40, at(renewed)),
    ]
}

#[test]
fn a_dual_stack_record_round_trips_and_an_old_one_reads_as_ipv4_only() {
    let mut r = record("a", "10.244.1.0/24");
    r.subnet_v6 = Some(net6("fd00:10:244:1::/64"));
    let ann = r.to_annotations();
    assert_eq!(ann[ANN_SUBNET_V6], "fd00:10:244:1::/64");
    assert_eq!(NodeRecord::from_annotations(&ann).unwrap(), r);
    let old = record("a", "10.244.1.0/24").to_annotations();
    assert!(!old.contains_key(ANN_SUBNET_V6));
    assert_eq!(NodeRecord::from_annotations(&old).unwrap().subnet_v6, None);
    for bad in ["10.244.1.0/24", "fd00:10:244:1::1/64", "nonsense"] {
        let mut a = ann.clone();
        a.insert(ANN_SUBNET_V6.into(), bad.into());
        assert!(
            matches!(
                NodeRecord::from_annotations(&a),
                Err(RecordError::Bad {
                    key: ANN_SUBNET_V6,
                    ..
                })
            ),
            "{bad}"
        );
    }
}

#[test]
fn peers_carry_their_ipv6_subnet_only_while_they_hold_its_lease() {
    let mut leases: Vec<LeaseView> = Vec::new();
    leases.extend(dual_leases("b", "10.244.2.0/24", "fd00:10:244:2::/64", 10));
    leases.extend(dual_leases("me", "10.244.1.0/24", "fd00:10:244:1::/64", 10));
    // c's record claims an IPv6 subnet it holds no lease of (b's, or none at all).
    let mut c = record("c", "10.244.3.0/24");
    c.subnet_v6 = Some(net6("fd00:10:244:2::/64"));
    leases.push(LeaseView::new_held(&c, None, 40, at(10)));
    let mut d = record("d", "10.244.4.0/24");
    d.subnet_v6 = Some(net6("fd00:10:244:4::/64"));
    leases.push(LeaseView::new_held(&d, None, 40, at(10)));
    // An old peer: IPv4 only.
    leases.push(lease("10.244.5.0/24", "e", 10));
    let (peers, skipped) = peers_from_leases("me", &leases);
    let got: Vec<(String, String, Option<String>)> = peers
        .iter()
        .map(|p| {
            (
                p.node.clone(),
                p.subnet.unwrap().to_string(),
                p.subnet_v6.map(|s| s.to_string()),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                "b".into(),
                "10.244.2.0/24".into(),
                Some("fd00:10:244:2::/64".into())
            ),
            ("c".into(), "10.244.3.0/24".into(), None),
            ("d".into(), "10.244.4.0/24".into(), None),
            ("e".into(), "10.244.5.0/24".into(), None),
        ]
    );
    assert!(skipped.is_empty(), "{skipped:?}");
    // An IPv6 lease whose record names another IPv6 subnet is skipped, by name.
    let mut b = record("b", "10.244.2.0/24");
    b.subnet_v6 = Some(net6("fd00:10:244:9::/64"));
    let wrong = LeaseView::new_held_of(net6("fd00:10:244:2::/64"), &b, None, 40, at(10));
    let (_, skipped) = peers_from_leases("me", &[wrong]);
    assert!(
        matches!(
            &skipped[..],
            [SkippedLease {
                reason: RecordError::SubnetMismatch { .. },
                ..
            }]
        ),
        "{skipped:?}"
    );
}

#[test]
fn a_dual_stack_node_acquires_an_ipv6_lease_by_the_same_rules() {
    let store = FakeLeases::default();
    let pool = SubnetPool::<Ipv6Net>::new(net6("fd00:10:244::/62"), 64).unwrap();
    let req = |node: &str| AcquireRequest {
        pool,
        record: record(node, "10.244.1.0/24"),
        owner: None,
        duration_secs: 40,
        prefer: None,
        max_attempts: 4,
    };
    let a = block_on(acquire(&store, &req("a"), || at(100))).unwrap();
    assert_eq!(a.subnet, net6("fd00:10:244::/64"));
    assert_eq!(a.record.subnet_v6, Some(a.subnet));
    assert_eq!(a.lease.name, "sluice-fd00-10-244---64");
    assert_eq!(a.lease.annotations[ANN_SUBNET_V6], "fd00:10:244::/64");
    let again = block_on(acquire(&store, &req("a"), || at(110))).unwrap();
    assert_eq!((again.subnet, again.by), (a.subnet, AcquiredBy::Kept));
    let b = block_on(acquire(&store, &req("b"), || at(110))).unwrap();
    assert_eq!(b.subnet, net6("fd00:10:244:1::/64"));
    for n in ["c", "d"] {
        block_on(acquire(&store, &req(n), || at(110))).unwrap();
    }
    let e = block_on(acquire(&store, &req("e"), || at(110)));
    assert!(matches!(e, Err(AcquireError::Exhausted { .. })), "{e:?}");
}

#[test]
fn the_ipv6_underlay_address_round_trips_and_bad_ones_are_refused() {
    let mut r = record("a", "10.244.1.0/24");
    r.underlay_ip_v6 = Some("fd00:31::1".parse().unwrap());
    let ann = r.to_annotations();
    assert_eq!(ann[ANN_UNDERLAY_IP_V6], "fd00:31::1");
    assert_eq!(NodeRecord::from_annotations(&ann).unwrap(), r);
    // A record without it (an IPv4-only node, or an older sluice) reads as none.
    let old = record("a", "10.244.1.0/24").to_annotations();
    assert!(!old.contains_key(ANN_UNDERLAY_IP_V6));
    assert_eq!(
        NodeRecord::from_annotations(&old).unwrap().underlay_ip_v6,
        None
    );
    for bad in ["172.31.0.1", "::", "ff02::1", "::1", "fd00:31::1/64", "x"] {
        let mut a = ann.clone();
        a.insert(ANN_UNDERLAY_IP_V6.into(), bad.into());
        assert!(
            matches!(
                NodeRecord::from_annotations(&a),
                Err(RecordError::Bad {
                    key: ANN_UNDERLAY_IP_V6,
                    ..
                })
            ),
            "{bad}"
        );
    }
}

/// An IPv6-only node's record: no `sluice.dev/subnet`, its lease named from its IPv6 subnet.
fn record_v6_only(node: &str, subnet6: &str, underlay: &str) -> NodeRecord {
    NodeRecord {
        underlay_ip: underlay.parse().unwrap(),
        underlay_ip_v6: underlay.parse().ok(),
        subnet: None,
        subnet_v6: Some(subnet6.parse().unwrap()),
        ..record(node, "10.244.0.0/24")
    }
}

#[test]
fn an_ipv6_only_record_round_trips_and_its_one_lease_brings_the_peer_in() {
    let r = record_v6_only("b", "fd00:10:244:2::/64", "fd00:31::2");
    let a = r.to_annotations();
    assert!(!a.contains_key(ANN_SUBNET), "{a:?}");
    assert_eq!(a[ANN_SUBNET_V6], "fd00:10:244:2::/64");
    assert_eq!(NodeRecord::from_annotations(&a).unwrap(), r);
    // The lease is named from the IPv6 subnet.
    let l = LeaseView::new_held(&r, None, 40, at(100));
    assert_eq!(l.name, "sluice-fd00-10-244-2---64");
    let mine = LeaseView::new_held(
        &record_v6_only("me", "fd00:10:244:1::/64", "fd00:31::1"),
        None,
        40,
        at(100),
    );
    let (peers, skipped) = peers_from_leases("me", &[l, mine]);
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(peers, vec![r.clone()]);
    // An IPv6-only record in a lease named from an IPv4 subnet does not fit it: skipped, and
    // the reason names the record's own subnet.
    let mut wrong = LeaseView::new_held(&r, None, 40, at(100));
    wrong.name = lease_name(net("10.244.9.0/24"));
    let (peers, skipped) = peers_from_leases("me", &[wrong]);
    assert!(peers.is_empty());
    assert!(
        matches!(
            &skipped[..],
            [SkippedLease { reason: RecordError::SubnetMismatch { record, .. }, .. }]
                if record.to_string() == "fd00:10:244:2::/64"
        ),
        "{skipped:?}"
    );
    // A record with neither subnet is refused by name.
    let mut none = a.clone();
    none.remove(ANN_SUBNET_V6);
    assert!(matches!(
        NodeRecord::from_annotations(&none),
        Err(RecordError::Missing { key: ANN_SUBNET })
    ));
}

#[test]
fn an_ipv6_only_node_takes_its_lease_from_the_ipv6_pool() {
    let store = FakeLeases::default();
    let pool = SubnetPool::new("fd00:10:244::/56".parse::<Ipv6Net>().unwrap(), 64).unwrap();
    let req = |node: &str| AcquireRequest {
        pool,
        record: record_v6_only(node, "fd00:10:244:ff::/64", "fd00:31::1"),
        owner: None,
        duration_secs: 40,
        prefer: None,
        max_attempts: 4,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let a = rt.block_on(acquire(&store, &req("a"), || at(10))).unwrap();
    let b = rt.block_on(acquire(&store, &req("b"), || at(10))).unwrap();
    assert_eq!(a.subnet.to_string(), "fd00:10:244::/64");
    assert_eq!(b.subnet.to_string(), "fd00:10:244:1::/64");
    assert_eq!(b.record.subnet, None);
    assert_eq!(b.record.subnet_v6, Some(b.subnet));
    assert_eq!(b.lease.name, "sluice-fd00-10-244-1---64");
}
