//! The standing fuzz targets of the node's subnet as the plugin takes it: `subnet.env` (any text,
//! and round trips of what the agent writes), the pod-range rules (against the standard library's
//! own address classes as an independent oracle), and address allocation (against the naive
//! search it replaced, which listed the subnet), per family, and both families at once (all or
//! nothing). 1024 cases a property by default
//! (`PROPTEST_CASES` for more); failures' seeds in `proptest-regressions/fuzz_subnet.txt`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use sluice_net::cidr::{self, UnsafeRange};
use sluice_net::ipam::{self, IpamState, Owner};
use sluice_net::subnet_env::{SubnetEnv, SubnetEnvError, SubnetV4};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

/// 1024 cases a property (a second or two in all), or `PROPTEST_CASES`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

fn config() -> Config {
    Config {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/fuzz_subnet.txt",
        ))),
        cases: cases(),
        max_shrink_time: 20_000,
        ..Config::default()
    }
}

fn v4net(min_len: u8) -> impl Strategy<Value = Ipv4Net> {
    (any::<u32>(), min_len..=32u8)
        .prop_map(|(a, len)| Ipv4Net::new(Ipv4Addr::from(a), len).unwrap())
}

/// Mostly ranges near the reserved ones and the usual private ones, so that both sides of every
/// rule are hit.
fn interesting_v4() -> impl Strategy<Value = Ipv4Net> {
    let near = prop::sample::select(vec![
        0u8, 10, 100, 126, 127, 128, 168, 169, 170, 172, 192, 223, 224, 239, 240, 255,
    ]);
    prop_oneof![
        v4net(0),
        (near, any::<u8>(), any::<u16>(), 0u8..=32).prop_map(|(a, b, cd, len)| {
            let addr = Ipv4Addr::new(a, b, (cd >> 8) as u8, cd as u8);
            Ipv4Net::new(addr, len).unwrap()
        }),
    ]
}

fn interesting_v6() -> impl Strategy<Value = Ipv6Net> {
    let head = prop::sample::select(vec![
        0u16, 0x2001, 0xfc00, 0xfd00, 0xfe80, 0xfebf, 0xfec0, 0xff00, 0xff02,
    ]);
    (head, any::<u128>(), 0u8..=128, any::<bool>()).prop_map(|(h, rest, len, mapped)| {
        let bits = if mapped {
            (0xffffu128 << 32) | (rest & 0xffff_ffff)
        } else {
            (u128::from(h) << 112) | (rest >> 16)
        };
        Ipv6Net::new(Ipv6Addr::from(bits), len).unwrap()
    })
}

/// An address of `net`, picked by `pick`.
fn v4_in(net: Ipv4Net, pick: u32) -> Ipv4Addr {
    let host_bits = 32 - u32::from(net.prefix_len());
    let mask = if host_bits == 32 {
        u32::MAX
    } else {
        (1u32 << host_bits) - 1
    };
    Ipv4Addr::from(u32::from(net.network()) | (pick & mask))
}

