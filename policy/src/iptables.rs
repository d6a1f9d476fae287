//! The iptables renderer and applier: sluice's own chains (`SLUICE-` prefix) in table
//! `filter`, written by one `iptables-restore --noflush -w` (each chain written is declared, so
//! flushed and refilled, in one commit; nobody else's chain is touched), peers in ipsets
//! (`hash:net`, filled aside and swapped in) so that 10,000 peers are one lookup, the jumps
//! from `FORWARD` and `INPUT` inserted once (checked with `-C` first). The first write, and any
//! write after the rules in force stopped being the ones this process wrote, covers every chain
//! and set; after that only what changed is written ([`delta`]).
//!
//! Both families: the same chains, from the same IR, in `iptables` (IPv4 peers, `inet` ipsets)
//! and in `ip6tables` (IPv6 peers, `inet6` ipsets named with a trailing `6`), each with its own
//! hash; an isolated direction drops whatever family its policy does not name, and an unknown
//! pod veth drops on both (fail closed). The IPv6 `INPUT` chain lets neighbour discovery pass.
//!
//! The same shape as the nftables table (see [`crate::nft`]); where nft has verdict maps,
//! `SLUICE-INGRESS`/`SLUICE-EGRESS` hold one rule per local pod (linear in the node's pods, not
//! in policies). Allowed traffic `RETURN`s to `FORWARD`, so that rules others keep there still
//! apply, as another nftables table's chains do. The first rule of `SLUICE-FORWARD` carries
//! `--comment sluice-policy:HASH`.
//!
//! The backend (legacy or nf_tables) is detected as kube-proxy's iptables wrapper does:
//! kubelet's hint chains first, then whichever backend holds more rules, then `iptables -V`.

use crate::droplog::{self, DropDirection, DropStage};
use crate::firewall::{Applied, Backend, Exec, Firewall, FirewallError, Observed, Rendered};
use crate::ir::{AddrSet, Direction, Family, PolicyIr, PortEntry, Protocol, Region, TierVerdict};
use crate::nft::HASH_MARK;
use crate::{fnv1a, memo, FNV_START};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

pub const CHAIN_PREFIX: &str = "SLUICE-";
pub const SET_PREFIX: &str = "SLUICE-";
const TMP_SET: &str = "SLUICE-TMP";
const SET_OPTS: &str = "hash:net family inet hashsize 1024 maxelem 1048576";
const SET_OPTS6: &str = "hash:net family inet6 hashsize 1024 maxelem 1048576";

/// A family's ipset options, temporary set and suffix of set names.
fn set_family(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::V4 => (SET_OPTS, TMP_SET, ""),
        Family::V6 => (SET_OPTS6, "SLUICE-TMP6", "6"),
    }
}
const HASH_SLOT: &str = "@@HASH@@";
/// Ports one `multiport` match can take (a range counts twice).
const MULTIPORT_MAX: usize = 15;

/// Rendered input for `ipset restore` and `iptables-restore --noflush`, and the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesScript {
    /// Names of the chains and sets it uses (anything else with the prefix is stale).
    pub chains: Vec<String>,
    pub sets: Vec<String>,
    pub hash: String,
    /// Each chain's rules and each set's `ipset restore` lines (both shared with the render
    /// memo, never copied): what [`delta`] compares.
    pub chain_rules: BTreeMap<String, Arc<str>>,
    pub set_lines: HashMap<String, Arc<str>>,
    /// The parts of [`IptablesScript::filter`]: the base chains' rules (hash in place), the
    /// dispatch to the pods' chains, and the pods' chains' rules in order. The whole text is
    /// made only when every chain is written.
    head: String,
    dispatch: String,
    directions: Vec<Arc<str>>,
    /// The same for `ip6tables` (on the IPv4 script; `None` on the IPv6 one itself).
    pub v6: Option<Box<IptablesScript>>,
}

impl IptablesScript {
    /// `ipset restore` input: each desired set filled and swapped in.
    pub fn ipsets(&self) -> String {
        self.sets
            .iter()
            .filter_map(|s| self.set_lines.get(s))
            .map(|l| &**l)
            .collect()
    }

    /// `iptables-restore --noflush` input for table `filter`: every chain declared (so
    /// flushed) and filled.
    pub fn filter(&self) -> String {
        let mut f = String::from("*filter\n");
        for c in &self.chains {
            let _ = writeln!(f, ":{c} - [0:0]");
        }
        f.push_str(&self.head);
        f.push_str(&self.dispatch);
        for rules in &self.directions {
            f.push_str(rules);
        }
        f.push_str("COMMIT\n");
        f
    }
}

/// A set as rendered: its name, its `ipset restore` lines, and their hash.
type RenderedSet = (String, Arc<str>, u64);

