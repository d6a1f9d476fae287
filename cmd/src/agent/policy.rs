//! The agent's policy loop: watches of Pods, Namespaces and NetworkPolicies (cluster-wide) →
//! [`sluice_policy::Compiler`] for this node's pods → the firewall of `policy-backend` →
//! conntrack cuts the flows the new rules deny. Level triggered like the datapath loop: every
//! pass compiles the whole desired state from the caches (the compiler re-reads only the pods
//! and rules that changed since the last pass), and the firewall writes only when its hash
//! differs.
//!
//! A local pod is a Pod with `spec.nodeName` = this node and an address; its host-side veth is
//! read from the kernel, the /32 (and IPv6 /128) route sluice's CNI plugin made to the pod's address (route
//! protocol [`sluice_net::ROUTE_PROTOCOL`]): the route is what steers the pod's traffic, so it is
//! the truth about which interface the rules must name (the IPAM file would only say what the
//! plugin meant to do). A pod without such a route yet stays out of the IR, and its veth drops
//! (fail closed) until a later pass finds it.

use super::{droplog, tolerant, WatchSync};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Client;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol};
use sluice_health::Health;
use sluice_policy::cnp::{self, ClusterNetworkPolicy, NodeAddrs};
use sluice_policy::{
    ClusterPod, Compiler, ConntrackCli, Exec, Firewall, LocalPod, PolicyInput, PolicyIr,
};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds between full passes when nothing changes (drift repair: rules removed by hand, a
/// veth that appeared after its pod's last event).
pub const RESYNC: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("reading the kernel's routes and links: {0}")]
    Netlink(String),
    #[error(transparent)]
    Firewall(#[from] sluice_policy::FirewallError),
    #[error("the firewall task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What the kernel says about local pods and the node: pod address → host-side veth, and the
/// node's own addresses.
struct KernelView {
    links: HashMap<IpAddr, String>,
    host_addrs: Vec<IpAddr>,
}

/// Interface names by index, kept across passes: a dump of every link (a thousand veths, each
/// with its statistics) would cost more than the rest of the kernel read.
type LinkNames = HashMap<u32, String>;

async fn kernel_view(
    handle: &rtnetlink::Handle,
    names: &mut LinkNames,
) -> Result<KernelView, PolicyError> {
    let err = |e: rtnetlink::Error| PolicyError::Netlink(e.to_string());
    let mut routes: Vec<_> = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(err)?;
    let routes6: Vec<_> = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(err)?;
    routes.extend(routes6);
    let mut links = HashMap::new();
    let mut pod_routes = Vec::new();
    for r in &routes {
        if r.header.protocol != RouteProtocol::from(sluice_net::ROUTE_PROTOCOL) {
            continue;
        }
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip))
                if r.header.destination_prefix_length == 32 =>
            {
                Some(IpAddr::V4(*ip))
            }
            RouteAttribute::Destination(RouteAddress::Inet6(ip))
                if r.header.destination_prefix_length == 128 =>
            {
                Some(IpAddr::V6(*ip))
            }
            _ => None,
        });
        let oif = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if let (Some(dst), Some(oif)) = (dst, oif) {
            pod_routes.push((dst, oif));
        }
    }
    // Indexes are not reused soon (the kernel hands them out cyclically): a cached name stays
    // right for as long as its link lives, and goes when no pod route leads to it any more.
    let wanted: HashSet<u32> = pod_routes.iter().map(|(_, oif)| *oif).collect();
    names.retain(|index, _| wanted.contains(index));
    for (dst, oif) in pod_routes {
        let name = match names.entry(oif) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => match link_name(handle, oif).await {
                Ok(Some(name)) => e.insert(name),
                // Gone since the route dump: its pod is on its way out.
                Ok(None) => continue,
                Err(e) => return Err(err(e)),
            },
        };
        if sluice_net::podnet::is_host_ifname(name) {
            links.insert(dst, name.clone());
        }
    }
    let host_addrs = handle
        .address()
        .get()
        .execute()
        .try_filter_map(|a| async move {
            Ok(a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            }))
        })
        .try_collect()
        .await
        .map_err(err)?;
    Ok(KernelView { links, host_addrs })
}

/// The name of link `index`, `None` when it no longer exists.
async fn link_name(
    handle: &rtnetlink::Handle,
    index: u32,
) -> Result<Option<String>, rtnetlink::Error> {
    let mut found = handle.link().get().match_index(index).execute();
    match found.try_next().await {
        Ok(Some(link)) => Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })),
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if e.raw_code() == -(nix::errno::Errno::ENODEV as i32) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Rules in force: per isolated pod and direction, one per address range allowed on every port
/// and one per (protocol, port range) entry. What `sluice_policy_rules` and `sluice status` show.
pub fn rule_count(ir: &PolicyIr) -> usize {
    ir.pods
        .iter()
        .flat_map(|p| [&p.ingress, &p.egress])
        .filter(|d| d.isolated)
        .map(|d| d.all_ports.range_count() + d.ports.len())
        .sum()
}

