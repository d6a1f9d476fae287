//! One test per rule of the NetworkPolicy semantics, on the e2e suites' cluster: namespaces x, y,
//! z (label `ns`), pods a, b, c in each (label `pod`), all local, each serving TCP 80 (`http`),
//! TCP 81, UDP 53 (`dns`) and SCTP 82. Verdicts are read through [`PolicyIr::allows`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::{json, Value};

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
const HOST: &str = "192.0.2.1";
const HOST6: &str = "fd00:ff::1";

struct Cluster {
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
}

fn ip_of(ns: &str, pod: &str) -> std::net::Ipv4Addr {
    let n = match ns {
        "x" => 1,
        "y" => 2,
        _ => 3,
    };
    let p = match pod {
        "a" => 1,
        "b" => 2,
        _ => 3,
    };
    std::net::Ipv4Addr::new(10, 244, n, p)
}

/// The pod's IPv6 address: every pod of the cluster is dual-stack, `fd00:10:244:N::P`.
fn ip6_of(ns: &str, pod: &str) -> std::net::Ipv6Addr {
    let o = ip_of(ns, pod).octets();
    std::net::Ipv6Addr::new(0xfd00, 0x10, 0x244, o[2].into(), 0, 0, 0, o[3].into())
}

fn pod_json(ns: &str, name: &str, labels: Value, ports: Value) -> Value {
    json!({
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"containers": [{"name": "c", "ports": ports}]},
        "status": {"phase": "Running", "podIP": ip_of(ns, name).to_string(),
                   "podIPs": [{"ip": ip_of(ns, name).to_string()},
                              {"ip": ip6_of(ns, name).to_string()}]}
    })
}

fn default_ports() -> Value {
    json!([
        {"name": "http", "containerPort": 80},
        {"containerPort": 81},
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        {"name": "sctp", "containerPort": 82, "protocol": "SCTP"}
    ])
}

impl Cluster {
    fn new() -> Self {
        let mut pods = Vec::new();
        let mut namespaces = Vec::new();
        for ns in ["x", "y", "z"] {
            namespaces.push(
                serde_json::from_value(json!({"metadata": {"name": ns, "labels": {"ns": ns}}}))
                    .unwrap(),
            );
            for p in ["a", "b", "c"] {
                pods.push(
                    serde_json::from_value(pod_json(ns, p, json!({"pod": p}), default_ports()))
                        .unwrap(),
                );
            }
        }
        Self { pods, namespaces }
    }

    fn pod_mut(&mut self, ns: &str, name: &str) -> &mut Pod {
        self.pods
            .iter_mut()
            .find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(name)
            })
            .unwrap()
    }

    fn local(&self) -> Vec<LocalPod> {
        self.pods
            .iter()
            .filter_map(|p| {
                let ifname = format!(
                    "sl{}{}",
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?
                );
                LocalPod::from_pod(&ClusterPod::from(p), &ifname)
            })
            .collect()
    }

    fn compile(&self, policies: &[Value]) -> PolicyIr {
        self.compile_tiers(policies, &[], &[])
    }

    /// With ClusterNetworkPolicies (and nodes for egress `nodes` peers).
    fn compile_tiers(
        &self,
        policies: &[Value],
        cnps: &[Value],
        nodes: &[crate::cnp::NodeAddrs],
    ) -> PolicyIr {
        let cnps: Vec<ClusterNetworkPolicy> = cnps
            .iter()
            .map(|p| serde_json::from_value(p.clone()).unwrap())
            .collect();
        let cnps: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
        let policies: Vec<NetworkPolicy> = policies
            .iter()
            .map(|p| serde_json::from_value(p.clone()).unwrap())
            .collect();
        let host = [HOST.parse().unwrap(), HOST6.parse().unwrap()];
        let pods: Vec<Arc<ClusterPod>> = self
            .pods
            .iter()
            .map(|p| Arc::new(ClusterPod::from(p)))
            .collect();
        let namespaces: Vec<&Namespace> = self.namespaces.iter().collect();
        let policies: Vec<&NetworkPolicy> = policies.iter().collect();
        let input = PolicyInput {
            pods: &pods,
            namespaces: &namespaces,
            policies: &policies,
            host_addrs: &host,
            cluster_policies: &cnps,
            nodes,
            attribute_drops: true,
        };
        compile(&input, &self.local())
    }
}