#[derive(Default)]
struct Out {
    /// The pods' chains' rules, in order, and over them (in order) the hashes of each.
    rules: Vec<Arc<str>>,
    rules_hash: u64,
    chains: Vec<String>,
    sets: Vec<String>,
    set_lines: HashMap<String, Arc<str>>,
    /// Over the sets' names and contents, in order: the script's hash covers them without
    /// reading megabytes of addresses each pass.
    sets_hash: u64,
}

impl Out {
    fn add_set(&mut self, (name, lines, hash): &RenderedSet) {
        // A tier's set, shared by the pods of a group: once.
        if let Some(have) = self.set_lines.get(name) {
            debug_assert!(
                Arc::ptr_eq(have, lines) || have == lines,
                "two sets named {name}"
            );
            return;
        }
        self.sets_hash = fnv1a(self.sets_hash, name.as_bytes());
        self.sets_hash = fnv1a(self.sets_hash, &hash.to_le_bytes());
        self.set_lines.insert(name.clone(), lines.clone());
        self.sets.push(name.clone());
    }
}

/// Set `name` holding `addrs` (all of `family`).
fn render_set(name: String, addrs: &AddrSet, family: Family) -> RenderedSet {
    let (opts, tmp, _) = set_family(family);
    let mut lines = format!("create {tmp} {opts} -exist\nflush {tmp}\n");
    for c in addrs.nets() {
        let _ = writeln!(lines, "add {tmp} {c}");
    }
    let _ = writeln!(
        lines,
        "create {name} {opts} -exist\nswap {tmp} {name}\ndestroy {tmp}"
    );
    let hash = fnv1a(FNV_START, lines.as_bytes());
    (name, lines.into(), hash)
}

/// A tier's set, named by what it holds (`SLUICE-T` and 16 hex digits, within ipset's 31
/// characters): the pods of a group, and the tiers, share one set per distinct address set,
/// and a changed one is a new set, made aside and swapped into the rules that name it.
fn tier_set_name(addrs: &AddrSet, family: Family) -> String {
    let mut hash = FNV_START;
    for (a, b) in addrs.ranges() {
        hash = fnv1a(hash, &a.to_le_bytes());
        hash = fnv1a(hash, &b.to_le_bytes());
    }
    for (a, b) in addrs.ranges6() {
        hash = fnv1a(hash, &a.to_le_bytes());
        hash = fnv1a(hash, &b.to_le_bytes());
    }
    let (_, _, sfx) = set_family(family);
    format!("{SET_PREFIX}T{sfx}{hash:016x}")
}

