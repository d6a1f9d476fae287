//! The iptables renderer and applier: sluice's own chains (`SLUICE-` prefix) in table
//! `filter`, written by one `iptables-restore --noflush -w` (each of sluice's chains is
//! declared, so flushed and refilled, in one commit; nobody else's chain is touched), peers in
//! ipsets (`hash:net`) so that 10,000 peers are one lookup, the jumps from `FORWARD` and
//! `INPUT` inserted once (checked with `-C` first).
//!
//! The same shape as the nftables table (see [`crate::nft`]); where nft has verdict maps,
//! `SLUICE-INGRESS`/`SLUICE-EGRESS` hold one rule per local pod (linear in the node's pods, not
//! in policies). Allowed traffic `RETURN`s to `FORWARD`, so that rules others keep there still
//! apply, as another nftables table's chains do. The first rule of `SLUICE-FORWARD` carries
//! `--comment sluice-policy:HASH`.
//!
//! The backend (legacy or nf_tables) is detected as kube-proxy's iptables wrapper does:
//! kubelet's hint chains first, then whichever backend holds more rules, then `iptables -V`.

use crate::droplog::{self, DropDirection};
use crate::firewall::{Applied, Backend, Exec, Firewall, FirewallError, Observed, Rendered};
use crate::ir::{AddrSet, Direction, PolicyIr, PortEntry, Protocol};
use crate::nft::HASH_MARK;
use crate::text_hash;
use std::fmt::Write as _;

pub const CHAIN_PREFIX: &str = "SLUICE-";
pub const SET_PREFIX: &str = "SLUICE-";
const TMP_SET: &str = "SLUICE-TMP";
const SET_OPTS: &str = "hash:net family inet hashsize 1024 maxelem 1048576";
const HASH_SLOT: &str = "@@HASH@@";
/// Ports one `multiport` match can take (a range counts twice).
const MULTIPORT_MAX: usize = 15;

/// Rendered input for `ipset restore` and `iptables-restore --noflush`, and the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesScript {
    /// `ipset restore` input: each desired set filled and swapped in.
    pub ipsets: String,
    /// `iptables-restore --noflush` input for table `filter`.
    pub filter: String,
    /// Names of the chains and sets it uses (anything else with the prefix is stale).
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub hash: String,
}

struct Out {
    ipsets: String,
    rules: String,
    chains: Vec<String>,
    sets: Vec<String>,
}

impl Out {
    fn set(&mut self, name: String, addrs: &AddrSet) -> String {
        let _ = writeln!(
            self.ipsets,
            "create {TMP_SET} {SET_OPTS} -exist\nflush {TMP_SET}"
        );
        for c in addrs.cidrs() {
            let _ = writeln!(self.ipsets, "add {TMP_SET} {c}");
        }
        let _ = writeln!(
            self.ipsets,
            "create {name} {SET_OPTS} -exist\nswap {TMP_SET} {name}\ndestroy {TMP_SET}"
        );
        self.sets.push(name.clone());
        name
    }
}

/// `--dports` lists of at most [`MULTIPORT_MAX`] ports each.
fn multiport_lists(ranges: &[(u16, u16)]) -> Vec<String> {
    let mut lists = Vec::new();
    let (mut cur, mut used) = (Vec::new(), 0);
    for &(a, b) in ranges {
        let (item, cost) = if a == b {
            (a.to_string(), 1)
        } else {
            (format!("{a}:{b}"), 2)
        };
        if used + cost > MULTIPORT_MAX {
            lists.push(std::mem::take(&mut cur).join(","));
            used = 0;
        }
        cur.push(item);
        used += cost;
    }
    if !cur.is_empty() {
        lists.push(cur.join(","));
    }
    lists
}

fn drop_direction(ingress: bool) -> DropDirection {
    if ingress {
        DropDirection::Ingress
    } else {
        DropDirection::Egress
    }
}

