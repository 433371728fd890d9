//! C-FIND SCP (PS3.4 C.4.1): Patient Root and Study Root, levels PATIENT
//! to IMAGE, over the shared matcher. Matches are sent as Pending
//! responses as the database produces them; a C-CANCEL stops the query.

use super::association::{During, Op, during};
use super::dimse::{self, command_field, status};
use super::{identifier, sop_classes};
use crate::query::{self, Item, Level, Outcome};

pub(super) async fn run(op: &mut Op<'_>, data_set: &[u8]) -> Result<(), String> {
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
    if !op.ctx.may(op.calling_ae_title, false) {
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
