//! Which subnet each lab node uses, from where it is decided: the subnet lease its agent holds
//! (DESIGN.md, "Subnet leases"), the subnet file the agent writes for its CNI plugin, and its
//! Node's `spec.podCIDR`. With `subnet-source: lease` an agent leases a free subnet of its own
//! choosing, which need not be its podCIDR: `lab status` shows both then, so that the difference
//! explains itself.

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use serde::Serialize;
use std::collections::BTreeMap;

/// The label on sluice's subnet leases (DESIGN.md).
pub const LEASE_LABEL: &str = "sluice.dev/subnet-lease";
/// Where sluice's leases live (DESIGN.md), then where older agents kept them.
pub const LEASE_NAMESPACES: [&str; 2] = ["sluice-system", "kube-system"];

/// A subnet lease of sluice's, as the API has it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HeldLease {
    pub namespace: String,
    pub name: String,
    pub holder: String,
    pub subnet: String,
    /// Not renewed within its duration: another node may take it.
    pub expired: bool,
}

/// `lease` as a [`HeldLease`] if it is one of sluice's subnet leases: labelled so, or (from an
/// agent older than the label) named `sluice-…` and carrying a node record.
pub fn held_lease(lease: &Lease, now: jiff::Timestamp) -> Option<HeldLease> {
    let md = &lease.metadata;
    let name = md.name.clone()?;
    let labelled = md
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(LEASE_LABEL));
    let annotations = md.annotations.clone().unwrap_or_default();
    let recorded = name.starts_with(sluice_net::lease::LEASE_PREFIX)
        && annotations.contains_key(sluice_net::lease::ANN_NODE);
    if !labelled && !recorded {
        return None;
    }
    let spec = lease.spec.clone().unwrap_or_default();
    // The subnet the lease's name stands for (a dual-stack node's IPv6 lease carries the same
    // record as its IPv4 one, so the record's IPv4 subnet would show twice).
    let subnet = sluice_net::lease::parse_lease_name(&name)
        .map(|n| n.to_string())
        .or_else(|_| sluice_net::lease::parse_lease_name_v6(&name).map(|n| n.to_string()))
        .ok()
        .or_else(|| annotations.get(sluice_net::lease::ANN_SUBNET).cloned())?;
    let expired = match (spec.renew_time, spec.lease_duration_seconds) {
        (Some(renewed), Some(secs)) => renewed
            .0
            .checked_add(jiff::SignedDuration::from_secs(i64::from(secs)))
            .is_ok_and(|until| until < now),
        _ => false,
    };
    Some(HeldLease {
        namespace: md.namespace.clone().unwrap_or_default(),
        name,
        holder: spec.holder_identity.unwrap_or_default(),
        subnet,
        expired,
    })
}

/// sluice's subnet leases in both of their namespaces.
pub async fn leases(client: &kube::Client) -> Result<Vec<HeldLease>> {
    let now = jiff::Timestamp::now();
    let mut out = Vec::new();
    for ns in LEASE_NAMESPACES {
        let api: Api<Lease> = Api::namespaced(client.clone(), ns);
        match api.list(&ListParams::default()).await {
            Ok(list) => out.extend(list.items.iter().filter_map(|l| held_lease(l, now))),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("listing leases in {ns}")),
        }
    }
    Ok(out)
}

/// Each Node's `spec.podCIDRs` (a dual-stack Node's both, comma-separated; else its
/// `spec.podCIDR`), from the API.
pub async fn pod_cidrs(client: &kube::Client) -> Result<BTreeMap<String, String>> {
    let api: Api<Node> = Api::all(client.clone());
    let nodes = api
        .list(&ListParams::default())
        .await
        .context("listing nodes")?;
    Ok(nodes
        .items
        .into_iter()
        .filter_map(|n| {
            let spec = n.spec?;
            let cidrs = match spec.pod_cidrs {
                Some(all) if !all.is_empty() => all.join(","),
                _ => spec.pod_cidr?,
            };
            Some((n.metadata.name?, cidrs))
        })
        .collect())
}

/// Whether two comma-separated lists of subnets hold the same subnets (in any order).
fn same_subnets(a: &str, b: &str) -> bool {
    let (a, b): (
        std::collections::BTreeSet<&str>,
        std::collections::BTreeSet<&str>,
    ) = (a.split(',').collect(), b.split(',').collect());
    a == b
}

/// A node's subnet, from its three sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSubnet {
    pub node: String,
    /// What the node uses: its unexpired leases' subnets, else what its agent wrote.
    pub subnet: Option<String>,
    pub pod_cidr: Option<String>,
    /// What the agent wrote for its CNI plugin (`SLUICE_SUBNET`).
    pub agent_subnet: Option<String>,
    pub leases: Vec<HeldLease>,
}

pub fn node_subnets(
    nodes: &[&str],
    leases: &[HeldLease],
    pod_cidrs: &BTreeMap<String, String>,
    agent_subnets: &BTreeMap<String, String>,
) -> Vec<NodeSubnet> {
    nodes
        .iter()
        .map(|&node| {
            let mut held: Vec<HeldLease> = leases
                .iter()
                .filter(|l| l.holder == node)
                .cloned()
                .collect();
            held.sort_by(|a, b| (a.expired, &a.subnet).cmp(&(b.expired, &b.subnet)));
            let live: Vec<&str> = held
                .iter()
                .filter(|l| !l.expired)
                .map(|l| l.subnet.as_str())
                .collect();
            let agent_subnet = agent_subnets.get(node).cloned();
            let subnet = if live.is_empty() {
                agent_subnet.clone()
            } else {
                Some(live.join(","))
            };
            NodeSubnet {
                node: node.to_string(),
                subnet,
                pod_cidr: pod_cidrs.get(node).cloned(),
                agent_subnet,
                leases: held,
            }
        })
        .collect()
}

