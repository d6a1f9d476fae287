//! The one policy IR both renderers read: per local pod and direction, whether it is isolated
//! and exactly which peers it may exchange traffic with. Addresses are normalised interval sets
//! (an `ipBlock` with `except`s is a few disjoint ranges), port entries are disjoint per
//! protocol, so renderers never have to reason about overlaps and equal inputs render to equal
//! text.

use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use std::sync::Arc;

/// Transport protocols a NetworkPolicy port can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The API's spelling (`TCP`, `UDP`, `SCTP`); `None` for anything else.
    pub fn from_api(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// Lower-case name, as nft and iptables spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// A set of IPv4 addresses: sorted, merged, inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AddrSet {
    ranges: Vec<(u32, u32)>,
}

impl AddrSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every IPv4 address.
    pub fn all() -> Self {
        Self {
            ranges: vec![(0, u32::MAX)],
        }
    }

    pub fn from_ranges(ranges: impl IntoIterator<Item = (u32, u32)>) -> Self {
        let mut s = Self {
            ranges: ranges.into_iter().filter(|(a, b)| a <= b).collect(),
        };
        s.normalise();
        s
    }

    pub fn from_addrs(addrs: impl IntoIterator<Item = Ipv4Addr>) -> Self {
        Self::from_ranges(addrs.into_iter().map(|a| (u32::from(a), u32::from(a))))
    }

    /// `net` less each of `except` (an `ipBlock`).
    pub fn from_block(net: Ipv4Net, except: &[Ipv4Net]) -> Self {
        let mut s = Self::from_ranges([net_range(net)]);
        for e in except {
            s.subtract(net_range(*e));
        }
        s
    }

    fn normalise(&mut self) {
        self.ranges.sort_unstable();
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len());
        for &(a, b) in &self.ranges {
            match out.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        self.ranges = out;
    }

    fn subtract(&mut self, (x, y): (u32, u32)) {
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        for &(a, b) in &self.ranges {
            if b < x || a > y {
                out.push((a, b));
                continue;
            }
            if a < x {
                out.push((a, x - 1));
            }
            if b > y {
                out.push((y + 1, b));
            }
        }
        self.ranges = out;
    }

    pub fn union_with(&mut self, other: &AddrSet) {
        if other.ranges.is_empty() {
            return;
        }
        self.ranges.extend_from_slice(&other.ranges);
        self.normalise();
    }

    /// What of `self` is not in `other`.
    pub fn difference(&self, other: &AddrSet) -> AddrSet {
        let mut out = self.clone();
        for &r in &other.ranges {
            if out.ranges.is_empty() {
                break;
            }
            out.subtract(r);
        }
        out
    }

    pub fn intersect(&self, other: &AddrSet) -> AddrSet {
        let mut out = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < self.ranges.len() && j < other.ranges.len() {
            let (a, b) = self.ranges[i];
            let (c, d) = other.ranges[j];
            let (lo, hi) = (a.max(c), b.min(d));
            if lo <= hi {
                out.push((lo, hi));
            }
            if b < d {
                i += 1;
            } else {
                j += 1;
            }
        }
        AddrSet { ranges: out }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let x = u32::from(ip);
        let i = self.ranges.partition_point(|&(_, b)| b < x);
        self.ranges.get(i).is_some_and(|&(a, _)| a <= x)
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn is_all(&self) -> bool {
        self.ranges == [(0, u32::MAX)]
    }

    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// The fewest CIDRs that cover exactly this set, in order.
    pub fn cidrs(&self) -> Vec<Ipv4Net> {
        let mut out = Vec::new();
        for &(a, b) in &self.ranges {
            let mut start = u64::from(a);
            let end = u64::from(b);
            while start <= end {
                // The largest aligned block at `start` that does not pass `end`.
                let mut size: u64 = if start == 0 {
                    1 << 32
                } else {
                    1 << start.trailing_zeros()
                };
                while start + size - 1 > end {
                    size >>= 1;
                }
                let prefix = 32 - size.trailing_zeros() as u8;
                if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(start as u32), prefix) {
                    out.push(net);
                }
                start += size;
            }
        }
        out
    }
}

fn net_range(net: Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()), u32::from(net.broadcast()))
}

/// Peers allowed on one protocol and an inclusive port range.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortEntry {
    pub protocol: Protocol,
    pub first: u16,
    pub last: u16,
    pub addrs: AddrSet,
}

