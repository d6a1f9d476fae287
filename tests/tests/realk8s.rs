//! `sluice lab up --kubernetes DIR` on real Kubernetes binaries: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler on the host's loopback; in every node, in its own
//! mount namespace, containerd, the kubelet and kube-proxy; sluice installed as a user installs
//! it (its image loaded into every node's containerd, `kubectl apply` of the manifest), its
//! DaemonSet rolled out on every node. Nodes turn Ready once the DaemonSet's agent installed the
//! CNI config; pods reach the API server through the `kubernetes` Service (TCP and TLS, with
//! their service-account token); a Deployment's pods, wired by the real kubelet
//! through the node's /opt/cni/bin/sluice-cni, reach each other (ICMP, TCP, UDP through
//! `kubectl exec`), `kubectl logs` and `port-forward` work, a ClusterIP Service answers through the real
//! kube-proxy, a NetworkPolicy is enforced, and `lab down` leaves no process (containerd, its
//! shims, the pods' containers), cgroup, mount, namespace or file. Runs only when
//! SLUICE_K8S_BIN names the binaries (CI unpacks them from ../shared/realk8s; the images come
//! from DIR/../images or SLUICE_K8S_IMAGES).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::have_root;
use sluice_e2e::lab::{lab_cmd, netns_with_prefix, output_text, status_pods, Lab};
use sluice_e2e::realk8s::{
    connects, eventually_connects, k8s_bin, lab_cgroups, lab_mounts, lab_processes, running,
    sluice_rolled_out, sweep_until_all, RealPod, AGNHOST,
};

use std::time::{Duration, Instant};

fn in_subnet(ip: &str, cidr: &str) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (net, len): (std::net::Ipv4Addr, u32) = (net.parse().unwrap(), len.parse().unwrap());
    let ip: std::net::Ipv4Addr = ip.parse().unwrap();
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

