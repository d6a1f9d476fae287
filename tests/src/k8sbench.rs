//! The pure parts of `bench-k8s`: the objects it applies (pods, NetworkPolicies), what it reads
//! back (kubectl's watch stream, `ctr task ls`), the ICMP echo packets of its reachability
//! probe, and the machine's load average printed beside the figures.

use serde_json::{json, Value};
use std::net::Ipv4Addr;

/// The image every bench pod runs (`lab up --kubernetes` imports the kit's agnhost).
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.43";

/// What one event of `kubectl get pods -w -o json --output-watch-events` says of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSeen {
    pub name: String,
    pub phase: String,
    pub ip: Option<Ipv4Addr>,
    pub node: Option<String>,
    /// The first container's id in its runtime (`containerd://ID` without the scheme).
    pub container: Option<String>,
}

impl PodSeen {
    /// Running with an address: what pod start waits for.
    pub fn running(&self) -> bool {
        self.phase == "Running" && self.ip.is_some()
    }
}

/// The pod of a watch event (`{"type": ..., "object": POD}`), or of a bare pod object; `None`
/// for a deletion, an error event or anything that is not a pod.
pub fn pod_seen(event: &Value) -> Option<PodSeen> {
    let (kind, pod) = match event.get("type") {
        Some(t) => (t.as_str()?, event.get("object")?),
        None => ("ADDED", event),
    };
    if !matches!(kind, "ADDED" | "MODIFIED") || pod["kind"] != "Pod" {
        return None;
    }
    let status = &pod["status"];
    Some(PodSeen {
        name: pod["metadata"]["name"].as_str()?.to_string(),
        phase: status["phase"].as_str().unwrap_or_default().to_string(),
        ip: status["podIP"].as_str().and_then(|ip| ip.parse().ok()),
        node: pod["spec"]["nodeName"].as_str().map(str::to_string),
        container: status["containerStatuses"][0]["containerID"]
            .as_str()
            .and_then(|id| id.split_once("://"))
            .map(|(_, id)| id.to_string())
            .filter(|id| !id.is_empty()),
    })
}

/// The pid of task `container` in the output of `ctr -n k8s.io task ls` (`TASK PID STATUS`).
pub fn task_pid(ctr_task_ls: &str, container: &str) -> Option<u32> {
    ctr_task_ls.lines().skip(1).find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == container).then_some(())?;
        words.next()?.parse().ok().filter(|pid| *pid > 0)
    })
}

