//! `sluice install-cni`: the DaemonSet's init step. Copies this binary to the node's CNI plugin
//! directory as `sluice-cni` and writes the CNI config, each atomically (a temp file in the same
//! directory, then rename), so a runtime reading either never sees half a file. Idempotent: what
//! is already in place is left untouched.

use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// Written into the config for the plugin (DESIGN.md's defaults).
    #[arg(long, default_value = "/run/sluice/subnet.env")]
    pub subnet_file: PathBuf,
    #[arg(long, default_value = "/var/lib/sluice/ipam")]
    pub ipam_dir: PathBuf,
}

pub const CONFLIST_NAME: &str = "10-sluice.conflist";
pub const PLUGIN_NAME: &str = "sluice-cni";

/// The conflist DESIGN.md names: cniVersion 1.1.0, one plugin of type `sluice-cni`.
pub fn conflist(subnet_file: &Path, ipam_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "sluice",
        "plugins": [{
            "type": PLUGIN_NAME,
            "subnetFile": subnet_file,
            "ipamDir": ipam_dir,
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

pub fn run(args: &InstallArgs) -> Result<()> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let binary = std::fs::read(&exe).with_context(|| format!("reading {exe:?}"))?;
    let plugin = args.bin_dir.join(PLUGIN_NAME);
    let changed_bin = write_atomic(&plugin, &binary, 0o755)?;
    let conf = serde_json::to_vec_pretty(&conflist(&args.subnet_file, &args.ipam_dir))?;
    let conf_path = args.conf_dir.join(CONFLIST_NAME);
    let changed_conf = write_atomic(&conf_path, &conf, 0o644)?;
    eprintln!(
        "{} {}\n{} {}",
        if changed_bin {
            "installed"
        } else {
            "unchanged"
        },
        plugin.display(),
        if changed_conf {
            "installed"
        } else {
            "unchanged"
        },
        conf_path.display()
    );
    Ok(())
}
