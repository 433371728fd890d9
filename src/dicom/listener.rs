//! The DICOM accept loop: the association limit, and shutdown.
//!
//! The limit is checked after `accept`, not before: a caller past the limit
//! must get an A-ASSOCIATE-RJ (transient, local limit exceeded, PS3.8
//! §9.3.4) it can act on, not a connection that hangs in the backlog.
//!
//! It counts associations, not connections: a connection takes a place
//! under the limit only once its A-ASSOCIATE-RQ has arrived (PS3.8 Sta2 →
//! Sta3). Until then it waits among the connections not yet heard from,
//! whose number is bounded too ([`pending_budget`]); when those are all
//! taken, a new connection pushes out the one that has waited longest. So
//! sockets opened and left silent (a scanner, or a peer holding them on
//! purpose) cannot lock a modality out: they lose their place to anyone
//! who speaks, and the ARTIM timer closes them anyway.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJSource,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::context::DicomContext;
use super::tls::DicomTls;
use super::{acceptance, association};

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
    let pending = Arc::new(Pending::new(pending_budget(ctx.max_associations)));
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
        let waiting = pending.admit(peer);
        let limit = limit.clone();
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let tls = tls.clone();
        tracker.spawn(async move {
            let artim = ctx.artim_timeout;
            let spoke = tokio::select! {
                spoke = first_pdu_arrived(&socket, tls.is_some(), artim) => spoke,
                () = waiting.pushed_out() => {
                    tracing::info!(%peer, "connection silent while others waited; closed before its A-ASSOCIATE-RQ");
                    crate::metrics::association_refused(crate::metrics::refused::ARTIM_TIMEOUT);
                    return;
                }
                () = shutdown.cancelled() => return,
            };
            drop(waiting);
            if !spoke {
                // ARTIM expired (PS3.8 §9.1.5): the transport is closed
                // without an A-ABORT, since no association exists yet.
                tracing::info!(%peer, "no A-ASSOCIATE-RQ within the ARTIM timeout; connection closed");
                crate::metrics::association_refused(crate::metrics::refused::ARTIM_TIMEOUT);
                return;
            }
            match limit.try_acquire_owned() {
                Ok(permit) => {
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
                }
                Err(_) => match tls {
                    Some(tls) => {
                        // The A-ASSOCIATE-RJ goes inside TLS; the handshake
                        // counts against the ARTIM timeout.
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.handshake_config());
                        if let Ok(Ok(stream)) =
                            tokio::time::timeout(artim, acceptor.accept(socket)).await
                        {
                            reject_over_limit(stream, peer, artim).await;
                        }
                    }
                    None => reject_over_limit(socket, peer, artim).await,
                },
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// How many connections may wait for their first PDU at once: four times
/// the association limit, at least 256. A modality's A-ASSOCIATE-RQ comes
/// within milliseconds of its connect, so this many silent ones are a
/// scanner or an attack, not a queue of real callers.
pub fn pending_budget(max_associations: usize) -> usize {
    max_associations.saturating_mul(4).max(256)
}

/// The connections not yet heard from, oldest first.
struct Pending {
    budget: usize,
    state: Mutex<(u64, VecDeque<(u64, CancellationToken)>)>,
}

/// A connection's place among [`Pending`]; it leaves when dropped.
struct Waiting {
    pending: Arc<Pending>,
    id: u64,
    pushed_out: CancellationToken,
}

impl Pending {
    fn new(budget: usize) -> Pending {
        Pending {
            budget,
            state: Mutex::new((0, VecDeque::new())),
        }
    }

    /// A place for a new connection; the longest-waiting one is pushed out
    /// when every place is taken.
    fn admit(self: &Arc<Self>, peer: SocketAddr) -> Waiting {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.1.len() >= self.budget
            && let Some((_, oldest)) = state.1.pop_front()
        {
            tracing::warn!(%peer, budget = self.budget, "every place for connections awaiting their A-ASSOCIATE-RQ taken; the longest silent one is closed");
            oldest.cancel();
        }
        state.0 += 1;
        let id = state.0;
        let pushed_out = CancellationToken::new();
        state.1.push_back((id, pushed_out.clone()));
        Waiting {
            pending: self.clone(),
            id,
            pushed_out,
        }
    }
}

impl Waiting {
    async fn pushed_out(&self) {
        self.pushed_out.cancelled().await
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let mut state = self.pending.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = state.1.iter().position(|(id, _)| *id == self.id) {
            state.1.remove(i);
        }
    }
}

/// Waits, up to `artim`, until the caller has sent its first PDU whole
/// (over TLS: until its first bytes, the handshake's), or closed, or sent
/// something that is no PDU: `true`, there is something to answer.
/// `false`: silence until the ARTIM timer expired.
async fn first_pdu_arrived(socket: &TcpStream, tls: bool, artim: Duration) -> bool {
    if tls {
        return tokio::time::timeout(artim, socket.peek(&mut [0u8; 1]))
            .await
            .is_ok();
    }
    let deadline = tokio::time::Instant::now() + artim;
    !matches!(
        acceptance::first_pdu(socket, deadline).await,
        acceptance::FirstPdu::TimedOut
    )
}

/// Reads the caller's A-ASSOCIATE-RQ and answers A-ASSOCIATE-RJ: transient,
/// service provider (presentation), local limit exceeded.
async fn reject_over_limit<S>(socket: S, peer: SocketAddr, artim: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tracing::warn!(%peer, "association limit reached; rejecting");
    crate::metrics::association_refused(crate::metrics::refused::LIMIT);
    let rj = AssociationRJ {
        result: AssociationRJResult::Transient,
        source: AssociationRJSource::ServiceProviderPresentation(
            AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
        ),
    };
    acceptance::reject(socket, rj, artim).await;
}
