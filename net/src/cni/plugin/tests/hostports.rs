//! The `portMappings` capability through the verbs, against the fake kernel and firewall.

use super::*;

const MAPPINGS: &str =
    r#","runtimeConfig":{"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]}"#;

fn mapped(node: &Node) -> NetConf {
    node.conf_with("1.1.0", MAPPINGS)
}

fn state(node: &Node) -> crate::ipam::IpamState {
    IpamStore::new(node.ipam_dir()).read().unwrap()
}

/// (container, hostPort) of every mapping in the fake kernel.
pub(super) fn in_kernel(k: &FakeKernel) -> Vec<(String, u16)> {
    k.hostports
        .iter()
        .flatten()
        .flat_map(|e| {
            e.mappings
                .iter()
                .map(|m| (e.container_id.clone(), m.host_port))
        })
        .collect()
}

#[test]
fn add_records_and_writes_the_mapping_and_del_removes_exactly_it() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(&mapped(&node), &req("c1"), &mut k)).unwrap();
    let other = node.conf_with(
        "1.1.0",
        r#","runtimeConfig":{"portMappings":[{"hostPort":9090,"containerPort":90}]}"#,
    );
    run(add(&other, &req("c2"), &mut k)).unwrap();
    assert_eq!(
        in_kernel(&k),
        [("c1".to_string(), 8080), ("c2".to_string(), 9090)]
    );
    let st = state(&node);
    assert_eq!(st.hostports.len(), 2);
    assert_eq!(st.hostports[0].pod_ip, st.lookup(&owner(&req("c1"))));
    assert!(st.hostports[0].pod_ip.is_some());
    assert_eq!(
        k.localnet,
        [
            podnet::host_ifname("c1", "eth0"),
            podnet::host_ifname("c2", "eth0")
        ]
    );
    // The agent had published no backend: the plugin was told none.
    assert!(k.backends.iter().all(Option::is_none));
    run(check(&mapped(&node), &req("c1"), &mut k)).unwrap();
    run(del(&mapped(&node), &req("c1"), &mut k)).unwrap();
    assert_eq!(in_kernel(&k), [("c2".to_string(), 9090)]);
    assert_eq!(state(&node).hostports.len(), 1);
    // A pod without mappings never touches the firewall.
    let writes = k.backends.len();
    run(add(&node.conf("1.1.0"), &req("c3"), &mut k)).unwrap();
    run(del(&node.conf("1.1.0"), &req("c3"), &mut k)).unwrap();
    assert_eq!(k.backends.len(), writes);
}

#[test]
fn the_published_backend_is_the_one_used() {
    let node = Node::new("10.244.3.0/24");
    let env = node.dir.path().join("subnet.env");
    let mut text = std::fs::read_to_string(&env).unwrap();
    text.push_str("SLUICE_POLICY_BACKEND=iptables-legacy\n");
    std::fs::write(&env, text).unwrap();
    let mut k = FakeKernel::new();
    run(add(&mapped(&node), &req("c1"), &mut k)).unwrap();
    run(del(&mapped(&node), &req("c1"), &mut k)).unwrap();
    assert_eq!(
        k.backends,
        [
            Some("iptables-legacy".to_string()),
            Some("iptables-legacy".to_string())
        ]
    );
}

