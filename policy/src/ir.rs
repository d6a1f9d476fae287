//! The one policy IR both renderers read: per local pod and direction, whether it is isolated
//! and exactly which peers it may exchange traffic with. Addresses are normalised interval sets
//! (an `ipBlock` with `except`s is a few disjoint ranges), port entries are disjoint per
//! protocol, so renderers never have to reason about overlaps and equal inputs render to equal
//! text.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// An address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }
}

/// A set of addresses of both families, each kept apart (an IPv4 range never matches an IPv6
/// address, nor the other way round): sorted, merged, inclusive ranges per family.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AddrSet {
    ranges: Vec<(u32, u32)>,
    ranges6: Vec<(u128, u128)>,
}

/// An address as a number, for the range arithmetic shared by both families.
trait Bound: Copy + Ord {
    fn succ(self) -> Self;
    fn pred(self) -> Self;
}

impl Bound for u32 {
    fn succ(self) -> Self {
        self.saturating_add(1)
    }
    fn pred(self) -> Self {
        self.saturating_sub(1)
    }
}

impl Bound for u128 {
    fn succ(self) -> Self {
        self.saturating_add(1)
    }
    fn pred(self) -> Self {
        self.saturating_sub(1)
    }
}

fn normalise<T: Bound>(ranges: &mut Vec<(T, T)>) {
    ranges.retain(|(a, b)| a <= b);
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(a, b) in ranges.iter() {
        match out.last_mut() {
            Some(last) if a <= last.1.succ() => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    *ranges = out;
}

fn subtract<T: Bound>(ranges: &mut Vec<(T, T)>, (x, y): (T, T)) {
    let mut out = Vec::with_capacity(ranges.len() + 1);
    for &(a, b) in ranges.iter() {
        if b < x || a > y {
            out.push((a, b));
            continue;
        }
        if a < x {
            out.push((a, x.pred()));
        }
        if b > y {
            out.push((y.succ(), b));
        }
    }
    *ranges = out;
}

fn intersect<T: Bound>(left: &[(T, T)], right: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < left.len() && j < right.len() {
        let (a, b) = left[i];
        let (c, d) = right[j];
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
    out
}

fn contains<T: Bound>(ranges: &[(T, T)], x: T) -> bool {
    let i = ranges.partition_point(|&(_, b)| b < x);
    ranges.get(i).is_some_and(|&(a, _)| a <= x)
}

/// The fewest aligned blocks (start, prefix length) that cover `a..=b` exactly, in an address
/// space of `bits` bits.
fn blocks(a: u128, b: u128, bits: u32) -> Vec<(u128, u8)> {
    let span = |k: u32| -> u128 {
        if k >= 128 {
            u128::MAX
        } else {
            (1u128 << k) - 1
        }
    };
    let mut out = Vec::new();
    let mut start = a;
    // Bounded: each block at least doubles the alignment of the next start, or ends the range.
    for _ in 0..2 * bits + 2 {
        let mut k = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        while k > 0 && span(k) > b - start {
            k -= 1;
        }
        out.push((start, (bits - k) as u8));
        let last = start + span(k);
        if last >= b {
            break;
        }
        start = last + 1;
    }
    out
}

impl AddrSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every address of both families.
    pub fn all() -> Self {
        Self {
            ranges: vec![(0, u32::MAX)],
            ranges6: vec![(0, u128::MAX)],
        }
    }

    /// Every address of one family.
    pub fn all_of(family: Family) -> Self {
        Self::all().only(family)
    }

    /// From IPv4 ranges.
    pub fn from_ranges(ranges: impl IntoIterator<Item = (u32, u32)>) -> Self {
        Self::from_parts(ranges, [])
    }

    /// From IPv4 and IPv6 ranges.
    pub fn from_parts(
        ranges: impl IntoIterator<Item = (u32, u32)>,
        ranges6: impl IntoIterator<Item = (u128, u128)>,
    ) -> Self {
        let mut s = Self {
            ranges: ranges.into_iter().collect(),
            ranges6: ranges6.into_iter().collect(),
        };
        normalise(&mut s.ranges);
        normalise(&mut s.ranges6);
        s
    }

    pub fn from_addrs(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for a in addrs {
            match a {
                IpAddr::V4(a) => v4.push((u32::from(a), u32::from(a))),
                IpAddr::V6(a) => v6.push((u128::from(a), u128::from(a))),
            }
        }
        Self::from_parts(v4, v6)
    }

    /// `net` less each of `except` (an `ipBlock`); an except of the other family takes
    /// nothing away.
    pub fn from_block(net: IpNet, except: &[IpNet]) -> Self {
        let mut s = Self::new();
        s.add_net(net);
        for e in except {
            match *e {
                IpNet::V4(e) => subtract(&mut s.ranges, net_range(e)),
                IpNet::V6(e) => subtract(&mut s.ranges6, net_range6(e)),
            }
        }
        s
    }

    fn add_net(&mut self, net: IpNet) {
        match net {
            IpNet::V4(n) => {
                self.ranges.push(net_range(n));
                normalise(&mut self.ranges);
            }
            IpNet::V6(n) => {
                self.ranges6.push(net_range6(n));
                normalise(&mut self.ranges6);
            }
        }
    }

    pub fn union_with(&mut self, other: &AddrSet) {
        if !other.ranges.is_empty() {
            self.ranges.extend_from_slice(&other.ranges);
            normalise(&mut self.ranges);
        }
        if !other.ranges6.is_empty() {
            self.ranges6.extend_from_slice(&other.ranges6);
            normalise(&mut self.ranges6);
        }
    }

    /// What of `self` is not in `other`.
    pub fn difference(&self, other: &AddrSet) -> AddrSet {
        let mut out = self.clone();
        for &r in &other.ranges {
            if out.ranges.is_empty() {
                break;
            }
            subtract(&mut out.ranges, r);
        }
        for &r in &other.ranges6 {
            if out.ranges6.is_empty() {
                break;
            }
            subtract(&mut out.ranges6, r);
        }
        out
    }

    pub fn intersect(&self, other: &AddrSet) -> AddrSet {
        AddrSet {
            ranges: intersect(&self.ranges, &other.ranges),
            ranges6: intersect(&self.ranges6, &other.ranges6),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => contains(&self.ranges, u32::from(a)),
            IpAddr::V6(a) => contains(&self.ranges6, u128::from(a)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.ranges6.is_empty()
    }

    /// Every address of both families.
    pub fn is_all(&self) -> bool {
        self.is_full(Family::V4) && self.is_full(Family::V6)
    }

    /// Every address of `family`.
    pub fn is_full(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.ranges == [(0, u32::MAX)],
            Family::V6 => self.ranges6 == [(0, u128::MAX)],
        }
    }

    /// Whether it holds an address of `family`.
    pub fn has(&self, family: Family) -> bool {
        match family {
            Family::V4 => !self.ranges.is_empty(),
            Family::V6 => !self.ranges6.is_empty(),
        }
    }

    /// Its addresses of `family` alone.
    pub fn only(&self, family: Family) -> AddrSet {
        match family {
            Family::V4 => AddrSet {
                ranges: self.ranges.clone(),
                ranges6: Vec::new(),
            },
            Family::V6 => AddrSet {
                ranges: Vec::new(),
                ranges6: self.ranges6.clone(),
            },
        }
    }

    /// The IPv4 ranges.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// The IPv6 ranges.
    pub fn ranges6(&self) -> &[(u128, u128)] {
        &self.ranges6
    }

    /// Ranges of both families.
    pub fn range_count(&self) -> usize {
        self.ranges.len() + self.ranges6.len()
    }

    /// The fewest IPv4 CIDRs that cover exactly its IPv4 addresses, in order.
    pub fn cidrs(&self) -> Vec<Ipv4Net> {
        let mut out = Vec::new();
        for &(a, b) in &self.ranges {
            for (start, prefix) in blocks(u128::from(a), u128::from(b), 32) {
                if let Ok(net) = Ipv4Net::new(Ipv4Addr::from(start as u32), prefix) {
                    out.push(net);
                }
            }
        }
        out
    }

    /// The fewest IPv6 CIDRs that cover exactly its IPv6 addresses, in order.
    pub fn cidrs6(&self) -> Vec<Ipv6Net> {
        let mut out = Vec::new();
        for &(a, b) in &self.ranges6 {
            for (start, prefix) in blocks(a, b, 128) {
                if let Ok(net) = Ipv6Net::new(Ipv6Addr::from(start), prefix) {
                    out.push(net);
                }
            }
        }
        out
    }

    /// The CIDRs of both families: IPv4 first.
    pub fn nets(&self) -> Vec<IpNet> {
        let v4 = self.cidrs().into_iter().map(IpNet::V4);
        v4.chain(self.cidrs6().into_iter().map(IpNet::V6)).collect()
    }
}

fn net_range(net: Ipv4Net) -> (u32, u32) {
    (u32::from(net.network()), u32::from(net.broadcast()))
}

fn net_range6(net: Ipv6Net) -> (u128, u128) {
    (u128::from(net.network()), u128::from(net.broadcast()))
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
    pub fn allows(&self, peer: impl Into<IpAddr>, proto: u8, dport: Option<u16>) -> bool {
        let peer = peer.into();
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
    fn network_policy_allows(&self, peer: IpAddr, proto: u8, dport: Option<u16>) -> bool {
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

    /// The same direction with peers of `family` alone: what one family's rules enforce.
    pub fn only(&self, family: Family) -> Direction {
        let tier = |t: &TierVerdict| {
            Arc::new(TierVerdict {
                deny: t.deny.only(family),
                accept: t.accept.only(family),
                group: t.group,
                revision: t.revision,
                policies: t.policies.clone(),
                denied_by: t
                    .denied_by
                    .iter()
                    .map(|(n, r)| (n.clone(), r.only(family)))
                    .collect(),
            })
        };
        Direction {
            isolated: self.isolated,
            policies: self.policies.clone(),
            all_ports: self.all_ports.only(family),
            ports: self.ports_of(family),
            admin: tier(&self.admin),
            baseline: tier(&self.baseline),
        }
    }

    /// Its port entries' peers of `family` alone (entries left without peers dropped).
    pub fn ports_of(&self, family: Family) -> Vec<PortEntry> {
        only_ports(&self.ports, family)
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

    /// Its peers of `family` alone.
    pub fn only(&self, family: Family) -> Region {
        Region {
            other: self.other.only(family),
            ports: only_ports(&self.ports, family),
        }
    }

    pub fn contains(&self, peer: impl Into<IpAddr>, proto: u8, dport: Option<u16>) -> bool {
        let peer = peer.into();
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
    /// Names the group of pods it was decided for: a digest of the ClusterNetworkPolicies
    /// that select them (by name, in the order of evaluation) and of the pods' named ports
    /// when those matter. It stays while peers come and go and while those policies change,
    /// so a renderer that names the verdict's sets by it rewrites what a set holds, not the
    /// rules of every pod that names it. 0: not decided for a group (tests).
    pub group: u64,
    /// A digest of the specs of those policies: changes with them, while [`Self::group`]
    /// stays (for a renderer to which a new set costs less than refilling one in place).
    pub revision: u64,
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

fn only_ports(ports: &[PortEntry], family: Family) -> Vec<PortEntry> {
    ports
        .iter()
        .filter(|e| e.addrs.has(family))
        .map(|e| PortEntry {
            addrs: e.addrs.only(family),
            ..e.clone()
        })
        .collect()
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
    /// Its addresses: at most one of each family (IPv4 first on a dual-stack node).
    pub ips: Vec<IpAddr>,
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
    pub fn pod_by_ip(&self, ip: impl Into<IpAddr>) -> Option<&PodPolicy> {
        let ip = ip.into();
        self.pods.iter().find(|p| p.ips.contains(&ip))
    }

    /// Whether some pod has an address of `family`.
    pub fn has(&self, family: Family) -> bool {
        self.pods
            .iter()
            .any(|p| p.ips.iter().any(|ip| Family::of(*ip) == family))
    }

    /// Whether a new flow `src` → `dst` (protocol number `proto`, destination port `dport`)
    /// passes the policy of both ends that are local pods: the IR's own reading, used to find
    /// the conntrack entries to cut and as the oracle the kernel tests compare against.
    pub fn allows(
        &self,
        src: impl Into<IpAddr>,
        dst: impl Into<IpAddr>,
        proto: u8,
        dport: Option<u16>,
    ) -> bool {
        flow_allowed(
            |ip| self.pod_by_ip(ip),
            src.into(),
            dst.into(),
            proto,
            dport,
        )
    }

    /// The pods by address, for many questions at once (every conntrack entry of a node).
    pub fn by_ip(&self) -> PodsByIp<'_> {
        PodsByIp(
            self.pods
                .iter()
                .flat_map(|p| p.ips.iter().map(move |ip| (*ip, p)))
                .collect(),
        )
    }
}

/// [`PolicyIr`]'s pods by address.
#[derive(Debug)]
pub struct PodsByIp<'a>(std::collections::HashMap<IpAddr, &'a PodPolicy>);

impl PodsByIp<'_> {
    /// [`PolicyIr::allows`], in constant time.
    pub fn allows(&self, src: IpAddr, dst: IpAddr, proto: u8, dport: Option<u16>) -> bool {
        flow_allowed(|ip| self.0.get(&ip).copied(), src, dst, proto, dport)
    }
}

fn flow_allowed<'a>(
    pod: impl Fn(IpAddr) -> Option<&'a PodPolicy>,
    src: IpAddr,
    dst: IpAddr,
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

    fn net(s: &str) -> IpNet {
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
        assert_eq!(AddrSet::all().nets(), vec![net("0.0.0.0/0"), net("::/0")]);
        let s = AddrSet::from_addrs(["10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap()]);
        assert_eq!(s.nets(), vec![net("10.0.0.2/31")]);
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

    #[test]
    fn ipv6_blocks_with_excepts_are_exact_and_never_ipv4() {
        let s = AddrSet::from_block(
            net("fd00:10:244::/56"),
            &[net("fd00:10:244:1::/64"), net("fd00:10:244:2::5/128")],
        );
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();
        assert!(s.contains(ip("fd00:10:244::1")));
        assert!(!s.contains(ip("fd00:10:244:1::9")));
        assert!(s.contains(ip("fd00:10:244:2::4")) && s.contains(ip("fd00:10:244:2::6")));
        assert!(!s.contains(ip("fd00:10:244:2::5")));
        assert!(!s.contains(ip("fd00:10:245::1")));
        // No IPv4 address, not even the one whose bits an IPv6 address ends with.
        assert!(!s.has(Family::V4) && !s.contains(ip("0.0.0.1")));
        let cidrs: Vec<String> = s.cidrs6().iter().map(|c| c.to_string()).collect();
        assert_eq!(cidrs[0], "fd00:10:244::/64");
        assert_eq!(cidrs[1], "fd00:10:244:2::/126");
        assert!(cidrs.contains(&"fd00:10:244:2::4/128".to_string()));
        assert!(cidrs.contains(&"fd00:10:244:2::6/127".to_string()));
        assert!(cidrs.contains(&"fd00:10:244:80::/57".to_string()));
        // The CIDRs cover the set exactly.
        let back = cidrs.iter().fold(AddrSet::new(), |mut acc, c| {
            acc.union_with(&AddrSet::from_block(net(c), &[]));
            acc
        });
        assert_eq!(back, s);
        // And the reverse: an IPv4 block holds no IPv6 address.
        let v4 = AddrSet::from_block(net("0.0.0.0/0"), &[]);
        assert!(v4.is_full(Family::V4) && !v4.is_all() && !v4.contains(ip("::1")));
        assert_eq!(AddrSet::all_of(Family::V6).nets(), vec![net("::/0")]);
    }

    #[test]
    fn set_algebra_keeps_the_families_apart() {
        let a = AddrSet::from_addrs(["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()]);
        let b = AddrSet::from_block(net("fd00::/64"), &[]);
        let both = a.intersect(&b);
        assert_eq!(both, AddrSet::from_addrs(["fd00::1".parse().unwrap()]));
        assert_eq!(
            a.difference(&b),
            AddrSet::from_addrs(["10.0.0.1".parse().unwrap()])
        );
        assert_eq!(a.only(Family::V4).nets(), vec![net("10.0.0.1/32")]);
        assert_eq!(a.only(Family::V6).nets(), vec![net("fd00::1/128")]);
        assert_eq!(
            AddrSet::all().difference(&AddrSet::all_of(Family::V4)),
            AddrSet::all_of(Family::V6)
        );
        let mut d = Direction {
            isolated: true,
            all_ports: a.clone(),
            ..Default::default()
        };
        d.set_ports(vec![PortEntry {
            protocol: Protocol::Tcp,
            first: 80,
            last: 80,
            addrs: AddrSet::from_addrs(["10.0.0.2".parse().unwrap()]),
        }]);
        let six = d.only(Family::V6);
        assert!(six.ports.is_empty() && six.all_ports == both && six.isolated);
        assert!(d.allows("fd00::1".parse::<IpAddr>().unwrap(), 6, Some(1)));
        assert!(!d.allows("fd00::2".parse::<IpAddr>().unwrap(), 6, Some(80)));
        assert!(d.allows("10.0.0.2".parse::<IpAddr>().unwrap(), 6, Some(80)));
    }
}
