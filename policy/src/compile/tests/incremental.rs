//! A [`Compiler`] kept from pass to pass gives what a fresh [`compile`] gives, whatever changed
//! in between: a seeded random walk of cluster changes (pod labels, addresses, phases, pods
//! coming and going, namespace labels, policies and ClusterNetworkPolicies edited, added and
//! removed, nodes relabelled, drop attribution switched), each version stamped as an API
//! server would, compared pass by pass.

use super::*;

/// xorshift64: the walk is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }
}

const NAMESPACES: [&str; 3] = ["n0", "n1", "n2"];
const APPS: [&str; 4] = ["web", "db", "cache", "batch"];

struct World {
    pods: Vec<Pod>,
    namespaces: Vec<Namespace>,
    policies: Vec<NetworkPolicy>,
    cnps: Vec<ClusterNetworkPolicy>,
    nodes: Vec<crate::cnp::NodeAddrs>,
    attribute_drops: bool,
    next_cnp: usize,
    version: u64,
    next_pod: u64,
    /// Whether objects carry a resourceVersion (objects not from an API server do not).
    versioned: bool,
}

impl World {
    fn stamp(&mut self) -> Option<String> {
        self.version += 1;
        self.versioned.then(|| self.version.to_string())
    }

    fn pod(&mut self, rng: &mut Rng) -> Pod {
        self.next_pod += 1;
        let n = self.next_pod;
        let ns = *rng.pick(&NAMESPACES);
        let phase = *rng.pick(&["Running", "Running", "Running", "Pending", "Succeeded"]);
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": format!("p{n}"), "uid": format!("uid-{n}"),
                         "labels": {"app": rng.pick(&APPS), "tier": rng.pick(&["front", "back"])}},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": *rng.pick(&[80, 8080])}]}]},
            "status": {"phase": phase, "podIP": format!("10.244.{}.{}", n / 200, n % 200 + 1)}
        }))
        .unwrap();
        p.metadata.resource_version = self.stamp();
        p
    }

    fn policy(&mut self, rng: &mut Rng, name: usize) -> NetworkPolicy {
        let ns = *rng.pick(&NAMESPACES);
        let app = *rng.pick(&APPS);
        let other = *rng.pick(&APPS);
        let peers = [
            json!([{"podSelector": {"matchLabels": {"app": other}}}]),
            json!([{"namespaceSelector": {"matchLabels": {"team": "blue"}}}]),
            json!([{"namespaceSelector": {}, "podSelector": {"matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["back"]}]}}]),
            json!([{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.0.0/24"]}}]),
            json!([{"podSelector": {}}, {"ipBlock": {"cidr": "192.0.2.0/24"}}]),
            Value::Null,
        ];
        let ports = [
            Value::Null,
            json!([{"port": 80}]),
            json!([{"port": "http"}]),
            json!([{"port": 8000, "endPort": 8100, "protocol": "UDP"}]),
        ];
        let mut rule = json!({});
        let from = rng.pick(&peers).clone();
        if !from.is_null() {
            rule["from"] = from.clone();
        }
        let port = rng.pick(&ports).clone();
        if !port.is_null() {
            rule["ports"] = port.clone();
        }
        let mut egress = json!({});
        if !from.is_null() {
            egress["to"] = from;
        }
        if !port.is_null() {
            egress["ports"] = port;
        }
        let types = [
            json!(["Ingress"]),
            json!(["Egress"]),
            json!(["Ingress", "Egress"]),
        ];
        let types = rng.pick(&types).clone();
        let mut p: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": format!("np{name}"), "uid": format!("np-uid-{name}")},
            "spec": {"podSelector": {"matchLabels": {"app": app}}, "policyTypes": types,
                     "ingress": [rule], "egress": [egress]}
        }))
        .unwrap();
        p.metadata.resource_version = self.stamp();
        p
    }

    /// A ClusterNetworkPolicy of a random shape: either tier, few priorities (so that equal
    /// ones meet), namespace and pod subjects, every action, ports by number and name, egress
    /// to networks and nodes.
    fn cnp(&mut self, rng: &mut Rng) -> ClusterNetworkPolicy {
        self.next_cnp += 1;
        let baseline = rng.below(3) == 0;
        let subject = [
            json!({"namespaces": {}}),
            json!({"namespaces": {"matchLabels": {"team": "blue"}}}),
            json!({"pods": {"namespaceSelector": {}, "podSelector":
                {"matchLabels": {"app": rng.pick(&APPS)}}}}),
            json!({"pods": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "n0"}},
                "podSelector": {"matchLabels": {"tier": "front"}}}}),
        ];
        let action = if baseline {
            *rng.pick(&["Accept", "Deny"])
        } else {
            *rng.pick(&["Accept", "Deny", "Pass"])
        };
        let from = [
            json!([{"pods": {"namespaceSelector": {}, "podSelector":
                {"matchLabels": {"app": rng.pick(&APPS)}}}}]),
            json!([{"namespaces": {"matchLabels": {"team": "red"}}}]),
        ];
        let protocols = [
            Value::Null,
            json!([{"tcp": {"destinationPort": {"number": 80}}}]),
            json!([{"tcp": {"destinationPort": {"range": {"start": 8000, "end": 8100}}}},
                   {"udp": {"destinationPort": {"number": 53}}}]),
            json!([{"destinationNamedPort": "http"}]),
        ];
        let mut rule = json!({"action": action, "from": rng.pick(&from).clone()});
        let p = rng.pick(&protocols).clone();
        if !p.is_null() {
            rule["protocols"] = p;
        }
        let egress = [
            json!([]),
            json!([{"action": action, "to": [{"networks": ["10.244.0.0/24"]}]}]),
            json!([{"action": action, "to": [{"nodes": {"matchLabels": {"role": "infra"}}}]}]),
            json!([{"action": action, "to": [{"pods": {"namespaceSelector": {},
                "podSelector": {"matchLabels": {"tier": "back"}}}}],
                "protocols": [{"destinationNamedPort": "http"}]}]),
        ];
        serde_json::from_value(json!({
            "metadata": {"name": format!("c{}", self.next_cnp)},
            "spec": {"tier": if baseline { "Baseline" } else { "Admin" },
                     "priority": *rng.pick(&[0, 10, 10, 20]),
                     "subject": rng.pick(&subject).clone(),
                     "ingress": [rule], "egress": rng.pick(&egress).clone()}
        }))
        .unwrap()
    }

    fn new(rng: &mut Rng, versioned: bool) -> Self {
        let mut w = World {
            pods: Vec::new(),
            namespaces: Vec::new(),
            policies: Vec::new(),
            cnps: Vec::new(),
            nodes: vec![
                crate::cnp::NodeAddrs {
                    labels: [("role".to_string(), "infra".to_string())].into(),
                    addrs: vec!["10.0.0.1".parse().unwrap()],
                },
                crate::cnp::NodeAddrs {
                    labels: Default::default(),
                    addrs: vec!["10.0.0.2".parse().unwrap()],
                },
            ],
            attribute_drops: false,
            next_cnp: 0,
            version: 0,
            next_pod: 0,
            versioned,
        };
        for ns in NAMESPACES {
            let mut n: Namespace = serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"team": rng.pick(&["blue", "red"])}}}),
            )
            .unwrap();
            n.metadata.resource_version = w.stamp();
            w.namespaces.push(n);
        }
        for _ in 0..60 {
            let p = w.pod(rng);
            w.pods.push(p);
        }
        for i in 0..12 {
            let p = w.policy(rng, i);
            w.policies.push(p);
        }
        for _ in 0..8 {
            let c = w.cnp(rng);
            w.cnps.push(c);
        }
        w
    }

    /// One change, as the API would make it (a new version of what it touches).
    fn change(&mut self, rng: &mut Rng) -> &'static str {
        let i = self.below_pods(rng);
        match rng.below(14) {
            8 | 9 => {
                // One ClusterNetworkPolicy edited in place (same name).
                if self.cnps.is_empty() {
                    return "no cnp to edit";
                }
                let at = rng.below(self.cnps.len());
                let name = self.cnps[at].metadata.name.clone();
                let mut c = self.cnp(rng);
                c.metadata.name = name;
                self.cnps[at] = c;
                "cnp edited"
            }
            10 => {
                if !self.cnps.is_empty() && rng.below(2) == 0 {
                    let at = rng.below(self.cnps.len());
                    self.cnps.remove(at);
                    "cnp deleted"
                } else {
                    let c = self.cnp(rng);
                    self.cnps.push(c);
                    "cnp added"
                }
            }
            11 => {
                if let Some(c) = self.cnps.get_mut(i % 8) {
                    c.spec.priority = *rng.pick(&[0, 5, 10, 20]);
                }
                "cnp priority"
            }
            12 => {
                let role = *rng.pick(&["infra", "worker"]);
                self.nodes[1].labels.insert("role".into(), role.into());
                "node labels"
            }
            13 => {
                self.attribute_drops = !self.attribute_drops;
                "drop attribution"
            }
            0 => {
                let app = *rng.pick(&APPS);
                self.edit_pod(i, |p| {
                    let labels = p.metadata.labels.get_or_insert_default();
                    labels.insert("app".into(), app.into());
                });
                "pod labels"
            }
            1 => {
                let ip = format!("10.245.{}.{}", i % 200, rng.below(200) + 1);
                self.edit_pod(i, |p| p.status.get_or_insert_default().pod_ip = Some(ip));
                "pod address"
            }
            2 => {
                let phase = *rng.pick(&["Running", "Succeeded", "Failed"]);
                self.edit_pod(i, |p| {
                    p.status.get_or_insert_default().phase = Some(phase.into());
                });
                "pod phase"
            }
            3 => {
                let p = self.pod(rng);
                self.pods.push(p);
                "pod added"
            }
            4 => {
                self.pods.swap_remove(i);
                "pod deleted"
            }
            5 => {
                let team = *rng.pick(&["blue", "red", "green"]);
                let v = self.stamp();
                let n = &mut self.namespaces[rng.below(NAMESPACES.len())];
                n.metadata
                    .labels
                    .get_or_insert_default()
                    .insert("team".into(), team.into());
                n.metadata.resource_version = v;
                "namespace labels"
            }
            6 => {
                let at = rng.below(self.policies.len());
                let name = self.policies[at].metadata.uid.clone().unwrap();
                let mut p = self.policy(rng, at);
                p.metadata.uid = Some(name);
                self.policies[at] = p;
                "policy edited"
            }
            _ => {
                // Many pods at once: a rollout.
                for _ in 0..80 {
                    let p = self.pod(rng);
                    self.pods.push(p);
                }
                "many pods added"
            }
        }
    }

    /// Pod `i` changed by `edit`, with a new version.
    fn edit_pod(&mut self, i: usize, edit: impl FnOnce(&mut Pod)) {
        let version = self.stamp();
        let pod = &mut self.pods[i];
        edit(pod);
        pod.metadata.resource_version = version;
    }

    fn below_pods(&self, rng: &mut Rng) -> usize {
        rng.below(self.pods.len().max(1))
            .min(self.pods.len().saturating_sub(1))
    }

    /// The local pods: every pod of n0 and n1 that has an address.
    fn local(&self) -> Vec<LocalPod> {
        self.pods
            .iter()
            .filter(|p| p.metadata.namespace.as_deref() != Some("n2"))
            .filter_map(|p| {
                let ifname = format!("sl{}", p.metadata.name.as_deref()?);
                LocalPod::from_pod(&ClusterPod::from(p), &ifname)
            })
            .collect()
    }
}

