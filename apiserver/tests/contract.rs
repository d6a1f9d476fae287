//! The embedded API server against kube-apiserver's contract, through the kube crate.
//!
//! Every scenario here is written to the behaviour of the real kube-apiserver: set
//! `SLUICE_E2E_KUBECONFIG` to run the same tests against one (see `common`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{
    bounded, bounded_for, e2e_has_controllers, eventually, expect_status, is_e2e, rv_num, unique,
    Harness, STEP, TEST_LABEL,
};
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    Binding, ConfigMap, Container, Namespace, Node, ObjectReference, Pod, PodCondition, PodSpec,
    PodStatus,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::core::{GroupVersionKind, Status};
use kube::discovery::{ApiCapabilities, ApiResource, Discovery, Scope};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use sluice_apiserver::{ApiServerError, Options};

// ---------------------------------------------------------------------------------------------
// fixtures

fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    let mut l: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.entry(TEST_LABEL.to_string())
        .or_insert_with(|| "true".to_string());
    ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(l),
        ..ObjectMeta::default()
    }
}

fn cm(name: &str, data: &[(&str, &str)]) -> ConfigMap {
    cm_labeled(name, &[], data)
}

fn cm_labeled(name: &str, labels: &[(&str, &str)], data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: meta(name, labels),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ),
        ..ConfigMap::default()
    }
}

const IMAGE: &str = "registry.k8s.io/pause:3.9";
const IMAGE2: &str = "registry.k8s.io/pause:3.10";

/// A pod nothing in a real cluster acts on: no scheduler has this name, no node is set.
fn pod(name: &str) -> Pod {
    pod_with(name, &["c"], None)
}

fn pod_with(name: &str, containers: &[&str], node: Option<&str>) -> Pod {
    Pod {
        metadata: meta(name, &[]),
        spec: Some(PodSpec {
            containers: containers
                .iter()
                .map(|c| Container {
                    name: c.to_string(),
                    image: Some(IMAGE.to_string()),
                    ..Container::default()
                })
                .collect(),
            scheduler_name: Some("sluice-test-no-scheduler".into()),
            node_name: node.map(str::to_string),
            termination_grace_period_seconds: Some(0),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

fn netpol(name: &str, app: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: meta(name, &[]),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some([("app".to_string(), app.to_string())].into()),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ..NetworkPolicySpec::default()
        }),
    }
}

fn lease(name: &str, holder: &str) -> Lease {
    Lease {
        metadata: meta(name, &[]),
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(40),
            ..LeaseSpec::default()
        }),
    }
}

fn node(name: &str) -> Node {
    Node {
        metadata: meta(name, &[]),
        ..Node::default()
    }
}

async fn create<K>(api: &Api<K>, obj: &K) -> K
where
    K: Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    bounded(api.create(&PostParams::default(), obj))
        .await
        .unwrap_or_else(|e| panic!("create {:?}: {e}", obj.meta().name))
}

async fn create_node(h: &Harness, name: &str) -> Node {
    let nodes: Api<Node> = Api::all(h.client.clone());
    h.track_node(name);
    create(&nodes, &node(name)).await
}

fn data(c: &ConfigMap) -> BTreeMap<String, String> {
    c.data.clone().unwrap_or_default()
}

fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn names<K: ResourceExt>(items: &[K]) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(|o| o.name_any()).collect();
    v.sort();
    v
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn assert_server_fields<K: Resource>(obj: &K, what: &str) {
    let m = obj.meta();
    assert!(
        m.uid.as_deref().is_some_and(|u| !u.is_empty()),
        "{what}: no uid"
    );
    assert!(
        m.creation_timestamp.is_some(),
        "{what}: no creationTimestamp"
    );
    rv_num(m.resource_version.as_ref());
}

// ---------------------------------------------------------------------------------------------
// create / get / errors

#[tokio::test(flavor = "multi_thread")]
async fn create_sets_server_fields() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let c = &h.client;

    let cms: Api<ConfigMap> = Api::namespaced(c.clone(), &ns);
    let made = create(&cms, &cm("cm1", &[("k", "v")])).await;
    assert_server_fields(&made, "configmap");
    assert_eq!(made.metadata.namespace.as_deref(), Some(ns.as_str()));
    assert_eq!(data(&made), map(&[("k", "v")]));
    let got = bounded(cms.get("cm1")).await.unwrap();
    assert_eq!(got.metadata.uid, made.metadata.uid);
    assert_eq!(
        got.metadata.resource_version,
        made.metadata.resource_version
    );

    let pods: Api<Pod> = Api::namespaced(c.clone(), &ns);
    let p = create(&pods, &pod("p1")).await;
    assert_server_fields(&p, "pod");
    // kube-apiserver starts every pod Pending (pod strategy PrepareForCreate).
    assert_eq!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending"),
        "a new pod's status.phase"
    );
    // Since 1.33 pods carry metadata.generation (1 on create); older servers leave it unset.
    assert!(
        matches!(p.metadata.generation, None | Some(1)),
        "pod generation {:?}",
        p.metadata.generation
    );

    let nps: Api<NetworkPolicy> = Api::namespaced(c.clone(), &ns);
    let np = create(&nps, &netpol("np1", "web")).await;
    assert_server_fields(&np, "networkpolicy");
    assert_eq!(np.metadata.generation, Some(1), "networkpolicy generation");

    let leases: Api<Lease> = Api::namespaced(c.clone(), &ns);
    let l = create(&leases, &lease("l1", "node-a")).await;
    assert_server_fields(&l, "lease");
    assert_eq!(
        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()),
        Some("node-a")
    );

    let n = create_node(&h, &unique("node")).await;
    assert_server_fields(&n, "node");
    assert_eq!(n.metadata.namespace, None, "nodes are cluster-scoped");

    let nsobj = bounded(Api::<Namespace>::all(c.clone()).get(&ns))
        .await
        .unwrap();
    assert_server_fields(&nsobj, "namespace");
    assert_eq!(
        nsobj.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Active")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_http_create_is_201_and_errors_are_status_objects() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let body = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "raw", "labels": {TEST_LABEL: "true"}},
        "data": {"a": "1"}
    });
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/configmaps"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    let (code, v) = send_raw(&h.client, req).await;
    assert_eq!(code, 201, "POST create status code; body {v}");
    assert_eq!(v["kind"], "ConfigMap");
    assert_eq!(v["apiVersion"], "v1");
    assert_eq!(v["metadata"]["namespace"], ns.as_str());

    // A GET of a missing object: 404 with a Status body.
    let req = http::Request::get(format!("/api/v1/namespaces/{ns}/configmaps/missing"))
        .body(Vec::new())
        .unwrap();
    let (code, v) = send_raw(&h.client, req).await;
    assert_eq!(code, 404);
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["apiVersion"], "v1", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    assert_eq!(v["reason"], "NotFound", "{v}");
    assert_eq!(v["code"], 404, "{v}");

    // The body's namespace must match the URL's: 400 BadRequest.
    let other = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "raw2", "namespace": "kube-system"},
    });
    let req = http::Request::post(format!("/api/v1/namespaces/{ns}/configmaps"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&other).unwrap())
        .unwrap();
    let (code, v) = send_raw(&h.client, req).await;
    assert_eq!(code, 400, "namespace mismatch; body {v}");
    assert_eq!(v["reason"], "BadRequest", "{v}");
}

