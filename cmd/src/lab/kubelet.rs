//! The lab's kubelet stand-in: every Pod bound to a lab node becomes a network namespace wired by
//! the real `sluice-cni` (called exactly as a runtime calls it), with `sluice lab serve` answering
//! on its containerPorts and its status written back; a deleted Pod is unwired and finalized.
//! Unscheduled Pods are bound round-robin to the lab's nodes. Level-triggered: every pass
//! compares the Pods in the API with what is wired and fixes the difference.

use super::cni::{self, Attachment};
use super::plan::LabPlan;
use super::serve::Protocol;
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use serde_json::json;
use sluice_net::netns;
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

/// One pod made real.
struct Wired {
    namespace: String,
    name: String,
    node: String,
    netns: String,
    /// None on an IPv6-only node.
    ip: Option<Ipv4Addr>,
    /// On a dual-stack or IPv6-only node.
    ip6: Option<std::net::Ipv6Addr>,
    server: Option<Server>,
}

/// A pod's `sluice lab serve`: started by this kubelet, or left running by the lab daemon that
/// ran before this one (its supervisor restarted the daemon).
enum Server {
    Child(std::process::Child),
    Adopted(u32),
}

impl Server {
    fn pid(&self) -> u32 {
        match self {
            Self::Child(c) => c.id(),
            Self::Adopted(pid) => *pid,
        }
    }

    fn stop(self) {
        match self {
            Self::Child(mut c) => {
                let _ = c.kill();
                let _ = c.wait();
            }
            Self::Adopted(pid) => {
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// What the kubelet keeps on disk about a wired pod, so that a restarted lab daemon takes the
/// pod over instead of wiring it again (which would leave the old server running).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    uid: String,
    namespace: String,
    name: String,
    node: String,
    netns: String,
    #[serde(default)]
    ip: Option<Ipv4Addr>,
    #[serde(default)]
    ip6: Option<std::net::Ipv6Addr>,
    server_pid: Option<u32>,
}

fn records_file(lab: &str) -> std::path::PathBuf {
    super::plan::state_dir(lab).join("kubelet.json")
}

/// The pods a previous kubelet of this lab wired that are still there: namespace present, server
/// (if it had one) still running.
fn adopt(lab: &str) -> HashMap<String, Wired> {
    let Ok(bytes) = std::fs::read(records_file(lab)) else {
        return HashMap::new();
    };
    let records: Vec<Record> = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "kubelet.json unreadable; wiring pods afresh");
            return HashMap::new();
        }
    };
    let mut out = HashMap::new();
    for r in records {
        if !netns::named_path(&r.netns).exists() {
            continue;
        }
        let identity = format!("{}/{}", r.namespace, r.name);
        let server = r
            .server_pid
            .filter(|&p| {
                super::supervisor::running_with(p, &["lab", "serve", "--identity", &identity])
            })
            .map(Server::Adopted);
        tracing::info!(pod = identity, ip = ?r.ip, ip6 = ?r.ip6, "pod taken over from the previous lab daemon");
        out.insert(
            r.uid,
            Wired {
                namespace: r.namespace,
                name: r.name,
                node: r.node,
                netns: r.netns,
                ip: r.ip,
                ip6: r.ip6,
                server,
            },
        );
    }
    out
}

/// A pod whose wiring failed, and when to try again.
struct Failed {
    next_try: Instant,
    attempts: u32,
}

fn ports_of(pod: &Pod) -> Vec<(Protocol, u16)> {
    let mut out: Vec<(Protocol, u16)> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let proto = Protocol::parse_k8s(p.protocol.as_deref())?;
            Some((proto, u16::try_from(p.container_port).ok()?))
        })
        .collect();
    out.sort_by_key(|(p, n)| (*n, *p as u8));
    out.dedup();
    out
}

fn spawn_server(
    exe: &Path,
    netns_name: &str,
    identity: &str,
    ports: &[(Protocol, u16)],
    log: &Path,
) -> Result<std::process::Child> {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["lab", "serve", "--identity", identity]);
    for (proto, port) in ports {
        let flag = match proto {
            Protocol::Tcp => "--tcp",
            Protocol::Udp => "--udp",
            Protocol::Sctp => "--sctp",
        };
        cmd.args([flag, &port.to_string()]);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let path = netns::named_path(netns_name);
    let file = netns::open(&path)?;
    Ok(netns::run_in(&file, &path, || cmd.spawn())??)
}

