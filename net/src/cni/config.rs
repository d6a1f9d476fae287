//! What a CNI call brings: the environment and the network configuration on stdin.

use super::{CniError, CniVersion, Command, ErrorCode};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

pub const DEFAULT_IPAM_DIR: &str = "/var/lib/sluice/ipam";

/// The plugin's network configuration, as the runtime hands it on stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: CniVersion,
    pub name: String,
    /// Where the agent publishes this node's subnet.
    pub subnet_file: PathBuf,
    /// Where allocations are kept.
    pub ipam_dir: PathBuf,
    /// Overrides `SLUICE_MTU` when set.
    pub mtu: Option<u32>,
    /// Passed through into the result.
    pub dns: Option<serde_json::Value>,
    /// The result of the plugins before this one in a chain.
    pub prev_result: Option<serde_json::Value>,
    /// GC: the attachments the runtime still knows, under [`VALID_ATTACHMENTS`]; see
    /// [`NetConf::gc_attachments`].
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The same list under [`ATTACHMENTS`], the name an earlier text of the spec gave it.
    pub attachments: Option<Vec<Attachment>>,
    /// The other `cni.dev/` keys of the configuration, to name in an error (a misspelled list).
    pub other_cni_dev_keys: Vec<String>,
    /// `runtimeConfig`: what the runtime sends for the capabilities the conflist advertises.
    /// Kept as JSON; each capability decodes its own key, in the verbs that use it, so that a
    /// malformed value fails ADD and never blocks DEL.
    pub runtime_config: Option<serde_json::Value>,
}

/// A capability argument with its object keys matched to `fields` as Go's `encoding/json`
/// matches a struct's fields: case-insensitively, an exact match first. containerd's CRI (through
/// go-cni) sends `runtimeConfig` with Go's field names, `{"HostPort": 30880, "ContainerPort":
/// 8080, "Protocol": "TCP", "HostIP": ""}` and `{"IngressRate": ..., "IngressBurst": ...}`,
/// which the reference plugins (portmap, bandwidth), decoding with `encoding/json`, read as
/// `hostPort`, `ingressRate`: so must sluice. Arrays are matched element by element; keys that
/// match no field, and values that are not objects, are kept as they are.
pub fn go_json_keys(value: &serde_json::Value, fields: &[&str]) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| go_json_keys(v, fields)).collect())
        }
        Value::Object(obj) => {
            let mut out = serde_json::Map::new();
            // Exact names first, so that a folded key never overrides one.
            for (k, v) in obj.iter().filter(|(k, _)| fields.contains(&k.as_str())) {
                out.insert(k.clone(), v.clone());
            }
            for (k, v) in obj.iter().filter(|(k, _)| !fields.contains(&k.as_str())) {
                match fields.iter().find(|f| f.eq_ignore_ascii_case(k)) {
                    Some(f) if !out.contains_key(*f) => {
                        out.insert((*f).to_string(), v.clone());
                    }
                    Some(_) => {}
                    None => {
                        out.insert(k.clone(), v.clone());
                    }
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

/// The GC list's key (CNI 1.1.0).
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// The GC list's key in the spec's first text of GC; libcni sends both (containernetworking/cni#1101).
pub const ATTACHMENTS: &str = "cni.dev/attachments";

/// One (container, interface) the runtime considers live.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    subnet_file: Option<PathBuf>,
    ipam_dir: Option<PathBuf>,
    mtu: Option<u32>,
    dns: Option<serde_json::Value>,
    prev_result: Option<serde_json::Value>,
    ipam: Option<serde_json::Value>,
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "present"
    )]
    valid_attachments: Option<Option<Vec<Attachment>>>,
    #[serde(rename = "cni.dev/attachments", default, deserialize_with = "present")]
    attachments: Option<Option<Vec<Attachment>>>,
    runtime_config: Option<serde_json::Value>,
    #[serde(flatten)]
    rest: BTreeMap<String, serde_json::Value>,
}

