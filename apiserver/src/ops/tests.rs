//! Write semantics without HTTP.

use serde_json::json;

use super::*;
use crate::resources::{CONFIGMAPS, LEASES, NODES};

fn ctx() -> Ctx {
    Ctx {
        now: jiff::Timestamp::now(),
        manager: "test".into(),
        ..Ctx::default()
    }
}

fn store() -> Store {
    Store::open(None, 100, "t").unwrap()
}

fn cm(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
}

fn pod(name: &str, node: Option<&str>) -> Value {
    let mut p =
        json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    if let Some(n) = node {
        p["spec"]["nodeName"] = json!(n);
    }
    p
}

#[test]
fn create_fills_server_fields_and_rejects_duplicates() {
    let mut s = store();
    let c = create(&mut s, &CONFIGMAPS, "default", cm("x"), &ctx()).unwrap();
    assert_eq!(c["metadata"]["namespace"], "default");
    assert_eq!(c["kind"], "ConfigMap");
    assert!(!uid_of(&c).is_empty());
    assert!(c["metadata"]["creationTimestamp"].is_string());
    assert!(c["metadata"].get("generation").is_none());
    assert_eq!(c["metadata"]["managedFields"][0]["manager"], "test");
    let e = create(&mut s, &CONFIGMAPS, "default", cm("x"), &ctx()).unwrap_err();
    assert_eq!((e.code, e.reason), (409, "AlreadyExists"));
    let e = create(&mut s, &CONFIGMAPS, "nope", cm("y"), &ctx()).unwrap_err();
    assert_eq!(
        (e.code, e.message.as_str()),
        (404, "namespaces \"nope\" not found")
    );
    let mut other = cm("z");
    other["metadata"]["namespace"] = json!("kube-system");
    let e = create(&mut s, &CONFIGMAPS, "default", other, &ctx()).unwrap_err();
    assert_eq!(e.code, 400);
    let gen = json!({"metadata": {"generateName": "g-"}, "data": {}});
    let g = create(&mut s, &CONFIGMAPS, "default", gen, &ctx()).unwrap();
    assert!(name_of(&g).starts_with("g-") && name_of(&g).len() == 7);
}

#[test]
fn dry_run_does_not_persist() {
    let mut s = store();
    let rv = s.current_rv();
    let dry = Ctx {
        dry_run: true,
        ..ctx()
    };
    create(&mut s, &CONFIGMAPS, "default", cm("x"), &dry).unwrap();
    assert_eq!(s.current_rv(), rv);
    assert!(s.get(&CONFIGMAPS, "default", "x").is_none());
}

#[test]
fn update_checks_resource_version() {
    let mut s = store();
    let c = create(&mut s, &CONFIGMAPS, "default", cm("x"), &ctx()).unwrap();
    let mut next = c.clone();
    next["data"]["a"] = json!("2");
    let (u, created) = update(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        next.clone(),
        false,
        &ctx(),
    )
    .unwrap();
    assert!(!created);
    assert_ne!(rv_of(&u), rv_of(&c));
    let e = update(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        next.clone(),
        false,
        &ctx(),
    )
    .unwrap_err();
    assert_eq!((e.code, e.reason), (409, "Conflict"));
    // No resourceVersion: unconditional.
    metadata_mut(&mut next).remove("resourceVersion");
    next["data"]["a"] = json!("3");
    assert!(update(&mut s, &CONFIGMAPS, "default", "x", next, false, &ctx()).is_ok());
    // A no-op keeps the resourceVersion.
    let cur = s.get(&CONFIGMAPS, "default", "x").cloned().unwrap();
    let (same, _) = update(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        cur.clone(),
        false,
        &ctx(),
    )
    .unwrap();
    assert_eq!(rv_of(&same), rv_of(&cur));
    // Missing: 404, except leases (create on update).
    let e = update(
        &mut s,
        &CONFIGMAPS,
        "default",
        "nope",
        cm("nope"),
        false,
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.code, 404);
    let lease = json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": "me"}});
    let (_, created) = update(&mut s, &LEASES, "default", "l", lease, false, &ctx()).unwrap();
    assert!(created);
}

#[test]
fn patches() {
    let mut s = store();
    create(&mut s, &CONFIGMAPS, "default", cm("x"), &ctx()).unwrap();
    let (p, _) = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        PatchType::Merge,
        br#"{"data":{"b":"2"}}"#,
        false,
        &ctx(),
    )
    .unwrap();
    assert_eq!(p["data"], json!({"a": "1", "b": "2"}));
    let (p, _) = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        PatchType::Json,
        br#"[{"op":"remove","path":"/data/a"}]"#,
        false,
        &ctx(),
    )
    .unwrap();
    assert_eq!(p["data"], json!({"b": "2"}));
    let stale = r#"{"metadata":{"resourceVersion":"1"},"data":{"c":"3"}}"#;
    let e = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        PatchType::Strategic,
        stale.as_bytes(),
        false,
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.code, 409);
    let e = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "nope",
        PatchType::Merge,
        b"{}",
        false,
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.code, 404);
    let e = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "x",
        PatchType::Merge,
        b"not json",
        false,
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.code, 400);
}

