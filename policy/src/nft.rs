//! The nftables renderer and applier: sluice's own table `inet sluice-policy`, changed in one
//! `nft -f -` transaction (atomic: a packet sees the old rules or the new ones). The table is
//! rendered as data ([`NftTable`]); a change is written as the difference from what this
//! process last wrote ([`delta`]: a pod's chain, sets and maps made or dropped), and the whole
//! table is written only when the kernel's copy is not known (first pass, someone else's
//! edit, a refused delta). Sets and maps are named after their contents (`…-HASH`): a changed
//! one is made anew, never edited element by element, which would make `nft` load every
//! element of the table before the first command. The one exception is a ClusterNetworkPolicy
//! group's sets (`g-…`), refilled in place, since a thousand pods' chains name them.
//!
//! Shape (per-packet cost is constant in the number of policies and peers):
//! - base chains `forward` and `input` (hook priority `filter`, policy accept): established and
//!   related accepted, invalid dropped, then `jump egress` (both) and `jump ingress` (forward);
//! - `egress`: `iifname vmap @egress-pods-HASH` (isolated pod → `goto e-IF`, known open pod →
//!   `return`), then unknown pod veths drop (fail closed); `ingress` likewise on `oifname`;
//! - per isolated pod and direction a chain with at most two set lookups: an interval set of
//!   peers allowed on every port (`i-all-HASH`, `e-all-HASH`: named by its contents alone,
//!   shared by the pods that allow the same peers) and a concatenated interval set
//!   `ipv4_addr . inet_proto . inet_service` (`…-ports`), and their IPv6 twins (`…-all6`,
//!   `…-ports6`, `ipv6_addr`, matched by `ip6 saddr`/`ip6 daddr`) when the direction allows
//!   IPv6 peers, then `drop`: an address of a family the policy does not name drops. Egress allows `return`
//!   (the ingress check of the destination still runs), ingress allows `accept`.
//! - ClusterNetworkPolicy tiers come first (Admin) and last (Baseline, for a direction no
//!   NetworkPolicy isolates) in the same chain, each at most three lookups whatever the number
//!   of policies behind it: the pods the same policies select alike share one verdict in the
//!   IR and one set per region in the table, named after that group and the revision of its
//!   policies (`g-…-GROUP-REV-…`), so a peer that comes or goes refills the group's sets in
//!   place and rewrites none of its pods' chains, and a changed policy makes new sets and
//!   writes only the chains of the pods whose verdict changed.
//!
//! - IPv6 neighbour solicitations and advertisements pass (a pod whose egress is isolated must
//!   still answer its node's neighbour discovery); like ARP for IPv4, they are not policy's.
//! - TCP packets that would start a flow without being a SYN are dropped to and from isolated
//!   pods (sets `isolated`, `isolated6`), so that a connection cut by [`crate::conntrack`] cannot be picked
//!   up again mid-stream from its other end.
//!
//! The one rule of chain `state` (never jumped to) carries `comment "sluice-policy:HASH"`, the
//! hash of the table's text (sets by name, which says what they hold): [`NftCli::observe`] reads only that chain, an unchanged
//! table is not rewritten, and a table edited by hand (or by an older sluice) is replaced.

use crate::droplog::{self, DropDirection, DropStage};
use crate::firewall::{Applied, Backend, Exec, Firewall, FirewallError, Observed, Rendered};
use crate::ir::{AddrSet, Direction, Family, PolicyIr, PortEntry, Region, TierVerdict};
use crate::memo;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

pub mod observe;

/// sluice's policy table (DESIGN.md: recognisable by its nftables table).
pub const TABLE: &str = "sluice-policy";
/// Comment prefix of the hash-carrying rule.
pub const HASH_MARK: &str = "sluice-policy:";
/// A TCP packet that would start a flow without being a SYN: the pick-up of a connection whose
/// conntrack entry was cut. Dropped for isolated pods, or a denied connection would come back
/// as a "new" flow in the reverse direction (from its server) that the policy allows.
const NOT_SYN: &str = "ct state new tcp flags & (fin | syn | rst | ack) != syn";