fn walk(seed: u64, versioned: bool) {
    let mut rng = Rng(seed);
    let mut world = World::new(&mut rng, versioned);
    let mut kept = Compiler::default();
    let host = [HOST.parse().unwrap()];
    for step in 0..100 {
        let what = if step == 0 {
            "start"
        } else {
            world.change(&mut rng)
        };
        let pods: Vec<Arc<ClusterPod>> = world
            .pods
            .iter()
            .map(|p| Arc::new(ClusterPod::from(p)))
            .collect();
        let namespaces: Vec<&Namespace> = world.namespaces.iter().collect();
        let policies: Vec<&NetworkPolicy> = world.policies.iter().collect();
        let cnps: Vec<&ClusterNetworkPolicy> = world.cnps.iter().collect();
        let input = PolicyInput {
            pods: &pods,
            namespaces: &namespaces,
            policies: &policies,
            host_addrs: &host,
            cluster_policies: &cnps,
            nodes: &world.nodes,
            attribute_drops: world.attribute_drops,
        };
        let local = world.local();
        let fresh = compile(&input, &local);
        assert_eq!(
            kept.compile(&input, &local),
            fresh,
            "seed {seed}, step {step}: {what}"
        );
        if step % 10 == 0 {
            // The very same objects again, as a watch cache that did not change gives them.
            assert_eq!(
                kept.compile(&input, &local),
                fresh,
                "seed {seed}, step {step}: again"
            );
        }
        if step == 0 {
            assert!(
                fresh.pods.iter().any(|p| p.ingress.isolated),
                "the walk starts with policy in force"
            );
            assert!(
                fresh.pods.iter().any(|p| !p.ingress.admin.is_empty()),
                "the walk starts with tiers in force"
            );
        }
        if step % 20 == 0 {
            alone_as_in_a_group(&input, &local, &fresh, seed, step);
        }
    }
}

