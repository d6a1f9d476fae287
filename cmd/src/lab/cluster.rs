//! The lab's objects in the API: its Nodes (as a kubelet registers them), the `sluice-config`
//! ConfigMap, and its own Pods with the status a kubelet writes.

use super::plan::{LabPlan, NodePlan, PodPlan};
use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use std::net::Ipv4Addr;

const MANAGER: &str = "sluice-lab";

pub async fn client(kubeconfig: &std::path::Path) -> Result<Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {kubeconfig:?}"))?;
    let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .context("loading the lab's kubeconfig")?;
    Client::try_from(config).context("building an API client")
}

fn apply() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

/// Namespaces, the ConfigMap and the Nodes; idempotent (server-side apply). `real_api`: the API
/// server is a real one, which also needs each namespace's default ServiceAccount.
/// `nodes`: register the Nodes and write sluice-config too (not when real kubelets register the
/// Nodes: sluice is then installed from the manifest, which makes sluice-system and the config).
pub async fn register(client: &Client, plan: &LabPlan, real_api: bool, nodes: bool) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    // sluice-system holds the subnet leases (the manifest makes it on a real cluster).
    let lease_ns = nodes.then_some(sluice_net::lease::LEASE_NAMESPACE);
    for ns in ["kube-system", plan.pod_namespace()]
        .into_iter()
        .chain(lease_ns)
    {
        namespaces
            .patch(
                ns,
                &apply(),
                &Patch::Apply(
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                ),
            )
            .await
            .with_context(|| format!("creating namespace {ns}"))?;
        if !real_api {
            continue;
        }
        // What a controller-manager would make: a real API server refuses pods in a namespace
        // without its default ServiceAccount ("error looking up service account").
        // An API server that serves no ServiceAccounts (sluice's embedded one) needs none.
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let made = accounts
            .patch(
                "default",
                &apply(),
                &Patch::Apply(json!({
                    "apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": ns}
                })),
            )
            .await;
        match made {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(e).with_context(|| format!("creating {ns}/default's ServiceAccount"))
            }
        }
    }
    if !nodes {
        // Real kubelets: sluice is installed from the manifest, which carries sluice-config.
        return Ok(());
    }
    let config: Api<ConfigMap> = Api::namespaced(client.clone(), "kube-system");
    config
        .patch(
            "sluice-config",
            &apply(),
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "sluice-config", "namespace": "kube-system"},
                "data": {
                    "cluster-cidr": plan.cluster_cidr_value(),
                    "subnet-length": super::plan::SUBNET_LENGTH.to_string(),
                    "subnet-length-v6": super::plan::SUBNET_LENGTH_V6.to_string(),
                    "subnet-source": plan.spec.subnet_source.as_str(),
                    "encryption": plan.spec.encryption.as_str(),
                    "overlay": plan.spec.overlay.as_str(),
                }
            })),
        )
        .await
        .context("writing kube-system/sluice-config")?;
    let nodes: Api<Node> = Api::all(client.clone());
    let machine = super::machine::MachineInfo::read();
    for node in &plan.nodes {
        nodes
            .patch(
                &node.name,
                &apply(),
                &Patch::Apply(node_object(node, plan.pod_cidrs(node))),
            )
            .await
            .with_context(|| format!("registering node {}", node.name))?;
        nodes
            .patch_status(
                &node.name,
                &apply(),
                &Patch::Apply(node_status(node, plan.spec.underlay, &machine)),
            )
            .await
            .with_context(|| format!("writing the status of node {}", node.name))?;
    }
    Ok(())
}

fn node_object(node: &NodePlan, pod_cidrs: Vec<String>) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux",
                "sluice.dev/lab-segment": node.segment.to_string(),
            }
        },
        "spec": {
            "podCIDR": pod_cidrs.first(),
            "podCIDRs": pod_cidrs,
        }
    })
}

fn node_status(
    node: &NodePlan,
    underlay: super::plan::UnderlayFamily,
    machine: &super::machine::MachineInfo,
) -> serde_json::Value {
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    let mut status = machine.node_status(sluice_apiserver::KUBERNETES_VERSION);
    let mut addresses: Vec<serde_json::Value> = node
        .internal_ips(underlay)
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": node.name}));
    status["addresses"] = serde_json::Value::Array(addresses);
    status["conditions"] = json!([
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        // Ready once the node's agent has installed the CNI config (the lab's kubelet says so).
        super::kubelet::ready_condition(false),
    ]);
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": node.name},
        "status": status,
    })
}

