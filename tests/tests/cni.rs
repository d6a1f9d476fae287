//! The CNI plugin end to end: the built binary, called by the name `sluice-cni` with the CNI
//! environment and stdin, wiring real veths and routes in namespaces this test made.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use sluice_e2e::cni::CniNode;
use sluice_e2e::{have_root, Netns};
use std::collections::BTreeSet;
use std::time::Duration;

const PING: Duration = Duration::from_secs(2);

fn address_of(result: &serde_json::Value) -> String {
    let a = result["ips"][0]["address"].as_str().unwrap();
    a.strip_suffix("/32")
        .unwrap_or_else(|| panic!("not a /32: {a}"))
        .to_string()
}

#[test]
fn twenty_pods_reach_each_other_and_the_host_and_del_leaves_nothing() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.7.0/24"));
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..20).map(|_| Netns::new("p")).collect();
    let ips: Vec<String> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            address_of(
                &node
                    .call("ADD", &format!("pod{i}"), Some(&p.path()), &conf)
                    .assert_ok()
                    .json(),
            )
        })
        .collect();
    assert_eq!(
        ips.iter().collect::<BTreeSet<_>>().len(),
        20,
        "addresses must differ: {ips:?}"
    );
    for (i, pod) in pods.iter().enumerate() {
        // The pod holds its /32 on eth0 with the configured MTU and a default route via the gateway.
        let addrs = pod.ip_json(&["-4", "addr", "show", "dev", "eth0"]);
        assert_eq!(addrs[0]["mtu"], 1450);
        assert_eq!(addrs[0]["addr_info"][0]["local"], ips[i].as_str());
        assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32);
        let default: Vec<_> = pod
            .routes()
            .into_iter()
            .filter(|r| r["dst"] == "default")
            .collect();
        assert_eq!(default[0]["gateway"], "169.254.1.1");
        let next = &ips[(i + 1) % ips.len()];
        assert!(
            pod.ping(next, PING),
            "pod{i} ({}) cannot reach {next}",
            ips[i]
        );
        assert!(pod.ping("192.0.2.1", PING), "pod{i} cannot reach its host");
        assert!(node.ns.ping(&ips[i], PING), "the host cannot reach pod{i}");
    }
    // One pod to every other.
    for ip in &ips[1..] {
        assert!(pods[0].ping(ip, PING), "pod0 cannot reach {ip}");
    }
    assert_eq!(node.pod_links().len(), 20);
    assert_eq!(node.pod_routes().len(), 20);
    for (i, p) in pods.iter().enumerate() {
        node.call("DEL", &format!("pod{i}"), Some(&p.path()), &conf)
            .assert_ok();
        assert!(
            p.links().iter().all(|l| l == "lo"),
            "pod{i} still has {:?}",
            p.links()
        );
    }
    assert!(
        node.pod_links().is_empty(),
        "veths left: {:?}",
        node.pod_links()
    );
    assert!(
        node.pod_routes().is_empty(),
        "routes left: {:?}",
        node.pod_routes()
    );
    assert!(
        node.allocations().is_empty(),
        "allocations left: {:?}",
        node.allocations()
    );
}

#[test]
fn sixty_four_concurrent_adds_get_distinct_addresses() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.8.0/24"));
    let conf = node.conf("1.0.0", json!({}));
    let pods: Vec<Netns> = (0..64).map(|_| Netns::new("c")).collect();
    let ips: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (node, conf) = (&node, &conf);
                s.spawn(move || {
                    address_of(
                        &node
                            .call("ADD", &format!("cc{i}"), Some(&p.path()), conf)
                            .assert_ok()
                            .json(),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(ips.iter().collect::<BTreeSet<_>>().len(), 64, "{ips:?}");
    assert_eq!(node.allocations().len(), 64);
    assert_eq!(node.pod_routes().len(), 64);
    std::thread::scope(|s| {
        for (i, p) in pods.iter().enumerate() {
            let (node, conf) = (&node, &conf);
            s.spawn(move || {
                node.call("DEL", &format!("cc{i}"), Some(&p.path()), conf)
                    .assert_ok()
                    .exit
            });
        }
    });
    assert!(node.allocations().is_empty());
    assert!(node.pod_links().is_empty());
}

#[test]
fn an_exhausted_subnet_fails_clearly_and_leaves_nothing() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.9.0/29"));
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..7).map(|_| Netns::new("x")).collect();
    for (i, p) in pods[..6].iter().enumerate() {
        node.call("ADD", &format!("ex{i}"), Some(&p.path()), &conf)
            .assert_ok();
    }
    let out = node.call("ADD", "ex6", Some(&pods[6].path()), &conf);
    assert_eq!(out.error_code(), 101);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("no free address in 10.244.9.0/29"),
        "{out:?}"
    );
    assert_eq!(node.pod_links().len(), 6);
    assert_eq!(node.allocations().len(), 6);
    assert!(
        pods[6].links().iter().all(|l| l == "lo"),
        "the failed pod kept {:?}",
        pods[6].links()
    );
}

