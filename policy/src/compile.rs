//! NetworkPolicy semantics, in one place: Pods, Namespaces and NetworkPolicies in, the node's
//! [`PolicyIr`] out. Pure and deterministic.
//!
//! The rules, as the Kubernetes API documentation gives them:
//! - a policy selects pods of its own namespace by `podSelector` (empty: all of them);
//! - `policyTypes` says which directions it isolates; absent (or empty) it is `Ingress`, plus
//!   `Egress` when the policy has a non-empty `egress` list;
//! - a pod selected for a direction by any policy is isolated there and allows the union of the
//!   rules of all those policies; `ingress`/`egress` absent or `[]` allows nothing, `[{}]` all;
//! - `from`/`to` absent or `[]` is every peer; a peer's `podSelector` alone means pods of the
//!   policy's namespace, `namespaceSelector` alone all pods of the matching namespaces (`{}`:
//!   every namespace), both together pods matching the first in namespaces matching the second;
//!   `ipBlock` is its `cidr` less its `except`s;
//! - `ports` absent or `[]` is every port of every protocol; a port entry without `port` is
//!   every port of its protocol (default TCP); `endPort` makes a range; a named port is
//!   resolved on the destination: for ingress the selected pod itself, for egress each peer pod
//!   (a destination that is not a pod, e.g. an `ipBlock` outside the pods, never matches one).
//!
//! Choices where the API leaves room: hostNetwork pods and pods without an IP or finished are not
//! peers by selector (their address is the node's); namespaces carry the
//! `kubernetes.io/metadata.name` label as the API server sets it; both families (a pod is
//! named by each of its `podIPs`, an `ipBlock` is of its `cidr`'s family, and an `except` of
//! the other family, which the API refuses, makes the block match nothing); a field the API would reject (unknown protocol, `endPort` below `port`, a
//! peer with no selector nor block) allows nothing. Traffic from `host_addrs` (the node's own
//! addresses) is always allowed in, so that kubelet probes keep working under default deny.

use crate::cnp::{ClusterNetworkPolicy, NodeAddrs};
use crate::ir::{
    AddrSet, Direction, Family, PodPolicy, PolicyIr, PortEntry, Protocol, TierVerdict,
};
use crate::selector::{self, LabelIndex, Labels};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use peers::{Changes, Peer, PeerIndex};
pub use pod::ClusterPod;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

/// The label the API server puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A cluster snapshot: every Pod as policy reads it (shared with the watch cache that holds
/// them: a [`Compiler`] keeps those it names), Namespace and NetworkPolicy (borrowed), and
/// this node's own addresses.
#[derive(Debug, Clone, Copy, Default)]
pub struct PolicyInput<'a> {
    pub pods: &'a [Arc<ClusterPod>],
    pub namespaces: &'a [&'a Namespace],
    pub policies: &'a [&'a NetworkPolicy],
    /// The node's addresses: host-to-pod traffic from them is always allowed.
    pub host_addrs: &'a [IpAddr],
    /// ClusterNetworkPolicies (both tiers).
    pub cluster_policies: &'a [&'a ClusterNetworkPolicy],
    /// The cluster's nodes, for egress `nodes` peers of ClusterNetworkPolicies.
    pub nodes: &'a [NodeAddrs],
    /// Keep which ClusterNetworkPolicy denies what ([`crate::TierVerdict::denied_by`]): work
    /// and memory only drop logs use.
    pub attribute_drops: bool,
}

/// A container port that has a name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// A pod on this node, as the agent knows it: its addresses and host-side veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub namespace: String,
    pub name: String,
    /// At most one of each family.
    pub ips: Vec<IpAddr>,
    pub ifname: String,
    pub labels: Labels,
    pub ports: Vec<NamedPort>,
}

