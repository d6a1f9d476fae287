//! The doing half of pod wiring: a [`PodKernel`] applies a [`PodPlan`] and reports what is there.
//! [`RtNetlink`] does it over netlink sockets, one opened in the host namespace and one opened
//! (by entering it briefly) in the pod's.

use crate::bandwidth::{ObservedShaping, ShapingPlan};
use crate::netns::{self, NetnsError};
use crate::podnet::{PodPlan, GATEWAY, GATEWAY_V6, HOST_VETH_MAC};
use crate::ROUTE_PROTOCOL;
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{op} {target}: {source}")]
    Netlink {
        op: &'static str,
        target: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("setting {path}: {source}")]
    Sysctl {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the container already has an interface {name} that sluice did not make")]
    InterfaceExists { name: String },
    #[error("this call has no container network namespace")]
    NoPodNetns,
}

/// The hidden `sluice` subcommand that deletes one link (`INDEX NAME`) for
/// [`RtNetlink::with_background_reclaim`].
pub const DELETE_LINK_ARG: &str = "__delete-link";

/// How long DEL waits for a detached deletion before doing it in place.
const UNLINK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Deletes the link `index` of the calling thread's namespace if it is still named `name`.
pub async fn delete_link(index: u32, name: &str) -> Result<(), KernelError> {
    let handle = connect()?;
    match link_by_name(&handle, name).await? {
        Some(l) if l.header.index == index => handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(KernelError::netlink("deleting link", name)),
        _ => Ok(()),
    }
}

impl KernelError {
    pub(crate) fn netlink(
        op: &'static str,
        target: impl Into<String>,
    ) -> impl FnOnce(rtnetlink::Error) -> Self {
        let target = target.into();
        move |source| Self::Netlink { op, target, source }
    }

    /// The errno of a failed netlink request, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink {
                source: rtnetlink::Error::NetlinkError(m),
                ..
            } => m.code.map(|c| -c.get()),
            _ => None,
        }
    }
}

/// What the kernel holds for one attachment, as CHECK compares it with the plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObservedPod {
    pub host_link_up: Option<bool>,
    pub host_route: bool,
    pub pod_link_up: Option<bool>,
    pub pod_addresses: Vec<(Ipv4Addr, u8)>,
    pub pod_default_via_gateway: bool,
    /// The host route to the pod's IPv6 /128 (looked for only when the plan has one).
    pub host_route_v6: bool,
    /// The host veth holds [`GATEWAY_V6`].
    pub host_gateway_v6: bool,
    pub pod_addresses_v6: Vec<(Ipv6Addr, u8)>,
    pub pod_default_v6_via_gateway: bool,
}

/// What ADD learns about the pod's end of the veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub mac: Vec<u8>,
}

