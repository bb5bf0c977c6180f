//! Optional TLS on the WebSocket listener: the rustls server configuration, built once at start-up
//! from a PEM certificate chain and private key and shared by every executor.
//!
//! TLS 1.3 and 1.2 with rustls' ring provider, ALPN `http/1.1` (the WebSocket upgrade is an
//! HTTP/1.1 request), no client certificates. Certificates are read at start-up only: rotating
//! one means restarting (draining) the gateway, or terminating TLS in a proxy in front of it.

use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// The ALPN protocol the listener offers: WebSocket upgrades are HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Reads `cert` (PEM certificates, the server's own first, then its intermediates) and `key` (one
/// PEM private key: PKCS#8, PKCS#1 or SEC1) and builds the server configuration. Every failure
/// names the file and what is wrong with it, so that a misconfigured gateway says so at start.
pub fn server_config(cert: &Path, key: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_error(e, cert, "certificate chain"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(e, cert, "certificate chain"))?;
    if chain.is_empty() {
        bail!("TLS certificate chain {}: no PEM certificate in it (-----BEGIN CERTIFICATE-----)", cert.display());
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        pem::Error::NoItemsFound => anyhow!(
            "TLS private key {}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1: -----BEGIN PRIVATE KEY-----)",
            key.display()
        ),
        e => pem_error(e, key, "private key"),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .with_context(|| {
            format!(
                "TLS certificate {} with private key {}: not a usable pair (the key must be the certificate's)",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

fn pem_error(e: pem::Error, path: &Path, what: &str) -> anyhow::Error {
    match e {
        pem::Error::Io(io) => anyhow!("reading TLS {what} {}: {io}", path.display()),
        e => anyhow!("TLS {what} {}: not valid PEM: {e}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `localhost` and its key, as PEM.
    fn self_signed() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn loads_a_pair_and_offers_http11() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let config = server_config(&write(&dir, "c.pem", &cert), &write(&dir, "k.pem", &key)).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn refuses_what_cannot_serve_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed();
        let (_, other_key) = self_signed();
        let cert_p = write(&dir, "c.pem", &cert);
        let key_p = write(&dir, "k.pem", &key);
        let err = |c: &Path, k: &Path| format!("{:#}", server_config(c, k).unwrap_err());

        let missing = dir.path().join("missing.pem");
        let e = err(&missing, &key_p);
        assert!(e.contains("missing.pem") && e.contains("reading TLS certificate chain"), "{e}");
        let e = err(&cert_p, &missing);
        assert!(e.contains("missing.pem") && e.contains("reading TLS private key"), "{e}");

        // The files swapped: no certificate in the key file, no key in the certificate file.
        let e = err(&key_p, &cert_p);
        assert!(e.contains("k.pem") && e.contains("no PEM certificate"), "{e}");
        let e = err(&cert_p, &cert_p);
        assert!(e.contains("no PEM private key"), "{e}");

        // A key that is not the certificate's.
        let e = err(&cert_p, &write(&dir, "other.pem", &other_key));
        assert!(e.contains("not a usable pair"), "{e}");

        // Broken PEM.
        let broken = write(&dir, "broken.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        let e = err(&broken, &key_p);
        assert!(e.contains("broken.pem") && e.contains("not valid PEM"), "{e}");
    }
}
