//! The CNI protocol as sluice speaks it: versions, verbs, error codes, network configuration and
//! result shaping. Pure data and pure functions; the verbs themselves live in [`plugin`].

pub mod config;
pub mod hostport;
pub mod plugin;
pub mod result;
pub mod stats;

use serde::Serialize;
use std::fmt;

/// The spec versions sluice speaks, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    pub const ALL: [CniVersion; 5] = [
        Self::V0_3_0,
        Self::V0_3_1,
        Self::V0_4_0,
        Self::V1_0_0,
        Self::V1_1_0,
    ];
    pub const LATEST: CniVersion = Self::V1_1_0;

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::V0_3_0 => "0.3.0",
            Self::V0_3_1 => "0.3.1",
            Self::V0_4_0 => "0.4.0",
            Self::V1_0_0 => "1.0.0",
            Self::V1_1_0 => "1.1.0",
        }
    }

    /// Whether `command` exists in this version of the spec.
    pub fn has(self, command: Command) -> bool {
        match command {
            Command::Add | Command::Del | Command::Version => true,
            Command::Check => self >= Self::V0_4_0,
            Command::Status | Command::Gc => self >= Self::V1_1_0,
        }
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "STATUS" => Self::Status,
            "GC" => Self::Gc,
            "VERSION" => Self::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
            Self::Version => "VERSION",
        }
    }
}

/// The error codes of the CNI spec, and sluice's own from 100 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "u32")]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    Io = 5,
    Decoding = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    NotAvailable = 50,
    NotAvailableDegraded = 51,
    /// A kernel operation (netlink, sysctl, namespace) failed.
    Kernel = 100,
    /// The node's subnet has no free address.
    SubnetExhausted = 101,
    /// CHECK found the attachment differs from what ADD made.
    CheckFailed = 102,
    /// The container already has an interface of the requested name that sluice did not make.
    InterfaceExists = 103,
    /// A hostPort of `runtimeConfig.portMappings` is held by another attachment.
    PortConflict = 104,
}

impl From<ErrorCode> for u32 {
    fn from(c: ErrorCode) -> u32 {
        c as u32
    }
}

/// An error as the CNI protocol reports it: JSON on stdout, non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The error object of the spec. `cniVersion` is the request's where it is known and one sluice
    /// speaks; else the newest.
    pub fn to_json(&self, version: Option<&str>) -> serde_json::Value {
        let mut v = serde_json::json!({
            "cniVersion": version.unwrap_or(CniVersion::LATEST.as_str()),
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            v["details"] = self.details.clone().into();
        }
        v
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code as u32, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// The answer to VERSION.
pub fn version_info(requested: Option<&str>) -> serde_json::Value {
    let version = requested
        .and_then(CniVersion::parse)
        .unwrap_or(CniVersion::LATEST);
    serde_json::json!({
        "cniVersion": version.as_str(),
        "supportedVersions": CniVersion::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_exist_only_from_their_version() {
        use Command::*;
        for v in CniVersion::ALL {
            assert!(v.has(Add) && v.has(Del) && v.has(Version));
        }
        assert!(!CniVersion::V0_3_1.has(Check));
        assert!(CniVersion::V0_4_0.has(Check));
        assert!(!CniVersion::V1_0_0.has(Status) && !CniVersion::V1_0_0.has(Gc));
        assert!(CniVersion::V1_1_0.has(Status) && CniVersion::V1_1_0.has(Gc));
    }

    #[test]
    fn error_json_has_spec_fields() {
        let e = CniError::new(ErrorCode::TryAgainLater, "no subnet").with_details("agent down");
        let j = e.to_json(Some("0.4.0"));
        assert_eq!(j["code"], 11);
        assert_eq!(j["cniVersion"], "0.4.0");
        assert_eq!(j["msg"], "no subnet");
        assert_eq!(j["details"], "agent down");
        let j = CniError::new(ErrorCode::Kernel, "x").to_json(None);
        assert_eq!(j["cniVersion"], "1.1.0");
        assert!(j.get("details").is_none());
    }

    #[test]
    fn version_lists_every_supported_version() {
        let j = version_info(Some("0.3.1"));
        assert_eq!(j["cniVersion"], "0.3.1");
        assert_eq!(
            j["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_info(Some("9.9.9"))["cniVersion"], "1.1.0");
    }
}