impl LocalPod {
    /// From the pod and the veth sluice made for it; `None` when the pod has no address yet
    /// or is on the host network (no policy applies to it).
    pub fn from_pod(pod: &ClusterPod, ifname: &str) -> Option<Self> {
        if pod.host_network || pod.ips.is_empty() {
            return None;
        }
        Some(Self {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            ips: pod.ips.clone(),
            ifname: ifname.to_string(),
            labels: pod.labels.clone(),
            ports: pod.ports.clone(),
        })
    }
}

/// One rule: its peers (`from`/`to`) and its ports.
type Rule<'a> = (
    Option<&'a [NetworkPolicyPeer]>,
    Option<&'a [NetworkPolicyPort]>,
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dir {
    Ingress,
    Egress,
}

/// Resolved peers of one policy's rules, for the version of the policy they were resolved
/// from.
#[derive(Debug)]
struct PolicyPeers {
    version: String,
    rules: HashMap<(Dir, usize), (AddrSet, u64)>,
}

/// The compiler, and what it keeps from pass to pass (Calico's calculation graph, in
/// miniature): the cluster's pods as peers, indexed, read again only when they change; and
/// each rule's resolved peers, resolved again only when its policy changes, a namespace
/// changes, or a changed pod is one the rule could name. [`Compiler::compile`] gives exactly
/// what [`compile`] does; the state only saves work.
#[derive(Debug, Default)]
pub struct Compiler {
    peers: PeerIndex,
    ns_labels: HashMap<String, Labels>,
    /// By policy uid (namespace/name when it has none).
    resolved: HashMap<String, PolicyPeers>,
    pass: u64,
    /// This pass's resolved peers of (policy, direction, rule).
    peer_cache: HashMap<(usize, Dir, usize), AddrSet>,
    /// This pass's egress named ports: (name, protocol) → port → pod addresses.
    named_cache: HashMap<(String, Protocol), BTreeMap<u16, AddrSet>>,
    /// ClusterNetworkPolicy tiers, per group of pods they decide alike.
    tier_memo: tiers::TierMemo,
}

/// The node's policy: one [`PodPolicy`] per local pod, sorted by interface name.
pub fn compile(input: &PolicyInput<'_>, local_pods: &[LocalPod]) -> PolicyIr {
    Compiler::default().compile(input, local_pods)
}

