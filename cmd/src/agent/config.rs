//! `kube-system/sluice-config`: every key of DESIGN.md, its default, and which keys take effect
//! live. Parsing is pure: a ConfigMap's data in, a whole configuration or every problem out, so a
//! bad value never half-applies and the agent keeps its last good configuration.

use ipnet::Ipv4Net;
use sluice_net::cidr::ClusterCidr;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubnetSource {
    /// The Node's `spec.podCIDRs` when it has them, a lease otherwise.
    Auto,
    Lease,
    NodePodCidr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    Wireguard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyBackend {
    Nftables,
    Iptables,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mtu {
    Auto,
    Fixed(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// One range per family the cluster runs (IPv4, IPv6 or both).
    pub cluster_cidr: ClusterCidr,
    /// A node's IPv4 subnet's prefix length (`subnet-length`).
    pub subnet_length: u8,
    /// A node's IPv6 subnet's prefix length (`subnet-length-v6`).
    pub subnet_length_v6: u8,
    pub subnet_source: SubnetSource,
    pub encryption: Encryption,
    /// Where VXLAN carries pod traffic between nodes (live).
    pub overlay: sluice_net::datapath::Overlay,
    pub policy_backend: PolicyBackend,
    pub mtu: Mtu,
    pub masquerade: bool,
    pub log_level: String,
    pub health_port: u16,
    /// Where `/healthz`, `/readyz` and `/metrics` listen (`/status` is on loopback only).
    pub health_address: std::net::IpAddr,
    pub vxlan_port: u16,
    pub wireguard_port: u16,
    pub wireguard_keepalive: u16,
    pub policy_log_drops: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: ClusterCidr::ipv4_only(
                Ipv4Net::new(std::net::Ipv4Addr::new(10, 244, 0, 0), 16).unwrap_or_default(),
            ),
            subnet_length: 24,
            subnet_length_v6: 64,
            subnet_source: SubnetSource::Auto,
            encryption: Encryption::None,
            overlay: sluice_net::datapath::Overlay::Always,
            policy_backend: PolicyBackend::Auto,
            mtu: Mtu::Auto,
            masquerade: true,
            log_level: "info".into(),
            health_port: 9099,
            health_address: std::net::IpAddr::from([0, 0, 0, 0]),
            vxlan_port: 8472,
            wireguard_port: 51820,
            wireguard_keepalive: 0,
            policy_log_drops: false,
        }
    }
}

/// Every key of sluice-config (DESIGN.md); the manifest's ConfigMap has exactly these.
pub const KEYS: [&str; 16] = [
    "cluster-cidr",
    "subnet-length",
    "subnet-length-v6",
    "subnet-source",
    "encryption",
    "overlay",
    "policy-backend",
    "mtu",
    "masquerade",
    "log-level",
    "health-port",
    "health-address",
    "vxlan-port",
    "wireguard-port",
    "wireguard-keepalive",
    "policy-log-drops",
];

/// One key that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {value:?} is not {expected}{}", .reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default())]
pub struct BadValue {
    pub key: String,
    pub value: String,
    pub expected: &'static str,
    /// What exactly is wrong, when more can be said than `expected`.
    pub reason: Option<String>,
}

/// Why a ConfigMap was not taken: every bad key, and keys sluice does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sluice-config not applied: {}", .problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))]
pub struct ConfigError {
    pub problems: Vec<BadValue>,
}

fn bool_of(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// Parses the ConfigMap's data; absent keys take their defaults. Unknown keys are errors too, since
/// a misspelt key silently ignored is a setting the operator believes is in force.
pub fn parse(data: &BTreeMap<String, String>) -> Result<AgentConfig, ConfigError> {
    let mut c = AgentConfig::default();
    let mut problems = Vec::new();
    for (key, raw) in data {
        if !KEYS.contains(&key.as_str()) {
            problems.push(BadValue {
                key: key.clone(),
                value: raw.clone(),
                expected: "a sluice-config key",
                reason: None,
            });
            continue;
        }
        let v = raw.trim();
        let mut bad_because = |expected: &'static str, reason: Option<String>| {
            problems.push(BadValue {
                key: key.clone(),
                value: raw.clone(),
                expected,
                reason,
            })
        };
        let mut bad = |expected: &'static str| bad_because(expected, None);
        match key.as_str() {
            // Loopback, link-local (every pod's gateway is 169.254.1.1), multicast, "this
            // network", or wider than a /8 (IPv6: /16): the CNI plugin would refuse every pod.
            "cluster-cidr" => match ClusterCidr::parse(v) {
                Ok(n) => c.cluster_cidr = n,
                Err(e) => bad_because(
                    "one IPv4 CIDR, one IPv6 CIDR, or one of each comma-separated (e.g. 10.244.0.0/16,fd00:10:244::/56), each a pod range",
                    Some(e.to_string()),
                ),
            },
            "subnet-length" => match v.parse::<u8>() {
                Ok(n) if (1..=30).contains(&n) => c.subnet_length = n,
                _ => bad("a prefix length from 1 to 30"),
            },
            "subnet-length-v6" => match v.parse::<u8>() {
                Ok(n) if (MIN_SUBNET_LENGTH_V6..=MAX_SUBNET_LENGTH_V6).contains(&n) => {
                    c.subnet_length_v6 = n
                }
                _ => bad("a prefix length from 16 to 124"),
            },
            "subnet-source" => match v {
                "auto" => c.subnet_source = SubnetSource::Auto,
                "lease" => c.subnet_source = SubnetSource::Lease,
                "node-podcidr" => c.subnet_source = SubnetSource::NodePodCidr,
                _ => bad("auto, lease or node-podcidr"),
            },
            "encryption" => match v {
                "none" => c.encryption = Encryption::None,
                "wireguard" => c.encryption = Encryption::Wireguard,
                _ => bad("none or wireguard"),
            },
            "overlay" => match sluice_net::datapath::Overlay::parse(v) {
                Some(o) => c.overlay = o,
                None => bad("always, cross-subnet or never"),
            },
            "policy-backend" => match v {
                "nftables" => c.policy_backend = PolicyBackend::Nftables,
                "iptables" => c.policy_backend = PolicyBackend::Iptables,
                "auto" => c.policy_backend = PolicyBackend::Auto,
                _ => bad("nftables, iptables or auto"),
            },
            "mtu" => match v {
                "auto" => c.mtu = Mtu::Auto,
                n => match n.parse::<u32>() {
                    Ok(n) if (576..=9000).contains(&n) => c.mtu = Mtu::Fixed(n),
                    _ => bad("auto or a number from 576 to 9000"),
                },
            },
            "masquerade" => match bool_of(v) {
                Some(b) => c.masquerade = b,
                None => bad("true or false"),
            },
            "policy-log-drops" => match bool_of(v) {
                Some(b) => c.policy_log_drops = b,
                None => bad("true or false"),
            },
            "log-level" => match v {
                "error" | "warn" | "info" | "debug" | "trace" => c.log_level = v.into(),
                _ => bad("error, warn, info, debug or trace"),
            },
            "health-port" | "vxlan-port" | "wireguard-port" => match v.parse::<u16>() {
                Ok(p) if p > 0 => match key.as_str() {
                    "health-port" => c.health_port = p,
                    "vxlan-port" => c.vxlan_port = p,
                    _ => c.wireguard_port = p,
                },
                _ => bad("a port from 1 to 65535"),
            },
            "health-address" => match v.parse::<std::net::IpAddr>() {
                Ok(ip) => c.health_address = ip,
                _ => bad("an IP address (0.0.0.0 for every address, 127.0.0.1 for loopback only)"),
            },
            "wireguard-keepalive" => match v.parse::<u16>() {
                Ok(s) => c.wireguard_keepalive = s,
                _ => bad("seconds from 0 (off) to 65535"),
            },
            _ => bad("a sluice-config key"),
        }
    }
    if problems.is_empty() {
        problems.extend(subnet_length_problems(&c));
    }
    if problems.is_empty() {
        Ok(c)
    } else {
        Err(ConfigError { problems })
    }
}

/// The shortest and longest `subnet-length-v6`: no shorter than the shortest IPv6 pod range
/// ([`sluice_net::cidr::MIN_PREFIX_V6`]), and at least 16 addresses per node.
pub const MIN_SUBNET_LENGTH_V6: u8 = sluice_net::cidr::MIN_PREFIX_V6;
pub const MAX_SUBNET_LENGTH_V6: u8 = 124;

/// Each family's subnet length against that family's cluster CIDR. A family the cluster does
/// not run has nothing to fit in: its length is not judged.
///
/// IPv4 subnets must be longer than the cluster CIDR (as before dual-stack); an IPv6 subnet may
/// be the whole IPv6 cluster CIDR (a /64 cluster CIDR with `subnet-length-v6` 64 is one node, as
/// kube-controller-manager allows), since IPv6 ranges are commonly handed out as exactly a /64.
fn subnet_length_problems(c: &AgentConfig) -> Vec<BadValue> {
    let mut problems = Vec::new();
    if let Some(v4) = c.cluster_cidr.v4 {
        if c.subnet_length <= v4.prefix_len() {
            problems.push(BadValue {
                key: "subnet-length".into(),
                value: c.subnet_length.to_string(),
                expected: "longer than the cluster CIDR's prefix",
                reason: Some(format!("the IPv4 cluster CIDR is {v4}")),
            });
        }
    }
    if let Some(v6) = c.cluster_cidr.v6 {
        if c.subnet_length_v6 < v6.prefix_len() {
            problems.push(BadValue {
                key: "subnet-length-v6".into(),
                value: c.subnet_length_v6.to_string(),
                expected: "at least the IPv6 cluster CIDR's prefix",
                reason: Some(format!("the IPv6 cluster CIDR is {v6}")),
            });
        }
    }
    problems
}

/// Parses a ConfigMap's `data` as the API server sent it, before any typed decoding: a value that
/// is not a string (`"mtu": 1400`, which a lenient API server stores) is a bad value like any
/// other, not a reason to ignore the whole object. `None` (no `data`) is every default.
pub fn parse_data_json(data: Option<&serde_json::Value>) -> Result<AgentConfig, ConfigError> {
    let mut strings = BTreeMap::new();
    let mut problems = Vec::new();
    match data {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::Object(map)) => {
            for (key, value) in map {
                match value {
                    serde_json::Value::String(s) => {
                        strings.insert(key.clone(), s.clone());
                    }
                    other => problems.push(BadValue {
                        key: key.clone(),
                        value: other.to_string(),
                        expected: "a string (ConfigMap values are strings: quote it)",
                        reason: None,
                    }),
                }
            }
        }
        Some(other) => problems.push(BadValue {
            key: "data".into(),
            value: other.to_string(),
            expected: "a map of strings",
            reason: None,
        }),
    }
    match parse(&strings) {
        Ok(c) if problems.is_empty() => Ok(c),
        Ok(_) => Err(ConfigError { problems }),
        Err(e) => {
            problems.extend(e.problems);
            problems.sort_by(|a, b| a.key.cmp(&b.key));
            Err(ConfigError { problems })
        }
    }
}