#[test]
fn server_side_apply_creates_and_is_idempotent() {
    let mut s = store();
    let body =
        br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"k":"v"}}"#;
    let apply = PatchType::Apply { force: false };
    let (c, created) = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "a",
        apply,
        body,
        false,
        &ctx(),
    )
    .unwrap();
    assert!(created);
    assert_eq!(c["metadata"]["managedFields"][0]["operation"], "Apply");
    let (again, created) = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "a",
        apply,
        body,
        false,
        &ctx(),
    )
    .unwrap();
    assert!(!created);
    assert_eq!(rv_of(&again), rv_of(&c));
    let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  j: w\n";
    let (y, _) = patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "a",
        apply,
        yaml,
        false,
        &ctx(),
    )
    .unwrap();
    assert_eq!(y["data"], json!({"j": "w"}));
}

#[test]
fn finalizers_hold_deletion_until_removed() {
    let mut s = store();
    let mut c = cm("f");
    c["metadata"]["finalizers"] = json!(["example.com/hold"]);
    create(&mut s, &CONFIGMAPS, "default", c, &ctx()).unwrap();
    let d = delete(
        &mut s,
        &CONFIGMAPS,
        "default",
        "f",
        &DeleteOpts::default(),
        &ctx(),
    )
    .unwrap();
    assert!(d["metadata"]["deletionTimestamp"].is_string());
    assert!(s.get(&CONFIGMAPS, "default", "f").is_some());
    patch(
        &mut s,
        &CONFIGMAPS,
        "default",
        "f",
        PatchType::Merge,
        br#"{"metadata":{"finalizers":null}}"#,
        false,
        &ctx(),
    )
    .unwrap();
    assert!(s.get(&CONFIGMAPS, "default", "f").is_none());
}

#[test]
fn delete_preconditions() {
    let mut s = store();
    create(&mut s, &CONFIGMAPS, "default", cm("p"), &ctx()).unwrap();
    let opts = DeleteOpts {
        uid: Some("other".into()),
        ..DeleteOpts::default()
    };
    let e = delete(&mut s, &CONFIGMAPS, "default", "p", &opts, &ctx()).unwrap_err();
    assert_eq!(e.code, 409);
    let e = delete(
        &mut s,
        &NAMESPACES,
        "",
        "default",
        &DeleteOpts::default(),
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.code, 403);
}

#[test]
fn graceful_pod_deletion() {
    let mut s = store();
    create(&mut s, &PODS, "default", pod("unbound", None), &ctx()).unwrap();
    delete(
        &mut s,
        &PODS,
        "default",
        "unbound",
        &DeleteOpts::default(),
        &ctx(),
    )
    .unwrap();
    assert!(
        s.get(&PODS, "default", "unbound").is_none(),
        "unbound pods go at once"
    );
    create(&mut s, &PODS, "default", pod("bound", Some("n1")), &ctx()).unwrap();
    let d = delete(
        &mut s,
        &PODS,
        "default",
        "bound",
        &DeleteOpts::default(),
        &ctx(),
    )
    .unwrap();
    assert_eq!(d["metadata"]["deletionGracePeriodSeconds"], 30);
    assert!(s.get(&PODS, "default", "bound").is_some());
    // The reaper finishes it once the grace period is over.
    let later = Ctx {
        now: ctx()
            .now
            .checked_add(jiff::SignedDuration::from_secs(31))
            .unwrap(),
        ..ctx()
    };
    reap(&mut s, &later);
    assert!(s.get(&PODS, "default", "bound").is_none());
    // Or a delete with grace 0 (the kubelet's).
    create(&mut s, &PODS, "default", pod("b2", Some("n1")), &ctx()).unwrap();
    delete(
        &mut s,
        &PODS,
        "default",
        "b2",
        &DeleteOpts::default(),
        &ctx(),
    )
    .unwrap();
    let now = DeleteOpts {
        grace_period: Some(0),
        ..DeleteOpts::default()
    };
    delete(&mut s, &PODS, "default", "b2", &now, &ctx()).unwrap();
    assert!(s.get(&PODS, "default", "b2").is_none());
}