impl Compiler {
    /// The node's policy: one [`PodPolicy`] per local pod, sorted by interface name.
    ///
    /// Policies are walked once each, and each finds the local pods it selects through a label
    /// index, so the cost grows with what policies select, not with pods × policies.
    pub fn compile(&mut self, input: &PolicyInput<'_>, local_pods: &[LocalPod]) -> PolicyIr {
        self.begin_pass(input);
        let local_labels =
            LabelIndex::new(local_pods.iter().enumerate().map(|(i, p)| (i, &p.labels)));
        let mut local_by_ns: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, p) in local_pods.iter().enumerate() {
            local_by_ns.entry(p.namespace.as_str()).or_default().push(i);
        }
        // Per local pod, per direction (ingress, egress): what the policies allow so far.
        let mut acc: Vec<[(Direction, Vec<PortEntry>); 2]> =
            local_pods.iter().map(|_| Default::default()).collect();
        for (pi, policy) in input.policies.iter().enumerate() {
            let Some(spec) = &policy.spec else { continue };
            let ns = namespace_str(&policy.metadata);
            let Some(in_ns) = local_by_ns.get(ns) else {
                continue;
            };
            let dirs: Vec<Dir> = [Dir::Ingress, Dir::Egress]
                .into_iter()
                .filter(|d| affects(spec, *d))
                .collect();
            if dirs.is_empty() {
                continue;
            }
            let selected: Vec<usize> = match &spec.pod_selector {
                None => in_ns.clone(),
                Some(sel) => match local_labels.narrow(sel) {
                    Some(list) => list
                        .iter()
                        .copied()
                        .filter(|i| {
                            local_pods[*i].namespace == ns
                                && selector::matches(sel, &local_pods[*i].labels)
                        })
                        .collect(),
                    None => in_ns
                        .iter()
                        .copied()
                        .filter(|i| selector::matches(sel, &local_pods[*i].labels))
                        .collect(),
                },
            };
            if selected.is_empty() {
                continue;
            }
            let name = format!("{ns}/{}", policy.metadata.name.as_deref().unwrap_or(""));
            for i in selected {
                for dir in &dirs {
                    let (out, raw) = &mut acc[i][dir.slot()];
                    self.add_policy(&local_pods[i], *dir, (pi, policy), &name, out, raw);
                }
            }
        }
        let host = AddrSet::from_addrs(input.host_addrs.iter().copied());
        let locals = tiers::Locals {
            pods: local_pods,
            labels: &local_labels,
            by_ns: &local_by_ns,
        };
        let tiers = self.tiers(
            input.cluster_policies,
            input.nodes,
            &locals,
            &host,
            input.attribute_drops,
        );
        self.end_pass();
        let mut pods: Vec<PodPolicy> = local_pods
            .iter()
            .zip(acc)
            .zip(tiers)
            .map(|((pod, [ingress, egress]), tiers)| {
                let [t_in, t_eg] = match tiers {
                    Some(t) => (*t).clone(),
                    None => Default::default(),
                };
                PodPolicy {
                    namespace: pod.namespace.clone(),
                    name: pod.name.clone(),
                    ips: pod.ips.clone(),
                    ifname: pod.ifname.clone(),
                    ingress: finish(ingress, t_in, Some(&of_families(&host, &pod.ips))),
                    egress: finish(egress, t_eg, None),
                }
            })
            .collect();
        pods.sort_by(|a, b| a.ifname.cmp(&b.ifname));
        PolicyIr {
            pods,
            log_drops: false,
        }
    }

    /// Brings peers and namespaces to `input`, and forgets resolved rules a change of
    /// namespaces or of many pods may have altered (the few-pods case is judged per rule).
    fn begin_pass(&mut self, input: &PolicyInput<'_>) {
        self.pass += 1;
        self.peer_cache.clear();
        self.named_cache.clear();
        self.peers.update(input.pods);
        let ns_labels: HashMap<String, Labels> = input
            .namespaces
            .iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                let mut labels = ns.metadata.labels.clone().unwrap_or_default();
                labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
                Some((name, labels))
            })
            .collect();
        if ns_labels != self.ns_labels || matches!(self.peers.changes(), Changes::Many) {
            self.resolved.clear();
            // What any tier's rules name may have changed: every group is decided again (a
            // few changed peers forget only the groups whose rules could name them, in
            // [`Compiler::tiers`]).
            self.tier_memo.forget();
        }
        self.ns_labels = ns_labels;
    }

    /// Forgets rules this pass did not resolve: they were not checked against its changes.
    fn end_pass(&mut self) {
        let pass = self.pass;
        self.resolved.retain(|_, p| {
            p.rules.retain(|_, (_, seen)| *seen == pass);
            !p.rules.is_empty()
        });
    }
}

/// A direction once every policy has been added: traffic from the node itself (`host`, for
/// ingress) is let in when the pod is isolated, policy names sorted, ports made disjoint.
/// The tiers' verdicts come shared with the pod's group, the node's addresses already out of
/// their ingress denies.
fn finish(
    (mut out, raw_ports): (Direction, Vec<PortEntry>),
    (admin, baseline): (Arc<TierVerdict>, Arc<TierVerdict>),
    host: Option<&AddrSet>,
) -> Direction {
    if let (true, Some(host)) = (out.isolated, host) {
        out.all_ports.union_with(host);
    }
    out.admin = admin;
    out.baseline = baseline;
    out.policies.sort();
    out.set_ports(raw_ports);
    out
}

