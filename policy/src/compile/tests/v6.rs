//! Both families: every pod of the test cluster has an IPv4 and an IPv6 address; an `ipBlock`
//! (and a ClusterNetworkPolicy's `networks`) names addresses of its own family only, pods are
//! peers by both of their addresses.

use super::*;

fn xa_from(from: Value) -> Value {
    allow_from("x", json!({"matchLabels": {"pod": "a"}}), from, Value::Null)
}

fn block(cidr: &str, except: &[String]) -> Value {
    json!({"ipBlock": {"cidr": cidr, "except": except}})
}

#[test]
fn an_ipv6_ip_block_with_excepts_allows_exactly_its_addresses() {
    let c = Cluster::new();
    let yb = format!("{}/128", ip6_of("y", "b"));
    let ir = c.compile(&[xa_from(json!([block(
        "fd00:10:244::/56",
        &[yb, "fd00:10:244:3::/64".into()]
    )]))]);
    assert!(tcp(&ir, "x/b@6", "x/a@6", 80));
    assert!(tcp(&ir, "y/c@6", "x/a@6", 80));
    assert!(!tcp(&ir, "y/b@6", "x/a@6", 80), "the /128 except");
    assert!(!tcp(&ir, "z/a@6", "x/a@6", 80), "the /64 except");
    assert!(!tcp(&ir, "fd00:99::1", "x/a@6", 80), "outside the block");
    // The block names no IPv4 address: x/a is isolated, and its IPv4 peers are refused.
    for from in ["x/b", "y/c", "z/a"] {
        assert!(!tcp(&ir, from, "x/a", 80), "{from} over IPv4");
    }
    // The node itself reaches it over both families (kubelet probes).
    assert!(tcp(&ir, "host", "x/a", 80) && tcp(&ir, "host@6", "x/a@6", 80));
    // The IR holds the IPv6 peers as ranges of their own, and both of x/a's addresses.
    let xa = ir.pod_by_ip(addr("x/a@6")).unwrap();
    assert_eq!(xa.ips, [addr("x/a"), addr("x/a@6")]);
    let cidrs: Vec<String> = xa
        .ingress
        .all_ports
        .cidrs6()
        .iter()
        .map(|c| c.to_string())
        .collect();
    // x's and y's /64 but y/b's /128, not z's /64, and the node's own address.
    for want in ["fd00:10:244::/63", "fd00:10:244:2::3/128", "fd00:ff::1/128"] {
        assert!(cidrs.contains(&want.to_string()), "{want} in {cidrs:?}");
    }
    assert!(
        !cidrs.contains(&"fd00:10:244:2::2/128".to_string()),
        "{cidrs:?}"
    );
    assert!(
        !cidrs.iter().any(|c| c.starts_with("fd00:10:244:3:")),
        "{cidrs:?}"
    );
}

#[test]
fn a_block_of_each_family_in_one_rule_matches_its_own_family_only() {
    let c = Cluster::new();
    let ir = c.compile(&[xa_from(json!([
        block("10.244.2.0/24", &[]),
        block("fd00:10:244:3::/64", &[])
    ]))]);
    assert!(tcp(&ir, "y/b", "x/a", 80));
    assert!(!tcp(&ir, "y/b@6", "x/a@6", 80));
    assert!(tcp(&ir, "z/b@6", "x/a@6", 80));
    assert!(!tcp(&ir, "z/b", "x/a", 80));
    // Every address of one family is none of the other.
    let v4_all = c.compile(&[xa_from(json!([block("0.0.0.0/0", &[])]))]);
    assert!(tcp(&v4_all, "y/b", "x/a", 80) && tcp(&v4_all, "203.0.113.9", "x/a", 80));
    assert!(!tcp(&v4_all, "y/b@6", "x/a@6", 80) && !tcp(&v4_all, "2001:db8::9", "x/a@6", 80));
    let v6_all = c.compile(&[xa_from(json!([block("::/0", &[])]))]);
    assert!(tcp(&v6_all, "y/b@6", "x/a@6", 80) && tcp(&v6_all, "2001:db8::9", "x/a@6", 80));
    assert!(!tcp(&v6_all, "y/b", "x/a", 80));
    // An empty `from` is every peer of both families.
    let open = c.compile(&[xa_from(Value::Null)]);
    assert!(tcp(&open, "2001:db8::9", "x/a@6", 80) && tcp(&open, "203.0.113.9", "x/a", 80));
}