fn np(ns: &str, name: &str, spec: Value) -> Value {
    json!({"metadata": {"namespace": ns, "name": name}, "spec": spec})
}

/// "ns/pod" → its IPv4 address, "ns/pod@6" its IPv6 one ("host", "host@6" likewise).
fn addr(who: &str) -> IpAddr {
    if let Ok(ip) = who.parse() {
        return ip;
    }
    let (who, v6) = match who.strip_suffix("@6") {
        Some(w) => (w, true),
        None => (who, false),
    };
    if who == "host" {
        return if v6 { HOST6 } else { HOST }.parse().unwrap();
    }
    let (ns, pod) = who.split_once('/').unwrap();
    if v6 {
        ip6_of(ns, pod).into()
    } else {
        ip_of(ns, pod).into()
    }
}

fn can(ir: &PolicyIr, from: &str, to: &str, proto: u8, port: u16) -> bool {
    let dport = (proto != ICMP).then_some(port);
    ir.allows(addr(from), addr(to), proto, dport)
}

fn tcp(ir: &PolicyIr, from: &str, to: &str, port: u16) -> bool {
    can(ir, from, to, TCP, port)
}

fn all_pods() -> Vec<String> {
    let mut v = Vec::new();
    for ns in ["x", "y", "z"] {
        for p in ["a", "b", "c"] {
            v.push(format!("{ns}/{p}"));
        }
    }
    v
}

/// Which of the nine pods may reach `to` on TCP `port`.
fn sources(ir: &PolicyIr, to: &str, port: u16) -> Vec<String> {
    all_pods()
        .into_iter()
        .filter(|from| tcp(ir, from, to, port))
        .collect()
}

fn deny_all_ingress(ns: &str) -> Value {
    np(
        ns,
        "deny-all",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    )
}

fn allow_from(ns: &str, selector: Value, from: Value, ports: Value) -> Value {
    let mut rule = json!({});
    if !from.is_null() {
        rule["from"] = from;
    }
    if !ports.is_null() {
        rule["ports"] = ports;
    }
    np(
        ns,
        "allow",
        json!({"podSelector": selector, "ingress": [rule]}),
    )
}

#[test]
fn without_policies_every_pod_is_open() {
    let ir = Cluster::new().compile(&[]);
    assert_eq!(ir.pods.len(), 9);
    assert!(ir
        .pods
        .iter()
        .all(|p| !p.ingress.isolated && !p.egress.isolated));
    assert!(tcp(&ir, "x/a", "y/b", 1234));
}

#[test]
fn empty_pod_selector_selects_every_pod_of_the_namespace() {
    let ir = Cluster::new().compile(&[deny_all_ingress("x")]);
    for p in &ir.pods {
        assert_eq!(p.ingress.isolated, p.namespace == "x", "{}", p.name);
        assert!(!p.egress.isolated);
    }
    assert!(!tcp(&ir, "x/b", "x/a", 80));
    assert!(tcp(&ir, "x/a", "y/a", 80));
}

#[test]
fn pod_selector_selects_matching_pods_only() {
    let ir = Cluster::new().compile(&[np(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
    )]);
    assert!(!tcp(&ir, "y/a", "x/a", 80));
    assert!(tcp(&ir, "y/a", "x/b", 80));
}

