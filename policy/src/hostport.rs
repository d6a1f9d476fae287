//! hostPort: the CNI `portMappings` capability, decided here and applied by the CNI plugin.
//!
//! Pure: [`parse_mappings`] checks the runtime's `runtimeConfig.portMappings`, [`admit`] refuses a
//! hostPort another attachment holds, and [`render_nft`] / [`render_iptables`] turn every mapping
//! on the node into one script for `nft -f -` (table `inet sluice-hostport`) or
//! `iptables-restore --noflush` (nat chains `SLUICE-HP*`). The script replaces sluice's hostPort
//! rules in one transaction, so a failed write leaves the previous rules whole.
//!
//! What the rules do, for each mapping (`hostIP` or any local address, `hostPort`, protocol):
//! - DNAT to `podIP:containerPort` in prerouting (traffic from outside and from other pods) and
//!   in output (the node itself, `127.0.0.1:hostPort` included), only for destinations that are
//!   addresses of the node (`fib daddr type local` / `-m addrtype --dst-type LOCAL`);
//! - masquerade of DNATed traffic whose source is loopback (so the reply can come back) or the
//!   pod itself (hairpin: the pod reaching its own hostPort).
//!
//! A pod with an IPv6 address gets the same for IPv6: a mapping without a `hostIP` is DNATed in
//! every family the pod has an address of (to the pod's IPv4 or IPv6 address), one with an IPv6
//! `hostIP` in IPv6 only (nftables maps `hp_ip6`/`hp_any6` and set `hairpin6` in the same inet
//! table; the same chain names in ip6tables' nat table). A pod of an IPv6-only node has no IPv4
//! address: its entry renders no IPv4 element or rule, and where no entry has an IPv4 rule,
//! iptables (IPv4) is not written at all. `[::1]:hostPort` is not mapped, as the
//! portmap plugin does not map it: IPv6 has no `route_localnet`, so a packet from `::1` may never
//! leave the node towards the pod; such connections reach whatever listens on the node itself.

use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The nftables table holding every hostPort rule.
pub const NFT_TABLE: &str = "sluice-hostport";
/// The iptables nat chain the DNAT rules live in (jumped to from PREROUTING and OUTPUT).
pub const IPT_CHAIN: &str = "SLUICE-HP";
/// The iptables nat chain the masquerade rules live in (jumped to from POSTROUTING).
pub const IPT_POST_CHAIN: &str = "SLUICE-HP-POST";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum HpProtocol {
    Tcp,
    Udp,
    Sctp,
}

impl HpProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            HpProtocol::Tcp => "tcp",
            HpProtocol::Udp => "udp",
            HpProtocol::Sctp => "sctp",
        }
    }
}

/// One entry of `runtimeConfig.portMappings`, checked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: HpProtocol,
    /// `None` for every address of the node, of both families (`hostIP` absent, empty,
    /// `0.0.0.0` or `::`).
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
}

impl PortMapping {
    /// `host_port` on `host_ip` (every node address when `None`) to the pod's `container_port`.
    pub fn new(
        protocol: HpProtocol,
        host_port: u16,
        container_port: u16,
        host_ip: Option<IpAddr>,
    ) -> Self {
        PortMapping {
            host_port,
            container_port,
            protocol,
            host_ip,
        }
    }

    /// Whether the mapping applies to IPv4 traffic (no `hostIP`, or an IPv4 one).
    pub fn v4(&self) -> bool {
        !matches!(self.host_ip, Some(IpAddr::V6(_)))
    }

    /// Whether the mapping applies to IPv6 traffic (no `hostIP`, or an IPv6 one).
    pub fn v6(&self) -> bool {
        !matches!(self.host_ip, Some(IpAddr::V4(_)))
    }
}

