//! C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root, levels PATIENT
//! to IMAGE, over the shared matcher. Matches are sent as Pending
//! responses as the database produces them; a C-CANCEL stops the query.

use super::context::{During, Op, Transport, during};
use super::dimse::{self, command_field, status};
use super::{identifier, sop_classes};
use crate::query::{self, Item, Level, Outcome};

pub(super) async fn run<S: Transport>(op: &mut Op<'_, S>, data_set: &[u8]) -> Result<(), String> {
    let _timer = crate::metrics::DimseTimer::start("C-FIND");
    let reply = |status: u16, comment: Option<&str>| {
        dimse::query_retrieve_response(
            op.command,
            command_field::C_FIND_RSP,
            status,
            false,
            None,
            comment,
        )
    };
    let allowed = op.ctx.may(op.calling_ae_title, false);
    crate::audit::dicom_query(
        &op.context.abstract_syntax,
        &op.context.transfer_syntax,
        data_set,
        allowed,
    );
    if !allowed {
        tracing::warn!(parent: op.span, "C-FIND refused: calling AE may not query");
        let r = reply(
            status::NOT_AUTHORIZED,
            Some("calling AE title may not query"),
        );
        return op.send(r, None).await;
    }
    let request = match identifier::decode(data_set, &op.context.transfer_syntax) {
        Ok(obj) => obj,
        Err(e) => {
            tracing::info!(parent: op.span, error = %e, "C-FIND identifier cannot be decoded");
            let r = reply(
                status::CANNOT_UNDERSTAND,
                Some("identifier cannot be decoded"),
            );
            return op.send(r, None).await;
        }
    };
    let level = match identifier::level(&request) {
        Ok(level) => level,
        Err(e) => {
            let r = reply(status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, Some(&e));
            return op.send(r, None).await;
        }
    };
    if level == Level::Patient && sop_classes::is_study_root(&op.context.abstract_syntax) {
        let r = reply(
            status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
            Some("PATIENT level is not part of the Study Root model"),
        );
        return op.send(r, None).await;
    }
    let (query, unsupported) = match identifier::query_from(&request, level) {
        Ok(q) => q,
        Err(e) => {
            tracing::info!(parent: op.span, error = %e, "C-FIND identifier refused");
            let r = reply(status::IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, Some(&e));
            return op.send(r, None).await;
        }
    };
    let pending = if unsupported {
        status::PENDING_OPTIONAL_KEYS_UNSUPPORTED
    } else {
        status::PENDING
    };
    let started = std::time::Instant::now();
    let mut matches = query::run(op.ctx.ingest.index(), query, op.ctx.match_options);
    let message_id = op.command.message_id();
    let mut sent = 0usize;
    let mut local_studies = std::collections::BTreeSet::new();
    loop {
        // Wait for the next match and, at the same time, for a C-CANCEL.
        // Both waits are cancel-safe: dicom-ul keeps a partly read PDU in
        // its buffer, and a channel receive loses nothing.
        let event = tokio::select! {
            biased;
            pdu = op.association.receive() => Err(during(pdu, message_id)),
            item = matches.recv() => Ok(item),
        };
        match event {
            Ok(Some(Item::Match(m))) => {
                if level == Level::Study
                    && let Some(e) = m.get(dicom_dictionary_std::tags::STUDY_INSTANCE_UID)
                {
                    local_studies.extend(e.values.iter().cloned());
                }
                let response = identifier::response(&request, &m, &op.ctx.ae_title);
                let bytes = match identifier::encode(&response, &op.context.transfer_syntax) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(parent: op.span, error = %e, "cannot encode a C-FIND response");
                        let r = reply(status::CANNOT_UNDERSTAND, Some("cannot encode a match"));
                        return op.send(r, None).await;
                    }
                };
                let r = dimse::query_retrieve_response(
                    op.command,
                    command_field::C_FIND_RSP,
                    pending,
                    true,
                    None,
                    None,
                );
                op.send(r, Some(bytes)).await?;
                sent += 1;
            }
            Ok(Some(Item::End(outcome))) => {
                if matches!(outcome, Outcome::Complete) && level == Level::Study {
                    for bytes in regional_priors(op, &request, &local_studies).await {
                        let r = dimse::query_retrieve_response(
                            op.command,
                            command_field::C_FIND_RSP,
                            pending,
                            true,
                            None,
                            None,
                        );
                        op.send(r, Some(bytes)).await?;
                        sent += 1;
                    }
                }
                let (code, comment) = match outcome {
                    Outcome::Complete => (status::SUCCESS, None),
                    Outcome::LimitReached => {
                        tracing::warn!(parent: op.span, sent, "C-FIND stopped at the configured maximum number of matches");
                        (
                            status::OUT_OF_RESOURCES,
                            Some("too many matches; narrow the query".to_string()),
                        )
                    }
                    Outcome::Failed(e) => {
                        tracing::error!(parent: op.span, error = %e, "C-FIND failed");
                        (status::CANNOT_UNDERSTAND, Some("query failed".to_string()))
                    }
                };
                tracing::info!(
                    parent: op.span,
                    level = level.code(),
                    matches = sent,
                    status = format_args!("{code:#06x}"),
                    elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                    "C-FIND"
                );
                let r = reply(code, comment.as_deref());
                return op.send(r, None).await;
            }
            Ok(None) => {
                let r = reply(status::CANNOT_UNDERSTAND, Some("query ended unexpectedly"));
                return op.send(r, None).await;
            }
            Err(During::Cancel) => {
                drop(matches);
                tracing::info!(parent: op.span, matches = sent, "C-FIND cancelled");
                let r = reply(status::CANCEL, None);
                return op.send(r, None).await;
            }
            Err(During::StrayCancel) => {}
            Err(During::Command { command, .. }) => {
                return Err(format!(
                    "command {:#06x} while a C-FIND was outstanding",
                    command.command_field()
                ));
            }
            Err(During::End(why)) => return Err(why),
        }
    }
}

