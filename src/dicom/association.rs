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
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::association::server::{AccessControl, DefaultNegotiation};
use dicom_ul::association::{Association, AsyncServerAssociation};
use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AbortRQSource, AssociationRJServiceUserReason, PDataValue,
    PDataValueType, PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociationOptions};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::dimse::{self, CommandSet, command_field, status};
use super::{c_echo, c_store, sop_classes};
use crate::config::{AllowedPeer, NodeConfig};
use crate::ingest::Ingest;

type Options = ServerAssociationOptions<'static, PeerPolicy, DefaultNegotiation>;

/// What every association of this node shares.
pub struct DicomContext {
    pub ae_title: String,
    pub ingest: Ingest,
    pub artim_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_associations: usize,
    policy: PeerPolicy,
    options: Options,
}

impl DicomContext {
    pub fn new(config: &NodeConfig, ingest: Ingest) -> DicomContext {
        let policy = PeerPolicy {
            allowed: Arc::new(config.allowed_calling_ae_titles.clone()),
            require_called_ae_title: config.require_called_ae_title,
            peer: IpAddr::from([0, 0, 0, 0]),
        };
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(policy.clone())
            .ae_title(config.ae_title.as_str().to_string())
            .max_pdu_length(config.max_pdu_length)
            // Strict: a peer may not send a PDU larger than we announced,
            // else one PDU could make us buffer up to 4 GiB.
            .strict(true)
            .promiscuous(false)
            .with_abstract_syntax(uids::VERIFICATION);
        for sop_class in sop_classes::storage_sop_classes() {
            options = options.with_abstract_syntax(sop_class);
        }
        // No transfer syntax list: dicom-ul then accepts, per presentation
        // context, the first proposed transfer syntax its registry can
        // parse, which covers every native and encapsulated one, so each
        // instance is stored as the sender encoded it.
        DicomContext {
            ae_title: config.ae_title.as_str().to_string(),
            ingest,
            artim_timeout: config.artim_timeout,
            idle_timeout: config.idle_timeout,
            max_associations: config.max_associations,
            policy,
            options,
        }
    }

    /// The shared options with the policy bound to this peer's address.
    fn options_for(&self, peer: IpAddr) -> Options {
        let policy = PeerPolicy {
            peer,
            ..self.policy.clone()
        };
        self.options.clone().ae_access_control(policy)
    }
}

/// Who may associate: optionally only listed calling AE titles (each
/// optionally bound to a host), optionally only when calling our AE title.
/// Refusals are A-ASSOCIATE-RJ (permanent, service user) with the reason
/// PS3.8 Table 9-21 gives.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    allowed: Arc<Vec<AllowedPeer>>,
    require_called_ae_title: bool,
    peer: IpAddr,
}

impl AccessControl for PeerPolicy {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if self.require_called_ae_title && called_ae_title.trim() != this_ae_title {
            return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
        }
        if !self.allowed.is_empty()
            && !self
                .allowed
                .iter()
                .any(|a| a.admits(calling_ae_title, self.peer))
        {
            return Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized);
        }
        Ok(())
    }
}

/// An accepted presentation context.
struct Context {
    abstract_syntax: String,
    transfer_syntax: String,
}

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
    socket: TcpStream,
    peer: SocketAddr,
    ctx: Arc<DicomContext>,
    shutdown: CancellationToken,
) {
    let options = ctx.options_for(peer.ip());
    let association = match tokio::time::timeout(ctx.artim_timeout, options.establish_async(socket))
        .await
    {
        Ok(Ok(association)) => association,
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "association not established");
            return;
        }
        Err(_) => {
            // ARTIM expired (PS3.8 §9.1.5): the transport is closed without
            // an A-ABORT, since no association exists yet.
            tracing::info!(%peer, "no A-ASSOCIATE-RQ within the ARTIM timeout; connection closed");
            return;
        }
    };
    let calling_ae_title = association.peer_ae_title().trim().to_string();
    let span = tracing::info_span!("association", %peer, calling_ae_title = %calling_ae_title);
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

