//! One association, from A-ASSOCIATE-RQ to release: negotiation through
//! dicom-ul's `ServerAssociationOptions`, the AE-title policy as an
//! `AccessControl` type, and the P-DATA loop that dispatches each DIMSE
//! message to its service.
//!
//! Per-request failures go into the response status and the association
//! stays up; only protocol violations (an unexpected PDU, data for a
//! presentation context that was not accepted, an unparseable command set)
//! and timeouts end it with A-ABORT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::Pdu;
use dicom_ul::association::{Association, AsyncServerAssociation};
use dicom_ul::pdu::{AbortRQServiceProviderReason, AbortRQSource, PresentationContextResultReason};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::context::{Context, DicomContext, Op, Transport, pdu_name, send_command};
use super::dimse::{self, CommandSet, command_field, status};
use super::receive::{self, Pdv, Received};
use super::{c_echo, c_find, c_store, commitment, identifier, retrieve, sop_classes};

/// Where the P-DATA stream of the association stands.
enum State {
    /// Waiting for the first fragment of a command set.
    Idle,
    /// Collecting the fragments of a command set.
    Command { pcid: u8, bytes: Vec<u8> },
    /// Streaming a C-STORE data set into the ingest path.
    Store(Box<c_store::Receiving>),
    /// Reading a data set that will not be used, before answering with a
    /// failure status (PS3.7 requires the data set to be received first).
    Discard { pcid: u8, response: Vec<u8> },
    /// Collecting the identifier (or action information) of a C-FIND,
    /// C-MOVE, C-GET or N-ACTION request.
    Collect {
        pcid: u8,
        command: Box<CommandSet>,
        bytes: Vec<u8>,
    },
}

/// Why the association ended; logged once.
enum End {
    Released,
    AbortedByPeer,
    Closed,
    Aborted(String),
    Shutdown,
}

/// Negotiates and serves one association on an accepted connection.
pub async fn handle(
    mut socket: TcpStream,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    shutdown: CancellationToken,
) {
    let artim = tokio::time::Instant::now() + ctx.artim_timeout;
    let mut options = ctx.options_for(peer.ip(), None);
    // The transfer syntaxes to accept where the node will send (C-GET);
    // the request stays in the socket for dicom-ul.
    let request = super::acceptance::peek_request(&socket, ctx.artim_timeout).await;
    if request.is_none() && abort_if_not_a_request(&mut socket, peer).await {
        return;
    }
    if let Some(rq) = &request
        && rq.protocol_version & 1 == 0
    {
        reject_protocol_version(socket, peer).await;
        return;
    }
    if let Some(list) = request
        .as_ref()
        .and_then(super::acceptance::transfer_syntaxes)
    {
        for ts in list {
            options = options.with_transfer_syntax(ts);
        }
    }
    let established = tokio::time::timeout_at(artim, options.establish_async(socket)).await;
    if let Some(association) = established_or_log(established, peer) {
        run(association, peer, ctx, shutdown).await;
    }
}

/// An A-ASSOCIATE-RQ whose protocol version lacks bit 0, the only bit a
/// receiver tests (PS3.8 §9.3.2): A-ASSOCIATE-RJ, permanent, source
/// service-provider (ACSE), reason protocol-version-not-supported (Table
/// 9-21). dicom-ul would answer "service-user, no reason given".
async fn reject_protocol_version(socket: TcpStream, peer: SocketAddr) {
    tracing::info!(%peer, "A-ASSOCIATE-RQ of an unsupported protocol version; rejected");
    crate::metrics::association_refused(crate::metrics::refused::REJECTED);
    let rj = dicom_ul::pdu::AssociationRJ {
        result: dicom_ul::pdu::AssociationRJResult::Permanent,
        source: dicom_ul::pdu::AssociationRJSource::ServiceProviderASCE(
            dicom_ul::pdu::AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
        ),
    };
    super::acceptance::reject(socket, rj, Duration::from_secs(5)).await;
}

