//! `serve --web-config FILE`: TLS (optionally with client certificates) and
//! basic auth for `/metrics` and `/healthz`, in the web configuration
//! format of the Prometheus exporter toolkit, the file node_exporter and
//! the other exporters take, so one file serves a fleet:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt           # paths relative to this file
//!   key_file: server.key
//!   client_auth_type: RequireAndVerifyClientCert   # or VerifyClientCertIfGiven, NoClientCert
//!   client_ca_file: ca.crt
//!   min_version: TLS12              # or TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...          # bcrypt, as `htpasswd -nBC 10` makes
//! ```
//!
//! Keys of the format that socktrace does not implement (cipher suites,
//! curves, HTTP headers) are refused by name rather than ignored.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use base64::Engine as _;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde::Deserialize;
use subtle::ConstantTimeEq as _;
use tokio::sync::Semaphore;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebConfigFile {
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: ClientAuth,
    client_ca_file: Option<PathBuf>,
    min_version: Option<TlsVersion>,
}

/// The toolkit's names; RequestClientCert and RequireAnyClientCert, which
/// take a certificate without verifying it, are not offered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
enum ClientAuth {
    #[default]
    NoClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum TlsVersion {
    TLS12,
    TLS13,
}

/// What `--web-config` asks of the HTTP side.
pub struct WebConfig {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub auth: BasicAuth,
}

impl WebConfig {
    /// Serving plain HTTP to anyone, as without `--web-config`.
    pub fn open() -> Self {
        Self {
            tls: None,
            auth: BasicAuth::none(),
        }
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--web-config {}", path.display()))?;
        Self::parse(&text, path.parent().unwrap_or(Path::new(".")))
            .with_context(|| format!("--web-config {}", path.display()))
    }

    /// `dir` is where relative paths in the file start.
    pub fn parse(text: &str, dir: &Path) -> anyhow::Result<Self> {
        // An empty file is the toolkit's "no TLS, no auth".
        let file: WebConfigFile = if text.trim().is_empty() {
            WebConfigFile {
                tls_server_config: None,
                basic_auth_users: BTreeMap::new(),
            }
        } else {
            serde_yaml_ng::from_str(text)?
        };
        for (user, hash) in &file.basic_auth_users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                bail!("the password of basic_auth_users.{user} is not a bcrypt hash");
            }
        }
        let tls = file
            .tls_server_config
            .map(|tls| tls.server_config(dir))
            .transpose()?;
        Ok(Self {
            tls: tls.map(Arc::new),
            auth: BasicAuth::new(file.basic_auth_users.into_iter().collect()),
        })
    }

    /// Whether what is served is for whoever can connect.
    pub fn is_open(&self) -> bool {
        self.tls.is_none() && self.auth.users.is_empty()
    }
}