#[test]
fn pod_selector_with_match_expressions() {
    let sel = json!({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]});
    let ir = Cluster::new().compile(&[np("x", "p", json!({"podSelector": sel}))]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "y/a", "x/b", 80));
    assert!(!tcp(&ir, "y/a", "x/c", 80));
}

#[test]
fn a_policy_selects_pods_of_its_own_namespace_only() {
    let ir = Cluster::new().compile(&[np(
        "y",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}}),
    )]);
    assert!(tcp(&ir, "z/a", "x/a", 80));
    assert!(!tcp(&ir, "z/a", "y/a", 80));
}

#[test]
fn ingress_absent_denies_all_ingress() {
    let ir = Cluster::new().compile(&[np("x", "p", json!({"podSelector": {}}))]);
    assert!(sources(&ir, "x/a", 80).is_empty());
}

#[test]
fn ingress_empty_list_denies_all_ingress() {
    let ir = Cluster::new().compile(&[np("x", "p", json!({"podSelector": {}, "ingress": []}))]);
    assert!(sources(&ir, "x/a", 80).is_empty());
    assert!(ir.pods[0].ingress.isolated);
}

#[test]
fn one_empty_ingress_rule_allows_everything() {
    let ir = Cluster::new().compile(&[np("x", "p", json!({"podSelector": {}, "ingress": [{}]}))]);
    assert_eq!(sources(&ir, "x/a", 80).len(), 9);
    assert!(can(&ir, "y/a", "x/a", ICMP, 0));
    assert!(can(&ir, "203.0.113.9", "x/a", UDP, 9));
}

#[test]
fn from_absent_allows_every_source() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        Value::Null,
        json!([{"port": 80}]),
    )]);
    assert_eq!(sources(&ir, "x/a", 80).len(), 9);
    assert!(tcp(&ir, "203.0.113.9", "x/a", 80));
    assert!(sources(&ir, "x/a", 81).is_empty());
}

#[test]
fn from_empty_list_allows_every_source() {
    let ir =
        Cluster::new().compile(&[allow_from("x", json!({}), json!([]), json!([{"port": 80}]))]);
    assert_eq!(sources(&ir, "x/a", 80).len(), 9);
    assert!(tcp(&ir, "203.0.113.9", "x/a", 80));
}

#[test]
fn pod_selector_peer_means_pods_of_the_policy_namespace() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        json!([{"podSelector": {"matchLabels": {"pod": "b"}}}]),
        Value::Null,
    )]);
    assert_eq!(sources(&ir, "x/a", 80), ["x/b"]);
}

#[test]
fn empty_pod_selector_peer_means_every_pod_of_the_policy_namespace() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        json!([{"podSelector": {}}]),
        Value::Null,
    )]);
    assert_eq!(sources(&ir, "x/a", 80), ["x/a", "x/b", "x/c"]);
}

#[test]
fn namespace_selector_peer_means_every_pod_of_matching_namespaces() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]),
        Value::Null,
    )]);
    assert_eq!(sources(&ir, "x/a", 80), ["y/a", "y/b", "y/c"]);
}

#[test]
fn empty_namespace_selector_means_every_namespace() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        json!([{"namespaceSelector": {}}]),
        Value::Null,
    )]);
    assert_eq!(sources(&ir, "x/a", 80).len(), 9);
    // Pods, not the world.
    assert!(!tcp(&ir, "203.0.113.9", "x/a", 80));
}

#[test]
fn pod_and_namespace_selector_in_one_peer_are_anded() {
    let peer = json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), peer, Value::Null)]);
    assert_eq!(sources(&ir, "x/a", 80), ["y/b"]);
}

#[test]
fn separate_peers_are_ored() {
    let peers = json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}, {"podSelector": {"matchLabels": {"pod": "b"}}}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), peers, Value::Null)]);
    assert_eq!(sources(&ir, "x/a", 80), ["x/b", "y/a", "y/b", "y/c"]);
}

