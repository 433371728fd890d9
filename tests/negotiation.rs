//! Association-level behaviour: limits, timers, AE-title policy and
//! presentation context negotiation. Backend-independent, so SQLite only.

use std::time::Duration;

use dicom_dictionary_std::uids;
use dicom_ul::ClientAssociationOptions;
use dicom_ul::pdu::PresentationContextResultReason;
use tokio::io::AsyncReadExt;

use crate::support::{self, Backend};

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_past_the_limit_gets_a_transient_rejection() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| c.max_associations = 1).await;
    let held = ClientAssociationOptions::new()
        .with_abstract_syntax(uids::VERIFICATION)
        .called_ae_title("HUREN")
        .establish_async(node.dicom_addr)
        .await
        .expect("first association");
    let refused = support::echoscu(node.dicom_addr, &["-v"]).await;
    let text = support::text(&refused);
    // echoscu's exit code does not say whether it was rejected; its log does.
    assert!(text.contains("Rejected Transient"), "{text}");
    assert!(text.contains("Reason: Local Limit Exceeded"), "{text}");
    held.release().await.unwrap();
    // The permit comes back once the held association's task ends.
    let mut ok = false;
    for _ in 0..100 {
        if support::echoscu(node.dicom_addr, &[])
            .await
            .status
            .success()
        {
            ok = true;
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(
        ok,
        "echo works again after the first association is released"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_by_artim_and_others_are_served() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.artim_timeout = Duration::from_secs(1);
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(node.dicom_addr)
        .await
        .unwrap();
    // While the silent peer waits, others are served.
    let echo = support::echoscu(node.dicom_addr, &[]).await;
    assert!(echo.status.success(), "{}", support::text(&echo));
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(TIMEOUT, silent.read(&mut buf))
        .await
        .expect("ARTIM closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without a PDU: no association existed");
    node.stop().await;
}

/// Connections that never send an A-ASSOCIATE-RQ take no place under the
/// association limit, and when more of them are open than may wait, the
/// longest silent ones are closed: a modality is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_lock_callers_out() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.max_associations = 2;
        // Long enough that only being pushed out closes a silent socket.
        c.artim_timeout = Duration::from_secs(600);
    })
    .await;
    let budget = huren::dicom::listener::pending_budget(2);
    let mut silent = Vec::new();
    for _ in 0..budget + 10 {
        silent.push(
            tokio::net::TcpStream::connect(node.dicom_addr)
                .await
                .unwrap(),
        );
    }
    let echo = support::echoscu(node.dicom_addr, &["-v"]).await;
    assert!(echo.status.success(), "{}", support::text(&echo));
    assert!(
        !support::text(&echo).contains("Rejected"),
        "{}",
        support::text(&echo)
    );
    // The ten that waited longest were closed to make room, without a PDU.
    for socket in silent.iter_mut().take(10) {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(TIMEOUT, socket.read(&mut buf))
            .await
            .expect("a silent connection pushed out is closed")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    node.stop().await;
}

/// Bytes that are no A-ASSOCIATE-RQ (an HTTP request sent to the DICOM
/// port) get an A-ABORT (PS3.8 Table 9-10, Sta2 + Evt19: AA-1) and the
/// connection is closed; the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_pdu_that_is_no_request_is_aborted() {
    use tokio::io::AsyncWriteExt;
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let mut socket = tokio::net::TcpStream::connect(node.dicom_addr)
        .await
        .unwrap();
    socket
        .write_all(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer))
        .await
        .expect("the node answers and closes")
        .unwrap();
    assert_eq!(answer, [0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0], "an A-ABORT PDU");
    let echo = support::echoscu(node.dicom_addr, &[]).await;
    assert!(echo.status.success(), "{}", support::text(&echo));
    node.stop().await;
}