fn direction(out: &mut Out, ingress: bool, ifname: &str, d: &Direction, log: bool) {
    let (tag, dir, verdict) = if ingress {
        ("I", "src", "RETURN")
    } else {
        ("E", "dst", "RETURN")
    };
    let chain = format!("{CHAIN_PREFIX}{tag}-{ifname}");
    out.chains.push(chain.clone());
    let mut rules = Vec::new();
    let set_match = |out: &mut Out, name: String, addrs: &AddrSet| {
        if addrs.is_all() {
            String::new()
        } else {
            format!(" -m set --match-set {} {dir}", out.set(name, addrs))
        }
    };
    if !d.all_ports.is_empty() {
        let m = set_match(out, format!("{SET_PREFIX}{tag}-{ifname}-a"), &d.all_ports);
        rules.push(format!("-A {chain}{m} -j {verdict}"));
    }
    // One set per distinct peer set; one rule per protocol and multiport list.
    let mut groups: Vec<(&AddrSet, Vec<&PortEntry>)> = Vec::new();
    for e in &d.ports {
        match groups.iter_mut().find(|(a, _)| *a == &e.addrs) {
            Some(g) => g.1.push(e),
            None => groups.push((&e.addrs, vec![e])),
        }
    }
    for (i, (addrs, entries)) in groups.into_iter().enumerate() {
        let m = set_match(out, format!("{SET_PREFIX}{tag}-{ifname}-{i}"), addrs);
        for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
            let ranges: Vec<(u16, u16)> = entries
                .iter()
                .filter(|e| e.protocol == proto)
                .map(|e| (e.first, e.last))
                .collect();
            if ranges.is_empty() {
                continue;
            }
            let p = proto.name();
            if ranges == [(0, u16::MAX)] {
                rules.push(format!("-A {chain} -p {p}{m} -j {verdict}"));
                continue;
            }
            for list in multiport_lists(&ranges) {
                rules.push(format!(
                    "-A {chain} -p {p}{m} -m multiport --dports {list} -j {verdict}"
                ));
            }
        }
    }
    if log {
        rules.push(format!(
            "-A {chain} {}",
            droplog::iptables_log(drop_direction(ingress), Some(ifname))
        ));
    }
    rules.push(format!("-A {chain} -j DROP"));
    for r in rules {
        let _ = writeln!(out.rules, "{r}");
    }
}

/// The whole desired state of sluice's chains and sets.
pub fn render(ir: &PolicyIr) -> IptablesScript {
    let mut out = Out {
        ipsets: String::new(),
        rules: String::new(),
        chains: Vec::new(),
        sets: Vec::new(),
    };
    let (fwd, input, ing, eg) = (
        format!("{CHAIN_PREFIX}FORWARD"),
        format!("{CHAIN_PREFIX}INPUT"),
        format!("{CHAIN_PREFIX}INGRESS"),
        format!("{CHAIN_PREFIX}EGRESS"),
    );
    let isolated = AddrSet::from_addrs(
        ir.pods
            .iter()
            .filter(|p| p.ingress.isolated || p.egress.isolated)
            .map(|p| p.ip),
    );
    let isolated_set = out.set(format!("{SET_PREFIX}ISOLATED"), &isolated);
    let mut dispatch = String::new();
    for pod in &ir.pods {
        for (ingress, d, chain, flag, tag) in [
            (true, &pod.ingress, &ing, "-o", "I"),
            (false, &pod.egress, &eg, "-i", "E"),
        ] {
            if d.isolated {
                direction(&mut out, ingress, &pod.ifname, d, ir.log_drops);
                let _ = writeln!(
                    dispatch,
                    "-A {chain} {flag} {} -g {CHAIN_PREFIX}{tag}-{}",
                    pod.ifname, pod.ifname
                );
            } else {
                let _ = writeln!(dispatch, "-A {chain} {flag} {} -j RETURN", pod.ifname);
            }
        }
    }
    let p = crate::LINK_PREFIX;
    for (chain, flag, ingress) in [(&ing, "-o", true), (&eg, "-i", false)] {
        let _ = writeln!(dispatch, "-A {chain} {flag} sluice+ -j RETURN");
        if ir.log_drops {
            let log = droplog::iptables_log(drop_direction(ingress), None);
            let _ = writeln!(dispatch, "-A {chain} {flag} {p}+ {log}");
        }
        let _ = writeln!(dispatch, "-A {chain} {flag} {p}+ -j DROP");
    }
    let mut chains = vec![fwd.clone(), input.clone(), ing.clone(), eg.clone()];
    chains.append(&mut out.chains);
    let mut f = String::from("*filter\n");
    for c in &chains {
        let _ = writeln!(f, ":{c} - [0:0]");
    }
    let _ = writeln!(
        f,
        "-A {fwd} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment {HASH_MARK}{HASH_SLOT} -j RETURN\n\
         -A {fwd} -m conntrack --ctstate INVALID -j DROP\n\
         -A {fwd} -p tcp ! --syn -m conntrack --ctstate NEW -m set --match-set {isolated_set} src -j DROP\n\
         -A {fwd} -p tcp ! --syn -m conntrack --ctstate NEW -m set --match-set {isolated_set} dst -j DROP\n\
         -A {fwd} -j {eg}\n-A {fwd} -j {ing}\n\
         -A {input} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n\
         -A {input} -m conntrack --ctstate INVALID -j DROP\n\
         -A {input} -p tcp ! --syn -m conntrack --ctstate NEW -m set --match-set {isolated_set} src -j DROP\n\
         -A {input} -j {eg}"
    );
    f.push_str(&dispatch);
    f.push_str(&out.rules);
    f.push_str("COMMIT\n");
    let hash = text_hash(&format!("{}{f}", out.ipsets));
    IptablesScript {
        ipsets: out.ipsets,
        filter: f.replace(HASH_SLOT, &hash),
        chains,
        sets: out.sets,
        hash,
    }
}

