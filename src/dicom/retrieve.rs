//! C-MOVE and C-GET SCP (PS3.4 C.4.2, C.4.3): the instances an identifier
//! names are sent as C-STORE sub-operations, over a new association to the
//! move destination (C-MOVE) or on the requestor's own association (C-GET).
//! Every instance is hash-verified before a byte of it is sent; the final
//! response goes out only after the last sub-operation's C-STORE-RSP has
//! arrived.

use std::time::Duration;

use dicom_dictionary_std::{tags, uids};
use dicom_ul::association::{Association, AsyncAssociation};
use dicom_ul::pdu::PresentationContextResultReason;
use dicom_ul::{ClientAssociationOptions, Pdu};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::context::{During, Op, Transport, during};
use super::dimse::{self, CommandSetBuilder, SubOperations, command_field, status};
use super::{identifier, sop_classes};
use crate::config::RemoteAe;
use crate::query::{self, InstanceLocation, Level};
use crate::storage::BlobStore;

/// An accepted presentation context of the association sub-operations go
/// over.
#[derive(Debug, Clone)]
struct Offered {
    id: u8,
    abstract_syntax: String,
    transfer_syntax: String,
}

use crate::transcode::{NATIVE, is_decodable, is_native};

/// How an instance will be sent: on which context, and whether converted.
fn choose(offered: &[Offered], instance: &InstanceLocation) -> Option<(u8, Option<String>)> {
    let for_class = || {
        offered
            .iter()
            .filter(|o| o.abstract_syntax == instance.sop_class_uid)
    };
    if let Some(o) = for_class().find(|o| o.transfer_syntax == instance.transfer_syntax_uid) {
        return Some((o.id, None));
    }
    if is_native(&instance.transfer_syntax_uid) || is_decodable(&instance.transfer_syntax_uid) {
        // Prefer explicit VR little endian, then whatever native one was
        // accepted (the NATIVE order).
        for ts in NATIVE {
            if let Some(o) = for_class().find(|o| o.transfer_syntax == *ts) {
                return Some((o.id, Some(ts.to_string())));
            }
        }
    }
    None
}

/// The outcome of one sub-operation.
enum SubOutcome {
    Completed,
    Warning,
    Failed,
}

/// Why the whole retrieval stopped.
struct Broken(String);

/// The data set a sub-operation sends: streamed from the verified blob, or
/// converted in memory.
enum Payload {
    /// The stored data set; `pad` appends one zero byte to a stored deflate
    /// stream of odd length (dcmtk aborts on an odd fragment; see
    /// `crate::transcode::convert_into`).
    Stream {
        reader: crate::storage::VerifiedReader,
        pad: bool,
    },
    Converted(Vec<u8>),
}

/// Opens (and verifies) the blob and, when needed, converts it, before
/// anything is sent: a blob that does not verify or cannot be converted
/// fails its sub-operation and leaves the association clean.
async fn prepare(
    store: &BlobStore,
    instance: &InstanceLocation,
    convert_to: Option<&str>,
) -> Result<Payload, String> {
    let blob = store
        .open_verified(&instance.blob_hash, instance.blob_size)
        .await
        .map_err(|e| format!("blob {}: {e}", instance.blob_hash))?;
    let mut reader = blob.into_reader();
    let mut head = vec![0u8; 144];
    reader
        .read_exact(&mut head)
        .await
        .map_err(|e| format!("blob {}: {e}", instance.blob_hash))?;
    let meta_len = crate::part10::file_meta_len(&head)
        .ok_or_else(|| format!("blob {} has no file meta", instance.blob_hash))?;
    let mut rest_of_meta = vec![0u8; meta_len.saturating_sub(head.len())];
    reader
        .read_exact(&mut rest_of_meta)
        .await
        .map_err(|e| format!("blob {}: {e}", instance.blob_hash))?;
    let Some(target) = convert_to else {
        let data_set_len = instance.blob_size.saturating_sub(meta_len as u64);
        let pad = instance.transfer_syntax_uid
            == crate::transcode::DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
            && data_set_len % 2 == 1;
        return Ok(Payload::Stream { reader, pad });
    };
    // The whole object is needed to re-encode it (and to decode its pixel
    // data).
    let mut whole = Vec::with_capacity(instance.blob_size as usize);
    whole.extend_from_slice(&head);
    whole.extend_from_slice(&rest_of_meta);
    reader
        .read_to_end(&mut whole)
        .await
        .map_err(|e| format!("blob {}: {e}", instance.blob_hash))?;
    let source = instance.transfer_syntax_uid.clone();
    let target = target.to_string();
    tokio::task::spawn_blocking(move || crate::transcode::convert_data_set(whole, &source, &target))
        .await
        .map_err(|e| e.to_string())?
        .map(Payload::Converted)
}

