//! The VXLAN datapath, flannel's scheme: one VXLAN device per node (VNI 1, UDP 8472, learning
//! off) whose address is the node subnet's network address as a /32 (the node's VTEP address).
//! For each peer: a route to its subnet via its VTEP address, on-link through the device
//! (protocol [`crate::ROUTE_PROTOCOL`]); a permanent neighbour entry VTEP address → the peer's
//! VTEP MAC; and an FDB entry VTEP MAC → the peer's underlay IP.
//!
//! Dual-stack: the same device carries IPv6 inner traffic over the IPv4 underlay. A node with
//! an IPv6 subnet holds its network address as a /128 on the device too (its IPv6 VTEP
//! address, the source of IPv6 traffic the node itself sends through it); a peer's IPv6 subnet
//! is routed via a link-local gateway made from the peer's VTEP MAC ([`vtep_gateway_v6`]),
//! whose permanent neighbour entry names that MAC, so one FDB entry per peer serves both
//! families. Not via the peer's IPv6 VTEP address on-link, as for IPv4: the kernel refuses an
//! IPv6 on-link gateway that its table routes through another device, which is just what the
//! gateway inside the peer's subnet is while that subnet moves from WireGuard to VXLAN.
//!
//! [`plan`] is pure; [`diff::diff`] compares a plan with what the kernel holds
//! ([`diff::Observed`]); [`apply::VxlanKernel`] observes and applies over rtnetlink.

pub mod apply;
pub mod diff;
#[cfg(test)]
mod tests;

use crate::lease::NodeRecord;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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

/// The outer IPv6 header is 20 bytes longer than IPv4's.
pub const IPV6_EXTRA_OVERHEAD: u32 = 20;

/// `mtu: auto` over an underlay of either family (an IPv6 one costs 20 bytes more).
pub fn auto_mtu_for(underlay_mtu: u32, ipv6_underlay: bool) -> u32 {
    let extra = if ipv6_underlay {
        IPV6_EXTRA_OVERHEAD
    } else {
        0
    };
    auto_mtu(underlay_mtu).saturating_sub(extra)
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

/// A node's IPv6 VTEP address: its IPv6 subnet's network address (`fd00:10:244:3::`). IPAM
/// never gives it to a pod (its range starts one above it: [`crate::ipam::capacity_v6`]).
pub fn vtep_address_v6(subnet: Ipv6Net) -> Ipv6Addr {
    subnet.network()
}

/// The link-local gateway of a peer's IPv6 subnet on the VXLAN device: the modified EUI-64
/// address of its VTEP MAC (`fe80::` + the MAC with the universal/local bit flipped and
/// `ff:fe` in the middle). Only this node's neighbour entry uses it (it maps it to the MAC): the
/// peer need not hold it, since it takes the frame by its MAC and routes the packet by its
/// destination.
pub fn vtep_gateway_v6(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        a ^ 0x02,
        b,
        c,
        0xff,
        0xfe,
        d,
        e,
        f,
    ])
}

/// How the device is made, from the agent's configuration and the underlay it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub ifname: String,
    pub vni: u32,
    pub port: u16,
    /// The link the encapsulated packets leave by, and its address (the VXLAN `local`).
    pub underlay_ifindex: u32,
    /// Either family: an IPv6 address makes the device's `local` (and every peer's FDB `dst`)
    /// IPv6, which carries both inner families over an IPv6 underlay.
    pub underlay_ip: IpAddr,
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
    pub fn auto(underlay_ifindex: u32, underlay_ip: IpAddr, underlay_mtu: u32) -> Self {
        Self {
            ifname: VXLAN_IFNAME.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_PORT,
            underlay_ifindex,
            underlay_ip,
            mtu: auto_mtu_for(underlay_mtu, underlay_ip.is_ipv6()),
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
    pub local: IpAddr,
    pub underlay_ifindex: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
    /// The node's VTEP address, held as a /32 (none on an IPv6-only node).
    pub address: Option<Ipv4Addr>,
    /// Its IPv6 VTEP address, held as a /128, when the node has an IPv6 subnet.
    pub address_v6: Option<Ipv6Addr>,
    pub tx_checksum_offload: bool,
}

/// Why a peer is left out of the plan. Never a panic: the rest of the peers are programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerConflict {
    #[error("its subnet {subnet} overlaps this node's {mine}")]
    OverlapsMine { subnet: IpNet, mine: IpNet },
    #[error("its subnet {subnet} overlaps that of {other}")]
    OverlapsPeer { subnet: IpNet, other: String },
    #[error("its VTEP MAC is already used by {other}")]
    MacInUse { other: String },
    #[error("its underlay address {ip} is this node's")]
    UnderlayIsMine { ip: IpAddr },
    #[error(
        "its underlay address {ip} is not of this node's underlay family (this node's is {mine})"
    )]
    UnderlayFamily { ip: IpAddr, mine: IpAddr },
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
    /// Peer subnet → its gateway through the device: the peer's VTEP address on-link (IPv4),
    /// or its link-local [`vtep_gateway_v6`] (IPv6).
    pub routes: BTreeMap<IpNet, IpAddr>,
    /// Peer VTEP address (either family) → its VTEP MAC (permanent neighbour entries).
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
    /// Peer VTEP MAC → its underlay IP (FDB entries on the device).
    pub fdb: BTreeMap<[u8; 6], IpAddr>,
    pub skipped: Vec<SkippedPeer>,
}

