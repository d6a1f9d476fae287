use super::*;
use serde_json::json;

fn m(host_port: u16, container_port: u16, protocol: HpProtocol, ip: Option<&str>) -> PortMapping {
    PortMapping::new(
        protocol,
        host_port,
        container_port,
        ip.map(|a| a.parse().unwrap()),
    )
}

fn entry(id: &str, pod: &str, mappings: Vec<PortMapping>) -> HostportEntry {
    HostportEntry {
        container_id: id.into(),
        ifname: "eth0".into(),
        pod_ip: Some(pod.parse().unwrap()),
        pod_ip6: None,
        mappings,
    }
}

#[test]
fn parses_the_runtime_shape_with_defaults() {
    let v = json!([
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"hostPort": 53, "containerPort": 5353, "protocol": "UDP", "hostIP": "10.0.0.1"},
        {"hostPort": 9, "containerPort": 9, "protocol": "sctp", "hostIP": "0.0.0.0"},
        {"hostPort": 7, "containerPort": 7, "hostIP": ""}
    ]);
    let got = parse_mappings(Some(&v)).unwrap();
    assert_eq!(
        got,
        vec![
            m(7, 7, HpProtocol::Tcp, None),
            m(9, 9, HpProtocol::Sctp, None),
            m(53, 5353, HpProtocol::Udp, Some("10.0.0.1")),
            m(8080, 80, HpProtocol::Tcp, None),
        ]
    );
    assert_eq!(parse_mappings(None).unwrap(), vec![]);
    assert_eq!(parse_mappings(Some(&Value::Null)).unwrap(), vec![]);
}

#[test]
fn refuses_bad_input_with_the_entry_and_reason() {
    let cases = [
        (json!({"a": 1}), "must be a list"),
        (
            json!([{"hostPort": 0, "containerPort": 80}]),
            "hostPort 0 is not within",
        ),
        (
            json!([{"hostPort": 65536, "containerPort": 80}]),
            "hostPort 65536",
        ),
        (
            json!([{"hostPort": 80, "containerPort": -1}]),
            "containerPort -1",
        ),
        (json!([{"hostPort": 80}]), "containerPort is missing"),
        (
            json!([{"hostPort": "80", "containerPort": 80}]),
            "hostPort is missing or not an integer",
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
            "\"icmp\" is not TCP, UDP or SCTP",
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80, "hostIP": "fe80::1"}]),
            "\"fe80::1\" is link-local",
        ),
        (
            json!([{"hostPort": 80, "containerPort": 80, "hostIP": "10.0.0.300"}]),
            "\"10.0.0.300\" is not an IP address",
        ),
        (json!([1]), "not an object"),
        (
            json!([{"hostPort": 80, "containerPort": 80}, {"hostPort": 80, "containerPort": 81, "hostIP": "10.0.0.1"}]),
            "mapped twice",
        ),
    ];
    for (v, want) in cases {
        let e = parse_mappings(Some(&v)).unwrap_err().to_string();
        assert!(e.contains(want), "{v}: {e}");
    }
}

#[test]
fn same_port_other_protocol_or_other_host_ip_is_no_conflict() {
    let held = vec![entry(
        "a",
        "10.244.0.2",
        vec![m(80, 80, HpProtocol::Tcp, Some("10.0.0.1"))],
    )];
    admit(
        &held,
        &entry("b", "10.244.0.3", vec![m(80, 80, HpProtocol::Udp, None)]),
    )
    .unwrap();
    admit(
        &held,
        &entry(
            "b",
            "10.244.0.3",
            vec![m(80, 80, HpProtocol::Tcp, Some("10.0.0.2"))],
        ),
    )
    .unwrap();
    admit(
        &held,
        &entry("b", "10.244.0.3", vec![m(81, 80, HpProtocol::Tcp, None)]),
    )
    .unwrap();
    // The same attachment again (a repeated ADD) replaces its own entry.
    admit(
        &held,
        &entry("a", "10.244.0.2", vec![m(80, 80, HpProtocol::Tcp, None)]),
    )
    .unwrap();
}

