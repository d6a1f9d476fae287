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

#[test]
fn podman_containers_on_sluice_reach_each_other() {
    if !have_root() || !have_podman() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("sluice-cni");
    std::os::unix::fs::symlink(sluice_bin(), &plugin).unwrap();
    let subnet_file = dir.path().join("subnet.env");
    std::fs::write(
        &subnet_file,
        "SLUICE_NETWORK=10.88.0.0/16\nSLUICE_SUBNET=10.88.9.0/24\nSLUICE_MTU=1400\nSLUICE_IPMASQ=false\n",
    )
    .unwrap();
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
    conflist["name"] = "@NAME@".into();
    conflist["plugins"][0]["type"] = "@TYPE@".into();
    std::fs::write(&template, conflist.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("podman/two-containers.sh");
    let out = Command::new("timeout")
        .args(["-k", "10", "300", "bash"])
        .arg(&script)
        .arg(&plugin)
        .arg("sluice-cni")
        .arg(&template)
        .env("PODMAN_TIMEOUT", "60")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "two-containers.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
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
    assert_eq!(stdout.matches("PASS ").count(), 4, "{stdout}");
    assert!(
        stderr.contains("calls to sluice-cni: ADD x2 rc=0, DEL x2 rc=0"),
        "{stderr}"
    );
    // Podman's DELs freed both addresses.
    let state = std::fs::read_to_string(ipam_dir.join("allocations.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert!(state["last"].is_string(), "sluice never allocated: {state}");
    assert_eq!(
        state["allocations"].as_object().map(|m| m.len()),
        Some(0),
        "allocations left after podman rm: {state}"
    );
}
