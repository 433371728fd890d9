//! C-STORE SCP (PS3.7 §9.1.1, Storage Service Class PS3.4 Annex B).
//!
//! The data set streams from P-DATA into the ingest path while it arrives;
//! the C-STORE-RSP is sent only when the ingest path has made the instance
//! durable and indexed it, or has failed with a status that says why.

use tracing::Span;

use super::dimse::{self, CommandSet, command_field, status};
use crate::ingest::{Incoming, Ingest};
use crate::types::Uid;

pub enum Begin {
    /// The data set that follows goes into the ingest path.
    Receive(Box<Receiving>),
    /// The request is refused with this response; any data set that
    /// follows is read and dropped first.
    Refuse(Vec<u8>),
}

pub struct Receiving {
    pcid: u8,
    request: CommandSet,
    incoming: Incoming,
    /// From the C-STORE-RQ to its C-STORE-RSP.
    timer: crate::metrics::DimseTimer,
}

fn refuse(request: &CommandSet, status: u16, comment: &str) -> Begin {
    Begin::Refuse(dimse::response(
        request,
        command_field::C_STORE_RSP,
        status,
        Some(comment),
    ))
}

pub fn begin(
    pcid: u8,
    request: &CommandSet,
    abstract_syntax: &str,
    transfer_syntax: &str,
    calling_ae_title: &str,
    ingest: &Ingest,
    span: &Span,
) -> Begin {
    if !request.has_data_set() {
        return refuse(
            request,
            status::CANNOT_UNDERSTAND_COMMAND,
            "C-STORE-RQ without a data set",
        );
    }
    let announced_class = request.affected_sop_class_uid().unwrap_or_default();
    if announced_class != abstract_syntax {
        tracing::info!(parent: span, announced_class, abstract_syntax, "C-STORE-RQ for another SOP class than its presentation context");
        return refuse(
            request,
            status::SOP_CLASS_NOT_SUPPORTED,
            "Affected SOP Class UID is not the context's abstract syntax",
        );
    }
    let (Ok(sop_class_uid), Ok(sop_instance_uid), Ok(transfer_syntax_uid)) = (
        Uid::parse(&announced_class),
        Uid::parse(&request.affected_sop_instance_uid().unwrap_or_default()),
        Uid::parse(transfer_syntax),
    ) else {
        return refuse(
            request,
            status::CANNOT_UNDERSTAND_COMMAND,
            "C-STORE-RQ has no valid Affected SOP Instance UID",
        );
    };
    let incoming = ingest.begin(
        sop_class_uid,
        sop_instance_uid,
        transfer_syntax_uid,
        Some(calling_ae_title.to_string()),
    );
    Begin::Receive(Box::new(Receiving {
        pcid,
        request: request.clone(),
        incoming,
        timer: crate::metrics::DimseTimer::start("C-STORE"),
    }))
}

impl Receiving {
    pub fn pcid(&self) -> u8 {
        self.pcid
    }

    /// Writes a data set fragment: a slice of the PDU just read, hashed and
    /// written to staging without a copy of its own.
    pub fn append(&mut self, ingest: &Ingest, fragment: &[u8]) {
        ingest.write(&mut self.incoming, fragment);
    }

    /// Completes the instance and builds the C-STORE-RSP.
    pub async fn finish(self: Box<Self>, ingest: &Ingest, span: &Span) -> (u8, Vec<u8>) {
        let Receiving {
            pcid,
            request,
            incoming,
            timer,
        } = *self;
        let sop_instance_uid = request.affected_sop_instance_uid().unwrap_or_default();
        let (code, comment) = match ingest.finish(incoming).await {
            Ok(stored) => {
                stored.count(crate::metrics::source::C_STORE, ingest.store().durability());
                tracing::debug!(parent: span, %sop_instance_uid, blob = %stored.hash, size = stored.size, outcome = ?stored.outcome, "stored");
                (status::SUCCESS, None)
            }
            Err(error) => {
                let code = error.status();
                if code == status::OUT_OF_RESOURCES {
                    tracing::error!(parent: span, %sop_instance_uid, %error, "C-STORE refused: out of resources");
                } else {
                    tracing::warn!(parent: span, %sop_instance_uid, %error, status = format_args!("{code:#06X}"), "C-STORE failed");
                }
                // Out-of-resources detail (paths, database errors) stays in
                // the log; the peer learns only the kind of failure.
                let comment = if code == status::OUT_OF_RESOURCES {
                    "storage or index unavailable".to_string()
                } else {
                    error.to_string()
                };
                (code, Some(comment))
            }
        };
        let response = dimse::response(
            &request,
            command_field::C_STORE_RSP,
            code,
            comment.as_deref(),
        );
        drop(timer);
        (pcid, response)
    }

    pub async fn abandon(self: Box<Self>, ingest: &Ingest) {
        let Receiving {
            incoming, timer, ..
        } = *self;
        timer.discard();
        ingest.abandon(incoming).await;
    }
}
