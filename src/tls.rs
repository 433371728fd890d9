//! TLS on the ports huren serves: HTTPS on the node's and the registry's
//! HTTP port, and the server certificate of the node's DICOM TLS listener
//! (src/dicom/tls.rs). One rustls with the aws-lc-rs provider, the one the
//! outbound DICOM TLS and sqlx already use.
//!
//! The certificate and key are read again on SIGHUP and swapped behind a
//! resolver: handshakes after the reload get the new certificate, while
//! connections already open (HTTP keep-alive, DICOM associations) keep the
//! session they negotiated and are never dropped. A reload that fails (a
//! half-written file, a key that does not match) is logged and the running
//! certificate stays.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// The `[server_tls]` table of the node's config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// The node's certificate chain (PEM, leaf first): served on the HTTPS
    /// port and on the DICOM TLS listener. Read again on SIGHUP.
    pub certificate_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1). Read again on SIGHUP.
    pub private_key_file: PathBuf,
    /// Whether the DICOM TLS listener asks callers for a certificate
    /// (PS3.15 B.9 leaves peer authentication to the site).
    #[serde(default)]
    pub client_auth: ClientAuth,
    /// The CA certificates (PEM) a caller's certificate must chain to.
    pub client_ca_file: Option<PathBuf>,
    /// Calling AE title → the identity (subject CN or a subjectAltName: DNS
    /// name, IP address or e-mail) its certificate must carry. A listed AE
    /// title is admitted only with that certificate, so only over TLS; a
    /// certificate listed for one AE title cannot call as another.
    #[serde(default)]
    pub ae_binding: std::collections::BTreeMap<String, String>,
}

/// Client authentication on the DICOM TLS listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No certificate asked for: the association's AE title policy is the
    /// only gate (as on the plain listener).
    #[default]
    Off,
    /// A certificate is asked for; a caller without one is admitted, one
    /// with a certificate that does not chain to `client_ca_file` is not.
    Optional,
    /// Only callers with a certificate chaining to `client_ca_file`.
    Required,
}

impl ServerTlsConfig {
    /// The checks a config file can fail before anything is read.
    pub fn validate(&self) -> Result<(), String> {
        if self.client_auth != ClientAuth::Off && self.client_ca_file.is_none() {
            return Err(
                "client_auth needs client_ca_file, the CA its certificates chain to".into(),
            );
        }
        if !self.ae_binding.is_empty() && self.client_auth == ClientAuth::Off {
            return Err(
                "ae_binding needs client_auth = \"optional\" or \"required\": without a client certificate no AE title can be bound".into(),
            );
        }
        for ae in self.ae_binding.keys() {
            crate::types::AeTitle::parse(ae).map_err(|e| format!("ae_binding: {ae:?}: {e}"))?;
        }
        Ok(())
    }
}

/// Plain HTTP beside HTTPS is for tools on the same machine (a health
/// probe, a local script): anything that crosses the network is encrypted.
pub fn require_loopback(addr: SocketAddr, setting: &str) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{setting} {addr} is not a loopback address: with TLS configured, plain HTTP is served only on 127.0.0.1 or ::1"
        ))
    }
}

/// The aws-lc-rs provider restricted to the cipher suites of BCP 195
/// (RFC 9325 §4.2, the PS3.15 B.9 profile): the TLS 1.3 suites and, for
/// TLS 1.2, ECDHE key exchange with an AEAD cipher only. No RSA key
/// exchange, no CBC, no SHA-1 MAC.
pub fn bcp195_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as suite;
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_AES_128_GCM_SHA256,
        suite::TLS13_CHACHA20_POLY1305_SHA256,
        suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// TLS 1.2 and 1.3 only (BCP 195: never SSL, TLS 1.0 or 1.1).
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Something that reads its certificates again on SIGHUP.
pub trait Reload: Send + Sync {
    fn reload(&self) -> Result<(), String>;
}

