//! Which address ranges may hold pods. Pure: the CNI plugin checks `SLUICE_NETWORK` and
//! `SLUICE_SUBNET` with it, and the agent can check `cluster-cidr` with the same rules.
//!
//! A pod range must not overlap a range with a fixed meaning on every host (loopback, link-local,
//! multicast, "this network"): a pod holding such an address is unreachable or breaks the node
//! (169.254.1.1 is every pod's gateway). It must not be wider than a /8 (IPv4) or /16 (IPv6):
//! nothing real needs more, and a /0 would take every address there is.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::{Ipv4Addr, Ipv6Addr};

/// The shortest prefix a pod range may have.
pub const MIN_PREFIX_V4: u8 = 8;
/// The shortest prefix a pod range may have.
pub const MIN_PREFIX_V6: u8 = 16;

/// A range with a fixed meaning that no pod range may overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserved {
    pub range: IpNet,
    /// What the range is, in words a user searches for.
    pub what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, len: u8, what: &'static str) -> Reserved {
    Reserved {
        range: IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), len)),
        what,
    }
}

const fn v6(addr: Ipv6Addr, len: u8, what: &'static str) -> Reserved {
    Reserved {
        range: IpNet::V6(Ipv6Net::new_assert(addr, len)),
        what,
    }
}

/// The IPv4 ranges no pod range may overlap (RFC 6890).
pub const RESERVED_V4: [Reserved; 4] = [
    v4(
        0,
        0,
        0,
        0,
        8,
        "unspecified range 0.0.0.0/8 (\"this network\")",
    ),
    v4(127, 0, 0, 0, 8, "loopback range 127.0.0.0/8"),
    v4(
        169,
        254,
        0,
        0,
        16,
        "link-local range 169.254.0.0/16 (the pods' gateway 169.254.1.1 is there)",
    ),
    v4(224, 0, 0, 0, 4, "multicast range 224.0.0.0/4"),
];

/// The IPv6 ranges no pod range may overlap (RFC 4291).
pub const RESERVED_V6: [Reserved; 5] = [
    v6(Ipv6Addr::UNSPECIFIED, 128, "unspecified address ::"),
    v6(Ipv6Addr::LOCALHOST, 128, "loopback address ::1"),
    v6(
        Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0),
        96,
        "IPv4-mapped range ::ffff:0:0/96",
    ),
    v6(
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0),
        10,
        "link-local range fe80::/10",
    ),
    v6(
        Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0),
        8,
        "multicast range ff00::/8",
    ),
];

/// Why a range may not hold pods.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnsafeRange {
    #[error("{range} is too broad for pods: a /{} or longer prefix is needed", min_prefix(.range))]
    TooBroad { range: IpNet },
    #[error("{range} overlaps the {}", .reserved.what)]
    Reserved { range: IpNet, reserved: Reserved },
    #[error("{subnet} lies outside the cluster range {network}")]
    Outside { subnet: IpNet, network: IpNet },
}

