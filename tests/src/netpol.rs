//! The NetworkPolicy truth-table suite's cases and machinery, shared by the embedded lab's
//! suite (`tests/netpol.rs`) and the real-Kubernetes lab's (`tests/realk8s_netpol.rs`):
//! namespaces x, y, z (labelled `ns=x` ...) with pods a, b, c (labelled `pod=a` ...) serving TCP,
//! UDP and SCTP on ports 80 and 81 and answering with their `namespace/name`; each case applies
//! policies, measures the full 9x9 reachability matrix from inside the pods' network namespaces
//! until it equals the one its own truth table predicts (bounded), then removes them.

use crate::lab::{in_netns, lab_cmd, Lab};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// How long a case may take to be enforced after its objects are in the API (the embedded
/// lab's; a lab sets its own in [`Env::deadline`]).
pub const ENFORCE_DEADLINE: Duration = Duration::from_secs(10);
/// Probes in flight at once, per lab.
pub const PROBE_THREADS: usize = 24;
pub const TCP_TIMEOUT: Duration = Duration::from_millis(300);
pub const UDP_TIMEOUT: Duration = Duration::from_millis(450);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

pub type Port = (Proto, u16);
pub const TCP80: Port = (Proto::Tcp, 80);
pub const TCP81: Port = (Proto::Tcp, 81);
pub const UDP80: Port = (Proto::Udp, 80);
pub const UDP81: Port = (Proto::Udp, 81);
pub const BASIC: &[Port] = &[TCP80];
pub const BOTH: &[Port] = &[TCP80, UDP80];
pub const ALL_PORTS: &[Port] = &[TCP80, TCP81, UDP80, UDP81];

/// One of the nine pods, as the truth tables see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P {
    pub ns: &'static str,
    pub pod: &'static str,
    pub ip: Ipv4Addr,
    /// Its IPv6 address, on a dual-stack lab.
    pub ip6: Option<Ipv6Addr>,
}

impl P {
    pub fn is(&self, id: &str) -> bool {
        format!("{}/{}", self.ns, self.pod) == id
    }
}

