//! The CNI verbs. Each takes the parsed call and a [`PodKernel`], so that every path, rollback
//! included, runs in tests against a fake kernel. Errors of the layers below are mapped to the
//! spec's codes here and nowhere else.

use super::config::{NetConf, Request};
use super::hostport::{self, HostportKernel};
use super::result::{self, Interface};
use super::{CniError, ErrorCode};
use crate::bandwidth::ShapingPlan;
use crate::ipam::{IpamError, IpamState, IpamStore, Owner};
use crate::kernel::{KernelError, PodKernel};
use crate::netns::NetnsError;
use crate::podnet::{self, format_mac, PodPlan, GATEWAY, GATEWAY_V6, HOST_VETH_MAC};
use crate::subnet_env::{SubnetEnv, SubnetEnvError};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use tracing::{info, warn};

impl From<KernelError> for CniError {
    fn from(e: KernelError) -> Self {
        let code = match &e {
            KernelError::Netns(
                NetnsError::Missing { .. }
                | NetnsError::NotANetns { .. }
                | NetnsError::NotNsfs { .. },
            )
            | KernelError::NoPodNetns => ErrorCode::UnknownContainer,
            KernelError::Netns(NetnsError::Open { .. }) => ErrorCode::Io,
            KernelError::InterfaceExists { .. } => ErrorCode::InterfaceExists,
            _ => ErrorCode::Kernel,
        };
        CniError::new(code, e.to_string())
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let code = match e {
            IpamError::Exhausted { .. } => ErrorCode::SubnetExhausted,
            IpamError::LockTimeout { .. } => ErrorCode::TryAgainLater,
            IpamError::Io { .. } | IpamError::File { .. } | IpamError::Corrupt { .. } => {
                ErrorCode::Io
            }
        };
        CniError::new(code, e.to_string())
    }
}

/// The node's subnet for ADD: while the agent has not published one, the runtime is told to try
/// again later; a file that cannot be read is an I/O error, and values that do not parse or may
/// not hold pods are a configuration error.
fn node_subnet(conf: &NetConf) -> Result<SubnetEnv, CniError> {
    SubnetEnv::load(&conf.subnet_file).map_err(|e| match e {
        SubnetEnvError::Read { .. } => CniError::new(ErrorCode::Io, e.to_string()),
        SubnetEnvError::Missing { .. } | SubnetEnvError::MissingKey { .. } => CniError::new(
            ErrorCode::TryAgainLater,
            format!("this node has no usable pod subnet yet: {e}"),
        ),
        SubnetEnvError::BadValue { .. } | SubnetEnvError::Unsafe { .. } => CniError::new(
            ErrorCode::InvalidConfig,
            format!("this node has no usable pod subnet: {e}"),
        ),
    })
}

fn owner(req: &Request) -> Owner {
    Owner {
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
        pod: req.pod().map(|(ns, name)| format!("{ns}/{name}")),
    }
}