/// `iptables-restore --noflush` input that deletes `stale` chains of sluice's (flushed first,
/// so references between them do not matter), to be appended before `COMMIT`.
fn delete_chains(stale: &[String]) -> String {
    let mut s = String::new();
    for c in stale {
        let _ = writeln!(s, ":{c} - [0:0]");
    }
    for c in stale {
        let _ = writeln!(s, "-X {c}");
    }
    s
}

/// Which iptables the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IptablesMode {
    Legacy,
    Nft,
}

impl IptablesMode {
    fn suffix(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Nft => "nft",
        }
    }
}

/// kube-proxy's choice: a backend holding kubelet's hint chain wins, else the one with more
/// rules, else what plain `iptables -V` says; `None` when nothing works.
pub fn choose_mode(
    legacy_save: Option<&str>,
    nft_save: Option<&str>,
    version: Option<&str>,
) -> Option<IptablesMode> {
    let hint = |s: Option<&str>| {
        s.is_some_and(|s| {
            s.lines().any(|l| {
                l.starts_with(":KUBE-IPTABLES-HINT") || l.starts_with(":KUBE-KUBELET-CANARY")
            })
        })
    };
    if hint(legacy_save) && !hint(nft_save) {
        return Some(IptablesMode::Legacy);
    }
    if hint(nft_save) && !hint(legacy_save) {
        return Some(IptablesMode::Nft);
    }
    let rules = |s: Option<&str>| s.map(|s| s.lines().filter(|l| l.starts_with("-A ")).count());
    match (rules(legacy_save), rules(nft_save)) {
        (Some(l), Some(n)) if l > n => Some(IptablesMode::Legacy),
        (Some(l), Some(n)) if n > l => Some(IptablesMode::Nft),
        (None, None) => None,
        (Some(_), None) => Some(IptablesMode::Legacy),
        (None, Some(_)) => Some(IptablesMode::Nft),
        _ => Some(if version.is_some_and(|v| v.contains("nf_tables")) {
            IptablesMode::Nft
        } else if version.is_some_and(|v| v.contains("legacy")) {
            IptablesMode::Legacy
        } else {
            IptablesMode::Nft
        }),
    }
}

/// What `iptables-save -t filter` says of sluice's chains: the hash (only when both jumps are
/// in place) and the names of sluice's chains.
pub fn parse_save(save: &str) -> (Option<String>, Vec<String>) {
    let chains = save
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with(CHAIN_PREFIX))
        .map(str::to_string)
        .collect();
    let fwd = format!("-A {CHAIN_PREFIX}FORWARD ");
    let hash = save.lines().filter(|l| l.starts_with(&fwd)).find_map(|l| {
        let at = l.find(HASH_MARK)? + HASH_MARK.len();
        let rest = &l[at..];
        let end = rest
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    });
    let jumped = |from: &str, to: &str| {
        save.lines().any(|l| {
            l.starts_with(&format!("-A {from} ")) && l.ends_with(&format!("-j {CHAIN_PREFIX}{to}"))
        })
    };
    let hooked = jumped("FORWARD", "FORWARD") && jumped("INPUT", "INPUT");
    (hash.filter(|_| hooked), chains)
}

/// The policy chains through `ipset` and `iptables-restore`, in the backend the host uses.
#[derive(Debug, Clone)]
pub struct IptablesRestore {
    pub exec: Exec,
    pub mode: IptablesMode,
}

impl IptablesRestore {
    pub fn new(exec: Exec, mode: IptablesMode) -> Self {
        Self { exec, mode }
    }