/// A first PDU that is no A-ASSOCIATE-RQ (PS3.8 Table 9-10, Sta2): an
/// A-ABORT from the caller ends the connection (AA-2); anything else, a
/// PDU out of place or bytes that are no PDU (an HTTP request, a scanner),
/// is answered with an A-ABORT, service-user source (AA-1), and the
/// connection closed. `true` when the connection was ended here.
async fn abort_if_not_a_request(socket: &mut TcpStream, peer: SocketAddr) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut first = [0u8; 1];
    // The listener hands over a connection only once it has spoken or
    // closed; the bound is for safety.
    let peeked = tokio::time::timeout(Duration::from_secs(1), socket.peek(&mut first)).await;
    match peeked.unwrap_or(Ok(0)) {
        Ok(1) if first[0] == 0x01 => false,
        Ok(1) => {
            if first[0] != 0x07 {
                tracing::info!(%peer, first_byte = first[0], "first PDU is no A-ASSOCIATE-RQ; A-ABORT sent");
                // Type 07, reserved, length 4, two reserved bytes, source 0
                // (service user), reason 0 (not significant for that source).
                let abort = [0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0];
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), socket.write_all(&abort)).await;
            }
            // What the caller sent is read before the close: closing with
            // unread bytes resets the connection, and the reset can reach
            // the caller before the A-ABORT does.
            let mut sink = [0u8; 4096];
            let mut drained = 0;
            while drained < 1 << 20 {
                match socket.try_read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
            crate::metrics::association_refused(crate::metrics::refused::PROTOCOL);
            true
        }
        // Closed before a byte, or unreadable: dicom-ul closes it as before.
        _ => false,
    }
}

/// Negotiates and serves one association on a connection accepted by the
/// DICOM TLS listener: the TLS handshake (with the client certificate, when
/// asked for), then the A-ASSOCIATE-RQ, whose calling AE title must agree
/// with that certificate where the AE binding says so. The ARTIM timeout
/// covers the handshake too.
pub async fn handle_tls(
    socket: TcpStream,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    tls: Arc<super::tls::DicomTls>,
    shutdown: CancellationToken,
) {
    let (config, identity) = match tls.connection_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(%peer, error = %e, "cannot set up DICOM TLS; connection closed");
            return;
        }
    };
    let options = ctx
        .options_for(peer.ip(), Some(identity))
        .tls_config(config);
    let established =
        tokio::time::timeout(ctx.artim_timeout, options.establish_tls_async(socket)).await;
    if let Some(association) = established_or_log(established, peer) {
        run(association, peer, ctx, shutdown).await;
    }
}

fn established_or_log<S>(
    established: Result<
        Result<AsyncServerAssociation<S>, dicom_ul::association::Error>,
        tokio::time::error::Elapsed,
    >,
    peer: SocketAddr,
) -> Option<AsyncServerAssociation<S>> {
    match established {
        Ok(Ok(association)) => Some(association),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "association not established");
            crate::metrics::association_refused(refused_reason(&e));
            None
        }
        Err(_) => {
            // ARTIM expired (PS3.8 §9.1.5): the transport is closed without
            // an A-ABORT, since no association exists yet.
            tracing::info!(%peer, "no A-ASSOCIATE-RQ within the ARTIM timeout; connection closed");
            crate::metrics::association_refused(crate::metrics::refused::ARTIM_TIMEOUT);
            None
        }
    }
}

/// Serves an established association until it ends.
async fn run<S: Transport>(
    association: AsyncServerAssociation<S>,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    shutdown: CancellationToken,
) {
    let _open = crate::metrics::AssociationOpen::start();
    let calling_ae_title = association.peer_ae_title().trim().to_string();
    let span = tracing::info_span!("association", %peer, calling_ae_title = ?calling_ae_title);
    let contexts: HashMap<u8, Context> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.id,
                Context {
                    abstract_syntax: pc.abstract_syntax.trim_end_matches('\0').to_string(),
                    transfer_syntax: pc.transfer_syntax.trim_end_matches('\0').to_string(),
                },
            )
        })
        .collect();
    tracing::info!(parent: &span, accepted_contexts = contexts.len(), "association established");
    let end = serve(
        association,
        &contexts,
        &calling_ae_title,
        &ctx,
        &shutdown,
        &span,
    )
    .await;
    match end {
        End::Released => tracing::info!(parent: &span, "association released"),
        End::AbortedByPeer => tracing::info!(parent: &span, "association aborted by peer"),
        End::Closed => tracing::info!(parent: &span, "connection closed by peer"),
        End::Aborted(why) => tracing::warn!(parent: &span, reason = %why, "association aborted"),
        End::Shutdown => tracing::info!(parent: &span, "association ended for shutdown"),
    }
}