/// Tells a key given as `null` (`Some(None)`) from a missing one (`None`, the default).
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Reads only `cniVersion`, for VERSION and for shaping an error before the rest is understood.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        cni_version: Option<String>,
    }
    serde_json::from_slice::<Peek>(stdin).ok()?.cni_version
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: RawConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decoding,
                "network configuration on stdin is not valid JSON",
            )
            .with_details(e.to_string())
        })?;
        let version_text = raw.cni_version.ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "network configuration has no cniVersion",
            )
        })?;
        let version = CniVersion::parse(&version_text).ok_or_else(|| {
            CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("incompatible CNI version {version_text:?}: sluice-cni supports 0.3.0, 0.3.1, 0.4.0, 1.0.0 and 1.1.0"),
            )
        })?;
        let name = raw.name.filter(|n| !n.is_empty()).ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "network configuration has no name",
            )
        })?;
        if let Some(ipam) = &raw.ipam {
            let kind = ipam.get("type").and_then(|t| t.as_str()).unwrap_or("");
            if !kind.is_empty() && kind != "sluice-cni" {
                return Err(CniError::new(
                    ErrorCode::UnsupportedField,
                    format!("ipam type {kind:?} is not supported: sluice-cni allocates from the node's subnet itself; remove the ipam section"),
                ));
            }
        }
        if let Some(mtu) = raw.mtu {
            if !(576..=65535).contains(&mtu) {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("mtu {mtu} is out of range 576..=65535"),
                ));
            }
        }
        Ok(Self {
            version,
            name,
            subnet_file: raw
                .subnet_file
                .unwrap_or_else(|| crate::subnet_env::DEFAULT_PATH.into()),
            ipam_dir: raw.ipam_dir.unwrap_or_else(|| DEFAULT_IPAM_DIR.into()),
            mtu: raw.mtu,
            dns: raw.dns,
            prev_result: raw.prev_result,
            // libcni sends a runtime's empty list as null (a nil Go slice; CRI-O passes one for
            // a network without pods): null is the empty list, only a missing key is no list.
            valid_attachments: raw.valid_attachments.map(Option::unwrap_or_default),
            attachments: raw.attachments.map(Option::unwrap_or_default),
            other_cni_dev_keys: raw
                .rest
                .into_keys()
                .filter(|k| k.starts_with("cni.dev/"))
                .collect(),
            runtime_config: raw.runtime_config,
        })
    }

    /// GC's list of the attachments still valid. The spec makes it the runtime's duty to send
    /// it; without it GC cannot tell a live pod from a leak, so a configuration without one (or
    /// with two that differ) is an error and nothing is collected.
    pub fn gc_attachments(&self) -> Result<Vec<Attachment>, CniError> {
        match (&self.valid_attachments, &self.attachments) {
            (Some(list), None) | (None, Some(list)) => Ok(list.clone()),
            (Some(a), Some(b)) => {
                let set = |l: &[Attachment]| l.iter().cloned().collect::<BTreeSet<_>>();
                if set(a) == set(b) {
                    Ok(a.clone())
                } else {
                    Err(CniError::new(
                        ErrorCode::InvalidConfig,
                        format!("GC got two lists of valid attachments that differ ({VALID_ATTACHMENTS}: {}, {ATTACHMENTS}: {}); nothing was collected", a.len(), b.len()),
                    ))
                }
            }
            (None, None) => {
                let mut msg = format!("GC needs the runtime's list of valid attachments ({VALID_ATTACHMENTS}) and the network configuration has none; nothing was collected");
                if !self.other_cni_dev_keys.is_empty() {
                    let keys: Vec<String> = self
                        .other_cni_dev_keys
                        .iter()
                        .map(|k| format!("{k:?}"))
                        .collect();
                    msg.push_str(&format!(
                        " (it has {}: is the key misspelled?)",
                        keys.join(", ")
                    ));
                }
                Err(CniError::new(ErrorCode::InvalidConfig, msg))
            }
        }
    }
}

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    /// `CNI_ARGS`, split into its `KEY=VALUE` pairs.
    pub args: BTreeMap<String, String>,
}

impl Request {
    /// Pod namespace and name from `CNI_ARGS`, for logs.
    pub fn pod(&self) -> Option<(&str, &str)> {
        Some((
            self.args.get("K8S_POD_NAMESPACE")?,
            self.args.get("K8S_POD_NAME")?,
        ))
    }

