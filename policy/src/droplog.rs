//! `policy-log-drops`: with [`PolicyIr::log_drops`](crate::PolicyIr) set, each rule that drops
//! for policy first hands the packet to NFLOG group [`NFLOG_GROUP`], rate-limited in the kernel
//! per pod and direction ([`RATE_PER_SECOND`], [`BURST`]), with a prefix that names the
//! direction, the stage that dropped (a ClusterNetworkPolicy tier or NetworkPolicy) and the pod's
//! veth ([`prefix`]). The agent reads the group and names the pod and the policies of that stage;
//! this module is the shared, pure part: the prefix both renderers write and the reader parses,
//! and the reading of a logged IPv4 packet.

use std::net::Ipv4Addr;

/// The NFLOG group sluice's drop rules log to (DESIGN.md's route protocol, 77, again).
pub const NFLOG_GROUP: u16 = 77;
/// Logged drops per pod and direction, per second, after the burst.
pub const RATE_PER_SECOND: u32 = 10;
pub const BURST: u32 = 20;
const PREFIX: &str = "sluice-drop:";
/// The veth part of the prefix of a drop at an interface the IR does not know (fail closed).
const UNKNOWN: &str = "-";

/// Which policy direction dropped the packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropDirection {
    /// Traffic to the pod.
    Ingress,
    /// Traffic from the pod.
    Egress,
}

impl DropDirection {
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// Which stage of the pod's verdict dropped the packet, in the order they decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropStage {
    /// A ClusterNetworkPolicy of the `Admin` tier (`Deny`).
    Admin,
    /// The NetworkPolicies isolating the pod (no rule allowed it), or an unknown pod (fail
    /// closed).
    NetworkPolicy,
    /// A ClusterNetworkPolicy of the `Baseline` tier (`Deny`).
    Baseline,
}

impl DropStage {
    /// The name logs give the stage (the API's tier names, and NetworkPolicy's kind).
    pub fn name(self) -> &'static str {
        match self {
            Self::Admin => "Admin",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::Baseline => "Baseline",
        }
    }

    /// The stage's letter after the direction's in a prefix; none for NetworkPolicy, so a
    /// NetworkPolicy drop's prefix reads as it did before the tiers existed.
    fn tag(self) -> &'static str {
        match self {
            Self::Admin => "A",
            Self::NetworkPolicy => "",
            Self::Baseline => "B",
        }
    }
}

/// The log prefix of a drop in `direction` by `stage` at `ifname` (`None`: an unknown pod
/// veth). At most 31 bytes, inside the 63 iptables' `--nflog-prefix` and the 127 nft allow.
pub fn prefix(direction: DropDirection, stage: DropStage, ifname: Option<&str>) -> String {
    let d = match direction {
        DropDirection::Ingress => 'i',
        DropDirection::Egress => 'e',
    };
    format!("{PREFIX}{d}{}:{}", stage.tag(), ifname.unwrap_or(UNKNOWN))
}

/// The direction, stage and veth of a prefix [`prefix`] made; `None` for anybody else's.
pub fn parse_prefix(text: &str) -> Option<(DropDirection, DropStage, Option<&str>)> {
    let rest = text.strip_prefix(PREFIX)?;
    let (d, ifname) = rest.split_once(':')?;
    let mut letters = d.chars();
    let direction = match letters.next()? {
        'i' => DropDirection::Ingress,
        'e' => DropDirection::Egress,
        _ => return None,
    };
    let stage = match letters.as_str() {
        "" => DropStage::NetworkPolicy,
        "A" => DropStage::Admin,
        "B" => DropStage::Baseline,
        _ => return None,
    };
    let ifname = (ifname != UNKNOWN).then_some(ifname);
    Some((direction, stage, ifname))
}

/// The nft statement that logs before a drop.
pub fn nft_log(direction: DropDirection, stage: DropStage, ifname: Option<&str>) -> String {
    format!(
        "limit rate {RATE_PER_SECOND}/second burst {BURST} packets log prefix \"{}\" group {NFLOG_GROUP}",
        prefix(direction, stage, ifname)
    )
}

