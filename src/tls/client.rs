//! TLS as a client: to service instances (`protocol: https | h2`, `services[].tls`) and to
//! Consul (`https://` addresses, `consul.ca_file` ...). One function turns the settings into a
//! `rustls::ClientConfig`: the roots (a CA file, or the system's), an optional client
//! certificate (mTLS), ALPN, and — only when asked, with a warning at start — no verification.
//!
//! Files are read and checked when the config is applied, so a bad one fails the start (exit
//! 2 naming the key) or is refused by a reload, never a request.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tracing::warn;

use super::{provider, read_chain, read_key, refused, warn_if_exposed, Reason, TlsError};

/// How to reach one kind of TLS server, with the config keys to name in errors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientTls {
    /// Where these settings come from (`services[2].tls`, `consul`): errors name its keys.
    pub key: String,
    /// PEM CA bundle; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain and key (mTLS).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Accept any server certificate (tests, bootstrapping). Warned about at start.
    pub insecure_skip_verify: bool,
    /// Verify the server's certificate for this name instead of the address dialled.
    pub server_name: Option<String>,
}

/// The rustls client config for `settings`, offering `alpn` (e.g. `[b"h2"]`).
pub fn client_config(settings: &ClientTls, alpn: &[&[u8]]) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| refused(&settings.key, Reason::Setup(e)))?;
    let builder = if settings.insecure_skip_verify {
        warn!(key = %settings.key, "insecure_skip_verify: server certificates are not verified");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification))
    } else {
        // `dangerous()` is only rustls's door to a custom verifier: this one is WebPKI's,
        // optionally for a configured name.
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier(settings)?)
    };
    let mut config = match &settings.identity {
        Some((cert_file, key_file)) => {
            let cert_key = format!("{}.cert_file", settings.key);
            let chain = read_chain(&cert_key, cert_file)?;
            let key_key = format!("{}.key_file", settings.key);
            warn_if_exposed(&key_key, key_file);
            let key = read_key(&key_key, key_file)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| refused(cert_key, Reason::Setup(e)))?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// WebPKI verification against the roots, for `server_name` when one is set.
fn verifier(settings: &ClientTls) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let roots = Arc::new(roots(settings)?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| {
            refused(
                &settings.key,
                Reason::Setup(rustls::Error::General(e.to_string())),
            )
        })?;
    let Some(name) = &settings.server_name else {
        return Ok(webpki);
    };
    let name = ServerName::try_from(name.clone()).map_err(|_| {
        refused(
            format!("{}.server_name", settings.key),
            Reason::Setup(rustls::Error::General(format!(
                "{name:?} is not a DNS name or IP"
            ))),
        )
    })?;
    Ok(Arc::new(NameOverride {
        inner: webpki,
        name,
    }))
}

/// The CA file's certificates, or the system's roots.
fn roots(settings: &ClientTls) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => add_ca_file(&mut roots, &format!("{}.ca_file", settings.key), path)?,
        None => {
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                warn!(%error, "reading the system's CA certificates");
            }
            let (added, _) = roots.add_parsable_certificates(native.certs);
            if added == 0 {
                return Err(refused(
                    format!("{}.ca_file", settings.key),
                    Reason::NoSystemRoots,
                ));
            }
        }
    }
    Ok(roots)
}

fn add_ca_file(roots: &mut RootCertStore, key: &str, path: &Path) -> Result<(), TlsError> {
    for certificate in read_chain(key, path)? {
        roots
            .add(certificate)
            .map_err(|e| refused(key, Reason::Setup(e)))?;
    }
    Ok(())
}

/// Verifies a certificate for a configured name rather than the address dialled (Consul's
/// `tls_server_name`, a service's `tls.server_name`).
#[derive(Debug)]
struct NameOverride {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for NameOverride {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Accepts every server certificate: `insecure_skip_verify: true` only.
#[derive(Debug)]
struct NoVerification;

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
