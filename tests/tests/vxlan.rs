//! The VXLAN datapath in the kernel: "nodes" are namespaces joined by a bridge (the underlay),
//! each with a "pod" namespace behind a veth. sluice-net's applier runs on a thread that entered
//! the node's namespace (current-thread runtime), and real packets prove the result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use nix::sched::CloneFlags;
use serde_json::Value;
use sluice_e2e::{conntrack_entries, have_root, sh, wait_until, Netns};
use sluice_net::lease::{format_mac, NodeRecord};
use sluice_net::vxlan::apply::VxlanKernel;
use sluice_net::vxlan::diff::{Change, Observed};
use sluice_net::vxlan::{plan, vtep_mac, VxlanConfig, VxlanPlan, VXLAN_IFNAME};
use std::net::Ipv4Addr;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(5);

/// Runs `f` with a [`VxlanKernel`] connected inside `ns`, on a thread that entered it.
fn in_ns<R: Send + 'static>(
    ns: &Netns,
    f: impl AsyncFnOnce(&mut VxlanKernel) -> R + Send + 'static,
) -> R {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut kernel = VxlanKernel::connect().unwrap();
            f(&mut kernel).await
        })
    })
    .join()
    .unwrap()
}

struct Node {
    ns: Netns,
    pod: Netns,
    record: NodeRecord,
    cfg: VxlanConfig,
}

impl Node {
    fn pod_ip(&self) -> String {
        let [a, b, c, _] = self.record.subnet.expect("an IPv4 lab").network().octets();
        format!("{a}.{b}.{c}.10")
    }

    fn plan(&self, peers: &[&Node]) -> VxlanPlan {
        let records: Vec<NodeRecord> = peers.iter().map(|p| p.record.clone()).collect();
        plan(&self.record, &records, &self.cfg)
    }

    fn sync(&self, peers: &[&Node]) -> Vec<Change> {
        let plan = self.plan(peers);
        in_ns(&self.ns, async move |k| k.sync(&plan).await.unwrap())
    }

    fn observe(&self) -> Observed {
        in_ns(&self.ns, async |k| k.observe(VXLAN_IFNAME).await.unwrap())
    }

    fn json(&self, cmd: &[&str]) -> Vec<Value> {
        let mut full = vec!["ip", "netns", "exec", &self.ns.name];
        full.extend_from_slice(cmd);
        let text = sh(&full);
        if text.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str(&text).unwrap()
    }

    fn owned_routes(&self) -> Vec<Value> {
        self.ns
            .ip_json(&["-4", "route", "show", "proto", "77", "dev", VXLAN_IFNAME])
    }

    fn fdb(&self) -> Vec<Value> {
        self.json(&["bridge", "-j", "fdb", "show", "dev", VXLAN_IFNAME])
            .into_iter()
            .filter(|e| e.get("dst").is_some())
            .collect()
    }

    fn neighbours(&self) -> Vec<Value> {
        self.ns.ip_json(&[
            "-4",
            "neigh",
            "show",
            "dev",
            VXLAN_IFNAME,
            "nud",
            "permanent",
        ])
    }

    fn reaches(&self, other: &Node) -> bool {
        wait_until(WAIT, || {
            self.pod.ping(&other.pod_ip(), Duration::from_secs(1))
        })
    }
}

/// The underlay (a bridge in its own namespace) and `n` nodes on it, each with one pod.
struct Lab {
    switch: Netns,
    nodes: Vec<Node>,
}

