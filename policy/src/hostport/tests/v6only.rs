//! hostPorts of an IPv6-only node's pods: entries without an IPv4 address render, check and
//! persist in IPv6 only.

use super::*;

/// A pod of an IPv6-only node: an IPv6 address and no IPv4 one.
fn entry_v6only(id: &str, pod6: &str, mappings: Vec<PortMapping>) -> HostportEntry {
    HostportEntry {
        pod_ip: None,
        ..entry6(id, "0.0.0.0", pod6, mappings)
    }
}

fn tcp_and_udp() -> Vec<PortMapping> {
    vec![
        m(8080, 80, HpProtocol::Tcp, None),
        m(8053, 53, HpProtocol::Udp, None),
        m(8081, 80, HpProtocol::Tcp, Some("fd00::1")),
    ]
}

#[test]
fn an_entry_persisted_before_ipv6_only_hostports_reads_as_it_was() {
    // As the previous version wrote them: `podIp` always there, `podIP6` on dual-stack nodes.
    let old = r#"[
        {"containerID": "a", "ifname": "eth0", "podIp": "10.244.1.2",
         "mappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]},
        {"containerID": "b", "ifname": "eth0", "podIp": "10.244.1.3", "podIP6": "fd00:244::3",
         "mappings": [{"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "fd00::1"}]}
    ]"#;
    let got: Vec<HostportEntry> = serde_json::from_str(old).unwrap();
    assert_eq!(
        got,
        vec![
            entry("a", "10.244.1.2", vec![m(8080, 80, HpProtocol::Tcp, None)]),
            entry6(
                "b",
                "10.244.1.3",
                "fd00:244::3",
                vec![m(53, 5353, HpProtocol::Udp, Some("fd00::1"))]
            ),
        ]
    );
    // And they are written back in the same shape.
    let again = serde_json::to_value(&got).unwrap();
    assert_eq!(
        again,
        serde_json::from_str::<serde_json::Value>(old).unwrap()
    );
}

#[test]
fn an_ipv6_only_entry_persists_without_an_ipv4_address() {
    let e = entry_v6only("a", "fd00:244::2", tcp_and_udp());
    let text = serde_json::to_string(&e).unwrap();
    assert!(!text.contains("podIp"), "{text}");
    assert!(text.contains(r#""podIP6":"fd00:244::2""#), "{text}");
    assert_eq!(serde_json::from_str::<HostportEntry>(&text).unwrap(), e);
}

#[test]
fn nft_maps_an_ipv6_only_pod_in_ipv6_only() {
    let entries = vec![entry_v6only("a", "fd00:244::2", tcp_and_udp())];
    let elements: Vec<String> = render_nft(&entries)
        .lines()
        .filter(|l| l.starts_with("add element"))
        .map(str::to_string)
        .collect();
    assert_eq!(
        elements,
        [
            "add element inet sluice-hostport hp_ip6 { fd00::1 . tcp . 8081 : fd00:244::2 . 80 }",
            "add element inet sluice-hostport hp_any6 { tcp . 8080 : fd00:244::2 . 80, udp . 8053 : fd00:244::2 . 53 }",
            "add element inet sluice-hostport hairpin6 { fd00:244::2 . fd00:244::2 }",
        ]
    );
    assert!(nft_elements(&entries)
        .iter()
        .all(|e| [NFT_MAP_IP6, NFT_MAP_ANY6, NFT_SET_HAIRPIN6].contains(&e.set)));
    // Beside an IPv4 pod, adding it touches only its IPv6 elements.
    let v4 = entry("b", "10.244.0.3", vec![m(9090, 90, HpProtocol::Tcp, None)]);
    let delta = nft_delta(
        std::slice::from_ref(&v4),
        &upsert(std::slice::from_ref(&v4), entries[0].clone()),
    )
    .unwrap();
    assert!(!delta.contains("delete"), "{delta}");
    assert!(
        delta
            .lines()
            .all(|l| l.contains(" hp_ip6 ") || l.contains(" hp_any6 ") || l.contains(" hairpin6 ")),
        "{delta}"
    );
}

#[test]
fn iptables_gets_nothing_of_an_ipv6_only_pod_and_ip6tables_its_rules() {
    let entries = vec![entry_v6only("a", "fd00:244::2", tcp_and_udp())];
    assert!(!has_v4(&entries) && has_v6(&entries));
    let v4 = render_iptables(&entries);
    assert!(!v4.contains("DNAT --to") && !v4.contains("fd00"), "{v4}");
    let want = "\
*nat
:SLUICE-HP - [0:0]
:SLUICE-HP-POST - [0:0]
-A SLUICE-HP -d ::1/128 -j RETURN
-A SLUICE-HP -d fd00::1/128 -p tcp -m tcp --dport 8081 -j DNAT --to-destination [fd00:244::2]:80
-A SLUICE-HP -p udp -m udp --dport 8053 -j DNAT --to-destination [fd00:244::2]:53
-A SLUICE-HP -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:244::2]:80
-A SLUICE-HP-POST -s fd00:244::2/128 -d fd00:244::2/128 -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
";
    assert_eq!(render_ip6tables(&entries), want);
    // A dual-stack pod whose mappings are all on an IPv6 hostIP has no IPv4 rule either.
    let v6_host_ip = entry6(
        "b",
        "10.244.0.3",
        "fd00:244::3",
        vec![m(8082, 80, HpProtocol::Tcp, Some("fd00::1"))],
    );
    assert!(!has_v4(std::slice::from_ref(&v6_host_ip)));
    assert!(has_v4(&[entry(
        "c",
        "10.244.0.4",
        tcp_and_udp()[..2].to_vec()
    )]));
}

#[test]
fn check_of_an_ipv6_only_pod_looks_in_ip6tables_and_nft_only() {
    let a = entry_v6only("a", "fd00:244::2", tcp_and_udp());
    // Nothing in iptables is needed, not even the jumps: an empty listing misses nothing.
    assert_eq!(
        missing_rules(Listing::Iptables, "", &a),
        Vec::<String>::new()
    );
    let mut save = render_ip6tables(std::slice::from_ref(&a));
    for (chain, spec) in iptables_jumps() {
        save.push_str(&format!("-A {chain} {}\n", spec.join(" ")));
    }
    assert_eq!(
        missing_rules(Listing::Ip6tables, &save, &a),
        Vec::<String>::new()
    );
    let rule = "-A SLUICE-HP -p udp -m udp --dport 8053 -j DNAT --to-destination [fd00:244::2]:53";
    assert_eq!(
        missing_rules(
            Listing::Ip6tables,
            &save.replace(&format!("{rule}\n"), ""),
            &a
        ),
        vec![rule]
    );
    // In nft: its IPv6 elements, and no IPv4 one.
    let missing = missing_rules(Listing::Nft, "", &a);
    assert_eq!(missing.len(), NFT_RULES.len() + 4, "{missing:?}");
    assert!(
        missing
            .iter()
            .filter(|r| r.contains(" element "))
            .all(|r| r.starts_with("hp_ip6 ")
                || r.starts_with("hp_any6 ")
                || r.starts_with("hairpin6 ")),
        "{missing:?}"
    );
}

#[test]
fn an_ipv4_host_ip_on_an_ipv6_only_node_is_refused() {
    let ms = vec![
        m(80, 80, HpProtocol::Tcp, None),
        m(81, 80, HpProtocol::Tcp, Some("fd00::1")),
        m(82, 80, HpProtocol::Udp, Some("10.0.0.1")),
    ];
    check_families(&ms[..2], false, true).unwrap();
    let e = check_families(&ms, false, true).unwrap_err();
    assert_eq!(
        e,
        HostportError::NoIpv4 {
            index: 2,
            host_ip: "10.0.0.1".parse().unwrap()
        }
    );
    assert!(
        e.to_string().contains("10.0.0.1") && e.to_string().contains("IPv6-only"),
        "{e}"
    );
}

#[test]
fn ipv6_only_pods_conflict_on_the_same_host_socket() {
    let held = vec![entry_v6only("a", "fd00:244::2", tcp_and_udp())];
    let e = admit(
        &held,
        &entry_v6only("b", "fd00:244::3", vec![m(8053, 53, HpProtocol::Udp, None)]),
    )
    .unwrap_err();
    assert!(
        matches!(e, HostportError::Conflict { ref holder, host_port: 8053, .. } if holder == "a"),
        "{e}"
    );
    admit(
        &held,
        &entry_v6only("b", "fd00:244::3", vec![m(8053, 53, HpProtocol::Tcp, None)]),
    )
    .unwrap();
}
