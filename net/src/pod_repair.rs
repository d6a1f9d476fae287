//! The host side of the node's pods, kept as the CNI plugin made it: each allocated address
//! routed (/32, or /128 for an IPv6 one, protocol [`crate::ROUTE_PROTOCOL`]) to its pod's
//! host-side veth, with proxy ARP on that veth for an IPv4 pod. A route deleted by hand would otherwise cut the pod off for good (and the
//! policy loop, which finds a pod's veth through that route, would stop knowing it).
//!
//! What is wanted comes from the IPAM state (address → container and interface, whose veth name
//! is [`crate::podnet::host_ifname`]); [`plan`] is pure. Nothing is removed here: a pod that is
//! gone took its veth and route along, and freeing its address is DEL's and GC's business.

use crate::ipam::IpamState;
use crate::podnet::host_ifname;
use futures::TryStreamExt;
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One pod's host side as it must be (one per address: a dual-stack pod has two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSide {
    pub address: IpAddr,
    pub ifname: String,
    pub ifindex: u32,
}

/// What the kernel holds that this module looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Links of sluice's prefix by name → index.
    pub links: BTreeMap<String, u32>,
    /// Protocol-77 /32 and /128 routes in the main table: address → output interface.
    pub routes: BTreeMap<IpAddr, u32>,
}

/// One repair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repair {
    /// The pod's /32 (or /128) route is missing or points elsewhere: (re)place it.
    Route(HostSide),
}

/// The host sides that exist now (a pod whose veth is gone is not wanted here) and the routes
/// among them that must be put back.
pub fn plan(ipam: &IpamState, seen: &Observed) -> (Vec<HostSide>, Vec<Repair>) {
    let mut sides = Vec::new();
    let mut repairs = Vec::new();
    let v4 = ipam.allocations.iter().map(|(a, o)| (IpAddr::V4(*a), o));
    let v6 = ipam.allocations_v6.iter().map(|(a, o)| (IpAddr::V6(*a), o));
    for (address, owner) in v4.chain(v6) {
        let ifname = host_ifname(&owner.container_id, &owner.ifname);
        let Some(&ifindex) = seen.links.get(&ifname) else {
            continue;
        };
        let side = HostSide {
            address,
            ifname,
            ifindex,
        };
        if seen.routes.get(&address) != Some(&ifindex) {
            repairs.push(Repair::Route(side.clone()));
        }
        sides.push(side);
    }
    (sides, repairs)
}

#[derive(Debug, thiserror::Error)]
#[error("repairing pod wiring: {what}: {source}")]
pub struct RepairError {
    what: String,
    #[source]
    source: rtnetlink::Error,
}

/// Reads the links and routes [`plan`] needs.
pub async fn observe(handle: &Handle) -> Result<Observed, RepairError> {
    let err = |what: &str| {
        let what = what.to_string();
        move |source| RepairError { what, source }
    };
    let mut seen = Observed::default();
    let mut links = handle.link().get().execute();
    while let Some(link) = links.try_next().await.map_err(err("listing links"))? {
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        });
        if let Some(name) = name.filter(|n| n.starts_with(crate::LINK_PREFIX)) {
            seen.links.insert(name, link.header.index);
        }
    }
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(err("listing routes"))?;
    for r in routes.iter().filter(|r| {
        r.header.protocol == RouteProtocol::from(crate::ROUTE_PROTOCOL)
            && r.header.destination_prefix_length == 32
            && crate::vxlan::apply::route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
    }) {
        if let (Some(dst), Some(oif)) = (
            crate::vxlan::apply::route_ip(r, true),
            crate::vxlan::apply::route_oif(r),
        ) {
            seen.routes.insert(dst.into(), oif);
        }
    }
    let routes6: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(err("listing IPv6 routes"))?;
    for r in routes6.iter().filter(|r| {
        r.header.protocol == RouteProtocol::from(crate::ROUTE_PROTOCOL)
            && r.header.destination_prefix_length == 128
            && crate::vxlan::apply::route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
    }) {
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet6(ip)) => Some(*ip),
            _ => None,
        });
        if let (Some(dst), Some(oif)) = (dst, crate::vxlan::apply::route_oif(r)) {
            seen.routes.insert(dst.into(), oif);
        }
    }
    Ok(seen)
}

/// Puts one repair in place.
pub async fn apply(handle: &Handle, repair: &Repair) -> Result<(), RepairError> {
    let Repair::Route(side) = repair;
    // As sluice-cni makes them (`kernel::host_route`, `host_route_v6`).
    let route = match side.address {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(a, 32)
            .output_interface(side.ifindex)
            .scope(RouteScope::Link)
            .protocol(RouteProtocol::from(crate::ROUTE_PROTOCOL))
            .build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(a, 128)
            .output_interface(side.ifindex)
            .protocol(RouteProtocol::from(crate::ROUTE_PROTOCOL))
            .build(),
    };
    let len = if side.address.is_ipv4() { 32 } else { 128 };
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|source| RepairError {
            what: format!("route {}/{len} dev {}", side.address, side.ifname),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Owner;

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
            pod: None,
        }
    }

    #[test]
    fn a_missing_or_misdirected_route_of_a_live_pod_is_put_back() {
        let (a4, b4) = (Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 1, 3));
        let (a, b) = (IpAddr::V4(a4), IpAddr::V4(b4));
        let gone = Ipv4Addr::new(10, 244, 1, 4);
        let ipam = IpamState {
            last: None,
            allocations: [(a4, owner("ca")), (b4, owner("cb")), (gone, owner("cgone"))].into(),
            ..Default::default()
        };
        let (va, vb) = (host_ifname("ca", "eth0"), host_ifname("cb", "eth0"));
        let mut seen = Observed {
            links: [(va.clone(), 7), (vb.clone(), 8)].into(),
            routes: [(a, 7), (b, 8)].into(),
        };
        let (sides, repairs) = plan(&ipam, &seen);
        assert_eq!(sides.len(), 2, "the pod whose veth is gone is not wanted");
        assert!(repairs.is_empty());
        seen.routes.remove(&a);
        seen.routes.insert(b, 99);
        let (_, repairs) = plan(&ipam, &seen);
        assert_eq!(
            repairs,
            [
                Repair::Route(HostSide {
                    address: a,
                    ifname: va,
                    ifindex: 7
                }),
                Repair::Route(HostSide {
                    address: b,
                    ifname: vb,
                    ifindex: 8
                }),
            ]
        );
    }

    #[test]
    fn an_ipv6_pods_missing_128_route_is_put_back_too() {
        let a6: Ipv6Addr = "fd00:10:244:1::2".parse().unwrap();
        let ipam = IpamState {
            allocations_v6: [(a6, owner("c6"))].into(),
            ..Default::default()
        };
        let v = host_ifname("c6", "eth0");
        let seen = Observed {
            links: [(v.clone(), 9)].into(),
            routes: BTreeMap::new(),
        };
        let (sides, repairs) = plan(&ipam, &seen);
        let want = HostSide {
            address: IpAddr::V6(a6),
            ifname: v,
            ifindex: 9,
        };
        assert_eq!(sides, std::slice::from_ref(&want));
        assert_eq!(repairs, [Repair::Route(want)]);
        let held = Observed {
            routes: [(IpAddr::V6(a6), 9)].into(),
            ..seen
        };
        assert!(plan(&ipam, &held).1.is_empty());
    }
}