/// sluice's table as data: what [`render`] wants, what the applier last wrote, and what
/// [`delta`] compares. Rules and elements are nft's own text.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftTable {
    /// Sets and verdict maps by name (shared: a set the next pass renders the same is not
    /// made again, see [`RenderMemo`]).
    pub sets: BTreeMap<String, Arc<NftSet>>,
    /// Chains by name.
    pub chains: BTreeMap<String, Arc<NftChain>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftSet {
    /// `set` or `map`.
    pub keyword: &'static str,
    /// The declaration lines (type, flags).
    pub spec: Vec<String>,
    /// Key → value (`None` in a set; the verdict in a map).
    pub elements: BTreeMap<String, Option<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NftChain {
    /// `type filter hook … ; policy …;` of a base chain.
    pub hook: Option<String>,
    pub rules: Vec<String>,
}

/// Rendered desired state: the table, and the hash of its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftScript {
    /// Shared with the applier's record of what it last wrote, never copied.
    pub table: Arc<NftTable>,
    pub hash: String,
}

impl NftScript {
    /// The full transaction: the table removed and made again, hash included. Made only when
    /// the whole table is written; a pass that writes a delta never spells out every element.
    pub fn text(&self) -> String {
        format!(
            "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
            table_text(&self.table, &self.hash)
        )
    }
}

/// The chain, never jumped to, whose one rule carries the hash of the table's text.
const STATE_CHAIN: &str = "state";

fn state_rule(hash: &str) -> String {
    format!("return comment \"{HASH_MARK}{hash}\"")
}

fn addr_elements(set: &AddrSet) -> BTreeMap<String, Option<String>> {
    set.nets().iter().map(|c| (c.to_string(), None)).collect()
}

/// nft's spelling of a family: the address type, the payload keyword, the sets' suffix.
fn nft_family(family: Family) -> (&'static str, &'static str, &'static str) {
    match family {
        Family::V4 => ("ipv4_addr", "ip", ""),
        Family::V6 => ("ipv6_addr", "ip6", "6"),
    }
}

fn port_elements(ports: &[PortEntry]) -> BTreeMap<String, Option<String>> {
    let mut out = BTreeMap::new();
    for e in ports {
        let range = if e.first == e.last {
            e.first.to_string()
        } else {
            format!("{}-{}", e.first, e.last)
        };
        for c in e.addrs.nets() {
            out.insert(format!("{c} . {} . {range}", e.protocol.name()), None);
        }
    }
    out
}

fn interval_set(kind: &str, elements: BTreeMap<String, Option<String>>) -> NftSet {
    NftSet {
        keyword: "set",
        spec: vec![format!("type {kind}"), "flags interval".into()],
        elements,
    }
}

/// `base` and a hash of the set's contents: a set that changes becomes a new set, made whole in
/// one command, and the rule naming it is written again. Never an element edit: before any
/// `add element` or `delete element` nft loads the elements of every interval set in the
/// table, tens of milliseconds at a thousand pods, while a new set costs what it holds.
fn content_name(base: &str, set: &NftSet) -> String {
    use sha2::Digest as _;
    // A digest no one can aim at: the elements come from NetworkPolicies' ipBlocks, which a
    // namespace's owner writes, and pods whose sets share a name share one set (and a delta
    // never compares the elements of a set whose name is unchanged). FNV would let crafted
    // CIDRs name another pod's set.
    let mut digest = sha2::Sha256::new();
    for line in &set.spec {
        digest.update(line.as_bytes());
        digest.update(b";");
    }
    for (key, value) in &set.elements {
        digest.update(key.as_bytes());
        digest.update([0]);
        digest.update(value.as_deref().unwrap_or("").as_bytes());
        digest.update(b",");
    }
    let hash = digest.finalize();
    let mut name = format!("{base}-");
    for byte in &hash[..8] {
        let _ = write!(name, "{byte:02x}");
    }
    name
}

/// `set` under its [`content_name`].
fn named_set(base: &str, set: NftSet) -> (String, Arc<NftSet>) {
    (content_name(base, &set), Arc::new(set))
}

/// Puts `set` in the table under its [`content_name`], and returns that name.
fn insert_set(table: &mut NftTable, base: &str, set: NftSet) -> String {
    let (name, set) = named_set(base, set);
    table.sets.insert(name.clone(), set);
    name
}

