//! The doing half of the VXLAN datapath: [`VxlanKernel`] observes what sluice owns over
//! rtnetlink (and the ethtool family) and applies a [`diff`]'s changes. It never deletes the
//! device on its own accord (only to re-create one that does not match the plan), so an agent
//! that stops leaves the datapath forwarding.

use super::diff::{diff, Change, Observed, ObservedDevice};
use super::VxlanPlan;
use crate::ethtool::{Ethtool, EthtoolError};
use crate::ROUTE_PROTOCOL;
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, thiserror::Error)]
pub enum VxlanError {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{op} {target}: {source}")]
    Netlink {
        op: &'static str,
        target: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(transparent)]
    Ethtool(#[from] EthtoolError),
    #[error("no link holds the underlay address {ip}")]
    NoUnderlay { ip: IpAddr },
    #[error("the device {name} is missing after it was made")]
    DeviceMissing { name: String },
    #[error("{} of {total} datapath changes failed, first: {}", .errors.len(), .errors.first().map(|(c, e)| format!("{c:?}: {e}")).unwrap_or_default())]
    Apply {
        total: usize,
        errors: Vec<(Change, VxlanError)>,
    },
}

fn netlink(op: &'static str, target: impl ToString) -> impl FnOnce(rtnetlink::Error) -> VxlanError {
    let target = target.to_string();
    move |source| VxlanError::Netlink { op, target, source }
}

pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// The link the encapsulated packets leave by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    pub ifindex: u32,
    pub name: String,
    pub mtu: u32,
    /// The node's underlay address with its prefix on that link: the subnet whose nodes it
    /// reaches without a router. Either family: the tunnels' endpoints are of its family.
    pub network: IpNet,
    /// The node's IPv6 address on the same link with its prefix, when it has one that is not
    /// link-local (see [`underlay_v6`]): direct IPv6 routes reach the peers on that prefix.
    pub network_v6: Option<ipnet::Ipv6Net>,
}

/// The IPv6 address the node publishes as its underlay beside `ifindex`'s IPv4 one: of the
/// link's `(address, prefix)` pairs, the lowest global (not link-local, not multicast, not
/// loopback) one, so that the choice is stable whatever the kernel's order.
pub fn underlay_v6(addrs: &[(Ipv6Addr, u8)]) -> Option<ipnet::Ipv6Net> {
    addrs
        .iter()
        .filter(|(a, _)| {
            (a.segments()[0] & 0xffc0) != 0xfe80
                && !a.is_multicast()
                && !a.is_loopback()
                && !a.is_unspecified()
        })
        .filter_map(|&(a, p)| ipnet::Ipv6Net::new(a, p).ok())
        .min()
}

/// The VXLAN datapath over netlink, in the network namespace of the thread that connected.
pub struct VxlanKernel {
    handle: Handle,
    ethtool: Option<Ethtool>,
}

