//! An allocation's cost must follow the allocations on the node, not the size of its subnet: a
//! /8 once took a second and 64 MiB per ADD, a /0 more than ten seconds and memory without bound.
//! Memory is what this measures, since it is exact where time is not: every byte the allocator
//! hands out while one address is chosen is counted.

// The one unsafe item: a counting wrapper around the system allocator, for this measurement.
#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]

use ipnet::Ipv4Net;
use sluice_net::ipam::{IpamState, Owner};
use std::alloc::{GlobalAlloc, Layout, System};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

struct Counting;

static ALLOCATED: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is passed on unchanged to the system allocator, which upholds the contract.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size() as u64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size as u64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

fn owner(i: usize) -> Owner {
    Owner {
        container_id: format!("c{i}"),
        ifname: "eth0".into(),
        pod: None,
    }
}

/// Bytes allocated while `f` runs (this file has one test, so no other thread allocates).
fn allocated_by<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let out = f();
    (out, ALLOCATED.load(Ordering::Relaxed) - before)
}

#[test]
fn choosing_an_address_costs_the_same_in_a_slash_24_and_a_slash_8() {
    for subnet in ["10.244.3.0/24", "10.244.0.0/16", "10.0.0.0/8"] {
        let subnet: Ipv4Net = subnet.parse().unwrap();
        let mut state = IpamState::default();
        for i in 0..100 {
            state.allocate(subnet, owner(i)).unwrap();
        }
        // The cursor at the start, in the middle and at the end of the subnet.
        for last in [
            Ipv4Addr::from(u32::from(subnet.network()) + 1),
            Ipv4Addr::from(u32::from(subnet.network()) + 50),
            Ipv4Addr::from(u32::from(subnet.broadcast()) - 1),
        ] {
            let mut s = state.clone();
            s.last = Some(last);
            let ((ip, fresh), bytes) = allocated_by(|| s.allocate(subnet, owner(1000)).unwrap());
            assert!(fresh && subnet.contains(&ip), "{subnet}: {ip}");
            // The owner's strings and a map node: a few hundred bytes. The old search listed the
            // subnet: 1 KiB for a /24, 64 MiB for a /8.
            assert!(
                bytes < 4096,
                "{subnet}, cursor {last}: choosing {ip} allocated {bytes} bytes"
            );
        }
    }
}
