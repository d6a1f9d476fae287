//! Where the node's subnet comes from (`subnet-source`), and taking it: the Node's podCIDR
//! published in a lease named from it, or a lease sluice takes itself.

use super::config::{AgentConfig, SubnetSource};
use super::kube_leases::KubeLeases;
use super::node::NodeFacts;
use anyhow::{bail, Result};
use ipnet::{Ipv4Net, Ipv6Net};
use sluice_net::lease::store::{
    acquire, publish, renew, AcquireError, AcquireRequest, LeaseStore, StoreError,
};
use sluice_net::lease::{
    self, FamilyNet, LeaseView, NodeOwner, NodeRecord, SubnetPool, DEFAULT_LEASE_SECS,
};
use std::time::SystemTime;

/// Where this node's subnet comes from, this time.
/// One family's: IPv4 ([`Ipv4Net`], the default) or IPv6 (`Ipv6Net`), each decided alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubnetChoice<N = Ipv4Net> {
    /// The Node's `spec.podCIDR`, published in the lease named from it.
    PodCidr(N),
    /// A lease sluice takes itself, asking first for `prefer`; `why` says why not the podCIDR
    /// (under `auto`), for the log.
    Lease {
        prefer: Option<N>,
        why: Option<String>,
    },
}

/// Decides the source of the subnet from the configuration, the Node's podCIDR, and the subnet
/// this node used before (its last `subnet.env`, or its lease from sluice 0.1):
/// - `lease`: a lease, the old subnet first;
/// - `node-podcidr`: the podCIDR, or an error while the node has none;
/// - `auto`: the podCIDR, except when the node has none, when it lies outside `cluster-cidr`,
///   or when the node's running pods use another subnet (a cluster that leased its subnets
///   before): moving them would take every pod off the network, so the old subnet is kept.
///
/// Per family: a dual-stack node decides its IPv4 and its IPv6 subnet each with this.
pub fn choose<N: FamilyNet>(
    source: SubnetSource,
    pod_cidr: Option<N>,
    used_before: Option<N>,
    cluster_cidr: N,
) -> Result<SubnetChoice<N>, String> {
    let inside = |p: N| {
        let (cluster, p): (ipnet::IpNet, ipnet::IpNet) = (cluster_cidr.into(), p.into());
        cluster.contains(&p)
    };
    let lease = |why: Option<String>| SubnetChoice::Lease {
        prefer: used_before,
        why,
    };
    match source {
        SubnetSource::Lease => Ok(lease(None)),
        SubnetSource::NodePodCidr => pod_cidr
            .map(SubnetChoice::PodCidr)
            .ok_or_else(|| "subnet-source is node-podcidr but the node has no spec.podCIDR yet".into()),
        SubnetSource::Auto => Ok(match pod_cidr {
            None => lease(Some("the node has no spec.podCIDR".into())),
            Some(p) if !inside(p) => lease(Some(format!(
                "its spec.podCIDR {p} is outside cluster-cidr {cluster_cidr}"
            ))),
            Some(p) => match used_before {
                Some(u) if u != p => lease(Some(format!(
                    "its pods use {u} (leased before); spec.podCIDR {p} would take them off the network until they restart"
                ))),
                _ => SubnetChoice::PodCidr(p),
            },
        }),
    }
}

/// The node's subnet leases as held now: the IPv4 one, and on a dual-stack node the IPv6 one
/// (both carry `record`). An IPv6-only node holds one lease, of its IPv6 subnet, in `lease`.
pub struct Held {
    pub lease: LeaseView,
    pub lease_v6: Option<LeaseView>,
    pub record: NodeRecord,
}

/// Adds valid leases of other nodes from sluice 0.1's namespace to what [`acquire`] sees, so
/// that no subnet a node not yet upgraded still holds is taken. Writes go to `inner` only.
struct WithLegacy<'a> {
    inner: &'a KubeLeases,
    blockers: Vec<LeaseView>,
}

impl LeaseStore for WithLegacy<'_> {
    async fn list(&self) -> Result<Vec<LeaseView>, StoreError> {
        let mut all = self.inner.list().await?;
        let names: std::collections::HashSet<String> = all.iter().map(|l| l.name.clone()).collect();
        all.extend(
            self.blockers
                .iter()
                .filter(|b| !names.contains(&b.name))
                .cloned(),
        );
        Ok(all)
    }
    async fn create(&self, lease: &LeaseView) -> Result<LeaseView, StoreError> {
        self.inner.create(lease).await
    }
    async fn update(&self, lease: &LeaseView) -> Result<LeaseView, StoreError> {
        self.inner.update(lease).await
    }
    async fn delete(&self, name: &str, rv: Option<&str>) -> Result<(), StoreError> {
        self.inner.delete(name, rv).await
    }
}

