//! `bench-k8s`: the real-Kubernetes lab (`sluice lab up --kubernetes DIR`), sluice side by side
//! with the same cluster wired by the standard CNI plugins (`--reference-cni`: bridge +
//! host-local + portmap, the kit's reference config), one lab after the other:
//!
//! 1. `lab up --kubernetes` with N nodes, wall time.
//! 2. Pod start: `kubectl apply` of P pods (agnhost `pause`, placed by the scheduler), the time
//!    from that command until each pod is Running with an address, p50/p99 per pod over R rounds
//!    (the pods deleted and gone between rounds). Times come from a `kubectl get -w` stream read
//!    as it arrives, not from polling.
//! 3. Pod reachability (perf-tests' `pod_creation_reachability_latency`), with K NetworkPolicies
//!    in the cluster that all select the probed pods: a prober pod on the first node; batches of
//!    pods on the other nodes. The moment a probed pod's address appears in its status (the watch
//!    event that first carries it, read by this process), the prober, a raw ICMP socket this
//!    process opened inside the prober pod's network namespace, sends it an echo request every
//!    `--interval-ms`; the figure is the send time of the first request the pod answered (its
//!    arrival is that plus one hop on this machine) minus the moment the address appeared. The
//!    pod's kernel answers, so no process in it has to be running yet. One clock: the host's.
//!
//! The load average is printed with every figure (the machine is shared). Each lab is removed on
//! every exit path (guard on return and panic, and on SIGINT/TERM/HUP); every wait is bounded.
//!
//! Usage: bench-k8s [--kubernetes DIR (default $SLUICE_K8S_BIN)] [--sluice PATH] [--nodes N]
//!                  [--pods P] [--runs R] [--reach-pods B] [--reach-runs S] [--policies K]
//!                  [--interval-ms I] [--only sluice|reference] [--first sluice|reference]
//!
//! The labs run one after the other, the reference first unless `--first sluice`: on a shared
//! machine whose load drifts, a run in each order tells the drift from the networks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use sluice_e2e::bench::{cleanup_on_signals, ms, pct, Flags, Guard};
use sluice_e2e::k8sbench::{self as kb, PodSeen};
use sluice_e2e::lab::{lab_cmd, unique_lab_name};
use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: bench-k8s [--kubernetes DIR] [--sluice PATH] [--nodes N] [--pods P] [--runs R] [--reach-pods B] [--reach-runs S] [--policies K] [--interval-ms I] [--only sluice|reference] [--first sluice|reference]";

/// How long a probed pod may stay unreachable before it counts as never reached.
const REACH_LIMIT: Duration = Duration::from_secs(10);

fn kubectl_in(kubeconfig: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("timeout")
        .args(["-k", "5", "120", "kubectl", "--kubeconfig", kubeconfig])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running kubectl");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(text.as_bytes()).expect("writing to kubectl");
    }
    let out = child.wait_with_output().expect("waiting for kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn kubectl(kubeconfig: &str, args: &[&str]) -> String {
    kubectl_in(kubeconfig, args, None)
}

fn load() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    match kb::loadavg(&text) {
        Some((a, b, c)) => format!("load {a:.2} {b:.2} {c:.2}"),
        None => "load ?".into(),
    }
}

/// p50/p99/max of `samples`, sorted here.
fn figures(samples: &mut [Duration]) -> String {
    if samples.is_empty() {
        return "no samples".into();
    }
    samples.sort();
    format!(
        "p50 {} p99 {} max {} (n={})",
        ms(pct(samples, 50.0)),
        ms(pct(samples, 99.0)),
        ms(*samples.last().unwrap()),
        samples.len()
    )
}

/// One network the bench measures, each on a lab of its own.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Network {
    Sluice,
    Reference,
}

impl Network {
    fn label(self) -> &'static str {
        match self {
            Network::Sluice => "sluice",
            Network::Reference => "bridge+host-local+portmap",
        }
    }
}

/// `kubectl get pods -w` in a namespace, each event stamped as it is read.
struct Watch {
    child: Child,
    events: Receiver<(Instant, PodSeen)>,
}

