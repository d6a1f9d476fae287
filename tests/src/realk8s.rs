//! Helpers for the suites on a real-Kubernetes lab (`sluice lab up --kubernetes DIR`): the
//! binaries' directory (or why a suite skips), pods pinned to nodes, `kubectl exec` probes, a
//! pod's network namespace found through its kubelet cgroup, and HTTP to agnhost's `netexec`
//! from a namespace. Every wait is bounded.

use crate::lab::{in_netns_path, output_text, Lab};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The kit's agnhost image (`../shared/realk8s/images/agnhost.tar`, which `lab up
/// --kubernetes` imports into every node's containerd; it carries busybox's ping and nc).
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.43";

/// `SLUICE_K8S_BIN`, or None after saying why the suite is skipped.
pub fn k8s_bin() -> Option<String> {
    match std::env::var("SLUICE_K8S_BIN") {
        Ok(dir) if !dir.is_empty() => Some(dir),
        _ => {
            eprintln!(
                "realk8s: skipped: SLUICE_K8S_BIN is not set (it names a directory with the \
                 Kubernetes server binaries; .ci/run sets it when ../shared/realk8s exists)"
            );
            None
        }
    }
}

/// A running pod: name, node, address.
#[derive(Debug, Clone)]
pub struct RealPod {
    pub name: String,
    pub node: String,
    pub ip: String,
}

/// Running pods labelled `app=APP` with an address.
pub fn running(lab: &Lab, app: &str) -> (Vec<RealPod>, Value) {
    let list: Value = serde_json::from_str(&lab.kubectl_ok(&[
        "get",
        "pods",
        "-l",
        &format!("app={app}"),
        "-o",
        "json",
    ]))
    .unwrap();
    let pods = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["status"]["phase"] == "Running"
                && p["status"]["podIP"].is_string()
                && p["metadata"]["deletionTimestamp"].is_null()
        })
        .map(|p| RealPod {
            name: p["metadata"]["name"].as_str().unwrap().to_string(),
            node: p["spec"]["nodeName"].as_str().unwrap().to_string(),
            ip: p["status"]["podIP"].as_str().unwrap().to_string(),
        })
        .collect();
    (pods, list)
}

/// Waits (bounded by `limit`) until `want` pods labelled `app=APP` run; panics with the list
/// otherwise.
pub fn wait_running(lab: &Lab, app: &str, want: usize, limit: Duration) -> Vec<RealPod> {
    let started = Instant::now();
    loop {
        let (pods, list) = running(lab, app);
        if pods.len() == want {
            return pods;
        }
        assert!(
            started.elapsed() < limit,
            "{} of {want} pods app={app} running after {limit:?}: {list:#}",
            pods.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `kubectl apply` of a YAML document.
pub fn apply(lab: &Lab, yaml: &str) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.path().to_str().unwrap()]);
}

/// An agnhost `netexec` pod on `node` (HTTP on `http`, UDP on `http + 1`), labelled `app=APP`
/// and `labels` (`key: value` lines), in the node's own network namespace when `host_network`.
pub fn netexec_pod(
    lab: &Lab,
    name: &str,
    node: &str,
    app: &str,
    labels: &[(&str, &str)],
    host_network: bool,
    http: u16,
) {
    let mut extra = String::new();
    for (k, v) in labels {
        extra += &format!("    {k}: \"{v}\"\n");
    }
    let udp = http + 1;
    apply(
        lab,
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels:\n    app: {app}\n{extra}\
             spec:\n  nodeName: {node}\n  hostNetwork: {host_network}\n  terminationGracePeriodSeconds: 1\n  \
             containers:\n  - name: netexec\n    image: {AGNHOST}\n    \
             args: [netexec, --http-port={http}, --udp-port={udp}]\n"
        ),
    );
}