#[test]
fn namespaces_carry_their_name_label() {
    let peer =
        json!([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "z"}}}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), peer, Value::Null)]);
    assert_eq!(sources(&ir, "x/a", 80), ["z/a", "z/b", "z/c"]);
}

#[test]
fn ip_block_allows_its_cidr_less_excepts() {
    let peer = json!([{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.2.0/24", "10.244.3.3/32"]}}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), peer, Value::Null)]);
    assert_eq!(sources(&ir, "x/a", 80), ["x/a", "x/b", "x/c", "z/a", "z/b"]);
    assert!(!tcp(&ir, "10.0.0.1", "x/a", 80));
}

#[test]
fn ipv6_blocks_add_no_ipv4_peer_and_unparsable_ones_nothing() {
    let peers = json!([{"ipBlock": {"cidr": "fd00::/8"}}, {"ipBlock": {"cidr": "0.0.0.0/0", "except": ["bogus"]}}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), peers, Value::Null)]);
    assert!(sources(&ir, "x/a", 80).is_empty());
    // The IPv6 block is the pods' IPv6 addresses (see `tests/v6.rs`).
    assert!(tcp(&ir, "y/b@6", "x/a@6", 80));
}

#[test]
fn ports_absent_allow_every_protocol_and_port() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        json!([{"podSelector": {}}]),
        Value::Null,
    )]);
    for (proto, port) in [(TCP, 1), (UDP, 53), (SCTP, 9), (ICMP, 0)] {
        assert!(can(&ir, "x/b", "x/a", proto, port));
    }
}

#[test]
fn ports_empty_list_allows_every_port() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        json!([{"podSelector": {}}]),
        json!([]),
    )]);
    assert!(can(&ir, "x/b", "x/a", ICMP, 0));
    assert!(tcp(&ir, "x/b", "x/a", 4444));
}

#[test]
fn a_port_number_defaults_to_tcp() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        Value::Null,
        json!([{"port": 80}]),
    )]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!can(&ir, "y/a", "x/a", UDP, 80));
    assert!(!tcp(&ir, "y/a", "x/a", 81));
    assert!(!can(&ir, "y/a", "x/a", ICMP, 0));
}

#[test]
fn udp_and_sctp_ports() {
    let ports = json!([{"protocol": "UDP", "port": 53}, {"protocol": "SCTP", "port": 82}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), Value::Null, ports)]);
    assert!(can(&ir, "y/a", "x/a", UDP, 53));
    assert!(can(&ir, "y/a", "x/a", SCTP, 82));
    assert!(!tcp(&ir, "y/a", "x/a", 53));
    assert!(!can(&ir, "y/a", "x/a", SCTP, 53));
}

#[test]
fn a_port_entry_without_port_allows_every_port_of_its_protocol() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        Value::Null,
        json!([{"protocol": "UDP"}]),
    )]);
    assert!(can(&ir, "y/a", "x/a", UDP, 1));
    assert!(can(&ir, "y/a", "x/a", UDP, 65535));
    assert!(!tcp(&ir, "y/a", "x/a", 80));
}

#[test]
fn end_port_makes_a_range() {
    let ir = Cluster::new().compile(&[allow_from(
        "x",
        json!({}),
        Value::Null,
        json!([{"port": 80, "endPort": 90}]),
    )]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(tcp(&ir, "y/a", "x/a", 85));
    assert!(tcp(&ir, "y/a", "x/a", 90));
    assert!(!tcp(&ir, "y/a", "x/a", 91));
    assert!(!tcp(&ir, "y/a", "x/a", 79));
}

#[test]
fn invalid_ports_allow_nothing() {
    let ports =
        json!([{"port": 90, "endPort": 80}, {"protocol": "ICMP", "port": 1}, {"port": 70000}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), Value::Null, ports)]);
    assert!((0..=100).all(|p| !tcp(&ir, "y/a", "x/a", p)));
    assert!(!can(&ir, "y/a", "x/a", ICMP, 0));
}

