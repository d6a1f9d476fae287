//! `sluice lab load ARCHIVE...`: imports docker or OCI image archives into the containerd of
//! every node of a real-Kubernetes lab (`lab up --kubernetes DIR`), as `kind load image-archive`
//! does for kind, so that pods run images no registry holds. Each import is
//! `ctr --address SOCKET --namespace k8s.io images import ARCHIVE`, the namespace the kubelet's
//! CRI reads. Which nodes and sockets is decided by [`targets`]; [`run`] only runs `ctr`.

use super::k8s_plan::containerd_socket;
use super::plan::{validate_name, LabPlan};
use super::LabFiles;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The containerd namespace the kubelet's CRI uses.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// How long one import may take (a bound, not an expectation: the sluice image takes a second).
const IMPORT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LoadError {
    #[error("{0}: no such image archive")]
    MissingArchive(String),
    #[error("no lab named {0} (sluice lab up --name {0} --kubernetes DIR)")]
    NoLab(String),
    #[error(
        "lab {0} has no containerd to load images into: it runs sluice's embedded API server and \
         the lab's own kubelet; images load into a lab on real Kubernetes \
         (sluice lab up --name {0} --kubernetes DIR)"
    )]
    Embedded(String),
    #[error("lab {lab} has no node {node} (its nodes: {nodes})")]
    UnknownNode {
        lab: String,
        node: String,
        nodes: String,
    },
    #[error("node {node} has no containerd at {socket} (is the lab up?)")]
    NoContainerd { node: String, socket: String },
}

