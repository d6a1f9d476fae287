//! `sluice agent`: the node agent. It holds the node's subnet lease, publishes the node's record in
//! it, and keeps the VXLAN datapath and masquerade equal to what the peers' leases say, level
//! triggered: every pass computes the whole desired state and applies the difference.

pub mod config;
mod droplog;
mod kube_leases;
mod node;
mod policy;
mod subnet;
mod sysctl;
pub mod tolerant;
mod wireguard;

use anyhow::{bail, Context, Result};
use config::AgentConfig;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use kube_leases::KubeLeases;
use sluice_health::Health;
use sluice_net::lease::store::{renew, LeaseStore, StoreError};
use sluice_net::lease::{self, LeaseView, NodeOwner, NodeRecord};
use sluice_net::subnet_env::SubnetEnv;
use sluice_net::vxlan::{self, apply::VxlanKernel, VxlanConfig};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};
use subnet::Held;

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
    /// The node's underlay address; by default its InternalIP.
    #[arg(long)]
    pub underlay_ip: Option<Ipv4Addr>,
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
    ("", "nodes/status", "patch", ""),
    ("", "pods", "list", ""),
    ("", "pods", "watch", ""),
    ("", "namespaces", "list", ""),
    ("", "namespaces", "watch", ""),
    ("networking.k8s.io", "networkpolicies", "list", ""),
    ("networking.k8s.io", "networkpolicies", "watch", ""),
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
    rt.block_on(run(args))
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

/// sluice-config as the dynamic API reads it, so a value of the wrong JSON type is a reported
/// bad value rather than an object that never decodes.
fn config_api(client: Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, namespace, &ApiResource::erase::<ConfigMap>(&()))
}

async fn read_config(api: &Api<DynamicObject>, health: &Health) -> Result<AgentConfig> {
    let data = match api.get_opt(CONFIG_MAP).await? {
        Some(cm) => cm.data.get("data").cloned(),
        None => {
            tracing::info!("no {CONFIG_MAP}: using the defaults");
            None
        }
    };
    match config::parse_data_json(data.as_ref()) {
        Ok(c) => {
            health.update(|s| s.config_error = None);
            Ok(c)
        }
        Err(e) => {
            health.update(|s| s.config_error = Some(e.to_string()));
            Err(e.into())
        }
    }
}

fn write_subnet_env(path: &std::path::Path, env: &SubnetEnv) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(env.render().as_str()) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, env.render())?;
    std::fs::rename(&tmp, path)?;
    tracing::info!(subnet = %env.subnet, mtu = env.mtu, path = %path.display(), "subnet file written");
    Ok(())
}

/// `net.ipv4.ip_forward` on (see [`sysctl`]).
fn enable_ip_forward() -> Result<(), String> {
    sysctl::ensure("net/ipv4/ip_forward", "1").map(|_| ())
}