impl VxlanKernel {
    /// Connects in the calling thread's namespace; must run inside a tokio runtime. Without the
    /// ethtool family (kernels before 5.6) checksum offload cannot be switched off: that is
    /// logged, and the rest works.
    pub fn connect() -> Result<Self, VxlanError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(VxlanError::Socket)?;
        tokio::spawn(conn);
        let ethtool = Ethtool::connect()
            .inspect_err(|e| tracing::warn!(error = %e, "no ethtool netlink: TX checksum offload stays as it is"))
            .ok();
        Ok(Self { handle, ethtool })
    }

    /// The link holding `ip` (the node's underlay address), with its MTU.
    pub async fn underlay_by_address(&self, ip: IpAddr) -> Result<Underlay, VxlanError> {
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing addresses", "all"))?;
        let (index, prefix) = addrs
            .iter()
            .find(|a| {
                a.attributes
                    .iter()
                    .any(|at| matches!(at, AddressAttribute::Address(x) if *x == ip))
            })
            .map(|a| (a.header.index, a.header.prefix_len))
            .ok_or(VxlanError::NoUnderlay { ip })?;
        let link = self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
            .map_err(netlink("looking up link", index))?
            .ok_or(VxlanError::NoUnderlay { ip })?;
        Ok(Underlay {
            ifindex: index,
            name: link_name(&link).unwrap_or_default().to_string(),
            mtu: link_mtu(&link).unwrap_or(1500),
            network: IpNet::new(ip, prefix).unwrap_or_else(|_| ip.into()),
            // An IPv6 underlay address is the node's IPv6 one too.
            network_v6: match ip {
                IpAddr::V6(a) => ipnet::Ipv6Net::new(a, prefix).ok(),
                IpAddr::V4(_) => underlay_v6(&v6_on(&addrs, index)),
            },
        })
    }

    async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>, VxlanError> {
        match self
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
        {
            Ok(l) => Ok(l),
            Err(e) if errno(&e) == Some(nix::libc::ENODEV) => Ok(None),
            Err(e) => Err(netlink("looking up link", name)(e)),
        }
    }

    /// What sluice owns of the datapath named `ifname`.
    pub async fn observe(&mut self, ifname: &str) -> Result<Observed, VxlanError> {
        let mut seen = Observed::default();
        let Some(link) = self.link_by_name(ifname).await? else {
            return Ok(seen);
        };
        let index = link.header.index;
        let mut dev = device_of(&link);
        let addrs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing addresses on", ifname))?;
        dev.addresses = addrs
            .iter()
            .filter(|a| a.header.index == index)
            .filter_map(|a| {
                a.attributes.iter().find_map(|at| match at {
                    AddressAttribute::Address(ip @ IpAddr::V4(_)) => {
                        Some((*ip, a.header.prefix_len))
                    }
                    // The kernel's own link-local address is not sluice's.
                    AddressAttribute::Address(ip @ IpAddr::V6(v6))
                        if v6.segments()[0] & 0xffc0 != 0xfe80 =>
                    {
                        Some((*ip, a.header.prefix_len))
                    }
                    _ => None,
                })
            })
            .collect();
        if let Some(et) = self.ethtool.as_mut() {
            dev.tx_checksum = et
                .tx_checksum(ifname)
                .inspect_err(|e| tracing::warn!(error = %e, "cannot read offload features"))
                .ok();
        }
        seen.device = Some(dev);

        for query in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let routes: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("listing routes", ifname))?;
            for r in &routes {
                if r.header.protocol != RouteProtocol::from(ROUTE_PROTOCOL)
                    || route_table(r) != u32::from(RouteHeader::RT_TABLE_MAIN)
                    || route_oif(r) != Some(index)
                {
                    continue;
                }
                let Some(dst) = route_addr_any(r, true).or(match r.header.address_family {
                    AddressFamily::Inet6 => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
                    _ => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                }) else {
                    continue;
                };
                if let Ok(net) = IpNet::new(dst, r.header.destination_prefix_length) {
                    seen.routes.insert(net, route_addr_any(r, false));
                }
            }
        }

        for family in [
            AddressFamily::Inet,
            AddressFamily::Inet6,
            AddressFamily::Bridge,
        ] {
            let entries: Vec<NeighbourMessage> = self
                .handle
                .neighbours()
                .get()
                .set_address_family(family)
                .execute()
                .try_collect()
                .await
                .map_err(netlink("listing neighbours", ifname))?;
            for n in entries.iter().filter(|n| n.header.ifindex == index) {
                let (ip, mac) = neigh_fields(n);
                match (family, ip, mac) {
                    (AddressFamily::Inet | AddressFamily::Inet6, Some(ip), Some(mac))
                        if n.header.state == NeighbourState::Permanent =>
                    {
                        seen.neighbours.insert(ip, mac);
                    }
                    (AddressFamily::Bridge, Some(ip), Some(mac))
                        if n.header.flags.contains(NeighbourFlags::Own) =>
                    {
                        seen.fdb.entry(mac).or_default().insert(ip);
                    }
                    _ => {}
                }
            }
        }
        Ok(seen)
    }

    /// Applies `changes` (from [`diff`] against `plan`) in order. Keeps going after a failed
    /// entry and reports every failure at the end; the next pass retries what failed.
    pub async fn apply(&mut self, plan: &VxlanPlan, changes: &[Change]) -> Result<(), VxlanError> {
        let mut errors = Vec::new();
        let mut index = None;
        for change in changes {
            if let Err(e) = self.apply_one(plan, change, &mut index).await {
                tracing::warn!(?change, error = %e, "datapath change failed");
                let fatal = matches!(change, Change::CreateDevice | Change::DeleteDevice { .. });
                errors.push((change.clone(), e));
                if fatal {
                    break;
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(VxlanError::Apply {
                total: changes.len(),
                errors,
            })
        }
    }

    /// One reconciliation pass: observe, diff, apply. Returns the changes made (empty when the
    /// kernel already matched the plan).
    pub async fn sync(&mut self, plan: &VxlanPlan) -> Result<Vec<Change>, VxlanError> {
        self.sync_where(plan, |_| true).await
    }

    /// Half a pass: only the changes `which` selects (see [`Change::is_removal`]).
    pub async fn sync_where(
        &mut self,
        plan: &VxlanPlan,
        which: impl Fn(&Change) -> bool,
    ) -> Result<Vec<Change>, VxlanError> {
        let observed = self.observe(&plan.device.name).await?;
        let changes: Vec<Change> = diff(plan, &observed)
            .into_iter()
            .filter(|c| which(c))
            .collect();
        self.apply(plan, &changes).await?;
        tracing::debug!(
            peers = plan.fdb.len(),
            skipped = plan.skipped.len(),
            changes = changes.len(),
            "vxlan datapath synced"
        );
        Ok(changes)
    }

    async fn device_index(&self, name: &str, cached: &mut Option<u32>) -> Result<u32, VxlanError> {
        if let Some(i) = cached {
            return Ok(*i);
        }
        let link = self
            .link_by_name(name)
            .await?
            .ok_or_else(|| VxlanError::DeviceMissing { name: name.into() })?;
        *cached = Some(link.header.index);
        Ok(link.header.index)
    }

    async fn apply_one(
        &mut self,
        plan: &VxlanPlan,
        change: &Change,
        cached: &mut Option<u32>,
    ) -> Result<(), VxlanError> {
        let d = &plan.device;
        let name = d.name.as_str();
        if let Change::DeleteDevice { index, reason } = change {
            tracing::info!(device = name, reason, "re-creating the vxlan device");
            *cached = None;
            return self
                .handle
                .link()
                .del(*index)
                .execute()
                .await
                .map_err(netlink("deleting link", name));
        }
        if let Change::RemoveDevice { index } = change {
            tracing::info!(
                device = name,
                "removing the vxlan device: no peer is reached through it"
            );
            *cached = None;
            return ignore_missing(self.handle.link().del(*index).execute().await)
                .map_err(netlink("deleting link", name));
        }
        if let Change::CreateDevice = change {
            *cached = None;
            let vx = LinkVxlan::new(name, d.vni)
                .dev(d.underlay_ifindex)
                .port(d.port);
            let vx = match d.local {
                IpAddr::V4(a) => vx.local(a),
                IpAddr::V6(a) => vx.local6(a),
            };
            let msg = vx
                .learning(false)
                .mtu(d.mtu)
                .address(d.mac.to_vec())
                .up()
                .build();
            return self
                .handle
                .link()
                .add(msg)
                .execute()
                .await
                .map_err(netlink("creating vxlan device", name));
        }
        let index = self.device_index(name, cached).await?;
        let h = &self.handle;
        let set = |b: LinkMessageBuilder<LinkUnspec>| h.link().set(b.build()).execute();
        match change {
            Change::DeleteDevice { .. } | Change::RemoveDevice { .. } | Change::CreateDevice => {
                Ok(())
            }
            Change::SetMtu(m) => set(LinkUnspec::new_with_index(index).mtu(*m))
                .await
                .map_err(netlink("setting MTU of", name)),
            Change::SetMac(m) => set(LinkUnspec::new_with_index(index).address(m.to_vec()))
                .await
                .map_err(netlink("setting MAC of", name)),
            Change::SetUp => set(LinkUnspec::new_with_index(index).up())
                .await
                .map_err(netlink("bringing up", name)),
            Change::SetTxChecksum(on) => match self.ethtool.as_mut() {
                Some(et) => Ok(et.set_tx_checksum(name, *on)?),
                None => Ok(()),
            },
            Change::AddAddress(ip) => h
                .address()
                .add(index, *ip, super::diff::host_len(*ip))
                .replace()
                .execute()
                .await
                .map_err(netlink("adding address", ip)),
            Change::DelAddress(ip, len) => {
                let found: Vec<AddressMessage> = h
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect()
                    .await
                    .map_err(netlink("listing addresses on", name))?;
                for a in found.into_iter().filter(|a| {
                    a.header.index == index
                        && a.header.prefix_len == *len
                        && a.attributes
                            .iter()
                            .any(|at| matches!(at, AddressAttribute::Address(x) if x == ip))
                }) {
                    h.address()
                        .del(a)
                        .execute()
                        .await
                        .map_err(netlink("deleting address", ip))?;
                }
                Ok(())
            }
            Change::DelRoute { dst } => {
                let msg = route_message(*dst, None, index);
                ignore_missing(h.route().del(msg).execute().await)
                    .map_err(netlink("deleting route", dst))
            }
            Change::ReplaceRoute { dst, via } => {
                let msg = route_message(*dst, Some(*via), index);
                h.route()
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(netlink("adding route", dst))
            }
            Change::DelNeighbour { ip } => {
                let mut msg = NeighbourMessage::default();
                msg.header.ifindex = index;
                let (family, addr) = match ip {
                    IpAddr::V4(v4) => (AddressFamily::Inet, NeighbourAddress::Inet(*v4)),
                    IpAddr::V6(v6) => (AddressFamily::Inet6, NeighbourAddress::Inet6(*v6)),
                };
                msg.header.family = family;
                msg.attributes.push(NeighbourAttribute::Destination(addr));
                ignore_missing(h.neighbours().del(msg).execute().await)
                    .map_err(netlink("deleting neighbour", ip))
            }
            Change::ReplaceNeighbour { ip, mac } => h
                .neighbours()
                .add(index, *ip)
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(netlink("adding neighbour", ip)),
            Change::DelFdb { mac, dst } => {
                let mut msg = NeighbourMessage::default();
                msg.header.family = AddressFamily::Bridge;
                msg.header.ifindex = index;
                msg.header.flags = NeighbourFlags::Own;
                msg.attributes
                    .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
                msg.attributes
                    .push(NeighbourAttribute::Destination(match dst {
                        IpAddr::V4(a) => NeighbourAddress::Inet(*a),
                        IpAddr::V6(a) => NeighbourAddress::Inet6(*a),
                    }));
                ignore_missing(h.neighbours().del(msg).execute().await)
                    .map_err(netlink("deleting fdb entry", crate::lease::format_mac(mac)))
            }
            Change::ReplaceFdb { mac, dst } => h
                .neighbours()
                .add_bridge(index, mac)
                .destination(*dst)
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(netlink("adding fdb entry", crate::lease::format_mac(mac))),
        }
    }
}

/// A deletion of something already gone succeeded.
fn ignore_missing(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(e) if is_missing(&e) => Ok(()),
        other => other,
    }
}

