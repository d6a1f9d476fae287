//! A Pod as policy reads it, and nothing more: the agent holds one for every pod of the
//! cluster, so its size is the agent's memory. k8s-openapi's `Pod` keeps every field of the
//! API inline, set or not (about 4 KB for a pod with one container before any string);
//! this is a few hundred bytes.

use super::NamedPort;
use crate::ir::Protocol;
use crate::selector::Labels;
use k8s_openapi::api::core::v1::Pod;
use std::borrow::Cow;
use std::net::IpAddr;

/// What policy reads of a Pod: identity and version, node, labels, whether it is on the
/// pod network and still running, its addresses and its named container ports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterPod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub resource_version: Option<String>,
    pub node_name: Option<String>,
    pub labels: Labels,
    pub host_network: bool,
    /// Phase `Succeeded` or `Failed`: its address may already be another pod's.
    pub finished: bool,
    /// `status.podIPs`, else `status.podIP`: at most one of each family, as the API keeps them.
    pub ips: Vec<IpAddr>,
    /// Of every container, sidecar init containers included.
    pub ports: Vec<NamedPort>,
}

impl ClusterPod {
    /// Its identity across versions: the uid, else namespace/name.
    pub fn key(&self) -> Cow<'_, str> {
        super::identity(self.uid.as_deref(), &self.namespace, &self.name)
    }
}

impl From<&Pod> for ClusterPod {
    fn from(pod: &Pod) -> Self {
        let meta = &pod.metadata;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        Self {
            namespace: super::namespace_str(meta).to_string(),
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            node_name: spec.and_then(|s| s.node_name.clone()),
            labels: meta.labels.clone().unwrap_or_default(),
            host_network: spec.and_then(|s| s.host_network) == Some(true),
            finished: matches!(
                status.and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            ),
            ips: pod_ips(pod),
            ports: named_ports(pod),
        }
    }
}

/// The pod's addresses (`status.podIPs`, else `status.podIP`), of both families.
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    let mut ips: Vec<IpAddr> = listed.filter_map(|s| s.parse().ok()).collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|s| s.parse::<IpAddr>().ok()),
        );
    }
    ips.shrink_to_fit();
    ips
}

/// Named ports of every container (sidecar init containers included).
fn named_ports(pod: &Pod) -> Vec<NamedPort> {
    let Some(spec) = &pod.spec else {
        return Vec::new();
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    containers
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone()?,
                protocol: Protocol::from_api(p.protocol.as_deref().unwrap_or("TCP"))?,
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn from(v: serde_json::Value) -> ClusterPod {
        ClusterPod::from(&serde_json::from_value::<Pod>(v).unwrap())
    }

    #[test]
    fn keeps_what_policy_reads() {
        let p = from(json!({
            "metadata": {"name": "a", "namespace": "x", "uid": "u1", "resourceVersion": "7",
                         "labels": {"app": "web"}, "annotations": {"big": "x"}},
            "spec": {"nodeName": "n1",
                     "containers": [{"name": "c", "image": "busybox",
                                     "ports": [{"name": "http", "containerPort": 80},
                                               {"containerPort": 81},
                                               {"name": "dns", "containerPort": 53,
                                                "protocol": "UDP"}]}],
                     "initContainers": [{"name": "side", "restartPolicy": "Always",
                                         "ports": [{"name": "metrics", "containerPort": 9000}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.2",
                       "podIPs": [{"ip": "fd00::2"}, {"ip": "10.244.1.2"}]}
        }));
        assert_eq!((p.namespace.as_str(), p.name.as_str()), ("x", "a"));
        assert_eq!(p.key(), "u1");
        assert_eq!(p.resource_version.as_deref(), Some("7"));
        assert_eq!(p.node_name.as_deref(), Some("n1"));
        assert_eq!(p.labels["app"], "web");
        assert!(!p.host_network && !p.finished);
        // Both families, in the order the status lists them.
        assert_eq!(
            p.ips,
            [
                "fd00::2".parse::<IpAddr>().unwrap(),
                "10.244.1.2".parse().unwrap()
            ]
        );
        let ports: Vec<(&str, Protocol, u16)> = p
            .ports
            .iter()
            .map(|n| (n.name.as_str(), n.protocol, n.port))
            .collect();
        assert_eq!(
            ports,
            [
                ("http", Protocol::Tcp, 80),
                ("dns", Protocol::Udp, 53),
                ("metrics", Protocol::Tcp, 9000)
            ]
        );
    }

    #[test]
    fn defaults_of_a_sparse_pod() {
        let p = from(json!({"metadata": {"name": "b"},
                            "spec": {"containers": [], "hostNetwork": true},
                            "status": {"phase": "Failed", "podIP": "10.244.1.3"}}));
        assert_eq!(p.namespace, "default");
        assert_eq!(p.key(), "default/b");
        assert!(p.host_network && p.finished);
        assert_eq!(p.ips, ["10.244.1.3".parse::<IpAddr>().unwrap()]);
        assert!(p.ports.is_empty() && p.labels.is_empty() && p.node_name.is_none());
    }
}
