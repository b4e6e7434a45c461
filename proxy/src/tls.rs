//! TLS on the public listener (SPEC §3.2): the certificate and key files,
//! the rustls server configuration built from them, and its reload on
//! `SIGHUP`.
//!
//! One [`TlsState`] per process holds the current configuration; each worker
//! keeps a [`WorkerTls`] that hands out an acceptor and picks up a reloaded
//! configuration at its next accept (one relaxed atomic load per accept, no
//! lock unless the generation changed). Connections already open keep the
//! configuration they were accepted with.
//!
//! Choices: TLS 1.3 only unless `IBEX_TLS_MIN_VERSION=1.2`; ALPN `http/1.1`
//! (a client offering only `h2` is refused by rustls); ECDSA, RSA and Ed25519
//! keys in PKCS#8, PKCS#1 or SEC1 PEM; session resumption by tickets from
//! rustls' rotating ticketer (a fresh random key every 6 hours, the previous
//! one kept to decrypt, nothing written to disk), so no ticket key outlives
//! its rotation and none is shared with another process.
//!
//! Not here: the handshake itself and its deadline (the server's accept
//! path), and anything HTTP: the codec never knows whether a connection is
//! TLS.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context};
use monoio_rustls::TlsAcceptor;
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Lowest protocol version the public listener accepts (`IBEX_TLS_MIN_VERSION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    Tls12,
    /// TLS 1.3 only (the default).
    #[default]
    Tls13,
}

impl FromStr for MinVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1.3" => Ok(MinVersion::Tls13),
            "1.2" => Ok(MinVersion::Tls12),
            _ => Err("must be 1.2 or 1.3".to_owned()),
        }
    }
}

impl fmt::Display for MinVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MinVersion::Tls12 => "1.2",
            MinVersion::Tls13 => "1.3",
        })
    }
}

/// Where the certificate chain and its key are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// `IBEX_TLS_CERT_FILE`: PEM, leaf first.
    pub cert: PathBuf,
    /// `IBEX_TLS_KEY_FILE`: PEM private key matching the leaf.
    pub key: PathBuf,
    /// `IBEX_TLS_MIN_VERSION`.
    pub min_version: MinVersion,
}

/// Reads both files and builds the server configuration. Errors name the
/// file and what is wrong with it, never its contents.
pub fn build_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let certs = read_certs(&files.cert)?;
    let key = read_key(&files.key)?;
    let provider = Arc::new(ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match files.min_version {
        MinVersion::Tls13 => &[&rustls::version::TLS13],
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .context("TLS protocol versions")?
        .with_no_client_auth()
        // `with_single_cert` checks that the key matches the leaf's public key.
        .with_single_cert(certs, key)
        .map_err(|e| {
            anyhow!(
                "IBEX_TLS_KEY_FILE ({}) does not fit IBEX_TLS_CERT_FILE ({}): {e}",
                files.key.display(),
                files.cert.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ticketer = ring::Ticketer::new().context("TLS session ticketer")?;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("IBEX_TLS_CERT_FILE: cannot open {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("IBEX_TLS_CERT_FILE: cannot read {}", path.display()))?;
    if certs.is_empty() {
        bail!(
            "IBEX_TLS_CERT_FILE: no PEM certificate in {}",
            path.display()
        );
    }
    Ok(certs)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("IBEX_TLS_KEY_FILE: cannot open {}", path.display()))?;
    // The parser's own error could quote a fragment of the file: not passed on.
    match rustls_pemfile::private_key(&mut BufReader::new(file)) {
        Ok(Some(key)) => Ok(key),
        Ok(None) => bail!(
            "IBEX_TLS_KEY_FILE: no PEM private key in {}",
            path.display()
        ),
        Err(_) => bail!("IBEX_TLS_KEY_FILE: cannot read {}", path.display()),
    }
}

/// The process's current TLS configuration, replaced by [`TlsState::reload`].
pub struct TlsState {
    files: TlsFiles,
    generation: AtomicU64,
    current: Mutex<Arc<ServerConfig>>,
}

impl TlsState {
    /// Loads the pair; refuses (an error naming the file) if it is unusable.
    pub fn load(files: TlsFiles) -> anyhow::Result<Arc<TlsState>> {
        let config = build_config(&files)?;
        Ok(Arc::new(TlsState {
            files,
            generation: AtomicU64::new(0),
            current: Mutex::new(config),
        }))
    }

    /// Re-reads both files. On error the previous pair stays in use and the
    /// error says why; new connections use the new pair from the next accept.
    pub fn reload(&self) -> anyhow::Result<()> {
        let config = build_config(&self.files)?;
        *self.lock() = config;
        self.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// How many successful reloads happened.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Arc<ServerConfig>> {
        // A panic while holding this lock cannot leave the Arc half-written.
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One worker's view of [`TlsState`].
pub struct WorkerTls {
    state: Arc<TlsState>,
    seen: Cell<u64>,
    acceptor: RefCell<TlsAcceptor>,
}

impl WorkerTls {
    pub fn new(state: Arc<TlsState>) -> WorkerTls {
        let seen = state.generation();
        let acceptor = TlsAcceptor::from(state.current());
        WorkerTls {
            state,
            seen: Cell::new(seen),
            acceptor: RefCell::new(acceptor),
        }
    }

    /// The acceptor for a connection accepted now.
    pub fn acceptor(&self) -> TlsAcceptor {
        let generation = self.state.generation();
        if generation != self.seen.get() {
            *self.acceptor.borrow_mut() = TlsAcceptor::from(self.state.current());
            self.seen.set(generation);
        }
        self.acceptor.borrow().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Pair {
        dir: PathBuf,
        files: TlsFiles,
    }

    impl Drop for Pair {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn pair(name: &str, alg: &'static rcgen::SignatureAlgorithm) -> Pair {
        let dir = std::env::temp_dir().join(format!("ibex-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // rcgen (ring) cannot generate RSA keys: those come from the openssl CLI.
        let key = if *alg == rcgen::PKCS_RSA_SHA256 {
            let out = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                ])
                .output()
                .unwrap();
            assert!(out.status.success(), "openssl genpkey");
            rcgen::KeyPair::from_pem_and_sign_algo(&String::from_utf8(out.stdout).unwrap(), alg)
                .unwrap()
        } else {
            rcgen::KeyPair::generate_for(alg).unwrap()
        };
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = TlsFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            min_version: MinVersion::Tls13,
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        Pair { dir, files }
    }

    #[test]
    fn loads_ecdsa_and_rsa_pairs_with_alpn_http11() {
        for (name, alg) in [
            ("ecdsa", &rcgen::PKCS_ECDSA_P256_SHA256),
            ("rsa", &rcgen::PKCS_RSA_SHA256),
        ] {
            let p = pair(name, alg);
            let config = build_config(&p.files).unwrap();
            assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()], "{name}");
            assert!(
                config.ticketer.enabled(),
                "{name}: resumption by rotating tickets"
            );
        }
    }

    #[test]
    fn refuses_missing_empty_and_mismatched_files() {
        let p = pair("bad", &rcgen::PKCS_ECDSA_P256_SHA256);
        let other = pair("other", &rcgen::PKCS_ECDSA_P256_SHA256);

        let missing = TlsFiles {
            cert: p.dir.join("nope.pem"),
            ..p.files.clone()
        };
        let e = format!("{:#}", build_config(&missing).unwrap_err());
        assert!(
            e.contains("IBEX_TLS_CERT_FILE") && e.contains("nope.pem"),
            "{e}"
        );

        std::fs::write(p.dir.join("empty.pem"), "").unwrap();
        let empty_key = TlsFiles {
            key: p.dir.join("empty.pem"),
            ..p.files.clone()
        };
        let e = format!("{:#}", build_config(&empty_key).unwrap_err());
        assert!(e.contains("IBEX_TLS_KEY_FILE"), "{e}");

        let mismatched = TlsFiles {
            key: other.files.key.clone(),
            ..p.files.clone()
        };
        let e = format!("{:#}", build_config(&mismatched).unwrap_err());
        assert!(e.contains("does not fit"), "{e}");
        assert!(!e.contains("PRIVATE KEY"), "no key material in errors: {e}");
    }

    #[test]
    fn reload_swaps_the_pair_and_keeps_the_old_one_on_error() {
        let p = pair("reload", &rcgen::PKCS_ECDSA_P256_SHA256);
        let state = TlsState::load(p.files.clone()).unwrap();
        let worker = WorkerTls::new(state.clone());
        let before = worker.acceptor();
        drop(before);
        let first = state.current();

        std::fs::write(&p.files.key, "garbage").unwrap();
        assert!(state.reload().is_err());
        assert_eq!(state.generation(), 0);
        assert!(Arc::ptr_eq(&first, &state.current()), "old pair kept");

        let fresh = pair("reload2", &rcgen::PKCS_ECDSA_P256_SHA256);
        std::fs::copy(&fresh.files.cert, &p.files.cert).unwrap();
        std::fs::copy(&fresh.files.key, &p.files.key).unwrap();
        state.reload().unwrap();
        assert_eq!(state.generation(), 1);
        assert!(!Arc::ptr_eq(&first, &state.current()));
        let _ = worker.acceptor();
        assert_eq!(worker.seen.get(), 1, "the worker picked up the reload");
    }

    #[test]
    fn min_version_parses_only_known_values() {
        assert_eq!("1.2".parse::<MinVersion>(), Ok(MinVersion::Tls12));
        assert_eq!("1.3".parse::<MinVersion>(), Ok(MinVersion::Tls13));
        assert!("1.1".parse::<MinVersion>().is_err());
        assert_eq!(MinVersion::default(), MinVersion::Tls13);
    }
}
