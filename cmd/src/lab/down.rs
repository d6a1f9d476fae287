//! `sluice lab down`: removes every process, namespace and file of a lab. It works from what is
//! on the machine (namespaces by prefix, processes by namespace), not from the lab's records
//! alone, so it also cleans up after a crash or a half-made `lab up`.

use super::plan::{prefix, LabPlan};
use super::{cluster, daemon, LabFiles};
use anyhow::{Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sluice_net::netns;
use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

/// Processes whose network namespace is one of `inodes`, the lab daemon of `name`, or a
/// component of its real control plane (whose command line names the lab's `k8s` directory).
fn lab_processes(name: &str, inodes: &HashSet<u64>) -> Vec<i32> {
    let k8s_dir = format!("{}/", super::k8s::dir(&LabFiles::new(name)).display());
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let daemon_args = format!("lab\0__daemon\0--name\0{name}\0");
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let in_lab_ns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| inodes.contains(&m.ino()));
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            in_lab_ns
                || cmdline.contains(&daemon_args)
                || cmdline.contains(&k8s_dir)
                || in_lab_cgroup(*pid, name)
        })
        .collect()
}

/// The start of the cgroup names of lab `name`'s real kubelets (see `k8s_plan::cgroup_root`).
fn cgroup_prefix(name: &str) -> String {
    super::k8s_plan::cgroup_root(&format!("{name}-node-"))
}

/// Whether `pid` runs in a cgroup of the lab's kubelets: the containers of its pods, which
/// live in network namespaces of containerd's and whose command lines name nothing of the lab.
fn in_lab_cgroup(pid: i32, name: &str) -> bool {
    let prefix = cgroup_prefix(name);
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
        c.lines()
            .filter_map(|l| l.splitn(3, ':').nth(2))
            .any(|path| path.starts_with(&prefix))
    })
}

/// Removes the lab's kubelet cgroups in every hierarchy, deepest first; how many were left.
fn remove_cgroups(name: &str) -> usize {
    fn remove_tree(dir: &std::path::Path) -> bool {
        let children: Vec<_> = std::fs::read_dir(dir)
            .map(|r| {
                r.filter_map(|e| e.ok())
                    .filter(|e| e.path().is_dir())
                    .collect()
            })
            .unwrap_or_default();
        let mut ok = true;
        for c in children {
            ok &= remove_tree(&c.path());
        }
        ok && std::fs::remove_dir(dir).is_ok()
    }
    let prefix = cgroup_prefix(name);
    let prefix = prefix.trim_start_matches('/');
    let mut left = 0;
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return 0;
    };
    for h in hierarchies.filter_map(|e| e.ok()) {
        let Ok(entries) = std::fs::read_dir(h.path()) else {
            continue;
        };
        for e in entries.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().starts_with(prefix) && !remove_tree(&e.path()) {
                left += 1;
            }
        }
    }
    left
}

/// TERM, then KILL after a bounded wait.
fn stop(pids: &[i32]) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline
        && pids
            .iter()
            .any(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in pids {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
}

pub async fn run(name: &str) -> Result<()> {
    super::require_root()?;
    let files = LabFiles::new(name);
    // Against a real API server, the lab's Nodes and Pods outlive it unless removed (not when
    // the lab runs that API server itself: it goes with the lab).
    if files.external.exists() && !super::k8s::dir(&files).exists() {
        if let Ok(b) = std::fs::read(&files.plan) {
            let plan: LabPlan = serde_json::from_slice(&b)?;
            if let Ok(client) = cluster::client(&files.kubeconfig).await {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    cluster::unregister(&client, &plan),
                )
                .await;
            }
        }
    }
    let names = netns::list_named(&prefix(name));
    let inodes: HashSet<u64> = names
        .iter()
        .filter_map(|n| std::fs::metadata(netns::named_path(n)).ok())
        .map(|m| m.ino())
        .collect();
    let recorded_daemon = daemon::read_info(&files.daemon).map(|info| info.pid as i32);
    let mut stopped: HashSet<i32> = HashSet::new();
    // The daemon restarts an agent that exits: one it restarted between the scan and its own
    // end is found by the next scan. It is gone after the first round (KILL at the latest),
    // so a second round finds the last of them; the bound is for safety.
    for _round in 0..5 {
        let mut pids = lab_processes(name, &inodes);
        if let Some(pid) = recorded_daemon {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("__daemon") && !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        if pids.is_empty() {
            break;
        }
        stop(&pids);
        stopped.extend(pids);
    }
    // A cgroup is removable once its last process is reaped: a moment after KILL.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut cgroups_left = remove_cgroups(name);
    while cgroups_left > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        cgroups_left = remove_cgroups(name);
    }
    if cgroups_left > 0 {
        eprintln!("lab {name}: {cgroups_left} cgroups of its kubelets could not be removed");
    }
    for n in &names {
        netns::remove_named(n).with_context(|| format!("removing network namespace {n}"))?;
    }
    let had_files = files.dir.exists();
    if had_files {
        std::fs::remove_dir_all(&files.dir).with_context(|| format!("removing {:?}", files.dir))?;
    }
    if names.is_empty() && stopped.is_empty() && !had_files {
        eprintln!("lab {name}: nothing to remove");
    } else {
        eprintln!(
            "lab {name}: removed {} network namespaces, stopped {} processes{}",
            names.len(),
            stopped.len(),
            if had_files { ", removed its files" } else { "" }
        );
    }
    Ok(())
}
