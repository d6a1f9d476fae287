//! One test per rule of ClusterNetworkPolicy's semantics, on the same nine pods, with and
//! without NetworkPolicies between the tiers.

use super::*;

fn cnp(
    name: &str,
    tier: &str,
    priority: i32,
    subject: Value,
    ingress: Value,
    egress: Value,
) -> Value {
    json!({"metadata": {"name": name}, "spec": {
        "tier": tier, "priority": priority, "subject": subject,
        "ingress": ingress, "egress": egress}})
}

fn ns_subject(ns: &str) -> Value {
    json!({"namespaces": {"matchLabels": {"ns": ns}}})
}

fn from_ns(ns: &str) -> Value {
    json!([{"namespaces": {"matchLabels": {"ns": ns}}}])
}

fn rule(action: &str, peers_key: &str, peers: Value) -> Value {
    json!({"action": action, peers_key: peers})
}

fn every_ns() -> Value {
    json!([{"namespaces": {}}])
}

/// The nine-by-nine matrix on TCP 80: the sources allowed per destination, `to` order x/a..z/c.
fn matrix(ir: &PolicyIr) -> Vec<Vec<String>> {
    all_pods().iter().map(|to| sources(ir, to, 80)).collect()
}

#[test]
fn admin_deny_overrides_a_network_policy_allow() {
    let c = Cluster::new();
    let np = allow_from("x", json!({}), from_ns_np("y"), Value::Null);
    let deny = cnp(
        "deny-y",
        "Admin",
        10,
        ns_subject("x"),
        json!([rule("Deny", "from", from_ns("y"))]),
        json!([]),
    );
    let without = c.compile_tiers(std::slice::from_ref(&np), &[], &[]);
    assert!(tcp(&without, "y/a", "x/a", 80));
    let ir = c.compile_tiers(&[np], &[deny], &[]);
    assert!(!tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "y/b", "x/c", 81));
    // z was not allowed by the NetworkPolicy and the Admin tier does not allow it either.
    assert!(!tcp(&ir, "z/a", "x/a", 80));
    // The node's probes still come in.
    assert!(tcp(&ir, "host", "x/a", 80));
}

fn from_ns_np(ns: &str) -> Value {
    json!([{"namespaceSelector": {"matchLabels": {"ns": ns}}}])
}

#[test]
fn admin_pass_defers_to_network_policy_then_baseline() {
    let c = Cluster::new();
    let pass = cnp(
        "pass-y",
        "Admin",
        5,
        ns_subject("x"),
        json!([rule("Pass", "from", from_ns("y"))]),
        json!([]),
    );
    // Below the pass, a lower-ranked Admin deny of everything: the pass wins for y.
    let deny_all = cnp(
        "deny-all",
        "Admin",
        50,
        ns_subject("x"),
        json!([rule("Deny", "from", every_ns())]),
        json!([]),
    );
    let baseline = cnp(
        "base-deny",
        "Baseline",
        1,
        ns_subject("x"),
        json!([rule("Deny", "from", every_ns())]),
        json!([]),
    );
    // No NetworkPolicy: Pass goes on to Baseline, which denies.
    let ir = c.compile_tiers(
        &[],
        &[pass.clone(), deny_all.clone(), baseline.clone()],
        &[],
    );
    assert!(!tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "z/a", "x/a", 80));
    // NetworkPolicy allowing y: Pass hands y to it; z still hits the Admin deny.
    let np = allow_from("x", json!({}), from_ns_np("y"), Value::Null);
    let ir = c.compile_tiers(&[np], &[pass, deny_all, baseline], &[]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "z/a", "x/a", 80));
    assert!(!tcp(&ir, "x/b", "x/a", 80));
}