/// What one direction of one pod allows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Direction {
    /// Some policy selects the pod for this direction: what is not allowed below is dropped.
    pub isolated: bool,
    /// The isolating policies, `namespace/name`, sorted (for logs).
    pub policies: Vec<String>,
    /// Peers allowed on every protocol and port.
    pub all_ports: AddrSet,
    /// Peers allowed on given ports: disjoint per protocol, sorted by (protocol, first).
    pub ports: Vec<PortEntry>,
    /// ClusterNetworkPolicy tier `Admin`: decided before NetworkPolicy. Shared by the pods
    /// the same ClusterNetworkPolicies select alike (equal pointers, equal verdicts; the
    /// renderers key what they make of it by content).
    pub admin: Arc<TierVerdict>,
    /// ClusterNetworkPolicy tier `Baseline`: decides only when no NetworkPolicy isolates.
    pub baseline: Arc<TierVerdict>,
}

impl Direction {
    /// Whether traffic with `peer` (the source for ingress, the destination for egress) on
    /// protocol number `proto` to `dport` passes.
    pub fn allows(&self, peer: Ipv4Addr, proto: u8, dport: Option<u16>) -> bool {
        if self.admin.deny.contains(peer, proto, dport) {
            return false;
        }
        if self.admin.accept.contains(peer, proto, dport) {
            return true;
        }
        if self.isolated {
            return self.network_policy_allows(peer, proto, dport);
        }
        !self.baseline.deny.contains(peer, proto, dport)
    }

    /// NetworkPolicy's own answer for an isolated direction.
    fn network_policy_allows(&self, peer: Ipv4Addr, proto: u8, dport: Option<u16>) -> bool {
        if self.all_ports.contains(peer) {
            return true;
        }
        let Some(port) = dport else { return false };
        self.ports.iter().any(|e| {
            e.protocol.number() == proto
                && (e.first..=e.last).contains(&port)
                && e.addrs.contains(peer)
        })
    }

    /// Whether the direction needs a chain of its own: NetworkPolicy isolates it, or a
    /// ClusterNetworkPolicy tier decides something for it.
    pub fn enforced(&self) -> bool {
        self.isolated || !self.admin.is_empty() || !self.baseline.is_empty()
    }

    /// Replaces raw (possibly overlapping) port entries by disjoint ones with the same meaning.
    pub fn set_ports(&mut self, raw: Vec<PortEntry>) {
        self.ports = disjoint(raw);
    }
}

/// The three protocols that carry ports.
pub const PORT_PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// A part of the (peer, protocol, port) space, exact: `other` holds the peers matched on every
/// protocol without ports (ICMP and the rest), `ports` the peers matched per TCP/UDP/SCTP port
/// range (disjoint, sorted, adjacent equal ranges merged). A ClusterNetworkPolicy rule, and the
/// decision of a whole tier, is one of these.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Region {
    pub other: AddrSet,
    pub ports: Vec<PortEntry>,
}

impl Region {
    /// `addrs` on every protocol and port.
    pub fn everything(addrs: &AddrSet) -> Self {
        Self {
            other: addrs.clone(),
            ports: disjoint(
                PORT_PROTOCOLS
                    .iter()
                    .map(|&protocol| PortEntry {
                        protocol,
                        first: 0,
                        last: u16::MAX,
                        addrs: addrs.clone(),
                    })
                    .collect(),
            ),
        }
    }

