//! The agent's health port in a lab node: `sluice status` in both formats, readiness that turns
//! 503 with the reason when sluice-config stops parsing (and back), and the metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::lab::{in_netns, Lab};
use sluice_e2e::{eventually, have_root};
use std::io::{Read, Write};
use std::time::Duration;

fn http_get(netns: &str, path: &str) -> (u16, String) {
    let path = path.to_string();
    in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9099").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (
            head.split_whitespace().nth(1).unwrap().parse().unwrap(),
            body.to_string(),
        )
    })
}

/// `GET path` on `addr` from inside `netns`.
fn http_get_at(netns: &str, addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let path = path.to_string();
    in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        (
            head.split_whitespace().nth(1).unwrap().parse().unwrap(),
            body.to_string(),
        )
    })
}

/// Issue 20, item 7: a pod reaching its node's health port gets readiness and metrics, not
/// `/status`, which names every peer's underlay address, subnet and VTEP MAC.
#[test]
fn status_is_served_to_the_node_itself_only() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let st = lab.status();
    let pod = &st["pods"][0];
    let node = pod["node"].as_str().unwrap();
    let underlay = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == node)
        .unwrap()["underlay"]
        .as_str()
        .unwrap()
        .to_string();
    let pod_ns = lab.pod_netns(
        pod["namespace"].as_str().unwrap(),
        pod["name"].as_str().unwrap(),
    );
    let health =
        std::net::SocketAddr::from((underlay.parse::<std::net::Ipv4Addr>().unwrap(), 9099));
    assert!(eventually(Duration::from_secs(10), || http_get_at(
        &pod_ns, health, "/readyz"
    )
    .0 == 200));
    assert_eq!(http_get_at(&pod_ns, health, "/healthz").0, 200);
    assert_eq!(http_get_at(&pod_ns, health, "/metrics").0, 200);
    let (code, body) = http_get_at(&pod_ns, health, "/status");
    assert_eq!(code, 403, "{body}");
    assert!(
        !body.contains("underlay") && !body.contains("vtepMac"),
        "{body}"
    );
    // The node itself still reads it (`sluice status` does).
    let node_ns = lab.node_netns(node);
    let (code, body) = http_get(&node_ns, "/status");
    assert_eq!(code, 200);
    assert!(body.contains("vtepMac"), "{body}");
}

fn status(node_ns: &str, format: &str) -> std::process::Output {
    std::process::Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(sluice_e2e::sluice_bin())
        .args(["status", "-o", format])
        .output()
        .unwrap()
}

#[test]
fn status_readiness_and_metrics_of_a_lab_node() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let node = format!("{}-node-1", lab.name);
    let ns = lab.node_netns(&node);
    assert!(eventually(Duration::from_secs(10), || http_get(
        &ns, "/readyz"
    )
    .0 == 200));
    assert_eq!(http_get(&ns, "/readiness").0, 200);
    assert_eq!(http_get(&ns, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(&ns, "/liveness").0, 200);

    let out = status(&ns, "json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["node"], node.as_str());
    assert_eq!(doc["ready"], true);
    assert_eq!(doc["encryption"], "none");
    assert_eq!(doc["tunnel"]["device"], "sluice.vxlan");
    assert_eq!(doc["peers"].as_array().unwrap().len(), 1);
    assert_eq!(doc["peers"][0]["node"], format!("{}-node-2", lab.name));
    let subnet = doc["subnet"].as_str().unwrap().to_string();
    let out = status(&ns, "table");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&subnet) && table.contains("ready       yes"),
        "{table}"
    );
    assert!(table.contains(&format!("{}-node-2", lab.name)), "{table}");

    let wanted = [
        "sluice_lease_held 1",
        "sluice_peers 1",
        "sluice_build_info{",
        "sluice_cni_calls{verb=\"ADD\",result=\"ok\"} 1",
        "sluice_datapath_sync_seconds_count",
        "sluice_peer_paths{path=\"vxlan\"} 1",
    ];
    // The CNI plugin's counts are read by the agent's next pass (5 s at most).
    let mut metrics = String::new();
    let all_there = eventually(Duration::from_secs(10), || {
        let (code, text) = http_get(&ns, "/metrics");
        metrics = text;
        code == 200 && wanted.iter().all(|w| metrics.contains(w))
    });
    let missing: Vec<&&str> = wanted.iter().filter(|w| !metrics.contains(**w)).collect();
    assert!(all_there, "{missing:?} missing:\n{metrics}");

    // A value that does not parse: the last good configuration stays, /readyz says why.
    let patch = |value: &str| lab.set_config("encryption", value);
    patch("ipsec");
    assert!(eventually(Duration::from_secs(10), || {
        let (code, body) = http_get(&ns, "/readyz");
        code == 503 && body.contains("encryption: \"ipsec\" is not none or wireguard")
    }));
    // Liveness is unaffected, and traffic still flows.
    assert_eq!(http_get(&ns, "/healthz").0, 200);
    let st = lab.status();
    assert!(st["reachability"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .all(|v| v == true));
    patch("none");
    assert!(eventually(Duration::from_secs(10), || http_get(
        &ns, "/readyz"
    )
    .0 == 200));
}
