//! The `portMappings` capability in the CNI verbs: what ADD, DEL, CHECK and GC do about
//! hostPorts, kept apart from the verbs so that these stay short.
//!
//! The mappings live in the IPAM state ([`IpamState::hostports`]) under the IPAM lock. ADD
//! reserves its mappings with its address in one locked step (a hostPort another attachment
//! holds fails it before anything is made), wires the pod, then applies: under the lock again,
//! every entry of the state is rendered and written in one transaction, so that of two calls
//! the later write always holds both. Deciding is `sluice_policy::hostport` (pure); doing is a
//! [`HostportKernel`].

use super::config::{NetConf, Request};
use super::{CniError, ErrorCode};
use crate::ipam::{IpamLock, IpamState, IpamStore};
use crate::kernel::{KernelError, RtNetlink};
use crate::podnet;
use crate::subnet_env::SubnetEnv;
use sluice_policy::hostport::{
    self, HostportBackend, HostportEntry, HostportError, HostportFirewall, PortMapping,
};
use sluice_policy::{Exec, FirewallError, IptablesMode};
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use tracing::{info, warn};

/// What the hostPort steps do to the node. `backend` is subnet.env's `SLUICE_POLICY_BACKEND`
/// (`None`: not published, see [`hostport::HostportFirewall::resolve`]).
pub trait HostportKernel {
    /// Makes the kernel hold exactly `after`'s hostPort rules; `before` is what the state said
    /// it held (see [`HostportFirewall::update`]).
    fn apply_hostports(
        &mut self,
        backend: Option<&str>,
        before: &[HostportEntry],
        after: &[HostportEntry],
    ) -> Result<(), FirewallError>;
    /// The rules of `entry` the kernel lacks.
    fn missing_hostports(
        &mut self,
        backend: Option<&str>,
        entry: &HostportEntry,
    ) -> Result<Vec<String>, FirewallError>;
    /// `net.ipv4.conf.<host_ifname>.route_localnet=1`, so that `127.0.0.1:hostPort` reaches the
    /// pod behind that veth (as the portmap plugin does).
    fn route_localnet(&mut self, host_ifname: &str) -> Result<(), KernelError>;
}

impl HostportKernel for RtNetlink {
    fn apply_hostports(
        &mut self,
        backend: Option<&str>,
        before: &[HostportEntry],
        after: &[HostportEntry],
    ) -> Result<(), FirewallError> {
        HostportFirewall::resolve(Exec::host(), backend)?.update(before, after)
    }

    fn missing_hostports(
        &mut self,
        backend: Option<&str>,
        entry: &HostportEntry,
    ) -> Result<Vec<String>, FirewallError> {
        HostportFirewall::resolve(Exec::host(), backend)?.missing(entry)
    }

    fn route_localnet(&mut self, host_ifname: &str) -> Result<(), KernelError> {
        self.sysctl(&format!("net/ipv4/conf/{host_ifname}/route_localnet"), "1")
    }
}

fn hostport_error(e: HostportError) -> CniError {
    let code = match e {
        HostportError::Conflict { .. } => ErrorCode::PortConflict,
        HostportError::NotAList
        | HostportError::Invalid { .. }
        | HostportError::NoIpv6 { .. }
        | HostportError::NoIpv4 { .. } => ErrorCode::InvalidConfig,
    };
    CniError::new(code, format!("runtimeConfig.portMappings: {e}"))
}

fn firewall_error(e: FirewallError) -> CniError {
    CniError::new(
        ErrorCode::Kernel,
        format!("writing the hostPort rules: {e}"),
    )
}

/// ADD, before anything is allocated: a mapping with a `hostIP` needs a pod with an address of
/// its family (`pod_has_v4`, `pod_has_v6`: the node holds a subnet of that family).
pub fn check_families(
    mappings: &[PortMapping],
    pod_has_v4: bool,
    pod_has_v6: bool,
) -> Result<(), CniError> {
    hostport::check_families(mappings, pod_has_v4, pod_has_v6).map_err(hostport_error)
}