/// Every pod of the cluster as policy reads it, kept from the pods watch as kube's reflector
/// keeps objects, but as [`ClusterPod`]s: k8s-openapi's `Pod` is about 4 KB before any
/// string, even with every field policy does not read removed, and the agent holds them all.
#[derive(Debug, Default)]
struct PodCache {
    pods: HashMap<(String, String), Arc<ClusterPod>>,
    /// A relist in progress; it replaces `pods` when complete.
    relist: Option<HashMap<(String, String), Arc<ClusterPod>>>,
}

impl PodCache {
    fn apply(&mut self, event: &watcher::Event<Pod>) {
        let key = |pod: &Pod| {
            let meta = &pod.metadata;
            let ns = meta.namespace.clone().unwrap_or_default();
            (ns, meta.name.clone().unwrap_or_default())
        };
        match event {
            watcher::Event::Init => self.relist = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(relist) = &mut self.relist {
                    relist.insert(key(pod), Arc::new(ClusterPod::from(pod)));
                }
            }
            watcher::Event::InitDone => {
                if let Some(relist) = self.relist.take() {
                    self.pods = relist;
                }
            }
            watcher::Event::Apply(pod) => {
                self.pods.insert(key(pod), Arc::new(ClusterPod::from(pod)));
            }
            watcher::Event::Delete(pod) => {
                self.pods.remove(&key(pod));
            }
        }
    }

    /// The pods, in an order that stays the same while they do (the compiler skips reading
    /// the very same list again).
    fn state(&self) -> Vec<Arc<ClusterPod>> {
        self.pods.values().cloned().collect()
    }
}

type SharedPodCache = Arc<std::sync::Mutex<PodCache>>;

/// Drops what no one here reads and can be large: managed fields, annotations (kubectl's
/// last-applied copy of the whole object).
fn slim_meta<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
}

/// A Node as egress `nodes` peers read it: its labels and addresses, nothing else kept (a
/// Node's status lists its images and conditions, and every node has a copy of every Node).
fn slim_node(node: &mut Node) {
    slim_meta(node);
    node.spec = None;
    if let Some(status) = node.status.as_mut() {
        let addresses = status.addresses.take();
        *status = Default::default();
        status.addresses = addresses;
    }
}

/// The labels and addresses (InternalIP, ExternalIP, both families) of a Node, for `nodes`
/// peers.
fn node_addrs(node: &Node) -> NodeAddrs {
    let mut addrs: Vec<IpAddr> = node
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    addrs.sort();
    addrs.dedup();
    NodeAddrs {
        labels: node.metadata.labels.clone().unwrap_or_default(),
        addrs,
    }
}

/// The node's pods as the compiler takes them: scheduled here, with an address, and a veth
/// found in the kernel.
fn local_pods(
    node: &str,
    pods: &[Arc<ClusterPod>],
    links: &HashMap<IpAddr, String>,
) -> Vec<LocalPod> {
    pods.iter()
        .filter(|p| p.node_name.as_deref() == Some(node))
        .filter_map(|p| {
            // The veth a route of any of its addresses leads to (IPv4 first, as listed).
            let ifname = p.ips.iter().find_map(|ip| links.get(ip))?;
            LocalPod::from_pod(p, ifname)
        })
        .collect()
}

/// One pass's outcome, for logs and the status document.
struct Pass {
    rules: usize,
    /// ClusterNetworkPolicies in force (decoded and compiled), per tier.
    cnps: TierCounts,
    pods: usize,
    written: bool,
    /// Where the pass spent its time: reading the kernel's links and routes, compiling,
    /// rendering and writing the rules.
    kernel: Duration,
    compile: Duration,
    render: Duration,
    apply: Duration,
}

/// Where a pass hands the rules it wrote to the conntrack flusher.
type Flusher = tokio::sync::watch::Sender<Option<Arc<PolicyIr>>>;

/// Cuts the conntrack entries of flows the rules in force deny, after each write of rules, off
/// the pass: the next change is not kept waiting. Always for the newest rules (a flush for
/// older ones could cut a flow they denied and the newest allow), at most one at a time.
fn spawn_flusher(conntrack: ConntrackCli) -> Flusher {
    let (tx, mut rx) = tokio::sync::watch::channel(None::<Arc<PolicyIr>>);
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let Some(ir) = rx.borrow_and_update().clone() else {
                continue;
            };
            let conntrack = conntrack.clone();
            let started = Instant::now();
            match tokio::task::spawn_blocking(move || conntrack.flush_denied(&ir)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(flushed)) => {
                    tracing::info!(flushed, took = ?started.elapsed(), "conntrack entries of denied flows removed")
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot remove the conntrack entries of denied flows")
                }
                Err(e) => tracing::warn!(error = %e, "conntrack flush task failed"),
            }
        }
    });
    tx
}

