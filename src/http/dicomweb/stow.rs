//! STOW-RS (PS3.18 §10.5): `POST /studies` and `POST /studies/{study}`
//! with `multipart/related; type="application/dicom"`. Each part is a
//! Part-10 file; its data set streams into the same ingest path as a
//! C-STORE (same checks, dedup and durability), chunk by chunk as the body
//! arrives: a request is never held in memory.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use dicom_dictionary_std::tags;
use dicom_parser::dataset::{DataSetReader, DataToken};
use serde_json::{Value, json};

use super::json::{attr, sequence};
use super::media::{self, MediaType};
use super::{DicomwebState, base_url};

use crate::http::error::Error;
use crate::ingest::Ingest;
use crate::part10;
use crate::status;
use crate::storage_sop_classes::STORAGE_SOP_CLASSES;
use crate::types::Uid;

/// How much of a part is read before its data set starts into the ingest
/// path: the file meta group plus this much of the data set, enough to
/// find the Study and Series Instance UIDs of any sane header.
const HEAD_LIMIT: usize = 64 * 1024;

/// Largest file meta group taken (they are a few hundred bytes): a part
/// announcing more is not read into memory in the hope of one.
const MAX_META: usize = 64 * 1024;

/// The fragment size handed to the ingest path (a C-STORE's PDU is
/// similar).
const FRAGMENT: usize = 128 * 1024;

/// FailureReason (0008,1197) for an instance whose Study Instance UID is
/// not the one of the target resource `/studies/{study}` (PS3.18 §10.5.1:
/// such an instance is not stored). 0xA900 is the storage status for a data
/// set that does not match what it was sent as.
pub const STUDY_MISMATCH: u16 = status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS;

pub async fn store_in_study(
    state: State<Arc<DicomwebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    let study = Uid::parse(&study)
        .map_err(|e| Error::BadRequest(format!("Study Instance UID in the path: {e}")))?;
    store(state, Some(study), headers, body).await
}

pub async fn store_any(
    state: State<Arc<DicomwebState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    store(state, None, headers, body).await
}

/// One part's outcome.
enum PartOutcome {
    Stored {
        sop_class_uid: String,
        sop_instance_uid: String,
        study_instance_uid: String,
        series_instance_uid: String,
    },
    Failed {
        sop_class_uid: String,
        sop_instance_uid: String,
        reason: u16,
    },
}

async fn store(
    State(state): State<Arc<DicomwebState>>,
    target_study: Option<Uid>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Error> {
    media::require_json(&headers)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(MediaType::parse)
        .ok_or_else(|| Error::UnsupportedMediaType("no Content-Type".into()))?;
    if content_type.essence != "multipart/related" {
        return Err(Error::UnsupportedMediaType(format!(
            "{}: STOW-RS takes multipart/related; type=\"application/dicom\"",
            content_type.essence
        )));
    }
    if let Some(t) = content_type.param("type")
        && !t.eq_ignore_ascii_case("application/dicom")
    {
        return Err(Error::UnsupportedMediaType(format!(
            "multipart/related; type=\"{t}\": only application/dicom parts are taken"
        )));
    }
    let boundary = content_type
        .param("boundary")
        .filter(|b| !b.is_empty())
        .ok_or_else(|| Error::BadRequest("multipart/related without a boundary".into()))?
        .to_string();
    let limit = state.config.max_request_bytes;
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit) {
        return Err(Error::PayloadTooLarge(limit));
    }

    let constraints =
        multer::Constraints::new().size_limit(multer::SizeLimit::new().whole_stream(limit));
    let mut multipart = multer::Multipart::with_constraints(
        idle_timeout(body.into_data_stream(), BODY_IDLE),
        boundary,
        constraints,
    );
    let ingest = &state.ingest;
    let mut outcomes = Vec::new();
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return Err(body_error(e, limit, outcomes.len())),
        };
        let outcome = store_part(ingest, field, target_study.as_ref())
            .await
            .map_err(|e| body_error(e, limit, outcomes.len()))?;
        outcomes.push(outcome);
    }
    if outcomes.is_empty() {
        return Err(Error::BadRequest("multipart body without any part".into()));
    }
    Ok(response(
        &base_url(&headers),
        target_study.as_ref(),
        outcomes,
    ))
}

