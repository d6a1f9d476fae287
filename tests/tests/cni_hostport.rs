//! hostPorts through the built plugin (`runtimeConfig.portMappings`), on real packets, in each
//! backend the agent may publish (`SLUICE_POLICY_BACKEND` in subnet.env): a pod's mapping is
//! reached from another namespace through the node's address (the client's source kept, so the
//! pod's ingress policy sees it), from the node itself, through 127.0.0.1 and from the pod itself; CHECK sees lost
//! rules; a second pod asking for the same hostPort fails and leaves nothing; DEL removes
//! exactly that pod's mapping; GC removes the mapping of a pod whose runtime died before DEL.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::json;
use sluice_e2e::cni::CniNode;
use sluice_e2e::hostport::{at, client, have, in_state as hostports_in_state, publish_backend};
use sluice_e2e::lab::{tcp_ask, tcp_server};
use sluice_e2e::{have_root, Netns};
use std::collections::BTreeSet;

/// The node's address on the link to the client namespace.
const NODE_IP: &str = "172.31.250.1";
const CLIENT_IP: &str = "172.31.250.2";

fn ports(host_port: u16) -> serde_json::Value {
    json!({"runtimeConfig": {"portMappings": [
        {"hostPort": host_port, "containerPort": 80, "protocol": "tcp", "hostIP": ""}
    ]}})
}

/// The IPv4 rules sluice holds in the node for `backend`, as text.
fn rules(node: &CniNode, backend: &str) -> String {
    sluice_e2e::hostport::rules(node, backend).0
}

