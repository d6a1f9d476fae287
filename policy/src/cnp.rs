//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`, network-policy-api v0.2.0): the
//! object as sluice reads it, and its semantics, compiled into the tiers of the one IR
//! ([`crate::ir::TierVerdict`]).
//!
//! The rules, as the API's reference gives them:
//! - `spec.tier` is `Admin` (decided before NetworkPolicy) or `Baseline` (decided only for
//!   traffic no NetworkPolicy isolates); `spec.priority` orders policies within a tier, lower
//!   first; within one policy the rules of a direction are read in order, the first that
//!   matches decides;
//! - `Accept` and `Deny` are final; `Pass` (and no match) hands the decision on: from Admin to
//!   NetworkPolicy (then Baseline when none isolates), from Baseline to the default (allow);
//! - `spec.subject` selects pods: `namespaces` (every pod of the matching namespaces) or `pods`
//!   (`namespaceSelector` and `podSelector`);
//! - peers: `namespaces`, `pods`; for egress also `networks` (CIDRs of either family) and
//!   `nodes` (by node labels, their addresses);
//! - `protocols` absent is every protocol and port; an item is `tcp`/`udp`/`sctp` with an
//!   optional `destinationPort` (`number`, or `range` `start`..`end`), or
//!   `destinationNamedPort`, resolved on the destination pod (for ingress the subject itself).
//!
//! Where the API leaves room: two policies of one tier with equal priority are merged so that
//! `Deny` wins over `Accept`, and both over `Pass` (the API calls the order undefined; this is
//! the safe reading, and deterministic). A rule the API would reject (no peers, unknown
//! action, a range with `end` below `start`) matches nothing. A peer with no field sluice
//! knows (a newer CRD's, such as `domainNames`, which sluice does not implement) or with more
//! than one fails closed as the API's peer types ask: its `Accept` rule matches nothing, its
//! `Deny` or `Pass` rule denies all traffic of the subject in that direction.

use crate::selector::Labels;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::Deserialize;
use std::net::IpAddr;

pub const GROUP: &str = "policy.networking.k8s.io";
pub const VERSION: &str = "v1alpha2";
pub const KIND: &str = "ClusterNetworkPolicy";
pub const PLURAL: &str = "clusternetworkpolicies";

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ClusterNetworkPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: CnpSpec,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Tier {
    #[default]
    Admin,
    Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CnpSpec {
    pub tier: Tier,
    #[serde(default)]
    pub priority: i32,
    pub subject: Subject,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
    #[serde(default)]
    pub egress: Vec<EgressRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<PodsPeer>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodsPeer {
    #[serde(default)]
    pub namespace_selector: LabelSelector,
    #[serde(default)]
    pub pod_selector: LabelSelector,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default)]
    pub from: Vec<Peer>,
    pub protocols: Option<Vec<ProtocolPort>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default)]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default)]
    pub to: Vec<Peer>,
    pub protocols: Option<Vec<ProtocolPort>>,
}

/// One peer: exactly one field is set (else its rule fails closed, see the module's notes).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub namespaces: Option<LabelSelector>,
    pub pods: Option<PodsPeer>,
    /// Egress only.
    pub networks: Option<Vec<String>>,
    /// Egress only: nodes by their labels.
    pub nodes: Option<LabelSelector>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolPort {
    pub tcp: Option<ProtocolDestination>,
    pub udp: Option<ProtocolDestination>,
    pub sctp: Option<ProtocolDestination>,
    pub destination_named_port: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProtocolDestination {
    pub destination_port: Option<Port>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Port {
    pub number: Option<i32>,
    pub range: Option<PortRange>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PortRange {
    pub start: i32,
    pub end: i32,
}

/// A node as egress `nodes` peers read it: its labels and addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddrs {
    pub labels: Labels,
    pub addrs: Vec<IpAddr>,
}

impl ClusterNetworkPolicy {
    /// `metadata.name`, or "" (cluster-scoped: the name is the identity).
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
}