/// The policy loop; runs until the process ends.
pub async fn run(
    client: Client,
    node: String,
    firewall: Arc<dyn Firewall>,
    health: Health,
    sync: Arc<WatchSync>,
    mut log_drops: tokio::sync::watch::Receiver<bool>,
) {
    let backend = match firewall.backend() {
        sluice_policy::Backend::Nftables => "nftables",
        sluice_policy::Backend::Iptables => "iptables",
    };
    let pod_cache = SharedPodCache::default();
    let (ns_cache, ns_writer) = reflector::store::<Namespace>();
    let (np_cache, np_writer) = reflector::store::<NetworkPolicy>();
    let (node_cache, node_writer) = reflector::store::<Node>();
    let wc = watcher::Config::default;
    let pods = watcher(Api::<Pod>::all(client.clone()), wc())
        .default_backoff()
        .map({
            let cache = pod_cache.clone();
            move |e| {
                if let Ok(event) = &e {
                    cache.lock().unwrap_or_else(|p| p.into_inner()).apply(event);
                }
                (0usize, init_done("pods", &e))
            }
        });
    let nss = reflector(
        ns_writer,
        watcher(Api::<Namespace>::all(client.clone()), wc()).modify(slim_meta),
    )
    .default_backoff()
    .map(|e| (1usize, init_done("namespaces", &e)));
    let nps = reflector(
        np_writer,
        watcher(Api::<NetworkPolicy>::all(client.clone()), wc()).modify(slim_meta),
    )
    .default_backoff()
    .map(|e| (2usize, init_done("networkpolicies", &e)));
    // Part of `synced`: until the Nodes are known, a Deny to `nodes` would deny nothing.
    let nodes = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), wc()).modify(slim_node),
    )
    .default_backoff()
    .map(|e| (3usize, init_done("nodes", &e)));
    // ClusterNetworkPolicy is a CRD the cluster may not have: its watch never holds policy
    // back (not part of `synced`); while it fails, NetworkPolicy is enforced alone and
    // `/status` says so.
    let cnp_resource = cnp_api_resource();
    let cnp_writer = reflector::store::Writer::<DynamicObject>::new(cnp_resource.clone());
    let cnp_cache = cnp_writer.as_reader();
    let cnp_state = Arc::new(Mutex::new(CnpWatch::Starting));
    let cnps = reflector(
        cnp_writer,
        watcher(
            Api::<DynamicObject>::all_with(client.clone(), &cnp_resource),
            wc(),
        ),
    )
    .default_backoff()
    .map({
        let state = cnp_state.clone();
        move |e| {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            match &e {
                Ok(watcher::Event::InitDone) => *st = CnpWatch::Watching,
                Err(err) => {
                    if *st != CnpWatch::Unavailable {
                        tracing::warn!(error = %err, "no ClusterNetworkPolicy watch (is the policy.networking.k8s.io CRD installed?); NetworkPolicy is enforced without it");
                    }
                    *st = CnpWatch::Unavailable;
                }
                Ok(_) => {}
            }
            (CNP_SOURCE, false)
        }
    });
    let mut events = Box::pin(futures::stream::select(
        pods,
        futures::stream::select(
            nss,
            futures::stream::select(nps, futures::stream::select(nodes, cnps)),
        ),
    ));
    let skips = tolerant::Skips::default();
    let handle = match rtnetlink::new_connection() {
        Ok((conn, handle, _)) => {
            tokio::spawn(conn);
            Some(handle)
        }
        Err(e) => {
            tracing::error!(error = %e, "no netlink socket: policy cannot find the pods' veths");
            health.update(|s| s.policy_error = Some(format!("netlink socket: {e}")));
            None
        }
    };
    let conntrack = ConntrackCli::new(Exec::host());
    let flusher = match (conntrack.available(), conntrack.reads_table()) {
        (true, _) => Some(spawn_flusher(conntrack)),
        (false, true) => {
            tracing::warn!("no conntrack binary: only flows with ports are cut when a policy denies them (ICMP flows outlive it)");
            Some(spawn_flusher(conntrack))
        }
        (false, false) => {
            tracing::warn!("no conntrack binary and no /proc/net/nf_conntrack: established flows outlive the policy that denies them");
            None
        }
    };
    let names: droplog::Names = Arc::default();
    let mut reading_drops = false;
    let mut synced = [false; 4];
    let mut tick = tokio::time::interval(RESYNC);
    // A pass longer than RESYNC must not leave a burst of ticks behind: each would win the
    // select below and run another pass on caches the watches had no turn to update.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut swept = false;
    let mut link_names = LinkNames::new();
    // Kept across passes: a pass re-reads only the pods and rules that changed.
    let mut compiler = Compiler::default();
    let mut decoded_cnps = DecodedCnps::default();
    loop {
        let log = *log_drops.borrow_and_update();
        if log && !reading_drops {
            // Bound once, read for the life of the process; the rules decide what is logged.
            match droplog::spawn_reader(names.clone()) {
                Ok(()) => reading_drops = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the NFLOG group of dropped packets; drops are not logged")
                }
            }
        }
        if synced.iter().all(|b| *b) {
            if let Some(handle) = &handle {
                let started = Instant::now();
                let pass = sync_once(
                    &node,
                    (handle, &mut link_names),
                    (&mut compiler, &mut decoded_cnps),
                    &firewall,
                    flusher.as_ref(),
                    (&pod_cache, &ns_cache, &np_cache, &node_cache),
                    ((log, &names), (&cnp_cache, &skips, &health)),
                )
                .await;
                health
                    .metrics
                    .policy_sync_seconds
                    .observe(started.elapsed().as_secs_f64());
                match pass {
                    Ok(p) => {
                        if p.written {
                            tracing::info!(node, backend, pods = p.pods, rules = p.rules, took = ?started.elapsed(), kernel = ?p.kernel, compile = ?p.compile, render = ?p.render, apply = ?p.apply, "policy applied");
                        }
                        health
                            .metrics
                            .policy_rules
                            .set(i64::try_from(p.rules).unwrap_or(i64::MAX));
                        for (tier, n) in [("Admin", p.cnps.admin), ("Baseline", p.cnps.baseline)] {
                            health
                                .metrics
                                .cluster_network_policies
                                .get_or_create(&sluice_health::metrics::TierLabels {
                                    tier: tier.into(),
                                })
                                .set(i64::try_from(n).unwrap_or(i64::MAX));
                        }
                        let watch = *cnp_state.lock().unwrap_or_else(|p| p.into_inner());
                        health.update(|s| {
                            s.policy_error = None;
                            set_policy_status(&mut s.status, backend, p.rules, p.pods);
                            set_cnp_status(&mut s.status, watch, p.cnps);
                        });
                        if !swept {
                            // Only once this backend's rules are in force, so that a switch of
                            // backend never leaves a moment without policy.
                            let b = firewall.backend();
                            match tokio::task::spawn_blocking(move || sweep_other(b)).await {
                                Ok(Ok(())) => swept = true,
                                Ok(Err(e)) => {
                                    tracing::warn!(error = %e, "cannot remove the other backend's policy rules; will retry")
                                }
                                Err(e) => tracing::warn!(error = %e, "sweep task failed"),
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(node, backend, error = %e, "policy sync failed; will retry");
                        health.metrics.policy_errors.inc();
                        health.update(|s| s.policy_error = Some(e.to_string()));
                    }
                }
            }
        }
        health.beat("policy");
        // Changes first: the resync tick and a log switch only when no watch event waits.
        tokio::select! {
            biased;
            Some((source, init_done)) = events.next() => {
                mark(&mut synced, source, init_done, &sync, &health);
                // Let a burst of events land before the next pass; short, for it is paid by
                // every change's time to enforcement.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while let Some(Some((source, init_done))) = futures::FutureExt::now_or_never(events.next()) {
                    mark(&mut synced, source, init_done, &sync, &health);
                }
            }
            _ = tick.tick() => {}
            Ok(()) = log_drops.changed() => {}
        }
    }
}

