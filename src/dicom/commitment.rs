//! Storage Commitment Push Model SCP (PS3.4 Annex J). A modality asks, by
//! N-ACTION, whether the node has taken responsibility for a list of
//! instances; the answer comes as an N-EVENT-REPORT listing those that are
//! durable and whose blob verifies against its hash, and those that are
//! not, with a reason. Modalities delete their copies on this answer, so an
//! instance is reported committed only after its blob has been read back
//! and hashed.
//!
//! The report goes on the requesting association when the SCU is still
//! there; when that association ends before the SCU acknowledges the
//! report, it goes over a new association to the SCU's address in the AE
//! directory, the node proposing the SCP role (J.3.3).

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_ul::pdu::{PDataValue, PDataValueType, PresentationContextResultReason};
use dicom_ul::{ClientAssociationOptions, Pdu};

use super::context::{DicomContext, Op, Transport};
use super::dimse::{self, CommandSet, CommandSetBuilder, command_field, status};
use super::identifier;
use crate::config::NodeConfig;
use crate::ingest::Ingest;

use super::report::WELL_KNOWN_INSTANCE;

/// Failure Reasons (PS3.3 C.14.1.1).
const PROCESSING_FAILURE: u16 = 0x0110;
const NO_SUCH_OBJECT_INSTANCE: u16 = 0x0112;
const CLASS_INSTANCE_CONFLICT: u16 = 0x0119;

/// N-ACTION status: No such action type (PS3.7 Annex C, 0x0123).
const NO_SUCH_ACTION: u16 = 0x0123;

static NEXT_MESSAGE_ID: AtomicU16 = AtomicU16::new(1);

pub use super::report::{Outcome, Report};

fn n_action_response(request: &CommandSet, code: u16) -> Vec<u8> {
    let mut b = CommandSetBuilder::default()
        .ui(
            tags::AFFECTED_SOP_CLASS_UID,
            uids::STORAGE_COMMITMENT_PUSH_MODEL,
        )
        .us(tags::COMMAND_FIELD, command_field::N_ACTION_RSP)
        .us(tags::MESSAGE_ID_BEING_RESPONDED_TO, request.message_id())
        .us(tags::COMMAND_DATA_SET_TYPE, dimse::NO_DATA_SET)
        .us(tags::STATUS, code)
        .ui(tags::AFFECTED_SOP_INSTANCE_UID, WELL_KNOWN_INSTANCE);
    if code == status::SUCCESS {
        b = b.us(tags::ACTION_TYPE_ID, 1);
    }
    b.build()
}

/// The Storage Commitment Request (action type 1).
pub(super) async fn n_action<S: Transport>(
    op: &mut Op<'_, S>,
    data_set: &[u8],
) -> Result<(), String> {
    let requested = op
        .command
        .string(tags::REQUESTED_SOP_INSTANCE_UID)
        .unwrap_or_default();
    if requested != WELL_KNOWN_INSTANCE {
        let r = n_action_response(op.command, 0x0112);
        return op.send(r, None).await;
    }
    if op.command.u16(tags::ACTION_TYPE_ID) != Some(1) {
        let r = n_action_response(op.command, NO_SUCH_ACTION);
        return op.send(r, None).await;
    }
    let Some((transaction_uid, requested)) =
        identifier::decode(data_set, &op.context.transfer_syntax)
            .ok()
            .and_then(|obj| parse_request(&obj))
    else {
        tracing::info!(parent: op.span, "storage commitment request without Transaction UID or references");
        let r = n_action_response(op.command, PROCESSING_FAILURE);
        return op.send(r, None).await;
    };
    let r = n_action_response(op.command, status::SUCCESS);
    op.send(r, None).await?;
    let outcomes = check(&op.ctx.ingest, requested).await;
    let report = Report {
        message_id: NEXT_MESSAGE_ID.fetch_add(1, Ordering::Relaxed).max(1),
        transaction_uid,
        outcomes,
    };
    let committed = report
        .outcomes
        .iter()
        .filter(|o| o.failure_reason.is_none())
        .count();
    tracing::info!(
        parent: op.span,
        transaction_uid = ?report.transaction_uid,
        committed,
        failed = report.outcomes.len() - committed,
        "storage commitment"
    );
    let data = report.data_set(&op.context.transfer_syntax)?;
    let command = report.command();
    op.reports.push(report);
    op.send(command, Some(data)).await
}

fn parse_request(obj: &InMemDicomObject) -> Option<(String, Vec<(String, String)>)> {
    let transaction_uid = identifier::text(obj, tags::TRANSACTION_UID);
    if transaction_uid.is_empty() {
        return None;
    }
    let items = obj.get(tags::REFERENCED_SOP_SEQUENCE)?.items()?;
    // One or more items (PS3.4 J.3.2, Table J.3-1): an empty list asks
    // for nothing, and is refused as a missing one is.
    if items.is_empty() {
        return None;
    }
    let refs = items
        .iter()
        .map(|item| {
            (
                identifier::text(item, tags::REFERENCED_SOP_CLASS_UID),
                identifier::text(item, tags::REFERENCED_SOP_INSTANCE_UID),
            )
        })
        .collect();
    Some((transaction_uid, refs))
}