#[test]
fn owners_and_namespaces_cascade() {
    let mut s = store();
    let node = create(
        &mut s,
        &NODES,
        "",
        json!({"metadata": {"name": "n1"}}),
        &ctx(),
    )
    .unwrap();
    let lease = json!({"metadata": {"name": "l", "ownerReferences": [
        {"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": uid_of(&node)}]}, "spec": {}});
    create(&mut s, &LEASES, "kube-node-lease", lease, &ctx()).unwrap();
    delete(&mut s, &NODES, "", "n1", &DeleteOpts::default(), &ctx()).unwrap();
    assert!(s.get(&LEASES, "kube-node-lease", "l").is_none());

    create(
        &mut s,
        &NAMESPACES,
        "",
        json!({"metadata": {"name": "gone"}}),
        &ctx(),
    )
    .unwrap();
    create(&mut s, &CONFIGMAPS, "gone", cm("c"), &ctx()).unwrap();
    create(&mut s, &PODS, "gone", pod("running", Some("n1")), &ctx()).unwrap();
    let d = delete(
        &mut s,
        &NAMESPACES,
        "",
        "gone",
        &DeleteOpts::default(),
        &ctx(),
    )
    .unwrap();
    assert_eq!(d["status"]["phase"], "Terminating");
    let e = create(&mut s, &CONFIGMAPS, "gone", cm("d"), &ctx()).unwrap_err();
    assert_eq!(e.code, 403);
    reap(&mut s, &ctx());
    assert!(s.get(&CONFIGMAPS, "gone", "c").is_none());
    // A pod on a node is deleted gracefully, as by the namespace controller: it stays, marked,
    // until its kubelet has torn it down and confirms, and the namespace waits for it.
    let marked = s.get(&PODS, "gone", "running").unwrap();
    assert_eq!(marked["metadata"]["deletionGracePeriodSeconds"], 30);
    reap(&mut s, &ctx());
    assert!(s.get(&PODS, "gone", "running").is_some());
    assert!(s.get(&NAMESPACES, "", "gone").is_some());
    let kubelet = DeleteOpts {
        grace_period: Some(0),
        ..DeleteOpts::default()
    };
    delete(&mut s, &PODS, "gone", "running", &kubelet, &ctx()).unwrap();
    reap(&mut s, &ctx());
    assert!(s.get(&NAMESPACES, "", "gone").is_none());
}

#[test]
fn binding() {
    let mut s = store();
    create(&mut s, &PODS, "default", pod("p", None), &ctx()).unwrap();
    let b = json!({"metadata": {"name": "p"}, "target": {"kind": "Node", "name": "n1"}});
    bind(&mut s, "default", "p", &b, &ctx()).unwrap();
    let p = s.get(&PODS, "default", "p").unwrap();
    assert_eq!(p["spec"]["nodeName"], "n1");
    assert_eq!(p["status"]["conditions"][0]["type"], "PodScheduled");
    let e = bind(&mut s, "default", "p", &b, &ctx()).unwrap_err();
    assert_eq!(e.code, 409);
}

#[test]
fn status_subresource_and_generation() {
    let mut s = store();
    create(&mut s, &PODS, "default", pod("p", Some("n")), &ctx()).unwrap();
    let (p, _) = patch(
        &mut s,
        &PODS,
        "default",
        "p",
        PatchType::Merge,
        br#"{"status":{"phase":"Running"}}"#,
        true,
        &ctx(),
    )
    .unwrap();
    assert_eq!(p["status"]["phase"], "Running");
    assert_eq!(p["metadata"]["generation"], 1);
    let (p, _) = patch(
        &mut s,
        &PODS,
        "default",
        "p",
        PatchType::Merge,
        br#"{"status":{"phase":"Failed"}}"#,
        false,
        &ctx(),
    )
    .unwrap();
    assert_eq!(
        p["status"]["phase"], "Running",
        "main resource writes ignore status"
    );
    let img = br#"{"spec":{"containers":[{"name":"c","image":"j"}]}}"#;
    let (p, _) = patch(
        &mut s,
        &PODS,
        "default",
        "p",
        PatchType::Strategic,
        img,
        false,
        &ctx(),
    )
    .unwrap();
    assert_eq!(p["metadata"]["generation"], 2);
    let e = patch(
        &mut s,
        &PODS,
        "default",
        "p",
        PatchType::Merge,
        br#"{"spec":{"nodeName":"m"}}"#,
        false,
        &ctx(),
    )
    .unwrap_err();
    assert_eq!(e.code, 422);
}

