//! ClusterNetworkPolicy tiers, compiled per local pod and direction (see [`crate::cnp`]).

use super::peers::Changes;
use super::{ip_block, Compiler, Dir, LocalPod, NamedPort, NAMESPACE_NAME_LABEL};
use crate::cnp::{Action, ClusterNetworkPolicy, Peer, PodsPeer, ProtocolPort, Tier};
use crate::ir::{AddrSet, PortEntry, Protocol, Region, TierVerdict, PORT_PROTOCOLS};
use crate::selector::{self, LabelIndex, Labels};
use k8s_openapi::api::networking::v1::NetworkPolicyPeer;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

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

/// What the tiers decide for one group of pods, per direction (ingress, egress): (Admin,
/// Baseline), shared by every pod of the group.
pub(super) type GroupVerdict = [(Arc<TierVerdict>, Arc<TierVerdict>); 2];

/// Pods whose tiers decide alike: the ClusterNetworkPolicies that select them (by
/// [`fingerprint`], in the tiers' order of evaluation) and, when one of those names ports on
/// ingress by name, the pods' named ports (resolved on the subject itself). Everything else a
/// tier reads is the same for every pod: the peers' addresses, the nodes, the node's own
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct GroupKey {
    policies: Vec<u64>,
    ports: Vec<NamedPort>,
}

/// Group verdicts kept from pass to pass (Calico's calculation graph, for the tiers): a pass
/// computes only the groups it has not seen with the same world ([`TierMemo::world`]), so a
/// change of one ClusterNetworkPolicy recomputes the groups it selects and nothing else, and a
/// pass where nothing changed recomputes nothing.
#[derive(Debug, Default)]
pub(super) struct TierMemo {
    /// What every group's verdict also depends on: the node's addresses, the nodes, whether
    /// drops are attributed. (Peers and namespaces: [`TierMemo::forget`].)
    world: Option<(AddrSet, Vec<crate::cnp::NodeAddrs>, bool)>,
    groups: HashMap<GroupKey, (Arc<GroupVerdict>, u64)>,
    /// Fingerprints by (name, resourceVersion), with the last pass that used each: a
    /// version of an object never changes, and spelling out a hundred specs each pass
    /// would be most of a pass's tier work.
    prints: HashMap<(String, String), (u64, u64)>,
    pass: u64,
    /// Groups computed by the last pass (for tests and logs).
    pub(super) computed: usize,
}

impl TierMemo {
    /// Forgets every group: the peers or namespaces changed, and with them what rules name.
    pub(super) fn forget(&mut self) {
        self.groups.clear();
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.groups.len()
    }
}

/// A ClusterNetworkPolicy's identity and content: equal fingerprints, equal decisions.
fn fingerprint(cnp: &ClusterNetworkPolicy) -> u64 {
    let text = format!("{}\u{0}{:?}", cnp.name(), cnp.spec);
    crate::fnv1a(crate::FNV_START, text.as_bytes())
}

impl TierMemo {
    /// [`fingerprint`], kept by name and resourceVersion (objects without one, not from an
    /// API server, are read each time).
    fn fingerprint(&mut self, cnp: &ClusterNetworkPolicy) -> u64 {
        let Some(version) = cnp.metadata.resource_version.as_deref() else {
            return fingerprint(cnp);
        };
        let pass = self.pass;
        let key = (cnp.name().to_string(), version.to_string());
        let entry = self
            .prints
            .entry(key)
            .or_insert_with(|| (fingerprint(cnp), pass));
        entry.1 = pass;
        entry.0
    }
}

/// [`TierVerdict::group`] of the pods `selecting` selects, whose named ports are `ports` (empty
/// when no policy of theirs names an ingress port): the policies by name, not by content, so
/// that it outlives a change of their specs; never 0. SHA-256, for the named ports are
/// written by a namespace's owner, and two groups of one name would share sets.
fn group_name(selecting: &[(usize, &ClusterNetworkPolicy)], ports: &[NamedPort]) -> u64 {
    use sha2::Digest as _;
    let mut digest = sha2::Sha256::new();
    for (_, cnp) in selecting {
        digest.update(cnp.name().as_bytes());
        digest.update([0]);
    }
    digest.update([1]);
    for p in ports {
        digest.update(format!("{}\u{0}{:?}\u{0}{}\u{0}", p.name, p.protocol, p.port).as_bytes());
    }
    let hash = digest.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first).max(1)
}

/// Whether a policy names ports by name on ingress: then its decision depends on the subject's
/// own named ports.
fn names_ingress_ports(cnp: &ClusterNetworkPolicy) -> bool {
    cnp.spec.ingress.iter().any(|r| {
        r.protocols
            .iter()
            .flatten()
            .any(|p| p.destination_named_port.is_some())
    })
}