/// The mappings the runtime asks for (`runtimeConfig.portMappings`), checked; none when the
/// capability is not used.
pub fn requested(conf: &NetConf) -> Result<Vec<PortMapping>, CniError> {
    let mappings = conf
        .runtime_config
        .as_ref()
        .and_then(|r| r.get("portMappings"))
        .map(|m| {
            super::config::go_json_keys(m, &["hostPort", "containerPort", "protocol", "hostIP"])
        });
    hostport::parse_mappings(mappings.as_ref()).map_err(hostport_error)
}

/// The pod's addresses: IPv4 (none on an IPv6-only node), and IPv6 on a dual-stack or
/// IPv6-only node.
pub type PodAddrs = (Option<Ipv4Addr>, Option<Ipv6Addr>);

fn entry(req: &Request, (pod_ip, pod_ip6): PodAddrs, mappings: &[PortMapping]) -> HostportEntry {
    HostportEntry {
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
        pod_ip,
        pod_ip6,
        mappings: mappings.to_vec(),
    }
}

fn existing<'a>(state: &'a IpamState, req: &Request) -> Option<&'a HostportEntry> {
    state
        .hostports
        .iter()
        .find(|e| e.container_id == req.container_id && e.ifname == req.ifname)
}

/// What ADD's first locked step did to the hostPorts, for [`activate`] and [`undo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    mappings: Vec<PortMapping>,
    /// The attachment's entry before this ADD (a repeated ADD).
    previous: Option<HostportEntry>,
}

impl Reserved {
    /// Whether the rules in the kernel must change: the attachment has or had mappings.
    fn touches_rules(&self) -> bool {
        !self.mappings.is_empty() || self.previous.is_some()
    }
}

/// ADD, under the IPAM lock and before an address is allocated: refuses `mappings` when
/// another attachment holds one of their host sockets (the state is then unchanged).
pub fn admit(state: &IpamState, req: &Request, mappings: &[PortMapping]) -> Result<(), CniError> {
    if mappings.is_empty() {
        return Ok(());
    }
    hostport::admit(&state.hostports, &entry(req, (None, None), mappings)).map_err(hostport_error)
}

/// ADD, in the same locked step once the address is allocated: records the attachment's
/// mappings (replacing what a repeated ADD had).
pub fn reserve(
    state: &mut IpamState,
    req: &Request,
    address: PodAddrs,
    mappings: &[PortMapping],
) -> Reserved {
    let previous = existing(state, req).cloned();
    state.hostports = hostport::upsert(&state.hostports, entry(req, address, mappings));
    Reserved {
        mappings: mappings.to_vec(),
        previous,
    }
}

fn backend(conf: &NetConf) -> Option<String> {
    SubnetEnv::load(&conf.subnet_file)
        .ok()
        .and_then(|e| e.policy_backend)
}

/// Writes the change from `before` to the entries in `lock`'s state; the lock stays held so
/// that no other call writes in between.
fn write_all<K: HostportKernel>(
    lock: &IpamLock<'_>,
    before: &[HostportEntry],
    backend: Option<&str>,
    kernel: &mut K,
) -> Result<(), CniError> {
    kernel
        .apply_hostports(backend, before, &lock.state.hostports)
        .map_err(firewall_error)
}

/// ADD, once the pod is wired: IPv4 loopback may reach a pod with an IPv4 address through its
/// veth (IPv6 has no such switch: `[::1]:hostPort` is not mapped), and the rules of every
/// attachment are written. The attachment's entry is confirmed under the lock (the agent's
/// sweep may have taken it while the veth did not exist yet). Nothing to do for a pod that
/// has and had no mappings.
pub fn activate<K: HostportKernel>(
    conf: &NetConf,
    store: &IpamStore,
    req: &Request,
    address: PodAddrs,
    host_ifname: &str,
    reserved: &Reserved,
    kernel: &mut K,
) -> Result<(), CniError> {
    if !reserved.touches_rules() {
        return Ok(());
    }
    if !reserved.mappings.is_empty() && address.0.is_some() {
        kernel.route_localnet(host_ifname)?;
    }
    let mut lock = store.lock()?;
    admit(&lock.state, req, &reserved.mappings)?;
    // The kernel holds the state as it was before this ADD's first step. A repeated ADD writes
    // the rules whole (no `before`): it also repairs rules lost since.
    let before = match &reserved.previous {
        Some(_) => Vec::new(),
        None => hostport::remove(&lock.state.hostports, &req.container_id, &req.ifname),
    };
    lock.state.hostports = hostport::upsert(
        &lock.state.hostports,
        entry(req, address, &reserved.mappings),
    );
    lock.save()?;
    write_all(&lock, &before, backend(conf).as_deref(), kernel)?;
    info!(container_id = %req.container_id, mappings = reserved.mappings.len(), "hostPorts written");
    Ok(())
}

