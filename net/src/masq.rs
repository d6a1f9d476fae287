//! The node's own address translation and connection tracking rules: masquerade of pod traffic
//! leaving the cluster CIDR (the `masquerade` key), pod-to-pod never NATed, and the node's VXLAN
//! packets kept out of conntrack. The rules are plain data ([`plan`]); [`render`] turns them
//! into one nftables transaction on sluice's own table `ip sluice-nat` (nobody else's table is
//! touched, and nothing is flushed but it); [`diff`] compares the rules' hash comments with what
//! `nft -j` shows, so an unchanged table is not rewritten and a rule deleted by hand comes back.
//!
//! A dual-stack node ([`MasqPlan::with_ipv6`]) has the IPv6 counterparts (pod traffic leaving the
//! IPv6 cluster CIDR masqueraded, the MSS clamp) in the table of the same name in family `ip6`,
//! written in the same transaction; it is removed with the IPv4 one, and when IPv6 is off. An
//! IPv6-only node ([`plan_ipv6_only`]) has only those, and its VXLAN (over an IPv6 underlay)
//! is left untracked in the `ip6` table as an IPv4 underlay's is in the `ip` one.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::net::IpAddr;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// sluice's NAT table (DESIGN.md: what sluice owns is recognisable by its nftables table).
pub const NAT_TABLE: &str = "sluice-nat";
const NAT_CHAIN: &str = "postrouting";
const RAW_PREROUTING: &str = "raw-prerouting";
const RAW_OUTPUT: &str = "raw-output";
const MSS_CHAIN: &str = "mss-clamp";
const MULTICAST: &str = "224.0.0.0/4";
const MULTICAST_V6: &str = "ff00::/8";

/// The two table families sluice's NAT table is written in.
const FAMILIES: [&str; 2] = ["ip", "ip6"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the packet's source alone.
    Return,
    /// Source-NAT to the outgoing interface's address.
    Masquerade,
}

/// One postrouting rule: `ip saddr SADDR [ip daddr DADDR] VERDICT` (`ip6` for IPv6; `daddr`
/// is of `saddr`'s family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    pub saddr: IpNet,
    pub daddr: Option<IpNet>,
    pub verdict: Verdict,
}

fn family_of(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "ip",
        IpNet::V6(_) => "ip6",
    }
}

/// The node's VXLAN packets (UDP to `port`, from or to the node's `underlay_ip`), which
/// conntrack is told to leave alone.
///
/// A VXLAN sender picks its UDP source port from a hash of the inner flow, and both ends send
/// to the same port, so conntrack never sees a reply: every inner flow leaves an UNREPLIED
/// entry per direction on both nodes, filling the table that kube-proxy's NAT and policy need
/// (Calico, Antrea and OpenShift SDN all stopped tracking these packets for that reason), and
/// every encapsulated packet pays two lookups per node. Nothing needs their state: masquerade
/// only rewrites pod sources, and policy acts on the inner packets, which the kernel tracks
/// afresh once they are decapsulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UntrackedTunnel {
    /// Of either family: the exemption is written in the table of its family.
    pub underlay_ip: IpAddr,
    pub port: u16,
}

/// The table the node wants: no rules (and no table) when masquerade is off and no tunnel is
/// to be left untracked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqPlan {
    pub rules: Vec<NatRule>,
    pub untracked: Option<UntrackedTunnel>,
    /// Pod traffic (to or from this range) whose TCP handshakes get their MSS clamped to the
    /// MTU of the route they take. Pods keep the MTU they were made with when `overlay` or
    /// `encryption` changes live; without the clamp a pod made under `overlay: never` (the
    /// underlay's full MTU) would open connections whose segments no longer fit a tunnel. Only
    /// ever lowers an MSS, and costs nothing past the SYNs.
    pub mss_clamp: Vec<IpNet>,
}

impl MasqPlan {
    /// Clamps the MSS of pod traffic to or from `pods` (called once per family).
    pub fn with_mss_clamp(mut self, pods: impl Into<IpNet>) -> Self {
        self.mss_clamp.push(pods.into());
        self
    }

    /// A dual-stack node: its pods' IPv6 traffic leaving `cluster_v6` masqueraded too (when
    /// masquerade is on, as for IPv4: to other pods and to multicast it keeps its source).
    pub fn with_ipv6(mut self, cluster_v6: Ipv6Net, enabled: bool) -> Self {
        if enabled {
            self.rules.extend(pod_rules(
                cluster_v6.into(),
                MULTICAST_V6.parse().unwrap_or(cluster_v6.into()),
            ));
        }
        self
    }
}