/// The base name of the sets of one region of a tier's verdict (`stage`: `AD` Admin deny, `AA`
/// Admin accept, `BD` Baseline deny), after the group of pods it was decided for (`T`, `I` or
/// `E`, the stage and 12 hex digits: within ipset's 31 characters with the set's suffix). A
/// peer that comes or goes, or a policy that changes, changes what the set holds, swapped in
/// place (`ipset swap` costs what the set holds, whatever the table), and none of the rules of
/// the pods that name it. `None` for a verdict of no group: named by contents.
fn tier_sets(tag: &str, stage: &str, verdict: &TierVerdict) -> Option<String> {
    (verdict.group != 0).then(|| format!("T{tag}{stage}{:012x}", verdict.group >> 16))
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

/// One isolated direction's chain (its `-A` lines, and their hash) and sets.
#[derive(Debug)]
pub struct RenderedDirection {
    rules: Arc<str>,
    rules_hash: u64,
    sets: Vec<RenderedSet>,
}

/// Rendered directions kept from pass to pass, by chain name.
pub type RenderMemo = memo::RenderMemo<RenderedDirection>;

/// The chain and sets of one isolated direction, rendered or kept in `memo`.
fn direction(
    out: &mut Out,
    memo: &mut RenderMemo,
    ingress: bool,
    ifname: &str,
    d: &Direction,
    (log, family): (bool, Family),
) {
    let tag = if ingress { "I" } else { "E" };
    let chain = format!("{CHAIN_PREFIX}{tag}-{ifname}");
    // One memo for both families: the IPv6 chain is kept under a key of its own.
    let key = match family {
        Family::V4 => chain.clone(),
        Family::V6 => format!("{chain}/6"),
    };
    let rendered = memo.get(&key, d, log, || {
        render_direction(&chain, ingress, ifname, &d.only(family), (log, family))
    });
    for set in &rendered.sets {
        out.add_set(set);
    }
    out.rules_hash = fnv1a(out.rules_hash, chain.as_bytes());
    out.rules_hash = fnv1a(out.rules_hash, &rendered.rules_hash.to_le_bytes());
    out.rules.push(rendered.rules.clone());
    out.chains.push(chain);
}

fn render_direction(
    chain: &str,
    ingress: bool,
    ifname: &str,
    d: &Direction,
    (log, family): (bool, Family),
) -> RenderedDirection {
    let (tag, dir, verdict) = if ingress {
        ("I", "src", "RETURN")
    } else {
        ("E", "dst", "RETURN")
    };
    let mut sets = Vec::new();
    let mut rules = Vec::new();
    // A rate-limited log is its own rule before the drop (over its rate it does not match).
    let log_rules: Vec<String> = [
        DropStage::Admin,
        DropStage::NetworkPolicy,
        DropStage::Baseline,
    ]
    .into_iter()
    .map(|stage| droplog::iptables_log(drop_direction(ingress), stage, Some(ifname)))
    .collect();
    let drop = |i: usize| -> Vec<&str> {
        if log {
            vec![log_rules[i].as_str(), "DROP"]
        } else {
            vec!["DROP"]
        }
    };
    let mut e = Emit {
        sets: &mut sets,
        rules: &mut rules,
        chain,
        dir,
        family,
    };
    let admin = &d.admin;
    e.region(
        tier_sets(tag, "AD", admin).as_deref(),
        &admin.deny,
        &drop(0),
    );
    e.region(
        tier_sets(tag, "AA", admin).as_deref(),
        &admin.accept,
        &[verdict],
    );
    if d.isolated {
        e.lookups(
            Some(&format!("{tag}-{ifname}")),
            &d.all_ports,
            &d.ports,
            &[verdict],
        );
        e.lookups_done(&drop(1));
    } else {
        let baseline = &d.baseline;
        e.region(
            tier_sets(tag, "BD", baseline).as_deref(),
            &baseline.deny,
            &drop(2),
        );
        e.lookups_done(&[verdict]);
    }
    let mut text = String::new();
    for r in rules {
        let _ = writeln!(text, "{r}");
    }
    RenderedDirection {
        rules_hash: fnv1a(FNV_START, text.as_bytes()),
        rules: text.into(),
        sets,
    }
}

/// The protocol numbers without ports (all but TCP 6, UDP 17, SCTP 132), for `-m u32` on the
/// IPv4 header's protocol byte.
const NO_PORT_PROTOCOLS: &str = "6&0xFF=0:5,7:16,18:131,133:255";
/// The same on the IPv6 header's next header byte (a packet with extension headers before
/// its transport header reads as one without ports).
const NO_PORT_PROTOCOLS6: &str = "3&0xFF=0:5,7:16,18:131,133:255";

/// Rules and sets of one direction's chain, as they are emitted.
struct Emit<'a> {
    sets: &'a mut Vec<RenderedSet>,
    rules: &'a mut Vec<String>,
    chain: &'a str,
    dir: &'a str,
    family: Family,
}

impl Emit<'_> {
    /// `m` (a match, may be empty) once per verdict: a target, or a drop-log rule's own
    /// matches and target (which start with `-`).
    fn push(&mut self, m: &str, verdicts: &[&str]) {
        for v in verdicts {
            self.rules.push(if v.starts_with('-') {
                format!("-A {}{m} {v}", self.chain)
            } else {
                format!("-A {}{m} -j {v}", self.chain)
            });
        }
    }

    /// The match of set `name` (`None`: named by its contents, see [`tier_set_name`]).
    fn set_match(&mut self, name: Option<String>, addrs: &AddrSet) -> String {
        if addrs.is_full(self.family) {
            return String::new();
        }
        let name = name.unwrap_or_else(|| tier_set_name(addrs, self.family));
        let m = format!(" -m set --match-set {name} {}", self.dir);
        self.sets.push(render_set(name, addrs, self.family));
        m
    }

    /// Peers on every port (`all`), then per port entries: one set per distinct peer set,
    /// one rule per protocol and multiport list. Sets are named after `base`, or by their
    /// contents when it is `None` (a tier's).
    fn lookups(
        &mut self,
        base: Option<&str>,
        all: &AddrSet,
        ports: &[PortEntry],
        verdicts: &[&str],
    ) {
        let (_, _, sfx) = set_family(self.family);
        let name = |suffix: &str| base.map(|b| format!("{SET_PREFIX}{b}-{suffix}{sfx}"));
        if !all.is_empty() {
            let m = self.set_match(name("a"), all);
            self.push(&m, verdicts);
        }
        let mut groups: Vec<(&AddrSet, Vec<&PortEntry>)> = Vec::new();
        for e in ports {
            match groups.iter_mut().find(|(a, _)| *a == &e.addrs) {
                Some(g) => g.1.push(e),
                None => groups.push((&e.addrs, vec![e])),
            }
        }
        for (i, (addrs, entries)) in groups.into_iter().enumerate() {
            let m = self.set_match(name(&i.to_string()), addrs);
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
                    self.push(&format!(" -p {p}{m}"), verdicts);
                    continue;
                }
                for list in multiport_lists(&ranges) {
                    self.push(
                        &format!(" -p {p}{m} -m multiport --dports {list}"),
                        verdicts,
                    );
                }
            }
        }
    }

    /// A ClusterNetworkPolicy tier's region; its sets named after `base` (see [`tier_sets`]),
    /// or by their contents when it is `None`.
    fn region(&mut self, base: Option<&str>, region: &Region, verdicts: &[&str]) {
        if region.is_empty() {
            return;
        }
        let (all, ports, other) = region.split();
        self.lookups(base, &all, &ports, verdicts);
        if !other.is_empty() {
            let (_, _, sfx) = set_family(self.family);
            let name = base.map(|b| format!("{SET_PREFIX}{b}-o{sfx}"));
            let m = self.set_match(name, &other);
            let u32 = match self.family {
                Family::V4 => NO_PORT_PROTOCOLS,
                Family::V6 => NO_PORT_PROTOCOLS6,
            };
            self.push(&format!(" -m u32 --u32 {u32}{m}"), verdicts);
        }
    }

    /// The chain's last word.
    fn lookups_done(&mut self, verdicts: &[&str]) {
        self.push("", verdicts);
    }
}

