//! `/run/sluice/subnet.env`: the agent's word to the plugin about this node's subnet.
//!
//! An IPv4 node has the IPv4 pair (`SLUICE_NETWORK`, `SLUICE_SUBNET`); a node with IPv6 has
//! `SLUICE_NETWORK6` and `SLUICE_SUBNET6` (beside the IPv4 pair on a dual-stack node, alone on
//! an IPv6-only one: DESIGN.md). A file from before IPv6 has no such keys and reads as IPv4
//! only. At least one pair is there.

use crate::cidr::{self, UnsafeRange};
use crate::file::{self, FileError};
use ipnet::{Ipv4Net, Ipv6Net};
use std::path::Path;

pub const DEFAULT_PATH: &str = "/run/sluice/subnet.env";

/// What the agent publishes for the CNI plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// The node's IPv4 family (`SLUICE_NETWORK`, `SLUICE_SUBNET`); none on an IPv6-only node.
    pub v4: Option<SubnetV4>,
    /// The MTU pods get (`SLUICE_MTU`).
    pub mtu: u32,
    /// Whether pod traffic leaving the cluster CIDR is masqueraded (`SLUICE_IPMASQ`).
    pub ipmasq: bool,
    /// The firewall the agent resolved `policy-backend` to (`SLUICE_POLICY_BACKEND`: one of
    /// [`sluice_policy::hostport::BACKEND_NAMES`]), where the plugin writes hostPort
    /// rules; absent until the agent has resolved it.
    pub policy_backend: Option<String>,
    /// The node's IPv6 family, when the cluster runs one (`SLUICE_NETWORK6`, `SLUICE_SUBNET6`).
    pub v6: Option<SubnetV6>,
}

/// The IPv4 pair of the subnet file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetV4 {
    /// The cluster CIDR (`SLUICE_NETWORK`).
    pub network: Ipv4Net,
    /// This node's pod subnet (`SLUICE_SUBNET`).
    pub subnet: Ipv4Net,
}

/// The IPv6 pair of the subnet file (a dual-stack or IPv6-only node).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubnetV6 {
    /// The IPv6 cluster CIDR (`SLUICE_NETWORK6`).
    pub network: Ipv6Net,
    /// This node's IPv6 pod subnet (`SLUICE_SUBNET6`).
    pub subnet: Ipv6Net,
}

/// The longest IPv6 pod subnet: sixteen addresses (the agent's `subnet-length-v6` stops there).
pub const MAX_SUBNET_LEN_V6: u8 = 124;

/// The most the plugin reads of the file: the agent writes about a hundred bytes.
pub const MAX_LEN: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("the node has no subnet yet: {path} does not exist (is the sluice agent running?)")]
    Missing { path: String },
    #[error("reading the node's subnet: {source}")]
    Read {
        #[source]
        source: FileError,
    },
    #[error("{path}: {key} is missing")]
    MissingKey { path: String, key: &'static str },
    #[error("{path}: {key}={value:?} does not parse: {reason}")]
    BadValue {
        path: String,
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("{path}: {key} may not hold pods: {source}")]
    Unsafe {
        path: String,
        key: &'static str,
        #[source]
        source: UnsafeRange,
    },
}

impl SubnetEnvError {
    /// True when the node simply has no subnet yet (the agent has not written one).
    pub fn is_not_ready(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::MissingKey { .. })
    }
}