impl NodeSubnet {
    /// The table cell: the subnet in use, and what disagrees with it.
    pub fn cell(&self) -> String {
        let mut out = self.subnet.clone().unwrap_or_else(|| "none".into());
        let mut notes = Vec::new();
        if self.leases.iter().all(|l| l.expired) {
            notes.push(match self.leases.first() {
                Some(l) => format!("lease {} expired", l.name),
                None => "no lease".to_string(),
            });
        }
        if let Some(p) = self
            .pod_cidr
            .as_ref()
            .filter(|p| !self.subnet.as_ref().is_some_and(|s| same_subnets(p, s)))
        {
            notes.push(format!("spec.podCIDR {p}"));
        }
        if let Some(a) = self.agent_subnet.as_ref().filter(|a| {
            self.subnet
                .as_ref()
                .is_some_and(|s| !s.split(',').any(|s| s == *a))
        }) {
            notes.push(format!("agent's subnet file {a}"));
        }
        if !notes.is_empty() {
            out = format!("{out} ({})", notes.join("; "));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lease(name: &str, holder: &str, labels: serde_json::Value, renewed: &str) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "sluice-system", "labels": labels,
                "annotations": {"sluice.dev/node": holder}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 40,
                "renewTime": renewed}
        }))
        .unwrap()
    }

    #[test]
    fn reads_sluices_leases_old_and_new() {
        let now: jiff::Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let fresh = "2026-01-01T00:00:50.000000Z";
        let labelled = lease(
            "sluice-10-244-2-0-24",
            "n1",
            json!({LEASE_LABEL: ""}),
            fresh,
        );
        let h = held_lease(&labelled, now).unwrap();
        assert_eq!(
            (h.subnet.as_str(), h.holder.as_str(), h.expired),
            ("10.244.2.0/24", "n1", false)
        );
        let stale = lease(
            "sluice-10-244-3-0-24",
            "n2",
            json!({}),
            "2026-01-01T00:00:00.000000Z",
        );
        assert!(held_lease(&stale, now).unwrap().expired);
        let mut theirs = lease("kube-scheduler", "x", json!({}), fresh);
        theirs.metadata.annotations = None;
        assert_eq!(held_lease(&theirs, now), None);
    }

    fn held(name: &str, holder: &str, subnet: &str, expired: bool) -> HeldLease {
        HeldLease {
            namespace: "sluice-system".into(),
            name: name.into(),
            holder: holder.into(),
            subnet: subnet.into(),
            expired,
        }
    }

    #[test]
    fn a_lease_that_is_not_the_pod_cidr_shows_both() {
        let leases = [
            held("sluice-10-244-2-0-24", "n1", "10.244.2.0/24", false),
            held("sluice-10-244-1-0-24", "n2", "10.244.1.0/24", false),
            held("sluice-10-244-0-0-24", "n3", "10.244.0.0/24", true),
        ];
        let cidrs: BTreeMap<String, String> = [
            ("n1", "10.244.0.0/24"),
            ("n2", "10.244.1.0/24"),
            ("n3", "10.244.2.0/24"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let agents: BTreeMap<String, String> = [("n1", "10.244.2.0/24"), ("n2", "10.244.1.0/24")]
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        let rows = node_subnets(&["n1", "n2", "n3", "n4"], &leases, &cidrs, &agents);
        let cells: Vec<String> = rows.iter().map(NodeSubnet::cell).collect();
        assert_eq!(
            cells,
            [
                "10.244.2.0/24 (spec.podCIDR 10.244.0.0/24)",
                "10.244.1.0/24",
                "none (lease sluice-10-244-0-0-24 expired; spec.podCIDR 10.244.2.0/24)",
                "none (no lease)",
            ]
        );
        assert_eq!(rows[0].subnet.as_deref(), Some("10.244.2.0/24"));
    }

    #[test]
    fn a_dual_stack_node_holding_both_pod_cidrs_shows_no_difference() {
        let leases = [
            held("sluice-fd00-10-244-1-64", "n1", "fd00:10:244:1::/64", false),
            held("sluice-10-244-1-0-24", "n1", "10.244.1.0/24", false),
        ];
        let cidrs: BTreeMap<String, String> = [
            ("n1", "10.244.1.0/24,fd00:10:244:1::/64"),
            ("n2", "10.244.2.0/24,fd00:10:244:2::/64"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let n2 = [held("sluice-10-244-2-0-24", "n2", "10.244.2.0/24", false)];
        let all: Vec<HeldLease> = leases.iter().chain(&n2).cloned().collect();
        let rows = node_subnets(&["n1", "n2"], &all, &cidrs, &BTreeMap::new());
        let cells: Vec<String> = rows.iter().map(NodeSubnet::cell).collect();
        assert_eq!(
            cells,
            [
                "10.244.1.0/24,fd00:10:244:1::/64",
                // Holding only the IPv4 one of its two podCIDRs: shown.
                "10.244.2.0/24 (spec.podCIDR 10.244.2.0/24,fd00:10:244:2::/64)",
            ]
        );
    }
}