/// The kernel operations pod wiring needs. Each step is its own call so that a failure at any of
/// them can be injected in tests and the caller's rollback proven.
#[allow(async_fn_in_trait)]
pub trait PodKernel {
    /// Creates the veth pair (host side in the host namespace, pod side in the pod's) with the
    /// host side up. An existing host side of the same name is replaced.
    async fn create_veth(&mut self, plan: &PodPlan) -> Result<PodLink, KernelError>;
    /// Host side: proxy ARP for the gateway, and the route to the pod's /32; with an IPv6
    /// address, IPv6 on without DAD, [`GATEWAY_V6`] on the veth and the route to the pod's /128.
    async fn configure_host(&mut self, plan: &PodPlan) -> Result<(), KernelError>;
    /// Pod side: up, the /32, the gateway's neighbour entry and routes; with an IPv6 address,
    /// IPv6 on without DAD, the /128, [`GATEWAY_V6`]'s neighbour entry and `::/0` through it.
    async fn configure_pod(&mut self, plan: &PodPlan) -> Result<(), KernelError>;
    /// Deletes a host link (and so its veth peer); false if it was not there.
    async fn delete_host_link(&mut self, name: &str) -> Result<bool, KernelError>;
    /// Like [`delete_host_link`](Self::delete_host_link), but returns once the link and its
    /// routes are gone from the namespace, possibly before the kernel has finished reclaiming
    /// it; DEL uses it to stay off the pod's critical path.
    async fn unlink_host_link(&mut self, name: &str) -> Result<bool, KernelError> {
        self.delete_host_link(name).await
    }
    /// What is in place for `plan`.
    async fn observe(&mut self, plan: &PodPlan) -> Result<ObservedPod, KernelError>;
    /// Names of the veth links in the host namespace.
    async fn host_veths(&mut self) -> Result<Vec<String>, KernelError>;
    /// Shapes the attachment whose host veth is `host_ifname` as `plan` says
    /// ([`crate::shaping::apply`]); idempotent.
    async fn apply_shaping(
        &mut self,
        host_ifname: &str,
        plan: &ShapingPlan,
    ) -> Result<(), KernelError>;
    /// Deletes the attachment's ifb, the one piece of shaping that outlives the veth; false if
    /// there was none.
    async fn remove_shaping(&mut self, host_ifname: &str) -> Result<bool, KernelError>;
    /// What shaping is in place for the attachment.
    async fn observe_shaping(&mut self, host_ifname: &str) -> Result<ObservedShaping, KernelError>;
    /// Names of the shaping ifb devices in the host namespace.
    async fn shaping_ifbs(&mut self) -> Result<Vec<String>, KernelError>;
}

/// [`PodKernel`] over rtnetlink. Must be made inside a tokio runtime (it spawns its connections).
pub struct RtNetlink {
    host: Handle,
    pod: Option<PodNs>,
    /// The `sluice` executable, to run [`DELETE_LINK_ARG`] in a detached process.
    reclaimer: Option<PathBuf>,
    /// Root of `/proc/sys` for the host namespace; the calling thread's namespace is the host's.
    sysctl_root: PathBuf,
}

struct PodNs {
    handle: Handle,
    file: std::fs::File,
    path: PathBuf,
}

fn connect() -> Result<Handle, KernelError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(KernelError::Socket)?;
    tokio::spawn(conn);
    Ok(handle)
}

impl RtNetlink {
    /// Connects to the calling thread's namespace (the host's), and to `pod_netns` if given.
    pub fn connect(pod_netns: Option<&Path>) -> Result<Self, KernelError> {
        let host = connect()?;
        let pod = match pod_netns {
            None => None,
            Some(path) => {
                let file = netns::open(path)?;
                let handle = netns::run_in(&file, path, connect)??;
                Some(PodNs {
                    handle,
                    file,
                    path: path.to_path_buf(),
                })
            }
        };
        Ok(Self {
            host,
            pod,
            reclaimer: None,
            sysctl_root: PathBuf::from("/proc/sys"),
        })
    }

    /// Lets [`PodKernel::unlink_host_link`] hand a link's deletion to `exe DELETE_LINK_ARG INDEX
    /// NAME`, a detached process. Deleting a veth takes the kernel ~15-20 ms, nearly all of it an
    /// `rcu_barrier()` that runs after the link has already left the namespace; the detached
    /// process sits out that wait instead of the runtime that called DEL.
    pub fn with_background_reclaim(mut self, exe: PathBuf) -> Self {
        self.reclaimer = Some(exe);
        self
    }

    fn pod(&self) -> Result<&PodNs, KernelError> {
        self.pod.as_ref().ok_or(KernelError::NoPodNetns)
    }

    pub(crate) fn sysctl(&self, key: &str, value: &str) -> Result<(), KernelError> {
        write_sysctl(&self.sysctl_root.join(key), value)
    }

    /// Sets `key` in the pod's namespace: `/proc/sys/net` shows the namespace of the thread that
    /// opens it, so the write is done from inside.
    fn pod_sysctl(&self, key: &str, value: &str) -> Result<(), KernelError> {
        let pod = self.pod()?;
        let path = Path::new("/proc/sys").join(key);
        netns::run_in(&pod.file, &pod.path, || write_sysctl(&path, value))?
    }
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), KernelError> {
    std::fs::write(path, value).map_err(|source| KernelError::Sysctl {
        path: path.display().to_string(),
        source,
    })
}