/// Pod traffic from `cluster` to `cluster` and to `multicast` returns; the rest is masqueraded.
fn pod_rules(cluster: IpNet, multicast: IpNet) -> [NatRule; 3] {
    [
        NatRule {
            saddr: cluster,
            daddr: Some(cluster),
            verdict: Verdict::Return,
        },
        NatRule {
            saddr: cluster,
            daddr: Some(multicast),
            verdict: Verdict::Return,
        },
        NatRule {
            saddr: cluster,
            daddr: None,
            verdict: Verdict::Masquerade,
        },
    ]
}

/// Pods' traffic to the cluster CIDR (other pods, wherever they are) and to multicast keeps its
/// source; everything else from the cluster CIDR is masqueraded.
/// `untracked` is the node's VXLAN, when it has one.
pub fn plan(cluster_cidr: Ipv4Net, enabled: bool, untracked: Option<UntrackedTunnel>) -> MasqPlan {
    if !enabled {
        return MasqPlan {
            rules: Vec::new(),
            untracked,
            mss_clamp: Vec::new(),
        };
    }
    let multicast: Ipv4Net = MULTICAST.parse().unwrap_or(cluster_cidr);
    MasqPlan {
        untracked,
        mss_clamp: Vec::new(),
        rules: pod_rules(cluster_cidr.into(), multicast.into()).to_vec(),
    }
}

/// An IPv6-only node: its pods' traffic leaving `cluster_v6` masqueraded (when `enabled`),
/// and its VXLAN packets untracked.
pub fn plan_ipv6_only(
    cluster_v6: Ipv6Net,
    enabled: bool,
    untracked: Option<UntrackedTunnel>,
) -> MasqPlan {
    MasqPlan {
        rules: Vec::new(),
        untracked,
        mss_clamp: Vec::new(),
    }
    .with_ipv6(cluster_v6, enabled)
}

fn rule_body(rule: &NatRule) -> String {
    let f = family_of(&rule.saddr);
    let mut s = format!("{f} saddr {}", rule.saddr);
    if let Some(d) = rule.daddr {
        s.push_str(&format!(" {f} daddr {d}"));
    }
    s.push_str(match rule.verdict {
        Verdict::Return => " return",
        Verdict::Masquerade => " masquerade fully-random",
    });
    s
}

/// The comment that marks rule `i` of the plan: its position and a hash of its text.
fn rule_comment(i: usize, body: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("sluice:{i}:{hash:016x}")
}

/// The chains of the table in `family` (`ip` or `ip6`) as (name, declaration, rule bodies),
/// in the order they are written and listed; a chain without rules is left out.
fn chains(plan: &MasqPlan, family: &str) -> Vec<(&'static str, &'static str, Vec<String>)> {
    let mut out = Vec::new();
    let rules: Vec<String> = plan
        .rules
        .iter()
        .filter(|r| family_of(&r.saddr) == family)
        .map(rule_body)
        .collect();
    if !rules.is_empty() {
        out.push((
            NAT_CHAIN,
            "type nat hook postrouting priority srcnat; policy accept;",
            rules,
        ));
    }
    for pods in plan.mss_clamp.iter().filter(|p| family_of(p) == family) {
        let clamp = "tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu";
        out.push((
            MSS_CHAIN,
            "type filter hook forward priority mangle; policy accept;",
            vec![
                format!("{family} saddr {pods} {clamp}"),
                format!("{family} daddr {pods} {clamp}"),
            ],
        ));
    }
    let tunnel_family = |ip: IpAddr| if ip.is_ipv4() { "ip" } else { "ip6" };
    if let Some(t) = plan
        .untracked
        .filter(|t| tunnel_family(t.underlay_ip) == family)
    {
        let (ip, port) = (t.underlay_ip, t.port);
        out.push((
            RAW_PREROUTING,
            "type filter hook prerouting priority raw; policy accept;",
            vec![format!("{family} daddr {ip} udp dport {port} notrack")],
        ));
        out.push((
            RAW_OUTPUT,
            "type filter hook output priority raw; policy accept;",
            vec![format!("{family} saddr {ip} udp dport {port} notrack")],
        ));
    }
    out
}

/// The comments the plan's rules carry, in order (chain by chain).
pub fn comments(plan: &MasqPlan) -> Vec<String> {
    FAMILIES
        .iter()
        .flat_map(|f| chains(plan, f))
        .flat_map(|(_, _, bodies)| bodies)
        .enumerate()
        .map(|(i, body)| rule_comment(i, &body))
        .collect()
}

