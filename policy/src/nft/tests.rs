#![allow(clippy::unwrap_used)]

use super::*;
use crate::ir::{
    AddrSet, Direction, PodPolicy, PolicyIr, PortEntry, Protocol, Region, TierVerdict,
};

/// Three pods: `sla` isolated for ingress (10.0.0.1 on everything, 10.0.1.0/24 on TCP 80-81,
/// anyone on SCTP 82), `slb` open, `slc` isolated for egress with nothing allowed.
pub(crate) fn sample() -> PolicyIr {
    let pod = |name: &str, ip: &str, ingress: Direction, egress: Direction| PodPolicy {
        namespace: "x".into(),
        name: name.into(),
        ips: vec![ip.parse().unwrap()],
        ifname: format!("sl{name}"),
        ingress,
        egress,
    };
    let mut ingress = Direction {
        isolated: true,
        policies: vec!["x/p".into()],
        all_ports: AddrSet::from_addrs(["10.0.0.1".parse().unwrap()]),
        ports: Vec::new(),
        ..Default::default()
    };
    ingress.set_ports(vec![
        PortEntry {
            protocol: Protocol::Tcp,
            first: 80,
            last: 81,
            addrs: AddrSet::from_block("10.0.1.0/24".parse().unwrap(), &[]),
        },
        PortEntry {
            protocol: Protocol::Sctp,
            first: 82,
            last: 82,
            addrs: AddrSet::all(),
        },
    ]);
    let deny = Direction {
        isolated: true,
        policies: vec!["x/q".into()],
        ..Default::default()
    };
    PolicyIr {
        pods: vec![
            pod("a", "10.244.1.1", ingress, Direction::default()),
            pod(
                "b",
                "10.244.1.2",
                Direction::default(),
                Direction::default(),
            ),
            pod("c", "10.244.1.3", Direction::default(), deny),
        ],
        log_drops: false,
    }
}

/// `text` with every content hash in a set's name (`-` and 16 hex digits) written `-#`.
pub(crate) fn unhashed(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('-') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let hex = after.bytes().take(16).filter(u8::is_ascii_hexdigit).count();
        let ends = after
            .as_bytes()
            .get(16)
            .is_none_or(|b| !b.is_ascii_alphanumeric());
        if hex == 16 && ends {
            out.push_str("-#");
            rest = &after[16..];
        } else {
            out.push('-');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The name of the one set or map of `table` whose name is `base` and a hash.
fn named(table: &NftTable, base: &str) -> String {
    let found: Vec<&String> = table
        .sets
        .keys()
        .filter(|n| unhashed(n) == format!("{base}-#"))
        .collect();
    assert_eq!(found.len(), 1, "{base} in {:?}", table.sets.keys());
    found[0].clone()
}

#[test]
fn the_rendered_table_is_golden() {
    let s = render(&sample());
    let want = "table inet sluice-policy
delete table inet sluice-policy
table inet sluice-policy {
\tset i-all-# {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.0.0.1/32 }
\t}
\tset i-sla-ports-# {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = { 0.0.0.0/0 . sctp . 82,
\t\t\t     10.0.1.0/24 . tcp . 80-81 }
\t}
\tset i-sla-ports6-# {
\t\ttype ipv6_addr . inet_proto . inet_service
\t\tflags interval
\t\telements = { ::/0 . sctp . 82 }
\t}
\tset isolated-# {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 10.244.1.1/32,
\t\t\t     10.244.1.3/32 }
\t}
\tmap egress-pods-# {
\t\ttype ifname : verdict
\t\telements = { \"sla\" : return,
\t\t\t     \"slb\" : return,
\t\t\t     \"slc\" : goto e-slc }
\t}
\tmap ingress-pods-# {
\t\ttype ifname : verdict
\t\telements = { \"sla\" : goto i-sla,
\t\t\t     \"slb\" : return,
\t\t\t     \"slc\" : return }
\t}
\tchain e-slc {
\t\tdrop
\t}
\tchain egress {
\t\tiifname vmap @egress-pods-#
\t\tiifname \"sluice*\" return
\t\tiifname \"sl*\" drop
\t}
\tchain i-sla {
\t\tip saddr @i-all-# accept
\t\tip saddr . meta l4proto . th dport @i-sla-ports-# accept
\t\tip6 saddr . meta l4proto . th dport @i-sla-ports6-# accept
\t\tdrop
\t}
\tchain ingress {
\t\toifname vmap @ingress-pods-#
\t\toifname \"sluice*\" return
\t\toifname \"sl*\" drop
\t}
\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tct state established,related accept
\t\tct state invalid drop
\t\tct state new tcp flags & (fin | syn | rst | ack) != syn ip saddr @isolated-# drop
\t\tct state new tcp flags & (fin | syn | rst | ack) != syn ip daddr @isolated-# drop
\t\tjump egress
\t\tjump ingress
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tct state established,related accept
\t\tct state invalid drop
\t\tct state new tcp flags & (fin | syn | rst | ack) != syn ip saddr @isolated-# drop
\t\tjump egress
\t}
\tchain state {
\t\treturn comment \"sluice-policy:HASH\"
\t}
}
";
    assert_eq!(unhashed(&s.text().replace(&s.hash, "HASH")), want);
    assert_eq!(s.hash.len(), 16);
}

