//! The image the manifest names, as sluice writes it offline (`sluice lab image`): a private
//! containerd (Debian's 1.6) imports the archive and runs it with nothing of the host's file
//! system bound in, and inside it, in the container's own network namespace, sluice and every
//! tool the agent runs work (nft, iptables in both variants with their extension modules,
//! ipset, conntrack): the image is self-contained. Its init step runs as the DaemonSet runs it
//! (read-only root, no capability, `/opt/cni/bin` its one volume). `sluice lab load` imports it into a node's
//! containerd at the lab's conventional socket, and refuses what it cannot load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use sluice_e2e::containerd::{have_containerd, Containerd};
use sluice_e2e::lab::{lab_cmd, output_text, Lab};
use sluice_e2e::{have_root, run, sluice_bin, unique};
use std::path::Path;
use std::process::Command;

/// `sluice lab image --out OUT --tag TAG`; panics with its output if it fails.
fn write_image(out: &Path, tag: &str) {
    let o = run(Command::new(sluice_bin())
        .args(["lab", "image", "--out"])
        .arg(out)
        .args(["--tag", tag]));
    assert!(o.status.success(), "lab image: {}", output_text(&o));
}

/// containerd's default capability set (what `capabilities: drop: ["ALL"]` takes away).
const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A tag no other run uses, in a registry that does not exist (nothing can be pulled).
fn test_tag() -> String {
    format!("sluice-image-test.invalid/sluice:{}", unique("t"))
}