/// Puts back what the CNI plugin made on the host for this node's pods and someone removed (a
/// pod's /32 route, proxy ARP on its veth); returns how many it repaired.
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
    for side in &sides {
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
    let node = args.node_name.clone();
    tracing::info!(
        node,
        version = env!("CARGO_PKG_VERSION"),
        "sluice agent starting"
    );
    let health = Health::new(
        LIVENESS_TIMEOUT,
        env!("CARGO_PKG_VERSION"),
        env!("SLUICE_GIT_COMMIT"),
    );
    let client = client(&args).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let configs = config_api(client.clone(), &args.namespace);
    let skips = std::sync::Arc::new(tolerant::Skips::default());
    let store = KubeLeases::new(
        client.clone(),
        &args.lease_namespace,
        skips.clone(),
        health.clone(),
    );

    // The health server comes first, so that a node stuck on a bad ConfigMap or an absent API
    // server says why on /readyz while it retries.
    let first = read_config(&configs, &health).await;
    let port = first
        .as_ref()
        .map_or(AgentConfig::default().health_port, |c| c.health_port);
    let address = first
        .as_ref()
        .map_or(AgentConfig::default().health_address, |c| c.health_address);
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
    let mut cfg = match first {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "sluice-config not usable; retrying"
            );
            with_backoff("reading sluice-config", || read_config(&configs, &health)).await
        }
    };
    crate::set_log_level(&cfg.log_level);
    let facts = with_backoff("reading this node", || node::facts(&nodes, &node)).await;
    // Until the datapath is up, the node says its network is unavailable (and is tainted).
    if let Err(e) = node::set_network_available(&nodes, &node, false).await {
        tracing::warn!(error = format!("{e:#}"), "cannot update the node's status");
    }
    let underlay_ip = match args.underlay_ip.or(facts.internal_ip) {
        Some(ip) => ip,
        None => bail!("node {node} has no InternalIP and no --underlay-ip was given"),
    };
    let mut kernel = VxlanKernel::connect()?;
    let (pod_conn, pod_handle, _) =
        rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(pod_conn);
    let ipam_store = sluice_net::ipam::IpamStore::new(&args.ipam_dir);
    let underlay = kernel
        .underlay_by_address(underlay_ip)
        .await
        .with_context(|| format!("finding the link with {underlay_ip}"))?;
    let mut vx = VxlanConfig::auto(underlay.ifindex, underlay_ip, underlay.mtu);
    vx.port = cfg.vxlan_port;
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vx.tx_checksum_offload = sluice_net::vxlan::tx_checksum_offload_safe(release.trim());
    tracing::info!(
        kernel = release.trim(),
        tx_checksum_offload = vx.tx_checksum_offload,
        "VXLAN device offloads"
    );
    if let config::Mtu::Fixed(m) = cfg.mtu {
        vx.mtu = m;
    }
    let wg_mtu = match cfg.mtu {
        config::Mtu::Fixed(m) => m,
        config::Mtu::Auto => sluice_net::wireguard::auto_mtu(underlay.mtu),
    };
    // Pods keep their MTU across a live switch of `encryption` (they are not restarted), so
    // theirs fits the tunnel with the larger overhead from the start.
    let pod_mtu = vx.mtu.min(wg_mtu);
    let mut wg = wireguard::WgState::new(args.wireguard_key.clone(), cfg.wireguard_port, wg_mtu);
    let owner = NodeOwner {
        name: node.clone(),
        uid: facts.uid.clone(),
    };
    let wg_enabled = |cfg: &AgentConfig| cfg.encryption == config::Encryption::Wireguard;
    let mut base_record = wireguard::record_with(
        &NodeRecord {
            node: node.clone(),
            underlay_ip,
            vtep_mac: vxlan::vtep_mac(&node),
            wireguard_public_key: None,
            encryption: "none".into(),
            subnet: ipnet::Ipv4Net::default(),
        },
        wg.public_key(),
        wg_enabled(&cfg),
    );
    let prefer = SubnetEnv::load(&args.subnet_file).ok().map(|e| e.subnet);
    let legacy_api = (!args.legacy_lease_namespace.is_empty())
        .then(|| kube_leases::raw_api(client.clone(), &args.legacy_lease_namespace));
    let legacy_now = match &legacy_api {
        Some(api) => kube_leases::legacy_leases(api, &skips, &health)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read sluice 0.1's leases in kube-system");
                Vec::new()
            }),
        None => Vec::new(),
    };
    let mut held = with_backoff("taking a subnet", || {
        subnet::take(
            &store,
            subnet::TakeRequest {
                cfg: &cfg,
                record: &base_record,
                owner: &owner,
                facts: &facts,
                prefer,
                legacy: &legacy_now,
            },
        )
    })
    .await;
    let mut forwarding = enable_ip_forward();
    if let Err(e) = &forwarding {
        tracing::error!(error = e.as_str(), "pods cannot be forwarded");
    }

    // Caches of the leases and of sluice-config, kept by watches; each change wakes the loop.
    // An event says which watch it came from and whether that watch has now listed everything.
    let lease_resource = ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&());
    let lease_writer = reflector::store::Writer::<DynamicObject>::new(lease_resource.clone());
    let lease_cache = lease_writer.as_reader();
    let lease_events = reflector(
        lease_writer,
        watcher(
            kube_leases::raw_api(client.clone(), &args.lease_namespace),
            watcher::Config::default().labels(&kube_leases::selector()),
        ),
    )
    .default_backoff()
    .map(|e| (0usize, matches!(e, Ok(watcher::Event::InitDone))));
    // sluice 0.1's leases: a cache only, which does not wake the loop (kube-system's
    // leader-election leases change every two seconds).
    let legacy_cache = legacy_api.map(|api| {
        let writer = reflector::store::Writer::<DynamicObject>::new(lease_resource.clone());
        let reader = writer.as_reader();
        let stream = reflector(writer, watcher(api, watcher::Config::default())).default_backoff();
        tokio::spawn(async move {
            let mut stream = Box::pin(stream);
            while stream.next().await.is_some() {}
        });
        reader
    });
    let cm_config = watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"));
    let cm_writer =
        reflector::store::Writer::<DynamicObject>::new(ApiResource::erase::<ConfigMap>(&()));
    let cm_cache = cm_writer.as_reader();
    let cm_events = reflector(cm_writer, watcher(configs.clone(), cm_config))
        .default_backoff()
        .map(|e| (1usize, matches!(e, Ok(watcher::Event::InitDone))));
    let mut events = Box::pin(futures::stream::select(lease_events, cm_events));
    let watch_sync = std::sync::Arc::new(WatchSync::default());
    let (log_drops, log_drops_rx) = tokio::sync::watch::channel(cfg.policy_log_drops);
    tokio::spawn(start_policy(
        client.clone(),
        node.clone(),
        cfg.policy_backend,
        health.clone(),
        watch_sync.clone(),
        log_drops_rx,
    ));
    let mut synced = [false, false];
    let mut tick = tokio::time::interval(Duration::from_secs(args.resync_secs.max(1)));
    let mut marked_available = false;
    let mut cni_config_written = false;
    let masq_nft = sluice_net::masq::NftCli::default();
    // The VXLAN device's address and port are fixed for the agent's life.
    let untracked = sluice_net::masq::UntrackedTunnel {
        underlay_ip: vx.underlay_ip,
        port: vx.port,
    };
    let cm_ref = kube::runtime::reflector::ObjectRef::<DynamicObject>::new_with(
        CONFIG_MAP,
        ApiResource::erase::<ConfigMap>(&()),
    )
    .within(&args.namespace);
    loop {
        // Sync now, then wait for a change or the resync tick; bursts coalesce into one pass.
        if synced[1] {
            let data = cm_cache
                .get(&cm_ref)
                .and_then(|cm| cm.data.get("data").cloned());
            match config::parse_data_json(data.as_ref()) {
                Ok(next) => {
                    health.update(|s| s.config_error = None);
                    if next != cfg {
                        let restart = config::needs_restart(&cfg, &next);
                        if !restart.is_empty() {
                            tracing::warn!(keys = ?restart, "sluice-config changed keys that take effect at the next restart");
                        }
                        let previous_level = cfg.log_level.clone();
                        cfg = AgentConfig {
                            masquerade: next.masquerade,
                            encryption: next.encryption,
                            log_level: next.log_level.clone(),
                            wireguard_keepalive: next.wireguard_keepalive,
                            policy_log_drops: next.policy_log_drops,
                            ..cfg
                        };
                        log_drops.send_if_modified(|v| {
                            std::mem::replace(v, cfg.policy_log_drops) != cfg.policy_log_drops
                        });
                        if cfg.log_level != previous_level && !crate::set_log_level(&cfg.log_level)
                        {
                            tracing::info!(
                                log_level = cfg.log_level,
                                "RUST_LOG is set and decides the log level; log-level ignored"
                            );
                        }
                        tracing::info!("sluice-config applied");
                    }
                }
                Err(e) => {
                    if health.snapshot().config_error.as_deref() != Some(e.to_string().as_str()) {
                        tracing::error!(error = %e, "sluice-config rejected; keeping the last good configuration");
                    }
                    health.update(|s| s.config_error = Some(e.to_string()));
                }
            }
        }
        // The record peers see: a changed key or `encryption` is published at once, not at the
        // next renewal, since peers switch on it.
        wg.refresh_key().await;
        let record = wireguard::record_with(&held.record, wg.public_key(), wg_enabled(&cfg));
        let record_changed = record != held.record;
        if record_changed {
            tracing::info!(encryption = %record.encryption, public_key = record.wireguard_public_key.as_deref().unwrap_or(""), "publishing this node's record");
            base_record = wireguard::record_with(&base_record, wg.public_key(), wg_enabled(&cfg));
            held.record = record;
        }
        let now = SystemTime::now();
        if record_changed || lease::renew_due(&held.lease, now) {
            match renew(&store, &held.lease, &held.record, now).await {
                Ok(l) => held.lease = l,
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                    // The lease went (its Node was deleted, and the lease with it) or changed.
                    // Only a node that still exists takes a subnet again, owned by the Node as
                    // it is now; a deleted node's agent waits for it to be registered again.
                    match node::facts(&nodes, &node).await {
                        Ok(now_facts) => {
                            tracing::warn!(node, "subnet lease changed under us; taking it again");
                            let owner = NodeOwner {
                                name: node.clone(),
                                uid: now_facts.uid.clone(),
                            };
                            let taken = subnet::take(
                                &store,
                                subnet::TakeRequest {
                                    cfg: &cfg,
                                    record: &base_record,
                                    owner: &owner,
                                    facts: &now_facts,
                                    prefer: Some(held.record.subnet),
                                    legacy: &[],
                                },
                            );
                            match taken.await {
                                Ok(h) => held = h,
                                Err(e) => tracing::error!(
                                    error = format!("{e:#}"),
                                    "cannot take a subnet"
                                ),
                            }
                        }
                        Err(e) => tracing::warn!(
                            node,
                            error = format!("{e:#}"),
                            "node not readable; not taking a subnet"
                        ),
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the subnet lease failed; will retry")
                }
            }
        }
        let expires = held.lease.expires_at().unwrap_or(now);
        health.update(|s| s.lease = Some((held.record.subnet.to_string(), expires)));
        health.metrics.lease_held.set(i64::from(expires > now));
        health
            .metrics
            .lease_expiry_seconds
            .set(expires.duration_since(now).map_or(0.0, |d| d.as_secs_f64()));
        let env = SubnetEnv {
            network: cfg.cluster_cidr,
            subnet: held.record.subnet,
            mtu: pod_mtu,
            ipmasq: cfg.masquerade,
        };
        if let Err(e) = write_subnet_env(&args.subnet_file, &env) {
            tracing::error!(error = format!("{e:#}"), "cannot write the subnet file");
        }
        let mut views: Vec<LeaseView> = if synced[0] {
            lease_cache
                .state()
                .iter()
                .filter_map(|l| store.view(l))
                .collect()
        } else {
            store.list().await.unwrap_or_default()
        };
        // Peers still on sluice 0.1; of two records of one node the newer wins.
        if let Some(cache) = &legacy_cache {
            let state = cache.state();
            views.extend(kube_leases::legacy_views(
                state.iter().map(|o| &**o),
                &skips,
                &health,
            ));
        }
        let (peers, skipped) = lease::peers_from_leases(&node, &views);
        for s in &skipped {
            tracing::debug!(lease = s.lease, reason = %s.reason, "peer record skipped");
        }
        let mut plan = vxlan::plan(&held.record, &peers, &vx);
        let accepted: Vec<NodeRecord> = peers
            .iter()
            .filter(|p| !plan.skipped.iter().any(|s| s.node == p.node))
            .cloned()
            .collect();
        let wg_plan = sluice_net::wireguard::plan(
            &held.record,
            &accepted,
            &wireguard::settings(
                wg_enabled(&cfg),
                cfg.wireguard_port,
                cfg.wireguard_keepalive,
            ),
        );
        plan.routes.retain(|dst, _| !wg_plan.routes.contains(dst));
        let started = std::time::Instant::now();
        let mut wg_error = wg.before_vxlan(&wg_plan).await.err();
        let vx_result = kernel.sync(&plan).await;
        if let Err(e) = wg.after_vxlan(&wg_plan).await {
            wg_error.get_or_insert(e);
        }
        if forwarding.is_err() {
            forwarding = enable_ip_forward();
        }
        let synced_ok = match vx_result {
            Ok(_) if forwarding.is_err() => {
                let e = forwarding.clone().err().unwrap_or_default();
                health.update(|s| s.datapath_error = Some(e));
                false
            }
            Ok(changes) if wg_error.is_none() => {
                if !changes.is_empty() {
                    tracing::info!(node, peers = peers.len(), changes = changes.len(), took = ?started.elapsed(), "datapath synced");
                }
                health.update(|s| {
                    s.datapath_programmed = true;
                    s.datapath_error = None;
                });
                true
            }
            Ok(_) => {
                let e = wg_error.unwrap_or_default();
                tracing::error!(error = %e, "WireGuard sync failed; will retry");
                health.metrics.datapath_errors.inc();
                health.update(|s| s.datapath_error = Some(format!("WireGuard: {e}")));
                false
            }
            Err(e) => {
                tracing::error!(error = %e, "datapath sync failed; will retry");
                health.metrics.datapath_errors.inc();
                health.update(|s| s.datapath_error = Some(e.to_string()));
                false
            }
        };
        health
            .metrics
            .datapath_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        health
            .metrics
            .peers
            .set((plan.routes.len() + wg_plan.routes.len()) as i64);
        wg.export(&health).await;
        // The CNI config goes in place only now: a runtime that finds it takes pods, whose ADD
        // needs the subnet file and a datapath. Once written it stays (and is repaired), even
        // while the lease is lost: running pods keep running, and /readyz says why.
        if synced_ok || cni_config_written {
            match crate::install::write_conflist(
                &args.cni_conf_dir,
                &args.subnet_file,
                &args.ipam_dir,
            ) {
                Ok(changed) => {
                    if changed {
                        tracing::info!(dir = %args.cni_conf_dir.display(), "CNI config installed");
                    }
                    cni_config_written = true;
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "cannot write the CNI config");
                    health.update(|s| s.datapath_error = Some(format!("CNI config: {e:#}")));
                }
            }
        }
        if synced_ok && cni_config_written && !marked_available {
            match node::set_network_available(&nodes, &node, true).await {
                Ok(()) => marked_available = true,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "cannot update the node's status")
                }
            }
        }
        if let Err(e) = repair_pods(&pod_handle, &ipam_store).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot check this node's pods' host side"
            );
        }
        let masq = sluice_net::masq::plan(cfg.cluster_cidr, cfg.masquerade, Some(untracked));
        if let Err(e) = masq_nft.sync(&masq).await {
            tracing::warn!(error = %e, "masquerade sync failed; will retry");
        }
        for (verb, results) in sluice_net::cni::stats::read(&args.ipam_dir) {
            for (result, n) in results {
                health
                    .metrics
                    .cni_calls
                    .get_or_create(&sluice_health::metrics::CniLabels {
                        verb: verb.clone(),
                        result,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        watch_sync.set_datapath(synced.iter().all(|b| *b), &health);
        health.update(|s| {
            // The policy loop owns the document's `policy` part.
            let policy = s.status.get("policy").cloned();
            s.status = status_document(&node, &held, &cfg, &vx, &peers, expires);
            wireguard::annotate_status(&mut s.status, &wg_plan, wg.backend(), cfg.wireguard_port);
            if let (Some(p), Some(doc)) = (policy, s.status.as_object_mut()) {
                doc.insert("policy".into(), p);
            }
        });
        health.beat("agent");
        tokio::select! {
            Some((source, init_done)) = events.next() => {
                synced[source] |= init_done;
                // Let a burst of events land before the next pass.
                tokio::time::sleep(Duration::from_millis(20)).await;
                while let Some(Some((source, init_done))) = futures::FutureExt::now_or_never(events.next()) {
                    synced[source] |= init_done;
                }
            }
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!(node, "sluice agent stopping; the datapath stays in place");
    Ok(())
}

/// What `sluice status` shows: this node's subnet, lease, tunnel and each peer.
fn status_document(
    node: &str,
    held: &Held,
    cfg: &AgentConfig,
    vx: &VxlanConfig,
    peers: &[NodeRecord],
    expires: SystemTime,
) -> serde_json::Value {
    let expires = jiff::Timestamp::try_from(expires)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default();
    serde_json::json!({
        "node": node,
        "subnet": held.record.subnet.to_string(),
        "lease": {"name": held.lease.name, "expires": expires},
        "underlay": held.record.underlay_ip.to_string(),
        "encryption": match cfg.encryption { config::Encryption::None => "none", config::Encryption::Wireguard => "wireguard" },
        "tunnel": {"device": vx.ifname, "vni": vx.vni, "port": vx.port, "mtu": vx.mtu},
        "peers": peers.iter().map(|p| serde_json::json!({
            "node": p.node,
            "subnet": p.subnet.to_string(),
            "underlay": p.underlay_ip.to_string(),
            "tunnel": "vxlan",
            "vtepMac": lease::format_mac(&p.vtep_mac),
        })).collect::<Vec<_>>(),
        "policy": {"backend": "none", "rules": 0, "pods": 0},
    })
}
