//! Decoding a request's object as kube-apiserver does: a value of the wrong type is refused (400 on
//! create and update, 422 on a patch, the field named), a field the kind does not have is dropped
//! with a warning (`fieldValidation=Warn`, the default), dropped silently (`Ignore`), or refused
//! (`Strict`, which kubectl sends).
//!
//! Written to the behaviour of the real kube-apiserver (v1.26.1, and the same in later releases):
//! set `SLUICE_E2E_KUBECONFIG` to run them against one. Where the embedded server says more than
//! the real one (the path of the bad field in `details.causes`), the check is for it alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{bounded, Harness, TEST_LABEL};
use kube::Client;
use serde_json::{json, Value};

struct Answer {
    code: u16,
    body: Value,
    warnings: Vec<String>,
}

impl Answer {
    fn causes(&self) -> Vec<(String, String)> {
        self.body["details"]["causes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (
                            c["field"].as_str().unwrap_or("").to_string(),
                            c["reason"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }

    #[track_caller]
    fn expect(&self, code: u16, reason: &str) {
        assert_eq!(
            (self.code, self.body["reason"].as_str().unwrap_or("")),
            (code, reason),
            "{:#}",
            self.body
        );
        assert_eq!(self.body["kind"], "Status", "{:#}", self.body);
    }
}

async fn send(client: &Client, method: &str, uri: &str, content_type: &str, body: Value) -> Answer {
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", content_type)
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap()
        .map(kube::client::Body::from);
    let resp = bounded(client.send(req)).await.expect("send");
    let code = resp.status().as_u16();
    let warnings = resp
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect();
    let bytes = bounded(http_body_util::BodyExt::collect(resp.into_body()))
        .await
        .expect("body")
        .to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&bytes));
    });
    Answer {
        code,
        body,
        warnings,
    }
}

const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";
const STRATEGIC: &str = "application/strategic-merge-patch+json";
const JSON_PATCH: &str = "application/json-patch+json";

fn leases(ns: &str) -> String {
    format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases")
}

fn lease(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": name, "labels": {TEST_LABEL: "true"}}, "spec": spec})
}