async fn serve<S: Transport>(
    mut association: AsyncServerAssociation<S>,
    contexts: &HashMap<u8, Context>,
    calling_ae_title: &str,
    ctx: &DicomContext,
    shutdown: &CancellationToken,
    span: &tracing::Span,
) -> End {
    let mut state = State::Idle;
    let mut reports: Vec<commitment::Report> = Vec::new();
    let end = serve_loop(
        &mut association,
        &mut state,
        &mut reports,
        contexts,
        calling_ae_title,
        ctx,
        shutdown,
        span,
    )
    .await;
    abandon(&mut state, ctx).await;
    if !reports.is_empty() {
        // Reports the peer never acknowledged here go over a new
        // association (PS3.4 J.3.3): a modality must hear the outcome.
        commitment::deliver_later(std::mem::take(&mut reports), calling_ae_title, ctx);
    }
    match end {
        Ending::Release => {
            let _ = association.send(&Pdu::ReleaseRP).await;
            End::Released
        }
        Ending::ReleaseForShutdown => {
            let _ = tokio::time::timeout(Duration::from_secs(5), association.release()).await;
            End::Shutdown
        }
        Ending::Abort(reason, why) => {
            let _ = abort(association, reason).await;
            End::Aborted(why)
        }
        Ending::AbortIdle(why) => {
            let _ = association.abort().await;
            End::Aborted(why)
        }
        Ending::Done(end) => end,
    }
}

/// At shutdown, how long an association's peer must have sent nothing
/// before the node releases it.
const SHUTDOWN_QUIET: Duration = Duration::from_millis(300);

/// At shutdown, how long a peer that keeps sending is still served.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// How the loop left the association.
enum Ending {
    Release,
    ReleaseForShutdown,
    Abort(AbortRQServiceProviderReason, String),
    AbortIdle(String),
    Done(End),
}

#[allow(clippy::too_many_arguments)]
async fn serve_loop<S: Transport>(
    association: &mut AsyncServerAssociation<S>,
    state: &mut State,
    reports: &mut Vec<commitment::Report>,
    contexts: &HashMap<u8, Context>,
    calling_ae_title: &str,
    ctx: &DicomContext,
    shutdown: &CancellationToken,
    span: &tracing::Span,
) -> Ending {
    let max_pdu_length = association.acceptor_max_pdu_length();
    let mut shutdown_at: Option<tokio::time::Instant> = None;
    loop {
        let idle = matches!(state, State::Idle);
        // Only between messages: a C-STORE in flight finishes and is
        // answered before the node lets go of the association. And not
        // while the peer is still sending: its next request, sent as the
        // last response left, is served too, until it has been quiet for
        // SHUTDOWN_QUIET, or SHUTDOWN_GRACE has passed (a sender that never
        // pauses is released between two messages then). Releasing under
        // a request already on its way fails that request at the sender.
        let let_go = async {
            shutdown.cancelled().await;
            let since = *shutdown_at.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < SHUTDOWN_GRACE {
                tokio::time::sleep(SHUTDOWN_QUIET).await;
            }
        };
        let received = tokio::select! {
            biased;
            r = tokio::time::timeout(ctx.idle_timeout, receive::receive(association, max_pdu_length)) => r,
            () = let_go, if idle => return Ending::ReleaseForShutdown,
        };
        let pdu = match received {
            Err(_) => return Ending::AbortIdle(format!("idle for {:?}", ctx.idle_timeout)),
            Ok(Err(e)) => {
                if e.is_closed() {
                    return Ending::Done(End::Closed);
                }
                return Ending::Abort(AbortRQServiceProviderReason::UnrecognizedPdu, e.to_string());
            }
            Ok(Ok(pdu)) => pdu,
        };
        match pdu {
            Received::PData(pdata) => {
                for value in pdata.values() {
                    let current = std::mem::replace(state, State::Idle);
                    let mut io = Io {
                        association: &mut *association,
                        reports: &mut *reports,
                        contexts,
                        calling_ae_title,
                        ctx,
                        span,
                    };
                    match on_pdv(value, current, &mut io).await {
                        Ok(next) => *state = next,
                        Err(violation) => {
                            return Ending::Abort(
                                AbortRQServiceProviderReason::UnexpectedPdu,
                                violation,
                            );
                        }
                    }
                }
            }
            Received::Other(Pdu::ReleaseRQ) => return Ending::Release,
            Received::Other(Pdu::AbortRQ { .. }) => return Ending::Done(End::AbortedByPeer),
            Received::Other(other) => {
                return Ending::Abort(
                    AbortRQServiceProviderReason::UnexpectedPdu,
                    format!("unexpected PDU {}", pdu_name(&other)),
                );
            }
        }
    }
}

