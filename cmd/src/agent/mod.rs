//! `sluice agent`: the node agent. Two loops: the node loop ([`node_loop`]) holds the node's
//! subnet lease, publishes the node's record in it, and keeps the datapath to the peers, the NAT
//! table and the node's own pod wiring equal to what the leases and sluice-config say; the
//! policy loop ([`policy`]) enforces NetworkPolicy. Both are level triggered: every pass computes
//! the whole desired state and applies the difference.

pub mod config;
mod droplog;
mod hostports;
mod kube_leases;
mod node;
mod node_loop;
mod policy;
mod subnet;
mod sysctl;
pub mod tolerant;

use anyhow::{bail, Context, Result};
use config::AgentConfig;
use kube::Client;
use sluice_health::Health;
use sluice_net::lease;
use std::path::PathBuf;
use std::time::Duration;

pub const CONFIG_MAP: &str = "sluice-config";

#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// This node's name (the DaemonSet passes it from `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// A kubeconfig; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Where the CNI plugin reads the node's subnet.
    #[arg(long, default_value = "/run/sluice/subnet.env")]
    pub subnet_file: PathBuf,
    /// The namespace of sluice-config.
    #[arg(long, default_value = "kube-system")]
    pub namespace: String,
    /// The namespace of the subnet leases (only sluice writes Leases there).
    #[arg(long, default_value = lease::LEASE_NAMESPACE)]
    pub lease_namespace: String,
    /// Where sluice 0.1 kept its leases: read, never written, to carry an upgrade ("" = none).
    #[arg(long, default_value = lease::LEGACY_LEASE_NAMESPACE)]
    pub legacy_lease_namespace: String,
    /// Where the CNI config is written once the node's subnet and datapath are up.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node's underlay address, of either family (IPv6: the tunnels run over IPv6); by
    /// default its first InternalIP.
    #[arg(long)]
    pub underlay_ip: Option<std::net::IpAddr>,
    /// Seconds between full resyncs (drift repair) when nothing changes.
    #[arg(long, default_value_t = 5)]
    pub resync_secs: u64,
    /// The CNI plugin's IPAM directory, whose call counts the agent exports.
    #[arg(long, default_value = "/var/lib/sluice/ipam")]
    pub ipam_dir: PathBuf,
    /// Where the health server listens; by default sluice-config's `health-address` and
    /// `health-port`.
    #[arg(long)]
    pub health_addr: Option<std::net::SocketAddr>,
    /// The node's WireGuard private key (made on first use, mode 0600, never leaves the node).
    #[arg(long, default_value = "/var/lib/sluice/wireguard.key")]
    pub wireguard_key: PathBuf,
}

/// Every API call the agent makes, as (API group, resource, verb, namespace; "" for
/// cluster-wide): the ClusterRole and the Roles in `manifests/sluice.yaml` grant exactly these
/// (a test holds them equal).
#[cfg_attr(not(test), allow(dead_code))]
pub const API_CALLS: &[(&str, &str, &str, &str)] = &[
    ("", "nodes", "get", ""),
    // ClusterNetworkPolicy egress `nodes` peers: every Node's labels and addresses.
    ("", "nodes", "list", ""),
    ("", "nodes", "watch", ""),
    ("", "nodes/status", "patch", ""),
    ("", "pods", "list", ""),
    ("", "pods", "watch", ""),
    ("", "namespaces", "list", ""),
    ("", "namespaces", "watch", ""),
    ("networking.k8s.io", "networkpolicies", "list", ""),
    ("networking.k8s.io", "networkpolicies", "watch", ""),
    (
        "policy.networking.k8s.io",
        "clusternetworkpolicies",
        "list",
        "",
    ),
    (
        "policy.networking.k8s.io",
        "clusternetworkpolicies",
        "watch",
        "",
    ),
    ("", "configmaps", "get", "kube-system"),
    ("", "configmaps", "list", "kube-system"),
    ("", "configmaps", "watch", "kube-system"),
    // sluice 0.1's leases, read to carry an upgrade (never written).
    ("coordination.k8s.io", "leases", "list", "kube-system"),
    ("coordination.k8s.io", "leases", "watch", "kube-system"),
    ("coordination.k8s.io", "leases", "list", "sluice-system"),
    ("coordination.k8s.io", "leases", "watch", "sluice-system"),
    ("coordination.k8s.io", "leases", "create", "sluice-system"),
    ("coordination.k8s.io", "leases", "update", "sluice-system"),
];

