//! What sluice-cni takes from outside, as a hostile or broken node hands it over: GC calls
//! without their list, unsafe subnets, and files that never end or never unlock. Each case calls
//! the built binary as a runtime does and asserts the spec's error code, a message that names the
//! cause, a bounded answer, and that nothing was changed or left behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use nix::fcntl::{Flock, FlockArg};
use serde_json::{json, Value};
use sluice_e2e::cni::{CniNode, Limits, Outcome};
use sluice_e2e::{have_root, Netns};
use std::path::Path;
use std::time::Duration;

/// Far above any answer the plugin should give here; far below "forever".
const PROMPT: Duration = Duration::from_secs(20);

fn msg(out: &Outcome) -> String {
    out.json()["msg"].as_str().unwrap_or_default().to_string()
}

fn gc(node: &CniNode, extra: Value) -> Outcome {
    node.call_raw_with(
        &[("CNI_COMMAND", "GC"), ("CNI_PATH", "/opt/cni/bin")],
        node.conf("1.1.0", extra).to_string().as_bytes(),
        Limits::deadline(PROMPT),
    )
}

fn add(node: &CniNode, container: &str, netns: &Path, conf: &Value) -> Outcome {
    add_within(node, container, netns, conf, PROMPT)
}

fn add_within(
    node: &CniNode,
    container: &str,
    netns: &Path,
    conf: &Value,
    deadline: Duration,
) -> Outcome {
    let netns = netns.display().to_string();
    node.call_raw_with(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", container),
            ("CNI_NETNS", &netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ],
        conf.to_string().as_bytes(),
        Limits::deadline(deadline),
    )
}

fn mkfifo(path: &Path) {
    let _ = std::fs::remove_file(path);
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// Two pods on `node`, wired; their container ids are `{tag}0` and `{tag}1`.
fn two_pods(node: &CniNode, tag: &str) -> Vec<Netns> {
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new(tag)).collect();
    for (i, p) in pods.iter().enumerate() {
        add(node, &format!("{tag}{i}"), &p.path(), &conf).assert_ok();
    }
    pods
}

#[test]
fn gc_without_its_list_changes_nothing_and_says_why() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.40.0/24"));
    let _pods = two_pods(&node, "gl");
    let before = (node.allocations(), node.pod_links(), node.pod_routes());
    assert_eq!(before.0.len(), 2);

    // No list at all: the runtime's duty is not done, so sluice does nothing.
    let out = gc(&node, json!({}));
    assert_eq!(out.error_code(), 7, "{out:?}");
    assert!(msg(&out).contains("cni.dev/valid-attachments"), "{out:?}");
    // A misspelled key is named in the error.
    let out = gc(
        &node,
        json!({"cni.dev/valid-attachment": [{"containerID": "gl0", "ifname": "eth0"}]}),
    );
    assert_eq!(out.error_code(), 7, "{out:?}");
    assert!(msg(&out).contains("cni.dev/valid-attachment\""), "{out:?}");
    // Two lists that disagree: nobody knows which the runtime meant.
    let out = gc(
        &node,
        json!({
            "cni.dev/valid-attachments": [{"containerID": "gl0", "ifname": "eth0"}],
            "cni.dev/attachments": [],
        }),
    );
    assert_eq!(out.error_code(), 7, "{out:?}");
    assert_eq!(
        (node.allocations(), node.pod_links(), node.pod_routes()),
        before,
        "a GC without a valid list changed the node"
    );

    // libcni also sends the spec's earlier name (containernetworking/cni#1101); it is the list.
    gc(
        &node,
        json!({"cni.dev/attachments": [{"containerID": "gl0", "ifname": "eth0"}]}),
    )
    .assert_ok();
    assert_eq!(node.allocations().len(), 1);
    assert_eq!(node.pod_links().len(), 1);
    assert_eq!(node.pod_routes().len(), 1);
    // An empty list is a list: nothing on this node is valid any more.
    gc(&node, json!({"cni.dev/valid-attachments": []})).assert_ok();
    assert!(node.allocations().is_empty());
    assert!(node.pod_links().is_empty());
}

