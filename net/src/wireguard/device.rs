//! The userspace WireGuard device: gotatun (Mullvad's maintained fork of boringtun, tokio
//! native) on a tun device in the agent's process and network namespace, configured through
//! its typed API, so there is no UAPI socket (whose path would be global to the machine) and no
//! signal handler taken over. Its peers are changed as a diff ([`super::diff_peers`]); the
//! routes through it are sluice's (protocol [`crate::ROUTE_PROTOCOL`]) and are synced apart,
//! because the agent decides per peer which tunnel carries its subnet.
//!
//! The tun device is not persistent: when the agent's process ends, the kernel removes it and
//! the routes through it.

use super::{diff_peers, KeyPair, PeerDiff, PeerSpec, WgError};
use crate::vxlan::apply::{route_ip, route_oif, route_table};
use crate::ROUTE_PROTOCOL;
use futures::TryStreamExt;
use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::udp::socket::UdpSocketFactory;
use gotatun::x25519::PublicKey;
use ipnet::Ipv4Net;
use netlink_packet_route::route::{RouteHeader, RouteMessage, RouteProtocol, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

type Gotatun = Device<(UdpSocketFactory, TunDevice, TunDevice)>;

/// Which implementation carries the packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Kernel,
    Userspace,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel",
            Self::Userspace => "userspace (gotatun)",
        })
    }
}

/// A peer's counters, for `/metrics` and `sluice status`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStats {
    pub node: String,
    pub public_key_b64: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// When the last handshake completed (absolute, computed from the age at read time).
    pub last_handshake: Option<SystemTime>,
}

/// The running device of this node.
pub struct WgDevice {
    ifname: String,
    ifindex: u32,
    device: Gotatun,
    peers: BTreeMap<String, PeerSpec>,
    handle: Handle,
    /// Whether gotatun has set up its UDP socket and tasks: it does so at build time only when
    /// built with peers, and after a write only when that write "reconfigures" (a key, a port,
    /// or clearing the peers), not when a peer is added.
    connected: bool,
}

fn device_err(ifname: &str, reason: impl std::fmt::Display) -> WgError {
    WgError::Device {
        ifname: ifname.to_string(),
        reason: reason.to_string(),
    }
}