/// The iptables match and target that log before a drop (no `-A CHAIN`).
pub fn iptables_log(direction: DropDirection, stage: DropStage, ifname: Option<&str>) -> String {
    format!(
        "-m limit --limit {RATE_PER_SECOND}/second --limit-burst {BURST} -j NFLOG --nflog-group {NFLOG_GROUP} --nflog-prefix {}",
        prefix(direction, stage, ifname)
    )
}

/// What a logged packet says about its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketSummary {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    /// Ports of TCP, UDP and SCTP (the first four bytes of each), when the copy holds them.
    pub ports: Option<(u16, u16)>,
}

/// Reads the IPv4 header (and the ports after it) of a logged packet; `None` when the bytes
/// are not an IPv4 packet.
pub fn parse_ipv4(packet: &[u8]) -> Option<PacketSummary> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 || packet.len() < 20 {
        return None;
    }
    let addr = |at: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = packet.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    let protocol = packet[9];
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    let ports = match protocol {
        6 | 17 | 132 if fragment_offset == 0 => packet.get(header_len..header_len + 4).map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        }),
        _ => None,
    };
    Some(PacketSummary {
        src: addr(12)?,
        dst: addr(16)?,
        protocol,
        ports,
    })
}

/// The protocol's name for logs.
pub fn protocol_name(number: u8) -> String {
    match number {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn prefixes_read_back() {
        let p = prefix(
            DropDirection::Ingress,
            DropStage::NetworkPolicy,
            Some("sl0123456789abc"),
        );
        assert_eq!(p, "sluice-drop:i:sl0123456789abc");
        assert_eq!(
            parse_prefix(&p),
            Some((
                DropDirection::Ingress,
                DropStage::NetworkPolicy,
                Some("sl0123456789abc")
            ))
        );
        let u = prefix(DropDirection::Egress, DropStage::NetworkPolicy, None);
        assert_eq!(
            parse_prefix(&u),
            Some((DropDirection::Egress, DropStage::NetworkPolicy, None))
        );
        for (d, stage, text) in [
            (
                DropDirection::Egress,
                DropStage::Admin,
                "sluice-drop:eA:sl0123456789abc",
            ),
            (
                DropDirection::Ingress,
                DropStage::Baseline,
                "sluice-drop:iB:sl0123456789abc",
            ),
        ] {
            let p = prefix(d, stage, Some("sl0123456789abc"));
            assert_eq!(p, text);
            assert!(p.len() <= 31);
            assert_eq!(parse_prefix(&p), Some((d, stage, Some("sl0123456789abc"))));
        }
        assert_eq!(parse_prefix("kube-proxy: drop"), None);
        assert_eq!(parse_prefix("sluice-drop:x:sl1"), None);
        assert_eq!(parse_prefix("sluice-drop:iC:sl1"), None);
        assert_eq!(parse_prefix("sluice-drop::sl1"), None);
        assert_eq!(parse_prefix("sluice-drop:i"), None);
    }

    #[test]
    fn a_tcp_syn_is_read_with_its_ports() {
        // 20-byte IPv4 header, TCP 10.244.1.2:40000 -> 10.244.2.3:80.
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 244, 1, 2, 10, 244, 2, 3,
        ];
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&80u16.to_be_bytes());
        let s = parse_ipv4(&p).unwrap();
        assert_eq!(s.src, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(s.dst, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!(s.protocol, 6);
        assert_eq!(s.ports, Some((40000, 80)));
        // Cut short: no ports, still the addresses.
        assert_eq!(parse_ipv4(&p[..20]).unwrap().ports, None);
        // A later fragment has no ports.
        let mut frag = p.clone();
        frag[7] = 1;
        assert_eq!(parse_ipv4(&frag).unwrap().ports, None);
    }

    #[test]
    fn what_is_not_ipv4_is_refused() {
        assert_eq!(parse_ipv4(&[]), None);
        assert_eq!(parse_ipv4(&[0x60; 40]), None);
        assert_eq!(parse_ipv4(&[0x45; 12]), None);
        assert_eq!(parse_ipv4(&[0x44; 40]), None);
    }
}
