//! `sluice lab status`: the lab's nodes and pods, and which pod reaches which, from real pings
//! sent inside the pods' namespaces.

use super::plan::LabPlan;
use super::supervisor::{self, SupervisorInfo};
use super::{cluster, daemon, node_subnets, LabFiles};
use anyhow::{bail, Context, Result};
use serde_json::json;
use sluice_net::netns;
use std::net::{IpAddr, Ipv6Addr};
use std::process::{Command, Stdio};

/// A pod's global IPv6 address on its `eth0` (a dual-stack lab's pods have one beside the
/// IPv4 one), read inside its namespace with `ip -j`.
pub fn pod_ipv6(netns_name: &str) -> Option<Ipv6Addr> {
    let path = netns::named_path(netns_name);
    let file = netns::open(&path).ok()?;
    let mut cmd = Command::new("ip");
    cmd.args(["-j", "-6", "addr", "show", "dev", "eth0", "scope", "global"])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let out = netns::run_in(&file, &path, || cmd.output()).ok()?.ok()?;
    first_global_v6(&String::from_utf8_lossy(&out.stdout))
}

/// The first IPv6 address in `ip -j -6 addr` output.
fn first_global_v6(json_text: &str) -> Option<Ipv6Addr> {
    let v: serde_json::Value = serde_json::from_str(json_text).ok()?;
    v.as_array()?
        .iter()
        .flat_map(|link| link["addr_info"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["family"] == "inet6" && a["scope"] == "global")
        .find_map(|a| a["local"].as_str()?.parse().ok())
}

/// One ping from inside `netns` to `to`; true on an answer within a second.
fn ping(netns_name: &str, to: IpAddr) -> bool {
    let path = netns::named_path(netns_name);
    let Ok(file) = netns::open(&path) else {
        return false;
    };
    let mut cmd = Command::new("ping");
    cmd.args(["-c", "1", "-W", "1", "-q", &to.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match netns::run_in(&file, &path, || cmd.spawn()) {
        Ok(Ok(mut child)) => child.wait().is_ok_and(|s| s.success()),
        _ => false,
    }
}

/// The reachability matrix: `m[i][j]` is whether pod i reached pod j. Pings run in parallel,
/// bounded by `WORKERS` threads; each is bounded by ping's own one-second wait.
fn matrix(sources: &[String], targets: &[IpAddr]) -> Vec<Vec<bool>> {
    const WORKERS: usize = 16;
    let pairs: Vec<(usize, usize)> = (0..sources.len())
        .flat_map(|i| (0..targets.len()).map(move |j| (i, j)))
        .collect();
    let mut m = vec![vec![false; targets.len()]; sources.len()];
    for chunk in pairs.chunks(WORKERS) {
        let results: Vec<((usize, usize), bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|&(i, j)| {
                    let src = &sources[i];
                    let dst = targets[j];
                    ((i, j), s.spawn(move || ping(src, dst)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(ij, h)| (ij, h.join().unwrap_or(false)))
                .collect()
        });
        for ((i, j), ok) in results {
            m[i][j] = ok;
        }
    }
    m
}

/// The daemon's state in a line, e.g. "daemon pid 7, running; supervisor pid 6, 1 restart
/// (last: killed by signal 9)".
fn daemon_line(
    info: &daemon::DaemonInfo,
    running: bool,
    sup: Option<&SupervisorInfo>,
    sup_running: bool,
) -> String {
    let mut line = format!(
        "daemon pid {}, {}",
        info.pid,
        if running { "running" } else { "NOT RUNNING" }
    );
    match sup {
        Some(s) => {
            line += &format!(
                "; supervisor pid {}, {}",
                s.pid,
                if s.gave_up {
                    "gave up".to_string()
                } else if sup_running {
                    "running".to_string()
                } else {
                    "NOT RUNNING".to_string()
                }
            );
            if s.restarts > 0 || s.last_exit.is_some() {
                line += &format!(
                    ", {} restart{}",
                    s.restarts,
                    if s.restarts == 1 { "" } else { "s" }
                );
                if let Some(e) = &s.last_exit {
                    line += &format!(" (last: {e})");
                }
            }
        }
        None => line += "; no supervisor",
    }
    line
}

/// The daemon's pid once it runs: at once, or after its supervisor restarted it (bounded wait).
async fn wait_for_daemon(name: &str, files: &LabFiles) -> Option<u32> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some(pid) = supervisor::daemon_running(name, files) {
            return Some(pid);
        }
        let restarting = supervisor::supervisor_running(name, files).is_some()
            && supervisor::read_info(files).is_some_and(|s| !s.gave_up);
        if !restarting || std::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

pub async fn run(name: &str, as_json: bool) -> Result<()> {
    super::require_root()?;
    let files = LabFiles::new(name);
    let plan: LabPlan = match std::fs::read(&files.plan) {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(_) => bail!("no lab named {name} (no {:?})", files.plan),
    };
    let running = wait_for_daemon(name, &files).await.is_some();
    let info = daemon::read_info(&files.daemon)
        .with_context(|| format!("lab {name} has no running API (no {:?})", files.daemon))?;
    let sup = supervisor::read_info(&files);
    let sup_running = supervisor::supervisor_running(name, &files).is_some();
    let state = daemon_line(&info, running, sup.as_ref(), sup_running);
    if !running {
        bail!(
            "lab {name}: {state}. Its API at {} is down: the agents keep forwarding, but cannot renew their subnet leases. `sluice lab up --name {name}` resumes the lab from its saved state (log: {:?})",
            info.api,
            files.daemon_log
        );
    }
    let client = cluster::client(&files.kubeconfig).await?;
    let pods = cluster::running_pods(&client, &plan).await?;
    let node_names: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    let agent_subnets = plan
        .nodes
        .iter()
        .filter_map(|n| Some((n.name.clone(), subnet_of(name, &n.name)?)))
        .collect();
    let subnets = node_subnets::node_subnets(
        &node_names,
        &node_subnets::leases(&client).await?,
        &node_subnets::pod_cidrs(&client).await?,
        &agent_subnets,
    );
    // On real nodes the pods' namespaces are containerd's, and the DaemonSet runs the agents.
    let real = super::k8s::real_nodes(name);
    let agents = if real {
        daemonset_pods(&client).await?
    } else {
        Vec::new()
    };
    let sources: Vec<String> = pods
        .iter()
        .map(|(ns, pod, _, _)| plan.pod_netns(ns, pod))
        .collect();
    let targets: Vec<IpAddr> = pods.iter().map(|p| p.3).collect();
    // A dual-stack lab's pods: their IPv6 addresses, and a second matrix over them. Real
    // pods' as their kubelets report them (`status.podIPs`, from the CNI result).
    let ipv6: Vec<Option<Ipv6Addr>> = if real {
        let reported = pod_ipv6s(&client).await?;
        pods.iter()
            .map(|(ns, pod, _, _)| reported.get(&(ns.clone(), pod.clone())).copied())
            .collect()
    } else {
        sources.iter().map(|s| pod_ipv6(s)).collect()
    };
    let targets6: Vec<IpAddr> = ipv6.iter().flatten().map(|a| (*a).into()).collect();
    // An IPv6-only lab's pods have only their IPv6 address: the first matrix is over it.
    let dual =
        !targets6.is_empty() && targets6.len() == pods.len() && targets.iter().any(IpAddr::is_ipv4);
    let sources6 = sources.clone();
    let (m, m6) = if real {
        (Vec::new(), Vec::new())
    } else {
        tokio::task::spawn_blocking(move || {
            let m6 = if dual {
                matrix(&sources6, &targets6)
            } else {
                Vec::new()
            };
            (matrix(&sources, &targets), m6)
        })
        .await?
    };
    let scheme = if files.external.exists() {
        ""
    } else {
        "https://"
    };
    if as_json {
        let out = json!({
            "name": name,
            "api": info.api.to_string(),
            "daemon": {"pid": info.pid, "running": running, "supervisor": sup.as_ref().map(|s| json!({
                "pid": s.pid, "running": sup_running, "restarts": s.restarts,
                "lastExit": s.last_exit, "gaveUp": s.gave_up,
            }))},
            "nodes": plan.nodes.iter().zip(&subnets).map(|(n, s)| json!({
                // The tunnels' underlay (the Node's InternalIP), and the node's IPv6 on its link.
                "name": n.name, "netns": n.netns, "underlay": primary_underlay(n, &plan).to_string(),
                "underlayV6": n.underlay_v6.map(|a| a.addr().to_string()),
                "podCIDR": s.pod_cidr.as_deref().and_then(|c| c.split(',').next())
                    .map_or_else(|| n.pod_cidr.to_string(), str::to_string),
                "podCIDRs": s.pod_cidr.as_deref().map(|c| c.split(',').collect::<Vec<_>>()),
                "subnet": s.subnet,
                "agentSubnet": s.agent_subnet,
                "leases": s.leases,
            })).collect::<Vec<_>>(),
            "pods": pods.iter().enumerate().map(|(i, (ns, pod, node, ip))| json!({
                "namespace": ns, "name": pod, "node": node, "ip": ip.to_string(),
                "ipv6": ipv6.get(i).copied().flatten().map(|a| a.to_string()),
            })).collect::<Vec<_>>(),
            "reachability": if real { serde_json::Value::Null } else { json!(m) },
            "reachabilityIpv6": if dual { json!(m6) } else { serde_json::Value::Null },
            "agents": agents.iter().map(|(node, pod, ready)| json!({
                "node": node, "pod": pod, "ready": ready,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("lab {name}: API {scheme}{} ({state})", info.api);
    println!("\n{:<16} {:<22} {:<16} SUBNET", "NODE", "NETNS", "UNDERLAY");
    for (n, s) in plan.nodes.iter().zip(&subnets) {
        println!(
            "{:<16} {:<22} {:<16} {}",
            n.name,
            n.netns,
            primary_underlay(n, &plan),
            s.cell()
        );
    }
    println!("\n{:>3}  {:<28} {:<16} IP", "#", "POD", "NODE");
    for (i, (ns, pod, node, ip)) in pods.iter().enumerate() {
        let v6 = ipv6
            .get(i)
            .copied()
            .flatten()
            // An IPv6-only pod's IP is its IPv6 address already.
            .filter(|a| IpAddr::V6(*a) != *ip)
            .map(|a| format!(" {a}"))
            .unwrap_or_default();
        println!(
            "{:>3}  {:<28} {:<16} {ip}{v6}",
            i + 1,
            format!("{ns}/{pod}"),
            node
        );
    }
    if real {
        println!(
            "\nagents: the DaemonSet {}/{} (installed from the manifest)",
            super::k8s::DAEMONSET_NAMESPACE,
            super::k8s::DAEMONSET
        );
        for n in &plan.nodes {
            let (pod, ready) = agents
                .iter()
                .find(|(node, _, _)| *node == n.name)
                .map_or(("none", false), |(_, p, r)| (p.as_str(), *r));
            let state = if ready { "ready" } else { "not ready" };
            println!("  {:<16} {pod} ({state})", n.name);
        }
        println!("\nreachability: not measured here on real pods (their namespaces are containerd's): use kubectl exec");
        return Ok(());
    }
    print_matrix("reachability", &m);
    if dual {
        print_matrix("IPv6 reachability", &m6);
    }
    Ok(())
}

fn print_matrix(title: &str, m: &[Vec<bool>]) {
    let reached: usize = m.iter().flatten().filter(|&&b| b).count();
    println!(
        "\n{title} (ping from row to column; o = answered, . = no answer): {reached}/{} pairs",
        m.len() * m.len()
    );
    print!("{:>5}", "");
    for j in 0..m.len() {
        print!("{:>3}", j + 1);
    }
    println!();
    for (i, row) in m.iter().enumerate() {
        print!("{:>5}", i + 1);
        for &ok in row {
            print!("{:>3}", if ok { "o" } else { "." });
        }
        println!();
    }
}

/// The subnet the node's agent holds, from the file it writes for the CNI plugin.
fn subnet_of(lab: &str, node: &str) -> Option<String> {
    sluice_net::subnet_env::SubnetEnv::load(&super::cni::subnet_file(lab, node))
        .ok()
        .and_then(|e| e.first_subnet())
        .map(|s| s.to_string())
}

/// The IPv6 address in a pod's `status.podIPs` (a dual-stack pod's second one).
fn ipv6_of(pod_ips: &[k8s_openapi::api::core::v1::PodIP]) -> Option<Ipv6Addr> {
    pod_ips
        .iter()
        .filter_map(|p| p.ip.parse::<IpAddr>().ok())
        .find_map(|ip| match ip {
            IpAddr::V6(v6) => Some(v6),
            IpAddr::V4(_) => None,
        })
}

/// Every pod's IPv6 address as the API has it, by (namespace, name).
async fn pod_ipv6s(
    client: &kube::Client,
) -> Result<std::collections::BTreeMap<(String, String), Ipv6Addr>> {
    use k8s_openapi::api::core::v1::Pod;
    let api: kube::Api<Pod> = kube::Api::all(client.clone());
    let list = api
        .list(&kube::api::ListParams::default())
        .await
        .context("listing pods")?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|p| {
            let v6 = ipv6_of(p.status.as_ref()?.pod_ips.as_deref()?)?;
            Some(((p.metadata.namespace?, p.metadata.name?), v6))
        })
        .collect())
}

/// The DaemonSet's pods: (node, pod, ready).
async fn daemonset_pods(client: &kube::Client) -> Result<Vec<(String, String, bool)>> {
    use k8s_openapi::api::core::v1::Pod;
    let api: kube::Api<Pod> =
        kube::Api::namespaced(client.clone(), super::k8s::DAEMONSET_NAMESPACE);
    let list = api
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/name=sluice"))
        .await
        .context("listing sluice's DaemonSet pods")?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            Some((node, p.metadata.name?, ready))
        })
        .collect())
}

/// The node's tunnel underlay address: its (first) InternalIP.
fn primary_underlay(n: &super::plan::NodePlan, plan: &LabPlan) -> std::net::IpAddr {
    n.internal_ips(plan.spec.underlay)
        .first()
        .copied()
        .unwrap_or(n.underlay.addr().into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pods_global_ipv6_address_is_read_from_ip_json() {
        let out = r#"[{"ifindex":2,"ifname":"eth0","addr_info":[
            {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"},
            {"family":"inet6","local":"fd00:10:244:1::5","prefixlen":128,"scope":"global"}]}]"#;
        assert_eq!(
            super::first_global_v6(out),
            Some("fd00:10:244:1::5".parse().unwrap())
        );
        assert_eq!(super::first_global_v6("[]"), None);
        assert_eq!(super::first_global_v6("not json"), None);
    }

    #[test]
    fn a_real_pods_ipv6_address_is_the_ipv6_one_of_its_pod_ips() {
        use k8s_openapi::api::core::v1::PodIP;
        let ips =
            |a: &[&str]| -> Vec<PodIP> { a.iter().map(|s| PodIP { ip: s.to_string() }).collect() };
        assert_eq!(
            super::ipv6_of(&ips(&["10.244.1.3", "fd00:10:244:1::3"])),
            Some("fd00:10:244:1::3".parse().unwrap())
        );
        assert_eq!(super::ipv6_of(&ips(&["10.244.1.3"])), None);
        assert_eq!(super::ipv6_of(&ips(&["nonsense", "10.244.1.3"])), None);
        assert_eq!(super::ipv6_of(&[]), None);
    }
}
