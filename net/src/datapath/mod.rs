//! The node's datapath to its peers, decided in one place and programmed behind one interface.
//!
//! [`plan`] is the one pure function that says how each peer's pod subnet is reached: through
//! WireGuard when both nodes run it, else as `overlay` says (VXLAN, a direct route to the peer's
//! underlay address on the node's own underlay subnet, or, with `overlay: never` and the peer on
//! another subnet, an `unreachable` route that answers senders with an ICMP error rather than
//! black-holing their packets). Each path's kernel state is a [`Backend`] (flannel's `Backend`,
//! netavark's firewall drivers): [`vxlan`], [`wireguard`], [`direct`]. [`Datapath`] runs them in
//! two phases so that a subnet moving between paths is replaced in place and never without a
//! route: every backend installs (devices, per-peer state, its routes, replacing whatever carried
//! a subnet before), then every backend prunes what no peer uses any more. The agent's loop only
//! snapshots, plans and applies; it does not know which tunnels exist.

pub mod direct;
#[cfg(test)]
mod tests;
pub mod vxlan;
pub mod wireguard;

use crate::lease::NodeRecord;
use crate::vxlan::{VxlanConfig, VxlanPlan};
use crate::wireguard::{WgPlan, WgSettings};
use ipnet::Ipv4Net;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::pin::Pin;

/// sluice-config's `overlay`: where VXLAN carries pod traffic between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlay {
    /// VXLAN between every pair of nodes (flannel's `vxlan`).
    #[default]
    Always,
    /// Direct routes between nodes on one underlay subnet, VXLAN across (Calico's CrossSubnet,
    /// flannel's DirectRouting).
    CrossSubnet,
    /// Direct routes only (flannel's `host-gw`); a peer on another subnet is unreachable.
    Never,
}

impl Overlay {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "always" => Some(Self::Always),
            "cross-subnet" => Some(Self::CrossSubnet),
            "never" => Some(Self::Never),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::CrossSubnet => "cross-subnet",
            Self::Never => "never",
        }
    }
}

/// How a peer's pod subnet is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Path {
    /// A route to the subnet via the peer's underlay address: plain IP between pod addresses.
    Direct,
    Vxlan,
    Wireguard,
    /// An `unreachable` route: senders get an ICMP error, and `/readyz` says why.
    Unreachable,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Vxlan => "vxlan",
            Self::Wireguard => "wireguard",
            Self::Unreachable => "unreachable",
        }
    }
}

/// Why a peer takes its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Both nodes run `encryption: wireguard` (whatever `overlay` says).
    Encrypted,
    /// `overlay: always`.
    OverlayAlways,
    /// The peer's underlay address is on this node's underlay subnet.
    SameSubnet(Overlay),
    /// It is not.
    OtherSubnet(Overlay),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Encrypted => f.write_str("both nodes run encryption: wireguard"),
            Self::OverlayAlways => f.write_str("overlay: always"),
            Self::SameSubnet(o) => write!(f, "same underlay subnet (overlay: {})", o.as_str()),
            Self::OtherSubnet(o) => write!(f, "other underlay subnet (overlay: {})", o.as_str()),
        }
    }
}

/// One peer and the way to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPath {
    pub peer: NodeRecord,
    pub path: Path,
    pub reason: Reason,
}

/// What the plan needs besides the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    pub overlay: Overlay,
    /// This node's underlay address with its link's prefix: direct routes reach the peers on it.
    pub underlay: Ipv4Net,
    pub underlay_ifindex: u32,
    pub vxlan: VxlanConfig,
    pub wireguard: WgSettings,
}

/// Direct and unreachable routes, to peer subnets, through the underlay.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirectPlan {
    pub underlay_ifindex: u32,
    /// Peer subnet → the peer's underlay address.
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    pub unreachable: BTreeSet<Ipv4Net>,
}

/// The node's whole desired datapath: each peer's path, and each backend's share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathPlan {
    pub me: NodeRecord,
    /// Every usable peer, by node name.
    pub paths: Vec<PeerPath>,
    /// Peers left out, with the reason (a subnet overlapping another's, a duplicate MAC...).
    pub skipped: Vec<(String, String)>,
    pub vxlan: VxlanPlan,
    pub wireguard: WgPlan,
    pub direct: DirectPlan,
}