/// ADD's rollback: the attachment's entry back to what it was before (none for a first ADD),
/// and the rules rewritten. Best effort: failures are logged, the ADD's own error is reported.
pub fn undo<K: HostportKernel>(
    conf: &NetConf,
    store: &IpamStore,
    req: &Request,
    reserved: &Reserved,
    kernel: &mut K,
) {
    if !reserved.touches_rules() {
        return;
    }
    let result = store.lock().map_err(CniError::from).and_then(|mut lock| {
        let before = lock.state.hostports.clone();
        let now = hostport::remove(&lock.state.hostports, &req.container_id, &req.ifname);
        lock.state.hostports = match &reserved.previous {
            Some(prev) => hostport::upsert(&now, prev.clone()),
            None => now,
        };
        lock.save()?;
        write_all(&lock, &before, backend(conf).as_deref(), kernel)
    });
    if let Err(e) = result {
        warn!(container_id = %req.container_id, error = %e, "rollback: restoring the hostPort rules failed");
    }
}

/// DEL: frees the attachment's addresses (both families) and drops its mappings under one lock; when it had
/// mappings the rules are rewritten first, and if that fails nothing is saved (the runtime's
/// retry of DEL tries again). Returns the addresses it had.
pub fn release<K: HostportKernel>(
    conf: &NetConf,
    store: &IpamStore,
    req: &Request,
    owner: &crate::ipam::Owner,
    kernel: &mut K,
) -> Result<(Option<Ipv4Addr>, Option<std::net::Ipv6Addr>), CniError> {
    let mut lock = store.lock()?;
    let freed = lock.state.release_families(owner);
    if existing(&lock.state, req).is_some() {
        let before = lock.state.hostports.clone();
        lock.state.hostports =
            hostport::remove(&lock.state.hostports, &req.container_id, &req.ifname);
        write_all(&lock, &before, backend(conf).as_deref(), kernel)?;
        info!(container_id = %req.container_id, "hostPorts removed");
    }
    lock.save()?;
    Ok(freed)
}

/// CHECK: the attachment's mappings are those the runtime asks for and their rules are in the
/// kernel; the problems found, for CHECK's error.
pub fn check<K: HostportKernel>(
    conf: &NetConf,
    state: &IpamState,
    req: &Request,
    kernel: &mut K,
) -> Result<Vec<String>, CniError> {
    let wanted = requested(conf)?;
    let have = existing(state, req);
    let recorded: &[PortMapping] = have.map_or(&[], |e| &e.mappings);
    let mut problems = Vec::new();
    if wanted != recorded {
        problems.push(format!(
            "hostPorts: the runtime asks for {} mapping(s) but sluice holds {} for this attachment",
            wanted.len(),
            recorded.len()
        ));
    }
    if let Some(entry) = have {
        let missing = kernel
            .missing_hostports(backend(conf).as_deref(), entry)
            .map_err(firewall_error)?;
        if !missing.is_empty() {
            problems.push(format!("hostPort rules missing: {}", missing.join(" | ")));
        }
    }
    Ok(problems)
}

/// GC, under the lock GC holds: drops the mappings of attachments not in `valid` and rewrites
/// the rules when that changed anything. On a failed write the entries stay, for the next GC.
pub fn collect<K: HostportKernel>(
    conf: &NetConf,
    lock: &mut IpamLock<'_>,
    valid: &BTreeSet<(&str, &str)>,
    kernel: &mut K,
) -> Result<usize, CniError> {
    let valid: Vec<(String, String)> = valid
        .iter()
        .map(|(c, i)| (c.to_string(), i.to_string()))
        .collect();
    let kept = hostport::retain_valid(&lock.state.hostports, &valid);
    let dropped = lock.state.hostports.len() - kept.len();
    if dropped == 0 {
        return Ok(0);
    }
    let before = std::mem::replace(&mut lock.state.hostports, kept);
    if let Err(e) = write_all(lock, &before, backend(conf).as_deref(), kernel) {
        lock.state.hostports = before;
        return Err(e);
    }
    Ok(dropped)
}

