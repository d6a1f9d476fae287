//! A real runtime: Debian's Podman (CNI network backend) starts two containers on a network whose
//! conflist names `sluice-cni`, and they reach each other by ICMP and TCP. The driving script,
//! `tests/podman/two-containers.sh`, runs Podman inside a throw-away node namespace with private
//! storage and cleans up on every exit path; this test gives it the plugin and checks what the
//! plugin left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::{have_root, sluice_bin};
use std::path::Path;
use std::process::Command;

fn have_podman() -> bool {
    let found = Command::new("podman").arg("--version").output().is_ok();
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have podman (README's test command installs it)"
        );
        eprintln!("skipping: podman is not installed");
    }
    found
}

/// What one run of `two-containers.sh` gave, and the directory holding the plugin's state.
struct Run {
    stdout: String,
    stderr: String,
    ipam_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// Runs the script with the conflist `install-cni` prints; `backend` goes to subnet.env as
/// `SLUICE_POLICY_BACKEND`, `hostport` turns on the script's hostPort checks.
fn run_script(backend: Option<&str>, hostport: Option<u16>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("sluice-cni");
    std::os::unix::fs::symlink(sluice_bin(), &plugin).unwrap();
    let subnet_file = dir.path().join("subnet.env");
    let mut env = "SLUICE_NETWORK=10.88.0.0/16\nSLUICE_SUBNET=10.88.9.0/24\nSLUICE_MTU=1400\nSLUICE_IPMASQ=false\n".to_string();
    if let Some(b) = backend {
        env.push_str(&format!("SLUICE_POLICY_BACKEND={b}\n"));
    }
    std::fs::write(&subnet_file, env).unwrap();
    let ipam_dir = dir.path().join("ipam");
    let template = dir.path().join("sluice.conflist.json");
    // The conflist sluice's agent installs (Podman 4's libcni 1.1 refused its old 1.1.0
    // cniVersion), under the network name and plugin type the script gives it.
    let printed = sluice_e2e::run(
        Command::new(sluice_bin())
            .args(["install-cni", "--print-conflist", "--subnet-file"])
            .arg(&subnet_file)
            .arg("--ipam-dir")
            .arg(&ipam_dir),
    );
    assert!(printed.status.success());
    let mut conflist: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    let plugin_conf = conflist["plugins"][0].to_string();
    conflist["name"] = "@NAME@".into();
    conflist["plugins"][0]["type"] = "@TYPE@".into();
    std::fs::write(&template, conflist.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("podman/two-containers.sh");
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", "300", "bash"])
        .arg(&script)
        .arg(&plugin)
        .arg("sluice-cni")
        .arg(&template)
        .env("PODMAN_TIMEOUT", "60");
    if let Some(port) = hostport {
        cmd.env("HOSTPORT", port.to_string())
            .env("PLUGIN_CONF", &plugin_conf)
            .env("IPAM_FILE", ipam_dir.join("allocations.json"))
            .env("BACKEND", backend.unwrap_or("nftables"));
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "two-containers.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Run {
        stdout,
        stderr,
        ipam_dir,
        _dir: dir,
    }
}

/// Both containers got addresses from the node's subnet through sluice-cni, and Podman's DELs
/// freed every address.
fn assert_addresses_and_freed(run: &Run) {
    let stdout = &run.stdout;
    // Both containers got addresses from the node's subnet, through sluice-cni.
    let ips: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("IP "))
        .filter_map(|l| l.split_once('=').map(|(_, ip)| ip))
        .collect();
    assert_eq!(ips.len(), 2, "{stdout}");
    for ip in &ips {
        let ip: std::net::Ipv4Addr = ip.parse().unwrap();
        assert!(
            "10.88.9.0/24"
                .parse::<ipnet::Ipv4Net>()
                .unwrap()
                .contains(&ip),
            "{ip} is not from sluice's subnet"
        );
    }
    let state = std::fs::read_to_string(run.ipam_dir.join("allocations.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert!(state["last"].is_string(), "sluice never allocated: {state}");
    assert_eq!(
        state["allocations"].as_object().map(|m| m.len()),
        Some(0),
        "allocations left after podman rm: {state}"
    );
    assert!(
        state
            .get("hostports")
            .is_none_or(|h| h.as_array().is_some_and(Vec::is_empty)),
        "hostPort mappings left after podman rm: {state}"
    );
}

#[test]
fn podman_containers_on_sluice_reach_each_other() {
    if !have_root() || !have_podman() {
        return;
    }
    let run = run_script(None, None);
    assert_addresses_and_freed(&run);
    assert_eq!(run.stdout.matches("PASS ").count(), 4, "{}", run.stdout);
    assert!(
        run.stderr
            .contains("calls to sluice-cni: ADD x2 rc=0, DEL x2 rc=0"),
        "{}",
        run.stderr
    );
}

/// `podman run -p 8080:80` on a sluice network, in the backend the agent publishes.
fn hostports_in(backend: &str) {
    let run = run_script(Some(backend), Some(8080));
    eprintln!("{}{}", run.stdout, run.stderr);
    assert_addresses_and_freed(&run);
    let stdout = &run.stdout;
    let in_backend = format!("PASS hostport rule in {backend}");
    for want in [
        in_backend.as_str(),
        "PASS hostport from another netns via 172.31.251.1:8080",
        "PASS hostport from the node via 172.31.251.1:8080",
        "PASS hostport from the node via 127.0.0.1:8080",
        "PASS second container refused hostPort 8080",
        "PASS the refused container left no veth",
        "PASS the refused container left no address or mapping",
        "PASS hostport still served by",
        "PASS GC after the killed runtime (rc 0)",
        "PASS no hostport after GC (from another netns)",
        "PASS no hostport after GC (127.0.0.1)",
        "PASS no hostport rule after GC",
    ] {
        assert!(
            stdout.contains(want),
            "{backend}: no {want:?} in:\n{stdout}\n{}",
            run.stderr
        );
    }
    assert!(!stdout.contains("FAIL "), "{stdout}");
    // The refused ADD failed with sluice's conflict code.
    assert!(run.stderr.contains("ADD x1 rc=1"), "{}", run.stderr);
}

#[test]
fn podman_hostport_with_nftables() {
    if !have_root() || !have_podman() {
        return;
    }
    hostports_in("nftables");
}

#[test]
fn podman_hostport_with_iptables() {
    if !have_root() || !have_podman() {
        return;
    }
    hostports_in("iptables-nft");
}