/// A `List` of `count` pods `PREFIX-I` running agnhost `pause` with `labels`; placed by the
/// scheduler when `nodes` is empty, else on `nodes` in turn (a nodeSelector on their hostname
/// label). No grace period on delete: rounds do not wait for nothing.
pub fn pods(prefix: &str, count: usize, labels: &Value, nodes: &[String]) -> Value {
    let items: Vec<Value> = (0..count)
        .map(|i| {
            let mut spec = json!({
                "terminationGracePeriodSeconds": 0,
                "containers": [{"name": "main", "image": AGNHOST, "args": ["pause"]}],
            });
            if !nodes.is_empty() {
                spec["nodeSelector"] = json!({"kubernetes.io/hostname": nodes[i % nodes.len()]});
            }
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": format!("{prefix}-{i}"), "labels": labels},
                "spec": spec,
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The label of the pods the reachability probe waits for (every policy selects them).
pub const REACH_LABEL: (&str, &str) = ("app", "reach");

/// The `peer` label value that policy `i` allows in.
pub fn peer_label(i: usize) -> String {
    format!("p{i}")
}

/// `count` NetworkPolicies that all select the probed pods (`app: reach`), each allowing in
/// only the pods labelled `peer: p<I>`: every probed pod is isolated from its start and its
/// rules come from all of them; the prober carries the last one's label, so one policy lets
/// its packets in.
pub fn policies(count: usize) -> Value {
    let items: Vec<Value> = (0..count)
        .map(|i| {
            json!({
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": format!("bench-{i:04}")},
                "spec": {
                    "podSelector": {"matchLabels": {REACH_LABEL.0: REACH_LABEL.1}},
                    "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"peer": peer_label(i)}}}]}],
                },
            })
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (type 8) with identifier `id` and sequence `seq`, 8 bytes of payload.
pub fn echo_request(id: u16, seq: u16) -> [u8; 16] {
    let mut p = [0u8; 16];
    p[0] = 8;
    p[4..6].copy_from_slice(&id.to_be_bytes());
    p[6..8].copy_from_slice(&seq.to_be_bytes());
    p[8..16].copy_from_slice(b"sluice-b");
    let sum = checksum(&p);
    p[2..4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// What a raw ICMP socket received, if it is an echo reply (type 0) with a valid checksum:
/// its source, identifier and sequence. `packet` starts with the IPv4 header.
pub fn echo_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let first = *packet.first()?;
    let header = usize::from(first & 0x0f) * 4;
    if first >> 4 != 4 || header < 20 || packet.get(9) != Some(&1) {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let icmp = packet.get(header..)?;
    if icmp.len() < 8 || icmp[0] != 0 || icmp[1] != 0 || checksum(icmp) != 0 {
        return None;
    }
    let id = u16::from_be_bytes([icmp[4], icmp[5]]);
    let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
    Some((src, id, seq))
}

/// The 1, 5 and 15 minute load averages of `/proc/loadavg`.
pub fn loadavg(text: &str) -> Option<(f64, f64, f64)> {
    let mut w = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some((w.next()??, w.next()??, w.next()??))
}

/// A duration as Rust's `Debug` prints it (`850µs`, `12.5ms`, `1.25s`, `40ns`): how the agent's
/// log fields (`took`, `compile`, ...) show them.
pub fn debug_duration(text: &str) -> Option<std::time::Duration> {
    let (number, scale) = [
        ("ns", 1e-9),
        ("µs", 1e-6),
        ("us", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
    ]
    .iter()
    .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?, *scale)))?;
    let v: f64 = number.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| std::time::Duration::from_secs_f64(v * scale))
}

/// The values of field `field` (`field=VALUE`, a duration) on every line of the agent's log
/// that carries `message` (e.g. `policy applied`).
pub fn logged_durations(log: &str, message: &str, field: &str) -> Vec<std::time::Duration> {
    let key = format!("{field}=");
    log.lines()
        .filter(|l| l.contains(message))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(key.as_str()))
                .and_then(debug_duration)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, ip: Option<&str>, cid: Option<&str>) -> Value {
        let mut p = json!({
            "kind": "Pod",
            "metadata": {"name": "reach-0-1"},
            "spec": {"nodeName": "lab-node-2"},
            "status": {"phase": phase},
        });
        if let Some(ip) = ip {
            p["status"]["podIP"] = json!(ip);
        }
        if let Some(c) = cid {
            p["status"]["containerStatuses"] = json!([{"containerID": c}]);
        }
        p
    }

    #[test]
    fn watch_events_are_read_as_pods_and_deletions_are_not() {
        let ev = json!({"type": "MODIFIED", "object": pod("Running", Some("10.244.1.7"), Some("containerd://abc"))});
        let seen = pod_seen(&ev).unwrap();
        assert_eq!(
            seen,
            PodSeen {
                name: "reach-0-1".into(),
                phase: "Running".into(),
                ip: Some([10, 244, 1, 7].into()),
                node: Some("lab-node-2".into()),
                container: Some("abc".into()),
            }
        );
        assert!(seen.running());
        let pending = pod_seen(&json!({"type": "ADDED", "object": pod("Pending", None, None)}));
        let pending = pending.unwrap();
        assert!(!pending.running() && pending.ip.is_none() && pending.container.is_none());
        // An address before the containers run: seen, not running.
        let early = pod_seen(
            &json!({"type": "MODIFIED", "object": pod("Pending", Some("10.244.1.8"), None)}),
        );
        assert!(!early.unwrap().running());
        assert_eq!(
            pod_seen(
                &json!({"type": "DELETED", "object": pod("Running", Some("10.244.1.7"), None)})
            ),
            None
        );
        assert_eq!(
            pod_seen(&json!({"type": "ERROR", "object": {"kind": "Status"}})),
            None
        );
        assert_eq!(
            pod_seen(&json!({"kind": "Node", "metadata": {"name": "n"}})),
            None
        );
        // A bare object (the list kubectl prints first without --output-watch-events).
        assert_eq!(
            pod_seen(&pod("Running", Some("bad"), None)).unwrap().ip,
            None
        );
    }

    #[test]
    fn the_task_pid_is_found_by_container_id() {
        let out = "TASK    PID     STATUS\nabc     4242    RUNNING\nabcd    17      RUNNING\nzero    0       STOPPED\n";
        assert_eq!(task_pid(out, "abc"), Some(4242));
        assert_eq!(task_pid(out, "abcd"), Some(17));
        assert_eq!(task_pid(out, "zero"), None);
        assert_eq!(task_pid(out, "ab"), None);
        assert_eq!(task_pid("TASK PID STATUS\n", "abc"), None);
        assert_eq!(task_pid("", "TASK"), None);
    }

    #[test]
    fn pods_are_spread_over_the_given_nodes_or_left_to_the_scheduler() {
        let nodes = vec!["n2".to_string(), "n3".to_string()];
        let list = pods("reach-1", 3, &json!({"app": "reach"}), &nodes);
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 3);
        let placed: Vec<&str> = items
            .iter()
            .map(|p| {
                p["spec"]["nodeSelector"]["kubernetes.io/hostname"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(placed, ["n2", "n3", "n2"]);
        assert_eq!(items[2]["metadata"]["name"], "reach-1-2");
        assert_eq!(items[0]["metadata"]["labels"]["app"], "reach");
        assert_eq!(items[0]["spec"]["containers"][0]["image"], AGNHOST);
        let free = pods("start-0", 2, &json!({"app": "start"}), &[]);
        assert!(free["items"][0]["spec"].get("nodeSelector").is_none());
    }

    #[test]
    fn every_policy_selects_the_probed_pods_and_only_the_last_admits_the_prober() {
        let list = policies(1000);
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1000);
        let mut names: Vec<&str> = items
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        names.dedup();
        assert_eq!(names.len(), 1000);
        for p in items {
            assert_eq!(p["spec"]["podSelector"]["matchLabels"]["app"], "reach");
            assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
        }
        let admits = |label: &str| {
            items
                .iter()
                .filter(|p| {
                    p["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["peer"]
                        == label
                })
                .count()
        };
        assert_eq!(admits(&peer_label(999)), 1);
        assert_eq!(admits(&peer_label(1000)), 0);
    }

    #[test]
    fn echo_packets_carry_a_valid_checksum_and_replies_are_recognised() {
        // RFC 1071's example.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
        assert_eq!(checksum(&[0xff]), !0xff00);
        let req = echo_request(0x1234, 7);
        assert_eq!(checksum(&req), 0);
        assert_eq!((req[0], req[4], req[5], req[7]), (8, 0x12, 0x34, 7));
        // The reply the pod's kernel sends: type 0, the same id, seq and payload.
        let mut icmp = req;
        icmp[0] = 0;
        icmp[2..4].copy_from_slice(&[0, 0]);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let mut packet = vec![
            0x45, 0, 0, 36, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 7, 10, 244, 0, 3,
        ];
        packet.extend_from_slice(&icmp);
        assert_eq!(
            echo_reply(&packet),
            Some(([10, 244, 1, 7].into(), 0x1234, 7))
        );
        // A request (our own, looped back), a bad checksum, a short or non-ICMP packet: not.
        let mut request = packet[..20].to_vec();
        request.extend_from_slice(&req);
        assert_eq!(echo_reply(&request), None);
        let mut bad = packet.clone();
        bad[30] ^= 1;
        assert_eq!(echo_reply(&bad), None);
        assert_eq!(echo_reply(&packet[..25]), None);
        let mut udp = packet.clone();
        udp[9] = 17;
        assert_eq!(echo_reply(&udp), None);
        assert_eq!(echo_reply(&[]), None);
        // Options in the IP header (IHL 6) are skipped.
        let mut opts = vec![
            0x46, 0, 0, 40, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 7, 10, 244, 0, 3, 1, 1, 1, 0,
        ];
        opts.extend_from_slice(&icmp);
        assert_eq!(echo_reply(&opts), Some(([10, 244, 1, 7].into(), 0x1234, 7)));
    }

    #[test]
    fn the_agents_pass_times_are_read_from_its_log() {
        use std::time::Duration;
        assert_eq!(
            debug_duration("12.5ms"),
            Some(Duration::from_micros(12_500))
        );
        assert_eq!(debug_duration("850µs"), Some(Duration::from_micros(850)));
        assert_eq!(debug_duration("1.25s"), Some(Duration::from_millis(1250)));
        assert_eq!(debug_duration("40ns"), Some(Duration::from_nanos(40)));
        for bad in ["", "ms", "12", "-1ms", "1.2.3ms", "NaNs", "12 ms"] {
            assert_eq!(debug_duration(bad), None, "{bad}");
        }
        let log = "2026-12-03T13:20:01.1Z  INFO sluice::agent::policy: policy applied node=\"n2\" backend=\"nftables\" pods=4 rules=1003 took=312.5ms kernel=1.2ms compile=250ms render=40ms apply=20.1ms\n\
2026-12-03T13:20:02.1Z  INFO sluice::agent: lease renewed took=3ms\n\
2026-12-03T13:20:03.1Z  INFO sluice::agent::policy: policy applied node=\"n2\" pods=5 took=1.5s compile=1.2s\n\
policy applied took=garbage\n";
        assert_eq!(
            logged_durations(log, "policy applied", "took"),
            [Duration::from_micros(312_500), Duration::from_millis(1500)]
        );
        assert_eq!(
            logged_durations(log, "policy applied", "compile"),
            [Duration::from_millis(250), Duration::from_millis(1200)]
        );
        assert!(logged_durations(log, "policy applied", "missing").is_empty());
    }

    #[test]
    fn the_load_average_is_read_from_proc() {
        assert_eq!(
            loadavg("2.12 1.83 0.98 3/412 12345\n"),
            Some((2.12, 1.83, 0.98))
        );
        assert_eq!(loadavg("2.12 x"), None);
        assert_eq!(loadavg(""), None);
    }
}
