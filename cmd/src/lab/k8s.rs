//! `lab up --kubernetes DIR`: the lab's control plane made of real Kubernetes components on the
//! host's loopback: etcd (Debian's), kube-apiserver (TLS, RBAC and Node authorization), the
//! controller-manager (which hands out `podCIDR`s) and the scheduler. Every file and process of
//! it lives under the lab's state directory (`k8s/`), whose path is in every command line, so
//! `lab down` finds them from the machine alone. What runs with which flags is decided in
//! [`super::k8s_plan`].

use super::k8s_plan::{self as kp, Layout, Ports};
use super::pki::{self, Ca};
use super::LabFiles;
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The admin user of a real-Kubernetes lab (client certificate, `system:masters`).
const ADMIN_USER: &str = "sluice-lab-admin";

/// The directory of a lab's real control plane.
pub fn dir(files: &LabFiles) -> PathBuf {
    files.dir.join("k8s")
}

/// What `--version` prints, with a bound on how long a binary may take to say it.
fn version_of(path: &Path) -> Option<String> {
    let mut child = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take()?, &mut out).ok()?;
    Some(out)
}

/// Checks DIR's binaries and finds etcd; returns the Kubernetes version.
pub fn check_binaries(bin: &Path) -> Result<String> {
    if !bin.is_dir() {
        bail!("--kubernetes {bin:?}: not a directory (it must hold the server binaries of a Kubernetes release)");
    }
    let said: Vec<(&str, Option<String>)> = kp::BINARIES
        .iter()
        .map(|b| (*b, version_of(&bin.join(b))))
        .collect();
    let version = kp::check_versions(bin, &said)?;
    etcd()?;
    Ok(version)
}

fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn etcd() -> Result<PathBuf> {
    on_path("etcd").context("no etcd on PATH: install it (Debian: apt-get install etcd-server)")
}

/// Checks what the nodes run besides DIR's binaries: containerd, its `ctr`, runc and the
/// namespace tools.
pub fn check_node_tools() -> Result<()> {
    let missing: Vec<&str> = [
        "containerd",
        "ctr",
        "containerd-shim-runc-v2",
        "runc",
        "nsenter",
        "unshare",
        "kubectl",
    ]
    .into_iter()
    .filter(|p| on_path(p).is_none())
    .collect();
    if !missing.is_empty() {
        bail!(
            "a real-Kubernetes lab needs {} on PATH (Debian: apt-get install containerd runc util-linux; kubectl from a Kubernetes release's client binaries)",
            missing.join(", ")
        );
    }
    standard_plugins().map(|_| ())
}

/// Free loopback ports, asked of the kernel (held together so that they differ).
fn free_ports() -> Result<Ports> {
    let listeners: Vec<std::net::TcpListener> = (0..5)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()
        .context("finding free loopback ports")?;
    let p: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    Ok(Ports {
        etcd_client: p[0],
        etcd_peer: p[1],
        apiserver: p[2],
        controller_manager: p[3],
        scheduler: p[4],
    })
}