/// The whole desired state of sluice's chains and sets.
pub fn render(ir: &PolicyIr) -> IptablesScript {
    render_with(ir, &mut RenderMemo::default())
}

/// [`render`], reusing what `memo` kept of the last pass: the IPv4 script, the IPv6 one in
/// it (its hash part of the IPv4 one's, so that the whole changes when either does).
pub fn render_with(ir: &PolicyIr, memo: &mut RenderMemo) -> IptablesScript {
    memo.begin_pass();
    let v6 = render_family(ir, memo, Family::V6, None);
    let mut v4 = render_family(ir, memo, Family::V4, Some(&v6.hash));
    memo.end_pass();
    v4.v6 = Some(Box::new(v6));
    v4
}

/// One family's chains and sets; `also` is mixed into the hash.
fn render_family(
    ir: &PolicyIr,
    memo: &mut RenderMemo,
    family: Family,
    also: Option<&str>,
) -> IptablesScript {
    let mut out = Out {
        sets_hash: FNV_START,
        rules_hash: FNV_START,
        ..Out::default()
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
            .filter(|p| p.ingress.enforced() || p.egress.enforced())
            .flat_map(|p| p.ips.iter().copied()),
    )
    .only(family);
    let (_, _, sfx) = set_family(family);
    let isolated_set = format!("{SET_PREFIX}ISOLATED{sfx}");
    out.add_set(&render_set(isolated_set.clone(), &isolated, family));
    // The dispatch as written (per pod, ingress then egress) and per chain, for the delta.
    let mut dispatch = String::new();
    // The ingress dispatch chain's rules, then the egress one's.
    let mut per_chain = [String::new(), String::new()];
    for pod in &ir.pods {
        for (ingress, d, chain, flag, tag) in [
            (true, &pod.ingress, &ing, "-o", "I"),
            (false, &pod.egress, &eg, "-i", "E"),
        ] {
            let start = dispatch.len();
            if d.enforced() {
                direction(
                    &mut out,
                    memo,
                    ingress,
                    &pod.ifname,
                    d,
                    (ir.log_drops, family),
                );
                let _ = writeln!(
                    dispatch,
                    "-A {chain} {flag} {} -g {CHAIN_PREFIX}{tag}-{}",
                    pod.ifname, pod.ifname
                );
            } else {
                let _ = writeln!(dispatch, "-A {chain} {flag} {} -j RETURN", pod.ifname);
            }
            per_chain[usize::from(!ingress)].push_str(&dispatch[start..]);
        }
    }
    let p = crate::LINK_PREFIX;
    for (chain, flag, ingress) in [(&ing, "-o", true), (&eg, "-i", false)] {
        let start = dispatch.len();
        let _ = writeln!(dispatch, "-A {chain} {flag} sluice+ -j RETURN");
        if ir.log_drops {
            let log =
                droplog::iptables_log(drop_direction(ingress), DropStage::NetworkPolicy, None);
            let _ = writeln!(dispatch, "-A {chain} {flag} {p}+ {log}");
        }
        let _ = writeln!(dispatch, "-A {chain} {flag} {p}+ -j DROP");
        per_chain[usize::from(!ingress)].push_str(&dispatch[start..]);
    }
    // IPv6 neighbour discovery (untracked by conntrack) passes, as ARP does for IPv4.
    let nd = match family {
        Family::V4 => String::new(),
        Family::V6 => [135, 136]
            .iter()
            .map(|t| format!("-A {input} -p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN\n"))
            .collect(),
    };
    let mut chains = vec![fwd.clone(), input.clone(), ing.clone(), eg.clone()];
    chains.append(&mut out.chains);
    let fwd_rules = format!(
        "-A {fwd} -m conntrack --ctstate RELATED,ESTABLISHED -m comment --comment {HASH_MARK}{HASH_SLOT} -j RETURN\n\
         -A {fwd} -m conntrack --ctstate INVALID -j DROP\n\
         -A {fwd} -p tcp ! --syn -m conntrack --ctstate NEW -m set --match-set {isolated_set} src -j DROP\n\
         -A {fwd} -p tcp ! --syn -m conntrack --ctstate NEW -m set --match-set {isolated_set} dst -j DROP\n\
         -A {fwd} -j {eg}\n-A {fwd} -j {ing}\n"
    );
    let input_rules = format!(
        "-A {input} -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n{nd}\
         -A {input} -m conntrack --ctstate INVALID -j DROP\n\
         -A {input} -p tcp ! --syn -m conntrack --ctstate NEW -m set --match-set {isolated_set} src -j DROP\n\
         -A {input} -j {eg}\n"
    );
    // Over what the text holds, its parts hashed once each (a pod's chain when rendered):
    // the chains declared, the base chains, the dispatch, the pods' chains, the sets.
    let mut hash = out.sets_hash;
    for c in &chains {
        hash = fnv1a(hash, c.as_bytes());
        hash = fnv1a(hash, b"\n");
    }
    hash = fnv1a(hash, fwd_rules.as_bytes());
    hash = fnv1a(hash, input_rules.as_bytes());
    hash = fnv1a(hash, dispatch.as_bytes());
    hash = fnv1a(hash, &out.rules_hash.to_le_bytes());
    let hash = format!("{:016x}", fnv1a(hash, also.unwrap_or_default().as_bytes()));
    let fwd_rules = fwd_rules.replace(HASH_SLOT, &hash);
    let [ing_rules, eg_rules] = per_chain;
    let mut chain_rules: BTreeMap<String, Arc<str>> = BTreeMap::new();
    for (c, rules) in [
        (&fwd, fwd_rules.as_str()),
        (&input, input_rules.as_str()),
        (&ing, ing_rules.as_str()),
        (&eg, eg_rules.as_str()),
    ] {
        chain_rules.insert(c.clone(), rules.into());
    }
    for (c, rules) in chains[4..].iter().zip(&out.rules) {
        chain_rules.insert(c.clone(), rules.clone());
    }
    IptablesScript {
        head: format!("{fwd_rules}{input_rules}"),
        dispatch,
        directions: out.rules,
        chains,
        sets: out.sets,
        hash,
        chain_rules,
        set_lines: out.set_lines,
        v6: None,
    }
}