#[test]
fn named_ingress_port_resolves_on_the_destination_pod() {
    let mut c = Cluster::new();
    // x/b serves "http" on 8080, x/c does not serve it at all.
    *c.pod_mut("x", "b") = serde_json::from_value(pod_json(
        "x",
        "b",
        json!({"pod": "b"}),
        json!([{"name": "http", "containerPort": 8080}]),
    ))
    .unwrap();
    *c.pod_mut("x", "c") =
        serde_json::from_value(pod_json("x", "c", json!({"pod": "c"}), json!([]))).unwrap();
    let ir = c.compile(&[allow_from(
        "x",
        json!({}),
        Value::Null,
        json!([{"port": "http"}]),
    )]);
    assert!(tcp(&ir, "y/a", "x/a", 80) && !tcp(&ir, "y/a", "x/a", 8080));
    assert!(tcp(&ir, "y/a", "x/b", 8080) && !tcp(&ir, "y/a", "x/b", 80));
    assert!(!tcp(&ir, "y/a", "x/c", 80) && !tcp(&ir, "y/a", "x/c", 8080));
}

#[test]
fn named_port_protocol_must_match() {
    let ports = json!([{"port": "dns"}, {"port": "http", "protocol": "UDP"}, {"port": "sctp", "protocol": "SCTP"}]);
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), Value::Null, ports)]);
    assert!(!tcp(&ir, "y/a", "x/a", 53));
    assert!(!can(&ir, "y/a", "x/a", UDP, 53));
    assert!(!can(&ir, "y/a", "x/a", UDP, 80));
    assert!(can(&ir, "y/a", "x/a", SCTP, 82));
}

fn egress(ns: &str, selector: Value, to: Value, ports: Value) -> Value {
    let mut rule = json!({});
    if !to.is_null() {
        rule["to"] = to;
    }
    if !ports.is_null() {
        rule["ports"] = ports;
    }
    np(
        ns,
        "egress",
        json!({"podSelector": selector, "policyTypes": ["Egress"], "egress": [rule]}),
    )
}

#[test]
fn named_egress_port_resolves_on_each_peer_pod() {
    let mut c = Cluster::new();
    *c.pod_mut("y", "b") = serde_json::from_value(pod_json(
        "y",
        "b",
        json!({"pod": "b"}),
        json!([{"name": "http", "containerPort": 8080}]),
    ))
    .unwrap();
    let ir = c.compile(&[egress(
        "x",
        json!({"matchLabels": {"pod": "a"}}),
        Value::Null,
        json!([{"port": "http"}]),
    )]);
    assert!(tcp(&ir, "x/a", "y/a", 80) && !tcp(&ir, "x/a", "y/a", 8080));
    assert!(tcp(&ir, "x/a", "y/b", 8080) && !tcp(&ir, "x/a", "y/b", 80));
    // Not a pod: a name cannot resolve.
    assert!(!tcp(&ir, "x/a", "203.0.113.9", 80));
}

#[test]
fn named_egress_port_to_an_ip_block_matches_the_pods_inside_it() {
    let to = json!([{"ipBlock": {"cidr": "10.244.2.0/24"}}]);
    let ir = Cluster::new().compile(&[egress("x", json!({}), to, json!([{"port": "http"}]))]);
    assert!(tcp(&ir, "x/a", "y/c", 80));
    assert!(!tcp(&ir, "x/a", "z/c", 80));
    assert!(!tcp(&ir, "x/a", "10.244.2.200", 80));
}

#[test]
fn policy_types_default_to_ingress_without_egress_rules() {
    let ir = Cluster::new().compile(&[np("x", "p", json!({"podSelector": {}, "egress": []}))]);
    let a = &ir.pods[0];
    assert!(a.ingress.isolated && !a.egress.isolated);
}

