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
use ipnet::{Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::{Ipv4Addr, Ipv6Addr};
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

/// Why a peer's IPv6 subnet takes its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasonV6 {
    /// The IPv4 subnet's path carries it too (VXLAN and WireGuard carry both families; a peer
    /// unreachable over IPv4 is unreachable over IPv6).
    AsIpv4,
    /// The peer is IPv6-only: its IPv6 subnet is the one the peer's path was decided for (there
    /// is no IPv4 subnet to follow).
    OwnPath,
    /// A direct peer whose IPv6 underlay address is on this node's IPv6 underlay prefix.
    SameSubnet,
    /// A direct peer, but this node has no IPv6 address on its underlay link to route via.
    NoLocalUnderlay,
    /// A direct peer that publishes no IPv6 underlay address.
    NoPeerUnderlay,
    /// A direct peer whose IPv6 underlay address is not on this node's IPv6 prefix.
    OtherSubnet,
}

impl std::fmt::Display for ReasonV6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AsIpv4 => "as its IPv4 subnet",
            Self::OwnPath => "its only subnet (an IPv6-only peer)",
            Self::SameSubnet => "same IPv6 underlay subnet",
            Self::NoLocalUnderlay => "this node has no IPv6 underlay address",
            Self::NoPeerUnderlay => "the peer publishes no IPv6 underlay address",
            Self::OtherSubnet => "other IPv6 underlay subnet",
        })
    }
}

/// One peer and the way to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPath {
    pub peer: NodeRecord,
    pub path: Path,
    pub reason: Reason,
    /// Its IPv6 subnet's path, when it has one: the IPv4 one's, except for a direct peer, whose
    /// IPv6 subnet needs an IPv6 underlay neighbour to be routed to (else it goes by VXLAN with
    /// `overlay: cross-subnet`, and is unreachable with `never`).
    pub v6: Option<(Path, ReasonV6)>,
}

impl PeerPath {
    /// Whether some family of the peer's pods cannot be reached.
    pub fn unreachable(&self) -> bool {
        self.path == Path::Unreachable || matches!(self.v6, Some((Path::Unreachable, _)))
    }

    /// Why, for `/readyz` (empty when it is reachable).
    pub fn unreachable_why(&self) -> Option<String> {
        if self.path == Path::Unreachable {
            return Some(self.reason.to_string());
        }
        match self.v6 {
            Some((Path::Unreachable, why)) => Some(format!(
                "IPv6 subnet {}: {why} (overlay: never)",
                self.peer
                    .subnet_v6
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            )),
            _ => None,
        }
    }
}

/// The path of `peer`'s IPv6 subnet when its IPv4 one takes `path`.
fn path_v6(
    peer: &NodeRecord,
    path: Path,
    overlay: Overlay,
    underlay_v6: Option<Ipv6Net>,
) -> Option<(Path, ReasonV6)> {
    peer.subnet_v6?;
    if path != Path::Direct {
        let why = match peer.subnet {
            Some(_) => ReasonV6::AsIpv4,
            None => ReasonV6::OwnPath,
        };
        return Some((path, why));
    }
    let why = match (underlay_v6, peer.underlay_ip_v6) {
        (None, _) => ReasonV6::NoLocalUnderlay,
        (_, None) => ReasonV6::NoPeerUnderlay,
        (Some(mine), Some(theirs)) if mine.contains(&theirs) => {
            return Some((Path::Direct, ReasonV6::SameSubnet))
        }
        _ => ReasonV6::OtherSubnet,
    };
    Some(match overlay {
        Overlay::Never => (Path::Unreachable, why),
        _ => (Path::Vxlan, why),
    })
}

