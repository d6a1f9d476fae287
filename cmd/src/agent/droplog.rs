//! `policy-log-drops`: the reader of the drops sluice's rules log to NFLOG group
//! [`NFLOG_GROUP`] (see [`sluice_policy::droplog`]). Each logged packet becomes one log line
//! naming the pod, the direction, the stage that dropped (`tier`: the ClusterNetworkPolicy tier
//! `Admin` or `Baseline`, or `NetworkPolicy`), the policies of that stage for the pod in that
//! direction, and the flow. The kernel already limits each pod and direction to a few per second; the reader
//! also caps its own output ([`LINES_PER_SECOND`]) and says how many it left out.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, ConfigNla, CopyMode, PacketNla, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use sluice_policy::droplog::{
    parse_packet, parse_prefix, protocol_name, DropDirection, DropStage, PacketSummary, NFLOG_GROUP,
};
use sluice_policy::{Direction, PolicyIr, Region};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Log lines per second, over all pods.
pub const LINES_PER_SECOND: u32 = 50;
/// Bytes of each dropped packet copied to the agent: the IPv4 header (with options) and the
/// ports, or the IPv6 header, a few extension headers and the ports.
const COPY_RANGE: u32 = 128;

/// Who a pod veth is, for the log: the pod and, per direction, the policies of each stage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodNames {
    pub pod: String,
    pub ingress: StageNames,
    pub egress: StageNames,
}

/// The policies of one direction of a pod, per stage: the ClusterNetworkPolicies selecting it
/// in each tier (and which of them denies what), and the NetworkPolicies isolating it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StageNames {
    pub admin: Vec<String>,
    pub admin_denied_by: Vec<(String, Region)>,
    pub network: Vec<String>,
    pub baseline: Vec<String>,
    pub baseline_denied_by: Vec<(String, Region)>,
}

impl StageNames {
    /// `attribute`: keep which policy denies what (only worth its copy while drops are logged).
    fn of(d: &Direction, attribute: bool) -> Self {
        let by = |v: &Vec<(String, Region)>| if attribute { v.clone() } else { Vec::new() };
        StageNames {
            admin: d.admin.policies.clone(),
            admin_denied_by: by(&d.admin.denied_by),
            network: d.policies.clone(),
            baseline: d.baseline.policies.clone(),
            baseline_denied_by: by(&d.baseline.denied_by),
        }
    }

    /// The policies to name for a drop by `stage`: for a tier, the one whose rules deny the
    /// flow (`peer`, protocol, destination port) when the packet says it, else all the tier's.
    fn stage(&self, stage: DropStage, flow: Option<(IpAddr, u8, Option<u16>)>) -> Vec<&str> {
        let (all, denied_by): (&[String], &[(String, Region)]) = match stage {
            DropStage::Admin => (&self.admin, &self.admin_denied_by),
            DropStage::NetworkPolicy => (&self.network, &[]),
            DropStage::Baseline => (&self.baseline, &self.baseline_denied_by),
        };
        let decided = flow.and_then(|(peer, proto, dport)| {
            denied_by
                .iter()
                .find(|(_, region)| region.contains(peer, proto, dport))
        });
        match decided {
            Some((name, _)) => vec![name.as_str()],
            None => all.iter().map(String::as_str).collect(),
        }
    }
}

/// Veth name → who it is; replaced after every policy pass.
pub type Names = Arc<RwLock<HashMap<String, PodNames>>>;

pub fn names_of(ir: &PolicyIr) -> HashMap<String, PodNames> {
    ir.pods
        .iter()
        .map(|p| {
            (
                p.ifname.clone(),
                PodNames {
                    pod: format!("{}/{}", p.namespace, p.name),
                    ingress: StageNames::of(&p.ingress, ir.log_drops),
                    egress: StageNames::of(&p.egress, ir.log_drops),
                },
            )
        })
        .collect()
}

/// One log line's fields, from a logged packet's prefix and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropLine {
    pub direction: DropDirection,
    pub stage: DropStage,
    /// `namespace/name`, or the veth when sluice does not know its pod yet.
    pub pod: String,
    /// The policies of the stage for the pod in this direction ("" for an unknown pod: fail
    /// closed).
    pub policies: String,
    pub packet: Option<PacketSummary>,
}