fn min_prefix(range: &IpNet) -> u8 {
    match range {
        IpNet::V4(_) => MIN_PREFIX_V4,
        IpNet::V6(_) => MIN_PREFIX_V6,
    }
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Checks that `range` (a cluster CIDR or a node's subnet) may hold pods.
pub fn check_pod_range(range: IpNet) -> Result<(), UnsafeRange> {
    let range = range.trunc();
    if range.prefix_len() < min_prefix(&range) {
        return Err(UnsafeRange::TooBroad { range });
    }
    let reserved: &[Reserved] = match range {
        IpNet::V4(_) => &RESERVED_V4,
        IpNet::V6(_) => &RESERVED_V6,
    };
    match reserved.iter().find(|r| overlaps(&range, &r.range)) {
        Some(r) => Err(UnsafeRange::Reserved {
            range,
            reserved: *r,
        }),
        None => Ok(()),
    }
}

/// Checks a node's `subnet` on its own and as a part of the cluster's `network`.
pub fn check_node_subnet(network: IpNet, subnet: IpNet) -> Result<(), UnsafeRange> {
    check_pod_range(subnet)?;
    let (network, subnet) = (network.trunc(), subnet.trunc());
    if !network.contains(&subnet) {
        return Err(UnsafeRange::Outside { subnet, network });
    }
    Ok(())
}

/// `cluster-cidr`: one range of either family or one of each, as kube-controller-manager's
/// `--cluster-cidr` takes them (`10.244.0.0/16`, `fd00:10:244::/56`, or both comma-separated, in
/// either order). At least one family is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCidr {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

/// Why a `cluster-cidr` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterCidrError {
    #[error("no CIDR given")]
    Empty,
    #[error("{part:?} is not a CIDR (e.g. 10.244.0.0/16 or fd00:10:244::/56)")]
    NotCidr { part: String },
    #[error("{part} has host bits set (its network is {network})")]
    HostBits { part: String, network: IpNet },
    #[error("two IPv{family} CIDRs ({first}, {second}): give at most one of each family")]
    SameFamily {
        family: u8,
        first: IpNet,
        second: IpNet,
    },
    #[error("{count} CIDRs: give one, or one IPv4 and one IPv6")]
    TooMany { count: usize },
    #[error(transparent)]
    Unsafe(#[from] UnsafeRange),
}

impl ClusterCidr {
    /// An IPv4-only cluster.
    pub fn ipv4_only(net: Ipv4Net) -> Self {
        Self {
            v4: Some(net),
            v6: None,
        }
    }

    /// Parses `text`; every range must be a safe pod range ([`check_pod_range`]) with no host
    /// bits, since a typo there would cut nodes' subnets out of a range nobody meant.
    pub fn parse(text: &str) -> Result<Self, ClusterCidrError> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.iter().all(|p| p.is_empty()) {
            return Err(ClusterCidrError::Empty);
        }
        if parts.len() > 2 {
            return Err(ClusterCidrError::TooMany { count: parts.len() });
        }
        let mut out = Self { v4: None, v6: None };
        for part in parts {
            let net: IpNet = part.parse().map_err(|_| ClusterCidrError::NotCidr {
                part: part.to_string(),
            })?;
            if net != net.trunc() {
                return Err(ClusterCidrError::HostBits {
                    part: part.to_string(),
                    network: net.trunc(),
                });
            }
            check_pod_range(net)?;
            let same = |family, first: IpNet| ClusterCidrError::SameFamily {
                family,
                first,
                second: net,
            };
            match net {
                IpNet::V4(n) => match out.v4 {
                    Some(first) => return Err(same(4, first.into())),
                    None => out.v4 = Some(n),
                },
                IpNet::V6(n) => match out.v6 {
                    Some(first) => return Err(same(6, first.into())),
                    None => out.v6 = Some(n),
                },
            }
        }
        Ok(out)
    }

    /// Both families.
    pub fn is_dual(&self) -> bool {
        self.v4.is_some() && self.v6.is_some()
    }

    /// The ranges, IPv4 first.
    pub fn ranges(&self) -> impl Iterator<Item = IpNet> {
        self.v4
            .map(IpNet::V4)
            .into_iter()
            .chain(self.v6.map(IpNet::V6))
    }
}

impl std::fmt::Display for ClusterCidr {
    /// The form [`ClusterCidr::parse`] reads back: IPv4 first, comma-separated.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.ranges().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<(), UnsafeRange> {
        check_pod_range(s.parse().unwrap())
    }

    #[test]
    fn ordinary_pod_ranges_pass() {
        for ok in [
            "10.244.0.0/16",
            "10.0.0.0/8",
            "192.168.0.0/24",
            "100.64.0.0/10",
            "172.16.0.0/12",
            "240.0.0.0/8",
            "10.244.3.0/30",
            "fd00:10:244::/56",
            "2001:db8::/32",
            "fd00::/16",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn ranges_with_a_fixed_meaning_are_refused() {
        for (bad, what) in [
            ("169.254.1.0/24", "link-local"),
            ("169.254.0.0/16", "link-local"),
            ("169.0.0.0/8", "link-local"),
            ("127.0.0.0/24", "loopback"),
            ("127.0.0.0/8", "loopback"),
            ("0.0.0.0/24", "unspecified"),
            ("0.0.0.0/8", "unspecified"),
            ("224.0.0.0/24", "multicast"),
            ("239.255.0.0/16", "multicast"),
            ("fe80::/64", "link-local"),
            ("fe80::/16", "link-local"),
            ("ff02::/16", "multicast"),
            ("::/120", "unspecified"),
            ("::ffff:10.0.0.0/120", "IPv4-mapped"),
        ] {
            let e = check(bad).unwrap_err();
            assert!(matches!(e, UnsafeRange::Reserved { .. }), "{bad}: {e}");
            assert!(e.to_string().contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn ranges_broader_than_a_slash_eight_are_refused() {
        for bad in ["0.0.0.0/0", "10.0.0.0/7", "128.0.0.0/1", "::/0", "fd00::/8"] {
            let e = check(bad).unwrap_err();
            assert!(matches!(e, UnsafeRange::TooBroad { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("too broad"), "{bad}: {e}");
        }
        assert_eq!(check("11.0.0.0/8"), Ok(()));
    }

    #[test]
    fn a_node_subnet_lies_inside_the_cluster_range() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        assert_eq!(
            check_node_subnet(n("10.244.0.0/16"), n("10.244.3.0/24")),
            Ok(())
        );
        assert_eq!(
            check_node_subnet(n("10.244.0.0/16"), n("10.244.0.0/16")),
            Ok(())
        );
        let e = check_node_subnet(n("10.244.0.0/16"), n("10.245.3.0/24")).unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        let e = check_node_subnet(n("10.244.0.0/24"), n("10.244.0.0/16")).unwrap_err();
        assert!(matches!(e, UnsafeRange::Outside { .. }), "{e}");
        // The subnet's own check comes first: an unsafe subnet is named for what it is.
        let e = check_node_subnet(n("10.244.0.0/16"), n("169.254.1.0/24")).unwrap_err();
        assert!(e.to_string().contains("link-local"), "{e}");
        // Host bits do not matter (flannel writes the gateway form, 10.244.3.1/24).
        assert_eq!(
            check_node_subnet(n("10.244.0.1/16"), n("10.244.3.1/24")),
            Ok(())
        );
    }

    #[test]
    fn cluster_cidr_takes_one_of_each_family() {
        let c = ClusterCidr::parse("10.244.0.0/16").unwrap();
        assert_eq!(c, ClusterCidr::ipv4_only("10.244.0.0/16".parse().unwrap()));
        assert!(!c.is_dual());
        let c = ClusterCidr::parse("fd00:10:244::/56").unwrap();
        assert_eq!(
            (c.v4, c.v6),
            (None, Some("fd00:10:244::/56".parse().unwrap()))
        );
        // Either order, spaces around the comma, as kube-controller-manager takes it.
        for text in [
            "10.244.0.0/16,fd00:10:244::/56",
            " fd00:10:244::/56 , 10.244.0.0/16 ",
        ] {
            let c = ClusterCidr::parse(text).unwrap();
            assert!(c.is_dual(), "{text}");
            assert_eq!(c.v4, Some("10.244.0.0/16".parse().unwrap()));
            assert_eq!(c.v6, Some("fd00:10:244::/56".parse().unwrap()));
            assert_eq!(c.to_string(), "10.244.0.0/16,fd00:10:244::/56");
            assert_eq!(ClusterCidr::parse(&c.to_string()), Ok(c));
        }
    }

    #[test]
    fn cluster_cidr_refusals_say_why() {
        let e = |text: &str| ClusterCidr::parse(text).unwrap_err();
        assert_eq!(e(""), ClusterCidrError::Empty);
        assert_eq!(e(" , "), ClusterCidrError::Empty);
        assert!(matches!(
            e("10.1.0.0/16,10.2.0.0/16"),
            ClusterCidrError::SameFamily { family: 4, .. }
        ));
        let two6 = e("fd00:1::/48,fd00:2::/48");
        assert!(matches!(
            two6,
            ClusterCidrError::SameFamily { family: 6, .. }
        ));
        assert!(
            two6.to_string().contains("at most one of each family"),
            "{two6}"
        );
        assert!(matches!(
            e("10.1.0.0/16,fd00::/48,10.2.0.0/16"),
            ClusterCidrError::TooMany { count: 3 }
        ));
        assert!(matches!(
            e("10.244.0.0/16,"),
            ClusterCidrError::NotCidr { .. }
        ));
        assert!(matches!(e("10.244.0.0"), ClusterCidrError::NotCidr { .. }));
        assert!(matches!(e("fd00::1/64"), ClusterCidrError::HostBits { .. }));
        let host = e("10.244.1.0/16");
        assert!(host.to_string().contains("10.244.0.0/16"), "{host}");
        assert!(matches!(
            e("fe80::/64"),
            ClusterCidrError::Unsafe(UnsafeRange::Reserved { .. })
        ));
        assert!(matches!(
            e("10.244.0.0/16,fd00::/8"),
            ClusterCidrError::Unsafe(UnsafeRange::TooBroad { .. })
        ));
    }
}
