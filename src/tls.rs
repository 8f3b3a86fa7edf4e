//! TLS termination: certificates, the SNI resolver, the handshake, and certificate rotation.
//!
//! rustls with the *aws-lc-rs* crypto provider (less CPU per full handshake than *ring*: see
//! Cargo.toml). TLS 1.3 and 1.2; ALPN `h2` and `http/1.1`.
//!
//! - [`Certificates`] is one immutable set, loaded from `tls.certificates[]`: PEM chains and
//!   their keys (RSA or ECDSA; PKCS#8, SEC1 or PKCS#1), each checked at load (parses, key
//!   matches the leaf, leaf not expired). It maps the names each leaf is valid for (its DNS
//!   subject alternative names, `*.example.com` wildcards too; the common name when it has
//!   none) to the certificate.
//! - The resolver holds the current set behind an `ArcSwap`: a handshake loads it once and
//!   picks by SNI (no SNI or an unknown name: the first certificate). A reload stores a new
//!   set; handshakes already done keep theirs. A set that fails to load is not stored.
//! - [`TlsTerminator::accept`] runs one handshake under a deadline and counts its result in
//!   `switchyard_tls_handshakes_total{result}`.
//!
//! - [`client`]: TLS as a client, to instances (`protocol: https | h2`) and to Consul.
//!
//! This module reads config types and metric handles; it knows nothing of HTTP.

pub mod client;

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::CipherSuite;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::config::CertificateConfig;
use crate::metrics::HandshakeMetrics;

/// A leaf that expires sooner than this gets a warning at each load.
const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// A certificate or key that cannot be used, naming its config key
/// (`tls.certificates[1].key_file`).
#[derive(Debug, thiserror::Error)]
#[error("invalid `{key}`: {reason}")]
pub struct TlsError {
    pub key: String,
    pub reason: Reason,
}

/// Why a certificate or key was refused.
#[derive(Debug, thiserror::Error)]
pub enum Reason {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("no PEM `CERTIFICATE` block")]
    NoCertificate,
    #[error("no PEM private key (`PRIVATE KEY`, `EC PRIVATE KEY` or `RSA PRIVATE KEY`)")]
    NoKey,
    #[error("not an X.509 certificate: {0}")]
    BadCertificate(String),
    #[error("expired on {0}")]
    Expired(String),
    #[error("not valid before {0}")]
    NotYetValid(String),
    #[error("unsupported private key: {0}")]
    BadKey(rustls::Error),
    #[error("does not match the certificate of `{0}`")]
    KeyMismatch(String),
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
    #[error("no ca_file given and no CA certificate found in the system's store")]
    NoSystemRoots,
}

fn refused(key: impl Into<String>, reason: Reason) -> TlsError {
    TlsError {
        key: key.into(),
        reason,
    }
}

/// The crypto provider of every TLS object of the gateway (and reqwest's default): the one
/// place it is named.
fn crypto() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// [`crypto`], shared.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(crypto())
}

/// The suites whose handshake hashes with SHA-256 (AES-128-GCM and ChaCha20, TLS 1.3 and 1.2).
const SHA256_SUITES: [CipherSuite; 6] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The provider for the TLS listener, with the SHA-256 suites first (AES-128-GCM, then ChaCha20):
/// clients (OpenSSL's, so curl's and wrk's) list `TLS_AES_256_GCM_SHA384` first, whose key
/// schedule and transcript hash with SHA-384, which few CPUs have instructions for, while
/// SHA-256 runs on the SHA extensions most x86-64 and ARMv8 CPUs have. `perf` put 8.8% of the
/// gateway's CPU under full handshakes in SHA-512 blocks (1.3% in SHA-256 blocks after; *ring*).
/// Key exchange groups: the provider's defaults (X25519, P-256, P-384 and the post-quantum
/// hybrid X25519MLKEM768); in TLS 1.3 rustls takes the client's first one it supports.
/// `TLS_AES_128_GCM_SHA256` is the suite every TLS 1.3 client must offer (RFC 8446 §9.1).
fn listener_provider() -> Arc<CryptoProvider> {
    let mut provider = crypto();
    // A stable sort: SHA-256 suites first, in the provider's order; the rest keep theirs.
    provider
        .cipher_suites
        .sort_by_key(|suite| !SHA256_SUITES.contains(&suite.suite()));
    Arc::new(provider)
}

/// Makes *aws-lc-rs* the process's default rustls provider, which reqwest (built without a provider
/// of its own) needs before any client is built. Idempotent; call it before building one.
pub fn install_default_provider() {
    // An error only means a default is installed already.
    let _ = crypto().install_default();
}