/// IPv6 on for `ifname` without duplicate address detection: the addresses on a pod's veth are
/// sluice's to give, and DAD would hold them back (tentative) for a second after ADD.
const IPV6_SYSCTLS: [(&str, &str); 2] = [("disable_ipv6", "0"), ("accept_dad", "0")];

fn ipv6_sysctl(ifname: &str, key: &str) -> String {
    format!("net/ipv6/conf/{ifname}/{key}")
}

/// Adds `address/prefix_len` on `index` without DAD (replacing it if it is there).
async fn add_address_nodad(
    handle: &Handle,
    index: u32,
    address: Ipv6Addr,
    prefix_len: u8,
) -> Result<(), KernelError> {
    let mut req = handle
        .address()
        .add(index, IpAddr::V6(address), prefix_len)
        .replace();
    let msg = req.message_mut();
    msg.header.flags |= AddressHeaderFlags::Nodad;
    msg.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    req.execute()
        .await
        .map_err(KernelError::netlink("adding address", address.to_string()))
}

async fn addresses_v6(
    handle: &Handle,
    index: u32,
    ifname: &str,
) -> Result<Vec<(Ipv6Addr, u8)>, KernelError> {
    let addrs: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(KernelError::netlink("listing addresses on", ifname))?;
    Ok(addrs
        .iter()
        .filter(|a| a.header.index == index)
        .filter_map(|a| {
            a.attributes.iter().find_map(|at| match at {
                AddressAttribute::Address(IpAddr::V6(ip)) => Some((*ip, a.header.prefix_len)),
                _ => None,
            })
        })
        .collect())
}

pub(crate) async fn link_by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, KernelError> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) => {
            let e = KernelError::netlink("looking up link", name)(e);
            if e.errno() == Some(nix::libc::ENODEV) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

pub(crate) fn is_up(link: &LinkMessage) -> bool {
    link.header.flags.contains(LinkFlags::Up)
}

fn mac_of(link: &LinkMessage) -> Vec<u8> {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(m) => Some(m.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

fn is_veth(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))),
        _ => false,
    })
}

pub(crate) fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn host_route(address: Ipv4Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(address, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build()
}

/// The IPv4 half of a pod's end: its /32, the static gateway neighbour, and the default route
/// via [`GATEWAY`].
async fn configure_pod_v4(
    pod: &Handle,
    index: u32,
    address: Ipv4Addr,
    pod_ifname: &str,
) -> Result<(), KernelError> {
    pod.address()
        .add(index, IpAddr::V4(address), 32)
        .replace()
        .execute()
        .await
        .map_err(KernelError::netlink("adding address", address.to_string()))?;
    pod.neighbours()
        .add(index, IpAddr::V4(GATEWAY))
        .link_layer_address(&HOST_VETH_MAC)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(KernelError::netlink(
            "adding gateway neighbour on",
            pod_ifname.to_string(),
        ))?;
    let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(GATEWAY, 32)
        .output_interface(index)
        .scope(RouteScope::Link)
        .build();
    replace_route(
        pod,
        to_gateway,
        "adding gateway route on",
        pod_ifname.to_string(),
    )
    .await?;
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(GATEWAY)
        .output_interface(index)
        .build();
    replace_route(
        pod,
        default,
        "adding default route on",
        pod_ifname.to_string(),
    )
    .await?;
    Ok(())
}

fn host_route_v6(address: Ipv6Addr, index: u32) -> RouteMessage {
    RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(address, 128)
        .output_interface(index)
        .protocol(RouteProtocol::from(ROUTE_PROTOCOL))
        .build()
}

async fn routes_v6(handle: &Handle) -> Result<Vec<RouteMessage>, KernelError> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv6Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(KernelError::netlink("listing routes", "ipv6"))
}