/// An A-ASSOCIATE-RQ whose protocol version lacks bit 0: A-ASSOCIATE-RJ,
/// permanent, service-provider (ACSE), protocol-version-not-supported
/// (PS3.8 §9.3.2, Table 9-21).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_protocol_version_is_rejected_as_such() {
    use dicom_ul::pdu::{AssociationRQ, PresentationContextProposed, UserVariableItem};
    use tokio::io::AsyncWriteExt;
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let rq = dicom_ul::Pdu::AssociationRQ(AssociationRQ {
        protocol_version: 2,
        calling_ae_title: "SCANNER".into(),
        called_ae_title: "HUREN".into(),
        application_context_name: "1.2.840.10008.3.1.1.1".into(),
        presentation_contexts: vec![PresentationContextProposed {
            id: 1,
            abstract_syntax: uids::VERIFICATION.into(),
            transfer_syntaxes: vec![uids::IMPLICIT_VR_LITTLE_ENDIAN.into()],
        }],
        user_variables: vec![UserVariableItem::MaxLength(16384)],
    });
    let mut bytes = Vec::new();
    dicom_ul::write_pdu(&mut bytes, &rq).unwrap();
    let mut socket = tokio::net::TcpStream::connect(node.dicom_addr)
        .await
        .unwrap();
    socket.write_all(&bytes).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, socket.read_to_end(&mut answer))
        .await
        .expect("the node answers and closes")
        .unwrap();
    // A-ASSOCIATE-RJ: type 03, length 4, reserved, result 1 (permanent),
    // source 2 (service-provider, ACSE), reason 2.
    assert_eq!(answer, [0x03, 0, 0, 0, 0, 4, 0, 1, 2, 2]);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_association_is_aborted() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let mut association = ClientAssociationOptions::new()
        .with_abstract_syntax(uids::VERIFICATION)
        .establish_async(node.dicom_addr)
        .await
        .unwrap();
    let pdu = tokio::time::timeout(TIMEOUT, association.receive())
        .await
        .expect("the node acts on an idle association");
    match pdu {
        Ok(dicom_ul::Pdu::AbortRQ { .. }) | Err(_) => {}
        Ok(other) => panic!("expected A-ABORT, got {other:?}"),
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calling_ae_title_allow_list() {
    let node = support::spawn_node_with(Backend::SqliteLocal, |c| {
        c.allowed_calling_ae_titles = vec![
            huren::config::AllowedPeer::parse("MODALITY1").unwrap(),
            huren::config::AllowedPeer::parse("PACS@127.0.0.1").unwrap(),
            huren::config::AllowedPeer::parse("FARAWAY@10.9.9.9").unwrap(),
        ];
    })
    .await;
    for (ae, admitted) in [
        ("MODALITY1", true),
        ("PACS", true),
        ("FARAWAY", false),
        ("STRANGER", false),
    ] {
        let out = support::echoscu(node.dicom_addr, &["-v", "-aet", ae]).await;
        let text = support::text(&out);
        assert_eq!(out.status.success(), admitted, "{ae}: {text}");
        if !admitted {
            assert!(text.contains("Rejected Permanent"), "{ae}: {text}");
            assert!(
                text.to_lowercase()
                    .contains("calling ae title not recognized"),
                "{ae}: {text}"
            );
        }
    }
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_presentation_contexts_are_rejected_in_negotiation() {
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let association = ClientAssociationOptions::new()
        .with_presentation_context(
            uids::CT_IMAGE_STORAGE,
            vec!["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"],
        )
        .with_presentation_context(
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND,
            vec!["1.2.840.10008.1.2.1"],
        )
        .with_presentation_context(uids::MR_IMAGE_STORAGE, vec!["1.2.3.4.5.6.7"])
        .with_presentation_context(
            uids::MODALITY_WORKLIST_INFORMATION_MODEL_FIND,
            vec!["1.2.840.10008.1.2.1"],
        )
        .with_presentation_context(uids::VERIFICATION, vec!["1.2.840.10008.1.2"])
        .establish_async(node.dicom_addr)
        .await
        .unwrap();
    // dicom-ul's client lists the accepted contexts only.
    let accepted: Vec<_> = association
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.abstract_syntax.trim_end_matches('\0').to_string(),
                pc.transfer_syntax.trim_end_matches('\0').to_string(),
            )
        })
        .collect();
    assert_eq!(
        accepted,
        vec![
            // The sender's first choice: stored as sent.
            (
                uids::CT_IMAGE_STORAGE.to_string(),
                "1.2.840.10008.1.2.4.70".to_string()
            ),
            (
                uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND.to_string(),
                "1.2.840.10008.1.2.1".to_string()
            ),
            (
                uids::VERIFICATION.to_string(),
                "1.2.840.10008.1.2".to_string()
            ),
        ],
        "Modality Worklist (not offered) and an unknown transfer syntax are rejected"
    );
    association.release().await.unwrap();
    node.stop().await;
}