/// What taking a subnet needs to know.
pub struct TakeRequest<'a> {
    pub cfg: &'a AgentConfig,
    pub record: &'a NodeRecord,
    pub owner: &'a NodeOwner,
    pub facts: &'a NodeFacts,
    /// The subnet of the last `subnet.env`.
    pub prefer: Option<Ipv4Net>,
    /// Its IPv6 subnet.
    pub prefer_v6: Option<Ipv6Net>,
    /// sluice 0.1's leases in `kube-system`.
    pub legacy: &'a [LeaseView],
}

pub async fn take(store: &KubeLeases, req: TakeRequest<'_>) -> Result<Held> {
    let node = req.record.node.as_str();
    let now = SystemTime::now();
    // A node upgraded from 0.1 keeps the subnet its 0.1 lease held (no subnet changes hands).
    let legacy_mine = req
        .legacy
        .iter()
        .find(|l| l.holder.as_deref() == Some(node))
        .and_then(|l| lease::parse_lease_name(&l.name).ok());
    let used_before = req.prefer.or(legacy_mine);
    if let (Some(old), None) = (legacy_mine, req.prefer) {
        tracing::info!(node, subnet = %old, "moving this node's lease from kube-system to sluice-system");
    }
    let Some(cluster_v4) = req.cfg.cluster_cidr.v4 else {
        // IPv6-only: one lease, of the IPv6 subnet, by the same rules as a dual-stack node's.
        let Some(cluster_v6) = req.cfg.cluster_cidr.v6 else {
            bail!("cluster-cidr has no range");
        };
        let (lease, record) = take_v6(store, &req, req.record, cluster_v6).await?;
        return Ok(Held {
            lease,
            lease_v6: None,
            record,
        });
    };
    let v4 = take_v4(store, &req, used_before, cluster_v4, now).await?;
    let Some(cluster_v6) = req.cfg.cluster_cidr.v6 else {
        return Ok(Held {
            lease: v4.lease,
            lease_v6: None,
            record: v4.record,
        });
    };
    // Dual-stack: the IPv6 subnet by the same rules, its lease carrying the record with both;
    // then the IPv4 lease is written again with that record, so both say the same.
    let (lease_v6, record) = take_v6(store, &req, &v4.record, cluster_v6).await?;
    let lease = renew(store, &v4.lease, &record, SystemTime::now()).await?;
    Ok(Held {
        lease,
        lease_v6: Some(lease_v6),
        record,
    })
}

/// The IPv6 lease of a dual-stack node, for `record` (which holds its IPv4 subnet already), or
/// an IPv6-only node's only lease.
async fn take_v6(
    store: &KubeLeases,
    req: &TakeRequest<'_>,
    record: &NodeRecord,
    cluster_v6: Ipv6Net,
) -> Result<(LeaseView, NodeRecord)> {
    let node = record.node.as_str();
    let now = SystemTime::now();
    let choice = choose(
        req.cfg.subnet_source,
        req.facts.pod_cidr_v6,
        req.prefer_v6,
        cluster_v6,
    )
    .map_err(anyhow::Error::msg)?;
    if let SubnetChoice::PodCidr(subnet) = choice {
        let mut record = record.clone();
        record.subnet_v6 = Some(subnet);
        let view = lease::podcidr_lease_of(
            subnet,
            &record,
            Some(req.owner.clone()),
            DEFAULT_LEASE_SECS,
            now,
        );
        match publish(store, &view, now, 8).await {
            Ok(lease) => return Ok((lease, record)),
            Err(AcquireError::HeldByOther { subnet, holder })
                if req.cfg.subnet_source == SubnetSource::Auto =>
            {
                tracing::warn!(node, %subnet, holder, "IPv6 spec.podCIDR is another node's leased subnet; taking a lease instead");
            }
            Err(e) => bail!(e),
        }
    } else if let SubnetChoice::Lease { why: Some(why), .. } = &choice {
        tracing::info!(
            node,
            reason = why.as_str(),
            "subnet-source auto: taking an IPv6 lease"
        );
    }
    let areq = AcquireRequest {
        pool: SubnetPool::new(cluster_v6, req.cfg.subnet_length_v6)?,
        record: record.clone(),
        owner: Some(req.owner.clone()),
        duration_secs: DEFAULT_LEASE_SECS,
        prefer: req.prefer_v6,
        max_attempts: 32,
    };
    let got = acquire(store, &areq, SystemTime::now).await?;
    Ok((got.lease, got.record))
}