impl Watch {
    fn start(kubeconfig: &str, ns: &str) -> Self {
        let mut child = Command::new("kubectl")
            .args(["--kubeconfig", kubeconfig, "-n", ns, "get", "pods", "-w"])
            .args(["-o", "json", "--output-watch-events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("running kubectl get -w");
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = channel();
        std::thread::spawn(move || {
            let stream = serde_json::Deserializer::from_reader(std::io::BufReader::new(stdout));
            for value in stream.into_iter::<Value>() {
                let Ok(value) = value else { break };
                let at = Instant::now();
                if let Some(seen) = kb::pod_seen(&value) {
                    if tx.send((at, seen)).is_err() {
                        break;
                    }
                }
            }
        });
        Watch { child, events }
    }

    /// The next event, until `deadline`.
    fn next(&self, deadline: Instant) -> Option<(Instant, PodSeen)> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.events.recv_timeout(left) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("kubectl get -w ended"),
        }
    }

    /// Waits for an event on pod `name` that satisfies `want`.
    fn until(&self, name: &str, limit: Duration, want: impl Fn(&PodSeen) -> bool) -> PodSeen {
        let deadline = Instant::now() + limit;
        loop {
            match self.next(deadline) {
                Some((_, seen)) if seen.name == name && want(&seen) => return seen,
                Some(_) => {}
                None => panic!("pod {name}: not as wanted within {} s", limit.as_secs()),
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the prober measured of one pod.
#[derive(Debug, Clone, Copy)]
struct Reached {
    /// From the address appearing to the send of the first echo request the pod answered.
    latency: Duration,
    /// From the address appearing to the prober's first request (how late it started).
    reaction: Duration,
}

struct Target {
    name: String,
    ip: Ipv4Addr,
    appeared: Instant,
    first: Option<Instant>,
    due: Instant,
}

/// A raw ICMP socket in the prober pod's network namespace, and the thread that probes every
/// address handed to it until the pod answers (or [`REACH_LIMIT`]).
struct Prober {
    targets: Option<Sender<(String, Ipv4Addr, Instant)>>,
    results: Receiver<(String, Option<Reached>)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    fn start(netns: &Path, interval: Duration) -> Self {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
        let file = sluice_net::netns::open(netns).expect("opening the prober's netns");
        let sock: OwnedFd = sluice_net::netns::run_in(&file, netns, || {
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
                SockProtocol::Icmp,
            )
        })
        .expect("entering the prober's netns")
        .expect("a raw ICMP socket");
        let (targets, rx) = channel();
        let (tx, results) = channel();
        let thread = std::thread::spawn(move || probe_loop(&sock, interval, &rx, &tx));
        Prober {
            targets: Some(targets),
            results,
            thread: Some(thread),
        }
    }

    fn probe(&self, name: &str, ip: Ipv4Addr, appeared: Instant) {
        let _ = self
            .targets
            .as_ref()
            .unwrap()
            .send((name.to_string(), ip, appeared));
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        drop(self.targets.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A new address to probe; requests sent earlier to the same address (a pod of an earlier round
/// had it) no longer count.
fn add(
    pending: &mut Vec<Target>,
    sent: &mut HashMap<u16, (Ipv4Addr, Instant)>,
    name: String,
    ip: Ipv4Addr,
    appeared: Instant,
) {
    sent.retain(|_, (to, _)| *to != ip);
    pending.push(Target {
        name,
        ip,
        appeared,
        first: None,
        due: Instant::now(),
    });
}

fn probe_loop(
    sock: &OwnedFd,
    interval: Duration,
    rx: &Receiver<(String, Ipv4Addr, Instant)>,
    tx: &Sender<(String, Option<Reached>)>,
) {
    use nix::errno::Errno;
    use nix::sys::socket::{recv, sendto, MsgFlags, SockaddrIn};
    let id = (std::process::id() & 0xffff) as u16;
    let mut seq: u16 = 0;
    // seq -> (address, sent at); entries older than the limit are dropped.
    let mut sent: HashMap<u16, (Ipv4Addr, Instant)> = HashMap::new();
    let mut pending: Vec<Target> = Vec::new();
    let mut open = true;
    let mut buf = [0u8; 1500];
    while open || !pending.is_empty() {
        loop {
            match rx.try_recv() {
                Ok((name, ip, appeared)) => add(&mut pending, &mut sent, name, ip, appeared),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        let now = Instant::now();
        for t in pending.iter_mut().filter(|t| t.due <= now) {
            seq = seq.wrapping_add(1);
            let addr = SockaddrIn::from(SocketAddrV4::new(t.ip, 0));
            let at = Instant::now();
            if sendto(
                sock.as_raw_fd(),
                &kb::echo_request(id, seq),
                &addr,
                MsgFlags::empty(),
            )
            .is_ok()
            {
                sent.insert(seq, (t.ip, at));
                t.first.get_or_insert(at);
            }
            t.due = at + interval;
        }
        loop {
            match recv(sock.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    let Some((src, rid, rseq)) = kb::echo_reply(&buf[..n]) else {
                        continue;
                    };
                    let Some(&(ip, at)) = sent.get(&rseq).filter(|(ip, _)| rid == id && *ip == src)
                    else {
                        continue;
                    };
                    if let Some(i) = pending.iter().position(|t| t.ip == ip) {
                        let t = pending.swap_remove(i);
                        let reached = Reached {
                            latency: at.saturating_duration_since(t.appeared),
                            reaction: t.first.unwrap_or(at).saturating_duration_since(t.appeared),
                        };
                        let _ = tx.send((t.name, Some(reached)));
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => panic!("receiving on the prober's socket: {e}"),
            }
        }
        let now = Instant::now();
        pending.retain(|t| {
            let late = now.duration_since(t.appeared) > REACH_LIMIT;
            if late {
                let _ = tx.send((t.name.clone(), None));
            }
            !late
        });
        sent.retain(|_, (_, at)| now.duration_since(*at) <= REACH_LIMIT + Duration::from_secs(1));
        if pending.is_empty() && open {
            match rx.recv_timeout(Duration::from_millis(50)) {
                Ok((name, ip, appeared)) => add(&mut pending, &mut sent, name, ip, appeared),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        } else {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
}

/// The settings of a run.
struct Settings {
    bin: String,
    nodes: u8,
    pods: usize,
    runs: usize,
    reach_pods: usize,
    reach_runs: usize,
    policies: usize,
    interval: Duration,
}

/// What one network measured.
#[derive(Default)]
struct Measured {
    up: Duration,
    up_load: String,
    start: Vec<Duration>,
    start_load: String,
    reach: Vec<Duration>,
    reaction: Vec<Duration>,
    unreached: usize,
    reach_load: String,
    /// sluice's agents' policy passes during the reachability rounds: field -> durations.
    passes: Vec<(&'static str, Vec<Duration>)>,
}

/// The durations sluice's agents logged for their policy passes since `since` (RFC 3339): how
/// long a pass took in all and in its steps.
fn agent_passes(kc: &str, since: &str) -> Vec<(&'static str, Vec<Duration>)> {
    let since = format!("--since-time={since}");
    let log = kubectl(
        kc,
        &[
            "-n",
            "kube-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=sluice",
            "-c",
            "agent",
            "--tail=-1",
            &since,
        ],
    );
    ["took", "compile", "render", "apply"]
        .into_iter()
        .map(|f| (f, kb::logged_durations(&log, "policy applied", f)))
        .collect()
}

fn apply(kc: &str, ns: &str, list: &Value) {
    kubectl_in(kc, &["-n", ns, "apply", "-f", "-"], Some(&list.to_string()));
}

/// Deletes the pods labelled `app=LABEL` and waits until they are gone.
fn delete_pods(kc: &str, ns: &str, label: &str) {
    let selector = format!("app={label}");
    kubectl(
        kc,
        &["-n", ns, "delete", "pods", "-l", &selector, "--wait=false"],
    );
    let t = Instant::now();
    loop {
        let left = kubectl(
            kc,
            &["-n", ns, "get", "pods", "-l", &selector, "-o", "name"],
        );
        if left.trim().is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(180),
            "pods {selector} not gone after 180 s: {left}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Pod start: `kubectl apply` of `count` pods, the time from it until each is seen Running with
/// an address.
fn pod_start_round(kc: &str, ns: &str, watch: &Watch, round: usize, count: usize) -> Vec<Duration> {
    let prefix = format!("start-{round}");
    let list = kb::pods(&prefix, count, &json!({"app": "start"}), &[]);
    let t0 = Instant::now();
    apply(kc, ns, &list);
    let mut seen: HashMap<String, Duration> = HashMap::new();
    let deadline = t0 + Duration::from_secs(240);
    while seen.len() < count {
        let Some((at, pod)) = watch.next(deadline) else {
            panic!(
                "round {round}: {} of {count} pods running after 240 s",
                seen.len()
            );
        };
        if pod.name.starts_with(&format!("{prefix}-")) && pod.running() {
            seen.entry(pod.name)
                .or_insert(at.saturating_duration_since(t0));
        }
    }
    delete_pods(kc, ns, "start");
    seen.into_values().collect()
}

/// Reachability: `count` pods on `nodes`, each probed from the moment its address appears.
fn reach_round(
    kc: &str,
    ns: &str,
    watch: &Watch,
    prober: &Prober,
    round: usize,
    count: usize,
    nodes: &[String],
) -> Vec<(String, Option<Reached>)> {
    let prefix = format!("reach-{round}");
    let labels = json!({kb::REACH_LABEL.0: kb::REACH_LABEL.1});
    apply(kc, ns, &kb::pods(&prefix, count, &labels, nodes));
    let mut probed: HashMap<String, Ipv4Addr> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while probed.len() < count {
        let Some((at, pod)) = watch.next(deadline) else {
            panic!(
                "reach round {round}: {} of {count} pods had an address after 240 s",
                probed.len()
            );
        };
        if !pod.name.starts_with(&format!("{prefix}-")) || probed.contains_key(&pod.name) {
            continue;
        }
        if let Some(ip) = pod.ip {
            prober.probe(&pod.name, ip, at);
            probed.insert(pod.name, ip);
        }
    }
    let mut results = Vec::new();
    let deadline = Instant::now() + REACH_LIMIT + Duration::from_secs(5);
    while results.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let r = prober
            .results
            .recv_timeout(left)
            .expect("the prober gave no result in time");
        results.push(r);
    }
    delete_pods(kc, ns, "reach");
    results
}

/// The network namespace of a running pod: its container's task pid in its node's containerd.
fn pod_netns(lab: &str, pod: &PodSeen) -> PathBuf {
    let node = pod.node.as_deref().expect("the pod has a node");
    let container = pod.container.as_deref().expect("the pod has a container");
    let socket = format!("/run/sluice/lab/{lab}/k8s/nodes/{node}/containerd/containerd.sock");
    let out = Command::new("timeout")
        .args(["-k", "5", "30", "ctr", "--address", &socket, "-n", "k8s.io"])
        .args(["task", "ls"])
        .output()
        .expect("running ctr");
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = kb::task_pid(&text, container)
        .unwrap_or_else(|| panic!("no task {container} in {node}'s containerd:\n{text}"));
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

fn measure(s: &Settings, network: Network) -> Measured {
    let mut m = Measured::default();
    let name = unique_lab_name();
    let n = name.clone();
    let _guard = Guard::new(move || {
        let _ = lab_cmd(&["down", "--name", &n], 120);
    });
    let nodes_s = s.nodes.to_string();
    let mut args: Vec<&str> = vec![
        "up",
        "--name",
        &name,
        "--nodes",
        &nodes_s,
        "--kubernetes",
        &s.bin,
    ];
    if network == Network::Reference {
        args.push("--reference-cni");
    }
    let started = Instant::now();
    let out = lab_cmd(&args, 400);
    assert!(
        out.status.success(),
        "{}: lab up failed: {}",
        network.label(),
        String::from_utf8_lossy(&out.stderr)
    );
    m.up = started.elapsed();
    m.up_load = load();
    println!(
        "[{}] lab up --kubernetes, {} nodes: {:.1} s ({})",
        network.label(),
        s.nodes,
        m.up.as_secs_f64(),
        m.up_load
    );
    let kc = format!("/run/sluice/lab/{name}/kubeconfig");
    let ns = name.as_str();
    let mut nodes: Vec<String> = kubectl(&kc, &["get", "nodes", "-o", "name"])
        .lines()
        .map(|l| l.trim_start_matches("node/").to_string())
        .collect();
    nodes.sort();
    assert!(nodes.len() >= 2, "the reachability probe needs 2 nodes");

    // The prober on the first node, labelled as the last policy admits; its first watch event
    // also says the watch has listed (events after it are all delivered).
    let prober_labels =
        json!({"app": "prober", "peer": kb::peer_label(s.policies.saturating_sub(1))});
    let mut prober_pod = kb::pods("prober", 1, &prober_labels, &nodes[..1]);
    prober_pod = prober_pod["items"][0].clone();
    apply(&kc, ns, &prober_pod);
    let watch = Watch::start(&kc, ns);
    let prober_seen = watch.until("prober-0", Duration::from_secs(180), |p| {
        p.running() && p.container.is_some()
    });
    for round in 0..s.runs {
        let mut times = pod_start_round(&kc, ns, &watch, round, s.pods);
        println!(
            "[{}] pod start round {round}: {} pods apply -> Running with an address: {} ({})",
            network.label(),
            s.pods,
            figures(&mut times),
            load()
        );
        m.start.extend(times);
    }
    m.start_load = load();

    let t = Instant::now();
    if s.policies > 0 {
        kubectl_in(
            &kc,
            &["-n", ns, "create", "-f", "-", "-o", "name"],
            Some(&kb::policies(s.policies).to_string()),
        );
    }
    println!(
        "[{}] {} NetworkPolicies created in {:.1} s",
        network.label(),
        s.policies,
        t.elapsed().as_secs_f64()
    );
    // The figure is with the policies in force: sluice's agents done with them first (no
    // policy pass logged for 3 s; at most 90 s).
    if network == Network::Sluice {
        let since = jiff::Timestamp::now().to_string();
        let t = Instant::now();
        let mut last = (0, Instant::now());
        while last.1.elapsed() < Duration::from_secs(3) && t.elapsed() < Duration::from_secs(90) {
            std::thread::sleep(Duration::from_millis(500));
            let n = agent_passes(&kc, &since)[0].1.len();
            if n != last.0 {
                last = (n, Instant::now());
            }
        }
        println!(
            "[{}] agents settled after {:.1} s",
            network.label(),
            t.elapsed().as_secs_f64()
        );
    }
    let prober = Prober::start(&pod_netns(&name, &prober_seen), s.interval);
    let reach_started = jiff::Timestamp::now().to_string();
    for round in 0..s.reach_runs {
        let results = reach_round(&kc, ns, &watch, &prober, round, s.reach_pods, &nodes[1..]);
        let mut lat = Vec::new();
        for (pod, r) in results {
            match r {
                Some(r) => {
                    lat.push(r.latency);
                    m.reaction.push(r.reaction);
                }
                None => {
                    eprintln!(
                        "[{}] {pod}: never reached within {} s",
                        network.label(),
                        REACH_LIMIT.as_secs()
                    );
                    m.unreached += 1;
                }
            }
        }
        println!(
            "[{}] reachability round {round}: {} ({})",
            network.label(),
            figures(&mut lat),
            load()
        );
        m.reach.extend(lat);
    }
    m.reach_load = load();
    if network == Network::Sluice {
        m.passes = agent_passes(&kc, &reach_started);
    }
    drop(prober);
    drop(watch);
    m
}

fn main() {
    let mut flags = Flags::from_env("bench-k8s", USAGE);
    let mut bin = std::env::var("SLUICE_K8S_BIN").ok();
    let mut sluice = sluice_e2e::sluice_bin();
    let mut s = Settings {
        bin: String::new(),
        nodes: 3,
        pods: 30,
        runs: 3,
        reach_pods: 10,
        reach_runs: 3,
        policies: 1000,
        interval: Duration::from_millis(5),
    };
    let mut only: Option<String> = None;
    let mut sluice_first = false;
    while let Some((flag, value)) = flags.next_pair() {
        match flag.as_str() {
            "--kubernetes" => bin = Some(value),
            "--sluice" => sluice = PathBuf::from(value),
            "--nodes" => s.nodes = flags.number(&flag, &value),
            "--pods" => s.pods = flags.number(&flag, &value),
            "--runs" => s.runs = flags.number(&flag, &value),
            "--reach-pods" => s.reach_pods = flags.number(&flag, &value),
            "--reach-runs" => s.reach_runs = flags.number(&flag, &value),
            "--policies" => s.policies = flags.number(&flag, &value),
            "--interval-ms" => s.interval = Duration::from_millis(flags.number(&flag, &value)),
            "--only" => only = Some(value),
            "--first" => match value.as_str() {
                "sluice" => sluice_first = true,
                "reference" => sluice_first = false,
                o => flags.fail(&format!("--first {o}: sluice or reference")),
            },
            _ => flags.fail(&format!("unknown flag {flag}")),
        }
    }
    let Some(bin) = bin else {
        flags.fail("no Kubernetes binaries: --kubernetes DIR or SLUICE_K8S_BIN")
    };
    s.bin = bin;
    let networks: Vec<Network> = match only.as_deref() {
        None if sluice_first => vec![Network::Sluice, Network::Reference],
        None => vec![Network::Reference, Network::Sluice],
        Some("sluice") => vec![Network::Sluice],
        Some("reference") => vec![Network::Reference],
        Some(o) => flags.fail(&format!("--only {o}: sluice or reference")),
    };
    flags.require(
        s.nodes >= 2,
        "--nodes at least 2 (the prober and the probed pods are on different nodes)",
    );
    flags.require((1..=200).contains(&s.pods), "--pods between 1 and 200");
    flags.require((1..=20).contains(&s.runs), "--runs between 1 and 20");
    flags.require(
        (1..=50).contains(&s.reach_pods),
        "--reach-pods between 1 and 50",
    );
    flags.require(
        (1..=20).contains(&s.reach_runs),
        "--reach-runs between 1 and 20",
    );
    flags.require(s.policies <= 5000, "--policies at most 5000");
    flags.require(
        (1..=100).contains(&s.interval.as_millis()),
        "--interval-ms between 1 and 100",
    );
    flags.require(nix::unistd::geteuid().is_root(), "run it as root");
    // The lab helpers run `SLUICE_BIN`; set before any thread exists.
    std::env::set_var("SLUICE_BIN", &sluice);
    cleanup_on_signals();

    let mut results: Vec<(Network, Measured)> = Vec::new();
    for network in networks {
        let m = measure(&s, network);
        results.push((network, m));
    }

    println!(
        "\nbench-k8s: {} nodes on real Kubernetes, {} cores, one lab at a time",
        s.nodes,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (network, m) in &mut results {
        println!("\n{}:", network.label());
        println!(
            "  lab up --kubernetes, {} nodes:            {:.1} s ({})",
            s.nodes,
            m.up.as_secs_f64(),
            m.up_load
        );
        println!(
            "  pod start ({} pods x {} rounds, apply -> Running with an address, per pod): {} ({})",
            s.pods,
            s.runs,
            figures(&mut m.start),
            m.start_load
        );
        println!(
            "  reachability ({} policies, address in status -> first packet in, from another node): {}; never reached: {} ({})",
            s.policies,
            figures(&mut m.reach),
            m.unreached,
            m.reach_load
        );
        println!(
            "    the prober's reaction (address in status -> first request sent): {}",
            figures(&mut m.reaction)
        );
        for (field, times) in &mut m.passes {
            println!(
                "    agents' policy passes meanwhile, {field}: {}",
                figures(times)
            );
        }
    }
    let get = |n: Network| results.iter().find(|(k, _)| *k == n).map(|(_, m)| m);
    if let (Some(sl), Some(re)) = (get(Network::Sluice), get(Network::Reference)) {
        println!("\nside by side (sluice | anchor: bridge+host-local+portmap | target):");
        println!(
            "  pod start p50/p99:    {} / {} | {} / {} | no slower than the anchor",
            ms(pct(&sl.start, 50.0)),
            ms(pct(&sl.start, 99.0)),
            ms(pct(&re.start, 50.0)),
            ms(pct(&re.start, 99.0)),
        );
        let reach = |m: &Measured| {
            if m.reach.is_empty() {
                "none".to_string()
            } else {
                format!("{} / {}", ms(pct(&m.reach, 50.0)), ms(pct(&m.reach, 99.0)))
            }
        };
        println!(
            "  reachability p50/p99: {} | {} (no policy enforced) | p99 < 200 ms with {} policies; perf-tests' published example 10-550 ms",
            reach(sl),
            reach(re),
            s.policies
        );
        println!(
            "  lab up, {} nodes:      {:.1} s | {:.1} s",
            s.nodes,
            sl.up.as_secs_f64(),
            re.up.as_secs_f64()
        );
    }
}