fn route_addr_v6(
    r: &RouteMessage,
    want: fn(&RouteAttribute) -> Option<&RouteAddress>,
) -> Option<Ipv6Addr> {
    r.attributes.iter().find_map(|a| match want(a) {
        Some(RouteAddress::Inet6(ip)) => Some(*ip),
        _ => None,
    })
}

/// Adds `route`, replacing one to the same destination (what every route of a pod plan wants).
async fn replace_route(
    handle: &Handle,
    route: RouteMessage,
    op: &'static str,
    target: impl Into<String>,
) -> Result<(), KernelError> {
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(KernelError::netlink(op, target))
}

async fn routes(handle: &Handle) -> Result<Vec<RouteMessage>, KernelError> {
    handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(KernelError::netlink("listing routes", "ipv4"))
}

fn route_oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

fn route_addr(
    r: &RouteMessage,
    want: fn(&RouteAttribute) -> Option<&RouteAddress>,
) -> Option<Ipv4Addr> {
    r.attributes.iter().find_map(|a| match want(a) {
        Some(RouteAddress::Inet(ip)) => Some(*ip),
        _ => None,
    })
}

fn dst_of(a: &RouteAttribute) -> Option<&RouteAddress> {
    match a {
        RouteAttribute::Destination(d) => Some(d),
        _ => None,
    }
}

fn gw_of(a: &RouteAttribute) -> Option<&RouteAddress> {
    match a {
        RouteAttribute::Gateway(g) => Some(g),
        _ => None,
    }
}

impl PodKernel for RtNetlink {
    async fn create_veth(&mut self, plan: &PodPlan) -> Result<PodLink, KernelError> {
        let pod = self.pod()?;
        if let Some(existing) = link_by_name(&pod.handle, &plan.pod_ifname).await? {
            // A repeated ADD finds its own veth: the host side of the same name goes, and its peer
            // with it. Anything else of that name is not sluice's to remove.
            let ours = link_by_name(&self.host, &plan.host_ifname).await?;
            if ours.is_none() || !is_veth(&existing) {
                return Err(KernelError::InterfaceExists {
                    name: plan.pod_ifname.clone(),
                });
            }
        }
        self.delete_host_link(&plan.host_ifname).await?;
        let pod = self.pod()?;
        let peer = LinkMessageBuilder::<LinkUnspec>::new()
            .name(plan.pod_ifname.clone())
            .mtu(plan.mtu)
            .setns_by_fd(pod.file.as_raw_fd())
            .build();
        let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
            .name(plan.host_ifname.clone())
            .mtu(plan.mtu)
            .address(HOST_VETH_MAC.to_vec())
            .up()
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.host
            .link()
            .add(veth)
            .execute()
            .await
            .map_err(KernelError::netlink(
                "creating veth",
                plan.host_ifname.clone(),
            ))?;
        let link = link_by_name(&pod.handle, &plan.pod_ifname)
            .await?
            .ok_or_else(|| KernelError::InterfaceExists {
                name: plan.pod_ifname.clone(),
            })?;
        Ok(PodLink { mac: mac_of(&link) })
    }