/// The whole transaction for `nft -f -`: sluice's table is (re)made from scratch, or removed
/// when the plan has no rules. Creating it first makes the delete safe when it is absent.
pub fn render(plan: &MasqPlan) -> String {
    let mut s = String::new();
    for f in FAMILIES {
        s.push_str(&format!(
            "table {f} {NAT_TABLE}\ndelete table {f} {NAT_TABLE}\n"
        ));
    }
    let mut i = 0;
    for f in FAMILIES {
        let chains = chains(plan, f);
        if chains.is_empty() {
            continue;
        }
        s.push_str(&format!("table {f} {NAT_TABLE} {{\n"));
        for (name, declaration, bodies) in chains {
            s.push_str(&format!("\tchain {name} {{\n\t\t{declaration}\n"));
            for body in bodies {
                s.push_str(&format!(
                    "\t\t{body} comment \"{}\"\n",
                    rule_comment(i, &body)
                ));
                i += 1;
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
    }
    s
}

/// sluice's table as `nft -j list table` shows it: the comments of its rules in order (chain by
/// chain), or `None` when there is no table. Rules without a comment show as empty strings.
pub fn parse_observed(json: &str) -> Result<Option<Vec<String>>, MasqError> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(MasqError::Json)?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let mut table = false;
    let mut rules = Vec::new();
    for item in items {
        if item["table"]["name"] == NAT_TABLE {
            table = true;
        }
        let rule = &item["rule"];
        if rule["table"] == NAT_TABLE {
            rules.push(rule["comment"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(table.then_some(rules))
}

/// The transaction that makes `observed` what `plan` wants, or `None` when they agree.
pub fn diff(plan: &MasqPlan, observed: Option<&[String]>) -> Option<String> {
    let want = comments(plan);
    let in_sync = match observed {
        None => want.is_empty(),
        Some(have) => !want.is_empty() && have == want.as_slice(),
    };
    (!in_sync).then(|| render(plan))
}

#[derive(Debug, thiserror::Error)]
pub enum MasqError {
    #[error("running {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("nft {op} failed: {stderr}")]
    Nft { op: &'static str, stderr: String },
    #[error("parsing nft's JSON: {0}")]
    Json(#[source] serde_json::Error),
}

/// The NAT table through the `nft` command, in the network namespace of the calling thread.
#[derive(Debug, Clone)]
pub struct NftCli {
    pub program: String,
}

impl Default for NftCli {
    fn default() -> Self {
        Self {
            program: "nft".into(),
        }
    }
}

impl NftCli {
    async fn run(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<std::process::Output, MasqError> {
        let spawn = |source| MasqError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn)?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).await.map_err(spawn)?;
        }
        child.wait_with_output().await.map_err(spawn)
    }

    /// The comments of sluice's NAT rules (the `ip` table's, then the `ip6` one's), or `None`
    /// when neither table is there.
    pub async fn observe(&self) -> Result<Option<Vec<String>>, MasqError> {
        let mut all: Option<Vec<String>> = None;
        for f in FAMILIES {
            let out = self
                .run(&["-j", "list", "table", f, NAT_TABLE], None)
                .await?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                if stderr.contains("No such file or directory") {
                    continue;
                }
                return Err(MasqError::Nft { op: "list", stderr });
            }
            if let Some(rules) = parse_observed(&String::from_utf8_lossy(&out.stdout))? {
                all.get_or_insert_with(Vec::new).extend(rules);
            }
        }
        Ok(all)
    }

    /// Applies a [`render`]ed transaction (atomically: nft applies a file as one).
    pub async fn apply(&self, script: &str) -> Result<(), MasqError> {
        let out = self.run(&["-f", "-"], Some(script)).await?;
        if out.status.success() {
            Ok(())
        } else {
            Err(MasqError::Nft {
                op: "apply",
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            })
        }
    }

    /// Observe, diff, apply; true when something was written.
    pub async fn sync(&self, plan: &MasqPlan) -> Result<bool, MasqError> {
        let observed = self.observe().await?;
        let Some(script) = diff(plan, observed.as_deref()) else {
            return Ok(false);
        };
        self.apply(&script).await?;
        tracing::info!(
            masquerade_rules = plan.rules.len(),
            vxlan_untracked = plan.untracked.is_some(),
            "NAT and conntrack table synced"
        );
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cidr() -> Ipv4Net {
        "10.244.0.0/16".parse().unwrap()
    }

    fn vxlan() -> Option<UntrackedTunnel> {
        Some(UntrackedTunnel {
            underlay_ip: "172.31.0.1".parse().unwrap(),
            port: 8472,
        })
    }

    #[test]
    fn the_rendered_table_is_golden() {
        let script = render(&plan(cidr(), true, None));
        let c = comments(&plan(cidr(), true, None));
        let want = format!(
            "{NONE}table ip sluice-nat {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return comment \"{}\"\n\t\tip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 return comment \"{}\"\n\t\tip saddr 10.244.0.0/16 masquerade fully-random comment \"{}\"\n\t}}\n}}\n",
            c[0], c[1], c[2]
        );
        assert_eq!(script, want);
        assert!(c[0].starts_with("sluice:0:"));
        assert_ne!(c[0][9..], c[1][9..]);
        assert_eq!(render(&plan(cidr(), false, None)), NONE);
    }

    /// The start of every transaction: both families' tables made (so the delete is safe) and
    /// deleted.
    const NONE: &str = "table ip sluice-nat\ndelete table ip sluice-nat\ntable ip6 sluice-nat\ndelete table ip6 sluice-nat\n";

    #[test]
    fn a_dual_stack_node_masquerades_ipv6_leaving_its_cluster_cidr() {
        let v6: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
        let p = plan(cidr(), true, vxlan())
            .with_ipv6(v6, true)
            .with_mss_clamp(cidr())
            .with_mss_clamp(v6);
        let c = comments(&p);
        let script = render(&p);
        // The IPv6 table, after the IPv4 one (whose rules keep their comments' positions).
        let want_tail = format!(
            "table ip6 sluice-nat {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 return comment \"{}\"\n\t\tip6 saddr fd00:10:244::/56 ip6 daddr ff00::/8 return comment \"{}\"\n\t\tip6 saddr fd00:10:244::/56 masquerade fully-random comment \"{}\"\n\t}}\n\tchain mss-clamp {{\n\t\ttype filter hook forward priority mangle; policy accept;\n\t\tip6 saddr fd00:10:244::/56 tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu comment \"{}\"\n\t\tip6 daddr fd00:10:244::/56 tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu comment \"{}\"\n\t}}\n}}\n",
            c[7], c[8], c[9], c[10], c[11]
        );
        assert!(script.ends_with(&want_tail), "{script}");
        assert_eq!(c.len(), 12);
        // The IPv4 table has no IPv6 rule, and the notrack rules stay IPv4.
        let v4_part = &script[..script.find("table ip6 sluice-nat {").unwrap()];
        assert!(!v4_part.contains("fd00"), "{script}");
        // Masquerade off: only the clamp is left in the IPv6 table.
        let off = plan(cidr(), false, None)
            .with_ipv6(v6, false)
            .with_mss_clamp(v6);
        assert!(!render(&off).contains("ip6 saddr fd00:10:244::/56 masquerade"));
        assert_eq!(comments(&off).len(), 2);
        // Turning IPv6 on rewrites the tables; the same plan again does not.
        let v4_only = plan(cidr(), true, vxlan());
        assert_eq!(diff(&p, Some(&comments(&v4_only))), Some(render(&p)));
        assert_eq!(diff(&p, Some(&c)), None);
    }

    #[test]
    fn the_node_vxlan_packets_are_untracked_in_both_directions() {
        let both = plan(cidr(), true, vxlan());
        let c = comments(&both);
        assert_eq!(c.len(), 5);
        let want_tail = format!(
            "\tchain raw-prerouting {{\n\t\ttype filter hook prerouting priority raw; policy accept;\n\t\tip daddr 172.31.0.1 udp dport 8472 notrack comment \"{}\"\n\t}}\n\tchain raw-output {{\n\t\ttype filter hook output priority raw; policy accept;\n\t\tip saddr 172.31.0.1 udp dport 8472 notrack comment \"{}\"\n\t}}\n}}\n",
            c[3], c[4]
        );
        let script = render(&both);
        assert!(script.ends_with(&want_tail), "{script}");
        assert!(script.contains("masquerade fully-random"));
        // Without masquerade the table holds only the conntrack exemption.
        let untracked_only = plan(cidr(), false, vxlan());
        let script = render(&untracked_only);
        assert!(!script.contains("postrouting"), "{script}");
        assert_eq!(comments(&untracked_only).len(), 2);
        assert!(script.contains("udp dport 8472 notrack"));
        // Another port or address is another rule, so the table is rewritten.
        let moved = plan(
            cidr(),
            true,
            Some(UntrackedTunnel {
                underlay_ip: "172.31.0.9".parse().unwrap(),
                port: 8472,
            }),
        );
        assert_eq!(diff(&moved, Some(&c)), Some(render(&moved)));
        assert_eq!(diff(&both, Some(&c)), None);
    }

    #[test]
    fn an_ipv6_only_node_masquerades_and_untracks_in_the_ip6_table_only() {
        let v6: Ipv6Net = "fd00:10:244::/56".parse().unwrap();
        let tunnel = Some(UntrackedTunnel {
            underlay_ip: "fd00:31::1".parse().unwrap(),
            port: 8472,
        });
        let p = plan_ipv6_only(v6, true, tunnel).with_mss_clamp(v6);
        let script = render(&p);
        // Nothing in the IPv4 table: it is only made and removed (the first two lines).
        assert!(!script.contains("table ip sluice-nat {"), "{script}");
        assert!(script.contains("table ip6 sluice-nat {"), "{script}");
        for want in [
            "ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 return",
            "ip6 saddr fd00:10:244::/56 masquerade fully-random",
            "ip6 daddr fd00:31::1 udp dport 8472 notrack",
            "ip6 saddr fd00:31::1 udp dport 8472 notrack",
        ] {
            assert!(script.contains(want), "{want}: {script}");
        }
        assert!(!script.contains("ip daddr"), "{script}");
        // Three NAT rules, two clamp rules, two conntrack exemptions.
        assert_eq!(comments(&p).len(), 7);
        // Masquerade off: only the exemption (and the clamp) stay.
        let off = plan_ipv6_only(v6, false, tunnel);
        let script = render(&off);
        assert!(!script.contains("masquerade"), "{script}");
        assert_eq!(comments(&off).len(), 2);
        // A dual-stack node over an IPv6 underlay untracks its tunnel in ip6 too.
        let dual = plan(cidr(), true, tunnel).with_ipv6(v6, true);
        let script = render(&dual);
        assert!(
            script.contains("ip6 daddr fd00:31::1 udp dport 8472 notrack"),
            "{script}"
        );
    }

    #[test]
    fn pod_handshakes_are_clamped_to_the_path_mtu_both_ways() {
        let p = plan(cidr(), false, None).with_mss_clamp(cidr());
        let script = render(&p);
        assert!(script.contains("chain mss-clamp {"), "{script}");
        assert!(
            script.contains("type filter hook forward priority mangle;"),
            "{script}"
        );
        for dir in ["saddr", "daddr"] {
            assert!(
                script.contains(&format!(
                    "ip {dir} 10.244.0.0/16 tcp flags & (syn | rst) == syn tcp option maxseg size set rt mtu"
                )),
                "{script}"
            );
        }
        // Masquerade off: the clamp alone keeps the table.
        assert_eq!(comments(&p).len(), 2);
        assert!(diff(&p, None).is_some());
    }

    #[test]
    fn diff_table() {
        let on = plan(cidr(), true, None);
        let off = plan(cidr(), false, None);
        let good = comments(&on);
        let missing = good[..2].to_vec();
        let other = comments(&plan("10.0.0.0/8".parse().unwrap(), true, None));
        assert_eq!(diff(&on, Some(&good)), None);
        assert_eq!(diff(&on, None), Some(render(&on)));
        assert_eq!(diff(&on, Some(&missing)), Some(render(&on)));
        assert_eq!(diff(&on, Some(&other)), Some(render(&on)));
        assert_eq!(diff(&off, None), None);
        assert_eq!(diff(&off, Some(&good)), Some(render(&off)));
        assert_eq!(diff(&off, Some(&[])), Some(render(&off)));
    }

    #[test]
    fn observed_rules_come_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"json_schema_version": 1}},
            {"table": {"family": "ip", "name": "sluice-nat", "handle": 1}},
            {"chain": {"family": "ip", "table": "sluice-nat", "name": "postrouting", "handle": 1}},
            {"rule": {"family": "ip", "table": "sluice-nat", "chain": "postrouting", "handle": 2, "comment": "sluice:0:ab", "expr": []}},
            {"rule": {"family": "ip", "table": "sluice-nat", "chain": "postrouting", "handle": 3, "expr": []}},
            {"chain": {"family": "ip", "table": "sluice-nat", "name": "raw-output", "handle": 4}},
            {"rule": {"family": "ip", "table": "sluice-nat", "chain": "raw-output", "handle": 5, "comment": "sluice:2:cd", "expr": []}}]}"#;
        assert_eq!(
            parse_observed(json).unwrap(),
            Some(vec![
                "sluice:0:ab".to_string(),
                String::new(),
                "sluice:2:cd".to_string()
            ])
        );
        assert_eq!(parse_observed(r#"{"nftables": []}"#).unwrap(), None);
        assert!(parse_observed("not json").is_err());
    }
}
