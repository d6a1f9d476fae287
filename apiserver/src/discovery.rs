//! Discovery documents, `/version`, and the OpenAPI documents kubectl reads.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::{json, Value};

use crate::http::{error_response, json_response};
use crate::resources::{self, Resource, GROUPS};
use crate::status::ApiError;

pub(crate) const GIT_VERSION: &str = "v1.33.0-sluice";

pub(crate) async fn version() -> Response {
    json_response(
        200,
        &json!({
            "major": "1", "minor": "33", "emulationMajor": "1", "emulationMinor": "33",
            "minCompatibilityMajor": "1", "minCompatibilityMinor": "32",
            "gitVersion": GIT_VERSION, "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z",
            "goVersion": "go1.24.2", "compiler": "gc", "platform": "linux/amd64"
        }),
    )
}

/// The content type of aggregated discovery (`apidiscovery.k8s.io/v2`).
const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

fn wants_aggregated(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| {
            a.split(',').any(|m| {
                let m = m.replace(' ', "");
                m.contains("g=apidiscovery.k8s.io")
                    && m.contains("v=v2;")
                    && m.contains("as=APIGroupDiscoveryList")
            })
        })
}

fn aggregated_group(group: &str) -> Value {
    let version = resources::group_version(group);
    let resources: Vec<Value> = resources::in_group_version(group, version)
        .iter()
        .map(|r| {
            let kind = |k: &str| json!({"group": r.group, "version": r.version, "kind": k});
            let mut subs = Vec::new();
            if r.status_subresource {
                subs.push(json!({"subresource": "status", "responseKind": kind(r.kind),
                    "verbs": ["get", "patch", "update"]}));
            }
            if r.name == "pods" {
                subs.push(json!({"subresource": "binding",
                    "responseKind": {"group": "", "version": "v1", "kind": "Binding"}, "verbs": ["create"]}));
                subs.push(json!({"subresource": "log", "responseKind": kind("Pod"), "verbs": ["get"]}));
            }
            let mut d = json!({
                "resource": r.name, "responseKind": kind(r.kind),
                "scope": if r.namespaced { "Namespaced" } else { "Cluster" },
                "singularResource": r.singular, "verbs": verbs(r),
            });
            if !r.short_names.is_empty() {
                d["shortNames"] = json!(r.short_names);
            }
            if r.name == "pods" {
                d["categories"] = json!(["all"]);
            }
            if !subs.is_empty() {
                d["subresources"] = Value::Array(subs);
            }
            d
        })
        .collect();
    let mut metadata = json!({"creationTimestamp": null});
    if !group.is_empty() {
        metadata["name"] = json!(group);
    }
    json!({"metadata": metadata,
        "versions": [{"version": version, "resources": resources, "freshness": "Current"}]})
}

fn aggregated(groups: &[&str]) -> Response {
    let items: Vec<Value> = groups.iter().map(|g| aggregated_group(g)).collect();
    let doc = json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {}, "items": items});
    let mut r = json_response(200, &doc);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(AGGREGATED));
    r
}

pub(crate) async fn api_versions(headers: HeaderMap) -> Response {
    if wants_aggregated(&headers) {
        return aggregated(&[""]);
    }
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    json_response(
        200,
        &json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}),
    )
}

fn group_doc(g: &str) -> Value {
    let v = resources::group_version(g);
    let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
    json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
}

pub(crate) async fn api_groups(headers: HeaderMap) -> Response {
    if wants_aggregated(&headers) {
        return aggregated(&GROUPS);
    }
    let groups: Vec<Value> = GROUPS.iter().map(|g| group_doc(g)).collect();
    json_response(
        200,
        &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
    )
}

pub(crate) async fn group(Path(g): Path<String>) -> Response {
    if !GROUPS.contains(&g.as_str()) {
        return error_response(&ApiError::no_route());
    }
    let mut doc = group_doc(&g);
    doc["kind"] = json!("APIGroup");
    doc["apiVersion"] = json!("v1");
    json_response(200, &doc)
}