#[test]
fn an_except_of_the_other_family_or_unparsable_makes_the_block_match_nothing() {
    let c = Cluster::new();
    for except in ["10.244.2.2/32", "fd00::zz/128"] {
        let ir = c.compile(&[xa_from(json!([block(
            "fd00:10:244::/56",
            &[except.to_string()]
        )]))]);
        assert!(!tcp(&ir, "x/b@6", "x/a@6", 80), "{except}");
        assert!(!tcp(&ir, "x/b", "x/a", 80), "{except}");
    }
    // A host address in a block is the /128 it names.
    let ir = c.compile(&[xa_from(json!([block(&ip6_of("x", "b").to_string(), &[])]))]);
    assert!(
        !tcp(&ir, "x/b@6", "x/a@6", 80),
        "no prefix length: not a CIDR the API takes"
    );
    let ir = c.compile(&[xa_from(json!([block(
        &format!("{}/128", ip6_of("x", "b")),
        &[]
    )]))]);
    assert!(tcp(&ir, "x/b@6", "x/a@6", 80) && !tcp(&ir, "x/c@6", "x/a@6", 80));
}

#[test]
fn selected_pods_are_peers_by_both_addresses_on_ports_and_in_egress() {
    let c = Cluster::new();
    let ingress = allow_from(
        "x",
        json!({"matchLabels": {"pod": "a"}}),
        json!([{"podSelector": {"matchLabels": {"pod": "b"}}}]),
        json!([{"port": "http"}, {"protocol": "UDP", "port": 53}]),
    );
    let egress = np(
        "x",
        "egress",
        json!({"podSelector": {"matchLabels": {"pod": "c"}}, "policyTypes": ["Egress"],
               "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                           "ports": [{"port": "http"}]}]}),
    );
    let ir = c.compile(&[ingress, egress]);
    for v6 in ["", "@6"] {
        let (xa, xb, xc) = (format!("x/a{v6}"), format!("x/b{v6}"), format!("x/c{v6}"));
        assert!(tcp(&ir, &xb, &xa, 80), "{v6}");
        assert!(!tcp(&ir, &xb, &xa, 81), "{v6}");
        assert!(can(&ir, &xb, &xa, UDP, 53), "{v6}");
        assert!(!tcp(&ir, &xc, &xa, 80), "{v6}");
        // x/c's egress: to ns=y on the named port, resolved on each peer.
        assert!(tcp(&ir, &xc, &format!("y/a{v6}"), 80), "{v6}");
        assert!(!tcp(&ir, &xc, &format!("y/a{v6}"), 81), "{v6}");
        assert!(!tcp(&ir, &xc, &format!("z/a{v6}"), 80), "{v6}");
    }
    // A flow never mixes families: x/b's IPv4 address is not a peer of x/a's IPv6 one.
    assert!(!xa_ingress(&ir).all_ports.contains(addr("x/b")));
    assert!(xa_ingress(&ir).ports[0].addrs.contains(addr("x/b@6")));
}

fn xa_ingress(ir: &PolicyIr) -> &Direction {
    &ir.pod_by_ip(addr("x/a")).unwrap().ingress
}

#[test]
fn cluster_network_policy_networks_of_ipv6() {
    let c = Cluster::new();
    let p = json!({
        "metadata": {"name": "deny-v6"},
        "spec": {"tier": "Admin", "priority": 1,
                 "subject": {"namespaces": {"matchLabels": {"ns": "x"}}},
                 "egress": [{"action": "Deny",
                             "to": [{"networks": [format!("{}/128", ip6_of("y", "b")),
                                                  "10.244.3.0/24"]}]}]}
    });
    let ir = c.compile_tiers(&[], &[p], &[]);
    assert!(!tcp(&ir, "x/a@6", "y/b@6", 80));
    assert!(
        tcp(&ir, "x/a", "y/b", 80),
        "the IPv6 network is no IPv4 one"
    );
    assert!(tcp(&ir, "x/a@6", "y/c@6", 80));
    assert!(!tcp(&ir, "x/a", "z/c", 80));
    assert!(
        tcp(&ir, "x/a@6", "z/c@6", 80),
        "the IPv4 network is no IPv6 one"
    );
}
