//! `sluice lab`: a cluster on one machine. Nodes and pods are network namespaces, an API server
//! embedded in sluice stands in for the cluster's, and the real CNI plugin wires the pods.

mod cluster;
mod cni;
mod credentials;
mod daemon;
mod down;
pub mod image;
mod k8s;
pub mod k8s_plan;
mod kubelet;
mod load;
mod machine;
mod node_subnets;
pub mod pki;
pub mod plan;
mod restart;
mod serve;
mod status;
mod supervisor;
mod topo;

use anyhow::{bail, Context, Result};
use plan::{state_dir, Encryption, LabPlan, LabSpec};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand, Debug)]
pub enum LabCmd {
    /// Build a lab: underlay, nodes, API server, pods; prints how to reach it with kubectl.
    Up {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value_t = 2)]
        pods_per_node: u8,
        #[arg(long, value_enum, default_value_t = Encryption::None)]
        encryption: Encryption,
        /// Where VXLAN carries pod traffic between nodes (sluice-config `overlay`).
        #[arg(long, value_enum, default_value_t = plan::Overlay::Always)]
        overlay: plan::Overlay,
        /// 1: all nodes on one L2 segment; 2: nodes alternate between two routed segments.
        #[arg(long, default_value_t = 1)]
        segments: u8,
        /// How nodes get their pod subnet (sluice-config `subnet-source`).
        #[arg(long, value_enum, default_value_t = plan::SubnetSource::Auto)]
        subnet_source: plan::SubnetSource,
        /// The pods' address families: ipv4, dual (IPv4 and IPv6, over the IPv4 underlay), or
        /// ipv6 (IPv6 only, over an IPv6 underlay).
        #[arg(long, value_enum, default_value_t = plan::IpFamily::Ipv4)]
        ip_family: plan::IpFamily,
        /// The family the nodes' tunnels (VXLAN, WireGuard) run over: each Node's first
        /// InternalIP, which its agent takes as its underlay address. ipv4 by default; ipv6
        /// with --ip-family ipv6.
        #[arg(long, value_enum)]
        underlay: Option<plan::UnderlayFamily>,
        /// Use this real API server (on the host's loopback) instead of the embedded one.
        #[arg(long, env = "SLUICE_E2E_KUBECONFIG", conflicts_with = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// Run the control plane from the real Kubernetes server binaries in DIR (kube-apiserver,
        /// kube-controller-manager, kube-scheduler, kubelet, kube-proxy; etcd from PATH).
        #[arg(long, env = "SLUICE_K8S_BIN", value_name = "DIR")]
        kubernetes: Option<PathBuf>,
        /// With --kubernetes: the image archives (`*.tar`, pause.tar among them) imported into
        /// every node's containerd; by default DIR/../images (the kit's layout).
        #[arg(
            long,
            env = "SLUICE_K8S_IMAGES",
            value_name = "IMAGES",
            requires = "kubernetes"
        )]
        k8s_images: Option<PathBuf>,
        /// With --kubernetes: wire the pods with the standard CNI plugins instead of sluice
        /// (bridge + host-local on each node's podCIDR + portmap, routes between the nodes: the
        /// kit's reference cluster), as the baseline of `bench-k8s`. sluice is not installed.
        #[arg(long, requires = "kubernetes")]
        reference_cni: bool,
    },
    /// Show the lab's nodes and pods and a pod-to-pod reachability matrix from real pings.
    Status {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything the lab made: processes, namespaces, links, files; also after a crash.
    Down {
        #[arg(long, default_value = "lab")]
        name: String,
    },
    /// Stop or start a node's agent (the lab daemon restarts an agent that dies, unless stopped).
    Agent {
        #[arg(long, default_value = "lab")]
        name: String,
        #[arg(value_enum)]
        action: AgentAction,
        /// The node, e.g. lab-node-1.
        node: String,
    },
    /// Serve IDENTITY on ports (what every lab pod runs; the kubelet starts it).
    Serve {
        #[arg(long)]
        identity: String,
        #[arg(long)]
        tcp: Vec<u16>,
        #[arg(long)]
        udp: Vec<u16>,
        #[arg(long)]
        sctp: Vec<u16>,
    },
    /// Connect from pod FROM (ns/pod) to TO (ns/pod or an address) on PORT: exit 0 when the server
    /// answered, 1 when not, 2 when the kernel has no SCTP.
    Probe {
        #[arg(long, default_value = "lab")]
        name: String,
        from: String,
        to: String,
        port: u16,
        #[arg(long, value_enum, default_value_t = serve::Protocol::Tcp)]
        protocol: serve::Protocol,
        /// e.g. 1s, 500ms.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        /// With TO a pod: connect to its IPv6 address (a dual-stack lab's pods have one of
        /// each). An address TO may be IPv6 without it.
        #[arg(long)]
        ipv6: bool,
    },
    /// Run a command inside a pod's network namespace, like `kubectl exec`.
    Exec {
        #[arg(long, default_value = "lab")]
        name: String,
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Write the image manifests/sluice.yaml names, offline: a docker-archive (`docker save`'s
    /// format, for `ctr images import` or `lab load`) of this binary as /usr/local/bin/sluice and
    /// the tools the agent runs (nft, iptables, ipset, conntrack) with their libraries.
    Image {
        /// The archive to write.
        #[arg(long, default_value = "sluice-image.tar")]
        out: PathBuf,
        /// The image's name (default: the one the manifest's DaemonSet runs).
        #[arg(long, default_value = image::manifest_image())]
        tag: String,
        /// The sluice binary to put in (default: this one).
        #[arg(long)]
        binary: Option<PathBuf>,
        /// The root file system the tools and their libraries are taken from.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Another tool to carry, found like the agent's (in /usr/sbin, /usr/bin, /sbin, /bin
        /// of the root) with the libraries it loads, e.g. `--tool iperf3` for a test's pods,
        /// which name it in their `command`. Repeatable.
        #[arg(long = "tool")]
        tools: Vec<String>,
    },
    /// Import docker/OCI image archives into the containerd of every node of a lab on real
    /// Kubernetes (`lab up --kubernetes DIR`), as `kind load image-archive` does.
    Load {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Only these nodes (default: all), e.g. lab-node-1.
        #[arg(long = "node", value_name = "NODE")]
        nodes: Vec<String>,
        #[arg(required = true, value_name = "ARCHIVE")]
        archives: Vec<PathBuf>,
    },
    /// Restart a node's containerd, kubelet or kube-proxy on a lab on real Kubernetes (`lab up
    /// --kubernetes`): stopped by PID (dependents first), started again with the same command
    /// line in the node's namespaces; the node's pods and containerd's shims keep running.
    Restart {
        #[arg(long, default_value = "lab")]
        name: String,
        /// Stop with KILL (as a crash would) instead of TERM.
        #[arg(long)]
        kill: bool,
        /// The node, e.g. lab-node-1.
        node: String,
        #[arg(value_enum, required = true)]
        components: Vec<restart::Component>,
    },
    /// Internal: the lab daemon's supervisor, or (`--serve`) the daemon: the API server process.
    #[command(name = "__daemon", hide = true)]
    Daemon {
        #[arg(long)]
        name: String,
        #[arg(long)]
        serve: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum AgentAction {
    Stop,
    Start,
}

/// The files of one lab, under its state directory.
pub struct LabFiles {
    pub dir: PathBuf,
    pub plan: PathBuf,
    pub kubeconfig: PathBuf,
    pub api_state: PathBuf,
    pub daemon: PathBuf,
    pub daemon_log: PathBuf,
    /// Present when the lab uses a real API server: its host address.
    pub external: PathBuf,
    /// Written once the lab's objects are in the API; the daemon starts agents after it.
    pub registered: PathBuf,
}

impl LabFiles {
    pub fn new(name: &str) -> Self {
        let dir = state_dir(name);
        Self {
            plan: dir.join("lab.json"),
            kubeconfig: dir.join("kubeconfig"),
            api_state: dir.join("api-state.json"),
            daemon: dir.join("daemon.json"),
            daemon_log: dir.join("daemon.log"),
            external: dir.join("external-api"),
            registered: dir.join("registered"),
            dir,
        }
    }
}

pub fn main(cmd: LabCmd) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        LabCmd::Daemon { name, serve: true } => rt.block_on(daemon::run(&name)),
        LabCmd::Daemon { name, serve: false } => rt.block_on(supervisor::run(&name)),
        LabCmd::Up {
            name,
            nodes,
            pods_per_node,
            encryption,
            overlay,
            segments,
            subnet_source,
            ip_family,
            underlay,
            kubeconfig,
            kubernetes,
            k8s_images,
            reference_cni,
        } => {
            if ip_family == plan::IpFamily::Dual && kubernetes.is_some() && reference_cni {
                bail!("--reference-cni wires IPv4 only (the kit's bridge + host-local on the IPv4 podCIDR): not with --ip-family dual");
            }
            let underlay = plan::underlay_for(ip_family, underlay).map_err(anyhow::Error::msg)?;
            if ip_family == plan::IpFamily::Ipv6 && (kubernetes.is_some() || kubeconfig.is_some()) {
                bail!("--ip-family ipv6 is for the embedded API server's labs so far (no --kubernetes or --kubeconfig): a real cluster would need kubelets, kube-proxy and the control plane on IPv6 too; use --ip-family dual for IPv6 on real Kubernetes");
            }
            if underlay == plan::UnderlayFamily::Ipv6 && kubernetes.is_some() {
                bail!("--underlay ipv6 is for the embedded API server's labs so far: a real kubelet's --node-ip and kube-proxy would need the IPv6 underlay too; use --ip-family dual for dual-stack on real Kubernetes");
            }
            let spec = LabSpec {
                name,
                nodes,
                // Real kubelets run the pods users create; the lab makes none of its own.
                pods_per_node: if kubernetes.is_some() && kubeconfig.is_none() {
                    0
                } else {
                    pods_per_node
                },
                encryption,
                overlay,
                segments,
                subnet_source,
                ip_family,
                underlay,
            };
            let api = match (kubeconfig, kubernetes) {
                (Some(kc), _) => Api::External(kc),
                (None, Some(bin)) => {
                    let images = k8s_images.unwrap_or_else(|| bin.join("..").join("images"));
                    Api::Kubernetes {
                        bin,
                        images,
                        reference_cni,
                    }
                }
                (None, None) => Api::Embedded,
            };
            rt.block_on(up(spec, api))
        }
        LabCmd::Image {
            out,
            tag,
            binary,
            root,
            tools,
        } => image::run(&out, &tag, binary.as_deref(), &root, &tools),
        LabCmd::Load {
            name,
            nodes,
            archives,
        } => load::run(&name, &archives, &nodes),
        LabCmd::Restart {
            name,
            kill,
            node,
            components,
        } => {
            require_root()?;
            plan::validate_name(&name)?;
            restart::run(&name, &node, &components, kill)
        }
        LabCmd::Status { name, json } => rt.block_on(status::run(&name, json)),
        LabCmd::Agent { name, action, node } => agent_control(&name, action, &node),
        LabCmd::Serve {
            identity,
            tcp,
            udp,
            sctp,
        } => {
            let ports: Vec<(serve::Protocol, u16)> = tcp
                .into_iter()
                .map(|p| (serve::Protocol::Tcp, p))
                .chain(udp.into_iter().map(|p| (serve::Protocol::Udp, p)))
                .chain(sctp.into_iter().map(|p| (serve::Protocol::Sctp, p)))
                .collect();
            serve::serve(&identity, &ports)
        }
        LabCmd::Probe {
            name,
            from,
            to,
            port,
            protocol,
            timeout,
            ipv6,
        } => {
            let target = ProbeTarget {
                to: &to,
                port,
                ipv6,
            };
            let code = rt.block_on(probe(&name, &from, target, protocol, timeout))?;
            std::process::exit(i32::from(code));
        }
        LabCmd::Exec { name, pod, command } => {
            let code = rt.block_on(exec(&name, &pod, &command))?;
            std::process::exit(code);
        }
        LabCmd::Down { name } => {
            plan::validate_name(&name)?;
            rt.block_on(down::run(&name))
        }
    }
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("sluice lab makes network namespaces and links: run it as root");
    }
    if !std::path::Path::new("/proc/self/ns/net").exists() {
        bail!("this kernel has no network namespaces (CONFIG_NET_NS)");
    }
    Ok(())
}

pub(crate) struct Progress {
    step: usize,
    started: Instant,
}

impl Progress {
    fn new() -> Self {
        Self {
            step: 0,
            started: Instant::now(),
        }
    }

    fn line(&mut self, msg: String) {
        self.step += 1;
        eprintln!(
            "[{:>2}] {:>6.2}s  {msg}",
            self.step,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Which API server a lab uses.
pub enum Api {
    /// The one embedded in sluice, run by the lab daemon (the default).
    Embedded,
    /// A real one already running on the host's loopback, given by its kubeconfig.
    External(PathBuf),
    /// A real control plane the lab starts from the Kubernetes binaries in `bin`, and real
    /// containerd and kubelets on its nodes with the image archives of `images`; sluice
    /// installed from its manifest, or the standard plugins instead (`reference_cni`).
    Kubernetes {
        bin: PathBuf,
        images: PathBuf,
        reference_cni: bool,
    },
}

async fn up(spec: LabSpec, api: Api) -> Result<()> {
    require_root()?;
    let plan = LabPlan::new(spec)?;
    let name = plan.spec.name.clone();
    let files = LabFiles::new(&name);
    if files.dir.exists() {
        return supervisor::resume(&plan.spec, &files).await;
    }
    if !sluice_net::netns::list_named(&plan.prefix).is_empty() {
        bail!("lab {name} already exists (or left something behind): run `sluice lab down --name {name}` first");
    }
    let mut progress = Progress::new();
    if let Api::Kubernetes {
        bin,
        images,
        reference_cni,
    } = &api
    {
        // Before anything is made: a missing or mismatched binary is only a message.
        k8s::check_binaries(bin)?;
        k8s::images(images)?;
        k8s::check_node_tools()?;
        if *reference_cni {
            k8s::check_reference(plan.spec.segments)?;
        }
    }
    let built = build(&plan, &files, api, &mut progress).await;
    if let Err(e) = built {
        eprintln!("lab {name}: failed; removing what was made");
        if let Err(d) = down::run(&name).await {
            eprintln!("lab {name}: cleanup after the failure also failed: {d:#}");
        }
        return Err(e);
    }
    println!(
        "lab {name} is up: {} nodes, {} pods\n\n  export KUBECONFIG={}\n  kubectl get nodes,pods -A -o wide\n  sluice lab status --name {name}\n  sluice lab down --name {name}",
        plan.nodes.len(),
        plan.pods.len(),
        files.kubeconfig.display()
    );
    Ok(())
}

async fn build(plan: &LabPlan, files: &LabFiles, api: Api, progress: &mut Progress) -> Result<()> {
    let name = &plan.spec.name;
    std::fs::create_dir_all(&files.dir).with_context(|| format!("creating {:?}", files.dir))?;
    daemon::write_atomic(&files.plan, &serde_json::to_vec_pretty(plan)?)?;
    let mut image_dir = None;
    let mut reference = false;
    let external = match api {
        Api::External(kc) => {
            let addr = external_address(&kc)?;
            std::fs::copy(&kc, &files.kubeconfig).with_context(|| format!("copying {kc:?}"))?;
            std::fs::write(&files.external, addr.to_string())?;
            Some(kc)
        }
        Api::Kubernetes {
            bin,
            images,
            reference_cni,
        } => {
            reference = reference_cni;
            let ranges = k8s_plan::Ranges::of(plan);
            let nodes: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
            let addr = k8s::start_control_plane(
                &bin,
                files,
                name,
                &ranges,
                &nodes,
                plan.api_address(),
                progress,
            )
            .await?;
            image_dir = Some(images);
            std::fs::write(&files.external, addr.to_string())?;
            Some(files.kubeconfig.clone())
        }
        Api::Embedded => {
            credentials::create(&files.dir, name)?;
            None
        }
    };
    topo::build(plan, &mut |l| progress.line(l)).await?;
    for node in &plan.nodes {
        cni::install(plan, node)?;
    }
    progress.line(format!(
        "CNI: sluice-cni and {} on {} nodes",
        cni::CONFLIST,
        plan.nodes.len()
    ));
    let info = start_daemon(&name.clone(), files).await?;
    progress.line(match &external {
        Some(kc) => format!(
            "API: the real API server of {kc:?} at {}, forwarded into the nodes",
            info.api
        ),
        None => format!(
            "API: embedded server at https://{} (pid {}, supervised by pid {})",
            info.api,
            info.pid,
            info.supervisor.unwrap_or_default()
        ),
    });
    let client = cluster::client(&files.kubeconfig).await?;
    cluster::register(&client, plan, external.is_some(), image_dir.is_none()).await?;
    let real_nodes = image_dir.is_some();
    if let Some(images) = &image_dir {
        // Real kubelets register the Nodes themselves.
        k8s::start_nodes(plan, files, images, progress).await?;
    }
    // The lab daemon's agents (not on real nodes: the DaemonSet's) start once their Nodes
    // and sluice-config exist, as the DaemonSet's pods would after the manifest is applied.
    std::fs::write(&files.registered, b"")?;
    progress.line(if real_nodes {
        format!(
            "API: {} nodes registered by their kubelets",
            plan.nodes.len()
        )
    } else {
        format!(
            "API: {} nodes registered, kube-system/sluice-config written",
            plan.nodes.len()
        )
    });
    if real_nodes {
        k8s::start_kube_proxies(plan, files, progress).await?;
        if reference {
            k8s::install_reference_cni(plan, files, progress).await?;
        } else {
            // sluice as a user installs it: its DaemonSet runs the agents (the daemon does not).
            k8s::install_sluice(plan, files, progress).await?;
        }
    }
    let limit = if real_nodes { 120 } else { 60 };
    let deadline = Instant::now() + Duration::from_secs(limit);
    // The reference network has no agents: its nodes are up once Ready.
    for node in plan.nodes.iter().filter(|_| !reference) {
        let file = cni::subnet_file(name, &node.name);
        // A node is up once its agent has a subnet and has installed the CNI config (which it
        // does once the datapath is programmed): the node is Ready from then on.
        let env = loop {
            if let Ok(env) = sluice_net::subnet_env::SubnetEnv::load(&file) {
                if cni::network_ready(name, &node.name) {
                    break env;
                }
            }
            if Instant::now() > deadline {
                let log = if real_nodes {
                    format!(
                        "kubectl -n {} logs ds/{} and get pods -o wide",
                        k8s::DAEMONSET_NAMESPACE,
                        k8s::DAEMONSET
                    )
                } else {
                    format!("{:?}", cni::node_dir(name, &node.name).join("agent.log"))
                };
                bail!(
                    "the agent of {} took no subnet or installed no CNI config within {limit} s (log: {log})",
                    node.name,
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        progress.line(format!(
            "agent {}: subnet {} (MTU {})",
            node.name,
            env.first_subnet()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            env.mtu
        ));
    }
    // ...and Ready in the API once the lab's kubelet has seen that (within half a second; a
    // real kubelet, from containerd's NetworkReady, within its 10 s node-status period).
    let limit = if real_nodes { 60 } else { 30 };
    let deadline = Instant::now() + Duration::from_secs(limit);
    while !cluster::nodes_ready(&client, plan).await? {
        if Instant::now() > deadline {
            bail!(
                "the lab's nodes did not turn Ready within {limit} s (see {:?})",
                files.daemon_log
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress.line(format!("{} nodes Ready", plan.nodes.len()));
    // The lab's own pods take the path every pod takes: created in the API, made real by the
    // lab's kubelet on their node.
    for pod in &plan.pods {
        cluster::create_pod(&client, pod).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut reported = std::collections::HashSet::new();
    while reported.len() < plan.pods.len() {
        for (ns, pod, node, ip) in cluster::running_pods(&client, plan).await? {
            if reported.insert(format!("{ns}/{pod}")) {
                progress.line(format!("pod {ns}/{pod} on {node}: {ip}"));
            }
        }
        if Instant::now() > deadline {
            bail!(
                "{} of {} pods running after 60 s (see {:?})",
                reported.len(),
                plan.pods.len(),
                files.daemon_log
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A pod's veth drops everything (fail closed) until its node's agent has put it in the
    // policy rules, a moment after the pod runs: the lab is up once every pod is programmed.
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &plan.nodes {
        let want = plan.pods.iter().filter(|p| p.node == node.name).count();
        loop {
            let have = programmed_pods(&node.netns).await;
            if have >= want {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {} programmed {have} of its {want} pods within 30 s (log: {:?})",
                    node.name,
                    cni::node_dir(name, &node.name).join("agent.log")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// How many local pods a node's agent says its policy rules know (`/status`, from inside the
/// node's namespace); 0 when it does not answer yet.
async fn programmed_pods(netns: &str) -> usize {
    let netns = netns.to_string();
    let ask = move || -> Option<usize> {
        let path = sluice_net::netns::named_path(&netns);
        let file = sluice_net::netns::open(&path).ok()?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 9099));
        let (code, body) =
            sluice_net::netns::run_in(&file, &path, || crate::status::get(addr, "/status"))
                .ok()?
                .ok()?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
        usize::try_from(doc["policy"]["pods"].as_u64()?).ok()
    };
    tokio::task::spawn_blocking(ask)
        .await
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// Host and port of the kubeconfig's current cluster.
fn external_address(kubeconfig: &std::path::Path) -> Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {kubeconfig:?}"))?;
    let context = kc.current_context.clone().unwrap_or_default();
    let cluster_name = kc
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .unwrap_or_default();
    let server = kc
        .clusters
        .iter()
        .find(|c| c.name == cluster_name)
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .with_context(|| format!("{kubeconfig:?} has no server for context {context:?}"))?;
    let (scheme, rest) = server.split_once("://").unwrap_or(("https", &server));
    let authority = rest.split('/').next().unwrap_or(rest);
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:{}", if scheme == "http" { 80 } else { 443 })
    };
    with_port
        .to_socket_addrs()
        .with_context(|| format!("resolving {with_port}"))?
        .next()
        .with_context(|| format!("{with_port} resolves to nothing"))
}

async fn start_daemon(name: &str, files: &LabFiles) -> Result<daemon::DaemonInfo> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the sluice executable")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.daemon_log)?;
    let mut child = std::process::Command::new(exe)
        .args(["lab", "__daemon", "--name", name])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group, so that a Ctrl-C at `lab up` does not take the lab down.
        .process_group(0)
        .spawn()
        .context("starting the lab daemon")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // The child is the daemon's supervisor; the daemon names it once it serves.
        if let Some(info) = daemon::read_info(&files.daemon) {
            if info.supervisor == Some(child.id()) {
                return Ok(info);
            }
        }
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&files.daemon_log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("the lab daemon exited ({status}):\n{}", tail.join("\n"));
        }
        if Instant::now() > deadline {
            bail!(
                "the lab daemon did not come up within 20 s (log: {:?})",
                files.daemon_log
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn agent_control(name: &str, action: AgentAction, node: &str) -> Result<()> {
    require_root()?;
    let files = LabFiles::new(name);
    let plan: LabPlan = serde_json::from_slice(
        &std::fs::read(&files.plan).with_context(|| format!("no lab named {name}"))?,
    )?;
    if plan.node(node).is_none() {
        bail!("lab {name} has no node {node}");
    }
    if k8s::real_nodes(name) {
        bail!(
            "lab {name} runs sluice's agents from the DaemonSet {ns}/{ds} (installed from the manifest), not from the lab daemon: restart {node}'s agent with `kubectl -n {ns} delete pod -l app.kubernetes.io/name=sluice --field-selector spec.nodeName={node}` (the DaemonSet makes a new one); to keep it off a node, give the DaemonSet a nodeSelector or affinity",
            ns = k8s::DAEMONSET_NAMESPACE,
            ds = k8s::DAEMONSET,
        );
    }
    let marker = daemon::agent_stop_marker(name, node);
    match action {
        AgentAction::Start => {
            let _ = std::fs::remove_file(&marker);
            eprintln!("agent of {node}: the lab daemon starts it within a second");
        }
        AgentAction::Stop => {
            std::fs::write(&marker, b"")?;
            let pid = std::fs::read_to_string(daemon::agent_pid_file(name, node))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            eprintln!("agent of {node}: stopped (its datapath stays in place)");
        }
    }
    Ok(())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 1s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !(0.001..=3600.0).contains(&secs) {
        return Err(format!("{s:?}: between 1ms and 1h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// The network namespace and address of pod `ns/name`, from the API.
/// A pod's namespace and its `status.podIP` (of either family: an IPv6-only lab's is IPv6).
async fn pod_place(name: &str, pod: &str) -> Result<(String, Option<std::net::IpAddr>)> {
    use k8s_openapi::api::core::v1::Pod;
    let (ns, pod_name) = serve::pod_ref(pod)?;
    let files = LabFiles::new(name);
    let plan: LabPlan = serde_json::from_slice(
        &std::fs::read(&files.plan).with_context(|| format!("no lab named {name}"))?,
    )?;
    let client = cluster::client(&files.kubeconfig).await?;
    let api: kube::Api<Pod> = kube::Api::namespaced(client, &ns);
    let p = api
        .get_opt(&pod_name)
        .await?
        .with_context(|| format!("no pod {ns}/{pod_name}"))?;
    let ip = p
        .status
        .and_then(|s| s.pod_ip)
        .and_then(|ip| ip.parse().ok());
    Ok((plan.pod_netns(&ns, &pod_name), ip))
}

/// What `lab probe` connects to.
struct ProbeTarget<'a> {
    /// `ns/pod` or an address of either family.
    to: &'a str,
    port: u16,
    /// A pod's IPv6 address rather than its IPv4 one.
    ipv6: bool,
}

async fn probe(
    name: &str,
    from: &str,
    target: ProbeTarget<'_>,
    protocol: serve::Protocol,
    timeout: Duration,
) -> Result<u8> {
    let (to, port) = (target.to, target.port);
    let (netns_name, _) = pod_place(name, from).await?;
    let ip: std::net::IpAddr = match to.parse::<std::net::IpAddr>() {
        Ok(ip) => ip,
        Err(_) => {
            let (to_netns, v4) = pod_place(name, to).await?;
            // An IPv6-only pod's podIP is its IPv6 address already.
            if target.ipv6 && !v4.is_some_and(|ip| ip.is_ipv6()) {
                status::pod_ipv6(&to_netns)
                    .with_context(|| format!("pod {to} has no IPv6 address"))?
                    .into()
            } else {
                v4.with_context(|| format!("pod {to} has no address yet"))?
            }
        }
    };
    let path = sluice_net::netns::named_path(&netns_name);
    let file = sluice_net::netns::open(&path)?;
    let addr = std::net::SocketAddr::new(ip, port);
    let result = sluice_net::netns::run_in(&file, &path, || serve::probe(addr, protocol, timeout))?;
    Ok(match result {
        serve::ProbeResult::Answered(who) => {
            println!("{from} -> {to} ({addr} {protocol:?}): answered by {who}");
            0
        }
        serve::ProbeResult::NoAnswer(why) => {
            println!("{from} -> {to} ({addr} {protocol:?}): no answer ({why})");
            1
        }
        serve::ProbeResult::SctpUnsupported => {
            println!("{from} -> {to} ({addr} SCTP): SCTP unsupported by this kernel");
            serve::EXIT_SCTP_UNSUPPORTED
        }
    })
}

async fn exec(name: &str, pod: &str, command: &[String]) -> Result<i32> {
    let (netns_name, _) = pod_place(name, pod).await?;
    let path = sluice_net::netns::named_path(&netns_name);
    let file = sluice_net::netns::open(&path)?;
    let (program, args) = command.split_first().context("no command")?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args);
    let mut child = sluice_net::netns::run_in(&file, &path, || cmd.spawn())?
        .with_context(|| format!("running {program}"))?;
    let status = child.wait()?;
    Ok(status.code().unwrap_or(128))
}
