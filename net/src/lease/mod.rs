//! Subnet leasing, decided as plain data (DESIGN.md, "Subnet leases").
//!
//! One `coordination.k8s.io/v1` Lease per held subnet, named from the subnet, so that the API
//! server's name uniqueness makes taking a subnet atomic. The lease's annotations carry the
//! node's [`NodeRecord`] for its peers. Nothing here knows the Kubernetes API: a lease is a
//! [`LeaseView`], time is passed in, and [`choose_subnet`] is a pure function of both. The
//! [`store`] module holds the [`store::LeaseStore`] capability, its in-memory fake and the
//! [`store::acquire`] loop.

pub mod store;
#[cfg(test)]
mod tests;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

/// Every lease sluice makes is named `sluice-` + the subnet with dots and slash as dashes.
pub const LEASE_PREFIX: &str = "sluice-";

/// The label on every lease sluice makes (value [`LEASE_LABEL_VALUE`]): agents list and watch
/// by it, so that no other object in their namespace can stop or confuse them.
pub const LEASE_LABEL: &str = "sluice.dev/subnet-lease";
pub const LEASE_LABEL_VALUE: &str = "true";
/// Where sluice's leases live (DESIGN.md), and where sluice 0.1 kept them.
pub const LEASE_NAMESPACE: &str = "sluice-system";
pub const LEGACY_LEASE_NAMESPACE: &str = "kube-system";

/// Annotation keys of a node's record on its lease. Stable: peers of other versions read them.
pub const ANN_NODE: &str = "sluice.dev/node";
pub const ANN_UNDERLAY_IP: &str = "sluice.dev/underlay-ip";
pub const ANN_VTEP_MAC: &str = "sluice.dev/vtep-mac";
pub const ANN_WIREGUARD_PUBLIC_KEY: &str = "sluice.dev/wireguard-public-key";
pub const ANN_ENCRYPTION: &str = "sluice.dev/encryption";
pub const ANN_SUBNET: &str = "sluice.dev/subnet";
/// A dual-stack node's IPv6 subnet. Peers of a sluice before IPv6 ignore it, and the IPv6
/// lease too (its name is not an IPv4 one), so they keep reaching the node over IPv4.
pub const ANN_SUBNET_V6: &str = "sluice.dev/subnet-v6";
/// A node's IPv6 address on its underlay link, beside the IPv4 `underlay-ip`: the gateway of
/// direct IPv6 routes to its IPv6 subnet (a dual-stack node).
pub const ANN_UNDERLAY_IP_V6: &str = "sluice.dev/underlay-ip-v6";

/// Lease duration the agent asks for unless configured otherwise (Kubernetes node leases use 40 s).
pub const DEFAULT_LEASE_SECS: u32 = 40;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("lease name {name:?} is not `{LEASE_PREFIX}A-B-C-D-LEN` (IPv6: the address's colons as dashes)")]
    BadName { name: String },
    #[error("subnet length /{subnet_len} does not fit in cluster CIDR {cluster_cidr}")]
    BadSubnetLength { cluster_cidr: IpNet, subnet_len: u8 },
}

/// Why a lease's annotations are not a usable node record. The peer is skipped with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("annotation {key} is missing")]
    Missing { key: &'static str },
    #[error("annotation {key}={value:?} does not parse: {reason}")]
    Bad {
        key: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("record subnet {record} differs from the lease's name {lease}")]
    SubnetMismatch { record: IpNet, lease: String },
    #[error("lease {lease} has no holder")]
    NoHolder { lease: String },
}

/// The lease name of `subnet`: `10.244.3.0/24` → `sluice-10-244-3-0-24`.
pub fn lease_name(subnet: Ipv4Net) -> String {
    let [a, b, c, d] = subnet.network().octets();
    format!("{LEASE_PREFIX}{a}-{b}-{c}-{d}-{}", subnet.prefix_len())
}

/// The subnet a lease name stands for; the inverse of [`lease_name`]. A name that is not in
/// canonical form (host bits set, leading zeros) is rejected, so one subnet has one name.
pub fn parse_lease_name(name: &str) -> Result<Ipv4Net, LeaseError> {
    let bad = || LeaseError::BadName { name: name.into() };
    let rest = name.strip_prefix(LEASE_PREFIX).ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('-').collect();
    let [a, b, c, d, len] = parts.as_slice() else {
        return Err(bad());
    };
    let octet = |s: &str| s.parse::<u8>().map_err(|_| bad());
    let ip = Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?);
    let net = Ipv4Net::new(ip, octet(len)?).map_err(|_| bad())?;
    if net.network() != ip || lease_name(net) != name {
        return Err(bad());
    }
    Ok(net)
}

