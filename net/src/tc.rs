//! Traffic-control messages for pod shaping ([`crate::bandwidth`]), built and read as plain data so
//! that their encoding is unit-tested; [`crate::shaping`] only sends them.
//!
//! netlink-packet-route types the ingress qdisc, the u32 filter and the mirred action; the token
//! bucket filter (`tbf`) it does not, so its options are encoded here by hand from
//! `include/uapi/linux/pkt_sched.h`: `TCA_TBF_PARMS` (`struct tc_tbf_qopt`), `TCA_TBF_BURST` and,
//! for rates of 2^32 bytes/s or more, `TCA_TBF_RATE64`. Netlink structs are in host byte order.

use crate::bandwidth::Tbf;
use netlink_packet_core::{DefaultNla, Emitable, NlasIterator};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcHeader, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};

pub const TBF_KIND: &str = "tbf";
pub const INGRESS_KIND: &str = "ingress";

/// `tc qdisc ... root handle 1: tbf`, the handle the bandwidth plugin gives its tbf.
pub const TBF_HANDLE: TcHandle = TcHandle { major: 1, minor: 0 };
/// The ingress qdisc's handle, `ffff:`; its filters hang off it.
pub const INGRESS_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};
/// Priority (`pref`) of the redirect filter.
pub const REDIRECT_PRIORITY: u16 = 1;
/// `ETH_P_ALL`: the filter sees every protocol. The kernel wants it in network byte order.
const ETH_P_ALL: u16 = 0x0003;

const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
/// `TC_LINKLAYER_ETHERNET`: the kernel computes transmission times itself, no rate table.
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// Length of `struct tc_ratespec`.
const RATESPEC_LEN: usize = 12;
/// Length of `struct tc_tbf_qopt`: two ratespecs, then limit, buffer and mtu (u32 each).
pub const TBF_QOPT_LEN: usize = 2 * RATESPEC_LEN + 12;
/// Nanoseconds per packet-scheduler tick (`PSCHED_SHIFT` = 6 since Linux 2.6.31).
const PSCHED_TICK_NS: u128 = 64;

/// `struct tc_tbf_qopt` for `tbf`: the rate (saturated at `u32::MAX`; [`tbf_options`] adds the
/// full value as `TCA_TBF_RATE64`), no peak rate, the queue limit, and the burst as the time
/// it takes at the rate, in ticks (what `tc` sends; the kernel prefers `TCA_TBF_BURST`).
pub fn tbf_qopt(tbf: &Tbf) -> [u8; TBF_QOPT_LEN] {
    let mut b = [0u8; TBF_QOPT_LEN];
    // rate: cell_log 0, linklayer, overhead/cell_align/mpu 0, rate.
    b[1] = TC_LINKLAYER_ETHERNET;
    let rate32 = u32::try_from(tbf.rate_bytes).unwrap_or(u32::MAX);
    b[8..12].copy_from_slice(&rate32.to_ne_bytes());
    // peakrate: all zero (no peak rate).
    b[24..28].copy_from_slice(&tbf.limit_bytes.to_ne_bytes());
    b[28..32].copy_from_slice(&buffer_ticks(tbf).to_ne_bytes());
    // mtu: 0, it only matters with a peak rate.
    b
}

/// The time the burst lasts at the rate, in scheduler ticks, saturated at `u32::MAX`.
fn buffer_ticks(tbf: &Tbf) -> u32 {
    let ns = u128::from(tbf.burst_bytes) * 1_000_000_000 / u128::from(tbf.rate_bytes.max(1));
    u32::try_from(ns / PSCHED_TICK_NS).unwrap_or(u32::MAX)
}

/// The nested attributes of a tbf's `TCA_OPTIONS`.
pub fn tbf_options(tbf: &Tbf) -> Vec<TcOption> {
    let mut opts = vec![
        TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, tbf_qopt(tbf).to_vec())),
        TcOption::Other(DefaultNla::new(
            TCA_TBF_BURST,
            tbf.burst_bytes.to_ne_bytes().to_vec(),
        )),
    ];
    if tbf.rate_bytes > u64::from(u32::MAX) {
        opts.push(TcOption::Other(DefaultNla::new(
            TCA_TBF_RATE64,
            tbf.rate_bytes.to_ne_bytes().to_vec(),
        )));
    }
    opts
}