/// What one isolated direction of one pod renders to: its sets and its chain, and the hash of
/// the chain's rules (the table's hash is made of its parts' hashes, each computed once).
#[derive(Debug)]
pub struct RenderedDirection {
    sets: Vec<(String, Arc<NftSet>)>,
    chain: Arc<NftChain>,
    chain_hash: u64,
}

/// Rendered directions kept from pass to pass, by chain name.
pub type RenderMemo = memo::RenderMemo<RenderedDirection>;

/// Sets and chain of one isolated direction, rendered or kept in `memo`; `prefix` is `i` or
/// `e`. Returns the hash of the chain, its name included.
fn direction(
    table: &mut NftTable,
    memo: &mut RenderMemo,
    prefix: &str,
    ifname: &str,
    d: &Direction,
    log: bool,
) -> u64 {
    let name = format!("{prefix}-{ifname}");
    let rendered = memo.get(&name, d, log, || {
        render_direction(&name, prefix, ifname, d, log)
    });
    for (set_name, set) in &rendered.sets {
        if !table.sets.contains_key(set_name) {
            table.sets.insert(set_name.clone(), set.clone());
        }
    }
    let hash = crate::fnv1a(rendered.chain_hash, name.as_bytes());
    table.chains.insert(name, rendered.chain.clone());
    hash
}

/// The hash of a chain's hook and rules.
fn chain_hash(chain: &NftChain) -> u64 {
    let mut hash = crate::fnv1a(
        crate::FNV_START,
        chain.hook.as_deref().unwrap_or("").as_bytes(),
    );
    for rule in &chain.rules {
        hash = crate::fnv1a(hash, rule.as_bytes());
        hash = crate::fnv1a(hash, b"\n");
    }
    hash
}

/// The sets and chain `name` of one isolated direction.
fn render_direction(
    name: &str,
    prefix: &str,
    ifname: &str,
    d: &Direction,
    log: bool,
) -> RenderedDirection {
    let (field, allow) = if prefix == "i" {
        ("saddr", "accept")
    } else {
        ("daddr", "return")
    };
    let mut sets = Vec::new();
    let mut rules = Vec::new();
    // A rate-limited log stops matching over its rate: it is a rule of its own before the drop.
    let drop = |stage: DropStage| -> Vec<String> {
        if log {
            vec![
                droplog::nft_log(drop_direction(prefix), stage, Some(ifname)),
                "drop".into(),
            ]
        } else {
            vec!["drop".into()]
        }
    };
    let allow_v = [allow.to_string()];
    // Admin tier: one lookup per set, before NetworkPolicy.
    let admin = &d.admin;
    region_rules(
        &mut sets,
        &mut rules,
        &tier_sets(prefix, "ad", admin),
        field,
        &admin.deny,
        &drop(DropStage::Admin),
    );
    region_rules(
        &mut sets,
        &mut rules,
        &tier_sets(prefix, "aa", admin),
        field,
        &admin.accept,
        &allow_v,
    );
    if d.isolated {
        if d.all_ports.is_all() {
            rules.push(allow.to_string());
        } else {
            for family in Family::BOTH {
                let all = d.all_ports.only(family);
                if all.is_empty() {
                    continue;
                }
                let (kind, kw, sfx) = nft_family(family);
                // Named by its contents alone, like the tiers' sets: the pods whose policies
                // allow the same peers on every port (often only the node) share one set,
                // and every set of the table is one more that each `nft -f` loads first.
                let set = named_set(
                    &format!("{prefix}-all{sfx}"),
                    interval_set(kind, addr_elements(&all)),
                );
                rules.push(format!("{kw} {field} @{} {allow}", set.0));
                sets.push(set);
            }
        }
        for family in Family::BOTH {
            let ports = d.ports_of(family);
            if ports.is_empty() {
                continue;
            }
            let (kind, kw, sfx) = nft_family(family);
            let set = named_set(
                &format!("{name}-ports{sfx}"),
                interval_set(
                    &format!("{kind} . inet_proto . inet_service"),
                    port_elements(&ports),
                ),
            );
            rules.push(format!(
                "{kw} {field} . meta l4proto . th dport @{} {allow}",
                set.0
            ));
            sets.push(set);
        }
        rules.extend(drop(DropStage::NetworkPolicy));
    } else {
        // No NetworkPolicy isolates: the Baseline tier decides, else allow.
        let base = &d.baseline;
        region_rules(
            &mut sets,
            &mut rules,
            &tier_sets(prefix, "bd", base),
            field,
            &base.deny,
            &drop(DropStage::Baseline),
        );
        rules.push(allow.to_string());
    }
    let chain = NftChain { hook: None, rules };
    RenderedDirection {
        sets,
        chain_hash: chain_hash(&chain),
        chain: Arc::new(chain),
    }
}

