//! The agent's node loop (heartbeat `agent`): each pass takes a snapshot (the configuration, the
//! node's lease, its peers' records), plans the datapath with one pure function
//! ([`sluice_net::datapath::plan`]) and has the backends apply it, then puts the node's own
//! state in place (the subnet file, the CNI config, `NetworkUnavailable`, the host side of its
//! pods, the NAT table) and reports. It does not know which tunnels exist: they are the
//! [`Datapath`]'s backends.

use super::config::{self, AgentConfig, Encryption, Mtu};
use super::kube_leases::{self, KubeLeases};
use super::subnet::{self, Held};
use super::{node, tolerant, AgentArgs, WatchSync, CONFIG_MAP};
use anyhow::{bail, Context, Result};
use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use sluice_health::Health;
use sluice_net::datapath::direct::DirectBackend;
use sluice_net::datapath::vxlan::VxlanBackend;
use sluice_net::datapath::wireguard::WgBackend;
use sluice_net::datapath::{self, Datapath, DatapathConfig, DatapathPlan, Path};
use sluice_net::lease::store::{renew, LeaseStore, StoreError};
use sluice_net::lease::{self, LeaseView, NodeOwner, NodeRecord};
use sluice_net::subnet_env::SubnetEnv;
use sluice_net::vxlan::{self, apply::VxlanKernel, VxlanConfig};
use sluice_net::wireguard::WgSettings;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Which watch an event came from, and whether that watch has now listed everything.
type Events = BoxStream<'static, (usize, bool)>;
const LEASES: usize = 0;
const CONFIG: usize = 1;

/// What the loop keeps between passes.
pub struct NodeLoop {
    args: AgentArgs,
    node: String,
    health: Health,
    nodes: Api<Node>,
    store: KubeLeases,
    skips: Arc<tolerant::Skips>,
    cfg: AgentConfig,
    /// `cluster-cidr`'s IPv4 range (none on an IPv6-only cluster), taken at the start (it
    /// needs a restart to change).
    cluster_v4: Option<ipnet::Ipv4Net>,
    /// This node's record before the backends add theirs (name, underlay, VTEP MAC).
    base_record: NodeRecord,
    held: Held,
    datapath: Datapath,
    underlay: sluice_net::vxlan::apply::Underlay,
    vxlan: VxlanConfig,
    lease_cache: Store<DynamicObject>,
    legacy_cache: Option<Store<DynamicObject>>,
    cm_cache: Store<DynamicObject>,
    cm_ref: ObjectRef<DynamicObject>,
    events: Events,
    synced: [bool; 2],
    watch_sync: Arc<WatchSync>,
    log_drops: tokio::sync::watch::Sender<bool>,
    cni_config_written: bool,
    marked_available: bool,
    forwarding: Result<(), String>,
    masq: sluice_net::masq::NftCli,
    pod_handle: rtnetlink::Handle,
    ipam: sluice_net::ipam::IpamStore,
    /// Where hostPorts go, once the policy firewall is chosen.
    hostport_backend: super::hostports::Resolved,
    /// Whether this start's restore of the hostPorts is done.
    hostports_restored: bool,
}

/// sluice-config as the dynamic API reads it, so a value of the wrong JSON type is a reported
/// bad value rather than an object that never decodes.
pub fn config_api(client: Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, namespace, &ApiResource::erase::<ConfigMap>(&()))
}