/// The mappings of one attachment (container, interface) to its pod address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostportEntry {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// The pod's IPv4 address; `None` on an IPv6-only node (present in every entry written
    /// before IPv6-only nodes had hostPorts, which read as they were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<Ipv4Addr>,
    /// The pod's IPv6 address, on a dual-stack or IPv6-only node (absent in state written
    /// before IPv6).
    #[serde(default, rename = "podIP6", skip_serializing_if = "Option::is_none")]
    pub pod_ip6: Option<Ipv6Addr>,
    pub mappings: Vec<PortMapping>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostportError {
    #[error("runtimeConfig.portMappings must be a list of objects")]
    NotAList,
    #[error("portMappings[{index}]: {reason}")]
    Invalid { index: usize, reason: String },
    #[error("hostPort {host_port}/{protocol} on {host_ip} is already held by container {holder}")]
    Conflict {
        host_port: u16,
        protocol: &'static str,
        host_ip: String,
        holder: String,
    },
    #[error(
        "portMappings[{index}]: hostIP {host_ip} is IPv6 but this node gives pods no IPv6 address"
    )]
    NoIpv6 { index: usize, host_ip: Ipv6Addr },
    #[error(
        "portMappings[{index}]: hostIP {host_ip} is IPv4 but this node is IPv6-only (its pods have no IPv4 address)"
    )]
    NoIpv4 { index: usize, host_ip: Ipv4Addr },
}

fn port(v: Option<&Value>, index: usize, field: &str) -> Result<u16, HostportError> {
    let invalid = |reason: String| HostportError::Invalid { index, reason };
    let n = v
        .and_then(Value::as_i64)
        .ok_or_else(|| invalid(format!("{field} is missing or not an integer")))?;
    match u16::try_from(n) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(invalid(format!("{field} {n} is not within 1..=65535"))),
    }
}

/// Checks `runtimeConfig.portMappings` (`null` or absent means none). Duplicate entries collapse;
/// `hostIP` may be of either family (`0.0.0.0` and `::` mean every address).
pub fn parse_mappings(v: Option<&Value>) -> Result<Vec<PortMapping>, HostportError> {
    let list = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(HostportError::NotAList),
    };
    let mut out = BTreeSet::new();
    for (index, m) in list.iter().enumerate() {
        let invalid = |reason: String| HostportError::Invalid { index, reason };
        let obj = m
            .as_object()
            .ok_or_else(|| invalid("not an object".into()))?;
        let host_port = port(obj.get("hostPort"), index, "hostPort")?;
        let container_port = port(obj.get("containerPort"), index, "containerPort")?;
        let protocol = match obj.get("protocol") {
            None | Some(Value::Null) => HpProtocol::Tcp,
            Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
                "" | "tcp" => HpProtocol::Tcp,
                "udp" => HpProtocol::Udp,
                "sctp" => HpProtocol::Sctp,
                _ => return Err(invalid(format!("protocol {s:?} is not TCP, UDP or SCTP"))),
            },
            Some(other) => return Err(invalid(format!("protocol {other} is not a string"))),
        };
        let host_ip = match obj.get("hostIP") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => match s.parse::<IpAddr>() {
                Ok(a) if a.is_unspecified() => None,
                Ok(IpAddr::V6(a)) if a.is_unicast_link_local() => {
                    return Err(invalid(format!(
                        "hostIP {s:?} is link-local (a zone would be needed)"
                    )));
                }
                // An IPv4-mapped IPv6 address is its IPv4 address.
                Ok(IpAddr::V6(a)) => Some(a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)),
                Ok(a) => Some(a),
                Err(_) => {
                    return Err(invalid(format!("hostIP {s:?} is not an IP address")));
                }
            },
            Some(other) => return Err(invalid(format!("hostIP {other} is not a string"))),
        };
        out.insert(PortMapping::new(
            protocol,
            host_port,
            container_port,
            host_ip,
        ));
    }
    let out: Vec<PortMapping> = out.into_iter().collect();
    // Within one request, two mappings of one host socket to different targets are a conflict too.
    for (i, a) in out.iter().enumerate() {
        if let Some(b) = out[i + 1..].iter().find(|b| overlaps(a, b)) {
            return Err(HostportError::Invalid {
                index: i,
                reason: format!(
                    "hostPort {}/{} is mapped twice (to {} and {})",
                    a.host_port,
                    a.protocol.as_str(),
                    a.container_port,
                    b.container_port
                ),
            });
        }
    }
    Ok(out)
}