/// Base name of the tiers' sets of a verdict decided for no group: named by their contents
/// alone, so that a region several pods share is one set in the table, made once.
const TIER_SETS: &str = "t";

/// The first characters of a set named after its role, not its contents: its elements are
/// compared and rewritten in place by [`delta`], and hashed into the table's hash.
const GROUP_SETS: &str = "g-";

/// How the sets of one region of a tier's verdict are named (`stage`: `ad` Admin deny, `aa`
/// Admin accept, `bd` Baseline deny): after the group of pods it was decided for and the
/// revision of its policies ([`TierVerdict::group`], [`TierVerdict::revision`]), so that a
/// peer that comes or goes rewrites what the group's sets hold and none of the rules of its
/// pods' chains (a thousand pods selected alike name the same sets: a new pod's pass writes
/// 93 KB instead of 812 KB, `nft -f` 58 ms instead of 385 at bench-policy's scale), while a
/// changed policy makes new sets: an element command makes `nft` load the elements of every
/// set of the table first, about 20 ms more than a new set and the chains of a small group.
/// By contents for a verdict of no group.
enum TierSets {
    Group(String),
    Contents,
}

fn tier_sets(prefix: &str, stage: &str, verdict: &TierVerdict) -> TierSets {
    if verdict.group == 0 {
        TierSets::Contents
    } else {
        TierSets::Group(format!(
            "{GROUP_SETS}{prefix}{stage}-{:012x}-{:08x}",
            verdict.group >> 16,
            verdict.revision >> 32
        ))
    }
}

/// The rules (and sets) that give `verdict` to `region`: at most three lookups, whatever the
/// number of ClusterNetworkPolicies behind it.
fn region_rules(
    sets: &mut Vec<(String, Arc<NftSet>)>,
    rules: &mut Vec<String>,
    naming: &TierSets,
    field: &str,
    region: &Region,
    verdicts: &[String],
) {
    if region.is_empty() {
        return;
    }
    let (all, ports, other) = region.split();
    let named = |part: &str, set: NftSet| match naming {
        TierSets::Group(base) => (format!("{base}-{part}"), Arc::new(set)),
        TierSets::Contents => named_set(&format!("{TIER_SETS}-{part}"), set),
    };
    let push = |rules: &mut Vec<String>, m: String| {
        for v in verdicts {
            rules.push(if m.is_empty() {
                v.clone()
            } else {
                format!("{m} {v}")
            });
        }
    };
    if all.is_all() {
        push(rules, String::new());
        return;
    }
    for family in Family::BOTH {
        let (kind, kw, sfx) = nft_family(family);
        let all = all.only(family);
        if !all.is_empty() {
            let set = named(
                &format!("all{sfx}"),
                interval_set(kind, addr_elements(&all)),
            );
            push(rules, format!("{kw} {field} @{}", set.0));
            sets.push(set);
        }
        let ports: Vec<PortEntry> = ports
            .iter()
            .filter(|e| e.addrs.has(family))
            .map(|e| PortEntry {
                addrs: e.addrs.only(family),
                ..e.clone()
            })
            .collect();
        if !ports.is_empty() {
            let set = named(
                &format!("ports{sfx}"),
                interval_set(
                    &format!("{kind} . inet_proto . inet_service"),
                    port_elements(&ports),
                ),
            );
            push(
                rules,
                format!("{kw} {field} . meta l4proto . th dport @{}", set.0),
            );
            sets.push(set);
        }
        let other = other.only(family);
        if !other.is_empty() {
            let set = named(
                &format!("other{sfx}"),
                interval_set(kind, addr_elements(&other)),
            );
            push(
                rules,
                format!(
                    "meta l4proto != {{ tcp, udp, sctp }} {kw} {field} @{}",
                    set.0
                ),
            );
            sets.push(set);
        }
    }
}

fn drop_direction(prefix: &str) -> DropDirection {
    if prefix == "i" {
        DropDirection::Ingress
    } else {
        DropDirection::Egress
    }
}

