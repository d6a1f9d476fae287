//! What the kernel holds of the VXLAN datapath, and the changes that turn it into a plan.
//! Only what sluice owns is observed, so only that is ever changed: the device named in the
//! plan; routes of protocol [`crate::ROUTE_PROTOCOL`] through it; permanent neighbour entries
//! and FDB entries on it.

use super::{DeviceSpec, VxlanPlan};
use ipnet::IpNet;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// The device as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedDevice {
    pub index: u32,
    /// False when a link of that name exists but is not a VXLAN device.
    pub is_vxlan: bool,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub underlay_ifindex: Option<u32>,
    pub learning: Option<bool>,
    pub mtu: Option<u32>,
    pub mac: Option<[u8; 6]>,
    pub up: bool,
    /// Addresses with their prefix lengths (IPv6 ones the kernel makes itself, link-local,
    /// not among them).
    pub addresses: BTreeSet<(IpAddr, u8)>,
    /// Whether TX checksum offload is on; `None` when it could not be read.
    pub tx_checksum: Option<bool>,
}

/// Everything sluice owns of the VXLAN datapath, as found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub device: Option<ObservedDevice>,
    /// Protocol-77 routes through the device (both families): destination → gateway.
    pub routes: BTreeMap<IpNet, Option<IpAddr>>,
    /// Permanent neighbour entries on the device (both families).
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
    /// FDB entries on the device: MAC → its remote destinations.
    pub fdb: BTreeMap<[u8; 6], BTreeSet<IpAddr>>,
}

/// One step towards the plan. Device steps come first, then removals, then additions (FDB and
/// neighbour before the route that uses them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The link of the plan's name is not the device the plan wants (kind, VNI, port, local,
    /// underlay or learning): it goes, and is created again.
    DeleteDevice {
        index: u32,
        reason: String,
    },
    CreateDevice,
    /// The plan wants no device: it goes, and everything through it with it.
    RemoveDevice {
        index: u32,
    },
    SetMtu(u32),
    SetMac([u8; 6]),
    SetUp,
    SetTxChecksum(bool),
    /// The address as a host route (/32, or /128 for IPv6).
    AddAddress(IpAddr),
    DelAddress(IpAddr, u8),
    DelRoute {
        dst: IpNet,
    },
    DelNeighbour {
        ip: IpAddr,
    },
    DelFdb {
        mac: [u8; 6],
        dst: IpAddr,
    },
    ReplaceFdb {
        mac: [u8; 6],
        dst: IpAddr,
    },
    ReplaceNeighbour {
        ip: IpAddr,
        mac: [u8; 6],
    },
    ReplaceRoute {
        dst: IpNet,
        via: IpAddr,
    },
}

/// A host route's length in `ip`'s family: 32 or 128.
pub fn host_len(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

impl DeviceSpec {
    /// The device's addresses: the IPv4 VTEP address, and the IPv6 one on a node with IPv6.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> {
        self.address
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.address_v6.map(IpAddr::V6))
    }
}

/// Why the device must be made again, if it must.
fn mismatch(want: &DeviceSpec, have: &ObservedDevice) -> Option<String> {
    if !have.is_vxlan {
        return Some("not a vxlan device".into());
    }
    let checks: [(&str, bool); 5] = [
        ("vni", have.vni == Some(want.vni)),
        ("port", have.port == Some(want.port)),
        ("local", have.local == Some(want.local)),
        (
            "underlay",
            have.underlay_ifindex == Some(want.underlay_ifindex),
        ),
        ("learning", have.learning == Some(false)),
    ];
    let wrong: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| *n)
        .collect();
    (!wrong.is_empty()).then(|| format!("{} differ", wrong.join(", ")))
}

impl Change {
    /// Whether the change takes something away (a route, an entry, the device) rather than
    /// making or fixing something: those wait until every path has put its routes in place, so
    /// that a subnet moving to another path never has a moment without one.
    pub fn is_removal(&self) -> bool {
        matches!(
            self,
            Change::DelRoute { .. }
                | Change::DelNeighbour { .. }
                | Change::DelFdb { .. }
                | Change::RemoveDevice { .. }
        )
    }
}