/// `set`'s addresses of the families `ips` has: the node's IPv6 addresses are no peer of a
/// pod without IPv6 (no rule for them).
fn of_families(set: &AddrSet, ips: &[IpAddr]) -> AddrSet {
    let mut out = AddrSet::new();
    for family in Family::BOTH {
        if ips.iter().any(|ip| Family::of(*ip) == family) {
            out.union_with(&set.only(family));
        }
    }
    out
}

fn namespace_str(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

/// An object's identity across its versions: its uid, else namespace/name.
fn object_key(meta: &ObjectMeta) -> Cow<'_, str> {
    identity(
        meta.uid.as_deref(),
        namespace_str(meta),
        meta.name.as_deref().unwrap_or(""),
    )
}

/// The uid, else namespace/name: for API objects and for [`ClusterPod`]s alike.
fn identity<'a>(uid: Option<&'a str>, namespace: &str, name: &str) -> Cow<'a, str> {
    match uid {
        Some(uid) => Cow::Borrowed(uid),
        None => Cow::Owned(format!("{namespace}/{name}")),
    }
}

impl Dir {
    fn slot(self) -> usize {
        match self {
            Self::Ingress => 0,
            Self::Egress => 1,
        }
    }
}

impl Compiler {
    /// Adds what `policy` (the `pi`th, which selects `pod`) allows in `dir`.
    fn add_policy(
        &mut self,
        pod: &LocalPod,
        dir: Dir,
        (pi, policy): (usize, &NetworkPolicy),
        name: &str,
        out: &mut Direction,
        raw_ports: &mut Vec<PortEntry>,
    ) {
        let Some(spec) = &policy.spec else { return };
        out.isolated = true;
        out.policies.push(name.to_string());
        for (ri, (peers, ports)) in rules(spec, dir).into_iter().enumerate() {
            let addrs = self.rule_peers(pi, policy, dir, ri, peers);
            if addrs.is_empty() {
                continue;
            }
            match ports {
                None | Some([]) => out.all_ports.union_with(&addrs),
                Some(ports) => {
                    for port in ports {
                        self.port_entries(pod, dir, port, &addrs, raw_ports);
                    }
                }
            }
        }
    }

    /// The addresses a rule's `from`/`to` names: from this pass's cache, else from the last
    /// passes' when nothing changed that it could name, else resolved.
    fn rule_peers(
        &mut self,
        pi: usize,
        policy: &NetworkPolicy,
        dir: Dir,
        ri: usize,
        peers: Option<&[NetworkPolicyPeer]>,
    ) -> AddrSet {
        if let Some(hit) = self.peer_cache.get(&(pi, dir, ri)) {
            return hit.clone();
        }
        let policy_ns = namespace_str(&policy.metadata);
        let key = object_key(&policy.metadata);
        let version = policy.metadata.resource_version.as_deref();
        let kept = self
            .resolved
            .get(key.as_ref())
            .filter(|p| Some(p.version.as_str()) == version)
            .and_then(|p| p.rules.get(&(dir, ri)))
            .map(|(set, _)| set)
            .filter(|_| !self.changes_touch(policy_ns, peers))
            .cloned();
        let set = match kept {
            Some(set) => set,
            None => self.resolve(policy_ns, peers),
        };
        if let Some(version) = version {
            let entry = match self.resolved.get_mut(key.as_ref()) {
                Some(p) => p,
                None => self
                    .resolved
                    .entry(key.into_owned())
                    .or_insert(PolicyPeers {
                        version: version.to_string(),
                        rules: HashMap::new(),
                    }),
            };
            if entry.version != version {
                entry.version = version.to_string();
                entry.rules.clear();
            }
            entry.rules.insert((dir, ri), (set.clone(), self.pass));
        }
        self.peer_cache.insert((pi, dir, ri), set.clone());
        set
    }