async fn send_raw(client: &Client, req: http::Request<Vec<u8>>) -> (u16, serde_json::Value) {
    let req = req.map(kube::client::Body::from);
    let resp = bounded(client.send(req)).await.expect("send");
    let code = resp.status().as_u16();
    let bytes = bounded(http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .expect("body")
        .to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "response body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (code, v)
}

#[tokio::test(flavor = "multi_thread")]
async fn create_existing_name_is_409_already_exists() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("dup", &[])).await;
    let s = expect_status(
        bounded(cms.create(&PostParams::default(), &cm("dup", &[("x", "y")]))).await,
        409,
        "AlreadyExists",
    );
    let d = s.details.expect("details");
    assert_eq!(d.name, "dup");
    assert_eq!(d.kind, "configmaps");
    // The first object is untouched.
    assert_eq!(data(&bounded(cms.get("dup")).await.unwrap()), map(&[]));

    let n = unique("node");
    create_node(&h, &n).await;
    let nodes: Api<Node> = Api::all(h.client.clone());
    expect_status(
        bounded(nodes.create(&PostParams::default(), &node(&n))).await,
        409,
        "AlreadyExists",
    );

    let nss: Api<Namespace> = Api::all(h.client.clone());
    let again = Namespace {
        metadata: meta(&ns, &[]),
        ..Namespace::default()
    };
    expect_status(
        bounded(nss.create(&PostParams::default(), &again)).await,
        409,
        "AlreadyExists",
    );

    // Same name in another namespace is a different object.
    let ns2 = h.namespace().await;
    let cms2: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns2);
    create(&cms2, &cm("dup", &[])).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_missing_is_404_not_found_status() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let s = expect_status(bounded(cms.get("nope")).await, 404, "NotFound");
    assert_eq!(s.status, Some(kube::core::response::StatusSummary::Failure));
    let d = s.details.expect("details");
    assert_eq!((d.name.as_str(), d.kind.as_str()), ("nope", "configmaps"));
    assert!(s.message.contains("not found"), "message {:?}", s.message);

    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let s = expect_status(bounded(leases.get("nope")).await, 404, "NotFound");
    let d = s.details.expect("details");
    assert_eq!(
        (d.group.as_str(), d.kind.as_str()),
        ("coordination.k8s.io", "leases")
    );

    let nodes: Api<Node> = Api::all(h.client.clone());
    expect_status(bounded(nodes.get(&unique("nonode"))).await, 404, "NotFound");
    let nss: Api<Namespace> = Api::all(h.client.clone());
    expect_status(bounded(nss.get(&unique("nons"))).await, 404, "NotFound");
    // get_opt maps the 404 to None.
    assert!(bounded(cms.get_opt("nope")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn create_in_missing_namespace_is_404() {
    let h = Harness::start().await;
    let missing = unique("missing");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &missing);
    let s = expect_status(
        bounded(cms.create(&PostParams::default(), &cm("x", &[]))).await,
        404,
        "NotFound",
    );
    let d = s.details.expect("details");
    assert_eq!(
        (d.name.as_str(), d.kind.as_str()),
        (missing.as_str(), "namespaces")
    );
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &missing);
    expect_status(
        bounded(pods.create(&PostParams::default(), &pod("p"))).await,
        404,
        "NotFound",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn default_namespaces_exist() {
    let h = Harness::start().await;
    let nss: Api<Namespace> = Api::all(h.client.clone());
    for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let ns = bounded(nss.get(n))
            .await
            .unwrap_or_else(|e| panic!("namespace {n}: {e}"));
        assert_eq!(
            ns.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Active"),
            "{n}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// updates, optimistic concurrency, generation, status

#[tokio::test(flavor = "multi_thread")]
async fn update_with_stale_resource_version_is_409_conflict() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("occ", &[("a", "1")])).await;

    let old = bounded(cms.get("occ")).await.unwrap();
    let mut next = old.clone();
    next.data = Some(map(&[("a", "2")]));
    let updated = bounded(cms.replace("occ", &PostParams::default(), &next))
        .await
        .unwrap();
    assert!(
        rv_num(updated.metadata.resource_version.as_ref())
            > rv_num(old.metadata.resource_version.as_ref()),
        "rv must grow on update"
    );
    assert_eq!(updated.metadata.uid, old.metadata.uid);
    assert_eq!(
        updated.metadata.creation_timestamp,
        old.metadata.creation_timestamp
    );
    assert_eq!(data(&updated), map(&[("a", "2")]));

    // Same old rv again: conflict, nothing written.
    let mut stale = old.clone();
    stale.data = Some(map(&[("a", "3")]));
    let s = expect_status(
        bounded(cms.replace("occ", &PostParams::default(), &stale)).await,
        409,
        "Conflict",
    );
    assert!(s.message.contains("modified"), "message {:?}", s.message);
    let now = bounded(cms.get("occ")).await.unwrap();
    assert_eq!(data(&now), map(&[("a", "2")]));
    assert_eq!(
        now.metadata.resource_version,
        updated.metadata.resource_version
    );

    // No resourceVersion at all: an unconditional update (allowed for configmaps).
    let mut uncond = cm("occ", &[("a", "4")]);
    uncond.metadata.resource_version = None;
    let u = bounded(cms.replace("occ", &PostParams::default(), &uncond))
        .await
        .unwrap();
    assert_eq!(data(&u), map(&[("a", "4")]));

    // Replacing a missing configmap is 404 (no create on update).
    let mut missing = cm("never", &[]);
    missing.metadata.resource_version = None;
    expect_status(
        bounded(cms.replace("never", &PostParams::default(), &missing)).await,
        404,
        "NotFound",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn generation_bumps_on_spec_change_only() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let nps: Api<NetworkPolicy> = Api::namespaced(h.client.clone(), &ns);
    let np = create(&nps, &netpol("gen", "web")).await;
    assert_eq!(np.metadata.generation, Some(1));

    // Label only: rv moves, generation does not.
    let mut l = np.clone();
    l.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("extra".into(), "1".into());
    let l = bounded(nps.replace("gen", &PostParams::default(), &l))
        .await
        .unwrap();
    assert_eq!(
        l.metadata.generation,
        Some(1),
        "label change bumped generation"
    );
    assert!(
        rv_num(l.metadata.resource_version.as_ref())
            > rv_num(np.metadata.resource_version.as_ref())
    );

    // Spec change: generation 2.
    let mut s = l.clone();
    s.spec = netpol("gen", "db").spec;
    let s = bounded(nps.replace("gen", &PostParams::default(), &s))
        .await
        .unwrap();
    assert_eq!(
        s.metadata.generation,
        Some(2),
        "spec change must bump generation"
    );

    // Annotation via merge patch: unchanged.
    let a = bounded(nps.patch(
        "gen",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"a": "b"}}})),
    ))
    .await
    .unwrap();
    assert_eq!(a.metadata.generation, Some(2));

    // Spec via merge patch: 3.
    let p = bounded(nps.patch(
        "gen",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"policyTypes": ["Ingress", "Egress"]}})),
    ))
    .await
    .unwrap();
    assert_eq!(p.metadata.generation, Some(3));

    // A client can't set generation itself.
    let mut forged = p.clone();
    forged.metadata.generation = Some(42);
    let f = bounded(nps.replace("gen", &PostParams::default(), &forged))
        .await
        .unwrap();
    assert_eq!(
        f.metadata.generation,
        Some(3),
        "client-set generation must be ignored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_status_is_a_subresource() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    let p0 = create(&pods, &pod("st")).await;
    let gen0 = p0.metadata.generation;

    // Status written through the main resource is ignored (labels still apply).
    let mut via_main = p0.clone();
    via_main.status = Some(PodStatus {
        phase: Some("Running".into()),
        ..PodStatus::default()
    });
    via_main
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("seen".into(), "yes".into());
    let p1 = bounded(pods.replace("st", &PostParams::default(), &via_main))
        .await
        .unwrap();
    assert_eq!(p1.labels().get("seen").map(String::as_str), Some("yes"));
    assert_eq!(
        p1.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending"),
        "status written through the main resource must be ignored"
    );
    assert_eq!(
        p1.metadata.generation, gen0,
        "label change moved generation"
    );

    // Status subresource: status changes, spec changes are ignored, generation unchanged.
    let mut st = p1.clone();
    st.status = Some(PodStatus {
        phase: Some("Running".into()),
        pod_ip: Some("10.244.1.7".into()),
        ..PodStatus::default()
    });
    st.spec.as_mut().unwrap().containers[0].image = Some(IMAGE2.into());
    let p2 = bounded(pods.replace_status("st", &PostParams::default(), &st))
        .await
        .unwrap();
    let status = p2.status.clone().unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.7"));
    assert_eq!(
        p2.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some(IMAGE),
        "spec written through pods/status must be ignored"
    );
    assert_eq!(
        p2.metadata.generation, gen0,
        "status update moved generation"
    );
    assert!(
        rv_num(p2.metadata.resource_version.as_ref())
            > rv_num(p1.metadata.resource_version.as_ref())
    );

    // patch_status (merge).
    let p3 = bounded(pods.patch_status(
        "st",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"hostIP": "192.168.1.2"}})),
    ))
    .await
    .unwrap();
    let status = p3.status.clone().unwrap_or_default();
    assert_eq!(status.host_ip.as_deref(), Some("192.168.1.2"));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(p3.metadata.generation, gen0);

    // get_status returns the whole pod.
    let g = bounded(pods.get_status("st")).await.unwrap();
    assert_eq!(g.metadata.resource_version, p3.metadata.resource_version);

    // A mutable spec field (image) through the main resource: generation bumps where tracked.
    let p4 = bounded(pods.patch(
        "st",
        &PatchParams::default(),
        &Patch::Strategic(json!({"spec": {"containers": [{"name": "c", "image": IMAGE2}]}})),
    ))
    .await
    .unwrap();
    assert_eq!(
        p4.spec.as_ref().unwrap().containers[0].image.as_deref(),
        Some(IMAGE2)
    );
    if let Some(g0) = gen0 {
        assert_eq!(
            p4.metadata.generation,
            Some(g0 + 1),
            "pod spec change must bump generation"
        );
    }
    assert_eq!(
        p4.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_spec_is_immutable_except_image() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    create(&pods, &pod("imm")).await;
    // Adding a container port to a running pod: 422 Invalid (pod updates may not change fields
    // other than image, activeDeadlineSeconds, tolerations additions, ...).
    let s = expect_status(
        bounded(pods.patch(
            "imm",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"containers": [
                {"name": "c", "ports": [{"containerPort": 8080}]}
            ]}})),
        ))
        .await,
        422,
        "Invalid",
    );
    assert!(s.message.contains("Forbidden"), "message {:?}", s.message);
    let p = bounded(pods.get("imm")).await.unwrap();
    assert!(p.spec.unwrap().containers[0].ports.is_none());
}

// ---------------------------------------------------------------------------------------------
// lists

async fn list_names<K>(api: &Api<K>, lp: &ListParams) -> Vec<String>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let l = bounded(api.list(lp))
        .await
        .unwrap_or_else(|e| panic!("list {lp:?}: {e}"));
    names(&l.items)
}

