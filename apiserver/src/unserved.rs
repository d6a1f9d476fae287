//! What the embedded server does not serve, said as such instead of kube-apiserver's bare "the
//! server could not find the requested resource": a kind it does not have (`kubectl create
//! deployment`), or a pod subresource that needs a container runtime (`kubectl exec`, `attach`,
//! `port-forward`). Each answer names what it serves and where to go instead.

use crate::resources::{self, Resource};
use crate::status::ApiError;

/// How to get a cluster that serves everything.
const REAL_LAB: &str =
    "`sluice lab up --kubernetes DIR` runs the lab on a real Kubernetes control plane instead";

/// The kinds served, as kube-apiserver names resources in messages.
fn served() -> String {
    let names: Vec<String> = resources::ALL.iter().map(Resource::qualified).collect();
    names.join(", ")
}

/// The resource a path under `/api` or `/apis` names: (`deployments.apps`, its name if any).
fn named_resource(path: &str) -> Option<String> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let resource = match rest {
        ["namespaces", _ns, resource, ..] => resource,
        [resource, ..] => resource,
        [] => return None,
    };
    Some(if group.is_empty() {
        (*resource).to_string()
    } else {
        format!("{resource}.{group}")
    })
}

/// A path this server has no route for.
pub(crate) fn path(path: &str) -> ApiError {
    match named_resource(path) {
        Some(what) => {
            let mut e = ApiError::no_route();
            e.message = format!(
                "the server could not find the requested resource: {what} is not served by sluice's embedded lab API server, which serves {}; {REAL_LAB}",
                served()
            );
            e
        }
        None => ApiError::no_route(),
    }
}

/// A subresource this server does not serve (`pods/exec`, `pods/attach`, `pods/portforward`,
/// `nodes/proxy`, ...).
pub(crate) fn subresource(res: &Resource, sub: &str, namespace: &str, name: &str) -> ApiError {
    if res.name == "namespaces" {
        // `/api/v1/namespaces/NS/resourcequotas`: a namespaced collection of a core kind not
        // served (kubectl describe asks for some, and takes a 404 as "none").
        return path(&format!("/api/v1/namespaces/{name}/{sub}"));
    }
    let pod = format!("{namespace}/{name}");
    let hint = match (res.name, sub) {
        ("pods", "exec" | "attach") => format!(
            "lab pods are network namespaces with a small server, not containers: `sluice lab exec [--name LAB] {pod} -- COMMAND...` runs a command in the pod's network namespace"
        ),
        ("pods", "portforward") => format!(
            "lab pods are network namespaces with a small server, not containers: `sluice lab probe [--name LAB] FROM {pod} PORT` connects to it from another pod, `sluice lab exec [--name LAB] {pod} -- COMMAND...` runs a command in its network namespace"
        ),
        _ => {
            let mut served = vec!["status"];
            if res.name == "pods" {
                served.extend(["log", "binding"]);
            }
            format!("it serves {}", served.iter().map(|s| format!("{}/{s}", res.name)).collect::<Vec<_>>().join(", "))
        }
    };
    let mut e = ApiError::method_not_allowed();
    e.message = format!(
        "{}/{sub} is not served by sluice's embedded lab API server: {hint}; {REAL_LAB}",
        res.name
    );
    e.name = Some(name.to_string());
    e.kind = Some(format!("{}/{sub}", res.name));
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_was_asked_and_what_is_served() {
        let e = path("/apis/apps/v1/namespaces/default/deployments");
        assert_eq!(e.code, 404);
        assert!(
            e.message.contains("deployments.apps is not served"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("leases.coordination.k8s.io"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("sluice lab up --kubernetes"),
            "{}",
            e.message
        );
        assert!(path("/api/v1/services")
            .message
            .contains("services is not served"));
        assert_eq!(path("/metrics").message, ApiError::no_route().message);
        let e = subresource(&resources::NAMESPACES, "resourcequotas", "", "default");
        assert_eq!(e.code, 404);
        assert!(
            e.message.contains("resourcequotas is not served"),
            "{}",
            e.message
        );
        let e = subresource(&resources::PODS, "exec", "x", "a");
        assert_eq!((e.code, e.reason), (405, "MethodNotAllowed"));
        assert!(
            e.message.contains("sluice lab exec [--name LAB] x/a -- "),
            "{}",
            e.message
        );
    }
}