/// A P-DATA-TF PDU: the PDU header, then each item (context ID, message
/// control header, value).
fn p_data(items: &[(u8, u8, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (pcid, control, value) in items {
        body.extend_from_slice(&((value.len() + 2) as u32).to_be_bytes());
        body.push(*pcid);
        body.push(*control);
        body.extend_from_slice(value);
    }
    let mut pdu = vec![0x04, 0x00];
    pdu.extend_from_slice(&(body.len() as u32).to_be_bytes());
    pdu.extend(body);
    pdu
}

fn echo_rq(message_id: u16) -> Vec<u8> {
    use dicom_dictionary_std::tags;
    use huren::dicom::dimse::{CommandSetBuilder, NO_DATA_SET, command_field};
    CommandSetBuilder::default()
        .ui(tags::AFFECTED_SOP_CLASS_UID, uids::VERIFICATION)
        .us(tags::COMMAND_FIELD, command_field::C_ECHO_RQ)
        .us(tags::MESSAGE_ID, message_id)
        .us(tags::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
        .build()
}

/// The node reads P-DATA itself (src/dicom/receive.rs), past dicom-ul:
/// every malformed or out-of-place PDU after negotiation ends its
/// association with an A-ABORT, a truncated one with the connection, and
/// the node goes on serving; a well-formed PDU of several PDVs is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p_data_violations_are_aborted_and_the_node_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    let node = support::spawn_node(Backend::SqliteLocal).await;
    let max = node.config.max_pdu_length;
    let echo = echo_rq(1);
    let mut oversize = vec![0x04, 0x00];
    oversize.extend_from_slice(&(max + 1).to_be_bytes());
    oversize.extend_from_slice(&[0; 64]);
    let mut past_the_end = p_data(&[(1, 0x03, &echo)]);
    past_the_end[9] = 0xFF; // the item's length, low byte
    let mut below_two = p_data(&[(1, 0x03, b"")]);
    below_two[9] = 1;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("PDU longer than the maximum PDU length", oversize),
        ("PDV item past the end of its PDU", past_the_end),
        ("PDV item length below 2", below_two),
        (
            "PDV item shorter than its header",
            vec![0x04, 0x00, 0, 0, 0, 3, 0, 0, 0],
        ),
        (
            "presentation context that was not accepted",
            p_data(&[(99, 0x03, &echo)]),
        ),
        ("data before any command", p_data(&[(1, 0x02, b"data")])),
        (
            "command set that does not parse",
            p_data(&[(1, 0x03, &[0x08, 0x00, 0x18, 0x00, 0, 0, 0, 0])]),
        ),
        ("unknown PDU type", vec![0x0A, 0x00, 0, 0, 0, 4, 0, 0, 0, 0]),
    ];
    for (name, bytes) in cases {
        let mut association = ClientAssociationOptions::new()
            .with_abstract_syntax(uids::VERIFICATION)
            .called_ae_title("HUREN")
            .establish_async(node.dicom_addr)
            .await
            .expect("association");
        let stream = association.inner_stream();
        stream.write_all(&bytes).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{name}: the node ends the association"));
        assert_eq!(
            answer.first(),
            Some(&0x07),
            "{name}: A-ABORT, got {answer:?}"
        );
    }

    // Truncated: the header promises more than ever comes.
    let mut association = ClientAssociationOptions::new()
        .with_abstract_syntax(uids::VERIFICATION)
        .called_ae_title("HUREN")
        .establish_async(node.dicom_addr)
        .await
        .expect("association");
    let truncated = p_data(&[(1, 0x03, &echo)]);
    let stream = association.inner_stream();
    stream
        .write_all(&truncated[..truncated.len() / 2])
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("the node closes a truncated association")
        .unwrap();
    drop(association);

    // One PDU, the C-ECHO-RQ split over two PDVs, then a second C-ECHO-RQ
    // in a PDU of its own: both answered with Success.
    let mut association = ClientAssociationOptions::new()
        .with_abstract_syntax(uids::VERIFICATION)
        .called_ae_title("HUREN")
        .establish_async(node.dicom_addr)
        .await
        .expect("association");
    let (first, second) = echo.split_at(10);
    let mut pdus = p_data(&[(1, 0x01, first), (1, 0x03, second)]);
    pdus.extend(p_data(&[(1, 0x03, &echo_rq(2))]));
    association.inner_stream().write_all(&pdus).await.unwrap();
    for message_id in [1u16, 2] {
        let pdu = tokio::time::timeout(TIMEOUT, association.receive())
            .await
            .expect("C-ECHO-RSP")
            .unwrap();
        let dicom_ul::Pdu::PData { data } = pdu else {
            panic!("expected P-DATA-TF, got {pdu:?}");
        };
        let rsp = huren::dicom::dimse::CommandSet::parse(&data[0].data).unwrap();
        assert_eq!(
            rsp.u16(dicom_dictionary_std::tags::MESSAGE_ID_BEING_RESPONDED_TO),
            Some(message_id)
        );
        assert_eq!(rsp.u16(dicom_dictionary_std::tags::STATUS), Some(0x0000));
    }
    association.release().await.unwrap();

    let echo = support::echoscu(node.dicom_addr, &[]).await;
    assert!(echo.status.success(), "{}", support::text(&echo));
    node.stop().await;
}
