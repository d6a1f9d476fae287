//! The agent's own Node: what it reads of it (uid, InternalIP, podCIDRs) and the one condition
//! it writes (`NetworkUnavailable`).

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use std::net::Ipv4Addr;

/// What the agent knows of its node from the API.
pub struct NodeFacts {
    pub uid: String,
    pub internal_ip: Option<Ipv4Addr>,
    /// `spec.podCIDRs` (or the older `spec.podCIDR`) as far as it parses as IPv4.
    pub pod_cidr: Option<ipnet::Ipv4Net>,
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
    let spec = node.spec.as_ref();
    let pod_cidr = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .into_iter()
        .flatten()
        .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
        .find_map(|c| c.parse().ok());
    Ok(NodeFacts {
        uid: node.metadata.uid.unwrap_or_default(),
        internal_ip,
        pod_cidr,
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
