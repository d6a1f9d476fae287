//! How a pod is wired, decided as plain data: routed veth, Calico-style. The pod holds its address
//! as a /32 and a default route through a link-local gateway that the host side of its veth
//! answers for; the host routes the /32 to that veth. No bridge. On a node with IPv6 the pod
//! holds an IPv6 /128 with `::/0` via [`GATEWAY_V6`], the host veth's own link-local address,
//! and the host routes the /128 to that veth the same way: beside the IPv4 /32 on a dual-stack
//! node, alone (no IPv4 address) on an IPv6-only one.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::LINK_PREFIX;

/// The pod's next hop. Link-local, so it is the same on every node and never collides with a
/// pod or node address.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Every host-side veth has this MAC, so the pod's static neighbour entry for [`GATEWAY`] is the
/// same everywhere and survives the host side being re-created.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// The pod's IPv6 next hop: the EUI-64 link-local address of [`HOST_VETH_MAC`]
/// (`fe80::ecee:eeff:feee:eeee`), which the kernel gives every host-side veth by itself, so it is
/// the same on every node and on every veth, like [`GATEWAY`]. The pod holds its IPv6 address as
/// a /128 with `::/0` via this on its veth.
pub const GATEWAY_V6: Ipv6Addr = eui64_link_local(HOST_VETH_MAC);

/// The link-local address the kernel derives from `mac` (RFC 4291 appendix A: ff:fe in the
/// middle, the universal/local bit flipped).
pub const fn eui64_link_local(mac: [u8; 6]) -> Ipv6Addr {
    let [a, b, c, d, e, f] = mac;
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([a ^ 0x02, b]),
        u16::from_be_bytes([c, 0xff]),
        u16::from_be_bytes([0xfe, d]),
        u16::from_be_bytes([e, f]),
    )
}

/// Length of the hash part of a host-side veth name: `sl` + 13 hex digits = 15, the kernel's limit.
const HASH_DIGITS: usize = 13;

/// The host-side veth of the attachment (`container_id`, `ifname`). The interface name is part
/// of the hash so that two attachments of one container get two links.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let hash = fnv1a64(
        container_id
            .as_bytes()
            .iter()
            .chain(b"/")
            .chain(ifname.as_bytes()),
    );
    format!(
        "{LINK_PREFIX}{:0width$x}",
        hash >> (64 - 4 * HASH_DIGITS),
        width = HASH_DIGITS
    )
}

/// Whether `name` has the shape of a host-side pod veth made by sluice.
pub fn is_host_ifname(name: &str) -> bool {
    name.len() == LINK_PREFIX.len() + HASH_DIGITS
        && name.starts_with(LINK_PREFIX)
        && name[LINK_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// FNV-1a: tiny, stable across releases and platforms (names outlive the binary that made them).
fn fnv1a64<'a>(bytes: impl Iterator<Item = &'a u8>) -> u64 {
    bytes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Everything the kernel applier needs to wire one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodPlan {
    pub host_ifname: String,
    pub pod_ifname: String,
    /// The pod's IPv4 address, on a node that holds an IPv4 subnet (not an IPv6-only one).
    pub address: Option<Ipv4Addr>,
    /// The pod's IPv6 address, on a node that holds an IPv6 subnet.
    pub address_v6: Option<Ipv6Addr>,
    pub mtu: u32,
}

impl PodPlan {
    /// A pod with an IPv4 address (or none, on an IPv6-only node: see [`PodPlan::with_v6`]).
    pub fn new(container_id: &str, ifname: &str, address: Option<Ipv4Addr>, mtu: u32) -> Self {
        Self {
            host_ifname: host_ifname(container_id, ifname),
            pod_ifname: ifname.to_string(),
            address,
            address_v6: None,
            mtu,
        }
    }

    /// The plan with the pod's IPv6 address too (dual-stack), or without one (`None`).
    pub fn with_v6(self, address_v6: Option<Ipv6Addr>) -> Self {
        Self { address_v6, ..self }
    }
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_fit_the_kernel_and_differ_per_attachment() {
        let a = host_ifname("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("sl"));
        assert!(is_host_ifname(&a));
        assert_eq!(
            a,
            host_ifname("0123456789abcdef0123456789abcdef", "eth0"),
            "stable"
        );
        assert_ne!(a, host_ifname("0123456789abcdef0123456789abcdef", "net1"));
        assert_ne!(a, host_ifname("0123456789abcdef0123456789abcdeg", "eth0"));
        // The hash is pinned: names outlive binaries, so changing it would orphan every pod's link.
        assert_eq!(host_ifname("abc", "eth0"), "sl561a69de51a68");
    }

    #[test]
    fn recognises_only_its_own_shape() {
        assert!(!is_host_ifname("sluice.vxlan"));
        assert!(!is_host_ifname("sl0123"));
        assert!(!is_host_ifname("slXYZ4567890abc"));
        assert!(!is_host_ifname("eth0"));
    }

    #[test]
    fn the_ipv6_gateway_is_the_host_veths_own_link_local_address() {
        assert_eq!(GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
        assert!(GATEWAY_V6.is_unicast_link_local());
        // The kernel's example, RFC 4291 appendix A / what `ip -6 addr` shows for 02:11:22:33:44:55.
        assert_eq!(
            eui64_link_local([0x02, 0x11, 0x22, 0x33, 0x44, 0x55]).to_string(),
            "fe80::11:22ff:fe33:4455"
        );
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&HOST_VETH_MAC), "ee:ee:ee:ee:ee:ee");
    }
}