#[tokio::test(flavor = "multi_thread")]
async fn list_with_label_selectors() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let run = unique("run");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let r = run.as_str();
    for (name, labels) in [
        ("a", vec![("env", "prod"), ("tier", "web")]),
        ("b", vec![("env", "dev")]),
        ("c", vec![("env", "test"), ("tier", "db")]),
        ("d", vec![]),
    ] {
        let mut l = labels;
        l.push((TEST_LABEL, r));
        create(&cms, &cm_labeled(name, &l, &[])).await;
    }
    let sel = |s: &str| ListParams::default().labels(&format!("{TEST_LABEL}={run},{s}"));
    let cases: &[(&str, &[&str])] = &[
        ("env=prod", &["a"]),
        ("env==prod", &["a"]),
        ("env!=prod", &["b", "c", "d"]),
        ("env in (prod,dev)", &["a", "b"]),
        ("env notin (prod,dev)", &["c", "d"]),
        ("tier", &["a", "c"]),
        ("!tier", &["b", "d"]),
        ("env=dev,!tier", &["b"]),
        ("env in (prod,test),tier notin (db)", &["a"]),
        ("env=nothing", &[]),
    ];
    for (s, want) in cases {
        assert_eq!(
            list_names(&cms, &sel(s)).await,
            sorted(want),
            "labelSelector {s:?}"
        );
    }
    assert_eq!(
        list_names(
            &cms,
            &ListParams::default().labels(&format!("{TEST_LABEL}={run}"))
        )
        .await,
        sorted(&["a", "b", "c", "d"])
    );
    // A malformed selector is a 400.
    expect_status(
        bounded(cms.list(&ListParams::default().labels("env in (prod"))).await,
        400,
        "BadRequest",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_with_field_selectors_and_across_namespaces() {
    let h = Harness::start().await;
    let ns1 = h.namespace().await;
    let ns2 = h.namespace().await;
    let run = unique("run");
    let lbl = [(TEST_LABEL, run.as_str())];
    let cms1: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns1);
    let cms2: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns2);
    for n in ["x", "y"] {
        create(&cms1, &cm_labeled(n, &lbl, &[])).await;
    }
    create(&cms2, &cm_labeled("x", &lbl, &[])).await;

    let by_run = format!("{TEST_LABEL}={run}");
    assert_eq!(
        list_names(&cms1, &ListParams::default().fields("metadata.name=x")).await,
        sorted(&["x"])
    );
    assert_eq!(
        list_names(
            &cms1,
            &ListParams::default()
                .labels(&by_run)
                .fields("metadata.name!=x")
        )
        .await,
        sorted(&["y"])
    );

    // All namespaces.
    let all: Api<ConfigMap> = Api::all(h.client.clone());
    let l = bounded(all.list(&ListParams::default().labels(&by_run)))
        .await
        .unwrap();
    let mut got: Vec<(String, String)> = l
        .items
        .iter()
        .map(|c| (c.namespace().unwrap_or_default(), c.name_any()))
        .collect();
    got.sort();
    let mut want = vec![
        (ns1.clone(), "x".to_string()),
        (ns1.clone(), "y".to_string()),
        (ns2.clone(), "x".to_string()),
    ];
    want.sort();
    assert_eq!(got, want);
    let l = bounded(
        all.list(
            &ListParams::default()
                .labels(&by_run)
                .fields(&format!("metadata.namespace={ns2}")),
        ),
    )
    .await
    .unwrap();
    assert_eq!(names(&l.items), sorted(&["x"]));
    assert!(l
        .items
        .iter()
        .all(|c| c.namespace().as_deref() == Some(ns2.as_str())));
    let l = bounded(
        all.list(
            &ListParams::default()
                .labels(&by_run)
                .fields(&format!("metadata.namespace={ns1},metadata.name=y")),
        ),
    )
    .await
    .unwrap();
    assert_eq!(names(&l.items), sorted(&["y"]));

    // Pods by spec.nodeName ("" = unscheduled).
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns1);
    let na = unique("na");
    let nb = unique("nb");
    create(&pods, &pod_with("pa", &["c"], Some(&na))).await;
    create(&pods, &pod_with("pb", &["c"], Some(&nb))).await;
    create(&pods, &pod_with("pu", &["c"], None)).await;
    assert_eq!(
        list_names(
            &pods,
            &ListParams::default().fields(&format!("spec.nodeName={na}"))
        )
        .await,
        sorted(&["pa"])
    );
    assert_eq!(
        list_names(&pods, &ListParams::default().fields("spec.nodeName=")).await,
        sorted(&["pu"])
    );
    assert_eq!(
        list_names(
            &pods,
            &ListParams::default().fields(&format!("spec.nodeName!={na}"))
        )
        .await,
        sorted(&["pb", "pu"])
    );
    let allpods: Api<Pod> = Api::all(h.client.clone());
    assert_eq!(
        list_names(
            &allpods,
            &ListParams::default().fields(&format!("spec.nodeName={nb}"))
        )
        .await,
        sorted(&["pb"])
    );

    // A field the resource doesn't index: 400 BadRequest.
    let s = expect_status(
        bounded(cms1.list(&ListParams::default().fields("data.x=1"))).await,
        400,
        "BadRequest",
    );
    assert!(
        s.message.contains("field label not supported"),
        "message {:?}",
        s.message
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn list_paging_with_limit_and_continue() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let run = unique("run");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let want = ["p1", "p2", "p3", "p4", "p5"];
    for n in want {
        create(&cms, &cm_labeled(n, &[(TEST_LABEL, &run)], &[])).await;
    }
    let base = ListParams::default().labels(&format!("{TEST_LABEL}={run}"));
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut token: Option<String> = None;
    let mut first_rv = None;
    loop {
        let mut lp = base.clone().limit(2);
        if let Some(t) = &token {
            lp = lp.continue_token(t);
        }
        let page = bounded(cms.list(&lp)).await.unwrap();
        pages += 1;
        assert!(
            page.items.len() <= 2,
            "page {pages} has {} items",
            page.items.len()
        );
        seen.extend(page.items.iter().map(|c| c.name_any()));
        let rv = page.metadata.resource_version.clone();
        match &first_rv {
            None => first_rv = rv,
            Some(f) => assert_eq!(
                rv.as_ref(),
                Some(f),
                "pages of one list share its resourceVersion"
            ),
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => token = Some(c),
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert!(pages >= 3, "5 items at limit 2 took {pages} pages");
    // Items come in key (name) order, each once.
    assert_eq!(seen, sorted(&want));

    // Without a limit: everything, no continue token.
    let all = bounded(cms.list(&base)).await.unwrap();
    assert_eq!(names(&all.items), sorted(&want));
    assert!(all.metadata.continue_.as_deref().unwrap_or("").is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn list_continue_serves_a_consistent_snapshot() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let run = unique("run");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    for n in ["a", "b", "c", "d"] {
        create(&cms, &cm_labeled(n, &[(TEST_LABEL, &run)], &[])).await;
    }
    let base = ListParams::default().labels(&format!("{TEST_LABEL}={run}"));
    let first = bounded(cms.list(&base.clone().limit(2))).await.unwrap();
    let token = first
        .metadata
        .continue_
        .clone()
        .filter(|c| !c.is_empty())
        .expect("continue token");
    let mut seen = names(&first.items);
    // Changes after the first page are not in the later pages.
    create(&cms, &cm_labeled("e", &[(TEST_LABEL, &run)], &[])).await;
    bounded(cms.delete("c", &DeleteParams::default()))
        .await
        .unwrap();
    let mut token = Some(token);
    while let Some(t) = token {
        let page = bounded(cms.list(&base.clone().limit(2).continue_token(&t)))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        seen.extend(page.items.iter().map(|c| c.name_any()));
        token = page.metadata.continue_.filter(|c| !c.is_empty());
    }
    assert_eq!(
        seen,
        sorted(&["a", "b", "c", "d"]),
        "continued list is the first page's snapshot"
    );
}

// ---------------------------------------------------------------------------------------------
// watches

/// The next non-bookmark event (bounded).
async fn next_event<K, S>(stream: &mut S) -> WatchEvent<K>
where
    S: Stream<Item = kube::Result<WatchEvent<K>>> + Unpin,
{
    loop {
        match bounded(stream.try_next()).await {
            Ok(Some(WatchEvent::Bookmark(_))) => continue,
            Ok(Some(e)) => return e,
            Ok(None) => panic!("watch ended"),
            Err(e) => panic!("watch failed: {e}"),
        }
    }
}

/// Asserts no non-bookmark event arrives within `quiet`.
async fn assert_quiet<K: Resource, S>(stream: &mut S, quiet: Duration)
where
    S: Stream<Item = kube::Result<WatchEvent<K>>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + quiet;
    loop {
        match tokio::time::timeout_at(deadline, stream.try_next()).await {
            Err(_) => return,
            Ok(Ok(Some(WatchEvent::Bookmark(_)))) => continue,
            Ok(Ok(None)) => return,
            Ok(other) => panic!(
                "unexpected watch event: {:?}",
                other.map(|o| o.map(describe))
            ),
        }
    }
}

fn describe<K: Resource>(e: WatchEvent<K>) -> String {
    match e {
        WatchEvent::Added(o) => format!(
            "ADDED {:?} rv {:?}",
            o.meta().name,
            o.meta().resource_version
        ),
        WatchEvent::Modified(o) => {
            format!(
                "MODIFIED {:?} rv {:?}",
                o.meta().name,
                o.meta().resource_version
            )
        }
        WatchEvent::Deleted(o) => format!(
            "DELETED {:?} rv {:?}",
            o.meta().name,
            o.meta().resource_version
        ),
        WatchEvent::Bookmark(b) => format!("BOOKMARK rv {:?}", b.metadata.resource_version),
        WatchEvent::Error(s) => format!("ERROR {s:?}"),
    }
}

fn event_parts(e: WatchEvent<ConfigMap>) -> (&'static str, ConfigMap) {
    match e {
        WatchEvent::Added(o) => ("ADDED", o),
        WatchEvent::Modified(o) => ("MODIFIED", o),
        WatchEvent::Deleted(o) => ("DELETED", o),
        other => panic!("unexpected event {}", describe(other)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_list_rv_sees_changes_in_order_and_resumes() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let run = unique("run");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let sel = format!("{TEST_LABEL}={run}");
    create(&cms, &cm_labeled("before", &[(TEST_LABEL, &run)], &[])).await;
    let list = bounded(cms.list(&ListParams::default().labels(&sel)))
        .await
        .unwrap();
    let list_rv = list.metadata.resource_version.clone().expect("list rv");
    let wp = WatchParams::default().labels(&sel).timeout(30);
    let mut w = bounded(cms.watch(&wp, &list_rv)).await.unwrap().boxed();

    create(&cms, &cm_labeled("w", &[(TEST_LABEL, &run)], &[("a", "1")])).await;
    bounded(cms.patch(
        "w",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"a": "2"}})),
    ))
    .await
    .unwrap();
    bounded(cms.delete("w", &DeleteParams::default()))
        .await
        .unwrap();

    let mut rvs = vec![rv_num(Some(&list_rv))];
    let mut kinds = Vec::new();
    for _ in 0..3 {
        let (kind, obj) = event_parts(next_event(&mut w).await);
        assert_eq!(obj.name_any(), "w");
        assert_eq!(obj.namespace().as_deref(), Some(ns.as_str()));
        let rv = rv_num(obj.metadata.resource_version.as_ref());
        assert!(
            rv > *rvs.last().unwrap(),
            "{kind} rv {rv} not after {rvs:?}"
        );
        rvs.push(rv);
        if kind == "MODIFIED" {
            assert_eq!(data(&obj), map(&[("a", "2")]));
        }
        kinds.push(kind);
    }
    assert_eq!(kinds, ["ADDED", "MODIFIED", "DELETED"]);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
    drop(w);

    // Resume from the ADDED event's rv: exactly the two later events.
    let mut w = bounded(cms.watch(&wp, &rvs[1].to_string()))
        .await
        .unwrap()
        .boxed();
    let (k1, o1) = event_parts(next_event(&mut w).await);
    let (k2, o2) = event_parts(next_event(&mut w).await);
    assert_eq!((k1, k2), ("MODIFIED", "DELETED"));
    assert_eq!(rv_num(o1.metadata.resource_version.as_ref()), rvs[2]);
    assert_eq!(rv_num(o2.metadata.resource_version.as_ref()), rvs[3]);
    assert_quiet(&mut w, Duration::from_millis(300)).await;
    drop(w);

    // Resume from the last rv: nothing, then new changes.
    let mut w = bounded(cms.watch(&wp, &rvs[3].to_string()))
        .await
        .unwrap()
        .boxed();
    assert_quiet(&mut w, Duration::from_millis(300)).await;
    create(&cms, &cm_labeled("w2", &[(TEST_LABEL, &run)], &[])).await;
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!((k, o.name_any().as_str()), ("ADDED", "w2"));
    assert!(rv_num(o.metadata.resource_version.as_ref()) > rvs[3]);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_filters_by_selector_and_namespace() {
    let h = Harness::start().await;
    let ns1 = h.namespace().await;
    let ns2 = h.namespace().await;
    let run = unique("run");
    let cms1: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns1);
    let cms2: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns2);
    let sel = format!("{TEST_LABEL}={run},keep=yes");
    let rv = bounded(cms1.list(&ListParams::default().labels(&sel)))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = bounded(cms1.watch(&WatchParams::default().labels(&sel).timeout(30), &rv))
        .await
        .unwrap()
        .boxed();
    create(
        &cms2,
        &cm_labeled("other-ns", &[(TEST_LABEL, &run), ("keep", "yes")], &[]),
    )
    .await;
    create(&cms1, &cm_labeled("no-label", &[(TEST_LABEL, &run)], &[])).await;
    create(
        &cms1,
        &cm_labeled("yes", &[(TEST_LABEL, &run), ("keep", "yes")], &[]),
    )
    .await;
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!((k, o.name_any().as_str()), ("ADDED", "yes"));
    // An object leaving the selector is seen as DELETED (kube-apiserver's watch filtering).
    bounded(cms1.patch(
        "yes",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"keep": "no"}}})),
    ))
    .await
    .unwrap();
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!((k, o.name_any().as_str()), ("DELETED", "yes"));
    // ... and one entering it as ADDED.
    bounded(cms1.patch(
        "no-label",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"keep": "yes"}}})),
    ))
    .await
    .unwrap();
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!((k, o.name_any().as_str()), ("ADDED", "no-label"));
    assert_quiet(&mut w, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_expired_rv_is_410_gone_and_relist_recovers() {
    let Some(h) = Harness::embedded_only(
        "needs a tiny watch history (Options::watch_history = 5)",
        Options {
            watch_history: 5,
            ..Options::default()
        },
    )
    .await
    else {
        return;
    };
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let first = create(&cms, &cm("old", &[("n", "0")])).await;
    let old_rv = first.metadata.resource_version.clone().unwrap();
    for i in 1..=12 {
        bounded(cms.patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"n": i.to_string()}})),
        ))
        .await
        .unwrap();
    }
    let wp = WatchParams::default().timeout(30);
    // kube-apiserver answers 200 and then an ERROR event carrying a 410 Status (older servers
    // answered the request itself with 410); either way the client sees code 410.
    match bounded(cms.watch(&wp, &old_rv)).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 410, "{s:?}"),
        Err(e) => panic!("expected 410 Gone, got {e}"),
        Ok(w) => {
            let mut w = w.boxed();
            match bounded(w.try_next()).await {
                Ok(Some(WatchEvent::Error(s))) => {
                    assert_eq!(s.code, 410, "{s:?}");
                    assert!(
                        s.reason == "Expired" || s.reason == "Gone",
                        "reason {:?}",
                        s.reason
                    );
                }
                Err(kube::Error::Api(s)) => assert_eq!(s.code, 410, "{s:?}"),
                other => panic!(
                    "expected a 410 ERROR event, got {:?}",
                    other.map(|o| o.map(describe))
                ),
            }
        }
    }

    // Relist, then watch from the list's rv.
    let list = bounded(cms.list(&ListParams::default())).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    assert_eq!(data(&list.items[0]), map(&[("n", "12")]));
    let mut w = bounded(cms.watch(&wp, &rv)).await.unwrap().boxed();
    bounded(cms.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"n": "13"}})),
    ))
    .await
    .unwrap();
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!(k, "MODIFIED");
    assert_eq!(data(&o), map(&[("n", "13")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_bookmarks_when_asked() {
    let h = Harness::start_with(Options {
        bookmark_interval: Duration::from_millis(200),
        ..Options::default()
    })
    .await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("b", &[])).await;
    let rv = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // WatchParams::default() asks for bookmarks (allowWatchBookmarks=true). A real server sends
    // one about 2 s before the watch's timeout at the latest, so 5 s bounds both servers.
    let mut w = bounded(cms.watch(&WatchParams::default().timeout(5), &rv))
        .await
        .unwrap()
        .boxed();
    let bm = match bounded_for(Duration::from_secs(8), w.try_next()).await {
        Ok(Some(WatchEvent::Bookmark(b))) => b,
        Ok(Some(e)) => panic!("unexpected event {}", describe(e)),
        Ok(None) => panic!("watch ended without a bookmark"),
        Err(e) => panic!("watch failed: {e}"),
    };
    assert_eq!(bm.types.kind, "ConfigMap");
    assert_eq!(bm.types.api_version, "v1");
    assert!(rv_num(Some(&bm.metadata.resource_version)) >= rv_num(Some(&rv)));
    drop(w);

    if h.is_e2e() {
        return; // the no-bookmark check below relies on the short interval
    }
    let mut w = bounded(cms.watch(&WatchParams::default().disable_bookmarks().timeout(5), &rv))
        .await
        .unwrap()
        .boxed();
    let quiet = tokio::time::timeout(Duration::from_millis(800), w.try_next()).await;
    assert!(
        quiet.is_err(),
        "no bookmarks (or anything) without allowWatchBookmarks, got {:?}",
        quiet.map(|r| r.map(|o| o.map(describe)))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_times_out_cleanly() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let rv = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // timeoutSeconds=1: the server ends the stream (no error) soon after.
    let mut w = bounded(cms.watch(&WatchParams::default().timeout(1), &rv))
        .await
        .unwrap()
        .boxed();
    let end = bounded_for(Duration::from_secs(5), async {
        loop {
            match w.try_next().await {
                Ok(Some(WatchEvent::Bookmark(_))) => continue,
                other => return other.map(|o| o.map(describe)),
            }
        }
    })
    .await;
    assert!(
        matches!(end, Ok(None)),
        "watch should end cleanly, got {end:?}"
    );
}

type RtEvent = watcher::Event<ConfigMap>;

fn rt_desc(e: &RtEvent) -> String {
    match e {
        watcher::Event::Init => "Init".into(),
        watcher::Event::InitApply(o) => format!("InitApply({})", o.name_any()),
        watcher::Event::InitDone => "InitDone".into(),
        watcher::Event::Apply(o) => format!("Apply({})", o.name_any()),
        watcher::Event::Delete(o) => format!("Delete({})", o.name_any()),
    }
}

async fn rt_next<S>(s: &mut S) -> Result<String, watcher::Error>
where
    S: Stream<Item = Result<RtEvent, watcher::Error>> + Unpin,
{
    match bounded(s.next()).await {
        Some(Ok(e)) => Ok(rt_desc(&e)),
        Some(Err(e)) => Err(e),
        None => panic!("watcher ended"),
    }
}

async fn runtime_watcher_scenario(streaming: bool) {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let run = unique("run");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let lbl = [(TEST_LABEL, run.as_str())];
    create(&cms, &cm_labeled("one", &lbl, &[])).await;
    create(&cms, &cm_labeled("two", &lbl, &[])).await;
    let mut cfg = watcher::Config::default().labels(&format!("{TEST_LABEL}={run}"));
    if streaming {
        cfg = cfg.streaming_lists();
    }
    let mut s = watcher(cms.clone(), cfg).boxed();
    let first = rt_next(&mut s).await;
    if streaming {
        if let Err(e) = &first {
            // kube-apiserver 1.33 ships WatchList off and rejects sendInitialEvents with 422;
            // that rejection is faithful, anything else is not.
            let status = match e {
                watcher::Error::WatchStartFailed(kube::Error::Api(s)) => Some(s.as_ref()),
                watcher::Error::WatchError(s) => Some(s.as_ref()),
                watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
                _ => None,
            };
            match status {
                Some(s) if s.code == 422 => {
                    eprintln!(
                        "server rejects streaming lists (422, as kube-apiserver 1.33 does): {s:?}"
                    );
                    return;
                }
                _ => panic!("streaming list watch failed: {e}"),
            }
        }
    }
    let mut got = vec![first.unwrap_or_else(|e| panic!("watcher: {e}"))];
    while got.last().map(String::as_str) != Some("InitDone") {
        got.push(
            rt_next(&mut s)
                .await
                .unwrap_or_else(|e| panic!("watcher: {e}")),
        );
        assert!(got.len() < 10, "no InitDone: {got:?}");
    }
    assert_eq!(got[0], "Init");
    let mut applies = got[1..got.len() - 1].to_vec();
    applies.sort();
    assert_eq!(applies, ["InitApply(one)", "InitApply(two)"], "{got:?}");

    create(&cms, &cm_labeled("three", &lbl, &[])).await;
    assert_eq!(rt_next(&mut s).await.unwrap(), "Apply(three)");
    bounded(cms.patch(
        "one",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"x": "1"}})),
    ))
    .await
    .unwrap();
    assert_eq!(rt_next(&mut s).await.unwrap(), "Apply(one)");
    bounded(cms.delete("two", &DeleteParams::default()))
        .await
        .unwrap();
    assert_eq!(rt_next(&mut s).await.unwrap(), "Delete(two)");
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_watcher_list_watch() {
    runtime_watcher_scenario(false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runtime_watcher_streaming_lists() {
    runtime_watcher_scenario(true).await;
}

// ---------------------------------------------------------------------------------------------
// patches

#[tokio::test(flavor = "multi_thread")]
async fn patch_json_merge() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut c = cm("m", &[("a", "1"), ("b", "2")]);
    c.metadata.finalizers = Some(vec!["sluice.test/a".into()]);
    create(&cms, &c).await;
    let p = bounded(cms.patch(
        "m",
        &PatchParams::default(),
        &Patch::Merge(json!({
            "metadata": {"labels": {"x": "y"}, "finalizers": ["sluice.test/b"]},
            "data": {"b": null, "c": "3"}
        })),
    ))
    .await
    .unwrap();
    assert_eq!(data(&p), map(&[("a", "1"), ("c", "3")]));
    assert_eq!(p.labels().get("x").map(String::as_str), Some("y"));
    assert_eq!(p.labels().get(TEST_LABEL).map(String::as_str), Some("true"));
    // A merge patch replaces lists whole.
    assert_eq!(
        p.metadata.finalizers,
        Some(vec!["sluice.test/b".to_string()])
    );
    let p = bounded(cms.patch(
        "m",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    ))
    .await
    .unwrap();
    assert!(p.metadata.finalizers.unwrap_or_default().is_empty());
    // Patching a missing object: 404.
    expect_status(
        bounded(cms.patch(
            "missing",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "1"}})),
        ))
        .await,
        404,
        "NotFound",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_strategic_merge() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    let mut p = pod_with("s", &["a", "b"], None);
    p.metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("old".into(), "1".into());
    create(&pods, &p).await;

    // Containers merge by name: only b's image changes, a stays.
    let p = bounded(pods.patch(
        "s",
        &PatchParams::default(),
        &Patch::Strategic(json!({
            "metadata": {"labels": {"new": "1", "old": null}},
            "spec": {"containers": [{"name": "b", "image": IMAGE2}]}
        })),
    ))
    .await
    .unwrap();
    let cs = &p.spec.as_ref().unwrap().containers;
    let imgs: Vec<(String, Option<String>)> = cs
        .iter()
        .map(|c| (c.name.clone(), c.image.clone()))
        .collect();
    assert_eq!(
        imgs,
        vec![
            ("a".to_string(), Some(IMAGE.to_string())),
            ("b".to_string(), Some(IMAGE2.to_string()))
        ]
    );
    assert_eq!(p.labels().get("new").map(String::as_str), Some("1"));
    assert!(!p.labels().contains_key("old"), "null removes a label");

    // Status conditions merge by type; `$patch: delete` removes one by its key.
    let cond = |t: &str, s: &str| json!({"type": t, "status": s});
    let ps = PatchParams::default();
    bounded(pods.patch_status(
        "s",
        &ps,
        &Patch::Strategic(json!({"status": {"conditions": [cond("sluice.test/A", "True")]}})),
    ))
    .await
    .unwrap();
    let p = bounded(pods.patch_status(
        "s",
        &ps,
        &Patch::Strategic(json!({"status": {"conditions": [cond("sluice.test/B", "False")]}})),
    ))
    .await
    .unwrap();
    assert_eq!(
        conditions(&p),
        vec![
            ("sluice.test/A".to_string(), "True".to_string()),
            ("sluice.test/B".to_string(), "False".to_string())
        ]
    );
    let p = bounded(pods.patch_status(
        "s",
        &ps,
        &Patch::Strategic(json!({"status": {"conditions": [cond("sluice.test/A", "False")]}})),
    ))
    .await
    .unwrap();
    assert_eq!(
        conditions(&p),
        vec![
            ("sluice.test/A".to_string(), "False".to_string()),
            ("sluice.test/B".to_string(), "False".to_string())
        ]
    );
    let p = bounded(pods.patch_status(
        "s",
        &ps,
        &Patch::Strategic(json!({"status": {"conditions": [
            {"type": "sluice.test/A", "$patch": "delete"}
        ]}})),
    ))
    .await
    .unwrap();
    assert_eq!(
        conditions(&p),
        vec![("sluice.test/B".to_string(), "False".to_string())]
    );

    // metadata.finalizers has patchStrategy merge: a strategic patch adds to the list.
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut c = cm("f", &[("a", "1")]);
    c.metadata.finalizers = Some(vec!["sluice.test/a".into()]);
    create(&cms, &c).await;
    let c = bounded(cms.patch(
        "f",
        &ps,
        &Patch::Strategic(
            json!({"metadata": {"finalizers": ["sluice.test/b"]}, "data": {"b": "2"}}),
        ),
    ))
    .await
    .unwrap();
    let mut fins = c.metadata.finalizers.clone().unwrap_or_default();
    fins.sort();
    assert_eq!(fins, ["sluice.test/a", "sluice.test/b"]);
    assert_eq!(data(&c), map(&[("a", "1"), ("b", "2")]));
    // ... and `$deleteFromPrimitiveList` removes from it.
    let c = bounded(cms.patch(
        "f",
        &ps,
        &Patch::Strategic(
            json!({"metadata": {"$deleteFromPrimitiveList/finalizers": ["sluice.test/a"]}}),
        ),
    ))
    .await
    .unwrap();
    assert_eq!(
        c.metadata.finalizers,
        Some(vec!["sluice.test/b".to_string()])
    );
    bounded(cms.patch(
        "f",
        &ps,
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    ))
    .await
    .unwrap();
}

