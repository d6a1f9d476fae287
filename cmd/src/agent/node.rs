//! The agent's own Node: what it reads of it (uid, InternalIP, podCIDRs) and the one condition
//! it writes (`NetworkUnavailable`).

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use kube::api::{Api, Patch, PatchParams};

/// What the agent knows of its node from the API.
pub struct NodeFacts {
    pub uid: String,
    /// The first InternalIP (either family: an IPv6-only node's is IPv6).
    pub internal_ip: Option<std::net::IpAddr>,
    /// `spec.podCIDRs` (or the older `spec.podCIDR`): its IPv4 range.
    pub pod_cidr: Option<ipnet::Ipv4Net>,
    /// `spec.podCIDRs`: its IPv6 range (a dual-stack or IPv6-only cluster's).
    pub pod_cidr_v6: Option<ipnet::Ipv6Net>,
}

/// The Node's pod ranges per family: the first of each family in `spec.podCIDRs`, then in the
/// older `spec.podCIDR` (kube-controller-manager writes one of each family, the primary first,
/// and `podCIDR` equal to the first). What does not parse as a CIDR is skipped.
pub fn pod_cidrs(spec: Option<&NodeSpec>) -> (Option<ipnet::Ipv4Net>, Option<ipnet::Ipv6Net>) {
    let all: Vec<ipnet::IpNet> = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let v4 = all.iter().find_map(|n| match n {
        ipnet::IpNet::V4(n) => Some(*n),
        ipnet::IpNet::V6(_) => None,
    });
    let v6 = all.iter().find_map(|n| match n {
        ipnet::IpNet::V6(n) => Some(*n),
        ipnet::IpNet::V4(_) => None,
    });
    (v4, v6)
}

pub async fn facts(nodes: &Api<Node>, name: &str) -> Result<NodeFacts> {
    let node = nodes
        .get(name)
        .await
        .with_context(|| format!("reading node {name}"))?;
    let internal_ip = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
        .and_then(|a| a.address.parse().ok());
    let (pod_cidr, pod_cidr_v6) = pod_cidrs(node.spec.as_ref());
    Ok(NodeFacts {
        uid: node.metadata.uid.unwrap_or_default(),
        internal_ip,
        pod_cidr,
        pod_cidr_v6,
    })
}

/// The `NetworkUnavailable` condition as sluice sets it: `True` from the agent's start until its
/// datapath is up (the node controller taints the node meanwhile, so no pod is scheduled onto a
/// network that cannot wire it), `False` after.
pub fn network_condition(available: bool, now: &str) -> serde_json::Value {
    let (status, reason, message) = if available {
        (
            "False",
            "SluiceIsUp",
            "sluice programmed this node's datapath",
        )
    } else {
        (
            "True",
            "SluiceStarting",
            "sluice has not yet programmed this node's datapath",
        )
    };
    serde_json::json!({
        "status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}
    })
}

pub async fn set_network_available(nodes: &Api<Node>, name: &str, available: bool) -> Result<()> {
    let now = jiff::Timestamp::now()
        .round(jiff::Unit::Second)?
        .to_string();
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Strategic(network_condition(available, &now)),
        )
        .await
        .with_context(|| format!("setting NetworkUnavailable={}", !available))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pod_cidrs: &[&str], pod_cidr: Option<&str>) -> NodeSpec {
        NodeSpec {
            pod_cidrs: Some(pod_cidrs.iter().map(|s| s.to_string()).collect()),
            pod_cidr: pod_cidr.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn pod_cidrs_of_both_families_are_read() {
        let v4 = |s: &str| Some(s.parse::<ipnet::Ipv4Net>().unwrap());
        let v6 = |s: &str| Some(s.parse::<ipnet::Ipv6Net>().unwrap());
        // Dual-stack, either family first (the primary is first).
        for spec in [
            spec(
                &["10.244.2.0/24", "fd00:10:244:2::/64"],
                Some("10.244.2.0/24"),
            ),
            spec(
                &["fd00:10:244:2::/64", "10.244.2.0/24"],
                Some("fd00:10:244:2::/64"),
            ),
        ] {
            assert_eq!(
                pod_cidrs(Some(&spec)),
                (v4("10.244.2.0/24"), v6("fd00:10:244:2::/64"))
            );
        }
        assert_eq!(
            pod_cidrs(Some(&spec(&["fd00:10:244:2::/64"], None))),
            (None, v6("fd00:10:244:2::/64"))
        );
        // Only the older field, and garbage skipped.
        assert_eq!(
            pod_cidrs(Some(&spec(&["nonsense"], Some("10.244.2.0/24")))),
            (v4("10.244.2.0/24"), None)
        );
        assert_eq!(pod_cidrs(None), (None, None));
        assert_eq!(pod_cidrs(Some(&NodeSpec::default())), (None, None));
    }

    #[test]
    fn the_condition_says_unavailable_until_the_datapath_is_up() {
        let starting = network_condition(false, "t");
        let c = &starting["status"]["conditions"][0];
        assert_eq!(
            (c["type"].as_str(), c["status"].as_str()),
            (Some("NetworkUnavailable"), Some("True"))
        );
        let up = network_condition(true, "t");
        assert_eq!(up["status"]["conditions"][0]["status"], "False");
        assert_eq!(up["status"]["conditions"][0]["reason"], "SluiceIsUp");
    }
}