/// The log file of pod `ns/name` on `node`: its server's stdout and stderr, in the CRI log
/// format (`kubectl logs` reads it through the API server).
pub fn pod_log(lab: &str, node: &str, ns: &str, name: &str) -> std::path::PathBuf {
    cni::node_dir(lab, node).join(format!("pod-{ns}-{name}.log"))
}

/// Where the lab's API server finds its pods' logs.
#[derive(Debug)]
pub struct LabPodLogs {
    pub lab: String,
}

impl sluice_apiserver::PodLogs for LabPodLogs {
    fn log_file(&self, namespace: &str, pod: &str, node: &str) -> Option<std::path::PathBuf> {
        Some(pod_log(&self.lab, node, namespace, pod))
    }
}

pub struct Kubelet {
    lab: String,
    plan: LabPlan,
    client: Client,
    exe: std::path::PathBuf,
    wired: HashMap<String, Wired>,
    failed: HashMap<String, Failed>,
    next_node: usize,
    /// Nodes reported Ready: their agent has installed the CNI config.
    ready: std::collections::HashSet<String>,
}

/// The node's Ready condition as a kubelet reports it: not Ready while the runtime's network is
/// not (no CNI config yet), with the kubelet's own words.
pub fn ready_condition(ready: bool) -> serde_json::Value {
    if ready {
        json!({"type": "Ready", "status": "True", "reason": "KubeletReady",
               "message": "kubelet is posting ready status"})
    } else {
        json!({"type": "Ready", "status": "False", "reason": "KubeletNotReady",
               "message": "container runtime network not ready: NetworkReady=false reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin not initialized"})
    }
}

impl Kubelet {
    pub fn new(plan: LabPlan, client: Client) -> Result<Self> {
        Ok(Self {
            lab: plan.spec.name.clone(),
            exe: std::env::current_exe().context("finding the sluice executable")?,
            wired: adopt(&plan.spec.name),
            plan,
            client,
            failed: HashMap::new(),
            next_node: 0,
            ready: std::collections::HashSet::new(),
        })
    }