pub fn all_pods() -> Vec<(&'static str, &'static str)> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| (*ns, *p)))
        .collect()
}
pub fn apply_yaml(lab: &Lab, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("objects.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = lab.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "kubectl apply failed: {}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn kubectl_ok(lab: &Lab, args: &[&str]) {
    let out = lab.kubectl(args);
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn pods_json(lab: &Lab) -> Vec<Value> {
    let out = lab.kubectl(&["get", "pods", "-A", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Waits until the named pods run with an address; their addresses.
pub fn wait_running(lab: &Lab, want: &[(&str, &str)]) -> BTreeMap<String, Ipv4Addr> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ips: BTreeMap<String, Ipv4Addr> = pods_json(lab)
            .iter()
            .filter(|p| p["status"]["phase"] == "Running")
            .filter_map(|p| {
                let id = format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str()?,
                    p["metadata"]["name"].as_str()?
                );
                Some((id, p["status"]["podIP"].as_str()?.parse().ok()?))
            })
            .filter(|(id, _)| want.iter().any(|(ns, p)| *id == format!("{ns}/{p}")))
            .collect();
        if ips.len() == want.len() {
            return ips;
        }
        assert!(
            Instant::now() < deadline,
            "{}/{} pods running",
            ips.len(),
            want.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pods' IPv6 addresses (`status.podIPs`), by `namespace/name`, of those that have one.
pub fn pod_ips6(lab: &Lab) -> BTreeMap<String, Ipv6Addr> {
    pods_json(lab)
        .iter()
        .filter_map(|p| {
            let id = format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str()?,
                p["metadata"]["name"].as_str()?
            );
            let ip = p["status"]["podIPs"]
                .as_array()?
                .iter()
                .find_map(|a| a["ip"].as_str()?.parse::<Ipv6Addr>().ok())?;
            Some((id, ip))
        })
        .collect()
}

/// One probe from inside a pod's network namespace, as `sluice lab probe` does it: true when
/// the server answered with the target's identity.
pub fn probe(from_netns: &str, to: impl Into<SocketAddr>, proto: Proto, expect: &str) -> bool {
    let file = File::open(format!("/run/netns/{from_netns}")).expect("open netns");
    probe_in(&file, to.into(), proto, expect)
}

/// [`probe`] from the network namespace `netns` is open on (a named one, or a process's
/// `/proc/PID/ns/net`).
pub fn probe_in(netns: &File, to: SocketAddr, proto: Proto, expect: &str) -> bool {
    let expect = expect.to_string();
    in_netns_file(netns, move || {
        use std::io::Read;
        let answer = match proto {
            Proto::Tcp => (|| {
                let mut s = std::net::TcpStream::connect_timeout(&to, TCP_TIMEOUT).ok()?;
                s.set_read_timeout(Some(TCP_TIMEOUT)).ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out)
            })(),
            Proto::Udp => (|| {
                let any: IpAddr = match to {
                    SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                    SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
                };
                let s = std::net::UdpSocket::bind((any, 0)).ok()?;
                s.connect(to).ok()?;
                s.set_read_timeout(Some(UDP_TIMEOUT / 3)).ok()?;
                let mut buf = [0u8; 512];
                for _ in 0..3 {
                    s.send(b"probe").ok()?;
                    if let Ok(n) = s.recv(&mut buf) {
                        return Some(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                }
                None
            })(),
        };
        answer.is_some_and(|a| a.trim() == expect)
    })
}
/// Measured (or expected) reachability: per probed port, `from → to` for every ordered pair.
pub type Matrix = BTreeMap<Port, Vec<Vec<bool>>>;

pub struct Env {
    pub backend: &'static str,
    pub lab: Lab,
    pub pods: Vec<P>,
    /// Each pod's network namespace, open (in the order of `pods`): probes enter it.
    pub netns: Vec<File>,
    /// How long a case may take to be measured as enforced.
    pub deadline: Duration,
    /// Probe the pods' IPv6 addresses ([`P::ip6`]) instead of their IPv4 ones.
    pub ipv6: bool,
}

/// Runs `f` on a fresh thread that entered the network namespace `netns` is open on.
pub fn in_netns_file<R: Send + 'static>(netns: &File, f: impl FnOnce() -> R + Send + 'static) -> R {
    let file = netns.try_clone().expect("dup netns fd");
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

impl Env {
    /// The address probes reach `p` at.
    pub fn addr(&self, p: &P) -> IpAddr {
        match (self.ipv6, p.ip6) {
            (true, Some(ip6)) => ip6.into(),
            (true, None) => panic!("{}/{} has no IPv6 address", p.ns, p.pod),
            (false, _) => p.ip.into(),
        }
    }

    pub fn pod(&self, id: &str) -> &P {
        self.pods.iter().find(|p| p.is(id)).unwrap()
    }

    pub fn measure(&self, ports: &[Port]) -> Matrix {
        let jobs: Vec<(Port, usize, usize)> = ports
            .iter()
            .flat_map(|port| (0..9).flat_map(move |i| (0..9).map(move |j| (*port, i, j))))
            .collect();
        let next = AtomicUsize::new(0);
        let results: Vec<(Port, usize, usize, bool)> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..PROBE_THREADS)
                .map(|_| {
                    s.spawn(|| {
                        let mut got = Vec::new();
                        // Bounded: each worker takes at most every job once.
                        for _ in 0..jobs.len() {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let Some(&(port, i, j)) = jobs.get(k) else {
                                break;
                            };
                            let to = &self.pods[j];
                            let ok = probe_in(
                                &self.netns[i],
                                SocketAddr::new(self.addr(to), port.1),
                                port.0,
                                &format!("{}/{}", to.ns, to.pod),
                            );
                            got.push((port, i, j, ok));
                        }
                        got
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let mut m: Matrix = ports
            .iter()
            .map(|p| (*p, vec![vec![false; 9]; 9]))
            .collect();
        for (port, i, j, ok) in results {
            m.get_mut(&port).unwrap()[i][j] = ok;
        }
        m
    }

    pub fn expected(&self, ports: &[Port], truth: &dyn Fn(&P, &P, Port) -> bool) -> Matrix {
        ports
            .iter()
            .map(|port| {
                let rows = self
                    .pods
                    .iter()
                    .map(|f| {
                        self.pods
                            .iter()
                            // A pod always reaches itself: the packet never leaves its namespace.
                            .map(|t| f == t || truth(f, t, *port))
                            .collect()
                    })
                    .collect();
                (*port, rows)
            })
            .collect()
    }

    /// Measures until the matrix equals `want` or the deadline passes; the last measurement and
    /// how long enforcement took.
    pub fn converge(&self, want: &Matrix) -> (Matrix, Duration) {
        let ports: Vec<Port> = want.keys().copied().collect();
        let started = Instant::now();
        loop {
            let got = self.measure(&ports);
            if &got == want || started.elapsed() > self.deadline {
                return (got, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn render(env: &Env, m: &Matrix, other: Option<&Matrix>) -> String {
    let mut out = String::new();
    for (port, rows) in m {
        let _ = writeln!(out, "  {}/{}   (to →)", port.0.name(), port.1);
        let _ = write!(out, "        ");
        for t in &env.pods {
            let _ = write!(out, "{}/{} ", t.ns, t.pod);
        }
        out.push('\n');
        for (i, f) in env.pods.iter().enumerate() {
            let _ = write!(out, "  {}/{}  ", f.ns, f.pod);
            for j in 0..9 {
                let cell = if rows[i][j] { "." } else { "X" };
                let differs = other.is_some_and(|o| o[port][i][j] != rows[i][j]);
                let _ = write!(out, " {}{}  ", cell, if differs { "!" } else { " " });
            }
            out.push('\n');
        }
    }
    out
}

/// What a step does before it measures.
pub enum Action {
    Apply(String),
    Kubectl(Vec<String>),
}

/// A case's truth table: whether `from` reaches `to` on a port.
pub type Truth = Box<dyn Fn(&P, &P, Port) -> bool>;

pub struct Step {
    pub action: Action,
    pub ports: &'static [Port],
    pub truth: Truth,
}

pub struct Case {
    pub name: &'static str,
    pub steps: Vec<Step>,
    /// kubectl calls that undo label changes (policies are deleted after every case).
    pub undo: Vec<Vec<String>>,
}

pub fn np(name: &str, ns: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: \"{ns}\"\nspec:\n{spec}\n---\n"
    )
}

pub fn step(
    yaml: String,
    ports: &'static [Port],
    truth: impl Fn(&P, &P, Port) -> bool + 'static,
) -> Step {
    Step {
        action: Action::Apply(yaml),
        ports,
        truth: Box::new(truth),
    }
}

pub fn kubectl_step(
    args: &[&str],
    ports: &'static [Port],
    truth: impl Fn(&P, &P, Port) -> bool + 'static,
) -> Step {
    Step {
        action: Action::Kubectl(args.iter().map(|s| s.to_string()).collect()),
        ports,
        truth: Box::new(truth),
    }
}

pub fn case(name: &'static str, steps: Vec<Step>) -> Case {
    Case {
        name,
        steps,
        undo: Vec::new(),
    }
}

pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The cases; addresses (for `ipBlock`) come from the running pods.
pub fn cases(env: &Env) -> Vec<Case> {
    let yb = env.pod("y/b").ip;
    let xa = env.pod("x/a").ip;
    // The /24 of x/a's node: every pod on that node.
    let node_net = format!("{}.0/24", {
        let o = xa.octets();
        format!("{}.{}.{}", o[0], o[1], o[2])
    });
    let in_node_net = move |p: &P| p.ip.octets()[..3] == xa.octets()[..3];
    let x = |t: &P| t.ns == "x";
    vec![
        case(
            "deny all ingress in x",
            vec![step(
                np("deny", "x", "  podSelector: {}\n  policyTypes: [Ingress]"),
                BOTH,
                move |_, t, _| !x(t),
            )],
        ),
        case(
            "deny all egress in x",
            vec![step(
                np("deny", "x", "  podSelector: {}\n  policyTypes: [Egress]"),
                BOTH,
                move |f, _, _| !x(f),
            )],
        ),
        case(
            "deny all ingress and egress in x",
            vec![step(
                np(
                    "deny",
                    "x",
                    "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
                ),
                BASIC,
                move |f, t, _| !x(f) && !x(t),
            )],
        ),
        case(
            "allow all ingress in x (ingress: [{}])",
            vec![step(
                np("allow", "x", "  podSelector: {}\n  ingress: [{}]"),
                BOTH,
                |_, _, _| true,
            )],
        ),
        case(
            "deny ingress to pod=a in x only",
            vec![step(
                np("deny-a", "x", "  podSelector: {matchLabels: {pod: a}}"),
                BASIC,
                |_, t, _| !t.is("x/a"),
            )],
        ),
        case(
            "allow ingress from the same namespace",
            vec![step(
                np(
                    "same-ns",
                    "x",
                    "  podSelector: {}\n  ingress: [{from: [{podSelector: {}}]}]",
                ),
                BASIC,
                move |f, t, _| !x(t) || f.ns == "x",
            )],
        ),
        case(
            "allow x/a from pod=b of its namespace (podSelector)",
            vec![step(
                np(
                    "from-b",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
                ),
                BASIC,
                |f, t, _| !t.is("x/a") || f.is("x/b"),
            )],
        ),
        case(
            "allow x/a from namespace ns=y (namespaceSelector)",
            vec![step(
                np(
                    "from-y",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]",
                ),
                BASIC,
                |f, t, _| !t.is("x/a") || f.ns == "y",
            )],
        ),
        case(
            "allow x/a from pod=b in ns=y (both selectors in one peer: AND)",
            vec![step(
                np(
                    "and",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}, podSelector: {matchLabels: {pod: b}}}]}]",
                ),
                BASIC,
                |f, t, _| !t.is("x/a") || f.is("y/b"),
            )],
        ),
        case(
            "allow x/a from ns=y or from pod=b (two peers: OR)",
            vec![step(
                np(
                    "or",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}, {podSelector: {matchLabels: {pod: b}}}]}]",
                ),
                BASIC,
                |f, t, _| !t.is("x/a") || f.ns == "y" || f.is("x/b"),
            )],
        ),
        case(
            "allow x on port 80 from every namespace (namespaceSelector: {})",
            vec![step(
                np(
                    "all-ns-80",
                    "x",
                    "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}]",
                ),
                &[TCP80, TCP81],
                move |_, t, p| !x(t) || p == TCP80,
            )],
        ),
        case(
            "allow x from the cluster CIDR except y/b (ipBlock with except)",
            vec![step(
                np(
                    "ipblock",
                    "x",
                    &format!("  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [{yb}/32]}}}}]}}]"),
                ),
                BASIC,
                move |f, t, _| !x(t) || f.ip != yb,
            )],
        ),
        case(
            "allow x from the cluster CIDR except x/a's node subnet (ipBlock except a /24)",
            vec![step(
                np(
                    "ipblock-net",
                    "x",
                    &format!("  podSelector: {{}}\n  ingress: [{{from: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [{node_net}]}}}}]}}]"),
                ),
                BASIC,
                move |f, t, _| !x(t) || !in_node_net(f),
            )],
        ),
        case(
            "allow x on the named port serve-81-tcp only",
            vec![step(
                np(
                    "named",
                    "x",
                    "  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}]}]",
                ),
                ALL_PORTS,
                move |_, t, p| !x(t) || p == TCP81,
            )],
        ),
        case(
            "allow x on the named UDP port serve-80-udp only",
            vec![step(
                np(
                    "named-udp",
                    "x",
                    "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP, port: serve-80-udp}]}]",
                ),
                ALL_PORTS,
                move |_, t, p| !x(t) || p == UDP80,
            )],
        ),
        case(
            "allow x on TCP port 80 by number (empty from: every source)",
            vec![step(
                np(
                    "num",
                    "x",
                    "  podSelector: {}\n  ingress: [{ports: [{protocol: TCP, port: 80}]}]",
                ),
                ALL_PORTS,
                move |_, t, p| !x(t) || p == TCP80,
            )],
        ),
        case(
            "allow x on TCP 80-81 (endPort)",
            vec![step(
                np(
                    "range",
                    "x",
                    "  podSelector: {}\n  ingress: [{ports: [{protocol: TCP, port: 80, endPort: 81}]}]",
                ),
                ALL_PORTS,
                move |_, t, p| !x(t) || p.0 == Proto::Tcp,
            )],
        ),
        case(
            "allow x on every UDP port (protocol without port)",
            vec![step(
                np(
                    "udp",
                    "x",
                    "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP}]}]",
                ),
                ALL_PORTS,
                move |_, t, p| !x(t) || p.0 == Proto::Udp,
            )],
        ),
        case(
            "two policies on x/a: their union",
            vec![step(
                np(
                    "from-y",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]",
                ) + &np(
                    "from-c",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]",
                ),
                BASIC,
                |f, t, _| !t.is("x/a") || f.ns == "y" || f.is("x/c"),
            )],
        ),
        case(
            "egress only (policyTypes: [Egress]): x may reach ns=y only",
            vec![step(
                np(
                    "egress-y",
                    "x",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]",
                ),
                BASIC,
                move |f, t, _| !x(f) || t.ns == "y",
            )],
        ),
        case(
            "deny all egress of x but UDP 80 (DNS-like)",
            vec![step(
                np(
                    "dns",
                    "x",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{protocol: UDP, port: 80}]}]",
                ),
                ALL_PORTS,
                move |f, _, p| !x(f) || p == UDP80,
            )],
        ),
        case(
            "egress of x to the named port serve-81-tcp (resolved on each peer)",
            vec![step(
                np(
                    "egress-named",
                    "x",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: serve-81-tcp}]}]",
                ),
                ALL_PORTS,
                move |f, _, p| !x(f) || p == TCP81,
            )],
        ),
        case(
            "egress of x to pod=a in every namespace",
            vec![step(
                np(
                    "egress-a",
                    "x",
                    "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}]}]",
                ),
                BASIC,
                move |f, t, _| !x(f) || t.pod == "a",
            )],
        ),
        case(
            "both ends must allow: x/a egress to y only, y/b ingress from y/c only",
            vec![step(
                np(
                    "xa-egress",
                    "x",
                    "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]",
                ) + &np(
                    "yb-ingress",
                    "y",
                    "  podSelector: {matchLabels: {pod: b}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: c}}}]}]",
                ),
                BASIC,
                |f, t, _| (!f.is("x/a") || t.ns == "y") && (!t.is("y/b") || f.is("y/c")),
            )],
        ),
        case(
            "policyTypes [Ingress] ignores an egress section",
            vec![step(
                np(
                    "ingress-only",
                    "x",
                    "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {}}]}]\n  egress: [{to: [{podSelector: {matchLabels: {pod: nobody}}}]}]",
                ),
                BASIC,
                move |f, t, _| !x(t) || f.ns == "x",
            )],
        ),
        case(
            "policyTypes absent with egress rules: egress is isolated too",
            vec![step(
                np(
                    "implied-egress",
                    "x",
                    "  podSelector: {}\n  ingress: [{}]\n  egress: [{to: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]",
                ),
                BASIC,
                move |f, t, _| !x(f) || t.ns == "y",
            )],
        ),
        case(
            "matchExpressions: deny ingress to pod In (a, b) of x",
            vec![step(
                np(
                    "expr",
                    "x",
                    "  podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}",
                ),
                BASIC,
                |_, t, _| !t.is("x/a") && !t.is("x/b"),
            )],
        ),
        case(
            "matchExpressions: allow x from namespaces ns NotIn (y)",
            vec![step(
                np(
                    "not-y",
                    "x",
                    "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [\"y\"]}]}}]}]",
                ),
                BASIC,
                move |f, t, _| !x(t) || f.ns != "y",
            )],
        ),
        Case {
            name: "a pod's labels change after the policy exists",
            steps: vec![
                step(
                    np(
                        "from-b",
                        "x",
                        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]",
                    ),
                    BASIC,
                    |f, t, _| !t.is("x/a") || f.is("x/b"),
                ),
                // x/c becomes pod=b: now allowed; x/a itself keeps its isolation.
                kubectl_step(
                    &["label", "pod", "-n", "x", "c", "pod=b", "--overwrite"],
                    BASIC,
                    |f, t, _| !t.is("x/a") || f.is("x/b") || f.is("x/c"),
                ),
                // x/a loses pod=a: no longer selected, open again.
                kubectl_step(
                    &["label", "pod", "-n", "x", "a", "pod=other", "--overwrite"],
                    BASIC,
                    |_, _, _| true,
                ),
            ],
            undo: vec![
                args(&["label", "pod", "-n", "x", "c", "pod=c", "--overwrite"]),
                args(&["label", "pod", "-n", "x", "a", "pod=a", "--overwrite"]),
            ],
        },
        Case {
            name: "a namespace's labels change after the policy exists",
            steps: vec![
                step(
                    np(
                        "from-y",
                        "x",
                        "  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: \"y\"}}}]}]",
                    ),
                    BASIC,
                    |f, t, _| !t.is("x/a") || f.ns == "y",
                ),
                kubectl_step(
                    &["label", "namespace", "z", "ns=y", "--overwrite"],
                    BASIC,
                    |f, t, _| !t.is("x/a") || f.ns == "y" || f.ns == "z",
                ),
            ],
            undo: vec![args(&["label", "namespace", "z", "ns=z", "--overwrite"])],
        },
        case(
            "deleting the policy restores reachability",
            vec![
                step(
                    np("deny", "y", "  podSelector: {}\n  policyTypes: [Ingress, Egress]"),
                    BASIC,
                    |f, t, _| f.ns != "y" && t.ns != "y",
                ),
                kubectl_step(
                    &["delete", "networkpolicy", "-n", "y", "deny"],
                    BOTH,
                    |_, _, _| true,
                ),
            ],
        ),
        cnp_case(
            "ClusterNetworkPolicy Admin Deny from z overrides a NetworkPolicy allow in x",
            format!(
                "{}{}",
                np("open", "x", "  podSelector: {}\n  ingress: [{}]"),
                cnp(
                    "deny-z",
                    "Admin",
                    10,
                    "x",
                    "  - action: Deny\n    from:\n    - namespaces:\n        matchLabels: {ns: \"z\"}"
                )
            ),
            |f, t, _| !(t.ns == "x" && f.ns == "z"),
        ),
        cnp_case(
            "ClusterNetworkPolicy Admin Pass defers y to NetworkPolicy, Admin Deny for the rest",
            format!(
                "{}{}{}",
                np(
                    "from-y",
                    "x",
                    "  podSelector: {}\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchLabels: {ns: \"y\"}"
                ),
                cnp(
                    "pass-y",
                    "Admin",
                    1,
                    "x",
                    "  - action: Pass\n    from:\n    - namespaces:\n        matchLabels: {ns: \"y\"}"
                ),
                cnp("deny-all", "Admin", 2, "x", "  - action: Deny\n    from:\n    - namespaces: {}")
            ),
            |f, t, _| t.ns != "x" || f.ns == "y",
        ),
        cnp_case(
            "ClusterNetworkPolicy Baseline Deny into y where no NetworkPolicy selects",
            format!(
                "{}{}",
                np(
                    "a-open",
                    "y",
                    "  podSelector:\n    matchLabels: {pod: a}\n  ingress: [{}]"
                ),
                cnp("base", "Baseline", 1, "y", "  - action: Deny\n    from:\n    - namespaces: {}")
            ),
            |_, t, _| t.ns != "y" || t.pod == "a",
        ),
        Case {
            name: "ClusterNetworkPolicy priority changed at run time: Accept moved above Deny",
            steps: vec![
                step(
                    format!(
                        "{}{}",
                        cnp("accept-z", "Admin", 20, "x", "  - action: Accept\n    from:\n    - namespaces:\n        matchLabels: {ns: \"z\"}"),
                        cnp("deny-z", "Admin", 10, "x", "  - action: Deny\n    from:\n    - namespaces:\n        matchLabels: {ns: \"z\"}"),
                    ),
                    BASIC,
                    |f, t, _| !(t.ns == "x" && f.ns == "z"),
                ),
                step(
                    cnp("accept-z", "Admin", 5, "x", "  - action: Accept\n    from:\n    - namespaces:\n        matchLabels: {ns: \"z\"}"),
                    BASIC,
                    |_, _, _| true,
                ),
            ],
            undo: vec![args(&["delete", "clusternetworkpolicies", "--all"])],
        },
        Case {
            name: "ClusterNetworkPolicy subject picked up by a namespace label added at run time",
            steps: vec![
                step(
                    cnp_spec(
                        "guard",
                        "Admin",
                        1,
                        "    namespaces:\n      matchLabels: {guard: \"on\"}",
                        "ingress",
                        "  - action: Deny\n    from:\n    - namespaces: {}",
                    ),
                    BASIC,
                    |_, _, _| true,
                ),
                kubectl_step(
                    &["label", "namespace", "y", "guard=on"],
                    BASIC,
                    |_, t, _| t.ns != "y",
                ),
            ],
            undo: vec![
                args(&["delete", "clusternetworkpolicies", "--all"]),
                args(&["label", "namespace", "y", "guard-"]),
            ],
        },
        Case {
            name: "ClusterNetworkPolicy peer picked up by a namespace label added at run time",
            steps: vec![
                step(
                    cnp("deny-bad", "Admin", 1, "x", "  - action: Deny\n    from:\n    - namespaces:\n        matchLabels: {peer: \"bad\"}"),
                    BASIC,
                    |_, _, _| true,
                ),
                kubectl_step(
                    &["label", "namespace", "z", "peer=bad"],
                    BASIC,
                    |f, t, _| !(t.ns == "x" && f.ns == "z"),
                ),
            ],
            undo: vec![
                args(&["delete", "clusternetworkpolicies", "--all"]),
                args(&["label", "namespace", "z", "peer-"]),
            ],
        },
        cnp_case(
            "ClusterNetworkPolicy Admin Deny of egress from x to a CIDR (y/b's address)",
            cnp_spec(
                "deny-cidr",
                "Admin",
                1,
                "    namespaces:\n      matchLabels: {ns: \"x\"}",
                "egress",
                &format!("  - action: Deny\n    to:\n    - networks: [\"{yb}/32\"]"),
            ),
            move |f, t, _| !(f.ns == "x" && t.ip == yb),
        ),
        Case {
            name: "ClusterNetworkPolicy Admin Deny into x on the named port serve-81-tcp",
            steps: vec![step(
                cnp("deny-81", "Admin", 1, "x", "  - action: Deny\n    from:\n    - namespaces: {}\n    protocols:\n    - destinationNamedPort: serve-81-tcp"),
                ALL_PORTS,
                |_, t, port| !(t.ns == "x" && port == TCP81),
            )],
            undo: vec![args(&["delete", "clusternetworkpolicies", "--all"])],
        },
    ]
}