#[test]
fn baseline_deny_applies_only_where_no_network_policy_selects() {
    let c = Cluster::new();
    let baseline = cnp(
        "base-deny",
        "Baseline",
        1,
        json!({"namespaces": {}}),
        json!([rule("Deny", "from", every_ns())]),
        json!([]),
    );
    let np = allow_from(
        "x",
        json!({"matchLabels": {"pod": "a"}}),
        from_ns_np("z"),
        Value::Null,
    );
    let ir = c.compile_tiers(&[np], &[baseline], &[]);
    // x/a is isolated by NetworkPolicy: it decides (z allowed, y denied), not the baseline.
    assert!(tcp(&ir, "z/b", "x/a", 80));
    assert!(!tcp(&ir, "y/b", "x/a", 80));
    // Every other pod: the baseline denies all.
    assert!(!tcp(&ir, "z/b", "x/b", 80));
    assert!(!tcp(&ir, "x/a", "y/c", 80));
    assert!(tcp(&ir, "host", "y/c", 80));
}

#[test]
fn priority_orders_policies_within_a_tier() {
    let c = Cluster::new();
    let accept = |p| {
        cnp(
            "accept-y",
            "Admin",
            p,
            ns_subject("x"),
            json!([rule("Accept", "from", from_ns("y"))]),
            json!([]),
        )
    };
    let deny = cnp(
        "deny-all",
        "Admin",
        10,
        ns_subject("x"),
        json!([rule("Deny", "from", every_ns())]),
        json!([]),
    );
    let ir = c.compile_tiers(&[], &[accept(5), deny.clone()], &[]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "z/a", "x/a", 80));
    let ir = c.compile_tiers(&[], &[accept(20), deny], &[]);
    assert!(!tcp(&ir, "y/a", "x/a", 80));
}

#[test]
fn equal_priority_deny_beats_accept_but_rule_order_rules_within_a_policy() {
    let c = Cluster::new();
    let accept = cnp(
        "a-accept",
        "Admin",
        7,
        ns_subject("x"),
        json!([rule("Accept", "from", from_ns("y"))]),
        json!([]),
    );
    let deny = cnp(
        "b-deny",
        "Admin",
        7,
        ns_subject("x"),
        json!([rule("Deny", "from", from_ns("y"))]),
        json!([]),
    );
    // Whatever the names and the input order.
    for set in [
        [accept.clone(), deny.clone()],
        [deny.clone(), accept.clone()],
    ] {
        let ir = c.compile_tiers(&[], &set, &[]);
        assert!(!tcp(&ir, "y/a", "x/a", 80));
    }
    // Within one policy the first rule that matches decides.
    let ordered = cnp(
        "ordered",
        "Admin",
        7,
        ns_subject("x"),
        json!([
            rule("Accept", "from", from_ns("y")),
            rule("Deny", "from", every_ns())
        ]),
        json!([]),
    );
    let ir = c.compile_tiers(&[], &[ordered], &[]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "z/a", "x/a", 80));
}

#[test]
fn ports_by_number_range_and_name_and_other_protocols() {
    let c = Cluster::new();
    let p = cnp(
        "ports",
        "Admin",
        1,
        ns_subject("x"),
        json!([
            {"action": "Deny", "from": every_ns(), "protocols": [
                {"tcp": {"destinationPort": {"number": 81}}},
                {"udp": {"destinationPort": {"range": {"start": 50, "end": 60}}}},
                {"destinationNamedPort": "sctp"}]},
            {"action": "Accept", "from": every_ns()}
        ]),
        json!([]),
    );
    let np = deny_all_ingress("x");
    let ir = c.compile_tiers(&[np], &[p], &[]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "y/a", "x/a", 81));
    assert!(!can(&ir, "y/a", "x/a", UDP, 53));
    assert!(can(&ir, "y/a", "x/a", UDP, 61));
    assert!(!can(&ir, "y/a", "x/a", SCTP, 82));
    assert!(can(&ir, "y/a", "x/a", SCTP, 83));
    // ICMP has no port: the Accept rule takes it.
    assert!(can(&ir, "y/a", "x/a", ICMP, 0));
}

