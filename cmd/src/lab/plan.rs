//! What a lab is made of, computed from its spec alone: names, addresses, subnets. Nothing here
//! touches the kernel or the API, so the whole layout is unit-tested without root.

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Every namespace of lab `name` starts with this, so `lab down` finds leftovers after a crash.
pub fn prefix(name: &str) -> String {
    format!("slab-{name}-")
}

/// Where a lab keeps its files (plan, kubeconfig, API state, per-node CNI files).
pub fn state_dir(name: &str) -> PathBuf {
    Path::new("/run/sluice/lab").join(name)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Encryption {
    None,
    Wireguard,
}

impl Encryption {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Wireguard => "wireguard",
        }
    }
}

/// sluice-config's `overlay` for the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Overlay {
    #[default]
    Always,
    CrossSubnet,
    Never,
}

impl Overlay {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::CrossSubnet => "cross-subnet",
            Self::Never => "never",
        }
    }
}

/// The pod address families of the lab (`--ip-family`): IPv4, IPv4 and IPv6 (dual-stack:
/// `cluster-cidr` of both, every pod an address of each, IPv6 carried over the IPv4 underlay),
/// or IPv6 only (`cluster-cidr` and the Nodes' podCIDRs IPv6 only, every pod an IPv6 address
/// and none of IPv4, the tunnels over the IPv6 underlay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    #[default]
    Ipv4,
    Dual,
    Ipv6,
}

/// The underlay family of a lab of `ip_family` given `--underlay` (or not): an IPv6-only lab
/// runs over IPv6 (and refuses `--underlay ipv4`); the others over IPv4 unless told.
pub fn underlay_for(
    ip_family: IpFamily,
    asked: Option<UnderlayFamily>,
) -> Result<UnderlayFamily, String> {
    match (ip_family, asked) {
        (IpFamily::Ipv6, Some(UnderlayFamily::Ipv4)) => Err(
            "--ip-family ipv6 runs its tunnels over the IPv6 underlay: --underlay ipv4 contradicts it (leave --underlay out, or give ipv6)".into(),
        ),
        (IpFamily::Ipv6, _) => Ok(UnderlayFamily::Ipv6),
        (_, asked) => Ok(asked.unwrap_or_default()),
    }
}

/// The family of the nodes' primary underlay address (`--underlay`): the first InternalIP of
/// each Node, which the agent takes as its underlay, so the family its VXLAN and WireGuard
/// tunnels run over. With `ipv6` every node has an IPv6 address on its segment
/// (`fd00:31:S::I/64`, unique local) and publishes it; the IPv4 one stays on the link (the
/// lab's API and IPv4 internet are reached over it) but carries no pod traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UnderlayFamily {
    #[default]
    Ipv4,
    Ipv6,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSpec {
    pub name: String,
    pub nodes: u8,
    pub pods_per_node: u8,
    pub encryption: Encryption,
    /// sluice-config's `overlay`.
    #[serde(default)]
    pub overlay: Overlay,
    /// 1: every node on one L2 segment; 2: nodes alternate between two routed segments.
    pub segments: u8,
    /// sluice-config's `subnet-source`: the Node's podCIDR where it has one (`auto`), always a
    /// lease, or always the podCIDR.
    pub subnet_source: SubnetSource,
    /// The pods' address families (a lab saved before it is IPv4).
    #[serde(default)]
    pub ip_family: IpFamily,
    /// The tunnels' underlay family (a lab saved before it is IPv4).
    #[serde(default)]
    pub underlay: UnderlayFamily,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum SubnetSource {
    Auto,
    Lease,
    NodePodcidr,
}

impl SubnetSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Lease => "lease",
            Self::NodePodcidr => "node-podcidr",
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("lab name {0:?}: use 1 to 12 characters of a-z and 0-9, starting with a letter")]
    Name(String),
    #[error("--nodes {0}: a lab has 1 to {MAX_NODES} nodes")]
    Nodes(u8),
    #[error("--pods-per-node {0}: at most {MAX_PODS_PER_NODE}")]
    Pods(u8),
    #[error("--segments {0}: 1 (one L2 segment) or 2 (two routed segments)")]
    Segments(u8),
}