/// `old` with the keys that take effect live taken from `new`; the rest wait for a restart.
pub fn with_live_keys(old: &AgentConfig, new: &AgentConfig) -> AgentConfig {
    AgentConfig {
        masquerade: new.masquerade,
        encryption: new.encryption,
        overlay: new.overlay,
        log_level: new.log_level.clone(),
        wireguard_keepalive: new.wireguard_keepalive,
        policy_log_drops: new.policy_log_drops,
        ..old.clone()
    }
}

/// Keys whose change needs a restart to take effect, between two good configurations.
pub fn needs_restart(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    let mut keys = Vec::new();
    if old.cluster_cidr != new.cluster_cidr {
        keys.push("cluster-cidr");
    }
    if old.subnet_length != new.subnet_length {
        keys.push("subnet-length");
    }
    if old.subnet_length_v6 != new.subnet_length_v6 {
        keys.push("subnet-length-v6");
    }
    if old.subnet_source != new.subnet_source {
        keys.push("subnet-source");
    }
    if old.policy_backend != new.policy_backend {
        keys.push("policy-backend");
    }
    if old.mtu != new.mtu {
        keys.push("mtu");
    }
    if old.health_port != new.health_port {
        keys.push("health-port");
    }
    if old.health_address != new.health_address {
        keys.push("health-address");
    }
    if old.vxlan_port != new.vxlan_port {
        keys.push("vxlan-port");
    }
    if old.wireguard_port != new.wireguard_port {
        keys.push("wireguard-port");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_is_every_default() {
        let c = parse(&BTreeMap::new()).unwrap();
        assert_eq!(c, AgentConfig::default());
        assert_eq!(c.cluster_cidr.to_string(), "10.244.0.0/16");
        assert_eq!((c.cluster_cidr.v6, c.subnet_length_v6), (None, 64));
        assert_eq!(
            (c.health_port, c.vxlan_port, c.wireguard_port),
            (9099, 8472, 51820)
        );
    }

    #[test]
    fn every_key_parses() {
        let c = parse(&data(&[
            ("cluster-cidr", "10.42.0.0/16"),
            ("subnet-length", "26"),
            ("subnet-length-v6", "80"),
            ("subnet-source", "node-podcidr"),
            ("encryption", "wireguard"),
            ("overlay", "cross-subnet"),
            ("policy-backend", "iptables"),
            ("mtu", "1400"),
            ("masquerade", "false"),
            ("log-level", "debug"),
            ("health-port", "9199"),
            ("vxlan-port", "4789"),
            ("wireguard-port", "51821"),
            ("wireguard-keepalive", "25"),
            ("policy-log-drops", "true"),
        ]))
        .unwrap();
        assert_eq!((c.subnet_length, c.subnet_length_v6), (26, 80));
        assert_eq!(c.subnet_source, SubnetSource::NodePodCidr);
        assert_eq!(c.encryption, Encryption::Wireguard);
        assert_eq!(c.overlay, sluice_net::datapath::Overlay::CrossSubnet);
        assert_eq!(c.policy_backend, PolicyBackend::Iptables);
        assert_eq!(c.mtu, Mtu::Fixed(1400));
        assert!(!c.masquerade && c.policy_log_drops);
        assert_eq!(
            (c.health_port, c.vxlan_port, c.wireguard_port),
            (9199, 4789, 51821)
        );
        assert_eq!(c.wireguard_keepalive, 25);
    }

    #[test]
    fn bad_values_are_all_reported() {
        let e = parse(&data(&[
            ("encryption", "ipsec"),
            ("mtu", "12"),
            ("cluster-cidr", "10.244.1.0/16"),
            ("health-prot", "1"),
        ]))
        .unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["cluster-cidr", "encryption", "health-prot", "mtu"]);
        assert!(e
            .to_string()
            .contains("encryption: \"ipsec\" is not none or wireguard"));
    }

    #[test]
    fn unsafe_cluster_cidrs_are_refused() {
        for bad in [
            "127.0.0.0/8",
            "169.254.0.0/16",
            "0.0.0.0/0",
            "224.0.0.0/4",
            "10.0.0.0/7",
        ] {
            let e = parse(&data(&[("cluster-cidr", bad)])).unwrap_err();
            assert_eq!(e.problems[0].key, "cluster-cidr", "{bad}");
        }
        assert!(parse(&data(&[("cluster-cidr", "10.0.0.0/8")])).is_ok());
    }

    #[test]
    fn subnet_must_fit_in_the_cluster_cidr() {
        let e = parse(&data(&[
            ("cluster-cidr", "10.0.0.0/24"),
            ("subnet-length", "24"),
        ]))
        .unwrap_err();
        assert_eq!(e.problems[0].key, "subnet-length");
    }

    #[test]
    fn a_value_of_the_wrong_json_type_is_a_bad_value() {
        let raw = serde_json::json!({"mtu": 1400, "encryption": "wireguard", "masquerade": true});
        let e = parse_data_json(Some(&raw)).unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["masquerade", "mtu"]);
        assert!(
            e.to_string().contains("mtu: \"1400\" is not a string"),
            "{e}"
        );
        let e = parse_data_json(Some(&serde_json::json!(["mtu"]))).unwrap_err();
        assert_eq!(e.problems[0].key, "data");
        let ok = parse_data_json(Some(&serde_json::json!({"mtu": "1400"}))).unwrap();
        assert_eq!(ok.mtu, Mtu::Fixed(1400));
        assert_eq!(parse_data_json(None).unwrap(), AgentConfig::default());
        // Strings and types are judged together: every problem in one message.
        let e =
            parse_data_json(Some(&serde_json::json!({"mtu": 1, "encryption": "x"}))).unwrap_err();
        assert_eq!(e.problems.len(), 2);
    }

    #[test]
    fn subnet_source_defaults_to_auto_and_health_address_parses() {
        assert_eq!(AgentConfig::default().subnet_source, SubnetSource::Auto);
        let c = parse(&data(&[
            ("subnet-source", "auto"),
            ("health-address", "127.0.0.1"),
        ]))
        .unwrap();
        assert_eq!(c.subnet_source, SubnetSource::Auto);
        assert!(c.health_address.is_loopback());
        assert!(parse(&data(&[("health-address", "localhost")])).is_err());
    }

    #[test]
    fn live_and_restart_keys() {
        let a = AgentConfig::default();
        let mut b = a.clone();
        b.encryption = Encryption::Wireguard;
        b.overlay = sluice_net::datapath::Overlay::Never;
        b.masquerade = false;
        assert!(needs_restart(&a, &b).is_empty());
        b.vxlan_port = 4789;
        assert_eq!(needs_restart(&a, &b), ["vxlan-port"]);
    }

    #[test]
    fn cluster_cidr_takes_either_family_or_both() {
        let c = parse(&data(&[("cluster-cidr", "10.244.0.0/16,fd00:10:244::/56")])).unwrap();
        assert_eq!(c.cluster_cidr.v4, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(c.cluster_cidr.v6, Some("fd00:10:244::/56".parse().unwrap()));
        assert_eq!((c.subnet_length, c.subnet_length_v6), (24, 64));
        let c = parse(&data(&[
            ("cluster-cidr", "fd00:10:244::/48"),
            ("subnet-length-v6", "80"),
        ]))
        .unwrap();
        assert_eq!(c.cluster_cidr.v4, None);
        assert_eq!(c.subnet_length_v6, 80);
        assert!(!c.cluster_cidr.is_dual());
        // IPv6 only: subnet-length has no IPv4 range to fit in and is not judged.
        assert!(parse(&data(&[
            ("cluster-cidr", "fd00:10:244::/48"),
            ("subnet-length", "8"),
        ]))
        .is_ok());
    }

    #[test]
    fn a_bad_cluster_cidr_says_what_is_wrong() {
        for (text, why) in [
            ("10.1.0.0/16,10.2.0.0/16", "two IPv4 CIDRs"),
            ("fd00:1::/48,fd00:2::/48", "two IPv6 CIDRs"),
            ("10.1.0.0/16,fd00::/48,fd01::/48", "3 CIDRs"),
            ("fd00:10:244::1/56", "host bits"),
            ("fe80::/64", "link-local"),
            ("10.244.0.0/16,fd00::/12", "too broad"),
            ("", "no CIDR"),
            ("10.244.0.0/16;fd00::/48", "not a CIDR"),
        ] {
            let e = parse(&data(&[("cluster-cidr", text)])).unwrap_err();
            assert_eq!(e.problems.len(), 1, "{text}: {e}");
            assert_eq!(e.problems[0].key, "cluster-cidr", "{text}");
            let shown = e.to_string();
            assert!(shown.contains(why), "{text}: {shown}");
            assert!(shown.contains("one of each comma-separated"), "{shown}");
        }
    }

    #[test]
    fn subnet_length_v6_fits_the_ipv6_cluster_cidr() {
        // A /64 cluster CIDR cut into /64s: one node's worth, allowed.
        let c = parse(&data(&[("cluster-cidr", "fd00:10:244::/64")])).unwrap();
        assert_eq!(c.subnet_length_v6, 64);
        let e = parse(&data(&[
            ("cluster-cidr", "10.244.0.0/16,fd00:10:244::/64"),
            ("subnet-length-v6", "60"),
        ]))
        .unwrap_err();
        assert_eq!(e.problems.len(), 1, "{e}");
        assert_eq!(e.problems[0].key, "subnet-length-v6");
        assert!(e.to_string().contains("fd00:10:244::/64"), "{e}");
        // Both families wrong: both reported.
        let e = parse(&data(&[
            ("cluster-cidr", "10.244.0.0/24,fd00:10:244::/64"),
            ("subnet-length", "24"),
            ("subnet-length-v6", "56"),
        ]))
        .unwrap_err();
        let keys: Vec<_> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["subnet-length", "subnet-length-v6"]);
        for bad in ["0", "15", "125", "128", "64.0", "-64", "x"] {
            let e = parse(&data(&[("subnet-length-v6", bad)])).unwrap_err();
            assert_eq!(e.problems[0].key, "subnet-length-v6", "{bad}");
            assert!(e.to_string().contains("from 16 to 124"), "{e}");
        }
        // Without IPv6 in the cluster CIDR the length is still checked as a value.
        assert!(parse(&data(&[("subnet-length-v6", "120")])).is_ok());
    }

    #[test]
    fn the_families_need_a_restart() {
        let a = AgentConfig::default();
        let b = parse(&data(&[
            ("cluster-cidr", "10.244.0.0/16,fd00:10:244::/56"),
            ("subnet-length-v6", "72"),
        ]))
        .unwrap();
        assert_eq!(needs_restart(&a, &b), ["cluster-cidr", "subnet-length-v6"]);
        assert_eq!(with_live_keys(&a, &b).cluster_cidr, a.cluster_cidr);
    }
}