/// The set and maps the base chains name, by their [`content_name`]s.
struct Shared {
    isolated: String,
    /// When some local pod has an IPv6 address.
    isolated6: Option<String>,
    ingress_pods: String,
    egress_pods: String,
}

/// IPv6 neighbour discovery (solicitation, advertisement): a pod answers its node's and asks
/// for its gateway's whatever its policy, as ARP does for IPv4.
const NEIGHBOUR_DISCOVERY: &str = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept";

/// Puts the base chains and the dispatch chains in `table`; returns their hash.
fn base_chains(table: &mut NftTable, log: bool, shared: &Shared) -> u64 {
    let p = crate::LINK_PREFIX;
    let chain = |hook: Option<&str>, rules: Vec<String>| NftChain {
        hook: hook.map(|h| format!("type filter hook {h} priority filter; policy accept;")),
        rules,
    };
    let not_syn = |field: &str| {
        let mut v = vec![format!("{NOT_SYN} ip {field} @{} drop", shared.isolated)];
        if let Some(six) = &shared.isolated6 {
            v.push(format!("{NOT_SYN} ip6 {field} @{six} drop"));
        }
        v
    };
    let ingress_map = format!("oifname vmap @{}", shared.ingress_pods);
    let egress_map = format!("iifname vmap @{}", shared.egress_pods);
    let unknown = |field: &str, d: DropDirection| {
        let log = if log {
            format!("{} ", droplog::nft_log(d, DropStage::NetworkPolicy, None))
        } else {
            String::new()
        };
        format!("{field} \"{p}*\" {log}drop")
    };
    let to_pods = unknown("oifname", DropDirection::Ingress);
    let from_pods = unknown("iifname", DropDirection::Egress);
    let head = |nd: bool| {
        let mut v: Vec<String> = vec![
            "ct state established,related accept".into(),
            "ct state invalid drop".into(),
        ];
        if nd && shared.isolated6.is_some() {
            v.push(NEIGHBOUR_DISCOVERY.into());
        }
        v
    };
    let mut forward = head(false);
    forward.extend(not_syn("saddr"));
    forward.extend(not_syn("daddr"));
    forward.extend(["jump egress".to_string(), "jump ingress".to_string()]);
    let mut input = head(true);
    input.extend(not_syn("saddr"));
    input.push("jump egress".into());
    let mut hash = crate::FNV_START;
    for (name, c) in [
        (
            "ingress",
            chain(
                None,
                vec![ingress_map, "oifname \"sluice*\" return".into(), to_pods],
            ),
        ),
        (
            "egress",
            chain(
                None,
                vec![egress_map, "iifname \"sluice*\" return".into(), from_pods],
            ),
        ),
        ("forward", chain(Some("forward"), forward)),
        ("input", chain(Some("input"), input)),
    ] {
        hash = crate::fnv1a(hash, name.as_bytes());
        hash = crate::fnv1a(hash, &chain_hash(&c).to_le_bytes());
        table.chains.insert(name.to_string(), Arc::new(c));
    }
    hash
}

/// The hash of the table: of its sets by name and declaration (the names carry their
/// contents; a group's sets, whose names do not, by their elements too), of its pods' chains
/// (`pod_chains`, summed from their kept hashes) and of its base chains (`base`): a change of
/// any rule or set changes it, and no pass reads every rule again.
fn table_hash(table: &NftTable, pod_chains: u64, base: u64) -> u64 {
    let mut hash = crate::FNV_START;
    for (name, set) in &table.sets {
        hash = crate::fnv1a(hash, set.keyword.as_bytes());
        hash = crate::fnv1a(hash, name.as_bytes());
        for line in &set.spec {
            hash = crate::fnv1a(hash, line.as_bytes());
        }
        // The name of a group's set does not say what it holds.
        if name.starts_with(GROUP_SETS) {
            for (key, value) in &set.elements {
                hash = crate::fnv1a(hash, key.as_bytes());
                hash = crate::fnv1a(hash, value.as_deref().unwrap_or("").as_bytes());
                hash = crate::fnv1a(hash, b",");
            }
        }
        hash = crate::fnv1a(hash, b";");
    }
    hash = crate::fnv1a(hash, &pod_chains.to_le_bytes());
    crate::fnv1a(hash, &base.to_le_bytes())
}