/// The lease name of an IPv6 `subnet`: its canonical text with colons and the slash as dashes,
/// `fd00:10:244:3::/64` → `sluice-fd00-10-244-3---64` (DESIGN.md). No IPv4 name reads as one
/// (an IPv4 name has four groups and no `::`), so the two families never share a name.
pub fn lease_name_v6(subnet: Ipv6Net) -> String {
    let text = format!("{}-{}", subnet.network(), subnet.prefix_len());
    format!("{LEASE_PREFIX}{}", text.replace(':', "-"))
}

/// The IPv6 subnet a lease name stands for; the inverse of [`lease_name_v6`], canonical form
/// only (lower case, shortest `::`, no host bits), so one subnet has one name.
pub fn parse_lease_name_v6(name: &str) -> Result<Ipv6Net, LeaseError> {
    let bad = || LeaseError::BadName { name: name.into() };
    let rest = name.strip_prefix(LEASE_PREFIX).ok_or_else(bad)?;
    let (addr, len) = rest.rsplit_once('-').ok_or_else(bad)?;
    let addr: Ipv6Addr = addr.replace('-', ":").parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let net = Ipv6Net::new(addr, len).map_err(|_| bad())?;
    if net.network() != addr || lease_name_v6(net) != name {
        return Err(bad());
    }
    Ok(net)
}

/// A family's subnet type: [`Ipv4Net`] or [`Ipv6Net`]. Subnet choice ([`SubnetPool`],
/// [`choose_subnet`]) is written once for both through it.
pub trait FamilyNet:
    Copy + Ord + std::fmt::Debug + std::fmt::Display + Into<IpNet> + Send + Sync + 'static
{
    /// The longest subnet a node may hold (IPv4 /30: two pods; IPv6 /124: sixteen addresses).
    const MAX_SUBNET_LEN: u8;
    fn lease_name(self) -> String;
    fn parse_lease_name(name: &str) -> Result<Self, LeaseError>;
    /// `net` if it is of this family.
    fn of(net: IpNet) -> Option<Self>;
    /// The record's subnet of this family.
    fn in_record(record: &NodeRecord) -> Option<Self>;
    /// `record` with this family's subnet set to `self`.
    fn set_in(self, record: &mut NodeRecord);
}