/// Sends a prepared data set on a presentation context.
async fn send_payload<S, A>(association: &mut A, pcid: u8, payload: Payload) -> Result<(), Broken>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    A: AsyncAssociation<S> + Send,
{
    let broken = |e: std::io::Error| Broken(format!("sending a data set: {e}"));
    let mut writer = association.send_pdata(pcid);
    match payload {
        // As stored: streamed from the blob into P-DATA, never whole in
        // memory.
        Payload::Stream { mut reader, pad } => {
            let mut out = RetryAfterSend(&mut writer);
            tokio::io::copy(&mut reader, &mut out)
                .await
                .map_err(broken)?;
            if pad {
                out.write_all(&[0]).await.map_err(broken)?;
            }
        }
        Payload::Converted(data) => writer.write_all(&data).await.map_err(broken)?,
    }
    writer.finish().await.map_err(broken)
}

/// dicom-ul 0.10's `AsyncPDataWriter` answers a write with `Ok(0)` when an
/// earlier write left its PDU buffer exactly full: that call sends the
/// PDU and takes none of the new bytes. `tokio::io::copy` and `write_all`
/// read `Ok(0)` as a writer that can take no more (`WriteZero`), so a data
/// set streamed in pieces failed wherever the pieces happened to fill a
/// PDU exactly: every instance past about 64 MiB at a 16 KiB maximum PDU.
/// After such a send the buffer is empty, and the same bytes are offered
/// again at once. (A data set written with one `write_all` never leaves
/// the buffer exactly full before another write: context.rs and
/// commitment.rs need no such wrapper.)
struct RetryAfterSend<W>(W);

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for RetryAfterSend<W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let inner = &mut self.get_mut().0;
        match std::pin::Pin::new(&mut *inner).poll_write(cx, buf) {
            std::task::Poll::Ready(Ok(0)) if !buf.is_empty() => {
                std::pin::Pin::new(inner).poll_write(cx, buf)
            }
            other => other,
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// One C-STORE sub-operation: request, data set, response. While waiting
/// for the response a C-CANCEL for `cancel_message_id` (C-GET) sets
/// `cancelled`.
#[allow(clippy::too_many_arguments)]
async fn sub_operation<S, A>(
    association: &mut A,
    offered: &[Offered],
    instance: &InstanceLocation,
    store: &BlobStore,
    message_id: u16,
    originator: Option<(&str, u16)>,
    cancel_message_id: Option<u16>,
    cancelled: &mut bool,
    span: &tracing::Span,
) -> Result<SubOutcome, Broken>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    A: AsyncAssociation<S> + Send,
{
    let Some((pcid, convert_to)) = choose(offered, instance) else {
        tracing::warn!(
            parent: span,
            sop_instance_uid = %instance.sop_instance_uid,
            sop_class_uid = %instance.sop_class_uid,
            transfer_syntax = %instance.transfer_syntax_uid,
            "sub-operation failed: the destination accepts neither this SOP class in the stored transfer syntax nor an uncompressed one it can be converted to"
        );
        return Ok(SubOutcome::Failed);
    };
    let mut b = CommandSetBuilder::default()
        .ui(tags::AFFECTED_SOP_CLASS_UID, &instance.sop_class_uid)
        .us(tags::COMMAND_FIELD, command_field::C_STORE_RQ)
        .us(tags::MESSAGE_ID, message_id)
        .us(tags::PRIORITY, 0)
        .us(tags::COMMAND_DATA_SET_TYPE, dimse::DATA_SET_PRESENT)
        .ui(tags::AFFECTED_SOP_INSTANCE_UID, &instance.sop_instance_uid);
    if let Some((ae, id)) = originator {
        b = b
            .text(tags::MOVE_ORIGINATOR_APPLICATION_ENTITY_TITLE, ae)
            .us(tags::MOVE_ORIGINATOR_MESSAGE_ID, id);
    }
    let payload = match prepare(store, instance, convert_to.as_deref()).await {
        Ok(p) => p,
        Err(why) => {
            tracing::warn!(
                parent: span,
                sop_instance_uid = %instance.sop_instance_uid,
                transfer_syntax = %instance.transfer_syntax_uid,
                converting_to = convert_to.as_deref().unwrap_or("-"),
                reason = %why,
                "sub-operation failed before sending"
            );
            return Ok(SubOutcome::Failed);
        }
    };
    AsyncAssociation::send(
        association,
        &Pdu::PData {
            data: vec![dicom_ul::pdu::PDataValue {
                presentation_context_id: pcid,
                value_type: dicom_ul::pdu::PDataValueType::Command,
                is_last: true,
                data: b.build(),
            }],
        },
    )
    .await
    .map_err(|e| Broken(format!("sending C-STORE-RQ: {e}")))?;
    send_payload(association, pcid, payload).await?;
    loop {
        match during(
            AsyncAssociation::receive(association).await,
            cancel_message_id.unwrap_or(0),
        ) {
            During::Cancel if cancel_message_id.is_some() => *cancelled = true,
            During::StrayCancel => {}
            During::Command { command, .. }
                if command.command_field() == command_field::C_STORE_RSP
                    && command.u16(tags::MESSAGE_ID_BEING_RESPONDED_TO) == Some(message_id) =>
            {
                let code = command.u16(tags::STATUS).unwrap_or(0xFFFF);
                return Ok(match code {
                    0x0000 => SubOutcome::Completed,
                    0xB000..=0xBFFF | 0x0107 | 0x0116 => SubOutcome::Warning,
                    _ => {
                        tracing::warn!(parent: span, sop_instance_uid = %instance.sop_instance_uid, status = format_args!("{code:#06x}"), "destination refused a sub-operation");
                        SubOutcome::Failed
                    }
                });
            }
            During::Cancel | During::Command { .. } => {
                return Err(Broken(
                    "unexpected command while awaiting C-STORE-RSP".into(),
                ));
            }
            During::End(why) => return Err(Broken(why)),
        }
    }
}

/// Counts and failed UIDs of a retrieval.
#[derive(Default)]
struct Tally {
    counts: SubOperations,
    failed_uids: Vec<String>,
    cancelled: bool,
}

impl Tally {
    fn new(total: usize) -> Tally {
        Tally {
            counts: SubOperations {
                remaining: total.min(u16::MAX as usize) as u16,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn record(&mut self, instance: &InstanceLocation, outcome: SubOutcome) {
        self.counts.remaining = self.counts.remaining.saturating_sub(1);
        match outcome {
            SubOutcome::Completed => self.counts.completed += 1,
            SubOutcome::Warning => self.counts.warning += 1,
            SubOutcome::Failed => {
                self.counts.failed += 1;
                self.failed_uids.push(instance.sop_instance_uid.clone());
            }
        }
    }

    /// The rest fail (the association to the destination broke).
    fn fail_rest(&mut self, rest: &[InstanceLocation]) {
        for i in rest {
            self.record(i, SubOutcome::Failed);
        }
    }

    /// The final status (PS3.4 C.4.2.1.5).
    fn final_status(&self) -> u16 {
        if self.cancelled {
            status::CANCEL
        } else if self.counts.failed == 0 && self.counts.warning == 0 {
            status::SUCCESS
        } else if self.counts.completed == 0 && self.counts.warning == 0 {
            status::UNABLE_TO_PERFORM_SUB_OPERATIONS
        } else {
            status::SUB_OPERATIONS_COMPLETE_WITH_FAILURES
        }
    }
}

/// Finds what an identifier names. `Err` is the final response to send.
async fn plan<S>(
    op: &Op<'_, S>,
    data_set: &[u8],
    response_field: u16,
) -> Result<Vec<InstanceLocation>, Vec<u8>> {
    let refuse = |code: u16, comment: &str| {
        dimse::query_retrieve_response(op.command, response_field, code, false, None, Some(comment))
    };
    let request = identifier::decode(data_set, &op.context.transfer_syntax)
        .map_err(|_| refuse(status::CANNOT_UNDERSTAND, "identifier cannot be decoded"))?;
    let level = identifier::level(&request)
        .map_err(|e| refuse(status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, &e))?;
    if level == Level::Patient && sop_classes::is_study_root(&op.context.abstract_syntax) {
        return Err(refuse(
            status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            "PATIENT level is not part of the Study Root model",
        ));
    }
    let query = identifier::retrieve_query(&request)
        .map_err(|e| refuse(status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, &e))?;
    // A regional prior this node does not hold yet is fetched from the
    // hospital that holds it first; the workstation need not know.
    let study_instance_uid = identifier::text(&request, tags::STUDY_INSTANCE_UID);
    if let Some(region) = op.ctx.region.as_ref()
        && !study_instance_uid.is_empty()
        && !study_instance_uid.contains('\\')
    {
        match crate::peer::regional_holder(&op.ctx.ingest, &study_instance_uid).await {
            Ok(Some(holding)) => {
                let user = format!("ae:{}", op.calling_ae_title.trim());
                match crate::peer::fetch_study(
                    region,
                    &op.ctx.ingest,
                    &holding,
                    &study_instance_uid,
                    crate::peer::Asked::treatment(&user, format!("retrieve by {user}")),
                )
                .await
                {
                    Ok(r) => {
                        tracing::info!(parent: op.span, fetched = r.fetched, present = r.already_present, hospital = %holding, "regional prior fetched for a retrieve")
                    }
                    Err(e) => {
                        tracing::warn!(parent: op.span, error = %e, "regional prior could not be fetched");
                        return Err(refuse(
                            status::UNABLE_TO_PERFORM_SUB_OPERATIONS,
                            "the regional prior could not be fetched from the hospital that holds it",
                        ));
                    }
                }
            }
            Ok(None) => crate::peer::touch(&op.ctx.ingest, &study_instance_uid).await,
            Err(e) => tracing::warn!(parent: op.span, error = %e, "regional prior lookup failed"),
        }
    }
    let matches = query::collect(op.ctx.ingest.index(), query)
        .await
        .map_err(|e| {
            tracing::error!(parent: op.span, error = %e, "retrieve: query failed");
            refuse(0xA701, "unable to calculate the number of matches")
        })?;
    Ok(matches.into_iter().filter_map(|m| m.instance).collect())
}

/// The final response, with the Failed SOP Instance UID List when any
/// sub-operation failed.
fn final_response<S>(
    op: &Op<'_, S>,
    response_field: u16,
    tally: &Tally,
) -> (Vec<u8>, Option<Vec<u8>>) {
    let code = tally.final_status();
    let data_set = if tally.failed_uids.is_empty() {
        None
    } else {
        let mut obj = dicom_object::InMemDicomObject::new_empty();
        obj.put(dicom_core::DataElement::new(
            tags::FAILED_SOP_INSTANCE_UID_LIST,
            dicom_core::VR::UI,
            dicom_core::PrimitiveValue::Strs(tally.failed_uids.iter().cloned().collect()),
        ));
        identifier::encode(&obj, &op.context.transfer_syntax).ok()
    };
    let command = dimse::query_retrieve_response(
        op.command,
        response_field,
        code,
        data_set.is_some(),
        Some(tally.counts),
        None,
    );
    (command, data_set)
}

fn pending<S>(op: &Op<'_, S>, response_field: u16, counts: SubOperations) -> Vec<u8> {
    dimse::query_retrieve_response(
        op.command,
        response_field,
        status::PENDING,
        false,
        Some(counts),
        None,
    )
}

/// C-MOVE: sub-operations over a new association to the destination.
pub(super) async fn c_move<S: Transport>(
    op: &mut Op<'_, S>,
    data_set: &[u8],
) -> Result<(), String> {
    let _timer = crate::metrics::DimseTimer::start("C-MOVE");
    let field = command_field::C_MOVE_RSP;
    if !op.ctx.may(op.calling_ae_title, true) {
        let r = dimse::query_retrieve_response(
            op.command,
            field,
            status::NOT_AUTHORIZED,
            false,
            None,
            Some("calling AE title may not retrieve"),
        );
        return op.send(r, None).await;
    }
    let destination_title = op
        .command
        .string(tags::MOVE_DESTINATION)
        .unwrap_or_default();
    let Some(destination) = op
        .ctx
        .config
        .remote_ae(&destination_title)
        .filter(|r| r.move_destination)
        .cloned()
    else {
        tracing::warn!(parent: op.span, destination = ?destination_title, "C-MOVE to an AE title not in the AE directory");
        let r = dimse::query_retrieve_response(
            op.command,
            field,
            status::MOVE_DESTINATION_UNKNOWN,
            false,
            None,
            Some("move destination unknown"),
        );
        return op.send(r, None).await;
    };
    let instances = match plan(op, data_set, field).await {
        Ok(i) => i,
        Err(r) => return op.send(r, None).await,
    };
    let audited = crate::audit::begin_transferring(
        op.ctx.ingest.index(),
        Some((destination.ae_title.as_str(), destination.host.as_str())),
        &instances,
    )
    .await;
    let started = std::time::Instant::now();
    let total = instances.len();
    let (progress_tx, mut progress_rx) = mpsc::channel::<SubOperations>(16);
    let cancel = CancellationToken::new();
    let task = tokio::spawn(move_to(MoveJob {
        config: op.ctx.config.clone(),
        destination: destination.clone(),
        instances,
        our_ae_title: op.ctx.ae_title.clone(),
        store: op.ctx.ingest.store().clone(),
        originator: (op.calling_ae_title.to_string(), op.command.message_id()),
        progress: progress_tx,
        cancel: cancel.clone(),
        span: op.span.clone(),
    }));
    let message_id = op.command.message_id();
    let mut peer_gone: Option<String> = None;
    loop {
        let event = tokio::select! {
            biased;
            pdu = op.association.receive(), if peer_gone.is_none() && !cancel.is_cancelled() => Err(during(pdu, message_id)),
            progress = progress_rx.recv() => Ok(progress),
        };
        match event {
            Ok(Some(counts)) => {
                if peer_gone.is_none() {
                    let r = pending(op, field, counts);
                    if let Err(e) = op.send(r, None).await {
                        peer_gone = Some(e);
                        cancel.cancel();
                    }
                }
            }
            Ok(None) => break,
            Err(During::Cancel) => {
                tracing::info!(parent: op.span, "C-MOVE cancel requested");
                cancel.cancel();
            }
            Err(During::StrayCancel) => {}
            Err(During::Command { command, .. }) => {
                peer_gone = Some(format!(
                    "command {:#06x} while a C-MOVE was outstanding",
                    command.command_field()
                ));
                cancel.cancel();
            }
            Err(During::End(why)) => {
                peer_gone = Some(why);
                cancel.cancel();
            }
        }
    }
    // The sub-operations have really ended (the task owns the association
    // to the destination and releases it before returning).
    let tally = task.await.map_err(|e| format!("C-MOVE task failed: {e}"))?;
    if let Some(a) = audited {
        a.transferred(
            tally.counts.completed,
            tally.counts.failed,
            tally.counts.warning,
        )
    }
    tracing::info!(
        parent: op.span,
        destination = %destination.ae_title,
        instances = total,
        completed = tally.counts.completed,
        failed = tally.counts.failed,
        warning = tally.counts.warning,
        cancelled = tally.cancelled,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "C-MOVE"
    );
    if let Some(why) = peer_gone {
        return Err(why);
    }
    let (command, data) = final_response(op, field, &tally);
    op.send(command, data).await
}

/// The presentation contexts proposed to a destination: for each SOP class,
/// one per stored transfer syntax, and one offering the uncompressed
/// syntaxes to convert to. At most 128 (PS3.8 9.3.2.2: odd IDs 1-255).
fn proposals(instances: &[InstanceLocation]) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    let mut classes: Vec<&str> = instances.iter().map(|i| i.sop_class_uid.as_str()).collect();
    classes.sort();
    classes.dedup();
    for class in &classes {
        let mut stored: Vec<&str> = instances
            .iter()
            .filter(|i| i.sop_class_uid == *class)
            .map(|i| i.transfer_syntax_uid.as_str())
            .collect();
        stored.sort();
        stored.dedup();
        for ts in stored.iter().filter(|ts| !is_native(ts)) {
            out.push((class.to_string(), vec![ts.to_string()]));
        }
        out.push((
            class.to_string(),
            NATIVE.iter().map(|s| s.to_string()).collect(),
        ));
        for ts in stored
            .iter()
            .filter(|ts| is_native(ts) && **ts != uids::EXPLICIT_VR_LITTLE_ENDIAN)
        {
            out.push((class.to_string(), vec![ts.to_string()]));
        }
    }
    out.truncate(128);
    out
}

/// What the C-MOVE task needs: where to, what, and how to report.
struct MoveJob {
    config: std::sync::Arc<crate::config::NodeConfig>,
    destination: RemoteAe,
    instances: Vec<InstanceLocation>,
    our_ae_title: String,
    store: std::sync::Arc<BlobStore>,
    /// Move Originator AE Title and Message ID.
    originator: (String, u16),
    progress: mpsc::Sender<SubOperations>,
    cancel: CancellationToken,
    span: tracing::Span,
}

async fn move_to(job: MoveJob) -> Tally {
    let mut tally = Tally::new(job.instances.len());
    if job.instances.is_empty() {
        return tally;
    }
    let destination = &job.destination;
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(job.our_ae_title.clone())
        .called_ae_title(destination.ae_title.clone())
        .max_pdu_length(job.config.max_pdu_length)
        .connection_timeout(Duration::from_secs(10));
    for (class, ts) in proposals(&job.instances) {
        options = options.with_presentation_context(class, ts);
    }
    let address = format!("{}:{}", destination.host, destination.port);
    let established = if destination.tls {
        match super::tls::client_config(&job.config) {
            Ok(tls) => options
                .tls_config(tls)
                .server_name(&destination.host)
                .establish_tls_async(address.as_str())
                .await
                .map(Established::Tls)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        }
    } else {
        options
            .establish_async(address.as_str())
            .await
            .map(Established::Plain)
            .map_err(|e| e.to_string())
    };
    match established {
        Ok(Established::Plain(mut association)) => {
            let _ = association_nodelay(association.inner_stream());
            transfer(association, &job, tally).await
        }
        Ok(Established::Tls(mut association)) => {
            let _ = association_nodelay(association.inner_stream().get_ref().0);
            transfer(association, &job, tally).await
        }
        Err(e) => {
            tracing::warn!(parent: &job.span, destination = %destination.ae_title, %address, error = %e, "cannot associate with the move destination");
            tally.fail_rest(&job.instances);
            tally
        }
    }
}

/// The association to a move destination, in the clear or over TLS.
// One value per C-MOVE, moved once into `transfer`: the size difference
// between the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
enum Established {
    Plain(dicom_ul::association::AsyncClientAssociation<TcpStream>),
    Tls(
        dicom_ul::association::AsyncClientAssociation<
            dicom_ul::association::client::AsyncTlsStream,
        >,
    ),
}

/// A C-STORE-RQ is a small PDU followed by the data set: with Nagle's
/// algorithm each sub-operation would wait for a delayed ACK.
fn association_nodelay(socket: &TcpStream) -> std::io::Result<()> {
    socket.set_nodelay(true)
}

/// The sub-operations of a C-MOVE over the association to its destination.
async fn transfer<S>(
    mut association: dicom_ul::association::AsyncClientAssociation<S>,
    job: &MoveJob,
    mut tally: Tally,
) -> Tally
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    let (destination, instances, span) = (&job.destination, &job.instances, &job.span);
    let offered: Vec<Offered> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| Offered {
            id: pc.id,
            abstract_syntax: pc.abstract_syntax.trim_end_matches('\0').to_string(),
            transfer_syntax: pc.transfer_syntax.trim_end_matches('\0').to_string(),
        })
        .collect();
    let mut message_id: u16 = 0;
    let mut never = false;
    for (n, instance) in instances.iter().enumerate() {
        if job.cancel.is_cancelled() {
            tally.cancelled = true;
            break;
        }
        message_id = message_id.wrapping_add(1).max(1);
        match sub_operation(
            &mut association,
            &offered,
            instance,
            &job.store,
            message_id,
            Some((&job.originator.0, job.originator.1)),
            None,
            &mut never,
            span,
        )
        .await
        {
            Ok(outcome) => tally.record(instance, outcome),
            Err(Broken(why)) => {
                tracing::warn!(parent: span, destination = %destination.ae_title, reason = %why, "association to the move destination broke");
                tally.fail_rest(&instances[n..]);
                let _ = AsyncAssociation::abort(association).await;
                return tally;
            }
        }
        if tally.counts.remaining > 0 {
            let _ = job.progress.send(tally.counts).await;
        }
    }
    let _ = AsyncAssociation::release(association).await;
    tally
}

/// C-GET: sub-operations on the requestor's own association, on the storage
/// contexts it proposed (with the SCP role).
pub(super) async fn c_get<S: Transport>(op: &mut Op<'_, S>, data_set: &[u8]) -> Result<(), String> {
    let _timer = crate::metrics::DimseTimer::start("C-GET");
    let field = command_field::C_GET_RSP;
    if !op.ctx.may(op.calling_ae_title, true) {
        let r = dimse::query_retrieve_response(
            op.command,
            field,
            status::NOT_AUTHORIZED,
            false,
            None,
            Some("calling AE title may not retrieve"),
        );
        return op.send(r, None).await;
    }
    let instances = match plan(op, data_set, field).await {
        Ok(i) => i,
        Err(r) => return op.send(r, None).await,
    };
    let audited = crate::audit::begin_transferring(op.ctx.ingest.index(), None, &instances).await;
    let started = std::time::Instant::now();
    let offered: Vec<Offered> = op
        .contexts
        .iter()
        .filter(|(_, c)| {
            sop_classes::is_storage(&c.abstract_syntax)
                && op.association.requestor_roles_for(&c.abstract_syntax).scp
        })
        .map(|(id, c)| Offered {
            id: *id,
            abstract_syntax: c.abstract_syntax.clone(),
            transfer_syntax: c.transfer_syntax.clone(),
        })
        .collect();
    let mut tally = Tally::new(instances.len());
    let store = op.ctx.ingest.store().clone();
    let get_message_id = op.command.message_id();
    let mut message_id: u16 = 0x8000;
    for (n, instance) in instances.iter().enumerate() {
        if tally.cancelled {
            break;
        }
        message_id = message_id.wrapping_add(1).max(1);
        let mut cancelled = false;
        let outcome = sub_operation(
            &mut *op.association,
            &offered,
            instance,
            &store,
            message_id,
            None,
            Some(get_message_id),
            &mut cancelled,
            op.span,
        )
        .await;
        tally.cancelled |= cancelled;
        match outcome {
            Ok(o) => tally.record(instance, o),
            Err(Broken(why)) => {
                tally.fail_rest(&instances[n..]);
                return Err(why);
            }
        }
        if tally.counts.remaining > 0 && !tally.cancelled {
            let r = pending(op, field, tally.counts);
            op.send(r, None).await?;
        }
        // A C-CANCEL that arrived between sub-operations.
        if !tally.cancelled {
            tally.cancelled = poll_cancel(op, get_message_id).await?;
        }
    }
    tracing::info!(
        parent: op.span,
        instances = instances.len(),
        completed = tally.counts.completed,
        failed = tally.counts.failed,
        warning = tally.counts.warning,
        cancelled = tally.cancelled,
        elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
        "C-GET"
    );
    if let Some(a) = audited {
        a.transferred(
            tally.counts.completed,
            tally.counts.failed,
            tally.counts.warning,
        )
    }
    let (command, data) = final_response(op, field, &tally);
    op.send(command, data).await
}

/// Reads a C-CANCEL if one is already waiting, without blocking.
async fn poll_cancel<S: Transport>(op: &mut Op<'_, S>, message_id: u16) -> Result<bool, String> {
    let received = tokio::select! {
        biased;
        pdu = op.association.receive() => Some(pdu),
        _ = std::future::ready(()) => None,
    };
    match received.map(|pdu| during(pdu, message_id)) {
        None => Ok(false),
        Some(During::Cancel) => Ok(true),
        Some(During::StrayCancel) => Ok(false),
        Some(During::Command { command, .. }) => Err(format!(
            "command {:#06x} while a C-GET was outstanding",
            command.command_field()
        )),
        Some(During::End(why)) => Err(why),
    }
}