/// The desired table for `ir`, and its full transaction.
pub fn render(ir: &PolicyIr) -> NftScript {
    render_with(ir, &mut RenderMemo::default())
}

/// [`render`], reusing what `memo` kept of the last pass.
pub fn render_with(ir: &PolicyIr, memo: &mut RenderMemo) -> NftScript {
    memo.begin_pass();
    let mut table = NftTable::default();
    let mut maps = [BTreeMap::new(), BTreeMap::new()];
    // The pods' chains' hashes, summed: each chain once, in any order.
    let mut pod_chains = 0u64;
    for pod in &ir.pods {
        for (i, (prefix, d)) in [("i", &pod.ingress), ("e", &pod.egress)]
            .into_iter()
            .enumerate()
        {
            let verdict = if d.enforced() {
                let h = direction(&mut table, memo, prefix, &pod.ifname, d, ir.log_drops);
                pod_chains = pod_chains.wrapping_add(h);
                format!("goto {prefix}-{}", pod.ifname)
            } else {
                "return".to_string()
            };
            maps[i].insert(format!("\"{}\"", pod.ifname), Some(verdict));
        }
    }
    memo.end_pass();
    let isolated = AddrSet::from_addrs(
        ir.pods
            .iter()
            .filter(|p| p.ingress.enforced() || p.egress.enforced())
            .flat_map(|p| p.ips.iter().copied()),
    );
    let isolated6 = ir.has(Family::V6).then(|| {
        insert_set(
            &mut table,
            "isolated6",
            interval_set("ipv6_addr", addr_elements(&isolated.only(Family::V6))),
        )
    });
    let isolated = insert_set(
        &mut table,
        "isolated",
        interval_set("ipv4_addr", addr_elements(&isolated.only(Family::V4))),
    );
    let [ingress_pods, egress_pods] = maps.map(|elements| NftSet {
        keyword: "map",
        spec: vec!["type ifname : verdict".into()],
        elements,
    });
    let shared = Shared {
        isolated,
        isolated6,
        ingress_pods: insert_set(&mut table, "ingress-pods", ingress_pods),
        egress_pods: insert_set(&mut table, "egress-pods", egress_pods),
    };
    let base = base_chains(&mut table, ir.log_drops, &shared);
    let hash = format!("{:016x}", table_hash(&table, pod_chains, base));
    NftScript {
        table: Arc::new(table),
        hash,
    }
}

fn element_text(key: &str, value: &Option<String>) -> String {
    match value {
        Some(v) => format!("{key} : {v}"),
        None => key.to_string(),
    }
}

/// A set's elements in nft's syntax, joined by `separator`.
fn elements_text(set: &NftSet, separator: &str) -> String {
    let items: Vec<String> = set
        .elements
        .iter()
        .map(|(k, v)| element_text(k, v))
        .collect();
    items.join(separator)
}

/// `table inet sluice-policy { … }`: sets, then maps, then chains (a verdict map's `goto`
/// and a rule's `@set` may name what comes later in the same block).
fn table_text(table: &NftTable, hash: &str) -> String {
    let mut t = format!("table inet {TABLE} {{\n");
    for keyword in ["set", "map"] {
        for (name, set) in table.sets.iter().filter(|(_, s)| s.keyword == keyword) {
            let _ = writeln!(t, "\t{keyword} {name} {{");
            for line in &set.spec {
                let _ = writeln!(t, "\t\t{line}");
            }
            if !set.elements.is_empty() {
                let items = elements_text(set, ",\n\t\t\t     ");
                let _ = writeln!(t, "\t\telements = {{ {items} }}");
            }
            t.push_str("\t}\n");
        }
    }
    let state = Arc::new(NftChain {
        hook: None,
        rules: vec![state_rule(hash)],
    });
    let state_name = STATE_CHAIN.to_string();
    let chains = table
        .chains
        .iter()
        .filter(|(_, c)| c.hook.is_none())
        .chain(table.chains.iter().filter(|(_, c)| c.hook.is_some()))
        .chain(std::iter::once((&state_name, &state)));
    for (name, chain) in chains {
        let _ = writeln!(t, "\tchain {name} {{");
        if let Some(hook) = &chain.hook {
            let _ = writeln!(t, "\t\t{hook}");
        }
        for rule in &chain.rules {
            let _ = writeln!(t, "\t\t{rule}");
        }
        t.push_str("\t}\n");
    }
    t.push_str("}\n");
    t
}

