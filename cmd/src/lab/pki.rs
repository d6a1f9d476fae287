//! The lab's throwaway PKI, made in-process (rcgen, no openssl): one CA per lab, serving
//! certificates for API servers and kubelets, client certificates whose subject is what the
//! Kubernetes authenticators read (CN = user, O = groups), and a bare key pair for signing
//! service-account tokens. ECDSA P-256 throughout: Go's TLS stack, rustls and kube-rs all take
//! it, and it is made in a millisecond where RSA takes a second on this machine.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Issued {
    /// Writes `NAME.crt` (0644) and `NAME.key` (0600) into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<()> {
        write_file(&dir.join(format!("{name}.crt")), &self.cert_pem, 0o644)?;
        write_file(&dir.join(format!("{name}.key")), &self.key_pem, 0o600)
    }
}

/// A certificate authority that lives as long as the lab's setup; only its certificate (and,
/// for the controller-manager's signer, its key) is kept on disk.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert: Issued,
}

impl Ca {
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("making the CA key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).context("signing the CA")?;
        let issued = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert: issued,
        })
    }

    /// A serving certificate for `hosts` (IP addresses and DNS names alike).
    pub fn serving(&self, common_name: &str, hosts: &[&str]) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, &[]);
        params.subject_alt_names = hosts
            .iter()
            .map(|h| match h.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName((*h).try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()
            .with_context(|| format!("subject names {hosts:?}"))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, common_name)
    }

    /// A client certificate: Kubernetes reads the user from CN and the groups from O.
    pub fn client(&self, user: &str, groups: &[&str]) -> Result<Issued> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user, groups);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, user)
    }

    fn sign(&self, mut params: CertificateParams, what: &str) -> Result<Issued> {
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().with_context(|| format!("making the key of {what}"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {what}"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A key pair for signing service-account tokens: (private PKCS#8 PEM, public SPKI PEM).
// For the real-Kubernetes lab's API server (in progress on its own branch).
#[allow(dead_code)]
pub fn signing_key_pair() -> Result<(String, String)> {
    let key = KeyPair::generate().context("making the service-account signing key")?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

fn name(common_name: &str, organizations: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in organizations {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Writes `text` to `path` with `mode` from the start (a key is never readable by others, not
/// even for a moment).
pub fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {path:?}"))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {path:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_names_its_issuer_and_keys_stay_private() {
        let ca = Ca::new("sluice-lab-ca").unwrap();
        let server = ca.serving("api", &["127.0.0.1", "localhost"]).unwrap();
        let client = ca.client("admin", &["system:masters"]).unwrap();
        for leaf in [&server, &client] {
            assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(leaf.key_pem.contains("PRIVATE KEY"));
            assert_ne!(leaf.cert_pem, ca.cert.cert_pem);
        }
        let dir = tempfile::tempdir().unwrap();
        client.write(dir.path(), "admin").unwrap();
        let mode = |f: &str| {
            std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("admin.key"), 0o600);
        assert_eq!(mode("admin.crt"), 0o644);
        let (private, public) = signing_key_pair().unwrap();
        assert!(private.contains("PRIVATE KEY") && public.contains("PUBLIC KEY"));
    }
}
