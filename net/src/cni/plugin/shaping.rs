//! The `bandwidth` capability in the verbs: what ADD, CHECK and GC ask of
//! [`crate::bandwidth`] and the kernel's shaping, kept here so the verbs change by a line each.

use super::super::config::NetConf;
use super::super::{CniError, ErrorCode};
use crate::bandwidth::{self, BandwidthEntry, ShapingPlan};
use crate::kernel::PodKernel;
use serde::Deserialize;
use std::collections::BTreeSet;
use tracing::warn;

/// The shaping `runtimeConfig.bandwidth` asks for; `None` when it asks for none (absent, null,
/// or every value 0). A value that does not decode or plan is the runtime's error, named.
pub(super) fn requested(conf: &NetConf) -> Result<Option<ShapingPlan>, CniError> {
    let Some(value) = conf
        .runtime_config
        .as_ref()
        .and_then(|r| r.get("bandwidth"))
        .filter(|v| !v.is_null())
    else {
        return Ok(None);
    };
    let value = super::super::config::go_json_keys(
        value,
        &["ingressRate", "ingressBurst", "egressRate", "egressBurst"],
    );
    let entry = BandwidthEntry::deserialize(&value).map_err(|e| {
        CniError::new(
            ErrorCode::Decoding,
            "runtimeConfig.bandwidth is not a bandwidth entry (ingressRate, ingressBurst, \
             egressRate, egressBurst: whole numbers of bits per second and bits)",
        )
        .with_details(e.to_string())
    })?;
    let plan = bandwidth::plan(&entry)?;
    Ok((!plan.is_empty()).then_some(plan))
}

/// ADD's rollback: the ifb goes with whatever else ADD made (the veth's qdiscs go with it).
pub(super) async fn undo<K: PodKernel>(kernel: &mut K, host_ifname: &str, container_id: &str) {
    if let Err(e) = kernel.remove_shaping(host_ifname).await {
        warn!(container_id = %container_id, error = %e, "rollback: deleting the ifb failed");
    }
}

/// CHECK: what differs from the requested shaping, if any was requested.
pub(super) async fn check<K: PodKernel>(
    conf: &NetConf,
    host_ifname: &str,
    kernel: &mut K,
) -> Result<Vec<String>, CniError> {
    let Some(plan) = requested(conf)? else {
        return Ok(Vec::new());
    };
    let seen = kernel.observe_shaping(host_ifname).await?;
    Ok(bandwidth::problems(&plan, host_ifname, &seen))
}

/// GC: deletes every ifb whose attachment is not in `keep` (host veth names); the count removed.
pub(super) async fn gc<K: PodKernel>(
    kernel: &mut K,
    keep: &BTreeSet<String>,
    errors: &mut Vec<String>,
) -> usize {
    let keep: BTreeSet<String> = keep.iter().map(|h| bandwidth::ifb_name(h)).collect();
    let mut removed = 0;
    match kernel.shaping_ifbs().await {
        Ok(ifbs) => {
            for name in ifbs
                .iter()
                .filter(|n| bandwidth::is_ifb_name(n) && !keep.contains(*n))
            {
                match kernel.delete_host_link(name).await {
                    Ok(true) => removed += 1,
                    Ok(false) => {}
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    removed
}