pub const MAX_NODES: u8 = 50;
pub const MAX_PODS_PER_NODE: u8 = 50;
/// The lab's cluster CIDR and each node's share of it (DESIGN.md's defaults).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const SUBNET_LENGTH: u8 = 24;
/// A dual-stack lab's IPv6 cluster CIDR (unique local addresses) and node subnet length.
pub const CLUSTER_CIDR_V6: &str = "fd00:10:244::/56";
pub const SUBNET_LENGTH_V6: u8 = 64;
/// MTU of the underlay links (veth), as on an ordinary Ethernet.
pub const UNDERLAY_MTU: u32 = 1500;

pub fn validate_name(name: &str) -> Result<(), SpecError> {
    let ok = (1..=12).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(SpecError::Name(name.into()))
    }
}

impl LabSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name(&self.name)?;
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(SpecError::Nodes(self.nodes));
        }
        if self.pods_per_node > MAX_PODS_PER_NODE {
            return Err(SpecError::Pods(self.pods_per_node));
        }
        if !(1..=2).contains(&self.segments) {
            return Err(SpecError::Segments(self.segments));
        }
        Ok(())
    }
}

/// One L2 segment of the underlay: a bridge in the underlay namespace; its gateway address routes
/// between segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub bridge: String,
    /// The underlay namespace's address on the bridge, with the segment's prefix.
    pub gateway: Ipv4Net,
    /// A dual-stack lab's IPv6 on the segment (`fd00:31:S::fe/64`): the nodes' IPv6 way out to
    /// the lab's internet. The tunnels stay on the IPv4 underlay.
    #[serde(default)]
    pub gateway_v6: Option<Ipv6Net>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    /// The Kubernetes Node name.
    pub name: String,
    pub netns: String,
    pub segment: usize,
    /// The node's underlay address, with its segment's prefix.
    pub underlay: Ipv4Net,
    /// The underlay namespace's end of the node's link (the node's end is `eth0`).
    pub uplink: String,
    /// The node's pod subnet (its `spec.podCIDR`), until an agent leases one itself.
    pub pod_cidr: Ipv4Net,
    /// A dual-stack lab's second `spec.podCIDRs` entry.
    #[serde(default)]
    pub pod_cidr_v6: Option<Ipv6Net>,
    /// A dual-stack or IPv6-underlay lab's IPv6 address of the node on its segment
    /// (`fd00:31:S::I/64`).
    #[serde(default)]
    pub underlay_v6: Option<Ipv6Net>,
}