/// What changes the rules in force from `old` to `new`, both as [`render`] made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptablesDelta {
    /// `ipset restore` input for the sets that are new or hold other addresses.
    pub ipsets: String,
    /// `iptables-restore --noflush` input: the chains that are new or hold other rules
    /// (declared, so flushed, and refilled; `SLUICE-FORWARD` always, for it carries the hash),
    /// and `old`'s chains that `new` no longer has, deleted.
    pub filter: String,
    /// Sets to destroy once the rules no longer name them.
    pub stale_sets: Vec<String>,
}

pub fn delta(old: &IptablesScript, new: &IptablesScript) -> IptablesDelta {
    let mut ipsets = String::new();
    for (name, lines) in new
        .sets
        .iter()
        .filter_map(|n| Some((n, new.set_lines.get(n)?)))
    {
        match old.set_lines.get(name) {
            Some(o) if Arc::ptr_eq(o, lines) || o == lines => {}
            _ => ipsets.push_str(lines),
        }
    }
    let changed: Vec<&String> = new
        .chains
        .iter()
        .filter(
            |c| match (old.chain_rules.get(*c), new.chain_rules.get(*c)) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b) && a != b,
                (a, b) => a != b,
            },
        )
        .collect();
    let mut filter = String::from("*filter\n");
    for c in &changed {
        let _ = writeln!(filter, ":{c} - [0:0]");
    }
    for c in &changed {
        filter.push_str(new.chain_rules.get(*c).map_or("", |r| &**r));
    }
    let stale: Vec<String> = old
        .chains
        .iter()
        .filter(|c| !new.chain_rules.contains_key(*c))
        .cloned()
        .collect();
    filter.push_str(&delete_chains(&stale));
    filter.push_str("COMMIT\n");
    IptablesDelta {
        ipsets,
        filter,
        stale_sets: old
            .sets
            .iter()
            .filter(|s| !new.set_lines.contains_key(*s))
            .cloned()
            .collect(),
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
    let hash = hash_in(save);
    let jumped = |from: &str, to: &str| {
        save.lines().any(|l| {
            l.starts_with(&format!("-A {from} ")) && l.ends_with(&format!("-j {CHAIN_PREFIX}{to}"))
        })
    };
    let hooked = jumped("FORWARD", "FORWARD") && jumped("INPUT", "INPUT");
    (hash.filter(|_| hooked), chains)
}

