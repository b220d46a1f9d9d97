//! The node's gRPC endpoint: `grpc.health.v1.Health` and, on a node with inference workers, the
//! Open Inference Protocol (`inference.GRPCInferenceService`), over plaintext, TLS or mutual TLS
//! (`[node] grpc_security`).
//!
//! With TLS the certificate and key (and with mutual TLS the client CA) are read from PEM files
//! and read again every [`RELOAD_EVERY`]: a rotated certificate is used for new connections
//! without a restart; files that do not load are logged and the previous ones kept. With mutual
//! TLS a client certificate the CA did not sign fails the TLS handshake; a client with none
//! completes it and is answered `UNAUTHENTICATED` on every call, which says what is missing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::inference::oip::Oip;
use crate::telemetry::Health;

/// How often TLS files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// Transport security of a gRPC endpoint or client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Security {
    Plaintext,
    /// TLS: the server proves who it is.
    Tls,
    /// Mutual TLS: both sides do.
    Mtls,
}

/// Where and how the gRPC endpoint is served.
#[derive(Debug, Clone)]
pub struct GrpcServing {
    pub addr: SocketAddr,
    pub security: Security,
    /// PEM files: the certificate chain and its key (TLS, mutual TLS).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PEM file of the CA that signs client certificates (mutual TLS).
    pub client_ca: Option<PathBuf>,
    pub max_message_size: usize,
    pub max_concurrent_streams: u32,
}

/// The server's TLS files, as last loaded.
#[derive(Debug)]
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
    /// The files' contents the current config was built from.
    loaded: RwLock<(Vec<u8>, Arc<rustls::ServerConfig>)>,
}

fn read_all(paths: &[&PathBuf]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for p in paths {
        out.extend(std::fs::read(p)?);
        out.push(0);
    }
    Ok(out)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl ServerTls {
    fn new(cert: PathBuf, key: PathBuf, client_ca: Option<PathBuf>) -> anyhow::Result<Self> {
        let (stamp, config) = Self::load(&cert, &key, client_ca.as_ref())?;
        Ok(Self { cert, key, client_ca, loaded: RwLock::new((stamp, config)) })
    }

    fn load(
        cert: &PathBuf,
        key: &PathBuf,
        client_ca: Option<&PathBuf>,
    ) -> anyhow::Result<(Vec<u8>, Arc<rustls::ServerConfig>)> {
        let mut files = vec![cert, key];
        files.extend(client_ca);
        let stamp = read_all(&files).context("reading the TLS files")?;
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(Iterator::collect::<Result<Vec<_>, _>>)
            .with_context(|| format!("reading certificates from {}", cert.display()))?;
        anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", cert.display());
        let key_der = PrivateKeyDer::from_pem_file(key)
            .with_context(|| format!("reading a private key from {}", key.display()))?;
        let builder =
            rustls::ServerConfig::builder_with_provider(provider()).with_safe_default_protocol_versions()?;
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in
                    CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))?
                {
                    roots.add(c.with_context(|| format!("reading {}", ca.display()))?)?;
                }
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        // No certificate: the handshake completes and every call is answered
                        // UNAUTHENTICATED (a clearer refusal than a TLS alert).
                        .allow_unauthenticated()
                        .build()?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_single_cert(chain, key_der).context("the certificate and key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((stamp, Arc::new(config)))
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.loaded.read().unwrap().1.clone()
    }

    /// Load the files again if they changed.
    fn reload(&self) {
        let mut files = vec![&self.cert, &self.key];
        files.extend(self.client_ca.as_ref());
        match read_all(&files) {
            Ok(stamp) if stamp == self.loaded.read().unwrap().0 => {}
            Ok(_) => match Self::load(&self.cert, &self.key, self.client_ca.as_ref()) {
                Ok(loaded) => {
                    *self.loaded.write().unwrap() = loaded;
                    tracing::info!(cert = %self.cert.display(), "gRPC TLS files changed: new connections use them");
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "gRPC TLS files changed but do not load; keeping the previous ones"
                ),
            },
            Err(e) => tracing::warn!(error = %e, "reading the gRPC TLS files; keeping the previous ones"),
        }
    }
}

/// With mutual TLS, a call from a client that presented no certificate is refused.
#[derive(Debug, Clone, Copy)]
struct RequireClientCert(bool);

impl tonic::service::Interceptor for RequireClientCert {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if self.0 && req.peer_certs().is_none_or(|c| c.is_empty()) {
            return Err(tonic::Status::unauthenticated(
                "this endpoint requires mutual TLS: present a client certificate signed by its client CA",
            ));
        }
        Ok(req)
    }
}

/// Serve the standard gRPC health service on `serving.addr` and beside it `inference`: the
/// overall status (service `""`) is SERVING exactly when [`Health::ready`] holds. Returns the
/// bound address.
pub async fn serve_grpc(
    serving: &GrpcServing,
    health: Arc<Health>,
    inference: Option<Oip>,
) -> anyhow::Result<SocketAddr> {
    use tonic_health::ServingStatus;
    let tls = match serving.security {
        Security::Plaintext => None,
        Security::Tls | Security::Mtls => {
            let (Some(cert), Some(key)) = (serving.cert.clone(), serving.key.clone()) else {
                anyhow::bail!("gRPC TLS needs [node] grpc_tls_cert and grpc_tls_key");
            };
            let ca = if serving.security == Security::Mtls {
                Some(serving.client_ca.clone().context("gRPC mutual TLS needs [node] grpc_tls_client_ca")?)
            } else {
                None
            };
            Some(Arc::new(ServerTls::new(cert, key, ca)?))
        }
    };
    let addr = serving.addr;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter.set_service_status("", ServingStatus::NotServing).await;
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = health.ready();
            if last != Some(ready) {
                let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
                reporter.set_service_status("", status).await;
                last = Some(ready);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let served = match inference {
        Some(_) => "grpc.health.v1.Health and inference.GRPCInferenceService",
        None => "grpc.health.v1.Health",
    };
    let require = RequireClientCert(serving.security == Security::Mtls);
    let inference = inference.map(|oip| {
        tonic::service::interceptor::InterceptedService::new(oip.service(serving.max_message_size), require)
    });
    let router = tonic::transport::Server::builder()
        .max_concurrent_streams(serving.max_concurrent_streams)
        .add_service(tonic::service::interceptor::InterceptedService::new(health_service, require))
        .add_optional_service(inference);
    match tls {
        None => {
            let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(async move {
                if let Err(e) = router.serve_with_incoming(incoming).await {
                    tracing::error!(error = %e, "the gRPC endpoint stopped");
                }
            });
        }
        Some(tls) => {
            let incoming = tls_incoming(listener, tls.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(RELOAD_EVERY).await;
                    let tls = tls.clone();
                    let _ = tokio::task::spawn_blocking(move || tls.reload()).await;
                }
            });
            tokio::spawn(async move {
                if let Err(e) = router.serve_with_incoming(incoming).await {
                    tracing::error!(error = %e, "the gRPC endpoint stopped");
                }
            });
        }
    }
    tracing::info!(%bound, security = ?serving.security, "serving {served}");
    Ok(bound)
}

/// TLS connections accepted on `listener` with the current config, each handshake on a task of
/// its own (a slow or failing client holds up no other).
fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Arc<ServerTls>,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a gRPC connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "gRPC TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "gRPC TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|s| (s, rx)) })
}
