//! `sluice status`: asks the node's agent (its health port, `/status`) what it holds and sees, and
//! prints it as a table or JSON: the answer to "why can't this pod reach that one".

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// `table` or `json`.
    #[arg(short = 'o', long = "output", default_value = "table")]
    pub output: String,
    /// The agent's health address.
    #[arg(long, default_value = "127.0.0.1:9099")]
    pub agent: std::net::SocketAddr,
}

/// A GET over plain HTTP/1.0 on the local health port: no client library for one request.
pub fn get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("is the agent running? connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, body.to_string()))
}

pub fn run(args: &StatusArgs) -> Result<()> {
    let (code, body) = get(args.agent, "/status")?;
    if code != 200 {
        bail!("the agent answered {code}: {body}");
    }
    let doc: serde_json::Value = serde_json::from_str(&body).context("the agent's status")?;
    let (ready_code, ready_body) = get(args.agent, "/readyz")?;
    match args.output.as_str() {
        "json" => {
            let mut doc = doc;
            doc["ready"] = serde_json::json!(ready_code == 200);
            doc["notReadyReasons"] = serde_json::json!(if ready_code == 200 {
                Vec::<&str>::new()
            } else {
                ready_body.lines().collect()
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
        }
        "table" => print_table(&doc, ready_code == 200, &ready_body),
        other => bail!("-o {other}: table or json"),
    }
    Ok(())
}

/// A node's or peer's subnets: `subnet` (IPv4) and `subnetV6`, whichever it has, comma-joined
/// (an IPv6-only node's is its IPv6 one alone).
fn subnets(v: &serde_json::Value) -> String {
    let got: Vec<String> = [&v["subnet"], &v["subnetV6"]]
        .into_iter()
        .filter(|x| !x.is_null())
        .map(s)
        .collect();
    if got.is_empty() {
        "-".into()
    } else {
        got.join(",")
    }
}

/// A peer's PATH and WHY cells: its path and why, and, for a dual-stack peer whose IPv6 subnet
/// goes another way (no IPv6 underlay neighbour), that path too (`direct,vxlan`) with its
/// reason. An IPv6-only peer's path is its IPv6 subnet's, decided for it: shown once.
fn path_cells(p: &serde_json::Value) -> (String, String) {
    let (path, why) = (s(&p["path"]), s(&p["why"]));
    match (&p["subnet"], &p["pathV6"]) {
        (serde_json::Value::Null, _) | (_, serde_json::Value::Null) => (path, why),
        (_, v6) if s(v6) == path => (path, why),
        (_, v6) => (
            format!("{path},{}", s(v6)),
            format!("{why}; IPv6: {}", s(&p["whyV6"])),
        ),
    }
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The status line of the ClusterNetworkPolicies in force, per tier, from `/status`'s
/// `policy.clusterNetworkPolicies`.
fn cnp_line(c: &serde_json::Value) -> String {
    if c.is_null() {
        return "cnp         - (no ClusterNetworkPolicy state)".into();
    }
    format!(
        "cnp         {} in force (Admin {}, Baseline {}); watch {}",
        s(&c["inForce"]),
        s(&c["admin"]),
        s(&c["baseline"]),
        s(&c["watch"])
    )
}

fn print_table(doc: &serde_json::Value, ready: bool, reasons: &str) {
    println!("node        {}", s(&doc["node"]));
    println!(
        "ready       {}",
        if ready {
            "yes".to_string()
        } else {
            format!("no: {}", reasons.trim().replace('\n', "; "))
        }
    );
    println!("subnet      {}", subnets(doc));
    println!(
        "lease       {} (expires {})",
        s(&doc["lease"]["name"]),
        s(&doc["lease"]["expires"])
    );
    println!("underlay    {}", s(&doc["underlay"]));
    println!("encryption  {}", s(&doc["encryption"]));
    println!("overlay     {}", s(&doc["overlay"]));
    println!(
        "tunnel      {} vni {} port {} mtu {}",
        s(&doc["tunnel"]["device"]),
        s(&doc["tunnel"]["vni"]),
        s(&doc["tunnel"]["port"]),
        s(&doc["tunnel"]["mtu"])
    );
    println!(
        "policy      {} ({} rules, {} pods programmed)",
        s(&doc["policy"]["backend"]),
        s(&doc["policy"]["rules"]),
        s(&doc["policy"]["pods"])
    );
    println!("{}", cnp_line(&doc["policy"]["clusterNetworkPolicies"]));
    let empty = Vec::new();
    let peers = doc["peers"].as_array().unwrap_or(&empty);
    // Dual-stack subnets and IPv6 underlays are wider than IPv4 ones: the columns fit the widest.
    let width = |cell: &dyn Fn(&serde_json::Value) -> String, least: usize| {
        peers.iter().map(|p| cell(p).len()).fold(least, usize::max)
    };
    let subnet_w = width(&subnets, 17);
    let underlay_w = width(&|p| s(&p["underlay"]), 16);
    let path_w = width(&|p| path_cells(p).0, 12);
    println!(
        "\n{:<17} {:<subnet_w$} {:<underlay_w$} {:<path_w$} {:<18} WHY",
        "PEER", "SUBNET", "UNDERLAY", "PATH", "VTEP MAC"
    );
    for p in peers {
        let (path, why) = path_cells(p);
        println!(
            "{:<17} {:<subnet_w$} {:<underlay_w$} {:<path_w$} {:<18} {}",
            s(&p["node"]),
            subnets(p),
            s(&p["underlay"]),
            path,
            s(&p["vtepMac"]),
            why
        );
    }
    if peers.is_empty() {
        println!("(no peers)");
    }
}

#[cfg(test)]
mod tests {
    use super::{cnp_line, path_cells, subnets};

    #[test]
    fn a_peer_path_shows_its_ipv6_subnet_only_where_it_goes_another_way() {
        let cells = |v: serde_json::Value| path_cells(&v);
        // An IPv6-only peer: one path, decided for its IPv6 subnet.
        assert_eq!(
            cells(
                serde_json::json!({"subnet": null, "subnetV6": "fd00:10:244:2::/64",
                "path": "vxlan", "why": "overlay: always",
                "pathV6": "vxlan", "whyV6": "its only subnet (an IPv6-only peer)"})
            ),
            ("vxlan".into(), "overlay: always".into())
        );
        // Dual-stack, both families on one path.
        assert_eq!(
            cells(
                serde_json::json!({"subnet": "10.244.2.0/24", "path": "vxlan",
                "why": "overlay: always", "pathV6": "vxlan", "whyV6": "as its IPv4 subnet"})
            ),
            ("vxlan".into(), "overlay: always".into())
        );
        // Dual-stack, the IPv6 subnet by VXLAN for want of an IPv6 underlay neighbour.
        assert_eq!(
            cells(serde_json::json!({"subnet": "10.244.2.0/24", "path": "direct",
                "why": "same underlay subnet (overlay: cross-subnet)", "pathV6": "vxlan",
                "whyV6": "the peer publishes no IPv6 underlay address"})),
            (
                "direct,vxlan".into(),
                "same underlay subnet (overlay: cross-subnet); IPv6: the peer publishes no IPv6 underlay address".into()
            )
        );
        // IPv4-only.
        assert_eq!(
            cells(
                serde_json::json!({"subnet": "10.244.2.0/24", "path": "direct",
                "why": "same underlay subnet (overlay: never)", "pathV6": null})
            ),
            (
                "direct".into(),
                "same underlay subnet (overlay: never)".into()
            )
        );
    }

    #[test]
    fn subnets_of_either_family_or_both() {
        let one = |v: serde_json::Value| subnets(&v);
        assert_eq!(
            one(serde_json::json!({"subnet": "10.244.1.0/24", "subnetV6": null})),
            "10.244.1.0/24"
        );
        assert_eq!(
            one(serde_json::json!({"subnet": "10.244.1.0/24", "subnetV6": "fd00:10:244:1::/64"})),
            "10.244.1.0/24,fd00:10:244:1::/64"
        );
        assert_eq!(
            one(serde_json::json!({"subnet": null, "subnetV6": "fd00:10:244:1::/64"})),
            "fd00:10:244:1::/64"
        );
        assert_eq!(one(serde_json::json!({})), "-");
    }

    #[test]
    fn cluster_network_policies_line_names_each_tier() {
        let c = serde_json::json!({"watch": "watching", "inForce": 3, "admin": 2, "baseline": 1});
        assert_eq!(
            cnp_line(&c),
            "cnp         3 in force (Admin 2, Baseline 1); watch watching"
        );
        let none = serde_json::json!({"watch": "unavailable: NetworkPolicy only", "inForce": 0, "admin": 0, "baseline": 0});
        assert_eq!(
            cnp_line(&none),
            "cnp         0 in force (Admin 0, Baseline 0); watch unavailable: NetworkPolicy only"
        );
        assert_eq!(
            cnp_line(&serde_json::Value::Null),
            "cnp         - (no ClusterNetworkPolicy state)"
        );
    }
}
