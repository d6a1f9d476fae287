//! ClusterNetworkPolicy tiers, compiled per local pod and direction (see [`crate::cnp`]).

use super::{ip_block, Compiler, Dir, LocalPod, NAMESPACE_NAME_LABEL};
use crate::cnp::{Action, ClusterNetworkPolicy, Peer, PodsPeer, ProtocolPort, Tier};
use crate::ir::{AddrSet, PortEntry, Protocol, Region, TierVerdict, PORT_PROTOCOLS};
use crate::selector::{self, Labels};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use std::collections::{BTreeMap, HashMap};

/// A rule as the tiers read it: its action, peers and protocols.
struct RuleView<'a> {
    action: Action,
    peers: &'a [Peer],
    protocols: Option<&'a [ProtocolPort]>,
}

fn rule_views(cnp: &ClusterNetworkPolicy, dir: Dir) -> Vec<RuleView<'_>> {
    match dir {
        Dir::Ingress => cnp
            .spec
            .ingress
            .iter()
            .map(|r| RuleView {
                action: r.action,
                peers: &r.from,
                protocols: r.protocols.as_deref(),
            })
            .collect(),
        Dir::Egress => cnp
            .spec
            .egress
            .iter()
            .map(|r| RuleView {
                action: r.action,
                peers: &r.to,
                protocols: r.protocols.as_deref(),
            })
            .collect(),
    }
}

/// A direction's decisions of one policy, first match per rule: (deny, accept, pass).
#[derive(Default)]
struct Outcome {
    deny: Region,
    accept: Region,
    pass: Region,
}

