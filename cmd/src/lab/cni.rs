//! Calls the real `sluice-cni` for a lab pod exactly as a container runtime does: by that name,
//! from the node's network namespace, with the CNI environment and the network config on stdin.

use super::plan::{state_dir, LabPlan, NodePlan};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use sluice_net::netns;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The CNI config file a lab node's runtime reads (DESIGN.md's name, in the node's own dir).
pub const CONFLIST: &str = crate::install::CONFLIST_NAME;

pub fn node_dir(lab: &str, node: &str) -> PathBuf {
    state_dir(lab).join("nodes").join(node)
}

/// The subnet file the node's agent writes and its CNI plugin reads.
pub fn subnet_file(lab: &str, node: &str) -> PathBuf {
    if super::k8s::real_nodes(lab) {
        // The agent runs in the node's mount namespace with the DaemonSet's paths.
        return super::k8s_plan::NodeLayout::new(lab, node).private("/run/sluice/subnet.env");
    }
    node_dir(lab, node).join("subnet.env")
}

pub fn bin_dir(lab: &str) -> PathBuf {
    state_dir(lab).join("bin")
}

/// Makes the node's CNI directory and the plugin link (`bin/sluice-cni` -> this executable), as
/// `sluice install-cni` does on a real node. The subnet file and the CNI config are the node's
/// agent's to write, once its network is up.
pub fn install(plan: &LabPlan, node: &NodePlan) -> Result<()> {
    let lab = &plan.spec.name;
    let dir = node_dir(lab, &node.name);
    std::fs::create_dir_all(dir.join("ipam")).with_context(|| format!("creating {dir:?}"))?;
    let bin = bin_dir(lab);
    std::fs::create_dir_all(&bin)?;
    let link = bin.join("sluice-cni");
    if !link.exists() {
        let exe = std::env::current_exe().context("finding the sluice executable")?;
        std::os::unix::fs::symlink(exe, &link).with_context(|| format!("linking {link:?}"))?;
    }
    Ok(())
}

pub struct Attachment<'a> {
    pub lab: &'a str,
    pub node: &'a NodePlan,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
}

/// Runs one CNI command; the parsed result (ADD) or Null, or the plugin's error.
pub fn call(command: &str, a: &Attachment<'_>) -> Result<Value> {
    let dir = node_dir(a.lab, &a.node.name);
    let list: Value = serde_json::from_slice(&std::fs::read(dir.join(CONFLIST))?)?;
    let mut conf = list["plugins"][0].clone();
    conf["cniVersion"] = runtime_version(&list).into();
    conf["name"] = list["name"].clone();
    let node_ns = netns::named_path(&a.node.netns);
    let node_file = netns::open(&node_ns)?;
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
        a.pod_namespace, a.pod_name, a.container_id, a.pod_uid
    );
    let mut cmd = Command::new(bin_dir(a.lab).join("sluice-cni"));
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", a.container_id)
        .env("CNI_NETNS", a.netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", bin_dir(a.lab))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The child is forked from a thread inside the node's namespace, so it starts there.
    let mut child =
        netns::run_in(&node_file, &node_ns, || cmd.spawn())?.context("starting sluice-cni")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&serde_json::to_vec(&conf)?)?;
    }
    let out = child.wait_with_output()?;
    let stdout: Value = if out.stdout.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow!(
                "sluice-cni {command} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?
    };
    if !out.status.success() {
        bail!(
            "sluice-cni {command} for {}/{} failed (code {}): {} {}",
            a.pod_namespace,
            a.pod_name,
            stdout["code"],
            stdout["msg"].as_str().unwrap_or(""),
            stdout["details"].as_str().unwrap_or("")
        );
    }
    Ok(stdout)
}

/// The CNI version the lab's runtime runs a conflist at: as libcni 1.2 does, the highest of
/// `cniVersions` it supports (up to 1.1.0), else `cniVersion`.
pub fn runtime_version(list: &Value) -> String {
    let supported = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
    list["cniVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|v| supported.contains(v))
        .max_by_key(|v| supported.iter().position(|s| s == v))
        .or_else(|| list["cniVersion"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// Whether the node's agent has put the CNI config in place (the runtime's NetworkReady).
pub fn network_ready(lab: &str, node: &str) -> bool {
    if super::k8s::real_nodes(lab) {
        return super::k8s_plan::NodeLayout::new(lab, node)
            .private("/etc/cni/net.d")
            .join(CONFLIST)
            .exists();
    }
    node_dir(lab, node).join(CONFLIST).exists()
}

/// The IPv6 address of an ADD result, when the pod got one (a dual-stack or IPv6-only node).
pub fn address6_of(result: &Value) -> Option<std::net::Ipv6Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let net: ipnet::Ipv6Net = ip["address"].as_str()?.parse().ok()?;
        Some(net.addr())
    })
}

/// The IPv4 address of an ADD result, when the pod got one (not on an IPv6-only node).
pub fn address_of(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let net: ipnet::Ipv4Net = ip["address"].as_str()?.parse().ok()?;
        Some(net.addr())
    })
}