/// Refuses a mapping with a `hostIP` of a family the node's pods get no address of: an IPv6 one
/// on an IPv4-only node, an IPv4 one on an IPv6-only node (kube's portmap would silently map
/// nothing). `mappings` as [`parse_mappings`] returns them.
pub fn check_families(
    mappings: &[PortMapping],
    pod_has_v4: bool,
    pod_has_v6: bool,
) -> Result<(), HostportError> {
    for (index, m) in mappings.iter().enumerate() {
        match m.host_ip {
            Some(IpAddr::V6(host_ip)) if !pod_has_v6 => {
                return Err(HostportError::NoIpv6 { index, host_ip })
            }
            Some(IpAddr::V4(host_ip)) if !pod_has_v4 => {
                return Err(HostportError::NoIpv4 { index, host_ip })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether two mappings claim the same host socket.
fn overlaps(a: &PortMapping, b: &PortMapping) -> bool {
    a.host_port == b.host_port
        && a.protocol == b.protocol
        && match (a.host_ip, b.host_ip) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// Refuses `new` when another attachment in `existing` holds one of its host sockets. An entry
/// of the same (container, interface) is not a conflict: it is being replaced.
pub fn admit(existing: &[HostportEntry], new: &HostportEntry) -> Result<(), HostportError> {
    for other in existing
        .iter()
        .filter(|e| (&e.container_id, &e.ifname) != (&new.container_id, &new.ifname))
    {
        for m in &new.mappings {
            if other.mappings.iter().any(|o| overlaps(m, o)) {
                return Err(HostportError::Conflict {
                    host_port: m.host_port,
                    protocol: m.protocol.as_str(),
                    host_ip: m.host_ip.map_or("every address".into(), |a| a.to_string()),
                    holder: other.container_id.clone(),
                });
            }
        }
    }
    Ok(())
}

/// `entries` with the attachment's entry replaced by `new` (or removed when `new` has no
/// mappings), sorted so that rendering is deterministic.
pub fn upsert(entries: &[HostportEntry], new: HostportEntry) -> Vec<HostportEntry> {
    let mut out: Vec<HostportEntry> = entries
        .iter()
        .filter(|e| (&e.container_id, &e.ifname) != (&new.container_id, &new.ifname))
        .cloned()
        .collect();
    if !new.mappings.is_empty() {
        out.push(new);
    }
    out.sort();
    out
}

/// `entries` without the attachment (container, ifname).
pub fn remove(entries: &[HostportEntry], container_id: &str, ifname: &str) -> Vec<HostportEntry> {
    entries
        .iter()
        .filter(|e| (e.container_id.as_str(), e.ifname.as_str()) != (container_id, ifname))
        .cloned()
        .collect()
}

/// GC: `entries` of the attachments in `valid` (container, ifname) only; the rest are the
/// mappings of attachments the runtime no longer knows.
pub fn retain_valid(entries: &[HostportEntry], valid: &[(String, String)]) -> Vec<HostportEntry> {
    entries
        .iter()
        .filter(|e| {
            valid
                .iter()
                .any(|(c, i)| (c, i) == (&e.container_id, &e.ifname))
        })
        .cloned()
        .collect()
}

/// Rules sorted with hostIP-specific mappings first, so that they win over a 0.0.0.0 mapping of
/// the same port (which [`admit`] refuses anyway between attachments): the mappings without a
/// `hostIP` or with an IPv4 one of the entries that have an IPv4 address.
fn ordered(entries: &[HostportEntry]) -> Vec<(Ipv4Addr, PortMapping)> {
    let mut rules: Vec<(Ipv4Addr, PortMapping)> = entries
        .iter()
        .filter_map(|e| e.pod_ip.map(|ip| (e, ip)))
        .flat_map(|(e, ip)| e.mappings.iter().filter(|m| m.v4()).map(move |m| (ip, *m)))
        .collect();
    rules.sort_by_key(|(ip, m)| (m.host_ip.is_none(), m.host_port, m.protocol, *ip));
    rules
}

/// The IPv6 rules, as [`ordered`]: the mappings without a `hostIP` or with an IPv6 one of the
/// entries that have an IPv6 address.
fn ordered6(entries: &[HostportEntry]) -> Vec<(Ipv6Addr, PortMapping)> {
    let mut rules: Vec<(Ipv6Addr, PortMapping)> = entries
        .iter()
        .filter_map(|e| e.pod_ip6.map(|ip6| (e, ip6)))
        .flat_map(|(e, ip6)| e.mappings.iter().filter(|m| m.v6()).map(move |m| (ip6, *m)))
        .collect();
    rules.sort_by_key(|(ip, m)| (m.host_ip.is_none(), m.host_port, m.protocol, *ip));
    rules
}

fn pod_ips(entries: &[HostportEntry]) -> BTreeSet<Ipv4Addr> {
    ordered(entries).into_iter().map(|(ip, _)| ip).collect()
}

fn pod_ips6(entries: &[HostportEntry]) -> BTreeSet<Ipv6Addr> {
    ordered6(entries).into_iter().map(|(ip, _)| ip).collect()
}

/// Whether any of `entries` has an IPv4 rule (else iptables is not touched: an IPv6-only
/// node's entries have none).
pub fn has_v4(entries: &[HostportEntry]) -> bool {
    !ordered(entries).is_empty()
}

/// Whether any of `entries` has an IPv6 rule (else ip6tables is not touched).
pub fn has_v6(entries: &[HostportEntry]) -> bool {
    !ordered6(entries).is_empty()
}

/// The nftables map of mappings with a `hostIP`: (address . protocol . hostPort) to
/// (pod . containerPort).
pub const NFT_MAP_IP: &str = "hp_ip";
/// The nftables map of mappings on every address of the node: (protocol . hostPort) to
/// (pod . containerPort).
pub const NFT_MAP_ANY: &str = "hp_any";
/// The nftables set of (pod . pod) pairs whose DNATed traffic is masqueraded (hairpin).
pub const NFT_SET_HAIRPIN: &str = "hairpin";
/// [`NFT_MAP_IP`] for IPv6: (IPv6 address . protocol . hostPort) to (IPv6 pod . containerPort).
pub const NFT_MAP_IP6: &str = "hp_ip6";
/// [`NFT_MAP_ANY`] for IPv6: (protocol . hostPort) to (IPv6 pod . containerPort).
pub const NFT_MAP_ANY6: &str = "hp_any6";
/// [`NFT_SET_HAIRPIN`] for IPv6 pods.
pub const NFT_SET_HAIRPIN6: &str = "hairpin6";
const NFT_SETS: [&str; 6] = [
    NFT_MAP_IP,
    NFT_MAP_ANY,
    NFT_SET_HAIRPIN,
    NFT_MAP_IP6,
    NFT_MAP_ANY6,
    NFT_SET_HAIRPIN6,
];

/// One element of sluice's nftables maps and set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NftElement {
    /// One of [`NFT_MAP_IP`], [`NFT_MAP_ANY`], [`NFT_SET_HAIRPIN`] or their IPv6 twins.
    pub set: &'static str,
    pub key: String,
    /// The mapped value (maps only).
    pub value: Option<String>,
}

impl NftElement {
    /// As `nft` writes and lists it: `key : value`, or `key`.
    pub fn text(&self) -> String {
        match &self.value {
            Some(v) => format!("{} : {v}", self.key),
            None => self.key.clone(),
        }
    }
}

/// One mapping's element for the pod address `pod`: in [`NFT_MAP_IP`] with a `hostIP`, else in
/// [`NFT_MAP_ANY`] (their IPv6 twins for an IPv6 `pod`). `m` must apply to `pod`'s family.
pub fn nft_element(pod: IpAddr, m: &PortMapping) -> NftElement {
    let key = format!("{} . {}", m.protocol.as_str(), m.host_port);
    let value = Some(format!("{pod} . {}", m.container_port));
    let (with_ip, any) = if pod.is_ipv6() {
        (NFT_MAP_IP6, NFT_MAP_ANY6)
    } else {
        (NFT_MAP_IP, NFT_MAP_ANY)
    };
    match m.host_ip {
        Some(a) => NftElement {
            set: with_ip,
            key: format!("{a} . {key}"),
            value,
        },
        None => NftElement {
            set: any,
            key,
            value,
        },
    }
}

/// Every element `entries` put in sluice's table: one per mapping and family, and a hairpin
/// pair per pod address.
pub fn nft_elements(entries: &[HostportEntry]) -> BTreeSet<NftElement> {
    let mut out: BTreeSet<NftElement> = ordered(entries)
        .iter()
        .map(|(pod, m)| nft_element(IpAddr::V4(*pod), m))
        .collect();
    out.extend(
        ordered6(entries)
            .iter()
            .map(|(pod, m)| nft_element(IpAddr::V6(*pod), m)),
    );
    out.extend(pod_ips(entries).into_iter().map(|pod| NftElement {
        set: NFT_SET_HAIRPIN,
        key: format!("{pod} . {pod}"),
        value: None,
    }));
    out.extend(pod_ips6(entries).into_iter().map(|pod| NftElement {
        set: NFT_SET_HAIRPIN6,
        key: format!("{pod} . {pod}"),
        value: None,
    }));
    out
}

/// `verb element` lines for `elements`, one per set, keys only when `keys_only` (deletion).
fn element_lines(verb: &str, elements: &[&NftElement], keys_only: bool) -> String {
    let mut s = String::new();
    for set in NFT_SETS {
        let these: Vec<String> = elements
            .iter()
            .filter(|e| e.set == set)
            .map(|e| if keys_only { e.key.clone() } else { e.text() })
            .collect();
        if !these.is_empty() {
            let _ = writeln!(
                s,
                "{verb} element inet {NFT_TABLE} {set} {{ {} }}",
                these.join(", ")
            );
        }
    }
    s
}

/// The script that takes the kernel from `before`'s elements to `after`'s, touching only what
/// differs (one transaction: deletions, then additions): what ADD and DEL write, so that their
/// cost does not grow with the node's mappings. `None` when nothing differs. It fails (and
/// changes nothing) when the table is not as `before` says; the applier then writes
/// [`render_nft`]`(after)` whole.
pub fn nft_delta(before: &[HostportEntry], after: &[HostportEntry]) -> Option<String> {
    let (old, new) = (nft_elements(before), nft_elements(after));
    let gone: Vec<&NftElement> = old.difference(&new).collect();
    let added: Vec<&NftElement> = new.difference(&old).collect();
    // A mapping whose target changed is deleted by its key and added again.
    let changed: Vec<&NftElement> = added
        .iter()
        .copied()
        .filter(|a| old.iter().any(|o| o.set == a.set && o.key == a.key))
        .collect();
    if gone.is_empty() && added.is_empty() {
        return None;
    }
    let mut gone_keys: Vec<&NftElement> = gone
        .iter()
        .copied()
        .filter(|g| !new.iter().any(|n| n.set == g.set && n.key == g.key))
        .collect();
    gone_keys.extend(changed);
    Some(format!(
        "{}{}",
        element_lines("delete", &gone_keys, true),
        element_lines("add", &added, false)
    ))
}

/// One mapping's DNAT rule in chain [`IPT_CHAIN`], as `iptables-save` prints it.
pub fn iptables_rule(pod: Ipv4Addr, m: &PortMapping) -> String {
    let daddr = m.host_ip.map_or(String::new(), |a| format!("-d {a}/32 "));
    let p = m.protocol.as_str();
    format!(
        "-A {IPT_CHAIN} {daddr}-p {p} -m {p} --dport {hp} -j DNAT --to-destination {pod}:{cp}",
        hp = m.host_port,
        cp = m.container_port
    )
}

/// The masquerade of a pod reaching its own hostPort (hairpin), in chain [`IPT_POST_CHAIN`].
fn iptables_hairpin(pod: Ipv4Addr) -> String {
    format!("-A {IPT_POST_CHAIN} -s {pod}/32 -d {pod}/32 -m conntrack --ctstate DNAT -j MASQUERADE")
}

/// [`iptables_rule`] for ip6tables: one mapping's DNAT to the pod's IPv6 address.
pub fn ip6tables_rule(pod: Ipv6Addr, m: &PortMapping) -> String {
    let daddr = m.host_ip.map_or(String::new(), |a| format!("-d {a}/128 "));
    let p = m.protocol.as_str();
    format!(
        "-A {IPT_CHAIN} {daddr}-p {p} -m {p} --dport {hp} -j DNAT --to-destination [{pod}]:{cp}",
        hp = m.host_port,
        cp = m.container_port
    )
}

fn ip6tables_hairpin(pod: Ipv6Addr) -> String {
    format!(
        "-A {IPT_POST_CHAIN} -s {pod}/128 -d {pod}/128 -m conntrack --ctstate DNAT -j MASQUERADE"
    )
}

/// The first rule of ip6tables' [`IPT_CHAIN`]: `[::1]:hostPort` is left to the node (see the
/// module's note).
const IP6T_LOOPBACK: &str = "-A SLUICE-HP -d ::1/128 -j RETURN";

/// Which rule text [`missing_rules`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `nft list table inet sluice-hostport`.
    Nft,
    /// `iptables-save -t nat` (the IPv4 rules of an entry with an IPv4 address).
    Iptables,
    /// `ip6tables-save -t nat` (the IPv6 rules of an entry with an IPv6 address).
    Ip6tables,
}

/// CHECK: the rules of `entry` (and the hooks that lead to them) that `listing` lacks, as
/// text for an error message; empty when everything is in place.
pub fn missing_rules(kind: Listing, listing: &str, entry: &HostportEntry) -> Vec<String> {
    let lines: BTreeSet<&str> = listing.lines().map(str::trim).collect();
    let mut want: Vec<String> = Vec::new();
    match kind {
        Listing::Nft => {
            let flat = format!(
                " {} ",
                listing.split_whitespace().collect::<Vec<_>>().join(" ")
            );
            let mut want: Vec<String> = NFT_RULES
                .iter()
                .filter(|r| !lines.contains(**r))
                .map(|r| r.to_string())
                .collect();
            let one = HostportEntry {
                mappings: entry.mappings.clone(),
                ..entry.clone()
            };
            for e in nft_elements(std::slice::from_ref(&one)) {
                let t = e.text();
                let listed = ["{ ", ", "].iter().any(|before| {
                    [",", " }"]
                        .iter()
                        .any(|after| flat.contains(&format!("{before}{t}{after}")))
                });
                if !listed {
                    want.push(format!("{} element {t}", e.set));
                }
            }
            return want;
        }
        Listing::Iptables => {
            // An entry without IPv4 rules (an IPv6-only pod's) needs nothing in iptables.
            let Some(ip) = entry.pod_ip else {
                return want;
            };
            if !entry.mappings.iter().any(PortMapping::v4) {
                return want;
            }
            for (chain, spec) in iptables_jumps() {
                want.push(format!("-A {chain} {}", spec.join(" ")));
            }
            want.extend(
                entry
                    .mappings
                    .iter()
                    .filter(|m| m.v4())
                    .map(|m| iptables_rule(ip, m)),
            );
            want.push(iptables_hairpin(ip));
        }
        Listing::Ip6tables => {
            let Some(ip6) = entry.pod_ip6 else {
                return want;
            };
            if !entry.mappings.iter().any(PortMapping::v6) {
                return want;
            }
            for (chain, spec) in iptables_jumps() {
                want.push(format!("-A {chain} {}", spec.join(" ")));
            }
            want.push(IP6T_LOOPBACK.to_string());
            want.extend(
                entry
                    .mappings
                    .iter()
                    .filter(|m| m.v6())
                    .map(|m| ip6tables_rule(ip6, m)),
            );
            want.push(ip6tables_hairpin(ip6));
        }
    }
    want.retain(|w| !lines.contains(w.as_str()));
    want
}

/// The rules of sluice's table, whatever its mappings (they live in its maps and set), as
/// `nft list` prints them.
const NFT_RULES: [&str; 9] = [
    "fib daddr type local jump hostports",
    "ip6 daddr ::1 return",
    "dnat ip to ip daddr . meta l4proto . th dport map @hp_ip",
    "dnat ip to meta l4proto . th dport map @hp_any",
    "dnat ip6 to ip6 daddr . meta l4proto . th dport map @hp_ip6",
    "dnat ip6 to meta l4proto . th dport map @hp_any6",
    "ct status dnat ip saddr 127.0.0.0/8 masquerade",
    "ct status dnat ip saddr . ip daddr @hairpin masquerade",
    "ct status dnat ip6 saddr . ip6 daddr @hairpin6 masquerade",
];

/// The `nft -f -` script that makes table `inet sluice-hostport` hold exactly `entries`'
/// mappings (declared, removed, declared again with its elements: one transaction). The
/// mappings are elements of maps looked up by two fixed rules (hostIP-specific first), so
/// that [`nft_delta`] can change one pod's without rewriting the rest. With no entries the
/// table is removed.
pub fn render_nft(entries: &[HostportEntry]) -> String {
    let mut s = format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n");
    let elements = nft_elements(entries);
    if elements.is_empty() {
        return s;
    }
    let _ = writeln!(s, "table inet {NFT_TABLE} {{");
    let _ = writeln!(
        s,
        "  map {NFT_MAP_IP} {{ type ipv4_addr . inet_proto . inet_service : ipv4_addr . inet_service; }}"
    );
    let _ = writeln!(
        s,
        "  map {NFT_MAP_ANY} {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}"
    );
    let _ = writeln!(
        s,
        "  set {NFT_SET_HAIRPIN} {{ type ipv4_addr . ipv4_addr; }}"
    );
    let _ = writeln!(
        s,
        "  map {NFT_MAP_IP6} {{ type ipv6_addr . inet_proto . inet_service : ipv6_addr . inet_service; }}"
    );
    let _ = writeln!(
        s,
        "  map {NFT_MAP_ANY6} {{ type inet_proto . inet_service : ipv6_addr . inet_service; }}"
    );
    let _ = writeln!(
        s,
        "  set {NFT_SET_HAIRPIN6} {{ type ipv6_addr . ipv6_addr; }}"
    );
    let _ = writeln!(
        s,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    {}\n  }}",
        NFT_RULES[0]
    );
    let _ = writeln!(
        s,
        "  chain output {{\n    type nat hook output priority -100; policy accept;\n    {}\n  }}",
        NFT_RULES[0]
    );
    let _ = writeln!(
        s,
        "  chain hostports {{\n    {}\n  }}",
        NFT_RULES[1..6].join("\n    ")
    );
    let _ = writeln!(
        s,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    {}\n  }}\n}}",
        NFT_RULES[6..].join("\n    ")
    );
    let all: Vec<&NftElement> = elements.iter().collect();
    s.push_str(&element_lines("add", &all, false));
    s
}