impl NodePlan {
    /// The Node's InternalIPs (the first is the agent's underlay): the IPv6 one alone with
    /// `--underlay ipv6`. One only: `status.addresses` merges by `type`, so a patch with two
    /// InternalIPs keeps one of them (the embedded API server does as a real one).
    pub fn internal_ips(&self, underlay: UnderlayFamily) -> Vec<std::net::IpAddr> {
        match (underlay, self.underlay_v6) {
            (UnderlayFamily::Ipv6, Some(v6)) => vec![v6.addr().into()],
            _ => vec![self.underlay.addr().into()],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabPlan {
    pub spec: LabSpec,
    pub prefix: String,
    pub underlay_netns: String,
    pub segments: Vec<Segment>,
    pub nodes: Vec<NodePlan>,
    /// The lab's own pods (`--pods-per-node`), in the namespace named after the lab.
    pub pods: Vec<PodPlan>,
    pub cluster_cidr: Ipv4Net,
    /// A dual-stack lab's IPv6 cluster CIDR.
    #[serde(default)]
    pub cluster_cidr_v6: Option<Ipv6Net>,
    /// A host outside the cluster ("the internet"), routed by the underlay namespace: it has no
    /// route to pod subnets, so pod traffic reaches it only masqueraded.
    pub internet: Internet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Internet {
    pub netns: String,
    /// Its address, with the prefix of its link to the underlay namespace.
    pub address: Ipv4Net,
    /// The underlay namespace's end of that link.
    pub gateway: Ipv4Net,
    pub uplink: String,
    /// A dual-stack lab's IPv6 address of the internet (`fdff:203::1/64`, unique local: no
    /// real address) and the underlay namespace's end (`fdff:203::fe/64`).
    #[serde(default)]
    pub address_v6: Option<Ipv6Net>,
    #[serde(default)]
    pub gateway_v6: Option<Ipv6Net>,
}

/// The node's interface on the underlay.
pub const NODE_UPLINK: &str = "eth0";

/// `segments`/`len` as an IPv6 network (the lab's own fixed, valid layout).
fn v6_net(segments: [u16; 8], len: u8) -> Ipv6Net {
    Ipv6Net::new(std::net::Ipv6Addr::from(segments), len).unwrap_or_default()
}

impl LabPlan {
    pub fn new(spec: LabSpec) -> Result<Self, SpecError> {
        spec.validate()?;
        let prefix = prefix(&spec.name);
        let cluster_cidr: Ipv4Net = CLUSTER_CIDR.parse().unwrap_or_default();
        // Pods with an IPv6 address: a dual-stack or an IPv6-only lab's.
        let has_v6 = spec.ip_family != IpFamily::Ipv4;
        // Nodes get IPv6 on their segment for IPv6 pods' egress or as the underlay.
        let node_v6 = has_v6 || spec.underlay == UnderlayFamily::Ipv6;
        let segments = (0..spec.segments)
            .map(|s| Segment {
                bridge: format!("br{s}"),
                gateway: Ipv4Net::new(Ipv4Addr::new(172, 31, s, 254), 24).unwrap_or_default(),
                gateway_v6: node_v6
                    .then(|| v6_net([0xfd00, 0x31, u16::from(s), 0, 0, 0, 0, 0xfe], 64)),
            })
            .collect::<Vec<_>>();
        let subnets = cluster_cidr
            .subnets(SUBNET_LENGTH)
            .map_err(|_| SpecError::Nodes(spec.nodes))?;
        let cluster_cidr_v6: Option<Ipv6Net> =
            has_v6.then(|| CLUSTER_CIDR_V6.parse().ok()).flatten();
        let subnets_v6: Vec<Ipv6Net> = cluster_cidr_v6
            .and_then(|c| c.subnets(SUBNET_LENGTH_V6).ok())
            .map(|s| s.take(usize::from(spec.nodes)).collect())
            .unwrap_or_default();
        let nodes = (1..=spec.nodes)
            .zip(subnets)
            .map(|(i, pod_cidr)| {
                let segment = usize::from((i - 1) % spec.segments);
                NodePlan {
                    name: format!("{}-node-{i}", spec.name),
                    netns: format!("{prefix}node-{i}"),
                    segment,
                    underlay: Ipv4Net::new(Ipv4Addr::new(172, 31, segment as u8, i), 24)
                        .unwrap_or_default(),
                    uplink: format!("n{i}"),
                    pod_cidr,
                    pod_cidr_v6: subnets_v6.get(usize::from(i - 1)).copied(),
                    underlay_v6: node_v6.then(|| {
                        v6_net([0xfd00, 0x31, segment as u16, 0, 0, 0, 0, u16::from(i)], 64)
                    }),
                }
            })
            .collect::<Vec<_>>();
        let pods = nodes
            .iter()
            .enumerate()
            .flat_map(|(i, node)| {
                (1..=spec.pods_per_node).map(move |j| PodPlan {
                    namespace: spec_namespace(&node.name),
                    name: format!("pod-{}-{j}", i + 1),
                    node: node.name.clone(),
                })
            })
            .collect();
        let internet = Internet {
            netns: format!("{prefix}internet"),
            address: Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 1), 24).unwrap_or_default(),
            gateway: Ipv4Net::new(Ipv4Addr::new(203, 0, 113, 254), 24).unwrap_or_default(),
            uplink: "inet".into(),
            address_v6: has_v6.then(|| v6_net([0xfdff, 0x203, 0, 0, 0, 0, 0, 1], 64)),
            gateway_v6: has_v6.then(|| v6_net([0xfdff, 0x203, 0, 0, 0, 0, 0, 0xfe], 64)),
        };
        Ok(Self {
            internet,
            underlay_netns: format!("{prefix}underlay"),
            prefix,
            segments,
            nodes,
            pods,
            cluster_cidr,
            cluster_cidr_v6,
            spec,
        })
    }

    pub fn node(&self, name: &str) -> Option<&NodePlan> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// sluice-config's `cluster-cidr`: the IPv4 range, the IPv6 one after a comma when dual,
    /// or the IPv6 range alone on an IPv6-only lab.
    pub fn cluster_cidr_value(&self) -> String {
        match (self.cluster_cidr_v6, self.spec.ip_family) {
            (Some(v6), IpFamily::Ipv6) => v6.to_string(),
            (Some(v6), _) => format!("{},{v6}", self.cluster_cidr),
            (None, _) => self.cluster_cidr.to_string(),
        }
    }

    /// A Node's `spec.podCIDRs`: its IPv4 podCIDR first and its IPv6 one beside it (dual),
    /// or the IPv6 one alone in an IPv6-only lab.
    pub fn pod_cidrs(&self, node: &NodePlan) -> Vec<String> {
        let v4 = (self.spec.ip_family != IpFamily::Ipv6).then(|| node.pod_cidr.to_string());
        v4.into_iter()
            .chain(node.pod_cidr_v6.map(|s| s.to_string()))
            .collect()
    }

    /// Where a real-Kubernetes lab's API server is reached from the nodes and pods (what it
    /// advertises, so the `kubernetes` Service's Endpoints): the underlay namespace's address on
    /// the first segment, routed from every node, on which the lab daemon forwards to the API
    /// server on the host's loopback.
    pub fn api_address(&self) -> Ipv4Addr {
        self.segments
            .first()
            .map_or(Ipv4Addr::new(172, 31, 0, 254), |s| s.gateway.addr())
    }

    /// The namespace that holds the lab's own pods.
    pub fn pod_namespace(&self) -> &str {
        &self.spec.name
    }

    /// The network namespace of pod `namespace/name` (any pod, not only the lab's own).
    pub fn pod_netns(&self, namespace: &str, name: &str) -> String {
        format!("{}pod-{namespace}-{name}", self.prefix)
    }
}

/// The lab's own pods live in a namespace named after the lab (node names are `LAB-node-I`).
fn spec_namespace(node_name: &str) -> String {
    node_name
        .rsplit_once("-node-")
        .map_or(node_name, |(lab, _)| lab)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: u8, pods: u8, segments: u8) -> LabSpec {
        LabSpec {
            name: "t1".into(),
            nodes,
            pods_per_node: pods,
            encryption: Encryption::None,
            overlay: Overlay::Always,
            segments,
            subnet_source: SubnetSource::Lease,
            ip_family: IpFamily::Ipv4,
            underlay: UnderlayFamily::Ipv4,
        }
    }

    #[test]
    fn an_ipv6_only_lab_is_ipv6_from_the_cluster_cidr_to_the_underlay() {
        assert_eq!(underlay_for(IpFamily::Ipv6, None), Ok(UnderlayFamily::Ipv6));
        assert_eq!(
            underlay_for(IpFamily::Ipv6, Some(UnderlayFamily::Ipv6)),
            Ok(UnderlayFamily::Ipv6)
        );
        let e = underlay_for(IpFamily::Ipv6, Some(UnderlayFamily::Ipv4)).unwrap_err();
        assert!(
            e.contains("--underlay ipv4") && e.contains("--ip-family ipv6"),
            "{e}"
        );
        assert_eq!(underlay_for(IpFamily::Dual, None), Ok(UnderlayFamily::Ipv4));
        assert_eq!(
            underlay_for(IpFamily::Ipv4, Some(UnderlayFamily::Ipv6)),
            Ok(UnderlayFamily::Ipv6)
        );
        let six = LabPlan::new(LabSpec {
            ip_family: IpFamily::Ipv6,
            underlay: UnderlayFamily::Ipv6,
            ..spec(3, 1, 1)
        })
        .unwrap();
        assert_eq!(six.cluster_cidr_value(), "fd00:10:244::/56");
        assert_eq!(six.pod_cidrs(&six.nodes[1]), ["fd00:10:244:1::/64"]);
        assert!(six.internet.address_v6.is_some());
        assert!(six.nodes[0]
            .internal_ips(six.spec.underlay)
            .iter()
            .all(std::net::IpAddr::is_ipv6));
        // Dual and IPv4 labs are as they were.
        let dual = LabPlan::new(LabSpec {
            ip_family: IpFamily::Dual,
            ..spec(2, 1, 1)
        })
        .unwrap();
        assert_eq!(dual.cluster_cidr_value(), "10.244.0.0/16,fd00:10:244::/56");
        assert_eq!(
            dual.pod_cidrs(&dual.nodes[0]),
            ["10.244.0.0/24", "fd00:10:244::/64"]
        );
        let four = LabPlan::new(spec(2, 1, 1)).unwrap();
        assert_eq!(four.pod_cidrs(&four.nodes[0]), ["10.244.0.0/24"]);
    }

    #[test]
    fn an_ipv6_underlay_makes_each_nodes_ipv6_address_its_internal_ip() {
        let four = LabPlan::new(spec(2, 1, 2)).unwrap();
        assert_eq!(
            four.nodes[1].internal_ips(four.spec.underlay),
            ["172.31.1.2".parse::<std::net::IpAddr>().unwrap()]
        );
        for ip_family in [IpFamily::Ipv4, IpFamily::Dual] {
            let six = LabPlan::new(LabSpec {
                underlay: UnderlayFamily::Ipv6,
                ip_family,
                ..spec(2, 1, 2)
            })
            .unwrap();
            let ips: Vec<String> = six.nodes[1]
                .internal_ips(six.spec.underlay)
                .iter()
                .map(|a| a.to_string())
                .collect();
            assert_eq!(ips, ["fd00:31:1::2"], "{ip_family:?}");
            // Only unique local addresses: nothing routable outside the machine.
            assert!(six
                .nodes
                .iter()
                .chain(&six.nodes)
                .filter_map(|n| n.underlay_v6)
                .chain(six.segments.iter().filter_map(|s| s.gateway_v6))
                .all(|n| (n.addr().segments()[0] & 0xfe00) == 0xfc00));
            assert_eq!(six.cluster_cidr_v6.is_some(), ip_family == IpFamily::Dual);
        }
        // A plan saved before --underlay reads as IPv4.
        let mut old = serde_json::to_value(&four).unwrap();
        old["spec"].as_object_mut().unwrap().remove("underlay");
        let back: LabPlan = serde_json::from_value(old).unwrap();
        assert_eq!(back.spec.underlay, UnderlayFamily::Ipv4);
    }

    #[test]
    fn a_dual_lab_gives_every_node_a_subnet_of_each_family() {
        let four = LabPlan::new(spec(3, 1, 1)).unwrap();
        assert_eq!(four.cluster_cidr_value(), "10.244.0.0/16");
        assert!(four.nodes.iter().all(|n| n.pod_cidr_v6.is_none()));
        let dual = LabPlan::new(LabSpec {
            ip_family: IpFamily::Dual,
            ..spec(3, 1, 1)
        })
        .unwrap();
        assert_eq!(dual.cluster_cidr_value(), "10.244.0.0/16,fd00:10:244::/56");
        let v6: Vec<String> = dual
            .nodes
            .iter()
            .map(|n| n.pod_cidr_v6.map(|s| s.to_string()).unwrap_or_default())
            .collect();
        assert_eq!(
            v6,
            [
                "fd00:10:244::/64",
                "fd00:10:244:1::/64",
                "fd00:10:244:2::/64"
            ]
        );
        // The IPv6 way out: each node on its segment's IPv6 net, the internet beyond.
        assert_eq!(
            dual.nodes[1].underlay_v6.map(|n| n.to_string()).as_deref(),
            Some("fd00:31::2/64")
        );
        assert_eq!(
            dual.segments[0]
                .gateway_v6
                .map(|n| n.to_string())
                .as_deref(),
            Some("fd00:31::fe/64")
        );
        assert_eq!(
            dual.internet.address_v6.map(|n| n.to_string()).as_deref(),
            Some("fdff:203::1/64")
        );
        assert!(four.internet.address_v6.is_none() && four.nodes[0].underlay_v6.is_none());
        // A plan saved before --ip-family reads as IPv4.
        let mut old = serde_json::to_value(&four).unwrap();
        old["spec"].as_object_mut().unwrap().remove("ip_family");
        old.as_object_mut().unwrap().remove("cluster_cidr_v6");
        let back: LabPlan = serde_json::from_value(old).unwrap();
        assert_eq!(back.spec.ip_family, IpFamily::Ipv4);
    }

    #[test]
    fn layout_of_three_nodes() {
        let p = LabPlan::new(spec(3, 2, 1)).unwrap();
        assert_eq!(p.prefix, "slab-t1-");
        assert_eq!(p.underlay_netns, "slab-t1-underlay");
        assert_eq!(p.segments.len(), 1);
        let names: Vec<_> = p.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["t1-node-1", "t1-node-2", "t1-node-3"]);
        assert_eq!(p.nodes[1].underlay.to_string(), "172.31.0.2/24");
        assert_eq!(p.nodes[2].pod_cidr.to_string(), "10.244.2.0/24");
        assert_eq!(p.pods.len(), 6);
        assert_eq!(p.pods[3].name, "pod-2-2");
        assert_eq!(p.pods[3].node, "t1-node-2");
        assert_eq!(p.pods[3].namespace, "t1");
        assert!(p.nodes.iter().all(|n| n.netns.starts_with(&p.prefix)));
        assert!(p.nodes.iter().all(|n| n.uplink.len() <= 15));
    }

