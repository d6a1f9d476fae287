//! The agent's WireGuard half: the node's key (kept in the key file, published in the lease
//! record), the device's life, and each pass's sync, ordered so that a subnet moving between
//! VXLAN and WireGuard always has a route: routes are added to WireGuard (replacing VXLAN's in
//! place) before the VXLAN sync, and removed from it only after the VXLAN sync put them back.

use sluice_health::metrics::PeerLabels;
use sluice_health::Health;
use sluice_net::lease::NodeRecord;
use sluice_net::wireguard::device::WgDevice;
use sluice_net::wireguard::{self, KeyPair, WgPlan, WgSettings, WG_IFNAME};
use std::path::PathBuf;

pub struct WgState {
    key_path: PathBuf,
    key: Option<KeyPair>,
    /// Why the key could not be read or made (shown on /readyz when WireGuard is wanted).
    key_error: Option<String>,
    device: Option<WgDevice>,
    port: u16,
    mtu: u32,
}

impl WgState {
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

    /// A deleted key file means a new key: made, and given to the running device. Returns
    /// whether the public key changed (the record must be published again).
    pub async fn refresh_key(&mut self) -> bool {
        if self.key.is_some() && self.key_path.exists() {
            return false;
        }
        let before = self.public_key();
        self.load_key();
        let changed = before != self.public_key();
        if changed {
            if let (Some(dev), Some(key)) = (self.device.as_mut(), self.key.as_ref()) {
                if let Err(e) = dev.set_key(key).await {
                    tracing::error!(error = %e, "cannot give the WireGuard device its new key");
                }
            }
        }
        changed
    }

    /// The part of a pass before the VXLAN sync: the device exists if the plan wants it, holds
    /// its peers, and carries the routes the plan gives it (added only).
    pub async fn before_vxlan(&mut self, plan: &WgPlan) -> Result<(), String> {
        if plan.device && self.device.is_none() {
            let Some(key) = self.key.as_ref() else {
                return Err(format!(
                    "WireGuard wanted but no key: {}",
                    self.key_error.as_deref().unwrap_or("unknown")
                ));
            };
            let dev = WgDevice::open(WG_IFNAME, key, self.port, self.mtu)
                .await
                .map_err(|e| e.to_string())?;
            self.device = Some(dev);
        }
        if let Some(dev) = self.device.as_mut() {
            if plan.device {
                dev.apply(&plan.peers).await.map_err(|e| e.to_string())?;
                dev.sync_address(plan.address)
                    .await
                    .map_err(|e| e.to_string())?;
                dev.add_routes(&plan.routes, plan.address)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// The part after the VXLAN sync: routes the plan no longer gives WireGuard go, and the
    /// device goes when nobody needs it.
    pub async fn after_vxlan(&mut self, plan: &WgPlan) -> Result<(), String> {
        if let Some(dev) = self.device.as_ref() {
            dev.sync_routes(&plan.routes, plan.address)
                .await
                .map_err(|e| e.to_string())?;
        }
        if !plan.device {
            if let Some(dev) = self.device.take() {
                dev.close().await;
            }
        }
        Ok(())
    }

    pub fn backend(&self) -> Option<String> {
        self.device.as_ref().map(|d| d.backend().to_string())
    }

    /// Per-peer counters on /metrics; peers gone from the device leave the metric too.
    pub async fn export(&mut self, health: &Health) {
        let m = &health.metrics;
        m.peer_rx_bytes.clear();
        m.peer_tx_bytes.clear();
        m.peer_handshake_age_seconds.clear();
        let Some(dev) = self.device.as_mut() else {
            return;
        };
        let now = std::time::SystemTime::now();
        for s in dev.stats().await {
            let l = PeerLabels {
                peer: s.node.clone(),
            };
            m.peer_rx_bytes
                .get_or_create(&l)
                .set(i64::try_from(s.rx_bytes).unwrap_or(i64::MAX));
            m.peer_tx_bytes
                .get_or_create(&l)
                .set(i64::try_from(s.tx_bytes).unwrap_or(i64::MAX));
            if let Some(at) = s.last_handshake {
                let age = now.duration_since(at).unwrap_or_default();
                m.peer_handshake_age_seconds
                    .get_or_create(&l)
                    .set(age.as_secs_f64());
            }
        }
    }
}

/// The plan's inputs from this pass's configuration.
pub fn settings(enabled: bool, port: u16, keepalive_secs: u16) -> WgSettings {
    WgSettings {
        enabled,
        port,
        keepalive_secs,
    }
}

/// `me` as the plan must see it: running WireGuard only if it has a key.
pub fn record_with(me: &NodeRecord, public_key: Option<String>, enabled: bool) -> NodeRecord {
    NodeRecord {
        wireguard_public_key: public_key,
        encryption: if enabled {
            wireguard::WIREGUARD.into()
        } else {
            "none".into()
        },
        ..me.clone()
    }
}

/// Adds WireGuard to the status document: the device, and each peer's tunnel.
pub fn annotate_status(
    doc: &mut serde_json::Value,
    plan: &WgPlan,
    backend: Option<String>,
    port: u16,
) {
    let subnets: Vec<String> = plan.routes.iter().map(ToString::to_string).collect();
    if let Some(peers) = doc.get_mut("peers").and_then(|p| p.as_array_mut()) {
        for p in peers {
            let carried = p
                .get("subnet")
                .and_then(|s| s.as_str())
                .is_some_and(|s| subnets.iter().any(|w| w == s));
            if carried {
                p["tunnel"] = "wireguard".into();
            }
        }
    }
    doc["wireguard"] = serde_json::json!({
        "device": backend.as_ref().map(|_| WG_IFNAME),
        "backend": backend,
        "port": port,
        "peers": plan.peers.len(),
    });
}