    /// Only the given port entries (possibly overlapping).
    pub fn from_ports(raw: Vec<PortEntry>) -> Self {
        Self {
            other: AddrSet::new(),
            ports: disjoint(raw),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.other.is_empty() && self.ports.is_empty()
    }

    pub fn contains(&self, peer: Ipv4Addr, proto: u8, dport: Option<u16>) -> bool {
        if !PORT_PROTOCOLS.iter().any(|p| p.number() == proto) {
            return self.other.contains(peer);
        }
        let Some(port) = dport else { return false };
        self.ports.iter().any(|e| {
            e.protocol.number() == proto
                && (e.first..=e.last).contains(&port)
                && e.addrs.contains(peer)
        })
    }

    pub fn union(&self, other: &Region) -> Region {
        let mut o = self.other.clone();
        o.union_with(&other.other);
        let mut raw = self.ports.clone();
        raw.extend_from_slice(&other.ports);
        Region {
            other: o,
            ports: disjoint(raw),
        }
    }

    /// What of `self` is not in `minus`.
    pub fn subtract(&self, minus: &Region) -> Region {
        let other = self.other.difference(&minus.other);
        let mut raw = Vec::new();
        for proto in PORT_PROTOCOLS {
            let mine: Vec<&PortEntry> = self.ports.iter().filter(|e| e.protocol == proto).collect();
            let theirs: Vec<&PortEntry> =
                minus.ports.iter().filter(|e| e.protocol == proto).collect();
            let mut bounds: Vec<u32> = mine
                .iter()
                .chain(theirs.iter())
                .flat_map(|e| [u32::from(e.first), u32::from(e.last) + 1])
                .collect();
            bounds.sort_unstable();
            bounds.dedup();
            let at = |list: &[&PortEntry], lo: u32| -> AddrSet {
                list.iter()
                    .find(|e| u32::from(e.first) <= lo && lo <= u32::from(e.last))
                    .map(|e| e.addrs.clone())
                    .unwrap_or_default()
            };
            for w in bounds.windows(2) {
                let (lo, hi) = (w[0], w[1] - 1);
                let addrs = at(&mine, lo).difference(&at(&theirs, lo));
                if !addrs.is_empty() {
                    raw.push(PortEntry {
                        protocol: proto,
                        first: lo as u16,
                        last: hi as u16,
                        addrs,
                    });
                }
            }
        }
        Region {
            other,
            ports: disjoint(raw),
        }
    }

    /// For rendering: the peers matched on everything (one address lookup), then what is left
    /// per port, then what is left on protocols without ports.
    pub fn split(&self) -> (AddrSet, Vec<PortEntry>, AddrSet) {
        let mut all = self.other.clone();
        for proto in PORT_PROTOCOLS {
            let entries: Vec<&PortEntry> =
                self.ports.iter().filter(|e| e.protocol == proto).collect();
            let mut next = 0u32;
            let mut common = all.clone();
            for e in &entries {
                if u32::from(e.first) != next {
                    common = AddrSet::new();
                    break;
                }
                common = common.intersect(&e.addrs);
                next = u32::from(e.last) + 1;
            }
            if next != 1 << 16 {
                common = AddrSet::new();
            }
            all = common;
        }
        let ports: Vec<PortEntry> = self
            .ports
            .iter()
            .filter_map(|e| {
                let addrs = e.addrs.difference(&all);
                (!addrs.is_empty()).then(|| PortEntry { addrs, ..e.clone() })
            })
            .collect();
        let other = self.other.difference(&all);
        (all, disjoint(ports), other)
    }
}

/// What one ClusterNetworkPolicy tier decides for one direction of one pod: disjoint regions
/// of peers it accepts and denies; the rest (no rule, or `Pass`) goes on to the next stage.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct TierVerdict {
    pub deny: Region,
    pub accept: Region,
    /// The ClusterNetworkPolicies that select the pod in this tier, sorted (for logs).
    pub policies: Vec<String>,
    /// Which policy denies each part of `deny`, in the order the tier decides (for drop logs:
    /// the first entry holding a dropped flow names the policy that dropped it).
    pub denied_by: Vec<(String, Region)>,
}

impl TierVerdict {
    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.accept.is_empty()
    }
}

fn disjoint(raw: Vec<PortEntry>) -> Vec<PortEntry> {
    let mut out: Vec<PortEntry> = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
        let entries: Vec<&PortEntry> = raw
            .iter()
            .filter(|e| e.protocol == proto && !e.addrs.is_empty() && e.first <= e.last)
            .collect();
        let mut bounds: Vec<u32> = entries
            .iter()
            .flat_map(|e| [u32::from(e.first), u32::from(e.last) + 1])
            .collect();
        bounds.sort_unstable();
        bounds.dedup();
        for w in bounds.windows(2) {
            let (lo, hi) = (w[0], w[1] - 1);
            let mut addrs = AddrSet::new();
            for e in &entries {
                if u32::from(e.first) <= lo && hi <= u32::from(e.last) {
                    addrs.union_with(&e.addrs);
                }
            }
            if addrs.is_empty() {
                continue;
            }
            let (lo, hi) = (lo as u16, hi as u16);
            match out.last_mut() {
                Some(last)
                    if last.protocol == proto
                        && u32::from(last.last) + 1 == u32::from(lo)
                        && last.addrs == addrs =>
                {
                    last.last = hi
                }
                _ => out.push(PortEntry {
                    protocol: proto,
                    first: lo,
                    last: hi,
                    addrs,
                }),
            }
        }
    }
    out
}

/// One local pod's policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodPolicy {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    /// Host-side veth: ingress is traffic leaving through it, egress traffic arriving on it.
    pub ifname: String,
    pub ingress: Direction,
    pub egress: Direction,
}

/// The node's desired policy: every local pod sluice knows, sorted by interface name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PolicyIr {
    pub pods: Vec<PodPolicy>,
    /// `policy-log-drops`: every drop for policy is logged first ([`crate::droplog`]).
    pub log_drops: bool,
}

impl PolicyIr {
    pub fn pod_by_ip(&self, ip: Ipv4Addr) -> Option<&PodPolicy> {
        self.pods.iter().find(|p| p.ip == ip)
    }

