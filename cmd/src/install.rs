//! `sluice install-cni`: the DaemonSet's init step. Copies this binary to the node's CNI plugin
//! directory as `sluice-cni`, atomically (a temp file in the same directory, then rename), so a
//! runtime never runs half a file. Idempotent: what is already in place is left untouched.
//!
//! The CNI config is not written here but by the agent ([`write_conflist`]), once the node's
//! subnet and datapath are up: the kubelet reports the node Ready as soon as a config exists,
//! and a pod scheduled then would fail its ADD. A config left by an earlier version stays in
//! place meanwhile, so an upgrade never takes the node's network away.

use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Print the CNI config the agent installs (with these paths) and exit: for a runtime set
    /// up by hand, and to see what a node gets.
    #[arg(long)]
    pub print_conflist: bool,
    #[arg(
        long,
        default_value = "/run/sluice/subnet.env",
        requires = "print_conflist"
    )]
    pub subnet_file: PathBuf,
    #[arg(
        long,
        default_value = "/var/lib/sluice/ipam",
        requires = "print_conflist"
    )]
    pub ipam_dir: PathBuf,
}

pub const CONFLIST_NAME: &str = "10-sluice.conflist";
pub const PLUGIN_NAME: &str = "sluice-cni";

/// The CNI versions the conflist offers (CNI 1.1's `cniVersions`): a runtime that knows the field
/// takes the highest it supports, so GC and STATUS (1.1.0) reach the runtimes that have them.
pub const CNI_VERSIONS: [&str; 4] = ["0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// What a runtime that predates `cniVersions` reads: containerd 1.6 and 1.7 and Podman 4 (libcni
/// 1.1) refuse a 1.1.0 `cniVersion` outright, so no pod could start on them.
pub const CNI_VERSION: &str = "1.0.0";

/// The conflist DESIGN.md names: `cniVersion` 1.0.0 with `cniVersions` up to 1.1.0, one plugin
/// of type `sluice-cni`, which takes the `portMappings` (hostPorts) and `bandwidth` capabilities
/// itself: the runtime sends them as `runtimeConfig.portMappings` and `runtimeConfig.bandwidth`.
pub fn conflist(subnet_file: &Path, ipam_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": CNI_VERSION,
        "cniVersions": CNI_VERSIONS,
        "name": "sluice",
        "plugins": [{
            "type": PLUGIN_NAME,
            "subnetFile": subnet_file,
            "ipamDir": ipam_dir,
            "capabilities": {"portMappings": true, "bandwidth": true},
        }]
    })
}

/// Writes `bytes` to `path` atomically with `mode`; false when `path` already held exactly them.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == bytes)
        && std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode)
    {
        return Ok(false);
    }
    let dir = path
        .parent()
        .context("a file to install has no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {dir:?}"))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .context("a file to install has no name")?;
    let tmp = dir.join(format!(".{name}.sluice-tmp-{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("installing {path:?}"));
    }
    Ok(true)
}

/// Writes the conflist into `conf_dir` (atomically, only when it differs); true when it changed.
pub fn write_conflist(conf_dir: &Path, subnet_file: &Path, ipam_dir: &Path) -> Result<bool> {
    let conf = serde_json::to_vec_pretty(&conflist(subnet_file, ipam_dir))?;
    write_atomic(&conf_dir.join(CONFLIST_NAME), &conf, 0o644)
}

pub fn run(args: &InstallArgs) -> Result<()> {
    if args.print_conflist {
        println!(
            "{}",
            serde_json::to_string_pretty(&conflist(&args.subnet_file, &args.ipam_dir))?
        );
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding this executable")?;
    let binary = std::fs::read(&exe).with_context(|| format!("reading {exe:?}"))?;
    let plugin = args.bin_dir.join(PLUGIN_NAME);
    let changed = write_atomic(&plugin, &binary, 0o755)?;
    eprintln!(
        "{} {} (the agent installs the CNI config once the node's network is up)",
        if changed { "installed" } else { "unchanged" },
        plugin.display(),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_conflist_offers_every_version_and_states_one_old_runtimes_accept() {
        let c = conflist(
            Path::new("/run/sluice/subnet.env"),
            Path::new("/var/lib/sluice/ipam"),
        );
        // containerd 1.6/1.7 and Podman 4 (libcni 1.1) refuse a 1.1.0 cniVersion.
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(
            c["cniVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(c["name"], "sluice");
        let plugins = c["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 1);
        assert_eq!(plugins[0]["type"], "sluice-cni");
        assert_eq!(plugins[0]["subnetFile"], "/run/sluice/subnet.env");
        // hostPorts and shaping are sluice-cni's own: the runtime sends runtimeConfig for both.
        assert_eq!(plugins[0]["capabilities"]["portMappings"], true);
        assert_eq!(plugins[0]["capabilities"]["bandwidth"], true);
    }

    #[test]
    fn write_conflist_is_atomic_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let (s, i) = (Path::new("/s.env"), Path::new("/ipam"));
        assert!(write_conflist(dir.path(), s, i).unwrap());
        assert!(!write_conflist(dir.path(), s, i).unwrap());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [CONFLIST_NAME]);
        let mode = std::fs::metadata(dir.path().join(CONFLIST_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
