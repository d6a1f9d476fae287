//! `policy-log-drops`: with [`PolicyIr::log_drops`](crate::PolicyIr) set, each rule that drops
//! for policy first hands the packet to NFLOG group [`NFLOG_GROUP`], rate-limited in the kernel
//! per pod and direction ([`RATE_PER_SECOND`], [`BURST`]), with a prefix that names the
//! direction, the stage that dropped (a ClusterNetworkPolicy tier or NetworkPolicy) and the pod's
//! veth ([`prefix`]). The agent reads the group and names the pod and the policies of that stage;
//! this module is the shared, pure part: the prefix both renderers write and the reader parses,
//! and the reading of a logged packet of either family ([`parse_packet`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

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
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The upper-layer protocol (IPv4's protocol byte; for IPv6 the next header after the
    /// extension headers); `None` when the copy ends, or the bound runs out, before it.
    pub protocol: Option<u8>,
    /// Ports of TCP, UDP and SCTP (the first four bytes of each), when the copy holds them.
    pub ports: Option<(u16, u16)>,
}

/// The most IPv6 extension headers [`parse_packet`] walks before it gives up on the protocol.
pub const MAX_EXTENSION_HEADERS: usize = 8;

const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMPV6: u8 = 58;

/// Reads the IP header (either family, by its version) of a logged packet and the ports
/// after it; `None` when the bytes are neither an IPv4 nor an IPv6 packet.
pub fn parse_packet(packet: &[u8]) -> Option<PacketSummary> {
    match *packet.first()? >> 4 {
        4 => parse_ipv4(packet),
        6 => parse_ipv6(packet),
        _ => None,
    }
}

/// The source and destination ports at `at`, for a protocol that has them.
fn ports_at(packet: &[u8], protocol: u8, at: usize) -> Option<(u16, u16)> {
    if !matches!(protocol, TCP | UDP | SCTP) {
        return None;
    }
    let p = packet.get(at..at.checked_add(4)?)?;
    Some((
        u16::from_be_bytes([p[0], p[1]]),
        u16::from_be_bytes([p[2], p[3]]),
    ))
}

/// Reads the IPv4 header (and the ports after it) of a logged packet; `None` when the bytes
/// are not an IPv4 packet.
pub fn parse_ipv4(packet: &[u8]) -> Option<PacketSummary> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header: &[u8; 20] = packet.get(..20)?.try_into().ok()?;
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < 20 {
        return None;
    }
    let protocol = header[9];
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let ports = if fragment_offset == 0 {
        ports_at(packet, protocol, header_len)
    } else {
        None
    };
    let addr =
        |at: usize| Ipv4Addr::new(header[at], header[at + 1], header[at + 2], header[at + 3]);
    Some(PacketSummary {
        src: addr(12).into(),
        dst: addr(16).into(),
        protocol: Some(protocol),
        ports,
    })
}

/// Reads the IPv6 header of a logged packet, walks at most [`MAX_EXTENSION_HEADERS`]
/// extension headers to the upper-layer protocol, and reads the ports after it; `None` when
/// the bytes are not an IPv6 packet (no 40-byte header of version 6).
pub fn parse_ipv6(packet: &[u8]) -> Option<PacketSummary> {
    let header: &[u8; 40] = packet.get(..40)?.try_into().ok()?;
    if header[0] >> 4 != 6 {
        return None;
    }
    let addr = |at: usize| -> Ipv6Addr {
        let mut b = [0u8; 16];
        b.copy_from_slice(&header[at..at + 16]);
        Ipv6Addr::from(b)
    };
    let (protocol, ports) = match upper_layer(packet, header[6], 40) {
        Some((protocol, Some(at))) => (Some(protocol), ports_at(packet, protocol, at)),
        Some((protocol, None)) => (Some(protocol), None),
        None => (None, None),
    };
    Some(PacketSummary {
        src: addr(8).into(),
        dst: addr(24).into(),
        protocol,
        ports,
    })
}

// IPv6 extension headers: hop-by-hop, routing, destination options, mobility, HIP and shim6
// count their length in 8-octet units after the first 8, the authentication header in 4-octet
// units less 2; a fragment header is 8 octets.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTHENTICATION: u8 = 51;
const DESTINATION: u8 = 60;
const MOBILITY: u8 = 135;
const HIP: u8 = 139;
const SHIM6: u8 = 140;

fn is_extension(next: u8) -> bool {
    matches!(
        next,
        HOP_BY_HOP | ROUTING | FRAGMENT | AUTHENTICATION | DESTINATION | MOBILITY | HIP | SHIM6
    )
}