/// The hash on `SLUICE-FORWARD`'s first rule, in `iptables-save` or `iptables -S` lines.
fn hash_in(lines: &str) -> Option<String> {
    let fwd = format!("-A {CHAIN_PREFIX}FORWARD ");
    lines.lines().filter(|l| l.starts_with(&fwd)).find_map(|l| {
        let at = l.find(HASH_MARK)? + HASH_MARK.len();
        let rest = &l[at..];
        let end = rest
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(rest.len());
        Some(rest[..end].to_string())
    })
}

/// The policy chains through `ipset` and `iptables-restore` (and `ip6tables-restore`), in the
/// backend the host uses.
#[derive(Debug, Clone)]
pub struct IptablesRestore {
    pub exec: Exec,
    pub mode: IptablesMode,
    /// What this process last wrote, per family: when the kernel still carries its hash, the
    /// next change is written as a [`delta`] (a full `iptables-save` and rewrite of thousands
    /// of chains and sets takes most of a second).
    last: Arc<Mutex<Option<IptablesScript>>>,
    last6: Arc<Mutex<Option<IptablesScript>>>,
    memo: Arc<Mutex<RenderMemo>>,
}

/// What is left to sweep of the sets once both families' rules are written (a set one family's
/// rules still name cannot be destroyed before they change).
enum Sweep {
    Nothing,
    These(Vec<String>),
    /// Every set of sluice's the scripts do not name.
    Unused,
}

/// The chain an older sluice's IPv6 guard lived in, swept at the first IPv6 write.
const OLD_GUARD6: &str = "V6-GUARD";