pub async fn add<K: PodKernel + HostportKernel>(
    conf: &NetConf,
    req: &Request,
    kernel: &mut K,
) -> Result<serde_json::Value, CniError> {
    let shaping = shaping::requested(conf)?;
    let env = node_subnet(conf)?;
    let mtu = conf.mtu.unwrap_or(env.mtu);
    let mappings = hostport::requested(conf)?;
    hostport::check_families(&mappings, env.v4.is_some(), env.v6.is_some())?;
    let store = IpamStore::new(&conf.ipam_dir);
    let owner = owner(req);
    // An address of each family the node holds, both or neither.
    let (got, reserved) = store.update(|s| -> Result<_, CniError> {
        hostport::admit(s, req, &mappings)?;
        let got = allocate(s, &env, &owner)?;
        let addrs = (got.v4.map(|(ip, _)| ip), got.v6.map(|(ip, _)| ip));
        Ok((got, hostport::reserve(s, req, addrs, &mappings)))
    })??;
    let address = got.v4.map(|(ip, _)| ip);
    let address_v6 = got.v6.map(|(ip, _)| ip);
    let plan = PodPlan::new(&req.container_id, &req.ifname, address, mtu).with_v6(address_v6);
    let wired = match wire(kernel, &plan, shaping.as_ref()).await {
        Ok(pod_mac) => hostport::activate(
            conf,
            &store,
            req,
            (address, address_v6),
            &plan.host_ifname,
            &reserved,
            kernel,
        )
        .map(|()| pod_mac),
        Err(e) => Err(e.into()),
    };
    match wired {
        Ok(pod_mac) => {
            info!(container_id = %req.container_id, pod = ?req.pod(), address = ?address, address_v6 = ?address_v6, host_ifname = %plan.host_ifname, "pod wired");
            Ok(add_result(&plan, &pod_mac, req).render(
                conf.version,
                conf.prev_result.as_ref(),
                conf.dns.as_ref(),
            ))
        }
        Err(e) => {
            warn!(container_id = %req.container_id, error = %e, "ADD failed; removing what it made");
            if let Err(undo) = kernel.delete_host_link(&plan.host_ifname).await {
                warn!(container_id = %req.container_id, error = %undo, "rollback: deleting the veth failed");
            }
            shaping::undo(kernel, &plan.host_ifname, &req.container_id).await;
            hostport::undo(conf, &store, req, &reserved, kernel);
            // Only what this call allocated: an address an earlier ADD gave the attachment stays
            // until the runtime's DEL.
            let (fresh_v4, fresh_v6) = (
                got.v4.is_some_and(|(_, fresh)| fresh),
                got.v6.is_some_and(|(_, fresh)| fresh),
            );
            if fresh_v4 || fresh_v6 {
                let released = store.update(|s| {
                    if fresh_v4 {
                        s.release(&owner);
                    }
                    if fresh_v6 {
                        s.release_v6(&owner);
                    }
                });
                if let Err(undo) = released {
                    warn!(container_id = %req.container_id, error = %undo, "rollback: releasing the addresses failed");
                }
            }
            Err(e)
        }
    }
}

/// What one ADD holds: an address of each family the node has (IPv4 and IPv6 on a dual-stack
/// node, one of them otherwise), each with whether this call allocated it.
#[derive(Debug, Clone, Copy)]
struct Allocated {
    v4: Option<(Ipv4Addr, bool)>,
    v6: Option<(Ipv6Addr, bool)>,
}

/// [`IpamState::allocate_families`] over the node's subnets: the IPv4 pair's and the IPv6
/// pair's, whichever the subnet.env has (at least one: one without either does not load).
fn allocate(s: &mut IpamState, env: &SubnetEnv, owner: &Owner) -> Result<Allocated, CniError> {
    let (v4, v6) = (
        env.v4.as_ref().map(|v| v.subnet),
        env.v6.as_ref().map(|v| v.subnet),
    );
    let got = s.allocate_families(v4, v6, owner.clone())?;
    // allocate_families gives an address of every family it is given a subnet of.
    if got.v4.is_some() != v4.is_some() || got.v6.is_some() != v6.is_some() {
        return Err(CniError::new(
            ErrorCode::Io,
            "IPAM gave no address of every family the node holds",
        ));
    }
    Ok(Allocated {
        v4: got.v4,
        v6: got.v6,
    })
}

async fn wire<K: PodKernel>(
    kernel: &mut K,
    plan: &PodPlan,
    shaping: Option<&ShapingPlan>,
) -> Result<Vec<u8>, KernelError> {
    let link = kernel.create_veth(plan).await?;
    kernel.configure_host(plan).await?;
    kernel.configure_pod(plan).await?;
    if let Some(shaping) = shaping {
        kernel.apply_shaping(&plan.host_ifname, shaping).await?;
    }
    Ok(link.mac)
}

fn add_result(plan: &PodPlan, pod_mac: &[u8], req: &Request) -> result::AddResultAny {
    result::pod_result(
        Interface {
            name: plan.host_ifname.clone(),
            mac: format_mac(&HOST_VETH_MAC),
            sandbox: None,
            mtu: Some(plan.mtu),
        },
        Interface {
            name: plan.pod_ifname.clone(),
            mac: format_mac(pod_mac),
            sandbox: req.netns.as_ref().map(|p| p.display().to_string()),
            mtu: Some(plan.mtu),
        },
        plan.address,
        plan.address_v6,
    )
}

