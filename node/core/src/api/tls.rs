//! TLS for the API: the node's certificate and key, what a client trusts,
//! and a self-signed pair for runs without a CA (`murmur api-cert`).
//!
//! Why: a control token sent over plain HTTP/2 beyond one machine can be
//! read off the wire and replayed. With `--api-tls-cert/--api-tls-key` the
//! node serves gRPC over TLS 1.3 only, and clients dial `https://HOST:PORT`,
//! trusting `--api-ca FILE` (the self-signed certificate itself, or the CA
//! that signed it) or else the system's roots.

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The node's certificate chain and private key, read and checked.
#[derive(Clone)]
pub struct ApiTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    /// Where they came from (for messages; never the key's contents).
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls").field("cert_path", &self.cert_path).finish_non_exhaustive()
    }
}

/// Reads `path` and checks it holds a PEM block whose label ends in `label`.
fn read_pem(flag: &str, path: &Path, label: &str) -> Result<Vec<u8>, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read {flag} {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .any(|l| l.ends_with(label));
    if !found {
        return Err(format!("{flag} {} holds no PEM {label} block", path.display()));
    }
    Ok(bytes)
}

impl ApiTls {
    /// The pair from `--api-tls-cert` and `--api-tls-key` (PEM files).
    pub fn load(cert: &Path, key: &Path) -> Result<ApiTls, String> {
        Ok(ApiTls {
            cert: read_pem("--api-tls-cert", cert, "CERTIFICATE")?,
            key: read_pem("--api-tls-key", key, "PRIVATE KEY")?,
            cert_path: cert.to_path_buf(),
        })
    }

    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key))
    }
}

/// What a client trusts for `https://` addresses: `ca` (a PEM file), or
/// the system's roots.
pub fn client_config(ca: Option<&Path>) -> Result<ClientTlsConfig, String> {
    match ca {
        Some(path) => {
            let pem = read_pem("--api-ca", path, "CERTIFICATE")?;
            Ok(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
        }
        None => Ok(ClientTlsConfig::new().with_native_roots()),
    }
}

/// A self-signed certificate for `hosts` (names or IP addresses) and its
/// key, both PEM: for runs without a CA, where clients trust the
/// certificate itself (`--api-ca CERT`).
pub fn self_signed(hosts: &[String]) -> Result<(String, String), String> {
    let pair = rcgen::generate_simple_self_signed(hosts.to_vec())
        .map_err(|e| format!("cannot make a certificate for {hosts:?}: {e}"))?;
    Ok((pair.cert.pem(), pair.key_pair.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_pair_loads_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(&["127.0.0.1".into(), "localhost".into()]).unwrap();
        let (c, k) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        let tls = ApiTls::load(&c, &k).unwrap();
        assert!(!format!("{tls:?}").contains("PRIVATE"), "the key never shows in Debug");
        assert!(client_config(Some(&c)).is_ok());
        // Swapped, missing, and not PEM at all: each names the file and flag.
        let swapped = ApiTls::load(&k, &c).unwrap_err();
        assert!(swapped.contains("--api-tls-cert") && swapped.contains("key.pem"), "{swapped}");
        let missing = ApiTls::load(&dir.path().join("none.pem"), &k).unwrap_err();
        assert!(missing.contains("cannot read --api-tls-cert"), "{missing}");
        std::fs::write(dir.path().join("junk"), "hello").unwrap();
        let junk = client_config(Some(&dir.path().join("junk"))).unwrap_err();
        assert!(junk.contains("--api-ca") && junk.contains("no PEM CERTIFICATE"), "{junk}");
    }
}
