//! Keeps a lab's daemon running, as a container runtime's restart policy keeps a kind cluster's
//! control plane up: `lab up` starts this supervisor (`lab __daemon --name X`), which starts the
//! daemon (`lab __daemon --name X --serve`) and starts it again when it dies unasked (killed,
//! crashed; the release build aborts on a panic). The new daemon serves the same state file at
//! the same address with the same certificates, and takes over the agents and pods the old one
//! left running, so nothing on the nodes changes hands. A daemon that stops on TERM (`lab down`)
//! is not restarted. A daemon that keeps dying at once is given up on after a few tries, and `lab
//! status` says so; `lab up --name X` then resumes the lab.

use super::plan::{LabPlan, LabSpec};
use super::{daemon, LabFiles};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Written by the supervisor at each change, for `lab status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorInfo {
    pub pid: u32,
    pub daemon_pid: Option<u32>,
    /// How many times the daemon was started again after it died.
    pub restarts: u32,
    /// How the last daemon ended, e.g. "killed by signal 9".
    pub last_exit: Option<String>,
    /// The daemon kept dying at once and is no longer restarted.
    pub gave_up: bool,
}

pub fn info_path(files: &LabFiles) -> PathBuf {
    files.dir.join("supervisor.json")
}

pub fn read_info(files: &LabFiles) -> Option<SupervisorInfo> {
    serde_json::from_slice(&std::fs::read(info_path(files)).ok()?).ok()
}

/// A daemon that ran less than this before dying died "at once".
const QUICK: Duration = Duration::from_secs(10);
/// After this many deaths at once in a row, the supervisor gives up.
const QUICK_DEATHS: u32 = 5;

/// The wait before restart `n` (1, 2, ...): 0.5 s doubling, at most 8 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(500u64 << n.saturating_sub(1).min(4))
}

fn describe(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

fn write(files: &LabFiles, info: &SupervisorInfo) {
    let written = serde_json::to_vec_pretty(info)
        .map_err(anyhow::Error::from)
        .and_then(|b| daemon::write_atomic(&info_path(files), &b));
    if let Err(e) = written {
        tracing::warn!(error = format!("{e:#}"), "cannot write supervisor.json");
    }
}

pub async fn run(name: &str) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let files = LabFiles::new(name);
    let exe = std::env::current_exe().context("finding the sluice executable")?;
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut info = SupervisorInfo {
        pid: std::process::id(),
        ..SupervisorInfo::default()
    };
    let mut quick_deaths = 0;
    loop {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.daemon_log)?;
        let mut child = tokio::process::Command::new(&exe)
            .args(["lab", "__daemon", "--name", name, "--serve"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the lab daemon")?;
        let started = Instant::now();
        info.daemon_pid = child.id();
        write(&files, &info);
        let status = tokio::select! {
            s = child.wait() => s?,
            _ = term.recv() => return stop(&mut child).await,
            _ = interrupt.recv() => return stop(&mut child).await,
        };
        info.daemon_pid = None;
        info.last_exit = Some(describe(status));
        if status.success() {
            tracing::info!(lab = name, "the lab daemon stopped; not restarting it");
            write(&files, &info);
            return Ok(());
        }
        quick_deaths = if started.elapsed() < QUICK {
            quick_deaths + 1
        } else {
            1
        };
        if quick_deaths >= QUICK_DEATHS {
            info.gave_up = true;
            write(&files, &info);
            anyhow::bail!(
                "the lab daemon died {quick_deaths} times within {QUICK:?} of its start (last: {}); giving up (see {:?}; `sluice lab up --name {name}` tries again)",
                info.last_exit.as_deref().unwrap_or("?"),
                files.daemon_log
            );
        }
        info.restarts += 1;
        write(&files, &info);
        let wait = backoff(quick_deaths);
        tracing::warn!(
            lab = name,
            exit = info.last_exit.as_deref().unwrap_or(""),
            restart_in = ?wait,
            "the lab daemon died; restarting it"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

/// Passes a stop on to the daemon and waits for it (bounded), so that `lab down` finds the agents
/// stopped by it.
async fn stop(child: &mut tokio::process::Child) -> Result<()> {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid)?);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(())
}

/// Whether process `pid` runs (a zombie does not) with `args` in its command line, in order.
pub fn running_with(pid: u32, args: &[&str]) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may hold anything.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let mut needle = args.join("\0").into_bytes();
    needle.push(0);
    !zombie
        && cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_slice())
}

/// The daemon of lab `name`, if it runs: its pid.
pub fn daemon_running(name: &str, files: &LabFiles) -> Option<u32> {
    let info = daemon::read_info(&files.daemon)?;
    running_with(info.pid, &["lab", "__daemon", "--name", name, "--serve"]).then_some(info.pid)
}

/// The supervisor of lab `name`, if it runs: its pid.
pub fn supervisor_running(name: &str, files: &LabFiles) -> Option<u32> {
    let info = read_info(files)?;
    running_with(info.pid, &["lab", "__daemon", "--name", name]).then_some(info.pid)
}

/// `lab up` of a lab that exists already: if its daemon is gone (it died with its supervisor,
/// or the supervisor gave up on it), starts them again on the lab's saved state, keeping what
/// runs on the nodes; a lab that runs, or that lost its namespaces, is refused.
pub async fn resume(spec: &LabSpec, files: &LabFiles) -> Result<()> {
    let name = &spec.name;
    let plan: LabPlan = match std::fs::read(&files.plan) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(_) => bail!(
            "lab {name} already exists but is not whole (no {:?}): run `sluice lab down --name {name}` first",
            files.plan
        ),
    };
    if let Some(pid) = daemon_running(name, files).or_else(|| supervisor_running(name, files)) {
        bail!(
            "lab {name} already exists and is running (pid {pid}): `sluice lab status --name {name}` shows it, `sluice lab down --name {name}` removes it"
        );
    }
    let missing: Vec<&str> = plan
        .nodes
        .iter()
        .map(|n| n.netns.as_str())
        .filter(|ns| !sluice_net::netns::named_path(ns).exists())
        .collect();
    if !missing.is_empty() {
        bail!(
            "lab {name} already exists but lost namespaces {missing:?}, so it cannot resume: run `sluice lab down --name {name}`, then `lab up` again"
        );
    }
    let dead = super::k8s::dead_components(files);
    if !dead.is_empty() {
        bail!(
            "lab {name} already exists but its Kubernetes components {dead:?} no longer run, so it cannot resume: run `sluice lab down --name {name}`, then `lab up` again"
        );
    }
    if plan.spec != *spec {
        eprintln!(
            "lab {name} exists: resuming it as it was made ({} nodes, {} pods per node); the options of `lab up` apply to new labs",
            plan.spec.nodes, plan.spec.pods_per_node
        );
    }
    let _ = std::fs::remove_file(info_path(files));
    let info = super::start_daemon(name, files).await?;
    println!(
        "lab {name} resumed: its daemon (pid {}) serves the saved state at {}; agents and pods kept running\n\n  export KUBECONFIG={}\n  sluice lab status --name {name}",
        info.pid,
        info.api,
        files.kubeconfig.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_eight_seconds() {
        let waits: Vec<u64> = (1..=7).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 8000, 8000]);
    }

    #[test]
    fn finds_processes_by_their_arguments() {
        let me = std::process::id();
        let args: Vec<String> = std::env::args().collect();
        let first = args[0].as_str();
        assert!(running_with(me, &[first]));
        assert!(!running_with(me, &[first, "--no-such-argument-here"]));
        assert!(!running_with(u32::MAX, &[first]));
    }
}