/// From the next-header value `next` of the header ending at `at`: the upper-layer protocol
/// and where its header starts (`None` for a later fragment, whose bytes there are not that
/// header). `None` when an extension header is cut short, or there are more than
/// [`MAX_EXTENSION_HEADERS`] (each is at least 8 bytes, so the walk is bounded by the copy
/// too).
fn upper_layer(packet: &[u8], mut next: u8, mut at: usize) -> Option<(u8, Option<usize>)> {
    for _ in 0..MAX_EXTENSION_HEADERS {
        let len = match next {
            HOP_BY_HOP | ROUTING | DESTINATION | MOBILITY | HIP | SHIM6 => {
                (usize::from(*packet.get(at + 1)?) + 1) * 8
            }
            AUTHENTICATION => (usize::from(*packet.get(at + 1)?) + 2) * 4,
            FRAGMENT => {
                let f = packet.get(at..at + 8)?;
                if u16::from_be_bytes([f[2], f[3]]) & 0xfff8 != 0 {
                    // A later fragment: what follows is the middle of the packet. Its next
                    // header is the protocol unless it is another extension header.
                    return (!is_extension(f[0])).then_some((f[0], None));
                }
                8
            }
            // No next header, ESP (opaque) and every upper-layer protocol end the walk.
            _ => return Some((next, Some(at))),
        };
        next = *packet.get(at)?;
        at = at.checked_add(len)?;
    }
    // The bound is spent: what follows is the protocol only if it is not one more.
    (!is_extension(next)).then_some((next, Some(at)))
}

