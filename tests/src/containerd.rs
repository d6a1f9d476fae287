//! A private containerd (Debian's 1.6) for a test: its root, state and config in the test's
//! own directory, its gRPC socket wherever the test says, in a mount namespace of its own
//! (`unshare --mount --propagation private`, so the overlay mounts of its snapshots and
//! containers never reach the host's), the CRI plugin off. Stopped on drop, on panics too: its
//! tasks killed and deleted, containerd ended by PID, and any shim it left ended by the PID it
//! wrote in its state directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// True when `ctr` and `containerd` are installed; off CI a missing one skips the test with a
/// message, in CI (`CI` set, where README's apt-get list installs them) it fails.
pub fn have_containerd() -> bool {
    let found = Command::new("ctr").arg("--version").output().is_ok()
        && Command::new("containerd").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have containerd (README's test command installs it)"
        );
        eprintln!("skipping: containerd is not installed");
    }
    found
}

pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// The containerd namespace `ctr` uses (the kubelet's CRI reads `k8s.io`).
    pub namespace: String,
    child: Child,
}

impl Containerd {
    /// Starts containerd with its files under `dir` and its socket at `socket`; waits (at most
    /// 10 s) until it answers.
    pub fn start(dir: &Path, socket: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        if let Some(parent) = socket.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        let d = dir.display();
        let s = socket.display();
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{s}\"\n[ttrpc]\n  address = \"{s}.ttrpc\"\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "containerd",
                "--config",
            ])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let mut c = Self {
            dir: dir.to_path_buf(),
            socket: socket.to_path_buf(),
            namespace: "k8s.io".into(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if socket.exists() && c.ctr(&["version"]).status.success() {
                return c;
            }
            if Instant::now() > deadline || c.child.try_wait().ok().flatten().is_some() {
                let log = std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default();
                panic!("containerd did not come up within 10 s:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `ctr --address SOCKET --namespace NS ARGS...`, bounded to 120 s.
    pub fn ctr(&self, args: &[&str]) -> Output {
        crate::run(
            Command::new("timeout")
                .args(["-k", "5", "120", "ctr", "--address"])
                .arg(&self.socket)
                .args(["--namespace", &self.namespace])
                .args(args)
                .stdin(std::process::Stdio::null()),
        )
    }

    /// [`Self::ctr`] that must succeed; its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Kills and deletes the task and container `id` (bounded: 10 s for the task to stop).
    pub fn remove(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "--signal", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let out = self.ctr(&["task", "delete", id]);
            if out.status.success() || String::from_utf8_lossy(&out.stderr).contains("not found") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.ctr(&["container", "delete", id]);
    }

    /// The PIDs of the shims this containerd started (from its state directory).
    fn shim_pids(&self) -> Vec<i32> {
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task");
        let mut pids = Vec::new();
        for ns in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
            for task in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                if let Some(pid) = std::fs::read_to_string(task.path().join("shim.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                {
                    pids.push(pid);
                }
            }
        }
        pids
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let out = self.ctr(&["task", "list", "--quiet"]);
        for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            self.remove(id);
        }
        let shims = self.shim_pids();
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in shims {
            // Still that shim (not a reused PID): its command line names this containerd's socket.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&*self.socket.to_string_lossy()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(format!("{}.ttrpc", self.socket.display()));
    }
}