#[test]
fn the_image_runs_sluice_and_its_tools_with_nothing_of_the_host() {
    if !have_root() || !have_containerd() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let tag = test_tag();
    let archive = w.join("sluice.tar");
    write_image(&archive, &tag);
    // Deterministic: the same binary and packages give the same bytes.
    write_image(&w.join("again.tar"), &tag);
    assert!(
        std::fs::read(&archive).unwrap() == std::fs::read(w.join("again.tar")).unwrap(),
        "two writes of the image differ"
    );

    let c = Containerd::start(&w.join("containerd"), &w.join("containerd/containerd.sock"));
    let imported = c.ctr_ok(&["images", "import", &archive.display().to_string()]);
    assert!(imported.contains(&tag), "{imported}");
    let listed = c.ctr_ok(&["images", "list", "--quiet"]);
    assert!(listed.lines().any(|l| l == tag), "{listed}");

    // A long-lived process to exec beside (the image has no shell): sluice's own test server.
    let id = unique("img");
    c.ctr_ok(&[
        "run",
        "--detach",
        "--cap-add",
        "CAP_NET_ADMIN",
        "--cap-add",
        "CAP_NET_RAW",
        &tag,
        &id,
        "/usr/local/bin/sluice",
        "lab",
        "serve",
        "--identity",
        "image-test",
        "--tcp",
        "8080",
    ]);
    // Nothing of the host is in it: only the runtime's own kernel file systems are mounted.
    let info: serde_json::Value =
        serde_json::from_str(&c.ctr_ok(&["container", "info", &id])).unwrap();
    let mounts = info["Spec"]["mounts"]
        .as_array()
        .expect("the spec's mounts");
    for m in mounts {
        let options: Vec<&str> = m["options"]
            .as_array()
            .map(|o| o.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert!(
            m["type"] != "bind" && !options.iter().any(|o| o.ends_with("bind")),
            "a bind mount in the container: {m}"
        );
    }
    assert_eq!(info["Image"], tag.as_str());
    // The container's network namespace is its own (the spec has one and no path into the host's).
    let namespaces = info["Spec"]["linux"]["namespaces"].as_array().unwrap();
    assert!(
        namespaces
            .iter()
            .any(|n| n["type"] == "network" && n["path"].is_null()),
        "{namespaces:?}"
    );

    let mut n = 0;
    let mut exec = |args: &[&str]| -> String {
        n += 1;
        let exec_id = format!("e{n}");
        let mut all = vec!["task", "exec", "--exec-id", &exec_id, &id];
        all.extend_from_slice(args);
        let out = c.ctr(&all);
        let text = output_text(&out);
        assert!(out.status.success(), "{args:?} in the image: {text}");
        text
    };
    // ctr 1.6 sometimes returns from a short exec before its output is copied (seen once with
    // `ipset --version`: empty): a version query that printed nothing is asked again, thrice at
    // most.
    let mut ask = |args: &[&str]| -> String {
        let mut text = String::new();
        for _ in 0..3 {
            text = exec(args);
            if !text.trim().is_empty() {
                break;
            }
        }
        text
    };
    let version = ask(&["/usr/local/bin/sluice", "version"]);
    assert!(version.contains("sluice 0.1"), "{version}");
    assert!(ask(&["nft", "--version"]).contains("nftables v"));
    let ipt = ask(&["iptables", "--version"]);
    assert!(
        ipt.contains("iptables v1.") && (ipt.contains("nf_tables") || ipt.contains("legacy")),
        "{ipt}"
    );
    assert!(ask(&["iptables-nft", "--version"]).contains("(nf_tables)"));
    // The legacy variant comes along where the machine's iptables package ships it (Debian's does).
    if Path::new("/usr/sbin/iptables-legacy").exists() {
        assert!(ask(&["iptables-legacy", "-V"]).contains("(legacy)"));
    }
    assert!(ask(&["ip6tables", "--version"]).contains("ip6tables v1."));
    let v = ask(&["ipset", "--version"]);
    assert!(v.contains("ipset v"), "{v:?}");
    let v = ask(&["conntrack", "--version"]);
    assert!(v.contains("conntrack v"), "{v:?}");

    // The tools work on the container's own netfilter state: a table, a chain with a rule that
    // needs an xtables module (tcp), a set, the conntrack table.
    exec(&["nft", "add", "table", "inet", "sluice_image_test"]);
    let ruleset = exec(&["nft", "list", "ruleset"]);
    assert!(
        ruleset.contains("table inet sluice_image_test"),
        "{ruleset}"
    );
    exec(&["iptables-nft", "-N", "SLUICE-IMAGE-TEST"]);
    exec(&[
        "iptables-nft",
        "-A",
        "SLUICE-IMAGE-TEST",
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "ACCEPT",
    ]);
    let saved = exec(&["iptables-nft-save"]);
    assert!(
        saved.contains("-A SLUICE-IMAGE-TEST -p tcp -m tcp --dport 8080 -j ACCEPT"),
        "{saved}"
    );
    let restored = exec(&["iptables-nft-restore", "--help"]);
    assert!(restored.contains("Usage"), "{restored}");
    exec(&["ipset", "create", "sluice-image-test", "hash:ip"]);
    exec(&["ipset", "add", "sluice-image-test", "10.87.0.1"]);
    let sets = exec(&["ipset", "list", "-n"]);
    assert!(sets.lines().any(|l| l == "sluice-image-test"), "{sets}");
    let flows = exec(&["conntrack", "-L"]);
    assert!(flows.contains("flow entries have been shown"), "{flows}");
    // ...and none of it is the host's.
    let host = run(Command::new("nft").args(["list", "tables"]));
    assert!(!String::from_utf8_lossy(&host.stdout).contains("sluice_image_test"));
    let host_sets = run(Command::new("ipset").args(["list", "-n"]));
    assert!(!String::from_utf8_lossy(&host_sets.stdout).contains("sluice-image-test"));

    c.remove(&id);
    c.ctr_ok(&["images", "remove", &tag]);
}

#[test]
fn the_install_cni_init_container_runs_from_the_image_as_the_daemonset_runs_it() {
    if !have_root() || !have_containerd() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let tag = test_tag();
    let archive = w.join("sluice.tar");
    write_image(&archive, &tag);
    let c = Containerd::start(&w.join("containerd"), &w.join("containerd/containerd.sock"));
    c.ctr_ok(&["images", "import", &archive.display().to_string()]);
    // The DaemonSet's init container: read-only root, every capability dropped, its one volume
    // (the node's /opt/cni/bin: here a directory of the test's) and its command.
    let cni_bin = w.join("cni-bin");
    std::fs::create_dir_all(&cni_bin).unwrap();
    let mount = format!(
        "type=bind,src={},dst=/opt/cni/bin,options=rbind:rw",
        cni_bin.display()
    );
    let id = unique("init");
    // ctr 1.6 takes no `ALL`: every capability of its default set, by name.
    let mut args = vec!["run", "--rm", "--read-only", "--mount", &mount];
    for cap in DEFAULT_CAPS {
        args.extend(["--cap-drop", cap]);
    }
    args.extend([tag.as_str(), &id, "/usr/local/bin/sluice", "install-cni"]);
    c.ctr_ok(&args);
    let installed =
        std::fs::read(cni_bin.join("sluice-cni")).expect("install-cni wrote sluice-cni");
    assert!(
        installed == std::fs::read(sluice_bin()).unwrap(),
        "the installed plugin is not the image's sluice"
    );
    // The installed plugin is the CNI plugin by its name.
    let out = run(Command::new(cni_bin.join("sluice-cni")).env("CNI_COMMAND", "VERSION"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("supportedVersions"),
        "{}",
        output_text(&out)
    );
    c.ctr_ok(&["images", "remove", &tag]);
}

#[test]
fn lab_load_imports_into_the_node_containerd_and_refuses_what_it_cannot_load() {
    if !have_root() || !have_containerd() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let tag = test_tag();
    let archive = w.join("sluice.tar");
    write_image(&archive, &tag);
    let a = archive.display().to_string();

    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let nodes = [
        format!("{}-node-1", lab.name),
        format!("{}-node-2", lab.name),
    ];
    let refused = |args: &[&str], why: &str| {
        let out = lab_cmd(args, 60);
        let text = output_text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {text}");
        assert!(text.contains(why), "{args:?}: {text}");
    };
    let missing = w.join("none.tar").display().to_string();
    refused(
        &["load", "--name", &lab.name, &missing],
        "no such image archive",
    );
    // The embedded lab has no containerd: said so, and how to get one.
    refused(
        &["load", "--name", &lab.name, &a],
        "has no containerd to load images into",
    );

    // Each node's containerd, at the socket a real-Kubernetes lab gives it.
    let socket = |node: &str| {
        Path::new("/run/sluice/lab")
            .join(&lab.name)
            .join("k8s/nodes")
            .join(node)
            .join("containerd/containerd.sock")
    };
    let first = Containerd::start(&w.join("containerd-1"), &socket(&nodes[0]));
    // The second node's containerd is not up yet: nothing is imported anywhere.
    refused(
        &["load", "--name", &lab.name, &a],
        &format!("node {} has no containerd at", nodes[1]),
    );
    let has = |c: &Containerd| {
        c.ctr_ok(&["images", "list", "--quiet"])
            .lines()
            .any(|l| l == tag)
    };
    assert!(!has(&first));
    let second = Containerd::start(&w.join("containerd-2"), &socket(&nodes[1]));
    refused(
        &["load", "--name", &lab.name, "--node", "nosuchnode", &a],
        "has no node nosuchnode",
    );
    // One node, by name: only its containerd has the image.
    let out = lab_cmd(&["load", "--name", &lab.name, "--node", &nodes[1], &a], 120);
    let text = output_text(&out);
    assert!(out.status.success(), "lab load --node: {text}");
    assert!(has(&second) && !has(&first), "{text}");
    // Every node.
    let out = lab_cmd(&["load", "--name", &lab.name, &a], 120);
    let text = output_text(&out);
    assert!(out.status.success(), "lab load: {text}");
    for (node, c) in nodes.iter().zip([&first, &second]) {
        assert!(text.contains(&format!("{node}: {tag}")), "{text}");
        assert!(has(c), "{node} lacks {tag}");
        // Loaded means runnable there.
        let id = unique("load");
        let ran = c.ctr_ok(&["run", "--rm", &tag, &id, "/usr/local/bin/sluice", "version"]);
        assert!(ran.contains("sluice 0.1"), "{ran}");
    }
    drop(first);
    drop(second);
    drop(lab);
}