fn header(index: u32, parent: TcHandle, handle: TcHandle) -> TcHeader {
    TcHeader {
        index: i32::try_from(index).unwrap_or(i32::MAX),
        parent,
        handle,
        ..Default::default()
    }
}

/// `tc qdisc replace dev INDEX root handle 1: tbf ...`.
pub fn tbf_qdisc(index: u32, tbf: &Tbf) -> TcMessage {
    TcMessage::from_parts(
        header(index, TcHandle::ROOT, TBF_HANDLE),
        vec![
            TcAttribute::Kind(TBF_KIND.to_string()),
            TcAttribute::Options(tbf_options(tbf)),
        ],
    )
}

/// The root qdisc of `index`, to delete it (whatever it is, the device falls back to its default).
pub fn root_qdisc(index: u32) -> TcMessage {
    TcMessage::from_parts(header(index, TcHandle::ROOT, TcHandle::UNSPEC), vec![])
}

/// `tc qdisc add dev INDEX ingress` (`handle ffff: parent ffff:fff1`); also names it to delete.
pub fn ingress_qdisc(index: u32) -> TcMessage {
    TcMessage::from_parts(
        header(index, TcHandle::INGRESS, INGRESS_HANDLE),
        vec![TcAttribute::Kind(INGRESS_KIND.to_string())],
    )
}

/// `tc filter add dev INDEX parent ffff: protocol all prio 1 u32 match u32 0 0 action mirred
/// egress redirect dev TO`: every packet arriving on `index` leaves through `to` instead, which is
/// what the bandwidth plugin installs.
pub fn redirect_filter(index: u32, to: u32) -> TcMessage {
    let mut hdr = header(index, INGRESS_HANDLE, TcHandle::UNSPEC);
    hdr.info = u32::from(TcHandle {
        major: REDIRECT_PRIORITY,
        minor: ETH_P_ALL.to_be(),
    });
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    TcMessage::from_parts(
        hdr,
        vec![
            TcAttribute::Kind(TcFilterU32::KIND.to_string()),
            TcAttribute::Options(vec![
                TcOption::U32(TcFilterU32Option::Selector(selector)),
                TcOption::U32(TcFilterU32Option::Action(vec![action])),
            ]),
        ],
    )
}

/// A dump request for the filters under the ingress qdisc of `index`.
pub fn ingress_filters(index: u32) -> TcMessage {
    TcMessage::from_parts(header(index, INGRESS_HANDLE, TcHandle::UNSPEC), vec![])
}

pub fn kind_of(msg: &TcMessage) -> Option<&str> {
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Kind(k) => Some(k.as_str()),
        _ => None,
    })
}

/// A tbf as the kernel reports it (`RTM_NEWQDISC` dump): its rate and queue limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenTbf {
    pub rate_bytes: u64,
    pub limit_bytes: u32,
}

/// Reads a tbf qdisc message; `None` if it is not a tbf or its options do not parse.
pub fn parse_tbf(msg: &TcMessage) -> Option<SeenTbf> {
    if kind_of(msg) != Some(TBF_KIND) {
        return None;
    }
    // netlink-packet-route keeps the options of a kind it does not know as one raw attribute.
    let raw = msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Other(nla) => {
                let mut value = vec![0u8; netlink_packet_core::Nla::value_len(nla)];
                netlink_packet_core::Nla::emit_value(nla, &mut value);
                Some(value)
            }
            _ => None,
        }),
        _ => None,
    })?;
    let mut qopt = None;
    let mut rate64 = None;
    for nla in NlasIterator::new(&raw) {
        let nla = nla.ok()?;
        let v = nla.value();
        match nla.kind() {
            TCA_TBF_PARMS if v.len() >= TBF_QOPT_LEN => qopt = Some(v[..TBF_QOPT_LEN].to_vec()),
            TCA_TBF_RATE64 if v.len() >= 8 => {
                rate64 = Some(u64::from_ne_bytes(v[..8].try_into().ok()?));
            }
            _ => {}
        }
    }
    let qopt = qopt?;
    let u32_at = |at: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(qopt.get(at..at + 4)?.try_into().ok()?))
    };
    let rate32 = u64::from(u32_at(8)?);
    Some(SeenTbf {
        rate_bytes: rate64.unwrap_or(rate32).max(rate32),
        limit_bytes: u32_at(24)?,
    })
}