#[test]
fn unsafe_subnets_are_refused_quickly_and_leave_nothing() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(None);
    let pod = Netns::new("us");
    let conf = node.conf("1.1.0", json!({}));
    for (network, subnet, why) in [
        ("169.254.0.0/16", "169.254.1.0/24", "link-local"),
        ("10.244.0.0/16", "169.254.1.0/24", "link-local"),
        ("127.0.0.0/8", "127.0.0.0/24", "loopback"),
        ("0.0.0.0/8", "0.0.0.0/24", "unspecified"),
        ("224.0.0.0/8", "224.0.1.0/24", "multicast"),
        ("0.0.0.0/0", "0.0.0.0/0", "/0"),
        ("10.244.0.0/16", "10.0.0.0/7", "/7"),
        ("0.0.0.0/0", "10.244.1.0/24", "/0"),
        ("10.244.0.0/16", "10.245.1.0/24", "outside"),
    ] {
        node.set_subnet_env(network, subnet);
        let out = add(&node, "us1", &pod.path(), &conf);
        assert_eq!(out.error_code(), 7, "{network} {subnet}: {out:?}");
        let m = msg(&out);
        assert!(m.contains(why), "{network} {subnet}: {m}");
        assert!(m.contains("SLUICE_"), "{network} {subnet}: {m}");
        assert!(node.allocations().is_empty(), "{network} {subnet}");
        assert!(node.pod_links().is_empty(), "{network} {subnet}");
        assert!(pod.links().iter().all(|l| l == "lo"), "{network} {subnet}");
    }
    // A large but safe subnet works, and its first address is the network's first host.
    node.set_subnet_env("10.0.0.0/8", "10.0.0.0/8");
    let r = add(&node, "us2", &pod.path(), &conf).assert_ok().json();
    assert_eq!(r["ips"][0]["address"], "10.0.0.1/32");
}

#[test]
fn a_netns_that_is_not_a_netns_is_refused_without_blocking() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.41.0/24"));
    let conf = node.conf("1.1.0", json!({}));
    let fifo = node.dir.path().join("netns-fifo");
    mkfifo(&fifo);
    let out = add(&node, "nf1", &fifo, &conf);
    assert_eq!(out.error_code(), 3, "{out:?}");
    assert!(msg(&out).contains("not a network namespace"), "{out:?}");
    let plain = node.dir.path().join("netns-file");
    std::fs::write(&plain, b"").unwrap();
    let out = add(&node, "nf2", &plain, &conf);
    assert_eq!(out.error_code(), 3, "{out:?}");
    assert!(msg(&out).contains("not a network namespace"), "{out:?}");
    // CHECK opens the netns too.
    let fifo_path = fifo.display().to_string();
    let out = node.call_raw_with(
        &[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "nf1"),
            ("CNI_NETNS", &fifo_path),
            ("CNI_IFNAME", "eth0"),
        ],
        conf.to_string().as_bytes(),
        Limits::deadline(PROMPT),
    );
    assert_eq!(out.error_code(), 3, "{out:?}");
    assert!(node.allocations().is_empty());
    assert!(node.pod_links().is_empty());
}