#[test]
fn check_detects_a_removed_route() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.10.0/24"));
    let pod = Netns::new("k");
    let result = node
        .call(
            "ADD",
            "chk",
            Some(&pod.path()),
            &node.conf("1.1.0", json!({})),
        )
        .assert_ok()
        .json();
    let conf = node.conf("1.1.0", json!({ "prevResult": result }));
    node.call("CHECK", "chk", Some(&pod.path()), &conf)
        .assert_ok();
    let ip = address_of(&result);
    node.ns.ip(&["route", "del", &format!("{ip}/32")]);
    let out = node.call("CHECK", "chk", Some(&pod.path()), &conf);
    assert_eq!(out.error_code(), 102);
    assert!(out.stdout.contains("host route"), "{out:?}");
    // A repeated ADD repairs it, with the same address.
    let again = node
        .call(
            "ADD",
            "chk",
            Some(&pod.path()),
            &node.conf("1.1.0", json!({})),
        )
        .assert_ok()
        .json();
    assert_eq!(address_of(&again), ip);
    node.call("CHECK", "chk", Some(&pod.path()), &conf)
        .assert_ok();
    pod.ip(&["route", "del", "default"]);
    let out = node.call("CHECK", "chk", Some(&pod.path()), &conf);
    assert_eq!(out.error_code(), 102);
    assert!(out.stdout.contains("default route"), "{out:?}");
    // CHECK does not exist before 0.4.0.
    assert_eq!(
        node.call(
            "CHECK",
            "chk",
            Some(&pod.path()),
            &node.conf("0.3.1", json!({}))
        )
        .error_code(),
        1
    );
}

#[test]
fn gc_frees_what_is_stale_and_keeps_what_is_valid() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.11.0/24"));
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("g")).collect();
    let ips: Vec<String> = pods
        .iter()
        .enumerate()
        .map(|(i, p)| {
            address_of(
                &node
                    .call("ADD", &format!("gc{i}"), Some(&p.path()), &conf)
                    .assert_ok()
                    .json(),
            )
        })
        .collect();
    let valid = json!({ "cni.dev/valid-attachments": [
        {"containerID": "gc0", "ifname": "eth0"},
        {"containerID": "gc1", "ifname": "eth0"},
    ]});
    node.call_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        node.conf("1.1.0", valid).to_string().as_bytes(),
    )
    .assert_ok();
    let kept: BTreeSet<String> = node.allocations().keys().cloned().collect();
    assert_eq!(kept, ips[..2].iter().cloned().collect());
    assert_eq!(node.pod_links().len(), 2);
    assert_eq!(node.pod_routes().len(), 2);
    assert!(pods[0].ping(&ips[1], PING), "GC broke a valid pod");
    assert!(pods[2].links().iter().all(|l| l == "lo"));
    // GC is a 1.1.0 verb.
    let old = node.call_raw(
        &[("CNI_COMMAND", "GC")],
        node.conf("1.0.0", json!({})).to_string().as_bytes(),
    );
    assert_eq!(old.error_code(), 1);
}

