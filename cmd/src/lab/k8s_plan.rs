//! What the real-Kubernetes lab (`lab up --kubernetes DIR`) runs, decided without touching the
//! machine: which binaries DIR must hold and whether their versions fit, and the flags of etcd,
//! kube-apiserver, kube-controller-manager and kube-scheduler on the host's loopback. The
//! applier (`k8s.rs`) only starts what these functions say.

use std::path::{Path, PathBuf};

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
/// A dual-stack cluster's IPv6 Service range (unique local; the API server takes at most a
/// /108 of 128-bit addresses, 2^20 Services).
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";

/// The address ranges a real cluster is started with: its pods' (kube-controller-manager's
/// `--cluster-cidr`, kube-proxy's `clusterCIDR`, sluice-config's `cluster-cidr`) and its
/// Services', IPv4 first, and an IPv6 range of each on a dual-stack lab (`--ip-family dual`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges {
    pub cluster: ipnet::Ipv4Net,
    pub cluster_v6: Option<ipnet::Ipv6Net>,
}

impl Ranges {
    pub fn of(plan: &super::plan::LabPlan) -> Self {
        Self {
            cluster: plan.cluster_cidr,
            cluster_v6: plan.cluster_cidr_v6,
        }
    }

    pub fn dual(&self) -> bool {
        self.cluster_v6.is_some()
    }

    /// The pods' ranges as the components take them: comma-separated, IPv4 first.
    pub fn cluster_cidr(&self) -> String {
        match self.cluster_v6 {
            Some(v6) => format!("{},{v6}", self.cluster),
            None => self.cluster.to_string(),
        }
    }

    /// The Services' ranges as the API server and the controller-manager take them.
    pub fn service_cidr(&self) -> String {
        if self.dual() {
            format!("{SERVICE_CIDR},{SERVICE_CIDR_V6}")
        } else {
            SERVICE_CIDR.to_string()
        }
    }
}

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

/// The API server's flags. It listens on the host's loopback only and advertises `advertise`
/// (an underlay address the lab forwards to that loopback port), so the `kubernetes` Service
/// has real Endpoints that pods and nodes reach, as on any cluster.
pub fn apiserver_args(
    layout: &Layout,
    ports: &Ports,
    advertise: std::net::Ipv4Addr,
    ranges: &Ranges,
) -> Vec<String> {
    vec![
        flag(
            "etcd-servers",
            format!("http://127.0.0.1:{}", ports.etcd_client),
        ),
        flag("bind-address", "127.0.0.1"),
        flag("advertise-address", advertise),
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
        // Dual-stack: a Service of each family, IPv4 the primary (the `kubernetes` Service's).
        flag("service-cluster-ip-range", ranges.service_cidr()),
        flag(
            "kubelet-client-certificate",
            layout.pki("apiserver-kubelet-client.crt"),
        ),
        flag(
            "kubelet-client-key",
            layout.pki("apiserver-kubelet-client.key"),
        ),
        flag("kubelet-preferred-address-types", "InternalIP,Hostname"),
        // exec, logs and port-forward reach the kubelets through the lab's underlay.
        flag(
            "egress-selector-config-file",
            layout.dir.join("egress.yaml").display(),
        ),
        flag("profiling", "false"),
    ]
}

/// The controller-manager's flags: it hands every Node a podCIDR of each range in `ranges`
/// (`spec.podCIDRs`, IPv4 first), cut at the lab's subnet lengths.
pub fn controller_manager_args(layout: &Layout, ports: &Ports, ranges: &Ranges) -> Vec<String> {
    let kc = layout.kubeconfig("kube-controller-manager");
    let mut args = vec![
        flag("kubeconfig", &kc),
        flag("authentication-kubeconfig", &kc),
        flag("authorization-kubeconfig", &kc),
        flag("bind-address", "127.0.0.1"),
        flag("secure-port", ports.controller_manager),
        flag("allocate-node-cidrs", "true"),
        flag("cluster-cidr", ranges.cluster_cidr()),
    ];
    if ranges.dual() {
        // A dual-stack cluster refuses the single `--node-cidr-mask-size`: one per family.
        args.extend([
            flag("node-cidr-mask-size-ipv4", super::plan::SUBNET_LENGTH),
            flag("node-cidr-mask-size-ipv6", super::plan::SUBNET_LENGTH_V6),
        ]);
    } else {
        args.push(flag("node-cidr-mask-size", super::plan::SUBNET_LENGTH));
    }
    args.extend([
        flag("service-cluster-ip-range", ranges.service_cidr()),
        flag("use-service-account-credentials", "true"),
        flag("service-account-private-key-file", layout.pki("sa.key")),
        flag("root-ca-file", layout.pki("ca.crt")),
        flag("leader-elect", "false"),
        flag("profiling", "false"),
    ]);
    args
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
/// namespace, and no conntrack sizing (`nf_conntrack_max` is global to the machine). With a
/// range of each family (`cluster_cidr` "v4,v6") kube-proxy runs dual-stack: the same rules
/// through iptables and ip6tables, IPv4 its primary family (the family of `node_ip`).
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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("the manifest has no ConfigMap sluice-config with a data key {0:?}")]
    NoKey(String),
}