/// Whether a watch event ends the initial listing; errors are logged (the watch retries with
/// backoff, and the cache keeps its last state meanwhile).
fn init_done<K>(watch: &str, e: &Result<watcher::Event<K>, watcher::Error>) -> bool {
    match e {
        Ok(watcher::Event::InitDone) => true,
        Ok(_) => false,
        Err(e) => {
            tracing::warn!(watch, error = %e, "policy watch failed; retrying");
            false
        }
    }
}

fn mark(synced: &mut [bool; 4], source: usize, init_done: bool, sync: &WatchSync, health: &Health) {
    if let Some(s) = synced.get_mut(source) {
        *s |= init_done;
    }
    if init_done && synced.iter().all(|b| *b) {
        sync.set_policy(true, health);
    }
}

/// Removes what sluice wrote with the backend it no longer uses (a `policy-backend` switch):
/// the other mechanism's stale rules would still drop traffic (their fail-closed default).
fn sweep_other(using: sluice_policy::Backend) -> Result<(), sluice_policy::FirewallError> {
    match using {
        sluice_policy::Backend::Nftables => {
            // No iptables on the host: nothing of sluice's can be there.
            match sluice_policy::IptablesRestore::detect(Exec::host()) {
                Ok(ipt) if ipt.observe().is_ok_and(|o| o.hash.is_some()) => {
                    ipt.remove()?;
                    tracing::info!("stale iptables policy chains removed");
                    Ok(())
                }
                _ => Ok(()),
            }
        }
        sluice_policy::Backend::Iptables => {
            let nft = sluice_policy::NftCli::new(Exec::host());
            if nft.works() && nft.observe().is_ok_and(|o| o.hash.is_some()) {
                nft.remove()?;
                tracing::info!("stale nftables policy table removed");
            }
            Ok(())
        }
    }
}

