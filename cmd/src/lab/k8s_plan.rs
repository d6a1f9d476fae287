//! What the real-Kubernetes lab (`lab up --kubernetes DIR`) runs, decided without touching the
//! machine: which binaries DIR must hold and whether their versions fit, and the flags of etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler on the host's loopback. The
//! applier (`k8s.rs`) only starts what these functions say.

use std::path::Path;

/// The binaries of a Kubernetes release the lab runs, as the release names them.
pub const BINARIES: [&str; 5] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
];

/// The oldest minor version the lab's flags and config files are written for.
pub const MIN_MINOR: u32 = 26;

/// The Service range of the real cluster; the API server's own Service takes its first address.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const API_SERVICE_IP: &str = "10.96.0.1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BinError {
    #[error("{dir} lacks {missing} (it must hold the server binaries of a Kubernetes release: {all})", missing = .missing.join(", "), all = BINARIES.join(", "))]
    Missing { dir: String, missing: Vec<String> },
    #[error(
        "{binary} --version said {said:?}: expected \"Kubernetes v1.N.P\" with N >= {MIN_MINOR}"
    )]
    Version { binary: String, said: String },
    #[error("the binaries are of different versions ({found}): use one release")]
    Mixed { found: String },
}

/// `(major, minor, patch)` of `Kubernetes v1.26.1` (what every component prints for `--version`).
pub fn parse_version(output: &str) -> Option<(u32, u32, u32)> {
    let v = output.trim().strip_prefix("Kubernetes v")?;
    // A build may add `-rc.0`, `+dirty`, ...: only the numbers count.
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
    let version = (parts.next()??, parts.next()??, parts.next()??);
    parts.next().is_none().then_some(version)
}

/// Checks what each binary said for `--version` (`None`: not there or not executable). Returns
/// the common version, e.g. `v1.26.1`.
pub fn check_versions(dir: &Path, said: &[(&str, Option<String>)]) -> Result<String, BinError> {
    let missing: Vec<String> = BINARIES
        .iter()
        .filter(|b| !said.iter().any(|(n, out)| n == *b && out.is_some()))
        .map(|b| (*b).to_string())
        .collect();
    if !missing.is_empty() {
        return Err(BinError::Missing {
            dir: dir.display().to_string(),
            missing,
        });
    }
    let mut versions = Vec::new();
    for (binary, out) in said {
        let out = out.as_deref().unwrap_or_default();
        match parse_version(out) {
            Some(v @ (1, minor, _)) if minor >= MIN_MINOR => versions.push((*binary, v)),
            _ => {
                return Err(BinError::Version {
                    binary: (*binary).to_string(),
                    said: out.trim().to_string(),
                })
            }
        }
    }
    let first = versions[0].1;
    if versions.iter().any(|(_, v)| *v != first) {
        let found = versions
            .iter()
            .map(|(b, (a, m, p))| format!("{b} v{a}.{m}.{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(BinError::Mixed { found });
    }
    Ok(format!("v{}.{}.{}", first.0, first.1, first.2))
}

/// The loopback ports of the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub apiserver: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
}

/// The files of the control plane, all under one directory of the lab's.
pub struct Layout<'a> {
    pub dir: &'a Path,
}

impl Layout<'_> {
    pub fn pki(&self, file: &str) -> String {
        self.dir.join("pki").join(file).display().to_string()
    }
    pub fn kubeconfig(&self, who: &str) -> String {
        self.dir
            .join("kubeconfig")
            .join(format!("{who}.kubeconfig"))
            .display()
            .to_string()
    }
    pub fn etcd_data(&self) -> String {
        self.dir.join("etcd").display().to_string()
    }
}

fn flag(name: &str, value: impl std::fmt::Display) -> String {
    format!("--{name}={value}")
}

pub fn etcd_args(layout: &Layout, ports: &Ports) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", ports.etcd_client);
    let peer = format!("http://127.0.0.1:{}", ports.etcd_peer);
    vec![
        flag("name", "sluice-lab"),
        flag("data-dir", layout.etcd_data()),
        flag("listen-client-urls", &client),
        flag("advertise-client-urls", &client),
        flag("listen-peer-urls", &peer),
        flag("initial-advertise-peer-urls", &peer),
        flag("initial-cluster", format!("sluice-lab={peer}")),
        flag("initial-cluster-state", "new"),
    ]
}