/// The manifest as a user edits it before `kubectl apply`: the values of `sluice-config`'s data
/// keys in `values` replaced (each line `  KEY: "VALUE"` of the ConfigMap's `data`), every other
/// line kept as it is. A key the ConfigMap does not have is an error (the manifest changed).
pub fn render_manifest(manifest: &str, values: &[(&str, String)]) -> Result<String, ManifestError> {
    let mut out = String::with_capacity(manifest.len());
    let mut found = vec![false; values.len()];
    let (mut config_map, mut in_data) = (false, false);
    for line in manifest.split_inclusive('\n') {
        let text = line.trim_end_matches(['\n', '\r']);
        if text == "---" {
            (config_map, in_data) = (false, false);
        } else if text == "kind: ConfigMap" {
            config_map = true;
        } else if !text.starts_with(' ') && !text.is_empty() {
            in_data = config_map && text == "data:";
        }
        let replaced = in_data.then(|| {
            let (key, _) = text.strip_prefix("  ")?.split_once(": ")?;
            let i = values.iter().position(|(k, _)| *k == key)?;
            found[i] = true;
            Some(format!("  {key}: {:?}\n", values[i].1))
        });
        match replaced.flatten() {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
    }
    if let Some(i) = found.iter().position(|f| !f) {
        return Err(ManifestError::NoKey(values[i].0.to_string()));
    }
    Ok(out)
}

/// Where containerd of `node` in lab `lab` listens (what `ctr --address` and `sluice lab load`
/// take; every shim names it in its `-address` argument).
pub fn containerd_socket(lab: &str, node: &str) -> PathBuf {
    node_dir(lab, node)
        .join("containerd")
        .join("containerd.sock")
}

/// The directory of one node of a real-Kubernetes lab: its containerd, kubelet and the trees
/// behind its own `/run`, `/opt/cni/bin`, `/etc/cni/net.d`, `/var/lib/sluice` and `/var/log`.
pub fn node_dir(lab: &str, node: &str) -> PathBuf {
    super::plan::state_dir(lab)
        .join("k8s")
        .join("nodes")
        .join(node)
}

/// The cgroup (in every v1 hierarchy) under which the kubelet of `node` puts its pods.
pub fn cgroup_root(node: &str) -> String {
    format!("/sluice-lab-{node}")
}

/// The files of one node, under [`node_dir`].
pub struct NodeLayout {
    pub dir: PathBuf,
}

impl NodeLayout {
    pub fn new(lab: &str, node: &str) -> Self {
        Self {
            dir: node_dir(lab, node),
        }
    }
    /// Holds the node-private trees bound over the host's paths in the node's mount namespace.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// The host's path of what the node sees at `path` (one of [`NODE_PRIVATE`]).
    pub fn private(&self, path: &str) -> PathBuf {
        self.root().join(path.trim_start_matches('/'))
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// Written by the node's mount-namespace holder once its mounts are in place.
    pub fn mount_ready(&self) -> PathBuf {
        self.dir.join("mountns.ready")
    }
    pub fn holder_pid(&self) -> PathBuf {
        self.dir.join("mountns.pid")
    }
}

/// The paths every node has its own of: the DaemonSet's hostPaths, the kubelet's pod logs (two
/// kubelets would collect each other's), and `/run` (containerd's shim sockets, sluice's
/// subnet file).
pub const NODE_PRIVATE: [&str; 6] = [
    "/run",
    "/opt/cni/bin",
    "/etc/cni/net.d",
    "/var/lib/sluice",
    "/var/log/pods",
    "/var/log/containers",
];

/// What stays the host's inside a node's private `/run`: the labs' state (kubeconfigs, the
/// control plane's files, every node's containerd socket at the same path as on the host).
pub const HOST_UNDER_RUN: &str = "/run/sluice/lab";

/// Host directories a node must share with the host (its programs, libraries, configuration):
/// never shadowed whole when a deeper one will do.
const SHARED_WITH_HOST: [&str; 3] = ["/etc", "/usr", "/var"];

/// Which host paths the node's private trees are bound over: for each wanted path its
/// shallowest ancestor the host has below `/` and below the directories the node shares with
/// the host (`/opt` for `/opt/cni/bin`, `/var/lib` for `/var/lib/sluice`, `/etc/cni` for
/// `/etc/cni/net.d`), so nothing is made on the host and the mount sits on a directory no
/// other program on the host removes (a bind on `/opt/cni/bin` would be detached from the node
/// by a host program that removes the host's `/opt/cni/bin`, and the node's next writes there
/// would land on the host). Where the host has none of those, the nearest ancestor it has. A
/// target under another is covered by it. Sorted, no duplicates; `None` when only `/` exists
/// for some path.
pub fn private_targets(wanted: &[&str], exists: impl Fn(&Path) -> bool) -> Option<Vec<PathBuf>> {
    let shared = |p: &Path| SHARED_WITH_HOST.iter().any(|s| Path::new(s) == p);
    let mut targets: Vec<PathBuf> = Vec::new();
    for w in wanted {
        let ancestors: Vec<&Path> = Path::new(w)
            .ancestors()
            .take_while(|a| *a != Path::new("/"))
            .collect();
        let shallowest = ancestors
            .iter()
            .rev()
            .find(|a| !shared(a) && exists(a))
            .or_else(|| ancestors.iter().find(|a| exists(a)))?;
        targets.push(shallowest.to_path_buf());
    }
    targets.sort();
    targets.dedup();
    let all = targets.clone();
    targets.retain(|t| !all.iter().any(|o| o != t && t.starts_with(o)));
    Some(targets)
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// The script the holder of a node's mount namespace runs (in the node's network namespace,
/// after `unshare --mount --propagation slave`): a sysfs of the node's own with the host's
/// cgroup tree moved back on top, the node-private trees over `targets` (the labs' state kept
/// visible under the private `/run`), then it says so and holds the namespace.
pub fn mount_script(layout: &NodeLayout, targets: &[PathBuf]) -> String {
    let aside = layout.root().join(".cgroup");
    let mut s = String::from("set -e\n");
    s += &format!(
        "mount --rbind /sys/fs/cgroup {a}\nmount -t sysfs sysfs /sys\nmount --move {a} /sys/fs/cgroup\n",
        a = quote(&aside)
    );
    let host = Path::new(HOST_UNDER_RUN);
    // `/run` last: the node's own trees are reached through the labs' state until then.
    let mut ordered: Vec<&PathBuf> = targets.iter().filter(|t| !host.starts_with(t)).collect();
    ordered.extend(targets.iter().filter(|t| host.starts_with(t)));
    for t in ordered {
        if host.starts_with(t) {
            s += &format!(
                "mount --bind {h} {into}\n",
                h = quote(host),
                into = quote(&layout.root().join(host.strip_prefix("/").unwrap_or(host)))
            );
        }
        let src = layout.root().join(t.strip_prefix("/").unwrap_or(t));
        s += &format!("mount --rbind {} {}\n", quote(&src), quote(t));
    }
    s += &format!(
        ": > {}\nexec sleep infinity\n",
        quote(&layout.mount_ready())
    );
    s
}

/// The directories [`mount_script`] needs under the node's root (made before it runs).
pub fn private_dirs(layout: &NodeLayout, targets: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = NODE_PRIVATE.iter().map(|p| layout.private(p)).collect();
    dirs.extend(
        targets
            .iter()
            .map(|t| layout.private(&t.display().to_string())),
    );
    dirs.push(layout.private(HOST_UNDER_RUN));
    dirs.push(layout.root().join(".cgroup"));
    dirs.sort();
    dirs.dedup();
    dirs
}

/// containerd's config for a node: private root, state, sockets and runc root; CRI with the
/// node's own CNI directories; what this machine kind needs (see `../shared/realk8s`).
pub fn containerd_config(lab: &str, node: &str, sandbox_image: &str) -> String {
    let l = NodeLayout::new(lab, node);
    let d = |p: &str| l.dir.join(p).display().to_string();
    let sock = containerd_socket(lab, node).display().to_string();
    format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (without this every
  # sandbox fails: "can't get final child's PID from pipe: EOF")
  restrict_oom_score_adj = true
  disable_tcp_service = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#,
        root = d("containerd/root"),
        state = d("containerd/state"),
        opt = d("containerd/opt"),
        runc = d("runc"),
    )
}

/// The kubelet's config file for a node at `node_ip`: cgroupfs under its own cgroup root,
/// webhook authentication and authorization against the cluster CA, no read-only port, no
/// host-global kernel settings asked for.
pub fn kubelet_config(node: &str, node_ip: std::net::Ipv4Addr, ca: &str, resolv: &str) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {node_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca:?}}}
authorization: {{mode: Webhook}}
cgroupDriver: cgroupfs
cgroupRoot: {root}
cgroupsPerQOS: true
failSwapOn: false
protectKernelDefaults: false
makeIPTablesUtilChains: true
clusterDomain: cluster.local
resolvConf: {resolv:?}
rotateCertificates: false
serverTLSBootstrap: false
registerNode: true
maxPods: 50
imageGCHighThresholdPercent: 95
imageGCLowThresholdPercent: 90
evictionHard: {{memory.available: 100Mi, nodefs.available: 5%, imagefs.available: 5%}}
",
        root = cgroup_root(node),
    )
}

