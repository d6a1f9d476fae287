//! The lab's long-running process: the embedded API server (or, against a real API server, a
//! forwarder to it) reachable at the same `127.0.0.1:PORT` from the host and from every node
//! namespace, so one kubeconfig serves kubectl on the host and the agents on the nodes.

use super::plan::LabPlan;
use super::LabFiles;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sluice_net::netns;
use std::net::SocketAddr;
use std::path::Path;
use tokio::net::TcpListener;

/// Written by the daemon once it serves; `up` waits for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    /// Where the API answers, on the host's and on every node's loopback.
    pub api: SocketAddr,
    /// The supervisor that restarts the daemon when it dies.
    #[serde(default)]
    pub supervisor: Option<u32>,
}

/// Binds `addr` inside the named namespace (or the calling thread's, for `None`).
fn bind_in(ns: Option<&str>, addr: SocketAddr) -> Result<TcpListener> {
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let std_listener = match ns {
        None => bind(),
        Some(name) => {
            let path = netns::named_path(name);
            let file = netns::open(&path)?;
            netns::run_in(&file, &path, bind)?
        }
    }
    .with_context(|| format!("binding {addr} in {}", ns.unwrap_or("the host")))?;
    Ok(TcpListener::from_std(std_listener)?)
}

/// Copies every connection accepted on `listener` to `target` (dialled from the host).
async fn forward(listener: TcpListener, target: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

pub async fn run(name: &str) -> Result<()> {
    let files = LabFiles::new(name);
    let plan: LabPlan = serde_json::from_slice(
        &std::fs::read(&files.plan).with_context(|| format!("reading {:?}", files.plan))?,
    )?;
    let node_ns: Vec<String> = plan.nodes.iter().map(|n| n.netns.clone()).collect();
    let api = match &plan_external(&files)? {
        Some(target) => {
            // A real API server on the host's loopback: each node namespace gets a forwarder on
            // its own loopback at the same address, so the kubeconfig works unchanged there.
            for ns in &node_ns {
                tokio::spawn(forward(bind_in(Some(ns), *target)?, *target));
            }
            if super::k8s::dir(&files).exists() {
                // The address the real API server advertises (the `kubernetes` Service's
                // Endpoints), on the underlay, routed from every node and, through kube-proxy
                // and the node's masquerade, from every pod.
                let advertised = SocketAddr::from((plan.api_address(), target.port()));
                tokio::spawn(forward(
                    bind_in(Some(&plan.underlay_netns), advertised)?,
                    *target,
                ));
            }
            *target
        }
        None => {
            let server = sluice_apiserver::ApiServer::open(sluice_apiserver::Options {
                state_file: Some(files.api_state.clone()),
                pod_logs: Some(std::sync::Arc::new(super::kubelet::LabPodLogs {
                    lab: name.to_string(),
                })),
                ..Default::default()
            })?;
            // HTTPS only, for clients with the lab's certificate (kubectl on the host and the
            // agents in the nodes, from the one kubeconfig); the same address after a restart.
            let creds = super::credentials::load(&files.dir)?;
            let tls = creds.tls()?;
            let previous = read_info(&files.daemon).map(|i| i.api);
            let host = match previous {
                Some(addr) => bind_in(None, addr)?,
                None => bind_in(None, "127.0.0.1:0".parse()?)?,
            };
            let addr = host.local_addr()?;
            tokio::spawn(server.clone().serve_tls(host, tls.clone()));
            for ns in &node_ns {
                tokio::spawn(
                    server
                        .clone()
                        .serve_tls(bind_in(Some(ns), addr)?, tls.clone()),
                );
            }
            super::credentials::write_private(
                &files.kubeconfig,
                &creds.kubeconfig(addr, &format!("sluice-{name}")),
            )?;
            addr
        }
    };
    if super::k8s::dir(&files).exists() {
        // The real API server reaches the kubelets (exec, logs, port-forward) through this.
        tokio::spawn(serve_egress(
            super::k8s::egress_socket(&files),
            plan.clone(),
        ));
    }
    let supervisor = tokio::spawn(supervise_agents(
        name.to_string(),
        plan.clone(),
        files.kubeconfig.clone(),
        files.registered.clone(),
    ));
    tokio::spawn(run_kubelet(
        plan.clone(),
        files.kubeconfig.clone(),
        files.registered.clone(),
    ));
    let info = DaemonInfo {
        pid: std::process::id(),
        api,
        supervisor: Some(std::os::unix::process::parent_id()),
    };
    write_atomic(&files.daemon, &serde_json::to_vec_pretty(&info)?)?;
    tracing::info!(lab = name, api = %api, "lab daemon serving");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!(lab = name, "lab daemon stopping");
    // No agent restarted after this point, for the stop below to miss.
    supervisor.abort();
    let _ = supervisor.await;
    stop_agents(&plan);
    Ok(())
}

/// The host address of a real API server the lab was pointed at, if any.
fn plan_external(files: &LabFiles) -> Result<Option<SocketAddr>> {
    if !files.external.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&files.external)?;
    let addr: SocketAddr = text
        .trim()
        .parse()
        .with_context(|| format!("{:?}: not an address: {text}", files.external))?;
    if !addr.ip().is_loopback() {
        bail!("the external API server {addr} is not on loopback; node namespaces cannot reach it");
    }
    Ok(Some(addr))
}