/// What the plan needs besides the records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    pub overlay: Overlay,
    /// This node's underlay address with its link's prefix: direct routes reach the peers on it.
    /// (Either family: an IPv6-underlay node's is IPv6.)
    pub underlay: ipnet::IpNet,
    /// Its IPv6 address on the same link with that prefix, if it has one: direct IPv6 routes
    /// reach the peers on it.
    pub underlay_v6: Option<Ipv6Net>,
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
    /// Peer IPv6 subnet → the peer's IPv6 underlay address.
    pub routes_v6: BTreeMap<Ipv6Net, Ipv6Addr>,
    pub unreachable_v6: BTreeSet<Ipv6Net>,
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
    /// Peers some of whose pods this node cannot reach (either family), each with why.
    pub fn unreachable(&self) -> impl Iterator<Item = &PeerPath> {
        self.paths.iter().filter(|p| p.unreachable())
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
            // Direct IPv4 routes need an IPv4 underlay neighbour: over an IPv6 underlay a
            // peer's IPv4 subnet is never on-link (it goes by VXLAN, or is unreachable). An
            // IPv6-only peer (no IPv4 subnet) is on-link when its IPv6 underlay address is on
            // this node's IPv6 underlay prefix.
            let same = match peer.subnet {
                Some(_) => peer.underlay_ip.is_ipv4() && cfg.underlay.contains(&peer.underlay_ip),
                None => cfg
                    .underlay_v6
                    .zip(peer.underlay_ip_v6)
                    .is_some_and(|(mine, theirs)| mine.contains(&theirs)),
            };
            let encrypted = peer.subnet.is_some_and(|s| wireguard.routes.contains(&s))
                || (peer.subnet.is_none()
                    && peer
                        .subnet_v6
                        .is_some_and(|s| wireguard.routes_v6.contains(&s)));
            let (path, reason) = if encrypted {
                (Path::Wireguard, Reason::Encrypted)
            } else {
                match (cfg.overlay, same) {
                    (Overlay::Always, _) => (Path::Vxlan, Reason::OverlayAlways),
                    (o, true) => (Path::Direct, Reason::SameSubnet(o)),
                    (o @ Overlay::CrossSubnet, false) => (Path::Vxlan, Reason::OtherSubnet(o)),
                    (o @ Overlay::Never, false) => (Path::Unreachable, Reason::OtherSubnet(o)),
                }
            };
            let v6 = path_v6(&peer, path, cfg.overlay, cfg.underlay_v6);
            PeerPath {
                peer,
                path,
                reason,
                v6,
            }
        })
        .collect();
    let on = |path: Path| -> BTreeSet<Ipv4Net> {
        paths
            .iter()
            .filter(|p| p.path == path)
            .filter_map(|p| p.peer.subnet)
            .collect()
    };
    // Each family of a peer on its own path (VXLAN carries both; a direct peer's IPv6 subnet
    // may go by VXLAN where it has no IPv6 underlay neighbour).
    let on_v6 = |path: Path| -> BTreeMap<Ipv6Net, &NodeRecord> {
        paths
            .iter()
            .filter_map(|p| match (p.v6, p.peer.subnet_v6) {
                (Some((got, _)), Some(s)) if got == path => Some((s, &p.peer)),
                _ => None,
            })
            .collect()
    };
    let on_vxlan: BTreeSet<ipnet::IpNet> = paths
        .iter()
        .filter(|p| p.path == Path::Vxlan)
        .filter_map(|p| p.peer.subnet.map(ipnet::IpNet::from))
        .chain(on_v6(Path::Vxlan).into_keys().map(ipnet::IpNet::from))
        .collect();
    vxlan.retain_subnets(|s| on_vxlan.contains(s));
    // No VXLAN device where nothing goes through it or comes by it.
    vxlan.wanted = cfg.overlay != Overlay::Never;
    let direct = DirectPlan {
        underlay_ifindex: cfg.underlay_ifindex,
        routes: paths
            .iter()
            .filter(|p| p.path == Path::Direct)
            .filter_map(|p| match p.peer.underlay_ip {
                std::net::IpAddr::V4(a) => Some((p.peer.subnet?, a)),
                std::net::IpAddr::V6(_) => None,
            })
            .collect(),
        unreachable: on(Path::Unreachable),
        routes_v6: on_v6(Path::Direct)
            .into_iter()
            .filter_map(|(s, p)| Some((s, p.underlay_ip_v6?)))
            .collect(),
        unreachable_v6: on_v6(Path::Unreachable).into_keys().collect(),
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
    auto_pod_mtu_for(overlay, encryption, underlay_mtu, false)
}

/// [`auto_pod_mtu`] over an underlay of either family (tunnels over IPv6 carry a 20 bytes
/// longer outer header).
pub fn auto_pod_mtu_for(
    overlay: Overlay,
    encryption: bool,
    underlay_mtu: u32,
    ipv6_underlay: bool,
) -> u32 {
    if overlay == Overlay::Never && !encryption {
        underlay_mtu
    } else {
        crate::vxlan::auto_mtu_for(underlay_mtu, ipv6_underlay)
            .min(crate::wireguard::auto_mtu_for(underlay_mtu, ipv6_underlay))
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