/// A Service `name` of `type_` (ClusterIP or NodePort) in front of the pods `selector` selects,
/// port 80 to 8080; (its cluster IP, its node port or 0).
pub fn service(lab: &Lab, name: &str, type_: &str, selector: (&str, &str)) -> (String, u16) {
    apply(
        lab,
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {type_}\n  \
             selector:\n    {}: \"{}\"\n  ports:\n  - port: 80\n    targetPort: 8080\n    protocol: TCP\n",
            selector.0, selector.1
        ),
    );
    let svc: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "service", name, "-o", "json"])).unwrap();
    let ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap_or(0);
    (ip, u16::try_from(port).unwrap())
}

/// The nodes' names and InternalIPs (the underlay addresses), sorted by name.
pub fn node_addresses(lab: &Lab) -> Vec<(String, String)> {
    let nodes: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    let mut out: Vec<(String, String)> = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let ip = n["status"]["addresses"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["type"] == "InternalIP")
                .unwrap()["address"]
                .as_str()
                .unwrap()
                .to_string();
            (n["metadata"]["name"].as_str().unwrap().to_string(), ip)
        })
        .collect();
    out.sort();
    out
}

/// The nodes' podCIDRs, by node name.
pub fn pod_cidrs(lab: &Lab) -> std::collections::HashMap<String, String> {
    let nodes: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["metadata"]["name"].as_str().unwrap().to_string(),
                n["spec"]["podCIDR"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// TCP from pod `from` to `to:port` (agnhost connect): true if it connected.
pub fn connects(lab: &Lab, from: &str, to: &str) -> bool {
    lab.kubectl(&[
        "exec",
        from,
        "--",
        "/agnhost",
        "connect",
        to,
        "--timeout=2s",
    ])
    .status
    .success()
}

pub fn eventually_connects(lab: &Lab, from: &str, to: &str, want: bool, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if connects(lab, from, to) == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The body of an HTTP/1.0 reply, if the status is 200.
fn http_body(reply: &str) -> Result<String, String> {
    let (head, body) = reply
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP reply: {reply:?}"))?;
    if !(head.starts_with("HTTP/1.") && head.contains(" 200 ")) {
        return Err(format!("HTTP reply {head:?}"));
    }
    Ok(body.trim().to_string())
}

/// From pod `from` (`kubectl exec`, busybox nc), one HTTP GET of `path` at `to`; the body.
pub fn exec_get(lab: &Lab, from: &str, to: &str, path: &str) -> Result<String, String> {
    let (host, port) = to.rsplit_once(':').unwrap();
    let script = format!(
        "printf 'GET {path} HTTP/1.0\\r\\nHost: {to}\\r\\n\\r\\n' | timeout 5 nc {host} {port}"
    );
    let out = lab.kubectl(&["exec", from, "--", "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    http_body(&text).map_err(|e| format!("{e}; {}", output_text(&out)))
}

/// From the network namespace at `netns` (a path), one HTTP GET of `path` at `to` (bounded by
/// 3 s); the body.
pub fn ns_get(netns: PathBuf, to: SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let path = path.to_string();
    in_netns_path(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {to}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)
            .map_err(|e| format!("read from {to}: {e}"))?;
        http_body(&reply)
    })
}

/// The network namespace of pod `name` (default namespace): `/proc/PID/ns/net` of a process in
/// its kubelet cgroup (`.../pod<UID>/...`, the cgroupfs driver's layout).
pub fn pod_netns_path(lab: &Lab, name: &str) -> PathBuf {
    let uid = lab.kubectl_ok(&["get", "pod", name, "-o", "jsonpath={.metadata.uid}"]);
    let want = format!("/pod{}/", uid.trim());
    let root = format!(":/sluice-lab-{}-node-", lab.name);
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().parse::<u32>().is_err() {
            continue;
        }
        let g = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if g.lines().any(|l| l.contains(&root) && l.contains(&want)) {
            return e.path().join("ns/net");
        }
    }
    panic!("no process of pod {name} (uid {uid}) in lab {}", lab.name);
}
