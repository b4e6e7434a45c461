//! Postgres DSNs with `sslmode` (and `sslrootcert`), the libpq way, through rustls.
//!
//! tokio-postgres parses `disable`, `prefer` and `require` only, knows no `sslrootcert`, and
//! verifies nothing by itself; so both parameters are taken out of the DSN here and turned into a
//! rustls client config:
//!
//! | `sslmode` | what happens |
//! |---|---|
//! | unset, `disable`, `allow`, `prefer` | plain TCP (as before; `prefer` does not prove anything) |
//! | `require` | TLS; the certificate is not checked, unless `sslrootcert` is given (then as `verify-ca`) |
//! | `verify-ca` | TLS; the chain must lead to `sslrootcert` (or the system roots); any host name |
//! | `verify-full` | as `verify-ca`, and the certificate must name the host connected to |
//!
//! Used by authd's pool, its LISTEN connection, and `ibexctl migrate`/`seed`/`audit verify`.

use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error as TlsError, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// The TLS connector every Postgres connection uses (unused when `sslmode` asks for none).
pub type Connector = MakeRustlsConnect;

/// How certificates are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// No TLS.
    Off,
    /// TLS, certificate not checked (`require` without `sslrootcert`).
    Encrypt,
    /// Chain checked, host name not (`verify-ca`).
    Chain,
    /// Chain and host name checked (`verify-full`).
    Full,
}

/// A parsed DSN: what tokio-postgres takes, plus the connector that enforces `sslmode`.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    pub connector: Connector,
    pub verify: Verify,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config may carry a password: never print it.
        f.debug_struct("Database")
            .field("verify", &self.verify)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Parses a DSN (URL or `key=value` form) honouring `sslmode` and `sslrootcert`.
    pub fn from_url(dsn: &str) -> anyhow::Result<Database> {
        let (clean, sslmode, rootcert) = split_tls_params(dsn);
        let mut config: tokio_postgres::Config =
            clean.parse().context("not a valid Postgres DSN")?;
        let verify = match sslmode.as_deref() {
            None | Some("disable" | "allow" | "prefer") => Verify::Off,
            Some("require") if rootcert.is_some() => Verify::Chain,
            Some("require") => Verify::Encrypt,
            Some("verify-ca") => Verify::Chain,
            Some("verify-full") => Verify::Full,
            Some(other) => bail!(
                "sslmode={other:?}: expected disable, prefer, require, verify-ca or verify-full"
            ),
        };
        config.ssl_mode(if verify == Verify::Off {
            SslMode::Disable
        } else {
            SslMode::Require
        });
        let connector = MakeRustlsConnect::new(client_config(verify, rootcert.as_deref())?);
        Ok(Database {
            config,
            connector,
            verify,
        })
    }

    /// One connection, driven on a background task.
    pub async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = self.config.connect(self.connector.clone()).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::warn!(error = %err, "postgres connection ended");
            }
        });
        Ok(client)
    }
}

fn client_config(verify: Verify, rootcert: Option<&str>) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let config = match verify {
        Verify::Off | Verify::Encrypt => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth(),
        Verify::Chain | Verify::Full => {
            let roots = Arc::new(roots(rootcert)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()
                .context("building the certificate verifier")?;
            if verify == Verify::Full {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(AnyName(webpki)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(config)
}

/// `sslrootcert` (PEM, one or more certificates), else the system roots.
fn roots(rootcert: Option<&str>) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    match rootcert {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("sslrootcert {path}"))?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                roots
                    .add(cert.with_context(|| format!("sslrootcert {path}"))?)
                    .with_context(|| format!("sslrootcert {path}"))?;
            }
            anyhow::ensure!(!roots.is_empty(), "sslrootcert {path} holds no certificate");
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "no system root certificates found: set sslrootcert"
            );
        }
    }
    Ok(roots)
}

/// Removes `sslmode` and `sslrootcert` from a DSN; returns (rest, sslmode, sslrootcert).
pub fn split_tls_params(dsn: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let mut take = |key: &str, value: String| match key {
        "sslmode" => {
            mode = Some(value);
            true
        }
        "sslrootcert" => {
            root = Some(value);
            true
        }
        _ => false,
    };
    let clean = if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        match dsn.split_once('?') {
            None => dsn.to_owned(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        !take(key, percent_decode(value))
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        dsn.split_whitespace()
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key.trim(), value.trim_matches('\'').to_owned())
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (clean, mode, root)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `require`: encrypt, prove nothing about the server (libpq's meaning of the mode).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must verify; the name in the certificate may be any.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_params_are_taken_out_of_both_dsn_forms() {
        let (clean, mode, root) = split_tls_params(
            "postgres://u:p@db.example:5432/ibex?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x",
        );
        assert_eq!(
            clean,
            "postgres://u:p@db.example:5432/ibex?application_name=x"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca.pem"));
        let (clean, mode, root) =
            split_tls_params("host=db user=u sslmode=require sslrootcert=/ca.pem dbname=ibex");
        assert_eq!(clean, "host=db user=u dbname=ibex");
        assert_eq!(mode.as_deref(), Some("require"));
        assert_eq!(root.as_deref(), Some("/ca.pem"));
        let (clean, mode, _) = split_tls_params("postgres://u@h/ibex");
        assert_eq!((clean.as_str(), mode), ("postgres://u@h/ibex", None));
    }

    #[test]
    fn modes_map_to_verification() {
        let verify = |dsn: &str| Database::from_url(dsn).map(|d| d.verify).ok();
        assert_eq!(verify("postgres://u@h/ibex"), Some(Verify::Off));
        assert_eq!(
            verify("postgres://u@h/ibex?sslmode=prefer"),
            Some(Verify::Off)
        );
        assert_eq!(
            verify("postgres://u@h/ibex?sslmode=require"),
            Some(Verify::Encrypt)
        );
        assert!(verify("postgres://u@h/ibex?sslmode=bogus").is_none());
        assert!(
            verify("postgres://u@h/ibex?sslmode=verify-full&sslrootcert=/nonexistent").is_none(),
            "a missing root file is an error, not a silent downgrade"
        );
        let dbg = format!(
            "{:?}",
            Database::from_url("postgres://u:hunter2@h/ibex").expect("dsn")
        );
        assert!(!dbg.contains("hunter2"));
    }
}