/// A body that brings nothing for this long is abandoned (408): a client
/// that stops mid-upload holds its connection, one of a limited number
/// (`tls::serve`), no longer.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// The body brought no data for the idle time.
#[derive(Debug, thiserror::Error)]
#[error("no request body data for {0:?}")]
struct BodyStalled(std::time::Duration);

/// `body`, ended with [`BodyStalled`] when no chunk comes for `idle`.
fn idle_timeout<S>(
    body: S,
    idle: std::time::Duration,
) -> impl futures::Stream<Item = Result<bytes::Bytes, Box<dyn std::error::Error + Send + Sync>>>
+ Send
+ 'static
where
    S: futures::Stream<Item = Result<bytes::Bytes, axum::Error>> + Unpin + Send + 'static,
{
    use futures::StreamExt;
    futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        match tokio::time::timeout(idle, body.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(body))),
            Ok(Some(Err(e))) => Some((Err(e.into()), None)),
            Ok(None) => None,
            Err(_) => Some((Err(BodyStalled(idle).into()), None)),
        }
    })
}

/// A broken body (framing, a dropped connection, the size limit) ends the
/// request: parts already complete stay stored (each one is a C-STORE of
/// its own), the part in flight was abandoned.
fn body_error(e: multer::Error, limit: u64, parts_done: usize) -> Error {
    tracing::info!(error = %e, parts_done, "STOW-RS request body unusable");
    match e {
        multer::Error::StreamSizeExceeded { .. } => Error::PayloadTooLarge(limit),
        multer::Error::StreamReadFailed(e) if e.is::<BodyStalled>() => {
            Error::RequestTimeout(BODY_IDLE.as_secs())
        }
        other => Error::BadRequest(format!("multipart body: {other}")),
    }
}