/// A ClusterNetworkPolicy with `subject` (YAML under `subject:`) and rules `rules` (YAML list
/// items) in `direction` (`ingress` or `egress`).
pub fn cnp_spec(
    name: &str,
    tier: &str,
    priority: i32,
    subject: &str,
    direction: &str,
    rules: &str,
) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata:\n  name: {name}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject:\n{subject}\n  {direction}:\n{rules}\n---\n"
    )
}

/// A ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) whose subject is namespace
/// `subject_ns`, with ingress rules `ingress` (YAML list items).
pub fn cnp(name: &str, tier: &str, priority: i32, subject_ns: &str, ingress: &str) -> String {
    cnp_spec(
        name,
        tier,
        priority,
        &format!(
            "    namespaces:\n      matchLabels: {{kubernetes.io/metadata.name: \"{subject_ns}\"}}"
        ),
        "ingress",
        ingress,
    )
}

/// One step applying `yaml`; the ClusterNetworkPolicies are deleted afterwards.
pub fn cnp_case(
    name: &'static str,
    yaml: String,
    truth: impl Fn(&P, &P, Port) -> bool + 'static,
) -> Case {
    Case {
        name,
        steps: vec![step(yaml, BOTH, truth)],
        undo: vec![args(&["delete", "clusternetworkpolicies", "--all"])],
    }
}