fn conditions(p: &Pod) -> Vec<(String, String)> {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs: &Vec<PodCondition>| {
            cs.iter()
                .filter(|c| c.type_.starts_with("sluice.test/"))
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_json_patch() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("j", &[("a", "1"), ("b", "2")])).await;
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/a", "value": "1"},
        {"op": "add", "path": "/data/c", "value": "3"},
        {"op": "replace", "path": "/data/a", "value": "x"},
        {"op": "remove", "path": "/data/b"},
        {"op": "add", "path": "/metadata/labels/j", "value": "p"}
    ]))
    .unwrap();
    let c = bounded(cms.patch("j", &PatchParams::default(), &Patch::Json::<()>(ops)))
        .await
        .unwrap();
    assert_eq!(data(&c), map(&[("a", "x"), ("c", "3")]));
    assert_eq!(c.labels().get("j").map(String::as_str), Some("p"));

    // A failed `test` op: 422, nothing written.
    let ops: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": "/data/a", "value": "not-this"},
        {"op": "replace", "path": "/data/a", "value": "y"}
    ]))
    .unwrap();
    let s =
        api_status(bounded(cms.patch("j", &PatchParams::default(), &Patch::Json::<()>(ops))).await);
    assert_eq!(s.code, 422, "{s:?}");
    let now = bounded(cms.get("j")).await.unwrap();
    assert_eq!(data(&now), map(&[("a", "x"), ("c", "3")]));
    assert_eq!(now.metadata.resource_version, c.metadata.resource_version);
}

fn api_status<T: std::fmt::Debug>(r: kube::Result<T>) -> Status {
    common::api_error(r)
}

#[tokio::test(flavor = "multi_thread")]
async fn patch_server_side_apply() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mgr = PatchParams::apply("mgr");

    // Create-if-absent.
    let c1 = bounded(cms.patch(
        "ssa",
        &mgr,
        &Patch::Apply(cm("ssa", &[("a", "1"), ("b", "2")])),
    ))
    .await
    .unwrap();
    assert_server_fields(&c1, "applied configmap");
    assert_eq!(data(&c1), map(&[("a", "1"), ("b", "2")]));
    let mf = c1.metadata.managed_fields.clone().unwrap_or_default();
    assert!(
        mf.iter().any(|m| m.manager.as_deref() == Some("mgr")
            && m.operation.as_deref() == Some("Apply")),
        "managedFields {mf:?}"
    );

    // Same apply again: a no-op, resourceVersion unchanged.
    let c2 = bounded(cms.patch(
        "ssa",
        &mgr,
        &Patch::Apply(cm("ssa", &[("a", "1"), ("b", "2")])),
    ))
    .await
    .unwrap();
    assert_eq!(c2.metadata.resource_version, c1.metadata.resource_version);

    // Another manager setting a field mgr owns: 409 Conflict ...
    let other = PatchParams::apply("other");
    let s = expect_status(
        bounded(cms.patch("ssa", &other, &Patch::Apply(cm("ssa", &[("a", "x")])))).await,
        409,
        "Conflict",
    );
    assert!(
        s.message.contains("mgr"),
        "conflict message names the owner: {:?}",
        s.message
    );
    // ... unless forced.
    let c3 = bounded(cms.patch(
        "ssa",
        &other.clone().force(),
        &Patch::Apply(cm("ssa", &[("a", "x")])),
    ))
    .await
    .unwrap();
    assert_eq!(data(&c3), map(&[("a", "x"), ("b", "2")]));

    // mgr drops b from its config: b (owned only by mgr) is removed; a (now other's) stays.
    let c4 = bounded(cms.patch("ssa", &mgr, &Patch::Apply(cm("ssa", &[]))))
        .await
        .unwrap();
    assert_eq!(data(&c4), map(&[("a", "x")]));

    // Apply to another group's kind, create then update.
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let l = bounded(leases.patch("lease-ssa", &mgr, &Patch::Apply(lease("lease-ssa", "n1"))))
        .await
        .unwrap();
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("n1"));
    let l = bounded(leases.patch("lease-ssa", &mgr, &Patch::Apply(lease("lease-ssa", "n2"))))
        .await
        .unwrap();
    assert_eq!(l.spec.unwrap().holder_identity.as_deref(), Some("n2"));
}

