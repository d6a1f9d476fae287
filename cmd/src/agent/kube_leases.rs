//! [`LeaseStore`] over the API server's `coordination.k8s.io/v1` Leases in sluice's namespace
//! (`sluice-system`), read by their label and one at a time (see [`super::tolerant`]).

use super::tolerant::Skips;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams, Preconditions,
};
use kube::Client;
use sluice_health::Health;
use sluice_net::lease::store::{LeaseStore, StoreError};
use sluice_net::lease::{LeaseView, NodeOwner, LEASE_LABEL, LEASE_LABEL_VALUE, LEASE_PREFIX};
use std::sync::Arc;
use std::time::SystemTime;

#[derive(Clone)]
pub struct KubeLeases {
    api: Api<Lease>,
    raw: Api<DynamicObject>,
    skips: Arc<Skips>,
    health: Health,
}

/// Leases as the dynamic API sees them, for watches that must survive an unreadable object.
pub fn raw_api(client: Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client, namespace, &ApiResource::erase::<Lease>(&()))
}

/// The selector of sluice's leases.
pub fn selector() -> String {
    format!("{LEASE_LABEL}={LEASE_LABEL_VALUE}")
}

impl KubeLeases {
    pub fn new(client: Client, namespace: &str, skips: Arc<Skips>, health: Health) -> Self {
        Self {
            api: Api::namespaced(client.clone(), namespace),
            raw: raw_api(client, namespace),
            skips,
            health,
        }
    }

    /// A watched lease as sluice sees it; `None` (reported once) when it does not decode.
    pub fn view(&self, obj: &DynamicObject) -> Option<LeaseView> {
        self.skips
            .decode::<Lease>("Lease", obj, &self.health)
            .map(|l| to_view(&l))
    }
}

/// sluice 0.1's leases in `kube-system`, read (never written) so that an upgraded node keeps its
/// subnet and still sees the peers that run 0.1 while the DaemonSet rolls. They carry no label:
/// they are found by name.
pub async fn legacy_leases(
    raw: &Api<DynamicObject>,
    skips: &Skips,
    health: &Health,
) -> Result<Vec<LeaseView>, kube::Error> {
    let list = raw.list(&ListParams::default()).await?;
    Ok(legacy_views(list.items.iter(), skips, health))
}

pub fn legacy_views<'a>(
    objects: impl Iterator<Item = &'a DynamicObject>,
    skips: &Skips,
    health: &Health,
) -> Vec<LeaseView> {
    objects
        .filter(|o| {
            o.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with(LEASE_PREFIX))
        })
        .filter_map(|o| skips.decode::<Lease>("Lease", o, health))
        .map(|l| to_view(&l))
        .collect()
}

fn micro(t: Option<SystemTime>) -> Option<MicroTime> {
    t.and_then(|t| jiff::Timestamp::try_from(t).ok())
        .map(MicroTime)
}

fn system_time(t: Option<&MicroTime>) -> Option<SystemTime> {
    t.map(|t| SystemTime::from(t.0))
}

pub fn to_lease(v: &LeaseView) -> Lease {
    Lease {
        metadata: ObjectMeta {
            name: Some(v.name.clone()),
            labels: Some([(LEASE_LABEL.to_string(), LEASE_LABEL_VALUE.to_string())].into()),
            resource_version: v.resource_version.clone(),
            annotations: Some(v.annotations.clone()),
            owner_references: v.owner.as_ref().map(|o| {
                vec![OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: o.name.clone(),
                    uid: o.uid.clone(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: v.holder.clone(),
            acquire_time: micro(v.acquire_time),
            renew_time: micro(v.renew_time),
            lease_duration_seconds: v.duration_secs.and_then(|d| i32::try_from(d).ok()),
            ..Default::default()
        }),
    }
}

pub fn to_view(l: &Lease) -> LeaseView {
    let spec = l.spec.clone().unwrap_or_default();
    LeaseView {
        name: l.metadata.name.clone().unwrap_or_default(),
        holder: spec.holder_identity,
        acquire_time: system_time(spec.acquire_time.as_ref()),
        renew_time: system_time(spec.renew_time.as_ref()),
        duration_secs: spec
            .lease_duration_seconds
            .and_then(|d| u32::try_from(d).ok()),
        resource_version: l.metadata.resource_version.clone(),
        annotations: l.metadata.annotations.clone().unwrap_or_default(),
        owner: l
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "Node")
            .map(|o| NodeOwner {
                name: o.name.clone(),
                uid: o.uid.clone(),
            }),
    }
}

fn map_err(op: &'static str, name: &str, e: kube::Error) -> StoreError {
    match &e {
        kube::Error::Api(s) if s.code == 409 && s.reason == "AlreadyExists" => {
            StoreError::AlreadyExists { name: name.into() }
        }
        kube::Error::Api(s) if s.code == 409 => StoreError::Conflict { name: name.into() },
        kube::Error::Api(s) if s.code == 404 => StoreError::NotFound { name: name.into() },
        _ => StoreError::Backend {
            op,
            name: name.into(),
            source: Box::new(e),
        },
    }
}

impl LeaseStore for KubeLeases {
    async fn list(&self) -> Result<Vec<LeaseView>, StoreError> {
        let leases = self
            .raw
            .list(&ListParams::default().labels(&selector()))
            .await
            .map_err(|e| map_err("listing", "*", e))?;
        Ok(leases
            .items
            .iter()
            .filter(|l| {
                l.metadata
                    .name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(LEASE_PREFIX))
            })
            .filter_map(|l| self.view(l))
            .collect())
    }

    async fn create(&self, lease: &LeaseView) -> Result<LeaseView, StoreError> {
        let mut l = to_lease(lease);
        l.metadata.resource_version = None;
        self.api
            .create(&PostParams::default(), &l)
            .await
            .map(|l| to_view(&l))
            .map_err(|e| map_err("creating", &lease.name, e))
    }

    async fn update(&self, lease: &LeaseView) -> Result<LeaseView, StoreError> {
        self.api
            .replace(&lease.name, &PostParams::default(), &to_lease(lease))
            .await
            .map(|l| to_view(&l))
            .map_err(|e| map_err("updating", &lease.name, e))
    }

    async fn delete(&self, name: &str, resource_version: Option<&str>) -> Result<(), StoreError> {
        let dp = DeleteParams {
            preconditions: resource_version.map(|rv| Preconditions {
                resource_version: Some(rv.into()),
                uid: None,
            }),
            ..Default::default()
        };
        self.api
            .delete(name, &dp)
            .await
            .map(|_| ())
            .map_err(|e| map_err("deleting", name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lease_view_round_trips_through_the_api_type() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let v = LeaseView {
            name: "sluice-10-244-3-0-24".into(),
            holder: Some("n1".into()),
            acquire_time: Some(t),
            renew_time: Some(t + Duration::from_secs(5)),
            duration_secs: Some(40),
            resource_version: Some("17".into()),
            annotations: [("sluice.dev/node".to_string(), "n1".to_string())].into(),
            owner: Some(NodeOwner {
                name: "n1".into(),
                uid: "u-1".into(),
            }),
        };
        assert_eq!(to_view(&to_lease(&v)), v);
        let labels = to_lease(&v).metadata.labels.unwrap();
        assert_eq!(labels.get(LEASE_LABEL).map(String::as_str), Some("true"));
    }
}
