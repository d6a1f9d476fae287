//! The kernel's WireGuard, where the node has the module: a `wireguard` link made over
//! rtnetlink, configured over the `wireguard` generic-netlink family (the messages `wg set`
//! sends). The message building is pure ([`set_device`], [`peer_changes`]) and unit-tested;
//! [`KernelWg`] only sends them.
//!
//! Unlike the userspace device, the kernel's outlives the agent: a restarted agent finds it with
//! its peers and sessions, so its first apply replaces the peers wholesale (the kernel's
//! REPLACE_PEERS flag) rather than trusting an empty memory.

use super::{PeerDiff, PeerSpec};
use crate::genl::{GenlError, GenlSocket};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute,
    WireguardCmd, WireguardDeviceFlags, WireguardMessage, WireguardPeer, WireguardPeerAttribute,
    WireguardPeerFlags,
};
use std::time::{Duration, SystemTime};

/// The attributes of a peer to add or update: endpoint, keepalive, and allowed IPs replacing
/// the old ones.
fn upsert_peer(p: &PeerSpec) -> WireguardPeer {
    let allowed = p
        .allowed_ips
        .iter()
        .map(|n| {
            let family = match n {
                ipnet::IpNet::V4(_) => WireguardAddressFamily::Ipv4,
                ipnet::IpNet::V6(_) => WireguardAddressFamily::Ipv6,
            };
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(family),
                WireguardAllowedIpAttr::IpAddr(n.network()),
                WireguardAllowedIpAttr::Cidr(n.prefix_len()),
            ])
        })
        .collect();
    WireguardPeer(vec![
        WireguardPeerAttribute::PublicKey(p.public_key),
        WireguardPeerAttribute::Flags(WireguardPeerFlags::ReplaceAllowedIps),
        WireguardPeerAttribute::Endpoint(p.endpoint),
        WireguardPeerAttribute::PersistentKeepalive(p.keepalive_secs),
        WireguardPeerAttribute::AllowedIps(allowed),
    ])
}

/// The device attributes for one `SET_DEVICE`: the key and port when given, and the peers of
/// `diff` (removals by key, then additions and updates). `replace_peers` drops every peer the
/// kernel holds that `diff.upsert` does not name.
pub fn set_device(
    ifname: &str,
    private_key: Option<[u8; 32]>,
    listen_port: Option<u16>,
    diff: &PeerDiff,
    replace_peers: bool,
) -> Vec<WireguardAttribute> {
    let mut attrs = vec![WireguardAttribute::IfName(ifname.to_string())];
    if let Some(k) = private_key {
        attrs.push(WireguardAttribute::PrivateKey(k));
    }
    if let Some(p) = listen_port {
        attrs.push(WireguardAttribute::ListenPort(p));
    }
    if replace_peers {
        attrs.push(WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers,
        ));
    }
    let peers = peer_changes(diff, replace_peers);
    if !peers.is_empty() {
        attrs.push(WireguardAttribute::Peers(peers));
    }
    attrs
}

/// The peer entries of a diff (no removals when the whole set is replaced).
pub fn peer_changes(diff: &PeerDiff, replace_peers: bool) -> Vec<WireguardPeer> {
    let removals = diff.remove.iter().filter(|_| !replace_peers).map(|k| {
        WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(*k),
            WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
        ])
    });
    removals
        .chain(diff.upsert.iter().map(upsert_peer))
        .collect()
}

/// A peer's counters as the kernel reports them: (public key, rx, tx, last handshake).
pub type KernelPeerStats = ([u8; 32], u64, u64, Option<SystemTime>);

/// Reads the peers of a `GET_DEVICE` answer (possibly split over several messages).
pub fn parse_peers(answers: &[WireguardMessage]) -> Vec<KernelPeerStats> {
    let mut out = Vec::new();
    for m in answers {
        for a in &m.attributes {
            let WireguardAttribute::Peers(peers) = a else {
                continue;
            };
            for WireguardPeer(attrs) in peers {
                let mut key = None;
                let (mut rx, mut tx, mut hs) = (0, 0, None);
                for pa in attrs {
                    match pa {
                        WireguardPeerAttribute::PublicKey(k) => key = Some(*k),
                        WireguardPeerAttribute::RxBytes(b) => rx = *b,
                        WireguardPeerAttribute::TxBytes(b) => tx = *b,
                        // The kernel gives the wall-clock time; zero means never.
                        WireguardPeerAttribute::LastHandshake(t) if t.seconds > 0 => {
                            hs = SystemTime::UNIX_EPOCH.checked_add(Duration::new(
                                u64::try_from(t.seconds).unwrap_or(0),
                                u32::try_from(t.nano_seconds).unwrap_or(0),
                            ));
                        }
                        _ => {}
                    }
                }
                if let Some(k) = key {
                    out.push((k, rx, tx, hs));
                }
            }
        }
    }
    out
}

/// The kernel device's configuration socket.
pub struct KernelWg {
    genl: GenlSocket,
    ifname: String,
}

impl KernelWg {
    pub fn connect(ifname: &str) -> Result<Self, GenlError> {
        Ok(Self {
            genl: GenlSocket::connect("wireguard")?,
            ifname: ifname.to_string(),
        })
    }