/// Reads one part into the ingest path. An `Err` is a broken request body;
/// a part that is not a storable instance is a `Failed` outcome.
async fn store_part(
    ingest: &Ingest,
    mut field: multer::Field<'_>,
    target_study: Option<&Uid>,
) -> Result<PartOutcome, multer::Error> {
    let failed = |reason: u16| PartOutcome::Failed {
        sop_class_uid: String::new(),
        sop_instance_uid: String::new(),
        reason,
    };
    if let Some(ct) = field.content_type()
        && ct.essence_str() != "application/dicom"
    {
        tracing::info!(content_type = ?ct, "STOW-RS part is not application/dicom");
        drain(&mut field).await?;
        return Ok(failed(status::CANNOT_UNDERSTAND));
    }

    // The head: file meta group plus the start of the data set.
    let mut head: Vec<u8> = Vec::new();
    let mut ended = false;
    loop {
        let meta_len = part10::file_meta_len(&head).filter(|l| *l <= MAX_META);
        if let Some(meta_len) = meta_len
            && head.len() >= meta_len + HEAD_LIMIT
        {
            break;
        }
        // Not a Part-10 file (no preamble): a file meta group alone, or a
        // bare data set; read enough to find its UIDs.
        if meta_len.is_none() && head.len() >= HEAD_LIMIT {
            break;
        }
        match field.chunk().await? {
            Some(chunk) => head.extend_from_slice(&chunk),
            None => {
                ended = true;
                break;
            }
        }
    }
    let part_ts = field.content_type().and_then(|ct| {
        ct.get_param("transfer-syntax")
            .map(|v| v.as_str().to_string())
    });
    let Some(meta) = read_meta(&head).or_else(|| read_headless(&head, part_ts.as_deref())) else {
        tracing::info!(
            bytes = head.len(),
            "STOW-RS part is neither a Part-10 file nor a DICOM data set"
        );
        drain(&mut field).await?;
        return Ok(failed(status::CANNOT_UNDERSTAND));
    };
    let (meta_len, sop_class, sop_instance, ts) = meta;
    let fail = |reason: u16| PartOutcome::Failed {
        sop_class_uid: sop_class.to_string(),
        sop_instance_uid: sop_instance.to_string(),
        reason,
    };
    if !STORAGE_SOP_CLASSES
        .iter()
        .any(|(uid, _)| *uid == sop_class.as_str())
    {
        tracing::info!(
            ?sop_class,
            "STOW-RS part of a SOP class that is not a storage SOP class"
        );
        drain(&mut field).await?;
        return Ok(fail(status::SOP_CLASS_NOT_SUPPORTED));
    }
    let ids = header_uids(&head[meta_len..], ts.as_str());
    if let Some(target) = target_study
        && let Some(study) = &ids.study
        && study != target.as_str()
    {
        tracing::info!(?sop_instance, ?study, target = ?target, "STOW-RS instance of another study than the target resource");
        drain(&mut field).await?;
        return Ok(fail(STUDY_MISMATCH));
    }
    if target_study.is_some() && ids.study.is_none() && !ids.header_complete {
        // The header did not fit the head: it cannot be checked against
        // the target study before storing, so it is not stored.
        drain(&mut field).await?;
        return Ok(fail(status::CANNOT_UNDERSTAND));
    }

    let mut incoming = ingest.begin(sop_class.clone(), sop_instance.clone(), ts, None);
    let mut pending = head.split_off(meta_len);
    drop(head);
    if !ended {
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => {
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= FRAGMENT {
                        ingest.write(&mut incoming, &pending);
                        pending.clear();
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    ingest.abandon(incoming).await;
                    return Err(e);
                }
            }
        }
    }
    if !pending.is_empty() {
        ingest.write(&mut incoming, &pending);
    }
    match ingest.finish(incoming).await {
        Ok(stored) => {
            stored.count(crate::metrics::source::STOW, ingest.store().durability());
            tracing::debug!(?sop_instance, blob = %stored.hash, outcome = ?stored.outcome, "STOW-RS stored");
            // The stored instance's own study and series (the index has
            // them: the head parse may have stopped early).
            let (study, series) = match ingest
                .index()
                .instance_versions(sop_instance.as_str())
                .await
            {
                Ok(rows) if !rows.is_empty() => {
                    let row = rows.last().expect("non-empty");
                    (
                        row.study_instance_uid.clone(),
                        row.series_instance_uid.clone(),
                    )
                }
                _ => (
                    ids.study.clone().unwrap_or_default(),
                    ids.series.clone().unwrap_or_default(),
                ),
            };
            Ok(PartOutcome::Stored {
                sop_class_uid: sop_class.to_string(),
                sop_instance_uid: sop_instance.to_string(),
                study_instance_uid: study,
                series_instance_uid: series,
            })
        }
        Err(error) => {
            let reason = error.status();
            if reason == status::OUT_OF_RESOURCES {
                tracing::error!(?sop_instance, %error, "STOW-RS: out of resources");
            } else {
                tracing::info!(?sop_instance, %error, reason = format_args!("{reason:#06X}"), "STOW-RS part failed");
            }
            Ok(fail(reason))
        }
    }
}

async fn drain(field: &mut multer::Field<'_>) -> Result<(), multer::Error> {
    while field.chunk().await?.is_some() {}
    Ok(())
}

/// The file meta group's length, SOP Class, SOP Instance and transfer
/// syntax UIDs, or `None` when the part is not a Part-10 file.
fn read_meta(head: &[u8]) -> Option<(usize, Uid, Uid, Uid)> {
    let meta_len = part10::file_meta_len(head).filter(|l| *l <= MAX_META)?;
    if head.len() < meta_len {
        return None;
    }
    let meta = dicom_object::meta::FileMetaTable::from_reader(&head[128..meta_len]).ok()?;
    let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    Some((
        meta_len,
        Uid::parse(&clean(meta.media_storage_sop_class_uid())).ok()?,
        Uid::parse(&clean(meta.media_storage_sop_instance_uid())).ok()?,
        Uid::parse(&clean(meta.transfer_syntax())).ok()?,
    ))
}

