//! Crashes in the middle of CNI calls: 200 ADD/DEL pairs, 16 at a time, with one plugin process
//! in ten killed (SIGKILL) while it runs, as a node under memory pressure or a runtime that gives
//! up would leave them. Then the runtime's clean-up (DEL of every pod, GC with the pods it still
//! knows: none) must leave no address, veth, route, temporary file or process behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use sluice_e2e::cni::{CniNode, Limits, Outcome};
use sluice_e2e::{have_root, wait_until, Netns};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

const PAIRS: usize = 200;
const PARALLEL: usize = 16;
/// One call in this many is killed.
const KILL_ONE_IN: u64 = 10;

/// xorshift64*: a fixed, small source of choices (which call dies, and when).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Whether call `n` of the run dies, and how long after its start.
fn fate(seed: u64, n: u64) -> Option<Duration> {
    let mut rng = Rng(seed ^ (n + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    rng.next();
    rng.next()
        .is_multiple_of(KILL_ONE_IN)
        .then(|| Duration::from_millis(1 + rng.next() % 40))
}

fn call(
    node: &CniNode,
    command: &str,
    container: &str,
    netns: &Path,
    kill_after: Option<Duration>,
) -> Outcome {
    let netns = netns.display().to_string();
    node.call_raw_with(
        &[
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ],
        node.conf("1.1.0", json!({})).to_string().as_bytes(),
        Limits {
            deadline: Duration::from_secs(60),
            kill_after,
        },
    )
}

/// PIDs of processes whose command line holds one of `names` (the link reclaimers DEL starts).
fn processes_naming(names: &BTreeSet<String>) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let line = String::from_utf8_lossy(&c).replace('\0', " ");
                line.contains("__delete-link") && names.iter().any(|n| line.contains(n.as_str()))
            })
        })
        .collect()
}

#[test]
fn killed_calls_leave_nothing_after_del_and_gc() {
    if !have_root() {
        return;
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("fault seed {seed}");
    let node = CniNode::new(Some("10.244.50.0/23"));
    let next = AtomicUsize::new(0);
    let killed = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= PAIRS {
                    break;
                }
                let pod = Netns::new("f");
                let id = format!("fault{i}");
                for (step, command) in ["ADD", "DEL"].into_iter().enumerate() {
                    let kill = fate(seed, (2 * i + step) as u64);
                    let out = call(&node, command, &id, &pod.path(), kill);
                    if out.killed {
                        killed.fetch_add(1, Ordering::Relaxed);
                    }
                    // A call that was not killed must have answered, and as the spec says.
                    if out.timed_out || (!out.killed && out.stderr.contains("panicked")) {
                        failures
                            .lock()
                            .unwrap()
                            .push(format!("{command} {id}: {out:?}"));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{failures:#?}");
    let killed = killed.into_inner();
    eprintln!("{killed} of {} calls killed mid-call", 2 * PAIRS);
    assert!(
        killed >= (2 * PAIRS) / (KILL_ONE_IN as usize) / 2,
        "only {killed} calls were killed while running: the test did not test"
    );

    // The runtime's clean-up: DEL of every pod it ever made (their namespaces are gone), then GC.
    let gone = Path::new("/run/netns/sluice-fault-gone");
    std::thread::scope(|s| {
        for w in 0..PARALLEL {
            let node = &node;
            s.spawn(move || {
                for i in (w..PAIRS).step_by(PARALLEL) {
                    call(node, "DEL", &format!("fault{i}"), gone, None).assert_ok();
                }
            });
        }
    });
    node.call_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        node.conf("1.1.0", json!({"cni.dev/valid-attachments": []}))
            .to_string()
            .as_bytes(),
    )
    .assert_ok();

    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());
    assert!(node.pod_routes().is_empty(), "{:?}", node.pod_routes());
    let files: BTreeSet<String> = std::fs::read_dir(node.ipam_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = [
        "allocations.json",
        "lock",
        "cni-stats.json",
        "cni-stats.lock",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert!(
        files.is_subset(&expected),
        "left in the IPAM directory: {files:?}"
    );
    let names: BTreeSet<String> = (0..PAIRS)
        .map(|i| sluice_net::podnet::host_ifname(&format!("fault{i}"), "eth0"))
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || processes_naming(&names)
            .is_empty()),
        "link reclaimers still running: {:?}",
        processes_naming(&names)
    );
}
