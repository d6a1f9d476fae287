//! The cluster's pods as policies name them (peers), kept from pass to pass: a pod is read
//! again only when its `resourceVersion` moves, and each pass reports which peers came, went
//! or changed, so that rules whose peers none of them could be are not resolved again.

use super::{ClusterPod, NamedPort};
use crate::selector::{LabelIndex, Labels};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

/// More changes than this in one pass and every rule is resolved again: checking each rule
/// against each change would cost more than that.
const FEW_CHANGES: usize = 64;

/// A pod that policies can name as a peer: running (or pending) on the pod network, with an
/// address. The pod itself is shared with the watch cache, not copied.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    pod: Arc<ClusterPod>,
}

impl Peer {
    fn of(pod: &Arc<ClusterPod>) -> Option<Self> {
        if pod.host_network || pod.finished || pod.ips.is_empty() {
            return None;
        }
        Some(Self { pod: pod.clone() })
    }

    pub fn namespace(&self) -> &str {
        &self.pod.namespace
    }

    pub fn labels(&self) -> &Labels {
        &self.pod.labels
    }

    pub fn ips(&self) -> &[IpAddr] {
        &self.pod.ips
    }

    /// Its containers' named ports (read when a rule names a port).
    pub fn ports(&self) -> &[NamedPort] {
        &self.pod.ports
    }

    /// Whether policy would see `other` as this very peer (a new version of a pod that
    /// changed only what policy does not read).
    fn same(&self, other: &Peer) -> bool {
        self.namespace() == other.namespace()
            && self.labels() == other.labels()
            && self.ips() == other.ips()
            && self.ports() == other.ports()
    }
}

/// What the index knows of a pod: the version it read, its slot when it is a peer, and the
/// last pass that listed it.
#[derive(Debug)]
struct Known {
    version: Option<String>,
    slot: Option<usize>,
    seen: u64,
}

/// Peers in slots, indexed by namespace and by label.
#[derive(Debug, Default)]
pub(super) struct PeerIndex {
    slots: Vec<Option<Peer>>,
    free: Vec<usize>,
    /// By pod uid (namespace/name when it has none): [`ClusterPod::key`].
    known: HashMap<String, Known>,
    by_ns: HashMap<String, Vec<usize>>,
    labels: LabelIndex,
    pass: u64,
    /// The last update's changes: peers as they were (gone or changed) and slots of peers
    /// as they are (new or changed).
    removed: Vec<Peer>,
    added: Vec<usize>,
    /// The pods of the last update, as given: the same objects in the same order again (a
    /// watch cache that did not change) need no reading at all.
    last_input: Vec<Arc<ClusterPod>>,
}

/// Which peers the last update changed.
pub(super) enum Changes<'a> {
    Few(Vec<&'a Peer>),
    Many,
}

impl PeerIndex {
    /// Brings the index to `pods` (every pod of the cluster).
    pub fn update(&mut self, pods: &[Arc<ClusterPod>]) {
        self.removed.clear();
        self.added.clear();
        let unchanged = pods.len() == self.last_input.len()
            && pods
                .iter()
                .zip(&self.last_input)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return;
        }
        self.last_input = pods.to_vec();
        self.pass += 1;
        for pod in pods {
            let key = pod.key();
            let version = pod.resource_version.as_deref();
            let old_slot = match self.known.get_mut(key.as_ref()) {
                // No version (objects not from an API server) always reads the pod again.
                Some(k) if version.is_some() && k.version.as_deref() == version => {
                    k.seen = self.pass;
                    continue;
                }
                Some(k) => k.slot,
                None => None,
            };
            let peer = Peer::of(pod);
            let slot = match (old_slot, peer) {
                (Some(s), Some(peer)) if self.slots[s].as_ref().is_some_and(|p| p.same(&peer)) => {
                    Some(s)
                }
                (old, peer) => {
                    if let Some(s) = old {
                        self.take(s);
                    }
                    peer.map(|p| self.put(p))
                }
            };
            let known = Known {
                version: version.map(str::to_string),
                slot,
                seen: self.pass,
            };
            self.known.insert(key.into_owned(), known);
        }
        let pass = self.pass;
        let gone: Vec<usize> = self
            .known
            .values()
            .filter(|k| k.seen != pass)
            .filter_map(|k| k.slot)
            .collect();
        self.known.retain(|_, k| k.seen == pass);
        for s in gone {
            self.take(s);
        }
    }

    fn put(&mut self, peer: Peer) -> usize {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.labels.insert(slot, peer.labels());
        match self.by_ns.get_mut(peer.namespace()) {
            Some(list) => list.push(slot),
            None => {
                self.by_ns.insert(peer.namespace().to_string(), vec![slot]);
            }
        }
        self.slots[slot] = Some(peer);
        self.added.push(slot);
        slot
    }

    fn take(&mut self, slot: usize) {
        let Some(peer) = self.slots.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.labels.remove(slot, peer.labels());
        if let Some(list) = self.by_ns.get_mut(peer.namespace()) {
            if let Some(at) = list.iter().position(|s| *s == slot) {
                list.swap_remove(at);
            }
            if list.is_empty() {
                self.by_ns.remove(peer.namespace());
            }
        }
        self.free.push(slot);
        // A slot added in this same update and taken again is no change to report.
        match self.added.iter().position(|s| *s == slot) {
            Some(at) => {
                self.added.swap_remove(at);
            }
            None => self.removed.push(peer),
        }
    }

    pub fn changes(&self) -> Changes<'_> {
        if self.removed.len() + self.added.len() > FEW_CHANGES {
            return Changes::Many;
        }
        let added = self.added.iter().filter_map(|s| self.get(*s));
        Changes::Few(self.removed.iter().chain(added).collect())
    }

    pub fn get(&self, slot: usize) -> Option<&Peer> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn all(&self) -> impl Iterator<Item = &Peer> {
        self.slots.iter().flatten()
    }

    /// Namespaces with peers, and their peers' slots.
    pub fn by_namespace(&self) -> &HashMap<String, Vec<usize>> {
        &self.by_ns
    }

    pub fn labels(&self) -> &LabelIndex {
        &self.labels
    }
}
