//! The node's WireGuard device: the kernel's (see [`super::kernel`]) where the module exists,
//! else gotatun (Mullvad's maintained fork of boringtun, tokio native) on a tun device in the
//! agent's process and network namespace, configured through its typed API, so there is no UAPI
//! socket (whose path would be global to the machine) and no signal handler taken over. Its peers are changed as a diff ([`super::diff_peers`]); the
//! routes through it are sluice's (protocol [`crate::ROUTE_PROTOCOL`]) and are synced apart,
//! because the agent decides per peer which tunnel carries its subnet.
//!
//! The tun device is not persistent: when the agent's process ends, the kernel removes it and
//! the routes through it. The kernel's device is, and a restarted agent takes it over.

use super::kernel::{self, KernelWg};
use super::{diff_peers, KeyPair, PeerDiff, PeerSpec, WgError};
use crate::vxlan::apply::{route_addr_any, route_oif, route_table};
use crate::ROUTE_PROTOCOL;
use futures::TryStreamExt;
use gotatun::device::{Device, DeviceBuilder, Peer};
use gotatun::tun::tun_async_device::TunDevice;
use gotatun::udp::socket::UdpSocketFactory;
use gotatun::x25519::PublicKey;
use ipnet::IpNet;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkUnspec, LinkWireguard, RouteMessageBuilder};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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

/// What carries the packets.
enum Engine {
    Userspace {
        device: Gotatun,
        /// Whether gotatun has set up its UDP socket and tasks: it does so at build time only
        /// when built with peers, and after a write only when that write "reconfigures" (a key,
        /// a port, or clearing the peers), not when a peer is added.
        connected: bool,
    },
    Kernel {
        config: KernelWg,
        /// No apply yet: the kernel may hold peers from before a restart.
        fresh: bool,
    },
}

/// The running device of this node.
pub struct WgDevice {
    ifname: String,
    ifindex: u32,
    engine: Engine,
    peers: BTreeMap<String, PeerSpec>,
    handle: Handle,
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
        .with_endpoint(spec.endpoint)
        .with_allowed_ips(
            spec.allowed_ips
                .iter()
                .filter_map(|n| ipnetwork::IpNetwork::new(n.network(), n.prefix_len()).ok()),
        );
    peer.keepalive = (spec.keepalive_secs > 0).then_some(spec.keepalive_secs);
    peer
}

/// Orderly stops of gotatun's connection under way (device close, key change).
static STOPPING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Marks an orderly stop of gotatun's connection for as long as it lives.
struct Stopping;