fn netlink(what: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> WgError {
    let what = what.to_string();
    move |source| WgError::Netlink { what, source }
}

fn to_peer(spec: &PeerSpec) -> Peer {
    let mut peer = Peer::new(PublicKey::from(spec.public_key))
        .with_endpoint(SocketAddr::V4(spec.endpoint))
        .with_allowed_ips(spec.allowed_ips.iter().filter_map(|n| {
            ipnetwork::Ipv4Network::new(n.network(), n.prefix_len())
                .ok()
                .map(ipnetwork::IpNetwork::V4)
        }));
    peer.keepalive = (spec.keepalive_secs > 0).then_some(spec.keepalive_secs);
    peer
}

impl WgDevice {
    /// Creates the tun device `ifname` in the calling thread's network namespace with the node's
    /// key, listening on UDP `listen_port`, MTU `mtu`, up. Must run inside a tokio runtime.
    pub async fn open(
        ifname: &str,
        key: &KeyPair,
        listen_port: u16,
        mtu: u32,
    ) -> Result<Self, WgError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| device_err(ifname, e))?;
        tokio::spawn(conn);
        let device = DeviceBuilder::new()
            .with_default_udp()
            .with_listen_port(listen_port)
            .create_tun(ifname)
            .map_err(|e| device_err(ifname, format!("creating the tun device: {e}")))?
            .with_private_key(key.secret().clone())
            .build()
            .await
            .map_err(|e| device_err(ifname, format!("starting WireGuard: {e}")))?;
        let link = handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute()
            .try_next()
            .await
            .map_err(netlink(format!("looking up {ifname}")))?
            .ok_or_else(|| device_err(ifname, "the tun device vanished"))?;
        let ifindex = link.header.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(ifindex).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(netlink(format!("setting {ifname} up with MTU {mtu}")))?;
        tracing::info!(ifname, ifindex, listen_port, mtu, backend = %Backend::Userspace, public_key = %key.public_base64(), "WireGuard device up");
        Ok(Self {
            ifname: ifname.to_string(),
            ifindex,
            device,
            peers: BTreeMap::new(),
            handle,
            connected: false,
        })
    }

    pub fn backend(&self) -> Backend {
        Backend::Userspace
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Makes the device hold exactly `want`, changing only the difference (see
    /// [`diff_peers`]); returns what it changed.
    pub async fn apply(&mut self, want: &BTreeMap<String, PeerSpec>) -> Result<PeerDiff, WgError> {
        let diff = diff_peers(&self.peers, want);
        if diff.is_empty() {
            return Ok(diff);
        }
        let remove: Vec<PublicKey> = diff.remove.iter().map(|k| PublicKey::from(*k)).collect();
        let upsert: Vec<Peer> = diff.upsert.iter().map(to_peer).collect();
        let connect = !self.connected && !upsert.is_empty();
        self.device
            .write(async |d| {
                if connect {
                    // The device has no peers yet; clearing them makes gotatun set up its
                    // connection once this write is done.
                    d.clear_peers();
                }
                for key in &remove {
                    d.remove_peer(key).await;
                }
                d.add_or_update_peers(upsert).await;
            })
            .await
            .map_err(|e| device_err(&self.ifname, format!("configuring peers: {e}")))?;
        self.peers = want.clone();
        self.connected |= connect;
        tracing::info!(
            ifname = %self.ifname,
            removed = diff.remove.len(),
            added_or_updated = diff.upsert.len(),
            peers = self.peers.len(),
            "WireGuard peers changed"
        );
        Ok(diff)
    }

    /// A new key for the device (the key file was removed): every session starts again.
    pub async fn set_key(&mut self, key: &KeyPair) -> Result<(), WgError> {
        self.device
            .set_private_key(key.secret().clone())
            .await
            .map_err(|e| device_err(&self.ifname, format!("changing the key: {e}")))?;
        tracing::info!(ifname = %self.ifname, public_key = %key.public_base64(), "WireGuard key changed");
        Ok(())
    }

    /// Per-peer counters, by node.
    pub async fn stats(&self) -> Vec<PeerStats> {
        let now = SystemTime::now();
        let by_key: BTreeMap<[u8; 32], &str> = self
            .peers
            .values()
            .map(|p| (p.public_key, p.node.as_str()))
            .collect();
        self.device
            .peers()
            .await
            .into_iter()
            .filter_map(|p| {
                let key = *p.peer.public_key.as_bytes();
                let node = by_key.get(&key)?;
                Some(PeerStats {
                    node: (*node).to_string(),
                    public_key_b64: base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        key,
                    ),
                    rx_bytes: p.stats.rx_bytes as u64,
                    tx_bytes: p.stats.tx_bytes as u64,
                    last_handshake: p.stats.last_handshake.and_then(|age| now.checked_sub(age)),
                })
            })
            .collect()
    }

    /// Routes each subnet of `want` through the device (protocol 77), replacing a route of the
    /// same destination in place, so a subnet moving from VXLAN to WireGuard never has a moment
    /// without a route. Returns how many it added.
    pub async fn add_routes(&self, want: &BTreeSet<Ipv4Net>) -> Result<usize, WgError> {
        let have = owned_routes(&self.handle, self.ifindex).await?;
        let mut added = 0;
        for dst in want.difference(&have) {
            self.handle
                .route()
                .add(route(*dst, self.ifindex))
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding route {dst} via {}", self.ifname)))?;
            added += 1;
        }
        Ok(added)
    }

    /// Makes sluice's routes through the device exactly `want`. Returns the number of changes.
    pub async fn sync_routes(&self, want: &BTreeSet<Ipv4Net>) -> Result<usize, WgError> {
        let have = owned_routes(&self.handle, self.ifindex).await?;
        let mut changes = 0;
        for dst in have.difference(want) {
            match self
                .handle
                .route()
                .del(route(*dst, self.ifindex))
                .execute()
                .await
            {
                Ok(()) => changes += 1,
                Err(e) if crate::vxlan::apply::is_missing(&e) => {}
                Err(e) => return Err(netlink(format!("deleting route {dst}"))(e)),
            }
        }
        Ok(changes + self.add_routes(want).await?)
    }

    /// Stops the device; the kernel removes the tun device and its routes with the last fd.
    pub async fn close(self) {
        let ifname = self.ifname.clone();
        if tokio::time::timeout(Duration::from_secs(5), self.device.stop())
            .await
            .is_err()
        {
            tracing::warn!(ifname, "WireGuard device did not stop within 5 s");
        }
        tracing::info!(ifname, "WireGuard device closed");
    }
}

fn route(dst: Ipv4Net, ifindex: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(dst.network(), dst.prefix_len())
        .output_interface(ifindex)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build()
}

/// sluice's routes through the link `ifindex` in the main table.
pub async fn owned_routes(handle: &Handle, ifindex: u32) -> Result<BTreeSet<Ipv4Net>, WgError> {
    let routes: Vec<RouteMessage> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(netlink("listing routes"))?;
    Ok(routes
        .iter()
        .filter(|r| {
            r.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
                && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
                && route_oif(r) == Some(ifindex)
        })
        .filter_map(|r| {
            let dst = route_ip(r, true).unwrap_or(Ipv4Addr::UNSPECIFIED);
            Ipv4Net::new(dst, r.header.destination_prefix_length).ok()
        })
        .collect())
}