#[test]
fn a_held_host_port_fails_add_and_leaves_nothing() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(&mapped(&node), &req("c1"), &mut k)).unwrap();
    let before = state(&node);
    let links = k.links.len();
    let err = run(add(&mapped(&node), &req("c2"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::PortConflict);
    assert!(
        err.msg.contains("hostPort 8080/tcp") && err.msg.contains("held by container c1"),
        "{}",
        err.msg
    );
    assert_eq!(state(&node), before, "no address, no mapping");
    assert_eq!(k.links.len(), links, "no veth");
    assert_eq!(in_kernel(&k), [("c1".to_string(), 8080)]);
}

#[test]
fn bad_port_mappings_are_a_config_error_before_anything_is_made() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let conf = node.conf_with(
        "1.1.0",
        r#","runtimeConfig":{"portMappings":[{"hostPort":70000,"containerPort":80}]}"#,
    );
    let err = run(add(&conf, &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidConfig);
    assert!(err.msg.contains("hostPort 70000"), "{}", err.msg);
    assert!(k.links.is_empty());
    assert_eq!(node.allocations(), 0);
}

#[test]
fn a_failed_rule_write_rolls_the_whole_add_back() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(
        &node.conf_with(
            "1.1.0",
            r#","runtimeConfig":{"portMappings":[{"hostPort":9090,"containerPort":90}]}"#,
        ),
        &req("c0"),
        &mut k,
    ))
    .unwrap();
    let before = state(&node);
    k.fail_hostports = true;
    let err = run(add(&mapped(&node), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::Kernel);
    assert!(err.msg.contains("hostPort rules"), "{}", err.msg);
    assert!(!k.links.contains_key(&podnet::host_ifname("c1", "eth0")));
    // (The allocation cursor moves on: a freed address is not reused at once.)
    let after = state(&node);
    assert_eq!(after.allocations, before.allocations);
    assert_eq!(after.hostports, before.hostports);
    // Once the firewall works again, the hostPort is free for a new ADD.
    k.fail_hostports = false;
    run(add(&mapped(&node), &req("c1"), &mut k)).unwrap();
    assert_eq!(
        in_kernel(&k),
        [("c0".to_string(), 9090), ("c1".to_string(), 8080)]
    );
}

#[test]
fn a_del_whose_rule_write_fails_keeps_state_for_the_retry() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(&mapped(&node), &req("c1"), &mut k)).unwrap();
    k.fail_hostports = true;
    let err = run(del(&mapped(&node), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::Kernel);
    assert_eq!(node.allocations(), 1);
    assert_eq!(state(&node).hostports.len(), 1);
    k.fail_hostports = false;
    run(del(&mapped(&node), &req("c1"), &mut k)).unwrap();
    assert_eq!(node.allocations(), 0);
    assert!(state(&node).hostports.is_empty());
    assert!(in_kernel(&k).is_empty());
}

#[test]
fn check_finds_lost_rules_and_mappings_that_differ() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(&mapped(&node), &req("c1"), &mut k)).unwrap();
    run(check(&mapped(&node), &req("c1"), &mut k)).unwrap();
    // The runtime asks for none, sluice holds one.
    let err = run(check(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(
        err.msg.contains("asks for 0 mapping(s) but sluice holds 1"),
        "{}",
        err.msg
    );
    // Someone flushed the rules.
    k.hostports = Some(vec![]);
    let err = run(check(&mapped(&node), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(
        err.msg.contains("hostPort rules missing: 8080:80"),
        "{}",
        err.msg
    );
}

#[test]
fn gc_drops_the_mappings_of_attachments_not_valid() {
    gc_drops_mappings_on(Node::new("10.244.3.0/24"));
    gc_drops_mappings_on(Node::v6_only("fd00:10:244:3::/64"));
}

fn gc_drops_mappings_on(node: Node) {
    let mut k = FakeKernel::new();
    run(add(&mapped(&node), &req("dead"), &mut k)).unwrap();
    run(add(
        &node.conf_with(
            "1.1.0",
            r#","runtimeConfig":{"portMappings":[{"hostPort":9090,"containerPort":90}]}"#,
        ),
        &req("live"),
        &mut k,
    ))
    .unwrap();
    let mut conf = node.conf("1.1.0");
    conf.valid_attachments = Some(vec![Attachment {
        container_id: "live".into(),
        ifname: "eth0".into(),
    }]);
    run(gc(&conf, &mut k)).unwrap();
    assert_eq!(in_kernel(&k), [("live".to_string(), 9090)]);
    let st = state(&node);
    assert_eq!(st.hostports.len(), 1);
    assert_eq!(st.hostports[0].container_id, "live");
    // The freed hostPort can be taken again.
    run(add(&mapped(&node), &req("new"), &mut k)).unwrap();
}
