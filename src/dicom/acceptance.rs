//! Which transfer syntax the node accepts on a presentation context it will
//! send on.
//!
//! dicom-ul accepts, on every context, the first proposed transfer syntax it
//! can parse. That is right when the peer sends (C-STORE: each instance is
//! stored as the sender chose to encode it), and wrong when the node sends:
//! a C-GET SCU proposes storage contexts with the SCP role, often with a
//! compressed syntax first (getscu `+xs`, `+xy`, `+xr`...), and the node can
//! send a stored native instance only in a native syntax (it has no
//! encoders). The node then lost every sub-operation it could have sent in
//! the Explicit VR Little Endian the same context also offered.
//!
//! So before dicom-ul negotiates, the node peeks at the A-ASSOCIATE-RQ (the
//! bytes stay in the socket for dicom-ul to read) and, when a storage SOP
//! class is proposed with the SCP role, prefers on those contexts the first
//! proposed native syntax: a stored native instance is sent as is and a
//! stored compressed one is decoded (`transcode`). A context that proposes
//! no native syntax keeps the proposer's first choice, which serves the
//! instances stored in exactly that syntax.
//!
//! dicom-ul takes one list of acceptable transfer syntaxes per association
//! and picks, per context, the first proposed one on the list; the list is
//! the set of choices made here. Two contexts of one association that
//! propose the same syntaxes in the same order but want different choices
//! (one the peer stores on, one the node sends on) cannot both be served by
//! one list; the node then logs it and the sending context gets what
//! dicom-ul picks (and `retrieve` fails, with a status, the sub-operations it
//! cannot send). On DICOM TLS the request is encrypted until dicom-ul reads
//! it, so TLS associations keep dicom-ul's choice.

use std::time::Duration;

use dicom_ul::pdu::{AssociationRJ, AssociationRQ, Pdu, UserVariableItem};
use tokio::net::TcpStream;

use super::sop_classes;
use crate::transcode::is_native;

/// The largest A-ASSOCIATE-RQ the node peeks at: a proposer with 128
/// contexts of 10 syntaxes each stays far below it; a larger one is left
/// to dicom-ul unchanged.
const MAX_PEEKED: usize = 256 * 1024;

/// What waiting for a connection's first PDU found.
pub(super) enum FirstPdu {
    /// The whole PDU is queued in the socket (not consumed).
    Whole(Vec<u8>),
    /// Something to answer at once: the peer closed, the read failed, or
    /// the PDU announces more than [`MAX_PEEKED`] bytes (no
    /// A-ASSOCIATE-RQ is that long; bytes that are no PDU often read so).
    Other,
    /// Silence, or a PDU still incomplete, until the deadline.
    TimedOut,
}

/// Waits, up to `deadline`, for the connection's first PDU to be whole in
/// the socket, without consuming it: the listener waits so before a
/// connection takes a place under the association limit, and
/// [`peek_request`] reads the request so.
pub(super) async fn first_pdu(socket: &TcpStream, deadline: tokio::time::Instant) -> FirstPdu {
    let mut buf = vec![0u8; 6];
    loop {
        let n = match tokio::time::timeout_at(deadline, socket.peek(&mut buf)).await {
            Err(_) => return FirstPdu::TimedOut,
            Ok(Err(_)) | Ok(Ok(0)) => return FirstPdu::Other,
            Ok(Ok(n)) => n,
        };
        if n >= 6 {
            let want = 6 + u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
            if want > MAX_PEEKED {
                return FirstPdu::Other;
            }
            if n >= want {
                buf.truncate(want);
                return FirstPdu::Whole(buf);
            }
            if buf.len() < want {
                // Most of the time the whole request is queued already.
                buf.resize(want, 0);
                continue;
            }
        }
        // A peer that sent part of a PDU and closed: answered at once.
        match tokio::time::timeout_at(deadline, socket.ready(tokio::io::Interest::READABLE)).await {
            Err(_) => return FirstPdu::TimedOut,
            Ok(Err(_)) => return FirstPdu::Other,
            Ok(Ok(ready)) if ready.is_read_closed() => return FirstPdu::Other,
            Ok(Ok(_)) => {}
        }
        // Part of the PDU is still in flight: peek returns at once while
        // any byte is queued, so wait for the segments to come rather
        // than spin.
        tokio::time::sleep_until(
            (tokio::time::Instant::now() + Duration::from_millis(2)).min(deadline),
        )
        .await;
        if tokio::time::Instant::now() >= deadline {
            return FirstPdu::TimedOut;
        }
    }
}

