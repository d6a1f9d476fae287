//! Builds the lab's underlay from its plan over netlink: the underlay namespace with one bridge
//! per segment, a namespace per node linked to its segment's bridge. Teardown is `down`'s job.

use super::plan::{LabPlan, NODE_UPLINK, UNDERLAY_MTU};
use anyhow::{anyhow, Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};
use sluice_net::netns;
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;

/// A netlink connection opened inside a named namespace, and the namespace's file.
pub struct NsHandle {
    pub name: String,
    pub file: File,
    pub handle: Handle,
}

impl NsHandle {
    pub fn open(name: &str) -> Result<Self> {
        let path = netns::named_path(name);
        let file = netns::open(&path)?;
        let (conn, handle, _) = netns::run_in(&file, &path, rtnetlink::new_connection)?
            .with_context(|| format!("opening netlink in {name}"))?;
        tokio::spawn(conn);
        Ok(Self {
            name: name.into(),
            file,
            handle,
        })
    }

    pub async fn link(&self, name: &str) -> Result<LinkMessage> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        links
            .try_next()
            .await
            .with_context(|| format!("looking up {name} in {}", self.name))?
            .ok_or_else(|| anyhow!("no link {name} in {}", self.name))
    }

    pub async fn up(&self, name: &str) -> Result<u32> {
        let index = self.link(name).await?.header.index;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .with_context(|| format!("bringing up {name} in {}", self.name))?;
        Ok(index)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = Path::new("/proc/sys").join(key);
        netns::run_in(&self.file, &netns::named_path(&self.name), || {
            std::fs::write(&path, value)
        })?
        .with_context(|| format!("setting {key}={value} in {}", self.name))
    }

    /// Adds `net` on `index`. An IPv6 address skips duplicate address detection: every
    /// address in the lab is the lab's own, and a tentative one cannot be bound (a test's
    /// server in the internet namespace would fail with EADDRNOTAVAIL for up to two seconds).
    async fn address(&self, index: u32, net: impl Into<ipnet::IpNet>, what: &str) -> Result<()> {
        let net: ipnet::IpNet = net.into();
        let mut req = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .replace();
        if net.addr().is_ipv6() {
            let msg = req.message_mut();
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        req.execute()
            .await
            .with_context(|| format!("adding {net} to {what} in {}", self.name))
    }
}

/// Creates a namespace with `lo` up (as a container runtime leaves a pod's).
pub async fn namespace(name: &str) -> Result<NsHandle> {
    netns::create_named(name).with_context(|| format!("creating network namespace {name}"))?;
    let ns = NsHandle::open(name)?;
    ns.up("lo").await?;
    Ok(ns)
}

fn explain_missing(kind: &str, e: anyhow::Error) -> anyhow::Error {
    let not_supported = e.chain().any(|c| {
        let s = c.to_string();
        s.contains("Operation not supported") || s.contains("No such file or directory")
    });
    if not_supported {
        e.context(format!(
            "this kernel cannot make {kind} links (module not loaded or not built)"
        ))
    } else {
        e
    }
}

/// A veth from the underlay namespace (`name`) to `ns` (`eth0`).
async fn uplink(underlay: &NsHandle, ns: &NsHandle, name: &str) -> Result<()> {
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(NODE_UPLINK.to_string())
        .mtu(UNDERLAY_MTU)
        .setns_by_fd(ns.file.as_raw_fd())
        .build();
    let veth = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
        .name(name.to_string())
        .mtu(UNDERLAY_MTU)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    underlay
        .handle
        .link()
        .add(veth)
        .execute()
        .await
        .with_context(|| format!("creating the underlay link of {}", ns.name))
        .map_err(|e| explain_missing("veth", e))
}

async fn default_route(ns: &NsHandle, via: Ipv4Addr) -> Result<()> {
    let default = RouteMessageBuilder::<Ipv4Addr>::new().gateway(via).build();
    ns.handle
        .route()
        .add(default)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding the default route of {}", ns.name))
}