/// The server certificate, swapped on reload. Every handshake asks the
/// resolver, so a reload takes effect at the next connection.
#[derive(Debug)]
pub struct CertificateResolver {
    certificate_file: PathBuf,
    private_key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertificateResolver {
    pub fn load(
        certificate_file: &Path,
        private_key_file: &Path,
    ) -> Result<Arc<CertificateResolver>, String> {
        let provider = bcp195_provider();
        let key = load_certified_key(certificate_file, private_key_file, &provider)?;
        Ok(Arc::new(CertificateResolver {
            certificate_file: certificate_file.to_path_buf(),
            private_key_file: private_key_file.to_path_buf(),
            provider,
            current: RwLock::new(Arc::new(key)),
        }))
    }
}

impl Reload for CertificateResolver {
    fn reload(&self) -> Result<(), String> {
        let key = load_certified_key(
            &self.certificate_file,
            &self.private_key_file,
            &self.provider,
        )?;
        *self.current.write().expect("certificate lock") = Arc::new(key);
        Ok(())
    }
}

impl ResolvesServerCert for CertificateResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("certificate lock").clone())
    }
}

fn load_certified_key(
    certificate_file: &Path,
    private_key_file: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, String> {
    let chain = read_certificates(certificate_file)?;
    let key = PrivateKeyDer::from_pem_file(private_key_file)
        .map_err(|e| format!("{}: {e}", private_key_file.display()))?;
    // from_der also checks that the key belongs to the leaf certificate: a
    // reload between writing the new certificate and the new key fails
    // here instead of serving a pair no client can verify.
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        format!(
            "{} and {}: {e}",
            certificate_file.display(),
            private_key_file.display()
        )
    })
}

/// Every certificate of a PEM file; an empty file is an error.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

/// The HTTPS configuration: BCP 195 like the DICOM side, HTTP/2 and
/// HTTP/1.1 by ALPN, no client certificates (HTTP callers present tokens).
pub fn https_config(
    resolver: Arc<CertificateResolver>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(bcp195_provider())
        .with_protocol_versions(PROTOCOL_VERSIONS)
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A TLS handshake that has not finished by then is dropped: a client
/// that opens connections and never speaks holds no task for long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What axum serves on: plain TCP or TLS over TCP.
pub enum HttpListener {
    Plain(TcpListener),
    Tls(TlsListener),
}

impl HttpListener {
    /// TLS on `listener`, handshakes run beside the accept loop.
    pub fn tls(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> HttpListener {
        HttpListener::Tls(TlsListener::new(listener, config))
    }
}

impl From<TcpListener> for HttpListener {
    fn from(listener: TcpListener) -> HttpListener {
        HttpListener::Plain(listener)
    }
}

/// Accepts TCP connections and hands axum those whose TLS handshake
/// completed. The handshakes run in their own tasks: a slow or silent
/// client does not hold up the next one.
pub struct TlsListener {
    local_addr: SocketAddr,
    handshaken: tokio::sync::mpsc::Receiver<(
        TlsStream<TcpStream>,
        SocketAddr,
        tokio::sync::OwnedSemaphorePermit,
    )>,
    /// Stops the accept task when axum drops the listener (shutdown).
    _stop: tokio_util::sync::DropGuard,
}

impl TlsListener {
    fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> TlsListener {
        let local_addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let stop = CancellationToken::new();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        // Handshakes under way count against the connection limit too: a
        // flood of silent TLS clients holds no more descriptors than it.
        let connections = Arc::new(tokio::sync::Semaphore::new(max_http_connections()));
        tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    let permit = tokio::select! {
                        permit = connections.clone().acquire_owned() => permit.expect("never closed"),
                        _ = stop.cancelled() => break,
                    };
                    let (tcp, peer) = tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok(accepted) => accepted,
                            Err(e) => {
                                // EMFILE and friends: back off instead of spinning.
                                tracing::warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            }
                        },
                        _ = stop.cancelled() => break,
                    };
                    // Responses stream in several writes: without
                    // TCP_NODELAY the last one waits for a delayed ACK.
                    let _ = tcp.set_nodelay(true);
                    let acceptor = acceptor.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => {
                                let _ = tx.send((tls, peer, permit)).await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                        }
                    });
                }
            }
        });
        TlsListener {
            local_addr,
            handshaken: rx,
            _stop: stop.drop_guard(),
        }
    }
}