impl SubnetEnv {
    /// Reads `path`, which must be a regular file of at most [`MAX_LEN`] bytes: a FIFO or a
    /// device there gets an error at once instead of a read that never ends.
    pub fn load(path: &Path) -> Result<Self, SubnetEnvError> {
        let shown = path.display().to_string();
        let bytes = match file::read_regular(path, MAX_LEN) {
            Ok(b) => b,
            Err(FileError::NotFound { .. }) => return Err(SubnetEnvError::Missing { path: shown }),
            Err(source) => return Err(SubnetEnvError::Read { source }),
        };
        let text = String::from_utf8_lossy(&bytes);
        Self::parse(&text, &shown)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, SubnetEnvError> {
        let lookup = |key: &'static str| -> Result<&str, SubnetEnvError> {
            text.lines()
                .filter_map(|l| l.trim().split_once('='))
                .filter(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"'))
                .next_back()
                .ok_or(SubnetEnvError::MissingKey {
                    path: origin.to_string(),
                    key,
                })
        };
        let bad = |key: &'static str, value: &str, reason: String| SubnetEnvError::BadValue {
            path: origin.to_string(),
            key,
            value: value.to_string(),
            reason,
        };
        let net = |key: &'static str| -> Result<Ipv4Net, SubnetEnvError> {
            let v = lookup(key)?;
            v.parse::<Ipv4Net>()
                .map(|n| n.trunc())
                .map_err(|e| bad(key, v, e.to_string()))
        };
        let net6 = |key: &'static str| -> Result<Ipv6Net, SubnetEnvError> {
            let v = lookup(key)?;
            v.parse::<Ipv6Net>()
                .map(|n| n.trunc())
                .map_err(|e| bad(key, v, e.to_string()))
        };
        let has = |key: &str| {
            text.lines()
                .filter_map(|l| l.trim().split_once('='))
                .any(|(k, _)| k.trim() == key)
        };
        let unsafe_range = |key: &'static str, source| SubnetEnvError::Unsafe {
            path: origin.to_string(),
            key,
            source,
        };
        // Both keys or neither: a file with one of them is not what the agent writes.
        let v6 = if has("SLUICE_NETWORK6") || has("SLUICE_SUBNET6") {
            let v6 = SubnetV6 {
                network: net6("SLUICE_NETWORK6")?,
                subnet: net6("SLUICE_SUBNET6")?,
            };
            if v6.subnet.prefix_len() > MAX_SUBNET_LEN_V6 {
                return Err(bad(
                    "SLUICE_SUBNET6",
                    &v6.subnet.to_string(),
                    format!("an IPv6 pod subnet must be /{MAX_SUBNET_LEN_V6} or larger"),
                ));
            }
            cidr::check_pod_range(v6.network.into())
                .map_err(|e| unsafe_range("SLUICE_NETWORK6", e))?;
            cidr::check_node_subnet(v6.network.into(), v6.subnet.into())
                .map_err(|e| unsafe_range("SLUICE_SUBNET6", e))?;
            Some(v6)
        } else {
            None
        };
        // An IPv6-only node (DESIGN.md) has only the IPv6 pair. Without the IPv6 pair the IPv4
        // one must be there (a missing key reads as a node still starting).
        let v4 = if v6.is_none() || has("SLUICE_NETWORK") || has("SLUICE_SUBNET") {
            let v4 = SubnetV4 {
                network: net("SLUICE_NETWORK")?,
                subnet: net("SLUICE_SUBNET")?,
            };
            if v4.subnet.prefix_len() > 30 {
                return Err(bad(
                    "SLUICE_SUBNET",
                    &v4.subnet.to_string(),
                    "a pod subnet must be /30 or larger".into(),
                ));
            }
            cidr::check_pod_range(v4.network.into())
                .map_err(|e| unsafe_range("SLUICE_NETWORK", e))?;
            cidr::check_node_subnet(v4.network.into(), v4.subnet.into())
                .map_err(|e| unsafe_range("SLUICE_SUBNET", e))?;
            Some(v4)
        } else {
            None
        };
        let mtu_text = lookup("SLUICE_MTU")?;
        let mtu: u32 = mtu_text
            .parse()
            .map_err(|e: std::num::ParseIntError| bad("SLUICE_MTU", mtu_text, e.to_string()))?;
        if !(576..=65535).contains(&mtu) {
            return Err(bad(
                "SLUICE_MTU",
                mtu_text,
                "must be between 576 and 65535".into(),
            ));
        }
        let ipmasq = match lookup("SLUICE_IPMASQ") {
            Ok(v) => v
                .parse::<bool>()
                .map_err(|e| bad("SLUICE_IPMASQ", v, e.to_string()))?,
            Err(_) => true,
        };
        let policy_backend = match lookup("SLUICE_POLICY_BACKEND") {
            Ok(v) => {
                sluice_policy::hostport::HostportBackend::parse_name(v)
                    .map_err(|e| bad("SLUICE_POLICY_BACKEND", v, e.to_string()))?;
                Some(v.to_string())
            }
            Err(_) => None,
        };
        Ok(Self {
            v4,
            mtu,
            ipmasq,
            policy_backend,
            v6,
        })
    }

    /// The node's first subnet: the IPv4 one, or an IPv6-only node's IPv6 one.
    pub fn first_subnet(&self) -> Option<ipnet::IpNet> {
        self.v4
            .map(|v| v.subnet.into())
            .or(self.v6.map(|v| v.subnet.into()))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(v4) = &self.v4 {
            out.push_str(&format!(
                "SLUICE_NETWORK={}\nSLUICE_SUBNET={}\n",
                v4.network, v4.subnet
            ));
        }
        out.push_str(&format!(
            "SLUICE_MTU={}\nSLUICE_IPMASQ={}\n",
            self.mtu, self.ipmasq
        ));
        if let Some(v6) = &self.v6 {
            out.push_str(&format!(
                "SLUICE_NETWORK6={}\nSLUICE_SUBNET6={}\n",
                v6.network, v6.subnet
            ));
        }
        if let Some(b) = &self.policy_backend {
            out.push_str(&format!("SLUICE_POLICY_BACKEND={b}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let env = SubnetEnv {
            v4: Some(SubnetV4 {
                network: "10.244.0.0/16".parse().unwrap(),
                subnet: "10.244.3.0/24".parse().unwrap(),
            }),
            mtu: 1450,
            ipmasq: false,
            policy_backend: None,
            v6: None,
        };
        assert_eq!(SubnetEnv::parse(&env.render(), "t").unwrap(), env);
        assert!(!env.render().contains("SLUICE_NETWORK6"));
        let dual = SubnetEnv {
            v6: Some(SubnetV6 {
                network: "fd00:10:244::/56".parse().unwrap(),
                subnet: "fd00:10:244:3::/64".parse().unwrap(),
            }),
            ..env
        };
        let text = dual.render();
        assert!(
            text.contains("SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:244:3::/64\n"),
            "{text}"
        );
        assert_eq!(SubnetEnv::parse(&text, "t").unwrap(), dual);
        // IPv6 only: the IPv6 pair and no IPv4 one, written and read back.
        let only6 = SubnetEnv { v4: None, ..dual };
        let text = only6.render();
        assert!(!text.contains("SLUICE_NETWORK="), "{text}");
        assert!(!text.contains("SLUICE_SUBNET="), "{text}");
        assert!(
            text.contains("SLUICE_SUBNET6=fd00:10:244:3::/64\n"),
            "{text}"
        );
        assert!(text.contains("SLUICE_MTU=1450\n"), "{text}");
        assert_eq!(SubnetEnv::parse(&text, "t").unwrap(), only6);
    }

    #[test]
    fn a_file_from_before_ipv6_reads_as_ipv4_only() {
        let env = SubnetEnv::parse(
            "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.3.0/24\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n",
            "t",
        )
        .unwrap();
        assert_eq!(env.v6, None);
    }

    #[test]
    fn the_ipv6_pair_is_checked_like_the_ipv4_one() {
        let base = "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.3.0/24\nSLUICE_MTU=1450\n";
        let with = |extra: &str| SubnetEnv::parse(&format!("{base}{extra}"), "t");
        // Host bits are dropped, as for IPv4.
        let env =
            with("SLUICE_NETWORK6=\"fd00:10:244::/56\"\nSLUICE_SUBNET6=fd00:10:244:3::1/64\n")
                .unwrap();
        assert_eq!(env.v6.unwrap().subnet.to_string(), "fd00:10:244:3::/64");
        for (extra, key, why) in [
            (
                "SLUICE_NETWORK6=fd00:10:244::/56\n",
                "SLUICE_SUBNET6",
                "missing",
            ),
            (
                "SLUICE_SUBNET6=fd00:10:244:3::/64\n",
                "SLUICE_NETWORK6",
                "missing",
            ),
            (
                "SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=10.244.3.0/24\n",
                "SLUICE_SUBNET6",
                "does not parse",
            ),
            (
                "SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:244:3::/126\n",
                "SLUICE_SUBNET6",
                "/124 or larger",
            ),
            (
                "SLUICE_NETWORK6=fe80::/56\nSLUICE_SUBNET6=fe80::/64\n",
                "SLUICE_NETWORK6",
                "link-local",
            ),
            (
                "SLUICE_NETWORK6=fd00::/8\nSLUICE_SUBNET6=fd00::/64\n",
                "SLUICE_NETWORK6",
                "too broad",
            ),
            (
                "SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:245::/64\n",
                "SLUICE_SUBNET6",
                "outside",
            ),
        ] {
            let e = with(extra).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(why), "{extra}: {e}");
        }
    }

    #[test]
    fn an_ipv6_only_file_has_only_the_ipv6_pair() {
        let env = SubnetEnv::parse(
            "SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:244:3::/64\nSLUICE_MTU=1430\nSLUICE_IPMASQ=false\n",
            "t",
        )
        .unwrap();
        assert_eq!(env.v4, None);
        let v6 = env.v6.unwrap();
        assert_eq!(v6.network.to_string(), "fd00:10:244::/56");
        assert_eq!(v6.subnet.to_string(), "fd00:10:244:3::/64");
        assert_eq!((env.mtu, env.ipmasq), (1430, false));
        // Half an IPv4 pair beside the IPv6 one is not what the agent writes.
        for extra in [
            "SLUICE_NETWORK=10.244.0.0/16\n",
            "SLUICE_SUBNET=10.244.3.0/24\n",
        ] {
            let e = SubnetEnv::parse(
                &format!("{extra}SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:244:3::/64\nSLUICE_MTU=1450\n"),
                "t",
            )
            .unwrap_err();
            assert!(
                matches!(e, SubnetEnvError::MissingKey { .. }),
                "{extra}: {e}"
            );
        }
        // An IPv6-only file is checked as the IPv6 pair of a dual one is.
        let e = SubnetEnv::parse(
            "SLUICE_NETWORK6=fd00:10:244::/56\nSLUICE_SUBNET6=fd00:10:245::/64\nSLUICE_MTU=1450\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("outside"), "{e}");
        // Neither pair: a node still starting.
        let e = SubnetEnv::parse("SLUICE_MTU=1450\n", "t").unwrap_err();
        assert!(e.is_not_ready(), "{e}");
    }

    #[test]
    fn the_policy_backend_round_trips_and_an_unknown_one_is_a_bad_value() {
        let env = SubnetEnv {
            v4: Some(SubnetV4 {
                network: "10.244.0.0/16".parse().unwrap(),
                subnet: "10.244.3.0/24".parse().unwrap(),
            }),
            mtu: 1450,
            ipmasq: false,
            policy_backend: None,
            v6: None,
        };
        assert!(!env.render().contains("SLUICE_POLICY_BACKEND"));
        for b in ["nftables", "iptables-legacy", "iptables-nft", "iptables"] {
            let env = SubnetEnv {
                policy_backend: Some(b.into()),
                ..env.clone()
            };
            assert_eq!(SubnetEnv::parse(&env.render(), "t").unwrap(), env);
        }
        let e = SubnetEnv::parse(
            "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.3.0/24\nSLUICE_MTU=1450\nSLUICE_POLICY_BACKEND=pf\n",
            "t",
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                SubnetEnvError::BadValue {
                    key: "SLUICE_POLICY_BACKEND",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn accepts_flannel_style_gateway_form_and_quotes() {
        let env = SubnetEnv::parse(
            "SLUICE_NETWORK=\"10.244.0.0/16\"\nSLUICE_SUBNET=10.244.3.1/24\nSLUICE_MTU=1400\n",
            "t",
        )
        .unwrap();
        assert_eq!(env.v4.unwrap().subnet.to_string(), "10.244.3.0/24");
        assert!(env.ipmasq);
    }

    #[test]
    fn missing_subnet_is_not_ready_and_garbage_is_an_error() {
        let e = SubnetEnv::parse("SLUICE_NETWORK=10.0.0.0/8\nSLUICE_MTU=1450\n", "t").unwrap_err();
        assert!(e.is_not_ready(), "{e}");
        let e = SubnetEnv::parse(
            "SLUICE_NETWORK=10.0.0.0/8\nSLUICE_SUBNET=nope\nSLUICE_MTU=1450\n",
            "t",
        )
        .unwrap_err();
        assert!(!e.is_not_ready());
        assert!(e.to_string().contains("SLUICE_SUBNET"), "{e}");
        let e = SubnetEnv::parse(
            "SLUICE_NETWORK=10.0.0.0/8\nSLUICE_SUBNET=10.0.1.0/24\nSLUICE_MTU=12\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("SLUICE_MTU"), "{e}");
    }

    #[test]
    fn unsafe_ranges_are_refused_by_name() {
        for (network, subnet, key, why) in [
            (
                "10.244.0.0/16",
                "169.254.1.0/24",
                "SLUICE_SUBNET",
                "link-local",
            ),
            (
                "169.254.0.0/16",
                "169.254.1.0/24",
                "SLUICE_NETWORK",
                "link-local",
            ),
            ("127.0.0.0/8", "127.0.0.0/24", "SLUICE_NETWORK", "loopback"),
            ("0.0.0.0/8", "0.0.0.0/24", "SLUICE_NETWORK", "unspecified"),
            ("0.0.0.0/0", "0.0.0.0/0", "SLUICE_NETWORK", "too broad"),
            ("0.0.0.0/0", "10.244.1.0/24", "SLUICE_NETWORK", "too broad"),
            ("10.244.0.0/16", "10.0.0.0/7", "SLUICE_SUBNET", "too broad"),
            ("10.244.0.0/16", "10.245.1.0/24", "SLUICE_SUBNET", "outside"),
        ] {
            let text =
                format!("SLUICE_NETWORK={network}\nSLUICE_SUBNET={subnet}\nSLUICE_MTU=1450\n");
            let e = SubnetEnv::parse(&text, "t").unwrap_err();
            assert!(matches!(e, SubnetEnvError::Unsafe { .. }), "{subnet}: {e}");
            assert!(!e.is_not_ready());
            let shown = e.to_string();
            assert!(
                shown.contains(key) && shown.contains(why),
                "{subnet}: {shown}"
            );
        }
    }

    /// Runs `f` on another thread; fails the test if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the call blocked")
    }

    #[test]
    fn a_file_that_never_ends_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = within_10s(move || SubnetEnv::load(&fifo)).unwrap_err();
        assert!(
            e.to_string().contains("not a regular file (it is a FIFO)"),
            "{e}"
        );
        let big = dir.path().join("big");
        let mut text =
            "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.3.0/24\nSLUICE_MTU=1450\n"
                .to_string();
        text.push_str(&"#".repeat(MAX_LEN as usize));
        std::fs::write(&big, text).unwrap();
        let e = SubnetEnv::load(&big).unwrap_err();
        assert!(matches!(e, SubnetEnvError::Read { .. }), "{e}");
        assert!(e.to_string().contains("larger than"), "{e}");
    }

    #[test]
    fn missing_file_is_not_ready() {
        let e = SubnetEnv::load(Path::new("/nonexistent/sluice/subnet.env")).unwrap_err();
        assert!(e.is_not_ready());
        assert!(e.to_string().contains("agent"));
    }
}
