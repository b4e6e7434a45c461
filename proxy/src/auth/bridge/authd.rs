//! How the bridge reaches authd: the endpoint (`http://`, or `https://`
//! trusting `IBEX_AUTHD_CA_FILE` or the system roots) and the service key
//! every internal call carries (`x-ibex-service-key`, SPEC §6).

use std::path::Path;

use secrecy::{ExposeSecret, SecretString};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// Metadata name of the service key.
const SERVICE_KEY_HEADER: &str = "x-ibex-service-key";

/// The service key as a metadata value, parsed once; cheap to clone into
/// each request (it is reference-counted bytes), marked sensitive so no
/// debug output of a request shows it.
#[derive(Clone)]
pub(super) struct ServiceKey(AsciiMetadataValue);

impl ServiceKey {
    pub(super) fn new(key: &SecretString) -> anyhow::Result<ServiceKey> {
        let mut value = AsciiMetadataValue::try_from(key.expose_secret()).map_err(|_| {
            anyhow::anyhow!("IBEX_SERVICE_KEY must be a valid header value (printable ASCII)")
        })?;
        value.set_sensitive(true);
        Ok(ServiceKey(value))
    }

    /// `message` with the key attached.
    pub(super) fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert(SERVICE_KEY_HEADER, self.0.clone());
        request
    }
}

/// `http://` as is; `https://` with TLS trusting `ca_file` (PEM) or, without
/// one, the system roots.
pub fn endpoint(url: &str, ca_file: Option<&Path>) -> anyhow::Result<Endpoint> {
    let endpoint = Endpoint::from_shared(url.to_owned())?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = ClientTlsConfig::new();
    let tls = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("IBEX_AUTHD_CA_FILE {}: {e}", path.display()))?;
            tls.ca_certificate(Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    Ok(endpoint.tls_config(tls)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_rides_on_every_request_and_is_sensitive() {
        let key = ServiceKey::new(&SecretString::from("k".repeat(32))).unwrap();
        let request = key.request(());
        let value = request.metadata().get(SERVICE_KEY_HEADER).unwrap();
        assert_eq!(value.as_bytes(), "k".repeat(32).as_bytes());
        assert!(value.is_sensitive());
        assert!(ServiceKey::new(&SecretString::from("line\nbreak".to_owned())).is_err());
    }

    #[test]
    fn https_needs_a_readable_ca_file() {
        assert!(endpoint("http://127.0.0.1:9091", None).is_ok());
        assert!(endpoint("https://authd:9091", Some(Path::new("/nonexistent.pem"))).is_err());
    }
}
