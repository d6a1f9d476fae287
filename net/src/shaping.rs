//! The doing half of [`crate::bandwidth`]: applies a [`ShapingPlan`] to a pod's host veth over
//! netlink, as the containernetworking-plugins `bandwidth` plugin does (no `tc` binary).
//!
//! - Traffic to the pod: a tbf as the host veth's root qdisc (`handle 1:`).
//! - Traffic from the pod: the host veth's ingress qdisc with one u32 filter matching every packet
//!   whose mirred action redirects it to the attachment's ifb device ([`ifb_name`]), whose root
//!   qdisc is a tbf. The ifb hands the packets back to the stack as arriving on the host veth.
//!
//! The messages are built in [`crate::tc`]; here they are only sent and read back. Everything on
//! the host veth goes with the veth; only the ifb has to be deleted ([`remove`]).

use crate::bandwidth::{ifb_name, is_ifb_name, ObservedShaping, ShapingPlan};
use crate::kernel::{is_up, link_by_name, name_of, KernelError};
use crate::tc;
use futures::StreamExt;
use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::tc::TcMessage;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec};

/// Sends one request and waits for its acknowledgement.
async fn send(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
    op: &'static str,
    target: &str,
) -> Result<(), KernelError> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    let mut answers = handle
        .clone()
        .request(req)
        .map_err(KernelError::netlink(op, target))?;
    while let Some(answer) = answers.next().await {
        if let NetlinkPayload::Error(e) = answer.payload {
            return Err(KernelError::netlink(op, target)(
                rtnetlink::Error::NetlinkError(e),
            ));
        }
    }
    Ok(())
}

/// Dumps qdiscs or filters; only the messages of device `index` are kept.
async fn dump(
    handle: &Handle,
    msg: RouteNetlinkMessage,
    index: u32,
    op: &'static str,
    target: &str,
) -> Result<Vec<TcMessage>, KernelError> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut answers = handle
        .clone()
        .request(req)
        .map_err(KernelError::netlink(op, target))?;
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::InnerMessage(
                RouteNetlinkMessage::NewQueueDiscipline(m)
                | RouteNetlinkMessage::NewTrafficFilter(m),
            ) if i64::from(m.header.index) == i64::from(index) => out.push(m),
            NetlinkPayload::Error(e) => {
                return Err(KernelError::netlink(op, target)(
                    rtnetlink::Error::NetlinkError(e),
                ))
            }
            _ => {}
        }
    }
    Ok(out)
}

async fn qdiscs(handle: &Handle, index: u32, name: &str) -> Result<Vec<TcMessage>, KernelError> {
    let mut ask = TcMessage::default();
    ask.header.index = i32::try_from(index).unwrap_or(i32::MAX);
    dump(
        handle,
        RouteNetlinkMessage::GetQueueDiscipline(ask),
        index,
        "listing qdiscs of",
        name,
    )
    .await
}

fn is_kind(link: &LinkMessage, kind: &InfoKind) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(k) if k == kind)),
        _ => false,
    })
}

