//! Certificates made at test time: a throwaway CA and leaf certificates it signs, written as PEM
//! files into a temp dir that lives as long as the value (authd's gRPC TLS, Postgres `ssl=on`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA whose certificate is at [`TestCa::ca_file`].
pub struct TestCa {
    key: KeyPair,
    cert: rcgen::Certificate,
    dir: tempfile::TempDir,
}

/// A leaf certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl TestCa {
    pub fn new(name: &str) -> Result<TestCa> {
        let key = KeyPair::generate().context("CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).context("CA certificate")?;
        let dir = tempfile::Builder::new().prefix("ibex-certs-").tempdir()?;
        std::fs::write(dir.path().join("ca.pem"), cert.pem())?;
        Ok(TestCa { key, cert, dir })
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A leaf for `names` (DNS names or IP addresses), files `<stem>.crt` and `<stem>.key`.
    pub fn issue(&self, stem: &str, names: &[&str]) -> Result<Leaf> {
        let key = KeyPair::generate().context("leaf key")?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, stem.to_owned());
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .context("leaf certificate")?;
        let leaf = Leaf {
            cert_file: self.dir.path().join(format!("{stem}.crt")),
            key_file: self.dir.path().join(format!("{stem}.key")),
        };
        std::fs::write(&leaf.cert_file, cert.pem())?;
        std::fs::write(&leaf.key_file, key.serialize_pem())?;
        Ok(leaf)
    }
}
