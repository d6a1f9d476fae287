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
        underlay_ip: Ipv4Addr::new(192, 168, 0, 1),
        vtep_mac: [0x0a, 1, 2, 3, 4, 5],
        wireguard_public_key: None,
        encryption: "none".into(),
        subnet: net(subnet),
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
            .map(|p| (p.node.as_str(), p.subnet.to_string()))
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
        moved.underlay_ip = Ipv4Addr::new(192, 168, 0, 9);
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
