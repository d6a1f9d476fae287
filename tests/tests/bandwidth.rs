//! Pod shaping with real packets: two namespaces joined by a veth, the netlink applier
//! (`sluice_net::shaping`, through `RtNetlink`) shaping the "host" side as for a pod, and iperf3
//! measuring each direction against the configured rate. The kernel's view is read back with
//! iproute2's `tc -j`, an encoder independent of sluice's. Then the same through the plugin binary:
//! ADD with `runtimeConfig.bandwidth`, iperf3 between the pod and a peer namespace behind the
//! node, CHECK, DEL and GC leaving no ifb.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::bench::{iperf_server, IPERF_PORT};
use sluice_e2e::cni::CniNode;
use sluice_e2e::lab::in_netns;
use sluice_e2e::{have_root, sh, Netns};
use sluice_net::bandwidth::{self, BandwidthEntry, ShapingPlan};
use sluice_net::kernel::{PodKernel, RtNetlink};
use std::net::Ipv4Addr;
use std::process::Command;

/// 20 Mbit/s each way, with a burst of 512 kbit (64 KB: one GSO segment, 43 full-size frames),
/// which keeps a single TCP flow from stalling on tbf drops.
const RATE: u64 = 20_000_000;
const BURST: u64 = 512_000;
/// Seconds measured, after [`OMIT`] seconds of slow start (and of the bucket's initial burst)
/// that iperf3 leaves out.
const SECS: u32 = 3;
const OMIT: u32 = 1;

fn have_iperf3() -> bool {
    let found = Command::new("iperf3").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have iperf3 (README's test command installs it)"
        );
        eprintln!("skipping: iperf3 is not installed");
    }
    found
}

/// Runs one kernel call of `RtNetlink` inside namespace `ns` (its thread enters it).
fn in_ns<R: Send + 'static>(
    ns: &str,
    f: impl for<'a> FnOnce(
            &'a mut RtNetlink,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = R> + 'a>>
        + Send
        + 'static,
) -> R {
    in_netns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async move {
                let mut k = RtNetlink::connect(None).unwrap();
                f(&mut k).await
            })
    })
}

fn apply(ns: &str, host: &str, plan: ShapingPlan) {
    let host = host.to_string();
    in_ns(ns, move |k| {
        Box::pin(async move { k.apply_shaping(&host, &plan).await.unwrap() })
    })
}

fn tc_json(ns: &str, args: &[&str]) -> Vec<Value> {
    let mut full = vec!["tc", "-j", "-n", ns];
    full.extend_from_slice(args);
    let text = sh(&full);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("tc -j {args:?}: {e}: {text}"))
}