/// What the P-DATA handlers share for the life of the association.
struct Io<'a, S> {
    association: &'a mut AsyncServerAssociation<S>,
    reports: &'a mut Vec<commitment::Report>,
    contexts: &'a HashMap<u8, Context>,
    calling_ae_title: &'a str,
    ctx: &'a DicomContext,
    span: &'a tracing::Span,
}

async fn abort<S: Transport>(
    mut association: AsyncServerAssociation<S>,
    reason: AbortRQServiceProviderReason,
) -> Result<(), dicom_ul::association::Error> {
    association
        .send(&Pdu::AbortRQ {
            source: AbortRQSource::ServiceProvider(reason),
        })
        .await
}

async fn abandon(state: &mut State, ctx: &DicomContext) {
    if let State::Store(receiving) = std::mem::replace(state, State::Idle) {
        receiving.abandon(&ctx.ingest).await;
    }
}

/// Advances the state with one presentation data value. An `Err` is a
/// protocol violation that ends the association.
async fn on_pdv<S: Transport>(
    value: Pdv<'_>,
    state: State,
    io: &mut Io<'_, S>,
) -> Result<State, String> {
    let pcid = value.presentation_context_id;
    let ctx = io.ctx;
    if !io.contexts.contains_key(&pcid) {
        return Err(format!(
            "data on presentation context {pcid}, which was not accepted"
        ));
    }
    match (state, value.is_command) {
        (State::Idle, true) => {
            if value.is_last {
                on_command(pcid, value.data, io).await
            } else {
                Ok(State::Command {
                    pcid,
                    bytes: value.data.to_vec(),
                })
            }
        }
        (
            State::Command {
                pcid: expected,
                mut bytes,
            },
            true,
        ) if expected == pcid => {
            bytes.extend_from_slice(value.data);
            if bytes.len() > dimse::MAX_COMMAND_SET_LEN {
                return Err("command set larger than 64 KiB".into());
            }
            if value.is_last {
                on_command(pcid, &bytes, io).await
            } else {
                Ok(State::Command { pcid, bytes })
            }
        }
        (State::Store(mut receiving), false) if receiving.pcid() == pcid => {
            receiving.append(&ctx.ingest, value.data);
            if !value.is_last {
                return Ok(State::Store(receiving));
            }
            let (pcid, response) = receiving.finish(&ctx.ingest, io.span).await;
            send_command(io.association, pcid, response).await?;
            Ok(State::Idle)
        }
        (
            State::Discard {
                pcid: expected,
                response,
            },
            false,
        ) if expected == pcid => {
            if value.is_last {
                send_command(io.association, pcid, response).await?;
                Ok(State::Idle)
            } else {
                Ok(State::Discard { pcid, response })
            }
        }
        (
            State::Collect {
                pcid: expected,
                command,
                mut bytes,
            },
            false,
        ) if expected == pcid => {
            bytes.extend_from_slice(value.data);
            if bytes.len() > identifier::MAX_IDENTIFIER_LEN {
                return Err("identifier larger than 1 MiB".into());
            }
            if !value.is_last {
                return Ok(State::Collect {
                    pcid,
                    command,
                    bytes,
                });
            }
            run_operation(pcid, &command, &bytes, io).await?;
            Ok(State::Idle)
        }
        (State::Store(receiving), _) => {
            receiving.abandon(&ctx.ingest).await;
            Err("P-DATA out of sequence during a C-STORE data set".into())
        }
        (_, is_command) => Err(format!(
            "unexpected {} fragment on presentation context {pcid}",
            if is_command { "command" } else { "data" }
        )),
    }
}

/// Runs a C-FIND, C-MOVE, C-GET or N-ACTION whose data set has arrived.
async fn run_operation<S: Transport>(
    pcid: u8,
    command: &CommandSet,
    data_set: &[u8],
    io: &mut Io<'_, S>,
) -> Result<(), String> {
    let context = &io.contexts[&pcid];
    let mut op = Op {
        association: &mut *io.association,
        pcid,
        command,
        context,
        contexts: io.contexts,
        calling_ae_title: io.calling_ae_title,
        ctx: io.ctx,
        span: io.span,
        reports: &mut *io.reports,
    };
    match command.command_field() {
        command_field::C_FIND_RQ => c_find::run(&mut op, data_set).await,
        command_field::C_MOVE_RQ => retrieve::c_move(&mut op, data_set).await,
        command_field::C_GET_RQ => retrieve::c_get(&mut op, data_set).await,
        command_field::N_ACTION_RQ => commitment::n_action(&mut op, data_set).await,
        other => Err(format!("no operation for command field {other:#06x}")),
    }
}