impl IptablesRestore {
    pub fn new(exec: Exec, mode: IptablesMode) -> Self {
        Self {
            exec,
            mode,
            last: Arc::default(),
            last6: Arc::default(),
            memo: Arc::default(),
        }
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
    pub(crate) fn bin(&self, tool: &str) -> String {
        let rest = tool.strip_prefix("iptables").unwrap_or(tool);
        format!("iptables-{}{rest}", self.mode.suffix())
    }

    /// `ip6tables-save` → `ip6tables-nft-save` or `ip6tables-legacy-save` (`tool` named as
    /// for [`Self::bin`]: `iptables-save`).
    pub(crate) fn bin6(&self, tool: &str) -> String {
        let rest = tool.strip_prefix("iptables").unwrap_or(tool);
        format!("ip6tables-{}{rest}", self.mode.suffix())
    }

    /// `tool` (named as for [`Self::bin`]) of `family`.
    fn tool(&self, family: Family, tool: &str) -> String {
        match family {
            Family::V4 => self.bin(tool),
            Family::V6 => self.bin6(tool),
        }
    }

    /// Whether this kernel has IPv6 at all (else there is no IPv6 traffic to filter).
    fn has_ipv6() -> bool {
        std::path::Path::new("/proc/sys/net/ipv6").exists()
    }

    pub(crate) fn checked(
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

    fn save(&self, family: Family) -> Result<String, FirewallError> {
        self.checked(
            &self.tool(family, "iptables-save"),
            &["-t", "filter"],
            None,
            "save",
        )
    }

    fn sets(&self) -> Result<Vec<String>, FirewallError> {
        let list = self.checked("ipset", &["list", "-n"], None, "list")?;
        Ok(list
            .lines()
            .filter(|l| l.starts_with(SET_PREFIX))
            .map(str::to_string)
            .collect())
    }

    /// Whether `from` jumps to `SLUICE-<to>`.
    fn hooked(&self, family: Family, from: &str, to: &str) -> Result<bool, FirewallError> {
        let target = format!("{CHAIN_PREFIX}{to}");
        let check = self.exec.run(
            &self.tool(family, "iptables"),
            &["-w", "5", "-t", "filter", "-C", from, "-j", &target],
            None,
        )?;
        Ok(check.status.success())
    }

    /// The hash on `SLUICE-FORWARD`'s first rule (one short call where `iptables-save` lists
    /// every chain); `None` when the chain or the hash is missing. Says nothing of the jumps
    /// to sluice's chains: see [`Self::hooked`].
    fn forward_hash(&self, family: Family) -> Result<Option<String>, FirewallError> {
        let first = self.exec.run(
            &self.tool(family, "iptables"),
            &[
                "-w",
                "5",
                "-t",
                "filter",
                "-S",
                &format!("{CHAIN_PREFIX}FORWARD"),
                "1",
            ],
            None,
        )?;
        if !first.status.success() {
            return Ok(None);
        }
        Ok(hash_in(&String::from_utf8_lossy(&first.stdout)))
    }

    /// Writes `delta` from the script in force to `script`, then puts back any missing jump
    /// (after the rules, which are what enforces the change); the stale sets are left to the
    /// sweep.
    fn write_delta(&self, family: Family, delta: &IptablesDelta) -> Result<(), FirewallError> {
        if !delta.ipsets.is_empty() {
            self.checked("ipset", &["restore"], Some(&delta.ipsets), "restore")?;
        }
        self.checked(
            &self.tool(family, "iptables-restore"),
            &["-w", "5", "--noflush"],
            Some(&delta.filter),
            "restore",
        )?;
        self.hook(family, "FORWARD", "FORWARD")?;
        self.hook(family, "INPUT", "INPUT")
    }

    /// Inserts `-j SLUICE-<to>` at the top of `from` unless it is already there.
    fn hook(&self, family: Family, from: &str, to: &str) -> Result<(), FirewallError> {
        if self.hooked(family, from, to)? {
            return Ok(());
        }
        let target = format!("{CHAIN_PREFIX}{to}");
        let ipt = self.tool(family, "iptables");
        self.checked(
            &ipt,
            &["-w", "5", "-t", "filter", "-I", from, "1", "-j", &target],
            None,
            "insert",
        )?;
        Ok(())
    }

    fn unhook(&self, family: Family, from: &str, to: &str) -> Result<(), FirewallError> {
        let target = format!("{CHAIN_PREFIX}{to}");
        let ipt = self.tool(family, "iptables");
        // Bounded: a jump is deleted once per turn, and nobody adds ours many times.
        for _ in 0..16 {
            let del = self.exec.run(
                &ipt,
                &["-w", "5", "-t", "filter", "-D", from, "-j", &target],
                None,
            )?;
            if !del.status.success() {
                break;
            }
        }
        Ok(())
    }

    /// Destroys every set of sluice's but those in `keep`.
    fn destroy_sets(&self, keep: &[String]) -> Result<(), FirewallError> {
        let stale: Vec<String> = self
            .sets()?
            .into_iter()
            .filter(|s| !keep.contains(s))
            .collect();
        self.destroy(&stale)
    }

    /// Destroys `sets`, in one `ipset restore`.
    fn destroy(&self, sets: &[String]) -> Result<(), FirewallError> {
        if sets.is_empty() {
            return Ok(());
        }
        let lines: String = sets.iter().map(|s| format!("destroy {s}\n")).collect();
        self.checked("ipset", &["restore"], Some(&lines), "destroy")?;
        Ok(())
    }
}

impl Firewall for IptablesRestore {
    fn backend(&self) -> Backend {
        Backend::Iptables
    }

    fn render(&self, ir: &PolicyIr) -> Rendered {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        Rendered::Iptables(render_with(ir, &mut memo))
    }

    fn observe(&self) -> Result<Observed, FirewallError> {
        Ok(Observed {
            hash: parse_save(&self.save(Family::V4)?).0,
        })
    }

    /// The IPv4 chains and, at the same time, the IPv6 ones (where the kernel has IPv6: their
    /// chains, sets and temporary sets are apart, and each family's writes are a few
    /// processes that would otherwise wait for the other's), then the sets neither names any
    /// more. With iptables-legacy one after the other: both families' processes take the
    /// same `/run/xtables.lock`, so at once they would only wait on it (up to `-w 5`).
    fn apply(&self, desired: &Rendered) -> Result<Applied, FirewallError> {
        let Rendered::Iptables(script) = desired else {
            return Err(FirewallError::WrongBackend {
                want: Backend::Iptables,
            });
        };
        let v6 = script.v6.as_deref().filter(|_| Self::has_ipv6());
        let at_once = self.mode == IptablesMode::Nft;
        let (four, six) = std::thread::scope(|scope| {
            let six = v6
                .filter(|_| at_once)
                .map(|v6| scope.spawn(move || self.apply_family(Family::V6, v6, &self.last6)));
            let four = self.apply_family(Family::V4, script, &self.last);
            let six = match six {
                Some(h) => Some(h.join().unwrap_or_else(|_| {
                    Err(FirewallError::Command {
                        program: self.bin6("iptables-restore"),
                        op: "restore",
                        stderr: "the IPv6 writing thread panicked".into(),
                    })
                })),
                None if four.is_ok() => v6.map(|v6| self.apply_family(Family::V6, v6, &self.last6)),
                None => None,
            };
            (four, six)
        });
        let (mut applied, mut sweeps) = {
            let (a, s) = four?;
            (a, vec![s])
        };
        let mut keep = script.sets.clone();
        if let (Some(v6), Some(six)) = (v6, six) {
            let (a, s) = six?;
            applied = Applied {
                written: applied.written || a.written,
                incremental: (applied.incremental || !applied.written)
                    && (a.incremental || !a.written)
                    && (applied.written || a.written),
            };
            sweeps.push(s);
            keep.extend(v6.sets.iter().cloned());
        }
        if sweeps.iter().any(|s| matches!(s, Sweep::Unused)) {
            self.destroy_sets(&keep)?;
        } else {
            let stale: Vec<String> = sweeps
                .into_iter()
                .flat_map(|s| match s {
                    Sweep::These(v) => v,
                    _ => Vec::new(),
                })
                .filter(|s| !keep.contains(s))
                .collect();
            self.destroy(&stale)?;
        }
        Ok(applied)
    }

    fn remove(&self) -> Result<(), FirewallError> {
        if Self::has_ipv6() {
            self.unhook(Family::V6, "FORWARD", OLD_GUARD6)?;
            self.unhook(Family::V6, "INPUT", OLD_GUARD6)?;
            self.remove_family(Family::V6, &self.last6)?;
        }
        self.remove_family(Family::V4, &self.last)?;
        self.destroy_sets(&[])
    }
}

impl IptablesRestore {
    /// Makes `family`'s chains what `script` says: nothing when the kernel carries its hash, a
    /// delta from what this process last wrote when the kernel still holds that, else every
    /// chain; what of the sets is left to sweep.
    fn apply_family(
        &self,
        family: Family,
        script: &IptablesScript,
        last: &Mutex<Option<IptablesScript>>,
    ) -> Result<(Applied, Sweep), FirewallError> {
        let unchanged = Applied {
            written: false,
            incremental: false,
        };
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = last.take() {
            match self.forward_hash(family) {
                Ok(Some(h))
                    if h == script.hash
                        && self.hooked(family, "FORWARD", "FORWARD")?
                        && self.hooked(family, "INPUT", "INPUT")? =>
                {
                    *last = Some(if prev.hash == script.hash {
                        prev
                    } else {
                        script.clone()
                    });
                    return Ok((unchanged, Sweep::Nothing));
                }
                Ok(Some(h)) if h == prev.hash => {
                    let d = delta(&prev, script);
                    match self.write_delta(family, &d) {
                        Ok(()) => {
                            tracing::info!(family = ?family, hash = %script.hash, from = %prev.hash, chains = d.filter.lines().filter(|l| l.starts_with(':')).count(), sets = d.ipsets.matches("\nswap ").count(), "iptables policy changed");
                            *last = Some(script.clone());
                            return Ok((
                                Applied {
                                    written: true,
                                    incremental: true,
                                },
                                Sweep::These(d.stale_sets),
                            ));
                        }
                        // Whatever the delta left, the full write below replaces it.
                        Err(e) => {
                            tracing::warn!(family = ?family, error = %e, "iptables policy delta refused; rewriting every chain")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(family = ?family, error = %e, "reading the policy hash failed; listing the table")
                }
            }
        }
        let (hash, have_chains) = parse_save(&self.save(family)?);
        if hash.as_deref() == Some(script.hash.as_str()) {
            *last = Some(script.clone());
            return Ok((unchanged, Sweep::Nothing));
        }
        if family == Family::V6 {
            // An older sluice's guard chain goes with the other stale chains below.
            self.unhook(family, "FORWARD", OLD_GUARD6)?;
            self.unhook(family, "INPUT", OLD_GUARD6)?;
        }
        self.checked("ipset", &["restore"], Some(&script.ipsets()), "restore")?;
        let stale: Vec<String> = have_chains
            .into_iter()
            .filter(|c| !script.chains.contains(c))
            .collect();
        let mut filter = script.filter();
        if let Some(body) = filter.strip_suffix("COMMIT\n") {
            filter = format!("{body}{}COMMIT\n", delete_chains(&stale));
        }
        self.checked(
            &self.tool(family, "iptables-restore"),
            &["-w", "5", "--noflush"],
            Some(&filter),
            "restore",
        )?;
        self.hook(family, "FORWARD", "FORWARD")?;
        self.hook(family, "INPUT", "INPUT")?;
        tracing::info!(family = ?family, hash = %script.hash, mode = ?self.mode, chains = script.chains.len(), sets = script.sets.len(), "iptables policy chains replaced");
        *last = Some(script.clone());
        Ok((
            Applied {
                written: true,
                incremental: false,
            },
            Sweep::Unused,
        ))
    }

    fn remove_family(
        &self,
        family: Family,
        last: &Mutex<Option<IptablesScript>>,
    ) -> Result<(), FirewallError> {
        *last.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.unhook(family, "FORWARD", "FORWARD")?;
        self.unhook(family, "INPUT", "INPUT")?;
        let (_, chains) = parse_save(&self.save(family)?);
        if !chains.is_empty() {
            let text = format!("*filter\n{}COMMIT\n", delete_chains(&chains));
            self.checked(
                &self.tool(family, "iptables-restore"),
                &["-w", "5", "--noflush"],
                Some(&text),
                "restore",
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
