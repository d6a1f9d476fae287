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
        pod_ip: pod.parse().unwrap(),
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
            "not an IPv4",
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
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    fib daddr type local jump hostports
  }
  chain output {
    type nat hook output priority -100; policy accept;
    fib daddr type local jump hostports
  }
  chain hostports {
    dnat ip to ip daddr . meta l4proto . th dport map @hp_ip
    dnat ip to meta l4proto . th dport map @hp_any
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat ip saddr 127.0.0.0/8 masquerade
    ct status dnat ip saddr . ip daddr @hairpin masquerade
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
