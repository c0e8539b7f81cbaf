//! TLS configuration shared by every link of a node: the client API, the
//! peer transport and the replication API (server and client side).
//!
//! Certificates, keys and CA bundles given as files are reloaded without a
//! restart: a handshake that starts at least `RELOAD_CHECK_INTERVAL` after
//! the last check compares the files' modification time and length, and
//! reloads them when they changed. A file that fails to load is reported
//! (once per change) and the last good material stays in use, so a
//! half-written rotation never takes a node off the air.
//!
//! A server may require client certificates signed by a CA (mutual TLS)
//! and, further, allow only certificates whose subject common name is in a
//! list. Key material is never printed: the `Debug` forms name files only.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::Error;

/// How often, at most, files are checked for a change.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Where PEM material comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum Pem {
    /// Bytes held in memory (tests, embedded use); never reloaded.
    Inline(Vec<u8>),
    /// A file, reloaded when it changes.
    File(PathBuf),
}

impl std::fmt::Debug for Pem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pem::Inline(bytes) => write!(f, "Inline({} bytes)", bytes.len()),
            Pem::File(path) => write!(f, "File({})", path.display()),
        }
    }
}

impl Pem {
    fn describe(&self) -> String {
        match self {
            Pem::Inline(_) => "inline PEM".to_string(),
            Pem::File(path) => path.display().to_string(),
        }
    }

    fn read(&self) -> Result<Vec<u8>, String> {
        match self {
            Pem::Inline(bytes) => Ok(bytes.clone()),
            Pem::File(path) => {
                std::fs::read(path).map_err(|error| format!("read {}: {error}", path.display()))
            }
        }
    }

    /// The file's modification time and length; `None` for inline PEM or
    /// a file that cannot be read (then a later change is noticed).
    fn stamp(&self) -> Option<(SystemTime, u64)> {
        match self {
            Pem::Inline(_) => None,
            Pem::File(path) => {
                let metadata = std::fs::metadata(path).ok()?;
                Some((metadata.modified().ok()?, metadata.len()))
            }
        }
    }
}

/// A certificate chain and its private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The certificate chain, leaf first.
    pub certificate_chain: Pem,
    /// The private key of the leaf certificate.
    pub key: Pem,
}

/// The server side of a TLS listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTlsOptions {
    /// The server's certificate and key.
    pub identity: Identity,
    /// When set, clients must present a certificate signed by one of these
    /// CAs (mutual TLS).
    pub client_ca: Option<Pem>,
    /// When not empty (and `client_ca` is set), only client certificates
    /// whose subject common name is listed are accepted.
    pub allowed_common_names: Vec<String>,
    /// ALPN protocols offered, e.g. `h2` for gRPC; empty for none.
    pub alpn_protocols: Vec<Vec<u8>>,
}

/// The client side of a TLS connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTlsOptions {
    /// The CAs that sign the servers' certificates.
    pub ca: Pem,
    /// The client's certificate and key, for servers that require one.
    pub identity: Option<Identity>,
    /// ALPN protocols asked for, e.g. `h2` for gRPC; empty for none.
    pub alpn_protocols: Vec<Vec<u8>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Builds a value from the contents of its PEM sources, in order.
type Build<T> = dyn Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync;

/// A value built from PEM sources, rebuilt when a source file changes.
struct Reloading<T: Clone> {
    what: &'static str,
    sources: Vec<Pem>,
    build: Box<Build<T>>,
    state: Mutex<ReloadState<T>>,
}

struct ReloadState<T> {
    value: T,
    stamps: Vec<Option<(SystemTime, u64)>>,
    checked_at: Instant,
}

impl<T: Clone> Reloading<T> {
    /// Builds the value now; an error here is a configuration error.
    fn new(
        what: &'static str,
        sources: Vec<Pem>,
        build: impl Fn(&[Vec<u8>]) -> Result<T, String> + Send + Sync + 'static,
    ) -> Result<Reloading<T>, Error> {
        let stamps = sources.iter().map(Pem::stamp).collect();
        let value =
            Self::load(&sources, &build).map_err(|error| Error::Tls(format!("{what}: {error}")))?;
        Ok(Reloading {
            what,
            sources,
            build: Box::new(build),
            state: Mutex::new(ReloadState {
                value,
                stamps,
                checked_at: Instant::now(),
            }),
        })
    }

    fn load(sources: &[Pem], build: &Build<T>) -> Result<T, String> {
        let mut contents = Vec::with_capacity(sources.len());
        for source in sources {
            contents.push(source.read()?);
        }
        build(&contents)
    }

    /// The current value, reloading first when a file changed.
    fn current(&self) -> T {
        let mut state = match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        };
        if state.checked_at.elapsed() >= RELOAD_CHECK_INTERVAL {
            state.checked_at = Instant::now();
            let stamps: Vec<_> = self.sources.iter().map(Pem::stamp).collect();
            if stamps != state.stamps {
                // Remember the new stamps even on failure: a broken file is
                // reported once, and retried when it changes again.
                state.stamps = stamps;
                match Self::load(&self.sources, self.build.as_ref()) {
                    Ok(value) => {
                        state.value = value;
                        tracing::info!(what = self.what, files = ?self.describe(), "TLS material reloaded");
                    }
                    Err(error) => tracing::warn!(
                        what = self.what,
                        "TLS material changed but cannot be loaded, keeping the previous one: {error}"
                    ),
                }
            }
        }
        state.value.clone()
    }

    fn describe(&self) -> Vec<String> {
        self.sources.iter().map(Pem::describe).collect()
    }
}