/// Reads the A-ASSOCIATE-RQ without consuming it. `None` when the first PDU
/// is not a (well-formed) A-ASSOCIATE-RQ or does not arrive within `wait`:
/// dicom-ul then reads it and answers as it always does.
pub(super) async fn peek_request(socket: &TcpStream, wait: Duration) -> Option<AssociationRQ> {
    let FirstPdu::Whole(buf) = first_pdu(socket, tokio::time::Instant::now() + wait).await else {
        return None;
    };
    match dicom_ul::pdu::read_pdu(&buf[..], dicom_ul::pdu::MAXIMUM_PDU_SIZE, false) {
        Ok(Some(Pdu::AssociationRQ(rq))) => Some(rq),
        _ => None,
    }
}

/// Answers the caller's first PDU, when it is an A-ASSOCIATE-RQ, with the
/// given A-ASSOCIATE-RJ and closes. The request is read out first (within
/// `wait`), so that the close is no reset that could overtake the answer.
pub(super) async fn reject<S>(mut socket: S, rj: AssociationRJ, wait: Duration)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut answer = Vec::new();
    if dicom_ul::write_pdu(&mut answer, &Pdu::AssociationRJ(rj)).is_err() {
        return;
    }
    let _ = tokio::time::timeout(wait, async {
        let mut header = [0u8; 6];
        socket.read_exact(&mut header).await?;
        if header[0] != 0x01 {
            return Ok(());
        }
        // A request longer than any real one is read only in part, and
        // answered all the same.
        let len = u64::from(u32::from_be_bytes([
            header[2], header[3], header[4], header[5],
        ]))
        .min(MAX_PEEKED as u64);
        let read = tokio::io::copy(&mut (&mut socket).take(len), &mut tokio::io::sink()).await?;
        if read < len {
            return Ok(());
        }
        socket.write_all(&answer).await?;
        socket.shutdown().await
    })
    .await;
}

fn trim(uid: &str) -> &str {
    uid.trim_end_matches(|c: char| c.is_whitespace() || c == '\0')
}