impl FamilyNet for Ipv4Net {
    const MAX_SUBNET_LEN: u8 = 30;
    fn lease_name(self) -> String {
        lease_name(self)
    }
    fn parse_lease_name(name: &str) -> Result<Self, LeaseError> {
        parse_lease_name(name)
    }
    fn of(net: IpNet) -> Option<Self> {
        match net {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }
    fn in_record(record: &NodeRecord) -> Option<Self> {
        record.subnet
    }
    fn set_in(self, record: &mut NodeRecord) {
        record.subnet = Some(self);
    }
}

impl FamilyNet for Ipv6Net {
    const MAX_SUBNET_LEN: u8 = 124;
    fn lease_name(self) -> String {
        lease_name_v6(self)
    }
    fn parse_lease_name(name: &str) -> Result<Self, LeaseError> {
        parse_lease_name_v6(name)
    }
    fn of(net: IpNet) -> Option<Self> {
        match net {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }
    fn in_record(record: &NodeRecord) -> Option<Self> {
        record.subnet_v6
    }
    fn set_in(self, record: &mut NodeRecord) {
        record.subnet_v6 = Some(self);
    }
}

/// A range as the first and last address, as numbers, and the family's width in bits.
fn bounds(net: IpNet) -> (u128, u128, u32) {
    match net.trunc() {
        IpNet::V4(n) => (
            u128::from(u32::from(n.network())),
            u128::from(u32::from(n.broadcast())),
            32,
        ),
        IpNet::V6(n) => (u128::from(n.network()), u128::from(n.broadcast()), 128),
    }
}

/// The lowest `/subnet_len` of `cluster` that overlaps none of `taken` (ranges of any length,
/// of either family: the other family's never overlap). Its cost follows `taken`, not the size
/// of `cluster`: a run of taken subnets is jumped over, never walked, which an IPv6 cluster CIDR
/// with 2^48 subnets of /64 needs.
pub fn lowest_free(cluster: IpNet, subnet_len: u8, taken: &[IpNet]) -> Option<IpNet> {
    let cluster = cluster.trunc();
    let (first, last, bits) = bounds(cluster);
    if subnet_len < cluster.prefix_len() || u32::from(subnet_len) > bits {
        return None;
    }
    let step = 1u128.checked_shl(bits - u32::from(subnet_len))?;
    let mut blocked: Vec<(u128, u128)> = taken
        .iter()
        .filter(|t| {
            matches!(
                (t, cluster),
                (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
            )
        })
        .map(|t| {
            let (a, b, _) = bounds(*t);
            (a, b)
        })
        .filter(|&(a, b)| b >= first && a <= last)
        .collect();
    blocked.sort_unstable();
    let mut cand = first;
    for (a, b) in blocked {
        if b < cand {
            continue;
        }
        if a > cand + (step - 1) {
            break;
        }
        // `cand` overlaps [a, b]: the next candidate is the first subnet after b.
        cand = (b - first) / step * step + first;
        cand = cand.checked_add(step)?;
        if cand > last {
            return None;
        }
    }
    let addr: IpNet = match cluster {
        IpNet::V4(_) => {
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(u32::try_from(cand).ok()?), subnet_len).ok()?)
        }
        IpNet::V6(_) => IpNet::V6(Ipv6Net::new(Ipv6Addr::from(cand), subnet_len).ok()?),
    };
    Some(addr)
}

/// What a node tells its peers, published in its lease's annotations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeRecord {
    pub node: String,
    /// The node's underlay address, of either family: its VXLAN and WireGuard endpoint (an
    /// IPv6-underlay node's is IPv6).
    pub underlay_ip: IpAddr,
    /// The node's IPv6 address on the same underlay link, when it has one
    /// (`sluice.dev/underlay-ip-v6`): direct IPv6 routes to its IPv6 subnet go via it.
    pub underlay_ip_v6: Option<Ipv6Addr>,
    pub vtep_mac: [u8; 6],
    pub wireguard_public_key: Option<String>,
    /// `none` or `wireguard` (the `encryption` key of `sluice-config`).
    pub encryption: String,
    /// Its IPv4 subnet (`sluice.dev/subnet`); none on an IPv6-only node.
    pub subnet: Option<Ipv4Net>,
    /// A dual-stack or IPv6-only node's IPv6 subnet (`sluice.dev/subnet-v6`), held in a lease
    /// of its own named from it; both of a dual-stack node's leases carry the same record.
    pub subnet_v6: Option<Ipv6Net>,
}