/// The changes that make `observed` what `plan` wants. Empty when they agree.
pub fn diff(plan: &VxlanPlan, observed: &Observed) -> Vec<Change> {
    let want = &plan.device;
    let mut out = Vec::new();
    if !plan.wanted {
        if let Some(dev) = &observed.device {
            out.push(Change::RemoveDevice { index: dev.index });
        }
        return out;
    }
    let empty = Observed::default();
    // What survives on the device: nothing, if it is (re)created.
    let (have, kept) = match &observed.device {
        Some(dev) => match mismatch(want, dev) {
            None => (Some(dev), observed),
            Some(reason) => {
                out.push(Change::DeleteDevice {
                    index: dev.index,
                    reason,
                });
                (None, &empty)
            }
        },
        None => (None, &empty),
    };
    match have {
        None => {
            out.push(Change::CreateDevice);
            if !want.tx_checksum_offload {
                out.push(Change::SetTxChecksum(false));
            }
            for ip in want.addresses() {
                out.push(Change::AddAddress(ip));
            }
        }
        Some(dev) => {
            if dev.mtu != Some(want.mtu) {
                out.push(Change::SetMtu(want.mtu));
            }
            if dev.mac != Some(want.mac) {
                out.push(Change::SetMac(want.mac));
            }
            if !dev.up {
                out.push(Change::SetUp);
            }
            if dev
                .tx_checksum
                .is_some_and(|on| on != want.tx_checksum_offload)
            {
                out.push(Change::SetTxChecksum(want.tx_checksum_offload));
            }
            let wanted: BTreeSet<(IpAddr, u8)> =
                want.addresses().map(|ip| (ip, host_len(ip))).collect();
            for (ip, len) in &dev.addresses {
                if !wanted.contains(&(*ip, *len)) {
                    out.push(Change::DelAddress(*ip, *len));
                }
            }
            for (ip, len) in &wanted {
                if !dev.addresses.contains(&(*ip, *len)) {
                    out.push(Change::AddAddress(*ip));
                }
            }
        }
    }

    for dst in kept.routes.keys() {
        if !plan.routes.contains_key(dst) {
            out.push(Change::DelRoute { dst: *dst });
        }
    }
    for ip in kept.neighbours.keys() {
        if !plan.neighbours.contains_key(ip) {
            out.push(Change::DelNeighbour { ip: *ip });
        }
    }
    for (mac, dsts) in &kept.fdb {
        let wanted = plan.fdb.get(mac);
        for dst in dsts {
            if wanted != Some(dst) || dsts.len() > 1 {
                out.push(Change::DelFdb {
                    mac: *mac,
                    dst: *dst,
                });
            }
        }
    }
    for (mac, dst) in &plan.fdb {
        let have = kept.fdb.get(mac);
        if have.is_none_or(|d| d.len() != 1 || !d.contains(dst)) {
            out.push(Change::ReplaceFdb {
                mac: *mac,
                dst: *dst,
            });
        }
    }
    for (ip, mac) in &plan.neighbours {
        if kept.neighbours.get(ip) != Some(mac) {
            out.push(Change::ReplaceNeighbour { ip: *ip, mac: *mac });
        }
    }
    for (dst, via) in &plan.routes {
        if kept.routes.get(dst) != Some(&Some(*via)) {
            out.push(Change::ReplaceRoute {
                dst: *dst,
                via: *via,
            });
        }
    }
    out
}

impl Observed {
    /// Applies `change` to this observation as the kernel would: the in-memory fake of the
    /// datapath, for tests of everything above the kernel.
    pub fn apply(&mut self, plan: &VxlanPlan, change: &Change) {
        let want = &plan.device;
        match change {
            Change::DeleteDevice { .. } | Change::RemoveDevice { .. } => {
                *self = Observed::default()
            }
            Change::CreateDevice => {
                *self = Observed::default();
                self.device = Some(ObservedDevice {
                    index: 1000,
                    is_vxlan: true,
                    vni: Some(want.vni),
                    port: Some(want.port),
                    local: Some(want.local),
                    underlay_ifindex: Some(want.underlay_ifindex),
                    learning: Some(false),
                    mtu: Some(want.mtu),
                    mac: Some(want.mac),
                    up: true,
                    addresses: BTreeSet::new(),
                    tx_checksum: Some(true),
                });
            }
            Change::SetMtu(m) => self.with_device(|d| d.mtu = Some(*m)),
            Change::SetMac(m) => self.with_device(|d| d.mac = Some(*m)),
            Change::SetUp => self.with_device(|d| d.up = true),
            Change::SetTxChecksum(on) => self.with_device(|d| d.tx_checksum = Some(*on)),
            Change::AddAddress(ip) => self.with_device(|d| {
                d.addresses.insert((*ip, host_len(*ip)));
            }),
            Change::DelAddress(ip, len) => self.with_device(|d| {
                d.addresses.remove(&(*ip, *len));
            }),
            Change::DelRoute { dst } => {
                self.routes.remove(dst);
            }
            Change::DelNeighbour { ip } => {
                self.neighbours.remove(ip);
            }
            Change::DelFdb { mac, dst } => {
                if let Some(d) = self.fdb.get_mut(mac) {
                    d.remove(dst);
                    if d.is_empty() {
                        self.fdb.remove(mac);
                    }
                }
            }
            Change::ReplaceFdb { mac, dst } => {
                self.fdb.insert(*mac, BTreeSet::from([*dst]));
            }
            Change::ReplaceNeighbour { ip, mac } => {
                self.neighbours.insert(*ip, *mac);
            }
            Change::ReplaceRoute { dst, via } => {
                self.routes.insert(*dst, Some(*via));
            }
        }
    }

    fn with_device(&mut self, f: impl FnOnce(&mut ObservedDevice)) {
        if let Some(d) = self.device.as_mut() {
            f(d);
        }
    }
}