impl DatapathPlan {
    /// Peers whose pods this node cannot reach, each with why.
    pub fn unreachable(&self) -> impl Iterator<Item = &PeerPath> {
        self.paths.iter().filter(|p| p.path == Path::Unreachable)
    }

    /// How many peers each path carries.
    pub fn count(&self, path: Path) -> usize {
        self.paths.iter().filter(|p| p.path == path).count()
    }
}

/// The datapath of `me` towards `peers` under `cfg`. Deterministic whatever the order of
/// `peers`. A peer that conflicts with this node or another (see [`crate::vxlan::plan`]) is
/// left out of every path.
pub fn plan(me: &NodeRecord, peers: &[NodeRecord], cfg: &DatapathConfig) -> DatapathPlan {
    let mut vxlan = crate::vxlan::plan(me, peers, &cfg.vxlan);
    let skipped: BTreeSet<&str> = vxlan.skipped.iter().map(|s| s.node.as_str()).collect();
    let mut accepted: Vec<NodeRecord> = peers
        .iter()
        .filter(|p| p.node != me.node && !skipped.contains(p.node.as_str()))
        .cloned()
        .collect();
    accepted.sort_by(|a, b| a.node.cmp(&b.node));
    accepted.dedup_by(|a, b| a.node == b.node);
    let wireguard = crate::wireguard::plan(me, &accepted, &cfg.wireguard);
    let paths: Vec<PeerPath> = accepted
        .into_iter()
        .map(|peer| {
            let same = cfg.underlay.contains(&peer.underlay_ip);
            let (path, reason) = if wireguard.routes.contains(&peer.subnet) {
                (Path::Wireguard, Reason::Encrypted)
            } else {
                match (cfg.overlay, same) {
                    (Overlay::Always, _) => (Path::Vxlan, Reason::OverlayAlways),
                    (o, true) => (Path::Direct, Reason::SameSubnet(o)),
                    (o @ Overlay::CrossSubnet, false) => (Path::Vxlan, Reason::OtherSubnet(o)),
                    (o @ Overlay::Never, false) => (Path::Unreachable, Reason::OtherSubnet(o)),
                }
            };
            PeerPath { peer, path, reason }
        })
        .collect();
    let on = |path: Path| -> BTreeSet<Ipv4Net> {
        paths
            .iter()
            .filter(|p| p.path == path)
            .map(|p| p.peer.subnet)
            .collect()
    };
    // A peer's path carries both its families (VXLAN and WireGuard; direct routes are IPv4
    // only: an IPv6 subnet has no IPv6 underlay address to be routed to yet).
    let on_vxlan: BTreeSet<ipnet::IpNet> = paths
        .iter()
        .filter(|p| p.path == Path::Vxlan)
        .flat_map(|p| {
            std::iter::once(ipnet::IpNet::from(p.peer.subnet))
                .chain(p.peer.subnet_v6.map(ipnet::IpNet::from))
        })
        .collect();
    vxlan.retain_subnets(|s| on_vxlan.contains(s));
    // No VXLAN device where nothing goes through it or comes by it.
    vxlan.wanted = cfg.overlay != Overlay::Never;
    let direct = DirectPlan {
        underlay_ifindex: cfg.underlay_ifindex,
        routes: paths
            .iter()
            .filter(|p| p.path == Path::Direct)
            .map(|p| (p.peer.subnet, p.peer.underlay_ip))
            .collect(),
        unreachable: on(Path::Unreachable),
    };
    let skipped = vxlan
        .skipped
        .iter()
        .map(|s| (s.node.clone(), s.reason.to_string()))
        .chain(
            wireguard
                .skipped
                .iter()
                .map(|(n, r)| (n.clone(), format!("WireGuard: {r}"))),
        )
        .collect();
    DatapathPlan {
        me: me.clone(),
        paths,
        skipped,
        vxlan,
        wireguard,
        direct,
    }
}