fn v6_in(net: Ipv6Net, pick: u128) -> Ipv6Addr {
    let host_bits = 128 - u32::from(net.prefix_len());
    let mask = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    Ipv6Addr::from(u128::from(net.network()) | (pick & mask))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn accepted_v4_ranges_hold_no_special_address(net in interesting_v4(), picks in prop::collection::vec(any::<u32>(), 1..16)) {
        match cidr::check_pod_range(net.into()) {
            Ok(()) => {
                prop_assert!(net.prefix_len() >= cidr::MIN_PREFIX_V4);
                // Its first and last addresses, and some between: none is special by std's rules.
                for a in picks.iter().map(|p| v4_in(net, *p)).chain([net.network(), net.broadcast()]) {
                    prop_assert!(!a.is_loopback() && !a.is_link_local() && !a.is_multicast() && a.octets()[0] != 0, "{net} holds {a}");
                }
            }
            Err(UnsafeRange::TooBroad { .. }) => prop_assert!(net.prefix_len() < cidr::MIN_PREFIX_V4),
            Err(UnsafeRange::Reserved { reserved, .. }) => {
                // Refused for a reason: it does hold an address of the class it was refused for.
                let IpNet::V4(r) = reserved.range else { panic!("{reserved:?}") };
                let shared = if net.prefix_len() >= r.prefix_len() { net.network() } else { r.network() };
                prop_assert!(r.contains(&shared) && net.contains(&shared));
                prop_assert!(shared.is_loopback() || shared.is_link_local() || shared.is_multicast() || shared.octets()[0] == 0);
            }
            Err(e @ UnsafeRange::Outside { .. }) => prop_assert!(false, "{e}"),
        }
    }

    #[test]
    fn accepted_v6_ranges_hold_no_special_address(net in interesting_v6(), picks in prop::collection::vec(any::<u128>(), 1..16)) {
        if cidr::check_pod_range(net.into()).is_ok() {
            prop_assert!(net.prefix_len() >= cidr::MIN_PREFIX_V6);
            for a in picks.iter().map(|p| v6_in(net, *p)).chain([net.network(), net.broadcast()]) {
                prop_assert!(
                    !a.is_loopback() && !a.is_unspecified() && !a.is_multicast()
                        && !a.is_unicast_link_local() && a.to_ipv4_mapped().is_none(),
                    "{net} holds {a}"
                );
            }
        }
    }

    #[test]
    fn any_text_as_subnet_env_gives_a_safe_subnet_or_an_error(text in prop_oneof![
        ".{0,200}",
        "(SLUICE_(NETWORK|SUBNET|MTU|IPMASQ)=[0-9./a-z\"]{0,20}\n){0,6}",
        "(SLUICE_(NETWORK6?|SUBNET6?|MTU|IPMASQ)=[0-9./a-f:\"]{0,24}\n){0,8}",
    ]) {
        match SubnetEnv::parse(&text, "fuzz") {
            Ok(env) => {
                prop_assert!(env.v4.is_some() || env.v6.is_some());
                if let Some(v4) = env.v4 {
                    prop_assert_eq!(cidr::check_node_subnet(v4.network.into(), v4.subnet.into()), Ok(()));
                }
                if let Some(v6) = env.v6 {
                    prop_assert_eq!(cidr::check_node_subnet(v6.network.into(), v6.subnet.into()), Ok(()));
                }
                prop_assert!((576..=65535).contains(&env.mtu));
                // What was accepted reads back the same after the agent writes it.
                prop_assert_eq!(SubnetEnv::parse(&env.render(), "fuzz").unwrap(), env);
            }
            Err(e) => prop_assert!(e.to_string().starts_with("fuzz:"), "{e}"),
        }
    }

    #[test]
    fn what_the_agent_writes_reads_back_or_is_refused_as_unsafe(
        network in interesting_v4(),
        sub_len in 0u8..=32,
        pick in any::<u32>(),
        mtu in 576u32..=65535,
        ipmasq in any::<bool>(),
    ) {
        let network = network.trunc();
        let subnet = Ipv4Net::new(v4_in(network, pick), sub_len.max(network.prefix_len())).unwrap().trunc();
        let env = SubnetEnv { v4: Some(SubnetV4 { network, subnet }), mtu, ipmasq, policy_backend: None, v6: None };
        let safe = cidr::check_pod_range(network.into()).is_ok() && cidr::check_node_subnet(network.into(), subnet.into()).is_ok();
        match SubnetEnv::parse(&env.render(), "fuzz") {
            Ok(back) => {
                prop_assert!(safe);
                prop_assert_eq!(back, env);
            }
            Err(SubnetEnvError::Unsafe { .. }) => prop_assert!(!safe),
            Err(SubnetEnvError::BadValue { key, .. }) => {
                prop_assert_eq!(key, "SLUICE_SUBNET");
                prop_assert!(subnet.prefix_len() > 30);
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

/// The search sluice used to run: list the subnet, start after the cursor, wrap.
fn naive_choose(subnet: Ipv4Net, state: &IpamState) -> Option<Ipv4Addr> {
    let start = state.last.filter(|l| subnet.contains(l)).map(u32::from);
    let (after, before): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
        ipam::usable(subnet).partition(|a| start.is_some_and(|s| u32::from(*a) > s));
    after
        .into_iter()
        .chain(before)
        .find(|a| !state.allocations.contains_key(a))
}

/// [`naive_choose`] for IPv6: list every address but the network one, start after the cursor.
fn naive_choose_v6(subnet: Ipv6Net, state: &IpamState) -> Option<Ipv6Addr> {
    let first = u128::from(subnet.network()) + 1;
    let last = u128::from(subnet.broadcast());
    let start = state.last_v6.filter(|l| subnet.contains(l)).map(u128::from);
    let (after, before): (Vec<u128>, Vec<u128>) =
        (first..=last).partition(|a| start.is_some_and(|s| *a > s));
    after
        .into_iter()
        .chain(before)
        .map(Ipv6Addr::from)
        .find(|a| !state.allocations_v6.contains_key(a))
}

#[derive(Debug, Clone)]
enum Op {
    Allocate(usize),
    Release(usize),
    /// The agent moved the node to another subnet (or the cursor was edited by hand).
    Cursor(u32),
}

fn owner(i: usize) -> Owner {
    Owner {
        container_id: format!("c{i}"),
        ifname: "eth0".into(),
        pod: None,
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn allocation_matches_the_naive_search_and_never_shares(
        base in any::<u32>(),
        len in 22u8..=30,
        ops in prop::collection::vec(prop_oneof![
            6 => (0usize..80).prop_map(Op::Allocate),
            3 => (0usize..80).prop_map(Op::Release),
            1 => any::<u32>().prop_map(Op::Cursor),
        ], 1..200),
    ) {
        let subnet = Ipv4Net::new(Ipv4Addr::from(base), len).unwrap().trunc();
        let mut state = IpamState::default();
        for op in ops {
            match op {
                Op::Allocate(i) => {
                    let held = state.lookup(&owner(i));
                    let expected = held.map(Some).unwrap_or_else(|| naive_choose(subnet, &state));
                    match state.allocate(subnet, owner(i)) {
                        Ok((ip, fresh)) => {
                            prop_assert_eq!(Some(ip), expected);
                            prop_assert_eq!(fresh, held.is_none());
                            prop_assert!(ip != subnet.network() && ip != subnet.broadcast() && subnet.contains(&ip));
                        }
                        Err(ipam::IpamError::Exhausted { capacity, .. }) => {
                            prop_assert_eq!(expected, None);
                            prop_assert_eq!(state.allocations.len() as u128, capacity);
                            prop_assert_eq!(capacity, u128::from(ipam::capacity(subnet)));
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Release(i) => {
                    let held = state.lookup(&owner(i));
                    prop_assert_eq!(state.release(&owner(i)), held);
                }
                Op::Cursor(c) => state.last = Some(Ipv4Addr::from(c)),
            }
            // One address per attachment, one attachment per address.
            let owners: BTreeSet<&str> = state.allocations.values().map(|o| o.container_id.as_str()).collect();
            prop_assert_eq!(owners.len(), state.allocations.len());
        }
        // The state survives its file.
        let text = serde_json::to_vec(&state).unwrap();
        prop_assert_eq!(serde_json::from_slice::<IpamState>(&text).unwrap(), state);
    }

    #[test]
    fn ipv6_allocation_matches_the_naive_search_and_never_shares(
        base in any::<u128>(),
        len in 120u8..=127,
        ops in prop::collection::vec(prop_oneof![
            6 => (0usize..300).prop_map(Op::Allocate),
            3 => (0usize..300).prop_map(Op::Release),
            1 => any::<u32>().prop_map(Op::Cursor),
        ], 1..200),
    ) {
        let subnet = Ipv6Net::new(Ipv6Addr::from(base), len).unwrap().trunc();
        let mut state = IpamState::default();
        for op in ops {
            match op {
                Op::Allocate(i) => {
                    let held = state.lookup_v6(&owner(i));
                    let expected = held.map(Some).unwrap_or_else(|| naive_choose_v6(subnet, &state));
                    match state.allocate_v6(subnet, owner(i)) {
                        Ok((ip, fresh)) => {
                            prop_assert_eq!(Some(ip), expected);
                            prop_assert_eq!(fresh, held.is_none());
                            prop_assert!(ip != subnet.network() && subnet.contains(&ip));
                        }
                        Err(ipam::IpamError::Exhausted { capacity, subnet: IpNet::V6(s) }) => {
                            prop_assert_eq!(s, subnet);
                            prop_assert_eq!(expected, None);
                            prop_assert_eq!(state.allocations_v6.len() as u128, capacity);
                            prop_assert_eq!(capacity, ipam::capacity_v6(subnet));
                        }
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Release(i) => {
                    let held = state.lookup_v6(&owner(i));
                    prop_assert_eq!(state.release_v6(&owner(i)), held);
                }
                // Somewhere in or near the subnet, or anywhere.
                Op::Cursor(c) => {
                    let near = u128::from(subnet.network()).wrapping_add(u128::from(c % 512));
                    state.last_v6 = Some(Ipv6Addr::from(if c % 3 == 0 { u128::from(c) } else { near }));
                }
            }
            let owners: BTreeSet<&str> = state.allocations_v6.values().map(|o| o.container_id.as_str()).collect();
            prop_assert_eq!(owners.len(), state.allocations_v6.len());
            prop_assert!(state.allocations.is_empty());
        }
        let text = serde_json::to_vec(&state).unwrap();
        prop_assert_eq!(serde_json::from_slice::<IpamState>(&text).unwrap(), state);
    }

    #[test]
    fn a_dual_allocation_gets_both_families_or_changes_nothing(
        len4 in 28u8..=30,
        len6 in 124u8..=127,
        ops in prop::collection::vec(prop_oneof![
            3 => (0usize..40).prop_map(Op::Allocate),
            1 => (0usize..40).prop_map(Op::Release),
        ], 1..120),
    ) {
        let v4 = Ipv4Net::new(Ipv4Addr::new(10, 244, 1, 0), len4).unwrap();
        let v6 = Ipv6Net::new("fd00:10:244:1::".parse().unwrap(), len6).unwrap();
        let mut state = IpamState::default();
        for op in ops {
            match op {
                Op::Allocate(i) => {
                    let before = state.clone();
                    match state.allocate_families(Some(v4), Some(v6), owner(i)) {
                        Ok(got) => {
                            prop_assert_eq!(got.v4.map(|a| a.0), state.lookup(&owner(i)));
                            prop_assert_eq!(got.v6.map(|a| a.0), state.lookup_v6(&owner(i)));
                            prop_assert!(got.v4.is_some() && got.v6.is_some());
                        }
                        Err(ipam::IpamError::Exhausted { .. }) => prop_assert_eq!(&state, &before),
                        Err(e) => prop_assert!(false, "{e}"),
                    }
                }
                Op::Release(i) => {
                    let held = (state.lookup(&owner(i)), state.lookup_v6(&owner(i)));
                    prop_assert_eq!(state.release_families(&owner(i)), held);
                }
                Op::Cursor(_) => {}
            }
            // Every attachment holds both families or neither.
            let a4: BTreeSet<&str> = state.allocations.values().map(|o| o.container_id.as_str()).collect();
            let a6: BTreeSet<&str> = state.allocations_v6.values().map(|o| o.container_id.as_str()).collect();
            prop_assert_eq!(a4, a6);
        }
    }
}