#[tokio::test(flavor = "multi_thread")]
async fn values_of_the_wrong_type_are_refused_and_name_their_field() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let c = &h.client;

    // create: 400 BadRequest, as the decoder refuses it.
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "typed", "labels": {TEST_LABEL: "true"}}, "data": {"a": 1}});
    let a = send(
        c,
        "POST",
        &format!("/api/v1/namespaces/{ns}/configmaps"),
        JSON,
        cm,
    )
    .await;
    a.expect(400, "BadRequest");
    assert!(
        a.message()
            .starts_with("ConfigMap in version \"v1\" cannot be handled as a ConfigMap: "),
        "{}",
        a.message()
    );
    let forty = lease("forty", json!({"leaseDurationSeconds": "forty"}));
    let a = send(c, "POST", &leases(&ns), JSON, forty).await;
    a.expect(400, "BadRequest");
    if !h.is_e2e() {
        assert_eq!(a.causes()[0].0, "spec.leaseDurationSeconds", "{:#}", a.body);
        let a = send(
            c,
            "POST",
            &leases(&ns),
            JSON,
            lease("big", json!({"leaseDurationSeconds": 99_999_999_999_i64})),
        )
        .await;
        a.expect(400, "BadRequest");
        assert_eq!(a.causes()[0].0, "spec.leaseDurationSeconds", "{:#}", a.body);
    }

    // update: 400 as well; the stored object is unchanged.
    let made = send(
        c,
        "POST",
        &leases(&ns),
        JSON,
        lease(
            "l",
            json!({"holderIdentity": "n1", "leaseDurationSeconds": 40}),
        ),
    )
    .await;
    assert_eq!(made.code, 201, "{:#}", made.body);
    let url = format!("{}/l", leases(&ns));
    let a = send(
        c,
        "PUT",
        &url,
        JSON,
        lease("l", json!({"leaseDurationSeconds": "forty"})),
    )
    .await;
    a.expect(400, "BadRequest");

    // Every patch flavour: 422 Invalid (the patched object does not decode).
    let patches = [
        (
            STRATEGIC,
            json!({"spec": {"leaseDurationSeconds": "forty"}}),
        ),
        (MERGE, json!({"spec": {"leaseDurationSeconds": "forty"}})),
        (
            JSON_PATCH,
            json!([{"op": "replace", "path": "/spec/leaseDurationSeconds", "value": "forty"}]),
        ),
        (MERGE, json!({"spec": {"renewTime": "yesterday"}})),
        (MERGE, json!({"spec": {"holderIdentity": ["n1"]}})),
    ];
    for (ct, p) in patches {
        let a = send(c, "PATCH", &url, ct, p.clone()).await;
        a.expect(422, "Invalid");
        if !h.is_e2e() {
            let field = a.causes().first().map(|c| c.0.clone()).unwrap_or_default();
            assert!(field.starts_with("spec."), "{ct} {p}: {:#}", a.body);
        }
    }
    let got = send(c, "GET", &url, JSON, Value::Null).await;
    assert_eq!(
        got.body["spec"]["leaseDurationSeconds"], 40,
        "{:#}",
        got.body
    );
    assert_eq!(got.body["spec"]["holderIdentity"], "n1", "{:#}", got.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_ip_must_be_an_ip() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let c = &h.client;
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "labels": {TEST_LABEL: "true"}},
        "spec": {"containers": [{"name": "c", "image": "registry.k8s.io/pause:3.9"}]}});
    let pods = format!("/api/v1/namespaces/{ns}/pods");
    let made = send(c, "POST", &pods, JSON, pod).await;
    assert_eq!(made.code, 201, "{:#}", made.body);
    let status = format!("{pods}/p/status");
    let a = send(
        c,
        "PATCH",
        &status,
        MERGE,
        json!({"status": {"podIP": "not-an-ip"}}),
    )
    .await;
    a.expect(422, "Invalid");
    assert_eq!(
        a.causes(),
        vec![(
            "status.podIPs[0]".to_string(),
            "FieldValueInvalid".to_string()
        )]
    );
    let a = send(
        c,
        "PATCH",
        &status,
        STRATEGIC,
        json!({"status": {"podIPs": [{"ip": "10.244.1.5"}, {"ip": "nope"}]}}),
    )
    .await;
    a.expect(422, "Invalid");
    assert!(
        a.causes().iter().any(|c| c.0 == "status.podIPs[1]"),
        "{:#}",
        a.body
    );
    // A good address is taken, and podIP and podIPs agree.
    let ok = send(
        c,
        "PATCH",
        &status,
        MERGE,
        json!({"status": {"podIP": "10.244.1.5"}}),
    )
    .await;
    assert_eq!(ok.code, 200, "{:#}", ok.body);
    assert_eq!(ok.body["status"]["podIP"], "10.244.1.5");
    assert_eq!(ok.body["status"]["podIPs"], json!([{"ip": "10.244.1.5"}]));
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_fields_are_dropped_with_a_warning_or_refused_when_strict() {
    let h = Harness::start().await;
    let ns = h.namespace().await;
    let c = &h.client;
    let with_extra = |name: &str| {
        let mut l = lease(name, json!({"holderIdentity": "n1", "foo": 1}));
        l["bar"] = json!(2);
        l
    };
    let warned = |a: &Answer, field: &str| {
        let want = format!("299 - \"unknown field \\\"{field}\\\"\"");
        assert!(a.warnings.contains(&want), "want {want}: {:?}", a.warnings);
    };

    // The default (Warn): stored without the fields, one warning each.
    let a = send(c, "POST", &leases(&ns), JSON, with_extra("warn")).await;
    assert_eq!(a.code, 201, "{:#}", a.body);
    warned(&a, "spec.foo");
    warned(&a, "bar");
    assert!(a.body["spec"].get("foo").is_none(), "{:#}", a.body);
    assert!(a.body.get("bar").is_none(), "{:#}", a.body);
    let url = format!("{}/warn", leases(&ns));
    let got = send(c, "GET", &url, JSON, Value::Null).await;
    assert!(got.body["spec"].get("foo").is_none(), "{:#}", got.body);

    // Through every patch flavour, too.
    for (ct, p) in [
        (
            STRATEGIC,
            json!({"spec": {"holderIdentity": "n2", "baz": "x"}}),
        ),
        (MERGE, json!({"spec": {"holderIdentity": "n3", "baz": "x"}})),
        (
            JSON_PATCH,
            json!([{"op": "add", "path": "/spec/baz", "value": "x"}]),
        ),
    ] {
        let a = send(c, "PATCH", &url, ct, p).await;
        assert_eq!(a.code, 200, "{ct}: {:#}", a.body);
        warned(&a, "spec.baz");
        assert!(a.body["spec"].get("baz").is_none(), "{ct}: {:#}", a.body);
    }
    let got = send(c, "GET", &url, JSON, Value::Null).await;
    assert!(got.body["spec"].get("baz").is_none(), "{:#}", got.body);
    assert_eq!(got.body["spec"]["holderIdentity"], "n3", "{:#}", got.body);

    // Ignore: dropped without a word.
    let a = send(
        c,
        "POST",
        &format!("{}?fieldValidation=Ignore", leases(&ns)),
        JSON,
        with_extra("ignore"),
    )
    .await;
    assert_eq!(a.code, 201, "{:#}", a.body);
    assert!(a.warnings.is_empty(), "{:?}", a.warnings);
    assert!(a.body["spec"].get("foo").is_none(), "{:#}", a.body);

    // Strict: refused, every unknown field named; nothing stored.
    let a = send(
        c,
        "POST",
        &format!("{}?fieldValidation=Strict", leases(&ns)),
        JSON,
        with_extra("strict"),
    )
    .await;
    a.expect(400, "BadRequest");
    // (In the order of the body's keys, which serde_json sorts.)
    assert!(
        a.message()
            .ends_with("strict decoding error: unknown field \"bar\", unknown field \"spec.foo\""),
        "{}",
        a.message()
    );
    let gone = send(
        c,
        "GET",
        &format!("{}/strict", leases(&ns)),
        JSON,
        Value::Null,
    )
    .await;
    assert_eq!(gone.code, 404);
    let a = send(
        c,
        "PATCH",
        &format!("{url}?fieldValidation=Strict"),
        STRATEGIC,
        json!({"spec": {"baz": "x"}}),
    )
    .await;
    a.expect(422, "Invalid");
    assert!(
        a.message().contains("unknown field \"spec.baz\""),
        "{}",
        a.message()
    );
    if !h.is_e2e() {
        assert_eq!(a.causes()[0].0, "spec.baz", "{:#}", a.body);
    }

    // A directive the server does not know.
    let a = send(
        c,
        "PATCH",
        &format!("{url}?fieldValidation=Bogus"),
        MERGE,
        json!({"spec": {"holderIdentity": "n4"}}),
    )
    .await;
    a.expect(422, "Invalid");
    assert_eq!(a.causes()[0].0, "fieldValidation", "{:#}", a.body);
}

