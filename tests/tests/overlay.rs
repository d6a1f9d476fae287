//! The agent's VXLAN overlay in a lab: pods across nodes, masquerade to the lab's internet, an
//! agent restarted under traffic, node deletion (also while a peer's agent is down), concurrent
//! leasing, and routed underlay segments.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::lab::{lab_cmd, tcp_ask, tcp_server, Lab};
use sluice_e2e::{conntrack_entries, eventually, have_root};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

struct Pod {
    ns: String,
    name: String,
    node: String,
    ip: Ipv4Addr,
}

fn pods(status: &Value) -> Vec<Pod> {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| Pod {
            ns: p["namespace"].as_str().unwrap().into(),
            name: p["name"].as_str().unwrap().into(),
            node: p["node"].as_str().unwrap().into(),
            ip: p["ip"].as_str().unwrap().parse().unwrap(),
        })
        .collect()
}

/// Routes sluice owns (protocol 77) in a node namespace, by destination.
fn sluice_routes(lab: &Lab, node: &str) -> Vec<String> {
    lab.ip_json(&lab.node_netns(node), &["route", "show", "proto", "77"])
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["dst"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn subnet_of(status: &Value, node: &str) -> String {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()["subnet"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn pods_reach_each_other_across_nodes_by_icmp_and_tcp_and_leave_masqueraded() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "3", "--pods-per-node", "3"]);
    let status = lab.status();
    let pods = pods(&status);
    assert_eq!(pods.len(), 9);
    let m = status["reachability"].as_array().unwrap();
    for (i, a) in pods.iter().enumerate() {
        for (j, b) in pods.iter().enumerate() {
            assert_eq!(m[i][j], true, "ping {} -> {} failed", a.name, b.name);
        }
    }
    // TCP: a server in each pod, a connection from every pod to every other.
    let servers: Vec<SocketAddr> = pods
        .iter()
        .map(|p| {
            let reply: &'static str = Box::leak(format!("{}/{}", p.ns, p.name).into_boxed_str());
            tcp_server(
                &lab.pod_netns(&p.ns, &p.name),
                SocketAddr::from((p.ip, 0)),
                reply,
                64,
            )
            .0
        })
        .collect();
    for a in &pods {
        for (b, addr) in pods.iter().zip(&servers) {
            let answer = tcp_ask(&lab.pod_netns(&a.ns, &a.name), *addr)
                .unwrap_or_else(|e| panic!("tcp {} -> {} ({addr}): {e}", a.name, b.name));
            assert_eq!(answer, format!("{}/{}", b.ns, b.name));
        }
    }
    // Pod-to-pod is never NATed: the server sees the client pod's own address.
    let (addr, peers) = tcp_server(
        &lab.pod_netns(&pods[0].ns, &pods[0].name),
        SocketAddr::from((pods[0].ip, 0)),
        "hi",
        1,
    );
    tcp_ask(&lab.pod_netns(&pods[8].ns, &pods[8].name), addr).unwrap();
    let seen = peers.recv_timeout(Duration::from_secs(3)).unwrap();
    assert_eq!(seen.ip(), std::net::IpAddr::V4(pods[8].ip));
    // Leaving the cluster CIDR, pod traffic is masqueraded to the node's underlay address: the
    // internet namespace has no route to pods, so it could not even answer otherwise.
    let internet = format!("{}internet", lab.prefix());
    let (addr, peers) = tcp_server(&internet, "203.0.113.1:0".parse().unwrap(), "world", 9);
    for p in &pods {
        let answer = tcp_ask(&lab.pod_netns(&p.ns, &p.name), addr)
            .unwrap_or_else(|e| panic!("{} cannot reach the internet: {e}", p.name));
        assert_eq!(answer, "world");
        let seen = peers.recv_timeout(Duration::from_secs(3)).unwrap();
        let node = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == p.node.as_str())
            .unwrap();
        assert_eq!(
            seen.ip().to_string(),
            node["underlay"].as_str().unwrap(),
            "{}",
            p.name
        );
    }
    // After all that traffic, every node tracks the pod flows it forwarded (conntrack is on for
    // policy and masquerade) but holds no entry for a VXLAN packet: the agent's table exempts
    // them.
    for node in status["nodes"].as_array().unwrap() {
        let netns = lab.node_netns(node["name"].as_str().unwrap());
        let pod_flows = conntrack_entries(&netns, &["-p", "tcp", "-s", "10.244.0.0/16"]);
        assert!(!pod_flows.is_empty(), "{netns}: no pod flow tracked");
        let vxlan = conntrack_entries(&netns, &["-p", "udp", "--dport", "8472"]);
        assert!(vxlan.is_empty(), "{netns}: VXLAN tracked: {vxlan:?}");
    }
}