    async fn configure_host(&mut self, plan: &PodPlan) -> Result<(), KernelError> {
        let host = &plan.host_ifname;
        if plan.address.is_some() {
            // Proxy ARP answers the pod's ARP for the gateway should its static entry be
            // flushed; without proxy_delay=0 each answer waits up to 80 ms.
            self.sysctl(&format!("net/ipv4/conf/{host}/proxy_arp"), "1")?;
            self.sysctl(&format!("net/ipv4/neigh/{host}/proxy_delay"), "0")?;
        }
        let link = link_by_name(&self.host, host).await?.ok_or_else(|| {
            KernelError::netlink("looking up link", host.clone())(rtnetlink::Error::RequestFailed)
        })?;
        let index = link.header.index;
        if let Some(address) = plan.address {
            replace_route(
                &self.host,
                host_route(address, index),
                "adding host route to",
                address.to_string(),
            )
            .await?;
        }
        let Some(v6) = plan.address_v6 else {
            return Ok(());
        };
        // Set before the pod's end comes up (configure_pod): the kernel derives the veth's
        // link-local address when the link gets its carrier, and without DAD it is usable at
        // once. It is added here too, so it is there whatever addr_gen_mode the host runs.
        for (key, value) in IPV6_SYSCTLS {
            self.sysctl(&ipv6_sysctl(host, key), value)?;
        }
        add_address_nodad(&self.host, index, GATEWAY_V6, 64).await?;
        replace_route(
            &self.host,
            host_route_v6(v6, index),
            "adding host route to",
            v6.to_string(),
        )
        .await
    }

    async fn configure_pod(&mut self, plan: &PodPlan) -> Result<(), KernelError> {
        if plan.address_v6.is_some() {
            // Before the link comes up, so that not even its link-local address waits for DAD.
            for (key, value) in IPV6_SYSCTLS {
                self.pod_sysctl(&ipv6_sysctl(&plan.pod_ifname, key), value)?;
            }
        }
        let pod = &self.pod()?.handle;
        let index = link_by_name(pod, &plan.pod_ifname)
            .await?
            .ok_or_else(|| {
                KernelError::netlink("looking up link", plan.pod_ifname.clone())(
                    rtnetlink::Error::RequestFailed,
                )
            })?
            .header
            .index;
        // The peer cannot be brought up in the same request that creates it (the kernel answers
        // ENOTCONN until both ends exist), so it is brought up here.
        pod.link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(KernelError::netlink("bringing up", plan.pod_ifname.clone()))?;
        if let Some(address) = plan.address {
            configure_pod_v4(pod, index, address, &plan.pod_ifname).await?;
        }
        let Some(v6) = plan.address_v6 else {
            return Ok(());
        };
        add_address_nodad(pod, index, v6, 128).await?;
        // As for IPv4: a static entry, so the pod never waits on neighbour discovery for its
        // gateway (the host veth answers for it too, since it holds the address).
        pod.neighbours()
            .add(index, IpAddr::V6(GATEWAY_V6))
            .link_layer_address(&HOST_VETH_MAC)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(KernelError::netlink(
                "adding IPv6 gateway neighbour on",
                plan.pod_ifname.clone(),
            ))?;
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(GATEWAY_V6)
            .output_interface(index)
            .build();
        replace_route(
            pod,
            default,
            "adding IPv6 default route on",
            plan.pod_ifname.clone(),
        )
        .await
    }