/// The nodes to load into (`only`, or all of them) and each one's containerd socket.
/// `kubernetes`: the lab runs real Kubernetes components; `exists` says whether a path exists.
pub fn targets(
    lab: &str,
    nodes: &[String],
    only: &[String],
    kubernetes: bool,
    archives: &[PathBuf],
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Vec<(String, PathBuf)>, LoadError> {
    if let Some(missing) = archives.iter().find(|a| !exists(a)) {
        return Err(LoadError::MissingArchive(missing.display().to_string()));
    }
    if !kubernetes {
        return Err(LoadError::Embedded(lab.to_string()));
    }
    if let Some(unknown) = only.iter().find(|n| !nodes.contains(n)) {
        return Err(LoadError::UnknownNode {
            lab: lab.to_string(),
            node: unknown.clone(),
            nodes: nodes.join(", "),
        });
    }
    nodes
        .iter()
        .filter(|n| only.is_empty() || only.contains(n))
        .map(|node| {
            let socket = containerd_socket(lab, node);
            if exists(&socket) {
                Ok((node.clone(), socket))
            } else {
                Err(LoadError::NoContainerd {
                    node: node.clone(),
                    socket: socket.display().to_string(),
                })
            }
        })
        .collect()
}

/// `ctr`'s arguments to import `archive` into the containerd at `socket`.
pub fn import_args(socket: &Path, archive: &Path) -> Vec<String> {
    vec![
        "--address".into(),
        socket.display().to_string(),
        "--namespace".into(),
        CRI_NAMESPACE.into(),
        "--connect-timeout".into(),
        "10s".into(),
        "--timeout".into(),
        format!("{}s", IMPORT_TIMEOUT.as_secs()),
        "images".into(),
        "import".into(),
        archive.display().to_string(),
    ]
}

/// Imports `archive` into the containerd at `socket` (bounded in time); returns what ctr says
/// it unpacked (`REF (sha256:...)` per image).
pub fn import(socket: &Path, archive: &Path) -> Result<Vec<String>> {
    let out = Command::new("ctr")
        .args(import_args(socket, archive))
        .stdin(std::process::Stdio::null())
        .output()
        .context("running ctr (Debian's package containerd ships it)")?;
    if !out.status.success() {
        anyhow::bail!(
            "ctr images import {} failed ({}): {}",
            archive.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("unpacking "))
        .map(|w| w.trim_end_matches("...done").to_string())
        .collect())
}

/// `sluice lab load`: every archive into every chosen node, in order; stops at the first failure.
pub fn run(name: &str, archives: &[PathBuf], only: &[String]) -> Result<()> {
    validate_name(name)?;
    let files = LabFiles::new(name);
    let exists = |p: &Path| p.exists();
    if let Some(missing) = archives.iter().find(|a| !exists(a)) {
        return Err(LoadError::MissingArchive(missing.display().to_string()).into());
    }
    let plan: LabPlan = match std::fs::read(&files.plan) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes).with_context(|| format!("reading {:?}", files.plan))?
        }
        Err(_) => return Err(LoadError::NoLab(name.to_string()).into()),
    };
    let nodes: Vec<String> = plan.nodes.iter().map(|n| n.name.clone()).collect();
    let kubernetes = super::k8s::dir(&files).exists();
    let targets = targets(name, &nodes, only, kubernetes, archives, &exists)?;
    for (node, socket) in &targets {
        for archive in archives {
            for image in import(socket, archive).with_context(|| format!("node {node}"))? {
                eprintln!("{node}: {image}");
            }
        }
    }
    eprintln!(
        "loaded {} archive(s) into {} node(s) of lab {name}",
        archives.len(),
        targets.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn nodes() -> Vec<String> {
        (1..=3).map(|i| format!("lab-node-{i}")).collect()
    }

    fn with(paths: &[PathBuf]) -> impl Fn(&Path) -> bool {
        let set: HashSet<PathBuf> = paths.iter().cloned().collect();
        move |p: &Path| set.contains(p)
    }

    #[test]
    fn every_node_is_a_target_at_its_conventional_socket() {
        let archive = PathBuf::from("/tmp/img.tar");
        let mut present = vec![archive.clone()];
        present.extend(nodes().iter().map(|n| containerd_socket("lab", n)));
        let got = targets(
            "lab",
            &nodes(),
            &[],
            true,
            std::slice::from_ref(&archive),
            &with(&present),
        )
        .unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].0, "lab-node-2");
        assert_eq!(got[1].1, containerd_socket("lab", "lab-node-2"));
        let only = targets(
            "lab",
            &nodes(),
            &["lab-node-3".to_string()],
            true,
            &[archive],
            &with(&present),
        )
        .unwrap();
        assert_eq!(
            only,
            vec![(
                "lab-node-3".to_string(),
                containerd_socket("lab", "lab-node-3")
            )]
        );
    }

    #[test]
    fn what_cannot_be_loaded_says_why() {
        let archive = PathBuf::from("/tmp/img.tar");
        let none = with(&[]);
        assert_eq!(
            targets(
                "lab",
                &nodes(),
                &[],
                true,
                std::slice::from_ref(&archive),
                &none
            ),
            Err(LoadError::MissingArchive("/tmp/img.tar".into()))
        );
        let only_archive = with(std::slice::from_ref(&archive));
        let embedded = targets(
            "lab",
            &nodes(),
            &[],
            false,
            std::slice::from_ref(&archive),
            &only_archive,
        )
        .unwrap_err();
        assert_eq!(embedded, LoadError::Embedded("lab".into()));
        assert!(
            embedded.to_string().contains("--kubernetes DIR"),
            "{embedded}"
        );
        let missing = targets(
            "lab",
            &nodes(),
            &[],
            true,
            std::slice::from_ref(&archive),
            &only_archive,
        )
        .unwrap_err();
        assert_eq!(
            missing,
            LoadError::NoContainerd {
                node: "lab-node-1".into(),
                socket: "/run/sluice/lab/lab/k8s/nodes/lab-node-1/containerd/containerd.sock"
                    .into()
            }
        );
        let unknown = targets(
            "lab",
            &nodes(),
            &["lab-node-9".into()],
            true,
            &[archive],
            &only_archive,
        )
        .unwrap_err();
        assert!(
            unknown.to_string().contains("no node lab-node-9"),
            "{unknown}"
        );
    }

    #[test]
    fn ctr_imports_into_the_cri_namespace_with_bounded_time() {
        let args = import_args(Path::new("/s.sock"), Path::new("/a.tar"));
        assert_eq!(
            args,
            [
                "--address",
                "/s.sock",
                "--namespace",
                "k8s.io",
                "--connect-timeout",
                "10s",
                "--timeout",
                "300s",
                "images",
                "import",
                "/a.tar"
            ]
        );
    }
}