#[test]
fn agent_restart_loses_no_packets() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let status = lab.status();
    let pods = pods(&status);
    let (a, b) = (&pods[0], &pods[1]);
    assert_ne!(a.node, b.node);
    // 300 pings 20 ms apart (6 s) from a to b; both agents are killed hard at 1 s and the lab
    // restarts them.
    let src = lab.pod_netns(&a.ns, &a.name);
    let dst = b.ip.to_string();
    let pinger = std::thread::spawn(move || {
        sluice_e2e::lab::in_netns(&src, move || {
            std::process::Command::new("ping")
                .args(["-c", "300", "-i", "0.02", "-W", "1", "-q", &dst])
                .output()
                .unwrap()
        })
    });
    std::thread::sleep(Duration::from_secs(1));
    for node in [&a.node, &b.node] {
        let pid_file = format!("/run/sluice/lab/{}/nodes/{node}/agent.pid", lab.name);
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
    }
    // The lab restarts them; they find their own leases and change nothing.
    let restarted = eventually(Duration::from_secs(10), || {
        let log = std::fs::read_to_string(format!(
            "/run/sluice/lab/{}/nodes/{}/agent.log",
            lab.name, a.node
        ))
        .unwrap_or_default();
        log.matches("sluice agent starting").count() >= 2
    });
    assert!(restarted, "the agent was not restarted");
    let out = pinger.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("300 packets transmitted, 300 received"),
        "packets lost across an agent restart:\n{text}"
    );
}

#[test]
fn deleted_node_leaves_every_peer_and_is_swept_by_a_stopped_agent() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "4", "--pods-per-node", "0"]);
    let status = lab.status();
    let n = |i: usize| format!("{}-node-{i}", lab.name);
    let subnet3 = subnet_of(&status, &n(3));
    let subnet4 = subnet_of(&status, &n(4));
    assert!(eventually(Duration::from_secs(10), || sluice_routes(
        &lab,
        &n(1)
    )
    .contains(&subnet4)));
    // A node that is gone: its machine (agent) stops, then its Node object is deleted.
    let agent = |action: &str, node: &str| {
        let out = lab_cmd(&["agent", "--name", &lab.name, action, node], 30);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    agent("stop", &n(4));
    let out = lab.kubectl(&["delete", "node", &n(4)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its lease goes with it (ownerReference), and every peer drops it within 10 s.
    let t0 = Instant::now();
    for i in 1..=3 {
        assert!(
            eventually(Duration::from_secs(10), || !sluice_routes(&lab, &n(i))
                .contains(&subnet4)),
            "{} still routes {subnet4}",
            n(i)
        );
    }
    eprintln!("node 4's routes gone from 3 peers after {:?}", t0.elapsed());
    let fdb = lab.ip_json(
        &lab.node_netns(&n(1)),
        &["neigh", "show", "dev", "sluice.vxlan"],
    );
    let vtep4 = subnet4.split('/').next().unwrap();
    let neighbours: Vec<&str> = fdb
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["dst"].as_str())
        .collect();
    assert_eq!(
        neighbours.len(),
        2,
        "node 1 should keep its 2 live peers: {fdb}"
    );
    assert!(
        !neighbours.contains(&vtep4),
        "node 4's neighbour entry left: {fdb}"
    );
    // Now node 3 goes while node 2's agent is down: node 2 keeps the stale entry until its
    // agent starts again and sweeps it.
    agent("stop", &n(2));
    agent("stop", &n(3));
    let out = lab.kubectl(&["delete", "node", &n(3)]);
    assert!(out.status.success());
    assert!(eventually(Duration::from_secs(10), || !sluice_routes(
        &lab,
        &n(1)
    )
    .contains(&subnet3)));
    assert!(
        sluice_routes(&lab, &n(2)).contains(&subnet3),
        "stale entry expected while stopped"
    );
    agent("start", &n(2));
    assert!(
        eventually(Duration::from_secs(10), || !sluice_routes(&lab, &n(2))
            .contains(&subnet3)),
        "the restarted agent did not sweep {subnet3}"
    );
    assert!(sluice_routes(&lab, &n(2)).contains(&subnet_of(&status, &n(1))));
}

#[test]
fn agents_starting_together_never_share_a_subnet() {
    if !have_root() {
        return;
    }
    for round in 0..20 {
        let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "0"]);
        let status = lab.status();
        let a = subnet_of(&status, &format!("{}-node-1", lab.name));
        let b = subnet_of(&status, &format!("{}-node-2", lab.name));
        assert_ne!(a, b, "round {round}: both nodes got {a}");
        let out = lab.down();
        assert!(out.status.success());
    }
}