/// `kubectl port-forward POD :8080` (a free local port on 127.0.0.1), then one HTTP GET of
/// `path` through it; the body. Bounded; the port-forward is stopped (by its PID) after.
fn port_forward_get(lab: &Lab, pod: &str, path: &str) -> String {
    use std::io::{BufRead, Read, Write};
    let mut child = std::process::Command::new("timeout")
        .args(["-k", "5", "60", "kubectl", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .args(["port-forward", "--address", "127.0.0.1", pod, ":8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    // "Forwarding from 127.0.0.1:PORT -> 8080" (kubectl ends within 60 s at the latest).
    let line = lines.next().unwrap().unwrap();
    let port: u16 = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("kubectl port-forward said {line:?}"));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    // TERM to `timeout`, which passes it on to kubectl (a KILL would orphan kubectl).
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    assert!(
        reply.starts_with("HTTP/1.") && reply.contains(" 200 "),
        "{reply}"
    );
    reply
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

#[test]
fn a_directory_without_the_binaries_is_refused_and_nothing_is_made() {
    if !have_root() || k8s_bin("realk8s").is_none() {
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    let dir = empty.path().to_str().unwrap();
    sluice_e2e::lab::up_is_refused(
        &["--kubernetes", dir],
        "lacks kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy",
    );
    // Real binaries but no sandbox image to import (nothing is pulled): refused up front too.
    let bin = k8s_bin("realk8s").unwrap();
    sluice_e2e::lab::up_is_refused(
        &["--kubernetes", &bin, "--k8s-images", dir],
        "has no pause.tar",
    );
}

#[test]
fn pods_services_and_policy_on_real_kubernetes() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin("realk8s") else {
        return;
    };
    let started = Instant::now();
    let lab = Lab::up(&["--nodes", "3", "--kubernetes", &bin]);
    eprintln!(
        "realk8s: lab up (3 nodes: control plane, containerd, kubelets Ready) took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(!lab_processes(&lab).is_empty());

    // sluice as a user installs it: the DaemonSet of manifests/sluice.yaml rolled out on every
    // node (bounded), its agents in containers of the manifest's image, none the lab's own.
    let started = Instant::now();
    sluice_rolled_out(&lab, Duration::from_secs(60));
    eprintln!(
        "realk8s: kubectl rollout status ds/sluice: done in {:.1} s after lab up",
        started.elapsed().as_secs_f64()
    );
    let agents: Value = serde_json::from_str(&lab.kubectl_ok(&[
        "-n",
        "kube-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=sluice",
        "-o",
        "json",
    ]))
    .unwrap();
    let agents = agents["items"].as_array().unwrap().clone();
    let mut agent_started = std::collections::HashMap::new();
    for a in &agents {
        let node = a["spec"]["nodeName"].as_str().unwrap().to_string();
        let c = &a["status"]["containerStatuses"][0];
        assert_eq!(c["image"], "ghcr.io/sluice-net/sluice:v0.1.0", "{a:#}");
        assert_eq!(c["ready"], true, "{a:#}");
        let since: jiff::Timestamp = c["state"]["running"]["startedAt"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        // No agent of the lab's own: the lab daemon started none.
        let pid_file = format!("/run/sluice/lab/{}/nodes/{node}/agent.pid", lab.name);
        assert!(!std::path::Path::new(&pid_file).exists(), "{pid_file}");
        agent_started.insert(node, since);
    }
    assert_eq!(agent_started.len(), 3, "{agents:#?}");

    // The real kubelets registered the Nodes; the real controller-manager gave each a
    // podCIDR; every node is Ready (the DaemonSet's agent has installed the CNI config).
    let nodes: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    let items = nodes["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let mut cidrs = std::collections::HashMap::new();
    for n in items {
        let name = n["metadata"]["name"].as_str().unwrap().to_string();
        let cidr = n["spec"]["podCIDR"].as_str().expect("podCIDR").to_string();
        assert!(
            n["status"]["nodeInfo"]["containerRuntimeVersion"]
                .as_str()
                .unwrap()
                .starts_with("containerd://"),
            "{n:#}"
        );
        let ready = n["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Ready" && c["status"] == "True")
            .unwrap_or_else(|| panic!("{name} not Ready: {n:#}"));
        // Ready came after the agent's CNI config (the kubelet registered the node NotReady
        // some seconds before the agents started).
        let root = format!("/run/sluice/lab/{}/k8s/nodes/{name}/root", lab.name);
        let conf = std::fs::metadata(format!("{root}/etc/cni/net.d/10-sluice.conflist"))
            .unwrap()
            .modified()
            .unwrap()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let since: jiff::Timestamp = ready["lastTransitionTime"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let registered: jiff::Timestamp = n["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            since.as_second() >= conf as i64 && registered.as_second() < since.as_second(),
            "{name}: Ready since {since}, registered {registered}, CNI config written at {conf}"
        );
        let agent = agent_started[&name];
        assert!(
            agent.as_second() <= since.as_second(),
            "{name}: Ready since {since}, before its sluice pod started ({agent})"
        );
        cidrs.insert(name, cidr);
    }
    // The CNI config Ready waited for is sluice's, in the node's own /etc/cni/net.d, and the
    // plugin is in the node's own /opt/cni/bin.
    for node in cidrs.keys() {
        let root = format!("/run/sluice/lab/{}/k8s/nodes/{node}/root", lab.name);
        let conf =
            std::fs::read_to_string(format!("{root}/etc/cni/net.d/10-sluice.conflist")).unwrap();
        assert!(conf.contains("\"sluice-cni\""), "{conf}");
        assert!(std::path::Path::new(&format!("{root}/opt/cni/bin/sluice-cni")).is_file());
    }

    // The `kubernetes` Service has the advertised address as its endpoint (not loopback).
    let endpoints = lab.kubectl_ok(&[
        "get",
        "endpoints",
        "kubernetes",
        "-o",
        "jsonpath={.subsets[0].addresses[0].ip}",
    ]);
    assert_eq!(endpoints.trim(), "172.31.0.254");
    // An in-cluster client in a pod (agnhost's `inclusterclient`: client-go's in-cluster
    // config, i.e. https://10.96.0.1:443 with the service-account CA and token), started now
    // and read after the Deployment is up.
    // The same from a host-network pod (as sluice's own agents are).
    for (pod, overrides) in [
        ("incluster", "{}"),
        ("incluster-host", r#"{"spec":{"hostNetwork":true}}"#),
    ] {
        lab.kubectl_ok(&[
            "run",
            pod,
            &format!("--image={AGNHOST}"),
            "--restart=Never",
            &format!("--overrides={overrides}"),
            "--command",
            "--",
            "/agnhost",
            "inclusterclient",
            "--poll-interval=1",
        ]);
    }

    // A Deployment of 6 agnhost replicas: the controller-manager makes the pods, the scheduler
    // spreads them, the kubelets run them through containerd and sluice-cni.
    let started = Instant::now();
    lab.kubectl_ok(&[
        "create",
        "deployment",
        "web",
        &format!("--image={AGNHOST}"),
        "--replicas=6",
        "--",
        "/agnhost",
        "netexec",
        "--http-port=8080",
        "--udp-port=8081",
    ]);
    let pods = loop {
        let (pods, list) = running(&lab, "web");
        if pods.len() == 6 {
            break pods;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{} of 6 replicas running after 120 s: {list:#}",
            pods.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    eprintln!(
        "realk8s: 6 replicas running {:.1} s after kubectl create deployment",
        started.elapsed().as_secs_f64()
    );
    let mut spread: Vec<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    spread.sort_unstable();
    spread.dedup();
    assert_eq!(
        spread.len(),
        3,
        "replicas not spread over the nodes: {pods:?}"
    );
    for p in &pods {
        assert!(
            in_subnet(&p.ip, &cidrs[&p.node]),
            "{} on {} has {} outside its node's {}",
            p.name,
            p.node,
            p.ip,
            cidrs[&p.node]
        );
    }

    // Every pod reaches every other pod: ICMP, TCP, UDP, through kubectl exec.
    let started = Instant::now();
    for p in &pods {
        let others: Vec<RealPod> = pods.iter().filter(|o| o.name != p.name).cloned().collect();
        let bad = sweep_until_all(&lab, &p.name, &others, Duration::from_secs(30));
        assert!(bad.is_empty(), "unanswered: {bad:#?}");
    }
    eprintln!(
        "realk8s: 6x5 pod pairs answered ICMP, TCP and UDP ({:.1} s)",
        started.elapsed().as_secs_f64()
    );

    // Pods reach the API server through the `kubernetes` Service: a TCP connect from a pod
    // on every node, and the in-cluster client's TLS requests (verified against the cluster
    // CA, for the name 10.96.0.1) answered, none failed.
    for node in cidrs.keys() {
        let p = pods.iter().find(|p| &p.node == node).unwrap();
        let out = lab.kubectl(&[
            "exec",
            &p.name,
            "--",
            "/agnhost",
            "connect",
            "--timeout=5s",
            "10.96.0.1:443",
        ]);
        assert!(
            out.status.success(),
            "{} on {node} -> kubernetes Service 10.96.0.1:443: {}",
            p.name,
            output_text(&out)
        );
    }
    let host = lab.kubectl_ok(&[
        "get",
        "pod",
        "incluster-host",
        "-o",
        "jsonpath={.spec.hostNetwork}",
    ]);
    assert_eq!(host.trim(), "true");
    for pod in ["incluster", "incluster-host"] {
        let started = Instant::now();
        let logs = loop {
            let logs = lab.kubectl(&["logs", pod]);
            let text = String::from_utf8_lossy(&logs.stdout).into_owned();
            // Each request is logged before it is sent ("authz_header=..."); the third means
            // two came back (the loop waits for each), and every failure is logged
            // "status=failed".
            if text.matches("authz_header=").count() >= 3
                || started.elapsed() > Duration::from_secs(30)
            {
                break text;
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        assert!(
            logs.matches("authz_header=").count() >= 3
                && !logs.contains("status=failed")
                && !logs.contains("authz_header=<empty>"),
            "{pod}: in-cluster client through the kubernetes Service: {logs}"
        );
    }

    // kubectl logs: the API server reads them from the kubelet.
    let logs = lab.kubectl_ok(&["logs", &pods[0].name]);
    assert!(logs.contains("Started HTTP server on port 8080"), "{logs}");

    // kubectl port-forward: the API server -> the kubelet -> containerd's stream server in the
    // node; a local port on the host's loopback (chosen by kubectl) reaches the pod.
    let answer = port_forward_get(&lab, &pods[1].name, "/hostname");
    assert_eq!(answer.trim(), pods[1].name);

    // A ClusterIP Service in front of the replicas on other nodes, through the real kube-proxy.
    let a = &pods[0];
    let b = pods.iter().find(|p| p.node != a.node).unwrap();
    lab.kubectl_ok(&["label", "pod", &b.name, "role=backend"]);
    let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: backend\nspec:\n  selector:\n    role: backend\n  ports:\n  - port: 80\n    targetPort: 8080\n    protocol: TCP\n";
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), svc).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.path().to_str().unwrap()]);
    let vip = lab.kubectl_ok(&[
        "get",
        "service",
        "backend",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ]);
    let vip = format!("{}:80", vip.trim());
    assert!(
        eventually_connects(&lab, &a.name, &vip, true, Duration::from_secs(40)),
        "{} -> Service backend {vip} unanswered",
        a.name
    );

    // A NetworkPolicy admitting nobody to b: the Service and the pod fall silent.
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: deny-backend\nspec:\n  podSelector:\n    matchLabels:\n      role: backend\n  policyTypes: [Ingress]\n";
    std::fs::write(file.path(), policy).unwrap();
    lab.kubectl_ok(&["apply", "-f", file.path().to_str().unwrap()]);
    let b_addr = format!("{}:8080", b.ip);
    assert!(
        eventually_connects(&lab, &a.name, &b_addr, false, Duration::from_secs(20)),
        "deny-all ingress to {} not enforced",
        b.name
    );
    assert!(!connects(&lab, &a.name, &vip));
    let c = pods
        .iter()
        .find(|p| p.name != a.name && p.name != b.name)
        .unwrap();
    assert!(connects(&lab, &a.name, &format!("{}:8080", c.ip)));
    lab.kubectl_ok(&["delete", "networkpolicy", "deny-backend"]);
    assert!(
        eventually_connects(&lab, &a.name, &b_addr, true, Duration::from_secs(20)),
        "{} still blocked after the policy went",
        b.name
    );

    // `lab agent` does not pretend to run the DaemonSet's agents: it says how to restart one,
    // and that works: the DaemonSet makes a new pod, which rolls out, and pods still connect.
    let out = lab_cmd(&["agent", "--name", &lab.name, "stop", &a.node], 30);
    let said = output_text(&out);
    assert!(
        !out.status.success() && said.contains("DaemonSet kube-system/sluice"),
        "{said}"
    );
    let field = format!("spec.nodeName={}", a.node);
    lab.kubectl_ok(&[
        "-n",
        "kube-system",
        "delete",
        "pod",
        "-l",
        "app.kubernetes.io/name=sluice",
        "--field-selector",
        &field,
    ]);
    sluice_rolled_out(&lab, Duration::from_secs(60));
    assert!(
        eventually_connects(&lab, &a.name, &b_addr, true, Duration::from_secs(20)),
        "{} -> {} after {}'s agent was replaced",
        a.name,
        b.name,
        a.node
    );

    let started = Instant::now();
    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
    eprintln!(
        "realk8s: lab down took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(netns_with_prefix(&lab.prefix()).is_empty());
    assert!(
        lab_processes(&lab).is_empty(),
        "left running: {:?}",
        lab_processes(&lab)
    );
    assert!(lab_cgroups(&lab).is_empty(), "{:?}", lab_cgroups(&lab));
    assert!(lab_mounts(&lab).is_empty(), "{:?}", lab_mounts(&lab));
    assert!(!std::path::Path::new(&format!("/run/sluice/lab/{}", lab.name)).exists());
}

/// The external-API mode (`--kubeconfig`, as `SLUICE_E2E_KUBECONFIG`) against a real
/// kube-apiserver with no controller-manager: the lab makes what the controllers would (its
/// namespace's default ServiceAccount), else the API server refuses its pods ("error looking up
/// service account"). The API server is a first lab's, its controller-manager killed first.
#[test]
fn external_mode_on_a_real_api_server_without_controllers() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin("realk8s") else {
        return;
    };
    let host = Lab::up(&["--nodes", "1", "--pods-per-node", "1", "--kubernetes", &bin]);
    let marker = format!("/run/sluice/lab/{}/", host.name);
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        if c.contains(&marker) && c.contains("kube-controller-manager") {
            // A process this test's lab started, found by its lab path, killed by PID.
            let ok = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            killed += usize::from(ok);
        }
    }
    assert_eq!(killed, 1, "no kube-controller-manager of lab {}", host.name);
    let kc = host.kubeconfig();
    let lab = Lab::up(&[
        "--nodes",
        "1",
        "--pods-per-node",
        "1",
        "--kubeconfig",
        kc.to_str().unwrap(),
    ]);
    let status = lab.status();
    let pods = status_pods(&status);
    assert_eq!(pods.len(), 1, "{status:#}");
    let sa = host.kubectl_ok(&[
        "get",
        "serviceaccount",
        "default",
        "-n",
        &lab.name,
        "-o",
        "jsonpath={.metadata.name}",
    ]);
    assert_eq!(sa.trim(), "default");
    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
    let out = host.down();
    assert!(out.status.success(), "{}", output_text(&out));
}