#[test]
fn status_apply_keeps_other_managers_list_elements() {
    let mut s = store();
    let mut c = ctx();
    create(&mut s, &NODES, "", json!({"metadata": {"name": "n"}}), &c).unwrap();
    c.manager = "kubelet".into();
    let ready = br#"{"status":{"conditions":[{"type":"Ready","status":"True"}]}}"#;
    patch(&mut s, &NODES, "", "n", PatchType::Merge, ready, true, &c).unwrap();
    c.manager = "sluice".into();
    let apply = PatchType::Apply { force: false };
    let mine = br#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"},
        "status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"Up"}]}}"#;
    let (o, _) = patch(&mut s, &NODES, "", "n", apply, mine, true, &c).unwrap();
    assert_eq!(o["status"]["conditions"].as_array().map(Vec::len), Some(2));
    assert!(managed::entries(&o)
        .iter()
        .any(|e| e.manager == "sluice" && e.operation == "Apply" && e.subresource == "status"));
    let none =
        br#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"n"},"status":{"conditions":[]}}"#;
    let (o, _) = patch(&mut s, &NODES, "", "n", apply, none, true, &c).unwrap();
    assert_eq!(
        o["status"]["conditions"],
        json!([{"type": "Ready", "status": "True"}])
    );
}

#[test]
fn garbage_collector_matches_owners_by_uid() {
    let mut s = store();
    let node = create(
        &mut s,
        &NODES,
        "",
        json!({"metadata": {"name": "n"}}),
        &ctx(),
    )
    .unwrap();
    let owned = |name: &str, uid: &str, extra: Option<Value>| {
        let mut refs = vec![json!({"apiVersion": "v1", "kind": "Node", "name": "n", "uid": uid})];
        refs.extend(extra);
        json!({"metadata": {"name": name, "ownerReferences": refs}, "spec": {}})
    };
    let ns = "kube-node-lease";
    let other = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "r", "uid": "u"});
    create(&mut s, &LEASES, ns, owned("stale", "nope", None), &ctx()).unwrap();
    create(
        &mut s,
        &LEASES,
        ns,
        owned("current", uid_of(&node), None),
        &ctx(),
    )
    .unwrap();
    create(
        &mut s,
        &LEASES,
        ns,
        owned("unknown", "nope", Some(other)),
        &ctx(),
    )
    .unwrap();
    let stale_ref = json!({"apiVersion": "v1", "kind": "Node", "name": "m", "uid": "gone"});
    create(
        &mut s,
        &LEASES,
        ns,
        owned("two", uid_of(&node), Some(stale_ref)),
        &ctx(),
    )
    .unwrap();
    collect_garbage(&mut s, &ctx());
    assert!(s.get(&LEASES, ns, "stale").is_none());
    assert!(s.get(&LEASES, ns, "current").is_some());
    assert!(s.get(&LEASES, ns, "unknown").is_some());
    let two = s.get(&LEASES, ns, "two").unwrap();
    assert_eq!(
        two["metadata"]["ownerReferences"].as_array().map(Vec::len),
        Some(1)
    );
    // An orphaning delete keeps the dependents, without the reference.
    let orphan = DeleteOpts {
        propagation: Some("Orphan".into()),
        ..DeleteOpts::default()
    };
    delete(&mut s, &NODES, "", "n", &orphan, &ctx()).unwrap();
    collect_garbage(&mut s, &ctx());
    let current = s.get(&LEASES, ns, "current").unwrap();
    assert!(current["metadata"].get("ownerReferences").is_none());
}

#[test]
fn namespace_waits_for_finalizers_of_its_content() {
    let mut s = store();
    create(
        &mut s,
        &NAMESPACES,
        "",
        json!({"metadata": {"name": "t"}}),
        &ctx(),
    )
    .unwrap();
    let mut held = cm("held");
    held["metadata"]["finalizers"] = json!(["x/y"]);
    create(&mut s, &CONFIGMAPS, "t", held, &ctx()).unwrap();
    delete(&mut s, &NAMESPACES, "", "t", &DeleteOpts::default(), &ctx()).unwrap();
    reap(&mut s, &ctx());
    let c = s.get(&CONFIGMAPS, "t", "held").unwrap();
    assert!(c["metadata"]["deletionTimestamp"].is_string());
    let n = s.get(&NAMESPACES, "", "t").unwrap().clone();
    let conds = n["status"]["conditions"].as_array().unwrap();
    assert!(conds.iter().any(|c| {
        c["type"] == "NamespaceFinalizersRemaining"
        && c["status"] == "True"
        && c["message"]
            == "Some content in the namespace has finalizers remaining: x/y in 1 resource instances"
    }));
    reap(&mut s, &ctx());
    assert_eq!(
        s.get(&NAMESPACES, "", "t"),
        Some(&n),
        "no rewrite while unchanged"
    );
    let fin = br#"{"metadata":{"finalizers":null}}"#;
    patch(
        &mut s,
        &CONFIGMAPS,
        "t",
        "held",
        PatchType::Merge,
        fin,
        false,
        &ctx(),
    )
    .unwrap();
    assert!(s.get(&CONFIGMAPS, "t", "held").is_none());
    reap(&mut s, &ctx());
    assert!(s.get(&NAMESPACES, "", "t").is_none());
}