/// kube-apiserver v1.26 answers an apply with an unknown field or a value of the wrong type with
/// a 500 (`failed to create typed patch object`); the embedded server refuses it as a bad request,
/// with the same words, and applies the directive like every other write.
#[tokio::test(flavor = "multi_thread")]
async fn server_side_apply_decodes_its_configuration() {
    let Some(h) = Harness::embedded_only(
        "kube-apiserver v1.26 answers these applies with 500",
        sluice_apiserver::Options::default(),
    )
    .await
    else {
        return;
    };
    let ns = h.namespace().await;
    let c = &h.client;
    const APPLY: &str = "application/apply-patch+yaml";
    let url = format!("{}/applied", leases(&ns));
    let a = send(
        c,
        "PATCH",
        &format!("{url}?fieldManager=t&fieldValidation=Strict"),
        APPLY,
        lease("applied", json!({"holderIdentity": "n1", "foo": 1})),
    )
    .await;
    a.expect(400, "BadRequest");
    assert!(
        a.message()
            .contains(".spec.foo: field not declared in schema"),
        "{}",
        a.message()
    );
    let a = send(
        c,
        "PATCH",
        &format!("{url}?fieldManager=t"),
        APPLY,
        lease("applied", json!({"leaseDurationSeconds": "forty"})),
    )
    .await;
    a.expect(400, "BadRequest");
    assert_eq!(a.causes()[0].0, "spec.leaseDurationSeconds", "{:#}", a.body);
    let a = send(
        c,
        "PATCH",
        &format!("{url}?fieldManager=t"),
        APPLY,
        lease("applied", json!({"holderIdentity": "n1", "foo": 1})),
    )
    .await;
    assert_eq!(a.code, 201, "{:#}", a.body);
    assert!(a.body["spec"].get("foo").is_none(), "{:#}", a.body);
    assert_eq!(a.warnings, vec!["299 - \"unknown field \\\"spec.foo\\\"\""]);
}
