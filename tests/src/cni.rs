//! Calling `sluice-cni` the way a container runtime does: by that name, with the CNI environment
//! and the network configuration on stdin.

use crate::{run, sluice_bin, Netns};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A node for the plugin: its namespace (the "host" side of every pod), and a directory with
/// the plugin installed as `sluice-cni`, the node's subnet.env and IPAM state.
pub struct CniNode {
    pub ns: Netns,
    pub dir: tempfile::TempDir,
}

/// What one plugin call gave back.
#[derive(Debug)]
pub struct Outcome {
    /// The exit code; -1 when the process ended by a signal (see `killed`).
    pub exit: i32,
    pub stdout: String,
    pub stderr: String,
    /// The harness killed it: its deadline passed (`timed_out`) or the caller asked for it.
    pub killed: bool,
    /// It was still running when its deadline passed.
    pub timed_out: bool,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }

    /// The CNI error code, asserting the call failed the way the spec says (non-zero exit, error
    /// JSON on stdout) and did not panic.
    pub fn error_code(&self) -> u64 {
        assert!(
            !self.timed_out,
            "the plugin did not return in time: {self:?}"
        );
        assert_ne!(self.exit, 0, "expected a failure: {self:?}");
        assert!(
            !self.stderr.contains("panicked"),
            "the plugin panicked: {self:?}"
        );
        let j = self.json();
        assert!(
            j["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error has no msg: {self:?}"
        );
        j["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error has no code: {self:?}"))
    }

    pub fn assert_ok(&self) -> &Self {
        assert!(
            !self.timed_out,
            "the plugin did not return in time: {self:?}"
        );
        assert_eq!(self.exit, 0, "plugin call failed: {self:?}");
        self
    }
}

impl CniNode {
    /// A node namespace holding `subnet` (None: no subnet.env yet), with forwarding on and an
    /// address of its own so that it can talk to its pods.
    pub fn new(subnet: Option<&str>) -> Self {
        let ns = Netns::new("n");
        ns.sysctl("net.ipv4.ip_forward", "1");
        // A node address on lo (TEST-NET-1, inside this namespace only) as the source for
        // host-to-pod traffic.
        ns.ip(&["addr", "add", "192.0.2.1/32", "dev", "lo"]);
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        std::os::unix::fs::symlink(sluice_bin(), dir.path().join("bin/sluice-cni")).unwrap();
        let node = Self { ns, dir };
        if let Some(s) = subnet {
            node.set_subnet(s);
        }
        node
    }

    pub fn set_subnet(&self, subnet: &str) {
        self.set_subnet_env("10.244.0.0/16", subnet);
    }

    /// Writes subnet.env with `network` as the cluster CIDR and `subnet` as the node's.
    pub fn set_subnet_env(&self, network: &str, subnet: &str) {
        // Replaced, not written through: a test may have left a FIFO or a symlink there.
        let path = self.subnet_file();
        let _ = std::fs::remove_file(&path);
        std::fs::write(
            path,
            format!("SLUICE_NETWORK={network}\nSLUICE_SUBNET={subnet}\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"),
        )
        .unwrap();
    }

    /// Writes a dual-stack subnet.env: `network`/`subnet` and the IPv6 pair `network6`/`subnet6`.
    pub fn set_dual_subnet_env(&self, network: &str, subnet: &str, network6: &str, subnet6: &str) {
        let path = self.subnet_file();
        let _ = std::fs::remove_file(&path);
        std::fs::write(
            path,
            format!("SLUICE_NETWORK={network}\nSLUICE_SUBNET={subnet}\nSLUICE_NETWORK6={network6}\nSLUICE_SUBNET6={subnet6}\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"),
        )
        .unwrap();
    }

    /// Writes an IPv6-only node's subnet.env: only the IPv6 pair `network6`/`subnet6`.
    pub fn set_v6_only_subnet_env(&self, network6: &str, subnet6: &str) {
        let path = self.subnet_file();
        let _ = std::fs::remove_file(&path);
        std::fs::write(
            path,
            format!("SLUICE_NETWORK6={network6}\nSLUICE_SUBNET6={subnet6}\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"),
        )
        .unwrap();
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path().join("subnet.env")
    }