#[test]
fn bad_input_gets_the_right_code_and_no_panic() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.12.0/24"));
    let pod = Netns::new("b");
    let conf = node.conf("1.1.0", json!({})).to_string();
    let path = pod.path().display().to_string();
    let env = |cmd: &'static str, cid: &'static str| {
        vec![
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", cid),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
    };
    let with_netns = |mut e: Vec<(&'static str, &'static str)>, p: &'static str| {
        e.push(("CNI_NETNS", p));
        e
    };
    let path: &'static str = Box::leak(path.into_boxed_str());
    // Garbage stdin.
    assert_eq!(
        node.call_raw(&with_netns(env("ADD", "b1"), path), b"\x00\xffnot json")
            .error_code(),
        6
    );
    assert_eq!(
        node.call_raw(&with_netns(env("ADD", "b1"), path), b"")
            .error_code(),
        6
    );
    // Missing environment.
    assert_eq!(
        node.call_raw(&[("CNI_COMMAND", "ADD")], conf.as_bytes())
            .error_code(),
        4
    );
    assert_eq!(
        node.call_raw(&env("ADD", "b1"), conf.as_bytes())
            .error_code(),
        4,
        "no CNI_NETNS"
    );
    assert_eq!(
        node.call_raw(&[], conf.as_bytes()).error_code(),
        4,
        "no CNI_COMMAND"
    );
    assert_eq!(
        node.call_raw(&[("CNI_COMMAND", "FROB")], conf.as_bytes())
            .error_code(),
        4
    );
    // Unknown version.
    let future = node.conf("9.0.0", json!({})).to_string();
    assert_eq!(
        node.call_raw(&with_netns(env("ADD", "b1"), path), future.as_bytes())
            .error_code(),
        1
    );
    // A netns that does not exist: unknown container, nothing allocated.
    let gone = node.call_raw(
        &with_netns(env("ADD", "b1"), "/run/netns/sluice-no-such-ns"),
        conf.as_bytes(),
    );
    assert_eq!(gone.error_code(), 3);
    assert!(node.allocations().is_empty());
    assert!(node.pod_links().is_empty());
    // No subnet yet: ADD says try again later, STATUS says not available.
    std::fs::remove_file(node.dir.path().join("subnet.env")).unwrap();
    let out = node.call_raw(&with_netns(env("ADD", "b1"), path), conf.as_bytes());
    assert_eq!(out.error_code(), 11);
    assert!(out.stdout.contains("no usable pod subnet"), "{out:?}");
    assert_eq!(
        node.call_raw(&[("CNI_COMMAND", "STATUS")], conf.as_bytes())
            .error_code(),
        50
    );
    node.set_subnet("10.244.12.0/24");
    node.call_raw(&[("CNI_COMMAND", "STATUS")], conf.as_bytes())
        .assert_ok();
    assert!(node.pod_links().is_empty() && node.allocations().is_empty());
}

#[test]
fn del_with_a_vanished_netns_frees_the_address_and_host_side() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.13.0/24"));
    let conf = node.conf("0.4.0", json!({}));
    let pod = Netns::new("v");
    let path = pod.path();
    node.call("ADD", "van", Some(&path), &conf).assert_ok();
    assert_eq!(node.pod_links().len(), 1);
    // The runtime lost the sandbox (a crash, a reboot) and still calls DEL with the old path;
    // and a pod side that lingers must not matter. The host side goes, the address is freed.
    drop(pod);
    node.call("DEL", "van", Some(&path), &conf).assert_ok();
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());
    assert!(node.pod_routes().is_empty());
    assert!(node.allocations().is_empty());
    // And again: DEL of something already gone succeeds.
    node.call("DEL", "van", Some(&path), &conf).assert_ok();
    node.call("DEL", "van", None, &conf).assert_ok();
}

#[test]
fn every_version_gets_its_own_result_shape() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.14.0/24"));
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .into_iter()
        .enumerate()
    {
        let pod = Netns::new("s");
        let conf = node.conf(version, json!({ "dns": {"nameservers": ["10.96.0.10"]} }));
        let r = node
            .call("ADD", &format!("ver{i}"), Some(&pod.path()), &conf)
            .assert_ok()
            .json();
        assert_eq!(r["cniVersion"], version);
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            version.starts_with("0."),
            "{version}: {r}"
        );
        assert_eq!(
            r["interfaces"][1].get("mtu").is_some(),
            version == "1.1.0",
            "{version}: {r}"
        );
        assert_eq!(r["interfaces"][1]["name"], "eth0");
        assert_eq!(
            r["interfaces"][1]["sandbox"],
            pod.path().display().to_string()
        );
        assert_eq!(r["dns"]["nameservers"][0], "10.96.0.10");
        node.call("DEL", &format!("ver{i}"), Some(&pod.path()), &conf)
            .assert_ok();
    }
    // Chained after another plugin: sluice appends to prevResult.
    let pod = Netns::new("s");
    let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "other0", "mac": "aa:bb:cc:dd:ee:ff"}],
                      "ips": [{"address": "192.0.2.77/24", "interface": 0}], "dns": {}});
    let r = node
        .call(
            "ADD",
            "chained",
            Some(&pod.path()),
            &node.conf("1.0.0", json!({ "prevResult": prev })),
        )
        .assert_ok()
        .json();
    assert_eq!(r["interfaces"][0]["name"], "other0");
    assert_eq!(r["ips"][1]["interface"], 2);
    node.call(
        "DEL",
        "chained",
        Some(&pod.path()),
        &node.conf("1.0.0", json!({})),
    )
    .assert_ok();
}