/// The kubelet's flags for `node`: its Node's addresses are `node_ip` and, on a dual-stack lab,
/// `node_ip_v6` (`--node-ip` of both, IPv4 first: the Node's InternalIPs of each family).
pub fn kubelet_args(
    lab: &str,
    node: &str,
    node_ip: std::net::Ipv4Addr,
    node_ip_v6: Option<std::net::Ipv6Addr>,
    sandbox_image: &str,
) -> Vec<String> {
    let node_ip = match node_ip_v6 {
        Some(v6) => format!("{node_ip},{v6}"),
        None => node_ip.to_string(),
    };
    let l = NodeLayout::new(lab, node);
    let d = |p: &str| l.dir.join(p).display().to_string();
    vec![
        flag("config", d("kubelet.yaml")),
        flag("kubeconfig", d("kubelet.kubeconfig")),
        flag(
            "container-runtime-endpoint",
            format!("unix://{}", containerd_socket(lab, node).display()),
        ),
        flag("root-dir", d("kubelet")),
        flag("cert-dir", d("kubelet/pki")),
        flag("hostname-override", node),
        flag("node-ip", node_ip),
        flag("pod-infra-container-image", sandbox_image),
        "--v=1".into(),
    ]
}

/// The standard CNI plugins the reference network (`lab up --kubernetes DIR --reference-cni`)
/// runs: Debian's containernetworking-plugins, as the kit's reference cluster wires its pods.
pub const REFERENCE_PLUGINS: [&str; 3] = ["bridge", "host-local", "portmap"];