/// A part without the Part-10 preamble: what pydicom's `dcmwrite` writes
/// without `enforce_file_format` (dicomweb-client's `store_instances` of a
/// data set built in memory): a file meta group with no preamble, `DICM`
/// or group length, then the data set; or a bare data set whose transfer
/// syntax the part's media type names (Explicit VR Little Endian when it
/// does not, PS3.18 §8.7.3.5.2). The instance is stored as a proper Part-10
/// file with the node's own meta group, like a C-STORE. `None` when the
/// bytes are not DICOM.
fn read_headless(head: &[u8], part_ts: Option<&str>) -> Option<(usize, Uid, Uid, Uid)> {
    let mut class = None;
    let mut instance = None;
    let mut ts = None;
    let mut offset = 0usize;
    // Group 0002 elements, explicit VR little endian (PS3.10 §7.1).
    while head.len() >= offset + 8 && head[offset..offset + 2] == [0x02, 0x00] {
        let element = u16::from_le_bytes([head[offset + 2], head[offset + 3]]);
        let vr = &head[offset + 4..offset + 6];
        let (header, len) = if matches!(vr, b"OB" | b"OW" | b"OF" | b"SQ" | b"UT" | b"UN") {
            let b = head.get(offset + 8..offset + 12)?;
            (12, u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        } else {
            (
                8,
                u16::from_le_bytes([head[offset + 6], head[offset + 7]]) as usize,
            )
        };
        let value = head.get(offset + header..offset + header + len)?;
        let text = || {
            String::from_utf8_lossy(value)
                .trim_end_matches(['\0', ' '])
                .to_string()
        };
        match element {
            0x0002 => class = Some(text()),
            0x0003 => instance = Some(text()),
            0x0010 => ts = Some(text()),
            _ => {}
        }
        offset += header + len;
        if offset > MAX_META {
            return None;
        }
    }
    let ts = ts
        .or_else(|| part_ts.map(str::to_string))
        .unwrap_or_else(|| "1.2.840.10008.1.2.1".to_string());
    let ids = header_uids(&head[offset..], &ts);
    let class = class.or(ids.sop_class)?;
    let instance = instance.or(ids.sop_instance)?;
    Some((
        offset,
        Uid::parse(&class).ok()?,
        Uid::parse(&instance).ok()?,
        Uid::parse(&ts).ok()?,
    ))
}

#[derive(Debug, Default, PartialEq)]
struct HeaderUids {
    sop_class: Option<String>,
    sop_instance: Option<String>,
    study: Option<String>,
    series: Option<String>,
    /// The parse went past (0020,000E): absent UIDs are really absent.
    header_complete: bool,
}

/// The Study and Series Instance UIDs from the start of a data set (which
/// may stop anywhere: the rest is still on the wire).
fn header_uids(data_set_start: &[u8], ts_uid: &str) -> HeaderUids {
    let mut out = HeaderUids::default();
    let Some(ts) = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid)
        .filter(|ts| !ts.is_unsupported())
    else {
        return out;
    };
    use dicom_encoding::transfer_syntax::TransferSyntaxIndex as _;
    let inflated;
    let bytes: &[u8] = if ts.uid() == "1.2.840.10008.1.2.1.99" {
        let mut buf = Vec::new();
        // A cut deflate stream inflates as far as it goes.
        let _ = flate2::read::DeflateDecoder::new(data_set_start)
            .take(4 * HEAD_LIMIT as u64)
            .read_to_end(&mut buf);
        inflated = buf;
        &inflated
    } else {
        data_set_start
    };
    let Ok(reader) = DataSetReader::new_with_ts(bytes, ts) else {
        return out;
    };
    let mut depth = 0usize;
    let mut current = None;
    for token in reader {
        let Ok(token) = token else { break };
        match token {
            DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart => depth += 1,
            DataToken::SequenceEnd => depth = depth.saturating_sub(1),
            DataToken::ElementHeader(h) if depth == 0 => {
                if h.tag > tags::SERIES_INSTANCE_UID {
                    out.header_complete = true;
                    break;
                }
                current = Some(h.tag);
            }
            DataToken::PrimitiveValue(v) if depth == 0 => {
                let value = || v.to_str().trim_end_matches(['\0', ' ']).to_string();
                match current.take() {
                    Some(t) if t == tags::SOP_CLASS_UID => out.sop_class = Some(value()),
                    Some(t) if t == tags::SOP_INSTANCE_UID => out.sop_instance = Some(value()),
                    Some(t) if t == tags::STUDY_INSTANCE_UID => out.study = Some(value()),
                    Some(t) if t == tags::SERIES_INSTANCE_UID => {
                        out.series = Some(value());
                        out.header_complete = true;
                        break;
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out
}

fn response(base: &str, target_study: Option<&Uid>, outcomes: Vec<PartOutcome>) -> Response {
    let mut referenced = Vec::new();
    let mut failed = Vec::new();
    let mut studies = std::collections::BTreeSet::new();
    for outcome in outcomes {
        match outcome {
            PartOutcome::Stored {
                sop_class_uid,
                sop_instance_uid,
                study_instance_uid,
                series_instance_uid,
            } => {
                let url = format!(
                    "{base}/studies/{study_instance_uid}/series/{series_instance_uid}/instances/{sop_instance_uid}"
                );
                studies.insert(study_instance_uid);
                referenced.push(json!({
                    "00081150": attr("UI", vec![json!(sop_class_uid)]),
                    "00081155": attr("UI", vec![json!(sop_instance_uid)]),
                    "00081190": attr("UR", vec![json!(url)]),
                }));
            }
            PartOutcome::Failed {
                sop_class_uid,
                sop_instance_uid,
                reason,
            } => {
                failed.push(json!({
                    "00081150": attr("UI", opt(sop_class_uid)),
                    "00081155": attr("UI", opt(sop_instance_uid)),
                    "00081197": attr("US", vec![json!(reason)]),
                }));
            }
        }
    }
    // PS3.18 §10.5.3: 200 all stored, 202 some stored (the failures are in
    // the body), 409 none stored.
    let status = match (referenced.is_empty(), failed.is_empty()) {
        (_, true) => StatusCode::OK,
        (false, false) => StatusCode::ACCEPTED,
        (true, false) => StatusCode::CONFLICT,
    };
    let mut body = serde_json::Map::new();
    let study_url = match target_study {
        Some(s) => Some(s.to_string()),
        None if studies.len() == 1 => studies.into_iter().next(),
        None => None,
    };
    if let Some(study) = study_url {
        body.insert(
            "00081190".into(),
            attr("UR", vec![json!(format!("{base}/studies/{study}"))]),
        );
    }
    if !failed.is_empty() {
        body.insert("00081198".into(), sequence(failed));
    }
    body.insert("00081199".into(), sequence(referenced));
    super::json::dicom_json_response(status, &Value::Object(body))
}

fn opt(s: String) -> Vec<Value> {
    if s.is_empty() { vec![] } else { vec![json!(s)] }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stalled_body_ends_with_body_stalled() {
        use futures::StreamExt;
        let body = futures::stream::iter([Ok(bytes::Bytes::from_static(b"--b\r\n"))])
            .chain(futures::stream::pending());
        let mut timed = std::pin::pin!(idle_timeout(
            Box::pin(body),
            std::time::Duration::from_millis(50)
        ));
        assert_eq!(timed.next().await.unwrap().unwrap(), &b"--b\r\n"[..]);
        let stalled = timed.next().await.unwrap().unwrap_err();
        assert!(stalled.is::<BodyStalled>(), "{stalled}");
        assert!(timed.next().await.is_none());
        // As multer hands it on: a 408, not a broken body's 400.
        let answered = body_error(multer::Error::StreamReadFailed(stalled), 1 << 30, 1);
        assert_eq!(answered.status(), StatusCode::REQUEST_TIMEOUT);
    }

    #[test]
    fn header_uids_from_a_cut_data_set() {
        let sample = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sample-dicom/manifest.json"
        ))
        .unwrap();
        let manifest: Value = serde_json::from_slice(&sample).unwrap();
        for f in manifest["files"].as_array().unwrap() {
            let path = format!(
                "{}/sample-dicom/{}",
                env!("CARGO_MANIFEST_DIR"),
                f["path"].as_str().unwrap()
            );
            let bytes = std::fs::read(&path).unwrap();
            let (meta_len, _, _, ts) = read_meta(&bytes).expect("Part-10");
            let end = bytes.len().min(meta_len + HEAD_LIMIT);
            let ids = header_uids(&bytes[meta_len..end], ts.as_str());
            assert_eq!(
                ids.study.as_deref(),
                f["study_instance_uid"].as_str(),
                "{path}"
            );
            assert!(ids.header_complete, "{path}");
        }
        assert_eq!(
            header_uids(b"garbage", "1.2.840.10008.1.2.1"),
            HeaderUids::default()
        );
    }
}