    /// Reads what `command` needs from the environment (`get` looks a variable up), and checks it.
    pub fn from_env(
        command: Command,
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, CniError> {
        let need = |key: &str| -> Result<String, CniError> {
            get(key).filter(|v| !v.is_empty()).ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidEnvironment,
                    format!("{key} is not set: a {} call needs it", command.as_str()),
                )
            })
        };
        let mut req = Request::default();
        match command {
            Command::Add | Command::Check | Command::Del => {
                req.container_id = need("CNI_CONTAINERID")?;
                validate_container_id(&req.container_id)?;
                req.ifname = need("CNI_IFNAME")?;
                validate_ifname(&req.ifname)?;
                req.netns = if command == Command::Del {
                    get("CNI_NETNS")
                        .filter(|v| !v.is_empty())
                        .map(PathBuf::from)
                } else {
                    Some(PathBuf::from(need("CNI_NETNS")?))
                };
            }
            Command::Status | Command::Gc | Command::Version => {}
        }
        if let Some(args) = get("CNI_ARGS") {
            req.args = parse_args(&args)?;
        }
        Ok(req)
    }
}

fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_CONTAINERID {id:?} is invalid: it must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"),
        ))
    }
}

fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_IFNAME {name:?} is not a valid interface name (at most 15 characters, no '/', ':' or spaces)"),
        ))
    }
}