/// The reference network's CNI config file in a node's `/etc/cni/net.d`.
pub const REFERENCE_CONFLIST: &str = "10-reference.conflist";

/// The reference network's config for a node whose `spec.podCIDR` is `pod_cidr`: a bridge
/// `cni0` that is the pods' gateway, host-local addresses from the podCIDR (state in
/// `ipam_dir`), no masquerade, hairpin on, and portmap (the kit's `10-rk8s.conflist`).
pub fn reference_conflist(pod_cidr: &str, ipam_dir: &Path) -> String {
    let doc = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "reference",
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir.display().to_string(),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    format!("{doc:#}\n")
}

/// The routes node `me` needs for the reference network: every other node's podCIDR via that
/// node's address (all nodes on one L2 segment). `nodes`: name, address, podCIDR.
pub fn reference_routes(
    nodes: &[(String, std::net::Ipv4Addr, String)],
    me: &str,
) -> Vec<(String, std::net::Ipv4Addr)> {
    nodes
        .iter()
        .filter(|(name, _, _)| name != me)
        .map(|(_, addr, cidr)| (cidr.clone(), *addr))
        .collect()
}

/// The API server's egress for the cluster (kubelets: exec, logs, port-forward): HTTP CONNECT
/// through the lab daemon's unix socket, which dials from the lab's underlay (the host has no
/// route to node addresses, and several labs use the same ones).
pub fn egress_config(socket: &Path) -> String {
    format!(
        "apiVersion: apiserver.k8s.io/v1beta1
kind: EgressSelectorConfiguration
egressSelections:
- name: cluster
  connection:
    proxyProtocol: HTTPConnect
    transport:
      uds:
        udsName: {:?}
",
        socket.display().to_string()
    )
}

