//! The verbs against an in-memory kernel, with a failure injected at every step of ADD.

use super::*;
use crate::cni::config::Attachment;
use crate::cni::CniVersion;
use crate::kernel::{ObservedPod, PodLink};
use sluice_policy::hostport::HostportEntry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    CreateVeth,
    ConfigureHost,
    ConfigurePod,
    Shape,
}

/// What the fake kernel holds per host link: whether host and pod sides are configured.
#[derive(Debug, Default, Clone)]
struct FakeLink {
    address: Option<Ipv4Addr>,
    /// The IPv6 address the host routes to this link (and the pod holds, once configured).
    address_v6: Option<Ipv6Addr>,
    host_configured: bool,
    pod_configured: bool,
}

#[derive(Default)]
struct FakeKernel {
    links: BTreeMap<String, FakeLink>,
    /// Shaping per host link, and the ifbs it made.
    shaped: BTreeMap<String, crate::bandwidth::ShapingPlan>,
    ifbs: std::collections::BTreeSet<String>,
    fail_at: Option<Step>,
    has_netns: bool,
    /// The hostPort rules in the fake firewall, as last applied (`None`: never written).
    hostports: Option<Vec<HostportEntry>>,
    /// Makes every hostPort write fail.
    fail_hostports: bool,
    /// A hostPort write failed since the last that worked.
    hostports_drifted: bool,
    /// Host veths with route_localnet set.
    localnet: Vec<String>,
    /// The backend each hostPort write was told.
    backends: Vec<Option<String>>,
}

impl FakeKernel {
    fn new() -> Self {
        Self {
            has_netns: true,
            ..Default::default()
        }
    }