/// The agent's sweep (pure): the entries of attachments that are still there, that is whose
/// addresses (of each family the entry has, at least one) are still allocated to them and whose
/// host-side veth exists (the liveness [`crate::pod_repair`] uses).
pub fn live_entries(state: &IpamState, host_links: &BTreeSet<String>) -> Vec<HostportEntry> {
    let held_by = |owner: Option<&crate::ipam::Owner>, e: &HostportEntry| {
        owner.is_some_and(|o| o.container_id == e.container_id && o.ifname == e.ifname)
    };
    state
        .hostports
        .iter()
        .filter(|e| {
            (e.pod_ip.is_some() || e.pod_ip6.is_some())
                && e.pod_ip
                    .is_none_or(|ip| held_by(state.allocations.get(&ip), e))
                && e.pod_ip6
                    .is_none_or(|ip| held_by(state.allocations_v6.get(&ip), e))
                && host_links.contains(&podnet::host_ifname(&e.container_id, &e.ifname))
        })
        .cloned()
        .collect()
}

/// Backends other than `chosen`, whose hostPort rules a switch of `policy-backend` leaves.
pub fn other_backends(chosen: HostportBackend) -> Vec<HostportBackend> {
    [
        HostportBackend::Nftables,
        HostportBackend::Iptables(IptablesMode::Legacy),
        HostportBackend::Iptables(IptablesMode::Nft),
    ]
    .into_iter()
    .filter(|b| *b != chosen)
    .collect()
}

/// What [`restore`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub kept: usize,
    pub swept: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    #[error("writing the hostPort rules: {0}")]
    Firewall(#[from] FirewallError),
}

