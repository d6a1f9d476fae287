//! Helpers for the suites on a real-Kubernetes lab (`sluice lab up --kubernetes DIR`): the
//! binaries' directory (or why a suite skips), pods pinned to nodes, `kubectl exec` probes, a
//! pod's network namespace found through its kubelet cgroup, and HTTP to agnhost's `netexec`
//! from a namespace, sweeps of ICMP, TCP and UDP through `kubectl exec`, and long-lived TCP
//! flows between pods (Cilium's `conn-disrupt`: a small message every 100 ms, echoed, any
//! reset or stall a failure). Every wait is bounded.

use crate::lab::{in_netns_path, output_text, Lab};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The kit's agnhost image (`../shared/realk8s/images/agnhost.tar`, which `lab up
/// --kubernetes` imports into every node's containerd; it carries busybox's ping and nc).
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.43";

pub use crate::lab::k8s_bin;

/// Waits (bounded by `limit`, kubectl's own `--timeout`) until sluice's DaemonSet has rolled
/// out on every node; panics with kubectl's words otherwise.
pub fn sluice_rolled_out(lab: &Lab, limit: Duration) {
    lab.kubectl_ok(&[
        "-n",
        "kube-system",
        "rollout",
        "status",
        "ds/sluice",
        &format!("--timeout={}s", limit.as_secs().max(1)),
    ]);
}

/// An agent pod of sluice's DaemonSet as the API server lists it.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub node: String,
    pub pod: String,
    /// The image of its first container (the agent's).
    pub image: String,
    pub ready: bool,
    /// It has a deletionTimestamp.
    pub deleting: bool,
}

/// The agent pods of sluice's DaemonSet, those being deleted included.
pub fn agent_pods(lab: &Lab) -> Vec<AgentPod> {
    let list: Value = serde_json::from_str(&lab.kubectl_ok(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=sluice",
        "-o",
        "json",
    ]))
    .unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let c = &p["status"]["containerStatuses"][0];
            AgentPod {
                node: p["spec"]["nodeName"].as_str().unwrap_or("").to_string(),
                pod: p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                image: c["image"].as_str().unwrap_or("").to_string(),
                ready: c["ready"] == true,
                deleting: !p["metadata"]["deletionTimestamp"].is_null(),
            }
        })
        .collect()
}