/// Whether each loop's watches have listed once; `/readyz` wants both.
#[derive(Debug, Default)]
pub struct WatchSync {
    datapath: std::sync::atomic::AtomicBool,
    policy: std::sync::atomic::AtomicBool,
}

impl WatchSync {
    fn publish(&self, health: &Health) {
        use std::sync::atomic::Ordering::SeqCst;
        let all = self.datapath.load(SeqCst) && self.policy.load(SeqCst);
        health.update(|s| s.watches_synced = all);
    }

    pub fn set_datapath(&self, synced: bool, health: &Health) {
        self.datapath
            .store(synced, std::sync::atomic::Ordering::SeqCst);
        self.publish(health);
    }

    pub fn set_policy(&self, synced: bool, health: &Health) {
        self.policy
            .store(synced, std::sync::atomic::Ordering::SeqCst);
        self.publish(health);
    }
}

/// The policy firewall of `policy-backend`, retried with backoff until one works (its error
/// shows on `/readyz` meanwhile), then the policy loop.
async fn start_policy(
    client: Client,
    node: String,
    choice: config::PolicyBackend,
    health: Health,
    sync: std::sync::Arc<WatchSync>,
    log_drops: tokio::sync::watch::Receiver<bool>,
    hostport_backend: hostports::Resolved,
) {
    let name = match choice {
        config::PolicyBackend::Nftables => "nftables",
        config::PolicyBackend::Iptables => "iptables",
        config::PolicyBackend::Auto => "auto",
    };
    let firewall = with_backoff("choosing the policy firewall", || {
        let health = health.clone();
        async move {
            let got = tokio::task::spawn_blocking(move || {
                sluice_policy::auto(sluice_policy::Exec::host(), name)
            })
            .await?;
            match got {
                Ok(fw) => Ok(fw),
                Err(e) => {
                    health.update(|s| s.policy_error = Some(e.to_string()));
                    Err(e.into())
                }
            }
        }
    })
    .await;
    tracing::info!(node, backend = ?firewall.backend(), "policy firewall chosen");
    health.update(|s| s.policy_error = None);
    // hostPorts go where the policy goes; the node loop publishes it for the CNI plugin.
    let policy_backend = firewall.backend();
    let hostport = with_backoff("choosing the hostPort firewall", || async move {
        tokio::task::spawn_blocking(move || hostports::resolve(policy_backend)).await?
    })
    .await;
    tracing::info!(node, backend = hostport.name(), "hostPort firewall chosen");
    let _ = hostport_backend.set(hostport);
    policy::run(
        client,
        node,
        std::sync::Arc::from(firewall),
        health,
        sync,
        log_drops,
    )
    .await;
}

/// How long a control loop may go without a pass before liveness fails: generous, since the loop
/// passes at least every `resync_secs` even while the API server is away.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

pub fn main(args: AgentArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The kubelet stops a container with TERM. As PID 1 of its container the agent would
        // ignore it without a handler and die only at the end of the grace period, which a
        // rolling update would wait for on every node. Whatever it is doing, it stops at once:
        // the datapath stays in place for the next agent.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("watching for TERM")?;
        tokio::select! {
            r = run(args) => r,
            _ = term.recv() => {
                tracing::info!("TERM: sluice agent stopping; the datapath stays in place");
                Ok(())
            }
        }
    })
}

async fn client(args: &AgentArgs) -> Result<Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {path:?}"))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::incluster().context("no --kubeconfig and not in a cluster")?,
    };
    Ok(Client::try_from(config)?)
}

