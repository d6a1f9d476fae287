//! `bench-cni`: ADD and DEL latency of sluice-cni against Debian's containernetworking-plugins
//! (bridge + host-local, ptp + host-local) on the same workload in the same run: 200 pods one
//! after another, then 200 pods 8 at a time. With hostPorts (`--hostports on`), each pod also gets
//! one port mapping (a hostPort of its own): sluice-cni with `runtimeConfig.portMappings` against
//! bridge + host-local chained with portmap (ADD: bridge then portmap with bridge's result as
//! `prevResult`; DEL: portmap then bridge, timed together). Each plugin is spawned directly from a thread that
//! entered the node namespace, as a runtime spawns it, so no wrapper cost is measured.
//! With `--dual on`, sluice-cni also runs on a dual-stack subnet.env (the IPv6 pair beside the
//! IPv4 one: every pod gets a /32 and a /128), against the same plugin IPv4 only.
//!
//! Usage: bench-cni [--pods N] [--parallel P] [--sluice PATH] [--cni-dir DIR] [--hostports on|off]
//! [--dual on|off]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use nix::sched::{setns, CloneFlags};
use serde_json::{json, Value};
use sluice_e2e::bench::Flags;
use sluice_e2e::cni::{call, Outcome};
use sluice_e2e::Netns;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Args {
    pods: usize,
    parallel: usize,
    sluice: PathBuf,
    cni_dir: PathBuf,
    hostports: bool,
    dual: bool,
}

const USAGE: &str =
    "usage: bench-cni [--pods N] [--parallel P] [--sluice PATH] [--cni-dir DIR] [--hostports on|off] [--dual on|off]";

fn parse_args() -> Args {
    let mut a = Args {
        pods: 200,
        parallel: 8,
        sluice: PathBuf::from("target/release/sluice"),
        cni_dir: PathBuf::from("/usr/lib/cni"),
        hostports: false,
        dual: false,
    };
    let mut flags = Flags::from_env("bench-cni", USAGE);
    while let Some((flag, value)) = flags.next_pair() {
        match flag.as_str() {
            "--pods" => a.pods = flags.number(&flag, &value),
            "--parallel" => a.parallel = flags.number(&flag, &value),
            "--sluice" => a.sluice = PathBuf::from(value),
            "--cni-dir" => a.cni_dir = PathBuf::from(value),
            "--hostports" => match value.as_str() {
                "on" => a.hostports = true,
                "off" => a.hostports = false,
                _ => flags.fail("--hostports takes on or off"),
            },
            "--dual" => match value.as_str() {
                "on" => a.dual = true,
                "off" => a.dual = false,
                _ => flags.fail("--dual takes on or off"),
            },
            other => flags.fail(&format!("unknown flag {other}")),
        }
    }
    flags.require(a.pods >= 1, "--pods must be at least 1");
    flags.require(a.parallel >= 1, "--parallel must be at least 1");
    a
}

/// One contender: its plugin directory (what CNI_PATH points at) and its network config.
#[derive(Clone)]
struct Contender {
    label: &'static str,
    bin_dir: PathBuf,
    plugin: PathBuf,
    conf: Value,
    /// Directory whose entries are its IPAM allocations.
    ipam_dir: PathBuf,
    /// Each pod gets one port mapping (hostPort 20000 + its index): in the plugin's own
    /// `runtimeConfig.portMappings`, or through this chained `portmap` binary.
    hostports: Option<HostportMode>,
}

#[derive(Clone)]
enum HostportMode {
    Own,
    Chained(PathBuf),
}

fn mapping(i: usize) -> Value {
    json!([{"hostPort": 20000 + i, "containerPort": 80, "protocol": "tcp"}])
}

