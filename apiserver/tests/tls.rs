//! HTTPS with client certificates: a client whose certificate chains to the client CA is served;
//! one without a certificate, or with another CA's, gets 401 Unauthorized (as kube-apiserver
//! answers an anonymous client when anonymous authentication is off); kubectl and kube-rs both
//! work from the kubeconfig `kubeconfig_with_client_cert` writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};
use sluice_apiserver::{
    kubeconfig_with_client_cert, ApiServer, ClientCredential, Options, TlsConfig,
};

struct Pem {
    cert: String,
    key: String,
}

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(p, key),
    }
}

fn leaf(ca: &Ca, cn: &str, server: bool) -> Pem {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    if server {
        p.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    } else {
        p.distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    }
    let cert = p.signed_by(&key, &ca.issuer).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

async fn client(kubeconfig: &str) -> kube::Client {
    let kc = Kubeconfig::from_yaml(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(config).unwrap()
}

async fn status_of<T: std::fmt::Debug>(r: kube::Result<T>) -> u16 {
    match r {
        Err(kube::Error::Api(s)) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn only_clients_of_the_ca_are_served() {
    let lab = ca("lab-ca");
    let server = leaf(&lab, "api", true);
    let admin = leaf(&lab, "admin", false);
    let stranger_ca = ca("other-ca");
    let stranger = leaf(&stranger_ca, "admin", false);

    let api = ApiServer::open(Options::default()).unwrap();
    let tls = TlsConfig::new(&lab.pem, &server.cert, &server.key).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(api.serve_tls(listener, tls));

    let cred = |c: &Pem| {
        kubeconfig_with_client_cert(
            &url,
            "tls-test",
            ClientCredential {
                server_ca_pem: &lab.pem,
                cert_pem: &c.cert,
                key_pem: &c.key,
            },
        )
    };
    let good = cred(&admin);
    let nss: kube::Api<Namespace> = kube::Api::all(client(&good).await);
    let listed = tokio::time::timeout(Duration::from_secs(10), nss.list(&Default::default()))
        .await
        .unwrap()
        .unwrap();
    assert!(listed
        .items
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some("default")));

    // Another CA's certificate, and no certificate at all: 401.
    let other: kube::Api<Namespace> = kube::Api::all(client(&cred(&stranger)).await);
    assert_eq!(status_of(other.list(&Default::default()).await).await, 401);
    let anonymous = good
        .lines()
        .filter(|l| !l.contains("client-certificate-data") && !l.contains("client-key-data"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("user:\n", "user: {}\n");
    let anon: kube::Api<Namespace> = kube::Api::all(client(&anonymous).await);
    assert_eq!(status_of(anon.list(&Default::default()).await).await, 401);

    // kubectl, from the same kubeconfig; and what it says without a certificate.
    if std::path::Path::new("/usr/bin/kubectl").exists() {
        let dir = tempfile::tempdir().unwrap();
        let kubectl = |kc: &str, args: &[&str]| {
            let path = dir.path().join("kc");
            std::fs::write(&path, kc).unwrap();
            std::process::Command::new("timeout")
                .args(["-k", "2", "30", "/usr/bin/kubectl", "--kubeconfig"])
                .arg(&path)
                .arg("--cache-dir")
                .arg(dir.path().join("cache"))
                .args(args)
                .output()
                .unwrap()
        };
        let out = kubectl(&good, &["get", "namespace", "default", "-o", "name"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "namespace/default"
        );
        // (kubectl prompts for a password for a user with no credentials at all: a guessed
        // token stands for them.)
        let guessed = anonymous.replace("user: {}", "user: {token: guessed}");
        for kc in [guessed, cred(&stranger)] {
            let out = kubectl(&kc, &["get", "namespaces"]);
            assert!(!out.status.success());
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("You must be logged in to the server (Unauthorized)"),
                "{err}"
            );
        }
    } else if std::env::var_os("CI").is_some() {
        panic!("kubectl not found (and CI is set)");
    }

    // Plain HTTP on the TLS port gets no answer from the API.
    let plain: kube::Api<Namespace> =
        kube::Api::all(client(&kube_plain(&url.replace("https://", "http://"))).await);
    assert!(plain.list(&Default::default()).await.is_err());
    task.abort();
}

fn kube_plain(url: &str) -> String {
    sluice_apiserver::kubeconfig(url, "plain")
}

#[test]
fn bad_pem_is_a_clear_error() {
    let lab = ca("lab-ca");
    let server = leaf(&lab, "api", true);
    let e = TlsConfig::new("not a certificate", &server.cert, &server.key).unwrap_err();
    assert!(e.to_string().contains("client CA"), "{e}");
    let e = TlsConfig::new(&lab.pem, &server.cert, "no key").unwrap_err();
    assert!(e.to_string().contains("serving key"), "{e}");
}