/// One case's outcome on one renderer: the matrices measured at each step, and what differed.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub matrices: Vec<Matrix>,
    /// What the case's truth table predicted at each step (it depends on where pods landed
    /// only for the ipBlock case that names a node's subnet).
    pub expected: Vec<Matrix>,
    pub took: Vec<Duration>,
    pub failure: Option<String>,
}

pub fn run_case(env: &Env, case: &Case) -> Outcome {
    eprintln!("[{}] case {:?}", env.backend, case.name);
    let mut out = Outcome {
        name: case.name,
        matrices: Vec::new(),
        expected: Vec::new(),
        took: Vec::new(),
        failure: None,
    };
    for (i, s) in case.steps.iter().enumerate() {
        match &s.action {
            Action::Apply(yaml) => apply_yaml(&env.lab, yaml),
            Action::Kubectl(a) => {
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                kubectl_ok(&env.lab, &a);
            }
        }
        // Enforcement takes some tens of milliseconds: a first measurement that early would
        // only be repeated.
        std::thread::sleep(Duration::from_millis(250));
        let want = env.expected(s.ports, &*s.truth);
        let (got, took) = env.converge(&want);
        if got != want && out.failure.is_none() {
            out.failure = Some(format!(
                "case {:?} step {i}: not enforced within {:?}; measured (X = no answer, ! = differs from expected):\n{}expected:\n{}",
                case.name,
                env.deadline,
                render(env, &got, Some(&want)),
                render(env, &want, None)
            ));
        }
        out.matrices.push(got);
        out.expected.push(want);
        out.took.push(took);
    }
    for u in &case.undo {
        let a: Vec<&str> = u.iter().map(String::as_str).collect();
        kubectl_ok(&env.lab, &a);
    }
    kubectl_ok(
        &env.lab,
        &["delete", "networkpolicy", "--all", "--all-namespaces"],
    );
    // Back to the open baseline before the next case, so that no case can match on leftovers.
    let open = env.expected(BASIC, &|_, _, _| true);
    let (got, _) = env.converge(&open);
    if got != open {
        out.failure.get_or_insert(format!(
            "case {:?}: reachability not restored after cleanup:\n{}",
            case.name,
            render(env, &got, Some(&open))
        ));
    }
    out
}
/// Switches `policy-log-drops` (live).
pub fn set_log_drops(lab: &Lab, on: bool) {
    lab.set_config("policy-log-drops", &on.to_string());
}

