//! The cluster's certificates, keys and kubeconfigs, written under its temp dir: one CA
//! for every serving and client certificate (as kubeadm's single-CA layout), client
//! certificates whose subject names the user and group the API server's RBAC and Node
//! authorizers know (`system:kube-scheduler`, `system:node:<name>` in `system:nodes`…),
//! and one ECDSA key that signs and verifies ServiceAccount tokens.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::KeyPair;

use crate::tls::{IssuedCert, TestCa};

/// A certificate and key written to `<name>.crt` / `<name>.key`.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster CA and the files every component needs.
pub struct Pki {
    dir: PathBuf,
    ca: TestCa,
    pub ca_file: PathBuf,
    /// The ServiceAccount token signing key and its public half.
    pub service_account_key: PathBuf,
    pub service_account_pub: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Result<Pki> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca = TestCa::new().context("creating the cluster CA")?;
        let ca_file = dir.join("ca.crt");
        write(&ca_file, &ca.cert_pem())?;
        let service_account_key = dir.join("service-account.key");
        let key = KeyPair::generate().context("generating the ServiceAccount key")?;
        write(&service_account_key, &key.serialize_pem())?;
        let service_account_pub = dir.join("service-account.pub");
        write(&service_account_pub, &key.public_key_pem())?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_file,
            service_account_key,
            service_account_pub,
        })
    }

    /// The CA certificate in PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// Issues `<name>.crt`/`.key` for this user and group, valid for these names.
    pub fn issue(
        &self,
        name: &str,
        user: &str,
        group: Option<&str>,
        names: &[&str],
    ) -> Result<CertFiles> {
        let issued: IssuedCert = self
            .ca
            .issue_named(user, group, names)
            .with_context(|| format!("issuing the {name} certificate"))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        write(&files.cert, &issued.cert_pem)?;
        write(&files.key, &issued.key_pem)?;
        Ok(files)
    }

    /// A kubeconfig for `server` authenticating with a client certificate of `user`
    /// (and `group`), written to `<name>.kubeconfig`.
    pub fn kubeconfig(
        &self,
        name: &str,
        server: &str,
        user: &str,
        group: Option<&str>,
    ) -> Result<PathBuf> {
        let cert = self.issue(name, user, group, &[])?;
        let path = self.dir.join(format!("{name}.kubeconfig"));
        write(&path, &kubeconfig_yaml(server, &self.ca_file, &cert))?;
        Ok(path)
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn kubeconfig_yaml(server: &str, ca: &Path, cert: &CertFiles) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: warmroll-testbed
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: user
  user:
    client-certificate: {cert}
    client-key: {key}
contexts:
- name: warmroll-testbed
  context:
    cluster: warmroll-testbed
    user: user
current-context: warmroll-testbed
",
        ca = ca.display(),
        cert = cert.cert.display(),
        key = cert.key.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_parses_with_server_ca_and_client_certificate() {
        let yaml = kubeconfig_yaml(
            "https://10.200.0.1:6443",
            Path::new("/t/ca.crt"),
            &CertFiles {
                cert: "/t/a.crt".into(),
                key: "/t/a.key".into(),
            },
        );
        let config = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
        assert_eq!(config.current_context.as_deref(), Some("warmroll-testbed"));
        let cluster = config.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.200.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/t/ca.crt"));
        let user = config.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(user.client_certificate.as_deref(), Some("/t/a.crt"));
        assert_eq!(user.client_key.as_deref(), Some("/t/a.key"));
    }
}
