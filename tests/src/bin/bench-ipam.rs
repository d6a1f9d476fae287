//! `bench-ipam`: what choosing a pod's address costs as the node's subnet grows, side by side
//! with the search sluice used before (it listed the subnet) and with issue 20's anchor (a /8
//! took a second per ADD, 0.0.0.0/0 more than ten seconds). In-process, no root: the part of
//! ADD that depends on the subnet's size is the IPAM step, timed here alone and with its lock
//! and file, as ADD runs it.
//!
//! Usage: bench-ipam [--allocated N] [--reps R]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::Ipv4Net;
use sluice_e2e::bench::{median, Flags};
use sluice_net::ipam::{self, IpamState, IpamStore, Owner};
use std::net::Ipv4Addr;
use std::time::Instant;

const USAGE: &str = "usage: bench-ipam [--allocated N] [--reps R]";

fn owner(i: usize) -> Owner {
    Owner {
        container_id: format!("bench{i}"),
        ifname: "eth0".into(),
        pod: Some("bench/pod".into()),
    }
}

/// The search before issue 20: every usable address listed, split at the cursor, then scanned.
fn listing_search(subnet: Ipv4Net, state: &IpamState) -> Option<Ipv4Addr> {
    let start = state.last.filter(|l| subnet.contains(l)).map(u32::from);
    let (after, before): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
        ipam::usable(subnet).partition(|a| start.is_some_and(|s| u32::from(*a) > s));
    after
        .into_iter()
        .chain(before)
        .find(|a| !state.allocations.contains_key(a))
}

/// Microseconds `f` takes.
fn micros(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1e6
}

/// One subnet under test: its state with the pods already there, and a store holding it.
struct Case {
    subnet: Ipv4Net,
    state: IpamState,
    store: IpamStore,
    added: usize,
    before: Vec<f64>,
    now: Vec<f64>,
    step: Vec<f64>,
}

fn main() {
    let mut allocated = 100usize;
    let mut reps = 5usize;
    let mut flags = Flags::from_env("bench-ipam", USAGE);
    while let Some((flag, value)) = flags.next_pair() {
        match flag.as_str() {
            "--allocated" => allocated = flags.number(&flag, &value),
            "--reps" => reps = flags.number(&flag, &value),
            other => flags.fail(&format!("unknown flag {other}")),
        }
    }
    flags.require(reps >= 1, "--reps must be at least 1");
    flags.require(allocated <= 250, "--allocated must fit a /24 (at most 250)");
    println!(
        "bench-ipam: choosing one pod address with {allocated} already allocated, in µs (medians: the listing search of {reps} runs, the others of {})",
        reps * 20
    );
    println!();
    println!("| subnet | addresses | before: listing search | now: search from the cursor | now: whole IPAM step (lock, read, choose, write) |");
    println!("|---|---|---|---|---|");
    let work = tempfile::tempdir().unwrap();
    let mut cases: Vec<Case> = ["10.244.3.0/24", "10.244.0.0/16", "10.0.0.0/8"]
        .into_iter()
        .map(|subnet| {
            let subnet: Ipv4Net = subnet.parse().unwrap();
            let mut state = IpamState::default();
            for i in 0..allocated {
                state.allocate(subnet, owner(i)).unwrap();
            }
            let store = IpamStore::new(work.path().join(subnet.prefix_len().to_string()));
            store.update(|s| *s = state.clone()).unwrap();
            Case {
                subnet,
                state,
                store,
                added: 0,
                before: vec![],
                now: vec![],
                step: vec![],
            }
        })
        .collect();
    // Rounds over all subnets, so that the machine's drift (other builds) falls on each alike.
    for round in 0..reps * 20 {
        for c in &mut cases {
            if round < reps {
                c.before.push(micros(|| {
                    std::hint::black_box(listing_search(c.subnet, &c.state));
                }));
            }
            c.now.push(micros(|| {
                std::hint::black_box(ipam::choose(c.subnet, &c.state));
            }));
            c.added += 1;
            let (subnet, o) = (c.subnet, owner(1000 + c.added));
            c.step.push(micros(|| {
                c.store.update(|s| s.allocate(subnet, o)).unwrap().unwrap();
            }));
            // Back to the same state, so that every round chooses among the same allocations.
            let o = owner(1000 + c.added);
            c.store.update(|s| s.release(&o)).unwrap();
        }
    }
    let mut rows = Vec::new();
    for c in &cases {
        let (before, now, step) = (median(&c.before), median(&c.now), median(&c.step));
        println!(
            "| {} | {} | {before:.0} | {now:.1} | {step:.0} |",
            c.subnet,
            ipam::capacity(c.subnet)
        );
        rows.push((c.subnet, before, now, step));
    }
    println!();
    let (first, last) = (rows[0], rows[rows.len() - 1]);
    println!(
        "/8 against /24: before x{:.0}, now x{:.1} (search), x{:.1} (whole step); target: about x1",
        last.1 / first.1,
        last.2 / first.2,
        last.3 / first.3
    );
    println!(
        "anchor (issue 20): before, a /8 took about a second per ADD and 0.0.0.0/0 over 10 s with memory \
         without bound; now 0.0.0.0/0 and anything broader than a /8 are refused (cidr::check_pod_range)"
    );
}