/// The client's address, for handlers (audit messages name it), on the
/// plain and the TLS listener alike.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A client that has not sent a whole request head by then is
/// disconnected (hyper's `header_read_timeout`, from the connection's
/// start and between keep-alive requests): a half-sent request holds its
/// connection for no longer.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the node's and the registry's HTTP clients keep an idle pooled
/// connection: less than the servers' [`HEADER_READ_TIMEOUT`], after which
/// a kept-alive HTTP/1 connection is closed, so a client never sends on a
/// connection its server is closing.
pub const CLIENT_POOL_IDLE: Duration = Duration::from_secs(15);

/// Open HTTP connections (TLS handshakes under way included) one listener
/// serves at once; past it, new ones wait in the kernel's backlog. Slow
/// clients holding connections open can then shut out other HTTP clients
/// for a while, but never take the descriptors the DICOM port, the store
/// and the index need: a quarter of the process's limit (raised to its
/// hard limit at start), 4,096 at most.
pub fn max_http_connections() -> usize {
    let soft = open_files_limit().map_or(1024, |l| l.rlim_cur);
    ((soft / 4) as usize).clamp(64, 4096)
}

/// Raises the soft limit on open files to the hard limit, as servers do:
/// the default soft limit of a login shell (1,024) is fewer descriptors
/// than a busy node's connections and files need.
pub fn raise_open_files_limit() {
    if let Some(mut limit) = open_files_limit()
        && limit.rlim_cur < limit.rlim_max
    {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            tracing::debug!("the open files limit could not be raised");
        }
    }
}

/// The process's limit on open files (soft, hard).
fn open_files_limit() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