/// The agent's start, under the IPAM lock: drops the entries of pods that are gone (see
/// [`live_entries`]; `host_links` are the host-side veths), writes the rest in `backend` in one
/// transaction (no flush first: a live pod's rules are never absent), and removes sluice's
/// hostPort rules from the other backends where there are any. Blocks (runs binaries).
pub fn restore(
    store: &IpamStore,
    exec: &Exec,
    backend: HostportBackend,
    host_links: &BTreeSet<String>,
) -> Result<Restored, RestoreError> {
    let mut lock = store.lock()?;
    let live = live_entries(&lock.state, host_links);
    let swept = lock.state.hostports.len() - live.len();
    for gone in lock.state.hostports.iter().filter(|e| !live.contains(e)) {
        info!(container_id = gone.container_id, pod_ip = ?gone.pod_ip, pod_ip6 = ?gone.pod_ip6, "dropping the hostPorts of a pod that is gone");
    }
    let fw = HostportFirewall::new(exec.clone(), backend);
    if live.is_empty() {
        fw.remove()?;
    } else {
        fw.apply(&live)?;
    }
    lock.state.hostports = live;
    lock.save()?;
    for other in other_backends(backend) {
        let fw = HostportFirewall::new(exec.clone(), other);
        match fw.present() {
            Ok(true) => match fw.remove() {
                Ok(()) => {
                    info!(
                        backend = other.name(),
                        "removed the hostPort rules of a backend no longer used"
                    )
                }
                Err(e) => {
                    warn!(backend = other.name(), error = %e, "cannot remove the hostPort rules of a backend no longer used")
                }
            },
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(backend = other.name(), error = %e, "backend not usable here")
            }
        }
    }
    Ok(Restored {
        kept: lock.state.hostports.len(),
        swept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::Owner;
    use sluice_policy::hostport::HpProtocol;

    fn m(host_port: u16) -> PortMapping {
        PortMapping {
            host_port,
            container_port: 80,
            protocol: HpProtocol::Tcp,
            host_ip: None,
        }
    }

    fn req(id: &str) -> Request {
        Request {
            container_id: id.into(),
            ifname: "eth0".into(),
            ..Default::default()
        }
    }

    fn owner(id: &str) -> Owner {
        Owner {
            container_id: id.into(),
            ifname: "eth0".into(),
            pod: None,
        }
    }

    #[test]
    fn admit_refuses_a_held_port_and_reserve_records_and_remembers() {
        let mut s = IpamState::default();
        admit(&s, &req("a"), &[m(8080)]).unwrap();
        let r = reserve(
            &mut s,
            &req("a"),
            (Some("10.0.0.2".parse().unwrap()), None),
            &[m(8080)],
        );
        assert_eq!(r.previous, None);
        assert!(r.touches_rules());
        assert_eq!(s.hostports.len(), 1);
        let e = admit(&s, &req("b"), &[m(8080)]).unwrap_err();
        assert_eq!(e.code, ErrorCode::PortConflict);
        assert!(
            e.msg.contains("8080") && e.msg.contains("held by container a"),
            "{e}"
        );
        // The same attachment again is a replacement, not a conflict.
        admit(&s, &req("a"), &[m(8080), m(8081)]).unwrap();
        let r = reserve(
            &mut s,
            &req("a"),
            (Some("10.0.0.2".parse().unwrap()), None),
            &[m(8081)],
        );
        assert_eq!(
            r.previous.as_ref().map(|p| p.mappings.clone()),
            Some(vec![m(8080)])
        );
        // A pod without mappings that had none touches nothing.
        let r = reserve(
            &mut s,
            &req("c"),
            (Some("10.0.0.3".parse().unwrap()), None),
            &[],
        );
        assert!(!r.touches_rules());
        assert_eq!(s.hostports.len(), 1);
    }

    #[test]
    fn the_other_backends_are_the_two_not_chosen() {
        for chosen in [
            HostportBackend::Nftables,
            HostportBackend::Iptables(IptablesMode::Legacy),
            HostportBackend::Iptables(IptablesMode::Nft),
        ] {
            let o = other_backends(chosen);
            assert_eq!(o.len(), 2);
            assert!(!o.contains(&chosen));
        }
    }

    #[test]
    fn the_sweep_keeps_only_allocated_attachments_with_a_veth() {
        let mut s = IpamState::default();
        for (id, ip) in [("a", "10.0.0.2"), ("b", "10.0.0.3"), ("c", "10.0.0.4")] {
            let ip: Ipv4Addr = ip.parse().unwrap();
            reserve(
                &mut s,
                &req(id),
                (Some(ip), None),
                &[m(8000 + u16::from(ip.octets()[3]))],
            );
        }
        // a: allocated and wired; b: allocated, veth gone; c: address freed (or now another's).
        s.allocations
            .insert("10.0.0.2".parse().unwrap(), owner("a"));
        s.allocations
            .insert("10.0.0.3".parse().unwrap(), owner("b"));
        s.allocations
            .insert("10.0.0.4".parse().unwrap(), owner("z"));
        let links: BTreeSet<String> = ["a", "c", "z"]
            .iter()
            .map(|id| podnet::host_ifname(id, "eth0"))
            .collect();
        let live = live_entries(&s, &links);
        assert_eq!(
            live.iter()
                .map(|e| e.container_id.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
    }

    #[test]
    fn the_sweep_judges_an_ipv6_only_entry_by_its_ipv6_address() {
        let mut s = IpamState::default();
        for (id, ip) in [("a", "fd00::2"), ("b", "fd00::3")] {
            reserve(
                &mut s,
                &req(id),
                (None, Some(ip.parse().unwrap())),
                &[m(80)],
            );
        }
        s.allocations_v6
            .insert("fd00::2".parse().unwrap(), owner("a"));
        // b's address is another attachment's now.
        s.allocations_v6
            .insert("fd00::3".parse().unwrap(), owner("z"));
        // An IPv4 allocation of the same attachment does not stand in for its IPv6 one.
        s.allocations
            .insert("10.0.0.3".parse().unwrap(), owner("b"));
        let links: BTreeSet<String> = ["a", "b"]
            .iter()
            .map(|id| podnet::host_ifname(id, "eth0"))
            .collect();
        let live = live_entries(&s, &links);
        assert_eq!(
            live.iter()
                .map(|e| (e.container_id.as_str(), e.pod_ip))
                .collect::<Vec<_>>(),
            [("a", None)]
        );
    }
}
