//! Dual-stack nodes (subnet.env with the IPv6 pair) through the verbs, against the fake kernel.

use super::*;

const V6: &str = "fd00:10:244:3::/64";

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

#[test]
fn a_dual_add_plans_both_families_and_del_frees_both() {
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let node = Node::dual("10.244.3.0/24", V6);
        let mut k = FakeKernel::new();
        let conf = node.conf(version);
        let out = run(add(&conf, &req("c1"), &mut k)).unwrap();
        let ips = out["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "{version}: {out}");
        assert_eq!(ips[0]["address"], "10.244.3.1/32", "{version}");
        assert_eq!(ips[0]["gateway"], "169.254.1.1", "{version}");
        assert_eq!(ips[1]["address"], "fd00:10:244:3::1/128", "{version}");
        assert_eq!(ips[1]["gateway"], "fe80::ecee:eeff:feee:eeee", "{version}");
        assert_eq!(
            ips[1].get("version").and_then(|v| v.as_str()),
            (version == "0.4.0").then_some("6"),
            "{version}"
        );
        assert_eq!(out["routes"][1]["dst"], "::/0", "{version}");
        // The plan the kernel was given carries the IPv6 address, on the same veth.
        let link = &k.links[&podnet::host_ifname("c1", "eth0")];
        assert_eq!(link.address, Some(Ipv4Addr::new(10, 244, 3, 1)));
        assert_eq!(link.address_v6, Some(v6("fd00:10:244:3::1")));
        assert!(link.host_configured && link.pod_configured);
        assert_eq!((node.allocations(), node.allocations_v6()), (1, 1));
        let with_prev = node.conf_with(version, &format!(r#","prevResult":{out}"#));
        run(check(&with_prev, &req("c1"), &mut k)).unwrap();
        // A second pod gets the next address of each family.
        let out2 = run(add(&conf, &req("c2"), &mut k)).unwrap();
        assert_eq!(out2["ips"][1]["address"], "fd00:10:244:3::2/128");
        run(del(&conf, &req("c1"), &mut k)).unwrap();
        run(del(&conf, &req("c2"), &mut k)).unwrap();
        assert!(k.links.is_empty());
        assert_eq!((node.allocations(), node.allocations_v6()), (0, 0));
    }
}

#[test]
fn a_repeated_dual_add_keeps_both_addresses() {
    let node = Node::dual("10.244.3.0/24", V6);
    let mut k = FakeKernel::new();
    let a = run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap();
    let b = run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap();
    assert_eq!(a["ips"], b["ips"]);
    assert_eq!((node.allocations(), node.allocations_v6()), (1, 1));
}

#[test]
fn a_dual_failure_at_any_step_releases_both_families() {
    for step in [
        Step::CreateVeth,
        Step::ConfigureHost,
        Step::ConfigurePod,
        Step::Shape,
    ] {
        let node = Node::dual("10.244.3.0/24", V6);
        let mut k = FakeKernel {
            fail_at: Some(step),
            ..FakeKernel::new()
        };
        let err = run(add(
            &node.conf_with("1.0.0", super::SHAPED),
            &req("c1"),
            &mut k,
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::Kernel, "{step:?}");
        assert!(k.links.is_empty(), "{step:?} left a link");
        assert!(k.ifbs.is_empty(), "{step:?} left an ifb");
        assert_eq!(
            (node.allocations(), node.allocations_v6()),
            (0, 0),
            "{step:?} left an allocation"
        );
    }
}

#[test]
fn a_failed_add_after_the_node_gained_ipv6_gives_back_only_the_new_address() {
    // The pod was ADDed while the node was IPv4 only; the node then got its IPv6 subnet and a
    // repeated ADD fails: the IPv6 address it took goes back, the earlier IPv4 one stays.
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap();
    let dual = Node::dual("10.244.3.0/24", V6);
    std::fs::copy(
        dual.dir.path().join("subnet.env"),
        node.dir.path().join("subnet.env"),
    )
    .unwrap();
    k.fail_at = Some(Step::ConfigurePod);
    run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap_err();
    assert_eq!((node.allocations(), node.allocations_v6()), (1, 0));
    k.fail_at = None;
    let out = run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap();
    assert_eq!(out["ips"][0]["address"], "10.244.3.1/32");
    // The next IPv6 address: a freed one is not handed out again at once.
    assert_eq!(out["ips"][1]["address"], "fd00:10:244:3::2/128");
    assert_eq!((node.allocations(), node.allocations_v6()), (1, 1));
}

#[test]
fn exhausting_one_family_fails_clearly_and_leaves_nothing_of_the_other() {
    // IPv6 runs out first: a /124, the narrowest subnet-length-v6, holds 15 pod addresses (all
    // but the subnet-router anycast address; IPv6 has no broadcast).
    let node = Node::dual("10.244.3.0/24", "fd00:10:244:3::/124");
    let mut k = FakeKernel::new();
    for i in 0..15 {
        run(add(&node.conf("1.1.0"), &req(&format!("c{i}")), &mut k)).unwrap();
    }
    let err = run(add(&node.conf("1.1.0"), &req("c15"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::SubnetExhausted);
    assert!(err.msg.contains("fd00:10:244:3::/124"), "{}", err.msg);
    assert_eq!(k.links.len(), 15);
    assert_eq!(
        (node.allocations(), node.allocations_v6()),
        (15, 15),
        "the IPv4 address of the failed ADD went back"
    );
    // IPv4 runs out first: a /29 holds six.
    let node = Node::dual("10.244.3.0/29", V6);
    let mut k = FakeKernel::new();
    for i in 0..6 {
        run(add(&node.conf("1.1.0"), &req(&format!("c{i}")), &mut k)).unwrap();
    }
    let err = run(add(&node.conf("1.1.0"), &req("c6"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::SubnetExhausted);
    assert!(err.msg.contains("10.244.3.0/29"), "{}", err.msg);
    assert_eq!((node.allocations(), node.allocations_v6()), (6, 6));
    // A DEL makes room in both.
    run(del(&node.conf("1.1.0"), &req("c2"), &mut k)).unwrap();
    run(add(&node.conf("1.1.0"), &req("c6"), &mut k)).unwrap();
    assert_eq!((node.allocations(), node.allocations_v6()), (6, 6));
}

#[test]
fn check_finds_what_is_missing_of_ipv6() {
    let node = Node::dual("10.244.3.0/24", V6);
    let mut k = FakeKernel::new();
    let out = run(add(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    // prevResult naming another IPv6 address fails.
    let mut other = out.clone();
    other["ips"][1]["address"] = "fd00:10:244:3::99/128".into();
    let err = run(check(
        &node.conf_with("1.1.0", &format!(r#","prevResult":{other}"#)),
        &req("c1"),
        &mut k,
    ))
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(err.msg.contains("fd00:10:244:3::99/128"), "{}", err.msg);
    // The IPv6 wiring gone (host route, gateway, pod address, default route) is found.
    k.links.values_mut().for_each(|l| l.address_v6 = None);
    let err = run(check(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    for word in [
        "host route to fd00:10:244:3::1/128",
        "lacks the gateway fe80::ecee:eeff:feee:eeee",
        "lacks fd00:10:244:3::1/128",
        "::/0 via fe80::ecee:eeff:feee:eeee",
    ] {
        assert!(err.msg.contains(word), "{word}: {}", err.msg);
    }
    assert!(
        !err.msg.contains("10.244.3.1/32"),
        "IPv4 is intact: {}",
        err.msg
    );
}

#[test]
fn gc_collects_both_families() {
    let node = Node::dual("10.244.3.0/24", V6);
    let mut k = FakeKernel::new();
    for c in ["keep", "stale1", "stale2"] {
        run(add(&node.conf("1.1.0"), &req(c), &mut k)).unwrap();
    }
    let mut conf = node.conf("1.1.0");
    conf.valid_attachments = Some(vec![Attachment {
        container_id: "keep".into(),
        ifname: "eth0".into(),
    }]);
    run(gc(&conf, &mut k)).unwrap();
    let state = IpamStore::new(node.ipam_dir()).read().unwrap();
    let owners =
        |m: Vec<&crate::ipam::Owner>| m.iter().map(|o| o.container_id.clone()).collect::<Vec<_>>();
    assert_eq!(owners(state.allocations.values().collect()), vec!["keep"]);
    assert_eq!(
        owners(state.allocations_v6.values().collect()),
        vec!["keep"]
    );
    assert_eq!(
        k.links.keys().collect::<Vec<_>>(),
        vec![&podnet::host_ifname("keep", "eth0")]
    );
}

#[test]
fn an_ipv4_only_node_plans_no_ipv6() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let out = run(add(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    assert_eq!(out["ips"].as_array().unwrap().len(), 1);
    assert_eq!(out["routes"].as_array().unwrap().len(), 1);
    assert_eq!(k.links[&podnet::host_ifname("c1", "eth0")].address_v6, None);
    assert_eq!(node.allocations_v6(), 0);
}