    #[test]
    fn two_segments_alternate() {
        let p = LabPlan::new(spec(4, 0, 2)).unwrap();
        let segs: Vec<_> = p.nodes.iter().map(|n| n.segment).collect();
        assert_eq!(segs, [0, 1, 0, 1]);
        assert_eq!(p.nodes[1].underlay.to_string(), "172.31.1.2/24");
        assert_eq!(p.segments[1].gateway.to_string(), "172.31.1.254/24");
        // The API server's advertised address is the underlay's own, on the first segment:
        // no node's, no pod's, not loopback (a real API server refuses that in Endpoints).
        let api = p.api_address();
        assert_eq!(api.to_string(), "172.31.0.254");
        assert!(p.nodes.iter().all(|n| n.underlay.addr() != api));
        assert!(!p.cluster_cidr.contains(&api) && !api.is_loopback());
        // Subnets and underlay addresses are distinct.
        let mut cidrs: Vec<_> = p.nodes.iter().map(|n| n.pod_cidr).collect();
        cidrs.dedup();
        assert_eq!(cidrs.len(), 4);
    }

    #[test]
    fn bad_specs_are_refused() {
        assert_eq!(
            LabPlan::new(spec(0, 1, 1)).unwrap_err(),
            SpecError::Nodes(0)
        );
        assert_eq!(
            LabPlan::new(spec(51, 1, 1)).unwrap_err(),
            SpecError::Nodes(51)
        );
        assert_eq!(
            LabPlan::new(spec(2, 1, 3)).unwrap_err(),
            SpecError::Segments(3)
        );
        for bad in ["", "Lab", "1lab", "lab-1", "abcdefghijklm", "a/b"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        validate_name("lab").unwrap();
    }
}