/// Whether `ip` can be a node's underlay address: unicast, not loopback or unspecified, and for
/// IPv6 not link-local (which needs an interface to mean anything).
pub fn usable_underlay(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || (a.segments()[0] & 0xffc0) == 0xfe80)
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`, lower case.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NodeRecord {
    /// The record as lease annotations (only `sluice.dev/` keys).
    pub fn to_annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::new();
        a.insert(ANN_NODE.into(), self.node.clone());
        a.insert(ANN_UNDERLAY_IP.into(), self.underlay_ip.to_string());
        if let Some(v6) = self.underlay_ip_v6 {
            a.insert(ANN_UNDERLAY_IP_V6.into(), v6.to_string());
        }
        a.insert(ANN_VTEP_MAC.into(), format_mac(&self.vtep_mac));
        if let Some(key) = &self.wireguard_public_key {
            a.insert(ANN_WIREGUARD_PUBLIC_KEY.into(), key.clone());
        }
        a.insert(ANN_ENCRYPTION.into(), self.encryption.clone());
        if let Some(v4) = self.subnet {
            a.insert(ANN_SUBNET.into(), v4.to_string());
        }
        if let Some(v6) = self.subnet_v6 {
            a.insert(ANN_SUBNET_V6.into(), v6.to_string());
        }
        a
    }

    /// Reads a record back; other annotations are ignored.
    pub fn from_annotations(a: &BTreeMap<String, String>) -> Result<Self, RecordError> {
        let get = |key: &'static str| {
            a.get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
                .ok_or(RecordError::Missing { key })
        };
        let bad = |key: &'static str, value: &str, reason: &'static str| RecordError::Bad {
            key,
            value: value.into(),
            reason,
        };
        let node = get(ANN_NODE)?.to_string();
        let ip = get(ANN_UNDERLAY_IP)?;
        let underlay_ip: IpAddr = ip
            .parse()
            .map_err(|_| bad(ANN_UNDERLAY_IP, ip, "not an IP address"))?;
        if !usable_underlay(underlay_ip) {
            return Err(bad(ANN_UNDERLAY_IP, ip, "not a unicast, routable address"));
        }
        let underlay_ip_v6 = match a.get(ANN_UNDERLAY_IP_V6).filter(|v| !v.is_empty()) {
            None => None,
            Some(text) => {
                let v6: Ipv6Addr = text
                    .parse()
                    .map_err(|_| bad(ANN_UNDERLAY_IP_V6, text, "not an IPv6 address"))?;
                if !usable_underlay(v6.into()) {
                    return Err(bad(ANN_UNDERLAY_IP_V6, text, "not a unicast address"));
                }
                Some(v6)
            }
        };
        let mac = get(ANN_VTEP_MAC)?;
        let vtep_mac = parse_mac(mac).ok_or_else(|| bad(ANN_VTEP_MAC, mac, "not a MAC"))?;
        if vtep_mac[0] & 1 == 1 || vtep_mac == [0; 6] {
            return Err(bad(ANN_VTEP_MAC, mac, "not a unicast MAC"));
        }
        // An IPv6-only node's record has no IPv4 subnet; every record has one of the two.
        let subnet = match a.get(ANN_SUBNET).filter(|v| !v.is_empty()) {
            None => None,
            Some(subnet_text) => {
                let subnet: Ipv4Net = subnet_text
                    .parse()
                    .map_err(|_| bad(ANN_SUBNET, subnet_text, "not an IPv4 CIDR"))?;
                if subnet.network() != subnet.addr() {
                    return Err(bad(ANN_SUBNET, subnet_text, "host bits set"));
                }
                Some(subnet)
            }
        };
        let subnet_v6 = match a.get(ANN_SUBNET_V6).filter(|v| !v.is_empty()) {
            None => None,
            Some(text) => {
                let v6: Ipv6Net = text
                    .parse()
                    .map_err(|_| bad(ANN_SUBNET_V6, text, "not an IPv6 CIDR"))?;
                if v6.network() != v6.addr() {
                    return Err(bad(ANN_SUBNET_V6, text, "host bits set"));
                }
                Some(v6)
            }
        };
        if subnet.is_none() && subnet_v6.is_none() {
            return Err(RecordError::Missing { key: ANN_SUBNET });
        }
        Ok(Self {
            node,
            underlay_ip,
            underlay_ip_v6,
            vtep_mac,
            wireguard_public_key: a.get(ANN_WIREGUARD_PUBLIC_KEY).cloned(),
            encryption: a
                .get(ANN_ENCRYPTION)
                .cloned()
                .unwrap_or_else(|| "none".into()),
            subnet,
            subnet_v6,
        })
    }
}

/// The Node a lease belongs to (its ownerReference), so that deleting the Node deletes the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeOwner {
    pub name: String,
    pub uid: String,
}

/// A Lease as sluice sees it, independent of any API client.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseView {
    pub name: String,
    /// `spec.holderIdentity`: the node name.
    pub holder: Option<String>,
    pub acquire_time: Option<SystemTime>,
    pub renew_time: Option<SystemTime>,
    pub duration_secs: Option<u32>,
    /// `metadata.resourceVersion`, the precondition of every update.
    pub resource_version: Option<String>,
    pub annotations: BTreeMap<String, String>,
    pub owner: Option<NodeOwner>,
}

impl LeaseView {
    /// When the lease stops being valid, if it ever was.
    pub fn expires_at(&self) -> Option<SystemTime> {
        let since = self.renew_time.or(self.acquire_time)?;
        Some(since + Duration::from_secs(u64::from(self.duration_secs?)))
    }

    /// A fresh lease of the record's first subnet (the IPv4 one; an IPv6-only node's IPv6
    /// one) held by `record.node`, acquired and renewed `now`.
    pub fn new_held(
        record: &NodeRecord,
        owner: Option<NodeOwner>,
        duration_secs: u32,
        now: SystemTime,
    ) -> Self {
        match (record.subnet, record.subnet_v6) {
            (Some(v4), _) => Self::new_held_of(v4, record, owner, duration_secs, now),
            (None, Some(v6)) => Self::new_held_of(v6, record, owner, duration_secs, now),
            // Records without a subnet are refused where they are read or made.
            (None, None) => {
                debug_assert!(false, "a lease for node {} without a subnet", record.node);
                Self::new_held_of(Ipv4Net::default(), record, owner, duration_secs, now)
            }
        }
    }

    /// A fresh lease named from `subnet` (of either family) carrying `record`.
    pub fn new_held_of<N: FamilyNet>(
        subnet: N,
        record: &NodeRecord,
        owner: Option<NodeOwner>,
        duration_secs: u32,
        now: SystemTime,
    ) -> Self {
        Self {
            name: subnet.lease_name(),
            holder: Some(record.node.clone()),
            acquire_time: Some(now),
            renew_time: Some(now),
            duration_secs: Some(duration_secs),
            resource_version: None,
            annotations: record.to_annotations(),
            owner,
        }
    }

    /// This lease renewed `now` with `record` as its annotations; sluice's annotations are
    /// replaced, anybody else's kept. The resource version stays as the update's precondition.
    pub fn renewed(&self, record: &NodeRecord, now: SystemTime) -> Self {
        let mut next = self.clone();
        next.renew_time = Some(now);
        next.annotations
            .retain(|k, _| !k.starts_with("sluice.dev/"));
        next.annotations.extend(record.to_annotations());
        next
    }

    /// This lease taken over by `record.node` (an expired lease reclaimed).
    pub fn taken_by(
        &self,
        record: &NodeRecord,
        owner: Option<NodeOwner>,
        duration_secs: u32,
        now: SystemTime,
    ) -> Self {
        let mut next = self.renewed(record, now);
        next.holder = Some(record.node.clone());
        next.acquire_time = Some(now);
        next.duration_secs = Some(duration_secs);
        next.owner = owner;
        next
    }
}

/// True when nobody holds `view` at `now`: no holder, no time, or its duration has passed.
pub fn is_expired(view: &LeaseView, now: SystemTime) -> bool {
    if view.holder.as_deref().is_none_or(str::is_empty) {
        return true;
    }
    view.expires_at().is_none_or(|end| end <= now)
}

/// How often a lease of `duration_secs` is renewed: a third of it, so two renewals can fail
/// before it expires.
pub fn renew_interval(duration_secs: u32) -> Duration {
    Duration::from_secs(u64::from(duration_secs.max(3) / 3))
}

/// True when the holder should renew `view` at `now`.
pub fn renew_due(view: &LeaseView, now: SystemTime) -> bool {
    let (Some(since), Some(secs)) = (view.renew_time.or(view.acquire_time), view.duration_secs)
    else {
        return true;
    };
    now.duration_since(since)
        .is_ok_and(|elapsed| elapsed >= renew_interval(secs))
}

/// The subnets a cluster CIDR of one family is cut into, validated once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetPool<N: FamilyNet = Ipv4Net> {
    cluster_cidr: N,
    subnet_len: u8,
}

impl<N: FamilyNet> SubnetPool<N> {
    /// A pool of `/subnet_len` subnets; the length may equal the cluster CIDR's (one subnet).
    pub fn new(cluster_cidr: N, subnet_len: u8) -> Result<Self, LeaseError> {
        let net: IpNet = cluster_cidr.into();
        let bad = LeaseError::BadSubnetLength {
            cluster_cidr: net,
            subnet_len,
        };
        if subnet_len < net.prefix_len() || subnet_len > N::MAX_SUBNET_LEN {
            return Err(bad);
        }
        Ok(Self {
            cluster_cidr: N::of(net.trunc()).ok_or(bad)?,
            subnet_len,
        })
    }

    pub fn cluster_cidr(&self) -> N {
        self.cluster_cidr
    }

    pub fn subnet_len(&self) -> u8 {
        self.subnet_len
    }

    /// True when `subnet` is one of the pool's subnets.
    pub fn contains(&self, subnet: N) -> bool {
        let (subnet, cluster): (IpNet, IpNet) = (subnet.into(), self.cluster_cidr.into());
        subnet.prefix_len() == self.subnet_len
            && subnet.network() == subnet.addr()
            && cluster.contains(&subnet)
    }

    /// The lowest subnet of the pool that overlaps none of `taken` ([`lowest_free`]).
    pub fn lowest_free(&self, taken: &[IpNet]) -> Option<N> {
        lowest_free(self.cluster_cidr.into(), self.subnet_len, taken).and_then(N::of)
    }
}

impl SubnetPool<Ipv4Net> {
    /// Every subnet of the pool, lowest first.
    pub fn subnets(&self) -> impl Iterator<Item = Ipv4Net> {
        self.cluster_cidr
            .subnets(self.subnet_len)
            .into_iter()
            .flatten()
    }
}

/// What a node does about its subnet, given every sluice lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision<N = Ipv4Net> {
    /// A lease held by this node already: renew it (update conditioned on `resource_version`).
    /// A restarted node gets its own subnet back this way.
    Keep {
        name: String,
        subnet: N,
        resource_version: Option<String>,
    },
    /// An expired lease of another (or a deleted) node: take it over with an update conditioned
    /// on `resource_version`, so that of two nodes racing for it one wins.
    TakeExpired {
        name: String,
        subnet: N,
        resource_version: Option<String>,
    },
    /// No lease names this subnet: create one (the API server's name uniqueness arbitrates).
    CreateNew { subnet: N },
    /// Every subnet has a valid lease of another node.
    Exhausted,
}

/// Decides which subnet `my_node` takes. Deterministic: in order,
/// 1. a lease it holds (of the pool; the lowest if several, or `prefer` among them);
/// 2. `prefer`, if it is in the pool and free (no lease overlaps it) or its lease expired;
/// 3. the lowest subnet that no lease overlaps;
/// 4. the lowest subnet whose lease expired;
/// 5. else [`Decision::Exhausted`].
///
/// A valid lease of another node is never taken. Leases with names that are not sluice's, or
/// name a subnet of the other family, are ignored. Both families use it: an IPv6 pool reads the
/// IPv6 lease names ([`lease_name_v6`]), and its cost follows the leases, not the pool's size.
pub fn choose_subnet<N: FamilyNet>(
    pool: &SubnetPool<N>,
    my_node: &str,
    leases: &[LeaseView],
    now: SystemTime,
    prefer: Option<N>,
) -> Decision<N> {
    let mut named: Vec<(N, &LeaseView)> = leases
        .iter()
        .filter_map(|l| N::parse_lease_name(&l.name).ok().map(|s| (s, l)))
        .collect();
    named.sort_by_key(|(s, _)| *s);
    let prefer = prefer.filter(|p| pool.contains(*p));

    let mine: Vec<&(N, &LeaseView)> = named
        .iter()
        .filter(|(s, l)| pool.contains(*s) && l.holder.as_deref() == Some(my_node))
        .collect();
    if let Some((subnet, lease)) = mine
        .iter()
        .find(|(s, _)| Some(*s) == prefer)
        .or_else(|| mine.first())
    {
        return Decision::Keep {
            name: lease.name.clone(),
            subnet: *subnet,
            resource_version: lease.resource_version.clone(),
        };
    }

    // Every lease blocks what it overlaps, leases of other lengths too (the subnet length was
    // changed).
    let taken: Vec<IpNet> = named.iter().map(|(s, _)| (*s).into()).collect();
    let free = |cand: &N| {
        let cand: IpNet = (*cand).into();
        !taken
            .iter()
            .any(|o| o.contains(&cand.network()) || cand.contains(&o.network()))
    };
    let expired = |cand: &N| {
        named
            .iter()
            .find(|(s, _)| s == cand)
            .filter(|(_, l)| is_expired(l, now))
            .map(|(s, l)| Decision::TakeExpired {
                name: l.name.clone(),
                subnet: *s,
                resource_version: l.resource_version.clone(),
            })
    };

    if let Some(p) = prefer {
        if free(&p) {
            return Decision::CreateNew { subnet: p };
        }
        if let Some(d) = expired(&p) {
            return d;
        }
    }
    if let Some(subnet) = pool.lowest_free(&taken) {
        return Decision::CreateNew { subnet };
    }
    named
        .iter()
        .filter(|(s, l)| pool.contains(*s) && is_expired(l, now))
        .find_map(|(s, _)| expired(s))
        .unwrap_or(Decision::Exhausted)
}

/// A lease that does not give a usable peer, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLease {
    pub lease: String,
    pub reason: RecordError,
}

/// The peers of `my_node` from every sluice lease: records that parse, agree with the lease's
/// name and have a holder. Expired leases still count (their node may only have a stopped
/// agent, and its datapath keeps forwarding); a lease that goes away takes its peer with it.
/// If two leases name the same node, the most recently renewed wins. Sorted by node name.
///
/// A dual-stack node holds an IPv4 and an IPv6 lease, both carrying its record. A record's
/// IPv6 subnet counts only while the node holds the lease named from it: a record cannot claim
/// an IPv6 subnet its node never won (or lost since), so two nodes never route the same one.
pub fn peers_from_leases(
    my_node: &str,
    leases: &[LeaseView],
) -> (Vec<NodeRecord>, Vec<SkippedLease>) {
    let mut best: BTreeMap<String, (Option<SystemTime>, NodeRecord)> = BTreeMap::new();
    let mut skipped = Vec::new();
    // IPv6 subnet → the node whose record in that lease names it.
    let mut held_v6: BTreeMap<Ipv6Net, String> = BTreeMap::new();
    for lease in leases {
        let subnet: IpNet = match (
            parse_lease_name(&lease.name),
            parse_lease_name_v6(&lease.name),
        ) {
            (Ok(s), _) => s.into(),
            (_, Ok(s)) => s.into(),
            _ => continue,
        };
        let skip = |reason| SkippedLease {
            lease: lease.name.clone(),
            reason,
        };
        if lease.holder.as_deref().is_none_or(str::is_empty) {
            skipped.push(skip(RecordError::NoHolder {
                lease: lease.name.clone(),
            }));
            continue;
        }
        let record = match NodeRecord::from_annotations(&lease.annotations) {
            Ok(r) => r,
            Err(reason) => {
                skipped.push(skip(reason));
                continue;
            }
        };
        let matches = match subnet {
            IpNet::V4(s) => record.subnet == Some(s),
            IpNet::V6(s) => record.subnet_v6 == Some(s),
        };
        if !matches {
            // The record's subnet of the lease's family, else its other one.
            let v4 = record.subnet.map(IpNet::from);
            let v6 = record.subnet_v6.map(IpNet::from);
            let record_subnet = match subnet {
                IpNet::V4(_) => v4.or(v6),
                IpNet::V6(_) => v6.or(v4),
            }
            .unwrap_or(subnet);
            skipped.push(skip(RecordError::SubnetMismatch {
                record: record_subnet,
                lease: lease.name.clone(),
            }));
            continue;
        }
        if let IpNet::V6(s) = subnet {
            held_v6.insert(s, record.node.clone());
            // The IPv4 lease brings a dual-stack node in: a peer is reached at its IPv4 subnet
            // first. An IPv6-only node has only this one.
            if record.subnet.is_some() {
                continue;
            }
        }
        if record.node == my_node {
            continue;
        }
        let renewed = lease.renew_time.or(lease.acquire_time);
        match best.get(&record.node) {
            Some((t, _)) if *t >= renewed => {}
            _ => {
                best.insert(record.node.clone(), (renewed, record));
            }
        }
    }
    let peers = best
        .into_values()
        .map(|(_, mut r)| {
            if let Some(v6) = r.subnet_v6 {
                if held_v6.get(&v6) != Some(&r.node) {
                    tracing::debug!(peer = %r.node, subnet = %v6, "record's IPv6 subnet has no lease of the node's: left out");
                    r.subnet_v6 = None;
                }
            }
            r
        })
        .collect();
    (peers, skipped)
}

/// `node-podcidr` mode: the lease that publishes `record`, named from the node's podCIDR (which
/// must be `record.subnet`). The agent writes it with [`store::publish`].
pub fn podcidr_lease(
    record: &NodeRecord,
    owner: Option<NodeOwner>,
    duration_secs: u32,
    now: SystemTime,
) -> LeaseView {
    LeaseView::new_held(record, owner, duration_secs, now)
}

/// `node-podcidr` mode on a dual-stack node: the lease named from its IPv6 podCIDR, carrying
/// the same record as its IPv4 one.
pub fn podcidr_lease_of<N: FamilyNet>(
    subnet: N,
    record: &NodeRecord,
    owner: Option<NodeOwner>,
    duration_secs: u32,
    now: SystemTime,
) -> LeaseView {
    LeaseView::new_held_of(subnet, record, owner, duration_secs, now)
}
