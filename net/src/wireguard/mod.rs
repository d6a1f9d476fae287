//! The WireGuard datapath: one device per node (`sluice.wg`, UDP 51820), a peer per other node
//! (endpoint = its underlay address, allowed IPs = its pod subnet, and on a dual-stack pair its
//! IPv6 pod subnet too), keyed by node.
//!
//! - [`keys`]: the node's key pair in `/var/lib/sluice/wireguard.key` (0600); only the public
//!   key is ever published (in the lease record).
//! - [`plan`] (pure): from this node's record and its peers', which peers the device holds and
//!   which peer subnets are routed through it rather than through VXLAN.
//! - [`device`]: the userspace device (gotatun on a tun) that applies a plan as a diff, and the
//!   routes through it.
//!
//! The switch is live and per pair of nodes: a node routes a peer's subnet through WireGuard
//! only when both run `wireguard`; otherwise through VXLAN. The device holds every peer that
//! publishes a key whenever it exists, so a node still receives WireGuard from a peer that
//! switched before it noticed, and VXLAN stays up for peers that have not switched yet.

pub mod device;
pub mod kernel;
pub mod keys;
#[cfg(test)]
mod tests;

use crate::lease::NodeRecord;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

pub use keys::{load_or_create_key, parse_public_key, KeyPair};

/// The WireGuard device's name (sluice's link prefix `sl`; at most 15 characters).
pub const WG_IFNAME: &str = "sluice.wg";
pub const DEFAULT_PORT: u16 = 51820;
/// Outer IPv4 (20) + UDP (8) + WireGuard data header (16) + authentication tag (16).
pub const WG_OVERHEAD_V4: u32 = 60;
/// The `encryption` a record advertises when it runs WireGuard.
pub const WIREGUARD: &str = "wireguard";

/// `mtu: auto` through WireGuard: the underlay's MTU less WireGuard's overhead.
pub fn auto_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(WG_OVERHEAD_V4)
}

/// `mtu: auto` through WireGuard over an underlay of either family (outer IPv6: 20 bytes more).
pub fn auto_mtu_for(underlay_mtu: u32, ipv6_underlay: bool) -> u32 {
    let extra = if ipv6_underlay {
        crate::vxlan::IPV6_EXTRA_OVERHEAD
    } else {
        0
    };
    auto_mtu(underlay_mtu).saturating_sub(extra)
}

#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("WireGuard key file {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("public key {0:?} is not 32 bytes of base64")]
    PublicKey(String),
    #[error("WireGuard device {ifname}: {reason}")]
    Device { ifname: String, reason: String },
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// One peer of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub node: String,
    pub public_key: [u8; 32],
    /// The peer's underlay address and port, of either family (`[v6]:51820` over IPv6).
    pub endpoint: SocketAddr,
    /// Its pod subnets: the IPv4 one, and its IPv6 one when both nodes have IPv6.
    pub allowed_ips: Vec<IpNet>,
    /// Persistent keepalive in seconds; 0 = off.
    pub keepalive_secs: u16,
}

/// Why a peer has no place on the device. Never a panic: the other peers are programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerProblem {
    #[error("its public key does not parse")]
    BadKey,
    #[error("its public key is also {other}'s")]
    KeyInUse { other: String },
    #[error("its public key is this node's")]
    KeyIsMine,
}

/// The WireGuard part of a node's desired datapath.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WgPlan {
    /// Whether the device should exist: this node runs WireGuard, or a peer that it may still
    /// hear from over WireGuard does.
    pub device: bool,
    /// The device's address, a /32 from this node's subnet (its network address, as VXLAN's
    /// VTEP address) and the preferred source of the routes through it: traffic that starts on
    /// the node (a hostNetwork pod, the kubelet, a NodePort kube-proxy SNATs to the node) then
    /// leaves from an address within the node's subnet, which every peer's allowed IPs for this
    /// node hold. From the underlay address it would be dropped by the receiver.
    /// None on an IPv6-only node.
    pub address: Option<std::net::Ipv4Addr>,
    /// Its IPv6 address on a node with IPv6 (the IPv6 subnet's network address, as a /128),
    /// the preferred source of its IPv6 routes alike.
    pub address_v6: Option<std::net::Ipv6Addr>,
    /// The device's peers by node name (empty when there is no device).
    pub peers: BTreeMap<String, PeerSpec>,
    /// Peer subnets routed through the device; every other peer subnet stays on VXLAN.
    pub routes: BTreeSet<Ipv4Net>,
    /// The IPv6 subnets of those peers, routed through the device with them.
    pub routes_v6: BTreeSet<Ipv6Net>,
    pub skipped: Vec<(String, PeerProblem)>,
}