struct Stats {
    add: Vec<Duration>,
    del: Vec<Duration>,
    add_wall: Duration,
    del_wall: Duration,
    leaks: String,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Runs `f(i)` for i in 0..n on `parallel` threads that each entered `node` first; returns the
/// per-call durations and the wall time.
fn run_phase(
    node: &Netns,
    n: usize,
    parallel: usize,
    f: impl Fn(usize) -> Outcome + Sync,
) -> (Vec<Duration>, Duration) {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let mut all: Vec<Duration> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                s.spawn(|| {
                    let ns = std::fs::File::open(node.path()).unwrap();
                    setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
                    let mut times = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break times;
                        }
                        let t = Instant::now();
                        let out = f(i);
                        times.push(t.elapsed());
                        assert_eq!(out.exit, 0, "call {i} failed: {out:?}");
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let wall = start.elapsed();
    all.sort();
    (all, wall)
}

fn invoke(c: &Contender, command: &str, i: usize, id: &str, netns: &Path) -> Outcome {
    let netns = netns.display().to_string();
    let bin_dir = c.bin_dir.display().to_string();
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns.as_str()),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", bin_dir.as_str()),
    ];
    let mut conf = c.conf.clone();
    let portmap = match &c.hostports {
        None => None,
        Some(HostportMode::Own) => {
            conf["runtimeConfig"] = json!({"portMappings": mapping(i)});
            None
        }
        Some(HostportMode::Chained(p)) => Some(p),
    };
    let Some(portmap) = portmap else {
        return call(Command::new(&c.plugin), &env, conf.to_string().as_bytes());
    };
    let chained = |prev: Option<Value>| {
        let mut pm = json!({"cniVersion": conf["cniVersion"], "name": conf["name"], "type": "portmap",
                            "capabilities": {"portMappings": true},
                            "runtimeConfig": {"portMappings": mapping(i)}});
        if let Some(p) = prev {
            pm["prevResult"] = p;
        }
        call(Command::new(portmap), &env, pm.to_string().as_bytes())
    };
    if command == "ADD" {
        let first = call(Command::new(&c.plugin), &env, conf.to_string().as_bytes());
        if first.exit != 0 {
            return first;
        }
        chained(Some(first.json()))
    } else {
        let first = chained(None);
        if first.exit != 0 {
            return first;
        }
        call(Command::new(&c.plugin), &env, conf.to_string().as_bytes())
    }
}

fn bench(c: &Contender, pods: usize, parallel: usize) -> Stats {
    let node = Netns::new("bn");
    node.sysctl("net.ipv4.ip_forward", "1");
    node.sysctl("net.ipv6.conf.all.forwarding", "1");
    let sandboxes: Vec<Netns> = (0..pods).map(|_| Netns::new("bp")).collect();
    let id = |i: usize| format!("bench{parallel}x{i}");
    let (add, add_wall) = run_phase(&node, pods, parallel, |i| {
        invoke(c, "ADD", i, &id(i), &sandboxes[i].path())
    });
    let mapped = if c.hostports.is_some() {
        nat_rules(&node)
    } else {
        0
    };
    let (del, del_wall) = run_phase(&node, pods, parallel, |i| {
        invoke(c, "DEL", i, &id(i), &sandboxes[i].path())
    });
    if c.hostports.is_some() {
        assert!(
            mapped >= pods,
            "{}: only {mapped} DNAT rules for {pods} pods",
            c.label
        );
    }
    let left_nat = if c.hostports.is_some() {
        nat_rules(&node)
    } else {
        0
    };
    let veths = node.ip_json(&["link", "show", "type", "veth"]).len();
    let host_routes = node
        .routes()
        .iter()
        .filter(|r| r["scope"] == "link" && r["dst"].as_str().is_some_and(|d| !d.contains('/')))
        .count()
        + node.ip_json(&["-6", "route", "show", "proto", "77"]).len();
    let allocations = std::fs::read_dir(&c.ipam_dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
                })
                .count()
        })
        .unwrap_or(0)
        + sluice_allocations(&c.ipam_dir);
    let pod_links: usize = sandboxes.iter().map(|s| s.links().len() - 1).sum();
    let leaks = if veths + host_routes + allocations + pod_links + left_nat == 0 {
        "none".to_string()
    } else {
        format!("veths {veths}, /32 and /128 routes {host_routes}, allocations {allocations}, pod links {pod_links}, DNAT rules {left_nat}")
    };
    Stats {
        add,
        del,
        add_wall,
        del_wall,
        leaks,
    }
}