#[test]
fn a_held_host_socket_is_refused_naming_the_holder() {
    let held = vec![entry(
        "a",
        "10.244.0.2",
        vec![m(80, 80, HpProtocol::Tcp, Some("10.0.0.1"))],
    )];
    for ip in [None, Some("10.0.0.1")] {
        let e = admit(
            &held,
            &entry("b", "10.244.0.3", vec![m(80, 90, HpProtocol::Tcp, ip)]),
        )
        .unwrap_err();
        assert!(
            matches!(&e, HostportError::Conflict { holder, host_port: 80, .. } if holder == "a"),
            "{e}"
        );
    }
    let any = vec![entry(
        "a",
        "10.244.0.2",
        vec![m(80, 80, HpProtocol::Sctp, None)],
    )];
    assert!(admit(
        &any,
        &entry(
            "b",
            "10.244.0.3",
            vec![m(80, 80, HpProtocol::Sctp, Some("10.0.0.9"))]
        )
    )
    .is_err());
}

#[test]
fn upsert_and_remove_touch_only_that_attachment() {
    let a = entry("a", "10.244.0.2", vec![m(80, 80, HpProtocol::Tcp, None)]);
    let b = entry("b", "10.244.0.3", vec![m(81, 80, HpProtocol::Tcp, None)]);
    let both = upsert(&upsert(&[], b.clone()), a.clone());
    assert_eq!(both, vec![a.clone(), b.clone()]);
    assert_eq!(remove(&both, "a", "eth0"), vec![b.clone()]);
    assert_eq!(remove(&both, "a", "eth1"), both);
    assert_eq!(upsert(&both, entry("a", "10.244.0.2", vec![])), vec![b]);
}

#[test]
fn nft_renders_dnat_for_each_case_and_hairpin_and_loopback_masquerade() {
    let entries = vec![
        entry(
            "a",
            "10.244.0.2",
            vec![
                m(8080, 80, HpProtocol::Tcp, None),
                m(5353, 53, HpProtocol::Udp, Some("10.0.0.1")),
            ],
        ),
        entry("b", "10.244.0.3", vec![m(9999, 9, HpProtocol::Sctp, None)]),
    ];
    let want = "\
table inet sluice-hostport {}
delete table inet sluice-hostport
table inet sluice-hostport {
  map hp_ip { type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }
  map hp_any { type inet_proto . inet_service : ipv4_addr . inet_service; }
  set hairpin { type ipv4_addr . ipv4_addr; }
  map hp_ip6 { type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; }
  map hp_any6 { type inet_proto . inet_service : ipv6_addr . inet_service; }
  set hairpin6 { type ipv6_addr . ipv6_addr; }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local jump hostports
  }
  chain output {
    type nat hook output priority -100; policy accept;
    fib daddr type local jump hostports
  }
  chain hostports {
    ip6 daddr ::1 return
    dnat ip to ip daddr . meta l4proto . th dport map @hp_ip
    dnat ip to meta l4proto . th dport map @hp_any
    dnat ip6 to ip6 daddr . meta l4proto . th dport map @hp_ip6
    dnat ip6 to meta l4proto . th dport map @hp_any6
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat ip saddr 127.0.0.0/8 masquerade
    ct status dnat ip saddr . ip daddr @hairpin masquerade
    ct status dnat ip6 saddr . ip6 daddr @hairpin6 masquerade
  }
}
add element inet sluice-hostport hp_ip { 10.0.0.1 . udp . 5353 : 10.244.0.2 . 53 }
add element inet sluice-hostport hp_any { sctp . 9999 : 10.244.0.3 . 9, tcp . 8080 : 10.244.0.2 . 80 }
add element inet sluice-hostport hairpin { 10.244.0.2 . 10.244.0.2, 10.244.0.3 . 10.244.0.3 }
";
    assert_eq!(render_nft(&entries), want);
}

#[test]
fn nft_with_no_mappings_only_removes_the_table() {
    assert_eq!(
        render_nft(&[entry("a", "10.244.0.2", vec![])]),
        "table inet sluice-hostport {}\ndelete table inet sluice-hostport\n"
    );
}