    /// Detects the backend as kube-proxy does (see [`choose_mode`]).
    pub fn detect(exec: Exec) -> Result<Self, FirewallError> {
        let save = |program: &str| {
            exec.run(program, &[], None)
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let legacy = save("iptables-legacy-save");
        let nft = save("iptables-nft-save");
        let version = exec
            .run("iptables", &["-V"], None)
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let mode = choose_mode(legacy.as_deref(), nft.as_deref(), version.as_deref()).ok_or(
            FirewallError::Command {
                program: "iptables-save".into(),
                op: "detect",
                stderr: "neither iptables-legacy-save nor iptables-nft-save works".into(),
            },
        )?;
        tracing::info!(mode = ?mode, "iptables backend detected");
        Ok(Self::new(exec, mode))
    }

    /// `iptables-save` → `iptables-nft-save` or `iptables-legacy-save`.
    fn bin(&self, tool: &str) -> String {
        let rest = tool.strip_prefix("iptables").unwrap_or(tool);
        format!("iptables-{}{rest}", self.mode.suffix())
    }

    fn checked(
        &self,
        program: &str,
        args: &[&str],
        stdin: Option<&str>,
        op: &'static str,
    ) -> Result<String, FirewallError> {
        let out = self.exec.run(program, args, stdin)?;
        if out.status.success() {
            return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        Err(FirewallError::Command {
            program: program.to_string(),
            op,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn save(&self) -> Result<String, FirewallError> {
        self.checked(&self.bin("iptables-save"), &["-t", "filter"], None, "save")
    }

    fn sets(&self) -> Result<Vec<String>, FirewallError> {
        let list = self.checked("ipset", &["list", "-n"], None, "list")?;
        Ok(list
            .lines()
            .filter(|l| l.starts_with(SET_PREFIX))
            .map(str::to_string)
            .collect())
    }

    /// Inserts `-j SLUICE-<to>` at the top of `from` unless it is already there.
    fn hook(&self, from: &str, to: &str) -> Result<(), FirewallError> {
        let target = format!("{CHAIN_PREFIX}{to}");
        let ipt = self.bin("iptables");
        let check = self.exec.run(
            &ipt,
            &["-w", "5", "-t", "filter", "-C", from, "-j", &target],
            None,
        )?;
        if check.status.success() {
            return Ok(());
        }
        self.checked(
            &ipt,
            &["-w", "5", "-t", "filter", "-I", from, "1", "-j", &target],
            None,
            "insert",
        )?;
        Ok(())
    }

    fn unhook(&self, from: &str, to: &str) -> Result<(), FirewallError> {
        let target = format!("{CHAIN_PREFIX}{to}");
        let ipt = self.bin("iptables");
        while self
            .exec
            .run(
                &ipt,
                &["-w", "5", "-t", "filter", "-D", from, "-j", &target],
                None,
            )?
            .status
            .success()
        {}
        Ok(())
    }

    fn destroy_sets(&self, keep: &[String]) -> Result<(), FirewallError> {
        for s in self.sets()?.iter().filter(|s| !keep.contains(s)) {
            self.checked("ipset", &["destroy", s], None, "destroy")?;
        }
        Ok(())
    }
}

impl Firewall for IptablesRestore {
    fn backend(&self) -> Backend {
        Backend::Iptables
    }

    fn observe(&self) -> Result<Observed, FirewallError> {
        Ok(Observed {
            hash: parse_save(&self.save()?).0,
        })
    }

    fn apply(&self, desired: &Rendered) -> Result<Applied, FirewallError> {
        let Rendered::Iptables(script) = desired else {
            return Err(FirewallError::WrongBackend {
                want: Backend::Iptables,
            });
        };
        let (hash, have_chains) = parse_save(&self.save()?);
        if hash.as_deref() == Some(script.hash.as_str()) {
            return Ok(Applied {
                written: false,
                incremental: false,
            });
        }
        self.checked("ipset", &["restore"], Some(&script.ipsets), "restore")?;
        let stale: Vec<String> = have_chains
            .into_iter()
            .filter(|c| !script.chains.contains(c))
            .collect();
        let mut filter = script.filter.clone();
        if let Some(body) = filter.strip_suffix("COMMIT\n") {
            filter = format!("{body}{}COMMIT\n", delete_chains(&stale));
        }
        self.checked(
            &self.bin("iptables-restore"),
            &["-w", "5", "--noflush"],
            Some(&filter),
            "restore",
        )?;
        self.hook("FORWARD", "FORWARD")?;
        self.hook("INPUT", "INPUT")?;
        self.destroy_sets(&script.sets)?;
        tracing::info!(hash = %script.hash, mode = ?self.mode, chains = script.chains.len(), sets = script.sets.len(), "iptables policy chains replaced");
        Ok(Applied {
            written: true,
            incremental: false,
        })
    }

    fn remove(&self) -> Result<(), FirewallError> {
        self.unhook("FORWARD", "FORWARD")?;
        self.unhook("INPUT", "INPUT")?;
        let (_, chains) = parse_save(&self.save()?);
        if !chains.is_empty() {
            let text = format!("*filter\n{}COMMIT\n", delete_chains(&chains));
            self.checked(
                &self.bin("iptables-restore"),
                &["-w", "5", "--noflush"],
                Some(&text),
                "restore",
            )?;
        }
        self.destroy_sets(&[])
    }
}

#[cfg(test)]
mod tests;