async fn serve(
    mut association: AsyncServerAssociation<TcpStream>,
    contexts: &HashMap<u8, Context>,
    calling_ae_title: &str,
    ctx: &DicomContext,
    shutdown: &CancellationToken,
    span: &tracing::Span,
) -> End {
    let mut state = State::Idle;
    loop {
        let idle = matches!(state, State::Idle);
        let received = tokio::select! {
            r = tokio::time::timeout(ctx.idle_timeout, association.receive()) => r,
            // Only between messages: a C-STORE in flight finishes and is
            // answered before the node lets go of the association.
            _ = shutdown.cancelled(), if idle => {
                let _ = tokio::time::timeout(Duration::from_secs(5), association.release()).await;
                return End::Shutdown;
            }
        };
        let pdu = match received {
            Err(_) => {
                abandon(&mut state, ctx).await;
                let _ = association.abort().await;
                return End::Aborted(format!("idle for {:?}", ctx.idle_timeout));
            }
            Ok(Err(e)) => {
                abandon(&mut state, ctx).await;
                if is_closed(&e) {
                    return End::Closed;
                }
                let _ = abort(association, AbortRQServiceProviderReason::UnrecognizedPdu).await;
                return End::Aborted(e.to_string());
            }
            Ok(Ok(pdu)) => pdu,
        };
        match pdu {
            Pdu::PData { data } => {
                for value in data {
                    match on_pdv(
                        value,
                        state,
                        contexts,
                        calling_ae_title,
                        ctx,
                        &mut association,
                        span,
                    )
                    .await
                    {
                        Ok(next) => state = next,
                        Err(violation) => {
                            let _ = abort(association, AbortRQServiceProviderReason::UnexpectedPdu)
                                .await;
                            return End::Aborted(violation);
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                abandon(&mut state, ctx).await;
                let _ = association.send(&Pdu::ReleaseRP).await;
                return End::Released;
            }
            Pdu::AbortRQ { .. } => {
                abandon(&mut state, ctx).await;
                return End::AbortedByPeer;
            }
            other => {
                abandon(&mut state, ctx).await;
                let _ = abort(association, AbortRQServiceProviderReason::UnexpectedPdu).await;
                return End::Aborted(format!("unexpected PDU {}", pdu_name(&other)));
            }
        }
    }
}

fn pdu_name(pdu: &Pdu) -> &'static str {
    match pdu {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        Pdu::Unknown { .. } => "unknown",
    }
}

fn is_closed(e: &dicom_ul::association::Error) -> bool {
    matches!(e, dicom_ul::association::Error::ConnectionClosed { .. })
}

async fn abort(
    mut association: AsyncServerAssociation<TcpStream>,
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

/// Sends a command set (never followed by a data set) on a presentation
/// context. Command sets are a few hundred bytes: one PDV always fits.
pub(super) async fn send_command(
    association: &mut AsyncServerAssociation<TcpStream>,
    pcid: u8,
    command: Vec<u8>,
) -> Result<(), String> {
    association
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pcid,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .await
        .map_err(|e| format!("cannot send response: {e}"))
}

/// Advances the state with one presentation data value. An `Err` is a
/// protocol violation that ends the association.
async fn on_pdv(
    value: PDataValue,
    state: State,
    contexts: &HashMap<u8, Context>,
    calling_ae_title: &str,
    ctx: &DicomContext,
    association: &mut AsyncServerAssociation<TcpStream>,
    span: &tracing::Span,
) -> Result<State, String> {
    let pcid = value.presentation_context_id;
    let Some(context) = contexts.get(&pcid) else {
        return Err(format!(
            "data on presentation context {pcid}, which was not accepted"
        ));
    };
    match (state, value.value_type) {
        (State::Idle, PDataValueType::Command) => {
            let bytes = value.data;
            if value.is_last {
                on_command(
                    pcid,
                    &bytes,
                    context,
                    calling_ae_title,
                    ctx,
                    association,
                    span,
                )
                .await
            } else {
                Ok(State::Command { pcid, bytes })
            }
        }
        (
            State::Command {
                pcid: expected,
                mut bytes,
            },
            PDataValueType::Command,
        ) if expected == pcid => {
            bytes.extend_from_slice(&value.data);
            if bytes.len() > dimse::MAX_COMMAND_SET_LEN {
                return Err("command set larger than 64 KiB".into());
            }
            if value.is_last {
                on_command(
                    pcid,
                    &bytes,
                    context,
                    calling_ae_title,
                    ctx,
                    association,
                    span,
                )
                .await
            } else {
                Ok(State::Command { pcid, bytes })
            }
        }
        (State::Store(receiving), PDataValueType::Data) if receiving.pcid() == pcid => {
            if !value.is_last {
                let receiving = receiving.append(&ctx.ingest, value.data).await;
                return Ok(State::Store(receiving));
            }
            let receiving = receiving.append(&ctx.ingest, value.data).await;
            let (pcid, response) = receiving.finish(&ctx.ingest, span).await;
            send_command(association, pcid, response).await?;
            Ok(State::Idle)
        }
        (
            State::Discard {
                pcid: expected,
                response,
            },
            PDataValueType::Data,
        ) if expected == pcid => {
            if value.is_last {
                send_command(association, pcid, response).await?;
                Ok(State::Idle)
            } else {
                Ok(State::Discard { pcid, response })
            }
        }
        (State::Store(receiving), _) => {
            receiving.abandon(&ctx.ingest).await;
            Err("P-DATA out of sequence during a C-STORE data set".into())
        }
        (_, value_type) => Err(format!(
            "unexpected {} fragment on presentation context {pcid}",
            if value_type == PDataValueType::Command {
                "command"
            } else {
                "data"
            }
        )),
    }
}

/// Dispatches a complete command set to its service.
async fn on_command(
    pcid: u8,
    bytes: &[u8],
    context: &Context,
    calling_ae_title: &str,
    ctx: &DicomContext,
    association: &mut AsyncServerAssociation<TcpStream>,
    span: &tracing::Span,
) -> Result<State, String> {
    let command = CommandSet::parse(bytes).map_err(|e| format!("unparseable command set: {e}"))?;
    match command.command_field() {
        command_field::C_ECHO_RQ => {
            let response = c_echo::handle(&command);
            send_command(association, pcid, response).await?;
            Ok(State::Idle)
        }
        command_field::C_STORE_RQ => match c_store::begin(
            pcid,
            &command,
            &context.abstract_syntax,
            &context.transfer_syntax,
            calling_ae_title,
            &ctx.ingest,
            span,
        ) {
            c_store::Begin::Receive(receiving) => Ok(State::Store(receiving)),
            c_store::Begin::Refuse(response) if command.has_data_set() => {
                Ok(State::Discard { pcid, response })
            }
            c_store::Begin::Refuse(response) => {
                send_command(association, pcid, response).await?;
                Ok(State::Idle)
            }
        },
        // A C-CANCEL-RQ has no response; nothing of ours is cancellable
        // once the data set has arrived.
        command_field::C_CANCEL_RQ => Ok(State::Idle),
        other => {
            // A service this node does not provide on this context: answer
            // it with the matching response type so the peer is not left
            // waiting, and keep the association.
            tracing::info!(parent: span, command_field = other, "unrecognized operation");
            let response = dimse::response(
                &command,
                other | 0x8000,
                status::UNRECOGNIZED_OPERATION,
                None,
            );
            if command.has_data_set() {
                Ok(State::Discard { pcid, response })
            } else {
                send_command(association, pcid, response).await?;
                Ok(State::Idle)
            }
        }
    }
}