#[test]
fn iptables_renders_the_same_rules_in_sluice_chains() {
    let entries = vec![
        entry(
            "a",
            "10.244.0.2",
            vec![
                m(8080, 80, HpProtocol::Tcp, None),
                m(5353, 53, HpProtocol::Udp, Some("10.0.0.1")),
            ],
        ),
        entry("b", "10.244.0.3", vec![m(9999, 9, HpProtocol::Sctp, None)]),
    ];
    let want = "\
*nat
:SLUICE-HP - [0:0]
:SLUICE-HP-POST - [0:0]
-A SLUICE-HP -d 10.0.0.1/32 -p udp -m udp --dport 5353 -j DNAT --to-destination 10.244.0.2:53
-A SLUICE-HP -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.0.2:80
-A SLUICE-HP -p sctp -m sctp --dport 9999 -j DNAT --to-destination 10.244.0.3:9
-A SLUICE-HP-POST -s 127.0.0.0/8 -m conntrack --ctstate DNAT -j MASQUERADE
-A SLUICE-HP-POST -s 10.244.0.2/32 -d 10.244.0.2/32 -m conntrack --ctstate DNAT -j MASQUERADE
-A SLUICE-HP-POST -s 10.244.0.3/32 -d 10.244.0.3/32 -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
";
    assert_eq!(render_iptables(&entries), want);
    let jumps = iptables_jumps();
    assert_eq!(jumps.len(), 3);
    assert!(jumps
        .iter()
        .all(|(_, spec)| spec.last() == Some(&IPT_CHAIN) || spec.last() == Some(&IPT_POST_CHAIN)));
}

#[test]
fn gc_keeps_only_the_valid_attachments() {
    let a = entry("a", "10.244.0.2", vec![m(80, 80, HpProtocol::Tcp, None)]);
    let b = entry("b", "10.244.0.3", vec![m(81, 80, HpProtocol::Tcp, None)]);
    let valid = vec![
        ("b".to_string(), "eth0".to_string()),
        ("a".to_string(), "net1".to_string()),
    ];
    assert_eq!(retain_valid(&[a, b.clone()], &valid), vec![b]);
    assert_eq!(retain_valid(&[], &valid), vec![]);
}

#[test]
fn check_finds_the_missing_rules_of_one_attachment_in_either_listing() {
    let a = entry(
        "a",
        "10.244.0.2",
        vec![
            m(8080, 80, HpProtocol::Tcp, None),
            m(5353, 53, HpProtocol::Udp, Some("10.0.0.1")),
        ],
    );
    let b = entry("b", "10.244.0.3", vec![m(9999, 9, HpProtocol::Sctp, None)]);
    // What `nft list table` prints: rules one a line, elements listed in braces (here wrapped
    // as nft wraps long lists).
    let listing = |entries: &[HostportEntry]| {
        let mut l = String::from("table inet sluice-hostport {\n");
        for r in NFT_RULES {
            l.push_str(&format!("\t\t{r}\n"));
        }
        for set in [NFT_MAP_IP, NFT_MAP_ANY, NFT_SET_HAIRPIN] {
            let els: Vec<String> = nft_elements(entries)
                .iter()
                .filter(|e| e.set == set)
                .map(NftElement::text)
                .collect();
            if !els.is_empty() {
                l.push_str(&format!(
                    "\t\telements = {{ {} }}\n",
                    els.join(",\n\t\t\t     ")
                ));
            }
        }
        l + "}\n"
    };
    let both = listing(&[a.clone(), b.clone()]);
    assert_eq!(missing_rules(Listing::Nft, &both, &a), Vec::<String>::new());
    assert_eq!(missing_rules(Listing::Nft, &both, &b), Vec::<String>::new());
    assert_eq!(
        missing_rules(Listing::Nft, &listing(std::slice::from_ref(&a)), &b),
        vec![
            "hairpin element 10.244.0.3 . 10.244.0.3".to_string(),
            "hp_any element sctp . 9999 : 10.244.0.3 . 9".into(),
        ]
    );
    // A hostIP mapping's element does not stand in for the same port on every address.
    let any = entry("c", "10.244.0.2", vec![m(5353, 53, HpProtocol::Udp, None)]);
    assert_eq!(
        missing_rules(Listing::Nft, &both, &any),
        vec!["hp_any element udp . 5353 : 10.244.0.2 . 53".to_string()]
    );
    // No table at all: the rules are reported too.
    assert_eq!(
        missing_rules(Listing::Nft, "", &a).len(),
        NFT_RULES.len() + 3
    );

    let mut save = render_iptables(&[a.clone(), b.clone()]);
    assert_eq!(
        missing_rules(Listing::Iptables, &save, &a).len(),
        3,
        "no jumps yet"
    );
    for (chain, spec) in iptables_jumps() {
        save.push_str(&format!("-A {chain} {}\n", spec.join(" ")));
    }
    assert_eq!(
        missing_rules(Listing::Iptables, &save, &a),
        Vec::<String>::new()
    );
    let save = save.replace(
        "-A SLUICE-HP -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.0.2:80\n",
        "",
    );
    assert_eq!(
        missing_rules(Listing::Iptables, &save, &a),
        vec!["-A SLUICE-HP -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.0.2:80"]
    );
    assert_eq!(
        missing_rules(Listing::Iptables, &save, &b),
        Vec::<String>::new()
    );
}

