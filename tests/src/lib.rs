//! sluice's namespace harness: network namespaces with per-run unique names that are removed on
//! every exit path (Drop runs on panics too), the built `sluice` binary called exactly as a
//! runtime calls it, and `ip -j` readers for assertions.
//!
//! Network safety: everything here lives in namespaces this harness made; nothing is sent
//! outside them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bench;
pub mod capture;
pub mod cni;
pub mod containerd;
pub mod dual;
pub mod hostport;
pub mod k8sbench;
pub mod lab;
pub mod netpol;
pub mod ping;
pub mod realk8s;

use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// True when the suite may use root-only features. Off root, a test skips on a laptop but fails
/// in CI (`CI` set), where root is promised.
pub fn have_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the namespace tests as root"
    );
    eprintln!("skipping: needs root");
    false
}

/// A prefix unique to this test process, so two runs (or two labs) never collide.
pub fn run_prefix() -> String {
    format!("sle{}", std::process::id() % 100_000)
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh unique name with this run's prefix.
pub fn unique(tag: &str) -> String {
    format!(
        "{}{}{}",
        run_prefix(),
        tag,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs a command and returns its output; panics with its stderr when it cannot be started.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed.
pub fn sh(args: &[&str]) -> String {
    let out = run(Command::new(args[0]).args(&args[1..]));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The conntrack entries of network namespace `netns` that `filter` (conntrack's own options)
/// selects, one a line.
pub fn conntrack_entries(netns: &str, filter: &[&str]) -> Vec<String> {
    let mut args = vec!["ip", "netns", "exec", netns, "conntrack", "-L"];
    args.extend_from_slice(filter);
    sh(&args).lines().map(str::to_string).collect()
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = unique(tag);
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `ip -j -n NAME ARGS...` parsed.
    pub fn ip_json(&self, args: &[&str]) -> Vec<Value> {
        let mut full = vec!["ip", "-j", "-n", &self.name];
        full.extend_from_slice(args);
        let text = sh(&full);
        if text.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("ip -j {args:?}: {e}: {text}"))
    }

    /// `ip netns exec NAME ARGS...`, which must succeed: its output.
    pub fn sh(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn sysctl(&self, key: &str, value: &str) {
        let out = run(self
            .command("sysctl")
            .args(["-qw", &format!("{key}={value}")]));
        assert!(
            out.status.success(),
            "sysctl {key}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        self.ip_json(&["link", "show"])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_string))
            .collect()
    }

    /// IPv4 routes of the main table.
    pub fn routes(&self) -> Vec<Value> {
        self.ip_json(&["-4", "route", "show"])
    }

    /// One ping, bounded by `timeout`; true when answered.
    pub fn ping(&self, dst: &str, timeout: Duration) -> bool {
        let secs = timeout.as_secs().max(1).to_string();
        run(self
            .command("ping")
            .args(["-c", "1", "-W", &secs, "-q", dst]))
        .status
        .success()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace takes every link in it along (veth peers included).
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Polls `f` every 20 ms until it returns true or `limit` passes.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `sluice` binary under test: `SLUICE_BIN`, else the workspace's dev build.
pub fn sluice_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/sluice");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build` before the tests (README)",
        bin.display()
    );
    bin
}

/// Polls `f` every 100 ms until it holds or `limit` passes; its last answer.
pub fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}