impl HttpListener {
    /// The next connection to serve, with its place under the connection
    /// limit (`plain` for a plain listener; a TLS listener keeps its own,
    /// taken before the handshake).
    async fn next(
        &mut self,
        plain: &Arc<tokio::sync::Semaphore>,
    ) -> (
        Either<TcpStream, TlsStream<TcpStream>>,
        SocketAddr,
        tokio::sync::OwnedSemaphorePermit,
    ) {
        match self {
            HttpListener::Plain(listener) => {
                let permit = plain.clone().acquire_owned().await.expect("never closed");
                loop {
                    match listener.accept().await {
                        Ok((tcp, peer)) => {
                            // Responses stream in several writes: without
                            // TCP_NODELAY the last one waits for a delayed ACK.
                            let _ = tcp.set_nodelay(true);
                            return (Either::Left(tcp), peer, permit);
                        }
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            HttpListener::Tls(listener) => match listener.handshaken.recv().await {
                Some((tls, peer, permit)) => (Either::Right(tls), peer, permit),
                // The accept task is gone only after `stop`, which is ours.
                None => std::future::pending().await,
            },
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            HttpListener::Plain(listener) => listener.local_addr(),
            HttpListener::Tls(listener) => Ok(listener.local_addr),
        }
    }
}

/// Serves `app` on `listener` until `shutdown`, then lets the connections
/// finish their requests (HTTP/1 closes after the current response, HTTP/2
/// gets GOAWAY). HTTP/1.1 and HTTP/2 (by ALPN on TLS, by prior knowledge on
/// plain TCP), with a deadline for each request head and a limit on open
/// connections (`axum::serve` has neither: a probe's 20,000 half-sent
/// request heads used up the process's descriptors, and the DICOM port
/// stopped accepting too).
pub async fn serve(
    mut listener: HttpListener,
    app: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let plain = Arc::new(tokio::sync::Semaphore::new(max_http_connections()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (io, peer, permit) = tokio::select! {
            next = listener.next(&plain) => next,
            _ = shutdown.cancelled() => break,
        };
        let app = app.clone();
        // The client's address reaches handlers as axum's ConnectInfo.
        let service = hyper::service::service_fn(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(PeerAddr(peer)));
                tower::ServiceExt::oneshot(app.clone(), request)
            },
        );
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        builder.http2().timer(TokioTimer::new());
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    // Stop accepting (the listener, and a TLS listener's accept task, go
    // with it), then wait for the connections' current requests.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Marks a request that came over the node's own HTTPS as a TLS proxy in
/// front would (`X-Forwarded-Proto: https`), replacing whatever the client
/// sent: the retrieve URLs of QIDO-RS and STOW-RS then say https, and the
/// page's cookie is `Secure`.
pub async fn mark_https(mut request: axum::extract::Request) -> axum::extract::Request {
    request.headers_mut().insert(
        "x-forwarded-proto",
        axum::http::HeaderValue::from_static("https"),
    );
    request
}

/// On the node's own HTTPS, browsers are told to come back over HTTPS
/// only, for a year (RFC 6797): a doctor's later visit typed as http://
/// cannot be served, or its session cookie read, in the clear. Not
/// `includeSubDomains`: the hospital's other hosts are not the node's to
/// decide.
pub async fn strict_transport_security(
    mut response: axum::response::Response,
) -> axum::response::Response {
    response.headers_mut().insert(
        axum::http::header::STRICT_TRANSPORT_SECURITY,
        axum::http::HeaderValue::from_static("max-age=31536000"),
    );
    response
}

/// Reads the certificates again on every SIGHUP until shutdown.
pub fn spawn_reload_on_sighup(targets: Vec<Arc<dyn Reload>>, shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGHUP: certificates will not be reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    received = hangup.recv() => if received.is_none() { break },
                    _ = shutdown.cancelled() => break,
                }
                let failures: Vec<String> =
                    targets.iter().filter_map(|t| t.reload().err()).collect();
                if failures.is_empty() {
                    tracing::info!(
                        "SIGHUP: TLS certificates reloaded; open connections keep theirs"
                    );
                } else {
                    for error in failures {
                        tracing::error!(%error, "SIGHUP: TLS reload failed; the running certificate stays");
                    }
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (targets, shutdown);
}

/// An HTTP client builder that also trusts the CA certificates of
/// `ca_file` (beside the system's roots): a region whose registry and nodes
/// carry certificates from the region's own CA.
pub fn trust_ca_file(
    builder: reqwest::ClientBuilder,
    ca_file: Option<&Path>,
) -> Result<reqwest::ClientBuilder, String> {
    let Some(path) = ca_file else {
        return Ok(builder);
    };
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(builder.tls_certs_merge(certs))
}

/// The client configuration: peers verified against the configured CA
/// certificates (and by host name or IP address), the node's own
/// certificate presented when one is configured.
pub fn client_config(
    ca_file: &Path,
    certificate_file: Option<&Path>,
    private_key_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", ca_file.display()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let tls = match (certificate_file, private_key_file) {
        (Some(cert_file), Some(key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", cert_file.display()))?;
            let key = PrivateKeyDer::from_pem_file(key_file)
                .map_err(|e| format!("{}: {e}", key_file.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| e.to_string())?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(tls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_beside_tls_is_loopback_only() {
        for (addr, ok) in [
            ("127.0.0.1:8081", true),
            ("[::1]:8081", true),
            ("0.0.0.0:8081", false),
            ("10.1.2.3:8081", false),
            ("[::]:8081", false),
        ] {
            let result = require_loopback(addr.parse().unwrap(), "http_plain_listen");
            assert_eq!(result.is_ok(), ok, "{addr}: {result:?}");
        }
    }

    #[test]
    fn validation() {
        let base = ServerTlsConfig {
            certificate_file: "c.pem".into(),
            private_key_file: "k.pem".into(),
            client_auth: ClientAuth::Off,
            client_ca_file: None,
            ae_binding: Default::default(),
        };
        let bound = [("CT1".to_string(), "ct1.example".to_string())].into();
        let cases: Vec<(ServerTlsConfig, bool)> = vec![
            (base.clone(), true),
            (
                ServerTlsConfig {
                    client_auth: ClientAuth::Required,
                    ..base.clone()
                },
                false,
            ),
            (
                ServerTlsConfig {
                    client_auth: ClientAuth::Required,
                    client_ca_file: Some("ca.pem".into()),
                    ae_binding: bound,
                    ..base.clone()
                },
                true,
            ),
            (
                ServerTlsConfig {
                    ae_binding: [("CT1".to_string(), "ct1".to_string())].into(),
                    ..base.clone()
                },
                false,
            ),
            (
                ServerTlsConfig {
                    client_auth: ClientAuth::Optional,
                    client_ca_file: Some("ca.pem".into()),
                    ae_binding: [("FAR TOO LONG AE TITLE".to_string(), "x".to_string())].into(),
                    ..base.clone()
                },
                false,
            ),
        ];
        for (config, ok) in cases {
            assert_eq!(config.validate().is_ok(), ok, "{config:?}");
        }
    }
}
