//! The DICOM accept loop: the association limit, and shutdown.
//!
//! The limit is checked after `accept`, not before: a caller past the limit
//! must get an A-ASSOCIATE-RJ (transient, local limit exceeded, PS3.8
//! §9.3.4) it can act on, not a connection that hangs in the backlog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use dicom_ul::Pdu;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::association;
use super::context::DicomContext;
use super::tls::DicomTls;

/// Serves associations until `shutdown` is cancelled, then waits for the
/// ones in progress to finish their current message and release.
pub async fn run(listener: TcpListener, ctx: Arc<DicomContext>, shutdown: CancellationToken) {
    serve(listener, ctx, None, shutdown).await
}

/// The DICOM TLS listener (PS3.15 B.9): the same loop, limit and shutdown,
/// each connection starting with a TLS handshake. The limit is shared with
/// nothing: each listener counts its own associations.
pub async fn run_tls(
    listener: TcpListener,
    ctx: Arc<DicomContext>,
    tls: Arc<DicomTls>,
    shutdown: CancellationToken,
) {
    serve(listener, ctx, Some(tls), shutdown).await
}

async fn serve(
    listener: TcpListener,
    ctx: Arc<DicomContext>,
    tls: Option<Arc<DicomTls>>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(ctx.max_associations));
    let tracker = TaskTracker::new();
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Without TCP_NODELAY every DIMSE response waits for the peer's
        // delayed ACK: 40 ms per message on loopback.
        let _ = socket.set_nodelay(true);
        match limit.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                let tls = tls.clone();
                tracker.spawn(async move {
                    let audit = ctx.audit.clone();
                    let served = async move {
                        match tls {
                            Some(tls) => {
                                association::handle_tls(socket, peer, ctx, tls, shutdown).await
                            }
                            None => association::handle(socket, peer, ctx, shutdown).await,
                        }
                    };
                    crate::audit::association(audit, peer, served).await;
                    drop(permit);
                });
            }
            Err(_) => {
                let artim = ctx.artim_timeout;
                match tls.clone() {
                    Some(tls) => {
                        tracker.spawn(async move {
                            // The A-ASSOCIATE-RJ goes inside TLS; the
                            // handshake counts against the ARTIM timeout.
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.handshake_config());
                            if let Ok(Ok(stream)) =
                                tokio::time::timeout(artim, acceptor.accept(socket)).await
                            {
                                reject_over_limit(stream, peer, artim).await;
                            }
                        });
                    }
                    None => {
                        tracker.spawn(reject_over_limit(socket, peer, artim));
                    }
                }
            }
        }
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// Reads the caller's A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ: transient,
/// service provider (presentation), local limit exceeded.
async fn reject_over_limit<S>(mut socket: S, peer: SocketAddr, artim: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tracing::warn!(%peer, "association limit reached; rejecting");
    crate::metrics::association_refused(crate::metrics::refused::LIMIT);
    let read_rq = async {
        // PDU header: type, reserved, 4-byte length. An A-ASSOCIATE-RQ is
        // small; a bigger one is not read, only rejected.
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
        let mut body = BytesMut::zeroed(len.min(64 * 1024));
        socket.read_exact(&mut body).await?;
        std::io::Result::Ok(header[0])
    };
    match tokio::time::timeout(artim, read_rq).await {
        Ok(Ok(0x01)) => {}
        _ => return,
    }
    let rj = Pdu::AssociationRJ(AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    });
    let mut buf = Vec::new();
    if dicom_ul::write_pdu(&mut buf, &rj).is_ok() {
        let _ = socket.write_all(&buf).await;
        let _ = socket.shutdown().await;
    }
}