#[test]
fn policy_types_default_adds_egress_when_egress_rules_exist() {
    let spec = json!({"podSelector": {}, "egress": [{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]});
    let ir = Cluster::new().compile(&[np("x", "p", spec)]);
    let a = &ir.pods[0];
    assert!(a.ingress.isolated && a.egress.isolated);
    assert!(a.egress.allows(ip_of("x", "b"), TCP, Some(80)));
    assert!(!a.egress.allows(ip_of("y", "b"), TCP, Some(80)));
    // x/b's ingress is isolated by the same policy, with no ingress rule.
    assert!(!tcp(&ir, "x/a", "x/b", 80));
}

#[test]
fn egress_only_policy_leaves_ingress_open() {
    let ir = Cluster::new().compile(&[np(
        "x",
        "p",
        json!({"podSelector": {}, "policyTypes": ["Egress"]}),
    )]);
    assert!(tcp(&ir, "y/a", "x/a", 80));
    assert!(!tcp(&ir, "x/a", "y/a", 80));
    assert!(!can(&ir, "x/a", "y/a", ICMP, 0));
}

#[test]
fn egress_deny_all_still_lets_other_pods_talk() {
    let ir = Cluster::new().compile(&[np(
        "x",
        "p",
        json!({"podSelector": {"matchLabels": {"pod": "a"}}, "policyTypes": ["Egress"]}),
    )]);
    assert!(!tcp(&ir, "x/a", "x/b", 80));
    assert!(tcp(&ir, "x/b", "x/a", 80));
}

#[test]
fn policies_union() {
    let p1 = allow_from(
        "x",
        json!({}),
        json!([{"podSelector": {"matchLabels": {"pod": "b"}}}]),
        json!([{"port": 80}]),
    );
    let mut p2 = allow_from(
        "x",
        json!({"matchLabels": {"pod": "a"}}),
        json!([{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]),
        json!([{"port": 81}]),
    );
    p2["metadata"]["name"] = json!("allow-2");
    let ir = Cluster::new().compile(&[p1, p2]);
    assert_eq!(sources(&ir, "x/a", 80), ["x/b"]);
    assert_eq!(sources(&ir, "x/a", 81), ["z/a", "z/b", "z/c"]);
    assert_eq!(sources(&ir, "x/b", 81), Vec::<String>::new());
    assert_eq!(ir.pods[0].ingress.policies, ["x/allow", "x/allow-2"]);
}

#[test]
fn an_allow_policy_does_not_undo_another_namespace_deny() {
    let ir = Cluster::new().compile(&[
        deny_all_ingress("x"),
        allow_from("y", json!({}), Value::Null, Value::Null),
    ]);
    assert!(sources(&ir, "x/a", 80).is_empty());
    assert_eq!(sources(&ir, "y/a", 80).len(), 9);
}

#[test]
fn both_ends_must_allow() {
    let ir = Cluster::new().compile(&[
        np("x", "e", json!({"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": 80}]}]})),
        allow_from("y", json!({}), Value::Null, json!([{"port": 81}])),
    ]);
    assert!(!tcp(&ir, "x/a", "y/a", 80));
    assert!(!tcp(&ir, "x/a", "y/a", 81));
    assert!(tcp(&ir, "x/a", "z/a", 80));
    assert!(tcp(&ir, "z/a", "y/a", 81));
}

#[test]
fn the_node_reaches_isolated_pods_for_probes() {
    let ir = Cluster::new().compile(&[
        deny_all_ingress("x"),
        np(
            "x",
            "e",
            json!({"podSelector": {}, "policyTypes": ["Egress"]}),
        ),
    ]);
    assert!(tcp(&ir, "host", "x/a", 80));
    assert!(can(&ir, "host", "x/a", ICMP, 0));
    assert!(!tcp(&ir, "x/a", "host", 80));
}

