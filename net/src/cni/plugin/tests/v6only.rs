//! IPv6-only nodes (subnet.env with only the IPv6 pair) through the verbs, against the fake
//! kernel: every pod an IPv6 /128 and no IPv4 address, with the same IPAM guarantees.

use super::*;

const V6: &str = "fd00:10:244:3::/64";

#[test]
fn an_ipv6_only_add_gives_one_ipv6_address_in_every_version_and_del_frees_it() {
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let node = Node::v6_only(V6);
        let mut k = FakeKernel::new();
        let conf = node.conf(version);
        let out = run(add(&conf, &req("c1"), &mut k)).unwrap();
        let ips = out["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 1, "{version}: {out}");
        assert_eq!(ips[0]["address"], "fd00:10:244:3::1/128", "{version}");
        assert_eq!(ips[0]["gateway"], "fe80::ecee:eeff:feee:eeee", "{version}");
        assert_eq!(
            ips[0].get("version").and_then(|v| v.as_str()),
            version.starts_with("0.").then_some("6"),
            "{version}"
        );
        assert_eq!(
            out["routes"],
            serde_json::json!([{"dst": "::/0", "gw": "fe80::ecee:eeff:feee:eeee"}]),
            "{version}"
        );
        // The pod's MTU is the file's (results show it from 1.1.0).
        if version == "1.1.0" {
            assert_eq!(out["interfaces"][1]["mtu"], 1430, "{version}");
        }
        let link = &k.links[&podnet::host_ifname("c1", "eth0")];
        assert_eq!(link.address, None, "{version}: no IPv4 address planned");
        assert_eq!(link.address_v6, Some("fd00:10:244:3::1".parse().unwrap()));
        assert_eq!((node.allocations(), node.allocations_v6()), (0, 1));
        // CHECK against the result it gave.
        let with_prev = node.conf_with(version, &format!(r#","prevResult":{out}"#));
        if version != "0.3.0" && version != "0.3.1" {
            run(check(&with_prev, &req("c1"), &mut k)).unwrap();
        }
        // A repeated ADD keeps the address (idempotent); a second pod gets the next one.
        let again = run(add(&conf, &req("c1"), &mut k)).unwrap();
        assert_eq!(again["ips"], out["ips"], "{version}");
        let out2 = run(add(&conf, &req("c2"), &mut k)).unwrap();
        assert_eq!(out2["ips"][0]["address"], "fd00:10:244:3::2/128");
        run(del(&conf, &req("c1"), &mut k)).unwrap();
        run(del(&conf, &req("c2"), &mut k)).unwrap();
        // A second DEL of a gone pod is fine.
        run(del(&conf, &req("c2"), &mut k)).unwrap();
        assert!(k.links.is_empty());
        assert_eq!((node.allocations(), node.allocations_v6()), (0, 0));
    }
}

#[test]
fn an_ipv6_only_failure_at_any_step_leaves_nothing() {
    for step in [Step::CreateVeth, Step::ConfigureHost, Step::ConfigurePod] {
        let node = Node::v6_only(V6);
        let mut k = FakeKernel {
            fail_at: Some(step),
            ..FakeKernel::new()
        };
        let err = run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Kernel, "{step:?}");
        assert!(k.links.is_empty(), "{step:?} left a link");
        assert_eq!(node.allocations_v6(), 0, "{step:?} left an allocation");
    }
}

#[test]
fn an_ipv6_only_subnet_runs_out_clearly_and_a_del_makes_room() {
    // A /124 holds 15 pod addresses.
    let node = Node::v6_only("fd00:10:244:3::/124");
    let mut k = FakeKernel::new();
    for i in 0..15 {
        run(add(&node.conf("1.1.0"), &req(&format!("c{i}")), &mut k)).unwrap();
    }
    let err = run(add(&node.conf("1.1.0"), &req("c15"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::SubnetExhausted);
    assert!(err.msg.contains("fd00:10:244:3::/124"), "{}", err.msg);
    assert_eq!(k.links.len(), 15);
    run(del(&node.conf("1.1.0"), &req("c3"), &mut k)).unwrap();
    run(add(&node.conf("1.1.0"), &req("c15"), &mut k)).unwrap();
    assert_eq!((node.allocations(), node.allocations_v6()), (0, 15));
}

#[test]
fn concurrent_ipv6_only_adds_get_distinct_addresses() {
    let node = Node::v6_only(V6);
    let got: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|i| {
                let conf = node.conf("1.0.0");
                s.spawn(move || {
                    let mut k = FakeKernel::new();
                    let out = run(add(&conf, &req(&format!("c{i}")), &mut k)).unwrap();
                    out["ips"][0]["address"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let distinct: std::collections::BTreeSet<&String> = got.iter().collect();
    assert_eq!(distinct.len(), 8, "{got:?}");
    assert_eq!(node.allocations_v6(), 8);
}

#[test]
fn check_gc_and_status_work_on_an_ipv6_only_node() {
    let node = Node::v6_only(V6);
    let mut k = FakeKernel::new();
    for c in ["keep", "stale"] {
        run(add(&node.conf("1.1.0"), &req(c), &mut k)).unwrap();
    }
    run(check(&node.conf("1.1.0"), &req("keep"), &mut k)).unwrap();
    // A prevResult naming an IPv4 address the pod does not hold fails CHECK.
    let bogus = r#","prevResult":{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/run/netns/fake"}],"ips":[{"address":"10.244.3.9/32","interface":0}]}"#;
    let err = run(check(&node.conf_with("1.1.0", bogus), &req("keep"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(err.msg.contains("no IPv4 address"), "{}", err.msg);
    status(&node.conf("1.1.0")).unwrap();
    let mut conf = node.conf("1.1.0");
    conf.valid_attachments = Some(vec![Attachment {
        container_id: "keep".into(),
        ifname: "eth0".into(),
    }]);
    run(gc(&conf, &mut k)).unwrap();
    let state = IpamStore::new(node.ipam_dir()).read().unwrap();
    let owners: Vec<String> = state
        .allocations_v6
        .values()
        .map(|o| o.container_id.clone())
        .collect();
    assert_eq!(owners, vec!["keep"]);
    assert!(state.allocations.is_empty());
}

const PORTS: &str = r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"},{"hostPort":8053,"containerPort":53,"protocol":"udp","hostIP":"::"}]}"#;

#[test]
fn hostports_on_an_ipv6_only_node_map_to_the_pods_ipv6_address_and_del_removes_them() {
    let node = Node::v6_only(V6);
    let mut k = FakeKernel::new();
    let conf = node.conf_with("1.1.0", PORTS);
    let out = run(add(&conf, &req("c1"), &mut k)).unwrap();
    assert_eq!(out["ips"][0]["address"], "fd00:10:244:3::1/128");
    let pod6 = Some("fd00:10:244:3::1".parse().unwrap());
    assert_eq!(
        super::hostports::in_kernel(&k),
        [("c1".to_string(), 8053), ("c1".to_string(), 8080)]
    );
    // What was written carries the pod's IPv6 address and no IPv4 one.
    let written = k.hostports.clone().unwrap_or_default();
    assert_eq!((written[0].pod_ip, written[0].pod_ip6), (None, pod6));
    let st = IpamStore::new(node.ipam_dir()).read().unwrap();
    assert_eq!(
        (st.hostports[0].pod_ip, st.hostports[0].pod_ip6),
        (None, pod6)
    );
    // No IPv4 address: IPv4 loopback has nothing to reach.
    assert!(k.localnet.is_empty(), "{:?}", k.localnet);
    run(check(&conf, &req("c1"), &mut k)).unwrap();
    // The rules lost: CHECK says so; a repeated ADD writes them back.
    k.hostports = Some(vec![]);
    let err = run(check(&conf, &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(err.msg.contains("hostPort rules missing"), "{}", err.msg);
    run(add(&conf, &req("c1"), &mut k)).unwrap();
    run(check(&conf, &req("c1"), &mut k)).unwrap();
    // Another pod on the same hostPort: refused, nothing of it left.
    let err = run(add(&conf, &req("c2"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PortConflict, "{}", err.msg);
    assert_eq!((node.allocations(), node.allocations_v6()), (0, 1));
    assert!(!k.links.contains_key(&podnet::host_ifname("c2", "eth0")));
    run(del(&conf, &req("c1"), &mut k)).unwrap();
    assert!(super::hostports::in_kernel(&k).is_empty());
    assert!(IpamStore::new(node.ipam_dir())
        .read()
        .unwrap()
        .hostports
        .is_empty());
    assert_eq!((node.allocations(), node.allocations_v6()), (0, 0));
}

#[test]
fn an_ipv4_host_ip_on_an_ipv6_only_node_is_refused_and_leaves_nothing() {
    let node = Node::v6_only(V6);
    let mut k = FakeKernel::new();
    let ports = r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp","hostIP":"192.0.2.1"}]}"#;
    let err = run(add(&node.conf_with("1.0.0", ports), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(
        err.msg.contains("192.0.2.1") && err.msg.contains("IPv6-only"),
        "{}",
        err.msg
    );
    assert!(k.links.is_empty());
    assert!(k.hostports.is_none(), "the firewall was not touched");
    assert_eq!((node.allocations(), node.allocations_v6()), (0, 0));
}

#[test]
fn a_failed_rule_write_on_an_ipv6_only_node_rolls_the_add_back() {
    let node = Node::v6_only(V6);
    let mut k = FakeKernel {
        fail_hostports: true,
        ..FakeKernel::new()
    };
    let err = run(add(&node.conf_with("1.1.0", PORTS), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::Kernel);
    assert!(k.links.is_empty());
    assert_eq!(node.allocations_v6(), 0);
    assert!(IpamStore::new(node.ipam_dir())
        .read()
        .unwrap()
        .hostports
        .is_empty());
}