/// Whether a delete failed because the thing was already gone.
pub(crate) fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(nix::libc::ENOENT | nix::libc::ESRCH))
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn link_mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn device_of(link: &LinkMessage) -> ObservedDevice {
    let mut dev = ObservedDevice {
        index: link.header.index,
        is_vxlan: false,
        vni: None,
        port: None,
        local: None,
        underlay_ifindex: None,
        learning: None,
        mtu: link_mtu(link),
        mac: None,
        up: link.header.flags.contains(LinkFlags::Up),
        addresses: BTreeSet::new(),
        tx_checksum: None,
    };
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Address(m) => dev.mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => dev.is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(v) => dev.vni = Some(*v),
                                    InfoVxlan::Port(p) => dev.port = Some(*p),
                                    InfoVxlan::Local(ip) => dev.local = Some((*ip).into()),
                                    InfoVxlan::Local6(ip) => dev.local = Some((*ip).into()),
                                    InfoVxlan::Link(i) => dev.underlay_ifindex = Some(*i),
                                    InfoVxlan::Learning(l) => dev.learning = Some(*l),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    dev
}

pub(crate) fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

pub(crate) fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// A sluice route through the device `index` to `dst`, on-link via `via` when given (the
/// gateway's family is `dst`'s: the plan pairs them so).
fn route_message(dst: IpNet, via: Option<IpAddr>, index: u32) -> RouteMessage {
    let proto = RouteProtocol::from(ROUTE_PROTOCOL);
    match dst {
        IpNet::V4(d) => {
            let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(index)
                .protocol(proto);
            if let Some(IpAddr::V4(gw)) = via {
                b = b.gateway(gw).onlink().scope(RouteScope::Universe);
            }
            b.build()
        }
        IpNet::V6(d) => {
            let mut b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(index)
                .protocol(proto);
            // A link-local gateway on the device: no on-link flag (see the module's notes).
            if let Some(IpAddr::V6(gw)) = via {
                b = b.gateway(gw);
            }
            b.build()
        }
    }
}