/// One loaded, checked set of certificates and the names that select them.
#[derive(Debug)]
pub struct Certificates {
    keys: Vec<Arc<CertifiedKey>>,
    /// Lower-case DNS name -> index in `keys`; the first certificate with a name wins.
    exact: HashMap<Box<str>, usize>,
    /// `*.example.com` stored as `example.com`.
    wildcard: HashMap<Box<str>, usize>,
}

impl Certificates {
    /// Reads and checks every file of `configs` (at least one). The first error is returned.
    pub fn load(configs: &[CertificateConfig]) -> Result<Self, TlsError> {
        let provider = provider();
        let mut set = Certificates {
            keys: Vec::with_capacity(configs.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        };
        for (i, config) in configs.iter().enumerate() {
            let (key, names) = load_one(&format!("tls.certificates[{i}]"), config, &provider)?;
            for name in names {
                let map = match name.strip_prefix("*.") {
                    Some(_) => &mut set.wildcard,
                    None => &mut set.exact,
                };
                let name = name.strip_prefix("*.").unwrap_or(&name);
                map.entry(name.into()).or_insert(i);
            }
            set.keys.push(Arc::new(key));
        }
        if set.keys.is_empty() {
            return Err(refused("tls.certificates", Reason::NoCertificate));
        }
        Ok(set)
    }

    /// The certificate for `server_name` (SNI): an exact name, else a wildcard one label up,
    /// else the first.
    pub fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let index = server_name.and_then(|name| {
            let lower;
            let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                lower = name.to_ascii_lowercase();
                lower.as_str()
            } else {
                name
            };
            let name = name.trim_end_matches('.');
            self.exact.get(name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        &self.keys[index.copied().unwrap_or(0)]
    }

    /// How many certificates the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Loads one chain and key; returns them with the names the leaf is valid for.
fn load_one(
    key: &str,
    config: &CertificateConfig,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Vec<String>), TlsError> {
    let cert_key = format!("{key}.cert_file");
    let key_key = format!("{key}.key_file");
    let chain = read_chain(&cert_key, &config.cert_file)?;
    let names = check_leaf(&cert_key, &chain[0])?;
    let private = read_key(&key_key, &config.key_file)?;
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| refused(&key_key, Reason::BadKey(e)))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => Ok((certified, names)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok((certified, names))
        }
        Err(_) => Err(refused(key_key, Reason::KeyMismatch(cert_key))),
    }
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| {
        refused(
            key,
            Reason::Read {
                path: path.display().to_string(),
                source,
            },
        )
    })
}

fn read_chain(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(key, path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| refused(key, Reason::BadCertificate(e.to_string())))?;
    if chain.is_empty() {
        return Err(refused(key, Reason::NoCertificate));
    }
    Ok(chain)
}

fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    warn_if_exposed(key, path);
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => refused(key, Reason::NoKey),
        other => refused(
            key,
            Reason::BadKey(rustls::Error::General(other.to_string())),
        ),
    })
}

/// A private key readable by group or other is worth a warning (nginx and sshd agree).
fn warn_if_exposed(key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(metadata) = std::fs::metadata(path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o044 != 0 {
            warn!(
                key,
                path = %path.display(),
                mode = format_args!("{mode:03o}"),
                "private key is readable by group or other; chmod 600 it"
            );
        }
    }
}

/// Checks the leaf's validity period; returns the DNS names it is valid for (lower case).
fn check_leaf(key: &str, der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let (_, leaf) = X509Certificate::from_der(der.as_ref())
        .map_err(|e| refused(key, Reason::BadCertificate(e.to_string())))?;
    let validity = leaf.validity();
    let now = x509_parser::time::ASN1Time::now();
    if validity.not_after < now {
        return Err(refused(
            key,
            Reason::Expired(validity.not_after.to_string()),
        ));
    }
    if validity.not_before > now {
        return Err(refused(
            key,
            Reason::NotYetValid(validity.not_before.to_string()),
        ));
    }
    if validity
        .time_to_expiration()
        .is_some_and(|left| left.whole_seconds() < EXPIRY_WARNING.as_secs() as i64)
    {
        warn!(key, not_after = %validity.not_after, "certificate expires soon");
    }
    Ok(leaf_names(&leaf))
}

fn leaf_names(leaf: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        // No DNS SAN: the common name, as older certificates carry it.
        names.extend(
            leaf.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

/// Picks a certificate per handshake from the current set.
#[derive(Debug)]
struct Resolver {
    current: ArcSwap<Certificates>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().pick(hello.server_name()).clone())
    }
}

/// What the TLS listener needs: its certificates and how long a handshake may take.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub certificates: Vec<CertificateConfig>,
    /// `server.header_read_timeout`: a handshake counts against the time to the request head.
    pub handshake_timeout: Duration,
}