// ---------------------------------------------------------------------------------------------
// races, deletes

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_creates_of_one_name_one_wins() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    // Two clients (separate connection pools) and 16 tasks.
    let c2 = Client::try_from(h.config.clone()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = if i % 2 == 0 {
            h.client.clone()
        } else {
            c2.clone()
        };
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let cms: Api<ConfigMap> = Api::namespaced(client, &ns);
            cms.create(
                &PostParams::default(),
                &cm("race", &[("by", &i.to_string())]),
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match bounded(t).await.unwrap() {
            Ok(_) => ok += 1,
            Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "AlreadyExists" => {
                conflicts += 1
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 15));

    // Lease races the same way (the subnet-taking path in DESIGN.md).
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = if i % 2 == 0 {
            h.client.clone()
        } else {
            c2.clone()
        };
        let ns = ns.clone();
        tasks.push(tokio::spawn(async move {
            let leases: Api<Lease> = Api::namespaced(client, &ns);
            leases
                .create(
                    &PostParams::default(),
                    &lease("sluice-10-244-3-0-24", &format!("n{i}")),
                )
                .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match bounded(t).await.unwrap() {
            Ok(_) => ok += 1,
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_updates_with_rv_one_wins() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let base = create(&cms, &cm("cas", &[("n", "0")])).await;
    let mut tasks = Vec::new();
    // From 1: writing the unchanged value ("0") is a no-op that keeps the resourceVersion and
    // succeeds, on kube-apiserver too, and would let a second writer win.
    for i in 1..=16 {
        let cms = cms.clone();
        let mut next = base.clone();
        next.data = Some(map(&[("n", &i.to_string())]));
        tasks.push(tokio::spawn(async move {
            cms.replace("cas", &PostParams::default(), &next).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match bounded(t).await.unwrap() {
            Ok(_) => ok += 1,
            Err(kube::Error::Api(s)) if s.code == 409 && s.reason == "Conflict" => {}
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, 1, "compare-and-swap on resourceVersion");
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_then_not_found() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("d", &[])).await;
    bounded(cms.delete("d", &DeleteParams::default()))
        .await
        .unwrap();
    expect_status(bounded(cms.get("d")).await, 404, "NotFound");
    expect_status(
        bounded(cms.delete("d", &DeleteParams::default())).await,
        404,
        "NotFound",
    );
    // The name can be used again, as a new object.
    let again = create(&cms, &cm("d", &[])).await;
    assert_server_fields(&again, "recreated");

    // An unscheduled pod goes at once.
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    create(&pods, &pod("dp")).await;
    bounded(pods.delete("dp", &DeleteParams::default()))
        .await
        .unwrap();
    expect_status(bounded(pods.get("dp")).await, 404, "NotFound");

    // Preconditions: a delete naming the wrong uid is a 409 Conflict.
    let uid_pre = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: Some("00000000-0000-0000-0000-000000000000".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    expect_status(bounded(cms.delete("d", &uid_pre)).await, 409, "Conflict");
    assert!(bounded(cms.get_opt("d")).await.unwrap().is_some());

    // Nodes and leases too.
    let n = unique("node");
    create_node(&h, &n).await;
    let nodes: Api<Node> = Api::all(h.client.clone());
    bounded(nodes.delete(&n, &DeleteParams::default()))
        .await
        .unwrap();
    expect_status(bounded(nodes.get(&n)).await, 404, "NotFound");
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_node_deletes_leases_it_owns() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let n1 = create_node(&h, &unique("node")).await;
    let n2 = create_node(&h, &unique("node")).await;
    let owned = |name: &str, n: &Node| {
        let mut l = lease(name, &n.name_any());
        l.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: n.name_any(),
            uid: n.metadata.uid.clone().unwrap(),
            ..OwnerReference::default()
        }]);
        l
    };
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    create(&leases, &owned("sluice-10-244-1-0-24", &n1)).await;
    create(&leases, &owned("sluice-10-244-2-0-24", &n2)).await;
    create(&leases, &lease("unowned", "x")).await;

    let nodes: Api<Node> = Api::all(h.client.clone());
    bounded(nodes.delete(&n1.name_any(), &DeleteParams::default()))
        .await
        .unwrap();
    if is_e2e() && !e2e_has_controllers() {
        eprintln!(
            "SKIPPED the lease-GC assertion: a real API server without the garbage collector \
             (set SLUICE_E2E_CONTROLLERS when it runs) keeps dependents"
        );
        return;
    }
    let limit = if is_e2e() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    eventually(limit, "the lease owned by the deleted node goes", || {
        let leases = leases.clone();
        async move {
            match leases.get_opt("sluice-10-244-1-0-24").await {
                Ok(None) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    assert!(bounded(leases.get_opt("sluice-10-244-2-0-24"))
        .await
        .unwrap()
        .is_some());
    assert!(bounded(leases.get_opt("unowned")).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_namespace_removes_its_objects() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let keep = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("c", &[])).await;
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    create(&leases, &lease("l", "n")).await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    create(&pods, &pod("p")).await;
    let kept: Api<ConfigMap> = Api::namespaced(h.client.clone(), &keep);
    create(&kept, &cm("c", &[])).await;

    let nss: Api<Namespace> = Api::all(h.client.clone());
    bounded(nss.delete(&ns, &DeleteParams::default()))
        .await
        .unwrap();
    // Right after: gone, or Terminating (kube-apiserver: deletionTimestamp + phase Terminating
    // until the namespace controller has emptied it).
    if let Some(n) = bounded(nss.get_opt(&ns)).await.unwrap() {
        assert!(n.metadata.deletion_timestamp.is_some(), "{n:?}");
        assert_eq!(
            n.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Terminating")
        );
    }
    if is_e2e() && !e2e_has_controllers() {
        eprintln!(
            "SKIPPED the namespace-emptying assertion: a real API server without the namespace \
             controller (set SLUICE_E2E_CONTROLLERS when it runs) keeps it Terminating"
        );
        return;
    }
    let limit = if is_e2e() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    eventually(limit, "the namespace and its objects go", || {
        let (nss, cms, leases, pods, ns) = (
            nss.clone(),
            cms.clone(),
            leases.clone(),
            pods.clone(),
            ns.clone(),
        );
        async move {
            let gone = matches!(nss.get_opt(&ns).await, Ok(None))
                && matches!(cms.get_opt("c").await, Ok(None))
                && matches!(leases.get_opt("l").await, Ok(None))
                && matches!(pods.get_opt("p").await, Ok(None));
            gone.then_some(())
        }
    })
    .await;
    // Listing in a deleted namespace is an empty list, not an error.
    assert!(bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .items
        .is_empty());
    assert!(bounded(kept.get_opt("c")).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn finalizers_hold_deletion() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut c = cm("fin", &[("a", "1")]);
    c.metadata.finalizers = Some(vec!["sluice.test/hold".into()]);
    create(&cms, &c).await;
    let run = bounded(cms.list(&ListParams::default().fields("metadata.name=fin")))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = bounded(
        cms.watch(
            &WatchParams::default()
                .fields("metadata.name=fin")
                .timeout(30),
            &run,
        ),
    )
    .await
    .unwrap()
    .boxed();

    bounded(cms.delete("fin", &DeleteParams::default()))
        .await
        .unwrap();
    let held = bounded(cms.get("fin"))
        .await
        .expect("held by its finalizer");
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "deletionTimestamp set"
    );
    assert_eq!(data(&held), map(&[("a", "1")]));
    // The watch sees the deletionTimestamp as a MODIFIED.
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!(k, "MODIFIED");
    assert!(o.metadata.deletion_timestamp.is_some());
    // Deleting again changes nothing (still there).
    bounded(cms.delete("fin", &DeleteParams::default()))
        .await
        .unwrap();
    assert!(bounded(cms.get_opt("fin")).await.unwrap().is_some());

    // Removing the finalizer completes the deletion.
    bounded(cms.patch(
        "fin",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    ))
    .await
    .unwrap();
    eventually(
        Duration::from_secs(5),
        "deleted once its finalizer is gone",
        || {
            let cms = cms.clone();
            async move { matches!(cms.get_opt("fin").await, Ok(None)).then_some(()) }
        },
    )
    .await;
    loop {
        let (k, _) = event_parts(next_event(&mut w).await);
        if k == "DELETED" {
            break;
        }
        assert_eq!(k, "MODIFIED");
    }
}

// ---------------------------------------------------------------------------------------------
// persistence (embedded only)

#[tokio::test(flavor = "multi_thread")]
async fn state_survives_a_restart() {
    let Some(mut h) = Harness::persistent("restarts the server on its state file").await else {
        return;
    };
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let c = create(&cms, &cm("keep", &[("a", "1")])).await;
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let l = create(&leases, &lease("keep", "n1")).await;
    let n = create_node(&h, &unique("node")).await;
    let nps: Api<NetworkPolicy> = Api::namespaced(h.client.clone(), &ns);
    let np = create(&nps, &netpol("keep", "web")).await;
    // A create and a delete, so that the state holds a deletion too.
    create(&cms, &cm("gone", &[])).await;
    bounded(cms.delete("gone", &DeleteParams::default()))
        .await
        .unwrap();
    let before = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();

    h.restart().await;

    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let c2 = bounded(cms.get("keep")).await.unwrap();
    assert_eq!(c2.metadata.uid, c.metadata.uid);
    assert_eq!(c2.metadata.resource_version, c.metadata.resource_version);
    assert_eq!(
        c2.metadata.creation_timestamp,
        c.metadata.creation_timestamp
    );
    assert_eq!(data(&c2), map(&[("a", "1")]));
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let l2 = bounded(leases.get("keep")).await.unwrap();
    assert_eq!(l2.metadata.resource_version, l.metadata.resource_version);
    assert_eq!(l2.spec, l.spec);
    let nodes: Api<Node> = Api::all(h.client.clone());
    let n2 = bounded(nodes.get(&n.name_any())).await.unwrap();
    assert_eq!(n2.metadata.uid, n.metadata.uid);
    let nps: Api<NetworkPolicy> = Api::namespaced(h.client.clone(), &ns);
    let np2 = bounded(nps.get("keep")).await.unwrap();
    assert_eq!(np2.metadata.generation, np.metadata.generation);
    assert_eq!(np2.spec, np.spec);
    let nss: Api<Namespace> = Api::all(h.client.clone());
    assert!(bounded(nss.get_opt(&ns)).await.unwrap().is_some());
    assert!(bounded(nss.get_opt("kube-system")).await.unwrap().is_some());

    // New writes get higher resourceVersions than anything before the restart.
    let list_rv = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    assert!(rv_num(Some(&list_rv)) >= rv_num(Some(&before)));
    let c3 = create(&cms, &cm("new", &[])).await;
    assert!(
        rv_num(c3.metadata.resource_version.as_ref()) > rv_num(Some(&before)),
        "rv after restart {:?} <= before {before}",
        c3.metadata.resource_version
    );
    // Optimistic concurrency still holds across the restart.
    let mut stale = c.clone();
    stale.data = Some(map(&[("a", "2")]));
    let ok = bounded(cms.replace("keep", &PostParams::default(), &stale))
        .await
        .unwrap();
    assert!(
        rv_num(ok.metadata.resource_version.as_ref())
            > rv_num(c3.metadata.resource_version.as_ref())
    );
    expect_status(
        bounded(cms.replace("keep", &PostParams::default(), &stale)).await,
        409,
        "Conflict",
    );

    // And a second restart keeps the post-restart writes.
    h.restart().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    assert_eq!(
        data(&bounded(cms.get("keep")).await.unwrap()),
        map(&[("a", "2")])
    );
    assert!(bounded(cms.get_opt("new")).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_state_file_is_an_error() {
    if is_e2e() {
        eprintln!("SKIPPED against a real API server: tests ApiServer::open");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    std::fs::write(&path, b"{ this is not json").unwrap();
    let r = sluice_apiserver::ApiServer::open(Options {
        state_file: Some(path.clone()),
        ..Options::default()
    });
    match r {
        Err(ApiServerError::Corrupt { path: p, .. }) => assert_eq!(p, path),
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("a corrupt state file must not open"),
    }
    // A missing file starts empty (with the default namespaces).
    let fresh = dir.path().join("fresh.json");
    assert!(sluice_apiserver::ApiServer::open(Options {
        state_file: Some(fresh),
        ..Options::default()
    })
    .is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn kubeconfig_names_the_server() {
    if is_e2e() {
        eprintln!("SKIPPED against a real API server: tests sluice_apiserver::kubeconfig");
        return;
    }
    let text = sluice_apiserver::kubeconfig("http://127.0.0.1:6443", "lab-x");
    let kc = kube::config::Kubeconfig::from_yaml(&text).expect("kubeconfig parses");
    assert_eq!(kc.current_context.as_deref(), Some("lab-x"));
    let cluster = kc
        .clusters
        .iter()
        .find(|c| c.name == "lab-x")
        .expect("cluster lab-x");
    assert_eq!(
        cluster.cluster.as_ref().and_then(|c| c.server.as_deref()),
        Some("http://127.0.0.1:6443")
    );
    let ctx = kc
        .contexts
        .iter()
        .find(|c| c.name == "lab-x")
        .expect("context lab-x");
    let ctx = ctx.context.as_ref().expect("context body");
    assert_eq!(ctx.cluster, "lab-x");
    assert_eq!(ctx.user.as_deref(), Some("lab-x"));
    assert_eq!(ctx.namespace.as_deref(), Some("default"));
    assert!(kc.auth_infos.iter().any(|a| a.name == "lab-x"));
    // And kube can build a client config from it.
    let cfg = bounded(kube::Config::from_custom_kubeconfig(
        kc,
        &kube::config::KubeConfigOptions::default(),
    ))
    .await
    .expect("kube::Config from kubeconfig()");
    assert_eq!(cfg.cluster_url.to_string(), "http://127.0.0.1:6443/");
    assert_eq!(cfg.default_namespace, "default");
}

// ---------------------------------------------------------------------------------------------
// discovery, version, binding

const KINDS: &[(&str, &str, &str, &str, bool)] = &[
    ("", "v1", "Node", "nodes", false),
    ("", "v1", "Pod", "pods", true),
    ("", "v1", "Namespace", "namespaces", false),
    ("", "v1", "ConfigMap", "configmaps", true),
    (
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    ("coordination.k8s.io", "v1", "Lease", "leases", true),
];

fn check_discovery(d: &Discovery) {
    for (group, version, kind, plural, namespaced) in KINDS {
        let (ar, caps): (ApiResource, ApiCapabilities) = d
            .resolve_gvk(&GroupVersionKind::gvk(group, version, kind))
            .unwrap_or_else(|| panic!("discovery lacks {group}/{version} {kind}"));
        assert_eq!(ar.plural, *plural, "{kind}");
        assert_eq!(
            ar.api_version,
            if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            }
        );
        let want = if *namespaced {
            Scope::Namespaced
        } else {
            Scope::Cluster
        };
        assert_eq!(caps.scope, want, "{kind} scope");
        for verb in [
            "get", "list", "watch", "create", "update", "patch", "delete",
        ] {
            assert!(
                caps.supports_operation(verb),
                "{kind} lacks verb {verb}: {:?}",
                caps.operations
            );
        }
    }
    let (_, pods) = d
        .resolve_gvk(&GroupVersionKind::gvk("", "v1", "Pod"))
        .unwrap();
    let subs: Vec<&str> = pods
        .subresources
        .iter()
        .map(|(r, _)| r.plural.as_str())
        .collect();
    for s in ["status", "binding"] {
        assert!(subs.contains(&s), "pods subresources {subs:?} lack {s}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_finds_the_six_kinds() {
    let h = Harness::start().await;
    let d = bounded(Discovery::new(h.client.clone()).run())
        .await
        .expect("discovery");
    check_discovery(&d);
    assert!(d.has_group("networking.k8s.io"));
    assert!(d.has_group("coordination.k8s.io"));
}

#[tokio::test(flavor = "multi_thread")]
async fn aggregated_discovery_finds_the_six_kinds() {
    // kubectl 1.32 uses aggregated discovery (/api and /apis with
    // Accept: application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList).
    let h = Harness::start().await;
    let d = bounded(Discovery::new(h.client.clone()).run_aggregated())
        .await
        .expect("aggregated discovery");
    check_discovery(&d);
}

#[tokio::test(flavor = "multi_thread")]
async fn apiserver_version_answers() {
    let h = Harness::start().await;
    let v = bounded(h.client.apiserver_version())
        .await
        .expect("/version");
    assert!(!v.major.is_empty(), "{v:?}");
    assert!(!v.minor.is_empty(), "{v:?}");
    assert!(v.git_version.starts_with('v'), "{v:?}");
    assert!(!v.platform.is_empty(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_binding_sets_node_name() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    create(&pods, &pod("bind")).await;
    let target = unique("node");
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some("bind".into()),
            ..ObjectMeta::default()
        },
        target: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(target.clone()),
            ..ObjectReference::default()
        },
    };
    let s: Status =
        bounded(pods.create_subresource("binding", "bind", &PostParams::default(), &binding))
            .await
            .expect("POST pods/bind/binding");
    assert!(s.is_success(), "{s:?}");
    let p = bounded(pods.get("bind")).await.unwrap();
    assert_eq!(
        p.spec.as_ref().unwrap().node_name.as_deref(),
        Some(target.as_str())
    );
    let on_node = list_names(
        &pods,
        &ListParams::default().fields(&format!("spec.nodeName={target}")),
    )
    .await;
    assert_eq!(on_node, sorted(&["bind"]));

    // Binding again: 409 Conflict (already assigned).
    let s = expect_status(
        bounded(pods.create_subresource::<_, Status>(
            "binding",
            "bind",
            &PostParams::default(),
            &binding,
        ))
        .await,
        409,
        "Conflict",
    );
    assert!(
        s.message.contains("already assigned"),
        "message {:?}",
        s.message
    );
    // Binding a missing pod: 404.
    let mut b2 = binding.clone();
    b2.metadata.name = Some("nopod".into());
    expect_status(
        bounded(pods.create_subresource::<_, Status>(
            "binding",
            "nopod",
            &PostParams::default(),
            &b2,
        ))
        .await,
        404,
        "NotFound",
    );
    // Leave nothing graceful behind on a real cluster.
    let _ = bounded(pods.delete("bind", &DeleteParams::default().grace_period(0))).await;
}

// ---------------------------------------------------------------------------------------------
// more of kube-apiserver's rules

#[tokio::test(flavor = "multi_thread")]
async fn generate_name_and_dry_run() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut g = cm("unused", &[]);
    g.metadata.name = None;
    g.metadata.generate_name = Some("gen-".into());
    let a = create(&cms, &g).await;
    let b = create(&cms, &g).await;
    for o in [&a, &b] {
        let n = o.name_any();
        assert!(
            n.starts_with("gen-") && n.len() == "gen-".len() + 5,
            "generated name {n:?}"
        );
        assert_eq!(o.metadata.generate_name.as_deref(), Some("gen-"));
    }
    assert_ne!(a.name_any(), b.name_any());

    // dryRun=All: the answer is the object as it would be, nothing is stored.
    let pp = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let d = bounded(cms.create(&pp, &cm("dry", &[("a", "1")])))
        .await
        .expect("dry-run create");
    assert_eq!(d.name_any(), "dry");
    assert_eq!(data(&d), map(&[("a", "1")]));
    assert!(d.metadata.creation_timestamp.is_some());
    assert!(
        bounded(cms.get_opt("dry")).await.unwrap().is_none(),
        "dry run stored the object"
    );
    // Dry-run update and delete leave the stored object alone.
    let mut upd = a.clone();
    upd.data = Some(map(&[("x", "y")]));
    let u = bounded(cms.replace(&a.name_any(), &pp, &upd))
        .await
        .unwrap();
    assert_eq!(data(&u), map(&[("x", "y")]));
    let stored = bounded(cms.get(&a.name_any())).await.unwrap();
    assert_eq!(data(&stored), map(&[]));
    assert_eq!(
        stored.metadata.resource_version,
        a.metadata.resource_version
    );
    let dp = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    bounded(cms.delete(&a.name_any(), &dp)).await.unwrap();
    assert!(bounded(cms.get_opt(&a.name_any())).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_objects_are_422_invalid() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let pp = PostParams::default();

    let s = expect_status(
        bounded(cms.create(&pp, &cm("Bad_Name", &[]))).await,
        422,
        "Invalid",
    );
    let d = s.details.expect("details");
    assert_eq!(
        (d.name.as_str(), d.kind.as_str()),
        ("Bad_Name", "ConfigMap")
    );
    assert!(
        d.causes.iter().any(|c| c.field == "metadata.name"),
        "causes {:?}",
        d.causes
    );

    let mut noname = cm("x", &[]);
    noname.metadata.name = None;
    expect_status(bounded(cms.create(&pp, &noname)).await, 422, "Invalid");

    expect_status(
        bounded(cms.create(&pp, &cm("badkey", &[("not a key!", "v")]))).await,
        422,
        "Invalid",
    );

    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    expect_status(
        bounded(pods.create(&pp, &pod_with("nocontainers", &[], None))).await,
        422,
        "Invalid",
    );
    let mut noimage = pod("noimage");
    noimage.spec.as_mut().unwrap().containers[0].image = None;
    expect_status(bounded(pods.create(&pp, &noimage)).await, 422, "Invalid");

    let nss: Api<Namespace> = Api::all(h.client.clone());
    let bad_ns = Namespace {
        metadata: meta("Not.A.Label", &[]),
        ..Namespace::default()
    };
    expect_status(bounded(nss.create(&pp, &bad_ns)).await, 422, "Invalid");

    // Nothing was stored.
    let l = bounded(cms.list(&ListParams::default().labels(TEST_LABEL)))
        .await
        .unwrap();
    assert!(l.items.is_empty(), "{:?}", names(&l.items));
}

#[tokio::test(flavor = "multi_thread")]
async fn update_rules_name_uid_and_immutable_configmaps() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let a = create(&cms, &cm("a", &[("k", "1")])).await;

    // The body's name must match the URL's: 400 BadRequest.
    let mut other = a.clone();
    other.metadata.name = Some("b".into());
    expect_status(
        bounded(cms.replace("a", &PostParams::default(), &other)).await,
        400,
        "BadRequest",
    );

    // creationTimestamp can't be changed by an update.
    let mut ts = a.clone();
    ts.metadata.creation_timestamp = None;
    ts.data = Some(map(&[("k", "2")]));
    let t = bounded(cms.replace("a", &PostParams::default(), &ts))
        .await
        .unwrap();
    assert_eq!(t.metadata.creation_timestamp, a.metadata.creation_timestamp);
    assert_eq!(t.metadata.uid, a.metadata.uid);

    // immutable: true freezes data (422) but still allows metadata changes.
    let mut frozen = cm("frozen", &[("k", "1")]);
    frozen.immutable = Some(true);
    let f = create(&cms, &frozen).await;
    let mut change = f.clone();
    change.data = Some(map(&[("k", "2")]));
    expect_status(
        bounded(cms.replace("frozen", &PostParams::default(), &change)).await,
        422,
        "Invalid",
    );
    let l = bounded(cms.patch(
        "frozen",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"still": "ok"}}})),
    ))
    .await
    .unwrap();
    assert_eq!(l.labels().get("still").map(String::as_str), Some("ok"));
    assert_eq!(data(&l), map(&[("k", "1")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_get_their_name_label_and_finalizer() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let n = bounded(Api::<Namespace>::all(h.client.clone()).get(&ns))
        .await
        .unwrap();
    assert_eq!(
        n.labels()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some(ns.as_str())
    );
    assert_eq!(
        n.spec.and_then(|s| s.finalizers),
        Some(vec!["kubernetes".to_string()])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_from_rv_zero_starts_with_current_state() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let run = unique("run");
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let lbl = [(TEST_LABEL, run.as_str())];
    create(&cms, &cm_labeled("one", &lbl, &[])).await;
    create(&cms, &cm_labeled("two", &lbl, &[])).await;
    let wp = WatchParams::default()
        .labels(&format!("{TEST_LABEL}={run}"))
        .timeout(30);
    // resourceVersion "0": synthetic ADDED events for what exists, then changes.
    let mut w = bounded(cms.watch(&wp, "0")).await.unwrap().boxed();
    let mut first = Vec::new();
    for _ in 0..2 {
        let (k, o) = event_parts(next_event(&mut w).await);
        assert_eq!(k, "ADDED");
        first.push(o.name_any());
    }
    first.sort();
    assert_eq!(first, ["one", "two"]);
    create(&cms, &cm_labeled("three", &lbl, &[])).await;
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!((k, o.name_any().as_str()), ("ADDED", "three"));
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_collection_by_label() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    for (n, v) in [("a", "x"), ("b", "x"), ("c", "y")] {
        create(&cms, &cm_labeled(n, &[("grp", v)], &[])).await;
    }
    bounded(cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("grp=x"),
    ))
    .await
    .expect("deletecollection");
    let left = list_names(&cms, &ListParams::default().labels(TEST_LABEL)).await;
    assert_eq!(left, sorted(&["c"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_times_keep_microseconds() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let t: MicroTime = serde_json::from_value(json!("2025-03-04T05:06:07.123456Z")).unwrap();
    let mut l = lease("micro", "n1");
    let spec = l.spec.as_mut().unwrap();
    spec.renew_time = Some(t.clone());
    spec.acquire_time = Some(t.clone());
    spec.lease_transitions = Some(3);
    create(&leases, &l).await;
    let got = bounded(leases.get("micro")).await.unwrap();
    let spec = got.spec.unwrap();
    assert_eq!(spec.renew_time, Some(t.clone()));
    assert_eq!(spec.acquire_time, Some(t));
    assert_eq!(spec.lease_transitions, Some(3));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    // On the wire: RFC 3339 with exactly six fractional digits.
    let req = http::Request::get(format!(
        "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/micro"
    ))
    .body(Vec::new())
    .unwrap();
    let (code, v) = send_raw(&h.client, req).await;
    assert_eq!(code, 200);
    assert_eq!(v["spec"]["renewTime"], "2025-03-04T05:06:07.123456Z", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn node_status_is_a_subresource_and_conditions_merge_by_type() {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    let h = Harness::start().await;
    let name = unique("node");
    let mut n = node(&name);
    // Nodes may carry status on create (the kubelet registers that way).
    n.status = Some(NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "True".into(),
            ..NodeCondition::default()
        }]),
        ..NodeStatus::default()
    });
    let nodes: Api<Node> = Api::all(h.client.clone());
    h.track_node(&name);
    let made = create(&nodes, &n).await;
    assert_eq!(
        node_conditions(&made),
        [("Ready".to_string(), "True".to_string())]
    );

    // The agent's write: NetworkUnavailable=False via a strategic patch of nodes/status.
    let p = bounded(nodes.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "False", "reason": "SluiceIsUp"}
        ]}})),
    ))
    .await
    .unwrap();
    let mut conds = node_conditions(&p);
    conds.sort();
    assert_eq!(
        conds,
        [
            ("NetworkUnavailable".to_string(), "False".to_string()),
            ("Ready".to_string(), "True".to_string())
        ]
    );
    // Status through the main resource is ignored.
    let mut via_main = p.clone();
    via_main.status = Some(NodeStatus::default());
    via_main
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert("x".into(), "y".into());
    let m = bounded(nodes.replace(&name, &PostParams::default(), &via_main))
        .await
        .unwrap();
    assert_eq!(m.labels().get("x").map(String::as_str), Some("y"));
    assert_eq!(
        node_conditions(&m).len(),
        2,
        "node status written through the main resource"
    );
}

fn node_conditions(n: &Node) -> Vec<(String, String)> {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|cs| {
            cs.iter()
                .map(|c| (c.type_.clone(), c.status.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn bound_pods_are_deleted_gracefully() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    let mut p = pod_with("grace", &["c"], Some(&unique("node")));
    p.spec.as_mut().unwrap().termination_grace_period_seconds = Some(30);
    create(&pods, &p).await;
    // A pod on a node is deleted gracefully: it stays, with deletionTimestamp and the grace
    // period, until the kubelet (or a grace-0 delete) finishes it.
    bounded(pods.delete("grace", &DeleteParams::default()))
        .await
        .unwrap();
    let held = bounded(pods.get("grace"))
        .await
        .expect("still there during its grace period");
    assert!(held.metadata.deletion_timestamp.is_some());
    assert_eq!(held.metadata.deletion_grace_period_seconds, Some(30));
    bounded(pods.delete("grace", &DeleteParams::default().grace_period(0)))
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the pod goes after a grace-0 delete",
        || {
            let pods = pods.clone();
            async move { matches!(pods.get_opt("grace").await, Ok(None)).then_some(()) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_endpoints_answer_ok() {
    let h = Harness::start().await;
    for path in ["/healthz", "/livez", "/readyz"] {
        let req = http::Request::get(path)
            .body(Vec::new())
            .unwrap()
            .map(kube::client::Body::from);
        let resp = bounded(h.client.send(req)).await.expect("send");
        assert_eq!(resp.status().as_u16(), 200, "{path}");
        let body = bounded(http_body_util::BodyExt::collect(resp.into_body()))
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"ok", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn preconditions_on_patch_and_delete() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let a = create(&cms, &cm("pre", &[("k", "1")])).await;
    let old_rv = a.metadata.resource_version.clone().unwrap();
    let b = bounded(cms.patch(
        "pre",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"resourceVersion": old_rv}, "data": {"k": "2"}})),
    ))
    .await
    .expect("a patch naming the current resourceVersion");
    assert_eq!(data(&b), map(&[("k", "2")]));
    // The same (now stale) resourceVersion in a patch: 409 Conflict.
    expect_status(
        bounded(cms.patch(
            "pre",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": old_rv}, "data": {"k": "3"}})),
        ))
        .await,
        409,
        "Conflict",
    );
    // Delete with a stale resourceVersion precondition: 409 Conflict, object kept.
    let stale = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: None,
            resource_version: Some(old_rv.clone()),
        }),
        ..DeleteParams::default()
    };
    expect_status(bounded(cms.delete("pre", &stale)).await, 409, "Conflict");
    assert!(bounded(cms.get_opt("pre")).await.unwrap().is_some());
    let current = DeleteParams {
        preconditions: Some(kube::api::Preconditions {
            uid: b.metadata.uid.clone(),
            resource_version: b.metadata.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    bounded(cms.delete("pre", &current)).await.unwrap();
    assert!(bounded(cms.get_opt("pre")).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn no_new_finalizers_while_deleting() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut c = cm("fz", &[]);
    c.metadata.finalizers = Some(vec!["sluice.test/a".into()]);
    create(&cms, &c).await;
    bounded(cms.delete("fz", &DeleteParams::default()))
        .await
        .unwrap();
    let s = expect_status(
        bounded(cms.patch(
            "fz",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["sluice.test/a", "sluice.test/b"]}})),
        ))
        .await,
        422,
        "Invalid",
    );
    assert!(s.message.contains("finalizers"), "message {:?}", s.message);
    // Other metadata can still change; the deletionTimestamp can't be cleared.
    let p = bounded(cms.patch(
        "fz",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}, "deletionTimestamp": null}})),
    ))
    .await
    .unwrap();
    assert!(p.metadata.deletion_timestamp.is_some());
    bounded(cms.patch(
        "fz",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_labels_are_422() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pp = PostParams::default();
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    expect_status(
        bounded(cms.create(&pp, &cm_labeled("badlabel", &[("k", "not a value!")], &[]))).await,
        422,
        "Invalid",
    );
    expect_status(
        bounded(cms.create(&pp, &cm_labeled("badkey", &[("-bad-", "v")], &[]))).await,
        422,
        "Invalid",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_lease_is_422() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pp = PostParams::default();
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let mut l = lease("zero", "n");
    l.spec.as_mut().unwrap().lease_duration_seconds = Some(0);
    expect_status(bounded(leases.create(&pp, &l)).await, 422, "Invalid");
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_networkpolicy_is_422() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pp = PostParams::default();
    let nps: Api<NetworkPolicy> = Api::namespaced(h.client.clone(), &ns);
    let cases = [
        (
            "policyTypes: Sideways",
            json!({"podSelector": {}, "policyTypes": ["Sideways"]}),
        ),
        (
            "protocol: FOO",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "FOO", "port": 80}]}]}),
        ),
        (
            "port 0",
            json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "TCP", "port": 0}]}]}),
        ),
        (
            "ipBlock: not a CIDR",
            json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]}),
        ),
    ];
    let mut wrong = Vec::new();
    for (i, (what, spec)) in cases.into_iter().enumerate() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("bad{i}")},
            "spec": spec,
        }))
        .unwrap();
        match bounded(nps.create(&pp, &np)).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.reason == "Invalid" => {}
            other => wrong.push(format!("{what}: {:?}", other.map(|o| o.name_any()))),
        }
    }
    assert!(wrong.is_empty(), "expected 422 Invalid for: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn configmap_binary_data_round_trips() {
    use k8s_openapi::ByteString;
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut c = cm("bin", &[("text", "hello\nworld")]);
    c.binary_data = Some([("blob".to_string(), ByteString(vec![0, 159, 146, 150, 255]))].into());
    create(&cms, &c).await;
    let got = bounded(cms.get("bin")).await.unwrap();
    assert_eq!(got.binary_data, c.binary_data);
    assert_eq!(data(&got), map(&[("text", "hello\nworld")]));
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_watch_by_node_name_sees_binding_as_added() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let node_name = unique("node");
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    let all: Api<Pod> = Api::all(h.client.clone());
    let sel = format!("spec.nodeName={node_name}");
    let rv = bounded(all.list(&ListParams::default().fields(&sel)))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    // The kubelet's watch: all namespaces, its node only.
    let mut w = bounded(all.watch(&WatchParams::default().fields(&sel).timeout(30), &rv))
        .await
        .unwrap()
        .boxed();
    create(&pods, &pod("elsewhere")).await;
    create(&pods, &pod("mine")).await;
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": "mine"},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node_name}
    });
    let _: Status =
        bounded(pods.create_subresource("binding", "mine", &PostParams::default(), &binding))
            .await
            .unwrap();
    match next_event(&mut w).await {
        WatchEvent::Added(p) => {
            assert_eq!(p.name_any(), "mine");
            assert_eq!(
                p.spec.unwrap().node_name.as_deref(),
                Some(node_name.as_str())
            );
        }
        other => panic!("expected ADDED(mine), got {}", describe(other)),
    }
    let _ = bounded(pods.delete("mine", &DeleteParams::default().grace_period(0))).await;
    match next_event(&mut w).await {
        WatchEvent::Modified(p) | WatchEvent::Deleted(p) => assert_eq!(p.name_any(), "mine"),
        other => panic!("expected the pod's deletion, got {}", describe(other)),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn many_concurrent_watches_all_see_a_change() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let rv = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut streams = Vec::new();
    for _ in 0..24 {
        let s = bounded(
            cms.watch(
                &WatchParams::default()
                    .fields("metadata.name=fanout")
                    .timeout(30),
                &rv,
            ),
        )
        .await
        .unwrap()
        .boxed();
        streams.push(s);
    }
    create(&cms, &cm("fanout", &[])).await;
    let seen = futures::future::join_all(streams.iter_mut().map(|s| async move {
        let (k, o) = event_parts(next_event(s).await);
        (k, o.name_any())
    }))
    .await;
    assert!(
        seen.iter().all(|(k, n)| *k == "ADDED" && n == "fanout"),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_pods_and_nodes_are_422() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let pp = PostParams::default();
    let pods: Api<Pod> = Api::namespaced(h.client.clone(), &ns);
    let c = |extra: serde_json::Value| {
        let mut base = json!({"name": "c", "image": IMAGE});
        base.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        base
    };
    let cases = [
        (
            "containerPort 0",
            json!({"containers": [c(json!({"ports": [{"containerPort": 0}]}))]}),
        ),
        (
            "containerPort 70000",
            json!({"containers": [c(json!({"ports": [{"containerPort": 70000}]}))]}),
        ),
        (
            "protocol FOO",
            json!({"containers": [c(json!({"ports": [{"containerPort": 80, "protocol": "FOO"}]}))]}),
        ),
        (
            "duplicate container names",
            json!({"containers": [c(json!({})), c(json!({}))]}),
        ),
        (
            "restartPolicy Sometimes",
            json!({"containers": [c(json!({}))], "restartPolicy": "Sometimes"}),
        ),
    ];
    let mut wrong = Vec::new();
    for (i, (what, spec)) in cases.into_iter().enumerate() {
        let p: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("bad{i}")},
            "spec": spec,
        }))
        .unwrap();
        match bounded(pods.create(&pp, &p)).await {
            Err(kube::Error::Api(s)) if s.code == 422 && s.reason == "Invalid" => {}
            other => wrong.push(format!("pod {what}: {:?}", other.map(|o| o.name_any()))),
        }
    }
    let nodes: Api<Node> = Api::all(h.client.clone());
    let name = unique("badnode");
    h.track_node(&name);
    let n: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {"podCIDR": "10.244.300.0/24", "podCIDRs": ["10.244.300.0/24"]},
    }))
    .unwrap();
    match bounded(nodes.create(&pp, &n)).await {
        Err(kube::Error::Api(s)) if s.code == 422 && s.reason == "Invalid" => {}
        other => wrong.push(format!(
            "node podCIDR 10.244.300.0/24: {:?}",
            other.map(|o| o.name_any())
        )),
    }
    assert!(wrong.is_empty(), "expected 422 Invalid for: {wrong:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_gets_a_bookmark_before_its_timeout() {
    // kube-apiserver's cacher schedules a bookmark at (deadline - 2 s) for every watch that
    // allows bookmarks, whatever its periodic bookmark frequency (so that a client resumes from
    // a fresh resourceVersion after the timeout).
    let h = Harness::start_with(Options {
        bookmark_interval: Duration::from_secs(60),
        ..Options::default()
    })
    .await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    create(&cms, &cm("x", &[])).await;
    let rv = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut w = bounded(cms.watch(&WatchParams::default().timeout(4), &rv))
        .await
        .unwrap()
        .boxed();
    match bounded_for(Duration::from_secs(8), w.try_next()).await {
        Ok(Some(WatchEvent::Bookmark(b))) => {
            assert!(rv_num(Some(&b.metadata.resource_version)) >= rv_num(Some(&rv)));
            assert!(
                started.elapsed() < Duration::from_millis(3900),
                "the bookmark came only at the timeout ({:?})",
                started.elapsed()
            );
        }
        Ok(Some(e)) => panic!("unexpected event {}", describe(e)),
        Ok(None) => panic!(
            "watch ended after {:?} without the pre-timeout bookmark",
            started.elapsed()
        ),
        Err(e) => panic!("watch failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_across_a_restart_resumes_or_says_gone() {
    let Some(mut h) = Harness::persistent("restarts the server on its state file").await else {
        return;
    };
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let c = create(&cms, &cm("r", &[("n", "0")])).await;
    let rv1 = c.metadata.resource_version.clone().unwrap();
    let mut rvs = Vec::new();
    for i in 1..=2 {
        let p = bounded(cms.patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"n": i.to_string()}})),
        ))
        .await
        .unwrap();
        rvs.push(rv_num(p.metadata.resource_version.as_ref()));
    }
    h.restart().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    // A real kube-apiserver either still has the history (etcd) or answers 410 (its watch
    // cache starts at the restart); both are fine, silently skipping or inventing events isn't.
    let wp = WatchParams::default().timeout(10);
    match bounded(cms.watch(&wp, &rv1)).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 410, "{s:?}"),
        Err(e) => panic!("watch after restart: {e}"),
        Ok(w) => {
            let mut w = w.boxed();
            match next_event(&mut w).await {
                WatchEvent::Error(s) => assert_eq!(s.code, 410, "{s:?}"),
                e => {
                    let (k, o) = event_parts(e);
                    assert_eq!(
                        (k, rv_num(o.metadata.resource_version.as_ref())),
                        ("MODIFIED", rvs[0])
                    );
                    let (k, o) = event_parts(next_event(&mut w).await);
                    assert_eq!(
                        (k, rv_num(o.metadata.resource_version.as_ref())),
                        ("MODIFIED", rvs[1])
                    );
                    assert_quiet(&mut w, Duration::from_millis(300)).await;
                }
            }
        }
    }
    // A watch from a list after the restart sees the next change.
    let rv = bounded(cms.list(&ListParams::default()))
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let mut w = bounded(cms.watch(&wp, &rv)).await.unwrap().boxed();
    bounded(cms.patch(
        "r",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"n": "3"}})),
    ))
    .await
    .unwrap();
    let (k, o) = event_parts(next_event(&mut w).await);
    assert_eq!(k, "MODIFIED");
    assert!(rv_num(o.metadata.resource_version.as_ref()) > rvs[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_status_apply_keeps_other_managers_conditions() {
    use k8s_openapi::api::core::v1::{NodeCondition, NodeStatus};
    let h = Harness::start().await;
    let name = unique("node");
    let nodes: Api<Node> = Api::all(h.client.clone());
    h.track_node(&name);
    create(&nodes, &node(&name)).await;
    // "kubelet" owns Ready through an update of nodes/status ...
    bounded(nodes.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}})),
    ))
    .await
    .unwrap();
    // ... and sluice applies only its own condition to nodes/status.
    let mine = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..ObjectMeta::default()
        },
        status: Some(NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: "NetworkUnavailable".into(),
                status: "False".into(),
                reason: Some("SluiceIsUp".into()),
                ..NodeCondition::default()
            }]),
            ..NodeStatus::default()
        }),
        ..Node::default()
    };
    let p = bounded(nodes.patch_status(&name, &PatchParams::apply("sluice"), &Patch::Apply(&mine)))
        .await
        .expect("server-side apply to nodes/status");
    let mut conds = node_conditions(&p);
    conds.sort();
    assert_eq!(
        conds,
        [
            ("NetworkUnavailable".to_string(), "False".to_string()),
            ("Ready".to_string(), "True".to_string())
        ]
    );
    let applied = p.clone();
    // Applying again with the status flipped updates just that condition.
    let mut flipped = mine.clone();
    flipped
        .status
        .as_mut()
        .unwrap()
        .conditions
        .as_mut()
        .unwrap()[0]
        .status = "True".into();
    let p = bounded(nodes.patch_status(
        &name,
        &PatchParams::apply("sluice"),
        &Patch::Apply(&flipped),
    ))
    .await
    .unwrap();
    let mut conds = node_conditions(&p);
    conds.sort();
    assert_eq!(
        conds,
        [
            ("NetworkUnavailable".to_string(), "True".to_string()),
            ("Ready".to_string(), "True".to_string())
        ]
    );
    // Applying without the condition removes it (sluice was its only manager); Ready stays.
    let mut none = mine.clone();
    none.status.as_mut().unwrap().conditions = Some(vec![]);
    let p = bounded(nodes.patch_status(&name, &PatchParams::apply("sluice"), &Patch::Apply(&none)))
        .await
        .unwrap();
    assert_eq!(
        node_conditions(&p),
        [("Ready".to_string(), "True".to_string())]
    );
    let mf = applied.metadata.managed_fields.clone().unwrap_or_default();
    assert!(
        mf.iter().any(|m| m.manager.as_deref() == Some("sluice")
            && m.operation.as_deref() == Some("Apply")
            && m.subresource.as_deref() == Some("status")),
        "managedFields {mf:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_namespace_refuses_new_objects() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let cms: Api<ConfigMap> = Api::namespaced(h.client.clone(), &ns);
    let mut held = cm("held", &[]);
    held.metadata.finalizers = Some(vec!["sluice.test/hold".into()]);
    create(&cms, &held).await;
    let nss: Api<Namespace> = Api::all(h.client.clone());
    bounded(nss.delete(&ns, &DeleteParams::default()))
        .await
        .unwrap();
    // The finalizer keeps the configmap, so the namespace stays Terminating.
    let n = bounded(nss.get(&ns))
        .await
        .expect("namespace held by its content");
    assert!(n.metadata.deletion_timestamp.is_some());
    assert_eq!(
        n.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
    let s = expect_status(
        bounded(cms.create(&PostParams::default(), &cm("late", &[]))).await,
        403,
        "Forbidden",
    );
    assert!(
        s.message.contains("being terminated"),
        "message {:?}",
        s.message
    );
    if is_e2e() && !e2e_has_controllers() {
        eprintln!("SKIPPED the namespace-finishing part: no namespace controller");
        return;
    }
    // The namespace's deletion reaches the configmap; removing its finalizer lets both go.
    eventually(
        Duration::from_secs(10),
        "the held configmap is being deleted",
        || {
            let cms = cms.clone();
            async move {
                match cms.get_opt("held").await {
                    Ok(Some(c)) => c.metadata.deletion_timestamp.map(|_| ()),
                    Ok(None) => panic!("the configmap went despite its finalizer"),
                    Err(_) => None,
                }
            }
        },
    )
    .await;
    let n = bounded(nss.get(&ns))
        .await
        .expect("the namespace waits for its content's finalizers");
    assert_eq!(
        n.status.and_then(|s| s.phase).as_deref(),
        Some("Terminating")
    );
    bounded(cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    ))
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "the namespace goes", || {
        let nss = nss.clone();
        let ns = ns.clone();
        async move { matches!(nss.get_opt(&ns).await, Ok(None)).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_watchers_see_the_cascade_delete() {
    let h = Harness::start().await;
    if is_e2e() && !e2e_has_controllers() {
        eprintln!("SKIPPED: the cascade needs the garbage collector (SLUICE_E2E_CONTROLLERS)");
        return;
    }
    let ns = h.namespace().await;
    let n = create_node(&h, &unique("node")).await;
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    let mut l = lease("sluice-10-244-9-0-24", &n.name_any());
    l.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Node".into(),
        name: n.name_any(),
        uid: n.metadata.uid.clone().unwrap(),
        ..OwnerReference::default()
    }]);
    let made = create(&leases, &l).await;
    // The peers' watch: every lease, all namespaces.
    let all: Api<Lease> = Api::all(h.client.clone());
    let mut w = bounded(
        all.watch(
            &WatchParams::default()
                .fields(&format!("metadata.namespace={ns}"))
                .timeout(60),
            made.metadata.resource_version.as_deref().unwrap(),
        ),
    )
    .await
    .unwrap()
    .boxed();
    let nodes: Api<Node> = Api::all(h.client.clone());
    bounded(nodes.delete(&n.name_any(), &DeleteParams::default()))
        .await
        .unwrap();
    let limit = if is_e2e() {
        Duration::from_secs(60)
    } else {
        STEP
    };
    loop {
        match bounded_for(limit, w.try_next()).await {
            Ok(Some(WatchEvent::Deleted(d))) => {
                assert_eq!(d.name_any(), "sluice-10-244-9-0-24");
                break;
            }
            // A foreground/background GC may first mark it (MODIFIED).
            Ok(Some(WatchEvent::Modified(_) | WatchEvent::Bookmark(_))) => continue,
            other => panic!(
                "expected the lease's DELETED event, got {:?}",
                other.map(|o| o.map(describe))
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_owned_by_a_vanished_node_uid_is_collected() {
    let h = Harness::start().await;
    if is_e2e() && !e2e_has_controllers() {
        eprintln!("SKIPPED: needs the garbage collector (SLUICE_E2E_CONTROLLERS)");
        return;
    }
    let ns = h.namespace().await;
    let name = unique("node");
    let old = create_node(&h, &name).await;
    let nodes: Api<Node> = Api::all(h.client.clone());
    bounded(nodes.delete(&name, &DeleteParams::default()))
        .await
        .unwrap();
    // The node comes back under the same name, as a new object (new uid).
    let new = create_node(&h, &name).await;
    assert_ne!(old.metadata.uid, new.metadata.uid);
    let owned_by = |n: &Node, lname: &str| {
        let mut l = lease(lname, &name);
        l.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: name.clone(),
            uid: n.metadata.uid.clone().unwrap(),
            ..OwnerReference::default()
        }]);
        l
    };
    let leases: Api<Lease> = Api::namespaced(h.client.clone(), &ns);
    create(&leases, &owned_by(&old, "stale")).await;
    create(&leases, &owned_by(&new, "current")).await;
    // The garbage collector matches owners by uid: the stale lease's owner is gone.
    let limit = if is_e2e() {
        Duration::from_secs(60)
    } else {
        Duration::from_secs(5)
    };
    eventually(
        limit,
        "the lease owned by the vanished uid is collected",
        || {
            let leases = leases.clone();
            async move { matches!(leases.get_opt("stale").await, Ok(None)).then_some(()) }
        },
    )
    .await;
    assert!(bounded(leases.get_opt("current")).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_network_policies_are_served_cluster_scoped_and_discovered() {
    if is_e2e() {
        // A real cluster serves them only with network-policy-api's CRD installed.
        return;
    }
    let h = Harness::start().await;
    let d = bounded(Discovery::new(h.client.clone()).run())
        .await
        .expect("discovery");
    let gvk = GroupVersionKind::gvk(
        "policy.networking.k8s.io",
        "v1alpha2",
        "ClusterNetworkPolicy",
    );
    let (ar, caps) = d
        .resolve_gvk(&gvk)
        .expect("ClusterNetworkPolicy discovered");
    assert_eq!(caps.scope, Scope::Cluster);
    assert_eq!(ar.plural, "clusternetworkpolicies");
    let api: Api<kube::api::DynamicObject> = Api::all_with(h.client.clone(), &ar);
    let name = unique("cnp");
    let obj: kube::api::DynamicObject = serde_json::from_value(json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
    }))
    .unwrap();
    let made = bounded(api.create(&PostParams::default(), &obj))
        .await
        .expect("create");
    assert_eq!(made.data["spec"]["priority"], json!(10));
    let listed = bounded(api.list(&ListParams::default()))
        .await
        .expect("list");
    assert!(listed
        .items
        .iter()
        .any(|o| o.metadata.name.as_deref() == Some(&name)));
    bounded(api.delete(&name, &DeleteParams::default()))
        .await
        .expect("delete");
}
