//! C-STORE SCP (PS3.7 §9.1.1, Storage Service Class PS3.4 Annex B).
//!
//! The data set streams from P-DATA into the ingest path while it arrives;
//! the C-STORE-RSP is sent only when the ingest path has made the instance
//! durable and indexed it, or has failed with a status that says why.

use tracing::Span;

use super::dimse::{self, CommandSet, command_field, status};
use crate::ingest::{self, Incoming, Ingest};
use crate::part10;
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

    pub async fn append(mut self: Box<Self>, ingest: &Ingest, fragment: Vec<u8>) -> Box<Self> {
        ingest.write(&mut self.incoming, fragment).await;
        self
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
                crate::metrics::instance_stored(
                    crate::metrics::source::C_STORE,
                    ingest.store().durability(),
                    &stored,
                );
                tracing::debug!(parent: span, %sop_instance_uid, blob = %stored.hash, size = stored.size, outcome = ?stored.outcome, "stored");
                (status::SUCCESS, None)
            }
            Err(error) => {
                let code = status_for(&error);
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

/// The PS3.4 B.2.3 status for each way the ingest path can fail.
pub fn status_for(error: &ingest::Error) -> u16 {
    match error {
        ingest::Error::Unreadable(part10::Error::MissingAttribute(_))
        | ingest::Error::Unreadable(part10::Error::InvalidUid { .. }) => {
            status::CANNOT_UNDERSTAND_MISSING_UID
        }
        ingest::Error::Unreadable(part10::Error::Io(_)) => status::OUT_OF_RESOURCES,
        ingest::Error::Unreadable(_) => status::CANNOT_UNDERSTAND,
        ingest::Error::SopClassMismatch { .. } => status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        ingest::Error::SopInstanceMismatch { .. } => status::CANNOT_UNDERSTAND_INSTANCE_MISMATCH,
        ingest::Error::Storage(_) | ingest::Error::Index(_) => status::OUT_OF_RESOURCES,
        // Only peer fetches name an expected hash; C-STORE never does.
        ingest::Error::HashMismatch { .. } => status::CANNOT_UNDERSTAND,
        // IHE IOCM: a rejected instance sent again stays out. 0124 is a
        // refusal, not a fault the sender may retry away (PS3.7 C.5).
        ingest::Error::Rejected { .. } => status::NOT_AUTHORIZED,
        // A rejection note from an AE that may not reject, or for another
        // patient's or study's instances: refused, not a fault to retry.
        ingest::Error::Lifecycle(crate::lifecycle::Error::NoteRefused(_)) => status::NOT_AUTHORIZED,
        ingest::Error::Lifecycle(_) => status::OUT_OF_RESOURCES,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{index, storage};

    #[test]
    fn statuses_follow_ps3_4_annex_b() {
        let cases: Vec<(ingest::Error, u16)> = vec![
            (
                ingest::Error::Unreadable(part10::Error::Truncated("x")),
                0xC000,
            ),
            (
                ingest::Error::Unreadable(part10::Error::Malformed("x".into())),
                0xC000,
            ),
            (
                ingest::Error::Unreadable(part10::Error::Undecodable("x".into())),
                0xC000,
            ),
            (
                ingest::Error::Unreadable(part10::Error::MissingAttribute("SOP Instance UID")),
                0xC001,
            ),
            (
                ingest::Error::SopClassMismatch {
                    announced: "1.2".into(),
                    actual: "1.3".into(),
                },
                0xA900,
            ),
            (
                ingest::Error::SopInstanceMismatch {
                    announced: "1.2".into(),
                    actual: "1.3".into(),
                },
                0xC002,
            ),
            (
                ingest::Error::Storage(storage::Error::Io(std::io::Error::from(
                    std::io::ErrorKind::StorageFull,
                ))),
                0xA700,
            ),
            (ingest::Error::Index(index::Error::WriterStopped), 0xA700),
        ];
        for (error, expected) in cases {
            assert_eq!(status_for(&error), expected, "{error}");
        }
    }
}
