//! Direct routes as a [`Backend`]: a peer's pod subnet routed via its underlay address on the
//! node's underlay link (flannel's host-gw), and, for a peer no path reaches, an `unreachable`
//! route, so that senders get an ICMP error instead of their packets leaving by the default
//! route. Both are sluice's (protocol [`crate::ROUTE_PROTOCOL`]) in the main table; a deleted
//! one is put back by the next pass.

use super::{Backend, BackendFuture, DatapathError, DatapathPlan};
use crate::vxlan::apply::{is_missing, route_addr_any, route_oif, route_table};
use crate::ROUTE_PROTOCOL;
use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What the kernel holds of this backend's routes, of both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Subnet → gateway, for sluice's routes through the underlay link.
    pub routes: BTreeMap<IpNet, Option<IpAddr>>,
    pub unreachable: BTreeSet<IpNet>,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ReplaceRoute { dst: IpNet, via: IpAddr },
    ReplaceUnreachable { dst: IpNet },
    DelRoute { dst: IpNet },
    DelUnreachable { dst: IpNet },
}

impl Change {
    fn is_removal(&self) -> bool {
        matches!(
            self,
            Change::DelRoute { .. } | Change::DelUnreachable { .. }
        )
    }
}

/// The plan's routes of both families, as one map and one set.
fn wanted(plan: &super::DirectPlan) -> (BTreeMap<IpNet, IpAddr>, BTreeSet<IpNet>) {
    let routes = plan
        .routes
        .iter()
        .map(|(d, v)| (IpNet::from(*d), IpAddr::from(*v)))
        .chain(
            plan.routes_v6
                .iter()
                .map(|(d, v)| (IpNet::from(*d), IpAddr::from(*v))),
        )
        .collect();
    let unreachable = plan
        .unreachable
        .iter()
        .map(|d| IpNet::from(*d))
        .chain(plan.unreachable_v6.iter().map(|d| IpNet::from(*d)))
        .collect();
    (routes, unreachable)
}

/// The changes that make `seen` what `plan` wants.
pub fn diff(plan: &super::DirectPlan, seen: &Observed) -> Vec<Change> {
    let (routes, unreachable) = wanted(plan);
    let mut out = Vec::new();
    for (dst, via) in &routes {
        if seen.routes.get(dst) != Some(&Some(*via)) {
            out.push(Change::ReplaceRoute {
                dst: *dst,
                via: *via,
            });
        }
    }
    for dst in &unreachable {
        if !seen.unreachable.contains(dst) {
            out.push(Change::ReplaceUnreachable { dst: *dst });
        }
    }
    for dst in seen.routes.keys() {
        if !routes.contains_key(dst) {
            out.push(Change::DelRoute { dst: *dst });
        }
    }
    for dst in &seen.unreachable {
        if !unreachable.contains(dst) {
            out.push(Change::DelUnreachable { dst: *dst });
        }
    }
    out
}

/// A route message for `dst` of sluice's protocol, in `dst`'s family.
fn base(dst: &IpNet) -> RouteMessage {
    let mut msg = match dst {
        IpNet::V4(d) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(d.network(), d.prefix_len())
            .build(),
        IpNet::V6(d) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(d.network(), d.prefix_len())
            .build(),
    };
    msg.header.protocol = RouteProtocol::from(ROUTE_PROTOCOL);
    msg
}

pub struct DirectBackend {
    handle: Handle,
}

