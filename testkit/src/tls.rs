//! TLS for tests: certificates generated at test time (never a committed private key) and the
//! client side that trusts them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore, SupportedProtocolVersion};

/// A self-signed server certificate for `localhost` and `127.0.0.1`, generated now.
pub struct TestCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCert {
    pub fn generate() -> TestCert {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let c = rcgen::generate_simple_self_signed(names).expect("generating a test certificate");
        TestCert { cert_pem: c.cert.pem(), key_pem: c.signing_key.serialize_pem() }
    }

    /// Writes `cert.pem` and `key.pem` (mode 0600) into `dir`; returns their paths.
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        use std::os::unix::fs::OpenOptionsExt as _;
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, &self.cert_pem).expect("writing cert.pem");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .expect("creating key.pem");
        std::io::Write::write_all(&mut f, self.key_pem.as_bytes()).expect("writing key.pem");
        (cert, key)
    }

    /// A client configuration that trusts this certificate (and nothing else).
    pub fn client(&self) -> ClientTls {
        ClientTls::trusting(&self.cert_pem)
    }
}

/// The client side of `wss://` in tests: a rustls client configuration with its own trust.
#[derive(Clone)]
pub struct ClientTls(pub Arc<ClientConfig>);

impl ClientTls {
    /// Trusts the certificates in `pem` only; TLS 1.3 and 1.2; offers ALPN `http/1.1`, as
    /// browsers do for WebSocket.
    pub fn trusting(pem: &str) -> ClientTls {
        Self::with_versions(pem, rustls::DEFAULT_VERSIONS)
    }

    /// Like [`ClientTls::trusting`] with only these protocol versions (e.g.
    /// `&[&rustls::version::TLS12]`).
    pub fn with_versions(pem: &str, versions: &[&'static SupportedProtocolVersion]) -> ClientTls {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.expect("PEM certificate")).expect("a certificate rustls accepts as a root");
        }
        assert!(!roots.is_empty(), "no certificate in the PEM given to ClientTls");
        let mut config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        ClientTls(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use rustls::{ClientConnection, ServerConfig, ServerConnection};

    fn server(cert: &TestCert) -> Arc<ServerConfig> {
        let chain = vec![CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Runs a handshake in memory; the first error either side reports.
    fn handshake(client: &ClientTls, server: Arc<ServerConfig>, name: &str) -> Result<ClientConnection, rustls::Error> {
        let mut c = ClientConnection::new(client.0.clone(), ServerName::try_from(name.to_owned()).unwrap())?;
        let mut s = ServerConnection::new(server)?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c);
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn a_generated_certificate_is_trusted_by_its_client_only() {
        let cert = TestCert::generate();
        for name in ["127.0.0.1", "localhost"] {
            let c = handshake(&cert.client(), server(&cert), name).expect("handshake");
            assert_eq!(c.alpn_protocol(), Some(&b"http/1.1"[..]));
        }
        let tls12 = ClientTls::with_versions(&cert.cert_pem, &[&rustls::version::TLS12]);
        let c = handshake(&tls12, server(&cert), "127.0.0.1").expect("TLS 1.2 handshake");
        assert_eq!(c.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));

        // Another certificate, or another name, is refused.
        let other = TestCert::generate();
        assert!(handshake(&other.client(), server(&cert), "127.0.0.1").is_err());
        assert!(handshake(&cert.client(), server(&cert), "example.com").is_err());

        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = cert.write_to(dir.path());
        assert_eq!(std::fs::read_to_string(cert_path).unwrap(), cert.cert_pem);
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(key_path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