    /// Runs until the process ends.
    pub async fn run(mut self) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let (cache, writer) = reflector::store::<Pod>();
        let events = reflector(writer, watcher(pods, watcher::Config::default()))
            .default_backoff()
            .map(|_| ());
        let mut events = Box::pin(events);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        // Until the first list is in, an empty cache says nothing (and must not unwire the pods
        // taken over from a previous daemon).
        let store = cache.clone();
        let mut synced = Box::pin(store.wait_until_ready());
        let mut ready = false;
        loop {
            tokio::select! {
                _ = events.next() => {
                    while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
                }
                _ = tick.tick() => {}
            }
            self.report_nodes().await;
            if !ready {
                ready =
                    futures::FutureExt::now_or_never(synced.as_mut()).is_some_and(|r| r.is_ok());
                if !ready {
                    continue;
                }
            }
            if cache.is_empty() && self.wired.is_empty() {
                continue;
            }
            let pods: Vec<Pod> = cache.state().iter().map(|p| (**p).clone()).collect();
            self.pass(&pods).await;
        }
    }

    /// Reports each node Ready once its agent has installed the CNI config, as a kubelet does
    /// when its runtime's network turns ready.
    async fn report_nodes(&mut self) {
        let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(self.client.clone());
        for node in &self.plan.nodes {
            let ready = cni::network_ready(&self.lab, &node.name);
            if ready == self.ready.contains(&node.name) {
                continue;
            }
            let status = json!({"status": {"conditions": [ready_condition(ready)]}});
            match nodes
                .patch_status(
                    &node.name,
                    &PatchParams::default(),
                    &Patch::Strategic(status),
                )
                .await
            {
                Ok(_) if ready => {
                    tracing::info!(node = node.name, "node ready: its CNI config is installed");
                    self.ready.insert(node.name.clone());
                }
                Ok(_) => {
                    self.ready.remove(&node.name);
                }
                Err(e) => tracing::warn!(node = node.name, error = %e, "cannot report the node"),
            }
        }
    }

    /// Writes the wired pods' records (atomically).
    fn save(&self) {
        let records: Vec<Record> = self
            .wired
            .iter()
            .map(|(uid, w)| Record {
                uid: uid.clone(),
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                node: w.node.clone(),
                netns: w.netns.clone(),
                ip: w.ip,
                ip6: w.ip6,
                server_pid: w.server.as_ref().map(Server::pid),
            })
            .collect();
        let written = serde_json::to_vec(&records)
            .map_err(anyhow::Error::from)
            .and_then(|b| super::daemon::write_atomic(&records_file(&self.lab), &b));
        if let Err(e) = written {
            tracing::warn!(error = format!("{e:#}"), "cannot write kubelet.json");
        }
    }

    async fn pass(&mut self, pods: &[Pod]) {
        let before: Vec<String> = self.wired.keys().cloned().collect();
        self.reconcile(pods).await;
        let mut after: Vec<String> = self.wired.keys().cloned().collect();
        after.sort();
        let mut before = before;
        before.sort();
        if before != after {
            self.save();
        }
    }

    async fn reconcile(&mut self, pods: &[Pod]) {
        let mut desired: BTreeMap<String, &Pod> = BTreeMap::new();
        for pod in pods {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            match node {
                None => {
                    if pod.metadata.deletion_timestamp.is_none() {
                        if let Err(e) = self.bind(pod).await {
                            tracing::warn!(
                                pod = name_of(pod),
                                error = format!("{e:#}"),
                                "binding failed"
                            );
                        }
                    }
                }
                Some(node) if self.plan.node(&node).is_some() => {
                    if pod.metadata.deletion_timestamp.is_none() {
                        desired.insert(uid, pod);
                    }
                }
                Some(_) => {}
            }
        }
        // Pods gone or being deleted: unwire, then finalize a graceful deletion.
        let gone: Vec<String> = self
            .wired
            .keys()
            .filter(|u| !desired.contains_key(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(w) = self.wired.remove(&uid) {
                self.unwire(&uid, w).await;
            }
        }
        self.failed.retain(|uid, _| desired.contains_key(uid));
        for pod in pods {
            if pod.metadata.deletion_timestamp.is_some()
                && pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.as_deref())
                    .is_some_and(|n| self.plan.node(n).is_some())
            {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if !self.wired.contains_key(&uid) {
                    let api: Api<Pod> = Api::namespaced(
                        self.client.clone(),
                        pod.metadata.namespace.as_deref().unwrap_or("default"),
                    );
                    let dp = DeleteParams::default().grace_period(0);
                    let _ = api
                        .delete(pod.metadata.name.as_deref().unwrap_or_default(), &dp)
                        .await;
                }
            }
        }
        for (uid, pod) in desired {
            if self.wired.contains_key(&uid) {
                continue;
            }
            // No sandbox on a node whose network is not ready: the pod waits (ContainerCreating).
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .unwrap_or_default();
            if !self.ready.contains(node) {
                continue;
            }
            if self
                .failed
                .get(&uid)
                .is_some_and(|f| f.next_try > Instant::now())
            {
                continue;
            }
            match self.wire(&uid, pod).await {
                Ok(w) => {
                    tracing::info!(pod = format!("{}/{}", w.namespace, w.name), node = w.node, ip = ?w.ip, ip6 = ?w.ip6, "pod running");
                    self.failed.remove(&uid);
                    self.wired.insert(uid, w);
                }
                Err(e) => {
                    let f = self.failed.entry(uid).or_insert(Failed {
                        next_try: Instant::now(),
                        attempts: 0,
                    });
                    f.attempts += 1;
                    f.next_try = Instant::now() + Duration::from_secs(u64::from(f.attempts.min(5)));
                    let msg = format!("{e:#}");
                    tracing::warn!(
                        pod = name_of(pod),
                        attempts = f.attempts,
                        error = msg,
                        "pod not wired; will retry"
                    );
                    let _ = self.report_failure(pod, &msg).await;
                }
            }
        }
    }

    async fn bind(&mut self, pod: &Pod) -> Result<()> {
        let node = &self.plan.nodes[self.next_node % self.plan.nodes.len()];
        self.next_node += 1;
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name, "namespace": ns},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node.name},
        });
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let _: serde_json::Value = api
            .create_subresource("binding", name, &PostParams::default(), &binding)
            .await
            .with_context(|| format!("binding {ns}/{name} to {}", node.name))?;
        tracing::info!(pod = format!("{ns}/{name}"), node = node.name, "pod bound");
        Ok(())
    }

    async fn wire(&mut self, uid: &str, pod: &Pod) -> Result<Wired> {
        let ns = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let node_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let node = self
            .plan
            .node(&node_name)
            .context("pod bound to a node the lab lacks")?
            .clone();
        let netns_name = self.plan.pod_netns(&ns, &name);
        if netns::named_path(&netns_name).exists() {
            // Left by an earlier run of this kubelet: start clean.
            let _ = netns::remove_named(&netns_name);
        }
        super::topo::namespace(&netns_name).await?;
        let netns_path = netns::named_path(&netns_name);
        let attachment = Attachment {
            lab: &self.lab,
            node: &node,
            container_id: uid,
            netns: &netns_path,
            pod_namespace: &ns,
            pod_name: &name,
            pod_uid: uid,
        };
        let added = tokio::task::block_in_place(|| cni::call("ADD", &attachment));
        let result = match added {
            Ok(r) => r,
            Err(e) => {
                let _ = netns::remove_named(&netns_name);
                return Err(e);
            }
        };
        let ip = cni::address_of(&result);
        let ip6 = cni::address6_of(&result);
        if ip.is_none() && ip6.is_none() {
            let _ = tokio::task::block_in_place(|| cni::call("DEL", &attachment));
            let _ = netns::remove_named(&netns_name);
            anyhow::bail!("ADD result has no address: {result}");
        }
        let ports = ports_of(pod);
        let log = pod_log(&self.lab, &node.name, &ns, &name);
        // A pod of the same name that ran before wrote here: its log is not this pod's.
        let _ = std::fs::remove_file(&log);
        let server = if ports.is_empty() {
            None
        } else {
            Some(Server::Child(spawn_server(
                &self.exe,
                &netns_name,
                &format!("{ns}/{name}"),
                &ports,
                &log,
            )?))
        };
        let w = Wired {
            namespace: ns,
            name,
            node: node.name.clone(),
            netns: netns_name,
            ip,
            ip6,
            server,
        };
        match self.report_running(&w, node.underlay.addr()).await {
            Ok(()) => Ok(w),
            Err(e) => {
                self.unwire(uid, w).await;
                Err(e)
            }
        }
    }

    async fn unwire(&mut self, uid: &str, mut w: Wired) {
        if let Some(s) = w.server.take() {
            s.stop();
        }
        if let Some(node) = self.plan.node(&w.node).cloned() {
            let netns_path = netns::named_path(&w.netns);
            let attachment = Attachment {
                lab: &self.lab,
                node: &node,
                container_id: uid,
                netns: &netns_path,
                pod_namespace: &w.namespace,
                pod_name: &w.name,
                pod_uid: uid,
            };
            if let Err(e) = tokio::task::block_in_place(|| cni::call("DEL", &attachment)) {
                tracing::warn!(
                    pod = format!("{}/{}", w.namespace, w.name),
                    error = format!("{e:#}"),
                    "CNI DEL failed"
                );
            }
        }
        let _ = netns::remove_named(&w.netns);
        tracing::info!(pod = format!("{}/{}", w.namespace, w.name), "pod removed");
    }

    async fn report_running(&self, w: &Wired, host_ip: Ipv4Addr) -> Result<()> {
        let pod = super::plan::PodPlan {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            node: w.node.clone(),
        };
        super::cluster::pod_running(&self.client, &pod, host_ip, w.ip, w.ip6).await
    }

    /// What a kubelet's FailedCreatePodSandBox event says, in the Pod's status.
    async fn report_failure(&self, pod: &Pod, message: &str) -> Result<()> {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let status = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns},
            "status": {
                "phase": "Pending",
                "conditions": [{
                    "type": "Ready", "status": "False", "reason": "FailedCreatePodSandBox",
                    "message": format!("failed to set up the pod's network: {message}"),
                }],
            }
        });
        api.patch_status(
            name,
            &PatchParams::apply("sluice-lab").force(),
            &Patch::Apply(status),
        )
        .await?;
        Ok(())
    }
}

fn name_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}
