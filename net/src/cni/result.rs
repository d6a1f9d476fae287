//! The ADD result, shaped for the version the runtime asked for and merged into `prevResult`
//! when sluice is chained after another plugin.

use super::CniVersion;
use ipnet::Ipv4Net;
use serde_json::{json, Map, Value};
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The netns path for interfaces inside the container; `None` for host-side ones.
    pub sandbox: Option<String>,
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    pub address: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    /// Index into this result's own `interfaces`.
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gw: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
}

impl AddResult {
    /// The result JSON for `version`. With `prev` (the chain's `prevResult`), sluice's interfaces,
    /// addresses and routes are appended to it and everything else it carries is kept; `dns` from
    /// the network configuration is used when the chain has none.
    pub fn render(&self, version: CniVersion, prev: Option<&Value>, dns: Option<&Value>) -> Value {
        let mut out: Map<String, Value> = prev
            .and_then(|p| p.as_object().cloned())
            .unwrap_or_default();
        out.insert("cniVersion".into(), version.as_str().into());

        let mut interfaces = take_array(&mut out, "interfaces");
        let offset = interfaces.len();
        interfaces.extend(self.interfaces.iter().map(|i| render_interface(i, version)));

        let mut ips = take_array(&mut out, "ips");
        // A chained address whose interface index points past the chain's interfaces names
        // nothing; left as it is, it would name the interface sluice appends at that index.
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if ip
                .get("interface")
                .and_then(Value::as_u64)
                .is_some_and(|i| i >= offset as u64)
            {
                ip.remove("interface");
            }
        }
        ips.extend(self.ips.iter().map(|ip| {
            let mut o = Map::new();
            if version < CniVersion::V1_0_0 {
                o.insert("version".into(), "4".into());
            }
            o.insert("address".into(), ip.address.to_string().into());
            if let Some(gw) = ip.gateway {
                o.insert("gateway".into(), gw.to_string().into());
            }
            if let Some(i) = ip.interface {
                o.insert("interface".into(), (i + offset).into());
            }
            Value::Object(o)
        }));

        let mut routes = take_array(&mut out, "routes");
        for r in &self.routes {
            let dst = r.dst.to_string();
            if routes
                .iter()
                .any(|existing| existing.get("dst").and_then(Value::as_str) == Some(dst.as_str()))
            {
                continue;
            }
            let mut o = Map::new();
            o.insert("dst".into(), dst.into());
            if let Some(gw) = r.gw {
                o.insert("gw".into(), gw.to_string().into());
            }
            routes.push(Value::Object(o));
        }

        out.insert("interfaces".into(), interfaces.into());
        out.insert("ips".into(), ips.into());
        out.insert("routes".into(), routes.into());
        if !out.contains_key("dns") {
            out.insert("dns".into(), dns.cloned().unwrap_or_else(|| json!({})));
        }
        Value::Object(out)
    }
}

fn render_interface(i: &Interface, version: CniVersion) -> Value {
    let mut o = Map::new();
    o.insert("name".into(), i.name.clone().into());
    o.insert("mac".into(), i.mac.clone().into());
    if let Some(mtu) = i.mtu.filter(|_| version >= CniVersion::V1_1_0) {
        o.insert("mtu".into(), mtu.into());
    }
    if let Some(s) = &i.sandbox {
        o.insert("sandbox".into(), s.clone().into());
    }
    Value::Object(o)
}

fn take_array(out: &mut Map<String, Value>, key: &str) -> Vec<Value> {
    match out.remove(key) {
        Some(Value::Array(a)) => a,
        _ => Vec::new(),
    }
}

