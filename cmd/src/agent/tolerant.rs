//! Reading watched objects one at a time. kube-rs's typed watcher decodes a whole list at once,
//! so one object whose spec does not deserialize (`leaseDurationSeconds: "forty"`, which a
//! lenient API server stores) fails every list and the loop waits forever. The agent watches
//! such kinds as [`DynamicObject`]s and decodes each here: an object it cannot read is skipped,
//! logged once and counted (`sluice_objects_skipped{kind}`) per version, and never stops the rest.

use kube::api::DynamicObject;
use serde::de::DeserializeOwned;
use sluice_health::metrics::KindLabels;
use sluice_health::Health;
use std::collections::HashMap;
use std::sync::Mutex;

/// Remembers which object versions were already reported, so a bad object costs one log line
/// and one count however many passes read it.
#[derive(Debug, Default)]
pub struct Skips {
    reported: Mutex<HashMap<(String, String), String>>,
}

impl Skips {
    /// Decodes `obj` as `K`; on failure reports it (once per resourceVersion) and returns `None`.
    pub fn decode<K: DeserializeOwned>(
        &self,
        kind: &str,
        obj: &DynamicObject,
        health: &Health,
    ) -> Option<K> {
        match decode(obj) {
            Ok(k) => Some(k),
            Err(e) => {
                let name = object_name(obj);
                let version = obj.metadata.resource_version.clone().unwrap_or_default();
                let mut reported = self
                    .reported
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let key = (kind.to_string(), name.clone());
                if reported.get(&key) != Some(&version) {
                    tracing::warn!(kind, object = name, resource_version = version, error = %e, "skipping an object that does not decode");
                    health
                        .metrics
                        .objects_skipped
                        .get_or_create(&KindLabels { kind: kind.into() })
                        .inc();
                    reported.insert(key, version);
                }
                None
            }
        }
    }
}

/// `obj` as the typed `K`, through its JSON.
pub fn decode<K: DeserializeOwned>(obj: &DynamicObject) -> Result<K, serde_json::Error> {
    serde_json::to_value(obj).and_then(serde_json::from_value)
}

/// `namespace/name` of an object, for logs.
pub fn object_name(obj: &DynamicObject) -> String {
    match &obj.metadata.namespace {
        Some(ns) => format!("{ns}/{}", obj.metadata.name.as_deref().unwrap_or("")),
        None => obj.metadata.name.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::Lease;

    fn object(spec: serde_json::Value, rv: &str) -> DynamicObject {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "sluice-10-244-1-0-24", "namespace": "sluice-system", "resourceVersion": rv},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_bad_object_is_skipped_and_counted_once_per_version() {
        let health = Health::new(std::time::Duration::from_secs(60), "v", "c");
        let skips = Skips::default();
        let good = object(
            serde_json::json!({"holderIdentity": "n1", "leaseDurationSeconds": 40}),
            "1",
        );
        let lease: Lease = skips.decode("Lease", &good, &health).unwrap();
        assert_eq!(lease.spec.unwrap().lease_duration_seconds, Some(40));
        let bad = object(serde_json::json!({"leaseDurationSeconds": "forty"}), "2");
        for _ in 0..3 {
            assert!(skips.decode::<Lease>("Lease", &bad, &health).is_none());
        }
        let count = || {
            health
                .metrics
                .objects_skipped
                .get_or_create(&KindLabels {
                    kind: "Lease".into(),
                })
                .get()
        };
        assert_eq!(count(), 1);
        // A new version of the same bad object is a new report.
        let worse = object(serde_json::json!({"leaseDurationSeconds": "fifty"}), "3");
        assert!(skips.decode::<Lease>("Lease", &worse, &health).is_none());
        assert_eq!(count(), 2);
    }
}
