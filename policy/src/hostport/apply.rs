//! Doing: the rendered hostPort rules written with the policy engine's runners ([`NftCli`] and
//! [`IptablesRestore`], through [`Exec`]), in the backend the agent resolved for the policy.

use super::{
    has_v4, has_v6, iptables_jumps, missing_rules, nft_delta, render_ip6tables, render_iptables,
    render_nft, HostportEntry, Listing, IPT_CHAIN, IPT_POST_CHAIN, NFT_TABLE,
};
use crate::firewall::{Exec, FirewallError};
use crate::iptables::{IptablesMode, IptablesRestore};
use crate::nft::NftCli;
use std::path::Path;

/// Where the hostPort rules go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostportBackend {
    Nftables,
    Iptables(IptablesMode),
}

/// The names [`HostportBackend::parse_name`] accepts (`SLUICE_POLICY_BACKEND` in subnet.env);
/// plain `iptables` leaves the iptables flavour to be detected.
pub const BACKEND_NAMES: [&str; 4] = ["nftables", "iptables", "iptables-legacy", "iptables-nft"];

impl HostportBackend {
    /// The name the agent publishes: `nftables`, `iptables-legacy` or `iptables-nft`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Nftables => "nftables",
            Self::Iptables(IptablesMode::Legacy) => "iptables-legacy",
            Self::Iptables(IptablesMode::Nft) => "iptables-nft",
        }
    }

    /// A published name: `Ok(None)` for plain `iptables` (flavour to be detected), an error for
    /// a name that is none of [`BACKEND_NAMES`].
    pub fn parse_name(name: &str) -> Result<Option<Self>, FirewallError> {
        match name {
            "nftables" => Ok(Some(Self::Nftables)),
            "iptables" => Ok(None),
            "iptables-legacy" => Ok(Some(Self::Iptables(IptablesMode::Legacy))),
            "iptables-nft" => Ok(Some(Self::Iptables(IptablesMode::Nft))),
            other => Err(FirewallError::UnknownBackend(other.to_string())),
        }
    }
}