#[test]
fn host_network_pods_are_not_selected_as_peers() {
    let mut c = Cluster::new();
    let mut v = pod_json("y", "h", json!({"pod": "b"}), json!([]));
    v["spec"]["hostNetwork"] = json!(true);
    v["status"]["podIP"] = json!("198.51.100.7");
    v["status"]["podIPs"] = json!([{"ip": "198.51.100.7"}]);
    c.pods.push(serde_json::from_value(v.clone()).unwrap());
    assert_eq!(
        LocalPod::from_pod(
            &ClusterPod::from(&serde_json::from_value::<Pod>(v).unwrap()),
            "slx"
        ),
        None
    );
    let ir = c.compile(&[allow_from(
        "x",
        json!({}),
        json!([{"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}]),
        Value::Null,
    )]);
    assert!(!tcp(&ir, "198.51.100.7", "x/a", 80));
    assert!(tcp(&ir, "y/b", "x/a", 80));
}

#[test]
fn finished_and_unaddressed_pods_are_not_peers() {
    let mut c = Cluster::new();
    c.pod_mut("y", "a").status.as_mut().unwrap().phase = Some("Succeeded".into());
    let ir = c.compile(&[allow_from(
        "x",
        json!({}),
        json!([{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]),
        Value::Null,
    )]);
    assert_eq!(sources(&ir, "x/a", 80), ["y/b", "y/c"]);
    c.pod_mut("y", "b").status = None;
    let local = c.local();
    assert_eq!(local.len(), 8);
}

#[test]
fn a_pod_label_change_moves_it_in_and_out_of_policy() {
    let mut c = Cluster::new();
    let policies = [allow_from(
        "x",
        json!({"matchLabels": {"role": "db"}}),
        json!([{"podSelector": {"matchLabels": {"role": "client"}}}]),
        Value::Null,
    )];
    assert!(tcp(&c.compile(&policies), "x/b", "x/a", 80));
    c.pod_mut("x", "a").metadata.labels = Some([("role".to_string(), "db".to_string())].into());
    assert!(!tcp(&c.compile(&policies), "x/b", "x/a", 80));
    c.pod_mut("x", "b").metadata.labels = Some([("role".to_string(), "client".to_string())].into());
    assert!(tcp(&c.compile(&policies), "x/b", "x/a", 80));
    assert!(!tcp(&c.compile(&policies), "x/c", "x/a", 80));
}

#[test]
fn a_namespace_label_change_moves_its_pods_in_and_out_of_policy() {
    let mut c = Cluster::new();
    let policies = [allow_from(
        "x",
        json!({}),
        json!([{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]),
        Value::Null,
    )];
    assert!(sources(&c.compile(&policies), "x/a", 80).is_empty());
    c.namespaces[2]
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "blue".into());
    assert_eq!(
        sources(&c.compile(&policies), "x/a", 80),
        ["z/a", "z/b", "z/c"]
    );
}

#[test]
fn a_peer_with_neither_selector_nor_block_matches_nothing() {
    let ir = Cluster::new().compile(&[allow_from("x", json!({}), json!([{}]), Value::Null)]);
    assert!(sources(&ir, "x/a", 80).is_empty());
}

#[test]
fn compile_is_deterministic_and_sorted() {
    let c = Cluster::new();
    let policies = [
        deny_all_ingress("x"),
        allow_from(
            "x",
            json!({}),
            Value::Null,
            json!([{"port": 80}, {"port": 79, "endPort": 81}]),
        ),
    ];
    let a = c.compile(&policies);
    assert_eq!(a, c.compile(&policies));
    assert!(a.pods.windows(2).all(|w| w[0].ifname < w[1].ifname));
    // Overlapping ranges merged to one disjoint entry.
    assert_eq!(a.pods[0].ingress.ports.len(), 1);
    assert_eq!(
        (
            a.pods[0].ingress.ports[0].first,
            a.pods[0].ingress.ports[0].last
        ),
        (79, 81)
    );
}

mod incremental;
mod tiers;
mod v6;