/// The device a u32 filter message mirreds (egress redirect) its packets to, if it does.
pub fn redirect_target(msg: &TcMessage) -> Option<u32> {
    if kind_of(msg) != Some(TcFilterU32::KIND) {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::U32(TcFilterU32Option::Action(actions)) => actions.iter().find_map(|act| {
                act.attributes.iter().find_map(|aa| match aa {
                    TcActionAttribute::Options(ao) => ao.iter().find_map(|m| match m {
                        TcActionOption::Mirror(TcActionMirrorOption::Parms(p))
                            if p.eaction == TcMirrorActionType::EgressRedir =>
                        {
                            Some(p.ifindex)
                        }
                        _ => None,
                    }),
                    _ => None,
                })
            }),
            _ => None,
        }),
        _ => None,
    })
}

/// A message's wire bytes (header and attributes), for tests and debugging.
pub fn encode(msg: &TcMessage) -> Vec<u8> {
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Parseable;

    const TBF: Tbf = Tbf {
        rate_bytes: 2_500_000,
        burst_bytes: 20_000,
        limit_bytes: 82_500,
    };

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn qopt_layout_is_struct_tc_tbf_qopt() {
        let q = tbf_qopt(&TBF);
        assert_eq!(q.len(), 36);
        assert_eq!(q[0], 0, "cell_log");
        assert_eq!(q[1], 1, "linklayer ethernet");
        assert_eq!(&q[2..8], &[0; 6], "overhead, cell_align, mpu");
        assert_eq!(u32_at(&q, 8), 2_500_000, "rate");
        assert_eq!(&q[12..24], &[0; 12], "no peak rate");
        assert_eq!(u32_at(&q, 24), 82_500, "limit");
        // 20 000 bytes at 2.5 MB/s last 8 ms = 8 000 000 ns = 125 000 ticks of 64 ns.
        assert_eq!(u32_at(&q, 28), 125_000, "buffer");
        assert_eq!(u32_at(&q, 32), 0, "mtu");
    }

    #[test]
    fn tbf_message_bytes() {
        let b = encode(&tbf_qdisc(7, &TBF));
        // struct tcmsg: family, pad, pad, ifindex, handle, parent, info.
        assert_eq!(&b[0..4], &[0; 4]);
        assert_eq!(u32_at(&b, 4), 7, "ifindex");
        assert_eq!(u32_at(&b, 8), 0x0001_0000, "handle 1:");
        assert_eq!(u32_at(&b, 12), 0xffff_ffff, "parent root");
        assert_eq!(u32_at(&b, 16), 0, "info");
        // TCA_KIND "tbf\0".
        assert_eq!(u16_at(&b, 20), 8);
        assert_eq!(u16_at(&b, 22), 1);
        assert_eq!(&b[24..28], b"tbf\0");
        // TCA_OPTIONS holding TCA_TBF_PARMS (4 + 36) and TCA_TBF_BURST (4 + 4), no RATE64.
        assert_eq!(u16_at(&b, 28), 4 + 40 + 8);
        assert_eq!(u16_at(&b, 30), 2);
        assert_eq!(u16_at(&b, 32), 40);
        assert_eq!(u16_at(&b, 34), TCA_TBF_PARMS);
        assert_eq!(&b[36..72], &tbf_qopt(&TBF));
        assert_eq!(u16_at(&b, 72), 8);
        assert_eq!(u16_at(&b, 74), TCA_TBF_BURST);
        assert_eq!(u32_at(&b, 76), 20_000);
        assert_eq!(b.len(), 80);
    }

    #[test]
    fn rates_past_u32_get_rate64() {
        let fast = Tbf {
            rate_bytes: 5_000_000_000,
            burst_bytes: 1_000_000,
            limit_bytes: u32::MAX,
        };
        let opts = tbf_options(&fast);
        assert_eq!(opts.len(), 3);
        let q = tbf_qopt(&fast);
        assert_eq!(u32_at(&q, 8), u32::MAX, "the 32-bit rate saturates");
        let TcOption::Other(rate64) = &opts[2] else {
            panic!("{opts:?}")
        };
        assert_eq!(netlink_packet_core::Nla::kind(rate64), TCA_TBF_RATE64);
        // Read back as the kernel would dump it.
        let seen = parse_tbf(&roundtrip(&tbf_qdisc(3, &fast))).unwrap();
        assert_eq!(seen.rate_bytes, 5_000_000_000);
        assert_eq!(seen.limit_bytes, u32::MAX);
        assert_eq!(tbf_options(&TBF).len(), 2);
    }

    #[test]
    fn huge_bursts_saturate_the_tick_count() {
        let slow = Tbf {
            rate_bytes: 1,
            burst_bytes: u32::MAX - 1,
            limit_bytes: u32::MAX,
        };
        assert_eq!(u32_at(&tbf_qopt(&slow), 28), u32::MAX);
    }

    fn roundtrip(msg: &TcMessage) -> TcMessage {
        TcMessage::parse(encode(msg).as_slice()).unwrap()
    }

    #[test]
    fn tbf_reads_back() {
        let parsed = roundtrip(&tbf_qdisc(9, &TBF));
        assert_eq!(parsed.header.index, 9);
        assert_eq!(
            parse_tbf(&parsed),
            Some(SeenTbf {
                rate_bytes: 2_500_000,
                limit_bytes: 82_500
            })
        );
        assert_eq!(parse_tbf(&roundtrip(&ingress_qdisc(9))), None);
    }

    #[test]
    fn ingress_qdisc_header() {
        let b = encode(&ingress_qdisc(4));
        assert_eq!(u32_at(&b, 4), 4);
        assert_eq!(u32_at(&b, 8), 0xffff_0000, "handle ffff:");
        assert_eq!(u32_at(&b, 12), 0xffff_fff1, "parent ingress");
        assert_eq!(&b[24..32], b"ingress\0");
    }

    #[test]
    fn redirect_filter_matches_everything_and_mirreds_to_the_ifb() {
        let msg = redirect_filter(4, 11);
        let b = encode(&msg);
        assert_eq!(u32_at(&b, 8), 0, "the kernel picks the handle");
        assert_eq!(u32_at(&b, 12), 0xffff_0000, "parent ffff:");
        // info: priority 1 in the upper half, ETH_P_ALL big-endian in the lower.
        let info = u32_at(&b, 16);
        assert_eq!(info >> 16, 1);
        assert_eq!(((info & 0xffff) as u16).to_ne_bytes(), [0x00, 0x03]);
        let parsed = roundtrip(&msg);
        assert_eq!(kind_of(&parsed), Some("u32"));
        assert_eq!(redirect_target(&parsed), Some(11));
        let Some(TcAttribute::Options(opts)) = parsed
            .attributes
            .iter()
            .find(|a| matches!(a, TcAttribute::Options(_)))
        else {
            panic!("{parsed:?}")
        };
        let sel = opts
            .iter()
            .find_map(|o| match o {
                TcOption::U32(TcFilterU32Option::Selector(s)) => Some(s),
                _ => None,
            })
            .unwrap();
        assert_eq!(sel.flags, TcU32SelectorFlags::Terminal);
        assert_eq!(sel.nkeys, 1);
        assert_eq!(sel.keys, vec![TcU32Key::default()], "mask 0: every packet");
        let act = opts
            .iter()
            .find_map(|o| match o {
                TcOption::U32(TcFilterU32Option::Action(a)) => Some(a),
                _ => None,
            })
            .unwrap();
        assert!(act[0]
            .attributes
            .contains(&TcActionAttribute::Kind(TcActionMirror::KIND.into())));
        let parms = act[0]
            .attributes
            .iter()
            .find_map(|a| match a {
                TcActionAttribute::Options(o) => o.iter().find_map(|m| match m {
                    TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) => Some(p),
                    _ => None,
                }),
                _ => None,
            })
            .unwrap();
        assert_eq!(parms.generic.action, TcActionType::Stolen);
        assert_eq!(parms.eaction, TcMirrorActionType::EgressRedir);
    }

    #[test]
    fn other_filters_redirect_nowhere() {
        let mut m = redirect_filter(4, 11);
        m.attributes[0] = TcAttribute::Kind("flower".into());
        assert_eq!(redirect_target(&m), None);
    }
}
