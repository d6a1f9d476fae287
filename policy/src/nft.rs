//! The nftables renderer and applier: sluice's own table `inet sluice-policy`, replaced whole
//! in one `nft -f -` transaction (atomic: a packet sees the old table or the new one).
//!
//! Shape (per-packet cost is constant in the number of policies and peers):
//! - base chains `forward` and `input` (hook priority `filter`, policy accept): established and
//!   related accepted, invalid dropped, then `jump egress` (both) and `jump ingress` (forward);
//! - `egress`: `iifname vmap @egress-pods` (isolated pod → `goto e-IF`, known open pod →
//!   `return`), then unknown pod veths drop (fail closed); `ingress` likewise on `oifname`;
//! - per isolated pod and direction a chain with at most two set lookups: an interval set of
//!   peers allowed on every port (`…-all`) and a concatenated interval set
//!   `ipv4_addr . inet_proto . inet_service` (`…-ports`), then `drop`. Egress allows `return`
//!   (the ingress check of the destination still runs), ingress allows `accept`.
//!
//! - TCP packets that would start a flow without being a SYN are dropped to and from isolated
//!   pods (set `isolated`), so that a connection cut by [`crate::conntrack`] cannot be picked
//!   up again mid-stream from its other end.
//!
//! The first rule of `forward` carries `comment "sluice-policy:HASH"`, the hash of the whole
//! text: [`NftCli::observe`] reads only that chain, and an unchanged table is not rewritten.

use crate::firewall::{Applied, Backend, Exec, Firewall, FirewallError, Observed, Rendered};
use crate::ir::{AddrSet, Direction, PolicyIr, PortEntry};
use crate::text_hash;
use std::fmt::Write as _;

/// sluice's policy table (DESIGN.md: recognisable by its nftables table).
pub const TABLE: &str = "sluice-policy";
/// Comment prefix of the hash-carrying rule.
pub const HASH_MARK: &str = "sluice-policy:";
const HASH_SLOT: &str = "@@HASH@@";
/// A TCP packet that would start a flow without being a SYN: the pick-up of a connection whose
/// conntrack entry was cut. Dropped for isolated pods, or a denied connection would come back
/// as a "new" flow in the reverse direction (from its server) that the policy allows.
const NOT_SYN: &str = "ct state new tcp flags & (fin | syn | rst | ack) != syn";

/// Rendered text for `nft -f -`, and the hash it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftScript {
    pub text: String,
    pub hash: String,
}

fn elements(out: &mut String, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(out, "\t\telements = {{ {} }}", items.join(",\n\t\t\t     "));
}

fn addr_items(set: &AddrSet) -> Vec<String> {
    set.cidrs().iter().map(|c| c.to_string()).collect()
}

fn port_items(ports: &[PortEntry]) -> Vec<String> {
    let mut out = Vec::new();
    for e in ports {
        let range = if e.first == e.last {
            e.first.to_string()
        } else {
            format!("{}-{}", e.first, e.last)
        };
        for c in e.addrs.cidrs() {
            out.push(format!("{c} . {} . {range}", e.protocol.name()));
        }
    }
    out
}

/// Sets and chain of one isolated direction; `prefix` is `i` or `e`.
fn direction(sets: &mut String, chains: &mut String, prefix: &str, ifname: &str, d: &Direction) {
    let (field, allow) = if prefix == "i" {
        ("ip saddr", "accept")
    } else {
        ("ip daddr", "return")
    };
    let name = format!("{prefix}-{ifname}");
    let _ = writeln!(chains, "\tchain {name} {{");
    if d.all_ports.is_all() {
        let _ = writeln!(chains, "\t\t{allow}");
    } else if !d.all_ports.is_empty() {
        let _ = writeln!(
            sets,
            "\tset {name}-all {{\n\t\ttype ipv4_addr\n\t\tflags interval"
        );
        elements(sets, &addr_items(&d.all_ports));
        sets.push_str("\t}\n");
        let _ = writeln!(chains, "\t\t{field} @{name}-all {allow}");
    }
    if !d.ports.is_empty() {
        let _ = writeln!(
            sets,
            "\tset {name}-ports {{\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t\tflags interval"
        );
        elements(sets, &port_items(&d.ports));
        sets.push_str("\t}\n");
        let _ = writeln!(
            chains,
            "\t\t{field} . meta l4proto . th dport @{name}-ports {allow}"
        );
    }
    chains.push_str("\t\tdrop\n\t}\n");
}