/// The `iptables-restore --noflush` input for the nat table that makes chains `SLUICE-HP` and
/// `SLUICE-HP-POST` hold exactly `entries`' rules (declaring a chain flushes it). The jumps from
/// PREROUTING, OUTPUT and POSTROUTING are [`iptables_jumps`], added once by the applier.
pub fn render_iptables(entries: &[HostportEntry]) -> String {
    let mut s = format!("*nat\n:{IPT_CHAIN} - [0:0]\n:{IPT_POST_CHAIN} - [0:0]\n");
    for (pod, m) in ordered(entries) {
        let _ = writeln!(s, "{}", iptables_rule(pod, &m));
    }
    let _ = writeln!(
        s,
        "-A {IPT_POST_CHAIN} -s 127.0.0.0/8 -m conntrack --ctstate DNAT -j MASQUERADE"
    );
    for pod in pod_ips(entries) {
        let _ = writeln!(s, "{}", iptables_hairpin(pod));
    }
    s.push_str("COMMIT\n");
    s
}

/// [`render_iptables`] for `ip6tables-restore --noflush`: the IPv6 rules of `entries` in the same
/// chain names of ip6tables' nat table (`[::1]` returned first, no loopback masquerade).
pub fn render_ip6tables(entries: &[HostportEntry]) -> String {
    let mut s = format!("*nat\n:{IPT_CHAIN} - [0:0]\n:{IPT_POST_CHAIN} - [0:0]\n{IP6T_LOOPBACK}\n");
    for (pod, m) in ordered6(entries) {
        let _ = writeln!(s, "{}", ip6tables_rule(pod, &m));
    }
    for pod in pod_ips6(entries) {
        let _ = writeln!(s, "{}", ip6tables_hairpin(pod));
    }
    s.push_str("COMMIT\n");
    s
}

/// The jumps into sluice's chains, as (built-in chain, rule spec) for `iptables -t nat -C/-A`
/// (the same in ip6tables).
pub fn iptables_jumps() -> Vec<(&'static str, Vec<&'static str>)> {
    let local = ["-m", "addrtype", "--dst-type", "LOCAL", "-j", IPT_CHAIN];
    vec![
        ("PREROUTING", local.to_vec()),
        ("OUTPUT", local.to_vec()),
        ("POSTROUTING", vec!["-j", IPT_POST_CHAIN]),
    ]
}

pub mod apply;
pub use apply::{HostportBackend, HostportFirewall, BACKEND_NAMES};

#[cfg(test)]
mod tests;