pub async fn read_config(api: &Api<DynamicObject>, health: &Health) -> Result<AgentConfig> {
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

/// What the datapath plan needs from this pass's configuration.
fn datapath_config(
    cfg: &AgentConfig,
    underlay: &vxlan::apply::Underlay,
    vx: &VxlanConfig,
) -> DatapathConfig {
    DatapathConfig {
        overlay: cfg.overlay,
        underlay: underlay.network,
        underlay_v6: underlay.network_v6,
        underlay_ifindex: underlay.ifindex,
        vxlan: vx.clone(),
        wireguard: WgSettings {
            enabled: cfg.encryption == Encryption::Wireguard,
            port: cfg.wireguard_port,
            keepalive_secs: cfg.wireguard_keepalive,
        },
    }
}

/// The pods' MTU: a fixed `mtu`, or what `overlay` and `encryption` leave of the underlay's.
/// Over an IPv6 underlay the tunnels' outer header is 20 bytes longer.
fn pod_mtu(cfg: &AgentConfig, underlay: &vxlan::apply::Underlay) -> u32 {
    match cfg.mtu {
        Mtu::Fixed(m) => m,
        Mtu::Auto => datapath::auto_pod_mtu_for(
            cfg.overlay,
            cfg.encryption == Encryption::Wireguard,
            underlay.mtu,
            underlay.network.addr().is_ipv6(),
        ),
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
    tracing::info!(subnet = ?env.v4.map(|v| v.subnet), subnet_v6 = ?env.v6.map(|v| v.subnet), mtu = env.mtu, path = %path.display(), "subnet file written");
    Ok(())
}

/// A reflector over `api` whose events say `source` and whether the watch has listed all.
fn watch(
    api: Api<DynamicObject>,
    config: watcher::Config,
    resource: &ApiResource,
    source: usize,
) -> (Store<DynamicObject>, Events) {
    let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
    let reader = writer.as_reader();
    let events = reflector(writer, watcher(api, config))
        .default_backoff()
        .map(move |e| (source, matches!(e, Ok(watcher::Event::InitDone))))
        .boxed();
    (reader, events)
}

impl NodeLoop {
    /// Everything before the first pass: the node, its underlay, its subnet, the backends and
    /// the watches. Retries what the API server may not answer yet; fails only on what a retry
    /// cannot mend (no underlay address).
    pub async fn start(
        args: AgentArgs,
        client: Client,
        health: Health,
        cfg: AgentConfig,
        watch_sync: Arc<WatchSync>,
        log_drops: tokio::sync::watch::Sender<bool>,
        hostport_backend: super::hostports::Resolved,
    ) -> Result<Self> {
        let node = args.node_name.clone();
        let cluster_v4 = cfg.cluster_cidr.v4;
        let nodes: Api<Node> = Api::all(client.clone());
        let skips = Arc::new(tolerant::Skips::default());
        let store = KubeLeases::new(
            client.clone(),
            &args.lease_namespace,
            skips.clone(),
            health.clone(),
        );
        let facts = super::with_backoff("reading this node", || node::facts(&nodes, &node)).await;
        // Until the datapath is up, the node says its network is unavailable (and is tainted).
        if let Err(e) = node::set_network_available(&nodes, &node, false).await {
            tracing::warn!(error = format!("{e:#}"), "cannot update the node's status");
        }
        let Some(underlay_ip) = args.underlay_ip.or(facts.internal_ip) else {
            bail!("node {node} has no InternalIP and no --underlay-ip was given");
        };
        let kernel = VxlanKernel::connect()?;
        let underlay = kernel
            .underlay_by_address(underlay_ip)
            .await
            .with_context(|| format!("finding the link with {underlay_ip}"))?;
        let mut vx = VxlanConfig::auto(underlay.ifindex, underlay_ip, underlay.mtu);
        vx.port = cfg.vxlan_port;
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        vx.tx_checksum_offload = vxlan::tx_checksum_offload_safe(release.trim());
        tracing::info!(kernel = release.trim(), tx_checksum_offload = vx.tx_checksum_offload, underlay = %underlay.network, "underlay found");
        let wg_mtu = match cfg.mtu {
            Mtu::Fixed(m) => {
                vx.mtu = m;
                m
            }
            Mtu::Auto => sluice_net::wireguard::auto_mtu_for(underlay.mtu, underlay_ip.is_ipv6()),
        };
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        let mut datapath = Datapath::new(vec![
            Box::new(WgBackend::new(
                args.wireguard_key.clone(),
                cfg.wireguard_port,
                wg_mtu,
            )),
            Box::new(DirectBackend::new(handle.clone())),
            Box::new(VxlanBackend::new(kernel)),
        ]);
        for (backend, e) in datapath.refresh().await {
            tracing::warn!(backend, error = %e, "datapath backend not ready");
        }
        let owner = NodeOwner {
            name: node.clone(),
            uid: facts.uid.clone(),
        };
        let base_record = NodeRecord {
            node: node.clone(),
            underlay_ip,
            underlay_ip_v6: underlay.network_v6.map(|n| n.addr()),
            vtep_mac: vxlan::vtep_mac(&node),
            wireguard_public_key: None,
            encryption: "none".into(),
            subnet: None,
            subnet_v6: None,
        };
        let published = datapath.publish(&base_record, &datapath_config(&cfg, &underlay, &vx));
        let before = SubnetEnv::load(&args.subnet_file).ok();
        let prefer = before.as_ref().and_then(|e| e.v4).map(|v4| v4.subnet);
        let prefer_v6 = before.and_then(|e| e.v6).map(|v6| v6.subnet);
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
        let held = super::with_backoff("taking a subnet", || {
            subnet::take(
                &store,
                subnet::TakeRequest {
                    cfg: &cfg,
                    record: &published,
                    owner: &owner,
                    facts: &facts,
                    prefer,
                    prefer_v6,
                    legacy: &legacy_now,
                },
            )
        })
        .await;
        let forwarding = super::enable_ip_forward(held.record.subnet_v6.is_some(), &underlay.name);
        if let Err(e) = &forwarding {
            tracing::error!(error = e.as_str(), "pods cannot be forwarded");
        }
        let lease_resource = ApiResource::erase::<k8s_openapi::api::coordination::v1::Lease>(&());
        let (lease_cache, lease_events) = watch(
            kube_leases::raw_api(client.clone(), &args.lease_namespace),
            watcher::Config::default().labels(&kube_leases::selector()),
            &lease_resource,
            LEASES,
        );
        // sluice 0.1's leases: a cache only, which does not wake the loop (kube-system's
        // leader-election leases change every two seconds).
        let legacy_cache = legacy_api.map(|api| {
            let (cache, mut events) =
                watch(api, watcher::Config::default(), &lease_resource, LEASES);
            tokio::spawn(async move { while events.next().await.is_some() {} });
            cache
        });
        let cm_resource = ApiResource::erase::<ConfigMap>(&());
        let (cm_cache, cm_events) = watch(
            config_api(client, &args.namespace),
            watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}")),
            &cm_resource,
            CONFIG,
        );
        let cm_ref =
            ObjectRef::<DynamicObject>::new_with(CONFIG_MAP, cm_resource).within(&args.namespace);
        Ok(Self {
            ipam: sluice_net::ipam::IpamStore::new(&args.ipam_dir),
            node,
            health,
            nodes,
            store,
            skips,
            cfg,
            cluster_v4,
            base_record,
            held,
            datapath,
            underlay,
            vxlan: vx,
            lease_cache,
            legacy_cache,
            cm_cache,
            cm_ref,
            events: futures::stream::select(lease_events, cm_events).boxed(),
            synced: [false, false],
            watch_sync,
            log_drops,
            cni_config_written: false,
            marked_available: false,
            forwarding,
            masq: sluice_net::masq::NftCli::default(),
            pod_handle: handle,
            hostport_backend,
            hostports_restored: false,
            args,
        })
    }

    /// Passes until the process is told to stop: now, then on every change (bursts coalesced)
    /// and at least every `resync_secs` (drift repair).
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.args.resync_secs.max(1)));
        loop {
            self.pass().await;
            tokio::select! {
                Some((source, init_done)) = self.events.next() => {
                    self.synced[source] |= init_done;
                    // Let a burst of events land before the next pass.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    while let Some(Some((source, init_done))) = futures::FutureExt::now_or_never(self.events.next()) {
                        self.synced[source] |= init_done;
                    }
                }
                _ = tick.tick() => {}
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        tracing::info!(
            node = self.node,
            "sluice agent stopping; the datapath stays in place"
        );
    }

    async fn pass(&mut self) {
        self.take_config();
        let dp_cfg = datapath_config(&self.cfg, &self.underlay, &self.vxlan);
        for (backend, e) in self.datapath.refresh().await {
            tracing::warn!(backend, error = %e, "datapath backend refresh failed");
        }
        self.keep_lease(&dp_cfg).await;
        let env = SubnetEnv {
            // The IPv4 pair on a node with IPv4 (none on an IPv6-only one).
            v4: self
                .cluster_v4
                .zip(self.held.record.subnet)
                .map(|(network, subnet)| sluice_net::subnet_env::SubnetV4 { network, subnet }),
            mtu: pod_mtu(&self.cfg, &self.underlay),
            ipmasq: self.cfg.masquerade,
            policy_backend: self.hostport_backend.get().map(|b| b.name().to_string()),
            // The IPv6 pair of a dual-stack or IPv6-only node: sluice-cni gives every pod an
            // address of each family the file has.
            v6: self
                .cfg
                .cluster_cidr
                .v6
                .zip(self.held.record.subnet_v6)
                .map(|(network, subnet)| sluice_net::subnet_env::SubnetV6 { network, subnet }),
        };
        match write_subnet_env(&self.args.subnet_file, &env) {
            // Restored only once the plugin is told the same backend (an ADD after this
            // writes where the restore did).
            Ok(()) => self.restore_hostports(env.policy_backend.as_deref()).await,
            Err(e) => tracing::error!(error = format!("{e:#}"), "cannot write the subnet file"),
        }
        let peers = self.peers().await;
        let plan = datapath::plan(&self.held.record, &peers, &dp_cfg);
        let started = Instant::now();
        let applied = self.datapath.apply(&plan).await;
        let datapath_ok = self.report_datapath(&plan, applied, started).await;
        self.node_up(datapath_ok).await;
        self.host_side().await;
        self.watch_sync
            .set_datapath(self.synced.iter().all(|b| *b), &self.health);
        self.publish_status(&plan);
        self.health.beat("agent");
    }

    /// The live keys of a sluice-config that parses; a bad one keeps the last good.
    fn take_config(&mut self) {
        if !self.synced[CONFIG] {
            return;
        }
        let data = self
            .cm_cache
            .get(&self.cm_ref)
            .and_then(|cm| cm.data.get("data").cloned());
        let next = match config::parse_data_json(data.as_ref()) {
            Ok(next) => next,
            Err(e) => {
                if self.health.snapshot().config_error.as_deref() != Some(e.to_string().as_str()) {
                    tracing::error!(error = %e, "sluice-config rejected; keeping the last good configuration");
                }
                self.health.update(|s| s.config_error = Some(e.to_string()));
                return;
            }
        };
        self.health.update(|s| s.config_error = None);
        if next == self.cfg {
            return;
        }
        let restart = config::needs_restart(&self.cfg, &next);
        if !restart.is_empty() {
            tracing::warn!(keys = ?restart, "sluice-config changed keys that take effect at the next restart");
        }
        let previous_level = self.cfg.log_level.clone();
        self.cfg = config::with_live_keys(&self.cfg, &next);
        let drops = self.cfg.policy_log_drops;
        self.log_drops
            .send_if_modified(|v| std::mem::replace(v, drops) != drops);
        if self.cfg.log_level != previous_level && !crate::set_log_level(&self.cfg.log_level) {
            tracing::info!(
                log_level = self.cfg.log_level,
                "RUST_LOG is set and decides the log level; log-level ignored"
            );
        }
        tracing::info!(overlay = self.cfg.overlay.as_str(), encryption = ?self.cfg.encryption, "sluice-config applied");
    }

    /// Publishes the node's record (a changed key or `encryption` at once: peers switch on it)
    /// and renews the lease; takes a subnet again if the lease went.
    async fn keep_lease(&mut self, dp_cfg: &DatapathConfig) {
        let record = self.datapath.publish(&self.held.record, dp_cfg);
        let changed = record != self.held.record;
        if changed {
            tracing::info!(encryption = %record.encryption, public_key = record.wireguard_public_key.as_deref().unwrap_or(""), "publishing this node's record");
            self.held.record = record;
        }
        let now = SystemTime::now();
        let mut retaken = false;
        if changed || lease::renew_due(&self.held.lease, now) {
            match renew(&self.store, &self.held.lease, &self.held.record, now).await {
                Ok(l) => self.held.lease = l,
                Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                    self.retake(dp_cfg).await;
                    retaken = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the subnet lease failed; will retry")
                }
            }
        }
        // A dual-stack node's IPv6 lease, renewed alike (a retake just wrote both).
        if let Some(v6) = self.held.lease_v6.clone().filter(|_| !retaken) {
            if changed || lease::renew_due(&v6, now) {
                match renew(&self.store, &v6, &self.held.record, now).await {
                    Ok(l) => self.held.lease_v6 = Some(l),
                    Err(StoreError::Conflict { .. } | StoreError::NotFound { .. }) => {
                        self.retake(dp_cfg).await
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the IPv6 subnet lease failed; will retry")
                    }
                }
            }
        }
        let expires = self.held.lease.expires_at().unwrap_or(now);
        let subnet = first_subnet(&self.held.record);
        self.health.update(|s| s.lease = Some((subnet, expires)));
        let m = &self.health.metrics;
        m.lease_held.set(i64::from(expires > now));
        m.lease_expiry_seconds
            .set(expires.duration_since(now).map_or(0.0, |d| d.as_secs_f64()));
    }

    /// The lease went (its Node was deleted, and the lease with it) or changed. Only a node
    /// that still exists takes a subnet again, owned by the Node as it is now; a deleted node's
    /// agent waits for it to be registered again.
    async fn retake(&mut self, dp_cfg: &DatapathConfig) {
        let facts = match node::facts(&self.nodes, &self.node).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    node = self.node,
                    error = format!("{e:#}"),
                    "node not readable; not taking a subnet"
                );
                return;
            }
        };
        tracing::warn!(
            node = self.node,
            "subnet lease changed under us; taking it again"
        );
        let owner = NodeOwner {
            name: self.node.clone(),
            uid: facts.uid.clone(),
        };
        let record = self.datapath.publish(&self.base_record, dp_cfg);
        let taken = subnet::take(
            &self.store,
            subnet::TakeRequest {
                cfg: &self.cfg,
                record: &record,
                owner: &owner,
                facts: &facts,
                prefer: self.held.record.subnet,
                prefer_v6: self.held.record.subnet_v6,
                legacy: &[],
            },
        );
        match taken.await {
            Ok(h) => self.held = h,
            Err(e) => tracing::error!(error = format!("{e:#}"), "cannot take a subnet"),
        }
    }

    /// Every peer's record, from the leases (and, while peers still run sluice 0.1, theirs).
    async fn peers(&self) -> Vec<NodeRecord> {
        let mut views: Vec<LeaseView> = if self.synced[LEASES] {
            self.lease_cache
                .state()
                .iter()
                .filter_map(|l| self.store.view(l))
                .collect()
        } else {
            self.store.list().await.unwrap_or_default()
        };
        // Of two records of one node the newer wins.
        if let Some(cache) = &self.legacy_cache {
            let state = cache.state();
            views.extend(kube_leases::legacy_views(
                state.iter().map(|o| &**o),
                &self.skips,
                &self.health,
            ));
        }
        let (peers, skipped) = lease::peers_from_leases(&self.node, &views);
        for s in &skipped {
            tracing::debug!(lease = s.lease, reason = %s.reason, "peer record skipped");
        }
        peers
    }

    /// Readiness and metrics of the pass; true when the datapath is as planned.
    async fn report_datapath(
        &mut self,
        plan: &DatapathPlan,
        applied: datapath::Applied,
        started: Instant,
    ) -> bool {
        if self.forwarding.is_err() {
            self.forwarding =
                super::enable_ip_forward(self.held.record.subnet_v6.is_some(), &self.underlay.name);
        }
        let error = match (&self.forwarding, applied.errors.as_slice()) {
            (Err(e), _) => Some(e.clone()),
            (Ok(()), []) => None,
            (Ok(()), errors) => Some(
                errors
                    .iter()
                    .map(|(backend, e)| format!("{backend}: {e}"))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        let unreachable: Vec<String> = plan
            .unreachable()
            .filter_map(|p| {
                let why = p.unreachable_why()?;
                Some(format!(
                    "{} (underlay {}): {why}",
                    p.peer.node, p.peer.underlay_ip
                ))
            })
            .collect();
        let m = &self.health.metrics;
        m.datapath_sync_seconds
            .observe(started.elapsed().as_secs_f64());
        m.peers
            .set((plan.paths.len() - plan.count(Path::Unreachable)) as i64);
        for path in [
            Path::Direct,
            Path::Vxlan,
            Path::Wireguard,
            Path::Unreachable,
        ] {
            m.peers_by_path
                .get_or_create(&sluice_health::metrics::PathLabels {
                    path: path.as_str().into(),
                })
                .set(plan.count(path) as i64);
        }
        let ok = error.is_none();
        match &error {
            None if applied.changes > 0 => {
                tracing::info!(node = self.node, peers = plan.paths.len(), changes = applied.changes, took = ?started.elapsed(), "datapath synced");
            }
            None => {}
            Some(e) => {
                tracing::error!(error = e.as_str(), "datapath sync failed; will retry");
                m.datapath_errors.inc();
            }
        }
        for u in &unreachable {
            tracing::warn!(peer = u.as_str(), "peer unreachable");
        }
        self.export_peer_stats().await;
        self.health.update(|s| {
            s.datapath_programmed |= ok;
            s.datapath_error = error;
            s.unreachable_peers = unreachable;
        });
        ok
    }

    /// Per-peer counters on /metrics; peers gone leave the metric too.
    async fn export_peer_stats(&mut self) {
        let stats = self.datapath.peer_stats().await;
        let m = &self.health.metrics;
        m.peer_rx_bytes.clear();
        m.peer_tx_bytes.clear();
        m.peer_handshake_age_seconds.clear();
        let now = SystemTime::now();
        for s in stats {
            let l = sluice_health::metrics::PeerLabels {
                peer: s.node.clone(),
            };
            m.peer_rx_bytes
                .get_or_create(&l)
                .set(i64::try_from(s.rx_bytes).unwrap_or(i64::MAX));
            m.peer_tx_bytes
                .get_or_create(&l)
                .set(i64::try_from(s.tx_bytes).unwrap_or(i64::MAX));
            if let Some(at) = s.last_handshake {
                let age = now.duration_since(at).unwrap_or_default();
                m.peer_handshake_age_seconds
                    .get_or_create(&l)
                    .set(age.as_secs_f64());
            }
        }
    }

    /// The CNI config goes in place only once the datapath is up: a runtime that finds it takes
    /// pods, whose ADD needs the subnet file and a datapath. Once written it stays (and is
    /// repaired), even while the lease is lost: running pods keep running, and /readyz says
    /// why. Then the node's network is available.
    async fn node_up(&mut self, datapath_ok: bool) {
        if datapath_ok || self.cni_config_written {
            let a = &self.args;
            match crate::install::write_conflist(&a.cni_conf_dir, &a.subnet_file, &a.ipam_dir) {
                Ok(changed) => {
                    if changed {
                        tracing::info!(dir = %a.cni_conf_dir.display(), "CNI config installed");
                    }
                    self.cni_config_written = true;
                }
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "cannot write the CNI config");
                    self.health
                        .update(|s| s.datapath_error = Some(format!("CNI config: {e:#}")));
                }
            }
        }
        if datapath_ok && self.cni_config_written && !self.marked_available {
            match node::set_network_available(&self.nodes, &self.node, true).await {
                Ok(()) => self.marked_available = true,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "cannot update the node's status")
                }
            }
        }
    }

    /// The node's own state beside the datapath: its pods' host side, the NAT and conntrack
    /// table, and the CNI plugin's call counts.
    /// Once per start, when the hostPort backend is known and published: the mappings of live
    /// pods written back, those of pods that are gone dropped (see [`super::hostports`]).
    async fn restore_hostports(&mut self, published: Option<&str>) {
        if self.hostports_restored {
            return;
        }
        let Some(&backend) = self.hostport_backend.get() else {
            return;
        };
        if published != Some(backend.name()) {
            return;
        }
        let links = match sluice_net::pod_repair::observe(&self.pod_handle).await {
            Ok(seen) => seen.links.into_keys().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the pods' veths; hostPorts restored at a later pass");
                return;
            }
        };
        let dir = self.args.ipam_dir.clone();
        let done = tokio::task::spawn_blocking(move || {
            super::hostports::restore(&sluice_net::ipam::IpamStore::new(dir), backend, &links)
        })
        .await;
        match done {
            Ok(Ok(r)) => {
                tracing::info!(
                    backend = backend.name(),
                    kept = r.kept,
                    swept = r.swept,
                    "hostPorts restored"
                );
                self.hostports_restored = true;
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "restoring hostPorts failed; will retry"
                )
            }
            Err(e) => tracing::warn!(error = %e, "restoring hostPorts failed; will retry"),
        }
    }

    async fn host_side(&mut self) {
        if let Err(e) = super::repair_pods(&self.pod_handle, &self.ipam).await {
            tracing::warn!(
                error = format!("{e:#}"),
                "cannot check this node's pods' host side"
            );
        }
        // The VXLAN device's address and port are fixed for the agent's life; its packets are
        // untracked in the table of the underlay's family.
        let untracked = Some(sluice_net::masq::UntrackedTunnel {
            underlay_ip: self.vxlan.underlay_ip,
            port: self.vxlan.port,
        });
        let v6 = self
            .cfg
            .cluster_cidr
            .v6
            .filter(|_| self.held.record.subnet_v6.is_some());
        let masq = match (self.cluster_v4, v6) {
            (Some(v4), v6) => {
                let masq =
                    sluice_net::masq::plan(v4, self.cfg.masquerade, untracked).with_mss_clamp(v4);
                // A dual-stack node: IPv6 pod egress leaving the cluster is masqueraded alike.
                match v6 {
                    Some(v6) => masq.with_ipv6(v6, self.cfg.masquerade).with_mss_clamp(v6),
                    None => masq,
                }
            }
            // An IPv6-only node: the IPv6 rules only.
            (None, Some(v6)) => {
                sluice_net::masq::plan_ipv6_only(v6, self.cfg.masquerade, untracked)
                    .with_mss_clamp(v6)
            }
            // No subnet of either family (not reached: a node runs with one).
            (None, None) => sluice_net::masq::MasqPlan {
                rules: Vec::new(),
                untracked,
                mss_clamp: Vec::new(),
            },
        };
        if let Err(e) = self.masq.sync(&masq).await {
            tracing::warn!(error = %e, "masquerade sync failed; will retry");
        }
        for (verb, results) in sluice_net::cni::stats::read(&self.args.ipam_dir) {
            for (result, n) in results {
                self.health
                    .metrics
                    .cni_calls
                    .get_or_create(&sluice_health::metrics::CniLabels {
                        verb: verb.clone(),
                        result,
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
    }

    fn publish_status(&self, plan: &DatapathPlan) {
        let mut doc = status_document(&self.node, &self.held, &self.cfg, plan);
        if let Some(map) = doc.as_object_mut() {
            for (key, value) in self.datapath.describe(plan) {
                map.insert(key.into(), value);
            }
        }
        self.health.update(|s| {
            // The policy loop owns the document's `policy` part.
            let policy = s.status.get("policy").cloned();
            s.status = doc;
            if let (Some(p), Some(map)) = (policy, s.status.as_object_mut()) {
                map.insert("policy".into(), p);
            }
        });
    }
}

/// The subnet of the node's first lease, for `/readyz`: its IPv4 one, or an IPv6-only node's
/// IPv6 one.
fn first_subnet(record: &NodeRecord) -> String {
    record
        .subnet
        .map(|s| s.to_string())
        .or(record.subnet_v6.map(|s| s.to_string()))
        .unwrap_or_default()
}

/// What `sluice status` shows: this node's subnet, lease and settings, and each peer with its
/// path and why.
fn status_document(
    node: &str,
    held: &Held,
    cfg: &AgentConfig,
    plan: &DatapathPlan,
) -> serde_json::Value {
    let expires = held
        .lease
        .expires_at()
        .and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default();
    serde_json::json!({
        "node": node,
        "subnet": held.record.subnet.map(|s| s.to_string()),
        "subnetV6": held.record.subnet_v6.map(|s| s.to_string()),
        "lease": {"name": held.lease.name, "expires": expires},
        "leaseV6": held.lease_v6.as_ref().map(|l| l.name.clone()),
        "underlay": held.record.underlay_ip.to_string(),
        "underlayV6": held.record.underlay_ip_v6.map(|a| a.to_string()),
        "encryption": match cfg.encryption { Encryption::None => "none", Encryption::Wireguard => "wireguard" },
        "overlay": cfg.overlay.as_str(),
        "peers": plan.paths.iter().map(|p| serde_json::json!({
            "node": p.peer.node,
            "subnet": p.peer.subnet.map(|s| s.to_string()),
            "subnetV6": p.peer.subnet_v6.map(|s| s.to_string()),
            "underlay": p.peer.underlay_ip.to_string(),
            "underlayV6": p.peer.underlay_ip_v6.map(|a| a.to_string()),
            "path": p.path.as_str(),
            "pathV6": p.v6.map(|(path, _)| path.as_str()),
            "whyV6": p.v6.map(|(_, why)| why.to_string()),
            "tunnel": p.path.as_str(),
            "why": p.reason.to_string(),
            "vtepMac": lease::format_mac(&p.peer.vtep_mac),
        })).collect::<Vec<_>>(),
        "skipped": plan.skipped.iter().map(|(n, r)| serde_json::json!({"node": n, "reason": r})).collect::<Vec<_>>(),
        "policy": {"backend": "none", "rules": 0, "pods": 0},
    })
}