    /// Whether a peer this pass changed (as it was or as it is) is one `peers` could name.
    fn changes_touch(&self, policy_ns: &str, peers: Option<&[NetworkPolicyPeer]>) -> bool {
        let Some(peers) = peers else { return false };
        match self.peers.changes() {
            Changes::Many => true,
            Changes::Few(changed) => changed.iter().any(|c| {
                peers.iter().any(|peer| {
                    (peer.pod_selector.is_some() || peer.namespace_selector.is_some())
                        && peer.ip_block.is_none()
                        && self.namespace_selected(peer, policy_ns, c.namespace())
                        && peer
                            .pod_selector
                            .as_ref()
                            .is_none_or(|sel| selector::matches(sel, c.labels()))
                })
            }),
        }
    }

    fn resolve(&self, policy_ns: &str, peers: Option<&[NetworkPolicyPeer]>) -> AddrSet {
        match peers {
            None | Some([]) => AddrSet::all(),
            Some(peers) => {
                // One normalisation for the whole list: a rule may name thousands of blocks.
                let (mut ranges, mut ranges6) = (Vec::new(), Vec::new());
                for peer in peers {
                    let set = self.peer(policy_ns, peer);
                    ranges.extend_from_slice(set.ranges());
                    ranges6.extend_from_slice(set.ranges6());
                }
                AddrSet::from_parts(ranges, ranges6)
            }
        }
    }

    /// Whether `peer` names pods of namespace `ns` (its `namespaceSelector`, else the
    /// policy's own namespace).
    fn namespace_selected(&self, peer: &NetworkPolicyPeer, policy_ns: &str, ns: &str) -> bool {
        match &peer.namespace_selector {
            None => ns == policy_ns,
            Some(sel) => self.namespace_matches(sel, ns),
        }
    }

    /// Whether namespace `ns`'s labels match `sel`.
    fn namespace_matches(&self, sel: &LabelSelector, ns: &str) -> bool {
        match self.ns_labels.get(ns) {
            Some(labels) => selector::matches(sel, labels),
            // A namespace the cache does not hold (yet) still has its name label.
            None => selector::matches(
                sel,
                &BTreeMap::from([(NAMESPACE_NAME_LABEL.into(), ns.to_string())]),
            ),
        }
    }

    fn peer(&self, policy_ns: &str, peer: &NetworkPolicyPeer) -> AddrSet {
        if let Some(block) = &peer.ip_block {
            if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                tracing::warn!(
                    namespace = policy_ns,
                    "ipBlock with a selector in one peer matches nothing"
                );
                return AddrSet::new();
            }
            return ip_block(&block.cidr, block.except.as_deref().unwrap_or_default());
        }
        if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
            return AddrSet::new();
        }
        let by_ns = self.peers.by_namespace();
        let namespaces: HashSet<&str> = by_ns
            .keys()
            .map(String::as_str)
            .filter(|ns| self.namespace_selected(peer, policy_ns, ns))
            .collect();
        let selected = |slot: &usize| {
            self.peers.get(*slot).filter(|p| {
                peer.pod_selector
                    .as_ref()
                    .is_none_or(|sel| selector::matches(sel, p.labels()))
            })
        };
        let narrowed = peer
            .pod_selector
            .as_ref()
            .and_then(|sel| self.peers.labels().narrow(sel));
        let chosen: Vec<&Peer> = match narrowed {
            Some(list) => list
                .iter()
                .filter_map(selected)
                .filter(|p| namespaces.contains(p.namespace()))
                .collect(),
            None => namespaces
                .iter()
                .flat_map(|ns| by_ns.get(*ns).into_iter().flatten())
                .filter_map(selected)
                .collect(),
        };
        AddrSet::from_addrs(chosen.iter().flat_map(|p| p.ips().iter().copied()))
    }

    /// The entries one `ports` item adds for peers `addrs`.
    fn port_entries(
        &mut self,
        pod: &LocalPod,
        dir: Dir,
        port: &NetworkPolicyPort,
        addrs: &AddrSet,
        out: &mut Vec<PortEntry>,
    ) {
        let Some(protocol) = Protocol::from_api(port.protocol.as_deref().unwrap_or("TCP")) else {
            tracing::warn!(pod = %pod.name, namespace = %pod.namespace, protocol = ?port.protocol, "unknown protocol allows nothing");
            return;
        };
        let mut push = |first: u16, last: u16, addrs: AddrSet| {
            out.push(PortEntry {
                protocol,
                first,
                last,
                addrs,
            })
        };
        match &port.port {
            None => push(0, u16::MAX, addrs.clone()),
            Some(IntOrString::Int(n)) => {
                let Ok(first) = u16::try_from(*n) else { return };
                let last = match port.end_port {
                    None => first,
                    Some(e) => match u16::try_from(e) {
                        Ok(e) if e >= first => e,
                        _ => return,
                    },
                };
                push(first, last, addrs.clone());
            }
            Some(IntOrString::String(name)) => match dir {
                Dir::Ingress => {
                    for p in pod
                        .ports
                        .iter()
                        .filter(|p| &p.name == name && p.protocol == protocol)
                    {
                        push(p.port, p.port, addrs.clone());
                    }
                }
                Dir::Egress => {
                    for (number, pods) in self.named(name, protocol).clone() {
                        let hit = pods.intersect(addrs);
                        if !hit.is_empty() {
                            push(number, number, hit);
                        }
                    }
                }
            },
        }
    }

    fn named(&mut self, name: &str, protocol: Protocol) -> &BTreeMap<u16, AddrSet> {
        let peers = &self.peers;
        self.named_cache
            .entry((name.to_string(), protocol))
            .or_insert_with(|| {
                let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
                for p in peers.all() {
                    for np in p
                        .ports()
                        .iter()
                        .filter(|np| np.name == name && np.protocol == protocol)
                    {
                        by_port
                            .entry(np.port)
                            .or_default()
                            .extend(p.ips().iter().copied());
                    }
                }
                by_port
                    .into_iter()
                    .map(|(port, ips)| (port, AddrSet::from_addrs(ips)))
                    .collect()
            })
    }
}