/// Whether every node of the lab reports Ready.
pub async fn nodes_ready(client: &Client, plan: &LabPlan) -> Result<bool> {
    let nodes: Api<Node> = Api::all(client.clone());
    for node in &plan.nodes {
        let ready = nodes
            .get_opt(&node.name)
            .await
            .with_context(|| format!("reading node {}", node.name))?
            .and_then(|n| n.status?.conditions)
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        if !ready {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates the Pod object bound to its node; returns its uid.
pub async fn create_pod(client: &Client, pod: &PodPlan) -> Result<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    let object = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace, "labels": {"app": "sluice-lab"}},
        "spec": {
            "nodeName": pod.node,
            "containers": [{
                "name": "main", "image": "sluice-lab",
                "ports": [
                    {"name": "http", "containerPort": 80, "protocol": "TCP"},
                    {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                ],
            }],
        }
    });
    let made = pods
        .patch(&pod.name, &apply(), &Patch::Apply(object))
        .await
        .with_context(|| format!("creating pod {}/{}", pod.namespace, pod.name))?;
    made.metadata
        .uid
        .context("the API server gave the pod no uid")
}

/// Writes what a kubelet writes once the pod runs.
pub async fn pod_running(
    client: &Client,
    pod: &PodPlan,
    host_ip: Ipv4Addr,
    pod_ip: Option<Ipv4Addr>,
    pod_ip6: Option<std::net::Ipv6Addr>,
) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace);
    // Both families on a dual-stack node, IPv4 first (`podIP` is `podIPs[0]`); an IPv6-only
    // node's pod has only its IPv6 one.
    let pod_ips: Vec<serde_json::Value> = pod_ip
        .map(std::net::IpAddr::from)
        .into_iter()
        .chain(pod_ip6.map(std::net::IpAddr::from))
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    let Some(first) = pod_ips.first().map(|p| p["ip"].clone()) else {
        anyhow::bail!("pod {}/{} has no address", pod.namespace, pod.name);
    };
    let status = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "namespace": pod.namespace},
        "status": {
            "phase": "Running",
            // `hostIP` alone, as kubelets before 1.28 write it: a v1.26 API server refuses a
            // patch with `hostIPs` (not in its schema); the embedded one mirrors it.
            "hostIP": host_ip.to_string(),
            "podIP": first,
            "podIPs": pod_ips,
            "conditions": [
                {"type": "Initialized", "status": "True"},
                {"type": "ContainersReady", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
            "containerStatuses": [{
                "name": "main", "image": "sluice-lab", "imageID": "", "ready": true,
                "started": true, "restartCount": 0,
                "state": {"running": {}},
            }],
        }
    });
    pods.patch_status(&pod.name, &apply(), &Patch::Apply(status))
        .await
        .with_context(|| format!("writing the status of pod {}/{}", pod.namespace, pod.name))?;
    Ok(())
}

/// Pods of the lab with an address: (namespace, name, node, ip).
pub async fn running_pods(
    client: &Client,
    plan: &LabPlan,
) -> Result<Vec<(String, String, String, std::net::IpAddr)>> {
    let pods: Api<Pod> = Api::all(client.clone());
    let mut out = Vec::new();
    for p in pods
        .list(&Default::default())
        .await
        .context("listing pods")?
    {
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        let ip = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok());
        if let (Some(node), Some(ip)) = (node, ip) {
            if plan.node(&node).is_some() {
                out.push((
                    p.metadata.namespace.unwrap_or_default(),
                    p.metadata.name.unwrap_or_default(),
                    node,
                    ip,
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes what the lab wrote to an API server that outlives it (a real one).
pub async fn unregister(client: &Client, plan: &LabPlan) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), plan.pod_namespace());
    let nodes: Api<Node> = Api::all(client.clone());
    for pod in &plan.pods {
        let _ = pods
            .delete(
                &pod.name,
                &kube::api::DeleteParams::default().grace_period(0),
            )
            .await;
    }
    for node in &plan.nodes {
        let _ = nodes.delete(&node.name, &Default::default()).await;
    }
    Ok(())
}