/// The agent log lines of `node` that report a dropped packet, oldest first (the log is
/// appended to across agent restarts).
pub fn drop_lines(lab: &Lab, node: &str) -> Vec<String> {
    std::fs::read_to_string(format!(
        "/run/sluice/lab/{}/nodes/{node}/agent.log",
        lab.name
    ))
    .unwrap_or_default()
    .lines()
    .filter(|l| l.contains("packet dropped by network policy"))
    .map(str::to_string)
    .collect()
}

/// Sets `policy-backend` and restarts every agent (the key is read at start); waits until each
/// reports the backend and is ready.
pub fn use_backend(lab: &Lab, backend: &str) {
    lab.set_config("policy-backend", backend);
    let nodes = node_names(lab);
    assert!(!nodes.is_empty());
    for node in &nodes {
        for verb in ["stop", "start"] {
            let out = lab_cmd(&["agent", "--name", &lab.name, verb, node], 30);
            assert!(
                out.status.success(),
                "lab agent {verb} {node}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = agent_http(lab, node, "/status");
            let ready = agent_http(lab, node, "/readyz");
            if status.contains(&format!("\"backend\":\"{backend}\"")) && ready.contains(" 200 ") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent of {node} not ready with {backend}: {status}\n{ready}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Reads `path` from a node agent's health port, from inside the node's namespace.
pub fn agent_http(lab: &Lab, node: &str, path: &str) -> String {
    let netns = lab.node_netns(node);
    let path = path.to_string();
    in_netns(&netns, move || {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect_timeout(
            &SocketAddr::from(([127, 0, 0, 1], 9099)),
            Duration::from_secs(2),
        ) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
}

pub fn node_names(lab: &Lab) -> Vec<String> {
    let out = lab.kubectl(&["get", "nodes", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["metadata"]["name"].as_str().map(str::to_string))
        .collect()
}

/// The namespaces and pods of the suite; `container(ns, pod)` gives the lines of the pod's
/// `spec` before its container's `ports:` (from `  containers:`: image, command, placement),
/// which differ between the labs; the ports (named `serve-PORT-PROTO`) are the same.
pub fn manifest(container: &dyn Fn(&str, &str) -> String) -> String {
    let mut out = String::new();
    for ns in NAMESPACES {
        // Quoted: YAML 1.1 reads a bare y as true.
        out += &format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: \"{ns}\"\n  labels: {{ns: \"{ns}\"}}\n---\n");
        for pod in PODS {
            out += &format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: \"{pod}\"\n  namespace: \"{ns}\"\n  labels: {{pod: \"{pod}\"}}\nspec:\n{}    ports:\n",
                container(ns, pod)
            );
            for (port, proto) in [
                (80, "TCP"),
                (81, "TCP"),
                (80, "UDP"),
                (81, "UDP"),
                (80, "SCTP"),
                (81, "SCTP"),
            ] {
                out += &format!(
                    "    - {{name: serve-{port}-{}, containerPort: {port}, protocol: {proto}}}\n",
                    proto.to_lowercase()
                );
            }
            out += "---\n";
        }
    }
    out
}

/// Runs every case on `env`, in order; keeps the agents' logs in `keep_logs` (node name ->
/// log file) under the temp directory when a case failed.
pub fn run_all(env: &Env, keep_logs: &dyn Fn(&str) -> Option<String>) -> Vec<Outcome> {
    let started = Instant::now();
    let outcomes: Vec<Outcome> = cases(env).iter().map(|c| run_case(env, c)).collect();
    if outcomes.iter().any(|o| o.failure.is_some()) {
        let dir = std::env::temp_dir().join(format!("netpol-{}-{}", env.lab.name, env.backend));
        let _ = std::fs::create_dir_all(&dir);
        for node in node_names(&env.lab) {
            if let Some(log) = keep_logs(&node) {
                let _ = std::fs::write(dir.join(format!("{node}.log")), log);
            }
        }
        eprintln!("{}: agent logs kept in {}", env.backend, dir.display());
    }
    eprintln!(
        "{}: {} cases in {:?}",
        env.backend,
        outcomes.len(),
        started.elapsed()
    );
    outcomes
}

/// `suite` run on nftables and on iptables at once (a lab each): at least `min_cases` cases, every
/// one enforced on both and measured alike (see [`compare`]).
pub fn both_renderers_agree(suite: fn(&'static str) -> Vec<Outcome>, min_cases: usize) {
    let (nft, ipt) = std::thread::scope(|s| {
        let n = s.spawn(|| suite("nftables"));
        let i = s.spawn(|| suite("iptables"));
        (n.join(), i.join())
    });
    let (nft, ipt) = (
        nft.expect("nftables suite panicked"),
        ipt.expect("iptables suite panicked"),
    );
    assert!(nft.len() >= min_cases, "{} cases", nft.len());
    let failures = compare(&nft, &ipt);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The renderers' outcomes side by side (one line per case, printed), and what failed: a case
/// not enforced on one of them, or a prediction the two measured differently.
pub fn compare(nft: &[Outcome], ipt: &[Outcome]) -> Vec<String> {
    let mut failures = Vec::new();
    if nft.len() != ipt.len() {
        failures.push(format!(
            "{} cases on nftables, {} on iptables",
            nft.len(),
            ipt.len()
        ));
    }
    for (n, i) in nft.iter().zip(ipt) {
        eprintln!(
            "{:<80} nftables {:>5} ({:?})  iptables {:>5} ({:?})",
            n.name,
            if n.failure.is_none() { "ok" } else { "FAIL" },
            n.took,
            if i.failure.is_none() { "ok" } else { "FAIL" },
            i.took
        );
        failures.extend(n.failure.iter().map(|f| format!("[nftables] {f}")));
        failures.extend(i.failure.iter().map(|f| format!("[iptables] {f}")));
        // The same prediction must be measured the same by both renderers.
        if n.expected == i.expected && n.matrices != i.matrices {
            failures.push(format!(
                "case {:?}: the renderers measured different matrices",
                n.name
            ));
        }
    }
    failures
}

/// Whether sluice's nftables table / iptables chains exist in a node's namespace (on a
/// real-Kubernetes node kube-proxy's own chains are there either way).
pub fn kernel_has(lab: &Lab, node: &str) -> (bool, bool) {
    let netns = lab.node_netns(node);
    let nft = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "nft",
            "list",
            "table",
            "inet",
            "sluice-policy",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    let ipt = std::process::Command::new("ip")
        .args(["netns", "exec", &netns, "iptables-save", "-t", "filter"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(":SLUICE-FORWARD"));
    (nft, ipt)
}

/// Echoes (one byte every 20 ms over one TCP connection) from r/cl to an echo server of the
/// test's own in r/sv at `sv`:`port` (the lab's servers close at once), applies a deny of all
/// ingress to r/sv, and says how long echoes kept coming after it was applied: issue 8 asks
/// that a denied established connection stop passing within 1 s.
pub fn established_cut(lab: &Lab, sv: IpAddr, port: u16) -> Duration {
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};
    let listener = in_netns(&lab.pod_netns("r", "sv"), move || {
        std::net::TcpListener::bind(SocketAddr::new(unspecified(sv), port)).unwrap()
    });
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 64];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let last_echo = Arc::new(Mutex::new(None::<Instant>));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (last_echo, stop) = (last_echo.clone(), stop.clone());
        let netns = lab.pod_netns("r", "cl");
        std::thread::spawn(move || {
            in_netns(&netns, move || {
                let mut s = std::net::TcpStream::connect_timeout(
                    &SocketAddr::new(sv, port),
                    Duration::from_secs(3),
                )
                .unwrap();
                s.set_read_timeout(Some(Duration::from_millis(100)))
                    .unwrap();
                let mut buf = [0u8; 1];
                let started = Instant::now();
                // Bounded: at most 60 s of pings, one every 20 ms.
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                    if s.write_all(b"p").is_err() {
                        break;
                    }
                    if s.read(&mut buf).is_ok_and(|n| n == 1) {
                        *last_echo.lock().unwrap() = Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while last_echo.lock().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the connection never echoed");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let applied = Instant::now();
    let before = last_echo.lock().unwrap().unwrap();
    assert!(
        applied.duration_since(before) < Duration::from_millis(300),
        "the connection was not passing right before the deny"
    );
    apply_yaml(
        lab,
        &np(
            "deny",
            "r",
            "  podSelector: {matchLabels: {pod: sv}}\n  policyTypes: [Ingress]",
        ),
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let last = last_echo.lock().unwrap().unwrap();
    let _ = client.join();
    last.saturating_duration_since(applied)
}

fn unspecified(of: IpAddr) -> IpAddr {
    match of {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}