/// The address `prev` (a `prevResult`) assigns to the interface `ifname` inside a sandbox, if any.
pub fn address_of(prev: &Value, ifname: &str) -> Option<Ipv4Net> {
    let interfaces = prev.get("interfaces")?.as_array()?;
    let index = interfaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox").is_some_and(|s| !s.is_null())
    })?;
    prev.get("ips")?
        .as_array()?
        .iter()
        .filter(|ip| ip.get("interface").and_then(Value::as_u64) == Some(index as u64))
        .find_map(|ip| ip.get("address")?.as_str()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> AddResult {
        AddResult {
            interfaces: vec![
                Interface {
                    name: "sl0123456789abc".into(),
                    mac: "ee:ee:ee:ee:ee:ee".into(),
                    sandbox: None,
                    mtu: Some(1450),
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:11:22:33:44:55".into(),
                    sandbox: Some("/run/netns/p".into()),
                    mtu: Some(1450),
                },
            ],
            ips: vec![IpConfig {
                address: "10.244.3.5/32".parse().unwrap(),
                gateway: Some(Ipv4Addr::new(169, 254, 1, 1)),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some(Ipv4Addr::new(169, 254, 1, 1)),
            }],
        }
    }

    #[test]
    fn shapes_each_version() {
        let r = sample();
        for v in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let j = r.render(v, None, None);
            assert_eq!(j["cniVersion"], v.as_str());
            assert_eq!(j["ips"][0]["version"], "4", "{v}");
            assert!(j["interfaces"][0].get("mtu").is_none());
        }
        let j = r.render(CniVersion::V1_0_0, None, None);
        assert!(j["ips"][0].get("version").is_none());
        assert!(j["interfaces"][1].get("mtu").is_none());
        let j = r.render(CniVersion::V1_1_0, None, None);
        assert_eq!(j["interfaces"][1]["mtu"], 1450);
        assert_eq!(j["interfaces"][1]["sandbox"], "/run/netns/p");
        assert!(j["interfaces"][0].get("sandbox").is_none());
        assert_eq!(j["ips"][0]["address"], "10.244.3.5/32");
        assert_eq!(j["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(j["ips"][0]["interface"], 1);
        assert_eq!(
            j["routes"],
            json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
        );
        assert_eq!(j["dns"], json!({}));
    }

    #[test]
    fn chains_onto_a_previous_result() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "dummy0", "mac": "aa:aa:aa:aa:aa:aa"}],
            "ips": [{"address": "192.168.9.9/24", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "192.168.9.1"}],
            "dns": {"nameservers": ["1.1.1.1"]},
            "custom": "kept"
        });
        let j = sample().render(
            CniVersion::V1_0_0,
            Some(&prev),
            Some(&json!({"nameservers": ["9.9.9.9"]})),
        );
        assert_eq!(j["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(
            j["ips"][1]["interface"], 2,
            "sluice's interface index is shifted past the previous ones"
        );
        assert_eq!(
            j["routes"].as_array().unwrap().len(),
            1,
            "an existing default route is not duplicated"
        );
        assert_eq!(j["dns"]["nameservers"][0], "1.1.1.1");
        assert_eq!(j["custom"], "kept");
        assert_eq!(
            address_of(&j, "eth0"),
            Some("10.244.3.5/32".parse().unwrap())
        );
        assert_eq!(address_of(&j, "dummy0"), None, "dummy0 has no sandbox");
    }

    #[test]
    fn a_chained_address_naming_no_interface_does_not_take_sluices() {
        // Found by the fuzz target (proptest-regressions/fuzz_cni.txt): the chain's address
        // points at interface 0 of an empty list, where sluice's own interfaces go.
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [],
                          "ips": [{"address": "192.0.2.7/24", "interface": 0}]});
        let j = sample().render(CniVersion::V1_0_0, Some(&prev), None);
        assert!(j["ips"][0].get("interface").is_none(), "{j}");
        assert_eq!(j["ips"][0]["address"], "192.0.2.7/24");
        assert_eq!(
            address_of(&j, "eth0"),
            Some("10.244.3.5/32".parse().unwrap())
        );
    }

    #[test]
    fn dns_from_config_when_no_chain() {
        let j = sample().render(
            CniVersion::V0_4_0,
            None,
            Some(&json!({"nameservers": ["10.96.0.10"]})),
        );
        assert_eq!(j["dns"]["nameservers"][0], "10.96.0.10");
    }
}
