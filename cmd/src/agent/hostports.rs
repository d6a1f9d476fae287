//! The agent's part in hostPorts (the CNI `portMappings` capability, which the plugin applies):
//! it tells the plugin which firewall `policy-backend` resolved to (`SLUICE_POLICY_BACKEND` in
//! subnet.env), and once, after a start, writes back the mappings in the IPAM state of pods
//! still there and drops those of pods that are gone (a runtime killed before its DEL). Nothing
//! is flushed first: the rules of live pods stay in place across a restart.

use anyhow::Result;
use sluice_policy::hostport::HostportBackend;
use sluice_policy::{Backend, Exec, IptablesRestore};
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

/// The hostPort backend once the policy firewall is chosen, shared by the policy start (which
/// sets it) and the node loop (which publishes it and restores the mappings).
pub type Resolved = Arc<OnceLock<HostportBackend>>;

/// The hostPort backend of the chosen policy firewall: nftables, or iptables in the flavour
/// the host uses (detected as the policy engine does). Blocks: runs binaries.
pub fn resolve(policy: Backend) -> Result<HostportBackend> {
    Ok(match policy {
        Backend::Nftables => HostportBackend::Nftables,
        Backend::Iptables => HostportBackend::Iptables(IptablesRestore::detect(Exec::host())?.mode),
    })
}

/// Once per start (see [`sluice_net::cni::hostport::restore`]): live pods' mappings written
/// back in `backend`, those of pods that are gone dropped. Blocks.
pub fn restore(
    ipam: &sluice_net::ipam::IpamStore,
    backend: HostportBackend,
    host_links: &BTreeSet<String>,
) -> Result<sluice_net::cni::hostport::Restored> {
    Ok(sluice_net::cni::hostport::restore(
        ipam,
        &Exec::host(),
        backend,
        host_links,
    )?)
}