/// The protocol's name for logs (`""` when the packet did not say).
pub fn protocol_name(number: Option<u8>) -> String {
    match number {
        None => String::new(),
        Some(1) => "icmp".into(),
        Some(TCP) => "tcp".into(),
        Some(UDP) => "udp".into(),
        Some(ICMPV6) => "icmpv6".into(),
        Some(SCTP) => "sctp".into(),
        Some(n) => n.to_string(),
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
        let s = parse_packet(&p).unwrap();
        assert_eq!(s.src, IpAddr::from([10, 244, 1, 2]));
        assert_eq!(s.dst, IpAddr::from([10, 244, 2, 3]));
        assert_eq!(s.protocol, Some(6));
        assert_eq!(s.ports, Some((40000, 80)));
        assert_eq!(parse_ipv4(&p), Some(s));
        // Cut short: no ports, still the addresses.
        assert_eq!(parse_packet(&p[..20]).unwrap().ports, None);
        assert_eq!(parse_packet(&p[..22]).unwrap().ports, None);
        // A later fragment has no ports.
        let mut frag = p.clone();
        frag[7] = 1;
        assert_eq!(parse_packet(&frag).unwrap().ports, None);
        // Options (a 24-byte header): the ports are after them.
        let mut opts = p[..20].to_vec();
        opts[0] = 0x46;
        opts.extend_from_slice(&[1, 1, 1, 0, 0x9c, 0x41, 0, 81]);
        assert_eq!(parse_packet(&opts).unwrap().ports, Some((40001, 81)));
    }

    #[test]
    fn what_is_not_ipv4_is_refused() {
        assert_eq!(parse_ipv4(&[]), None);
        assert_eq!(parse_ipv4(&[0x60; 40]), None);
        assert_eq!(parse_ipv4(&[0x45; 12]), None);
        assert_eq!(parse_ipv4(&[0x44; 40]), None);
        assert_eq!(parse_ipv6(&[0x45; 40]), None);
        assert_eq!(parse_ipv6(&[0x60; 39]), None);
        assert_eq!(parse_packet(&[]), None);
        assert_eq!(parse_packet(&[0x00; 40]), None);
        assert_eq!(parse_packet(&[0xff; 64]), None);
        assert_eq!(parse_packet(&[0x55; 64]), None);
    }

    const SRC6: &str = "fd00:10:244:1::2";
    const DST6: &str = "fd00:10:244:2::3";

    /// An IPv6 packet from [`SRC6`] to [`DST6`]: the fixed header naming `next`, then `rest`
    /// (extension headers and the upper-layer header).
    fn v6(next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&u16::try_from(rest.len()).unwrap().to_be_bytes());
        p.extend_from_slice(&[next, 64]);
        p.extend_from_slice(&SRC6.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&DST6.parse::<Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(rest);
        p
    }

    /// The first 8 bytes of a TCP or UDP header from port 40000 to 80.
    const L4: [u8; 8] = [0x9c, 0x40, 0, 80, 0, 0, 0, 0];

    fn summary(protocol: Option<u8>, ports: Option<(u16, u16)>) -> Option<PacketSummary> {
        Some(PacketSummary {
            src: SRC6.parse().unwrap(),
            dst: DST6.parse().unwrap(),
            protocol,
            ports,
        })
    }

    #[test]
    fn ipv6_tcp_udp_and_icmpv6_are_read() {
        assert_eq!(
            parse_packet(&v6(6, &L4)),
            summary(Some(6), Some((40000, 80)))
        );
        assert_eq!(parse_ipv6(&v6(6, &L4)), parse_packet(&v6(6, &L4)));
        assert_eq!(
            parse_packet(&v6(17, &L4)),
            summary(Some(17), Some((40000, 80)))
        );
        assert_eq!(
            parse_packet(&v6(132, &L4)),
            summary(Some(132), Some((40000, 80)))
        );
        // An echo request: ICMPv6 has no ports.
        let echo = v6(58, &[128, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(parse_packet(&echo), summary(Some(58), None));
        assert_eq!(protocol_name(Some(58)), "icmpv6");
        // No next header.
        assert_eq!(parse_packet(&v6(59, &[])), summary(Some(59), None));
        // ESP is opaque: its bytes are not ports.
        assert_eq!(parse_packet(&v6(50, &L4)), summary(Some(50), None));
        // The header alone: the protocol, no ports.
        assert_eq!(parse_packet(&v6(6, &[])), summary(Some(6), None));
    }

    #[test]
    fn ipv6_extension_headers_are_walked_to_the_protocol() {
        // Hop-by-hop (8 bytes: next TCP, length 0, a PadN option) then TCP.
        let mut hbh = vec![6, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&L4);
        assert_eq!(
            parse_packet(&v6(0, &hbh)),
            summary(Some(6), Some((40000, 80)))
        );
        // A first fragment (offset 0, more fragments) of UDP: its ports are there.
        let mut first = vec![17, 0, 0, 1, 0, 0, 0, 7];
        first.extend_from_slice(&L4);
        assert_eq!(
            parse_packet(&v6(44, &first)),
            summary(Some(17), Some((40000, 80)))
        );
        // A later fragment (offset 185 × 8): UDP, but the bytes after it are not its header.
        let mut later = vec![17, 0, 0x05, 0xc8, 0, 0, 0, 7];
        later.extend_from_slice(&L4);
        assert_eq!(parse_packet(&v6(44, &later)), summary(Some(17), None));
        // A later fragment whose next header is another extension header: the protocol is
        // not in this packet.
        later[0] = 60;
        assert_eq!(parse_packet(&v6(44, &later)), summary(None, None));
        // Hop-by-hop, destination options (16 bytes), routing, fragment, AH (16 bytes), TCP.
        let mut chain = vec![60, 0, 1, 4, 0, 0, 0, 0];
        chain.extend_from_slice(&[43, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        chain.extend_from_slice(&[44, 0, 0, 0, 0, 0, 0, 0]);
        chain.extend_from_slice(&[51, 0, 0, 0, 0, 0, 0, 1]);
        chain.extend_from_slice(&[6, 2, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0]);
        chain.extend_from_slice(&L4);
        assert_eq!(
            parse_packet(&v6(0, &chain)),
            summary(Some(6), Some((40000, 80)))
        );
        // More extension headers than the bound: no protocol rather than a wrong one.
        let headers = |n: usize| {
            let mut p = Vec::new();
            for i in 0..n {
                let next = if i + 1 == n { 6 } else { 60 };
                p.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
            }
            p.extend_from_slice(&L4);
            v6(60, &p)
        };
        assert_eq!(
            parse_packet(&headers(MAX_EXTENSION_HEADERS)),
            summary(Some(6), Some((40000, 80)))
        );
        assert_eq!(
            parse_packet(&headers(MAX_EXTENSION_HEADERS + 1)),
            summary(None, None)
        );
    }

    #[test]
    fn a_cut_ipv6_packet_gives_only_what_it_holds() {
        let mut hbh = vec![6, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&L4);
        let p = v6(0, &hbh);
        for len in 0..=p.len() {
            let got = parse_packet(&p[..len]);
            let want = match len {
                0..40 => None,
                // Cut before the hop-by-hop header's next header and length: not known.
                40..42 => summary(None, None),
                // Those two read, the protocol is known; the ports are not there yet.
                42..52 => summary(Some(6), None),
                _ => summary(Some(6), Some((40000, 80))),
            };
            assert_eq!(got, want, "cut at {len}");
        }
        // A hop-by-hop header claiming 2 KiB in a short copy: it names TCP, whose ports are
        // past the copy (the bytes inside the header are not read as ports).
        let long = v6(0, &[6, 255, 1, 4, 0, 0, 0, 0, 0x9c, 0x40, 0, 80]);
        assert_eq!(parse_packet(&long), summary(Some(6), None));
        // An AH claiming more than the copy, before another extension header: no protocol.
        let ah = v6(51, &[60, 200, 0, 0, 0, 0, 0, 1, 0x9c, 0x40, 0, 80]);
        assert_eq!(parse_packet(&ah), summary(None, None));
    }

    #[test]
    fn garbage_never_panics_and_never_reads_past_the_copy() {
        // A fixed pseudo-random sequence (xorshift), as version 4, 6 and anything else.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for round in 0..20_000u32 {
            let len = usize::try_from(round % 130).unwrap();
            let mut p: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()[0]
                })
                .collect();
            if let Some(first) = p.first_mut() {
                *first = match round % 3 {
                    0 => 0x40 | (*first & 0x0f),
                    1 => 0x60 | (*first & 0x0f),
                    _ => *first,
                };
            }
            if let Some(s) = parse_packet(&p) {
                match s.src {
                    IpAddr::V4(_) => assert!(len >= 20),
                    IpAddr::V6(_) => assert!(len >= 40),
                }
                if s.ports.is_some() {
                    assert!(matches!(s.protocol, Some(6 | 17 | 132)));
                }
            }
        }
    }
}