impl Stopping {
    fn begin() -> Self {
        STOPPING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        STOPPING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Whether a log event is gotatun's complaint about its own orderly stop, for the agent's log
/// filter to drop. gotatun 0.10 stops a connection by aborting its tasks one after the other,
/// and its tun reader goes first: the outgoing task, not yet aborted, then finds its channel
/// closed and logs two ERRORs ("Unexpected error on tun interface", "task handle_outgoing
/// errored") on every close and key change, though nothing went wrong. Only gotatun's ERRORs,
/// only while sluice itself is stopping the connection.
pub fn is_shutdown_noise(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == tracing::Level::ERROR
        && meta.target().starts_with("gotatun")
        && STOPPING.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// How often, and how far apart, gotatun is asked to set up its connection again when the
/// socket of the one it just stopped still holds the port (its tasks end asynchronously).
const CONNECT_ATTEMPTS: u32 = 20;
const CONNECT_RETRY: Duration = Duration::from_millis(100);
/// How long a new connection waits for its handshakes with the peers it starts at once.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(1);

/// Has gotatun (re)build its connection (UDP socket and tasks) around `peers`, with a new key if
/// given. Clearing the peers is what makes a write "reconfigure" in gotatun; peers are
/// re-added in the same write, so no packet sees the device without them.
async fn connect(
    device: &Gotatun,
    connected: &mut bool,
    ifname: &str,
    key: Option<gotatun::x25519::StaticSecret>,
    peers: Vec<Peer>,
) -> Result<(), WgError> {
    let _stopping = Stopping::begin();
    let mut last = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(CONNECT_RETRY).await;
        }
        let key = key.clone();
        let peers_now = peers.clone();
        match device
            .write(async |d| {
                if let Some(key) = key {
                    d.set_private_key(key).await;
                }
                d.clear_peers();
                d.add_or_update_peers(peers_now).await;
            })
            .await
        {
            Ok(()) => {
                *connected = true;
                handshake_all(device, ifname, &peers).await;
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(ifname, attempt, error = %e, "gotatun's connection not up yet");
                last = Some(e);
            }
        }
    }
    // The next apply tries again.
    *connected = false;
    Err(device_err(
        ifname,
        format!(
            "setting up the connection: {}",
            last.map(|e| e.to_string()).unwrap_or_default()
        ),
    ))
}

/// Starts a handshake with every peer at once (bounded wait) instead of at the first packet
/// to each. A device new to its peers (the agent restarted: userspace WireGuard goes with its
/// process) is otherwise not heard by a peer that still holds its session with the old device
/// and keeps sending on it: that peer only starts over when it has had no answer for 15 s
/// (WireGuard's keepalive and rekey timeouts), which is how long pods of a restarted node stayed
/// unreachable from its peers' pods.
async fn handshake_all(device: &Gotatun, ifname: &str, peers: &[Peer]) {
    let started = std::time::Instant::now();
    let done = futures::future::join_all(peers.iter().map(|p| async move {
        tokio::time::timeout(HANDSHAKE_WAIT, device.force_handshake(&p.public_key))
            .await
            .is_ok_and(|r| r.is_ok())
    }))
    .await;
    let completed = done.iter().filter(|ok| **ok).count();
    tracing::info!(
        ifname,
        peers = peers.len(),
        completed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "WireGuard handshakes started with every peer"
    );
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
        let engine = match open_kernel(&handle, ifname, key, listen_port).await {
            Some(config) => Engine::Kernel {
                config,
                fresh: true,
            },
            None => {
                let device = DeviceBuilder::new()
                    .with_default_udp()
                    .with_listen_port(listen_port)
                    .create_tun(ifname)
                    .map_err(|e| device_err(ifname, format!("creating the tun device: {e}")))?
                    .with_private_key(key.secret().clone())
                    .build()
                    .await
                    .map_err(|e| device_err(ifname, format!("starting WireGuard: {e}")))?;
                Engine::Userspace {
                    device,
                    connected: false,
                }
            }
        };
        let link = handle
            .link()
            .get()
            .match_name(ifname.to_string())
            .execute()
            .try_next()
            .await
            .map_err(netlink(format!("looking up {ifname}")))?
            .ok_or_else(|| device_err(ifname, "the device vanished"))?;
        let ifindex = link.header.index;
        handle
            .link()
            .set(LinkUnspec::new_with_index(ifindex).mtu(mtu).up().build())
            .execute()
            .await
            .map_err(netlink(format!("setting {ifname} up with MTU {mtu}")))?;
        let me = Self {
            ifname: ifname.to_string(),
            ifindex,
            engine,
            peers: BTreeMap::new(),
            handle,
        };
        tracing::info!(ifname, ifindex, listen_port, mtu, backend = %me.backend(), public_key = %key.public_base64(), "WireGuard device up");
        Ok(me)
    }

    pub fn backend(&self) -> Backend {
        match self.engine {
            Engine::Userspace { .. } => Backend::Userspace,
            Engine::Kernel { .. } => Backend::Kernel,
        }
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
        let must_connect = !want.is_empty()
            && matches!(
                self.engine,
                Engine::Userspace {
                    connected: false,
                    ..
                }
            );
        if diff.is_empty() && !must_connect {
            return Ok(diff);
        }
        match &mut self.engine {
            Engine::Userspace { device, connected } if !*connected && !want.is_empty() => {
                let peers: Vec<Peer> = want.values().map(to_peer).collect();
                connect(device, connected, &self.ifname, None, peers).await?;
            }
            Engine::Userspace { device, .. } => {
                let remove: Vec<PublicKey> =
                    diff.remove.iter().map(|k| PublicKey::from(*k)).collect();
                let upsert: Vec<Peer> = diff.upsert.iter().map(to_peer).collect();
                device
                    .write(async |d| {
                        for key in &remove {
                            d.remove_peer(key).await;
                        }
                        d.add_or_update_peers(upsert).await;
                    })
                    .await
                    .map_err(|e| device_err(&self.ifname, format!("configuring peers: {e}")))?;
            }
            Engine::Kernel { config, fresh } => {
                let attrs = kernel::set_device(&self.ifname, None, None, &diff, *fresh);
                config
                    .set(attrs)
                    .map_err(|e| device_err(&self.ifname, format!("configuring peers: {e}")))?;
                *fresh = false;
            }
        }
        self.peers = want.clone();
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
        match &mut self.engine {
            Engine::Userspace { device, connected } => {
                // The peers are made again with the key: a session made under the old key
                // would otherwise carry on one way until its timers gave up (15 s), while the
                // peers, who know only the new key, drop it.
                let peers: Vec<Peer> = self.peers.values().map(to_peer).collect();
                connect(
                    device,
                    connected,
                    &self.ifname,
                    Some(key.secret().clone()),
                    peers,
                )
                .await?
            }
            Engine::Kernel { config, .. } => config
                .set(kernel::set_device(
                    &self.ifname,
                    Some(key.secret().to_bytes()),
                    None,
                    &PeerDiff::default(),
                    false,
                ))
                .map_err(|e| device_err(&self.ifname, format!("changing the key: {e}")))?,
        }
        tracing::info!(ifname = %self.ifname, public_key = %key.public_base64(), "WireGuard key changed");
        Ok(())
    }