impl TlsFile {
    fn server_config(self, dir: &Path) -> anyhow::Result<rustls::ServerConfig> {
        let path = |file: &Path| dir.join(file);
        let cert_file = path(&self.cert_file);
        let certs = CertificateDer::pem_file_iter(&cert_file)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("reading cert_file {}", cert_file.display()))?;
        if certs.is_empty() {
            bail!("cert_file {} holds no certificate", cert_file.display());
        }
        let key_file = path(&self.key_file);
        let key = PrivateKeyDer::from_pem_file(&key_file)
            .with_context(|| format!("reading key_file {}", key_file.display()))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            Some(TlsVersion::TLS13) => &[&rustls::version::TLS13],
            Some(TlsVersion::TLS12) | None => rustls::ALL_VERSIONS,
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .context("choosing the TLS versions")?;
        let builder = match (self.client_auth_type, &self.client_ca_file) {
            (ClientAuth::NoClientCert, _) => builder.with_no_client_auth(),
            (_, None) => bail!(
                "client_auth_type {:?} needs a client_ca_file",
                self.client_auth_type
            ),
            (auth, Some(ca_file)) => {
                let ca_file = path(ca_file);
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(&ca_file)
                    .with_context(|| format!("reading client_ca_file {}", ca_file.display()))?
                {
                    let cert = cert
                        .with_context(|| format!("reading client_ca_file {}", ca_file.display()))?;
                    roots.add(cert).with_context(|| {
                        format!("a certificate of client_ca_file {}", ca_file.display())
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = match auth {
                    ClientAuth::VerifyClientCertIfGiven => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                builder.with_client_cert_verifier(
                    verifier
                        .build()
                        .context("the client certificate verifier")?,
                )
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .context("the certificate and its key")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// Checks `Authorization: Basic` against the bcrypt hashes. bcrypt takes
/// tens of milliseconds on purpose: it runs off the collector's thread, one
/// at a time, and a password once verified is remembered (compared in
/// constant time), so a scrape every few seconds costs one hash, once.
pub struct BasicAuth {
    users: HashMap<String, String>,
    verified: Mutex<HashMap<String, Vec<u8>>>,
    hashing: Semaphore,
}

impl BasicAuth {
    fn none() -> Self {
        Self::new(HashMap::new())
    }

    fn new(users: HashMap<String, String>) -> Self {
        Self {
            users,
            verified: Mutex::new(HashMap::new()),
            hashing: Semaphore::new(1),
        }
    }

    pub fn required(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether an `Authorization` header value names a user and its password.
    pub async fn admits(&self, authorization: Option<&[u8]>) -> bool {
        let Some((user, password)) = authorization.and_then(basic_credentials) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };
        if self.remembers(&user, &password) {
            return true;
        }
        let Ok(_turn) = self.hashing.acquire().await else {
            return false;
        };
        let hash = hash.clone();
        let candidate = password.clone();
        let verified = tokio::task::spawn_blocking(move || bcrypt::verify(candidate, &hash))
            .await
            .is_ok_and(|result| result.unwrap_or(false));
        if verified && let Ok(mut remembered) = self.verified.lock() {
            remembered.insert(user, password);
        }
        verified
    }

    fn remembers(&self, user: &str, password: &[u8]) -> bool {
        let Ok(remembered) = self.verified.lock() else {
            return false;
        };
        remembered
            .get(user)
            .is_some_and(|known| bool::from(known.as_slice().ct_eq(password)))
    }
}

/// `Basic dXNlcjpwYXNz` -> ("user", b"pass").
fn basic_credentials(header: &[u8]) -> Option<(String, Vec<u8>)> {
    let header = std::str::from_utf8(header).ok()?;
    let (scheme, encoded) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = String::from_utf8(decoded[..colon].to_vec()).ok()?;
    Some((user, decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_toolkit_format_and_refuses_what_it_does_not_implement() {
        let dir = Path::new("/nonexistent");
        let empty = WebConfig::parse("", dir).unwrap();
        assert!(empty.is_open());

        let hash = bcrypt::hash("secret", 4).unwrap();
        let auth_only =
            WebConfig::parse(&format!("basic_auth_users:\n  alice: {hash}\n"), dir).unwrap();
        assert!(auth_only.auth.required() && auth_only.tls.is_none());

        let unknown = WebConfig::parse("tls_server_config:\n  cipher_suites: []\n", dir);
        let said = format!("{:#}", unknown.err().unwrap());
        assert!(said.contains("cipher_suites"), "{said}");

        let not_bcrypt = WebConfig::parse("basic_auth_users:\n  alice: plaintext\n", dir);
        let said = format!("{:#}", not_bcrypt.err().unwrap());
        assert!(
            said.contains("basic_auth_users.alice is not a bcrypt hash"),
            "{said}"
        );

        let unverified = "tls_server_config:\n  cert_file: a\n  key_file: b\n  client_auth_type: RequireAnyClientCert\n";
        assert!(WebConfig::parse(unverified, dir).is_err());
        let missing = WebConfig::parse("tls_server_config:\n  cert_file: a\n  key_file: b\n", dir);
        let said = format!("{:#}", missing.err().unwrap());
        assert!(said.contains("reading cert_file /nonexistent/a"), "{said}");
    }

    #[test]
    fn basic_credentials_are_decoded() {
        assert_eq!(
            basic_credentials(b"Basic YWxpY2U6czNjcjN0OjE="),
            Some(("alice".to_string(), b"s3cr3t:1".to_vec()))
        );
        assert_eq!(basic_credentials(b"Bearer YWxpY2U6czNjcjN0"), None);
        assert_eq!(basic_credentials(b"Basic !!!"), None);
        assert_eq!(basic_credentials(b"Basic YWxpY2U="), None);
    }

    #[tokio::test]
    async fn a_password_is_checked_against_its_hash() {
        let hash = bcrypt::hash("secret", 4).unwrap();
        let auth = BasicAuth::new(HashMap::from([("alice".to_string(), hash)]));
        let header = |creds: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(creds)
            )
        };
        assert!(auth.admits(Some(header("alice:secret").as_bytes())).await);
        // Now remembered; still only the right one.
        assert!(auth.admits(Some(header("alice:secret").as_bytes())).await);
        assert!(!auth.admits(Some(header("alice:wrong").as_bytes())).await);
        assert!(!auth.admits(Some(header("bob:secret").as_bytes())).await);
        assert!(!auth.admits(None).await);
    }
}