fn mtu_of(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

fn missing(name: &str) -> KernelError {
    KernelError::netlink("looking up link", name)(rtnetlink::Error::RequestFailed)
}

/// Makes the pod's shaping what `plan` says; repeating it changes nothing. A direction the plan
/// leaves unshaped has its tbf (and for egress, the redirect and the ifb) removed.
pub async fn apply(
    handle: &Handle,
    host_ifname: &str,
    plan: &ShapingPlan,
) -> Result<(), KernelError> {
    let host = link_by_name(handle, host_ifname)
        .await?
        .ok_or_else(|| missing(host_ifname))?;
    let index = host.header.index;
    let present = qdiscs(handle, index, host_ifname).await?;
    let has_root_tbf = present
        .iter()
        .any(|q| q.header.handle == tc::TBF_HANDLE && tc::kind_of(q) == Some(tc::TBF_KIND));
    let has_ingress = present
        .iter()
        .any(|q| q.header.handle == tc::INGRESS_HANDLE);
    match &plan.ingress {
        // Replace: creates it, or changes the tbf in place.
        Some(tbf) => {
            send(
                handle,
                RouteNetlinkMessage::NewQueueDiscipline(tc::tbf_qdisc(index, tbf)),
                NLM_F_CREATE | NLM_F_REPLACE,
                "shaping traffic to the pod on",
                host_ifname,
            )
            .await?
        }
        None if has_root_tbf => {
            send(
                handle,
                RouteNetlinkMessage::DelQueueDiscipline(tc::root_qdisc(index)),
                0,
                "removing the tbf of",
                host_ifname,
            )
            .await?
        }
        None => {}
    }
    let ifb = ifb_name(host_ifname);
    match &plan.egress {
        Some(tbf) => {
            let ifb_index = ensure_ifb(handle, &ifb, mtu_of(&host)).await?;
            send(
                handle,
                RouteNetlinkMessage::NewQueueDiscipline(tc::tbf_qdisc(ifb_index, tbf)),
                NLM_F_CREATE | NLM_F_REPLACE,
                "shaping traffic from the pod on",
                &ifb,
            )
            .await?;
            let redirects = if has_ingress {
                redirect_targets(handle, index, host_ifname).await?
            } else {
                Vec::new()
            };
            if redirects != [ifb_index] {
                // Anything else on the ingress qdisc goes with it; the fresh one holds one filter.
                if has_ingress {
                    delete_ingress(handle, index, host_ifname).await?;
                }
                send(
                    handle,
                    RouteNetlinkMessage::NewQueueDiscipline(tc::ingress_qdisc(index)),
                    NLM_F_CREATE | NLM_F_EXCL,
                    "adding the ingress qdisc to",
                    host_ifname,
                )
                .await?;
                send(
                    handle,
                    RouteNetlinkMessage::NewTrafficFilter(tc::redirect_filter(index, ifb_index)),
                    NLM_F_CREATE | NLM_F_EXCL,
                    "redirecting traffic from the pod to",
                    &ifb,
                )
                .await?;
            }
        }
        None => {
            if has_ingress {
                delete_ingress(handle, index, host_ifname).await?;
            }
            delete_ifb(handle, &ifb).await?;
        }
    }
    Ok(())
}

async fn delete_ingress(handle: &Handle, index: u32, name: &str) -> Result<(), KernelError> {
    send(
        handle,
        RouteNetlinkMessage::DelQueueDiscipline(tc::ingress_qdisc(index)),
        0,
        "removing the ingress qdisc of",
        name,
    )
    .await
}

async fn redirect_targets(
    handle: &Handle,
    index: u32,
    name: &str,
) -> Result<Vec<u32>, KernelError> {
    let filters = dump(
        handle,
        RouteNetlinkMessage::GetTrafficFilter(tc::ingress_filters(index)),
        index,
        "listing ingress filters of",
        name,
    )
    .await?;
    // A u32 filter dumps its hash table too; only entries with actions redirect.
    Ok(filters.iter().filter_map(tc::redirect_target).collect())
}

/// The ifb `name`, made (up, with `mtu`) if missing; its index. A link of that name that is not
/// an ifb is refused: sluice did not make it.
async fn ensure_ifb(handle: &Handle, name: &str, mtu: Option<u32>) -> Result<u32, KernelError> {
    match link_by_name(handle, name).await? {
        Some(link) if is_kind(&link, &InfoKind::Ifb) => {
            if !is_up(&link) {
                handle
                    .link()
                    .set(LinkUnspec::new_with_index(link.header.index).up().build())
                    .execute()
                    .await
                    .map_err(KernelError::netlink("bringing up", name))?;
            }
            Ok(link.header.index)
        }
        Some(_) => Err(KernelError::InterfaceExists {
            name: name.to_string(),
        }),
        None => {
            let mut b = LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Ifb)
                .name(name.to_string())
                .up();
            if let Some(mtu) = mtu {
                b = b.mtu(mtu);
            }
            handle
                .link()
                .add(b.build())
                .execute()
                .await
                .map_err(KernelError::netlink("creating ifb", name))?;
            Ok(link_by_name(handle, name)
                .await?
                .ok_or_else(|| missing(name))?
                .header
                .index)
        }
    }
}

/// Deletes the ifb `name` if it is there and is an ifb; whether it was.
async fn delete_ifb(handle: &Handle, name: &str) -> Result<bool, KernelError> {
    let Some(link) = link_by_name(handle, name).await? else {
        return Ok(false);
    };
    if !is_kind(&link, &InfoKind::Ifb) {
        return Ok(false);
    }
    match handle.link().del(link.header.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) => {
            let e = KernelError::netlink("deleting ifb", name)(e);
            // Gone between the lookup and the delete: a concurrent DEL won.
            if e.errno() == Some(nix::libc::ENODEV) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Removes what [`apply`] made that does not go with the host veth: the ifb. False if there was none.
pub async fn remove(handle: &Handle, host_ifname: &str) -> Result<bool, KernelError> {
    delete_ifb(handle, &ifb_name(host_ifname)).await
}

/// What shaping the kernel holds for the attachment whose host veth is `host_ifname`.
pub async fn observe(handle: &Handle, host_ifname: &str) -> Result<ObservedShaping, KernelError> {
    let mut seen = ObservedShaping::default();
    let ifb = ifb_name(host_ifname);
    let ifb_link = link_by_name(handle, &ifb)
        .await?
        .filter(|l| is_kind(l, &InfoKind::Ifb));
    if let Some(link) = &ifb_link {
        seen.ifb_up = Some(is_up(link));
        seen.egress = qdiscs(handle, link.header.index, &ifb)
            .await?
            .iter()
            .filter(|q| q.header.parent == netlink_packet_route::tc::TcHandle::ROOT)
            .find_map(tc::parse_tbf);
    }
    let Some(host) = link_by_name(handle, host_ifname).await? else {
        return Ok(seen);
    };
    seen.host_present = true;
    let index = host.header.index;
    let present = qdiscs(handle, index, host_ifname).await?;
    seen.ingress = present
        .iter()
        .filter(|q| q.header.parent == netlink_packet_route::tc::TcHandle::ROOT)
        .find_map(tc::parse_tbf);
    if present
        .iter()
        .any(|q| q.header.handle == tc::INGRESS_HANDLE)
    {
        let targets = redirect_targets(handle, index, host_ifname).await?;
        seen.redirect_to_ifb = ifb_link
            .as_ref()
            .is_some_and(|l| targets.contains(&l.header.index));
    }
    Ok(seen)
}

/// Names of the ifb devices in the namespace that have the shape of sluice's ([`is_ifb_name`]).
pub async fn ifbs(handle: &Handle) -> Result<Vec<String>, KernelError> {
    let mut links = handle.link().get().execute();
    let mut out = Vec::new();
    while let Some(link) = links.next().await {
        let link = link.map_err(KernelError::netlink("listing links", "ifb"))?;
        if is_kind(&link, &InfoKind::Ifb) {
            if let Some(name) = name_of(&link).filter(|n| is_ifb_name(n)) {
                out.push(name.to_string());
            }
        }
    }
    Ok(out)
}