fn verbs(r: &Resource) -> Vec<&'static str> {
    if r.name == "namespaces" {
        vec![
            "create", "delete", "get", "list", "patch", "update", "watch",
        ]
    } else {
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }
}

fn resource_list(group: &str, version: &str) -> Value {
    let mut out = Vec::new();
    for r in resources::in_group_version(group, version) {
        let mut main = json!({
            "name": r.name, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": verbs(&r),
        });
        if !r.short_names.is_empty() {
            main["shortNames"] = json!(r.short_names);
        }
        if r.name == "pods" {
            main["categories"] = json!(["all"]);
        }
        out.push(main);
        if r.status_subresource {
            out.push(
                json!({"name": format!("{}/status", r.name), "singularName": "",
                "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if r.name == "pods" {
            out.push(
                json!({"name": "pods/binding", "singularName": "", "namespaced": true,
                "kind": "Binding", "verbs": ["create"]}),
            );
            out.push(
                json!({"name": "pods/log", "singularName": "", "namespaced": true,
                "kind": "Pod", "verbs": ["get"]}),
            );
        }
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": out})
}

pub(crate) async fn core_resources() -> Response {
    json_response(200, &resource_list("", "v1"))
}

pub(crate) async fn group_resources(Path((g, v)): Path<(String, String)>) -> Response {
    if !GROUPS.contains(&g.as_str()) || v != resources::group_version(&g) {
        return error_response(&ApiError::no_route());
    }
    json_response(200, &resource_list(&g, &v))
}

/// The v2 document is served as 404: kubectl asks for it only as protobuf, and without it
/// falls back to its built-in types for strategic merge patches.
pub(crate) async fn openapi_v2() -> Response {
    error_response(&ApiError::no_route())
}

/// `api/v1`, `apis/<group>/v1`: the OpenAPI v3 group-versions served.
fn v3_group_versions() -> Vec<(String, &'static str)> {
    let mut out = vec![("api/v1".to_string(), "")];
    out.extend(
        GROUPS
            .iter()
            .map(|g| (format!("apis/{g}/{}", resources::group_version(g)), *g)),
    );
    out
}

pub(crate) async fn openapi_v3_index() -> Response {
    let mut paths = serde_json::Map::new();
    for (gv, _) in v3_group_versions() {
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={}", GIT_VERSION.replace('.', ""))}),
        );
    }
    json_response(200, &json!({"paths": paths}))
}

/// A minimal OpenAPI v3 document per group-version: the PATCH operations with their
/// group-version-kind and the `fieldValidation` parameter, so that kubectl validates on the
/// server (`fieldValidation=Strict`) instead of downloading schemas.
pub(crate) async fn openapi_v3_doc(Path(p): Path<String>) -> Response {
    let Some((_, group)) = v3_group_versions().into_iter().find(|(gv, _)| *gv == p) else {
        return error_response(&ApiError::no_route());
    };
    let version = if group.is_empty() {
        "v1"
    } else {
        resources::group_version(group)
    };
    let prefix = if group.is_empty() {
        "/api/v1".to_string()
    } else {
        format!("/apis/{group}/{version}")
    };
    let mut paths = serde_json::Map::new();
    for r in resources::in_group_version(group, version) {
        let path = if r.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", r.name)
        } else {
            format!("{prefix}/{}/{{name}}", r.name)
        };
        let params = json!([
            {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
            {"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}
        ]);
        paths.insert(
            path,
            json!({"patch": {
                "tags": [format!("core_{}", r.version)],
                "description": format!("partially update the specified {}", r.kind),
                "operationId": format!("patch{}", r.kind),
                "parameters": params,
                "responses": {"200": {"description": "OK"}},
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind}
            }}),
        );
    }
    json_response(
        200,
        &json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": GIT_VERSION},
            "paths": paths, "components": {"schemas": {}}}),
    )
}