fn lab(n: u8) -> Lab {
    let switch = Netns::new("sw");
    switch.ip(&["link", "add", "br0", "type", "bridge"]);
    switch.ip(&["link", "set", "br0", "up"]);
    let nodes = (1..=n)
        .map(|i| {
            let ns = Netns::new("n");
            let pod = Netns::new("p");
            let port = format!("swp{i}");
            switch.ip(&[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
            ]);
            switch.ip(&["link", "set", &port, "master", "br0", "up"]);
            let underlay: Ipv4Addr = format!("192.168.77.{}", 10 + i).parse().unwrap();
            ns.ip(&["addr", "add", &format!("{underlay}/24"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            ns.sysctl("net.ipv4.ip_forward", "1");
            // The pod: 10.244.i.10 behind a veth whose node side is 10.244.i.1.
            ns.ip(&[
                "link", "add", "veth0", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
            ]);
            ns.ip(&["addr", "add", &format!("10.244.{i}.1/24"), "dev", "veth0"]);
            ns.ip(&["link", "set", "veth0", "up"]);
            pod.ip(&["addr", "add", &format!("10.244.{i}.10/24"), "dev", "eth0"]);
            pod.ip(&["link", "set", "eth0", "up"]);
            pod.ip(&["route", "add", "default", "via", &format!("10.244.{i}.1")]);
            let name = format!("node-{i}");
            let record = NodeRecord {
                node: name.clone(),
                underlay_ip: underlay.into(),
                underlay_ip_v6: None,
                vtep_mac: vtep_mac(&name),
                wireguard_public_key: None,
                encryption: "none".into(),
                subnet: Some(format!("10.244.{i}.0/24").parse().unwrap()),
                subnet_v6: None,
            };
            let under = in_ns(&ns, async move |k| {
                k.underlay_by_address(underlay.into()).await.unwrap()
            });
            assert_eq!(under.name, "eth0");
            let cfg = VxlanConfig::auto(under.ifindex, underlay.into(), under.mtu);
            Node {
                ns,
                pod,
                record,
                cfg,
            }
        })
        .collect();
    Lab { switch, nodes }
}

impl Lab {
    /// Every node programmed with every other as its peer.
    fn sync_all(&self) {
        for node in &self.nodes {
            let peers: Vec<&Node> = self
                .nodes
                .iter()
                .filter(|p| p.record.node != node.record.node)
                .collect();
            let changes = node.sync(&peers);
            assert!(!changes.is_empty());
        }
    }
}

#[test]
fn pods_on_three_nodes_reach_each_other_through_vxlan_and_a_second_pass_changes_nothing() {
    if !have_root() {
        return;
    }
    let lab = lab(3);
    lab.sync_all();
    let [a, b, c] = [&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]];
    for (x, y) in [(a, b), (a, c), (b, c), (c, a)] {
        assert!(x.reaches(y), "{} -> {}", x.pod_ip(), y.pod_ip());
    }

    // The device as DESIGN.md says: VNI 1, UDP 8472, learning off, on the underlay, MTU auto.
    let link = &a.ns.ip_json(&["-d", "link", "show", VXLAN_IFNAME])[0];
    let info = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(info["id"], 1);
    assert_eq!(info["port"], 8472);
    assert_eq!(info["learning"], false);
    assert_eq!(info["local"], "192.168.77.11");
    assert_eq!(info["link"], "eth0");
    assert_eq!(link["mtu"], 1450);
    assert_eq!(link["address"], format_mac(&vtep_mac("node-1")).as_str());
    let addrs = a.ns.ip_json(&["-4", "addr", "show", "dev", VXLAN_IFNAME]);
    assert_eq!(addrs[0]["addr_info"][0]["local"], "10.244.1.0");
    assert_eq!(addrs[0]["addr_info"][0]["prefixlen"], 32);
    let dev = a.observe().device.unwrap();
    assert_eq!(
        dev.tx_checksum,
        Some(true),
        "TX checksum offload (and with it GSO) stays on where the kernel is fixed"
    );

    // Per peer: route via its VTEP on-link, permanent neighbour, FDB to its underlay address.
    let routes = a.owned_routes();
    assert_eq!(routes.len(), 2, "{routes:?}");
    let to_b = routes.iter().find(|r| r["dst"] == "10.244.2.0/24").unwrap();
    assert_eq!(to_b["gateway"], "10.244.2.0");
    assert!(to_b["flags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f == "onlink"));
    let neigh = a.neighbours();
    assert!(neigh.iter().any(
        |n| n["dst"] == "10.244.3.0" && n["lladdr"] == format_mac(&vtep_mac("node-3")).as_str()
    ));
    let fdb = a.fdb();
    assert!(fdb.iter().any(
        |e| e["mac"] == format_mac(&vtep_mac("node-2")).as_str() && e["dst"] == "192.168.77.12"
    ));
    assert_eq!(fdb.len(), 2, "{fdb:?}");

    // Level-triggered and idempotent: the same plan again changes nothing.
    for node in &lab.nodes {
        let peers: Vec<&Node> = lab
            .nodes
            .iter()
            .filter(|p| p.record.node != node.record.node)
            .collect();
        assert_eq!(node.sync(&peers), vec![], "{}", node.record.node);
    }
}

#[test]
fn drift_is_restored_by_the_next_pass_and_foreign_entries_are_left_alone() {
    if !have_root() {
        return;
    }
    let lab = lab(2);
    lab.sync_all();
    let [a, b] = [&lab.nodes[0], &lab.nodes[1]];
    assert!(a.reaches(b));

    // Somebody else's entries: a route through the device of another protocol, a protocol-77
    // route on another link (a pod's), a neighbour on another link.
    a.ns.ip(&["route", "add", "10.99.0.0/24", "dev", VXLAN_IFNAME]);
    a.ns.ip(&[
        "route",
        "add",
        "10.98.0.0/24",
        "dev",
        "veth0",
        "proto",
        "77",
    ]);
    a.ns.ip(&[
        "neigh",
        "add",
        "10.244.1.99",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "veth0",
        "nud",
        "permanent",
    ]);

    // Drift: the peer's route, neighbour and FDB entry deleted by hand.
    let mac_b = format_mac(&vtep_mac("node-2"));
    a.ns.ip(&["route", "del", "10.244.2.0/24"]);
    a.ns.ip(&["neigh", "del", "10.244.2.0", "dev", VXLAN_IFNAME]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &a.ns.name,
        "bridge",
        "fdb",
        "del",
        &mac_b,
        "dev",
        VXLAN_IFNAME,
        "dst",
        "192.168.77.12",
    ]);
    assert!(a.owned_routes().is_empty());
    assert!(!a.pod.ping(&b.pod_ip(), Duration::from_secs(1)));

    let changes = a.sync(&[b]);
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(matches!(changes[0], Change::ReplaceFdb { .. }));
    assert!(matches!(changes[1], Change::ReplaceNeighbour { .. }));
    assert!(matches!(changes[2], Change::ReplaceRoute { .. }));
    assert!(a.reaches(b));
    assert_eq!(a.sync(&[b]), vec![]);

    let all = a.ns.routes();
    assert!(all.iter().any(|r| r["dst"] == "10.99.0.0/24"), "{all:?}");
    assert!(all.iter().any(|r| r["dst"] == "10.98.0.0/24"), "{all:?}");
    let foreign = a.ns.ip_json(&["neigh", "show", "dev", "veth0"]);
    assert!(
        foreign.iter().any(|n| n["dst"] == "10.244.1.99"),
        "{foreign:?}"
    );
}

#[test]
fn a_peer_that_goes_away_is_swept_and_a_restarted_applier_keeps_the_rest() {
    if !have_root() {
        return;
    }
    let lab = lab(3);
    lab.sync_all();
    let [a, b, c] = [&lab.nodes[0], &lab.nodes[1], &lab.nodes[2]];
    assert!(a.reaches(c));

    // Node 3 deleted (while node 1's agent was down: every in_ns call is a fresh connection).
    let changes = a.sync(&[b]);
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(changes.iter().all(|c| matches!(
        c,
        Change::DelRoute { .. } | Change::DelNeighbour { .. } | Change::DelFdb { .. }
    )));
    let routes = a.owned_routes();
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0]["dst"], "10.244.2.0/24");
    assert!(!a.neighbours().iter().any(|n| n["dst"] == "10.244.3.0"));
    assert!(!a.fdb().iter().any(|e| e["dst"] == "192.168.77.13"));
    assert!(!a.pod.ping(&c.pod_ip(), Duration::from_secs(1)));
    assert!(a.reaches(b));
}

#[test]
fn a_mismatched_device_is_recreated_with_its_mac_and_offload_restored() {
    if !have_root() {
        return;
    }
    let lab = lab(2);
    let [a, b] = [&lab.nodes[0], &lab.nodes[1]];
    // A leftover device of the same name with another VNI and port, learning on.
    a.ns.ip(&[
        "link",
        "add",
        VXLAN_IFNAME,
        "type",
        "vxlan",
        "id",
        "2",
        "dstport",
        "4789",
        "dev",
        "eth0",
    ]);
    lab.sync_all();
    let changes = a.sync(&[b]);
    assert_eq!(changes, vec![]);
    let link = &a.ns.ip_json(&["-d", "link", "show", VXLAN_IFNAME])[0];
    assert_eq!(link["linkinfo"]["info_data"]["id"], 1);
    assert_eq!(link["linkinfo"]["info_data"]["port"], 8472);
    assert_eq!(link["address"], format_mac(&vtep_mac("node-1")).as_str());
    assert_eq!(a.observe().device.unwrap().tx_checksum, Some(true));
    assert!(a.reaches(b));
    assert!(b.reaches(a));

    // Offload switched off by hand is switched on again.
    in_ns(&a.ns, async |_| {
        let mut et = sluice_net::ethtool::Ethtool::connect().unwrap();
        et.set_tx_checksum(VXLAN_IFNAME, false).unwrap();
        assert!(!et.tx_checksum(VXLAN_IFNAME).unwrap());
        // The reader sees the other features as they are (scatter-gather stays on).
        let features = et.features(VXLAN_IFNAME).unwrap();
        assert_eq!(
            features.get("tx-scatter-gather"),
            Some(&true),
            "{features:?}"
        );
        assert_ne!(features.get("tx-checksum-ip-generic"), Some(&true));
    });
    assert_eq!(a.sync(&[b]), vec![Change::SetTxChecksum(true)]);
    assert_eq!(a.observe().device.unwrap().tx_checksum, Some(true));
}

/// The source address `to` sees for a UDP datagram from `from` (python3 on both ends).
fn udp_source(from: &Netns, to: &Netns, to_ip: &str) -> Option<String> {
    let listener = to
        .command("python3")
        .args([
            "-c",
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
             s.bind(('0.0.0.0', 9999)); s.settimeout(5); d, a = s.recvfrom(100); print(a[0])",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let send = format!(
        "import socket, time\nfor _ in range(25):\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{to_ip}', 9999)); time.sleep(0.2)"
    );
    let mut sender = from.command("python3").args(["-c", &send]).spawn().unwrap();
    let out = listener.wait_with_output().unwrap();
    let _ = sender.kill();
    let _ = sender.wait();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// sluice's NAT table in `node` made what `plan` says: true when something was written.
fn sync_nat(node: &Node, plan: sluice_net::masq::MasqPlan) -> bool {
    in_ns(&node.ns, async move |_| {
        sluice_net::masq::NftCli::default()
            .sync(&plan)
            .await
            .unwrap()
    })
}

#[test]
fn pod_traffic_leaving_the_cluster_is_masqueraded_and_pod_to_pod_is_not() {
    use sluice_net::masq;
    if !have_root() {
        return;
    }
    let lab = lab(2);
    lab.sync_all();
    let [a, b] = [&lab.nodes[0], &lab.nodes[1]];
    // The "internet": a host on the underlay with no route to the cluster CIDR.
    let inet = Netns::new("i");
    lab.switch.ip(&[
        "link", "add", "swpi", "type", "veth", "peer", "name", "eth0", "netns", &inet.name,
    ]);
    lab.switch
        .ip(&["link", "set", "swpi", "master", "br0", "up"]);
    inet.ip(&["addr", "add", "192.168.77.200/24", "dev", "eth0"]);
    inet.ip(&["link", "set", "eth0", "up"]);
    a.ns.ip(&["route", "add", "default", "via", "192.168.77.200"]);
    // Somebody else's table, which must survive everything sluice does.
    sh(&[
        "ip", "netns", "exec", &a.ns.name, "nft", "add", "table", "ip", "other",
    ]);
    assert!(!a.pod.ping("192.168.77.200", Duration::from_secs(1)));

    let cidr: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
    let sync = |enabled: bool| sync_nat(a, masq::plan(cidr, enabled, None));
    assert!(sync(true));
    assert!(!sync(true), "an unchanged table is not rewritten");
    assert!(a.pod.ping("192.168.77.200", Duration::from_secs(2)));
    assert_eq!(
        udp_source(&a.pod, &inet, "192.168.77.200").as_deref(),
        Some("192.168.77.11")
    );
    assert_eq!(
        udp_source(&a.pod, &b.pod, &b.pod_ip()).as_deref(),
        Some("10.244.1.10"),
        "pod-to-pod keeps its source"
    );

    // Drift: the chain flushed by hand is restored.
    sh(&[
        "ip",
        "netns",
        "exec",
        &a.ns.name,
        "nft",
        "flush",
        "chain",
        "ip",
        masq::NAT_TABLE,
        "postrouting",
    ]);
    assert!(sync(true));
    assert!(!sync(true));

    // Off: the table goes, the other stays.
    assert!(sync(false));
    assert!(!sync(false));
    let tables: Value = serde_json::from_str(&sh(&[
        "ip", "netns", "exec", &a.ns.name, "nft", "-j", "list", "tables",
    ]))
    .unwrap();
    let names: Vec<&str> = tables["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["table"]["name"].as_str())
        .collect();
    assert_eq!(names, vec!["other"]);
}

#[test]
fn the_vxlan_packets_are_left_out_of_conntrack_and_the_pod_flows_inside_them_are_not() {
    use sluice_net::masq::{self, UntrackedTunnel};
    if !have_root() {
        return;
    }
    let lab = lab(2);
    lab.sync_all();
    let [a, b] = [&lab.nodes[0], &lab.nodes[1]];
    let cidr: ipnet::Ipv4Net = "10.244.0.0/16".parse().unwrap();
    let sync = |node: &Node, untracked: bool| {
        let tunnel = untracked.then_some(UntrackedTunnel {
            underlay_ip: node.cfg.underlay_ip,
            port: node.cfg.port,
        });
        sync_nat(node, masq::plan(cidr, true, tunnel))
    };
    let vxlan_port = a.cfg.port.to_string();
    let vxlan_filter = ["-p", "udp", "--dport", vxlan_port.as_str()];
    let pod_flow = ["-p", "udp", "--dport", "9999"];

    // Masquerade alone turns conntrack on: the encapsulated packets are tracked, one UNREPLIED
    // entry per VXLAN source port (the control that shows the check below can fail).
    for n in [a, b] {
        assert!(sync(n, false));
    }
    assert_eq!(
        udp_source(&a.pod, &b.pod, &b.pod_ip()).as_deref(),
        Some("10.244.1.10")
    );
    for n in [a, b] {
        let tracked = conntrack_entries(&n.ns.name, &vxlan_filter);
        assert!(!tracked.is_empty(), "{}: no VXLAN entries", n.ns.name);
        sh(&["ip", "netns", "exec", &n.ns.name, "conntrack", "-F"]);
    }

    // Untracked: no VXLAN entry on either node, while the pod flow is still tracked on both
    // (policy's state), and pod-to-pod keeps its source.
    for n in [a, b] {
        assert!(sync(n, true));
        assert!(!sync(n, true), "an unchanged table is not rewritten");
    }
    assert_eq!(
        udp_source(&a.pod, &b.pod, &b.pod_ip()).as_deref(),
        Some("10.244.1.10")
    );
    for n in [a, b] {
        let tracked = conntrack_entries(&n.ns.name, &vxlan_filter);
        assert!(tracked.is_empty(), "{}: {tracked:?}", n.ns.name);
        let pod = conntrack_entries(&n.ns.name, &pod_flow);
        assert!(
            pod.iter()
                .any(|e| e.contains("src=10.244.1.10 dst=10.244.2.10")),
            "{}: the pod flow is not tracked: {pod:?}",
            n.ns.name
        );
    }
    // Pings across the tunnel still go both ways.
    assert!(a.reaches(b) && b.reaches(a));
}
