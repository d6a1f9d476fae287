//! Masquerade of pod traffic leaving the cluster CIDR (the `masquerade` key), pod-to-pod never
//! NATed. The rules are plain data ([`plan`]); [`render`] turns them into one nftables
//! transaction on sluice's own table `ip sluice-nat` (nobody else's table is touched, and
//! nothing is flushed but it); [`diff`] compares the rules' hash comments with what `nft -j`
//! shows, so an unchanged table is not rewritten and a rule deleted by hand comes back.

use ipnet::Ipv4Net;
use std::process::Stdio;
use tokio::io::AsyncWriteExt;

/// sluice's NAT table (DESIGN.md: what sluice owns is recognisable by its nftables table).
pub const NAT_TABLE: &str = "sluice-nat";
const CHAIN: &str = "postrouting";
const MULTICAST: &str = "224.0.0.0/4";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Leave the packet's source alone.
    Return,
    /// Source-NAT to the outgoing interface's address.
    Masquerade,
}

/// One postrouting rule: `ip saddr SADDR [ip daddr DADDR] VERDICT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    pub saddr: Ipv4Net,
    pub daddr: Option<Ipv4Net>,
    pub verdict: Verdict,
}

/// The NAT the node wants: no rules (and no table) when masquerade is off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasqPlan {
    pub rules: Vec<NatRule>,
}

/// Pods' traffic to the cluster CIDR (other pods, wherever they are) and to multicast keeps its
/// source; everything else from the cluster CIDR is masqueraded.
pub fn plan(cluster_cidr: Ipv4Net, enabled: bool) -> MasqPlan {
    if !enabled {
        return MasqPlan { rules: Vec::new() };
    }
    let multicast: Ipv4Net = MULTICAST.parse().unwrap_or(cluster_cidr);
    MasqPlan {
        rules: vec![
            NatRule {
                saddr: cluster_cidr,
                daddr: Some(cluster_cidr),
                verdict: Verdict::Return,
            },
            NatRule {
                saddr: cluster_cidr,
                daddr: Some(multicast),
                verdict: Verdict::Return,
            },
            NatRule {
                saddr: cluster_cidr,
                daddr: None,
                verdict: Verdict::Masquerade,
            },
        ],
    }
}

fn rule_body(rule: &NatRule) -> String {
    let mut s = format!("ip saddr {}", rule.saddr);
    if let Some(d) = rule.daddr {
        s.push_str(&format!(" ip daddr {d}"));
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

/// The comments the plan's rules carry, in order.
pub fn comments(plan: &MasqPlan) -> Vec<String> {
    plan.rules
        .iter()
        .enumerate()
        .map(|(i, r)| rule_comment(i, &rule_body(r)))
        .collect()
}

/// The whole transaction for `nft -f -`: sluice's table is (re)made from scratch, or removed
/// when the plan has no rules. Creating it first makes the delete safe when it is absent.
pub fn render(plan: &MasqPlan) -> String {
    let mut s = format!("table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\n");
    if plan.rules.is_empty() {
        return s;
    }
    s.push_str(&format!(
        "table ip {NAT_TABLE} {{\n\tchain {CHAIN} {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
    ));
    for (rule, comment) in plan.rules.iter().zip(comments(plan)) {
        s.push_str(&format!("\t\t{} comment \"{comment}\"\n", rule_body(rule)));
    }
    s.push_str("\t}\n}\n");
    s
}

/// sluice's NAT table as `nft -j list table` shows it: the comments of its chain's rules in
/// order, or `None` when there is no table. Rules without a comment show as empty strings.
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
        if rule["table"] == NAT_TABLE && rule["chain"] == CHAIN {
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

    /// The comments of sluice's NAT rules, or `None` when the table is absent.
    pub async fn observe(&self) -> Result<Option<Vec<String>>, MasqError> {
        let out = self
            .run(&["-j", "list", "table", "ip", NAT_TABLE], None)
            .await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if stderr.contains("No such file or directory") {
                return Ok(None);
            }
            return Err(MasqError::Nft { op: "list", stderr });
        }
        parse_observed(&String::from_utf8_lossy(&out.stdout))
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
        tracing::info!(rules = plan.rules.len(), "masquerade table synced");
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

    #[test]
    fn the_rendered_table_is_golden() {
        let script = render(&plan(cidr(), true));
        let c = comments(&plan(cidr(), true));
        let want = format!(
            "table ip sluice-nat\ndelete table ip sluice-nat\ntable ip sluice-nat {{\n\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 return comment \"{}\"\n\t\tip saddr 10.244.0.0/16 ip daddr 224.0.0.0/4 return comment \"{}\"\n\t\tip saddr 10.244.0.0/16 masquerade fully-random comment \"{}\"\n\t}}\n}}\n",
            c[0], c[1], c[2]
        );
        assert_eq!(script, want);
        assert!(c[0].starts_with("sluice:0:"));
        assert_ne!(c[0][9..], c[1][9..]);
        assert_eq!(
            render(&plan(cidr(), false)),
            "table ip sluice-nat\ndelete table ip sluice-nat\n"
        );
    }

    #[test]
    fn diff_table() {
        let on = plan(cidr(), true);
        let off = plan(cidr(), false);
        let good = comments(&on);
        let missing = good[..2].to_vec();
        let other = comments(&plan("10.0.0.0/8".parse().unwrap(), true));
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
            {"rule": {"family": "ip", "table": "sluice-nat", "chain": "postrouting", "handle": 3, "expr": []}}]}"#;
        assert_eq!(
            parse_observed(json).unwrap(),
            Some(vec!["sluice:0:ab".to_string(), String::new()])
        );
        assert_eq!(parse_observed(r#"{"nftables": []}"#).unwrap(), None);
        assert!(parse_observed("not json").is_err());
    }
}