    async fn delete_host_link(&mut self, name: &str) -> Result<bool, KernelError> {
        let Some(link) = link_by_name(&self.host, name).await? else {
            return Ok(false);
        };
        match self.host.link().del(link.header.index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let e = KernelError::netlink("deleting link", name)(e);
                // Gone between the lookup and the delete: a concurrent DEL won.
                if e.errno() == Some(nix::libc::ENODEV) {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn unlink_host_link(&mut self, name: &str) -> Result<bool, KernelError> {
        let Some(link) = link_by_name(&self.host, name).await? else {
            return Ok(false);
        };
        let index = link.header.index;
        let Some(exe) = &self.reclaimer else {
            return self.delete_host_link(name).await;
        };
        let spawned = std::process::Command::new(exe)
            .arg(DELETE_LINK_ARG)
            .arg(index.to_string())
            .arg(name)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "cannot spawn the link reclaimer; deleting in place");
                return self.delete_host_link(name).await;
            }
        };
        let deadline = std::time::Instant::now() + UNLINK_WAIT;
        loop {
            match link_by_name(&self.host, name).await? {
                None => return Ok(true),
                Some(l) if l.header.index != index => return Ok(true),
                Some(_) => {}
            }
            // The helper ended and the link is still there (it failed), or it is taking too
            // long: delete in place, which reports the kernel's error if there is one.
            let finished = matches!(child.try_wait(), Ok(Some(_)) | Err(_));
            if finished || std::time::Instant::now() > deadline {
                return self.delete_host_link(name).await;
            }
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        // `child` is dropped without waiting: it finishes the kernel's reclaim on its own.
    }

    async fn observe(&mut self, plan: &PodPlan) -> Result<ObservedPod, KernelError> {
        let mut seen = ObservedPod::default();
        if let Some(host) = link_by_name(&self.host, &plan.host_ifname).await? {
            seen.host_link_up = Some(is_up(&host));
            let index = host.header.index;
            seen.host_route = routes(&self.host).await?.iter().any(|r| {
                r.header.destination_prefix_length == 32
                    && route_oif(r) == Some(index)
                    && plan.address.is_some()
                    && route_addr(r, dst_of) == plan.address
            });
            if let Some(v6) = plan.address_v6 {
                seen.host_route_v6 = routes_v6(&self.host).await?.iter().any(|r| {
                    r.header.destination_prefix_length == 128
                        && route_oif(r) == Some(index)
                        && route_addr_v6(r, dst_of) == Some(v6)
                });
                seen.host_gateway_v6 = addresses_v6(&self.host, index, &plan.host_ifname)
                    .await?
                    .iter()
                    .any(|(a, _)| *a == GATEWAY_V6);
            }
        }
        let pod = &self.pod()?.handle;
        if let Some(link) = link_by_name(pod, &plan.pod_ifname).await? {
            seen.pod_link_up = Some(is_up(&link));
            let index = link.header.index;
            let addrs: Vec<_> = pod
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect()
                .await
                .map_err(KernelError::netlink(
                    "listing addresses on",
                    plan.pod_ifname.clone(),
                ))?;
            seen.pod_addresses = addrs
                .iter()
                .filter(|a| a.header.index == index)
                .filter_map(|a| {
                    a.attributes.iter().find_map(|at| match at {
                        AddressAttribute::Address(IpAddr::V4(ip)) => {
                            Some((*ip, a.header.prefix_len))
                        }
                        _ => None,
                    })
                })
                .collect();
            seen.pod_default_via_gateway = routes(pod).await?.iter().any(|r| {
                r.header.destination_prefix_length == 0
                    && route_oif(r) == Some(index)
                    && route_addr(r, gw_of) == Some(GATEWAY)
            });
            if plan.address_v6.is_some() {
                seen.pod_addresses_v6 = addresses_v6(pod, index, &plan.pod_ifname).await?;
                seen.pod_default_v6_via_gateway = routes_v6(pod).await?.iter().any(|r| {
                    r.header.destination_prefix_length == 0
                        && route_oif(r) == Some(index)
                        && route_addr_v6(r, gw_of) == Some(GATEWAY_V6)
                });
            }
        }
        Ok(seen)
    }

    async fn host_veths(&mut self) -> Result<Vec<String>, KernelError> {
        let links: Vec<LinkMessage> = self
            .host
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(KernelError::netlink("listing links", "host"))?;
        Ok(links
            .iter()
            .filter(|l| is_veth(l))
            .filter_map(name_of)
            .map(str::to_string)
            .collect())
    }

    async fn apply_shaping(
        &mut self,
        host_ifname: &str,
        plan: &ShapingPlan,
    ) -> Result<(), KernelError> {
        crate::shaping::apply(&self.host, host_ifname, plan).await
    }

    async fn remove_shaping(&mut self, host_ifname: &str) -> Result<bool, KernelError> {
        crate::shaping::remove(&self.host, host_ifname).await
    }

    async fn observe_shaping(&mut self, host_ifname: &str) -> Result<ObservedShaping, KernelError> {
        crate::shaping::observe(&self.host, host_ifname).await
    }

    async fn shaping_ifbs(&mut self) -> Result<Vec<String>, KernelError> {
        crate::shaping::ifbs(&self.host).await
    }
}