/// The CA, the serving and client certificates, the service-account key pair and one
/// kubeconfig per component, written under `layout.dir`.
/// The serving certificate names the host's loopback (kubectl, the components), the advertised
/// underlay address (the `kubernetes` Service's Endpoints), the Service IP and its DNS names.
fn write_pki(
    layout: &Layout,
    api: SocketAddr,
    advertise: std::net::Ipv4Addr,
    lab: &str,
    nodes: &[String],
) -> Result<String> {
    let pki_dir = layout.dir.join("pki");
    let kc_dir = layout.dir.join("kubeconfig");
    for d in [layout.dir, &pki_dir, &kc_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {d:?}"))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let ca = Ca::new(&format!("sluice-lab-{lab}-ca"))?;
    pki::write_file(&pki_dir.join("ca.crt"), &ca.cert.cert_pem, 0o644)?;
    let advertise = advertise.to_string();
    ca.serving(
        "kube-apiserver",
        &[
            "127.0.0.1",
            "localhost",
            &advertise,
            kp::API_SERVICE_IP,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
    )?
    .write(&pki_dir, "apiserver")?;
    ca.client("kube-apiserver-kubelet-client", &["system:masters"])?
        .write(&pki_dir, "apiserver-kubelet-client")?;
    let (sa_key, sa_pub) = pki::signing_key_pair()?;
    pki::write_file(&pki_dir.join("sa.key"), &sa_key, 0o600)?;
    pki::write_file(&pki_dir.join("sa.pub"), &sa_pub, 0o644)?;
    let server = format!("https://{api}");
    let mut admin = String::new();
    // Each kubelet as the Node authorizer knows it: `system:node:NAME` in `system:nodes`.
    let kubelets: Vec<(String, String)> = nodes
        .iter()
        .map(|n| (format!("kubelet-{n}"), format!("system:node:{n}")))
        .collect();
    let kubelets = kubelets
        .iter()
        .map(|(who, user)| (who.as_str(), user.as_str(), &["system:nodes"][..]));
    for (who, user, groups) in [
        ("admin", ADMIN_USER, &["system:masters"][..]),
        (
            "kube-controller-manager",
            "system:kube-controller-manager",
            &[][..],
        ),
        ("kube-scheduler", "system:kube-scheduler", &[][..]),
        ("kube-proxy", "system:kube-proxy", &[][..]),
    ]
    .into_iter()
    .chain(kubelets)
    {
        let cert = ca.client(user, groups)?;
        let text = sluice_apiserver::kubeconfig_with_client_cert(
            &server,
            &format!("sluice-{lab}"),
            sluice_apiserver::ClientCredential {
                server_ca_pem: &ca.cert.cert_pem,
                cert_pem: &cert.cert_pem,
                key_pem: &cert.key_pem,
            },
        );
        pki::write_file(Path::new(&layout.kubeconfig(who)), &text, 0o600)?;
        if who == "admin" {
            admin = text;
        }
    }
    Ok(admin)
}

/// Starts `program args` in its own process group, output to `logs/NAME.log`, and records its
/// pid in `NAME.pid` and its command line in `NAME.argv` (what `lab restart` starts again).
fn spawn(dir: &Path, name: &str, program: &Path, args: &[String]) -> Result<std::process::Child> {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
    let mut argv = vec![program.display().to_string()];
    argv.extend(args.iter().cloned());
    std::fs::write(dir.join(format!("{name}.argv")), serde_json::to_vec(&argv)?)?;
    start_logged(dir, name, &argv, log)
}

/// Starts `argv` (as [`spawn`] recorded it) again, its output appended to `logs/NAME.log`.
pub fn respawn(dir: &Path, name: &str) -> Result<std::process::Child> {
    let file = dir.join(format!("{name}.argv"));
    let argv: Vec<String> =
        serde_json::from_slice(&std::fs::read(&file).with_context(|| format!("reading {file:?}"))?)
            .with_context(|| format!("{file:?}: a JSON list of strings was expected"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs").join(format!("{name}.log")))?;
    start_logged(dir, name, &argv, log)
}

fn start_logged(
    dir: &Path,
    name: &str,
    argv: &[String],
    log: std::fs::File,
) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let (program, args) = argv.split_first().context("an empty command line")?;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program:?}"))?;
    std::fs::write(dir.join(format!("{name}.pid")), child.id().to_string())?;
    Ok(child)
}

fn log_tail(dir: &Path, name: &str) -> String {
    let text =
        std::fs::read_to_string(dir.join("logs").join(format!("{name}.log"))).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(15).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Waits until `ready` says yes, failing early when `child` exits; bounded by `limit`.
async fn wait_ready<F, Fut>(
    dir: &Path,
    name: &str,
    child: &mut std::process::Child,
    limit: Duration,
    mut ready: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if ready().await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited ({status}):\n{}", log_tail(dir, name));
        }
        if Instant::now() > deadline {
            bail!(
                "{name} was not ready within {} s:\n{}",
                limit.as_secs(),
                log_tail(dir, name)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `GET path` over plain HTTP on loopback; true on a 200 whose body contains `want`.
fn http_ok(addr: SocketAddr, path: &str, want: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.starts_with("HTTP/1.") && body.contains(" 200 ") && body.contains(want)
}

/// Starts the control plane and returns the API server's address once it serves `/readyz`;
/// the admin kubeconfig is written to `files.kubeconfig`.
pub async fn start_control_plane(
    bin: &Path,
    files: &LabFiles,
    lab: &str,
    ranges: &kp::Ranges,
    nodes: &[String],
    advertise: std::net::Ipv4Addr,
    progress: &mut super::Progress,
) -> Result<SocketAddr> {
    let version = check_binaries(bin)?;
    let etcd = etcd()?;
    let bin = std::fs::canonicalize(bin).with_context(|| format!("resolving {bin:?}"))?;
    let dir = dir(files);
    let layout = Layout { dir: &dir };
    let ports = free_ports()?;
    let api = SocketAddr::from(([127, 0, 0, 1], ports.apiserver));
    let admin = write_pki(&layout, api, advertise, lab, nodes)?;
    std::fs::write(
        dir.join("egress.yaml"),
        kp::egress_config(&egress_socket(files)),
    )?;
    std::fs::write(dir.join("ports.json"), serde_json::to_vec_pretty(&ports)?)?;
    std::fs::write(dir.join("bin"), bin.display().to_string())?;
    progress.line(format!(
        "Kubernetes {version} in {bin:?}: PKI and kubeconfigs in {dir:?}"
    ));

    let mut etcd_child = spawn(&dir, "etcd", &etcd, &kp::etcd_args(&layout, &ports))?;
    let etcd_addr = SocketAddr::from(([127, 0, 0, 1], ports.etcd_client));
    wait_ready(
        &dir,
        "etcd",
        &mut etcd_child,
        Duration::from_secs(30),
        || async {
            tokio::task::spawn_blocking(move || http_ok(etcd_addr, "/health", "true"))
                .await
                .unwrap_or(false)
        },
    )
    .await?;
    progress.line(format!("etcd on {etcd_addr} (pid {})", etcd_child.id()));

    let mut api_child = spawn(
        &dir,
        "kube-apiserver",
        &bin.join("kube-apiserver"),
        &kp::apiserver_args(&layout, &ports, advertise, ranges),
    )?;
    super::credentials::write_private(&files.kubeconfig, &admin)?;
    let client = super::cluster::client(&files.kubeconfig).await?;
    // Until it is ready, every /readyz is refused (connection refused, then 500s while its
    // post-start hooks run), which kube's client logs as errors: expected here, so not shown.
    let quiet = crate::set_log_level("info,kube_client=off");
    let ready = wait_ready(
        &dir,
        "kube-apiserver",
        &mut api_child,
        Duration::from_secs(90),
        || {
            let client = client.clone();
            async move {
                let req = http::Request::get("/readyz").body(Vec::new());
                match req {
                    Ok(req) => client
                        .request_text(req)
                        .await
                        .is_ok_and(|t| t.trim() == "ok"),
                    Err(_) => false,
                }
            }
        },
    )
    .await;
    if quiet {
        crate::set_log_level("info");
    }
    ready?;
    progress.line(format!(
        "kube-apiserver at https://{api} (pid {}), RBAC and Node authorization, advertising {advertise}:{} (the kubernetes Service's endpoint)",
        api_child.id(),
        api.port()
    ));
    let cm = spawn(
        &dir,
        "kube-controller-manager",
        &bin.join("kube-controller-manager"),
        &kp::controller_manager_args(&layout, &ports, ranges),
    )?;
    let sched = spawn(
        &dir,
        "kube-scheduler",
        &bin.join("kube-scheduler"),
        &kp::scheduler_args(&layout, &ports),
    )?;
    progress.line(format!(
        "kube-controller-manager (pid {}, podCIDRs from {}, Services from {}), kube-scheduler (pid {})",
        cm.id(),
        ranges.cluster_cidr(),
        ranges.service_cidr(),
        sched.id()
    ));
    // The children run on after `lab up` exits (dropping a Child neither waits for nor kills
    // it); `lab down` stops them, found by the lab's path in their command lines.
    drop((etcd_child, api_child, cm, sched));
    Ok(api)
}

/// Starts kube-proxy in every node's network namespace (it reaches the API server through the
/// node's loopback forwarder, at the host's address); bounded wait until each has written its
/// `KUBE-SERVICES` chain.
pub async fn start_kube_proxies(
    plan: &super::plan::LabPlan,
    files: &LabFiles,
    progress: &mut super::Progress,
) -> Result<()> {
    let dir = dir(files);
    let layout = Layout { dir: &dir };
    let bin = PathBuf::from(std::fs::read_to_string(dir.join("bin"))?.trim());
    let kubeconfig = layout.kubeconfig("kube-proxy");
    let ranges = kp::Ranges::of(plan);
    let cidr = ranges.cluster_cidr();
    for node in &plan.nodes {
        let node_dir = dir.join("nodes").join(&node.name);
        std::fs::create_dir_all(&node_dir)?;
        let config = node_dir.join("kube-proxy.yaml");
        std::fs::write(
            &config,
            kp::kube_proxy_config(&kubeconfig, &node.name, node.underlay.addr(), &cidr),
        )?;
        let name = format!("kube-proxy-{}", node.name);
        let args = [format!("--config={}", config.display()), "--v=1".into()];
        // In the node's mount namespace too: its xtables lock and /run are the node's.
        let mut argv = in_node(&plan.spec.name, &node.name, &node.netns)?;
        argv.push(bin.join("kube-proxy").display().to_string());
        argv.extend(args);
        let pid = spawn(&dir, &name, Path::new("nsenter"), &argv)?.id();
        progress.line(format!("kube-proxy on {} (pid {pid})", node.name));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    // Dual-stack: kube-proxy writes the IPv6 Services' rules through ip6tables as well.
    let tools: &[&str] = if ranges.dual() {
        &["iptables", "ip6tables"]
    } else {
        &["iptables"]
    };
    for node in &plan.nodes {
        for tool in tools {
            while !has_service_chain(&node.netns, tool).await {
                if Instant::now() > deadline {
                    bail!(
                        "kube-proxy on {} wrote no KUBE-SERVICES chain ({tool}) within 60 s:\n{}",
                        node.name,
                        log_tail(&dir, &format!("kube-proxy-{}", node.name))
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    progress.line(format!(
        "kube-proxy: Service rules in every node ({})",
        tools.join(" and ")
    ));
    Ok(())
}

/// Whether the nat table of `netns` has kube-proxy's `KUBE-SERVICES` chain (`tool`: iptables
/// or ip6tables).
async fn has_service_chain(netns: &str, tool: &str) -> bool {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            tool,
            "-w",
            "5",
            "-t",
            "nat",
            "-S",
            "KUBE-SERVICES",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
    out.is_ok_and(|s| s.success())
}

/// The components of a lab's real control plane (and kube-proxies) that no longer run: a pid
/// file whose process is gone or runs something without the lab's path in its command line.
pub fn dead_components(files: &LabFiles) -> Vec<String> {
    let dir = dir(files);
    let marker = format!("{}/", dir.display());
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut dead: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let component = file.strip_suffix(".pid")?.to_string();
            let pid = std::fs::read_to_string(e.path()).ok()?;
            let cmdline =
                std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
            (!String::from_utf8_lossy(&cmdline).contains(&marker)).then_some(component)
        })
        .collect();
    // The holders of the nodes' mount namespaces (their command line is `sleep infinity`).
    let lab = files
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let nodes: Vec<String> = std::fs::read(dir.join("nodes.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    dead.extend(
        nodes
            .into_iter()
            .filter(|n| mount_holder(lab, n).is_none())
            .map(|n| format!("{n}-mountns")),
    );
    dead.sort();
    dead
}

/// The unix socket on which the lab daemon serves the API server's egress (HTTP CONNECT).
pub fn egress_socket(files: &LabFiles) -> PathBuf {
    dir(files).join("egress.sock")
}

/// The pid of the process holding `node`'s mount namespace, if it still runs.
pub fn mount_holder(lab: &str, node: &str) -> Option<u32> {
    let layout = kp::NodeLayout::new(lab, node);
    let pid: u32 = std::fs::read_to_string(layout.holder_pid())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    (cmdline == b"sleep\0infinity\0" && layout.mount_ready().exists()).then_some(pid)
}

/// `nsenter` arguments that run a program in `node`'s network and mount namespaces (as one
/// process tree: `ip netns exec` would give each process a mount namespace of its own).
pub fn in_node(lab: &str, node: &str, netns: &str) -> Result<Vec<String>> {
    let holder = mount_holder(lab, node)
        .with_context(|| format!("node {node} has no mount namespace (its holder is gone)"))?;
    Ok(vec![
        format!("--net={}", sluice_net::netns::named_path(netns).display()),
        format!("--mount=/proc/{holder}/ns/mnt"),
        "--".into(),
    ])
}

/// Whether lab `lab` runs real containerd and kubelets on its nodes (the lab's kubelet
/// stand-in is not used then).
pub fn real_nodes(lab: &str) -> bool {
    dir(&LabFiles::new(lab)).join("nodes.json").exists()
}

/// Runs `cmd` to its end within `limit` (killed after it), its output captured.
pub fn output_within(
    cmd: &mut std::process::Command,
    limit: Duration,
) -> Result<std::process::Output> {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let reader = std::thread::spawn(move || {
        let mut o = Vec::new();
        if let Some(s) = out.as_mut() {
            let _ = s.read_to_end(&mut o);
        }
        o
    });
    let mut e = Vec::new();
    if let Some(s) = err.as_mut() {
        let _ = s.read_to_end(&mut e);
    }
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = reader.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout,
        stderr: e,
    })
}

/// The kit's (or a user's) image archives to load into every node: every `*.tar` of `dir`,
/// the pause image among them (the sandbox image: nothing is pulled). Returns the archives
/// (pause first) and the pause image's name.
pub fn images(dir: &Path) -> Result<(Vec<PathBuf>, String)> {
    let pause = dir.join("pause.tar");
    if !pause.is_file() {
        bail!("{dir:?} has no pause.tar: a real-Kubernetes lab pulls nothing, so it needs the sandbox (pause) image as an archive (the kit's ../shared/realk8s/images/; --k8s-images DIR)");
    }
    let out = output_within(
        std::process::Command::new("tar")
            .arg("-xOf")
            .arg(&pause)
            .arg("manifest.json"),
        Duration::from_secs(30),
    )?;
    let tags = kp::archive_tags(&String::from_utf8_lossy(&out.stdout));
    let sandbox = tags.first().cloned().with_context(|| {
        format!("{pause:?}: a docker archive with a RepoTags name was expected")
    })?;
    let mut archives: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {dir:?}"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tar") && *p != pause)
        .collect();
    archives.sort();
    archives.insert(0, pause);
    Ok((archives, sandbox))
}

/// The standard CNI plugins a node has (containerd runs `loopback` for every sandbox).
pub struct StandardPlugins {
    pub loopback: PathBuf,
}

/// Finds the standard CNI plugins (Debian: containernetworking-plugins, in /usr/lib/cni).
pub fn standard_plugins() -> Result<StandardPlugins> {
    let loopback = ["/usr/lib/cni/loopback", "/opt/cni/bin/loopback"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no CNI loopback plugin (containerd sets up every sandbox's lo with it): install it (Debian: apt-get install containernetworking-plugins)")?;
    Ok(StandardPlugins { loopback })
}

/// Makes `cgroup_root` in every cgroup v1 hierarchy (the kubelet requires it to exist), with
/// the cpuset of the machine.
fn make_cgroup_root(root: &str) -> Result<()> {
    for h in std::fs::read_dir("/sys/fs/cgroup")?.filter_map(|e| e.ok()) {
        let path = h.path();
        if h.file_name() == "unified" || !path.join("cgroup.procs").exists() {
            continue;
        }
        let mine = path.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&mine).with_context(|| format!("creating {mine:?}"))?;
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(v) = std::fs::read_to_string(path.join(f)) {
                std::fs::write(mine.join(f), v.trim())
                    .with_context(|| format!("writing {:?}", mine.join(f)))?;
            }
        }
    }
    Ok(())
}

/// Every node's own mount namespace, containerd (the images imported) and kubelet; returns
/// once every kubelet has registered its Node and the controller-manager has given it a
/// podCIDR.
pub async fn start_nodes(
    plan: &super::plan::LabPlan,
    files: &LabFiles,
    image_dir: &Path,
    progress: &mut super::Progress,
) -> Result<()> {
    let lab = plan.spec.name.as_str();
    let dir = dir(files);
    let layout = Layout { dir: &dir };
    let bin = PathBuf::from(std::fs::read_to_string(dir.join("bin"))?.trim());
    let (archives, sandbox) = images(image_dir)?;
    let plugins = standard_plugins()?;
    let exists = |p: &Path| p.exists();
    let targets = kp::private_targets(&kp::NODE_PRIVATE, exists)
        .context("the host has none of the paths a node needs its own of")?;
    std::fs::write(
        dir.join("nodes.json"),
        serde_json::to_vec_pretty(&plan.nodes.iter().map(|n| &n.name).collect::<Vec<_>>())?,
    )?;
    for node in &plan.nodes {
        let nl = kp::NodeLayout::new(lab, &node.name);
        for d in [
            "containerd/root",
            "containerd/state",
            "containerd/opt",
            "runc",
            "kubelet/pki",
            "logs",
        ] {
            std::fs::create_dir_all(nl.dir.join(d))?;
        }
        for d in kp::private_dirs(&nl, &targets) {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {d:?}"))?;
        }
        make_cgroup_root(&kp::cgroup_root(&node.name))?;
        // What a node's OS package puts beside the network provider's plugin: containerd
        // sets up every sandbox's `lo` with the standard `loopback` plugin.
        let loopback = nl.private("/opt/cni/bin").join("loopback");
        if !loopback.exists() {
            std::os::unix::fs::symlink(&plugins.loopback, &loopback)
                .with_context(|| format!("linking {loopback:?}"))?;
        }
        // The holder: in the node's network namespace, a mount namespace of its own.
        let script = kp::mount_script(&nl, &targets);
        let netns_path = sluice_net::netns::named_path(&node.netns);
        let mut holder = spawn(
            &nl.dir,
            "mountns",
            Path::new("nsenter"),
            &[
                format!("--net={}", netns_path.display()),
                "--".into(),
                "unshare".into(),
                "--mount".into(),
                "--propagation".into(),
                "slave".into(),
                "--".into(),
                "sh".into(),
                "-c".into(),
                script,
            ],
        )?;
        let ready = nl.mount_ready();
        let held = || ready.exists() && mount_holder(lab, &node.name).is_some();
        wait_ready(
            &nl.dir,
            "mountns",
            &mut holder,
            Duration::from_secs(10),
            || {
                let ok = held();
                async move { ok }
            },
        )
        .await?;
        let mut node_argv = in_node(lab, &node.name, &node.netns)?;

        let config = nl.file("containerd.toml");
        std::fs::write(&config, kp::containerd_config(lab, &node.name, &sandbox))?;
        let mut argv = node_argv.clone();
        argv.extend([
            "containerd".into(),
            "--config".into(),
            config.display().to_string(),
        ]);
        let name = format!("{}-containerd", node.name);
        let mut containerd = spawn(&dir, &name, Path::new("nsenter"), &argv)?;
        let sock = kp::containerd_socket(lab, &node.name);
        let sock_str = sock.display().to_string();
        wait_ready(
            &dir,
            &name,
            &mut containerd,
            Duration::from_secs(30),
            || {
                let sock = sock_str.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        output_within(
                            std::process::Command::new("ctr").args(["--address", &sock, "version"]),
                            Duration::from_secs(5),
                        )
                        .is_ok_and(|o| o.status.success())
                    })
                    .await
                    .unwrap_or(false)
                }
            },
        )
        .await?;
        let started = Instant::now();
        for archive in &archives {
            let a = archive.clone();
            let s = sock_str.clone();
            let out = tokio::task::spawn_blocking(move || {
                output_within(
                    std::process::Command::new("ctr")
                        .args(["--address", &s, "-n", "k8s.io", "images", "import"])
                        .arg(&a),
                    Duration::from_secs(120),
                )
            })
            .await??;
            if !out.status.success() {
                bail!(
                    "importing {archive:?} into {}: {}",
                    node.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        progress.line(format!(
            "node {}: mount namespace (pid {}), containerd at {sock:?} (pid {}), {} images in {:.1} s",
            node.name,
            holder.id(),
            containerd.id(),
            archives.len(),
            started.elapsed().as_secs_f64()
        ));

        std::fs::copy(
            layout.kubeconfig(&format!("kubelet-{}", node.name)),
            nl.file("kubelet.kubeconfig"),
        )?;
        std::fs::write(
            nl.file("resolv.conf"),
            "search cluster.local\noptions ndots:1\n",
        )?;
        std::fs::write(
            nl.file("kubelet.yaml"),
            kp::kubelet_config(
                &node.name,
                node.underlay.addr(),
                &layout.pki("ca.crt"),
                &nl.file("resolv.conf").display().to_string(),
            ),
        )?;
        node_argv.push(bin.join("kubelet").display().to_string());
        node_argv.extend(kp::kubelet_args(
            lab,
            &node.name,
            node.underlay.addr(),
            node.underlay_v6.map(|a| a.addr()),
            &sandbox,
        ));
        let kubelet = spawn(
            &dir,
            &format!("{}-kubelet", node.name),
            Path::new("nsenter"),
            &node_argv,
        )?;
        progress.line(format!(
            "node {}: kubelet (pid {})",
            node.name,
            kubelet.id()
        ));
        drop((holder, containerd, kubelet));
    }
    // Each kubelet registers its Node; the controller-manager gives it a podCIDR.
    let client = super::cluster::client(&files.kubeconfig).await?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let deadline = Instant::now() + Duration::from_secs(90);
    for node in &plan.nodes {
        loop {
            // A dual-stack lab's Nodes get both podCIDRs at once (IPv4 first).
            let cidrs = nodes
                .get_opt(&node.name)
                .await
                .ok()
                .flatten()
                .and_then(|n| n.spec?.pod_cidrs)
                .unwrap_or_default();
            if !cidrs.is_empty() {
                progress.line(format!(
                    "node {}: registered by its kubelet, podCIDRs {}",
                    node.name,
                    cidrs.join(",")
                ));
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the kubelet of {} registered no Node with a podCIDR within 90 s:\n{}",
                    node.name,
                    log_tail(&dir, &format!("{}-kubelet", node.name))
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// The DaemonSet that runs sluice's agents, as `manifests/sluice.yaml` names it.
pub const DAEMONSET_NAMESPACE: &str = "kube-system";
pub const DAEMONSET: &str = "sluice";

/// Installs sluice on the lab as a user installs it: the image the manifest names, written
/// offline from this binary and the agent's tools, imported into every node's containerd;
/// then `kubectl apply -f` of the manifest (embedded in this binary), its `sluice-config` set to
/// the lab's settings. The DaemonSet's pods then install the plugin and, once each node's
/// datapath is up, the CNI config, which makes the node Ready.
pub async fn install_sluice(
    plan: &super::plan::LabPlan,
    files: &LabFiles,
    progress: &mut super::Progress,
) -> Result<()> {
    let lab = plan.spec.name.clone();
    let dir = dir(files);
    let archive = dir.join("sluice-image.tar");
    let tag = super::image::manifest_image();
    let started = Instant::now();
    let out = archive.clone();
    let written = tokio::task::spawn_blocking(move || {
        super::image::build(&out, tag, None, Path::new("/"), &[])
    })
    .await??;
    progress.line(format!(
        "image {tag}: {} files, {:.1} MiB, written offline to {archive:?} in {:.1} s",
        written.files,
        written.layer_bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    ));
    let started = Instant::now();
    for node in &plan.nodes {
        let socket = kp::containerd_socket(&lab, &node.name);
        let a = archive.clone();
        tokio::task::spawn_blocking(move || super::load::import(&socket, &a))
            .await?
            .with_context(|| format!("loading the sluice image into {}", node.name))?;
    }
    progress.line(format!(
        "image {tag} loaded into the containerd of {} nodes in {:.1} s",
        plan.nodes.len(),
        started.elapsed().as_secs_f64()
    ));
    let manifest = kp::render_manifest(super::image::MANIFEST, &lab_config(plan))?;
    let file = dir.join("sluice.yaml");
    std::fs::write(&file, manifest).with_context(|| format!("writing {file:?}"))?;
    let kubectl = on_path("kubectl").context("no kubectl on PATH")?;
    let out = output_within(
        std::process::Command::new(kubectl)
            .arg("--kubeconfig")
            .arg(&files.kubeconfig)
            .args(["apply", "-f"])
            .arg(&file),
        Duration::from_secs(60),
    )?;
    if !out.status.success() {
        bail!(
            "kubectl apply -f {file:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    progress.line(format!(
        "sluice installed: kubectl apply -f {file:?} (the embedded manifests/sluice.yaml, sluice-config set to the lab's)"
    ));
    Ok(())
}

/// The `sluice-config` values the lab sets (what `register` writes on the other labs).
fn lab_config(plan: &super::plan::LabPlan) -> Vec<(&'static str, String)> {
    vec![
        ("cluster-cidr", plan.cluster_cidr_value()),
        ("subnet-length", super::plan::SUBNET_LENGTH.to_string()),
        (
            "subnet-length-v6",
            super::plan::SUBNET_LENGTH_V6.to_string(),
        ),
        ("subnet-source", plan.spec.subnet_source.as_str().into()),
        ("encryption", plan.spec.encryption.as_str().into()),
        ("overlay", plan.spec.overlay.as_str().into()),
    ]
}

/// Where the reference network's plugins are on the host (Debian's containernetworking-plugins).
fn reference_plugin(name: &str) -> Result<PathBuf> {
    ["/usr/lib/cni", "/opt/cni/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("no CNI {name} plugin for --reference-cni: install it (Debian: apt-get install containernetworking-plugins)"))
}

/// Checks, before anything is made, what `--reference-cni` needs: the standard plugins and one
/// L2 segment (its routes go straight to the other nodes' addresses).
pub fn check_reference(segments: u8) -> Result<()> {
    if segments != 1 {
        bail!("--reference-cni routes each podCIDR straight to its node: it needs --segments 1");
    }
    for p in kp::REFERENCE_PLUGINS {
        reference_plugin(p)?;
    }
    Ok(())
}

/// Wires the nodes with the reference network instead of sluice (`--reference-cni`, a
/// baseline for benchmarks): in every node, the standard plugins beside `loopback`, the kit's
/// bridge + host-local + portmap config on the node's podCIDR, and routes to every other
/// node's podCIDR. containerd sees the config and the kubelet turns the node Ready.
pub async fn install_reference_cni(
    plan: &super::plan::LabPlan,
    files: &LabFiles,
    progress: &mut super::Progress,
) -> Result<()> {
    let lab = plan.spec.name.as_str();
    let client = super::cluster::client(&files.kubeconfig).await?;
    let api: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    let mut nodes = Vec::new();
    for node in &plan.nodes {
        let cidr = api
            .get_opt(&node.name)
            .await?
            .and_then(|n| n.spec?.pod_cidr)
            .with_context(|| format!("node {} has no podCIDR", node.name))?;
        nodes.push((node.name.clone(), node.underlay.addr(), cidr));
    }
    for (node, (_, _, cidr)) in plan.nodes.iter().zip(&nodes) {
        let nl = kp::NodeLayout::new(lab, &node.name);
        for p in kp::REFERENCE_PLUGINS {
            let link = nl.private("/opt/cni/bin").join(p);
            if !link.exists() {
                std::os::unix::fs::symlink(reference_plugin(p)?, &link)
                    .with_context(|| format!("linking {link:?}"))?;
            }
        }
        for (dst, via) in kp::reference_routes(&nodes, &node.name) {
            let out = output_within(
                std::process::Command::new("ip").args([
                    "-n",
                    &node.netns,
                    "route",
                    "replace",
                    &dst,
                    "via",
                    &via.to_string(),
                ]),
                Duration::from_secs(10),
            )?;
            if !out.status.success() {
                bail!(
                    "route {dst} via {via} in {}: {}",
                    node.netns,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let ipam = nl.file("cni-ipam");
        std::fs::create_dir_all(&ipam)?;
        let conf = nl.private("/etc/cni/net.d").join(kp::REFERENCE_CONFLIST);
        std::fs::write(&conf, kp::reference_conflist(cidr, &ipam))
            .with_context(|| format!("writing {conf:?}"))?;
        progress.line(format!(
            "node {}: reference network (bridge + host-local on {cidr} + portmap), routes to {} other nodes",
            node.name,
            nodes.len() - 1
        ));
    }
    Ok(())
}