#[test]
fn a_subnet_file_that_never_ends_is_refused() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(None);
    let pod = Netns::new("sf");
    let fifo = node.dir.path().join("subnet-fifo");
    mkfifo(&fifo);
    let big = node.dir.path().join("subnet-big");
    // A valid file padded to 1 MiB with comments: well past any subnet.env the agent writes.
    let mut text =
        "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.42.0/24\nSLUICE_MTU=1450\n".to_string();
    while text.len() < 1 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, text).unwrap();
    for (file, why) in [
        (fifo.as_path(), "not a regular file"),
        (Path::new("/dev/zero"), "not a regular file"),
        (big.as_path(), "larger than"),
    ] {
        let conf = node.conf("1.1.0", json!({ "subnetFile": file }));
        let out = add(&node, "sf1", &pod.path(), &conf);
        assert_eq!(out.error_code(), 5, "{}: {out:?}", file.display());
        assert!(msg(&out).contains(why), "{}: {out:?}", file.display());
        assert!(msg(&out).contains(&file.display().to_string()), "{out:?}");
        assert!(node.allocations().is_empty());
        // STATUS reads the same file: not available, and it says why.
        let out = node.call_raw_with(
            &[("CNI_COMMAND", "STATUS")],
            conf.to_string().as_bytes(),
            Limits::deadline(PROMPT),
        );
        assert_eq!(out.error_code(), 50, "{out:?}");
        assert!(msg(&out).contains(why), "{out:?}");
    }
    assert!(node.pod_links().is_empty());
}

#[test]
fn ipam_files_that_never_end_do_not_block_the_node() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.43.0/24"));
    let conf = node.conf("1.1.0", json!({}));
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("if")).collect();
    add(&node, "if0", &pods[0].path(), &conf).assert_ok();
    let ipam = node.ipam_dir();
    let state = ipam.join("allocations.json");
    let saved = std::fs::read(&state).unwrap();

    // The allocations file is a FIFO: the call fails at once, naming it, and keeps no lock.
    mkfifo(&state);
    let out = add(&node, "if1", &pods[1].path(), &conf);
    assert_eq!(out.error_code(), 5, "{out:?}");
    assert!(msg(&out).contains("not a regular file"), "{out:?}");
    assert!(msg(&out).contains("allocations.json"), "{out:?}");
    assert!(pods[1].links().iter().all(|l| l == "lo"));
    std::fs::remove_file(&state).unwrap();
    std::fs::write(&state, &saved).unwrap();

    // A FIFO where the state's temporary copy goes is replaced, not written through.
    mkfifo(&ipam.join(".allocations.json.tmp"));
    add(&node, "if1", &pods[1].path(), &conf).assert_ok();
    assert_eq!(node.allocations().len(), 2);

    // The lock file is a FIFO: refused at once.
    let lock = ipam.join("lock");
    std::fs::remove_file(&lock).unwrap();
    mkfifo(&lock);
    let out = add(&node, "if2", &pods[2].path(), &conf);
    assert_eq!(out.error_code(), 5, "{out:?}");
    assert!(msg(&out).contains("not a regular file"), "{out:?}");
    std::fs::remove_file(&lock).unwrap();
    add(&node, "if2", &pods[2].path(), &conf).assert_ok();
    assert_eq!(node.allocations().len(), 3);
    assert_eq!(node.pod_links().len(), 3);
}

#[test]
fn a_held_ipam_lock_is_waited_for_a_bounded_time() {
    if !have_root() {
        return;
    }
    let node = CniNode::new(Some("10.244.44.0/24"));
    let conf = node.conf("1.1.0", json!({}));
    let pod = Netns::new("lk");
    std::fs::create_dir_all(node.ipam_dir()).unwrap();
    // Another call that never lets go (a hung plugin, a stuck NFS): this test holds the lock.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(node.ipam_dir().join("lock"))
        .unwrap();
    let held = Flock::lock(file, FlockArg::LockExclusive).unwrap();
    let out = add_within(&node, "lk1", &pod.path(), &conf, Duration::from_secs(40));
    assert_eq!(out.error_code(), 11, "{out:?}");
    assert!(msg(&out).contains("lock"), "{out:?}");
    assert!(msg(&out).contains("try again"), "{out:?}");
    assert!(pod.links().iter().all(|l| l == "lo"));
    drop(held);
    add(&node, "lk1", &pod.path(), &conf).assert_ok();
    assert_eq!(node.allocations().len(), 1);
}
