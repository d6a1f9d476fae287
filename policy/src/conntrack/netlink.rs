//! Deleting conntrack entries by their exact original tuple over ctnetlink
//! (`IPCTNL_MSG_CT_DELETE` with `CTA_TUPLE_ORIG`): one hash lookup in the kernel per flow,
//! where every `conntrack -D` first dumps the whole table (the host's hash, all namespaces':
//! some 15 ms at 262144 buckets, and CPU the kernel spends while the machine is loaded).
//! Only flows with ports have a tuple sluice knows in full; the others (ICMP) stay with the
//! binary.

use super::Flow;
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use std::io;
use std::net::IpAddr;

/// Replies read at most per request (the ack comes first; anything else is skipped).
const MAX_READS: usize = 8;

/// Whether sluice knows `flow`'s whole original tuple: TCP, UDP or SCTP with both ports, one
/// family, the default zone (a request without `CTA_ZONE` finds only zone 0's entries; ICMP's
/// tuple holds an id sluice does not read).
pub fn has_exact_tuple(flow: &Flow) -> bool {
    matches!(flow.proto, 6 | 17 | 132)
        && flow.sport.is_some()
        && flow.dport.is_some()
        && flow.src.is_ipv4() == flow.dst.is_ipv4()
        && flow.zone == 0
}

/// The request deleting exactly `flow` (sequence number `seq`); `None` unless
/// [`has_exact_tuple`].
pub fn delete_request(flow: &Flow, seq: u32) -> Option<Vec<u8>> {
    if !has_exact_tuple(flow) {
        return None;
    }
    let (sport, dport) = (flow.sport?, flow.dport?);
    let family = match flow.src {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::Delete(vec![ConntrackAttribute::CtaTupleOrig(vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(flow.src),
                    IPTuple::DestinationAddress(flow.dst),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::from(flow.proto)),
                    ProtoTuple::SourcePort(sport),
                    ProtoTuple::DestinationPort(dport),
                ]),
            ])]),
        )),
    );
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    Some(buf)
}

/// A delete that stopped part way: how many were deleted before, and from which of the
/// flows on nothing was done.
#[derive(Debug)]
pub struct Stopped {
    pub deleted: usize,
    pub failed_from: usize,
    pub error: io::Error,
}

impl Stopped {
    fn at_start(error: io::Error) -> Self {
        Self {
            deleted: 0,
            failed_from: 0,
            error,
        }
    }
}

/// Deletes each of `flows` (those [`delete_request`] has a request for) in `netns` (the
/// caller's when `None`); how many were deleted (one that ended meanwhile is not counted).
pub fn delete_flows(netns: Option<&str>, flows: &[&Flow]) -> Result<usize, Stopped> {
    match netns {
        None => delete_here(flows),
        Some(name) => {
            let path = std::path::Path::new("/run/netns").join(name);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let file = std::fs::File::open(&path).map_err(Stopped::at_start)?;
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(|e| Stopped::at_start(e.into()))?;
                    delete_here(flows)
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(Stopped::at_start(io::Error::other(
                        "the netns thread panicked",
                    )))
                })
            })
        }
    }
}

fn delete_here(flows: &[&Flow]) -> Result<usize, Stopped> {
    let socket = (|| {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        io::Result::Ok(socket)
    })()
    .map_err(Stopped::at_start)?;
    let mut deleted = 0;
    for (at, flow) in flows.iter().enumerate() {
        let seq = u32::try_from(at + 1).unwrap_or(u32::MAX);
        let Some(request) = delete_request(flow, seq) else {
            continue;
        };
        let code = socket
            .send(&request, 0)
            .and_then(|_| ack(&socket, seq))
            .map_err(|error| Stopped {
                deleted,
                failed_from: at,
                error,
            })?;
        match code {
            0 => deleted += 1,
            nix::libc::ENOENT => {}
            code => {
                return Err(Stopped {
                    deleted,
                    failed_from: at,
                    error: io::Error::from_raw_os_error(code),
                })
            }
        }
    }
    Ok(deleted)
}