pub fn apiserver_args(layout: &Layout, ports: &Ports) -> Vec<String> {
    vec![
        flag(
            "etcd-servers",
            format!("http://127.0.0.1:{}", ports.etcd_client),
        ),
        flag("bind-address", "127.0.0.1"),
        flag("advertise-address", "127.0.0.1"),
        flag("secure-port", ports.apiserver),
        flag("tls-cert-file", layout.pki("apiserver.crt")),
        flag("tls-private-key-file", layout.pki("apiserver.key")),
        flag("client-ca-file", layout.pki("ca.crt")),
        flag("authorization-mode", "Node,RBAC"),
        flag("enable-admission-plugins", "NodeRestriction"),
        flag("allow-privileged", "true"),
        flag("service-account-key-file", layout.pki("sa.pub")),
        flag("service-account-signing-key-file", layout.pki("sa.key")),
        flag(
            "service-account-issuer",
            "https://kubernetes.default.svc.cluster.local",
        ),
        flag("service-cluster-ip-range", SERVICE_CIDR),
        // A loopback advertise address is refused in Endpoints.
        flag("endpoint-reconciler-type", "none"),
        flag(
            "kubelet-client-certificate",
            layout.pki("apiserver-kubelet-client.crt"),
        ),
        flag(
            "kubelet-client-key",
            layout.pki("apiserver-kubelet-client.key"),
        ),
        flag("kubelet-preferred-address-types", "InternalIP,Hostname"),
        flag("profiling", "false"),
    ]
}

pub fn controller_manager_args(layout: &Layout, ports: &Ports, cluster_cidr: &str) -> Vec<String> {
    let kc = layout.kubeconfig("kube-controller-manager");
    vec![
        flag("kubeconfig", &kc),
        flag("authentication-kubeconfig", &kc),
        flag("authorization-kubeconfig", &kc),
        flag("bind-address", "127.0.0.1"),
        flag("secure-port", ports.controller_manager),
        flag("allocate-node-cidrs", "true"),
        flag("cluster-cidr", cluster_cidr),
        flag("node-cidr-mask-size", super::plan::SUBNET_LENGTH),
        flag("service-cluster-ip-range", SERVICE_CIDR),
        flag("use-service-account-credentials", "true"),
        flag("service-account-private-key-file", layout.pki("sa.key")),
        flag("root-ca-file", layout.pki("ca.crt")),
        flag("leader-elect", "false"),
        flag("profiling", "false"),
    ]
}

pub fn scheduler_args(layout: &Layout, ports: &Ports) -> Vec<String> {
    let kc = layout.kubeconfig("kube-scheduler");
    vec![
        flag("kubeconfig", &kc),
        flag("authentication-kubeconfig", &kc),
        flag("authorization-kubeconfig", &kc),
        flag("bind-address", "127.0.0.1"),
        flag("secure-port", ports.scheduler),
        flag("leader-elect", "false"),
        flag("profiling", "false"),
    ]
}

/// kube-proxy's config file for `node` (address `node_ip`): iptables mode in the node's own
/// namespace, and no conntrack sizing (`nf_conntrack_max` is global to the machine).
pub fn kube_proxy_config(
    kubeconfig: &str,
    node: &str,
    node_ip: std::net::Ipv4Addr,
    cluster_cidr: &str,
) -> String {
    format!(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig:?}}}
hostnameOverride: {node:?}
bindAddress: {node_ip}
mode: iptables
clusterCIDR: {cluster_cidr}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"
    )
}

