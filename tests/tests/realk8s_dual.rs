//! A dual-stack cluster on real Kubernetes binaries (`sluice lab up --kubernetes DIR
//! --ip-family dual`, sluice installed from the manifest): kube-apiserver with a Service range
//! of each family, the controller-manager handing every Node a podCIDR of each, kubelets with
//! an InternalIP of each (the nodes' ULA underlay addresses), kube-proxy dual-stack (iptables and
//! ip6tables). Shown here:
//!
//! - every Node has both `spec.podCIDRs` and both InternalIPs; every pod both `status.podIPs`
//!   (what sluice-cni's result gave the kubelet), each in its node's podCIDR of that family,
//!   and `lab status` shows the IPv6 ones;
//! - every pod reaches every pod on every node over IPv4 and over IPv6 (ICMP, TCP, UDP, from
//!   inside the pods through `kubectl exec`);
//! - a Service with `ipFamilyPolicy: RequireDualStack` gets a ClusterIP of each family and an
//!   EndpointSlice of each; from a pod on a node with no backend, its IPv4 and its IPv6
//!   ClusterIP answer (TCP and UDP) from both backends on the other nodes, and the client
//!   node's conntrack shows kube-proxy's DNAT of each ClusterIP to a backend's address of that
//!   family;
//! - `lab down` leaves no process, cgroup, mount, namespace or file.
//!
//! Runs only when SLUICE_K8S_BIN names the binaries (see tests/tests/realk8s.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use ipnet::IpNet;
use serde_json::Value;
use sluice_e2e::lab::{lab_cmd, netns_with_prefix, output_text, Lab};
use sluice_e2e::realk8s::{
    apply, exec_get, host_port, k8s_bin, lab_cgroups, lab_mounts, lab_processes, netexec_pod,
    sluice_rolled_out, sweep_addrs_until_all, wait_running, RealPod,
};
use sluice_e2e::{eventually, have_root};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The lab's ranges (cmd/src/lab/plan.rs and k8s_plan.rs): what the components must use.
const CLUSTER_V4: &str = "10.244.0.0/16";
const CLUSTER_V6: &str = "fd00:10:244::/56";
const SERVICE_V4: &str = "10.96.0.0/12";
const SERVICE_V6: &str = "fd00:10:96::/112";

fn net(s: &str) -> IpNet {
    s.parse().unwrap_or_else(|_| panic!("{s:?} is not a CIDR"))
}

fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|_| panic!("{s:?} is not an address"))
}

/// Whether `s` (an address or a CIDR) is IPv4.
fn is_v4(s: &str) -> bool {
    match s.parse::<IpAddr>() {
        Ok(a) => a.is_ipv4(),
        Err(_) => net(s).addr().is_ipv4(),
    }
}

/// One address (or CIDR) of each family, IPv4 first, as the API lists them; panics otherwise.
fn both(what: &str, list: &[String]) -> (String, String) {
    assert_eq!(list.len(), 2, "{what}: {list:?}");
    assert!(is_v4(&list[0]) && !is_v4(&list[1]), "{what}: {list:?}");
    (list[0].clone(), list[1].clone())
}

/// Node name -> (IPv4 podCIDR, IPv6 podCIDR), after checking each Node's podCIDRs and
/// InternalIPs are one of each family, in the lab's ranges and on its underlay.
fn nodes(lab: &Lab) -> HashMap<String, (IpNet, IpNet)> {
    let list: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "nodes", "-o", "json"])).unwrap();
    let mut out = HashMap::new();
    for n in list["items"].as_array().unwrap() {
        let name = n["metadata"]["name"].as_str().unwrap().to_string();
        let cidrs: Vec<String> = n["spec"]["podCIDRs"]
            .as_array()
            .unwrap_or_else(|| panic!("{name} has no podCIDRs: {n:#}"))
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        let (v4, v6) = both(&format!("{name} podCIDRs"), &cidrs);
        let (v4, v6) = (net(&v4), net(&v6));
        assert!(
            net(CLUSTER_V4).contains(&v4) && v4.prefix_len() == 24,
            "{name}: {v4}"
        );
        assert!(
            net(CLUSTER_V6).contains(&v6) && v6.prefix_len() == 64,
            "{name}: {v6}"
        );
        let internal: Vec<String> = n["status"]["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["type"] == "InternalIP")
            .map(|a| a["address"].as_str().unwrap().to_string())
            .collect();
        let (a4, a6) = both(&format!("{name} InternalIPs"), &internal);
        assert!(net("172.31.0.0/16").contains(&ip(&a4)), "{name}: {a4}");
        assert!(net("fd00:31::/32").contains(&ip(&a6)), "{name}: {a6}");
        out.insert(name, (v4, v6));
    }
    let distinct: BTreeSet<String> = out
        .values()
        .flat_map(|(a, b)| [a.to_string(), b.to_string()])
        .collect();
    assert_eq!(distinct.len(), 2 * out.len(), "{out:?}");
    out
}