/// Reads a logged packet; `None` for a packet that is not one of sluice's drops.
pub fn describe(
    names: &HashMap<String, PodNames>,
    prefix: &str,
    payload: Option<&[u8]>,
) -> Option<DropLine> {
    let (direction, stage, ifname) = parse_prefix(prefix)?;
    let packet = payload.and_then(parse_packet);
    let (pod, policies) = match ifname.and_then(|i| names.get(i).map(|n| (i, n))) {
        Some((_, n)) => {
            let list = match direction {
                DropDirection::Ingress => &n.ingress,
                DropDirection::Egress => &n.egress,
            };
            // Without the protocol (an IPv6 packet cut in its extension headers) the flow is
            // not known, and the tier's policies are all named.
            let flow = packet.and_then(|p| {
                let peer = match direction {
                    DropDirection::Ingress => p.src,
                    DropDirection::Egress => p.dst,
                };
                Some((peer, p.protocol?, p.ports.map(|(_, d)| d)))
            });
            (n.pod.clone(), list.stage(stage, flow).join(","))
        }
        None => (
            format!("unknown pod on {}", ifname.unwrap_or("a pod veth")),
            String::new(),
        ),
    };
    Some(DropLine {
        direction,
        stage,
        pod,
        policies,
        packet,
    })
}

/// The cap on log lines: at most `per_second` in each second, and a count of the rest.
#[derive(Debug)]
pub struct LineBudget {
    per_second: u32,
    window: Instant,
    used: u32,
    left_out: u64,
}

impl LineBudget {
    pub fn new(per_second: u32, now: Instant) -> Self {
        Self {
            per_second,
            window: now,
            used: 0,
            left_out: 0,
        }
    }

    /// Whether a line may be written at `now`; when a new second starts, also how many lines
    /// the last one left out.
    pub fn take(&mut self, now: Instant) -> (bool, u64) {
        let mut report = 0;
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            report = std::mem::take(&mut self.left_out);
            self.window = now;
            self.used = 0;
        }
        if self.used < self.per_second {
            self.used += 1;
            (true, report)
        } else {
            self.left_out += 1;
            (false, report)
        }
    }
}

fn log_line(line: &DropLine) {
    let (src, dst, protocol, sport, dport) = match line.packet {
        Some(p) => (
            p.src.to_string(),
            p.dst.to_string(),
            protocol_name(p.protocol),
            p.ports.map(|(s, _)| s),
            p.ports.map(|(_, d)| d),
        ),
        None => (String::new(), String::new(), String::new(), None, None),
    };
    tracing::info!(
        pod = %line.pod,
        direction = %line.direction.name(),
        tier = %line.stage.name(),
        policies = %line.policies,
        src = %src,
        dst = %dst,
        protocol = %protocol,
        sport = ?sport,
        dport = ?dport,
        "packet dropped by network policy"
    );
}

fn send(socket: &Socket, msg: NetlinkMessage<NetfilterMessage>) -> std::io::Result<()> {
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Binds NFLOG group [`NFLOG_GROUP`] in this network namespace and reads it on a thread of its
/// own for the life of the process. Fails when the group cannot be bound (no
/// `nfnetlink_log`, or another process holds the group).
pub fn spawn_reader(names: Names) -> std::io::Result<()> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    for nlas in [
        vec![ConfigNla::Cmd(ConfigCmd::Bind)],
        vec![ConfigNla::Mode(ConfigMode::new(
            COPY_RANGE,
            CopyMode::Packet,
        ))],
    ] {
        send(
            &socket,
            config_request(NetfilterProtoFamily::Unspec, NFLOG_GROUP, nlas),
        )?;
        let (buf, _) = socket.recv_from_full()?;
        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(&buf)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if let NetlinkPayload::Error(e) = msg.payload {
            if let Some(code) = e.code {
                return Err(std::io::Error::from_raw_os_error(-code.get()));
            }
        }
    }
    std::thread::Builder::new()
        .name("policy-drops".into())
        .spawn(move || read_forever(socket, names))?;
    tracing::info!(group = NFLOG_GROUP, "reading the drops policy logs");
    Ok(())
}

