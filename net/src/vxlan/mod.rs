//! The VXLAN datapath, flannel's scheme: one VXLAN device per node (VNI 1, UDP 8472, learning
//! off) whose address is the node subnet's network address as a /32 (the node's VTEP address).
//! For each peer: a route to its subnet via its VTEP address, on-link through the device
//! (protocol [`crate::ROUTE_PROTOCOL`]); a permanent neighbour entry VTEP address → the peer's
//! VTEP MAC; and an FDB entry VTEP MAC → the peer's underlay IP.
//!
//! [`plan`] is pure; [`diff::diff`] compares a plan with what the kernel holds
//! ([`diff::Observed`]); [`apply::VxlanKernel`] observes and applies over rtnetlink.

pub mod apply;
pub mod diff;
#[cfg(test)]
mod tests;

use crate::lease::NodeRecord;
use ipnet::Ipv4Net;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The VXLAN device's name (sluice's link prefix `sl`, DESIGN.md; at most 15 characters).
pub const VXLAN_IFNAME: &str = "sluice.vxlan";
/// Flannel's defaults, so firewalls opened for Canal keep working (DESIGN.md, "Ports").
pub const DEFAULT_VNI: u32 = 1;
pub const DEFAULT_PORT: u16 = 8472;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14) headers.
pub const VXLAN_OVERHEAD: u32 = 50;

/// `mtu: auto`: the underlay's MTU less the VXLAN overhead.
pub fn auto_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(VXLAN_OVERHEAD)
}

/// The node's VXLAN MAC, derived from its name so that it is the same after agent restarts,
/// reboots and re-creation of the device (peers never hold a stale one): FNV-1a of the name,
/// mixed by MurmurHash3's finalizer (so names that differ in one character differ in every
/// byte), made a locally administered unicast address.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in b"sluice-vtep/".iter().chain(node.as_bytes()) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    let h = hash.to_be_bytes();
    [(h[0] & 0xfe) | 0x02, h[1], h[2], h[3], h[4], h[5]]
}

/// A node's VTEP address: its subnet's network address (`10.244.3.0` for `10.244.3.0/24`).
pub fn vtep_address(subnet: Ipv4Net) -> Ipv4Addr {
    subnet.network()
}

/// How the device is made, from the agent's configuration and the underlay it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub ifname: String,
    pub vni: u32,
    pub port: u16,
    /// The link the encapsulated packets leave by, and its address (the VXLAN `local`).
    pub underlay_ifindex: u32,
    pub underlay_ip: Ipv4Addr,
    pub mtu: u32,
    /// Whether the device keeps TX checksum offload (and with it GSO): see
    /// [`tx_checksum_offload_safe`].
    pub tx_checksum_offload: bool,
}

/// Whether VXLAN TX checksum offload is safe on a kernel of this release (`uname -r`).
///
/// Flannel switches it off on its VXLAN device because kernels before 5.7 corrupted the outer
/// UDP checksum when another rule (kube-proxy's `--random-fully` masquerade) source-NATed the
/// encapsulated packets (kubernetes#88986, fixed by "netfilter: nat: never update the UDP
/// checksum when it's 0"). Switching it off costs dearly where the bug is fixed: the device
/// loses GSO, so every TCP segment is encapsulated and tracked one by one (bench-overlay
/// measured 5.3 against 13.9 Gbit/s for one stream). So sluice keeps it on from 5.7, and a
/// release it cannot read counts as an old kernel.
pub fn tx_checksum_offload_safe(kernel_release: &str) -> bool {
    let mut parts = kernel_release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) >= (5, 7),
        _ => false,
    }
}

impl VxlanConfig {
    /// The defaults (name, VNI 1, port 8472) with the MTU taken automatically from the underlay.
    pub fn auto(underlay_ifindex: u32, underlay_ip: Ipv4Addr, underlay_mtu: u32) -> Self {
        Self {
            ifname: VXLAN_IFNAME.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            underlay_ifindex,
            underlay_ip,
            mtu: auto_mtu(underlay_mtu),
            tx_checksum_offload: true,
        }
    }
}

/// The device as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    pub local: Ipv4Addr,
    pub underlay_ifindex: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// The node's VTEP address, held as a /32.
    pub address: Ipv4Addr,
    pub tx_checksum_offload: bool,
}

/// Why a peer is left out of the plan. Never a panic: the rest of the peers are programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerConflict {
    #[error("its subnet {subnet} overlaps this node's {mine}")]
    OverlapsMine { subnet: Ipv4Net, mine: Ipv4Net },
    #[error("its subnet {subnet} overlaps that of {other}")]
    OverlapsPeer { subnet: Ipv4Net, other: String },
    #[error("its VTEP MAC is already used by {other}")]
    MacInUse { other: String },
    #[error("its underlay address {ip} is this node's")]
    UnderlayIsMine { ip: Ipv4Addr },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedPeer {
    pub node: String,
    pub reason: PeerConflict,
}