#[test]
fn egress_to_networks_and_nodes() {
    let c = Cluster::new();
    let node = crate::cnp::NodeAddrs {
        labels: BTreeMap::from([("role".to_string(), "infra".to_string())]),
        addrs: vec!["192.0.2.50".parse().unwrap()],
    };
    let p = cnp(
        "egress",
        "Admin",
        1,
        json!({"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}},
                        "podSelector": {"matchLabels": {"pod": "a"}}}}),
        json!([]),
        json!([
            {"action": "Deny", "to": [{"networks": ["10.244.2.0/24"]}]},
            {"action": "Deny", "to": [{"nodes": {"matchLabels": {"role": "infra"}}}]}
        ]),
    );
    let ir = c.compile_tiers(&[], &[p], &[node]);
    assert!(!tcp(&ir, "x/a", "y/b", 80));
    assert!(!tcp(&ir, "x/a", "192.0.2.50", 10250));
    assert!(tcp(&ir, "x/a", "z/b", 80));
    assert!(tcp(&ir, "x/a", "192.0.2.51", 80));
    // Only the subject.
    assert!(tcp(&ir, "x/b", "y/b", 80));
}

#[test]
fn a_peer_sluice_cannot_read_fails_closed() {
    let c = Cluster::new();
    // `domainNames` (a newer CRD's peer sluice does not implement) reads as a peer with no field.
    let unknown = json!([{"domainNames": ["example.test."]}]);
    let subject = json!({"pods": {"namespaceSelector": {"matchLabels": {"ns": "x"}},
                                  "podSelector": {"matchLabels": {"pod": "a"}}}});
    let policy = |action: &str| {
        cnp(
            "unknown-peer",
            "Admin",
            1,
            subject.clone(),
            json!([]),
            json!([{"action": action, "to": unknown.clone()}]),
        )
    };
    // Below it, an Admin Accept of everything: only what the first policy decides differs.
    let accept_rest = cnp(
        "accept-rest",
        "Admin",
        2,
        subject.clone(),
        json!([]),
        json!([rule("Accept", "to", every_ns())]),
    );
    let baseline_deny = cnp(
        "deny-all",
        "Baseline",
        1,
        subject.clone(),
        json!([]),
        json!([rule("Deny", "to", every_ns())]),
    );
    // Accept with it matches nothing: the Baseline deny below still decides.
    let ir = c.compile_tiers(&[], &[policy("Accept"), baseline_deny], &[]);
    assert!(!tcp(&ir, "x/a", "y/b", 80));
    // Deny and Pass with it deny all of the subject's egress, whatever comes after.
    for action in ["Deny", "Pass"] {
        let ir = c.compile_tiers(&[], &[policy(action), accept_rest.clone()], &[]);
        assert!(!tcp(&ir, "x/a", "y/b", 80), "{action}");
        assert!(!tcp(&ir, "x/a", "203.0.113.9", 443), "{action}");
        // Only the subject, only egress.
        assert!(tcp(&ir, "x/b", "y/b", 80), "{action}");
        assert!(tcp(&ir, "y/b", "x/a", 80), "{action}");
    }
    // Two fields in one peer are no readable peer either.
    let two = cnp(
        "two-fields",
        "Admin",
        1,
        subject.clone(),
        json!([]),
        json!([{"action": "Deny", "to": [{"namespaces": {}, "networks": ["10.0.0.0/8"]}]}]),
    );
    let ir = c.compile_tiers(&[], &[two, accept_rest], &[]);
    assert!(!tcp(&ir, "x/a", "z/c", 80));
}

#[test]
fn each_denied_flow_is_attributed_to_the_policy_that_decides_it() {
    let c = Cluster::new();
    let deny_y = cnp(
        "deny-y",
        "Admin",
        1,
        ns_subject("x"),
        json!([rule("Deny", "from", from_ns("y"))]),
        json!([]),
    );
    let deny_all = cnp(
        "deny-all",
        "Admin",
        2,
        ns_subject("x"),
        json!([rule("Deny", "from", every_ns())]),
        json!([]),
    );
    let ir = c.compile_tiers(&[], &[deny_all, deny_y], &[]);
    let xa = ir
        .pods
        .iter()
        .find(|p| p.namespace == "x" && p.name == "a")
        .unwrap();
    let by = &xa.ingress.admin.denied_by;
    let who = |from: &str| {
        by.iter()
            .find(|(_, r)| r.contains(addr(from), TCP, Some(80)))
            .map(|(n, _)| n.as_str())
    };
    // In the order the tier decides: the higher-ranked policy first, each with what it decides.
    assert_eq!(
        by.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["deny-y", "deny-all"]
    );
    assert_eq!(who("y/b"), Some("deny-y"));
    assert_eq!(who("z/c"), Some("deny-all"));
    assert!(!by[1].1.contains(addr("y/b"), TCP, Some(80)));
}