/// Accepts TLS connections with the current certificates; reloadable.
pub struct TlsTerminator {
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    handshakes: HandshakeMetrics,
}

impl TlsTerminator {
    /// Loads the certificates of `settings` and builds the server config.
    pub fn new(settings: &TlsSettings, handshakes: HandshakeMetrics) -> Result<Self, TlsError> {
        let certificates = Certificates::load(&settings.certificates)?;
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(certificates),
        });
        let setup = |e| refused("tls", Reason::Setup(e));
        let mut config = rustls::ServerConfig::builder_with_provider(listener_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(setup)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // The listener's suite order, not the client's (see `listener_provider`).
        config.ignore_client_order = true;
        // Stateless resumption: a returning client skips the key exchange's signature.
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(setup)?;
        Ok(Self {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: settings.handshake_timeout,
            handshakes,
        })
    }

    /// Re-reads `certificates`: new handshakes get the new set, open connections keep theirs.
    /// A set that does not load is logged (naming the key) and the running one kept.
    pub fn reload(&self, certificates: &[CertificateConfig]) -> Result<(), TlsError> {
        match Certificates::load(certificates) {
            Ok(set) => {
                info!(certificates = set.len(), "TLS certificates reloaded");
                self.resolver.current.store(Arc::new(set));
                Ok(())
            }
            Err(err) => {
                error!(error = %err, "TLS certificates rejected; keeping the running ones");
                Err(err)
            }
        }
    }

    /// Runs the server side of a handshake on `stream`, bounded by the handshake timeout.
    /// `None` (counted and logged at debug) when it failed or took too long.
    ///
    /// HTTP then follows the negotiated ALPN on its own: a client that settled on `h2` opens
    /// with the HTTP/2 preface, which the connection reads first.
    pub async fn accept<S>(&self, stream: S) -> Option<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let handshake = self.acceptor.accept(stream);
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(stream)) => {
                self.handshakes.ok.inc();
                Some(stream)
            }
            Ok(Err(error)) => {
                self.handshakes.error.inc();
                debug!(%error, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.handshakes.timeout.inc();
                debug!(timeout = ?self.handshake_timeout, "TLS handshake timed out");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str, names: &[&str]) -> CertificateConfig {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let config = CertificateConfig {
            cert_file: dir.join(format!("{name}.pem")),
            key_file: dir.join(format!("{name}.key")),
        };
        std::fs::write(&config.cert_file, cert.pem()).unwrap();
        std::fs::write(&config.key_file, key.serialize_pem()).unwrap();
        config
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("switchyard-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first() {
        let dir = temp_dir("pick");
        let default = write_pair(&dir, "a", &["default.test"]);
        let site = write_pair(&dir, "b", &["site.test", "*.apps.test"]);
        let set = Certificates::load(&[default, site]).unwrap();
        let pick = |name: Option<&str>| {
            let chosen = set.pick(name);
            set.keys
                .iter()
                .position(|k| Arc::ptr_eq(k, chosen))
                .unwrap()
        };
        assert_eq!(pick(Some("site.test")), 1);
        assert_eq!(pick(Some("SITE.test")), 1);
        assert_eq!(pick(Some("x.apps.test")), 1);
        assert_eq!(
            pick(Some("y.x.apps.test")),
            0,
            "a wildcard covers one label"
        );
        assert_eq!(pick(Some("apps.test")), 0);
        assert_eq!(pick(Some("unknown.test")), 0);
        assert_eq!(pick(None), 0);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_key_of_another_certificate_is_named() {
        let dir = temp_dir("mismatch");
        let one = write_pair(&dir, "a", &["a.test"]);
        let two = write_pair(&dir, "b", &["b.test"]);
        let crossed = CertificateConfig {
            cert_file: one.cert_file.clone(),
            key_file: two.key_file.clone(),
        };
        let err = Certificates::load(&[one, crossed]).unwrap_err();
        assert_eq!(err.key, "tls.certificates[1].key_file", "{err}");
        assert!(matches!(err.reason, Reason::KeyMismatch(_)), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let dir = temp_dir("bad");
        let good = write_pair(&dir, "a", &["a.test"]);
        let missing = CertificateConfig {
            cert_file: dir.join("nope.pem"),
            key_file: good.key_file.clone(),
        };
        let err = Certificates::load(&[missing]).unwrap_err();
        assert_eq!(err.key, "tls.certificates[0].cert_file");
        std::fs::write(dir.join("junk"), "not pem").unwrap();
        let junk_key = CertificateConfig {
            cert_file: good.cert_file.clone(),
            key_file: dir.join("junk"),
        };
        let err = Certificates::load(&[junk_key]).unwrap_err();
        assert_eq!(err.key, "tls.certificates[0].key_file");
        assert!(err.to_string().contains("no PEM private key"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