#[test]
fn version_and_subcommand_dispatch() {
    let bin = sluice_e2e::sluice_bin();
    let out = sluice_e2e::cni::output(bin.to_str().unwrap(), &["version", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["profile"], "debug");
    assert!(v["commit"].as_str().is_some_and(|c| !c.is_empty()));
    // The allocator is jemalloc with its options compiled in (.cargo/config.toml), as its
    // statistics at exit say.
    let out = std::process::Command::new(&bin)
        .arg("version")
        .env("_RJEM_MALLOC_CONF", "stats_print:true")
        .output()
        .unwrap();
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(
        stats.contains("opt.narenas: 1") && stats.contains("opt.dirty_decay_ms: 100"),
        "{stats}"
    );
    // `sluice cni` is the plugin by subcommand; VERSION needs no root.
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("cni");
    let out = sluice_e2e::cni::call(
        cmd,
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"0.4.0"}"#,
    );
    assert_eq!(out.exit, 0, "{out:?}");
    let j = out.json();
    assert_eq!(j["cniVersion"], "0.4.0");
    assert_eq!(
        j["supportedVersions"],
        json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );
}

/// sluice-cni as the first plugin of a longer chain, as a runtime runs one: the next plugin
/// (containernetworking-plugins' `tuning`) takes sluice's result as its prevResult, does its
/// part in the pod and passes the result on; CHECK goes down the chain with the final result,
/// DEL in reverse order, and nothing is left.
#[test]
fn first_plugin_of_a_longer_chain() {
    if !have_root() {
        return;
    }
    let tuning = std::path::Path::new("/usr/lib/cni/tuning");
    if !tuning.exists() {
        eprintln!(
            "first_plugin_of_a_longer_chain: skipped: no {} (Debian's containernetworking-plugins)",
            tuning.display()
        );
        return;
    }
    let node = CniNode::new(Some("10.244.15.0/24"));
    let pod = Netns::new("ch");
    let netns = pod.path().display().to_string();
    let tuning_call = |command: &str, prev: &serde_json::Value| {
        let conf = json!({"cniVersion": "1.0.0", "name": "sluice", "type": "tuning",
                          "sysctl": {"net.ipv4.conf.eth0.accept_local": "1"}, "prevResult": prev});
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "chain"),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
        ];
        sluice_e2e::cni::call(
            std::process::Command::new(tuning),
            &env,
            conf.to_string().as_bytes(),
        )
    };
    let first = node
        .call(
            "ADD",
            "chain",
            Some(&pod.path()),
            &node.conf("1.0.0", json!({})),
        )
        .assert_ok()
        .json();
    let out = tuning_call("ADD", &first);
    assert_eq!(out.exit, 0, "tuning ADD after sluice-cni: {out:?}");
    let last = out.json();
    assert_eq!(last["ips"], first["ips"], "{last}");
    assert_eq!(last["interfaces"], first["interfaces"], "{last}");
    assert_eq!(last["routes"], first["routes"], "{last}");
    let sysctl = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .args(["cat", "/proc/sys/net/ipv4/conf/eth0/accept_local"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&sysctl.stdout).trim(),
        "1",
        "{sysctl:?}"
    );
    // The pod is wired as the chain's result says: its node reaches it at that address.
    let ip = address_of(&last);
    assert!(node.ns.ping(&ip, PING), "the node cannot reach {ip}");
    node.call(
        "CHECK",
        "chain",
        Some(&pod.path()),
        &node.conf("1.0.0", json!({ "prevResult": last })),
    )
    .assert_ok();
    let out = tuning_call("CHECK", &last);
    assert_eq!(out.exit, 0, "tuning CHECK: {out:?}");
    let out = tuning_call("DEL", &last);
    assert_eq!(out.exit, 0, "tuning DEL: {out:?}");
    node.call(
        "DEL",
        "chain",
        Some(&pod.path()),
        &node.conf("1.0.0", json!({})),
    )
    .assert_ok();
    assert!(node.allocations().is_empty(), "{:?}", node.allocations());
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());
}