#[test]
fn datapath_keeps_forwarding_while_the_api_server_is_away() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let status = lab.status();
    let pods = pods(&status);
    let daemon = nix::unistd::Pid::from_raw(status["daemon"]["pid"].as_i64().unwrap() as i32);
    // The API server freezes (the lab daemon serves it): agents lose their watches and cannot
    // renew, but the datapath they programmed stays.
    nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGSTOP).unwrap();
    struct Resume(nix::unistd::Pid);
    impl Drop for Resume {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let resume = Resume(daemon);
    let src = lab.pod_netns(&pods[0].ns, &pods[0].name);
    let dst = pods[1].ip.to_string();
    let out = sluice_e2e::lab::in_netns(&src, move || {
        std::process::Command::new("ping")
            .args(["-c", "100", "-i", "0.05", "-W", "1", "-q", &dst])
            .output()
            .unwrap()
    });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("100 packets transmitted, 100 received"),
        "{text}"
    );
    drop(resume);
    // Back again, the agents resync: a new pod-to-pod check still works and both agents live.
    std::thread::sleep(Duration::from_secs(1));
    let status = lab.status();
    let m = status["reachability"].as_array().unwrap();
    assert!(
        m.iter()
            .flat_map(|r| r.as_array().unwrap())
            .all(|v| v == true),
        "{status:#}"
    );
}

/// Issue 20, item 3: what the CNI plugin made on the host for a pod (its /32 route to the veth,
/// proxy ARP on the veth) and someone removed is put back by the node's agent within 10 s, and
/// the pod is reachable again; before, the route stayed gone and the policy loop, which finds
/// a pod's veth through it, stopped knowing the pod (`pods: 0`).
#[test]
fn a_pods_host_route_and_proxy_arp_removed_by_hand_come_back() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let status = lab.status();
    let pods = pods(&status);
    let (a, b) = (&pods[0], &pods[1]);
    assert_ne!(a.node, b.node);
    let node_ns = lab.node_netns(&b.node);
    let route = lab.ip_json(&node_ns, &["-4", "route", "show", &format!("{}/32", b.ip)]);
    let veth = route[0]["dev"].as_str().unwrap().to_string();
    assert!(veth.starts_with("sl"), "{route}");
    let (addr, _) = tcp_server(
        &lab.pod_netns(&b.ns, &b.name),
        SocketAddr::from((b.ip, 0)),
        "back",
        4,
    );
    assert_eq!(
        tcp_ask(&lab.pod_netns(&a.ns, &a.name), addr).unwrap(),
        "back"
    );

    let del = std::process::Command::new("ip")
        .args(["-n", &node_ns, "route", "del", &format!("{}/32", b.ip)])
        .status()
        .unwrap();
    assert!(del.success());
    let proxy_arp = format!("net.ipv4.conf.{veth}.proxy_arp");
    let off = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &node_ns,
            "sysctl",
            "-qw",
            &format!("{proxy_arp}=0"),
        ])
        .status()
        .unwrap();
    assert!(off.success());
    assert!(
        tcp_ask(&lab.pod_netns(&a.ns, &a.name), addr).is_err(),
        "the pod answered without its host route"
    );
    let started = Instant::now();
    assert!(
        eventually(Duration::from_secs(10), || {
            lab.ip_json(
                &node_ns,
                &[
                    "-4",
                    "route",
                    "show",
                    &format!("{}/32", b.ip),
                    "proto",
                    "77",
                ],
            )[0]["dev"]
                == veth.as_str()
        }),
        "the pod's host route was not restored within 10 s"
    );
    eprintln!("route restored after {:?}", started.elapsed());
    let value = |key: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &node_ns, "sysctl", "-n", key])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(eventually(Duration::from_secs(10), || value(&proxy_arp) == "1"));
    assert!(
        eventually(Duration::from_secs(10), || tcp_ask(
            &lab.pod_netns(&a.ns, &a.name),
            addr
        )
        .is_ok_and(|r| r == "back")),
        "the pod is not reachable after the repair"
    );
}