/// A running pod: name, node, address, uid.
#[derive(Debug, Clone)]
pub struct RealPod {
    pub name: String,
    pub node: String,
    pub ip: String,
    /// `status.podIPs`: `ip` first, then a dual-stack pod's other family.
    pub ips: Vec<String>,
    pub uid: String,
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
            ips: p["status"]["podIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some(a["ip"].as_str()?.to_string()))
                .collect(),
            uid: p["metadata"]["uid"].as_str().unwrap().to_string(),
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

/// `ip:port`, an IPv6 address in brackets (what agnhost's `connect` and HTTP take).
pub fn host_port(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// From pod `from` (`kubectl exec`, busybox nc), one HTTP GET of `path` at `to` (`ip:port`,
/// `[ipv6]:port`); the body.
pub fn exec_get(lab: &Lab, from: &str, to: &str, path: &str) -> Result<String, String> {
    let (host, port) = to.rsplit_once(':').unwrap();
    let host = host.trim_start_matches('[').trim_end_matches(']');
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

/// The network namespace of pod `name` (default namespace), as [`pod_pid`] finds it.
pub fn pod_netns_path(lab: &Lab, name: &str) -> PathBuf {
    let uid = lab.kubectl_ok(&["get", "pod", name, "-o", "jsonpath={.metadata.uid}"]);
    match pod_pid(uid.trim()) {
        Some(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        None => panic!("no process of pod {name} (uid {uid}) in lab {}", lab.name),
    }
}

/// From pod `from`, through `kubectl exec` (API server -> kubelet -> containerd), one round of
/// ICMP, TCP and UDP to every target (agnhost netexec on 8080/TCP and 8081/UDP); returns the
/// lines that did not answer.
pub fn sweep(lab: &Lab, from: &str, targets: &[RealPod]) -> Vec<String> {
    let addrs: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.name.clone(), t.ip.clone()))
        .collect();
    sweep_addrs(lab, from, &addrs)
}

/// [`sweep`] to addresses: `(name, address)` of each target, IPv4 or IPv6.
pub fn sweep_addrs(lab: &Lab, from: &str, targets: &[(String, String)]) -> Vec<String> {
    let mut script = String::new();
    for (_, ip) in targets {
        let (tcp, udp) = (host_port(ip, 8080), host_port(ip, 8081));
        // busybox's ping takes either family.
        script += &format!(
            "ping -c1 -W2 {ip} >/dev/null 2>&1 && echo icmp {ip} ok || echo icmp {ip} lost; \
             /agnhost connect {tcp} --timeout=3s >/dev/null 2>&1 && echo tcp {ip} ok || echo tcp {ip} lost; \
             /agnhost connect {udp} --protocol=udp --timeout=3s >/dev/null 2>&1 && echo udp {ip} ok || echo udp {ip} lost; "
        );
    }
    let out = lab.kubectl(&["exec", from, "--", "sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut bad = Vec::new();
    for (name, ip) in targets {
        // agnhost connect over UDP waits for netexec's answer (to its "hostname" request).
        for proto in ["icmp", "tcp", "udp"] {
            if !text.lines().any(|l| l == format!("{proto} {ip} ok")) {
                bad.push(format!("{from} -> {name} ({ip}) {proto}"));
            }
        }
    }
    if !out.status.success() && bad.is_empty() {
        bad.push(format!("kubectl exec {from}: {}", output_text(&out)));
    }
    bad
}

/// Sweeps until every target answers (a new pod is held closed until its policy is in
/// place), bounded; the misses of the last round.
pub fn sweep_until_all(lab: &Lab, from: &str, targets: &[RealPod], limit: Duration) -> Vec<String> {
    let addrs: Vec<(String, String)> = targets
        .iter()
        .map(|t| (t.name.clone(), t.ip.clone()))
        .collect();
    sweep_addrs_until_all(lab, from, &addrs, limit)
}

/// [`sweep_until_all`] to addresses (see [`sweep_addrs`]).
pub fn sweep_addrs_until_all(
    lab: &Lab,
    from: &str,
    targets: &[(String, String)],
    limit: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + limit;
    loop {
        let bad = sweep_addrs(lab, from, targets);
        if bad.is_empty() || Instant::now() > deadline {
            return bad;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A process of pod `uid` on the host (its containers' processes are in the kubelet's cgroup
/// `.../pod<UID>/...`, cgroupfs driver): `/proc/PID/ns/net` is the pod's network namespace.
pub fn pod_pid(uid: &str) -> Option<u32> {
    let needle = format!("/pod{uid}/");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.contains(&needle))
        })
}

/// Counters of the TCP stack of the network namespace of process `pid`: `RetransSegs` of
/// `Tcp:` in `/proc/PID/net/snmp` and the D-SACKs it sent (`TCPDSACKOldSent` and
/// `TCPDSACKOfoSent` of `TcpExt:` in `/proc/PID/net/netstat`): a retransmitted segment whose
/// original did arrive is answered with a D-SACK, so over a set of namespaces that hold both ends
/// of every connection, retransmissions minus D-SACKs sent are the segments really lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpCounters {
    pub retransmits: u64,
    pub dsacks_sent: u64,
}

impl std::ops::Sub for TcpCounters {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self {
            retransmits: self.retransmits - o.retransmits,
            dsacks_sent: self.dsacks_sent - o.dsacks_sent,
        }
    }
}

fn counter(file: &str, section: &str, names: &[&str]) -> u64 {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines = text.lines().filter(|l| l.starts_with(section));
    let (keys, values) = (lines.next().unwrap(), lines.next().unwrap());
    let values: Vec<&str> = values.split_whitespace().collect();
    keys.split_whitespace()
        .enumerate()
        .filter(|(_, k)| names.contains(k))
        .map(|(i, _)| values[i].parse::<u64>().unwrap())
        .sum()
}

pub fn tcp_counters(pid: u32) -> TcpCounters {
    TcpCounters {
        retransmits: counter(&format!("/proc/{pid}/net/snmp"), "Tcp:", &["RetransSegs"]),
        dsacks_sent: counter(
            &format!("/proc/{pid}/net/netstat"),
            "TcpExt:",
            &["TCPDSACKOldSent", "TCPDSACKOfoSent"],
        ),
    }
}

/// Runs `f` on a fresh thread that entered the network namespace of process `pid`.
fn in_pid_netns<R: Send + 'static>(pid: u32, f: impl FnOnce() -> R + Send + 'static) -> R {
    in_netns_path(PathBuf::from(format!("/proc/{pid}/ns/net")), f)
}

/// The message period of a flow.
pub const PERIOD: Duration = Duration::from_millis(100);
/// A read that waits longer than this is a stall (a failure).
const STALL: Duration = Duration::from_secs(3);

/// What one flow saw.
#[derive(Debug, Default)]
pub struct FlowReport {
    pub name: String,
    pub sent: u64,
    /// Messages the server read.
    pub served: u64,
    /// Echoes the client read.
    pub echoed: u64,
    /// The longest round trip of a message sent after the first second, in ms.
    pub max_rtt_ms: f64,
    /// Resets, stalls, short reads: each with its time since the flow started.
    pub errors: Vec<String>,
    /// Round trips over 50 ms after the first second: (seconds since the start, ms).
    pub slow: Vec<(f64, f64)>,
}

struct Shared {
    start: Instant,
    stop: AtomicBool,
    sent: AtomicU64,
    served: AtomicU64,
    echoed: AtomicU64,
    max_rtt_us: AtomicU64,
    errors: Mutex<Vec<String>>,
    slow: Mutex<Vec<(f64, f64)>>,
}

impl Shared {
    fn fail(&self, what: &str, e: &dyn std::fmt::Display) {
        let at = self.start.elapsed().as_secs_f64();
        self.errors
            .lock()
            .unwrap()
            .push(format!("{what} at {at:.2} s: {e}"));
    }
}

/// A long-lived TCP connection from a pod to another's `ip:port`: every [`PERIOD`] the client
/// sends 8 bytes (its send time), the server echoes them, the client reads the echo.
pub struct Flow {
    name: String,
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Flow {
    /// Listens in the network namespace of `server_pid` on `server_ip:port`, connects from that
    /// of `client_pid`, and starts the three loops (client writer, client reader, server echo).
    pub fn start(
        name: &str,
        client_pid: u32,
        server_pid: u32,
        server_ip: Ipv4Addr,
        port: u16,
    ) -> Self {
        let addr = SocketAddr::from((server_ip, port));
        let listener = in_pid_netns(server_pid, move || TcpListener::bind(addr).unwrap());
        // Port 0: the one the kernel chose.
        let addr = listener.local_addr().unwrap();
        let client = in_pid_netns(client_pid, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("{name}: connect to {addr}: {e}"));
        let (server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(STALL)).unwrap();
            s.set_write_timeout(Some(STALL)).unwrap();
            s.set_nodelay(true).unwrap();
        }
        let shared = Arc::new(Shared {
            start: Instant::now(),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            served: AtomicU64::new(0),
            echoed: AtomicU64::new(0),
            max_rtt_us: AtomicU64::new(0),
            errors: Mutex::new(Vec::new()),
            slow: Mutex::new(Vec::new()),
        });
        let mut threads = Vec::new();
        // The server: echo each message until the client's end of stream.
        let (sh, mut s) = (shared.clone(), server);
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            loop {
                match s.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::UnexpectedEof
                            && sh.stop.load(Ordering::SeqCst) =>
                    {
                        break
                    }
                    Err(e) => return sh.fail("server read", &e),
                }
                sh.served.fetch_add(1, Ordering::SeqCst);
                if let Err(e) = s.write_all(&buf) {
                    return sh.fail("server write", &e);
                }
            }
            let _ = s.shutdown(std::net::Shutdown::Write);
        }));
        // The client's reader: the echoes, each one's round trip.
        let (sh, mut r) = (shared.clone(), client.try_clone().unwrap());
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 8];
            loop {
                match r.read_exact(&mut buf) {
                    Ok(()) => {}
                    Err(e)
                        if e.kind() == std::io::ErrorKind::UnexpectedEof
                            && sh.stop.load(Ordering::SeqCst) =>
                    {
                        break
                    }
                    Err(e) => return sh.fail("client read", &e),
                }
                let sent_at = u64::from_be_bytes(buf);
                let now = sh.start.elapsed().as_micros() as u64;
                sh.echoed.fetch_add(1, Ordering::SeqCst);
                let rtt = now.saturating_sub(sent_at);
                if sent_at >= 1_000_000 {
                    sh.max_rtt_us.fetch_max(rtt, Ordering::SeqCst);
                    if rtt > 50_000 {
                        let at = sent_at as f64 / 1e6;
                        sh.slow.lock().unwrap().push((at, rtt as f64 / 1000.0));
                    }
                }
            }
        }));
        // The client's writer: one message per period, on a fixed schedule.
        let (sh, mut w) = (shared.clone(), client);
        threads.push(std::thread::spawn(move || {
            let mut n: u32 = 0;
            while !sh.stop.load(Ordering::SeqCst) {
                let now = sh.start.elapsed().as_micros() as u64;
                if let Err(e) = w.write_all(&now.to_be_bytes()) {
                    return sh.fail("client write", &e);
                }
                sh.sent.fetch_add(1, Ordering::SeqCst);
                n += 1;
                if let Some(wait) = (PERIOD * n).checked_sub(sh.start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            let _ = w.shutdown(std::net::Shutdown::Write);
        }));
        Self {
            name: name.to_string(),
            shared,
            threads,
        }
    }

    /// Messages sent so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::SeqCst)
    }

    /// Stops sending, lets the last echoes come back (bounded by the stall timeout) and reports.
    pub fn finish(self) -> FlowReport {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let s = &self.shared;
        FlowReport {
            name: self.name,
            sent: s.sent.load(Ordering::SeqCst),
            served: s.served.load(Ordering::SeqCst),
            echoed: s.echoed.load(Ordering::SeqCst),
            max_rtt_ms: s.max_rtt_us.load(Ordering::SeqCst) as f64 / 1000.0,
            errors: s.errors.lock().unwrap().clone(),
            slow: s.slow.lock().unwrap().clone(),
        }
    }
}

/// Processes left by the lab: any naming its directory (control plane, containerd, its shims,
/// kubelets, kube-proxies), or in its kubelets' cgroups (the pods' containers).
pub fn lab_processes(lab: &Lab) -> Vec<String> {
    let marker = format!("/run/sluice/lab/{}/", lab.name);
    let cgroup = format!(":/sluice-lab-{}-node-", lab.name);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let c = std::fs::read(e.path().join("cmdline")).ok()?;
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            let g = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            (c.contains(&marker) || g.contains(&cgroup)).then_some(c)
        })
        .collect()
}

/// The lab's kubelet cgroups left in any hierarchy.
pub fn lab_cgroups(lab: &Lab) -> Vec<String> {
    let prefix = format!("sluice-lab-{}-node-", lab.name);
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .filter_map(|h| std::fs::read_dir(h.ok()?.path()).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path().display().to_string())
        .collect()
}

/// Mounts of the host's mount namespace under the lab's directory.
pub fn lab_mounts(lab: &Lab) -> Vec<String> {
    let marker = format!("/run/sluice/lab/{}", lab.name);
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&marker))
        .map(str::to_string)
        .collect()
}
