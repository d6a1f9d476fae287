//! The embedded lab's API as a user meets it: HTTPS for the kubeconfig's certificate only; a
//! daemon that is brought back when it dies, with the lab's agents, pods and leases kept; `lab
//! status` that shows the subnet each node really uses; Nodes that describe like a kubelet's; and
//! `kubectl logs` / `exec` / `create deployment` that answer as the lab can.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use sluice_e2e::have_root;
use sluice_e2e::lab::{lab_cmd, netns_with_prefix, output_text, Lab};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

fn json_of(lab: &Lab, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    serde_json::from_str(&lab.kubectl_ok(&all)).unwrap()
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// sluice's subnet leases, from wherever they are: (holder, subnet, namespace, name).
fn leases(lab: &Lab) -> Vec<(String, String, String, String)> {
    let list = json_of(lab, &["get", "leases", "-A"]);
    let mut out: Vec<_> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| {
            l["metadata"]["labels"]["sluice.dev/subnet-lease"].is_string()
                || l["metadata"]["annotations"]["sluice.dev/node"].is_string()
        })
        .map(|l| {
            (
                l["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                l["metadata"]["annotations"]["sluice.dev/subnet"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
                l["metadata"]["namespace"].as_str().unwrap().to_string(),
                l["metadata"]["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn all_reach(status: &Value) -> bool {
    status["reachability"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r.as_array().unwrap().iter().all(|v| v == true))
}

fn status_text(lab: &Lab) -> String {
    let out = lab_cmd(&["status", "--name", &lab.name], 120);
    assert!(out.status.success(), "lab status: {}", output_text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pids_in(netns: &str, program_args: &[&str]) -> Vec<u32> {
    let inode = std::fs::metadata(format!("/run/netns/{netns}")).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.ino()
    });
    let Ok(inode) = inode else {
        return Vec::new();
    };
    let mut needle = program_args.join("\0").into_bytes();
    needle.push(0);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(|m| m.ino() == inode)
                && std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.windows(needle.len()).any(|w| w == needle.as_slice()))
        })
        .collect()
}

#[test]
fn the_api_is_https_for_the_kubeconfigs_certificate_only() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "1", "--pods-per-node", "0"]);
    let kc = lab.kubeconfig();
    assert_eq!(mode(&kc), 0o600, "the kubeconfig holds a private key");
    let state = kc.with_file_name("api-state.json");
    assert_eq!(mode(&state), 0o600, "the state file holds every object");
    let config = std::fs::read_to_string(&kc).unwrap();
    let server = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .unwrap()
        .trim_matches('"')
        .to_string();
    assert!(server.starts_with("https://127.0.0.1:"), "{server}");
    // kubectl with the lab's kubeconfig; the node's agent (same kubeconfig, in its namespace)
    // holds its lease.
    lab.kubectl_ok(&["get", "configmap", "-n", "kube-system", "sluice-config"]);
    assert_eq!(leases(&lab).len(), 1, "{:?}", leases(&lab));
    // Without the certificate: 401, whoever asks; plain HTTP gets no API at all.
    let dir = tempfile::tempdir().unwrap();
    let stripped: String = config
        .lines()
        .filter(|l| !l.contains("client-certificate-data") && !l.contains("client-key-data"))
        .map(|l| {
            if l.trim() == "user:" {
                format!("{l} {{token: guessed}}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let anon = dir.path().join("anon");
    std::fs::write(&anon, stripped).unwrap();
    let kubectl = |config: &std::path::Path, extra: &[&str]| {
        sluice_e2e::run(
            Command::new("timeout")
                .args(["-k", "2", "30", "kubectl", "--kubeconfig"])
                .arg(config)
                .args(extra)
                .args(["delete", "configmap", "-n", "kube-system", "sluice-config"]),
        )
    };
    let out = kubectl(&anon, &[]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("Unauthorized"),
        "{}",
        output_text(&out)
    );
    let out = kubectl(
        &anon,
        &[
            "--server",
            &server.replace("https://", "http://"),
            "--insecure-skip-tls-verify",
        ],
    );
    assert!(!out.status.success(), "{}", output_text(&out));
    lab.kubectl_ok(&["get", "configmap", "-n", "kube-system", "sluice-config"]);
}

#[test]
fn a_killed_daemon_is_restarted_and_the_lab_carries_on() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "2", "--pods-per-node", "1"]);
    let before = lab.status();
    let pods_before = before["pods"].clone();
    let daemon = before["daemon"]["pid"].as_i64().unwrap() as i32;
    let agents: Vec<Vec<u32>> = (1..=2)
        .map(|i| {
            pids_in(
                &lab.node_netns(&format!("{}-node-{i}", lab.name)),
                &["agent", "--node-name"],
            )
        })
        .collect();
    assert!(agents.iter().all(|a| a.len() == 1), "{agents:?}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let killed_at = jiff::Timestamp::now();
    // `lab status` waits for the supervisor's restart.
    let after = lab.status();
    assert_eq!(after["daemon"]["running"], true, "{after:#}");
    assert_ne!(after["daemon"]["pid"], before["daemon"]["pid"]);
    assert_eq!(after["daemon"]["supervisor"]["restarts"], 1, "{after:#}");
    assert_eq!(
        after["daemon"]["supervisor"]["lastExit"],
        "killed by signal 9"
    );
    // Same pods at the same addresses, the same agents (none started twice), everyone reachable.
    assert_eq!(after["pods"], pods_before);
    let agents_after: Vec<Vec<u32>> = (1..=2)
        .map(|i| {
            pids_in(
                &lab.node_netns(&format!("{}-node-{i}", lab.name)),
                &["agent", "--node-name"],
            )
        })
        .collect();
    assert_eq!(agents_after, agents);
    assert!(all_reach(&after), "{after:#}");
    // The agents renew their leases through the new daemon.
    let renewed = sluice_e2e::eventually(Duration::from_secs(40), || {
        let list = json_of(&lab, &["get", "leases", "-A"]);
        let times: Vec<jiff::Timestamp> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["metadata"]["annotations"]["sluice.dev/node"].is_string())
            .filter_map(|l| l["spec"]["renewTime"].as_str()?.parse().ok())
            .collect();
        times.len() == 2 && times.iter().all(|t| *t > killed_at)
    });
    assert!(
        renewed,
        "leases not renewed after the restart: {:#}",
        json_of(&lab, &["get", "leases", "-A"])
    );
    lab.kubectl_ok(&[
        "label",
        "node",
        &format!("{}-node-1", lab.name),
        "after=restart",
    ]);

    // Daemon and supervisor both gone: status says so and how to resume; `up` resumes.
    let sup = after["daemon"]["supervisor"]["pid"].as_i64().unwrap() as i32;
    let daemon = after["daemon"]["pid"].as_i64().unwrap() as i32;
    for pid in [sup, daemon] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(sluice_e2e::wait_until(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{daemon}/cmdline")).exists()
            || std::fs::read(format!("/proc/{daemon}/cmdline")).is_ok_and(|c| c.is_empty())
    }));
    let out = lab_cmd(&["status", "--name", &lab.name], 60);
    assert!(!out.status.success());
    let said = output_text(&out);
    assert!(
        said.contains("NOT RUNNING")
            && said.contains(&format!("sluice lab up --name {}", lab.name)),
        "{said}"
    );
    let out = lab_cmd(&["up", "--name", &lab.name], 60);
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        output_text(&out).contains("resumed"),
        "{}",
        output_text(&out)
    );
    let resumed = lab.status();
    assert_eq!(resumed["pods"], pods_before);
    assert!(all_reach(&resumed), "{resumed:#}");
    let labels = json_of(&lab, &["get", "node", &format!("{}-node-1", lab.name)]);
    assert_eq!(
        labels["metadata"]["labels"]["after"], "restart",
        "state kept"
    );
    // A lab that runs is not resumed twice.
    let again = lab_cmd(&["up", "--name", &lab.name], 60);
    assert!(!again.status.success());
    assert!(
        output_text(&again).contains("already exists and is running"),
        "{}",
        output_text(&again)
    );

    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(netns_with_prefix(&lab.prefix()).is_empty());
    let daemon_args = format!("__daemon\0--name\0{}\0", lab.name);
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&daemon_args))
        });
    assert!(!left, "the lab daemon or its supervisor still runs");
}