    /// Whether a new flow `src` → `dst` (protocol number `proto`, destination port `dport`)
    /// passes the policy of both ends that are local pods: the IR's own reading, used to find
    /// the conntrack entries to cut and as the oracle the kernel tests compare against.
    pub fn allows(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dport: Option<u16>) -> bool {
        flow_allowed(|ip| self.pod_by_ip(ip), src, dst, proto, dport)
    }

    /// The pods by address, for many questions at once (every conntrack entry of a node).
    pub fn by_ip(&self) -> PodsByIp<'_> {
        PodsByIp(self.pods.iter().map(|p| (p.ip, p)).collect())
    }
}

/// [`PolicyIr`]'s pods by address.
#[derive(Debug)]
pub struct PodsByIp<'a>(std::collections::HashMap<Ipv4Addr, &'a PodPolicy>);

impl PodsByIp<'_> {
    /// [`PolicyIr::allows`], in constant time.
    pub fn allows(&self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, dport: Option<u16>) -> bool {
        flow_allowed(|ip| self.0.get(&ip).copied(), src, dst, proto, dport)
    }
}

fn flow_allowed<'a>(
    pod: impl Fn(Ipv4Addr) -> Option<&'a PodPolicy>,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    dport: Option<u16>,
) -> bool {
    let egress_ok = pod(src).is_none_or(|p| p.egress.allows(dst, proto, dport));
    let ingress_ok = pod(dst).is_none_or(|p| p.ingress.allows(src, proto, dport));
    egress_ok && ingress_ok
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn block_with_excepts_is_exact() {
        let s = AddrSet::from_block(
            net("10.0.0.0/16"),
            &[net("10.0.1.0/24"), net("10.0.3.128/25")],
        );
        assert!(s.contains("10.0.0.255".parse().unwrap()));
        assert!(!s.contains("10.0.1.7".parse().unwrap()));
        assert!(s.contains("10.0.2.0".parse().unwrap()));
        assert!(!s.contains("10.0.3.200".parse().unwrap()));
        assert!(!s.contains("10.1.0.0".parse().unwrap()));
        let cidrs: Vec<String> = s.cidrs().iter().map(|c| c.to_string()).collect();
        assert_eq!(
            cidrs,
            [
                "10.0.0.0/24",
                "10.0.2.0/24",
                "10.0.3.0/25",
                "10.0.4.0/22",
                "10.0.8.0/21",
                "10.0.16.0/20",
                "10.0.32.0/19",
                "10.0.64.0/18",
                "10.0.128.0/17"
            ]
        );
    }

    #[test]
    fn all_and_hosts_render_as_cidrs() {
        assert_eq!(AddrSet::all().cidrs(), vec![net("0.0.0.0/0")]);
        let s = AddrSet::from_addrs(["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()]);
        assert_eq!(s.cidrs(), vec![net("10.0.0.2/31")]);
        assert!(AddrSet::from_block(net("10.0.0.0/24"), &[net("10.0.0.0/8")]).is_empty());
    }

    #[test]
    fn intersect_and_union() {
        let a = AddrSet::from_block(net("10.0.0.0/24"), &[]);
        let b = AddrSet::from_addrs(["10.0.0.9".parse().unwrap(), "10.9.0.1".parse().unwrap()]);
        assert_eq!(
            a.intersect(&b),
            AddrSet::from_addrs(["10.0.0.9".parse().unwrap()])
        );
        let mut c = a.clone();
        c.union_with(&b);
        assert!(c.contains("10.9.0.1".parse().unwrap()) && c.contains("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn overlapping_port_entries_become_disjoint() {
        let x = AddrSet::from_addrs(["10.0.0.1".parse().unwrap()]);
        let y = AddrSet::from_addrs(["10.0.0.2".parse().unwrap()]);
        let mut xy = x.clone();
        xy.union_with(&y);
        let mut d = Direction::default();
        d.set_ports(vec![
            PortEntry {
                protocol: Protocol::Tcp,
                first: 80,
                last: 90,
                addrs: x.clone(),
            },
            PortEntry {
                protocol: Protocol::Tcp,
                first: 85,
                last: 85,
                addrs: y.clone(),
            },
            PortEntry {
                protocol: Protocol::Tcp,
                first: 91,
                last: 95,
                addrs: x.clone(),
            },
            PortEntry {
                protocol: Protocol::Udp,
                first: 53,
                last: 53,
                addrs: AddrSet::new(),
            },
        ]);
        assert_eq!(
            d.ports,
            vec![
                PortEntry {
                    protocol: Protocol::Tcp,
                    first: 80,
                    last: 84,
                    addrs: x.clone()
                },
                PortEntry {
                    protocol: Protocol::Tcp,
                    first: 85,
                    last: 85,
                    addrs: xy
                },
                PortEntry {
                    protocol: Protocol::Tcp,
                    first: 86,
                    last: 95,
                    addrs: x
                },
            ]
        );
    }
}