/// Where containerd of `node` in lab `lab` listens: its kubelet's runtime endpoint, and where
/// `sluice lab load` imports images (`/run/sluice/lab/LAB/k8s/nodes/NODE/containerd/containerd.sock`).
/// One place for the path, so the node's containerd and `lab load` agree on it.
pub fn containerd_socket(lab: &str, node: &str) -> std::path::PathBuf {
    super::plan::state_dir(lab)
        .join("k8s")
        .join("nodes")
        .join(node)
        .join("containerd")
        .join("containerd.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_containerd_socket_is_under_the_lab_k8s_directory() {
        assert_eq!(
            containerd_socket("lab", "lab-node-2"),
            Path::new("/run/sluice/lab/lab/k8s/nodes/lab-node-2/containerd/containerd.sock")
        );
    }

    fn all(v: &str) -> Vec<(&'static str, Option<String>)> {
        BINARIES.iter().map(|b| (*b, Some(v.to_string()))).collect()
    }

    #[test]
    fn versions_are_read_as_components_print_them() {
        assert_eq!(parse_version("Kubernetes v1.26.1\n"), Some((1, 26, 1)));
        assert_eq!(parse_version("Kubernetes v1.27.0-rc.1"), Some((1, 27, 0)));
        assert_eq!(parse_version("Kubernetes v1.26.1+dirty"), Some((1, 26, 1)));
        assert_eq!(parse_version("v1.26.1"), None);
        assert_eq!(parse_version("Kubernetes v1.26"), None);
        assert_eq!(parse_version("Kubernetes v1.26.1.4"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn one_release_is_accepted_and_every_missing_binary_is_named() {
        let dir = Path::new("/k");
        assert_eq!(
            check_versions(dir, &all("Kubernetes v1.26.1")),
            Ok("v1.26.1".into())
        );
        let mut said = all("Kubernetes v1.26.1");
        said[3].1 = None;
        said.retain(|(b, _)| *b != "kube-proxy");
        let err = check_versions(dir, &said).unwrap_err();
        assert_eq!(
            err,
            BinError::Missing {
                dir: "/k".into(),
                missing: vec!["kubelet".into(), "kube-proxy".into()]
            }
        );
        assert!(err.to_string().contains("/k lacks kubelet, kube-proxy"));
    }

    #[test]
    fn old_odd_or_mixed_versions_are_refused() {
        let dir = Path::new("/k");
        assert!(matches!(
            check_versions(dir, &all("Kubernetes v1.25.9")),
            Err(BinError::Version { .. })
        ));
        assert!(matches!(
            check_versions(dir, &all("hello")),
            Err(BinError::Version { .. })
        ));
        let mut said = all("Kubernetes v1.26.1");
        said[1].1 = Some("Kubernetes v1.27.0".into());
        let err = check_versions(dir, &said).unwrap_err();
        assert!(err.to_string().contains("kube-controller-manager v1.27.0"));
    }

    #[test]
    fn kube_proxy_never_sizes_the_machine_conntrack_table() {
        let c = kube_proxy_config("/k/p.kubeconfig", "n1", [10, 0, 0, 2].into(), "10.8.0.0/16");
        for want in [
            "hostnameOverride: \"n1\"",
            "mode: iptables",
            "clusterCIDR: 10.8.0.0/16",
            "maxPerCore: 0, min: 0",
            "bindAddress: 10.0.0.2",
        ] {
            assert!(c.contains(want), "{want} not in {c}");
        }
    }

    #[test]
    fn the_control_plane_listens_on_loopback_only_with_tls_and_rbac() {
        let ports = Ports {
            etcd_client: 1,
            etcd_peer: 2,
            apiserver: 3,
            controller_manager: 4,
            scheduler: 5,
        };
        let layout = Layout {
            dir: Path::new("/s"),
        };
        let api = apiserver_args(&layout, &ports);
        for want in [
            "--bind-address=127.0.0.1",
            "--secure-port=3",
            "--authorization-mode=Node,RBAC",
            "--etcd-servers=http://127.0.0.1:1",
            "--client-ca-file=/s/pki/ca.crt",
            "--service-cluster-ip-range=10.96.0.0/12",
        ] {
            assert!(api.iter().any(|a| a == want), "{want} not in {api:?}");
        }
        let etcd = etcd_args(&layout, &ports);
        assert!(etcd
            .iter()
            .filter(|a| a.contains("://"))
            .all(|a| a.contains("://127.0.0.1:")));
        let cm = controller_manager_args(&layout, &ports, "10.244.0.0/16");
        assert!(cm.iter().any(|a| a == "--allocate-node-cidrs=true"));
        assert!(cm.iter().any(|a| a == "--cluster-cidr=10.244.0.0/16"));
        for args in [&cm, &scheduler_args(&layout, &ports)] {
            assert!(args.iter().any(|a| a == "--bind-address=127.0.0.1"));
            assert!(args.iter().all(|a| !a.contains("0.0.0.0")));
        }
    }
}
