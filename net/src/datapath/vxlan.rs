//! VXLAN as a [`Backend`]: the device, and FDB, neighbour and route entries for the peers whose
//! path is VXLAN ([`crate::vxlan`] plans, diffs and applies them). Its removals wait for the
//! prune phase.

use super::{Backend, BackendFuture, DatapathPlan};
use crate::vxlan::apply::VxlanKernel;
use crate::vxlan::diff::Change;

pub struct VxlanBackend {
    kernel: VxlanKernel,
}

impl VxlanBackend {
    pub fn new(kernel: VxlanKernel) -> Self {
        Self { kernel }
    }
}

impl Backend for VxlanBackend {
    fn name(&self) -> &'static str {
        "vxlan"
    }

    fn install<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize> {
        Box::pin(async move {
            let changes = self
                .kernel
                .sync_where(&plan.vxlan, |c| !c.is_removal())
                .await?;
            Ok(changes.len())
        })
    }

    fn prune<'a>(&'a mut self, plan: &'a DatapathPlan) -> BackendFuture<'a, usize> {
        Box::pin(async move {
            let changes = self
                .kernel
                .sync_where(&plan.vxlan, Change::is_removal)
                .await?;
            Ok(changes.len())
        })
    }

    fn describe(&self, plan: &DatapathPlan) -> (&'static str, serde_json::Value) {
        let d = &plan.vxlan.device;
        (
            "tunnel",
            serde_json::json!({
                "device": plan.vxlan.wanted.then_some(d.name.as_str()),
                "vni": d.vni,
                "port": d.port,
                "mtu": d.mtu,
                "peers": plan.vxlan.fdb.len(),
            }),
        )
    }
}
