//! The agent's part in hostPorts (the CNI `portMappings` capability, which the plugin applies):
//! it tells the plugin which firewall `policy-backend` resolved to (`SLUICE_POLICY_BACKEND` in
//! subnet.env), and once, after a start, writes back the mappings in the IPAM state of pods
//! still there and drops those of pods that are gone (a runtime killed before its DEL). Nothing
//! is flushed first: the rules of live pods stay in place across a restart.

use anyhow::Result;
use sluice_policy::hostport::{HostportBackend, HostportFirewall};
use sluice_policy::{Backend, Exec, IptablesMode, IptablesRestore};
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

/// The backends other than `chosen`, whose hostPort rules a switch of `policy-backend` leaves.
fn others(chosen: HostportBackend) -> Vec<HostportBackend> {
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

/// Under the IPAM lock: drops the entries of pods that are gone (see
/// [`sluice_net::cni::hostport::live_entries`]; `host_links` are the host-side veths), writes
/// the rest in `backend` in one transaction, and removes sluice's hostPort rules from the other
/// backends where there are any. Blocks.
pub fn restore(
    ipam: &sluice_net::ipam::IpamStore,
    backend: HostportBackend,
    host_links: &BTreeSet<String>,
) -> Result<Restored> {
    let mut lock = ipam.lock()?;
    let live = sluice_net::cni::hostport::live_entries(&lock.state, host_links);
    let swept = lock.state.hostports.len() - live.len();
    for gone in lock.state.hostports.iter().filter(|e| !live.contains(e)) {
        tracing::info!(container_id = gone.container_id, pod_ip = %gone.pod_ip, "dropping the hostPorts of a pod that is gone");
    }
    let fw = HostportFirewall::new(Exec::host(), backend);
    if live.is_empty() {
        fw.remove()?;
    } else {
        fw.apply(&live)?;
    }
    lock.state.hostports = live;
    lock.save()?;
    for other in others(backend) {
        let fw = HostportFirewall::new(Exec::host(), other);
        match fw.present() {
            Ok(true) => match fw.remove() {
                Ok(()) => {
                    tracing::info!(
                        backend = other.name(),
                        "removed hostPort rules of a backend no longer used"
                    )
                }
                Err(e) => {
                    tracing::warn!(backend = other.name(), error = %e, "cannot remove hostPort rules of a backend no longer used")
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

    #[test]
    fn the_other_backends_are_the_two_not_chosen() {
        for chosen in [
            HostportBackend::Nftables,
            HostportBackend::Iptables(IptablesMode::Legacy),
            HostportBackend::Iptables(IptablesMode::Nft),
        ] {
            let o = others(chosen);
            assert_eq!(o.len(), 2);
            assert!(!o.contains(&chosen));
        }
    }
}