/// The local pods and how to find them, as [`Compiler::compile`] indexed them.
pub(super) struct Locals<'a> {
    pub pods: &'a [LocalPod],
    pub labels: &'a LabelIndex,
    pub by_ns: &'a HashMap<&'a str, Vec<usize>>,
}

impl Compiler {
    /// Per local pod: what the tiers decide for it, shared by every pod of its group (`None`:
    /// no ClusterNetworkPolicy selects it). `host` (the node's addresses) is taken out of
    /// every ingress deny: the kubelet's probes come from the node.
    pub(super) fn tiers(
        &mut self,
        policies: &[&ClusterNetworkPolicy],
        nodes: &[crate::cnp::NodeAddrs],
        locals: &Locals<'_>,
        host: &AddrSet,
        attribute_drops: bool,
    ) -> Vec<Option<Arc<GroupVerdict>>> {
        let local_pods = locals.pods;
        let mut out: Vec<Option<Arc<GroupVerdict>>> = vec![None; local_pods.len()];
        let world = (host.clone(), nodes.to_vec(), attribute_drops);
        let memo = &mut self.tier_memo;
        if memo.world.as_ref() != Some(&world) {
            memo.groups.clear();
            memo.world = Some(world);
        }
        memo.pass += 1;
        memo.computed = 0;
        let pass = memo.pass;
        if policies.is_empty() {
            memo.groups.clear();
            return out;
        }
        // Tier, then priority, then name: the order of evaluation.
        let mut order: Vec<&ClusterNetworkPolicy> = policies.to_vec();
        order.sort_by(|a, b| {
            (a.spec.tier, a.spec.priority, a.name()).cmp(&(b.spec.tier, b.spec.priority, b.name()))
        });
        let prints: Vec<u64> = order
            .iter()
            .map(|c| self.tier_memo.fingerprint(c))
            .collect();
        self.tier_memo.prints.retain(|_, (_, seen)| *seen == pass);
        // A few peers changed: only the groups of policies whose rules could name one of
        // them (as it was or as it is) are decided again.
        if let Changes::Few(changed) = self.peers.changes() {
            if !changed.is_empty() {
                let touched: HashSet<u64> = order
                    .iter()
                    .zip(&prints)
                    .filter(|(c, _)| changed.iter().any(|p| self.cnp_may_name(c, p)))
                    .map(|(_, print)| *print)
                    .collect();
                if !touched.is_empty() {
                    self.tier_memo
                        .groups
                        .retain(|k, _| !k.policies.iter().any(|p| touched.contains(p)));
                }
            }
        }
        let named: Vec<bool> = order.iter().map(|c| names_ingress_ports(c)).collect();
        // Per local pod, the policies (indexes into `order`) that select it, in order: each
        // policy finds its subjects through the namespaces and the label index.
        let mut selecting: Vec<Vec<usize>> = vec![Vec::new(); local_pods.len()];
        let ns_labels: HashMap<&str, Labels> = locals
            .by_ns
            .keys()
            .map(|ns| (*ns, self.namespace_labels(ns)))
            .collect();
        for (ci, cnp) in order.iter().enumerate() {
            for i in self.subjects(cnp, locals, &ns_labels) {
                selecting[i].push(ci);
            }
        }
        // Per pass: the peers of (policy, direction, rule), the same for every subject.
        let mut peer_cache: HashMap<(usize, Dir, usize), Option<AddrSet>> = HashMap::new();
        for (i, pod) in local_pods.iter().enumerate() {
            let sel = &selecting[i];
            if sel.is_empty() {
                continue;
            }
            let key = GroupKey {
                policies: sel.iter().map(|&ci| prints[ci]).collect(),
                ports: if sel.iter().any(|&ci| named[ci]) {
                    pod.ports.clone()
                } else {
                    Vec::new()
                },
            };
            if let Some((verdict, seen)) = self.tier_memo.groups.get_mut(&key) {
                *seen = pass;
                out[i] = Some(verdict.clone());
                continue;
            }
            let in_order: Vec<(usize, &ClusterNetworkPolicy)> =
                sel.iter().map(|&ci| (ci, order[ci])).collect();
            let group = group_name(&in_order, &key.ports);
            let revision = crate::fnv1a(
                crate::FNV_START,
                &key.policies
                    .iter()
                    .flat_map(|p| p.to_le_bytes())
                    .collect::<Vec<u8>>(),
            );
            let verdict = Arc::new(self.group_verdict(
                (&in_order, (group, revision)),
                pod,
                nodes,
                host,
                attribute_drops,
                &mut peer_cache,
            ));
            self.tier_memo.computed += 1;
            self.tier_memo.groups.insert(key, (verdict.clone(), pass));
            out[i] = Some(verdict);
        }
        self.tier_memo.groups.retain(|_, (_, seen)| *seen == pass);
        out
    }