/// DEL: the veth (and with it the host routes and the pod's interface) goes first, then the
/// addresses of both families and the pod's hostPort mappings ([`hostport::release`]), so an address is never
/// handed out again while a route to it remains. Whatever is already gone counts as deleted.
pub async fn del<K: PodKernel + HostportKernel>(
    conf: &NetConf,
    req: &Request,
    kernel: &mut K,
) -> Result<(), CniError> {
    let host_ifname = podnet::host_ifname(&req.container_id, &req.ifname);
    let removed_link = kernel.unlink_host_link(&host_ifname).await?;
    let removed_ifb = kernel.remove_shaping(&host_ifname).await?;
    let store = IpamStore::new(&conf.ipam_dir);
    let freed = hostport::release(conf, &store, req, &owner(req), kernel)?;
    info!(container_id = %req.container_id, pod = ?req.pod(), removed_link, removed_ifb, freed = ?freed.0, freed_v6 = ?freed.1, "pod unwired");
    Ok(())
}

/// CHECK: the attachment is as ADD left it.
pub async fn check<K: PodKernel + HostportKernel>(
    conf: &NetConf,
    req: &Request,
    kernel: &mut K,
) -> Result<(), CniError> {
    let state = IpamStore::new(&conf.ipam_dir).read()?;
    let failed = |msg: String| CniError::new(ErrorCode::CheckFailed, msg);
    let address = state.lookup(&owner(req));
    let address_v6 = state.lookup_v6(&owner(req));
    // Every pod holds an address of the node's first family: IPv4, or IPv6 on an IPv6-only
    // node (a dual-stack pod's IPv6 one is checked against prevResult and the kernel below).
    let first_family_held = if node_subnet(conf)?.v4.is_some() {
        address.is_some()
    } else {
        address_v6.is_some()
    };
    if !first_family_held {
        return Err(failed(format!(
            "no address is allocated to container {} interface {}",
            req.container_id, req.ifname
        )));
    }
    if let Some(expected) = conf
        .prev_result
        .as_ref()
        .and_then(|p| result::address_of(p, &req.ifname))
    {
        if Some(expected.addr()) != address || expected.prefix_len() != 32 {
            let held = address.map_or("no IPv4 address".to_string(), |a| format!("{a}/32"));
            return Err(failed(format!(
                "prevResult says {expected} but sluice allocated {held}"
            )));
        }
    }
    if let Some(expected) = conf
        .prev_result
        .as_ref()
        .and_then(|p| result::address_of_v6(p, &req.ifname))
    {
        if Some(expected.addr()) != address_v6 || expected.prefix_len() != 128 {
            let held = address_v6.map_or("no IPv6 address".to_string(), |a| format!("{a}/128"));
            return Err(failed(format!(
                "prevResult says {expected} but sluice allocated {held}"
            )));
        }
    }
    let plan = PodPlan::new(&req.container_id, &req.ifname, address, 0).with_v6(address_v6);
    let seen = kernel.observe(&plan).await?;
    let mut problems = compare(&plan, &seen);
    problems.extend(shaping::check(conf, &plan.host_ifname, kernel).await?);
    problems.extend(hostport::check(conf, &state, req, kernel)?);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(failed(format!(
            "{} {}: {}",
            req.container_id,
            req.ifname,
            problems.join("; ")
        )))
    }
}