/// The source number of the ClusterNetworkPolicy watch (not one of `synced`'s).
const CNP_SOURCE: usize = 4;

/// Where the ClusterNetworkPolicy watch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CnpWatch {
    Starting,
    Watching,
    /// The API refuses it (no CRD, no RBAC): NetworkPolicy alone is enforced.
    Unavailable,
}

/// `policy.networking.k8s.io/v1alpha2` `clusternetworkpolicies`, cluster-scoped.
pub fn cnp_api_resource() -> ApiResource {
    ApiResource {
        group: cnp::GROUP.into(),
        version: cnp::VERSION.into(),
        api_version: format!("{}/{}", cnp::GROUP, cnp::VERSION),
        kind: cnp::KIND.into(),
        plural: cnp::PLURAL.into(),
    }
}

/// How many ClusterNetworkPolicies are in force in each tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierCounts {
    pub admin: usize,
    pub baseline: usize,
}

impl TierCounts {
    /// Counts the policies a pass compiled (the decoded ones; skipped ones are not here).
    pub fn of(cnps: &[&ClusterNetworkPolicy]) -> Self {
        cnps.iter().fold(Self::default(), |mut c, p| {
            match p.spec.tier {
                cnp::Tier::Admin => c.admin += 1,
                cnp::Tier::Baseline => c.baseline += 1,
            }
            c
        })
    }

    pub fn total(&self) -> usize {
        self.admin + self.baseline
    }
}

/// Writes `clusterNetworkPolicies` (the watch's state and how many are in force, in all and per
/// tier) into the status document's `policy`.
pub fn set_cnp_status(status: &mut serde_json::Value, watch: CnpWatch, count: TierCounts) {
    if let Some(policy) = status.get_mut("policy").and_then(|p| p.as_object_mut()) {
        let state = match watch {
            CnpWatch::Starting => "starting",
            CnpWatch::Watching => "watching",
            CnpWatch::Unavailable => "unavailable: NetworkPolicy only",
        };
        policy.insert(
            "clusterNetworkPolicies".into(),
            serde_json::json!({
                "watch": state,
                "inForce": count.total(),
                "admin": count.admin,
                "baseline": count.baseline,
            }),
        );
    }
}

/// Writes `policy` into the status document if it is an object.
/// `pods` is how many local pods the rules in force know (a pod's veth drops until then).
pub fn set_policy_status(status: &mut serde_json::Value, backend: &str, rules: usize, pods: usize) {
    if let Some(doc) = status.as_object_mut() {
        doc.insert(
            "policy".into(),
            serde_json::json!({"backend": backend, "rules": rules, "pods": pods}),
        );
    }
}

/// ClusterNetworkPolicies decoded from the watch's objects, kept by name with the
/// resourceVersion they were decoded from: a pass decodes only those that changed (a
/// decode goes through JSON, and a hundred of them each pass is a share of every change's
/// time to enforcement). `None`: that version does not decode (skipped and counted once).
#[derive(Debug, Default)]
pub struct DecodedCnps {
    kept: HashMap<String, (String, Option<Arc<ClusterNetworkPolicy>>)>,
}

impl DecodedCnps {
    /// The policies `objects` decode to, each decoded once per resourceVersion (an object
    /// without one, never from an API server, each time); what is gone is forgotten.
    pub fn update(
        &mut self,
        objects: &[Arc<DynamicObject>],
        decode: impl Fn(&DynamicObject) -> Option<ClusterNetworkPolicy>,
    ) -> Vec<Arc<ClusterNetworkPolicy>> {
        let mut out = Vec::with_capacity(objects.len());
        let mut seen = HashSet::with_capacity(objects.len());
        for o in objects {
            let name = o.metadata.name.as_deref().unwrap_or("");
            let Some(version) = o.metadata.resource_version.as_deref() else {
                out.extend(decode(o).map(Arc::new));
                continue;
            };
            seen.insert(name);
            let decoded = match self.kept.get(name) {
                Some((v, decoded)) if v == version => decoded.clone(),
                _ => {
                    let decoded = decode(o).map(Arc::new);
                    self.kept
                        .insert(name.to_string(), (version.to_string(), decoded.clone()));
                    decoded
                }
            };
            out.extend(decoded);
        }
        self.kept.retain(|name, _| seen.contains(name.as_str()));
        out
    }
}