fn parse_args(text: &str) -> Result<BTreeMap<String, String>, CniError> {
    text.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    CniError::new(
                        ErrorCode::InvalidEnvironment,
                        format!("CNI_ARGS entry {pair:?} is not KEY=VALUE"),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn parses_a_full_config() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"sluice","type":"sluice-cni","subnetFile":"/tmp/s.env",
                "ipamDir":"/tmp/ipam","mtu":1400,"dns":{"nameservers":["10.96.0.10"]},
                "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}],
                "runtimeConfig":{"whatever":1}}"#,
        )
        .unwrap();
        assert_eq!(c.version, CniVersion::V1_1_0);
        assert_eq!(c.subnet_file, PathBuf::from("/tmp/s.env"));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.runtime_config, Some(serde_json::json!({"whatever":1})));
        assert_eq!(
            c.gc_attachments().unwrap(),
            vec![Attachment {
                container_id: "abc".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn gc_needs_its_list() {
        let parse = |extra: &str| {
            NetConf::parse(format!(r#"{{"cniVersion":"1.1.0","name":"n"{extra}}}"#).as_bytes())
                .unwrap()
        };
        let e = parse("").gc_attachments().unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidConfig);
        assert!(e.msg.contains(VALID_ATTACHMENTS), "{e}");
        assert!(e.msg.contains("nothing was collected"), "{e}");
        let e = parse(r#","cni.dev/valid_attachments":[]"#)
            .gc_attachments()
            .unwrap_err();
        assert!(e.msg.contains(r#""cni.dev/valid_attachments""#), "{e}");
        assert!(e.msg.contains("misspelled"), "{e}");
        // An empty list and null (libcni's empty list) are lists: nothing is valid.
        assert_eq!(
            parse(r#","cni.dev/valid-attachments":[]"#).gc_attachments(),
            Ok(vec![])
        );
        assert_eq!(
            parse(r#","cni.dev/valid-attachments":null"#).gc_attachments(),
            Ok(vec![])
        );
        let one = r#"[{"containerID":"a","ifname":"eth0"}]"#;
        let want = vec![Attachment {
            container_id: "a".into(),
            ifname: "eth0".into(),
        }];
        assert_eq!(
            parse(&format!(r#","cni.dev/attachments":{one}"#)).gc_attachments(),
            Ok(want.clone())
        );
        assert_eq!(
            parse(&format!(
                r#","cni.dev/attachments":{one},"cni.dev/valid-attachments":{one}"#
            ))
            .gc_attachments(),
            Ok(want)
        );
        let e = parse(&format!(
            r#","cni.dev/attachments":{one},"cni.dev/valid-attachments":[]"#
        ))
        .gc_attachments()
        .unwrap_err();
        assert!(e.msg.contains("differ"), "{e}");
        // A list that is not a list of attachments does not decode.
        let e = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"ifname":"eth0"}]}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Decoding);
    }

    #[test]
    fn defaults_paths() {
        let c =
            NetConf::parse(br#"{"cniVersion":"0.3.1","name":"n","type":"sluice-cni"}"#).unwrap();
        assert_eq!(c.subnet_file, PathBuf::from("/run/sluice/subnet.env"));
        assert_eq!(c.ipam_dir, PathBuf::from("/var/lib/sluice/ipam"));
    }

    #[test]
    fn config_errors_carry_the_spec_codes() {
        let code = |s: &[u8]| NetConf::parse(s).unwrap_err().code;
        assert_eq!(code(b"\x00garbage"), ErrorCode::Decoding);
        assert_eq!(code(b""), ErrorCode::Decoding);
        assert_eq!(
            code(br#"{"cniVersion":"0.2.0","name":"n"}"#),
            ErrorCode::IncompatibleVersion
        );
        assert_eq!(
            code(br#"{"cniVersion":"7.0.0","name":"n"}"#),
            ErrorCode::IncompatibleVersion
        );
        assert_eq!(code(br#"{"name":"n"}"#), ErrorCode::InvalidConfig);
        assert_eq!(code(br#"{"cniVersion":"1.0.0"}"#), ErrorCode::InvalidConfig);
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","mtu":10}"#),
            ErrorCode::InvalidConfig
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local"}}"#),
            ErrorCode::UnsupportedField
        );
        assert_eq!(
            code(br#"{"cniVersion":"1.0.0","name":"n","mtu":"big"}"#),
            ErrorCode::Decoding
        );
    }

    #[test]
    fn env_is_checked_per_verb() {
        let ok = Request::from_env(
            Command::Add,
            env(&[
                ("CNI_CONTAINERID", "c1"),
                ("CNI_NETNS", "/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME=a",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(ok.pod(), Some(("x", "a")));
        let code = |c, e: &[(&str, &str)]| Request::from_env(c, env(e)).unwrap_err().code;
        assert_eq!(
            code(Command::Add, &[("CNI_NETNS", "/x"), ("CNI_IFNAME", "eth0")]),
            ErrorCode::InvalidEnvironment
        );
        assert_eq!(
            code(
                Command::Add,
                &[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")]
            ),
            ErrorCode::InvalidEnvironment
        );
        assert_eq!(
            code(
                Command::Check,
                &[("CNI_CONTAINERID", "c"), ("CNI_NETNS", "/x")]
            ),
            ErrorCode::InvalidEnvironment
        );
        assert_eq!(
            code(
                Command::Add,
                &[
                    ("CNI_CONTAINERID", "../etc"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "eth0")
                ]
            ),
            ErrorCode::InvalidEnvironment
        );
        assert_eq!(
            code(
                Command::Add,
                &[
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "a/b")
                ]
            ),
            ErrorCode::InvalidEnvironment
        );
        assert_eq!(
            code(
                Command::Add,
                &[
                    ("CNI_CONTAINERID", "c"),
                    ("CNI_NETNS", "/x"),
                    ("CNI_IFNAME", "averyveryverylongname")
                ]
            ),
            ErrorCode::InvalidEnvironment
        );
        // DEL tolerates a missing netns; GC and STATUS need no container.
        assert!(Request::from_env(
            Command::Del,
            env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")])
        )
        .unwrap()
        .netns
        .is_none());
        assert!(Request::from_env(Command::Gc, env(&[])).is_ok());
        assert!(Request::from_env(Command::Status, env(&[])).is_ok());
    }

    #[test]
    fn capability_keys_are_matched_as_go_matches_them() {
        // What containerd's CRI sends (go-cni's structs have no JSON tags).
        let from_containerd = serde_json::json!([
            {"HostPort": 30880, "ContainerPort": 8080, "Protocol": "TCP", "HostIP": ""}
        ]);
        assert_eq!(
            go_json_keys(
                &from_containerd,
                &["hostPort", "containerPort", "protocol", "hostIP"]
            ),
            serde_json::json!([
                {"hostPort": 30880, "containerPort": 8080, "protocol": "TCP", "hostIP": ""}
            ])
        );
        let bw = serde_json::json!({"IngressRate": 20000000_u64, "EGRESSBURST": 7, "other": 1});
        assert_eq!(
            go_json_keys(
                &bw,
                &["ingressRate", "ingressBurst", "egressRate", "egressBurst"]
            ),
            serde_json::json!({"ingressRate": 20000000_u64, "egressBurst": 7, "other": 1})
        );
        // The exact name wins over a folded one, whatever their order.
        let both = serde_json::json!({"HostPort": 1, "hostPort": 2});
        assert_eq!(
            go_json_keys(&both, &["hostPort"]),
            serde_json::json!({"hostPort": 2})
        );
        // Not an object: unchanged.
        assert_eq!(
            go_json_keys(&serde_json::json!(5), &["hostPort"]),
            serde_json::json!(5)
        );
    }
}