/// The transfer syntax list to give dicom-ul for this request, or `None`
/// when no storage context is proposed with the SCP role (dicom-ul's own
/// choice, the proposer's first, is then right on every context).
pub(super) fn transfer_syntaxes(rq: &AssociationRQ) -> Option<Vec<String>> {
    let sending: Vec<&str> = rq
        .user_variables
        .iter()
        .filter_map(|v| match v {
            UserVariableItem::ScuScpRoleSelectionSubItem(class, roles)
                if roles.scp && sop_classes::is_storage(trim(class)) =>
            {
                Some(trim(class))
            }
            _ => None,
        })
        .collect();
    if sending.is_empty() {
        return None;
    }
    let mut wanted: Vec<(u8, String)> = Vec::new();
    for pc in &rq.presentation_contexts {
        let proposed: Vec<&str> = pc.transfer_syntaxes.iter().map(|t| trim(t)).collect();
        let supported = || {
            proposed
                .iter()
                .copied()
                .find(|t| dicom_ul::association::server::is_supported(t))
        };
        let choice = if sending.contains(&trim(&pc.abstract_syntax)) {
            proposed
                .iter()
                .copied()
                .find(|t| is_native(t))
                .or_else(supported)
        } else {
            supported()
        };
        if let Some(choice) = choice {
            wanted.push((pc.id, choice.to_string()));
        }
    }
    let mut list: Vec<String> = Vec::new();
    for (_, ts) in &wanted {
        if !list.contains(ts) {
            list.push(ts.clone());
        }
    }
    // What dicom-ul will pick with this list; where it differs from what
    // was wanted, say so (see the module's comment).
    for pc in &rq.presentation_contexts {
        let Some((_, want)) = wanted.iter().find(|(id, _)| *id == pc.id) else {
            continue;
        };
        let picked = pc
            .transfer_syntaxes
            .iter()
            .map(|t| trim(t))
            .find(|t| list.iter().any(|l| l == t));
        if picked != Some(want.as_str()) {
            tracing::info!(
                presentation_context = pc.id,
                abstract_syntax = trim(&pc.abstract_syntax),
                wanted = %want,
                picked = ?picked,
                "one transfer syntax list cannot serve every context of this association"
            );
        }
    }
    Some(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::{PresentationContextProposed, RequestorRoles};

    const CT: &str = "1.2.840.10008.5.1.4.1.1.2";
    const MR: &str = "1.2.840.10008.5.1.4.1.1.4";
    const E: &str = "1.2.840.10008.1.2.1";
    const I: &str = "1.2.840.10008.1.2";
    const JPEG_LOSSLESS: &str = "1.2.840.10008.1.2.4.70";
    const RLE: &str = "1.2.840.10008.1.2.5";

    fn rq(contexts: &[(u8, &str, &[&str])], scp_classes: &[&str]) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "GETSCU".into(),
            called_ae_title: "HUREN".into(),
            application_context_name: "1.2.840.10008.3.1.1.1".into(),
            presentation_contexts: contexts
                .iter()
                .map(|(id, class, ts)| PresentationContextProposed {
                    id: *id,
                    abstract_syntax: class.to_string(),
                    transfer_syntaxes: ts.iter().map(|t| t.to_string()).collect(),
                })
                .collect(),
            user_variables: scp_classes
                .iter()
                .map(|c| {
                    UserVariableItem::ScuScpRoleSelectionSubItem(
                        c.to_string(),
                        RequestorRoles {
                            scu: false,
                            scp: true,
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn without_the_scp_role_the_proposers_choice_stands() {
        let rq = rq(&[(1, CT, &[JPEG_LOSSLESS, E, I])], &[]);
        assert_eq!(transfer_syntaxes(&rq), None);
    }

    #[test]
    fn a_context_the_node_sends_on_gets_the_first_native_syntax() {
        let rq = rq(
            &[(1, CT, &[JPEG_LOSSLESS, E, I]), (3, MR, &[RLE, I, E])],
            &[CT, MR],
        );
        let list = transfer_syntaxes(&rq).unwrap();
        assert_eq!(list, vec![E.to_string(), I.to_string()]);
    }

    #[test]
    fn a_context_with_no_native_syntax_keeps_the_first_proposed() {
        let rq = rq(&[(1, CT, &[JPEG_LOSSLESS]), (3, MR, &[RLE, E])], &[CT, MR]);
        let list = transfer_syntaxes(&rq).unwrap();
        assert_eq!(list, vec![JPEG_LOSSLESS.to_string(), E.to_string()]);
    }

    #[tokio::test]
    async fn a_request_cut_short_is_left_to_dicom_ul_at_once() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut bytes = Vec::new();
        let request = rq(&[(1, CT, &[JPEG_LOSSLESS, E])], &[CT]);
        dicom_ul::pdu::write_pdu(&mut bytes, &Pdu::AssociationRQ(request)).unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&bytes[..20]).await.unwrap();
        s.shutdown().await.unwrap();
        let (socket, _) = listener.accept().await.unwrap();
        // Well within the wait: the closed stream ends the peek.
        let peeked = tokio::time::timeout(
            Duration::from_secs(20),
            peek_request(&socket, Duration::from_secs(60)),
        )
        .await
        .expect("the peek waited for a request that cannot come");
        assert_eq!(peeked, None);
    }

    #[tokio::test]
    async fn the_request_is_peeked_and_stays_in_the_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let request = rq(&[(1, CT, &[JPEG_LOSSLESS, E])], &[CT]);
        let mut bytes = Vec::new();
        dicom_ul::pdu::write_pdu(&mut bytes, &Pdu::AssociationRQ(request.clone())).unwrap();
        let sent = bytes.clone();
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            // In two writes, so the peek sees a partial PDU first.
            s.write_all(&sent[..10]).await.unwrap();
            s.flush().await.unwrap();
            tokio::task::yield_now().await;
            s.write_all(&sent[10..]).await.unwrap();
            s
        });
        let (mut socket, _) = listener.accept().await.unwrap();
        let peeked = peek_request(&socket, Duration::from_secs(5)).await.unwrap();
        assert_eq!(peeked, request);
        let mut all = vec![0u8; bytes.len()];
        socket.read_exact(&mut all).await.unwrap();
        assert_eq!(all, bytes);
        drop(client.await.unwrap());
    }
}