/// Each node's row shows the subnet its agent leased; where that is not its Node's podCIDR
/// (with `subnet-source: lease` another holder had the podCIDR, so the agent leased the next free
/// subnet), both.
#[test]
fn status_shows_the_subnet_each_node_leased() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&[
        "--nodes",
        "2",
        "--pods-per-node",
        "0",
        "--subnet-source",
        "lease",
    ]);
    let node1 = format!("{}-node-1", lab.name);
    let first = leases(&lab);
    let (_, subnet1, lease_ns, lease1) = first.iter().find(|l| l.0 == node1).unwrap().clone();
    // node-1's agent stops; someone else holds its subnet; it comes back and leases another.
    lab_cmd(&["agent", "--name", &lab.name, "stop", &node1], 30);
    lab.kubectl_ok(&["delete", "lease", "-n", &lease_ns, &lease1]);
    let squatter = json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": lease1, "namespace": lease_ns,
            "labels": {"sluice.dev/subnet-lease": "true"},
            "annotations": {"sluice.dev/node": "elsewhere", "sluice.dev/subnet": subnet1}},
        "spec": {"holderIdentity": "elsewhere", "leaseDurationSeconds": 3600,
            "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("squatter.json");
    std::fs::write(&file, squatter.to_string()).unwrap();
    lab.kubectl_ok(&["create", "-f", file.to_str().unwrap()]);
    lab_cmd(&["agent", "--name", &lab.name, "start", &node1], 30);
    let moved = sluice_e2e::eventually(Duration::from_secs(40), || {
        leases(&lab).iter().any(|l| l.0 == node1 && l.1 != subnet1)
    });
    assert!(moved, "node-1 leased nothing new: {:?}", leases(&lab));

    let status = lab.status();
    let now = leases(&lab);
    let nodes = status["nodes"].as_array().unwrap();
    let table = status_text(&lab);
    for n in nodes {
        let name = n["name"].as_str().unwrap();
        let held: Vec<&String> = now.iter().filter(|l| l.0 == name).map(|l| &l.1).collect();
        assert_eq!(held.len(), 1, "{name}: {now:?}");
        assert_eq!(n["subnet"].as_str(), Some(held[0].as_str()), "{n:#}");
        assert_eq!(n["agentSubnet"].as_str(), Some(held[0].as_str()), "{n:#}");
        assert_eq!(
            n["leases"][0]["subnet"].as_str(),
            Some(held[0].as_str()),
            "{n:#}"
        );
        let row = table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {table}"));
        assert!(row.contains(held[0].as_str()), "{row}");
        let pod_cidr = n["podCIDR"].as_str().unwrap();
        if pod_cidr != held[0] {
            assert!(row.contains(&format!("(spec.podCIDR {pod_cidr})")), "{row}");
        }
    }
    let n1 = nodes.iter().find(|n| n["name"] == node1.as_str()).unwrap();
    assert_ne!(
        n1["subnet"], n1["podCIDR"],
        "the case this test is about: {n1:#}"
    );
}