fn scenario(backend: &str) {
    let node = CniNode::new(Some("10.244.21.0/24"));
    publish_backend(&node, backend);
    let c = client(
        &node,
        "hpc",
        &[&format!("{NODE_IP}/24")],
        &[&format!("{CLIENT_IP}/24")],
        None,
    );
    let client = &c.ns;

    let pod = Netns::new("hpp");
    let conf = node.conf("1.1.0", ports(8080));
    let added = node.call("ADD", "hp1", Some(&pod.path()), &conf);
    added.assert_ok();
    let (_, seen) = tcp_server(&pod.name, at("0.0.0.0", 80), "pod1", 16);
    let veth = node.pod_links().pop().unwrap();
    let flag = sluice_e2e::run(
        node.ns
            .command("cat")
            .arg(format!("/proc/sys/net/ipv4/conf/{veth}/route_localnet")),
    );
    assert_eq!(String::from_utf8_lossy(&flag.stdout).trim(), "1");
    for (ns, to, source) in [
        (&client.name, at(NODE_IP, 8080), Some(CLIENT_IP)),
        (&node.ns.name, at(NODE_IP, 8080), None),
        (&node.ns.name, at("127.0.0.1", 8080), None),
        // Hairpin: the pod through its own hostPort.
        (&pod.name, at(NODE_IP, 8080), None),
    ] {
        let got = tcp_ask(ns, to);
        assert_eq!(
            got.as_deref().ok(),
            Some("pod1"),
            "{backend}: {ns} -> {to}: {got:?}\n{}",
            rules(&node, backend)
        );
        let peer = seen
            .recv_timeout(std::time::Duration::from_secs(3))
            .unwrap();
        if let Some(src) = source {
            assert_eq!(
                peer.ip().to_string(),
                src,
                "{backend}: the client's source is kept"
            );
        }
    }
    node.call("CHECK", "hp1", Some(&pod.path()), &conf)
        .assert_ok();

    // The same hostPort for another pod: a clear error, and nothing left of the attempt.
    let state_before = std::fs::read(node.ipam_dir().join("allocations.json")).unwrap();
    let links_before = node.pod_links();
    let pod2 = Netns::new("hpq");
    let refused = node.call("ADD", "hp2", Some(&pod2.path()), &conf);
    assert_eq!(refused.error_code(), 104, "{refused:?}");
    let msg = refused.json()["msg"].as_str().unwrap().to_string();
    assert!(
        msg.contains("hostPort 8080/tcp") && msg.contains("held by container hp1"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(node.ipam_dir().join("allocations.json")).unwrap(),
        state_before
    );
    assert_eq!(node.pod_links(), links_before);
    assert!(pod2.links().iter().all(|l| l == "lo"));

    // A pod whose runtime dies before DEL: GC (valid list without it) removes its mapping.
    let pod3 = Netns::new("hpr");
    node.call(
        "ADD",
        "hp3",
        Some(&pod3.path()),
        &node.conf("1.1.0", ports(8083)),
    )
    .assert_ok();
    let (_, _seen3) = tcp_server(&pod3.name, at("0.0.0.0", 80), "pod3", 4);
    assert_eq!(
        tcp_ask(&client.name, at(NODE_IP, 8083)).ok().as_deref(),
        Some("pod3")
    );
    let valid = json!({ "cni.dev/valid-attachments": [{"containerID": "hp1", "ifname": "eth0"}]});
    node.call_raw(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        node.conf("1.1.0", valid).to_string().as_bytes(),
    )
    .assert_ok();
    assert!(
        tcp_ask(&client.name, at(NODE_IP, 8083)).is_err(),
        "{backend}: GC left 8083"
    );
    assert!(
        !rules(&node, backend).contains("8083"),
        "{}",
        rules(&node, backend)
    );
    assert_eq!(hostports_in_state(&node).len(), 1);
    // GC kept the valid pod's mapping.
    assert_eq!(
        tcp_ask(&client.name, at(NODE_IP, 8080)).ok().as_deref(),
        Some("pod1")
    );

    // Rules flushed behind sluice's back: CHECK says so.
    match backend {
        "nftables" => {
            node.ns.sh(&[
                "nft",
                "flush",
                "chain",
                "inet",
                "sluice-hostport",
                "hostports",
            ]);
        }
        b => {
            node.ns.sh(&[b, "-t", "nat", "-F", "SLUICE-HP"]);
        }
    }
    let check = node.call("CHECK", "hp1", Some(&pod.path()), &conf);
    assert_eq!(check.error_code(), 102, "{check:?}");
    assert!(
        check.json()["msg"]
            .as_str()
            .unwrap()
            .contains("hostPort rules missing"),
        "{check:?}"
    );
    // A repeated ADD writes them back.
    node.call("ADD", "hp1", Some(&pod.path()), &conf)
        .assert_ok();
    node.call("CHECK", "hp1", Some(&pod.path()), &conf)
        .assert_ok();

    // DEL removes the mapping; the hostPort is then free for another pod.
    node.call("DEL", "hp1", Some(&pod.path()), &conf)
        .assert_ok();
    assert!(
        tcp_ask(&client.name, at(NODE_IP, 8080)).is_err(),
        "{backend}: DEL left 8080"
    );
    assert!(hostports_in_state(&node).is_empty());
    let left = rules(&node, backend);
    assert!(
        !left.contains("tcp . 8080 :") && !left.contains("--dport 8080"),
        "{left}"
    );
    node.call("ADD", "hp2", Some(&pod2.path()), &conf)
        .assert_ok();
    node.call("DEL", "hp2", Some(&pod2.path()), &conf)
        .assert_ok();
    node.call(
        "DEL",
        "hp3",
        Some(&pod3.path()),
        &node.conf("1.1.0", ports(8083)),
    )
    .assert_ok();
    assert!(node.allocations().is_empty());
}

#[test]
fn hostports_with_nftables() {
    if !have_root() || !have("nft") {
        return;
    }
    scenario("nftables");
}

#[test]
fn hostports_with_iptables_nft() {
    if !have_root() || !have("iptables-nft") {
        return;
    }
    scenario("iptables-nft");
}

#[test]
fn hostports_with_iptables_legacy() {
    if !have_root() || !have("iptables-legacy") {
        return;
    }
    scenario("iptables-legacy");
}

/// The agent's start (`sluice_net::cni::hostport::restore`, which the agent runs once the
/// backend is published): a live pod's mapping stays reachable, with its
/// established connection kept; the mapping of a pod whose runtime died (veth gone, no DEL) is
/// swept from state and kernel; a switch of backend moves the rules and leaves none behind.
#[test]
fn the_agent_start_keeps_live_mappings_and_sweeps_gone_pods() {
    if !have_root() || !have("nft") || !have("iptables-nft") {
        return;
    }
    use sluice_policy::hostport::HostportBackend;
    use sluice_policy::{Exec, IptablesMode};
    use std::io::{Read, Write};
    let node = CniNode::new(Some("10.244.22.0/24"));
    publish_backend(&node, "nftables");
    let live = Netns::new("hpl");
    let dead = Netns::new("hpd");
    node.call(
        "ADD",
        "live",
        Some(&live.path()),
        &node.conf("1.1.0", ports(8080)),
    )
    .assert_ok();
    node.call(
        "ADD",
        "dead",
        Some(&dead.path()),
        &node.conf("1.1.0", ports(8081)),
    )
    .assert_ok();
    // An echo server in the live pod, and a connection to it through the hostPort from the
    // node (127.0.0.1) that stays open across the restore.
    let listener = sluice_e2e::lab::in_netns(&live.name, || {
        std::net::TcpListener::bind("0.0.0.0:80").unwrap()
    });
    std::thread::spawn(move || {
        for s in listener.incoming().take(8) {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut conn = sluice_e2e::lab::in_netns(&node.ns.name, || {
        std::net::TcpStream::connect_timeout(
            &at("127.0.0.1", 8080),
            std::time::Duration::from_secs(3),
        )
        .unwrap()
    });
    conn.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    let echo = |conn: &mut std::net::TcpStream, word: &[u8]| {
        conn.write_all(word).unwrap();
        let mut got = vec![0u8; word.len()];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(got, word);
    };
    echo(&mut conn, b"before");
    // The dead pod's runtime is gone without a DEL: its veth went with its namespace.
    let dead_veth = sluice_net::podnet::host_ifname("dead", "eth0");
    node.ns.ip(&["link", "del", &dead_veth]);
    let links: BTreeSet<String> = node.pod_links().into_iter().collect();
    let store = sluice_net::ipam::IpamStore::new(node.ipam_dir());
    let exec = Exec::in_netns(&node.ns.name);
    let r = sluice_net::cni::hostport::restore(&store, &exec, HostportBackend::Nftables, &links)
        .unwrap();
    assert_eq!((r.kept, r.swept), (1, 1));
    echo(&mut conn, b"after");
    let nft = rules(&node, "nftables");
    assert!(
        nft.contains("tcp . 8080 :") && !nft.contains("tcp . 8081 :"),
        "{nft}"
    );
    let state = hostports_in_state(&node);
    assert_eq!(state.len(), 1);
    assert_eq!(state[0]["containerID"], "live");
    // A restart with policy-backend switched to iptables: the rules move, none stay behind.
    let ipt = HostportBackend::Iptables(IptablesMode::Nft);
    sluice_net::cni::hostport::restore(&store, &exec, ipt, &links).unwrap();
    assert!(!node
        .ns
        .sh(&["nft", "list", "tables"])
        .contains("sluice-hostport"));
    let saved = rules(&node, "iptables-nft");
    assert!(saved.contains("--dport 8080"), "{saved}");
    echo(&mut conn, b"switched");
    // New connections through the moved rules.
    let fresh = sluice_e2e::lab::in_netns(&node.ns.name, || {
        std::net::TcpStream::connect_timeout(
            &at("127.0.0.1", 8080),
            std::time::Duration::from_secs(3),
        )
    });
    assert!(fresh.is_ok(), "{fresh:?}");
    // And back, with the pod gone as well: nothing anywhere.
    node.ns.ip(&[
        "link",
        "del",
        &sluice_net::podnet::host_ifname("live", "eth0"),
    ]);
    let r = sluice_net::cni::hostport::restore(
        &store,
        &exec,
        HostportBackend::Nftables,
        &BTreeSet::new(),
    )
    .unwrap();
    assert_eq!((r.kept, r.swept), (0, 1));
    assert!(!rules(&node, "iptables-nft").contains("SLUICE-HP"));
    assert!(!rules(&node, "nftables").contains("sluice-hostport"));
}

/// NetworkPolicy still applies to what arrives through a hostPort: the DNAT keeps the client's
/// source, so the pod's ingress rules (sluice-policy's nftables table, compiled from a real
/// NetworkPolicy) let one client's network in and keep another's out.
#[test]
fn network_policy_applies_to_hostport_traffic() {
    if !have_root() || !have("nft") {
        return;
    }
    use sluice_policy::k8s_openapi::api::core::v1::{Namespace, Pod};
    use sluice_policy::k8s_openapi::api::networking::v1::NetworkPolicy;
    use sluice_policy::{compile, ClusterPod, Exec, Firewall, LocalPod, NftCli, PolicyInput};
    let node = CniNode::new(Some("10.244.23.0/24"));
    publish_backend(&node, "nftables");
    // Two clients on two links of the node; link names outside sluice's `sl` prefix.
    let pid = std::process::id() % 100_000;
    let clients: Vec<(Netns, &str, &str)> = [
        ("172.31.248.1", "172.31.248.2"),
        ("172.31.247.1", "172.31.247.2"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (node_ip, client_ip))| {
        let c = Netns::new("hpn");
        let link = format!("hq{pid}{i}");
        node.ns.ip(&[
            "link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &c.name,
        ]);
        node.ns
            .ip(&["addr", "add", &format!("{node_ip}/24"), "dev", &link]);
        node.ns.ip(&["link", "set", &link, "up"]);
        c.ip(&["addr", "add", &format!("{client_ip}/24"), "dev", "eth0"]);
        c.ip(&["link", "set", "eth0", "up"]);
        (c, *node_ip, *client_ip)
    })
    .collect();
    let pod = Netns::new("hpo");
    let out = node
        .call(
            "ADD",
            "np1",
            Some(&pod.path()),
            &node.conf("1.1.0", ports(8080)),
        )
        .assert_ok()
        .json();
    let pod_ip = out["ips"][0]["address"]
        .as_str()
        .unwrap()
        .trim_end_matches("/32")
        .to_string();
    let veth = node.pod_links().pop().unwrap();
    let (_, _seen) = tcp_server(&pod.name, at("0.0.0.0", 80), "np1", 16);
    for (c, node_ip, _) in &clients {
        assert_eq!(
            tcp_ask(&c.name, at(node_ip, 8080)).ok().as_deref(),
            Some("np1")
        );
    }
    // Pod x/a may be reached on port 80 from the first client's network only.
    let k8s_pod: Pod = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "a", "labels": {"app": "a"}},
        "spec": {"containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": pod_ip}
    }))
    .unwrap();
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    let np: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"namespace": "x", "name": "only-first"},
        "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"ipBlock": {"cidr": "172.31.248.0/24"}}],
                              "ports": [{"port": 80, "protocol": "TCP"}]}]}
    }))
    .unwrap();
    let cluster_pod = std::sync::Arc::new(ClusterPod::from(&k8s_pod));
    let local = vec![LocalPod::from_pod(&cluster_pod, &veth).unwrap()];
    let host: Vec<std::net::IpAddr> = vec![
        "172.31.248.1".parse().unwrap(),
        "172.31.247.1".parse().unwrap(),
    ];
    let ir = compile(
        &PolicyInput {
            pods: &[cluster_pod],
            namespaces: &[&ns],
            policies: &[&np],
            host_addrs: &host,
            ..Default::default()
        },
        &local,
    );
    let fw = NftCli::new(Exec::in_netns(&node.ns.name));
    fw.apply(&fw.render(&ir)).unwrap();
    let (first, second) = (&clients[0], &clients[1]);
    assert_eq!(
        tcp_ask(&first.0.name, at(first.1, 8080)).ok().as_deref(),
        Some("np1"),
        "the allowed client through the hostPort"
    );
    assert!(
        tcp_ask(&second.0.name, at(second.1, 8080)).is_err(),
        "the other client passed the pod's ingress policy through the hostPort"
    );
    // Without the policy the second client is let in again: it was the policy that kept it out.
    fw.remove().unwrap();
    assert_eq!(
        tcp_ask(&second.0.name, at(second.1, 8080)).ok().as_deref(),
        Some("np1")
    );
    node.call(
        "DEL",
        "np1",
        Some(&pod.path()),
        &node.conf("1.1.0", ports(8080)),
    )
    .assert_ok();
}