/// What the plan needs besides the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WgSettings {
    /// This node runs `encryption: wireguard`.
    pub enabled: bool,
    pub port: u16,
    pub keepalive_secs: u16,
}

/// The desired WireGuard state of `me` towards `peers` (those the VXLAN plan accepted; `me`
/// is ignored among them). Deterministic whatever the order of `peers`.
pub fn plan(me: &NodeRecord, peers: &[NodeRecord], settings: &WgSettings) -> WgPlan {
    let mut sorted: Vec<&NodeRecord> = peers.iter().filter(|p| p.node != me.node).collect();
    sorted.sort_by(|a, b| a.node.cmp(&b.node));
    let any_peer_wireguard = sorted
        .iter()
        .any(|p| p.encryption == WIREGUARD && p.wireguard_public_key.is_some());
    let mut out = WgPlan {
        device: settings.enabled || any_peer_wireguard,
        address: me.subnet.map(crate::vxlan::vtep_address),
        address_v6: me.subnet_v6.map(crate::vxlan::vtep_address_v6),
        ..WgPlan::default()
    };
    if !out.device {
        return out;
    }
    let mine = me
        .wireguard_public_key
        .as_deref()
        .and_then(|k| parse_public_key(k).ok());
    let mut keys: BTreeMap<[u8; 32], &str> = BTreeMap::new();
    for peer in sorted {
        let Some(text) = peer.wireguard_public_key.as_deref() else {
            continue;
        };
        let problem = match parse_public_key(text) {
            Err(_) => Err(PeerProblem::BadKey),
            Ok(key) if Some(key) == mine => Err(PeerProblem::KeyIsMine),
            Ok(key) => match keys.get(&key) {
                Some(other) => Err(PeerProblem::KeyInUse {
                    other: (*other).to_string(),
                }),
                None => Ok(key),
            },
        };
        let key = match problem {
            Ok(key) => key,
            Err(reason) => {
                tracing::warn!(peer = %peer.node, %reason, "WireGuard peer skipped");
                out.skipped.push((peer.node.clone(), reason));
                continue;
            }
        };
        keys.insert(key, &peer.node);
        // A peer's subnet of each family only where this node has that family too.
        let peer_v4 = peer.subnet.filter(|_| me.subnet.is_some());
        let peer_v6 = peer.subnet_v6.filter(|_| me.subnet_v6.is_some());
        out.peers.insert(
            peer.node.clone(),
            PeerSpec {
                node: peer.node.clone(),
                public_key: key,
                endpoint: SocketAddr::new(peer.underlay_ip, settings.port),
                allowed_ips: peer_v4
                    .map(IpNet::from)
                    .into_iter()
                    .chain(peer_v6.map(IpNet::from))
                    .collect(),
                keepalive_secs: settings.keepalive_secs,
            },
        );
        if settings.enabled && mine.is_some() && peer.encryption == WIREGUARD {
            out.routes.extend(peer_v4);
            out.routes_v6.extend(peer_v6);
        }
    }
    out
}

/// What the device must change to hold `want` when it holds `have` (both keyed by node).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerDiff {
    /// Peers to remove, by public key: gone, or whose key changed (the old key goes).
    pub remove: Vec<[u8; 32]>,
    /// Peers to add or update in place (endpoint, allowed IPs, keepalive).
    pub upsert: Vec<PeerSpec>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.upsert.is_empty()
    }
}

/// The difference between the device's peers and the wanted ones. A peer that is the same is
/// left alone (its session survives); a changed key removes the old peer and adds the new one.
pub fn diff_peers(
    have: &BTreeMap<String, PeerSpec>,
    want: &BTreeMap<String, PeerSpec>,
) -> PeerDiff {
    let mut out = PeerDiff::default();
    for (node, old) in have {
        match want.get(node) {
            Some(new) if new.public_key == old.public_key => {}
            _ => out.remove.push(old.public_key),
        }
    }
    for (node, new) in want {
        if have.get(node) != Some(new) {
            out.upsert.push(new.clone());
        }
    }
    out
}