/// Port mappings in the node: DNAT rules in nftables (iptables-nft's) and iptables-legacy, and
/// elements of sluice's nftables maps.
fn nat_rules(node: &Netns) -> usize {
    let count = |program: &str, args: &[&str]| {
        node.command(program)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(|l| {
                        if l.contains("map @hp_") {
                            0
                        } else if l.contains("dnat") || l.contains("DNAT --to-destination") {
                            1
                        } else {
                            l.split([',', '{', '}'])
                                .filter(|e| {
                                    e.contains(" : ")
                                        && ["tcp . ", "udp . ", "sctp . "]
                                            .iter()
                                            .any(|p| e.contains(p))
                                })
                                .count()
                        }
                    })
                    .sum::<usize>()
            })
            .unwrap_or(0)
    };
    count("nft", &["list", "ruleset"]) + count("iptables-legacy-save", &["-t", "nat"])
}

fn sluice_allocations(dir: &Path) -> usize {
    std::fs::read(dir.join("allocations.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|v| {
            ["allocations", "allocationsV6"]
                .iter()
                .filter_map(|k| v[*k].as_object().map(|o| o.len()))
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let args = parse_args();
    assert!(
        nix::unistd::geteuid().is_root(),
        "bench-cni needs root (it makes network namespaces)"
    );
    let work = tempfile::tempdir().unwrap();
    let sluice = std::fs::canonicalize(&args.sluice)
        .unwrap_or_else(|e| panic!("{}: {e}", args.sluice.display()));
    let sluice_bin = work.path().join("sluice-bin");
    std::fs::create_dir(&sluice_bin).unwrap();
    std::os::unix::fs::symlink(&sluice, sluice_bin.join("sluice-cni")).unwrap();
    std::fs::write(
        work.path().join("subnet.env"),
        "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.0.0/23\nSLUICE_MTU=1450\nSLUICE_IPMASQ=false\n",
    )
    .unwrap();
    std::fs::write(
        work.path().join("subnet-dual.env"),
        "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.0.0/23\nSLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:244::/64\nSLUICE_MTU=1450\nSLUICE_IPMASQ=false\n",
    )
    .unwrap();
    let host_local = |name: &str, subnet: &str| json!({"type": "host-local", "subnet": subnet, "dataDir": work.path().join(name)});
    let contenders = [
        Contender {
            label: "sluice-cni",
            bin_dir: sluice_bin.clone(),
            plugin: sluice_bin.join("sluice-cni"),
            conf: json!({"cniVersion": "1.0.0", "name": "benchsl", "type": "sluice-cni",
                         "subnetFile": work.path().join("subnet.env"), "ipamDir": work.path().join("sl-ipam")}),
            ipam_dir: work.path().join("sl-ipam"),
            hostports: None,
        },
        Contender {
            label: "ptp + host-local",
            bin_dir: args.cni_dir.clone(),
            plugin: args.cni_dir.join("ptp"),
            conf: json!({"cniVersion": "1.0.0", "name": "benchptp", "type": "ptp", "ipMasq": false, "mtu": 1450,
                         "ipam": host_local("ptp-ipam", "10.245.0.0/23")}),
            ipam_dir: work.path().join("ptp-ipam/benchptp"),
            hostports: None,
        },
        Contender {
            label: "bridge + host-local",
            bin_dir: args.cni_dir.clone(),
            plugin: args.cni_dir.join("bridge"),
            conf: json!({"cniVersion": "1.0.0", "name": "benchbr", "type": "bridge", "bridge": "benchbr0",
                         "isGateway": true, "ipMasq": false, "mtu": 1450,
                         "ipam": host_local("br-ipam", "10.246.0.0/23")}),
            ipam_dir: work.path().join("br-ipam/benchbr"),
            hostports: None,
        },
    ];
    let mut contenders = contenders.to_vec();
    if args.hostports {
        contenders.push(Contender {
            label: "sluice-cni + hostPort",
            bin_dir: sluice_bin.clone(),
            plugin: sluice_bin.join("sluice-cni"),
            conf: json!({"cniVersion": "1.0.0", "name": "benchslhp", "type": "sluice-cni",
                         "subnetFile": work.path().join("subnet.env"), "ipamDir": work.path().join("slhp-ipam")}),
            ipam_dir: work.path().join("slhp-ipam"),
            hostports: Some(HostportMode::Own),
        });
        contenders.push(Contender {
            label: "bridge + host-local + portmap",
            bin_dir: args.cni_dir.clone(),
            plugin: args.cni_dir.join("bridge"),
            conf: json!({"cniVersion": "1.0.0", "name": "benchbrpm", "type": "bridge", "bridge": "benchbr0",
                         "isGateway": true, "ipMasq": false, "mtu": 1450,
                         "ipam": host_local("brpm-ipam", "10.247.0.0/23")}),
            ipam_dir: work.path().join("brpm-ipam/benchbrpm"),
            hostports: Some(HostportMode::Chained(args.cni_dir.join("portmap"))),
        });
    }
    if args.dual {
        contenders.push(Contender {
            label: "sluice-cni dual-stack",
            bin_dir: sluice_bin.clone(),
            plugin: sluice_bin.join("sluice-cni"),
            conf: json!({"cniVersion": "1.0.0", "name": "benchsl6", "type": "sluice-cni",
                         "subnetFile": work.path().join("subnet-dual.env"), "ipamDir": work.path().join("sl6-ipam")}),
            ipam_dir: work.path().join("sl6-ipam"),
            hostports: None,
        });
    }
    println!("bench-cni: {} pods, sequential and {} at a time; times in ms per call (process spawn to exit)", args.pods, args.parallel);
    println!("sluice binary: {}", sluice.display());
    println!();
    println!("| plugin | mode | ADD p50 | ADD p99 | ADD total | DEL p50 | DEL p99 | DEL total | leaks after DEL |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut p50s: Vec<(&str, usize, Duration, Duration)> = Vec::new();
    for parallel in [1, args.parallel] {
        for c in &contenders {
            let s = bench(c, args.pods, parallel);
            let (a50, d50) = (pct(&s.add, 50.0), pct(&s.del, 50.0));
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                c.label,
                if parallel == 1 {
                    "sequential".to_string()
                } else {
                    format!("{parallel} at a time")
                },
                ms(a50),
                ms(pct(&s.add, 99.0)),
                ms(s.add_wall),
                ms(d50),
                ms(pct(&s.del, 99.0)),
                ms(s.del_wall),
                s.leaks
            );
            p50s.push((c.label, parallel, a50, d50));
        }
    }
    println!();
    for parallel in [1, args.parallel] {
        let row = |label: &str| {
            p50s.iter()
                .find(|r| r.0 == label && r.1 == parallel)
                .unwrap()
        };
        let ours = row("sluice-cni");
        let best_add = row("ptp + host-local").2.min(row("bridge + host-local").2);
        let best_del = row("ptp + host-local").3.min(row("bridge + host-local").3);
        println!(
            "parallel {parallel}: sluice ADD p50 / faster reference = {:.2}, DEL p50 / faster reference = {:.2} (target <= 0.50)",
            ours.2.as_secs_f64() / best_add.as_secs_f64(),
            ours.3.as_secs_f64() / best_del.as_secs_f64()
        );
        if args.dual {
            let dual = row("sluice-cni dual-stack");
            println!(
                "parallel {parallel}: dual-stack sluice ADD p50 {} ms ({:+.2} ms, x{:.2} of IPv4 only), DEL p50 {} ms ({:+.2} ms)",
                ms(dual.2),
                (dual.2.as_secs_f64() - ours.2.as_secs_f64()) * 1000.0,
                dual.2.as_secs_f64() / ours.2.as_secs_f64(),
                ms(dual.3),
                (dual.3.as_secs_f64() - ours.3.as_secs_f64()) * 1000.0
            );
        }
        if args.hostports {
            let hp = row("sluice-cni + hostPort");
            let pm = row("bridge + host-local + portmap");
            println!(
                "parallel {parallel}: one port mapping: sluice ADD p50 {} ms ({:+.2} ms over sluice without; target <= +2), DEL p50 {} ms ({:+.2} ms); bridge + host-local + portmap ADD p50 {} ms, DEL p50 {} ms: ADD ratio {:.2}, DEL ratio {:.2} (target <= 0.50; issue 21's anchor for that chain: 44-68 ms ADD p50)",
                ms(hp.2),
                (hp.2.as_secs_f64() - ours.2.as_secs_f64()) * 1000.0,
                ms(hp.3),
                (hp.3.as_secs_f64() - ours.3.as_secs_f64()) * 1000.0,
                ms(pm.2),
                ms(pm.3),
                hp.2.as_secs_f64() / pm.2.as_secs_f64(),
                hp.3.as_secs_f64() / pm.3.as_secs_f64()
            );
        }
    }
}