/// The pods' MTU under `mtu: auto`: the underlay's with `overlay: never` and no encryption
/// (nothing is encapsulated), else the underlay's less the larger tunnel overhead, since pods
/// keep their MTU when `encryption` or `overlay` later changes live (and for those already
/// running when a tunnel comes in, the node clamps TCP's MSS to the path: see
/// [`crate::masq`]).
pub fn auto_pod_mtu(overlay: Overlay, encryption: bool, underlay_mtu: u32) -> u32 {
    if overlay == Overlay::Never && !encryption {
        underlay_mtu
    } else {
        crate::vxlan::auto_mtu(underlay_mtu).min(crate::wireguard::auto_mtu(underlay_mtu))
    }
}

/// Why a backend's pass failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("VXLAN: {0}")]
    Vxlan(#[from] crate::vxlan::apply::VxlanError),
    #[error("WireGuard: {0}")]
    Wireguard(String),
    #[error("routes: {what}: {source}")]
    Routes {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// What a backend's methods return.
pub type BackendFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DatapathError>> + Send + 'a>>;

/// A peer's tunnel counters, for `/metrics`.
pub use crate::wireguard::device::PeerStats;

/// One path's kernel state.
pub trait Backend: Send {
    fn name(&self) -> &'static str;
    /// This backend's share of the node's record (WireGuard: its public key and whether this
    /// node runs it).
    fn publish(&self, _record: &mut NodeRecord, _cfg: &DatapathConfig) {}
    /// Called first in each pass (WireGuard: a deleted key file means a new key).
    fn refresh(&mut self) -> BackendFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Phase 1: the device as the plan wants it, state for each of its peers, and their routes,
    /// each replacing whatever carried that subnet before. Returns the number of changes.
    fn install<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize>;
    /// Phase 2, once every backend installed: what no peer of the plan uses any more goes.
    fn prune<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize>;
    /// Its part of the node's status document: (key, value).
    fn describe(&self, plan: &DatapathPlan) -> (&'static str, serde_json::Value);
    /// Per-peer counters, where the path has them.
    fn peer_stats(&mut self) -> BackendFuture<'_, Vec<PeerStats>> {
        Box::pin(async { Ok(Vec::new()) })
    }
}

/// The node's backends, run together.
pub struct Datapath {
    backends: Vec<Box<dyn Backend>>,
}

/// One pass's outcome: how much changed, and what failed (by backend).
#[derive(Debug, Default)]
pub struct Applied {
    pub changes: usize,
    pub errors: Vec<(&'static str, DatapathError)>,
}

impl Datapath {
    pub fn new(backends: Vec<Box<dyn Backend>>) -> Self {
        Self { backends }
    }

    /// The node's record as every backend publishes it.
    pub fn publish(&self, base: &NodeRecord, cfg: &DatapathConfig) -> NodeRecord {
        let mut record = base.clone();
        for b in &self.backends {
            b.publish(&mut record, cfg);
        }
        record
    }

    pub async fn refresh(&mut self) -> Vec<(&'static str, DatapathError)> {
        let mut errors = Vec::new();
        for b in &mut self.backends {
            if let Err(e) = b.refresh().await {
                errors.push((b.name(), e));
            }
        }
        errors
    }

    /// Installs every backend's share, then, only if every install succeeded, prunes: a peer
    /// moving to a path that failed to install keeps its old route until the next pass.
    pub async fn apply(&mut self, plan: &DatapathPlan) -> Applied {
        let mut out = Applied::default();
        for b in &mut self.backends {
            match b.install(plan).await {
                Ok(n) => out.changes += n,
                Err(e) => out.errors.push((b.name(), e)),
            }
        }
        if !out.errors.is_empty() {
            return out;
        }
        for b in &mut self.backends {
            match b.prune(plan).await {
                Ok(n) => out.changes += n,
                Err(e) => out.errors.push((b.name(), e)),
            }
        }
        out
    }

    pub fn describe(&self, plan: &DatapathPlan) -> Vec<(&'static str, serde_json::Value)> {
        self.backends.iter().map(|b| b.describe(plan)).collect()
    }

    pub async fn peer_stats(&mut self) -> Vec<PeerStats> {
        let mut all = Vec::new();
        for b in &mut self.backends {
            match b.peer_stats().await {
                Ok(s) => all.extend(s),
                Err(e) => {
                    tracing::warn!(backend = b.name(), error = %e, "cannot read peer counters")
                }
            }
        }
        all
    }
}