#[test]
fn named_ports_resolve_per_destination_pod() {
    let mut c = Cluster::new();
    // y/b serves "http" on 8080 instead.
    let spec = c.pod_mut("y", "b").spec.as_mut().unwrap();
    spec.containers[0].ports.as_mut().unwrap()[0].container_port = 8080;
    let p = cnp(
        "no-http-out",
        "Admin",
        1,
        ns_subject("x"),
        json!([]),
        json!([{"action": "Deny", "to": every_ns(), "protocols": [{"destinationNamedPort": "http"}]}]),
    );
    let ir = c.compile_tiers(&[], &[p], &[]);
    assert!(!tcp(&ir, "x/a", "y/a", 80));
    assert!(tcp(&ir, "x/a", "y/b", 80));
    assert!(!tcp(&ir, "x/a", "y/b", 8080));
}

#[test]
fn no_cluster_network_policy_leaves_network_policy_unchanged() {
    let c = Cluster::new();
    let nps = [
        deny_all_ingress("y"),
        allow_from("y", json!({}), from_ns_np("x"), Value::Null),
    ];
    let ir = c.compile_tiers(&nps, &[], &[]);
    assert_eq!(ir, c.compile(&nps));
    assert!(ir
        .pods
        .iter()
        .all(|p| p.ingress.admin.is_empty() && p.ingress.baseline.is_empty()));
}

#[test]
fn nine_by_nine_matrix_admin_deny_pass_and_baseline() {
    let c = Cluster::new();
    let cnps = [
        // x may not be reached from z at all.
        cnp(
            "a-deny-z",
            "Admin",
            1,
            ns_subject("x"),
            json!([rule("Deny", "from", from_ns("z"))]),
            json!([]),
        ),
        // y's own NetworkPolicies decide for traffic from x.
        cnp(
            "b-pass-x",
            "Admin",
            2,
            ns_subject("y"),
            json!([rule("Pass", "from", from_ns("x"))]),
            json!([]),
        ),
        // Default: nothing from other namespaces into y or z.
        cnp(
            "c-base",
            "Baseline",
            1,
            json!({"namespaces": {"matchExpressions": [
            {"key": "ns", "operator": "In", "values": ["y", "z"]}]}}),
            json!([
                rule(
                    "Accept",
                    "from",
                    json!([{"namespaces": {"matchLabels": {"ns": "y"}}}])
                ),
                rule("Deny", "from", every_ns())
            ]),
            json!([]),
        ),
    ];
    // y/a is isolated by a NetworkPolicy that allows x/b only.
    let nps = [allow_from(
        "y",
        json!({"matchLabels": {"pod": "a"}}),
        json!([{"namespaceSelector": {"matchLabels": {"ns": "x"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]),
        Value::Null,
    )];
    let ir = c.compile_tiers(&nps, &cnps, &[]);
    let xs = ["x/a", "x/b", "x/c"];
    let ys = ["y/a", "y/b", "y/c"];
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let expect = vec![
        // into x: everyone but z
        owned(&[xs, ys].concat()),
        owned(&[xs, ys].concat()),
        owned(&[xs, ys].concat()),
        // into y/a: its NetworkPolicy (x/b) only
        owned(&["x/b"]),
        // y/b, y/c: baseline accepts y, denies the rest
        owned(&ys),
        owned(&ys),
        // into z: baseline accepts y only
        owned(&ys),
        owned(&ys),
        owned(&ys),
    ];
    assert_eq!(matrix(&ir), expect);
}
