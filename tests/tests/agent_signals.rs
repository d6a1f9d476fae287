//! The agent as the kubelet runs it: PID 1 of its container's PID namespace, stopped with TERM.
//! PID 1 gets no default action for TERM, so without a handler the agent would live on until
//! the grace period's KILL, and every rolling update of the DaemonSet would wait for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::{have_root, sluice_bin, Netns};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_agent_as_pid_1_stops_at_once_on_term() {
    if !have_root() {
        return;
    }
    let ns = Netns::new("term");
    let dir = tempfile::tempdir().unwrap();
    // An API server that is not there: the agent is still retrying when TERM comes.
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"http://127.0.0.1:1\"}}]\nusers: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let mut outer = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
        ])
        .arg(sluice_bin())
        .args(["agent", "--node-name", "term-test", "--kubeconfig"])
        .arg(&kubeconfig)
        .args(["--health-addr", "127.0.0.1:19099"])
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // The agent: the child of unshare, PID 1 inside.
    let deadline = Instant::now() + Duration::from_secs(5);
    let agent = loop {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", outer.id()))
            .unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            break pid.parse::<i32>().unwrap();
        }
        assert!(Instant::now() < deadline, "the agent did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.trim_end().ends_with("\t1")),
        "{status}"
    );
    std::thread::sleep(Duration::from_millis(500));
    let pid = nix::unistd::Pid::from_raw(agent);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let stopped = sluice_e2e::wait_until(Duration::from_secs(2), || {
        std::fs::read_to_string(format!("/proc/{agent}/stat")).map_or(true, |s| s.contains(") Z "))
    });
    if !stopped {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = outer.wait();
    let text = std::fs::read_to_string(dir.path().join("agent.log")).unwrap();
    assert!(stopped, "the agent ignored TERM as PID 1:\n{text}");
    assert!(text.contains("TERM: sluice agent stopping"), "{text}");
}