/// The transaction that turns `old` (what the kernel holds, as sluice last wrote it) into
/// `new`, touching only what differs: sets and maps made whole or deleted (their names carry
/// their contents, so a changed one is a new one; a group's set is flushed and refilled), the
/// rules of a changed chain written again, chains made or deleted, in an order nft accepts
/// within one transaction (what a rule or a map names exists before and is unused after).
/// `None` when the difference reaches what only a full replace may change (a base chain's
/// hook, a set whose name no longer says what it holds).
pub fn delta(old: &NftTable, new: &NftTable, hash: &str) -> Option<String> {
    let t = format!("inet {TABLE}");
    let mut sets = String::new();
    let mut chains = String::new();
    let mut maps = String::new();
    let mut rules = String::new();
    for (name, set) in &new.sets {
        match old.sets.get(name) {
            Some(o) if Arc::ptr_eq(o, set) => continue,
            // A group's set: the same set, holding what it holds now (one transaction: a
            // packet sees the old elements or the new ones).
            Some(o)
                if name.starts_with(GROUP_SETS)
                    && o.keyword == set.keyword
                    && o.spec == set.spec =>
            {
                if o.elements != set.elements {
                    let _ = writeln!(sets, "flush {} {t} {name}", set.keyword);
                    if !set.elements.is_empty() {
                        let items = elements_text(set, ", ");
                        let _ = writeln!(sets, "add element {t} {name} {{ {items} }}");
                    }
                }
                continue;
            }
            // Any other name says what a set holds: its elements need no comparing.
            Some(o) if o.keyword == set.keyword && o.spec == set.spec => continue,
            Some(_) => return None,
            None => {
                // A map's elements may name chains made in this transaction: maps go after them.
                let out = if set.keyword == "map" {
                    &mut maps
                } else {
                    &mut sets
                };
                let _ = write!(out, "add {} {t} {name} {{ ", set.keyword);
                for line in &set.spec {
                    let _ = write!(out, "{line}; ");
                }
                if !set.elements.is_empty() {
                    let items = elements_text(set, ", ");
                    let _ = write!(out, "elements = {{ {items} }}; ");
                }
                out.push_str("}\n");
            }
        }
    }
    for (name, chain) in &new.chains {
        match old.chains.get(name) {
            Some(o) if o.hook != chain.hook => return None,
            Some(o) if Arc::ptr_eq(o, chain) || o.rules == chain.rules => continue,
            Some(_) => {
                let _ = writeln!(rules, "flush chain {t} {name}");
            }
            None if chain.hook.is_some() => return None,
            None => {
                let _ = writeln!(chains, "add chain {t} {name}");
            }
        }
        for rule in &chain.rules {
            let _ = writeln!(rules, "add rule {t} {name} {rule}");
        }
    }
    let mut drops = String::new();
    let gone_sets = |keyword: &'static str| {
        old.sets
            .iter()
            .filter(move |(n, s)| s.keyword == keyword && !new.sets.contains_key(*n))
            .map(|(n, _)| n)
    };
    // Maps first: their elements name the chains that go next, whose rules name the sets.
    for name in gone_sets("map") {
        let _ = writeln!(drops, "delete map {t} {name}");
    }
    for (name, chain) in &old.chains {
        if !new.chains.contains_key(name) {
            if chain.hook.is_some() {
                return None;
            }
            let _ = writeln!(drops, "flush chain {t} {name}\ndelete chain {t} {name}");
        }
    }
    for name in gone_sets("set") {
        let _ = writeln!(drops, "delete set {t} {name}");
    }
    let _ = writeln!(
        drops,
        "flush chain {t} {STATE_CHAIN}\nadd rule {t} {STATE_CHAIN} {}",
        state_rule(hash)
    );
    Some(format!("{sets}{chains}{maps}{rules}{drops}"))
}