    /// Per-peer counters, by node.
    pub async fn stats(&mut self) -> Vec<PeerStats> {
        let now = SystemTime::now();
        let by_key: BTreeMap<[u8; 32], &str> = self
            .peers
            .values()
            .map(|p| (p.public_key, p.node.as_str()))
            .collect();
        let counters: Vec<kernel::KernelPeerStats> = match &mut self.engine {
            Engine::Userspace { device, .. } => device
                .peers()
                .await
                .into_iter()
                .map(|p| {
                    (
                        *p.peer.public_key.as_bytes(),
                        p.stats.rx_bytes as u64,
                        p.stats.tx_bytes as u64,
                        // gotatun gives the age; an absolute time is computed here.
                        p.stats.last_handshake.and_then(|age| now.checked_sub(age)),
                    )
                })
                .collect(),
            Engine::Kernel { config, .. } => config.peers().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the WireGuard device's peers");
                Vec::new()
            }),
        };
        counters
            .into_iter()
            .filter_map(|(key, rx_bytes, tx_bytes, last_handshake)| {
                let node = by_key.get(&key)?;
                Some(PeerStats {
                    node: (*node).to_string(),
                    public_key_b64: base64::Engine::encode(
                        &base64::engine::general_purpose::STANDARD,
                        key,
                    ),
                    rx_bytes,
                    tx_bytes,
                    last_handshake,
                })
            })
            .collect()
    }

    /// Gives the device exactly the address `addr`/32, and `addr6`/128 on a dual-stack node
    /// (see [`super::WgPlan::address`]); the kernel's own link-local address stays.
    pub async fn sync_address(
        &self,
        addr: Option<Ipv4Addr>,
        addr6: Option<Ipv6Addr>,
    ) -> Result<(), WgError> {
        let found: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.ifindex)
            .execute()
            .try_collect()
            .await
            .map_err(netlink(format!("listing addresses on {}", self.ifname)))?;
        let wanted: Vec<(IpAddr, u8)> = addr
            .map(|a| (IpAddr::V4(a), 32))
            .into_iter()
            .chain(addr6.map(|a| (IpAddr::V6(a), 128)))
            .collect();
        let mut have = Vec::new();
        for a in found.into_iter().filter(|a| a.header.index == self.ifindex) {
            let ip = a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(ip @ IpAddr::V4(_)) => Some(*ip),
                AddressAttribute::Address(ip @ IpAddr::V6(v6))
                    if v6.segments()[0] & 0xffc0 != 0xfe80 =>
                {
                    Some(*ip)
                }
                _ => None,
            });
            match ip {
                Some(ip) if wanted.contains(&(ip, a.header.prefix_len)) => have.push(ip),
                Some(ip) => {
                    self.handle
                        .address()
                        .del(a)
                        .execute()
                        .await
                        .map_err(netlink(format!("deleting {ip} from {}", self.ifname)))?;
                }
                None => {}
            }
        }
        for (ip, len) in wanted.into_iter().filter(|(ip, _)| !have.contains(ip)) {
            self.handle
                .address()
                .add(self.ifindex, ip, len)
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding {ip}/{len} to {}", self.ifname)))?;
        }
        Ok(())
    }

    /// Routes each subnet of `want` (either family; each with its preferred source) through
    /// the device (protocol 77), replacing a route of the same destination in place, so a
    /// subnet moving from VXLAN to WireGuard never has a moment without a route. Returns how
    /// many it added or changed.
    pub async fn add_routes(
        &self,
        want: &BTreeMap<IpNet, Option<IpAddr>>,
    ) -> Result<usize, WgError> {
        let have = owned_routes(&self.handle, self.ifindex).await?;
        let mut added = 0;
        for (dst, src) in want.iter().filter(|(d, s)| have.get(*d) != Some(*s)) {
            self.handle
                .route()
                .add(route(*dst, self.ifindex, *src))
                .replace()
                .execute()
                .await
                .map_err(netlink(format!("adding route {dst} via {}", self.ifname)))?;
            added += 1;
        }
        Ok(added)
    }

    /// Makes sluice's routes through the device exactly `want`. Returns the number of changes.
    pub async fn sync_routes(
        &self,
        want: &BTreeMap<IpNet, Option<IpAddr>>,
    ) -> Result<usize, WgError> {
        let have = owned_routes(&self.handle, self.ifindex).await?;
        let mut changes = 0;
        for dst in have.keys().filter(|d| !want.contains_key(*d)) {
            match self
                .handle
                .route()
                .del(route(*dst, self.ifindex, None))
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

    /// Stops the device and removes its link (and with it the routes through it).
    pub async fn close(self) {
        let ifname = self.ifname.clone();
        match self.engine {
            Engine::Userspace { device, .. } => {
                let _stopping = Stopping::begin();
                // The kernel removes the tun device with its last file descriptor.
                if tokio::time::timeout(Duration::from_secs(5), device.stop())
                    .await
                    .is_err()
                {
                    tracing::warn!(ifname, "WireGuard device did not stop within 5 s");
                }
            }
            Engine::Kernel { .. } => {
                if let Err(e) = self.handle.link().del(self.ifindex).execute().await {
                    tracing::warn!(ifname, error = %e, "cannot remove the WireGuard link");
                }
            }
        }
        tracing::info!(ifname, "WireGuard device closed");
    }
}

/// Removes the link named `ifname`, if there is one.
async fn delete_link(handle: &Handle, ifname: &str) {
    if let Ok(Some(link)) = handle
        .link()
        .get()
        .match_name(ifname.to_string())
        .execute()
        .try_next()
        .await
    {
        let _ = handle.link().del(link.header.index).execute().await;
    }
}

/// The kernel's device, configured with the key and port; `None` where the kernel has no
/// WireGuard (the userspace device takes over). A `wireguard` link left by an earlier agent is
/// taken over; a link of that name of another kind is removed first.
async fn open_kernel(
    handle: &Handle,
    ifname: &str,
    key: &KeyPair,
    listen_port: u16,
) -> Option<KernelWg> {
    for _attempt in 0..2 {
        match handle
            .link()
            .add(LinkWireguard::new(ifname).build())
            .execute()
            .await
        {
            Ok(()) => {}
            Err(e) if crate::vxlan::apply::errno(&e) == Some(nix::libc::EEXIST) => {
                let is_wireguard = KernelWg::connect(ifname).is_ok_and(|mut k| k.peers().is_ok());
                if !is_wireguard {
                    tracing::warn!(
                        ifname,
                        "a link of this name is not a WireGuard device; replacing it"
                    );
                    delete_link(handle, ifname).await;
                    continue;
                }
            }
            Err(e) => {
                tracing::info!(ifname, error = %e, "no kernel WireGuard; using the userspace device");
                return None;
            }
        }
        let configured = KernelWg::connect(ifname).and_then(|mut config| {
            config.set(kernel::set_device(
                ifname,
                Some(key.secret().to_bytes()),
                Some(listen_port),
                &PeerDiff::default(),
                false,
            ))?;
            Ok(config)
        });
        return match configured {
            Ok(config) => Some(config),
            Err(e) => {
                tracing::warn!(ifname, error = %e, "cannot configure the kernel WireGuard device; using the userspace device");
                delete_link(handle, ifname).await;
                None
            }
        };
    }
    None
}

fn route(dst: IpNet, ifindex: u32, src: Option<IpAddr>) -> RouteMessage {
    let proto = RouteProtocol::from(ROUTE_PROTOCOL);
    match dst {
        IpNet::V4(d) => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(ifindex)
                .scope(RouteScope::Link)
                .protocol(proto);
            match src {
                Some(IpAddr::V4(src)) => b.pref_source(src).build(),
                _ => b.build(),
            }
        }
        IpNet::V6(d) => {
            // IPv6 routes have no scope but universe.
            let b = RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .output_interface(ifindex)
                .protocol(proto);
            match src {
                Some(IpAddr::V6(src)) => b.pref_source(src).build(),
                _ => b.build(),
            }
        }
    }
}

/// sluice's routes of both families through the link `ifindex` in the main table, with their
/// preferred source.
pub async fn owned_routes(
    handle: &Handle,
    ifindex: u32,
) -> Result<BTreeMap<IpNet, Option<IpAddr>>, WgError> {
    let mut out = BTreeMap::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let routes: Vec<RouteMessage> = handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing routes"))?;
        out.extend(
            routes
                .iter()
                .filter(|r| {
                    r.header.protocol == RouteProtocol::from(ROUTE_PROTOCOL)
                        && route_table(r) == u32::from(RouteHeader::RT_TABLE_MAIN)
                        && route_oif(r) == Some(ifindex)
                })
                .filter_map(|r| {
                    let dst = route_addr_any(r, true)?;
                    let src = r.attributes.iter().find_map(|a| match a {
                        RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => Some(IpAddr::V4(*ip)),
                        RouteAttribute::PrefSource(RouteAddress::Inet6(ip)) => {
                            Some(IpAddr::V6(*ip))
                        }
                        _ => None,
                    });
                    Some((
                        IpNet::new(dst, r.header.destination_prefix_length).ok()?,
                        src,
                    ))
                }),
        );
    }
    Ok(out)
}