impl<T: Clone> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("sources", &self.sources)
            .finish_non_exhaustive()
    }
}

fn certificates(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("reading the {what}: {error}"))?;
    if certificates.is_empty() {
        return Err(format!("the {what} file holds no certificate"));
    }
    Ok(certificates)
}

fn root_store(pem: &[u8]) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates(pem, "CA certificate")? {
        roots
            .add(certificate)
            .map_err(|error| format!("adding a CA certificate: {error}"))?;
    }
    Ok(Arc::new(roots))
}

fn certified_key(contents: &[Vec<u8>]) -> Result<Arc<CertifiedKey>, String> {
    let [chain, key] = contents else {
        return Err("an identity needs a certificate and a key".into());
    };
    let chain = certificates(chain, "certificate")?;
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|error| format!("reading the private key: {error}"))?;
    let certified = CertifiedKey::from_der(chain, key, &provider())
        .map_err(|error| format!("the certificate and key do not form an identity: {error}"))?;
    Ok(Arc::new(certified))
}

/// Serves (and presents, as a client) the current certificate.
#[derive(Debug)]
struct IdentityResolver {
    identity: Reloading<Arc<CertifiedKey>>,
}

impl IdentityResolver {
    fn new(identity: &Identity) -> Result<IdentityResolver, Error> {
        Ok(IdentityResolver {
            identity: Reloading::new(
                "certificate",
                vec![identity.certificate_chain.clone(), identity.key.clone()],
                certified_key,
            )?,
        })
    }
}

impl rustls::server::ResolvesServerCert for IdentityResolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.identity.current())
    }
}

impl rustls::client::ResolvesClientCert for IdentityResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.identity.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The subject common names of a DER certificate.
pub fn common_names(certificate: &[u8]) -> Result<Vec<String>, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate)
        .map_err(|error| format!("parsing the certificate: {error}"))?;
    let names = parsed
        .subject()
        .iter_common_name()
        .filter_map(|name| name.as_str().ok().map(str::to_string))
        .collect();
    Ok(names)
}

/// Handshake signature checks, the same for both verifiers: the chain
/// check is what differs, the signature algorithms are the provider's.
fn verify_tls12(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

fn verify_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Verifies client certificates against the (reloaded) CA bundle, then
/// checks the allowed common names.
#[derive(Debug)]
struct ClientVerifier {
    inner: Reloading<Arc<dyn ClientCertVerifier>>,
    allowed_common_names: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .current()
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed_common_names.is_empty() {
            return Ok(verified);
        }
        let names = common_names(end_entity).map_err(rustls::Error::General)?;
        if names
            .iter()
            .any(|name| self.allowed_common_names.contains(name))
        {
            Ok(verified)
        } else {
            tracing::warn!(common_names = ?names, "refused a client certificate: common name not allowed");
            Err(rustls::Error::General(format!(
                "client certificate common name {names:?} is not allowed"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies server certificates against the (reloaded) CA bundle.
#[derive(Debug)]
struct ServerVerifier {
    inner: Reloading<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.current().verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls server configuration from `options`; files are read now (a
/// missing or bad file is an error) and reloaded when they change.
pub fn server_config(options: &ServerTlsOptions) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = provider();
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| Error::Tls(format!("choosing protocol versions: {error}")))?;
    let builder = match &options.client_ca {
        Some(ca) => {
            let verifier_provider = Arc::clone(&provider);
            let inner = Reloading::new("client CA", vec![ca.clone()], move |contents| {
                let roots = root_store(&contents[0])?;
                let verifier: Arc<dyn ClientCertVerifier> =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(
                        roots,
                        Arc::clone(&verifier_provider),
                    )
                    .build()
                    .map_err(|error| format!("building the client verifier: {error}"))?;
                Ok(verifier)
            })?;
            builder.with_client_cert_verifier(Arc::new(ClientVerifier {
                inner,
                allowed_common_names: options.allowed_common_names.clone(),
                provider: Arc::clone(&provider),
            }))
        }
        None => {
            if !options.allowed_common_names.is_empty() {
                return Err(Error::Tls(
                    "allowed common names need a client CA (mutual TLS)".into(),
                ));
            }
            builder.with_no_client_auth()
        }
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(IdentityResolver::new(&options.identity)?));
    config.alpn_protocols = options.alpn_protocols.clone();
    Ok(Arc::new(config))
}

/// A rustls client configuration from `options`; files are read now and
/// reloaded when they change.
pub fn client_config(options: &ClientTlsOptions) -> Result<Arc<rustls::ClientConfig>, Error> {
    let provider = provider();
    let verifier_provider = Arc::clone(&provider);
    let inner = Reloading::new("CA", vec![options.ca.clone()], move |contents| {
        let roots = root_store(&contents[0])?;
        rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::clone(&verifier_provider),
        )
        .build()
        .map_err(|error| format!("building the server verifier: {error}"))
    })?;
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| Error::Tls(format!("choosing protocol versions: {error}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerVerifier {
            inner,
            provider: Arc::clone(&provider),
        }));
    let mut config = match &options.identity {
        Some(identity) => {
            builder.with_client_cert_resolver(Arc::new(IdentityResolver::new(identity)?))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = options.alpn_protocols.clone();
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: `override_name`
/// when given, else the host it connects to (an IP address or a DNS name).
pub fn server_name(host: &str, override_name: Option<&str>) -> Result<ServerName<'static>, Error> {
    let name = override_name.unwrap_or(host);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(name.to_string())
        .map_err(|error| Error::Tls(format!("{name:?} is not a valid server name: {error}")))
}
