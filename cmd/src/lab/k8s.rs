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

fn etcd() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .context("no etcd on PATH: install it (Debian: apt-get install etcd-server)")
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
fn write_pki(layout: &Layout, api: SocketAddr, lab: &str) -> Result<String> {
    let pki_dir = layout.dir.join("pki");
    let kc_dir = layout.dir.join("kubeconfig");
    for d in [layout.dir, &pki_dir, &kc_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {d:?}"))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))?;
    }
    let ca = Ca::new(&format!("sluice-lab-{lab}-ca"))?;
    pki::write_file(&pki_dir.join("ca.crt"), &ca.cert.cert_pem, 0o644)?;
    ca.serving(
        "kube-apiserver",
        &[
            "127.0.0.1",
            "localhost",
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
    for (who, user, groups) in [
        ("admin", ADMIN_USER, &["system:masters"][..]),
        (
            "kube-controller-manager",
            "system:kube-controller-manager",
            &[][..],
        ),
        ("kube-scheduler", "system:kube-scheduler", &[][..]),
        ("kube-proxy", "system:kube-proxy", &[][..]),
    ] {
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
/// pid in `NAME.pid`.
fn spawn(dir: &Path, name: &str, program: &Path, args: &[String]) -> Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let log = std::fs::File::create(logs.join(format!("{name}.log")))?;
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
    cluster_cidr: &str,
    progress: &mut super::Progress,
) -> Result<SocketAddr> {
    let version = check_binaries(bin)?;
    let etcd = etcd()?;
    let bin = std::fs::canonicalize(bin).with_context(|| format!("resolving {bin:?}"))?;
    let dir = dir(files);
    let layout = Layout { dir: &dir };
    let ports = free_ports()?;
    let api = SocketAddr::from(([127, 0, 0, 1], ports.apiserver));
    let admin = write_pki(&layout, api, lab)?;
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
        &kp::apiserver_args(&layout, &ports),
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
        "kube-apiserver at https://{api} (pid {}), RBAC and Node authorization",
        api_child.id()
    ));
    let cm = spawn(
        &dir,
        "kube-controller-manager",
        &bin.join("kube-controller-manager"),
        &kp::controller_manager_args(&layout, &ports, cluster_cidr),
    )?;
    let sched = spawn(
        &dir,
        "kube-scheduler",
        &bin.join("kube-scheduler"),
        &kp::scheduler_args(&layout, &ports),
    )?;
    progress.line(format!(
        "kube-controller-manager (pid {}, podCIDRs from {cluster_cidr}), kube-scheduler (pid {})",
        cm.id(),
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
    let cidr = plan.cluster_cidr.to_string();
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
        let path = sluice_net::netns::named_path(&node.netns);
        let file = sluice_net::netns::open(&path)?;
        let program = bin.join("kube-proxy");
        let pid = sluice_net::netns::run_in(&file, &path, || {
            spawn(&dir, &name, &program, &args).map(|c| c.id())
        })??;
        progress.line(format!("kube-proxy on {} (pid {pid})", node.name));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in &plan.nodes {
        while !has_service_chain(&node.netns).await {
            if Instant::now() > deadline {
                bail!(
                    "kube-proxy on {} wrote no KUBE-SERVICES chain within 60 s:\n{}",
                    node.name,
                    log_tail(&dir, &format!("kube-proxy-{}", node.name))
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    progress.line("kube-proxy: Service rules in every node".into());
    Ok(())
}

/// Whether the nat table of `netns` has kube-proxy's `KUBE-SERVICES` chain.
async fn has_service_chain(netns: &str) -> bool {
    let out = tokio::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "iptables",
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
    dead.sort();
    dead
}