/// Whether a request may be served on the presentation context it came on:
/// its command must belong to the context's abstract syntax.
fn context_serves(command_field: u16, abstract_syntax: &str) -> bool {
    match command_field {
        command_field::C_FIND_RQ => sop_classes::is_find(abstract_syntax),
        command_field::C_MOVE_RQ => sop_classes::is_move(abstract_syntax),
        command_field::C_GET_RQ => sop_classes::is_get(abstract_syntax),
        command_field::N_ACTION_RQ => abstract_syntax == uids::STORAGE_COMMITMENT_PUSH_MODEL,
        _ => false,
    }
}

/// Dispatches a complete command set to its service.
async fn on_command<S: Transport>(
    pcid: u8,
    bytes: &[u8],
    io: &mut Io<'_, S>,
) -> Result<State, String> {
    let command = CommandSet::parse(bytes).map_err(|e| format!("unparseable command set: {e}"))?;
    let context = &io.contexts[&pcid];
    let ctx = io.ctx;
    match command.command_field() {
        command_field::C_ECHO_RQ => {
            let response = c_echo::handle(&command);
            send_command(io.association, pcid, response).await?;
            Ok(State::Idle)
        }
        command_field::C_STORE_RQ => match c_store::begin(
            pcid,
            &command,
            &context.abstract_syntax,
            &context.transfer_syntax,
            io.calling_ae_title,
            &ctx.ingest,
            io.span,
        ) {
            c_store::Begin::Receive(receiving) => Ok(State::Store(receiving)),
            c_store::Begin::Refuse(response) if command.has_data_set() => {
                Ok(State::Discard { pcid, response })
            }
            c_store::Begin::Refuse(response) => {
                send_command(io.association, pcid, response).await?;
                Ok(State::Idle)
            }
        },
        field @ (command_field::C_FIND_RQ
        | command_field::C_MOVE_RQ
        | command_field::C_GET_RQ
        | command_field::N_ACTION_RQ)
            if context_serves(field, &context.abstract_syntax) =>
        {
            if command.has_data_set() {
                Ok(State::Collect {
                    pcid,
                    command: Box::new(command),
                    bytes: Vec::new(),
                })
            } else {
                // Every one of these requests carries a data set (PS3.7
                // 9.1.2, 9.1.3, 9.1.4, 10.1.4); without it there is nothing
                // to match or act on.
                let response = dimse::query_retrieve_response(
                    &command,
                    field | 0x8000,
                    status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                    false,
                    None,
                    Some("request has no identifier"),
                );
                send_command(io.association, pcid, response).await?;
                Ok(State::Idle)
            }
        }
        // A C-CANCEL-RQ with nothing outstanding has nothing to cancel, and
        // no response (PS3.7 9.3.2.3).
        command_field::C_CANCEL_RQ => Ok(State::Idle),
        // The acknowledgement of a storage commitment report sent on this
        // association.
        command_field::N_EVENT_REPORT_RSP => {
            commitment::acknowledged(&command, io.reports, io.span);
            Ok(State::Idle)
        }
        other => {
            // A service this node does not provide on this context: answer
            // it with the matching response type so the peer is not left
            // waiting, and keep the association.
            tracing::info!(parent: io.span, command_field = other, "unrecognized operation");
            let response = dimse::response(
                &command,
                other | 0x8000,
                status::UNRECOGNIZED_OPERATION,
                None,
            );
            if command.has_data_set() {
                Ok(State::Discard { pcid, response })
            } else {
                send_command(io.association, pcid, response).await?;
                Ok(State::Idle)
            }
        }
    }
}

/// The metrics' reason for an association that was not established: an
/// A-ASSOCIATE-RJ the node sent (AE-title policy, no acceptable
/// presentation context, protocol version), or a peer that broke off.
fn refused_reason(e: &dicom_ul::association::Error) -> &'static str {
    match e {
        dicom_ul::association::Error::Rejected { .. } => crate::metrics::refused::REJECTED,
        _ => crate::metrics::refused::PROTOCOL,
    }
}
