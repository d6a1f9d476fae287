//! A lab made by the real `sluice lab up`, for end-to-end tests: taken down by `sluice lab down`
//! when dropped, panics included.

use crate::{run, sluice_bin};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

static LABS: AtomicUsize = AtomicUsize::new(0);

/// A lab name unique to this test process (lab names are `[a-z][a-z0-9]{0,11}`).
pub fn unique_lab_name() -> String {
    format!(
        "e{}x{}",
        std::process::id() % 1_000_000,
        LABS.fetch_add(1, Ordering::Relaxed)
    )
}

pub struct Lab {
    pub name: String,
}

/// Runs `sluice lab ARGS...`, bounded by `timeout`.
pub fn lab_cmd(args: &[&str], secs: u32) -> Output {
    run(Command::new("timeout")
        .args(["-k", "5", &secs.to_string()])
        .arg(sluice_bin())
        .arg("lab")
        .args(args))
}

impl Lab {
    /// `sluice lab up --name NAME EXTRA...`; panics with its output if it fails.
    pub fn up(extra: &[&str]) -> Self {
        let lab = Self {
            name: unique_lab_name(),
        };
        let mut args = vec!["up", "--name", &lab.name];
        args.extend_from_slice(extra);
        let out = lab_cmd(&args, 180);
        assert!(
            out.status.success(),
            "lab up failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        lab
    }

    pub fn kubeconfig(&self) -> PathBuf {
        PathBuf::from(format!("/run/sluice/lab/{}/kubeconfig", self.name))
    }

    pub fn prefix(&self) -> String {
        format!("slab-{}-", self.name)
    }

    pub fn status(&self) -> Value {
        let out = lab_cmd(&["status", "--name", &self.name, "--json"], 120);
        assert!(
            out.status.success(),
            "lab status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("lab status --json prints JSON")
    }

    /// `kubectl --kubeconfig LAB ARGS...`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        run(Command::new("timeout")
            .args(["-k", "5", "60", "kubectl", "--kubeconfig"])
            .arg(self.kubeconfig())
            .args(args))
    }

    pub fn down(&self) -> Output {
        lab_cmd(&["down", "--name", &self.name], 60)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

/// Named network namespaces starting with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}
