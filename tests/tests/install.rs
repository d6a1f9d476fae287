//! `sluice install-cni` into a temporary root: the plugin lands with the right content and mode,
//! the CNI config does not (the agent writes it once the node's network is up), a rerun changes
//! nothing, and a reader never sees a partial file while an upgrade replaces the plugin.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::{run, sluice_bin};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn install(root: &std::path::Path, exe: &std::path::Path) -> std::process::Output {
    run(Command::new(exe)
        .arg("install-cni")
        .arg("--bin-dir")
        .arg(root.join("opt/cni/bin")))
}

#[test]
fn install_cni_writes_the_plugin_atomically_and_idempotently_and_no_config() {
    let root = tempfile::tempdir().unwrap();
    let out = install(root.path(), &sluice_bin());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plugin = root.path().join("opt/cni/bin/sluice-cni");
    let conf = root.path().join("etc/cni/net.d/10-sluice.conflist");
    assert_eq!(
        std::fs::read(&plugin).unwrap(),
        std::fs::read(sluice_bin()).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&plugin).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    // No CNI config before the agent has a subnet and a datapath: the kubelet would report the
    // node Ready and send pods whose ADD must fail.
    assert!(!conf.exists());
    assert!(!root.path().join("etc").exists());
    // The installed plugin is the plugin when called by its name.
    let v = run(Command::new(&plugin).env("CNI_COMMAND", "VERSION"));
    let v: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(v["supportedVersions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x == "1.1.0"));
    // A rerun leaves both untouched.
    let before = std::fs::metadata(&plugin).unwrap().modified().unwrap();
    let out = install(root.path(), &sluice_bin());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unchanged"));
    assert_eq!(
        std::fs::metadata(&plugin).unwrap().modified().unwrap(),
        before
    );
    // An upgrade (a different binary) while readers read: every read sees one whole file, old or
    // new, never a torn one; and no temporary file is left behind.
    let other = root.path().join("other-sluice");
    std::fs::copy(sluice_bin(), &other).unwrap();
    let mut bytes = std::fs::read(&other).unwrap();
    bytes.extend_from_slice(b"\0upgrade-marker");
    std::fs::write(&other, &bytes).unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_len = std::fs::metadata(&plugin).unwrap().len();
    let new_len = bytes.len() as u64;
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let plugin = plugin.clone();
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::Relaxed) && reads < 100_000 {
                let len = std::fs::read(&plugin).unwrap().len() as u64;
                assert!(len == old_len || len == new_len, "torn read: {len} bytes");
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..5 {
        // Alternate between the two binaries so every round replaces the file.
        let out = install(root.path(), &other);
        assert!(out.status.success());
        let out = install(root.path(), &sluice_bin());
        assert!(out.status.success());
    }
    stop.store(true, Ordering::Relaxed);
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    let leftovers: Vec<_> = std::fs::read_dir(root.path().join("opt/cni/bin"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["sluice-cni"]);
}