/// The whole transaction: sluice's table (re)made from scratch; nobody else's is touched.
pub fn render(ir: &PolicyIr) -> NftScript {
    let mut sets = String::new();
    let mut chains = String::new();
    let mut maps = [Vec::new(), Vec::new()];
    for pod in &ir.pods {
        for (i, (prefix, d)) in [("i", &pod.ingress), ("e", &pod.egress)]
            .into_iter()
            .enumerate()
        {
            if d.isolated {
                direction(&mut sets, &mut chains, prefix, &pod.ifname, d);
                maps[i].push(format!("\"{}\" : goto {prefix}-{}", pod.ifname, pod.ifname));
            } else {
                maps[i].push(format!("\"{}\" : return", pod.ifname));
            }
        }
    }
    let mut t = format!("table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n");
    let isolated = AddrSet::from_addrs(
        ir.pods
            .iter()
            .filter(|p| p.ingress.isolated || p.egress.isolated)
            .map(|p| p.ip),
    );
    t.push_str("\tset isolated {\n\t\ttype ipv4_addr\n\t\tflags interval\n");
    elements(&mut t, &addr_items(&isolated));
    t.push_str("\t}\n");
    t.push_str(&sets);
    for (name, items) in [("ingress-pods", &maps[0]), ("egress-pods", &maps[1])] {
        let _ = writeln!(t, "\tmap {name} {{\n\t\ttype ifname : verdict");
        elements(&mut t, items);
        t.push_str("\t}\n");
    }
    t.push_str(&chains);
    t.push_str(&format!(
        "\tchain ingress {{\n\t\toifname vmap @ingress-pods\n\t\toifname \"sluice*\" return\n\t\toifname \"{p}*\" drop\n\t}}\n\
         \tchain egress {{\n\t\tiifname vmap @egress-pods\n\t\tiifname \"sluice*\" return\n\t\tiifname \"{p}*\" drop\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tct state established,related accept comment \"{HASH_MARK}{HASH_SLOT}\"\n\
         \t\tct state invalid drop\n\t\t{NOT_SYN} ip saddr @isolated drop\n\t\t{NOT_SYN} ip daddr @isolated drop\n\
         \t\tjump egress\n\t\tjump ingress\n\t}}\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
         \t\tct state established,related accept\n\t\tct state invalid drop\n\t\t{NOT_SYN} ip saddr @isolated drop\n\
         \t\tjump egress\n\t}}\n}}\n",
        p = crate::LINK_PREFIX
    ));
    let hash = text_hash(&t);
    NftScript {
        text: t.replace(HASH_SLOT, &hash),
        hash,
    }
}

/// The script that removes sluice's table (and is harmless when it is absent).
pub fn render_remove() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// The hash sluice's table carries, from `nft -j list chain inet sluice-policy forward`.
pub fn parse_observed(json: &str) -> Result<Option<String>, FirewallError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(FirewallError::Json)?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    Ok(items.iter().find_map(|item| {
        let rule = &item["rule"];
        (rule["table"] == TABLE && rule["chain"] == "forward")
            .then(|| {
                rule["comment"]
                    .as_str()?
                    .strip_prefix(HASH_MARK)
                    .map(str::to_string)
            })
            .flatten()
    }))
}

/// The policy table through the `nft` binary.
#[derive(Debug, Clone)]
pub struct NftCli {
    pub exec: Exec,
    pub program: String,
}

impl NftCli {
    pub fn new(exec: Exec) -> Self {
        Self {
            exec,
            program: "nft".into(),
        }
    }

    /// Whether nftables works here: the binary runs and the kernel answers.
    pub fn works(&self) -> bool {
        self.exec
            .run(&self.program, &["list", "tables"], None)
            .is_ok_and(|o| o.status.success())
    }

    fn script(&self, text: &str) -> Result<(), FirewallError> {
        let out = self.exec.run(&self.program, &["-f", "-"], Some(text))?;
        if out.status.success() {
            return Ok(());
        }
        Err(FirewallError::Command {
            program: self.program.clone(),
            op: "apply",
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}

impl Firewall for NftCli {
    fn backend(&self) -> Backend {
        Backend::Nftables
    }

    fn observe(&self) -> Result<Observed, FirewallError> {
        let out = self.exec.run(
            &self.program,
            &["-j", "list", "chain", "inet", TABLE, "forward"],
            None,
        )?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if stderr.contains("No such file or directory") {
                return Ok(Observed { hash: None });
            }
            return Err(FirewallError::Command {
                program: self.program.clone(),
                op: "list",
                stderr,
            });
        }
        Ok(Observed {
            hash: parse_observed(&String::from_utf8_lossy(&out.stdout))?,
        })
    }

    fn apply(&self, desired: &Rendered) -> Result<Applied, FirewallError> {
        let Rendered::Nft(script) = desired else {
            return Err(FirewallError::WrongBackend {
                want: Backend::Nftables,
            });
        };
        if self.observe()?.hash.as_deref() == Some(script.hash.as_str()) {
            return Ok(Applied { written: false });
        }
        self.script(&script.text)?;
        tracing::info!(hash = %script.hash, bytes = script.text.len(), "nftables policy table replaced");
        Ok(Applied { written: true })
    }

    fn remove(&self) -> Result<(), FirewallError> {
        self.script(&render_remove())
    }
}

#[cfg(test)]
pub(crate) mod tests;