/// Retries `f` with capped exponential backoff until it succeeds; each failure is logged.
async fn with_backoff<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut delay = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "{what} failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// `net.ipv4.ip_forward` on (see [`sysctl`]).
/// Forwarding on, for IPv6 too on a node with an IPv6 subnet ([`sysctl::forwarding_plan`]).
fn enable_ip_forward(ipv6: bool, underlay: &str) -> Result<(), String> {
    let accept_ra =
        std::fs::read_to_string(format!("/proc/sys/net/ipv6/conf/{underlay}/accept_ra")).ok();
    let mut errors = Vec::new();
    for (key, value) in sysctl::forwarding_plan(ipv6, underlay, accept_ra.as_deref()) {
        match sysctl::ensure(&key, value) {
            Ok(true) => tracing::info!(key, value, "sysctl set"),
            Ok(false) => {}
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Puts back what the CNI plugin made on the host for this node's pods and someone removed (a
/// pod's /32 or /128 route, proxy ARP on its veth); returns how many it repaired.
async fn repair_pods(
    handle: &rtnetlink::Handle,
    ipam: &sluice_net::ipam::IpamStore,
) -> Result<usize> {
    let state = ipam.read()?;
    let seen = sluice_net::pod_repair::observe(handle).await?;
    let (sides, repairs) = sluice_net::pod_repair::plan(&state, &seen);
    let mut repaired = 0;
    for r in &repairs {
        let sluice_net::pod_repair::Repair::Route(side) = r;
        sluice_net::pod_repair::apply(handle, r).await?;
        tracing::warn!(pod_ip = %side.address, veth = side.ifname, "restored a pod's host route");
        repaired += 1;
    }
    // Proxy ARP is IPv4's: an IPv6 address's side has nothing more to keep.
    for side in sides.iter().filter(|s| s.address.is_ipv4()) {
        let settings = [
            (format!("net/ipv4/conf/{}/proxy_arp", side.ifname), "1"),
            (format!("net/ipv4/neigh/{}/proxy_delay", side.ifname), "0"),
        ];
        for (key, value) in settings {
            match sysctl::ensure(&key, value) {
                Ok(true) => {
                    tracing::warn!(pod_ip = %side.address, veth = side.ifname, key, "restored a pod veth's setting");
                    repaired += 1;
                }
                Ok(false) => {}
                // The veth went between the read and now.
                Err(_)
                    if !std::path::Path::new("/proc/sys/net/ipv4/conf")
                        .join(&side.ifname)
                        .exists() => {}
                Err(e) => bail!(e),
            }
        }
    }
    Ok(repaired)
}

async fn run(args: AgentArgs) -> Result<()> {
    tracing::info!(
        node = args.node_name,
        version = env!("CARGO_PKG_VERSION"),
        "sluice agent starting"
    );
    let health = Health::new(
        LIVENESS_TIMEOUT,
        env!("CARGO_PKG_VERSION"),
        env!("SLUICE_GIT_COMMIT"),
    );
    let client = client(&args).await?;
    let configs = node_loop::config_api(client.clone(), &args.namespace);
    // The health server comes first, so that a node stuck on a bad ConfigMap or an absent API
    // server says why on /readyz while it retries.
    let first = node_loop::read_config(&configs, &health).await;
    let defaults = AgentConfig::default();
    let (address, port) = first
        .as_ref()
        .map_or((defaults.health_address, defaults.health_port), |c| {
            (c.health_address, c.health_port)
        });
    let addr = args
        .health_addr
        .unwrap_or_else(|| std::net::SocketAddr::new(address, port));
    let server = health.clone();
    tokio::spawn(async move {
        if let Err(e) = server.serve_at(addr).await {
            tracing::error!(%addr, error = %e, "the health server stopped");
        }
    });
    tracing::info!(%addr, "health server listening (/status on loopback only)");
    health.beat("agent");
    let cfg = match first {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "sluice-config not usable; retrying"
            );
            with_backoff("reading sluice-config", || {
                node_loop::read_config(&configs, &health)
            })
            .await
        }
    };
    crate::set_log_level(&cfg.log_level);
    let watch_sync = std::sync::Arc::new(WatchSync::default());
    let (log_drops, log_drops_rx) = tokio::sync::watch::channel(cfg.policy_log_drops);
    let policy_backend = cfg.policy_backend;
    let node = args.node_name.clone();
    let hostport_backend = hostports::Resolved::default();
    let nodes = node_loop::NodeLoop::start(
        args,
        client.clone(),
        health.clone(),
        cfg,
        watch_sync.clone(),
        log_drops,
        hostport_backend.clone(),
    )
    .await?;
    tokio::spawn(start_policy(
        client,
        node,
        policy_backend,
        health,
        watch_sync,
        log_drops_rx,
        hostport_backend,
    ));
    nodes.run().await;
    Ok(())
}