type Caches<'a> = (
    &'a SharedPodCache,
    &'a reflector::Store<Namespace>,
    &'a reflector::Store<NetworkPolicy>,
    &'a reflector::Store<Node>,
);

async fn sync_once(
    node: &str,
    (handle, link_names): (&rtnetlink::Handle, &mut LinkNames),
    (compiler, decoded_cnps): (&mut Compiler, &mut DecodedCnps),
    firewall: &Arc<dyn Firewall>,
    flusher: Option<&Flusher>,
    (pods, nss, nps, node_store): Caches<'_>,
    ((log_drops, names), (cnp_cache, skips, health)): (
        (bool, &droplog::Names),
        (&reflector::Store<DynamicObject>, &tolerant::Skips, &Health),
    ),
) -> Result<Pass, PolicyError> {
    let started = Instant::now();
    let kernel = kernel_view(handle, link_names).await?;
    let read = started.elapsed();
    // The caches' objects are shared or borrowed, never copied: a cluster's pods are many.
    let pods = pods.lock().unwrap_or_else(|p| p.into_inner()).state();
    let (namespaces, policies) = (nss.state(), nps.state());
    let namespaces: Vec<&Namespace> = namespaces.iter().map(|n| &**n).collect();
    let policies: Vec<&NetworkPolicy> = policies.iter().map(|n| &**n).collect();
    let local = local_pods(node, &pods, &kernel.links);
    // One ClusterNetworkPolicy that does not decode is skipped and counted, never the rest.
    let cnps = decoded_cnps.update(&cnp_cache.state(), |o| {
        skips.decode::<ClusterNetworkPolicy>(cnp::KIND, o, health)
    });
    let cnps: Vec<&ClusterNetworkPolicy> = cnps.iter().map(|c| &**c).collect();
    let nodes: Vec<NodeAddrs> = node_store.state().iter().map(|n| node_addrs(n)).collect();
    let input = PolicyInput {
        pods: &pods,
        namespaces: &namespaces,
        policies: &policies,
        host_addrs: &kernel.host_addrs,
        cluster_policies: &cnps,
        nodes: &nodes,
        attribute_drops: log_drops,
    };
    let mut ir = compiler.compile(&input, &local);
    ir.log_drops = log_drops;
    // Only logged drops are named: without them, a thousand pods' names each pass is waste.
    let pod_names = if log_drops {
        droplog::names_of(&ir)
    } else {
        HashMap::new()
    };
    *names.write().unwrap_or_else(|p| p.into_inner()) = pod_names;
    let rules = rule_count(&ir);
    let compiled = started.elapsed();
    let firewall = firewall.clone();
    let ir = Arc::new(ir);
    let rendering = ir.clone();
    let (written, render, apply) = tokio::task::spawn_blocking(move || {
        let t = Instant::now();
        let rendered = firewall.render(&rendering);
        let render = t.elapsed();
        let applied = firewall.apply(&rendered)?;
        Ok::<_, PolicyError>((applied.written, render, t.elapsed() - render))
    })
    .await??;
    // Only a change of rules can deny a flow that was allowed when it started.
    if let (true, Some(flusher)) = (written, flusher) {
        flusher.send_replace(Some(ir));
    }
    Ok(Pass {
        rules,
        cnps: TierCounts::of(&cnps),
        pods: local.len(),
        written,
        kernel: read,
        compile: compiled - read,
        render,
        apply,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus};

    fn pod(name: &str, node: &str, ip: Option<&str>) -> Pod {
        Pod {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some("x".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: ip.map(str::to_string),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_pod_cache_follows_the_watch_and_a_relist_replaces_it() {
        use watcher::Event;
        let mut cache = PodCache::default();
        let names = |c: &PodCache| {
            let mut n: Vec<String> = c.state().iter().map(|p| p.name.clone()).collect();
            n.sort();
            n
        };
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(pod("a", "n1", Some("10.244.1.2"))));
        cache.apply(&Event::InitApply(pod("b", "n2", None)));
        // Nothing shows until the listing is complete.
        assert!(cache.state().is_empty());
        cache.apply(&Event::InitDone);
        assert_eq!(names(&cache), ["a", "b"]);
        cache.apply(&Event::Apply(pod("b", "n2", Some("10.244.2.2"))));
        cache.apply(&Event::Apply(pod("c", "n1", None)));
        cache.apply(&Event::Delete(pod("a", "n1", Some("10.244.1.2"))));
        assert_eq!(names(&cache), ["b", "c"]);
        let b = cache.state().into_iter().find(|p| p.name == "b").unwrap();
        assert_eq!(b.ips, ["10.244.2.2".parse::<Ipv4Addr>().unwrap()]);
        // The same pods again, in the same order: the compiler's shortcut holds.
        let once: Vec<_> = cache.state();
        let again: Vec<_> = cache.state();
        assert!(once.iter().zip(&again).all(|(x, y)| Arc::ptr_eq(x, y)));
        // A relist (the watch lost its place): pods deleted meanwhile are gone after it, and
        // until it is complete the cache keeps what it had.
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(pod("c", "n1", None)));
        assert_eq!(names(&cache), ["b", "c"]);
        cache.apply(&Event::InitDone);
        assert_eq!(names(&cache), ["c"]);
    }

    #[test]
    fn a_node_is_read_as_its_labels_and_addresses_of_both_families() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"role": "edge"}, "annotations": {"a": "b"}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {
                "addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "InternalIP", "address": "172.31.1.11"},
                    {"type": "InternalIP", "address": "fd00::11"},
                    {"type": "ExternalIP", "address": "203.0.113.11"},
                    {"type": "InternalIP", "address": "172.31.1.11"}
                ],
                "images": [{"names": ["busybox"], "sizeBytes": 1}],
                "conditions": [{"type": "Ready", "status": "True"}]
            }
        }))
        .unwrap();
        slim_node(&mut node);
        assert_eq!(node.spec, None);
        assert_eq!(node.metadata.annotations, None);
        let status = node.status.as_ref().unwrap();
        assert_eq!(status.images, None);
        assert_eq!(status.conditions, None);
        let n = node_addrs(&node);
        assert_eq!(n.labels.get("role").map(String::as_str), Some("edge"));
        assert_eq!(
            n.addrs,
            [
                "172.31.1.11".parse::<IpAddr>().unwrap(),
                "203.0.113.11".parse().unwrap(),
                "fd00::11".parse().unwrap()
            ]
        );
    }

    #[test]
    fn local_pods_are_this_nodes_wired_pods() {
        let pods = [
            pod("a", "n1", Some("10.244.1.2")),
            pod("b", "n2", Some("10.244.2.2")),
            pod("c", "n1", None),
            pod("d", "n1", Some("10.244.1.9")),
        ];
        let links = HashMap::from([
            ("10.244.1.2".parse().unwrap(), "sl0000000000001".to_string()),
            ("10.244.2.2".parse().unwrap(), "sl0000000000002".to_string()),
        ]);
        let pods: Vec<Arc<ClusterPod>> =
            pods.iter().map(|p| Arc::new(ClusterPod::from(p))).collect();
        let local = local_pods("n1", &pods, &links);
        assert_eq!(local.len(), 1);
        assert_eq!(local[0].name, "a");
        assert_eq!(local[0].ifname, "sl0000000000001");
    }

    #[test]
    fn local_pods_are_found_by_a_route_of_either_family() {
        let mut dual = pod("dual", "n1", Some("10.244.1.2"));
        dual.status.as_mut().unwrap().pod_ips = Some(vec![
            k8s_openapi::api::core::v1::PodIP {
                ip: "10.244.1.2".into(),
            },
            k8s_openapi::api::core::v1::PodIP {
                ip: "fd00:10:244:1::2".into(),
            },
        ]);
        // An IPv6-only pod, its veth found by its /128 route.
        let six = pod("six", "n1", Some("fd00:10:244:1::3"));
        let links = HashMap::from([
            ("10.244.1.2".parse().unwrap(), "sl0000000000001".to_string()),
            (
                "fd00:10:244:1::3".parse().unwrap(),
                "sl0000000000003".to_string(),
            ),
        ]);
        let pods: Vec<Arc<ClusterPod>> = [dual, six]
            .iter()
            .map(|p| Arc::new(ClusterPod::from(p)))
            .collect();
        let local = local_pods("n1", &pods, &links);
        assert_eq!(local.len(), 2);
        let ips =
            |i: usize| -> Vec<String> { local[i].ips.iter().map(|a| a.to_string()).collect() };
        assert_eq!(
            (local[0].ifname.as_str(), ips(0)),
            (
                "sl0000000000001",
                vec!["10.244.1.2".into(), "fd00:10:244:1::2".into()]
            )
        );
        assert_eq!(
            (local[1].ifname.as_str(), ips(1)),
            ("sl0000000000003", vec!["fd00:10:244:1::3".to_string()])
        );
    }

    #[test]
    fn policy_status_is_written_into_the_document() {
        let mut doc = serde_json::json!({"node": "n1", "policy": {"backend": "none", "rules": 0}});
        set_policy_status(&mut doc, "nftables", 7, 3);
        assert_eq!(doc["policy"]["backend"], "nftables");
        assert_eq!(doc["policy"]["pods"], 3);
        assert_eq!(doc["policy"]["rules"], 7);
    }

    #[test]
    fn cluster_network_policies_are_counted_per_tier() {
        let of = |name: &str, tier: cnp::Tier| ClusterNetworkPolicy {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: cnp::CnpSpec {
                tier,
                ..Default::default()
            },
        };
        let cnps = [
            of("a1", cnp::Tier::Admin),
            of("b1", cnp::Tier::Baseline),
            of("a2", cnp::Tier::Admin),
        ];
        let refs: Vec<&ClusterNetworkPolicy> = cnps.iter().collect();
        let c = TierCounts::of(&refs);
        assert_eq!((c.admin, c.baseline, c.total()), (2, 1, 3));
        assert_eq!(TierCounts::of(&[]), TierCounts::default());
    }

    #[test]
    fn cluster_network_policies_on_status_and_a_bad_one_is_skipped() {
        let mut doc = serde_json::json!({"policy": {}});
        set_cnp_status(&mut doc, CnpWatch::Unavailable, TierCounts::default());
        assert_eq!(
            doc["policy"]["clusterNetworkPolicies"]["watch"],
            "unavailable: NetworkPolicy only"
        );
        set_cnp_status(
            &mut doc,
            CnpWatch::Watching,
            TierCounts {
                admin: 2,
                baseline: 1,
            },
        );
        assert_eq!(doc["policy"]["clusterNetworkPolicies"]["inForce"], 3);
        assert_eq!(doc["policy"]["clusterNetworkPolicies"]["admin"], 2);
        assert_eq!(doc["policy"]["clusterNetworkPolicies"]["baseline"], 1);
        let health = Health::new(Duration::from_secs(60), "v", "c");
        let skips = tolerant::Skips::default();
        let obj = |spec: serde_json::Value| -> DynamicObject {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2",
                "kind": "ClusterNetworkPolicy",
                "metadata": {"name": "c", "resourceVersion": "1"},
                "spec": spec,
            }))
            .unwrap()
        };
        let good = obj(serde_json::json!({"tier": "Admin", "priority": 1,
            "subject": {"namespaces": {}}, "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}));
        let cnp: ClusterNetworkPolicy = skips.decode(cnp::KIND, &good, &health).unwrap();
        assert_eq!(cnp.spec.priority, 1);
        let bad = obj(serde_json::json!({"tier": "Middle", "subject": {}}));
        assert!(skips
            .decode::<ClusterNetworkPolicy>(cnp::KIND, &bad, &health)
            .is_none());
        let skipped = health
            .metrics
            .objects_skipped
            .get_or_create(&sluice_health::metrics::KindLabels {
                kind: cnp::KIND.into(),
            })
            .get();
        assert_eq!(skipped, 1);
    }

    #[test]
    fn cluster_network_policies_are_decoded_once_per_version() {
        let obj = |name: &str, rv: Option<&str>, priority: i32| -> Arc<DynamicObject> {
            let mut meta = serde_json::json!({"name": name});
            if let Some(rv) = rv {
                meta["resourceVersion"] = rv.into();
            }
            Arc::new(
                serde_json::from_value(serde_json::json!({
                    "apiVersion": "policy.networking.k8s.io/v1alpha2",
                    "kind": "ClusterNetworkPolicy",
                    "metadata": meta,
                    "spec": {"tier": "Admin", "priority": priority,
                             "subject": {"namespaces": {}}},
                }))
                .unwrap(),
            )
        };
        let decodes = std::cell::Cell::new(0);
        let decode = |o: &DynamicObject| {
            decodes.set(decodes.get() + 1);
            tolerant::decode::<ClusterNetworkPolicy>(o).ok()
        };
        let mut kept = DecodedCnps::default();
        let priorities = |v: &[Arc<ClusterNetworkPolicy>]| {
            let mut p: Vec<i32> = v.iter().map(|c| c.spec.priority).collect();
            p.sort_unstable();
            p
        };
        let world = [
            obj("a", Some("1"), 1),
            obj("b", Some("1"), 2),
            obj("c", None, 3),
        ];
        assert_eq!(priorities(&kept.update(&world, decode)), [1, 2, 3]);
        assert_eq!(decodes.get(), 3);
        // Unchanged: only the one without a resourceVersion is decoded again.
        assert_eq!(priorities(&kept.update(&world, decode)), [1, 2, 3]);
        assert_eq!(decodes.get(), 4);
        // A new version is decoded; a policy gone is forgotten.
        let world = [obj("a", Some("2"), 5)];
        assert_eq!(priorities(&kept.update(&world, decode)), [5]);
        assert_eq!(decodes.get(), 5);
        assert_eq!(kept.kept.len(), 1);
    }
}