    /// Whether `peer` is one `cnp`'s rules could name, so that its coming, going or changing
    /// may change what the policy decides: a `namespaces` or `pods` peer that selects it, or
    /// an egress port named as one of its ports is (named ports are resolved on the peers).
    /// Errs towards yes: a peer sluice cannot read names no pod, but is checked all the same.
    fn cnp_may_name(&self, cnp: &ClusterNetworkPolicy, peer: &super::peers::Peer) -> bool {
        let names = |p: &Peer| {
            let by_ns = p
                .namespaces
                .as_ref()
                .is_some_and(|sel| self.namespace_matches(sel, peer.namespace()));
            let by_pod = p.pods.as_ref().is_some_and(|pods| {
                self.namespace_matches(&pods.namespace_selector, peer.namespace())
                    && selector::matches(&pods.pod_selector, peer.labels())
            });
            by_ns || by_pod
        };
        let ingress = cnp.spec.ingress.iter().any(|r| r.from.iter().any(names));
        let egress = cnp.spec.egress.iter().any(|r| {
            r.to.iter().any(names)
                || r.protocols.iter().flatten().any(|p| {
                    p.destination_named_port
                        .as_ref()
                        .is_some_and(|name| peer.ports().iter().any(|np| &np.name == name))
                })
        });
        ingress || egress
    }

    /// The local pods `cnp`'s subject selects, ascending.
    fn subjects(
        &self,
        cnp: &ClusterNetworkPolicy,
        locals: &Locals<'_>,
        ns_labels: &HashMap<&str, Labels>,
    ) -> Vec<usize> {
        let in_namespaces = |sel: &LabelSelector| -> Vec<&str> {
            ns_labels
                .iter()
                .filter(|(_, labels)| selector::matches(sel, labels))
                .map(|(ns, _)| *ns)
                .collect()
        };
        let mut out: Vec<usize> = match (&cnp.spec.subject.namespaces, &cnp.spec.subject.pods) {
            (Some(ns), None) => in_namespaces(ns)
                .iter()
                .flat_map(|ns| locals.by_ns.get(ns).into_iter().flatten().copied())
                .collect(),
            (None, Some(p)) => {
                let namespaces: HashSet<&str> =
                    in_namespaces(&p.namespace_selector).into_iter().collect();
                let pod_ok = |i: &usize| {
                    let pod = &locals.pods[*i];
                    namespaces.contains(pod.namespace.as_str())
                        && selector::matches(&p.pod_selector, &pod.labels)
                };
                match locals.labels.narrow(&p.pod_selector) {
                    Some(list) => list.iter().copied().filter(pod_ok).collect(),
                    None => namespaces
                        .iter()
                        .flat_map(|ns| locals.by_ns.get(ns).into_iter().flatten().copied())
                        .filter(pod_ok)
                        .collect(),
                }
            }
            _ => {
                tracing::warn!(
                    policy = cnp.name(),
                    "subject needs exactly one of namespaces, pods"
                );
                Vec::new()
            }
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// What the policies `selecting` (in the order of evaluation, each with its index there)
    /// decide for `pod`, and every pod of its group.
    fn group_verdict(
        &mut self,
        (selecting, (group, revision)): (&[(usize, &ClusterNetworkPolicy)], (u64, u64)),
        pod: &LocalPod,
        nodes: &[crate::cnp::NodeAddrs],
        host: &AddrSet,
        attribute_drops: bool,
        peer_cache: &mut HashMap<(usize, Dir, usize), Option<AddrSet>>,
    ) -> GroupVerdict {
        let mut out: [(TierVerdict, TierVerdict); 2] = Default::default();
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
                    group,
                    revision,
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
                        let o = self.policy_outcome(ci, cnp, dir, pod, nodes, peer_cache);
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
                // The kubelet's probes come from the node: no tier denies them.
                if dir == Dir::Ingress && !host.is_empty() {
                    verdict.deny = verdict.deny.subtract(&Region::everything(host));
                }
                let slot = &mut out[dir.slot()];
                match tier {
                    Tier::Admin => slot.0 = verdict,
                    Tier::Baseline => slot.1 = verdict,
                }
            }
        }
        out.map(|(a, b)| (Arc::new(a), Arc::new(b)))
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
        let (mut ranges, mut ranges6) = (Vec::new(), Vec::new());
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
            ranges6.extend_from_slice(set.ranges6());
        }
        Some(AddrSet::from_parts(ranges, ranges6))
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