/// The lines of `conntrack -L` in `netns` for flows to `dst` (port `dport`).
fn conntrack_to(netns: &str, family: &str, dst: &str, dport: u16) -> String {
    let out = std::process::Command::new("timeout")
        .args(["10", "ip", "netns", "exec", netns, "conntrack", "-L", "-f"])
        .args([family, "-d", dst])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("dport={dport} ")))
        .map(str::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_ipv4_only_reference_network_is_refused_on_a_dual_stack_lab_and_nothing_is_made() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin("realk8s_dual") else {
        return;
    };
    sluice_e2e::lab::up_is_refused(
        &[
            "--kubernetes",
            &bin,
            "--ip-family",
            "dual",
            "--reference-cni",
        ],
        "--reference-cni wires IPv4 only",
    );
}

#[test]
fn dual_stack_pods_and_services_on_real_kubernetes() {
    if !have_root() {
        return;
    }
    let Some(bin) = k8s_bin("realk8s_dual") else {
        return;
    };
    let started = Instant::now();
    let lab = Lab::up(&["--nodes", "3", "--kubernetes", &bin, "--ip-family", "dual"]);
    sluice_rolled_out(&lab, Duration::from_secs(90));
    eprintln!(
        "realk8s-dual: lab up and sluice rolled out in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let node_cidrs = nodes(&lab);
    assert_eq!(node_cidrs.len(), 3, "{node_cidrs:?}");
    let mut node_names: Vec<String> = node_cidrs.keys().cloned().collect();
    node_names.sort();

    // sluice-config as the lab installed it: both ranges.
    let config = lab.kubectl_ok(&[
        "-n",
        "kube-system",
        "get",
        "configmap",
        "sluice-config",
        "-o",
        "jsonpath={.data.cluster-cidr}",
    ]);
    assert_eq!(config.trim(), format!("{CLUSTER_V4},{CLUSTER_V6}"));

    // Two pods on each node (agnhost netexec: HTTP 8080, UDP 8081); `srv-2-1` and `srv-3-1`
    // are the Service's backends, the client `srv-1-1` on the first node has none beside it.
    let t = Instant::now();
    for (i, node) in node_names.iter().enumerate() {
        for j in 1..=2 {
            let backend = if i > 0 && j == 1 { "yes" } else { "no" };
            netexec_pod(
                &lab,
                &format!("srv-{}-{j}", i + 1),
                node,
                "dual",
                &[("backend", backend)],
                false,
                8080,
            );
        }
    }
    let pods = wait_running(&lab, "dual", 6, Duration::from_secs(120));
    eprintln!(
        "realk8s-dual: 6 pods running in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Every pod: an address of each family, in its node's podCIDR of that family.
    let mut v6_of: HashMap<String, String> = HashMap::new();
    for p in &pods {
        let (a4, a6) = both(&format!("{} podIPs", p.name), &p.ips);
        assert_eq!(a4, p.ip, "{p:?}");
        let (c4, c6) = node_cidrs[&p.node];
        assert!(c4.contains(&ip(&a4)), "{p:?} not in {c4}");
        assert!(c6.contains(&ip(&a6)), "{p:?} not in {c6}");
        v6_of.insert(p.name.clone(), a6);
    }

    // `lab status` shows each real pod's IPv6 address and each node's IPv6 underlay address.
    let status = lab.status();
    for p in &pods {
        let row = status["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == p.name.as_str())
            .unwrap_or_else(|| panic!("{} not in lab status: {status:#}", p.name));
        assert_eq!(row["ip"], p.ip.as_str(), "{row}");
        assert_eq!(row["ipv6"], v6_of[&p.name].as_str(), "{row}");
    }
    for n in status["nodes"].as_array().unwrap() {
        let v6 = n["underlayV6"].as_str().unwrap_or_default();
        assert!(net("fd00:31::/32").contains(&ip(v6)), "{n}");
        assert_eq!(n["podCIDRs"].as_array().map(Vec::len), Some(2), "{n}");
    }

    // Every pod to every pod, over both families, ICMP, TCP and UDP.
    let t = Instant::now();
    let targets: Vec<(String, String)> = pods
        .iter()
        .flat_map(|p| {
            p.ips
                .iter()
                .map(|a| (p.name.clone(), a.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(targets.len(), 12);
    let mut misses = Vec::new();
    for p in &pods {
        misses.extend(sweep_addrs_until_all(
            &lab,
            &p.name,
            &targets,
            Duration::from_secs(30),
        ));
    }
    assert!(misses.is_empty(), "not answered: {misses:#?}");
    eprintln!(
        "realk8s-dual: 6 x 12 addresses x ICMP/TCP/UDP all answered in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    dual_stack_service(&lab, &pods, &node_names);

    let t = Instant::now();
    let out = lab.down();
    assert!(out.status.success(), "{}", output_text(&out));
    eprintln!(
        "realk8s-dual: lab down in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(lab_processes(&lab).is_empty(), "{:#?}", lab_processes(&lab));
    assert!(lab_cgroups(&lab).is_empty(), "{:?}", lab_cgroups(&lab));
    assert!(lab_mounts(&lab).is_empty(), "{:?}", lab_mounts(&lab));
    assert!(netns_with_prefix(&lab.prefix()).is_empty());
    assert!(!std::path::Path::new(&format!("/run/sluice/lab/{}", lab.name)).exists());
    // And the lab is gone for the CLI too.
    let out = lab_cmd(&["status", "--name", &lab.name], 30);
    assert!(!out.status.success());
    eprintln!(
        "realk8s-dual: wall time {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A RequireDualStack Service in front of `srv-2-1` and `srv-3-1`, reached from `srv-1-1`
/// (first node, no backend there) on its IPv4 and its IPv6 ClusterIP through kube-proxy.
fn dual_stack_service(lab: &Lab, pods: &[RealPod], nodes: &[String]) {
    apply(
        lab,
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: dual\nspec:\n  \
         ipFamilyPolicy: RequireDualStack\n  ipFamilies: [IPv4, IPv6]\n  \
         selector:\n    backend: \"yes\"\n  ports:\n  \
         - {name: http, port: 80, targetPort: 8080, protocol: TCP}\n  \
         - {name: udp, port: 81, targetPort: 8081, protocol: UDP}\n",
    );
    let svc: Value =
        serde_json::from_str(&lab.kubectl_ok(&["get", "service", "dual", "-o", "json"])).unwrap();
    let ips: Vec<String> = svc["spec"]["clusterIPs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let (vip4, vip6) = both("the Service's clusterIPs", &ips);
    assert!(net(SERVICE_V4).contains(&ip(&vip4)), "{vip4}");
    assert!(net(SERVICE_V6).contains(&ip(&vip6)), "{vip6}");
    assert_eq!(
        svc["spec"]["ipFamilies"],
        serde_json::json!(["IPv4", "IPv6"])
    );

    let backends: Vec<&RealPod> = pods
        .iter()
        .filter(|p| p.name == "srv-2-1" || p.name == "srv-3-1")
        .collect();
    assert_eq!(backends.len(), 2);
    let client = pods.iter().find(|p| p.name == "srv-1-1").unwrap();
    assert_eq!(client.node, nodes[0]);
    assert!(backends.iter().all(|b| b.node != client.node));

    // An EndpointSlice of each family, with both backends' addresses of that family.
    let want_slices = |family: &str, idx: usize| -> BTreeSet<String> {
        backends
            .iter()
            .map(|b| b.ips[idx].clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|a| format!("{family} {a}"))
            .collect()
    };
    let want: BTreeSet<String> = want_slices("IPv4", 0)
        .union(&want_slices("IPv6", 1))
        .cloned()
        .collect();
    let mut seen = BTreeSet::new();
    let slices_ok = eventually(Duration::from_secs(30), || {
        let list: Value = serde_json::from_str(&lab.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=dual",
            "-o",
            "json",
        ]))
        .unwrap();
        seen = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| {
                let family = s["addressType"].as_str().unwrap_or("").to_string();
                s["endpoints"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|e| e["conditions"]["ready"] == true)
                    .flat_map(move |e| {
                        let family = family.clone();
                        e["addresses"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default()
                            .into_iter()
                            .map(move |a| format!("{family} {}", a.as_str().unwrap_or("")))
                    })
            })
            .collect();
        seen == want
    });
    assert!(slices_ok, "EndpointSlices: {seen:?}, want {want:?}");

    let client_netns = lab.node_netns(&client.node);
    let names: BTreeSet<String> = backends.iter().map(|b| b.name.clone()).collect();
    for (family, vip, idx) in [("ipv4", &vip4, 0), ("ipv6", &vip6, 1)] {
        // TCP: both backends answer through the ClusterIP (kube-proxy picks one at random per
        // connection: 40 tries miss one of two with odds 2^-39).
        let to = host_port(vip, 80);
        let mut answered = BTreeSet::new();
        let mut errors = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        for _ in 0..40 {
            match exec_get(lab, &client.name, &to, "/hostname") {
                Ok(name) => {
                    assert!(names.contains(&name), "{to} answered by {name:?}");
                    answered.insert(name);
                }
                Err(e) => errors.push(e),
            }
            if answered == names || Instant::now() > deadline {
                break;
            }
        }
        assert_eq!(
            answered, names,
            "{family} ClusterIP {to} from {} ({}): answered by {answered:?}; errors {errors:#?}",
            client.name, client.node
        );
        // The backend sees the client's own address of that family (no SNAT inside the
        // cluster: kube-proxy knows the pods' range of each family).
        let clientip = exec_get(lab, &client.name, &to, "/clientip").unwrap();
        let seen = clientip
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .unwrap_or_default();
        assert_eq!(seen, client.ips[idx], "{to}/clientip said {clientip:?}");
        // UDP through the same ClusterIP (agnhost connect waits for netexec's answer).
        let udp = host_port(vip, 81);
        let udp_ok = eventually(Duration::from_secs(20), || {
            lab.kubectl(&[
                "exec",
                &client.name,
                "--",
                "/agnhost",
                "connect",
                &udp,
                "--protocol=udp",
                "--timeout=3s",
            ])
            .status
            .success()
        });
        assert!(udp_ok, "{family} ClusterIP {udp} (UDP) not answered");
        // kube-proxy's DNAT on the client's node: the flows to the ClusterIP were answered by
        // a backend's address of the same family.
        let flows = conntrack_to(&client_netns, family, vip, 80);
        let backend_ips: Vec<&str> = backends.iter().map(|b| b.ips[idx].as_str()).collect();
        assert!(
            flows
                .lines()
                .any(|l| backend_ips.iter().any(|b| l.contains(&format!("src={b} ")))),
            "no DNAT of {vip}:80 to {backend_ips:?} in {client_netns}'s conntrack:\n{flows}"
        );
        // kube-proxy has the pods' range of this family: traffic to the ClusterIP from outside
        // it is marked for masquerade, from inside it is not.
        let (save, range) = if idx == 0 {
            ("iptables-save", CLUSTER_V4)
        } else {
            ("ip6tables-save", CLUSTER_V6)
        };
        let out = std::process::Command::new("timeout")
            .args([
                "10",
                "ip",
                "netns",
                "exec",
                &client_netns,
                save,
                "-t",
                "nat",
            ])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&out.stdout);
        let masq = format!("-d {}/{} ", vip, if idx == 0 { 32 } else { 128 });
        assert!(
            rules.lines().any(|l| l.contains(&masq)
                && l.contains(&format!("! -s {range} "))
                && l.contains("KUBE-MARK-MASQ")),
            "no off-cluster masquerade rule for {vip} with ! -s {range} in {client_netns}:\n{rules}"
        );
        eprintln!(
            "realk8s-dual: {family} ClusterIP {vip}: TCP answered by {answered:?}, the client's own address seen, UDP answered, DNAT in conntrack"
        );
    }
}