/// The script that removes sluice's table (and is harmless when it is absent).
pub fn render_remove() -> String {
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// The hash sluice's table carries, from `nft -j list chain inet sluice-policy state`.
pub fn parse_observed(json: &str) -> Result<Option<String>, FirewallError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(FirewallError::Json)?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    Ok(items.iter().find_map(|item| {
        let rule = &item["rule"];
        (rule["table"] == TABLE && rule["chain"] == STATE_CHAIN)
            .then(|| {
                rule["comment"]
                    .as_str()?
                    .strip_prefix(HASH_MARK)
                    .map(str::to_string)
            })
            .flatten()
    }))
}

/// A table as written, and its hash.
type Written = (String, Arc<NftTable>);

/// The policy table through the `nft` binary.
#[derive(Debug, Clone)]
pub struct NftCli {
    pub exec: Exec,
    pub program: String,
    /// The table as this process last wrote it, and its hash: when the kernel still carries
    /// that hash, the next change is written as a [`delta`].
    last: Arc<Mutex<Option<Written>>>,
    memo: Arc<Mutex<RenderMemo>>,
}

impl NftCli {
    pub fn new(exec: Exec) -> Self {
        Self {
            exec,
            program: "nft".into(),
            last: Arc::default(),
            memo: Arc::default(),
        }
    }

    /// Whether nftables works here: the binary runs and the kernel answers.
    pub fn works(&self) -> bool {
        self.exec
            .run(&self.program, &["list", "tables"], None)
            .is_ok_and(|o| o.status.success())
    }

    /// The table's hash as `nft` lists it (when netlink cannot be used).
    fn observe_with_nft(&self) -> Result<Observed, FirewallError> {
        let out = self.exec.run(
            &self.program,
            &["-j", "list", "chain", "inet", TABLE, STATE_CHAIN],
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

    pub(crate) fn script(&self, text: &str) -> Result<(), FirewallError> {
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

    fn render(&self, ir: &PolicyIr) -> Rendered {
        let mut memo = self.memo.lock().unwrap_or_else(|p| p.into_inner());
        Rendered::Nft(render_with(ir, &mut memo))
    }

    fn observe(&self) -> Result<Observed, FirewallError> {
        let plain =
            self.program == "nft" && (self.exec.wrapper.is_empty() || self.exec.netns().is_some());
        if plain {
            match observe::state_hash(self.exec.netns()) {
                Ok(hash) => return Ok(Observed { hash }),
                Err(e) => {
                    tracing::debug!(error = %e, "reading the policy table's hash over netlink failed; asking nft")
                }
            }
        }
        self.observe_with_nft()
    }

    fn apply(&self, desired: &Rendered) -> Result<Applied, FirewallError> {
        let Rendered::Nft(script) = desired else {
            return Err(FirewallError::WrongBackend {
                want: Backend::Nftables,
            });
        };
        let observed = self.observe()?.hash;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if observed.as_deref() == Some(script.hash.as_str()) {
            if last.as_ref().is_none_or(|(h, _)| *h != script.hash) {
                *last = Some((script.hash.clone(), script.table.clone()));
            }
            return Ok(Applied {
                written: false,
                incremental: false,
            });
        }
        let delta_text = last
            .as_ref()
            .filter(|(h, _)| observed.as_deref() == Some(h.as_str()))
            .and_then(|(_, table)| delta(table, &script.table, &script.hash));
        // Whatever happens below, the kernel may no longer hold what `last` says.
        let previous = last.take();
        let mut written_as_delta = false;
        if let Some(text) = delta_text {
            match self.script(&text) {
                Ok(()) => written_as_delta = true,
                // The transaction is atomic: nothing of it stayed; the whole table goes in.
                Err(e) => {
                    tracing::warn!(error = %e, "nftables policy delta refused; replacing the table")
                }
            }
            if written_as_delta {
                tracing::info!(hash = %script.hash, from = previous.as_ref().map(|(h, _)| h.as_str()).unwrap_or(""), commands = text.lines().count(), "nftables policy changed");
            }
        }
        if !written_as_delta {
            let text = script.text();
            self.script(&text)?;
            tracing::info!(hash = %script.hash, bytes = text.len(), "nftables policy table replaced");
        }
        *last = Some((script.hash.clone(), script.table.clone()));
        Ok(Applied {
            written: true,
            incremental: written_as_delta,
        })
    }

    fn remove(&self) -> Result<(), FirewallError> {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.script(&render_remove())
    }
}

#[cfg(test)]
pub(crate) mod tests;