pub fn read_info(path: &Path) -> Option<DaemonInfo> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {tmp:?}"))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {tmp:?}"))?;
    Ok(())
}

/// A node's agent is stopped on purpose while this file exists (`sluice lab agent stop`).
pub fn agent_stop_marker(lab: &str, node: &str) -> std::path::PathBuf {
    super::cni::node_dir(lab, node).join("agent.stopped")
}

/// The pid file of a node's agent, for `lab agent stop` and for tests.
pub fn agent_pid_file(lab: &str, node: &str) -> std::path::PathBuf {
    super::cni::node_dir(lab, node).join("agent.pid")
}

/// A node's agent: started by this daemon, or left running by the daemon before it.
enum Agent {
    Child(std::process::Child),
    Adopted(u32),
}

impl Agent {
    fn exited(&mut self, node: &str) -> bool {
        match self {
            Self::Child(c) => matches!(c.try_wait(), Ok(Some(_)) | Err(_)),
            Self::Adopted(pid) => !is_agent_of(*pid, node),
        }
    }
}

fn is_agent_of(pid: u32, node: &str) -> bool {
    super::supervisor::running_with(pid, &["agent", "--node-name", node])
}

/// The agent a previous daemon of this lab started for `node`, if it still runs.
fn running_agent(lab: &str, node: &str) -> Option<u32> {
    let pid = std::fs::read_to_string(agent_pid_file(lab, node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_agent_of(pid, node).then_some(pid)
}

/// Keeps one `sluice agent` running in each node's namespace, as the DaemonSet's controller
/// would: an agent that exits is started again after a second, unless stopped on purpose. The
/// agents a previous daemon left running are kept (they hold the nodes' subnets and datapaths).
async fn supervise_agents(
    lab: String,
    plan: LabPlan,
    kubeconfig: std::path::PathBuf,
    registered: std::path::PathBuf,
) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(error = %e, "cannot find the sluice executable; no agents");
            return;
        }
    };
    let mut children: Vec<Option<Agent>> = plan
        .nodes
        .iter()
        .map(|n| {
            let pid = running_agent(&lab, &n.name)?;
            tracing::info!(
                node = n.name,
                pid,
                "agent taken over from the previous lab daemon"
            );
            Some(Agent::Adopted(pid))
        })
        .collect();
    while !registered.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if super::k8s::real_nodes(&lab) {
        tracing::info!("sluice's DaemonSet runs this lab's agents: none started by the lab");
        return;
    }
    loop {
        for (node, child) in plan.nodes.iter().zip(children.iter_mut()) {
            if let Some(c) = child {
                if c.exited(&node.name) {
                    tracing::warn!(node = node.name, "agent exited");
                    *child = None;
                }
            }
            if child.is_some() || agent_stop_marker(&lab, &node.name).exists() {
                continue;
            }
            match spawn_agent(&exe, &lab, node, &kubeconfig) {
                Ok(c) => {
                    let _ = std::fs::write(agent_pid_file(&lab, &node.name), c.id().to_string());
                    tracing::info!(node = node.name, pid = c.id(), "agent started");
                    *child = Some(Agent::Child(c));
                }
                Err(e) => tracing::error!(
                    node = node.name,
                    error = format!("{e:#}"),
                    "cannot start agent"
                ),
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn spawn_agent(
    exe: &Path,
    lab: &str,
    node: &super::plan::NodePlan,
    kubeconfig: &Path,
) -> Result<std::process::Child> {
    let dir = super::cni::node_dir(lab, &node.name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("agent")
        .args(["--node-name", &node.name])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--subnet-file")
        .arg(super::cni::subnet_file(lab, &node.name))
        .arg("--ipam-dir")
        .arg(dir.join("ipam"))
        .arg("--wireguard-key")
        .arg(dir.join("wireguard.key"))
        .arg("--cni-conf-dir")
        .arg(&dir)
        // RUST_LOG only when the user set it (inherited): otherwise sluice-config's log-level rules.
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let path = netns::named_path(&node.netns);
    let file = netns::open(&path)?;
    // Forked from a thread inside the node's namespace, the agent lives there.
    Ok(netns::run_in(&file, &path, || cmd.spawn())??)
}

/// Agents are stopped with the lab daemon; `lab down` also finds them by namespace.
fn stop_agents(plan: &LabPlan) {
    for node in &plan.nodes {
        let pid = std::fs::read_to_string(agent_pid_file(&plan.spec.name, &node.name))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
}

/// Starts the lab's kubelet once the lab's objects are in the API.
async fn run_kubelet(
    plan: LabPlan,
    kubeconfig: std::path::PathBuf,
    registered: std::path::PathBuf,
) {
    while !registered.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if super::k8s::real_nodes(&plan.spec.name) {
        tracing::info!("real kubelets run this lab's nodes: no stand-in");
        return;
    }
    let kubelet = match super::cluster::client(&kubeconfig).await {
        Ok(client) => super::kubelet::Kubelet::new(plan, client),
        Err(e) => Err(e),
    };
    match kubelet {
        Ok(k) => k.run().await,
        Err(e) => tracing::error!(error = format!("{e:#}"), "the lab's kubelet cannot start"),
    }
}

/// Serves HTTP CONNECT on `socket` for the API server's egress: a tunnel to a node's address,
/// dialled from the lab's underlay namespace; any other target is refused.
async fn serve_egress(socket: std::path::PathBuf, plan: LabPlan) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(&socket);
    let listener = match tokio::net::UnixListener::bind(&socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(socket = %socket.display(), error = %e, "cannot serve the API server's egress");
            return;
        }
    };
    let _ = std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600));
    let allowed: Vec<std::net::Ipv4Addr> = plan.nodes.iter().map(|n| n.underlay.addr()).collect();
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (allowed, underlay) = (allowed.clone(), plan.underlay_netns.clone());
        tokio::spawn(async move {
            if let Err(e) = egress_tunnel(conn, &allowed, underlay).await {
                tracing::warn!(error = format!("{e:#}"), "egress tunnel");
            }
        });
    }
}