fn qdisc_kinds(ns: &str, dev: &str) -> Vec<String> {
    tc_json(ns, &["qdisc", "show", "dev", dev])
        .iter()
        .map(|q| q["kind"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The root tbf of `dev` as iproute2 reads it: (rate bytes/s, burst bytes).
fn root_tbf(ns: &str, dev: &str) -> Option<(u64, u64)> {
    tc_json(ns, &["qdisc", "show", "dev", dev])
        .iter()
        .find(|q| q["kind"] == "tbf" && q["root"] == true)
        .map(|q| {
            let o = &q["options"];
            (o["rate"].as_u64().unwrap(), o["burst"].as_u64().unwrap())
        })
}

/// The mirred redirects on `dev`'s ingress: (protocol, target device).
fn ingress_redirects(ns: &str, dev: &str) -> Vec<(String, String)> {
    tc_json(ns, &["filter", "show", "dev", dev, "ingress"])
        .iter()
        .filter_map(|f| {
            let actions = f["options"]["actions"].as_array()?;
            let to = actions
                .iter()
                .find(|a| a["kind"] == "mirred" && a["mirred_action"] == "redirect")?;
            Some((
                f["protocol"].as_str().unwrap_or("").to_string(),
                to["to_dev"].as_str().unwrap_or("").to_string(),
            ))
        })
        .collect()
}

/// One bounded iperf3 run from `ns` to `server`: the receiver's goodput in bit/s. Retried (at most
/// 3 times) only when iperf3 gives no figure at all.
fn iperf(ns: &str, server: Ipv4Addr) -> f64 {
    let mut last = String::new();
    for _ in 0..3 {
        let out = sluice_e2e::run(
            Command::new("timeout")
                .args(["-k", "5", &(SECS + OMIT + 20).to_string()])
                .args(["ip", "netns", "exec", ns, "iperf3", "-J", "-c"])
                .arg(server.to_string())
                .args(["-p", &IPERF_PORT.to_string()])
                .args(["-t", &SECS.to_string(), "-O", &OMIT.to_string()])
                .args(["--connect-timeout", "3000"]),
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps;
        }
        last = format!(
            "{} {}",
            v["error"].as_str().unwrap_or(""),
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    panic!("iperf3 from {ns} to {server} failed 3 times: {last}");
}

fn within_ten_percent(what: &str, ns: &str, server: Ipv4Addr) {
    sluice_e2e::bench::within_ten_percent(what, RATE as f64, || iperf(ns, server));
}

#[test]
fn shaping_holds_each_direction_to_its_rate_and_goes_away() {
    if !have_root() || !have_iperf3() {
        return;
    }
    // "host" holds the shaped veth end, as the node does; "pod" the other end.
    let host_ns = Netns::new("bwh");
    let pod_ns = Netns::new("bwp");
    let host = sluice_net::podnet::host_ifname(&host_ns.name, "eth0");
    let ifb = bandwidth::ifb_name(&host);
    host_ns.ip(&[
        "link",
        "add",
        &host,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pod_ns.name,
    ]);
    host_ns.ip(&["addr", "add", "172.31.201.1/30", "dev", &host]);
    host_ns.ip(&["link", "set", &host, "up"]);
    pod_ns.ip(&["addr", "add", "172.31.201.2/30", "dev", "eth0"]);
    pod_ns.ip(&["link", "set", "eth0", "up"]);
    let host_ip = Ipv4Addr::new(172, 31, 201, 1);
    let pod_ip = Ipv4Addr::new(172, 31, 201, 2);
    assert!(pod_ns.ping("172.31.201.1", std::time::Duration::from_secs(2)));

    let _pod_server = iperf_server(&pod_ns.name);
    let _host_server = iperf_server(&host_ns.name);
    // Unshaped, the veth carries far more: the figures below are the shaping's doing.
    let unshaped = iperf(&pod_ns.name, host_ip);
    eprintln!("unshaped: {:.0} Mbit/s", unshaped / 1e6);
    assert!(unshaped > 3.0 * RATE as f64, "{unshaped}");

    let plan = bandwidth::plan(&BandwidthEntry {
        ingress_rate: RATE,
        ingress_burst: BURST,
        egress_rate: RATE,
        egress_burst: BURST,
    })
    .unwrap();
    apply(&host_ns.name, &host, plan);
    // Applying again changes nothing: one tbf each, one redirect.
    apply(&host_ns.name, &host, plan);
    let want = Some((RATE / 8, BURST / 8));
    assert_eq!(root_tbf(&host_ns.name, &host), want, "tbf on {host}");
    assert_eq!(root_tbf(&host_ns.name, &ifb), want, "tbf on {ifb}");
    assert_eq!(
        ingress_redirects(&host_ns.name, &host),
        [("all".to_string(), ifb.clone())]
    );
    let seen = {
        let host = host.clone();
        in_ns(&host_ns.name, move |k| {
            Box::pin(async move { k.observe_shaping(&host).await.unwrap() })
        })
    };
    assert!(
        bandwidth::problems(&plan, &host, &seen).is_empty(),
        "{seen:?}"
    );

    // To the pod: the pod serves, the host sends; from the pod: the other way round. iperf3
    // counts payload, tbf frames: at MTU 1500 the payload is 1448 of 1514 bytes, 95.6 %.
    within_ten_percent("to the pod", &host_ns.name, pod_ip);
    within_ten_percent("from the pod", &pod_ns.name, host_ip);

    // A plan without egress takes the redirect and the ifb away and keeps the ingress tbf.
    apply(
        &host_ns.name,
        &host,
        ShapingPlan {
            egress: None,
            ..plan
        },
    );
    assert!(!host_ns.links().contains(&ifb), "{:?}", host_ns.links());
    assert!(ingress_redirects(&host_ns.name, &host).is_empty());
    assert!(!qdisc_kinds(&host_ns.name, &host).contains(&"ingress".to_string()));
    assert_eq!(root_tbf(&host_ns.name, &host), want);
    // And with no shaping at all, the tbf goes too.
    apply(&host_ns.name, &host, ShapingPlan::default());
    assert_eq!(root_tbf(&host_ns.name, &host), None);

    // remove() deletes the ifb, and only that.
    apply(&host_ns.name, &host, plan);
    assert!(host_ns.links().contains(&ifb));
    let removed = {
        let host = host.clone();
        in_ns(&host_ns.name, move |k| {
            Box::pin(async move { k.remove_shaping(&host).await.unwrap() })
        })
    };
    assert!(removed);
    assert!(!host_ns.links().contains(&ifb));
    assert!(host_ns.links().contains(&host));
}

#[test]
fn a_missing_host_veth_is_an_error_and_makes_nothing() {
    if !have_root() {
        return;
    }
    let ns = Netns::new("bwm");
    let host = sluice_net::podnet::host_ifname(&ns.name, "eth0");
    let plan = bandwidth::plan(&BandwidthEntry {
        ingress_rate: RATE,
        ingress_burst: BURST,
        egress_rate: RATE,
        egress_burst: BURST,
    })
    .unwrap();
    let err = {
        let host = host.clone();
        in_ns(&ns.name, move |k| {
            Box::pin(async move { k.apply_shaping(&host, &plan).await.unwrap_err().to_string() })
        })
    };
    assert!(err.contains(&host), "{err}");
    assert_eq!(ns.links(), ["lo"]);
}

fn bandwidth_conf(node: &CniNode, bandwidth: Value) -> Value {
    node.conf(
        "1.1.0",
        serde_json::json!({"runtimeConfig": {"bandwidth": bandwidth}}),
    )
}

fn ifbs(ns: &Netns) -> Vec<String> {
    ns.links()
        .into_iter()
        .filter(|l| bandwidth::is_ifb_name(l))
        .collect()
}

#[test]
fn the_plugin_shapes_a_pod_both_ways_and_del_and_gc_leave_no_ifb() {
    if !have_root() || !have_iperf3() {
        return;
    }
    let node = CniNode::new(Some("10.244.21.0/24"));
    // A peer behind the node, as another host would be: 172.31.202.2, routed through the node.
    let peer = Netns::new("bwq");
    node.ns.ip(&[
        "link", "add", "bwpeer0", "type", "veth", "peer", "name", "eth0", "netns", &peer.name,
    ]);
    node.ns
        .ip(&["addr", "add", "172.31.202.1/30", "dev", "bwpeer0"]);
    node.ns.ip(&["link", "set", "bwpeer0", "up"]);
    peer.ip(&["addr", "add", "172.31.202.2/30", "dev", "eth0"]);
    peer.ip(&["link", "set", "eth0", "up"]);
    peer.ip(&["route", "add", "default", "via", "172.31.202.1"]);
    let peer_ip = Ipv4Addr::new(172, 31, 202, 2);

    let conf = bandwidth_conf(
        &node,
        serde_json::json!({
            "ingressRate": RATE, "ingressBurst": BURST,
            "egressRate": RATE, "egressBurst": BURST,
        }),
    );
    let pod = Netns::new("bwc");
    let out = node
        .call("ADD", "bwpod", Some(&pod.path()), &conf)
        .assert_ok()
        .json();
    let pod_ip: Ipv4Addr = out["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .parse()
        .unwrap();
    let host = sluice_net::podnet::host_ifname("bwpod", "eth0");
    let ifb = bandwidth::ifb_name(&host);
    let want = Some((RATE / 8, BURST / 8));
    assert_eq!(root_tbf(&node.ns.name, &host), want);
    assert_eq!(root_tbf(&node.ns.name, &ifb), want);
    assert_eq!(
        ingress_redirects(&node.ns.name, &host),
        [("all".to_string(), ifb.clone())]
    );
    node.call("CHECK", "bwpod", Some(&pod.path()), &conf)
        .assert_ok();

    let _pod_server = iperf_server(&pod.name);
    let _peer_server = iperf_server(&peer.name);
    within_ten_percent("to the pod (plugin)", &peer.name, pod_ip);
    within_ten_percent("from the pod (plugin)", &pod.name, peer_ip);

    // CHECK sees a lost ifb.
    node.ns.ip(&["link", "del", &ifb]);
    let failed = node.call("CHECK", "bwpod", Some(&pod.path()), &conf);
    assert_eq!(failed.error_code(), 102, "{failed:?}");
    assert!(failed.json()["msg"].as_str().unwrap().contains(&ifb));
    // A repeated ADD puts everything back; DEL takes it all away.
    node.call("ADD", "bwpod", Some(&pod.path()), &conf)
        .assert_ok();
    assert_eq!(ifbs(&node.ns), [ifb]);
    node.call("DEL", "bwpod", Some(&pod.path()), &conf)
        .assert_ok();
    assert!(ifbs(&node.ns).is_empty(), "{:?}", node.ns.links());
    assert!(node.pod_links().is_empty(), "{:?}", node.pod_links());

    // GC removes the ifb of an attachment the runtime no longer lists, and keeps a listed one's.
    let pod2 = Netns::new("bwc");
    for c in ["bwkeep", "bwgone"] {
        let p = if c == "bwkeep" { &pod } else { &pod2 };
        node.call("ADD", c, Some(&p.path()), &conf).assert_ok();
    }
    assert_eq!(ifbs(&node.ns).len(), 2);
    let mut gc = node.conf(
        "1.1.0",
        serde_json::json!({"cni.dev/valid-attachments": [{"containerID": "bwkeep", "ifname": "eth0"}]}),
    );
    gc["runtimeConfig"] = conf["runtimeConfig"].clone();
    node.call("GC", "", None, &gc).assert_ok();
    assert_eq!(
        ifbs(&node.ns),
        [bandwidth::ifb_name(&sluice_net::podnet::host_ifname(
            "bwkeep", "eth0"
        ))]
    );
    node.call("DEL", "bwkeep", Some(&pod.path()), &conf)
        .assert_ok();
    assert!(ifbs(&node.ns).is_empty());
}

#[test]
fn the_plugin_refuses_bad_bandwidth_and_makes_nothing() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.22.0/24"));
    let pod = Netns::new("bwc");
    for (bw, code) in [
        (serde_json::json!({"ingressRate": RATE}), 7),
        (
            serde_json::json!({"egressRate": RATE, "egressBurst": 34_359_738_368u64}),
            7,
        ),
        (
            serde_json::json!({"ingressRate": -1, "ingressBurst": BURST}),
            6,
        ),
    ] {
        let conf = bandwidth_conf(&node, bw.clone());
        let out = node.call("ADD", "bwbad", Some(&pod.path()), &conf);
        assert_eq!(out.error_code(), code, "{bw}: {out:?}");
        assert!(node.pod_links().is_empty(), "{bw}: {:?}", node.pod_links());
        assert!(node.allocations().is_empty(), "{bw}");
        assert_eq!(pod.links(), ["lo"], "{bw}");
        // DEL of the same attachment, same configuration, succeeds.
        node.call("DEL", "bwbad", Some(&pod.path()), &conf)
            .assert_ok();
    }
}

#[test]
fn the_kernel_takes_the_burst_kubelet_annotations_bring() {
    if !have_root() {
        return;
    }
    // containerd turns `kubernetes.io/egress-bandwidth: 10M` into a rate with a burst of
    // u32::MAX bits (512 MiB); and a rate past 2^32 bytes/s needs TCA_TBF_RATE64.
    let ns = Netns::new("bwk");
    let host = sluice_net::podnet::host_ifname(&ns.name, "eth0");
    ns.ip(&["link", "add", &host, "type", "veth", "peer", "name", "bwk0"]);
    ns.ip(&["link", "set", &host, "up"]);
    let burst = u64::from(u32::MAX);
    let plan = bandwidth::plan(&BandwidthEntry {
        ingress_rate: 40_000_000_000,
        ingress_burst: 8_000_000,
        egress_rate: 10_000_000,
        egress_burst: burst,
    })
    .unwrap();
    apply(&ns.name, &host, plan);
    let ifb = bandwidth::ifb_name(&host);
    // iproute2 reads the burst back from the kernel's bucket time in 64 ns ticks, which at
    // 5 GB/s rounds it by up to 320 bytes a tick: a percent.
    let (rate, got_burst) = root_tbf(&ns.name, &host).unwrap();
    assert_eq!(rate, 5_000_000_000);
    assert!(got_burst.abs_diff(1_000_000) <= 10_000, "{got_burst}");
    // 512 MiB asked; the bucket holds 2^32 ns of the rate, 5.37 MB.
    let (rate, got_burst) = root_tbf(&ns.name, &ifb).unwrap();
    assert_eq!(rate, 1_250_000);
    assert!(got_burst.abs_diff(5_368_709) <= 1_000, "{got_burst}");
    assert!(burst / 8 > 100 * got_burst);
}