/// The target of an HTTP CONNECT request head (`CONNECT 172.31.0.1:10250 HTTP/1.1 ...`), if it
/// is one of `allowed` (the lab's node addresses: nothing else is dialled).
pub fn connect_target(
    head: &str,
    allowed: &[std::net::Ipv4Addr],
) -> Result<std::net::SocketAddrV4, String> {
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (Some("CONNECT"), Some(target), Some(v)) = (words.next(), words.next(), words.next())
    else {
        return Err(format!("not a CONNECT request: {line:?}"));
    };
    if !v.starts_with("HTTP/1.") {
        return Err(format!("not HTTP/1: {line:?}"));
    }
    let addr: std::net::SocketAddrV4 = target
        .parse()
        .map_err(|_| format!("CONNECT target {target:?} is not an IPv4 address and port"))?;
    if !allowed.contains(addr.ip()) {
        return Err(format!("CONNECT to {addr}: not a node of this lab"));
    }
    Ok(addr)
}

/// The image names a docker-archive's `manifest.json` gives (its `RepoTags`).
pub fn archive_tags(manifest_json: &str) -> Vec<String> {
    let doc: serde_json::Value = serde_json::from_str(manifest_json).unwrap_or_default();
    doc.as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["RepoTags"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_str().map(str::to_string))
        .collect()
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
    fn the_manifest_is_rendered_with_the_labs_config_and_nothing_else_changes() {
        let manifest = "kind: Namespace\nmetadata:\n  name: x\n---\nkind: ConfigMap\nmetadata:\n  name: sluice-config\ndata:\n  # Live: none or wireguard.\n  encryption: \"none\"\n  overlay: \"always\"\n---\nkind: DaemonSet\nspec:\n  encryption: \"none\"\n";
        let out = render_manifest(manifest, &[("encryption", "wireguard".into())]).unwrap();
        assert_eq!(
            out,
            manifest.replacen("  encryption: \"none\"", "  encryption: \"wireguard\"", 1)
        );
        // Only the ConfigMap's data: the DaemonSet's line of the same shape is kept.
        assert!(out.ends_with("spec:\n  encryption: \"none\"\n"));
        assert_eq!(
            render_manifest(manifest, &[("mtu", "1400".into())]),
            Err(ManifestError::NoKey("mtu".into()))
        );
        // The real manifest has every key the lab sets.
        let keys = [
            "cluster-cidr",
            "subnet-length",
            "subnet-length-v6",
            "subnet-source",
            "encryption",
            "overlay",
        ];
        let values: Vec<(&str, String)> = keys.iter().map(|k| (*k, "v".to_string())).collect();
        let real = render_manifest(super::super::image::MANIFEST, &values).unwrap();
        assert_eq!(
            real.lines().count(),
            super::super::image::MANIFEST.lines().count()
        );
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
        let four = Ranges {
            cluster: "10.244.0.0/16".parse().unwrap(),
            cluster_v6: None,
        };
        let api = apiserver_args(&layout, &ports, "172.31.0.254".parse().unwrap(), &four);
        for want in [
            "--bind-address=127.0.0.1",
            "--advertise-address=172.31.0.254",
            "--secure-port=3",
            "--authorization-mode=Node,RBAC",
            "--etcd-servers=http://127.0.0.1:1",
            "--client-ca-file=/s/pki/ca.crt",
            "--service-cluster-ip-range=10.96.0.0/12",
        ] {
            assert!(api.iter().any(|a| a == want), "{want} not in {api:?}");
        }
        // The default (lease) endpoint reconciler: the `kubernetes` Service has Endpoints.
        assert!(api
            .iter()
            .all(|a| !a.starts_with("--endpoint-reconciler-type")));
        let etcd = etcd_args(&layout, &ports);
        assert!(etcd
            .iter()
            .filter(|a| a.contains("://"))
            .all(|a| a.contains("://127.0.0.1:")));
        let cm = controller_manager_args(&layout, &ports, &four);
        assert!(cm.iter().any(|a| a == "--allocate-node-cidrs=true"));
        assert!(cm.iter().any(|a| a == "--cluster-cidr=10.244.0.0/16"));
        assert!(cm.iter().any(|a| a == "--node-cidr-mask-size=24"));
        for args in [&cm, &scheduler_args(&layout, &ports)] {
            assert!(args.iter().any(|a| a == "--bind-address=127.0.0.1"));
            assert!(args.iter().all(|a| !a.contains("0.0.0.0")));
        }
    }

    #[test]
    fn a_dual_stack_cluster_gets_ranges_of_both_families_ipv4_first() {
        let plan = |ip_family| {
            super::super::plan::LabPlan::new(super::super::plan::LabSpec {
                name: "t1".into(),
                nodes: 2,
                pods_per_node: 0,
                encryption: super::super::plan::Encryption::None,
                overlay: super::super::plan::Overlay::Always,
                segments: 1,
                subnet_source: super::super::plan::SubnetSource::Auto,
                ip_family,
                underlay: super::super::plan::UnderlayFamily::Ipv4,
            })
            .unwrap()
        };
        let four = Ranges::of(&plan(super::super::plan::IpFamily::Ipv4));
        assert!(!four.dual());
        assert_eq!(four.cluster_cidr(), "10.244.0.0/16");
        assert_eq!(four.service_cidr(), "10.96.0.0/12");
        let dual_plan = plan(super::super::plan::IpFamily::Dual);
        let dual = Ranges::of(&dual_plan);
        assert!(dual.dual());
        // What the components take is what sluice-config says: the same two ranges.
        assert_eq!(dual.cluster_cidr(), "10.244.0.0/16,fd00:10:244::/56");
        assert_eq!(dual.cluster_cidr(), dual_plan.cluster_cidr_value());
        assert_eq!(dual.service_cidr(), "10.96.0.0/12,fd00:10:96::/112");
        // The IPv6 Service range is unique local and no larger than the API server takes
        // (a /108 of 128-bit addresses); it overlaps neither the pods' nor the underlay's.
        let svc6: ipnet::Ipv6Net = SERVICE_CIDR_V6.parse().unwrap();
        assert!(svc6.prefix_len() >= 108 && svc6.addr().segments()[0] & 0xff00 == 0xfd00);
        let pods6 = dual.cluster_v6.unwrap();
        assert!(!pods6.contains(&svc6.network()) && !svc6.contains(&pods6.network()));
        for n in &dual_plan.nodes {
            let u = n.underlay_v6.unwrap();
            assert!(!svc6.contains(&u.addr()) && !pods6.contains(&u.addr()));
        }

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
        let api = apiserver_args(&layout, &ports, "172.31.0.254".parse().unwrap(), &dual);
        assert!(api
            .iter()
            .any(|a| a == "--service-cluster-ip-range=10.96.0.0/12,fd00:10:96::/112"));
        // The advertised address (the `kubernetes` Service's endpoint) stays IPv4, the
        // primary family.
        assert!(api.iter().any(|a| a == "--advertise-address=172.31.0.254"));
        let cm = controller_manager_args(&layout, &ports, &dual);
        for want in [
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
            "--node-cidr-mask-size-ipv4=24",
            "--node-cidr-mask-size-ipv6=64",
            "--service-cluster-ip-range=10.96.0.0/12,fd00:10:96::/112",
        ] {
            assert!(cm.iter().any(|a| a == want), "{want} not in {cm:?}");
        }
        // The single mask size is refused by a dual-stack controller-manager.
        assert!(cm.iter().all(|a| !a.starts_with("--node-cidr-mask-size=")));
        // Every node a /64 of the /56 (a controller-manager takes at most 16 bits more).
        assert!(super::super::plan::SUBNET_LENGTH_V6 - pods6.prefix_len() <= 16);

        let n = &dual_plan.nodes[1];
        let k = kubelet_args(
            "t1",
            &n.name,
            n.underlay.addr(),
            n.underlay_v6.map(|a| a.addr()),
            "p:1",
        );
        assert!(
            k.iter().any(|a| a == "--node-ip=172.31.0.2,fd00:31::2"),
            "{k:?}"
        );
        let p = kube_proxy_config("/k", &n.name, n.underlay.addr(), &dual.cluster_cidr());
        assert!(
            p.contains("clusterCIDR: 10.244.0.0/16,fd00:10:244::/56"),
            "{p}"
        );
        assert!(p.contains("bindAddress: 172.31.0.2"), "{p}");
    }

    #[test]
    fn node_private_paths_shadow_the_shallowest_unshared_ancestor_and_make_nothing_on_the_host() {
        // A host with /run, /etc/cni/net.d, /opt and /var/log, /var/lib but none of the rest.
        let host = [
            "/run",
            "/etc",
            "/etc/cni",
            "/etc/cni/net.d",
            "/opt",
            "/var",
            "/var/log",
            "/var/lib",
        ];
        let exists = |p: &Path| host.iter().any(|h| Path::new(h) == p);
        let t = private_targets(&NODE_PRIVATE, exists).unwrap();
        let t: Vec<&str> = t.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(t, ["/etc/cni", "/opt", "/run", "/var/lib", "/var/log"]);
        // Where the host has the paths themselves (a host program may have made
        // /opt/cni/bin, and may remove it), the shallowest ancestor below the shared ones
        // still: the same targets, whatever comes and goes below them.
        let all = |_: &Path| true;
        let t = private_targets(&NODE_PRIVATE, all).unwrap();
        let t: Vec<&str> = t.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(t, ["/etc/cni", "/opt", "/run", "/var/lib", "/var/log"]);
        // A target under another is covered by it.
        let t = private_targets(&["/run", "/run/sluice", "/var/log/pods"], all).unwrap();
        assert_eq!(t, [PathBuf::from("/run"), PathBuf::from("/var/log")]);
        // A host without /etc/cni: the nearest ancestor it has (as before).
        let no_cni = |p: &Path| p == Path::new("/etc");
        let t = private_targets(&["/etc/cni/net.d"], no_cni).unwrap();
        assert_eq!(t, [PathBuf::from("/etc")]);
        // Only "/" there: refused, never "/" shadowed.
        assert_eq!(
            private_targets(&["/nowhere/x"], |p: &Path| p == Path::new("/")),
            None
        );
    }

    #[test]
    fn the_mount_script_keeps_cgroups_and_the_labs_state_and_binds_run_last() {
        let l = NodeLayout::new("t1", "t1-node-1");
        let targets = vec![
            PathBuf::from("/etc/cni/net.d"),
            PathBuf::from("/opt"),
            PathBuf::from("/run"),
        ];
        let s = mount_script(&l, &targets);
        let root = "/run/sluice/lab/t1/k8s/nodes/t1-node-1/root";
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "set -e");
        assert_eq!(
            lines[1],
            format!("mount --rbind /sys/fs/cgroup '{root}/.cgroup'")
        );
        assert_eq!(lines[2], "mount -t sysfs sysfs /sys");
        assert_eq!(
            lines[3],
            format!("mount --move '{root}/.cgroup' /sys/fs/cgroup")
        );
        assert!(lines.contains(&format!("mount --rbind '{root}/opt' '/opt'").as_str()));
        let keep = lines
            .iter()
            .position(|l| *l == format!("mount --bind '/run/sluice/lab' '{root}/run/sluice/lab'"))
            .unwrap();
        let run = lines
            .iter()
            .position(|l| *l == format!("mount --rbind '{root}/run' '/run'"))
            .unwrap();
        assert!(keep < run && run == lines.len() - 3, "{s}");
        assert_eq!(lines.last(), Some(&"exec sleep infinity"));
        let dirs = private_dirs(&l, &targets);
        assert!(dirs.contains(&PathBuf::from(format!("{root}/run/sluice/lab"))));
        assert!(dirs.contains(&PathBuf::from(format!("{root}/var/lib/sluice"))));
    }

    #[test]
    fn containerd_and_kubelet_are_configured_for_this_machine_kind() {
        assert_eq!(
            containerd_socket("t1", "t1-node-2"),
            PathBuf::from("/run/sluice/lab/t1/k8s/nodes/t1-node-2/containerd/containerd.sock")
        );
        // A unix socket path has at most 107 bytes: the longest lab and node names fit.
        let long = containerd_socket("abcdefghijkl", "abcdefghijkl-node-50");
        assert!(long.as_os_str().len() + ".ttrpc".len() < 108);
        let c = containerd_config("t1", "t1-node-2", "rk8s.local/pause:1");
        for want in [
            "restrict_oom_score_adj = true",
            "netns_mounts_under_state_dir = true",
            "SystemdCgroup = false",
            "sandbox_image = \"rk8s.local/pause:1\"",
            "bin_dir = \"/opt/cni/bin\"",
            "conf_dir = \"/etc/cni/net.d\"",
            "address = \"/run/sluice/lab/t1/k8s/nodes/t1-node-2/containerd/containerd.sock\"",
            "root = \"/run/sluice/lab/t1/k8s/nodes/t1-node-2/containerd/root\"",
            "Root = \"/run/sluice/lab/t1/k8s/nodes/t1-node-2/runc\"",
        ] {
            assert!(c.contains(want), "{want} not in {c}");
        }
        let k = kubelet_config("t1-node-2", [172, 31, 0, 2].into(), "/ca.crt", "/r");
        for want in [
            "cgroupDriver: cgroupfs",
            "cgroupRoot: /sluice-lab-t1-node-2",
            "failSwapOn: false",
            "webhook: {enabled: true}",
            "authorization: {mode: Webhook}",
            "anonymous: {enabled: false}",
            "readOnlyPort: 0",
            "address: 172.31.0.2",
        ] {
            assert!(k.contains(want), "{want} not in {k}");
        }
        let a = kubelet_args("t1", "t1-node-2", [172, 31, 0, 2].into(), None, "p:1");
        for want in [
            "--hostname-override=t1-node-2",
            "--node-ip=172.31.0.2",
            "--pod-infra-container-image=p:1",
            "--root-dir=/run/sluice/lab/t1/k8s/nodes/t1-node-2/kubelet",
            "--container-runtime-endpoint=unix:///run/sluice/lab/t1/k8s/nodes/t1-node-2/containerd/containerd.sock",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} not in {a:?}");
        }
    }

    #[test]
    fn the_egress_proxy_dials_only_the_labs_nodes() {
        let nodes: Vec<std::net::Ipv4Addr> = vec![[172, 31, 0, 1].into(), [172, 31, 0, 2].into()];
        let ok = connect_target(
            "CONNECT 172.31.0.2:10250 HTTP/1.1\r\nHost: 172.31.0.2:10250\r\n\r\n",
            &nodes,
        );
        assert_eq!(ok, Ok("172.31.0.2:10250".parse().unwrap()));
        for bad in [
            "CONNECT 192.0.2.1:443 HTTP/1.1\r\n\r\n",
            "CONNECT 172.31.0.3:10250 HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "CONNECT node-1:10250 HTTP/1.1\r\n\r\n",
            "CONNECT 172.31.0.1:10250 SPDY/3\r\n\r\n",
            "",
        ] {
            assert!(connect_target(bad, &nodes).is_err(), "{bad:?}");
        }
        let e = egress_config(Path::new("/s/egress.sock"));
        assert!(
            e.contains("proxyProtocol: HTTPConnect") && e.contains("udsName: \"/s/egress.sock\""),
            "{e}"
        );
    }

    #[test]
    fn the_reference_network_is_the_kits_bridge_host_local_portmap_on_the_pod_cidr() {
        let c = reference_conflist("10.244.1.0/24", Path::new("/n/cni-ipam"));
        let doc: serde_json::Value = serde_json::from_str(&c).unwrap();
        let types: Vec<&str> = doc["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap"]);
        let bridge = &doc["plugins"][0];
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["type"], "host-local");
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.244.1.0/24");
        assert_eq!(bridge["ipam"]["dataDir"], "/n/cni-ipam");
        let nodes = vec![
            (
                "a".to_string(),
                [172, 31, 0, 1].into(),
                "10.244.0.0/24".to_string(),
            ),
            (
                "b".to_string(),
                [172, 31, 0, 2].into(),
                "10.244.1.0/24".to_string(),
            ),
            (
                "c".to_string(),
                [172, 31, 0, 3].into(),
                "10.244.2.0/24".to_string(),
            ),
        ];
        assert_eq!(
            reference_routes(&nodes, "b"),
            [
                ("10.244.0.0/24".to_string(), [172, 31, 0, 1].into()),
                ("10.244.2.0/24".to_string(), [172, 31, 0, 3].into()),
            ]
        );
        assert!(reference_routes(&nodes[..1], "a").is_empty());
    }

    #[test]
    fn image_names_come_from_the_archive_manifest() {
        let m =
            r#"[{"Config":"c.json","RepoTags":["rk8s.local/pause:1"],"Layers":["l/layer.tar"]}]"#;
        assert_eq!(archive_tags(m), ["rk8s.local/pause:1"]);
        assert!(archive_tags("not json").is_empty());
        assert!(archive_tags(r#"[{"Config":"c.json"}]"#).is_empty());
    }
}