/// The whole desired VXLAN datapath of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPlan {
    /// Whether the device should exist at all (not with `overlay: never`, where no peer is
    /// reached through it and nothing arrives by it).
    pub wanted: bool,
    pub device: DeviceSpec,
    /// Peer subnet → its VTEP address (the on-link gateway through the device).
    pub routes: BTreeMap<Ipv4Net, Ipv4Addr>,
    /// Peer VTEP address → its VTEP MAC (permanent neighbour entries on the device).
    pub neighbours: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// Peer VTEP MAC → its underlay IP (FDB entries on the device).
    pub fdb: BTreeMap<[u8; 6], Ipv4Addr>,
    pub skipped: Vec<SkippedPeer>,
}

impl VxlanPlan {
    /// Keeps only the peers whose subnets `keep` accepts (those the node reaches through VXLAN):
    /// their routes, neighbour and FDB entries; the others' go.
    pub fn retain_subnets(&mut self, keep: impl Fn(&Ipv4Net) -> bool) {
        let dropped: Vec<Ipv4Addr> = self
            .routes
            .iter()
            .filter(|(subnet, _)| !keep(subnet))
            .map(|(_, vtep)| *vtep)
            .collect();
        self.routes.retain(|subnet, _| keep(subnet));
        for vtep in dropped {
            if let Some(mac) = self.neighbours.remove(&vtep) {
                self.fdb.remove(&mac);
            }
        }
    }
}

/// The desired datapath of `me` towards `peers`. Deterministic whatever the order of `peers`:
/// they are taken by subnet then name, and of two that conflict the first wins. `me` is
/// ignored if it appears among `peers`.
pub fn plan(me: &NodeRecord, peers: &[NodeRecord], cfg: &VxlanConfig) -> VxlanPlan {
    let device = DeviceSpec {
        name: cfg.ifname.clone(),
        vni: cfg.vni,
        port: cfg.port,
        local: cfg.underlay_ip,
        underlay_ifindex: cfg.underlay_ifindex,
        mtu: cfg.mtu,
        mac: me.vtep_mac,
        address: vtep_address(me.subnet),
        tx_checksum_offload: cfg.tx_checksum_offload,
    };
    let mut out = VxlanPlan {
        wanted: true,
        device,
        routes: BTreeMap::new(),
        neighbours: BTreeMap::new(),
        fdb: BTreeMap::new(),
        skipped: Vec::new(),
    };
    let mut sorted: Vec<&NodeRecord> = peers.iter().filter(|p| p.node != me.node).collect();
    sorted.sort_by(|a, b| (a.subnet, &a.node).cmp(&(b.subnet, &b.node)));
    let mut taken: Vec<(Ipv4Net, &str)> = Vec::new();
    let mut macs: BTreeMap<[u8; 6], &str> = BTreeMap::from([(me.vtep_mac, me.node.as_str())]);
    let overlaps = |a: &Ipv4Net, b: &Ipv4Net| a.contains(&b.network()) || b.contains(&a.network());
    for peer in sorted {
        let conflict = if overlaps(&peer.subnet, &me.subnet) {
            Some(PeerConflict::OverlapsMine {
                subnet: peer.subnet,
                mine: me.subnet,
            })
        } else if peer.underlay_ip == cfg.underlay_ip {
            Some(PeerConflict::UnderlayIsMine {
                ip: peer.underlay_ip,
            })
        } else if let Some((_, other)) = taken.iter().find(|(s, _)| overlaps(s, &peer.subnet)) {
            Some(PeerConflict::OverlapsPeer {
                subnet: peer.subnet,
                other: (*other).to_string(),
            })
        } else {
            macs.get(&peer.vtep_mac)
                .map(|other| PeerConflict::MacInUse {
                    other: (*other).to_string(),
                })
        };
        if let Some(reason) = conflict {
            tracing::warn!(peer = %peer.node, subnet = %peer.subnet, %reason, "peer skipped");
            out.skipped.push(SkippedPeer {
                node: peer.node.clone(),
                reason,
            });
            continue;
        }
        taken.push((peer.subnet, &peer.node));
        macs.insert(peer.vtep_mac, &peer.node);
        let vtep = vtep_address(peer.subnet);
        out.routes.insert(peer.subnet, vtep);
        out.neighbours.insert(vtep, peer.vtep_mac);
        out.fdb.insert(peer.vtep_mac, peer.underlay_ip);
    }
    out
}