fn read_forever(socket: Socket, names: Names) {
    let mut budget = LineBudget::new(LINES_PER_SECOND, Instant::now());
    loop {
        let buf = match socket.recv_from_full() {
            Ok((buf, _)) => buf,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => {
                tracing::warn!(
                    "dropped-packet log overran its socket buffer; some drops went unlogged"
                );
                continue;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading the dropped-packet log failed; no more drops are logged");
                return;
            }
        };
        let mut at = 0;
        while at < buf.len() {
            let Ok(msg) = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..]) else {
                break;
            };
            let len = msg.header.length as usize;
            if len == 0 {
                break;
            }
            at += len;
            let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                ..
            }) = msg.payload
            else {
                continue;
            };
            let prefix = nlas.iter().find_map(|n| match n {
                PacketNla::Prefix(p) => Some(p.to_string_lossy().into_owned()),
                _ => None,
            });
            let payload = nlas.iter().find_map(|n| match n {
                PacketNla::Payload(p) => Some(p.as_slice()),
                _ => None,
            });
            let Some(prefix) = prefix else { continue };
            let line = {
                let names = names.read().unwrap_or_else(|p| p.into_inner());
                describe(&names, &prefix, payload)
            };
            let Some(line) = line else { continue };
            let (write, left_out) = budget.take(Instant::now());
            if left_out > 0 {
                tracing::info!(left_out, "dropped packets not logged in the last second (over {LINES_PER_SECOND} a second)");
            }
            if write {
                log_line(&line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_policy::{Direction, PodPolicy};

    use sluice_policy::{AddrSet, TierVerdict};

    fn names() -> HashMap<String, PodNames> {
        let tier = |names: &[&str]| {
            std::sync::Arc::new(TierVerdict {
                policies: names.iter().map(|n| n.to_string()).collect(),
                // The first policy denies 10.244.2.3 and fd00:10:244:2::3, the second everyone
                // else.
                denied_by: names
                    .iter()
                    .zip([
                        Region::everything(&AddrSet::from_addrs([
                            "10.244.2.3".parse().unwrap(),
                            "fd00:10:244:2::3".parse().unwrap(),
                        ])),
                        Region::everything(&AddrSet::all()),
                    ])
                    .map(|(n, r)| (n.to_string(), r))
                    .collect(),
                ..Default::default()
            })
        };
        let ir = PolicyIr {
            pods: vec![PodPolicy {
                namespace: "x".into(),
                name: "a".into(),
                ips: vec!["10.244.1.2".parse().unwrap()],
                ifname: "sl0000000000001".into(),
                ingress: Direction {
                    isolated: true,
                    policies: vec!["x/deny".into(), "x/web".into()],
                    admin: tier(&["block-metadata", "keep-monitoring"]),
                    ..Default::default()
                },
                egress: Direction {
                    baseline: tier(&["default-deny"]),
                    ..Default::default()
                },
            }],
            log_drops: true,
        };
        names_of(&ir)
    }

    #[test]
    fn a_drop_names_the_pod_its_policies_and_the_flow() {
        let mut p = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 244, 2, 3, 10, 244, 1, 2,
        ];
        p.extend_from_slice(&[0x9c, 0x40, 0, 80]);
        let line = describe(&names(), "sluice-drop:i:sl0000000000001", Some(&p)).unwrap();
        assert_eq!(line.pod, "x/a");
        assert_eq!(line.direction, DropDirection::Ingress);
        assert_eq!(line.stage, DropStage::NetworkPolicy);
        assert_eq!(line.policies, "x/deny,x/web");
        let pkt = line.packet.unwrap();
        assert_eq!(pkt.src.to_string(), "10.244.2.3");
        assert_eq!(pkt.ports, Some((40000, 80)));
    }

    #[test]
    fn a_tier_drop_names_the_tier_and_its_cluster_network_policies() {
        let admin = describe(&names(), "sluice-drop:iA:sl0000000000001", None).unwrap();
        assert_eq!(admin.stage, DropStage::Admin);
        // Without the packet: every policy of the tier selecting the pod.
        assert_eq!(admin.policies, "block-metadata,keep-monitoring");
        // With it: the one whose rules deny the flow.
        let from = |src: [u8; 4]| {
            let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
            p.extend_from_slice(&src);
            p.extend_from_slice(&[10, 244, 1, 2, 0x9c, 0x40, 0, 80]);
            p
        };
        let first = describe(
            &names(),
            "sluice-drop:iA:sl0000000000001",
            Some(&from([10, 244, 2, 3])),
        );
        assert_eq!(first.unwrap().policies, "block-metadata");
        let second = describe(
            &names(),
            "sluice-drop:iA:sl0000000000001",
            Some(&from([10, 244, 2, 9])),
        );
        assert_eq!(second.unwrap().policies, "keep-monitoring");
        let base = describe(&names(), "sluice-drop:eB:sl0000000000001", None).unwrap();
        assert_eq!(base.direction, DropDirection::Egress);
        assert_eq!(base.stage, DropStage::Baseline);
        assert_eq!(base.policies, "default-deny");
        // The pod's NetworkPolicies isolate only its ingress: an egress drop there names none.
        let none = describe(&names(), "sluice-drop:e:sl0000000000001", None).unwrap();
        assert_eq!(none.policies, "");
    }

    /// An IPv6 packet from `src` to fd00:10:244:1::2 with next header `next`, then `rest`.
    fn v6(src: &str, next: u8, rest: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, rest.len() as u8, next, 64];
        p.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(
            &"fd00:10:244:1::2"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p.extend_from_slice(rest);
        p
    }

    #[test]
    fn an_ipv6_drop_names_the_pod_its_policies_and_the_flow() {
        let tcp = v6("fd00:10:244:2::3", 6, &[0x9c, 0x40, 0, 80, 0, 0, 0, 0]);
        let line = describe(&names(), "sluice-drop:i:sl0000000000001", Some(&tcp)).unwrap();
        assert_eq!(line.pod, "x/a");
        assert_eq!(line.direction, DropDirection::Ingress);
        assert_eq!(line.stage, DropStage::NetworkPolicy);
        assert_eq!(line.policies, "x/deny,x/web");
        let pkt = line.packet.unwrap();
        assert_eq!(pkt.src.to_string(), "fd00:10:244:2::3");
        assert_eq!(pkt.dst.to_string(), "fd00:10:244:1::2");
        assert_eq!(pkt.protocol, Some(6));
        assert_eq!(pkt.ports, Some((40000, 80)));
        // A tier's drop names the policy that denies the IPv6 peer, through a hop-by-hop
        // header too.
        let mut hbh = vec![17, 0, 1, 4, 0, 0, 0, 0];
        hbh.extend_from_slice(&[0x9c, 0x40, 0, 53, 0, 0, 0, 0]);
        for (src, want) in [
            ("fd00:10:244:2::3", "block-metadata"),
            ("fd00:10:244:2::9", "keep-monitoring"),
        ] {
            let line = describe(
                &names(),
                "sluice-drop:iA:sl0000000000001",
                Some(&v6(src, 0, &hbh)),
            )
            .unwrap();
            assert_eq!(line.stage, DropStage::Admin);
            assert_eq!(line.policies, want, "from {src}");
            assert_eq!(line.packet.unwrap().protocol, Some(17));
        }
        // ICMPv6 (an echo request) is a flow of the tier's "other" region.
        let echo = v6("fd00:10:244:2::3", 58, &[128, 0, 0, 0, 0, 1, 0, 1]);
        let line = describe(&names(), "sluice-drop:iA:sl0000000000001", Some(&echo)).unwrap();
        assert_eq!(line.policies, "block-metadata");
        assert_eq!(line.packet.unwrap().ports, None);
        // Cut in its hop-by-hop header (before its length): the addresses, no protocol, every
        // policy of the tier.
        let cut = v6("fd00:10:244:2::3", 0, &[17]);
        let line = describe(&names(), "sluice-drop:iA:sl0000000000001", Some(&cut)).unwrap();
        assert_eq!(line.policies, "block-metadata,keep-monitoring");
        let pkt = line.packet.unwrap();
        assert_eq!(pkt.src.to_string(), "fd00:10:244:2::3");
        assert_eq!((pkt.protocol, pkt.ports), (None, None));
        // Garbage: the line, without a packet.
        let line = describe(&names(), "sluice-drop:i:sl0000000000001", Some(&[0x61; 20])).unwrap();
        assert_eq!(line.packet, None);
    }

    #[test]
    fn unknown_veths_and_foreign_prefixes() {
        let line = describe(&names(), "sluice-drop:e:-", None).unwrap();
        assert_eq!(line.pod, "unknown pod on a pod veth");
        assert_eq!(line.policies, "");
        let other = describe(&names(), "sluice-drop:e:sl00000000000ff", None).unwrap();
        assert_eq!(other.pod, "unknown pod on sl00000000000ff");
        assert_eq!(describe(&names(), "docker drop", None), None);
    }

    #[test]
    fn the_budget_caps_each_second_and_reports_the_rest() {
        let t0 = Instant::now();
        let mut b = LineBudget::new(2, t0);
        assert_eq!(b.take(t0), (true, 0));
        assert_eq!(b.take(t0), (true, 0));
        assert_eq!(b.take(t0), (false, 0));
        assert_eq!(b.take(t0 + Duration::from_millis(500)), (false, 0));
        assert_eq!(b.take(t0 + Duration::from_secs(1)), (true, 2));
        assert_eq!(b.take(t0 + Duration::from_secs(1)), (true, 0));
    }
}