fn compare(plan: &PodPlan, seen: &crate::kernel::ObservedPod) -> Vec<String> {
    let mut problems = Vec::new();
    match seen.host_link_up {
        None => problems.push(format!("host interface {} is missing", plan.host_ifname)),
        Some(false) => problems.push(format!("host interface {} is down", plan.host_ifname)),
        Some(true) => {
            if let (Some(a), false) = (plan.address, seen.host_route) {
                problems.push(format!(
                    "host route to {a}/32 via {} is missing",
                    plan.host_ifname
                ));
            }
        }
    }
    match seen.pod_link_up {
        None => problems.push(format!(
            "container interface {} is missing",
            plan.pod_ifname
        )),
        Some(false) => problems.push(format!("container interface {} is down", plan.pod_ifname)),
        Some(true) => {
            if let Some(a) = plan.address {
                if !seen.pod_addresses.contains(&(a, 32)) {
                    problems.push(format!(
                        "container interface {} lacks {a}/32",
                        plan.pod_ifname
                    ));
                }
                if !seen.pod_default_via_gateway {
                    problems.push(format!("container default route via {GATEWAY} is missing"));
                }
            } else if let Some((a, len)) = seen.pod_addresses.first() {
                // An IPv6-only pod holds no IPv4 address.
                problems.push(format!(
                    "container interface {} holds {a}/{len} on an IPv6-only node",
                    plan.pod_ifname
                ));
            }
        }
    }
    if let Some(v6) = plan.address_v6 {
        if seen.host_link_up == Some(true) {
            if !seen.host_route_v6 {
                problems.push(format!(
                    "host route to {v6}/128 via {} is missing",
                    plan.host_ifname
                ));
            }
            if !seen.host_gateway_v6 {
                problems.push(format!(
                    "host interface {} lacks the gateway {GATEWAY_V6}",
                    plan.host_ifname
                ));
            }
        }
        if seen.pod_link_up == Some(true) {
            if !seen.pod_addresses_v6.contains(&(v6, 128)) {
                problems.push(format!(
                    "container interface {} lacks {v6}/128",
                    plan.pod_ifname
                ));
            }
            if !seen.pod_default_v6_via_gateway {
                problems.push(format!(
                    "container default route ::/0 via {GATEWAY_V6} is missing"
                ));
            }
        }
    }
    problems
}

/// STATUS: ready for ADDs when the node has a subnet and the allocations can be read.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let not_available = |why: String| CniError::new(ErrorCode::NotAvailable, why);
    SubnetEnv::load(&conf.subnet_file)
        .map_err(|e| not_available(format!("this node has no usable pod subnet: {e}")))?;
    IpamStore::new(&conf.ipam_dir)
        .read()
        .map_err(|e| not_available(e.to_string()))?;
    Ok(())
}

/// GC: frees every address, and removes every host-side veth, that belongs to no attachment in
/// the runtime's list of valid attachments; without that list it changes nothing and fails
/// ([`NetConf::gc_attachments`]). The IPAM lock is held throughout so no ADD allocates
/// meanwhile. Keeps going after an error and reports them all at the end.
pub async fn gc<K: PodKernel + HostportKernel>(
    conf: &NetConf,
    kernel: &mut K,
) -> Result<(), CniError> {
    let attachments = conf.gc_attachments()?;
    let valid: BTreeSet<(&str, &str)> = attachments
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let store = IpamStore::new(&conf.ipam_dir);
    let mut lock = store.lock()?;
    let mut errors = Vec::new();
    // A call killed while it wrote the state leaves its temporary copy; nothing else removes it.
    if let Err(e) = lock.sweep_temporary() {
        errors.push(e.to_string());
    }
    super::stats::sweep_temporary(&conf.ipam_dir);
    let stale = lock
        .state
        .collect_garbage(|o| valid.contains(&(o.container_id.as_str(), o.ifname.as_str())));
    let unmapped = hostport::collect(conf, &mut lock, &valid, kernel).unwrap_or_else(|e| {
        errors.push(e.to_string());
        0
    });
    let mut keep: BTreeSet<String> = valid
        .iter()
        .map(|(c, i)| podnet::host_ifname(c, i))
        .collect();
    keep.extend(
        lock.state
            .allocations
            .values()
            .chain(lock.state.allocations_v6.values())
            .map(|o| podnet::host_ifname(&o.container_id, &o.ifname)),
    );
    let mut removed = 0usize;
    match kernel.host_veths().await {
        Ok(links) => {
            for name in links
                .iter()
                .filter(|n| podnet::is_host_ifname(n) && !keep.contains(*n))
            {
                match kernel.delete_host_link(name).await {
                    Ok(_) => removed += 1,
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    let removed_ifbs = shaping::gc(kernel, &keep, &mut errors).await;
    if let Err(e) = lock.save() {
        errors.push(e.to_string());
    }
    info!(
        freed = stale.v4.len(),
        freed_v6 = stale.v6.len(),
        removed_links = removed,
        removed_ifbs,
        unmapped,
        errors = errors.len(),
        "garbage collected"
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::Kernel,
            format!("GC left {} error(s)", errors.len()),
        )
        .with_details(errors.join("; ")))
    }
}

mod shaping;
#[cfg(test)]
mod tests;
