//! `sluice lab restart NODE COMPONENT...` on a lab on real Kubernetes (`lab up --kubernetes`):
//! stops a node's containerd, kubelet or kube-proxy by its PID (TERM, or KILL with `--kill`, as
//! a crash would) and starts it again with the command line the lab started it with, in the
//! node's namespaces, as a node's init system restarts a component. What runs on the node
//! (containerd's shims and the pods' containers, sluice's agent among them) is left alone.

use super::k8s;
use super::plan::LabPlan;
use super::LabFiles;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};

/// A node component the lab started and can restart.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Component {
    Containerd,
    Kubelet,
    KubeProxy,
}

impl Component {
    /// The name of its pid, command-line and log files under the lab's `k8s/`.
    pub fn file_name(self, node: &str) -> String {
        match self {
            Self::Containerd => format!("{node}-containerd"),
            Self::Kubelet => format!("{node}-kubelet"),
            Self::KubeProxy => format!("kube-proxy-{node}"),
        }
    }
}

/// The order of a restart of `asked`: stopped dependents first (the kubelet and kube-proxy before
/// containerd, whose CRI the kubelet calls), started in the reverse order; each once.
pub fn order(asked: &[Component]) -> (Vec<Component>, Vec<Component>) {
    let mut start: Vec<Component> = asked.to_vec();
    start.sort_unstable();
    start.dedup();
    let stop = start.iter().rev().copied().collect();
    (stop, start)
}

/// How long a stopped component may take to exit before it is killed.
const STOP_WAIT: Duration = Duration::from_secs(15);
/// How long a restarted containerd may take to answer on its socket.
const READY_WAIT: Duration = Duration::from_secs(30);

pub fn run(name: &str, node: &str, components: &[Component], kill: bool) -> Result<()> {
    let files = LabFiles::new(name);
    let plan: LabPlan = serde_json::from_slice(
        &std::fs::read(&files.plan).with_context(|| format!("no lab named {name}"))?,
    )?;
    if plan.node(node).is_none() {
        bail!("lab {name} has no node {node}");
    }
    if !k8s::real_nodes(name) {
        bail!("lab {name} runs on the embedded API server: it has no containerd, kubelet or kube-proxy to restart (`lab up --kubernetes DIR` makes a lab that has)");
    }
    let dir = k8s::dir(&files);
    let (stop, start) = order(components);
    let signal = if kill {
        nix::sys::signal::Signal::SIGKILL
    } else {
        nix::sys::signal::Signal::SIGTERM
    };
    for c in &stop {
        let file = c.file_name(node);
        let pid = running_pid(&dir, &file).with_context(|| {
            format!("{node}: {c:?} does not run (no live process in {file}.pid)")
        })?;
        stop_pid(pid, signal)?;
        eprintln!("{node}: {c:?} (pid {pid}) stopped with {signal}");
    }
    for c in &start {
        let file = c.file_name(node);
        let mut child = k8s::respawn(&dir, &file)?;
        let pid = child.id();
        if *c == Component::Containerd {
            let sock = super::k8s_plan::containerd_socket(name, node);
            wait_containerd(&mut child, &sock)
                .with_context(|| format!("{node}: containerd (pid {pid}) after its restart"))?;
        }
        eprintln!("{node}: {c:?} started again (pid {pid})");
        // It runs on when this command ends, as at `lab up` (its own process group).
        drop(child);
    }
    Ok(())
}

/// The pid in `dir/FILE.pid` if that process runs with the lab's directory in its command line.
fn running_pid(dir: &Path, file: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join(format!("{file}.pid")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let marker = format!("{}/", dir.display());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains(&marker)
        .then_some(pid)
}

/// Signals `pid` and waits for it to be gone (bounded, then KILL).
fn stop_pid(pid: i32, signal: nix::sys::signal::Signal) -> Result<()> {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(pid);
    kill(pid, signal).with_context(|| format!("signalling pid {pid}"))?;
    let deadline = Instant::now() + STOP_WAIT;
    // Gone, or a zombie its parent (which `lab up` left) has not reaped yet.
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
    };
    while !gone() {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(200));
            if !gone() {
                bail!("pid {pid} did not exit within {STOP_WAIT:?}, even after KILL");
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn wait_containerd(child: &mut std::process::Child, sock: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_WAIT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("it exited ({status})");
        }
        let answered = k8s::output_within(
            std::process::Command::new("ctr")
                .arg("--address")
                .arg(sock)
                .arg("version"),
            Duration::from_secs(5),
        )
        .is_ok_and(|o| o.status.success());
        if answered {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no answer on {sock:?} within {READY_WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependents_stop_first_and_start_last_each_once() {
        use Component::*;
        assert_eq!(
            order(&[Kubelet, Containerd, Kubelet]),
            (vec![Kubelet, Containerd], vec![Containerd, Kubelet])
        );
        assert_eq!(
            order(&[KubeProxy, Containerd, Kubelet]),
            (
                vec![KubeProxy, Kubelet, Containerd],
                vec![Containerd, Kubelet, KubeProxy]
            )
        );
        assert_eq!(order(&[Kubelet]), (vec![Kubelet], vec![Kubelet]));
    }

    #[test]
    fn component_files_are_those_lab_up_writes() {
        assert_eq!(
            Component::Containerd.file_name("l-node-1"),
            "l-node-1-containerd"
        );
        assert_eq!(Component::Kubelet.file_name("l-node-1"), "l-node-1-kubelet");
        assert_eq!(
            Component::KubeProxy.file_name("l-node-1"),
            "kube-proxy-l-node-1"
        );
    }
}