/// The IPv4 lease ([`take`] without the IPv6 half).
async fn take_v4(
    store: &KubeLeases,
    req: &TakeRequest<'_>,
    used_before: Option<Ipv4Net>,
    cluster_v4: Ipv4Net,
    now: SystemTime,
) -> Result<sluice_net::lease::store::Acquired> {
    let node = req.record.node.as_str();
    let choice = choose(
        req.cfg.subnet_source,
        req.facts.pod_cidr,
        used_before,
        cluster_v4,
    )
    .map_err(anyhow::Error::msg)?;
    if let SubnetChoice::PodCidr(subnet) = choice {
        let mut record = req.record.clone();
        record.subnet = Some(subnet);
        let view = lease::podcidr_lease(&record, Some(req.owner.clone()), DEFAULT_LEASE_SECS, now);
        match publish(store, &view, now, 8).await {
            Ok(lease) => {
                return Ok(sluice_net::lease::store::Acquired {
                    subnet,
                    lease,
                    by: sluice_net::lease::store::AcquiredBy::Kept,
                    record,
                })
            }
            Err(AcquireError::HeldByOther { subnet, holder })
                if req.cfg.subnet_source == SubnetSource::Auto =>
            {
                tracing::warn!(node, %subnet, holder, "spec.podCIDR is another node's leased subnet; taking a lease instead");
            }
            Err(e) => bail!(e),
        }
    } else if let SubnetChoice::Lease { why: Some(why), .. } = &choice {
        tracing::info!(
            node,
            reason = why.as_str(),
            "subnet-source auto: taking a lease"
        );
    }
    let blockers: Vec<LeaseView> = req
        .legacy
        .iter()
        .filter(|l| l.holder.as_deref() != Some(node) && !lease::is_expired(l, now))
        .cloned()
        .collect();
    let req = AcquireRequest {
        pool: SubnetPool::new(cluster_v4, req.cfg.subnet_length)?,
        record: req.record.clone(),
        owner: Some(req.owner.clone()),
        duration_secs: DEFAULT_LEASE_SECS,
        prefer: used_before,
        max_attempts: 32,
    };
    let with_legacy = WithLegacy {
        inner: store,
        blockers,
    };
    Ok(acquire(&with_legacy, &req, SystemTime::now).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn auto_takes_the_podcidr_unless_pods_use_another_subnet() {
        let cluster = net("10.244.0.0/16");
        let pod = Some(net("10.244.2.0/24"));
        assert_eq!(
            choose(SubnetSource::Auto, pod, None, cluster),
            Ok(SubnetChoice::PodCidr(net("10.244.2.0/24")))
        );
        assert_eq!(
            choose(SubnetSource::Auto, pod, pod, cluster),
            Ok(SubnetChoice::PodCidr(net("10.244.2.0/24")))
        );
        // A node whose pods run on a leased 10.244.0.0/24 keeps it.
        let kept = choose(SubnetSource::Auto, pod, Some(net("10.244.0.0/24")), cluster).unwrap();
        assert!(
            matches!(kept, SubnetChoice::Lease { prefer: Some(p), why: Some(_) } if p == net("10.244.0.0/24"))
        );
        // No podCIDR, or one outside sluice's cluster CIDR: a lease.
        assert!(matches!(
            choose(SubnetSource::Auto, None, None, cluster).unwrap(),
            SubnetChoice::Lease {
                prefer: None,
                why: Some(_)
            }
        ));
        assert!(matches!(
            choose(SubnetSource::Auto, Some(net("10.99.1.0/24")), None, cluster).unwrap(),
            SubnetChoice::Lease { why: Some(w), .. } if w.contains("outside")
        ));
    }

    #[test]
    fn lease_and_node_podcidr_do_what_they_say() {
        let cluster = net("10.244.0.0/16");
        let pod = Some(net("10.244.2.0/24"));
        assert_eq!(
            choose(SubnetSource::Lease, pod, None, cluster),
            Ok(SubnetChoice::Lease {
                prefer: None,
                why: None
            })
        );
        assert_eq!(
            choose(
                SubnetSource::NodePodCidr,
                pod,
                Some(net("10.244.9.0/24")),
                cluster
            ),
            Ok(SubnetChoice::PodCidr(net("10.244.2.0/24")))
        );
        assert!(choose(SubnetSource::NodePodCidr, None, None, cluster).is_err());
    }

    #[test]
    fn ipv6_subnets_are_chosen_by_the_same_rules() {
        let n6 = |s: &str| s.parse::<ipnet::Ipv6Net>().unwrap();
        let cluster = n6("fd00:10:244::/56");
        let pod = Some(n6("fd00:10:244:2::/64"));
        assert_eq!(
            choose(SubnetSource::Auto, pod, None, cluster),
            Ok(SubnetChoice::PodCidr(n6("fd00:10:244:2::/64")))
        );
        assert!(matches!(
            choose(SubnetSource::Auto, Some(n6("fd00:99::/64")), None, cluster).unwrap(),
            SubnetChoice::Lease { why: Some(w), .. } if w.contains("outside")
        ));
        let kept = choose(
            SubnetSource::Auto,
            pod,
            Some(n6("fd00:10:244::/64")),
            cluster,
        )
        .unwrap();
        assert!(
            matches!(kept, SubnetChoice::Lease { prefer: Some(p), .. } if p == n6("fd00:10:244::/64"))
        );
        let e =
            choose::<ipnet::Ipv6Net>(SubnetSource::NodePodCidr, None, None, cluster).unwrap_err();
        assert!(e.contains("no spec.podCIDR"), "{e}");
    }
}