#[test]
fn an_empty_ir_still_fails_closed_for_unknown_pods() {
    let s = render(&PolicyIr::default());
    assert!(
        unhashed(&s.text()).contains("\tmap ingress-pods-# {\n\t\ttype ifname : verdict\n\t}\n")
    );
    assert!(s.text().contains("oifname \"sl*\" drop"));
}

#[test]
fn an_allow_everything_direction_is_one_verdict() {
    let mut ir = sample();
    ir.pods[1].egress = Direction {
        isolated: true,
        all_ports: AddrSet::all(),
        ..Default::default()
    };
    let s = render(&ir).text();
    assert!(
        s.contains("\tchain e-slb {\n\t\treturn\n\t\tdrop\n\t}\n"),
        "{s}"
    );
    assert!(s.contains("\"slb\" : goto e-slb"));
}

#[test]
fn the_hash_follows_the_content() {
    let a = render(&sample());
    assert_eq!(a, render(&sample()));
    let mut ir = sample();
    ir.pods[0].ingress.all_ports = AddrSet::from_addrs(["10.0.0.2".parse().unwrap()]);
    assert_ne!(a.hash, render(&ir).hash);
}

#[test]
fn the_hash_is_read_back_from_nft_json() {
    let json = r#"{"nftables": [{"metainfo": {"json_schema_version": 1}},
        {"chain": {"family": "inet", "table": "sluice-policy", "name": "state", "handle": 3}},
        {"rule": {"family": "inet", "table": "sluice-policy", "chain": "forward", "handle": 12, "comment": "sluice-policy:fedcba9876543210", "expr": []}},
        {"rule": {"family": "inet", "table": "sluice-policy", "chain": "state", "handle": 13, "comment": "sluice-policy:0123456789abcdef", "expr": []}},
        {"rule": {"family": "inet", "table": "sluice-policy", "chain": "state", "handle": 14, "expr": []}}]}"#;
    assert_eq!(
        parse_observed(json).unwrap().as_deref(),
        Some("0123456789abcdef")
    );
    assert_eq!(parse_observed(r#"{"nftables": []}"#).unwrap(), None);
    assert!(parse_observed("nope").is_err());
}

#[test]
fn the_fake_writes_only_changes() {
    use crate::firewall::{Backend, FakeFirewall, Firewall};
    let fw = FakeFirewall::new(Backend::Nftables);
    let r = fw.render(&sample());
    assert!(fw.apply(&r).unwrap().written);
    assert!(!fw.apply(&r).unwrap().written);
    assert_eq!(fw.writes(), 1);
    assert_eq!(fw.observe().unwrap().hash.as_deref(), Some(r.hash()));
    fw.fail_next();
    let other = fw.render(&PolicyIr::default());
    assert!(fw.apply(&other).is_err());
    assert_eq!(fw.current(), Some(r));
    assert!(fw.apply(&other).unwrap().written);
    let wrong = Rendered::render(Backend::Iptables, &PolicyIr::default());
    assert!(matches!(
        fw.apply(&wrong),
        Err(FirewallError::WrongBackend { .. })
    ));
}

#[test]
fn an_unchanged_table_has_an_empty_delta_but_the_hash() {
    let a = render(&sample());
    let d = delta(&a.table, &a.table, &a.hash).unwrap();
    assert_eq!(
        d,
        format!(
            "flush chain inet sluice-policy state\nadd rule inet sluice-policy state return comment \"sluice-policy:{}\"\n",
            a.hash
        )
    );
}

#[test]
fn a_changed_peer_is_a_new_set_and_its_rule_never_an_element_edit() {
    let a = render(&sample());
    let mut ir = sample();
    ir.pods[0].ingress.all_ports = AddrSet::from_addrs(["10.0.0.2".parse().unwrap()]);
    let b = render(&ir);
    let (old, new) = (named(&a.table, "i-all"), named(&b.table, "i-all"));
    assert_ne!(old, new);
    let d = delta(&a.table, &b.table, &b.hash).unwrap();
    let t = "inet sluice-policy";
    let ports = named(&b.table, "i-sla-ports");
    let ports6 = named(&b.table, "i-sla-ports6");
    let want = format!(
        "add set {t} {new} {{ type ipv4_addr; flags interval; elements = {{ 10.0.0.2/32 }}; }}
flush chain {t} i-sla
add rule {t} i-sla ip saddr @{new} accept
add rule {t} i-sla ip saddr . meta l4proto . th dport @{ports} accept
add rule {t} i-sla ip6 saddr . meta l4proto . th dport @{ports6} accept
add rule {t} i-sla drop
delete set {t} {old}
flush chain {t} state
add rule {t} state return comment \"sluice-policy:{}\"
",
        b.hash
    );
    assert_eq!(d, want);
}

#[test]
fn a_pod_isolated_and_released_makes_and_drops_its_chain_in_a_valid_order() {
    let a = render(&sample());
    let mut ir = sample();
    // b becomes isolated for ingress from 10.0.0.0/8 on all ports; a is released.
    ir.pods[1].ingress = Direction {
        isolated: true,
        all_ports: AddrSet::from_block("10.0.0.0/8".parse().unwrap(), &[]),
        ..Default::default()
    };
    ir.pods[0].ingress = Direction::default();
    let b = render(&ir);
    let d = delta(&a.table, &b.table, &b.hash).unwrap();
    assert!(!d.contains(" element "), "{d}");
    let at = |needle: &str| {
        d.find(needle)
            .unwrap_or_else(|| panic!("{needle:?} missing from:\n{d}"))
    };
    let t = "inet sluice-policy";
    let b_all = named(&b.table, "i-all");
    let (old_map, new_map) = (
        named(&a.table, "ingress-pods"),
        named(&b.table, "ingress-pods"),
    );
    // Made before use: the set before the rule naming it, the chain before the map naming it,
    // the map before the rule naming it.
    assert!(at(&format!("add set {t} {b_all} ")) < at(&format!("@{b_all} accept")));
    assert!(at(&format!("add chain {t} i-slb\n")) < at(&format!("add map {t} {new_map} ")));
    assert!(at(&format!("add map {t} {new_map} ")) < at(&format!("oifname vmap @{new_map}")));
    assert!(d.contains(&format!(
        "add map {t} {new_map} {{ type ifname : verdict; elements = {{ \"sla\" : return, \"slb\" : goto i-slb, \"slc\" : return }}; }}"
    )));
    // Unused before dropped: the ingress chain rewritten before the old map goes, the old map
    // (naming i-sla) before i-sla goes, the chain before its sets.
    assert!(
        at("flush chain inet sluice-policy ingress\n") < at(&format!("delete map {t} {old_map}"))
    );
    assert!(at(&format!("delete map {t} {old_map}")) < at(&format!("delete chain {t} i-sla")));
    for set in ["i-all", "i-sla-ports"] {
        let set = named(&a.table, set);
        assert!(at(&format!("delete chain {t} i-sla")) < at(&format!("delete set {t} {set}")));
    }
    // The hash is the last thing written.
    assert!(d.ends_with(&format!("{}\"\n", b.hash)));
}

#[test]
fn a_changed_base_chain_is_left_to_a_full_replace() {
    let a = render(&sample());
    let mut changed = (*a.table).clone();
    Arc::make_mut(changed.chains.get_mut("forward").unwrap())
        .hook
        .replace("type filter hook forward priority -1; policy accept;".into());
    assert_eq!(delta(&a.table, &changed, "h"), None);
    let mut retyped = (*a.table).clone();
    Arc::make_mut(retyped.sets.get_mut(&named(&a.table, "isolated")).unwrap()).spec =
        vec!["type ipv4_addr".into()];
    assert_eq!(delta(&a.table, &retyped, "h"), None);
}

/// `sample()` with pod `slb` denied 169.254.169.254 by an Admin tier on ingress and 10.0.9.0/24
/// by a Baseline tier on egress, drops logged.
pub(crate) fn tiered_sample() -> PolicyIr {
    let mut ir = sample();
    ir.log_drops = true;
    let b = &mut ir.pods[1];
    b.ingress.admin = Arc::new(TierVerdict {
        deny: Region::everything(&AddrSet::from_addrs(["169.254.169.254".parse().unwrap()])),
        policies: vec!["block-metadata".into()],
        ..Default::default()
    });
    b.egress.baseline = Arc::new(TierVerdict {
        deny: Region::everything(&AddrSet::from_block("10.0.9.0/24".parse().unwrap(), &[])),
        policies: vec!["default-deny".into()],
        ..Default::default()
    });
    ir
}

#[test]
fn logged_tier_drops_name_their_tier() {
    let t = unhashed(&render(&tiered_sample()).text());
    for want in [
        "ip saddr @t-all-# limit rate 10/second burst 20 packets log prefix \"sluice-drop:iA:slb\" group 77\n\t\tip saddr @t-all-# drop",
        "ip daddr @t-all-# limit rate 10/second burst 20 packets log prefix \"sluice-drop:eB:slb\" group 77\n\t\tip daddr @t-all-# drop",
    ] {
        assert!(t.contains(want), "{want:?} missing from\n{t}");
    }
    // NetworkPolicy's own drops keep the prefix without a tier.
    assert!(t.contains("log prefix \"sluice-drop:i:sla\""), "{t}");
}

#[test]
fn logged_drops_name_the_direction_and_the_veth_and_are_rate_limited() {
    let mut ir = sample();
    ir.log_drops = true;
    let t = unhashed(&render(&ir).text());
    for want in [
        "\tchain i-sla {\n\t\tip saddr @i-all-# accept\n\t\tip saddr . meta l4proto . th dport @i-sla-ports-# accept\n\t\tip6 saddr . meta l4proto . th dport @i-sla-ports6-# accept\n\t\tlimit rate 10/second burst 20 packets log prefix \"sluice-drop:i:sla\" group 77\n\t\tdrop\n\t}",
        "\tchain e-slc {\n\t\tlimit rate 10/second burst 20 packets log prefix \"sluice-drop:e:slc\" group 77\n\t\tdrop\n\t}",
        "oifname \"sl*\" limit rate 10/second burst 20 packets log prefix \"sluice-drop:i:-\" group 77 drop",
        "iifname \"sl*\" limit rate 10/second burst 20 packets log prefix \"sluice-drop:e:-\" group 77 drop",
    ] {
        assert!(t.contains(want), "{want:?} missing from\n{t}");
    }
    // Switching it live is a delta of the drop chains, not a new table.
    let off = render(&sample());
    let on = render(&ir);
    let d = delta(&off.table, &on.table, &on.hash).unwrap();
    assert!(d.contains("flush chain inet sluice-policy i-sla"), "{d}");
    assert!(!d.contains("delete table"), "{d}");
    assert!(!render(&sample()).text().contains("log prefix"));
}

#[test]
fn a_memo_renders_what_a_fresh_render_does_and_keeps_unchanged_pods() {
    let mut memo = RenderMemo::default();
    let first = render_with(&sample(), &mut memo);
    assert_eq!(first, render(&sample()));
    let mut ir = sample();
    ir.pods[0].ingress.all_ports = AddrSet::from_addrs(["10.0.0.2".parse().unwrap()]);
    let second = render_with(&ir, &mut memo);
    assert_eq!(second, render(&ir));
    // The unchanged pod's chain is the one rendered before, the changed one's is new.
    assert!(Arc::ptr_eq(
        &first.table.chains["e-slc"],
        &second.table.chains["e-slc"]
    ));
    assert!(!Arc::ptr_eq(
        &first.table.chains["i-sla"],
        &second.table.chains["i-sla"]
    ));
    // Logging switched on renders every chain again.
    ir.log_drops = true;
    assert_eq!(render_with(&ir, &mut memo), render(&ir));
    // A pod no longer isolated is forgotten.
    let empty = render_with(&PolicyIr::default(), &mut memo);
    assert_eq!(empty, render(&PolicyIr::default()));
    assert!(memo.is_empty());
}

/// Four pods in one group (the same Admin verdict, shared), plus `sla`'s own NetworkPolicy.
pub(crate) fn grouped_sample(deny: &str) -> PolicyIr {
    let mut ir = sample();
    let verdict = Arc::new(TierVerdict {
        deny: Region::everything(&AddrSet::from_block(deny.parse().unwrap(), &[])),
        accept: Region::from_ports(vec![PortEntry {
            protocol: Protocol::Tcp,
            first: 8080,
            last: 8080,
            addrs: AddrSet::from_block("10.9.0.0/16".parse().unwrap(), &[]),
        }]),
        policies: vec!["shared".into()],
        ..Default::default()
    });
    for p in &mut ir.pods {
        p.ingress.admin = verdict.clone();
    }
    let mut d = ir.pods[2].clone();
    d.name = "d".into();
    d.ifname = "sld".into();
    d.ips = vec!["10.244.1.4".parse().unwrap()];
    ir.pods.push(d);
    ir
}

#[test]
fn pods_of_one_group_share_the_tier_sets_and_a_region_change_touches_only_its_sets() {
    let a = render(&grouped_sample("169.254.0.0/16"));
    let tier_sets: Vec<&String> = a
        .table
        .sets
        .keys()
        .filter(|n| n.starts_with("t-"))
        .collect();
    // One deny set and one accept set, whatever the number of pods using them.
    assert_eq!(tier_sets.len(), 2, "{tier_sets:?}");
    for pod in ["i-sla", "i-slb", "i-slc", "i-sld"] {
        let rules = &a.table.chains[pod].rules;
        // The tier costs two lookups in each pod's chain, before NetworkPolicy's.
        assert!(rules[0].starts_with("ip saddr @t-all-"), "{rules:?}");
        assert!(
            rules[1].starts_with("ip saddr . meta l4proto . th dport @t-ports-"),
            "{rules:?}"
        );
    }
    // Another region for the group: one new set, the old one deleted, the pods' rules
    // written again; no NetworkPolicy set touched.
    let b = render(&grouped_sample("169.254.169.0/24"));
    let d = delta(&a.table, &b.table, &b.hash).unwrap();
    assert_eq!(d.matches("add set ").count(), 1, "{d}");
    assert_eq!(d.matches("delete set ").count(), 1, "{d}");
    assert!(!d.contains("add set inet sluice-policy i-sla"), "{d}");
    assert!(!d.contains("e-slc"), "{d}");
}

/// `ir` with its pods' Admin ingress verdict decided for `group`, as the compiler makes it.
pub(crate) fn of_group(mut ir: PolicyIr, group: u64) -> PolicyIr {
    for p in &mut ir.pods {
        let mut v = (*p.ingress.admin).clone();
        v.group = group;
        p.ingress.admin = Arc::new(v);
    }
    ir
}

#[test]
fn a_group_names_its_tier_sets_and_a_peer_change_rewrites_only_what_they_hold() {
    let group = 0x0123_4567_89ab_cdef;
    let a = render(&of_group(grouped_sample("169.254.0.0/16"), group));
    let tier_sets: Vec<&String> = a
        .table
        .sets
        .keys()
        .filter(|n| n.starts_with("g-"))
        .collect();
    assert_eq!(
        tier_sets,
        [
            "g-iaa-0123456789ab-00000000-ports",
            "g-iad-0123456789ab-00000000-all"
        ]
    );
    for pod in ["i-sla", "i-slb", "i-slc", "i-sld"] {
        let rules = &a.table.chains[pod].rules;
        assert!(
            rules[0].starts_with("ip saddr @g-iad-0123456789ab-00000000-all drop"),
            "{rules:?}"
        );
    }
    // Other peers denied: the deny set is flushed and filled in the same transaction; no
    // set is made or deleted, no pod's chain written again (the state chain only).
    let b = render(&of_group(grouped_sample("169.254.169.0/24"), group));
    assert_ne!(
        a.hash, b.hash,
        "the table's hash follows a group set's elements"
    );
    let d = delta(&a.table, &b.table, &b.hash).unwrap();
    assert!(
        d.starts_with(
            "flush set inet sluice-policy g-iad-0123456789ab-00000000-all\n\
             add element inet sluice-policy g-iad-0123456789ab-00000000-all { 169.254.169.0/24 }\n"
        ),
        "{d}"
    );
    assert!(!d.contains("add set") && !d.contains("delete set"), "{d}");
    assert_eq!(d.matches("flush chain").count(), 1, "{d}");
    assert!(d.contains("flush chain inet sluice-policy state"), "{d}");
    // And back.
    let back = delta(&b.table, &a.table, &a.hash).unwrap();
    assert!(back.contains("{ 169.254.0.0/16 }"), "{back}");
    // The group's policies changed: new sets (no element command, which would make nft load
    // every set's elements first), the old ones deleted.
    let mut revised = of_group(grouped_sample("169.254.169.0/24"), group);
    for p in &mut revised.pods {
        let mut v = (*p.ingress.admin).clone();
        v.revision = 0x1234_5678_0000_0000;
        p.ingress.admin = Arc::new(v);
    }
    let revised = render(&revised);
    let d = delta(&b.table, &revised.table, &revised.hash).unwrap();
    assert!(
        !d.contains("add element") && !d.contains("flush set"),
        "{d}"
    );
    assert!(
        d.contains("add set inet sluice-policy g-iad-0123456789ab-12345678-all"),
        "{d}"
    );
    assert!(
        d.contains("delete set inet sluice-policy g-iad-0123456789ab-00000000-all"),
        "{d}"
    );
    // Another group: its own sets; the old group's go.
    let other = render(&of_group(
        grouped_sample("169.254.169.0/24"),
        0x0fed_cba9_8765_4321,
    ));
    let d = delta(&b.table, &other.table, &other.hash).unwrap();
    assert!(
        d.contains("delete set inet sluice-policy g-iad-0123456789ab-00000000-all"),
        "{d}"
    );
    assert!(
        d.contains("add set inet sluice-policy g-iad-0fedcba98765-00000000-all"),
        "{d}"
    );
}

#[test]
fn ipv6_peers_are_ipv6_sets_in_the_same_table() {
    let mut ir = sample();
    for (p, six) in ir.pods.iter_mut().zip(["fd00::1", "fd00::2", "fd00::3"]) {
        p.ips.push(six.parse().unwrap());
    }
    ir.pods[0]
        .ingress
        .all_ports
        .union_with(&AddrSet::from_block("fd00:1::/64".parse().unwrap(), &[]));
    let t = unhashed(&render(&ir).text());
    for want in [
        "\tset i-all6-# {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00:1::/64 }\n\t}",
        "\tset isolated6-# {\n\t\ttype ipv6_addr\n\t\tflags interval\n\t\telements = { fd00::1/128,\n\t\t\t     fd00::3/128 }\n\t}",
        "\tchain i-sla {\n\t\tip saddr @i-all-# accept\n\t\tip6 saddr @i-all6-# accept\n\t\tip saddr . meta l4proto . th dport @i-sla-ports-# accept\n\t\tip6 saddr . meta l4proto . th dport @i-sla-ports6-# accept\n\t\tdrop\n\t}",
        "ct state new tcp flags & (fin | syn | rst | ack) != syn ip6 saddr @isolated6-# drop",
        "ct state new tcp flags & (fin | syn | rst | ack) != syn ip6 daddr @isolated6-# drop",
        "\t\tct state invalid drop\n\t\ticmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept\n",
    ] {
        assert!(t.contains(want), "{want:?} missing from\n{t}");
    }
    // The unselected and the egress-isolated pods: the same dispatch, the same drop.
    assert!(t.contains("\tchain e-slc {\n\t\tdrop\n\t}"));
    // Without IPv6 pods, no IPv6 base rules at all.
    let plain = unhashed(&render(&sample()).text());
    assert!(!plain.contains("isolated6") && !plain.contains("icmpv6"));
    // A changed IPv6 peer is a new IPv6 set, and the IPv4 ones stay.
    let a = render(&ir);
    let mut other = ir.clone();
    other.pods[0].ingress.all_ports =
        AddrSet::from_addrs(["10.0.0.1".parse().unwrap(), "fd00:1::7".parse().unwrap()]);
    let b = render(&other);
    let d = delta(&a.table, &b.table, &b.hash).unwrap();
    assert!(
        d.contains("type ipv6_addr; flags interval; elements = { fd00:1::7/128 }"),
        "{d}"
    );
    assert!(!d.contains("type ipv4_addr;"), "{d}");
}