/// A dual-stack lab's IPv6 default route of `ns` (its way out to the lab's internet).
async fn default_route_v6(ns: &NsHandle, via: Option<ipnet::Ipv6Net>) -> Result<()> {
    let Some(via) = via else {
        return Ok(());
    };
    let default = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
        .gateway(via.addr())
        .build();
    ns.handle
        .route()
        .add(default)
        .replace()
        .execute()
        .await
        .with_context(|| format!("adding the IPv6 default route of {}", ns.name))
}

/// Builds the underlay. `step` prints a progress line.
pub async fn build(plan: &LabPlan, step: &mut dyn FnMut(String)) -> Result<()> {
    let underlay = namespace(&plan.underlay_netns).await?;
    underlay.sysctl("net/ipv4/ip_forward", "1")?;
    let any_v6 = plan.segments.iter().any(|s| s.gateway_v6.is_some());
    if any_v6 {
        underlay.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        // The lab's IPv6 addresses are its own: no duplicate to detect, and a tunnel's local
        // address must be usable at once (a tentative one cannot be bound).
        underlay.sysctl("net/ipv6/conf/default/accept_dad", "0")?;
    }
    for seg in &plan.segments {
        underlay
            .handle
            .link()
            .add(LinkBridge::new(&seg.bridge).mtu(UNDERLAY_MTU).up().build())
            .execute()
            .await
            .with_context(|| format!("creating bridge {}", seg.bridge))
            .map_err(|e| explain_missing("bridge", e))?;
        let index = underlay.link(&seg.bridge).await?.header.index;
        underlay.address(index, seg.gateway, &seg.bridge).await?;
        if let Some(v6) = seg.gateway_v6 {
            underlay.address(index, v6, &seg.bridge).await?;
        }
    }
    step(format!(
        "underlay: namespace {}, {} segment(s) {}",
        plan.underlay_netns,
        plan.segments.len(),
        plan.segments
            .iter()
            .map(|s| s.gateway.trunc().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let internet = namespace(&plan.internet.netns).await?;
    uplink(&underlay, &internet, &plan.internet.uplink).await?;
    let inet = underlay.up(&plan.internet.uplink).await?;
    underlay
        .address(inet, plan.internet.gateway, &plan.internet.uplink)
        .await?;
    let eth0 = internet.up(NODE_UPLINK).await?;
    internet
        .address(eth0, plan.internet.address, NODE_UPLINK)
        .await?;
    default_route(&internet, plan.internet.gateway.addr()).await?;
    if let (Some(addr), Some(gw)) = (plan.internet.address_v6, plan.internet.gateway_v6) {
        underlay.address(inet, gw, &plan.internet.uplink).await?;
        internet.address(eth0, addr, NODE_UPLINK).await?;
        default_route_v6(&internet, Some(gw)).await?;
    }
    step(format!(
        "internet: namespace {}, {} (no route to pods: it sees them only masqueraded)",
        plan.internet.netns, plan.internet.address
    ));
    for node in &plan.nodes {
        let ns = namespace(&node.netns).await?;
        let seg = &plan.segments[node.segment];
        uplink(&underlay, &ns, &node.uplink).await?;
        let bridge = underlay.link(&seg.bridge).await?.header.index;
        let uplink = underlay.link(&node.uplink).await?.header.index;
        underlay
            .handle
            .link()
            .set(
                LinkUnspec::new_with_index(uplink)
                    .controller(bridge)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .with_context(|| format!("attaching {} to {}", node.uplink, seg.bridge))?;
        let eth0 = ns.up(NODE_UPLINK).await?;
        ns.address(eth0, node.underlay, NODE_UPLINK).await?;
        default_route(&ns, seg.gateway.addr()).await?;
        if let Some(v6) = node.underlay_v6 {
            ns.sysctl(&format!("net/ipv6/conf/{NODE_UPLINK}/accept_dad"), "0")?;
            ns.address(eth0, v6, NODE_UPLINK).await?;
            default_route_v6(&ns, seg.gateway_v6).await?;
        }
        ns.sysctl("net/ipv4/ip_forward", "1")?;
        step(format!(
            "node {}: namespace {}, underlay {}{} on {}",
            node.name,
            node.netns,
            node.underlay,
            node.underlay_v6
                .map(|v6| format!(" and {v6}"))
                .unwrap_or_default(),
            seg.bridge
        ));
    }
    Ok(())
}