impl Compiler {
    /// Per local pod, per direction (ingress, egress): (Admin, Baseline).
    pub(super) fn tiers(
        &mut self,
        policies: &[&ClusterNetworkPolicy],
        nodes: &[crate::cnp::NodeAddrs],
        local_pods: &[LocalPod],
        attribute_drops: bool,
    ) -> Vec<[(TierVerdict, TierVerdict); 2]> {
        let mut out: Vec<[(TierVerdict, TierVerdict); 2]> =
            local_pods.iter().map(|_| Default::default()).collect();
        if policies.is_empty() {
            return out;
        }
        // Tier, then priority, then name: the order of evaluation.
        let mut order: Vec<&ClusterNetworkPolicy> = policies.to_vec();
        order.sort_by(|a, b| {
            (a.spec.tier, a.spec.priority, a.name()).cmp(&(b.spec.tier, b.spec.priority, b.name()))
        });
        // Peer addresses per (policy, direction, rule): the same for every subject.
        let mut peer_cache: HashMap<(usize, Dir, usize), Option<AddrSet>> = HashMap::new();
        for (i, pod) in local_pods.iter().enumerate() {
            let ns_labels = self.namespace_labels(&pod.namespace);
            let selecting: Vec<(usize, &ClusterNetworkPolicy)> = order
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, c)| subject_selects(c, &ns_labels, &pod.labels))
                .collect();
            if selecting.is_empty() {
                continue;
            }
            for dir in [Dir::Ingress, Dir::Egress] {
                for tier in [Tier::Admin, Tier::Baseline] {
                    let in_tier: Vec<(usize, &ClusterNetworkPolicy)> = selecting
                        .iter()
                        .copied()
                        .filter(|(_, c)| c.spec.tier == tier)
                        .collect();
                    if in_tier.is_empty() {
                        continue;
                    }
                    let mut verdict = TierVerdict {
                        policies: in_tier.iter().map(|(_, c)| c.name().to_string()).collect(),
                        ..Default::default()
                    };
                    verdict.policies.sort();
                    let mut decided = Region::default();
                    let mut k = 0;
                    while k < in_tier.len() {
                        let priority = in_tier[k].1.spec.priority;
                        let mut group = Outcome::default();
                        while k < in_tier.len() && in_tier[k].1.spec.priority == priority {
                            let (ci, cnp) = in_tier[k];
                            let o = self.policy_outcome(ci, cnp, dir, pod, nodes, &mut peer_cache);
                            if attribute_drops {
                                let mine = o.deny.subtract(&decided);
                                if !mine.is_empty() {
                                    verdict.denied_by.push((cnp.name().to_string(), mine));
                                }
                            }
                            group.deny = group.deny.union(&o.deny);
                            group.accept = group.accept.union(&o.accept);
                            group.pass = group.pass.union(&o.pass);
                            k += 1;
                        }
                        // Equal priority: Deny over Accept over Pass.
                        let accept = group.accept.subtract(&group.deny);
                        let deny = group.deny.subtract(&decided);
                        let accept = accept.subtract(&decided);
                        verdict.deny = verdict.deny.union(&deny);
                        verdict.accept = verdict.accept.union(&accept);
                        decided = decided
                            .union(&group.deny)
                            .union(&group.accept)
                            .union(&group.pass);
                    }
                    let slot = &mut out[i][dir.slot()];
                    match tier {
                        Tier::Admin => slot.0 = verdict,
                        Tier::Baseline => slot.1 = verdict,
                    }
                }
            }
        }
        out
    }

    fn namespace_labels(&self, ns: &str) -> Labels {
        self.ns_labels
            .get(ns)
            .cloned()
            .unwrap_or_else(|| BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), ns.to_string())]))
    }

    /// One policy's rules in `dir` for subject `pod`, first match decides.
    fn policy_outcome(
        &mut self,
        ci: usize,
        cnp: &ClusterNetworkPolicy,
        dir: Dir,
        pod: &LocalPod,
        nodes: &[crate::cnp::NodeAddrs],
        peer_cache: &mut HashMap<(usize, Dir, usize), Option<AddrSet>>,
    ) -> Outcome {
        let mut o = Outcome::default();
        let mut decided = Region::default();
        for (ri, rule) in rule_views(cnp, dir).into_iter().enumerate() {
            let peers = match peer_cache.get(&(ci, dir, ri)) {
                Some(a) => a.clone(),
                None => {
                    let a = self.cnp_peers(rule.peers, dir, nodes);
                    peer_cache.insert((ci, dir, ri), a.clone());
                    a
                }
            };
            // A peer sluice cannot read (no field it knows, e.g. a newer CRD's, or more than
            // one) fails closed as the API asks: an Accept rule matches nothing, a Deny or Pass
            // rule denies everything.
            let (action, region) = match (peers, rule.action) {
                (Some(addrs), action) if !addrs.is_empty() => {
                    (action, self.rule_region(&addrs, rule.protocols, dir, pod))
                }
                (Some(_), _) | (None, Action::Accept) => continue,
                (None, Action::Deny | Action::Pass) => {
                    (Action::Deny, Region::everything(&AddrSet::all()))
                }
            };
            let fresh = region.subtract(&decided);
            let slot = match action {
                Action::Deny => &mut o.deny,
                Action::Accept => &mut o.accept,
                Action::Pass => &mut o.pass,
            };
            *slot = slot.union(&fresh);
            decided = decided.union(&region);
        }
        o
    }

    /// The addresses of a rule's peers; `None` when one of them is not a peer sluice can read.
    fn cnp_peers(
        &self,
        peers: &[Peer],
        dir: Dir,
        nodes: &[crate::cnp::NodeAddrs],
    ) -> Option<AddrSet> {
        let mut ranges = Vec::new();
        for peer in peers {
            let set = match peer {
                Peer {
                    namespaces: Some(ns),
                    pods: None,
                    networks: None,
                    nodes: None,
                } => self.peer(
                    "",
                    &NetworkPolicyPeer {
                        namespace_selector: Some(ns.clone()),
                        ..Default::default()
                    },
                ),
                Peer {
                    namespaces: None,
                    pods:
                        Some(PodsPeer {
                            namespace_selector,
                            pod_selector,
                        }),
                    networks: None,
                    nodes: None,
                } => self.peer(
                    "",
                    &NetworkPolicyPeer {
                        namespace_selector: Some(namespace_selector.clone()),
                        pod_selector: Some(pod_selector.clone()),
                        ..Default::default()
                    },
                ),
                Peer {
                    namespaces: None,
                    pods: None,
                    networks: Some(nets),
                    nodes: None,
                } if dir == Dir::Egress => {
                    let mut s = AddrSet::new();
                    for n in nets {
                        s.union_with(&ip_block(n, &[]));
                    }
                    s
                }
                Peer {
                    namespaces: None,
                    pods: None,
                    networks: None,
                    nodes: Some(sel),
                } if dir == Dir::Egress => AddrSet::from_addrs(
                    nodes
                        .iter()
                        .filter(|n| selector::matches(sel, &n.labels))
                        .flat_map(|n| n.addrs.iter().copied()),
                ),
                _ => {
                    tracing::warn!(
                        "ClusterNetworkPolicy peer without exactly one field sluice knows: its rule fails closed"
                    );
                    return None;
                }
            };
            ranges.extend_from_slice(set.ranges());
        }
        Some(AddrSet::from_ranges(ranges))
    }

    /// The (peer, protocol, port) region of a rule with peers `addrs`.
    fn rule_region(
        &mut self,
        addrs: &AddrSet,
        protocols: Option<&[ProtocolPort]>,
        dir: Dir,
        pod: &LocalPod,
    ) -> Region {
        let Some(protocols) = protocols else {
            return Region::everything(addrs);
        };
        let mut raw = Vec::new();
        for item in protocols {
            let mut push = |protocol: Protocol, first: u16, last: u16, addrs: AddrSet| {
                raw.push(PortEntry {
                    protocol,
                    first,
                    last,
                    addrs,
                })
            };
            for (protocol, dest) in [
                (Protocol::Tcp, &item.tcp),
                (Protocol::Udp, &item.udp),
                (Protocol::Sctp, &item.sctp),
            ] {
                let Some(dest) = dest else { continue };
                match &dest.destination_port {
                    None => push(protocol, 0, u16::MAX, addrs.clone()),
                    Some(p) => match (p.number, &p.range) {
                        (Some(n), None) => {
                            if let Ok(n) = u16::try_from(n) {
                                push(protocol, n, n, addrs.clone());
                            }
                        }
                        (None, Some(r)) => {
                            if let (Ok(a), Ok(b)) = (u16::try_from(r.start), u16::try_from(r.end)) {
                                if a <= b {
                                    push(protocol, a, b, addrs.clone());
                                }
                            }
                        }
                        _ => tracing::warn!("destinationPort needs exactly one of number, range"),
                    },
                }
            }
            if let Some(name) = &item.destination_named_port {
                for protocol in PORT_PROTOCOLS {
                    match dir {
                        Dir::Ingress => {
                            for p in pod
                                .ports
                                .iter()
                                .filter(|p| &p.name == name && p.protocol == protocol)
                            {
                                push(protocol, p.port, p.port, addrs.clone());
                            }
                        }
                        Dir::Egress => {
                            for (number, pods) in self.named(name, protocol).clone() {
                                let hit = pods.intersect(addrs);
                                if !hit.is_empty() {
                                    push(protocol, number, number, hit);
                                }
                            }
                        }
                    }
                }
            }
        }
        Region::from_ports(raw)
    }
}

fn subject_selects(cnp: &ClusterNetworkPolicy, ns_labels: &Labels, pod_labels: &Labels) -> bool {
    match (&cnp.spec.subject.namespaces, &cnp.spec.subject.pods) {
        (Some(ns), None) => selector::matches(ns, ns_labels),
        (None, Some(p)) => {
            selector::matches(&p.namespace_selector, ns_labels)
                && selector::matches(&p.pod_selector, pod_labels)
        }
        _ => {
            tracing::warn!(
                policy = cnp.name(),
                "subject needs exactly one of namespaces, pods"
            );
            false
        }
    }
}
