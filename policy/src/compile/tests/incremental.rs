//! A [`Compiler`] kept from pass to pass gives what a fresh [`compile`] gives, whatever changed
//! in between: a seeded random walk of cluster changes (pod labels, addresses, phases, pods
//! coming and going, namespace labels, policies edited), each version stamped as an API
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

    fn new(rng: &mut Rng, versioned: bool) -> Self {
        let mut w = World {
            pods: Vec::new(),
            namespaces: Vec::new(),
            policies: Vec::new(),
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
        w
    }

    /// One change, as the API would make it (a new version of what it touches).
    fn change(&mut self, rng: &mut Rng) -> &'static str {
        let i = self.below_pods(rng);
        match rng.below(8) {
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
        let input = PolicyInput {
            pods: &pods,
            namespaces: &namespaces,
            policies: &policies,
            host_addrs: &host,
            ..Default::default()
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
        }
    }
}

#[test]
fn a_kept_compiler_gives_what_a_fresh_one_gives() {
    for seed in [1, 42, 1234] {
        walk(seed, true);
    }
}

#[test]
fn objects_without_versions_are_read_every_pass() {
    walk(5, false);
}