#[test]
fn nft_delta_touches_only_what_differs() {
    let a = entry("a", "10.244.0.2", vec![m(8080, 80, HpProtocol::Tcp, None)]);
    let b = entry(
        "b",
        "10.244.0.3",
        vec![m(53, 5353, HpProtocol::Udp, Some("10.0.0.1"))],
    );
    assert_eq!(
        nft_delta(std::slice::from_ref(&a), std::slice::from_ref(&a)),
        None
    );
    assert_eq!(
        nft_delta(std::slice::from_ref(&a), &[a.clone(), b.clone()]).unwrap(),
        "add element inet sluice-hostport hp_ip { 10.0.0.1 . udp . 53 : 10.244.0.3 . 5353 }\n\
         add element inet sluice-hostport hairpin { 10.244.0.3 . 10.244.0.3 }\n"
    );
    assert_eq!(
        nft_delta(&[a.clone(), b.clone()], std::slice::from_ref(&b)).unwrap(),
        "delete element inet sluice-hostport hp_any { tcp . 8080 }\n\
         delete element inet sluice-hostport hairpin { 10.244.0.2 . 10.244.0.2 }\n"
    );
    // The same hostPort to another container port: deleted by key, added again.
    let a2 = entry("a", "10.244.0.2", vec![m(8080, 81, HpProtocol::Tcp, None)]);
    assert_eq!(
        nft_delta(std::slice::from_ref(&a), std::slice::from_ref(&a2)).unwrap(),
        "delete element inet sluice-hostport hp_any { tcp . 8080 }\n\
         add element inet sluice-hostport hp_any { tcp . 8080 : 10.244.0.2 . 81 }\n"
    );
}

/// Applies `delta` to `elements` as nftables would (a delete of a missing key or an add of a
/// present one fails the transaction).
fn apply_delta(
    elements: &BTreeSet<NftElement>,
    delta: &str,
) -> Result<BTreeSet<(String, String, Option<String>)>, String> {
    let mut now: std::collections::BTreeMap<(String, String), Option<String>> = elements
        .iter()
        .map(|e| ((e.set.to_string(), e.key.clone()), e.value.clone()))
        .collect();
    for line in delta.lines() {
        let (verb, rest) = line.split_once(" element inet sluice-hostport ").unwrap();
        let (set, list) = rest.split_once(' ').unwrap();
        let list = list.trim_start_matches("{ ").trim_end_matches(" }");
        for item in list.split(", ") {
            let (key, value) = match item.split_once(" : ") {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (item.to_string(), None),
            };
            let k = (set.to_string(), key);
            match verb {
                "delete" => {
                    now.remove(&k).ok_or(format!("delete of missing {k:?}"))?;
                }
                "add" => {
                    if now.insert(k.clone(), value).is_some() {
                        return Err(format!("add of present {k:?}"));
                    }
                }
                other => return Err(format!("verb {other}")),
            }
        }
    }
    Ok(now.into_iter().map(|((s, k), v)| (s, k, v)).collect())
}