/// Whether an executable named `program` is in one of the `PATH`-style `dirs` (no process is
/// started: the CNI plugin asks this on every ADD).
pub fn on_path(program: &str, dirs: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(dirs).any(|d| {
        std::fs::metadata(Path::new(&d).join(program))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// sluice's hostPort rules in one backend.
#[derive(Debug, Clone)]
pub struct HostportFirewall {
    pub backend: HostportBackend,
    nft: NftCli,
    ipt: IptablesRestore,
}

impl HostportFirewall {
    pub fn new(exec: Exec, backend: HostportBackend) -> Self {
        let mode = match backend {
            HostportBackend::Iptables(mode) => mode,
            HostportBackend::Nftables => IptablesMode::Nft,
        };
        Self {
            backend,
            nft: NftCli::new(exec.clone()),
            ipt: IptablesRestore::new(exec, mode),
        }
    }

    /// The backend of `published` (subnet.env's `SLUICE_POLICY_BACKEND`); without one,
    /// nftables where `nft` is on `PATH`, else iptables. Plain `iptables` detects the flavour
    /// as the policy engine does.
    pub fn resolve(exec: Exec, published: Option<&str>) -> Result<Self, FirewallError> {
        let chosen = match published {
            Some(name) => HostportBackend::parse_name(name)?,
            None => {
                let path = std::env::var("PATH").unwrap_or_default();
                on_path("nft", &path).then_some(HostportBackend::Nftables)
            }
        };
        let backend = match chosen {
            Some(b) => b,
            None => HostportBackend::Iptables(IptablesRestore::detect(exec.clone())?.mode),
        };
        Ok(Self::new(exec, backend))
    }

    /// Makes the kernel hold exactly `entries`' rules, in one transaction per family (the
    /// jumps into sluice's iptables chains are put at the top of the built-in chains once).
    /// In iptables, each family's chains (iptables', ip6tables') are written when `entries`
    /// have rules of that family and removed, where there are any, when they have none.
    pub fn apply(&self, entries: &[HostportEntry]) -> Result<(), FirewallError> {
        self.write(
            entries,
            FamilyWrite::decide(None, has_v4(entries)),
            FamilyWrite::decide(None, has_v6(entries)),
        )
    }

    fn write(
        &self,
        entries: &[HostportEntry],
        v4: FamilyWrite,
        v6: FamilyWrite,
    ) -> Result<(), FirewallError> {
        match self.backend {
            HostportBackend::Nftables => self.nft.script(&render_nft(entries)),
            HostportBackend::Iptables(_) => {
                self.write_family(Family::V4, v4, || render_iptables(entries))?;
                self.write_family(Family::V6, v6, || render_ip6tables(entries))
            }
        }
    }

    /// One family's share of [`Self::write`]; `text` renders its rules when they are written.
    fn write_family(
        &self,
        family: Family,
        how: FamilyWrite,
        text: impl FnOnce() -> String,
    ) -> Result<(), FirewallError> {
        match how {
            FamilyWrite::Write => self.restore_family(family, &text()),
            FamilyWrite::Remove => self.remove_family(family),
            FamilyWrite::SweepIfPresent => {
                if self.usable_and_present(family) {
                    self.remove_family(family)?;
                }
                Ok(())
            }
            FamilyWrite::Skip => Ok(()),
        }
    }

    /// `iptables` or `ip6tables` of this flavour, for `tool` named as `iptables-save`.
    fn tool(&self, family: Family, tool: &str) -> String {
        match family {
            Family::V4 => self.ipt.bin(tool),
            Family::V6 => self.ipt.bin6(tool),
        }
    }

    fn restore_family(&self, family: Family, text: &str) -> Result<(), FirewallError> {
        self.ipt.checked(
            &self.tool(family, "iptables-restore"),
            &["-w", "5", "--noflush"],
            Some(text),
            "restore",
        )?;
        let ipt = self.tool(family, "iptables");
        for (chain, spec) in iptables_jumps() {
            let mut check = vec!["-w", "5", "-t", "nat", "-C", chain];
            check.extend(&spec);
            if self.ipt.exec.run(&ipt, &check, None)?.status.success() {
                continue;
            }
            let mut insert = vec!["-w", "5", "-t", "nat", "-I", chain, "1"];
            insert.extend(&spec);
            self.ipt.checked(&ipt, &insert, None, "insert")?;
        }
        Ok(())
    }

    /// Takes the kernel from `before` (what the caller's state says it holds) to `after`. In
    /// nftables only the elements that differ are written ([`nft_delta`]); should that fail (the
    /// table is not as `before` says) the whole table is written. Each iptables family is
    /// written whole, and only when `before` or `after` has rules of it (an IPv4-only node never
    /// runs ip6tables, an IPv6-only one never runs iptables).
    pub fn update(
        &self,
        before: &[HostportEntry],
        after: &[HostportEntry],
    ) -> Result<(), FirewallError> {
        if self.backend == HostportBackend::Nftables && !before.is_empty() && !after.is_empty() {
            let Some(delta) = nft_delta(before, after) else {
                return Ok(());
            };
            match self.nft.script(&delta) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(error = %e, "the hostPort delta did not apply; writing the table whole")
                }
            }
        }
        let (v4, v6) = update_writes(before, after);
        self.write(after, v4, v6)
    }

    /// The rules of `entry` (and the hooks to them) that the kernel lacks; empty when all are
    /// there.
    pub fn missing(&self, entry: &HostportEntry) -> Result<Vec<String>, FirewallError> {
        let (kind, listing) = match self.backend {
            HostportBackend::Nftables => {
                let out = self
                    .nft
                    .exec
                    .run("nft", &["list", "table", "inet", NFT_TABLE], None)?;
                // A missing table lists nothing: every rule is then missing.
                (
                    Listing::Nft,
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                )
            }
            HostportBackend::Iptables(_) => {
                let one = std::slice::from_ref(entry);
                let mut missing = Vec::new();
                if has_v4(one) {
                    let listing = self.ipt.checked(
                        &self.ipt.bin("iptables-save"),
                        &["-t", "nat"],
                        None,
                        "save",
                    )?;
                    missing.extend(missing_rules(Listing::Iptables, &listing, entry));
                }
                if has_v6(one) {
                    let listing = self.ipt.checked(
                        &self.ipt.bin6("iptables-save"),
                        &["-t", "nat"],
                        None,
                        "save",
                    )?;
                    missing.extend(
                        missing_rules(Listing::Ip6tables, &listing, entry)
                            .into_iter()
                            .map(|r| format!("ip6tables {r}")),
                    );
                }
                return Ok(missing);
            }
        };
        Ok(missing_rules(kind, &listing, entry))
    }

    /// Whether sluice has hostPort rules (or their empty table or chains) in this backend.
    pub fn present(&self) -> Result<bool, FirewallError> {
        match self.backend {
            HostportBackend::Nftables => Ok(self
                .nft
                .exec
                .run("nft", &["list", "table", "inet", NFT_TABLE], None)?
                .status
                .success()),
            HostportBackend::Iptables(_) => {
                Ok(self.present_family(Family::V4)? || self.usable_and_present(Family::V6))
            }
        }
    }

    /// Whether sluice's chains of `family` are there; a node without a working iptables or
    /// ip6tables of this flavour (the binary missing) has none.
    fn usable_and_present(&self, family: Family) -> bool {
        self.present_family(family).unwrap_or_else(|e| {
            tracing::debug!(family = ?family, error = %e, "iptables of this family not usable: no hostPort chains to remove");
            false
        })
    }

    /// Whether sluice's chains are in this family's nat table (never for IPv6 on a kernel
    /// without IPv6).
    fn present_family(&self, family: Family) -> Result<bool, FirewallError> {
        if family == Family::V6 && !kernel_has_ipv6() {
            return Ok(false);
        }
        let save = self.ipt.checked(
            &self.tool(family, "iptables-save"),
            &["-t", "nat"],
            None,
            "save",
        )?;
        Ok(save.lines().any(|l| {
            l.strip_prefix(':')
                .and_then(|l| l.split_whitespace().next())
                .is_some_and(|c| c == IPT_CHAIN || c == IPT_POST_CHAIN)
        }))
    }

    /// Removes every hostPort rule of this backend, jumps and chains included (a switch of
    /// backend); harmless when there are none.
    pub fn remove(&self) -> Result<(), FirewallError> {
        match self.backend {
            HostportBackend::Nftables => self.nft.script(&render_nft(&[])),
            HostportBackend::Iptables(_) => {
                self.remove_family(Family::V4)?;
                if self.usable_and_present(Family::V6) {
                    self.remove_family(Family::V6)?;
                }
                Ok(())
            }
        }
    }

    /// Removes sluice's jumps and chains from one family's nat table.
    fn remove_family(&self, family: Family) -> Result<(), FirewallError> {
        let ipt = self.tool(family, "iptables");
        for (chain, spec) in iptables_jumps() {
            let mut delete = vec!["-w", "5", "-t", "nat", "-D", chain];
            delete.extend(&spec);
            // Bounded: a jump put in a few times by hand goes too.
            for _ in 0..16 {
                if !self.ipt.exec.run(&ipt, &delete, None)?.status.success() {
                    break;
                }
            }
        }
        let text = format!(
            "*nat\n:{IPT_CHAIN} - [0:0]\n:{IPT_POST_CHAIN} - [0:0]\n-X {IPT_CHAIN}\n-X {IPT_POST_CHAIN}\nCOMMIT\n"
        );
        self.ipt
            .checked(
                &self.tool(family, "iptables-restore"),
                &["-w", "5", "--noflush"],
                Some(&text),
                "restore",
            )
            .map(|_| ())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

/// What a write does to sluice's chains of one iptables family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FamilyWrite {
    /// Write the entries' rules of the family.
    Write,
    /// The entries have none and had some: remove the chains.
    Remove,
    /// The entries have none; what was there before is not known: remove the chains if any.
    SweepIfPresent,
    /// Neither before nor after had rules of the family.
    Skip,
}

impl FamilyWrite {
    /// For a family `after` has rules of (`after_has`), where `before_has` says whether the
    /// kernel held some (`None`: not known, as at the agent's start).
    fn decide(before_has: Option<bool>, after_has: bool) -> Self {
        match (before_has, after_has) {
            (_, true) => Self::Write,
            (Some(true), false) => Self::Remove,
            (None, false) => Self::SweepIfPresent,
            (Some(false), false) => Self::Skip,
        }
    }
}

/// What [`HostportFirewall::update`] does to each iptables family. An empty `before` asks for
/// the table whole (a repeated ADD, which so also repairs rules lost since): what the kernel
/// holds is then not known, and a family `after` has no rules of is swept if present (the
/// attachment's previous mappings may have had some).
fn update_writes(before: &[HostportEntry], after: &[HostportEntry]) -> (FamilyWrite, FamilyWrite) {
    let held = |has: bool| (!before.is_empty()).then_some(has);
    (
        FamilyWrite::decide(held(has_v4(before)), has_v4(after)),
        FamilyWrite::decide(held(has_v6(before)), has_v6(after)),
    )
}

fn kernel_has_ipv6() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_names_round_trip_and_garbage_is_refused() {
        for b in [
            HostportBackend::Nftables,
            HostportBackend::Iptables(IptablesMode::Legacy),
            HostportBackend::Iptables(IptablesMode::Nft),
        ] {
            assert!(BACKEND_NAMES.contains(&b.name()));
            assert_eq!(HostportBackend::parse_name(b.name()).unwrap(), Some(b));
        }
        assert_eq!(HostportBackend::parse_name("iptables").unwrap(), None);
        let e = HostportBackend::parse_name("ebtables").unwrap_err();
        assert!(e.to_string().contains("ebtables"), "{e}");
    }

    #[test]
    fn a_family_is_written_only_where_it_has_rules_and_removed_once_it_has_none() {
        use FamilyWrite::*;
        for (before, after, want) in [
            (Some(false), true, Write),
            (Some(true), true, Write),
            (None, true, Write),
            (Some(true), false, Remove),
            (None, false, SweepIfPresent),
            // An IPv6-only node's IPv4 family (or an IPv4-only node's IPv6 one): never touched.
            (Some(false), false, Skip),
        ] {
            assert_eq!(
                FamilyWrite::decide(before, after),
                want,
                "{before:?} {after}"
            );
        }
    }

    #[test]
    fn an_update_from_an_unknown_kernel_sweeps_the_families_it_leaves_without_rules() {
        use crate::hostport::{HpProtocol, PortMapping};
        use FamilyWrite::*;
        let entry = |id: &str, v4: bool, mappings: Vec<PortMapping>| HostportEntry {
            container_id: id.into(),
            ifname: "eth0".into(),
            pod_ip: v4.then(|| "10.244.0.5".parse().unwrap()),
            pod_ip6: Some("fd00:10:244::5".parse().unwrap()),
            mappings,
        };
        let tcp = |host_ip: Option<&str>| {
            PortMapping::new(
                HpProtocol::Tcp,
                8080,
                80,
                host_ip.map(|a| a.parse().unwrap()),
            )
        };
        let only_v6 = entry("a", true, vec![tcp(Some("fd00::1"))]);
        let both = entry("a", true, vec![tcp(None)]);
        // A repeated ADD (no `before`) whose mappings lost their IPv4 side: the rules the
        // previous ADD wrote of it must go, whatever the state file says.
        assert_eq!(
            update_writes(&[], std::slice::from_ref(&only_v6)),
            (SweepIfPresent, Write)
        );
        assert_eq!(update_writes(&[], &[]), (SweepIfPresent, SweepIfPresent));
        // A known kernel: only what changes.
        assert_eq!(
            update_writes(std::slice::from_ref(&both), std::slice::from_ref(&only_v6)),
            (Remove, Write)
        );
        let other = entry("b", false, vec![tcp(None)]);
        assert_eq!(
            update_writes(std::slice::from_ref(&other), &[other.clone(), only_v6]),
            (Skip, Write)
        );
    }

    #[test]
    fn on_path_finds_only_executable_files() {
        use std::os::unix::fs::PermissionsExt;
        let a = tempfile_dir("a");
        let b = tempfile_dir("b");
        std::fs::write(b.join("nft"), "").unwrap();
        std::fs::set_permissions(b.join("nft"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(a.join("plain"), "").unwrap();
        std::fs::create_dir(a.join("dir")).unwrap();
        let path = format!("{}:{}", a.display(), b.display());
        assert!(on_path("nft", &path));
        assert!(!on_path("plain", &path), "not executable");
        assert!(!on_path("dir", &path), "a directory");
        assert!(!on_path("nft", ""));
        let _ = std::fs::remove_dir_all(a.parent().unwrap());
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let base = std::env::temp_dir().join(format!("sluice-onpath-{}", std::process::id()));
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
