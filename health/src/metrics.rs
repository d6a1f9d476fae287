//! sluice's Prometheus metrics (prometheus-client, OpenMetrics text).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: String,
    pub commit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CniLabels {
    pub verb: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    pub tier: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

pub struct Metrics {
    registry: Registry,
    pub lease_held: Gauge,
    pub lease_expiry_seconds: Gauge<f64, AtomicU64>,
    pub peers: Gauge,
    pub datapath_sync_seconds: Histogram,
    pub datapath_errors: Counter,
    pub policy_rules: Gauge,
    pub policy_sync_seconds: Histogram,
    pub policy_errors: Counter,
    pub cluster_network_policies: Family<TierLabels, Gauge>,
    pub cni_calls: Family<CniLabels, Gauge>,
    pub peer_rx_bytes: Family<PeerLabels, Gauge>,
    pub peer_tx_bytes: Family<PeerLabels, Gauge>,
    pub peer_handshake_age_seconds: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    pub objects_skipped: Family<KindLabels, Counter>,
    pub peers_by_path: Family<PathLabels, Gauge>,
}

impl Metrics {
    pub fn new(version: &str, commit: &str) -> Self {
        let mut r = Registry::with_prefix("sluice");
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: version.into(),
                commit: commit.into(),
            })
            .set(1);
        r.register("build_info", "Build of the running agent", build);
        let lease_held = Gauge::default();
        r.register(
            "lease_held",
            "1 while the node holds its subnet lease",
            lease_held.clone(),
        );
        let lease_expiry_seconds = Gauge::<f64, AtomicU64>::default();
        r.register(
            "lease_expiry_seconds",
            "Seconds until the held lease expires without renewal",
            lease_expiry_seconds.clone(),
        );
        let peers = Gauge::default();
        r.register("peers", "Peers programmed in the datapath", peers.clone());
        let datapath_sync_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register(
            "datapath_sync_seconds",
            "Time of one datapath reconciliation pass",
            datapath_sync_seconds.clone(),
        );
        let datapath_errors = Counter::default();
        r.register(
            "datapath_errors",
            "Datapath passes that failed",
            datapath_errors.clone(),
        );
        let policy_rules = Gauge::default();
        r.register(
            "policy_rules",
            "NetworkPolicy rules in force",
            policy_rules.clone(),
        );
        let policy_sync_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register(
            "policy_sync_seconds",
            "Time of one policy reconciliation pass",
            policy_sync_seconds.clone(),
        );
        let policy_errors = Counter::default();
        r.register(
            "policy_errors",
            "Policy passes that failed",
            policy_errors.clone(),
        );
        let cluster_network_policies = Family::<TierLabels, Gauge>::default();
        r.register(
            "cluster_network_policies",
            "ClusterNetworkPolicies in force (decoded and compiled) by tier",
            cluster_network_policies.clone(),
        );
        let cni_calls = Family::<CniLabels, Gauge>::default();
        r.register(
            "cni_calls",
            "CNI plugin calls on this node by verb and result (counted by the plugin)",
            cni_calls.clone(),
        );
        let peer_rx_bytes = Family::<PeerLabels, Gauge>::default();
        r.register(
            "peer_rx_bytes",
            "Bytes received from each peer through the tunnel",
            peer_rx_bytes.clone(),
        );
        let peer_tx_bytes = Family::<PeerLabels, Gauge>::default();
        r.register(
            "peer_tx_bytes",
            "Bytes sent to each peer through the tunnel",
            peer_tx_bytes.clone(),
        );
        let peer_handshake_age_seconds = Family::<PeerLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "peer_handshake_age_seconds",
            "Seconds since the last WireGuard handshake with each peer",
            peer_handshake_age_seconds.clone(),
        );
        let objects_skipped = Family::<KindLabels, Counter>::default();
        r.register(
            "objects_skipped",
            "API objects the agent could not read and skipped (each version counted once)",
            objects_skipped.clone(),
        );
        let peers_by_path = Family::<PathLabels, Gauge>::default();
        r.register(
            "peer_paths",
            "Peers by the path that reaches their pods (direct, vxlan, wireguard, unreachable)",
            peers_by_path.clone(),
        );
        Self {
            registry: r,
            lease_held,
            lease_expiry_seconds,
            peers,
            datapath_sync_seconds,
            datapath_errors,
            policy_rules,
            policy_sync_seconds,
            policy_errors,
            cluster_network_policies,
            cni_calls,
            peer_rx_bytes,
            peer_tx_bytes,
            peer_handshake_age_seconds,
            objects_skipped,
            peers_by_path,
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