#[test]
fn nft_delta_takes_every_before_to_its_after() {
    let universe = [
        entry("a", "10.244.0.2", vec![m(8080, 80, HpProtocol::Tcp, None)]),
        entry("a", "10.244.0.2", vec![m(8080, 81, HpProtocol::Tcp, None)]),
        entry(
            "b",
            "10.244.0.3",
            vec![
                m(53, 53, HpProtocol::Udp, Some("10.0.0.1")),
                m(9, 9, HpProtocol::Sctp, None),
            ],
        ),
        entry("c", "10.244.0.4", vec![m(8081, 80, HpProtocol::Tcp, None)]),
        entry("c", "10.244.0.5", vec![m(8081, 80, HpProtocol::Tcp, None)]),
    ];
    // Every pair of subsets of the universe that hold each attachment at most once.
    let subsets: Vec<Vec<HostportEntry>> = (0u32..32)
        .map(|bits| {
            let mut out: Vec<HostportEntry> = Vec::new();
            for (i, e) in universe.iter().enumerate() {
                if bits & (1 << i) != 0 {
                    out = upsert(&out, e.clone());
                }
            }
            out
        })
        .collect();
    let mut checked = 0;
    for before in &subsets {
        for after in &subsets {
            let want: BTreeSet<(String, String, Option<String>)> = nft_elements(after)
                .into_iter()
                .map(|e| (e.set.to_string(), e.key, e.value))
                .collect();
            match nft_delta(before, after) {
                None => assert_eq!(nft_elements(before), nft_elements(after)),
                Some(delta) => {
                    let got = apply_delta(&nft_elements(before), &delta)
                        .unwrap_or_else(|e| panic!("{e}\n{delta}"));
                    assert_eq!(got, want, "{before:?} -> {after:?}\n{delta}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500, "{checked}");
}

fn entry6(id: &str, pod: &str, pod6: &str, mappings: Vec<PortMapping>) -> HostportEntry {
    HostportEntry {
        pod_ip6: Some(pod6.parse().unwrap()),
        ..entry(id, pod, mappings)
    }
}

#[test]
fn parses_ipv6_host_ips_and_their_unspecified_and_mapped_forms() {
    let v = json!([
        {"hostPort": 8080, "containerPort": 80, "hostIP": "fd00:10::1"},
        {"hostPort": 8081, "containerPort": 80, "hostIP": "::"},
        {"hostPort": 8082, "containerPort": 80, "hostIP": "::ffff:10.0.0.1"},
        {"hostPort": 8080, "containerPort": 81, "hostIP": "10.0.0.1"}
    ]);
    let got = parse_mappings(Some(&v)).unwrap();
    assert_eq!(
        got,
        vec![
            m(8080, 80, HpProtocol::Tcp, Some("fd00:10::1")),
            m(8080, 81, HpProtocol::Tcp, Some("10.0.0.1")),
            m(8081, 80, HpProtocol::Tcp, None),
            m(8082, 80, HpProtocol::Tcp, Some("10.0.0.1")),
        ]
    );
    let (v4, v6): (Vec<bool>, Vec<bool>) = got.iter().map(|m| (m.v4(), m.v6())).unzip();
    assert_eq!(v4, [false, true, true, true]);
    assert_eq!(v6, [true, false, true, false]);
    // The same port on every address collides with an IPv6 hostIP too.
    let e = parse_mappings(Some(&json!([
        {"hostPort": 80, "containerPort": 80},
        {"hostPort": 80, "containerPort": 81, "hostIP": "fd00::1"}
    ])))
    .unwrap_err();
    assert!(e.to_string().contains("mapped twice"), "{e}");
}

#[test]
fn an_ipv6_host_ip_needs_a_pod_with_an_ipv6_address() {
    let ms = vec![
        m(80, 80, HpProtocol::Tcp, None),
        m(81, 80, HpProtocol::Tcp, Some("10.0.0.1")),
        m(82, 80, HpProtocol::Tcp, Some("fd00::1")),
    ];
    check_families(&ms, true, true).unwrap();
    check_families(&ms[..2], true, false).unwrap();
    let e = check_families(&ms, true, false).unwrap_err();
    assert_eq!(
        e,
        HostportError::NoIpv6 {
            index: 2,
            host_ip: "fd00::1".parse().unwrap()
        }
    );
    assert!(e.to_string().contains("fd00::1"), "{e}");
}

#[test]
fn conflicts_are_per_family_of_host_ip() {
    let held = vec![entry6(
        "a",
        "10.244.0.2",
        "fd00:244::2",
        vec![m(8080, 80, HpProtocol::Tcp, Some("fd00::1"))],
    )];
    // Another address of the same family, or an IPv4 address: no conflict.
    for ip in ["fd00::2", "10.0.0.1"] {
        admit(
            &held,
            &entry(
                "b",
                "10.244.0.3",
                vec![m(8080, 80, HpProtocol::Tcp, Some(ip))],
            ),
        )
        .unwrap();
    }
    // Every address includes the IPv6 one.
    let e = admit(
        &held,
        &entry("b", "10.244.0.3", vec![m(8080, 80, HpProtocol::Tcp, None)]),
    )
    .unwrap_err();
    assert!(
        matches!(e, HostportError::Conflict { ref holder, .. } if holder == "a"),
        "{e}"
    );
}

#[test]
fn nft_maps_a_dual_stack_pod_in_each_family_its_mappings_apply_to() {
    let entries = vec![
        entry6(
            "a",
            "10.244.0.2",
            "fd00:244::2",
            vec![
                m(8080, 80, HpProtocol::Tcp, None),
                m(5353, 53, HpProtocol::Udp, Some("10.0.0.1")),
                m(5354, 53, HpProtocol::Udp, Some("fd00::1")),
            ],
        ),
        // IPv6 hostIP only: no IPv4 rule, so no IPv4 hairpin either.
        entry6(
            "b",
            "10.244.0.3",
            "fd00:244::3",
            vec![m(9999, 9, HpProtocol::Sctp, Some("fd00::1"))],
        ),
        // An IPv4-only pod beside them.
        entry("c", "10.244.0.4", vec![m(7000, 7, HpProtocol::Tcp, None)]),
    ];
    let text = render_nft(&entries);
    let elements: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("add element"))
        .collect();
    assert_eq!(
        elements,
        [
            "add element inet sluice-hostport hp_ip { 10.0.0.1 . udp . 5353 : 10.244.0.2 . 53 }",
            "add element inet sluice-hostport hp_any { tcp . 7000 : 10.244.0.4 . 7, tcp . 8080 : 10.244.0.2 . 80 }",
            "add element inet sluice-hostport hairpin { 10.244.0.2 . 10.244.0.2, 10.244.0.4 . 10.244.0.4 }",
            "add element inet sluice-hostport hp_ip6 { fd00::1 . sctp . 9999 : fd00:244::3 . 9, fd00::1 . udp . 5354 : fd00:244::2 . 53 }",
            "add element inet sluice-hostport hp_any6 { tcp . 8080 : fd00:244::2 . 80 }",
            "add element inet sluice-hostport hairpin6 { fd00:244::2 . fd00:244::2, fd00:244::3 . fd00:244::3 }",
        ]
    );
    assert!(has_v6(&entries));
    assert!(!has_v6(&entries[2..]));
    // An IPv6 address with only IPv4 hostIP mappings has no IPv6 rule.
    let v4_only = entry6(
        "d",
        "10.244.0.5",
        "fd00:244::5",
        vec![m(81, 80, HpProtocol::Tcp, Some("10.0.0.1"))],
    );
    assert!(!has_v6(std::slice::from_ref(&v4_only)));
    // The delta of adding and removing a dual-stack pod touches its elements of both families.
    let delta = nft_delta(&entries[2..], &entries[..1]).unwrap();
    assert!(
        delta.contains("delete element inet sluice-hostport hp_any { tcp . 7000 }"),
        "{delta}"
    );
    assert!(
        delta
            .contains("add element inet sluice-hostport hp_any6 { tcp . 8080 : fd00:244::2 . 80 }"),
        "{delta}"
    );
    assert!(
        delta.contains("add element inet sluice-hostport hairpin6 { fd00:244::2 . fd00:244::2 }"),
        "{delta}"
    );
}

#[test]
fn ip6tables_renders_the_ipv6_rules_and_leaves_loopback_alone() {
    let entries = vec![
        entry6(
            "a",
            "10.244.0.2",
            "fd00:244::2",
            vec![
                m(8080, 80, HpProtocol::Tcp, None),
                m(5353, 53, HpProtocol::Udp, Some("10.0.0.1")),
                m(5354, 53, HpProtocol::Udp, Some("fd00::1")),
            ],
        ),
        entry("c", "10.244.0.4", vec![m(7000, 7, HpProtocol::Tcp, None)]),
    ];
    let want = "\
*nat
:SLUICE-HP - [0:0]
:SLUICE-HP-POST - [0:0]
-A SLUICE-HP -d ::1/128 -j RETURN
-A SLUICE-HP -d fd00::1/128 -p udp -m udp --dport 5354 -j DNAT --to-destination [fd00:244::2]:53
-A SLUICE-HP -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:244::2]:80
-A SLUICE-HP-POST -s fd00:244::2/128 -d fd00:244::2/128 -m conntrack --ctstate DNAT -j MASQUERADE
COMMIT
";
    assert_eq!(render_ip6tables(&entries), want);
    // The IPv4 rules are the IPv4 mappings only.
    let v4 = render_iptables(&entries);
    assert!(!v4.contains("5354") && !v4.contains("fd00"), "{v4}");
    assert!(
        v4.contains("--dport 5353") && v4.contains("--dport 7000"),
        "{v4}"
    );
    // With no IPv6 pod the chains are declared (so emptied) and hold only the loopback return.
    assert_eq!(
        render_ip6tables(&entries[1..]),
        "*nat\n:SLUICE-HP - [0:0]\n:SLUICE-HP-POST - [0:0]\n-A SLUICE-HP -d ::1/128 -j RETURN\nCOMMIT\n"
    );
}

#[test]
fn check_finds_missing_ipv6_rules_in_the_ip6tables_listing() {
    let a = entry6(
        "a",
        "10.244.0.2",
        "fd00:244::2",
        vec![
            m(8080, 80, HpProtocol::Tcp, None),
            m(5354, 53, HpProtocol::Udp, Some("fd00::1")),
        ],
    );
    let mut save = render_ip6tables(std::slice::from_ref(&a));
    assert_eq!(
        missing_rules(Listing::Ip6tables, &save, &a).len(),
        3,
        "no jumps"
    );
    for (chain, spec) in iptables_jumps() {
        save.push_str(&format!("-A {chain} {}\n", spec.join(" ")));
    }
    assert_eq!(
        missing_rules(Listing::Ip6tables, &save, &a),
        Vec::<String>::new()
    );
    let rule = "-A SLUICE-HP -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:244::2]:80";
    let save = save.replace(&format!("{rule}\n"), "");
    assert_eq!(missing_rules(Listing::Ip6tables, &save, &a), vec![rule]);
    // An IPv4-only entry has nothing to find in ip6tables; its IPv4 listing still needs its rules.
    let c = entry("c", "10.244.0.4", vec![m(7000, 7, HpProtocol::Tcp, None)]);
    assert_eq!(
        missing_rules(Listing::Ip6tables, "", &c),
        Vec::<String>::new()
    );
    // In nft, the dual-stack entry's IPv6 elements are looked for too.
    let missing = missing_rules(Listing::Nft, "", &a);
    assert!(
        missing.contains(&"hp_any6 element tcp . 8080 : fd00:244::2 . 80".to_string())
            && missing.contains(&"hairpin6 element fd00:244::2 . fd00:244::2".to_string()),
        "{missing:?}"
    );
}

mod v6only;
