//! `bench-k8s`: pod start on the real-Kubernetes lab (`sluice lab up --kubernetes DIR`).
//!
//! 1. `lab up --kubernetes` with N nodes, wall time.
//! 2. Pod start: `kubectl create deployment` of P replicas, then the time from that command until
//!    each pod is seen Running with an address (polled every 50 ms), p50/p99/max per pod, over R
//!    rounds (the deployment is deleted and its pods gone between rounds). The pods are made by
//!    the real controller-manager, placed by the real scheduler, wired by sluice-cni through the
//!    real kubelet and containerd of each node.
//!
//! The lab is removed on every exit path (guard on return and panic, and on SIGINT/TERM/HUP).
//! Every wait is bounded.
//!
//! Usage: bench-k8s [--kubernetes DIR (default $SLUICE_K8S_BIN)] [--sluice PATH] [--nodes N]
//!                  [--pods P] [--runs R]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::Value;
use sluice_e2e::bench::{cleanup_on_signals, ms, pct, Flags, Guard};
use sluice_e2e::lab::{lab_cmd, unique_lab_name};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The kit's agnhost image, which `lab up --kubernetes` imports into every node's containerd.
const AGNHOST: &str = "--image=registry.k8s.io/e2e-test-images/agnhost:2.43";

const USAGE: &str =
    "usage: bench-k8s [--kubernetes DIR] [--sluice PATH] [--nodes N] [--pods P] [--runs R]";

fn kubectl(kubeconfig: &str, args: &[&str]) -> String {
    let out = Command::new("timeout")
        .args(["-k", "5", "60", "kubectl", "--kubeconfig", kubeconfig])
        .args(args)
        .output()
        .expect("running kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let mut flags = Flags::from_env("bench-k8s", USAGE);
    let mut bin = std::env::var("SLUICE_K8S_BIN").ok();
    let mut sluice = sluice_e2e::sluice_bin();
    let (mut nodes, mut pods, mut runs) = (3u8, 30usize, 3usize);
    while let Some((flag, value)) = flags.next_pair() {
        match flag.as_str() {
            "--kubernetes" => bin = Some(value),
            "--sluice" => sluice = PathBuf::from(value),
            "--nodes" => nodes = flags.number(&flag, &value),
            "--pods" => pods = flags.number(&flag, &value),
            "--runs" => runs = flags.number(&flag, &value),
            _ => flags.fail(&format!("unknown flag {flag}")),
        }
    }
    let Some(bin) = bin else {
        flags.fail("no Kubernetes binaries: --kubernetes DIR or SLUICE_K8S_BIN")
    };
    flags.require(nodes >= 1, "--nodes at least 1");
    flags.require((1..=200).contains(&pods), "--pods between 1 and 200");
    flags.require((1..=20).contains(&runs), "--runs between 1 and 20");
    flags.require(nix::unistd::geteuid().is_root(), "run it as root");
    // The lab helpers run `SLUICE_BIN`; set before any thread exists.
    std::env::set_var("SLUICE_BIN", &sluice);
    cleanup_on_signals();

    let name = unique_lab_name();
    let n = name.clone();
    let _guard = Guard::new(move || {
        let _ = lab_cmd(&["down", "--name", &n], 60);
    });
    let started = Instant::now();
    let nodes_s = nodes.to_string();
    let out = lab_cmd(
        &[
            "up",
            "--name",
            &name,
            "--nodes",
            &nodes_s,
            "--pods-per-node",
            "1",
            "--kubernetes",
            &bin,
        ],
        300,
    );
    assert!(
        out.status.success(),
        "lab up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up = started.elapsed();
    println!(
        "lab up --kubernetes, {nodes} nodes: {:.2} s",
        up.as_secs_f64()
    );
    let kc = format!("/run/sluice/lab/{name}/kubeconfig");
    let ns = name.as_str();
    // The controller-manager starts its controllers some seconds after it: wait for the
    // Deployment controller before timing it.
    kubectl(
        &kc,
        &[
            "-n",
            ns,
            "create",
            "deployment",
            "warm",
            AGNHOST,
            "--replicas=1",
            "--",
            "/agnhost",
            "pause",
        ],
    );
    let t = Instant::now();
    while !kubectl(&kc, &["-n", ns, "get", "pods", "-l", "app=warm"]).contains("Running") {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "warm-up pod not running after 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    kubectl(&kc, &["-n", ns, "delete", "deployment", "warm"]);
    println!(
        "controllers working {:.1} s after lab up",
        t.elapsed().as_secs_f64()
    );
    let mut all: Vec<Duration> = Vec::new();
    let pods_s = format!("--replicas={pods}");
    for round in 0..runs {
        let t0 = Instant::now();
        kubectl(
            &kc,
            &[
                "-n",
                ns,
                "create",
                "deployment",
                "bench",
                AGNHOST,
                &pods_s,
                "--port=80",
                "--",
                "/agnhost",
                "pause",
            ],
        );
        let mut seen: HashMap<String, Duration> = HashMap::new();
        while seen.len() < pods {
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "round {round}: {} of {pods} pods running after 180 s",
                seen.len()
            );
            let list: Value = serde_json::from_str(&kubectl(
                &kc,
                &["-n", ns, "get", "pods", "-l", "app=bench", "-o", "json"],
            ))
            .unwrap();
            for p in list["items"].as_array().unwrap() {
                if p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string() {
                    let pod = p["metadata"]["name"].as_str().unwrap().to_string();
                    seen.entry(pod).or_insert_with(|| t0.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut times: Vec<Duration> = seen.into_values().collect();
        times.sort();
        println!(
            "round {round}: {pods} pods Running with an address: p50 {} p99 {} max {}",
            ms(pct(&times, 50.0)),
            ms(pct(&times, 99.0)),
            ms(*times.last().unwrap())
        );
        all.extend(times);
        kubectl(
            &kc,
            &["-n", ns, "delete", "deployment", "bench", "--wait=true"],
        );
        let t1 = Instant::now();
        loop {
            let left = kubectl(
                &kc,
                &["-n", ns, "get", "pods", "-l", "app=bench", "-o", "name"],
            );
            if left.trim().is_empty() {
                break;
            }
            assert!(
                t1.elapsed() < Duration::from_secs(120),
                "bench pods not gone: {left}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    all.sort();
    println!(
        "pod start over {} pods (kubectl create deployment -> Running with an address): p50 {} p99 {}",
        all.len(),
        ms(pct(&all, 50.0)),
        ms(pct(&all, 99.0))
    );
}
