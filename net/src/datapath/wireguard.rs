//! WireGuard as a [`Backend`]: the node's key (kept in the key file, published in the lease
//! record), the device's life, its peers and the routes of the peers whose path is WireGuard.
//! The device holds every peer that publishes a key whenever it exists, so the node still hears
//! a peer that switched before it did; it goes (in the prune phase) when nobody runs WireGuard.

use super::{Backend, BackendFuture, DatapathConfig, DatapathError, DatapathPlan, PeerStats};
use crate::lease::NodeRecord;
use crate::wireguard::device::WgDevice;
use crate::wireguard::{self, KeyPair, WG_IFNAME};
use std::path::PathBuf;

pub struct WgBackend {
    key_path: PathBuf,
    key: Option<KeyPair>,
    /// Why the key could not be read or made (shown on /readyz when WireGuard is wanted).
    key_error: Option<String>,
    device: Option<WgDevice>,
    port: u16,
    mtu: u32,
}

fn failed(e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Wireguard(e.to_string())
}

/// The routes through the device, each with its preferred source (the device's address of the
/// route's family).
fn routes_of(
    wg: &wireguard::WgPlan,
) -> std::collections::BTreeMap<ipnet::IpNet, Option<std::net::IpAddr>> {
    let v4 = wg
        .routes
        .iter()
        .map(|r| ((*r).into(), wg.address.map(Into::into)));
    let v6 = wg
        .routes_v6
        .iter()
        .map(|r| ((*r).into(), wg.address_v6.map(Into::into)));
    v4.chain(v6).collect()
}

impl WgBackend {
    pub fn new(key_path: PathBuf, port: u16, mtu: u32) -> Self {
        let mut s = Self {
            key_path,
            key: None,
            key_error: None,
            device: None,
            port,
            mtu,
        };
        s.load_key();
        s
    }

    fn load_key(&mut self) {
        match wireguard::load_or_create_key(&self.key_path) {
            Ok(k) => {
                self.key = Some(k);
                self.key_error = None;
            }
            Err(e) => {
                tracing::error!(error = %e, "no WireGuard key; this node cannot encrypt");
                self.key = None;
                self.key_error = Some(e.to_string());
            }
        }
    }

    /// The public key to publish (none while the key file is unusable).
    pub fn public_key(&self) -> Option<String> {
        self.key.as_ref().map(KeyPair::public_base64)
    }
}

impl Backend for WgBackend {
    fn name(&self) -> &'static str {
        "wireguard"
    }

    /// Every node publishes its public key whatever its `encryption`, so that peers can add it
    /// to their device before it switches; `encryption` says whether it runs WireGuard (only
    /// with a key).
    fn publish(&self, record: &mut NodeRecord, cfg: &DatapathConfig) {
        record.wireguard_public_key = self.public_key();
        record.encryption = if cfg.wireguard.enabled {
            wireguard::WIREGUARD.into()
        } else {
            "none".into()
        };
    }

    /// A deleted key file means a new key: made, and given to the running device.
    fn refresh(&mut self) -> BackendFuture<'_, ()> {
        Box::pin(async move {
            if self.key.is_some() && self.key_path.exists() {
                return Ok(());
            }
            let before = self.public_key();
            self.load_key();
            if before != self.public_key() {
                if let (Some(dev), Some(key)) = (self.device.as_mut(), self.key.as_ref()) {
                    dev.set_key(key).await.map_err(failed)?;
                }
            }
            Ok(())
        })
    }

    /// The device exists if the plan wants it, holds its peers and address, and carries the
    /// routes of the peers whose path is WireGuard (added or replaced in place only).
    fn install<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize> {
        Box::pin(async move {
            let wg = &plan.wireguard;
            if !wg.device {
                return Ok(0);
            }
            let mut changes = 0;
            if self.device.is_none() {
                let Some(key) = self.key.as_ref() else {
                    return Err(failed(format!(
                        "wanted but no key: {}",
                        self.key_error.as_deref().unwrap_or("unknown")
                    )));
                };
                let dev = WgDevice::open(WG_IFNAME, key, self.port, self.mtu)
                    .await
                    .map_err(failed)?;
                self.device = Some(dev);
                changes += 1;
            }
            if let Some(dev) = self.device.as_mut() {
                let diff = dev.apply(&wg.peers).await.map_err(failed)?;
                changes += diff.remove.len() + diff.upsert.len();
                dev.sync_address(wg.address, wg.address_v6)
                    .await
                    .map_err(failed)?;
                changes += dev.add_routes(&routes_of(wg)).await.map_err(failed)?;
            }
            Ok(changes)
        })
    }

    /// Routes the plan no longer gives WireGuard go, and the device goes when nobody needs it.
    fn prune<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize> {
        Box::pin(async move {
            let wg = &plan.wireguard;
            let mut changes = 0;
            if let Some(dev) = self.device.as_ref() {
                changes += dev.sync_routes(&routes_of(wg)).await.map_err(failed)?;
            }
            if !wg.device {
                if let Some(dev) = self.device.take() {
                    dev.close().await;
                    changes += 1;
                }
            }
            Ok(changes)
        })
    }

    fn describe(&self, plan: &DatapathPlan) -> (&'static str, serde_json::Value) {
        let backend = self.device.as_ref().map(|d| d.backend().to_string());
        (
            "wireguard",
            serde_json::json!({
                "device": backend.as_ref().map(|_| WG_IFNAME),
                "backend": backend,
                "port": self.port,
                "peers": plan.wireguard.peers.len(),
                "keyError": self.key_error,
            }),
        )
    }

    fn peer_stats(&mut self) -> BackendFuture<'_, Vec<PeerStats>> {
        Box::pin(async move {
            Ok(match self.device.as_mut() {
                Some(dev) => dev.stats().await,
                None => Vec::new(),
            })
        })
    }
}