    fn fail(&self, step: Step) -> Result<(), KernelError> {
        if self.fail_at == Some(step) {
            return Err(KernelError::Sysctl {
                path: format!("injected/{step:?}"),
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }
}

impl PodKernel for FakeKernel {
    async fn create_veth(&mut self, plan: &PodPlan) -> Result<PodLink, KernelError> {
        if !self.has_netns {
            return Err(KernelError::NoPodNetns);
        }
        self.links
            .insert(plan.host_ifname.clone(), FakeLink::default());
        self.fail(Step::CreateVeth)?;
        Ok(PodLink {
            mac: vec![2, 0, 0, 0, 0, 1],
        })
    }
    async fn configure_host(&mut self, plan: &PodPlan) -> Result<(), KernelError> {
        self.fail(Step::ConfigureHost)?;
        let l = self
            .links
            .get_mut(&plan.host_ifname)
            .ok_or(KernelError::NoPodNetns)?;
        l.host_configured = true;
        l.address = plan.address;
        l.address_v6 = plan.address_v6;
        Ok(())
    }
    async fn configure_pod(&mut self, plan: &PodPlan) -> Result<(), KernelError> {
        self.fail(Step::ConfigurePod)?;
        self.links
            .get_mut(&plan.host_ifname)
            .ok_or(KernelError::NoPodNetns)?
            .pod_configured = true;
        Ok(())
    }
    async fn delete_host_link(&mut self, name: &str) -> Result<bool, KernelError> {
        // A veth's qdiscs go with it.
        self.shaped.remove(name);
        Ok(self.links.remove(name).is_some() | self.ifbs.remove(name))
    }
    async fn observe(&mut self, plan: &PodPlan) -> Result<ObservedPod, KernelError> {
        let Some(l) = self.links.get(&plan.host_ifname) else {
            return Ok(ObservedPod::default());
        };
        let v6 = plan.address_v6.filter(|a| l.address_v6 == Some(*a));
        Ok(ObservedPod {
            host_link_up: Some(true),
            host_route: l.host_configured && plan.address.is_some() && l.address == plan.address,
            pod_link_up: Some(true),
            pod_addresses: if l.pod_configured {
                plan.address.map(|a| (a, 32)).into_iter().collect()
            } else {
                vec![]
            },
            pod_default_via_gateway: l.pod_configured,
            host_route_v6: l.host_configured && v6.is_some(),
            host_gateway_v6: l.host_configured && l.address_v6.is_some(),
            pod_addresses_v6: match v6 {
                Some(a) if l.pod_configured => vec![(a, 128)],
                _ => vec![],
            },
            pod_default_v6_via_gateway: l.pod_configured && v6.is_some(),
        })
    }
    async fn host_veths(&mut self) -> Result<Vec<String>, KernelError> {
        Ok(self
            .links
            .keys()
            .cloned()
            .chain(["eth9".to_string()])
            .collect())
    }
    async fn apply_shaping(
        &mut self,
        host_ifname: &str,
        plan: &crate::bandwidth::ShapingPlan,
    ) -> Result<(), KernelError> {
        if plan.egress.is_some() {
            self.ifbs.insert(crate::bandwidth::ifb_name(host_ifname));
        }
        self.fail(Step::Shape)?;
        self.shaped.insert(host_ifname.to_string(), *plan);
        Ok(())
    }
    async fn remove_shaping(&mut self, host_ifname: &str) -> Result<bool, KernelError> {
        Ok(self.ifbs.remove(&crate::bandwidth::ifb_name(host_ifname)))
    }
    async fn observe_shaping(
        &mut self,
        host_ifname: &str,
    ) -> Result<crate::bandwidth::ObservedShaping, KernelError> {
        let mut seen = crate::bandwidth::ObservedShaping {
            host_present: self.links.contains_key(host_ifname),
            ..Default::default()
        };
        // The veth's qdiscs go with the veth.
        let Some(plan) = self.shaped.get(host_ifname).filter(|_| seen.host_present) else {
            return Ok(seen);
        };
        let as_seen = |t: &crate::bandwidth::Tbf| crate::tc::SeenTbf {
            rate_bytes: t.rate_bytes,
            limit_bytes: t.limit_bytes,
        };
        seen.ingress = plan.ingress.as_ref().map(as_seen);
        if self.ifbs.contains(&crate::bandwidth::ifb_name(host_ifname)) {
            seen.ifb_up = Some(true);
            seen.egress = plan.egress.as_ref().map(as_seen);
            seen.redirect_to_ifb = plan.egress.is_some();
        }
        Ok(seen)
    }
    async fn shaping_ifbs(&mut self) -> Result<Vec<String>, KernelError> {
        Ok(self.ifbs.iter().cloned().collect())
    }
}

impl HostportKernel for FakeKernel {
    fn apply_hostports(
        &mut self,
        backend: Option<&str>,
        before: &[HostportEntry],
        entries: &[HostportEntry],
    ) -> Result<(), sluice_policy::FirewallError> {
        // The verbs say what they believe the kernel holds: it must be what it holds (unless a
        // write failed since: the real firewall then writes the table whole).
        // An empty `before` asks for the table whole.
        if self.hostports.is_some() && !self.hostports_drifted && !before.is_empty() {
            assert_eq!(
                self.hostports.as_deref().unwrap_or_default(),
                before,
                "the state's idea of the kernel drifted"
            );
        }
        self.backends.push(backend.map(str::to_string));
        if self.fail_hostports {
            self.hostports_drifted = true;
            return Err(sluice_policy::FirewallError::Command {
                program: "nft".into(),
                op: "apply",
                stderr: "injected".into(),
            });
        }
        self.hostports = Some(entries.to_vec());
        self.hostports_drifted = false;
        Ok(())
    }
    fn missing_hostports(
        &mut self,
        _backend: Option<&str>,
        entry: &HostportEntry,
    ) -> Result<Vec<String>, sluice_policy::FirewallError> {
        let have = self.hostports.clone().unwrap_or_default();
        Ok(entry
            .mappings
            .iter()
            .filter(|m| {
                !have.iter().any(|e| {
                    (e.pod_ip, e.pod_ip6) == (entry.pod_ip, entry.pod_ip6) && e.mappings.contains(m)
                })
            })
            .map(|m| format!("{}:{}", m.host_port, m.container_port))
            .collect())
    }
    fn route_localnet(&mut self, host_ifname: &str) -> Result<(), KernelError> {
        self.localnet.push(host_ifname.to_string());
        Ok(())
    }
}

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    /// A dual-stack node: `subnet` and `subnet6` (in fd00:10:244::/56).
    fn dual(subnet: &str, subnet6: &str) -> Self {
        let node = Self::new(subnet);
        std::fs::write(
            node.dir.path().join("subnet.env"),
            format!("SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET={subnet}\nSLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6={subnet6}\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"),
        )
        .unwrap();
        node
    }

    /// An IPv6-only node: only the IPv6 pair in its subnet.env.
    fn v6_only(subnet6: &str) -> Self {
        let node = Self::new("10.244.3.0/24");
        std::fs::write(
            node.dir.path().join("subnet.env"),
            format!("SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6={subnet6}\nSLUICE_MTU=1430\nSLUICE_IPMASQ=true\n"),
        )
        .unwrap();
        node
    }

    fn allocations_v6(&self) -> usize {
        IpamStore::new(self.ipam_dir())
            .read()
            .unwrap()
            .allocations_v6
            .len()
    }

    fn new(subnet: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("subnet.env"),
            format!("SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET={subnet}\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"),
        )
        .unwrap();
        Self { dir }
    }

    fn conf(&self, version: &str) -> NetConf {
        self.conf_with(version, "")
    }

    fn conf_with(&self, version: &str, extra: &str) -> NetConf {
        let text = format!(
            r#"{{"cniVersion":"{version}","name":"sluice","type":"sluice-cni","subnetFile":"{}","ipamDir":"{}"{extra}}}"#,
            self.dir.path().join("subnet.env").display(),
            self.ipam_dir().display()
        );
        NetConf::parse(text.as_bytes()).unwrap()
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    fn allocations(&self) -> usize {
        IpamStore::new(self.ipam_dir())
            .read()
            .unwrap()
            .allocations
            .len()
    }
}

fn req(container: &str) -> Request {
    Request {
        container_id: container.into(),
        netns: Some(Path::new("/run/netns/fake").into()),
        ifname: "eth0".into(),
        args: [
            ("K8S_POD_NAMESPACE".to_string(), "x".to_string()),
            ("K8S_POD_NAME".to_string(), "a".to_string()),
        ]
        .into(),
    }
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn add_wires_and_del_unwires() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let out = run(add(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    assert_eq!(out["ips"][0]["address"], "10.244.3.1/32");
    assert_eq!(out["interfaces"][1]["sandbox"], "/run/netns/fake");
    assert_eq!(out["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    run(check(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    run(del(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    assert!(k.links.is_empty());
    assert_eq!(node.allocations(), 0);
    // DEL of what is gone succeeds.
    run(del(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
}

#[test]
fn repeated_add_keeps_the_address() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let a = run(add(&node.conf("0.4.0"), &req("c1"), &mut k)).unwrap();
    let b = run(add(&node.conf("0.4.0"), &req("c1"), &mut k)).unwrap();
    assert_eq!(a["ips"], b["ips"]);
    assert_eq!(k.links.len(), 1);
    assert_eq!(node.allocations(), 1);
}

#[test]
fn a_failure_at_any_step_leaves_nothing() {
    for step in [Step::CreateVeth, Step::ConfigureHost, Step::ConfigurePod] {
        let node = Node::new("10.244.3.0/24");
        let mut k = FakeKernel {
            fail_at: Some(step),
            ..FakeKernel::new()
        };
        let err = run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap_err();
        assert_eq!(err.code, ErrorCode::Kernel, "{step:?}");
        assert!(k.links.is_empty(), "{step:?} left a link");
        assert_eq!(node.allocations(), 0, "{step:?} left an allocation");
    }
}

#[test]
fn a_failed_repeat_add_keeps_the_earlier_allocation() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap();
    k.fail_at = Some(Step::ConfigurePod);
    run(add(&node.conf("1.0.0"), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(
        node.allocations(),
        1,
        "the runtime will DEL it; until then the address stays reserved"
    );
}

#[test]
fn no_subnet_means_try_again_later() {
    let node = Node::new("10.244.3.0/24");
    std::fs::remove_file(node.dir.path().join("subnet.env")).unwrap();
    let err = run(add(&node.conf("1.1.0"), &req("c1"), &mut FakeKernel::new())).unwrap_err();
    assert_eq!(err.code, ErrorCode::TryAgainLater);
    assert!(err.msg.contains("no usable pod subnet"), "{}", err.msg);
    assert!(err.msg.contains("agent"), "{}", err.msg);
    assert_eq!(
        status(&node.conf("1.1.0")).unwrap_err().code,
        ErrorCode::NotAvailable
    );
}

#[test]
fn exhaustion_is_a_clear_error_and_leaves_nothing() {
    let node = Node::new("10.244.3.0/29");
    let mut k = FakeKernel::new();
    for i in 0..6 {
        run(add(&node.conf("1.1.0"), &req(&format!("c{i}")), &mut k)).unwrap();
    }
    let err = run(add(&node.conf("1.1.0"), &req("c6"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::SubnetExhausted);
    assert!(err.msg.contains("10.244.3.0/29"), "{}", err.msg);
    assert_eq!(k.links.len(), 6);
    assert_eq!(node.allocations(), 6);
}

#[test]
fn missing_netns_is_unknown_container_and_frees_the_address() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel {
        has_netns: false,
        ..FakeKernel::new()
    };
    let err = run(add(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::UnknownContainer);
    assert_eq!(node.allocations(), 0);
}

#[test]
fn check_finds_what_is_missing() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let out = run(add(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    let with_prev = node.conf_with("1.1.0", &format!(r#","prevResult":{out}"#));
    run(check(&with_prev, &req("c1"), &mut k)).unwrap();
    // prevResult naming another address fails.
    let mut other = out.clone();
    other["ips"][0]["address"] = "10.244.3.99/32".into();
    let err = run(check(
        &node.conf_with("1.1.0", &format!(r#","prevResult":{other}"#)),
        &req("c1"),
        &mut k,
    ))
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    // A lost host route is found.
    k.links.values_mut().for_each(|l| l.host_configured = false);
    let err = run(check(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(err.msg.contains("host route"), "{}", err.msg);
    // No allocation at all.
    let err = run(check(&node.conf("1.1.0"), &req("zzz"), &mut k)).unwrap_err();
    assert!(err.msg.contains("no address"), "{}", err.msg);
}

#[test]
fn gc_frees_stale_and_keeps_valid() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    for c in ["keep1", "keep2", "stale1", "stale2"] {
        run(add(&node.conf("1.1.0"), &req(c), &mut k)).unwrap();
    }
    // A leftover veth with no allocation at all, and a foreign link, must be told apart.
    k.links
        .insert(podnet::host_ifname("orphan", "eth0"), FakeLink::default());
    let mut conf = node.conf("1.1.0");
    conf.valid_attachments = Some(
        ["keep1", "keep2"]
            .iter()
            .map(|c| Attachment {
                container_id: c.to_string(),
                ifname: "eth0".into(),
            })
            .collect(),
    );
    run(gc(&conf, &mut k)).unwrap();
    let state = IpamStore::new(node.ipam_dir()).read().unwrap();
    let owners: Vec<_> = state
        .allocations
        .values()
        .map(|o| o.container_id.as_str())
        .collect();
    assert_eq!(owners, vec!["keep1", "keep2"]);
    let mut left: Vec<_> = k.links.keys().cloned().collect();
    left.sort();
    let mut want = vec![
        podnet::host_ifname("keep1", "eth0"),
        podnet::host_ifname("keep2", "eth0"),
    ];
    want.sort();
    assert_eq!(left, want);
}

#[test]
fn results_follow_the_requested_version() {
    for v in CniVersion::ALL {
        let node = Node::new("10.244.3.0/24");
        let out = run(add(
            &node.conf(v.as_str()),
            &req("c1"),
            &mut FakeKernel::new(),
        ))
        .unwrap();
        assert_eq!(out["cniVersion"], v.as_str());
        assert_eq!(
            out["ips"][0].get("version").is_some(),
            v < CniVersion::V1_0_0,
            "{v}"
        );
    }
}

/// Four pods on a node, and the fake kernel that holds their links.
fn four_pods() -> (Node, FakeKernel) {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    for c in ["p0", "p1", "p2", "p3"] {
        run(add(&node.conf("1.1.0"), &req(c), &mut k)).unwrap();
    }
    (node, k)
}

#[test]
fn gc_without_its_list_changes_nothing() {
    for extra in [
        "",
        r#","cni.dev/valid-attachment":[{"containerID":"p0","ifname":"eth0"}]"#,
        r#","cni.dev/validAttachments":[]"#,
        r#","cni.dev/valid-attachments":[],"cni.dev/attachments":[{"containerID":"p0","ifname":"eth0"}]"#,
    ] {
        let (node, mut k) = four_pods();
        let err = run(gc(&node.conf_with("1.1.0", extra), &mut k)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{extra}: {err}");
        assert!(err.msg.contains("nothing was collected"), "{extra}: {err}");
        assert_eq!(node.allocations(), 4, "{extra}");
        assert_eq!(k.links.len(), 4, "{extra}");
    }
}

#[test]
fn gc_takes_the_list_under_either_name() {
    for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
        let (node, mut k) = four_pods();
        let extra = format!(r#","{key}":[{{"containerID":"p1","ifname":"eth0"}}]"#);
        run(gc(&node.conf_with("1.1.0", &extra), &mut k)).unwrap();
        let state = IpamStore::new(node.ipam_dir()).read().unwrap();
        let owners: Vec<_> = state
            .allocations
            .values()
            .map(|o| o.container_id.as_str())
            .collect();
        assert_eq!(owners, vec!["p1"], "{key}");
        assert_eq!(
            k.links.keys().collect::<Vec<_>>(),
            vec![&podnet::host_ifname("p1", "eth0")]
        );
    }
    // An empty list (or libcni's null) means nothing on the node is valid any more.
    for list in ["[]", "null"] {
        let (node, mut k) = four_pods();
        let extra = format!(r#","cni.dev/valid-attachments":{list}"#);
        run(gc(&node.conf_with("1.1.0", &extra), &mut k)).unwrap();
        assert_eq!(node.allocations(), 0, "{list}");
        assert!(k.links.is_empty(), "{list}");
    }
}

#[test]
fn gc_removes_the_temporary_state_a_killed_call_left() {
    let (node, mut k) = four_pods();
    let tmp = node.ipam_dir().join(crate::ipam::STATE_TEMP_FILE);
    std::fs::write(&tmp, b"{half a state").unwrap();
    let all = r#","cni.dev/valid-attachments":[{"containerID":"p0","ifname":"eth0"},{"containerID":"p1","ifname":"eth0"},{"containerID":"p2","ifname":"eth0"},{"containerID":"p3","ifname":"eth0"}]"#;
    run(gc(&node.conf_with("1.1.0", all), &mut k)).unwrap();
    assert!(!tmp.exists());
    assert_eq!(node.allocations(), 4);
}

#[test]
fn an_unsafe_subnet_is_a_config_error_and_allocates_nothing() {
    for subnet in [
        "169.254.1.0/24",
        "127.0.0.0/24",
        "0.0.0.0/24",
        "10.245.0.0/24",
        "0.0.0.0/0",
    ] {
        let node = Node::new(subnet);
        let err = run(add(&node.conf("1.1.0"), &req("c1"), &mut FakeKernel::new())).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig, "{subnet}: {err}");
        assert!(err.msg.contains("SLUICE_SUBNET"), "{subnet}: {err}");
        assert_eq!(node.allocations(), 0, "{subnet}");
    }
}

#[test]
fn a_held_lock_is_try_again_later() {
    let node = Node::new("10.244.3.0/24");
    let store = IpamStore::new(node.ipam_dir());
    let _held = store.lock().unwrap();
    let conf = node.conf("1.1.0");
    let err = std::thread::scope(|s| {
        s.spawn(|| run(add(&conf, &req("c1"), &mut FakeKernel::new())))
            .join()
            .unwrap()
    })
    .unwrap_err();
    assert_eq!(err.code, ErrorCode::TryAgainLater, "{err}");
    assert!(err.msg.contains("try again later"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// The bandwidth capability.

const SHAPED: &str = r#","runtimeConfig":{"bandwidth":{"ingressRate":20000000,"ingressBurst":160000,"egressRate":8000000,"egressBurst":80000}}"#;

#[test]
fn add_with_bandwidth_shapes_and_del_removes_the_ifb() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let conf = node.conf_with("1.1.0", SHAPED);
    run(add(&conf, &req("c1"), &mut k)).unwrap();
    let host = podnet::host_ifname("c1", "eth0");
    let plan = k.shaped[&host];
    assert_eq!(plan.ingress.unwrap().rate_bytes, 2_500_000);
    assert_eq!(plan.egress.unwrap().rate_bytes, 1_000_000);
    assert!(k.ifbs.contains(&crate::bandwidth::ifb_name(&host)));
    run(check(&conf, &req("c1"), &mut k)).unwrap();
    run(del(&conf, &req("c1"), &mut k)).unwrap();
    assert!(k.ifbs.is_empty(), "{:?}", k.ifbs);
    assert!(k.links.is_empty());
    // Without bandwidth nothing is shaped.
    run(add(&node.conf("1.1.0"), &req("c2"), &mut k)).unwrap();
    assert!(k.shaped.is_empty() && k.ifbs.is_empty());
    // Nor with every value 0, or null.
    for zero in [
        r#","runtimeConfig":{"bandwidth":{"ingressRate":0}}"#,
        r#","runtimeConfig":{"bandwidth":null}"#,
    ] {
        run(add(&node.conf_with("1.1.0", zero), &req("c3"), &mut k)).unwrap();
        assert!(k.shaped.is_empty(), "{zero}");
    }
}

#[test]
fn a_failed_shaping_leaves_nothing() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel {
        fail_at: Some(Step::Shape),
        ..FakeKernel::new()
    };
    let err = run(add(&node.conf_with("1.1.0", SHAPED), &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::Kernel);
    assert!(k.links.is_empty(), "veth left: {:?}", k.links.keys());
    assert!(k.ifbs.is_empty(), "ifb left: {:?}", k.ifbs);
    assert_eq!(node.allocations(), 0);
}

#[test]
fn bad_bandwidth_is_refused_before_anything_is_made() {
    let node = Node::new("10.244.3.0/24");
    for (extra, code, word) in [
        (
            r#","runtimeConfig":{"bandwidth":{"ingressRate":1000000}}"#,
            ErrorCode::InvalidConfig,
            "ingressBurst",
        ),
        (
            r#","runtimeConfig":{"bandwidth":{"egressRate":-5,"egressBurst":8}}"#,
            ErrorCode::Decoding,
            "runtimeConfig.bandwidth",
        ),
        (
            r#","runtimeConfig":{"bandwidth":"20M"}"#,
            ErrorCode::Decoding,
            "runtimeConfig.bandwidth",
        ),
    ] {
        let mut k = FakeKernel::new();
        let err = run(add(&node.conf_with("1.1.0", extra), &req("c1"), &mut k)).unwrap_err();
        assert_eq!(err.code, code, "{extra}: {err}");
        assert!(err.msg.contains(word), "{extra}: {err}");
        assert!(k.links.is_empty() && k.ifbs.is_empty(), "{extra}");
        assert_eq!(node.allocations(), 0, "{extra}");
        // DEL with the same configuration still succeeds: it does not decode bandwidth.
        run(del(&node.conf_with("1.1.0", extra), &req("c1"), &mut k)).unwrap();
    }
}

#[test]
fn check_finds_missing_shaping() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    let conf = node.conf_with("1.1.0", SHAPED);
    run(add(&conf, &req("c1"), &mut k)).unwrap();
    k.ifbs.clear();
    let err = run(check(&conf, &req("c1"), &mut k)).unwrap_err();
    assert_eq!(err.code, ErrorCode::CheckFailed);
    assert!(err.msg.contains("ifb"), "{}", err.msg);
    // Unrequested shaping is not looked for.
    run(check(&node.conf("1.1.0"), &req("c1"), &mut k)).unwrap();
    k.shaped.clear();
    let err = run(check(&conf, &req("c1"), &mut k)).unwrap_err();
    assert!(err.msg.contains("no tbf"), "{}", err.msg);
}

#[test]
fn gc_removes_the_ifbs_of_stale_attachments() {
    let node = Node::new("10.244.3.0/24");
    let mut k = FakeKernel::new();
    for c in ["keep", "stale"] {
        run(add(&node.conf_with("1.1.0", SHAPED), &req(c), &mut k)).unwrap();
    }
    // An ifb whose attachment the runtime forgot entirely, and one of no shape of sluice's.
    k.ifbs
        .insert(crate::bandwidth::ifb_name(&podnet::host_ifname(
            "orphan", "eth0",
        )));
    k.ifbs.insert("ifb0".into());
    let mut conf = node.conf("1.1.0");
    conf.valid_attachments = Some(vec![Attachment {
        container_id: "keep".into(),
        ifname: "eth0".into(),
    }]);
    run(gc(&conf, &mut k)).unwrap();
    let left: Vec<_> = k.ifbs.iter().cloned().collect();
    let mut want = vec![
        crate::bandwidth::ifb_name(&podnet::host_ifname("keep", "eth0")),
        "ifb0".to_string(),
    ];
    want.sort();
    assert_eq!(left, want);
}

mod dual;
mod hostports;
mod v6only;