#[test]
fn a_kept_compiler_gives_what_a_fresh_one_gives() {
    for seed in [1, 42, 1234, 7, 2026] {
        walk(seed, true);
    }
}

#[test]
fn objects_without_versions_are_read_every_pass() {
    walk(5, false);
}

/// Region sharing changes no verdict: each pod's tiers, compiled with the pod as the only local
/// one (a group of its own), are what it got in the group it shares with others.
fn alone_as_in_a_group(
    input: &PolicyInput<'_>,
    local: &[LocalPod],
    together: &PolicyIr,
    seed: u64,
    step: usize,
) {
    // Every third pod: each is a whole compile.
    for pod in local.iter().step_by(3) {
        let alone = compile(input, std::slice::from_ref(pod));
        let got = together
            .pods
            .iter()
            .find(|p| p.ifname == pod.ifname)
            .unwrap();
        let want = &alone.pods[0];
        for (g, w) in [(&got.ingress, &want.ingress), (&got.egress, &want.egress)] {
            assert_eq!(g.admin, w.admin, "seed {seed}, step {step}, {}", pod.ifname);
            assert_eq!(
                g.baseline, w.baseline,
                "seed {seed}, step {step}, {}",
                pod.ifname
            );
        }
    }
}

/// A world of one tier policy per app plus one on every pod: 60 pods in a handful of groups.
fn grouped_world() -> (World, Vec<Arc<ClusterPod>>) {
    let mut rng = Rng(77);
    let mut w = World::new(&mut rng, true);
    w.cnps.clear();
    for (k, app) in APPS.iter().enumerate() {
        w.cnps.push(
            serde_json::from_value(json!({
                "metadata": {"name": format!("app-{app}")},
                "spec": {"tier": "Admin", "priority": 10 * k as i32,
                         "subject": {"pods": {"namespaceSelector": {},
                                              "podSelector": {"matchLabels": {"app": app}}}},
                         "ingress": [{"action": "Deny", "from": [{"namespaces": {"matchLabels": {"team": "red"}}}],
                                      "protocols": [{"tcp": {"destinationPort": {"number": 80}}}]}]}
            }))
            .unwrap(),
        );
    }
    w.cnps.push(
        serde_json::from_value(json!({
            "metadata": {"name": "everyone"},
            "spec": {"tier": "Baseline", "priority": 0, "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
        }))
        .unwrap(),
    );
    let pods = w
        .pods
        .iter()
        .map(|p| Arc::new(ClusterPod::from(p)))
        .collect();
    (w, pods)
}

#[test]
fn pods_selected_alike_share_one_verdict_and_a_change_recomputes_only_its_groups() {
    let (mut w, pods) = grouped_world();
    let host = [HOST.parse().unwrap()];
    let local = w.local();
    let namespaces: Vec<&Namespace> = w.namespaces.iter().collect();
    let mut kept = Compiler::default();
    let run = |kept: &mut Compiler, w: &World| {
        let cnps: Vec<&ClusterNetworkPolicy> = w.cnps.iter().collect();
        let input = PolicyInput {
            pods: &pods,
            namespaces: &namespaces,
            host_addrs: &host,
            cluster_policies: &cnps,
            nodes: &w.nodes,
            ..Default::default()
        };
        let ir = kept.compile(&input, &local);
        assert_eq!(ir, compile(&input, &local));
        ir
    };
    let ir = run(&mut kept, &w);
    // One group per app (every pod has one app label), each shared by its pods.
    assert_eq!(kept.tier_memo.len(), APPS.len());
    assert_eq!(kept.tier_memo.computed, APPS.len());
    let web: Vec<&PodPolicy> = ir
        .pods
        .iter()
        .filter(|p| {
            local.iter().any(|l| {
                l.ifname == p.ifname && l.labels.get("app").map(String::as_str) == Some("web")
            })
        })
        .collect();
    assert!(web.len() > 1);
    assert!(web
        .windows(2)
        .all(|w| Arc::ptr_eq(&w[0].ingress.admin, &w[1].ingress.admin)));
    // Each group has a name of its own, the same in both tiers.
    let groups = |ir: &PolicyIr| -> Vec<(u64, u64)> {
        ir.pods
            .iter()
            .map(|p| (p.ingress.admin.group, p.ingress.baseline.group))
            .collect()
    };
    let named = groups(&ir);
    assert!(named.iter().all(|(a, b)| *a != 0 && a == b));
    let distinct: std::collections::BTreeSet<u64> = named.iter().map(|g| g.0).collect();
    assert_eq!(distinct.len(), APPS.len());
    // Nothing changed: nothing computed.
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, 0);
    // One policy changed: its group only, decided again under the same name (the name
    // follows the policies' names, not their specs).
    w.cnps[1].spec.priority = 99;
    let changed = run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, 1);
    assert_eq!(groups(&changed), named);
    let revisions =
        |ir: &PolicyIr| -> Vec<u64> { ir.pods.iter().map(|p| p.ingress.admin.revision).collect() };
    let moved = revisions(&ir)
        .iter()
        .zip(revisions(&changed))
        .filter(|(a, b)| *a != b)
        .count();
    assert!(
        moved > 0 && moved < ir.pods.len(),
        "{moved} revisions changed"
    );
    // The one on every pod changed: every group.
    w.cnps[4].spec.ingress.clear();
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, APPS.len());
}