async fn egress_tunnel(
    mut conn: tokio::net::UnixStream,
    allowed: &[std::net::Ipv4Addr],
    underlay: String,
) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let limit = std::time::Duration::from_secs(10);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let end = loop {
        let n = tokio::time::timeout(limit, conn.read(&mut buf))
            .await
            .context("no CONNECT request within 10 s")??;
        if n == 0 {
            bail!("closed before a CONNECT request");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() > 8192 {
            bail!("CONNECT request head over 8 KiB");
        }
    };
    let target =
        match super::k8s_plan::connect_target(&String::from_utf8_lossy(&head[..end]), allowed) {
            Ok(t) => t,
            Err(why) => {
                let _ = conn.write_all(b"HTTP/1.1 403 Forbidden\r\n\r\n").await;
                bail!("{why}");
            }
        };
    let dial = move || -> Result<std::net::TcpStream> {
        let path = netns::named_path(&underlay);
        let file = netns::open(&path)?;
        let s = netns::run_in(&file, &path, || {
            std::net::TcpStream::connect_timeout(&target.into(), std::time::Duration::from_secs(5))
        })??;
        s.set_nonblocking(true)?;
        Ok(s)
    };
    let stream = match tokio::task::spawn_blocking(dial).await? {
        Ok(s) => s,
        Err(e) => {
            let _ = conn.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
            return Err(e.context(format!("dialling {target}")));
        }
    };
    let mut out = tokio::net::TcpStream::from_std(stream)?;
    conn.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    out.write_all(&head[end..]).await?;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut out).await;
    Ok(())
}