impl DirectBackend {
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// sluice's subnet routes through `underlay` and its unreachable routes, of both
    /// families. A pod's own /32 or /128 (the CNI plugin's) is never among them: they go to
    /// veths, not the underlay.
    async fn observe(&self, underlay: u32) -> Result<Observed, DatapathError> {
        let mut seen = Observed::default();
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
                .map_err(|source| DatapathError::Routes {
                    what: "listing routes".into(),
                    source,
                })?;
            for r in routes.iter().filter(|r| {
                r.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
                    && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
            }) {
                let (any, host) = match r.header.address_family {
                    AddressFamily::Inet6 => (IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128),
                    _ => (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32),
                };
                let dst = route_addr_any(r, true).unwrap_or(any);
                let Ok(dst) = IpNet::new(dst, r.header.destination_prefix_length) else {
                    continue;
                };
                if r.header.kind == RouteType::Unreachable {
                    seen.unreachable.insert(dst);
                } else if route_oif(r) == Some(underlay) && dst.prefix_len() < host {
                    seen.routes.insert(dst, route_addr_any(r, false));
                }
            }
        }
        Ok(seen)
    }

    async fn run(&self, change: &Change, underlay: u32) -> Result<(), DatapathError> {
        let err = |what: String| move |source| DatapathError::Routes { what, source };
        let routes = self.handle.route();
        match change {
            Change::ReplaceRoute { dst, via } => {
                let mut msg = base(dst);
                msg.header.scope = RouteScope::Universe;
                msg.attributes
                    .push(netlink_packet_route::route::RouteAttribute::Gateway(
                        (*via).into(),
                    ));
                msg.attributes
                    .push(netlink_packet_route::route::RouteAttribute::Oif(underlay));
                routes
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(err(format!("route {dst} via {via}")))
            }
            Change::ReplaceUnreachable { dst } => {
                let mut msg = base(dst);
                msg.header.kind = RouteType::Unreachable;
                routes
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(err(format!("unreachable route {dst}")))
            }
            Change::DelRoute { dst } => {
                let mut msg = base(dst);
                msg.attributes
                    .push(netlink_packet_route::route::RouteAttribute::Oif(underlay));
                match routes.del(msg).execute().await {
                    Err(e) if !is_missing(&e) => Err(err(format!("deleting route {dst}"))(e)),
                    _ => Ok(()),
                }
            }
            Change::DelUnreachable { dst } => {
                let mut msg = base(dst);
                msg.header.kind = RouteType::Unreachable;
                match routes.del(msg).execute().await {
                    Err(e) if !is_missing(&e) => {
                        Err(err(format!("deleting unreachable route {dst}"))(e))
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    async fn sync(&self, plan: &DatapathPlan, removals: bool) -> Result<usize, DatapathError> {
        let underlay = plan.direct.underlay_ifindex;
        let seen = self.observe(underlay).await?;
        let changes: Vec<Change> = diff(&plan.direct, &seen)
            .into_iter()
            .filter(|c| c.is_removal() == removals)
            .collect();
        for c in &changes {
            self.run(c, underlay).await?;
        }
        Ok(changes.len())
    }
}

impl Backend for DirectBackend {
    fn name(&self) -> &'static str {
        "direct"
    }

    fn install<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize> {
        Box::pin(self.sync(plan, false))
    }

    fn prune<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize> {
        Box::pin(self.sync(plan, true))
    }

    fn describe(&self, plan: &DatapathPlan) -> (&'static str, serde_json::Value) {
        (
            "direct",
            serde_json::json!({
                "peers": plan.direct.routes.len(),
                "unreachable": plan.direct.unreachable.len(),
                "peersV6": plan.direct.routes_v6.len(),
                "unreachableV6": plan.direct.unreachable_v6.len(),
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::{Ipv4Net, Ipv6Net};

    #[test]
    fn diff_replaces_moves_and_removes_only_its_own() {
        let a: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let b: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let c: Ipv4Net = "10.244.4.0/24".parse().unwrap();
        let gw: Ipv4Addr = "172.31.0.12".parse().unwrap();
        let plan = super::super::DirectPlan {
            underlay_ifindex: 2,
            routes: [(a, gw)].into(),
            unreachable: [b].into(),
            ..Default::default()
        };
        let seen = Observed {
            routes: [
                (a.into(), Some("172.31.0.99".parse().unwrap())),
                (c.into(), Some(gw.into())),
            ]
            .into(),
            unreachable: Default::default(),
        };
        assert_eq!(
            diff(&plan, &seen),
            [
                Change::ReplaceRoute {
                    dst: a.into(),
                    via: gw.into()
                },
                Change::ReplaceUnreachable { dst: b.into() },
                Change::DelRoute { dst: c.into() },
            ]
        );
        let done = Observed {
            routes: [(a.into(), Some(gw.into()))].into(),
            unreachable: [b.into()].into(),
        };
        assert!(diff(&plan, &done).is_empty());
    }

    /// IPv6 routes and unreachable routes are diffed beside the IPv4 ones: one family's
    /// entries never remove the other's.
    #[test]
    fn diff_of_both_families() {
        let v4: Ipv4Net = "10.244.2.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd00:10:244:2::/64".parse().unwrap();
        let gone: Ipv6Net = "fd00:10:244:9::/64".parse().unwrap();
        let far: Ipv6Net = "fd00:10:244:3::/64".parse().unwrap();
        let gw4: Ipv4Addr = "172.31.0.2".parse().unwrap();
        let gw6: Ipv6Addr = "fd00:31::2".parse().unwrap();
        let plan = super::super::DirectPlan {
            underlay_ifindex: 2,
            routes: [(v4, gw4)].into(),
            routes_v6: [(v6, gw6)].into(),
            unreachable_v6: [far].into(),
            ..Default::default()
        };
        let seen = Observed {
            routes: [
                (v4.into(), Some(gw4.into())),
                (gone.into(), Some(gw6.into())),
            ]
            .into(),
            unreachable: Default::default(),
        };
        assert_eq!(
            diff(&plan, &seen),
            [
                Change::ReplaceRoute {
                    dst: v6.into(),
                    via: gw6.into()
                },
                Change::ReplaceUnreachable { dst: far.into() },
                Change::DelRoute { dst: gone.into() },
            ]
        );
    }
}