impl VxlanPlan {
    /// Keeps only the peers whose subnets `keep` accepts (those the node reaches through VXLAN):
    /// their routes, neighbour and FDB entries; the others' go.
    /// A dual-stack peer's subnets of both families go together.
    pub fn retain_subnets(&mut self, keep: impl Fn(&IpNet) -> bool) {
        self.routes.retain(|subnet, _| keep(subnet));
        let gateways: std::collections::BTreeSet<IpAddr> = self.routes.values().copied().collect();
        self.neighbours.retain(|vtep, _| gateways.contains(vtep));
        let macs: std::collections::BTreeSet<[u8; 6]> = self.neighbours.values().copied().collect();
        self.fdb.retain(|mac, _| macs.contains(mac));
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
        address: me.subnet.map(vtep_address),
        address_v6: me.subnet_v6.map(vtep_address_v6),
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
    sorted.sort_by(|a, b| (a.subnet, a.subnet_v6, &a.node).cmp(&(b.subnet, b.subnet_v6, &b.node)));
    let mut taken: Vec<(IpNet, &str)> = Vec::new();
    let mut macs: BTreeMap<[u8; 6], &str> = BTreeMap::from([(me.vtep_mac, me.node.as_str())]);
    let overlaps = |a: &IpNet, b: &IpNet| a.contains(&b.network()) || b.contains(&a.network());
    let mine: Vec<IpNet> = me
        .subnet
        .map(IpNet::from)
        .into_iter()
        .chain(me.subnet_v6.map(IpNet::from))
        .collect();
    for peer in sorted {
        // The peer's subnets this node routes: each family only when this node has it too.
        let theirs: Vec<IpNet> = peer
            .subnet
            .filter(|_| me.subnet.is_some())
            .map(IpNet::from)
            .into_iter()
            .chain(
                peer.subnet_v6
                    .filter(|_| me.subnet_v6.is_some())
                    .map(IpNet::from),
            )
            .collect();
        let conflict = if let Some((subnet, m)) = theirs
            .iter()
            .find_map(|t| mine.iter().find(|m| overlaps(t, m)).map(|m| (*t, *m)))
        {
            Some(PeerConflict::OverlapsMine { subnet, mine: m })
        } else if peer.underlay_ip == cfg.underlay_ip {
            Some(PeerConflict::UnderlayIsMine {
                ip: peer.underlay_ip,
            })
        } else if peer.underlay_ip.is_ipv6() != cfg.underlay_ip.is_ipv6() {
            Some(PeerConflict::UnderlayFamily {
                ip: peer.underlay_ip,
                mine: cfg.underlay_ip,
            })
        } else if let Some((subnet, other)) = theirs.iter().find_map(|t| {
            taken
                .iter()
                .find(|(s, _)| overlaps(s, t))
                .map(|(_, o)| (*t, *o))
        }) {
            Some(PeerConflict::OverlapsPeer {
                subnet,
                other: other.to_string(),
            })
        } else {
            macs.get(&peer.vtep_mac)
                .map(|other| PeerConflict::MacInUse {
                    other: (*other).to_string(),
                })
        };
        if let Some(reason) = conflict {
            tracing::warn!(peer = %peer.node, subnet = ?peer.subnet, subnet_v6 = ?peer.subnet_v6, %reason, "peer skipped");
            out.skipped.push(SkippedPeer {
                node: peer.node.clone(),
                reason,
            });
            continue;
        }
        macs.insert(peer.vtep_mac, &peer.node);
        for subnet in theirs {
            taken.push((subnet, &peer.node));
            let vtep: IpAddr = match subnet {
                IpNet::V4(s) => vtep_address(s).into(),
                IpNet::V6(_) => vtep_gateway_v6(peer.vtep_mac).into(),
            };
            out.routes.insert(subnet, vtep);
            out.neighbours.insert(vtep, peer.vtep_mac);
        }
        out.fdb.insert(peer.vtep_mac, peer.underlay_ip);
    }
    out
}