/// Recognised regional priors of the queried patient that this node does
/// not hold, when the node is configured to show them: asked of the
/// registry for this hospital (consent rules apply), encoded as study-level
/// matches. A failure costs the workstation only the regional part.
async fn regional_priors<S>(
    op: &Op<'_, S>,
    request: &dicom_object::InMemDicomObject,
    local_studies: &std::collections::BTreeSet<String>,
) -> Vec<Vec<u8>> {
    use dicom_dictionary_std::tags;
    let Some(region) = op.ctx.region.as_ref() else {
        return Vec::new();
    };
    if !region.config().cfind_regional_priors {
        return Vec::new();
    }
    let patient_id = identifier::text(request, tags::PATIENT_ID);
    if patient_id.is_empty() || patient_id.contains(['*', '?', '\\']) {
        return Vec::new();
    }
    let patient = crate::priors::PatientRef {
        patient_id: Some(patient_id),
        issuer_of_patient_id: identifier::text(request, tags::ISSUER_OF_PATIENT_ID),
        ..Default::default()
    };
    let key = match crate::priors::resolve_patient(region, &patient).await {
        Ok(Ok(key)) => key,
        _ => return Vec::new(),
    };
    let user = format!("ae:{}", op.calling_ae_title.trim());
    let answer = match crate::priors::priors(
        region,
        &key,
        crate::contract::Purpose::Treatment,
        None,
        &user,
    )
    .await
    {
        Ok((answer, true)) => answer,
        Ok((_, false)) | Err(_) => {
            tracing::warn!(parent: op.span, "regional priors unavailable for C-FIND");
            return Vec::new();
        }
    };
    let list = region.list();
    let directory = region.directory().await;
    let own = &region.config().hospital_id;
    let mut out = Vec::new();
    for r in answer.records {
        if &r.hospital_id == own
            || r.record.items.is_empty()
            || local_studies.contains(&r.record.study_instance_uid)
        {
            continue;
        }
        let institution = directory
            .as_ref()
            .and_then(|d| d.hospitals.iter().find(|h| h.hospital_id == r.hospital_id))
            .map(|h| h.name.clone())
            .unwrap_or_else(|| r.hospital_id.clone());
        let description = r
            .record
            .items
            .iter()
            .map(|i| {
                let item = list.as_ref().and_then(|l| {
                    l.item(&i.code)
                        .map(|it| (l.mark_of(it).to_string(), it.name_zh.clone()))
                });
                match item {
                    Some((mark, name)) => format!("{mark} {name}"),
                    None => i.code.clone(),
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let response = identifier::regional_response(
            request,
            &r.record,
            &institution,
            &description,
            &op.ctx.ae_title,
        );
        match identifier::encode(&response, &op.context.transfer_syntax) {
            Ok(bytes) => out.push(bytes),
            Err(e) => {
                tracing::error!(parent: op.span, error = %e, "cannot encode a regional prior")
            }
        }
    }
    out
}