/// A policy's rules in `dir`: `ingress` or `egress`, each its peers and ports.
fn rules(spec: &NetworkPolicySpec, dir: Dir) -> Vec<Rule<'_>> {
    match dir {
        Dir::Ingress => spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_deref(), r.ports.as_deref()))
            .collect(),
        Dir::Egress => spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_deref(), r.ports.as_deref()))
            .collect(),
    }
}

/// Whether a policy affects `dir` (`policyTypes`, defaulted as the API server does).
fn affects(spec: &NetworkPolicySpec, dir: Dir) -> bool {
    match spec.policy_types.as_deref() {
        Some(types) if !types.is_empty() => types.iter().any(|t| {
            matches!(
                (t.as_str(), dir),
                ("Ingress", Dir::Ingress) | ("Egress", Dir::Egress)
            )
        }),
        _ => match dir {
            Dir::Ingress => true,
            Dir::Egress => spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
        },
    }
}

/// An `ipBlock` (or a ClusterNetworkPolicy's `networks` CIDR) as addresses, of either
/// family; an unparsable block, or one with an unparsable `except` or an `except` of the other
/// family, matches nothing (dropping an except would allow more than asked).
fn ip_block(cidr: &str, except: &[String]) -> AddrSet {
    let Ok(net) = cidr.parse::<IpNet>() else {
        tracing::warn!(cidr, "unparsable ipBlock matches nothing");
        return AddrSet::new();
    };
    let mut nets = Vec::with_capacity(except.len());
    for e in except {
        match e.parse::<IpNet>() {
            Ok(n) if Family::of(n.addr()) == Family::of(net.addr()) => nets.push(n.trunc()),
            _ => {
                tracing::warn!(cidr, except = %e, "unparsable except, or of the other family: the ipBlock matches nothing");
                return AddrSet::new();
            }
        }
    }
    AddrSet::from_block(net.trunc(), &nets)
}

mod peers;
mod pod;
#[cfg(test)]
mod tests;
mod tiers;
