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