/// The error code of the ack to request `seq` (0: done).
fn ack(socket: &Socket, seq: u32) -> io::Result<i32> {
    for _ in 0..MAX_READS {
        let (data, _) = socket.recv_from_full()?;
        let mut at = 0;
        while at < data.len() {
            let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&data[at..])
                .map_err(|e| io::Error::other(e.to_string()))?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(io::Error::other("a netlink message of length 0"));
            }
            at += len;
            if msg.header.sequence_number != seq {
                continue;
            }
            if let NetlinkPayload::Error(e) = msg.payload {
                return Ok(e.code.map_or(0, |c| -c.get()));
            }
            if let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(_),
                ..
            }) = msg.payload
            {
                continue;
            }
        }
    }
    Err(io::Error::other("no ack to a conntrack delete"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn flow(proto: u8, src: &str, dst: &str, ports: Option<(u16, u16)>) -> Flow {
        Flow {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: ports.map(|p| p.0),
            dport: ports.map(|p| p.1),
            reply_src: dst.parse().unwrap(),
            reply_sport: ports.map(|p| p.1),
            zone: 0,
            live: true,
        }
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    #[test]
    fn an_ipv6_tcp_flow_is_deleted_by_its_original_tuple() {
        let f = flow(6, "fd00:10:244:2::5", "fd00:10:244:1::1", Some((40000, 80)));
        let b = delete_request(&f, 7).unwrap();
        // nlmsghdr: length, type (CTNETLINK << 8 | DELETE), flags (request, ack), sequence.
        assert_eq!(
            usize::try_from(u32::from_ne_bytes(b[0..4].try_into().unwrap())).unwrap(),
            b.len()
        );
        assert_eq!(u16_at(&b, 4), (1 << 8) | 2);
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 7);
        // nfgenmsg: AF_INET6, version 0, resource 0.
        assert_eq!(&b[16..20], &[10, 0, 0, 0]);
        // CTA_TUPLE_ORIG { CTA_TUPLE_IP { V6_SRC, V6_DST }, CTA_TUPLE_PROTO { NUM, SRC, DST } }.
        assert_eq!(u16_at(&b, 22) & 0x3fff, 1);
        assert_eq!(u16_at(&b, 26) & 0x3fff, 1);
        assert_eq!((u16_at(&b, 28), u16_at(&b, 30)), (20, 3));
        assert_eq!(
            &b[32..48],
            &"fd00:10:244:2::5"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!((u16_at(&b, 48), u16_at(&b, 50)), (20, 4));
        assert_eq!(
            &b[52..68],
            &"fd00:10:244:1::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(u16_at(&b, 70) & 0x3fff, 2);
        assert_eq!((u16_at(&b, 72), u16_at(&b, 74), b[76]), (5, 1, 6));
        assert_eq!((u16_at(&b, 80), u16_at(&b, 82)), (6, 2));
        assert_eq!(&b[84..86], &40000u16.to_be_bytes());
        assert_eq!((u16_at(&b, 88), u16_at(&b, 90)), (6, 3));
        assert_eq!(&b[92..94], &80u16.to_be_bytes());
        assert_eq!(b.len(), 96);
    }

    #[test]
    fn ipv4_udp_has_a_request_and_what_lacks_ports_has_none() {
        let udp =
            delete_request(&flow(17, "10.244.0.2", "10.244.1.1", Some((5000, 80))), 1).unwrap();
        assert_eq!(&udp[16..18], &[2, 0]);
        assert_eq!(udp.len(), 72);
        assert_eq!(
            delete_request(&flow(1, "10.244.0.2", "10.244.1.1", None), 1),
            None
        );
        assert_eq!(
            delete_request(&flow(6, "10.244.0.2", "10.244.1.1", None), 1),
            None
        );
        assert_eq!(
            delete_request(&flow(47, "10.244.0.2", "10.244.1.1", Some((1, 2))), 1),
            None
        );
        // Families that disagree (no kernel tuple is so): none.
        assert_eq!(
            delete_request(&flow(6, "10.244.0.2", "fd00::1", Some((1, 2))), 1),
            None
        );
    }
}