    pub fn plugin(&self) -> PathBuf {
        self.dir.path().join("bin/sluice-cni")
    }

    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// The network configuration for `version`, with `extra` merged in.
    pub fn conf(&self, version: &str, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": version,
            "name": "sluice",
            "type": "sluice-cni",
            "subnetFile": self.dir.path().join("subnet.env"),
            "ipamDir": self.ipam_dir(),
        });
        if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        c
    }

    /// The IPAM allocations on record (address → owner).
    pub fn allocations(&self) -> serde_json::Map<String, Value> {
        match std::fs::read(self.ipam_dir().join("allocations.json")) {
            Ok(b) => serde_json::from_slice::<Value>(&b).unwrap()["allocations"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
            Err(_) => Default::default(),
        }
    }

    /// The IPv6 IPAM allocations on record (address → owner).
    pub fn allocations_v6(&self) -> serde_json::Map<String, Value> {
        match std::fs::read(self.ipam_dir().join("allocations.json")) {
            Ok(b) => serde_json::from_slice::<Value>(&b).unwrap()["allocationsV6"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
            Err(_) => Default::default(),
        }
    }

    /// IPv6 host routes sluice installed (proto 77).
    pub fn pod_routes_v6(&self) -> Vec<Value> {
        self.ns.ip_json(&["-6", "route", "show", "proto", "77"])
    }

    /// Host-side pod veths in the node.
    pub fn pod_links(&self) -> Vec<String> {
        self.ns
            .links()
            .into_iter()
            .filter(|l| l.starts_with("sl"))
            .collect()
    }

    /// Host routes sluice installed (proto 77).
    pub fn pod_routes(&self) -> Vec<Value> {
        self.ns
            .routes()
            .into_iter()
            .filter(|r| r["protocol"] == "77")
            .collect()
    }

    /// Calls the plugin inside the node namespace, as the runtime would, with the raw `stdin`
    /// and the `CNI_*` variables in `env`.
    pub fn call_raw(&self, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
        self.call_raw_with(env, stdin, Limits::default())
    }

    /// [`call_raw`](Self::call_raw) within `limits`. The plugin runs under an address-space limit
    /// ([`MEMORY_LIMIT`]), so that a plugin that reads without end fails instead of taking the
    /// machine's memory.
    pub fn call_raw_with(&self, env: &[(&str, &str)], stdin: &[u8], limits: Limits) -> Outcome {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name])
            .arg("prlimit")
            .arg(format!("--as={MEMORY_LIMIT}"))
            .arg(self.plugin());
        call_with(cmd, env, stdin, limits)
    }

    /// Calls `command` for (`container`, `ifname`) in `netns` with `conf`.
    pub fn call(
        &self,
        command: &str,
        container: &str,
        netns: Option<&Path>,
        conf: &Value,
    ) -> Outcome {
        let netns = netns.map(|p| p.display().to_string()).unwrap_or_default();
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=e2e;K8S_POD_NAME=p",
            ),
        ];
        self.call_raw(&env, conf.to_string().as_bytes())
    }
}

/// The address space a plugin call may take (bytes): far above what a call needs (tens of MiB),
/// far below the machine's memory.
pub const MEMORY_LIMIT: u64 = 2 << 30;

/// How long a plugin call may run, and whether the harness kills it on purpose.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The call is killed (SIGKILL) and reported `timed_out` once this has passed.
    pub deadline: Duration,
    /// Kill the call (SIGKILL) this long after it started, as a crash would.
    pub kill_after: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(60),
            kill_after: None,
        }
    }
}

impl Limits {
    pub fn deadline(deadline: Duration) -> Self {
        Self {
            deadline,
            ..Self::default()
        }
    }
}

/// Runs a prepared plugin command with exactly `env` as its CNI environment.
pub fn call(cmd: Command, env: &[(&str, &str)], stdin: &[u8]) -> Outcome {
    call_with(cmd, env, stdin, Limits::default())
}

/// [`call`] within `limits`: the call never outlives its deadline.
pub fn call_with(mut cmd: Command, env: &[(&str, &str)], stdin: &[u8], limits: Limits) -> Outcome {
    for key in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ] {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let input = child.stdin.take().map(|mut pipe| {
        let bytes = stdin.to_vec();
        // A plugin that fails before reading stdin closes the pipe; that is its answer.
        std::thread::spawn(move || {
            let _ = pipe.write_all(&bytes);
        })
    });
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let (mut killed, mut timed_out) = (false, false);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        let elapsed = started.elapsed();
        let kill_now = limits.kill_after.is_some_and(|k| elapsed >= k);
        if kill_now || elapsed >= limits.deadline {
            // Our own child, by its PID.
            let _ = child.kill();
            killed = true;
            timed_out = !kill_now;
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if let Some(t) = input {
        let _ = t.join();
    }
    Outcome {
        exit: status.code().unwrap_or(-1),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
        killed,
        timed_out,
    }
}

/// Runs `program` with `args` and returns its output, for commands the tests read.
pub fn output(program: &str, args: &[&str]) -> std::process::Output {
    run(Command::new(program).args(args))
}
