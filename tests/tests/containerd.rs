//! A real runtime of the kind that refused sluice's old conflist: Debian's containerd 1.6 (libcni
//! 1.1, CNI up to 1.0.0; `plugin type="sluice-cni" failed (add): unsupported CNI result version
//! "1.1.0"` when the conflist said 1.1.0) starts a container with `ctr run --cni` on exactly the
//! CNI config sluice's agent installs (`sluice install-cni --print-conflist`). The driving
//! script, `tests/containerd/ctr-cni.sh`, runs containerd in a node namespace with a mount
//! namespace of its own, so nothing of the host's CNI directories is touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::containerd::have_containerd;
use sluice_e2e::{have_root, run, sluice_bin, Netns};
use std::path::Path;
use std::process::Command;

/// A one-binary root file system: busybox, and its applets the container runs.
fn rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static");
    for applet in ["sh", "ip", "sed"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
}

#[test]
fn containerd_1_6_runs_a_container_on_the_installed_conflist() {
    if !have_root() || !have_containerd() {
        return;
    }
    let node = Netns::new("ctr");
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    rootfs(&w.join("rootfs"));
    std::fs::create_dir_all(w.join("bin")).unwrap();
    std::os::unix::fs::symlink(sluice_bin(), w.join("bin/sluice-cni")).unwrap();
    std::fs::write(
        w.join("subnet.env"),
        "SLUICE_NETWORK=10.87.0.0/16\nSLUICE_SUBNET=10.87.5.0/24\nSLUICE_MTU=1400\nSLUICE_IPMASQ=false\n",
    )
    .unwrap();
    let printed = run(Command::new(sluice_bin())
        .args(["install-cni", "--print-conflist", "--subnet-file"])
        .arg(w.join("subnet.env"))
        .arg("--ipam-dir")
        .arg(w.join("ipam")));
    assert!(printed.status.success());
    let conflist: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0");
    std::fs::create_dir_all(w.join("net.d")).unwrap();
    std::fs::write(w.join("net.d/10-sluice.conflist"), &printed.stdout).unwrap();
    let d = w.display();
    std::fs::write(
        w.join("containerd.toml"),
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n[grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n[debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n[plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{d}/opt\"\n"
        ),
    )
    .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("containerd/ctr-cni.sh");
    let id = sluice_e2e::unique("c");
    let out = run(Command::new("timeout")
        .args(["-k", "10", "120", "nsenter"])
        .arg(format!("--net={}", node.path().display()))
        .args(["unshare", "--mount", "--propagation", "private", "bash"])
        .arg(&script)
        .arg(w)
        .arg(&id));
    // containerd is stopped by the script; should the script itself have been killed, end it here.
    if let Some(pid) = std::fs::read_to_string(w.join("containerd.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ctr run --cni failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("ADDR") && stdout.contains("inet 10.87.5.") && stdout.contains("/32"),
        "the container got no address from sluice: {stdout}"
    );
    assert!(stdout.contains("ROUTE default via 169.254.1.1"), "{stdout}");
    // ctr's --rm ran DEL: the address is free again and the host side of the veth is gone.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("ipam/allocations.json")).unwrap())
            .unwrap();
    assert_eq!(
        state["allocations"].as_object().map(|m| m.len()),
        Some(0),
        "{state}"
    );
    assert!(
        node.links().iter().all(|l| !l.starts_with("sl")),
        "veths left: {:?}",
        node.links()
    );
}
