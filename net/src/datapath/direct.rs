//! Direct routes as a [`Backend`]: a peer's pod subnet routed via its underlay address on the
//! node's underlay link (flannel's host-gw), and, for a peer no path reaches, an `unreachable`
//! route, so that senders get an ICMP error instead of their packets leaving by the default
//! route. Both are sluice's (protocol [`crate::ROUTE_PROTOCOL`]) in the main table; a deleted
//! one is put back by the next pass.

use super::{Backend, BackendFuture, DatapathError, DatapathPlan};
use crate::vxlan::apply::{is_missing, route_ip, route_oif, route_table};
use crate::ROUTE_PROTOCOL;
use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{
    RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// What the kernel holds of this backend's routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// Subnet → gateway, for sluice's routes through the underlay link.
    pub routes: BTreeMap<Ipv4Net, Option<Ipv4Addr>>,
    pub unreachable: std::collections::BTreeSet<Ipv4Net>,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    ReplaceRoute { dst: Ipv4Net, via: Ipv4Addr },
    ReplaceUnreachable { dst: Ipv4Net },
    DelRoute { dst: Ipv4Net },
    DelUnreachable { dst: Ipv4Net },
}

impl Change {
    fn is_removal(&self) -> bool {
        matches!(
            self,
            Change::DelRoute { .. } | Change::DelUnreachable { .. }
        )
    }
}

/// The changes that make `seen` what `plan` wants.
pub fn diff(plan: &super::DirectPlan, seen: &Observed) -> Vec<Change> {
    let mut out = Vec::new();
    for (dst, via) in &plan.routes {
        if seen.routes.get(dst) != Some(&Some(*via)) {
            out.push(Change::ReplaceRoute {
                dst: *dst,
                via: *via,
            });
        }
    }
    for dst in &plan.unreachable {
        if !seen.unreachable.contains(dst) {
            out.push(Change::ReplaceUnreachable { dst: *dst });
        }
    }
    for dst in seen.routes.keys() {
        if !plan.routes.contains_key(dst) {
            out.push(Change::DelRoute { dst: *dst });
        }
    }
    for dst in &seen.unreachable {
        if !plan.unreachable.contains(dst) {
            out.push(Change::DelUnreachable { dst: *dst });
        }
    }
    out
}

pub struct DirectBackend {
    handle: Handle,
}

impl DirectBackend {
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// sluice's subnet routes through `underlay` and its unreachable routes. A pod's own /32
    /// (the CNI plugin's) is never among them: they go to veths, not the underlay.
    async fn observe(&self, underlay: u32) -> Result<Observed, DatapathError> {
        let routes: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|source| DatapathError::Routes {
                what: "listing routes".into(),
                source,
            })?;
        let mut seen = Observed::default();
        for r in routes.iter().filter(|r| {
            r.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
                && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
        }) {
            let dst = route_ip(r, true).unwrap_or(Ipv4Addr::UNSPECIFIED);
            let Ok(dst) = Ipv4Net::new(dst, r.header.destination_prefix_length) else {
                continue;
            };
            if r.header.kind == RouteType::Unreachable {
                seen.unreachable.insert(dst);
            } else if route_oif(r) == Some(underlay) && dst.prefix_len() < 32 {
                seen.routes.insert(dst, route_ip(r, false));
            }
        }
        Ok(seen)
    }

    async fn run(&self, change: &Change, underlay: u32) -> Result<(), DatapathError> {
        let base = |dst: &Ipv4Net| {
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(dst.network(), dst.prefix_len())
                .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        };
        let err = |what: String| move |source| DatapathError::Routes { what, source };
        let routes = self.handle.route();
        match change {
            Change::ReplaceRoute { dst, via } => {
                let msg = base(dst)
                    .gateway(*via)
                    .output_interface(underlay)
                    .scope(RouteScope::Universe)
                    .build();
                routes
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(err(format!("route {dst} via {via}")))
            }
            Change::ReplaceUnreachable { dst } => {
                let msg = base(dst).kind(RouteType::Unreachable).build();
                routes
                    .add(msg)
                    .replace()
                    .execute()
                    .await
                    .map_err(err(format!("unreachable route {dst}")))
            }
            Change::DelRoute { dst } => {
                let msg = base(dst).output_interface(underlay).build();
                match routes.del(msg).execute().await {
                    Err(e) if !is_missing(&e) => Err(err(format!("deleting route {dst}"))(e)),
                    _ => Ok(()),
                }
            }
            Change::DelUnreachable { dst } => {
                let msg = base(dst).kind(RouteType::Unreachable).build();
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
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        let seen = Observed {
            routes: [(a, Some("172.31.0.99".parse().unwrap())), (c, Some(gw))].into(),
            unreachable: Default::default(),
        };
        assert_eq!(
            diff(&plan, &seen),
            [
                Change::ReplaceRoute { dst: a, via: gw },
                Change::ReplaceUnreachable { dst: b },
                Change::DelRoute { dst: c },
            ]
        );
        let done = Observed {
            routes: [(a, Some(gw))].into(),
            unreachable: [b].into(),
        };
        assert!(diff(&plan, &done).is_empty());
    }
}