#[test]
fn a_pod_change_recomputes_only_the_groups_whose_rules_could_name_it() {
    let (mut w, _) = grouped_world();
    // "everyone" now names no pod: only the per-app policies' `team: red` peers name pods.
    w.cnps[4] = serde_json::from_value(json!({
        "metadata": {"name": "everyone"},
        "spec": {"tier": "Baseline", "priority": 0, "subject": {"namespaces": {}},
                 "ingress": [{"action": "Deny", "from": [{"pods": {"namespaceSelector": {},
                     "podSelector": {"matchLabels": {"app": "nobody"}}}}]}]}
    }))
    .unwrap();
    for (n, team) in w.namespaces.iter_mut().zip(["blue", "red", "blue"]) {
        n.metadata
            .labels
            .get_or_insert_default()
            .insert("team".into(), team.into());
    }
    let host = [HOST.parse().unwrap()];
    let mut kept = Compiler::default();
    let run = |kept: &mut Compiler, w: &World| {
        let pods: Vec<Arc<ClusterPod>> = w
            .pods
            .iter()
            .map(|p| Arc::new(ClusterPod::from(p)))
            .collect();
        let namespaces: Vec<&Namespace> = w.namespaces.iter().collect();
        let cnps: Vec<&ClusterNetworkPolicy> = w.cnps.iter().collect();
        let input = PolicyInput {
            pods: &pods,
            namespaces: &namespaces,
            host_addrs: &host,
            cluster_policies: &cnps,
            nodes: &w.nodes,
            ..Default::default()
        };
        let local = w.local();
        let ir = kept.compile(&input, &local);
        assert_eq!(ir, compile(&input, &local));
    };
    let mut rng = Rng(9);
    let mut add = |w: &mut World, ns: &str, app: &str| {
        let mut p = w.pod(&mut rng);
        p.metadata.namespace = Some(ns.into());
        p.metadata
            .labels
            .get_or_insert_default()
            .insert("app".into(), app.into());
        p.status.get_or_insert_default().phase = Some("Running".into());
        w.pods.push(p);
    };
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, APPS.len());
    // A pod in a blue namespace: no rule names it; it joins its app's group as it is.
    add(&mut w, "n0", "web");
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, 0);
    // A pod in the red namespace: every per-app policy names it, every group again.
    add(&mut w, "n1", "db");
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, APPS.len());
    // The pod named by "everyone" alone, which every group has: every group again.
    add(&mut w, "n2", "nobody");
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, APPS.len());
    // It goes: the same.
    w.pods.pop();
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, APPS.len());
    // The blue pod goes: nothing.
    let at = w.pods.len() - 2;
    w.pods.remove(at);
    run(&mut kept, &w);
    assert_eq!(kept.tier_memo.computed, 0);
}
