//! A lab made by the real `sluice lab up`, for end-to-end tests: taken down by `sluice lab down`
//! when dropped, panics included.

use crate::{run, sluice_bin};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static LABS: AtomicUsize = AtomicUsize::new(0);

/// A lab name unique to this test process (lab names are `[a-z][a-z0-9]{0,11}`).
/// What a command printed, stdout then stderr, for assertion messages.
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The pods `lab status --json` lists: `namespace/name`, node, address.
pub fn status_pods(status: &Value) -> Vec<(String, String, std::net::Ipv4Addr)> {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap(),
                    p["name"].as_str().unwrap()
                ),
                p["node"].as_str().unwrap().to_string(),
                p["ip"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

pub fn unique_lab_name() -> String {
    format!(
        "e{}x{}",
        std::process::id() % 1_000_000,
        LABS.fetch_add(1, Ordering::Relaxed)
    )
}

/// `lab up --name NAME ARGS` fails, says `says`, and leaves no namespace of the lab and no state
/// directory: NAME is a fresh unique lab name.
pub fn up_is_refused(args: &[&str], says: &str) {
    let name = unique_lab_name();
    let mut all = vec!["up", "--name", name.as_str()];
    all.extend_from_slice(args);
    let out = lab_cmd(&all, 60);
    let msg = output_text(&out);
    assert!(!out.status.success(), "lab {all:?} succeeded: {msg}");
    assert!(msg.contains(says), "lab {all:?}: {msg}");
    assert!(netns_with_prefix(&format!("slab-{name}-")).is_empty());
    assert!(!std::path::Path::new(&format!("/run/sluice/lab/{name}")).exists());
}

pub struct Lab {
    pub name: String,
}

/// Runs `sluice lab ARGS...`, bounded by `timeout`. `SLUICE_K8S_BIN` is not passed on: a lab
/// runs on real Kubernetes only when a test says `--kubernetes DIR` itself.
pub fn lab_cmd(args: &[&str], secs: u32) -> Output {
    run(Command::new("timeout")
        .env_remove("SLUICE_K8S_BIN")
        .args(["-k", "5", &secs.to_string()])
        .arg(sluice_bin())
        .arg("lab")
        .args(args))
}

impl Lab {
    /// `sluice lab up --name NAME EXTRA...`; panics with its output if it fails.
    pub fn up(extra: &[&str]) -> Self {
        let lab = Self {
            name: unique_lab_name(),
        };
        let mut args = vec!["up", "--name", &lab.name];
        args.extend_from_slice(extra);
        let out = lab_cmd(&args, 180);
        assert!(
            out.status.success(),
            "lab up failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(format!("/run/sluice/lab/{}/kubeconfig", self.name))
    }

    pub fn prefix(&self) -> String {
        format!("slab-{}-", self.name)
    }

    pub fn status(&self) -> Value {
        let out = lab_cmd(&["status", "--name", &self.name, "--json"], 120);
        assert!(
            out.status.success(),
            "lab status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("lab status --json prints JSON")
    }

    /// `kubectl --kubeconfig LAB ARGS...`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        run(Command::new("timeout")
            .args(["-k", "5", "60", "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(args))
    }

    /// kubectl's stdout; panics with everything kubectl printed if it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            output_text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Sets `key` of the `sluice-config` ConfigMap to `value` (a merge patch); panics if
    /// kubectl fails.
    pub fn set_config(&self, key: &str, value: &str) {
        let patch = serde_json::json!({ "data": { key: value } }).to_string();
        let out = self.kubectl(&[
            "patch",
            "configmap",
            "-n",
            "kube-system",
            "sluice-config",
            "--type",
            "merge",
            "-p",
            &patch,
        ]);
        assert!(
            out.status.success(),
            "setting {key}={value} in sluice-config: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn down(&self) -> Output {
        lab_cmd(&["down", "--name", &self.name], 60)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

/// Named network namespaces starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a fresh thread that entered the named network namespace.
pub fn in_netns<R: Send + 'static>(netns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    in_netns_path(PathBuf::from("/run/netns").join(netns), f)
}

/// Runs `f` on a fresh thread that entered the network namespace at `path` (a named one's
/// file, or a process's `/proc/PID/ns/net`).
pub fn in_netns_path<R: Send + 'static>(
    path: PathBuf,
    f: impl FnOnce() -> R + Send + 'static,
) -> R {
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// A TCP listener inside `netns` that answers each connection with `reply` and reports each
/// peer address; serves `max` connections at most.
pub fn tcp_server(
    netns: &str,
    bind: std::net::SocketAddr,
    reply: &'static str,
    max: usize,
) -> (
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<std::net::SocketAddr>,
) {
    use std::io::Write;
    let listener = in_netns(netns, move || {
        std::net::TcpListener::bind(bind).expect("bind")
    });
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut s) = stream else { continue };
            if let Ok(peer) = s.peer_addr() {
                let _ = tx.send(peer);
            }
            let _ = s.write_all(reply.as_bytes());
        }
    });
    (addr, rx)
}

/// [`tcp_server`] for UDP: answers each datagram with `reply` and reports each peer address;
/// serves `max` datagrams at most.
pub fn udp_server(
    netns: &str,
    bind: std::net::SocketAddr,
    reply: &'static str,
    max: usize,
) -> (
    std::net::SocketAddr,
    std::sync::mpsc::Receiver<std::net::SocketAddr>,
) {
    let socket = in_netns(netns, move || {
        std::net::UdpSocket::bind(bind).expect("bind")
    });
    let addr = socket.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        for _ in 0..max {
            let Ok((_, peer)) = socket.recv_from(&mut buf) else {
                continue;
            };
            let _ = tx.send(peer);
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    });
    (addr, rx)
}

/// Connects from inside `netns` to `to` and reads the answer (bounded by 3 s).
pub fn tcp_ask(netns: &str, to: std::net::SocketAddr) -> std::io::Result<String> {
    use std::io::Read;
    in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(3))?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

impl Lab {
    /// The network namespace of pod `ns/name` in this lab.
    pub fn pod_netns(&self, ns: &str, name: &str) -> String {
        format!("{}pod-{ns}-{name}", self.prefix())
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!(
            "{}{}",
            self.prefix(),
            node.trim_start_matches(&format!("{}-", self.name))
        )
    }

    /// `ip -j ARGS` inside a namespace.
    pub fn ip_json(&self, netns: &str, args: &[&str]) -> Value {
        let out = run(Command::new("ip").args(["-n", netns, "-j"]).args(args));
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }
}

/// The directory of real Kubernetes server binaries a real-Kubernetes test runs on
/// (`SLUICE_K8S_BIN`), or `None` after saying that `test` is skipped and why.
pub fn k8s_bin(test: &str) -> Option<String> {
    match std::env::var("SLUICE_K8S_BIN") {
        Ok(dir) if !dir.is_empty() => Some(dir),
        _ => {
            eprintln!(
                "{test}: skipped: SLUICE_K8S_BIN is not set (it names a directory with the \
                 Kubernetes server binaries; .ci/run sets it when ../shared/realk8s exists)"
            );
            None
        }
    }
}

/// The PID of a process of the container `container_id` (as a pod's status names it,
/// `containerd://ID` or the bare ID) in a real-Kubernetes lab: found by its cgroup, whose path
/// ends in the ID (the kubelets use cgroupfs); `None` if none runs.
pub fn container_pid(container_id: &str) -> Option<u32> {
    let id = container_id.rsplit("://").next().unwrap_or(container_id);
    if id.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).ok()?;
            cgroup
                .lines()
                .any(|l| l.trim_end().ends_with(id))
                .then_some(pid)
        })
        .min()
}
