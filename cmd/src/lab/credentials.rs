//! The embedded API server's credentials, made by `lab up` as kind makes a cluster's: a CA of the
//! lab's own, the server's certificate (for 127.0.0.1, where the host and every node namespace
//! reach it) and one client certificate (user `sluice-lab-admin` in `system:masters`) that the
//! lab's kubeconfig embeds, for kubectl on the host and the agents in the nodes alike. Kept under
//! the lab's state directory (the directory 0700, keys 0600) so that a restarted daemon serves
//! with the same ones; the CA's key is not kept (nothing is issued after `up`).

use super::pki::{self, Ca};
use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const ADMIN_USER: &str = "sluice-lab-admin";
const ADMIN_GROUP: &str = "system:masters";

/// Where a lab keeps its credentials.
pub fn dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("pki")
}

/// The PEM files the daemon serves with and writes the kubeconfig from.
pub struct Credentials {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

/// Makes the lab's CA and certificates and writes them under `lab_dir`.
pub fn create(lab_dir: &Path, lab: &str) -> Result<()> {
    let dir = dir(lab_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {dir:?}"))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let ca = Ca::new(&format!("sluice-lab-{lab}-ca"))?;
    pki::write_file(&dir.join("ca.crt"), &ca.cert.cert_pem, 0o644)?;
    ca.serving("sluice-lab-apiserver", &["127.0.0.1", "localhost"])?
        .write(&dir, "apiserver")?;
    ca.client(ADMIN_USER, &[ADMIN_GROUP])?
        .write(&dir, "admin")?;
    Ok(())
}

/// Reads what [`create`] wrote.
pub fn load(lab_dir: &Path) -> Result<Credentials> {
    let dir = dir(lab_dir);
    let read = |f: &str| {
        let p = dir.join(f);
        std::fs::read_to_string(&p).with_context(|| format!("reading {p:?}"))
    };
    Ok(Credentials {
        ca_pem: read("ca.crt")?,
        server_cert_pem: read("apiserver.crt")?,
        server_key_pem: read("apiserver.key")?,
        admin_cert_pem: read("admin.crt")?,
        admin_key_pem: read("admin.key")?,
    })
}

impl Credentials {
    pub fn tls(&self) -> Result<sluice_apiserver::TlsConfig> {
        sluice_apiserver::TlsConfig::new(&self.ca_pem, &self.server_cert_pem, &self.server_key_pem)
            .context("the lab's TLS credentials")
    }

    /// The kubeconfig for `https://ADDR` with the admin certificate embedded.
    pub fn kubeconfig(&self, addr: std::net::SocketAddr, context: &str) -> String {
        sluice_apiserver::kubeconfig_with_client_cert(
            &format!("https://{addr}"),
            context,
            sluice_apiserver::ClientCredential {
                server_ca_pem: &self.ca_pem,
                cert_pem: &self.admin_cert_pem,
                key_pem: &self.admin_key_pem,
            },
        )
    }
}

/// Writes `text` to `path` (mode 0600) through a temporary file, so that a reader never sees a
/// half-written kubeconfig; a file that already says `text` is left alone.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    let tmp = path.with_extension("tmp");
    pki::write_file(&tmp, text, 0o600)?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {tmp:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_and_read_back_private() {
        let d = tempfile::tempdir().unwrap();
        create(d.path(), "t").unwrap();
        let c = load(d.path()).unwrap();
        assert!(c.tls().is_ok());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir(d.path())), 0o700);
        assert_eq!(mode(&dir(d.path()).join("apiserver.key")), 0o600);
        assert_eq!(mode(&dir(d.path()).join("admin.key")), 0o600);
        let kc = d.path().join("kubeconfig");
        let text = c.kubeconfig("127.0.0.1:6443".parse().unwrap(), "sluice-t");
        write_private(&kc, &text).unwrap();
        assert_eq!(mode(&kc), 0o600);
        assert!(
            text.contains("server: \"https://127.0.0.1:6443\""),
            "{text}"
        );
        assert!(text.contains("client-key-data: "), "{text}");
    }
}