    pub fn set(&mut self, attributes: Vec<WireguardAttribute>) -> Result<(), GenlError> {
        let msg = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes,
        });
        self.genl
            .request::<_, GenlMessage<WireguardMessage>>(
                msg,
                NLM_F_REQUEST | NLM_F_ACK,
                "configuring the WireGuard device",
            )
            .map(|_| ())
    }

    pub fn peers(&mut self) -> Result<Vec<KernelPeerStats>, GenlError> {
        let msg = GenlMessage::from_payload(WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.ifname.clone())],
        });
        let answers: Vec<GenlMessage<WireguardMessage>> = self.genl.request(
            msg,
            NLM_F_REQUEST | NLM_F_DUMP,
            "reading the WireGuard device",
        )?;
        let payloads: Vec<WireguardMessage> = answers.into_iter().map(|m| m.payload).collect();
        Ok(parse_peers(&payloads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::Emitable as _;
    use netlink_packet_wireguard::WireguardTimeSpec;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn spec(n: u8) -> PeerSpec {
        PeerSpec {
            node: format!("n{n}"),
            public_key: [n; 32],
            endpoint: SocketAddrV4::new(Ipv4Addr::new(192, 168, 0, n), 51820).into(),
            allowed_ips: vec![format!("10.244.{n}.0/24").parse().unwrap()],
            keepalive_secs: 25,
        }
    }

    #[test]
    fn a_diff_becomes_removals_then_upserts_with_allowed_ips_replaced() {
        let diff = PeerDiff {
            remove: vec![[9; 32]],
            upsert: vec![spec(2)],
        };
        let attrs = set_device("sluice.wg", Some([1; 32]), Some(51820), &diff, false);
        assert_eq!(attrs[0], WireguardAttribute::IfName("sluice.wg".into()));
        assert_eq!(attrs[1], WireguardAttribute::PrivateKey([1; 32]));
        assert_eq!(attrs[2], WireguardAttribute::ListenPort(51820));
        let WireguardAttribute::Peers(peers) = &attrs[3] else {
            panic!("no peers: {attrs:?}")
        };
        assert_eq!(
            peers[0],
            WireguardPeer(vec![
                WireguardPeerAttribute::PublicKey([9; 32]),
                WireguardPeerAttribute::Flags(WireguardPeerFlags::RemoveMe),
            ])
        );
        let add = &peers[1].0;
        assert!(add.contains(&WireguardPeerAttribute::PublicKey([2; 32])));
        assert!(add.contains(&WireguardPeerAttribute::Flags(
            WireguardPeerFlags::ReplaceAllowedIps
        )));
        assert!(add.contains(&WireguardPeerAttribute::Endpoint(
            "192.168.0.2:51820".parse().unwrap()
        )));
        assert!(add.contains(&WireguardPeerAttribute::PersistentKeepalive(25)));
        assert!(add.contains(&WireguardPeerAttribute::AllowedIps(vec![
            WireguardAllowedIp(vec![
                WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
                WireguardAllowedIpAttr::IpAddr("10.244.2.0".parse().unwrap()),
                WireguardAllowedIpAttr::Cidr(24),
            ])
        ])));
        // It serialises (the kernel's wire format) without panicking.
        let msg = WireguardMessage {
            cmd: WireguardCmd::SetDevice,
            attributes: attrs,
        };
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        assert!(buf.len() > 100);
    }

    #[test]
    fn replacing_all_peers_sends_no_removals_and_the_flag() {
        let diff = PeerDiff {
            remove: vec![[9; 32]],
            upsert: vec![spec(2), spec(3)],
        };
        let attrs = set_device("sluice.wg", None, None, &diff, true);
        assert!(attrs.contains(&WireguardAttribute::Flags(
            WireguardDeviceFlags::ReplacePeers
        )));
        let Some(WireguardAttribute::Peers(peers)) = attrs.last() else {
            panic!("{attrs:?}")
        };
        assert_eq!(peers.len(), 2);
        // Nothing to change: only the name.
        assert_eq!(
            set_device("sluice.wg", None, None, &PeerDiff::default(), false).len(),
            1
        );
    }

    #[test]
    fn peer_counters_and_wall_clock_handshakes_are_read() {
        let answers = vec![
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([2; 32]),
                    WireguardPeerAttribute::RxBytes(10),
                    WireguardPeerAttribute::TxBytes(20),
                    WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                        seconds: 1_700_000_000,
                        nano_seconds: 5,
                    }),
                ])])],
            },
            WireguardMessage {
                cmd: WireguardCmd::GetDevice,
                attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey([3; 32]),
                    WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                        seconds: 0,
                        nano_seconds: 0,
                    }),
                ])])],
            },
        ];
        let peers = parse_peers(&answers);
        assert_eq!(peers.len(), 2);
        assert_eq!(peers[0].0, [2; 32]);
        assert_eq!((peers[0].1, peers[0].2), (10, 20));
        assert_eq!(
            peers[0].3,
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5))
        );
        assert_eq!(peers[1].3, None, "zero means never");
    }
}