/// Checks each instance: indexed (so durable: the index only lists
/// instances whose blob was flushed first), of the class claimed, and its
/// blob reads back with the right hash.
async fn check(ingest: &Ingest, requested: Vec<(String, String)>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(requested.len());
    for (sop_class_uid, sop_instance_uid) in requested {
        let reason = match ingest.index().instance_versions(&sop_instance_uid).await {
            Err(e) => {
                tracing::error!(error = %e, "storage commitment: index lookup failed");
                Some(PROCESSING_FAILURE)
            }
            Ok(versions) => match versions.into_iter().find(|v| v.is_current) {
                None => Some(NO_SUCH_OBJECT_INSTANCE),
                Some(v) if v.sop_class_uid != sop_class_uid => Some(CLASS_INSTANCE_CONFLICT),
                Some(v) => match ingest.store().verify(&v.blob_hash).await {
                    Ok(_) => None,
                    Err(e) => {
                        tracing::error!(%sop_instance_uid, error = %e, "storage commitment: blob does not verify");
                        Some(PROCESSING_FAILURE)
                    }
                },
            },
        };
        out.push(Outcome {
            sop_class_uid,
            sop_instance_uid,
            failure_reason: reason,
        });
    }
    out
}

/// An N-EVENT-REPORT-RSP arrived on the association: that report is
/// delivered.
pub fn acknowledged(command: &CommandSet, reports: &mut Vec<Report>, span: &tracing::Span) {
    let id = command.u16(tags::MESSAGE_ID_BEING_RESPONDED_TO);
    let before = reports.len();
    reports.retain(|r| Some(r.message_id) != id);
    if reports.len() < before {
        tracing::info!(parent: span, status = ?command.u16(tags::STATUS), "storage commitment report acknowledged");
    }
}

/// Sends unacknowledged reports over a new association to the SCU.
pub fn deliver_later(reports: Vec<Report>, calling_ae_title: &str, ctx: &DicomContext) {
    let config: Arc<NodeConfig> = ctx.config.clone();
    let our_ae = ctx.ae_title.clone();
    let scu = calling_ae_title.to_string();
    tokio::spawn(async move {
        let Some(remote) = config.remote_ae(&scu).cloned() else {
            tracing::error!(ae_title = ?scu, "storage commitment report cannot be delivered: the AE title is not in the AE directory");
            return;
        };
        for report in reports {
            let mut delivered = false;
            // A few attempts: the modality may be between associations.
            for attempt in 0..3u32 {
                match deliver(&report, &our_ae, &remote, &config).await {
                    Ok(()) => {
                        delivered = true;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(ae_title = ?scu, attempt, error = %e, "storage commitment report not delivered yet");
                        tokio::time::sleep(Duration::from_secs(2u64.pow(attempt))).await;
                    }
                }
            }
            if delivered {
                tracing::info!(ae_title = ?scu, transaction_uid = ?report.transaction_uid, "storage commitment report delivered on a new association");
            } else {
                tracing::error!(ae_title = ?scu, transaction_uid = ?report.transaction_uid, "storage commitment report could not be delivered");
            }
        }
    });
}

async fn deliver(
    report: &Report,
    our_ae: &str,
    remote: &crate::config::RemoteAe,
    config: &NodeConfig,
) -> Result<(), String> {
    let options = ClientAssociationOptions::new()
        .calling_ae_title(our_ae.to_string())
        .called_ae_title(remote.ae_title.clone())
        .max_pdu_length(config.max_pdu_length)
        .connection_timeout(Duration::from_secs(10))
        .with_presentation_context(
            uids::STORAGE_COMMITMENT_PUSH_MODEL.to_string(),
            vec![
                uids::EXPLICIT_VR_LITTLE_ENDIAN.to_string(),
                uids::IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
            ],
        )
        // The node is the Storage Commitment SCP on an association it
        // requests: it asks for the SCP role only.
        .with_role_selection(uids::STORAGE_COMMITMENT_PUSH_MODEL.to_string(), false, true);
    let address = format!("{}:{}", remote.host, remote.port);
    if remote.tls {
        let tls = super::tls::client_config(config)?;
        let mut association = options
            .tls_config(tls)
            .server_name(&remote.host)
            .establish_tls_async(address)
            .await
            .map_err(|e| e.to_string())?;
        let _ = association.inner_stream().get_ref().0.set_nodelay(true);
        send_report(association, report).await
    } else {
        let mut association = options
            .establish_async(address)
            .await
            .map_err(|e| e.to_string())?;
        let _ = association.inner_stream().set_nodelay(true);
        send_report(association, report).await
    }
}

/// Sends one report on an association the node requested and waits for
/// its N-EVENT-REPORT-RSP.
async fn send_report<S>(
    mut association: dicom_ul::association::AsyncClientAssociation<S>,
    report: &Report,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
{
    use dicom_ul::association::AsyncAssociation;
    let Some(pc) = association
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .cloned()
    else {
        let _ = AsyncAssociation::abort(association).await;
        return Err("the SCU accepted no Storage Commitment presentation context".into());
    };
    let ts = pc.transfer_syntax.trim_end_matches('\0').to_string();
    let data = report.data_set(&ts)?;
    AsyncAssociation::send(
        &mut association,
        &Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc.id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: report.command(),
            }],
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    {
        use tokio::io::AsyncWriteExt;
        let mut writer = AsyncAssociation::send_pdata(&mut association, pc.id);
        writer.write_all(&data).await.map_err(|e| e.to_string())?;
        writer.finish().await.map_err(|e| e.to_string())?;
    }
    let response = AsyncAssociation::receive(&mut association)
        .await
        .map_err(|e| e.to_string())?;
    let _ = AsyncAssociation::release(association).await;
    match response {
        Pdu::PData { data }
            if data
                .first()
                .is_some_and(|v| v.value_type == PDataValueType::Command) =>
        {
            let command = CommandSet::parse(&data[0].data).map_err(|e| e.to_string())?;
            if command.command_field() == command_field::N_EVENT_REPORT_RSP {
                Ok(())
            } else {
                Err(format!(
                    "unexpected response {:#06x}",
                    command.command_field()
                ))
            }
        }
        _ => Err("no N-EVENT-REPORT-RSP".into()),
    }
}