#[test]
fn nodes_describe_like_a_kubelets_and_kubectl_verbs_answer() {
    if !have_root() {
        return;
    }
    let lab = Lab::up(&["--nodes", "1", "--pods-per-node", "1"]);
    let node = format!("{}-node-1", lab.name);
    let described = lab.kubectl_ok(&["describe", "node", &node]);
    assert!(!described.contains("-9223372036854775808"), "{described}");
    let cpus = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    for want in [
        format!("cpu:                {cpus}"),
        "pods:               110".to_string(),
        format!("Kernel Version:             {}", kernel.trim()),
        "Container Runtime Version:  sluice-lab://".to_string(),
        "Operating System:           linux".to_string(),
        "cpu                0 (0%)".to_string(),
        "memory             0 (0%)".to_string(),
    ] {
        assert!(described.contains(&want), "no {want:?} in:\n{described}");
    }
    let n = json_of(&lab, &["get", "node", &node]);
    let mem = n["status"]["capacity"]["memory"].as_str().unwrap();
    let ki: u64 = mem.trim_end_matches("Ki").parse().unwrap();
    assert!(ki > 100 * 1024, "{mem}");
    assert!(
        n["status"]["allocatable"]["ephemeral-storage"].is_string(),
        "{n:#}"
    );

    // logs: the pod's server says what it serves and whom it answered.
    let pod = format!("{}/pod-1-1", lab.name);
    let out = lab_cmd(&["probe", "--name", &lab.name, &pod, &pod, "80"], 30);
    assert!(out.status.success(), "{}", output_text(&out));
    let logs = lab.kubectl_ok(&["logs", "-n", &lab.name, "pod-1-1"]);
    assert!(logs.contains(&format!("{pod}: serving Tcp/80")), "{logs}");
    assert!(logs.contains("tcp/80: answered "), "{logs}");
    // exec and create deployment: what the lab serves, and where to go instead.
    let out = lab.kubectl(&["exec", "-n", &lab.name, "pod-1-1", "--", "ip", "addr"]);
    assert!(!out.status.success());
    assert!(
        output_text(&out).contains("sluice lab exec"),
        "{}",
        output_text(&out)
    );
    let out = lab.kubectl(&["create", "deployment", "web", "--image=sluice-lab"]);
    assert!(!out.status.success());
    let said = output_text(&out);
    assert!(
        said.contains("deployments.apps is not served") && said.contains("lab up --kubernetes"),
        "{said}"
    );
}