/// The destination (`dst`) or gateway of a route of either family.
pub(crate) fn route_addr_any(r: &RouteMessage, dst: bool) -> Option<IpAddr> {
    r.attributes.iter().find_map(|a| match (a, dst) {
        (RouteAttribute::Destination(RouteAddress::Inet(ip)), true)
        | (RouteAttribute::Gateway(RouteAddress::Inet(ip)), false) => Some(IpAddr::V4(*ip)),
        (RouteAttribute::Destination(RouteAddress::Inet6(ip)), true)
        | (RouteAttribute::Gateway(RouteAddress::Inet6(ip)), false) => Some(IpAddr::V6(*ip)),
        _ => None,
    })
}

/// The IPv6 addresses (with prefix) of link `index` in an address dump.
fn v6_on(addrs: &[AddressMessage], index: u32) -> Vec<(Ipv6Addr, u8)> {
    addrs
        .iter()
        .filter(|a| a.header.index == index)
        .flat_map(|a| {
            a.attributes.iter().filter_map(move |at| match at {
                AddressAttribute::Address(IpAddr::V6(x)) => Some((*x, a.header.prefix_len)),
                _ => None,
            })
        })
        .collect()
}

/// The destination (`dst`) or gateway of a route.
pub(crate) fn route_ip(r: &RouteMessage, dst: bool) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match (a, dst) {
        (RouteAttribute::Destination(RouteAddress::Inet(ip)), true)
        | (RouteAttribute::Gateway(RouteAddress::Inet(ip)), false) => Some(*ip),
        _ => None,
    })
}

fn neigh_fields(n: &NeighbourMessage) -> (Option<IpAddr>, Option<[u8; 6]>) {
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(x)) => ip = Some((*x).into()),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(x)) => ip = Some((*x).into()),
            // FDB entries (family bridge) carry their destination undecoded: 4 bytes for an
            // IPv4 underlay, 16 for an IPv6 one.
            NeighbourAttribute::Destination(NeighbourAddress::Other(raw)) => {
                ip = <[u8; 4]>::try_from(raw.as_slice())
                    .map(|b| IpAddr::V4(Ipv4Addr::from(b)))
                    .or_else(|_| {
                        <[u8; 16]>::try_from(raw.as_slice()).map(|b| IpAddr::V6(Ipv6Addr::from(b)))
                    })
                    .ok();
            }
            NeighbourAttribute::LinkLayerAddress(m) => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
            _ => {}
        }
    }
    (ip, mac)
}
