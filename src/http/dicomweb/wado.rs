//! WADO-RS (PS3.18 §10.4): studies, series and instances as
//! multipart/related of application/dicom, streamed from the blob store
//! (each blob hash-verified before its first byte goes out, never a whole
//! study in memory); metadata as DICOM JSON; frames and bulk data.
//!
//! Instances are found through `crate::query`, the matcher C-FIND and
//! C-MOVE use. Instances go out as stored when the client accepts that
//! (`transfer-syntax=*`, or the stored syntax); otherwise they are
//! converted with `crate::transcode`, the same conversion C-MOVE uses; a
//! syntax they cannot be converted to is 406.

use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use dicom_core::Tag;
use dicom_core::value::Value as DicomValue;
use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions, file::ReadPreamble};
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::Value;

use super::json::{DICOM_JSON, object_json};
use super::media::{self, MediaType, PART_END};
use super::{DicomwebState, base_url};
use crate::http::error::Error;
use crate::query::{self, InstanceLocation, Level, Query};
use crate::storage::{BlobStore, VerifiedBlob};
use crate::types::Uid;

type ByteStream = BoxStream<'static, Result<Bytes, io::Error>>;

/// Read size for blobs served from files (a verified blob over 8 MiB).
const READ_CHUNK: usize = 256 * 1024;

/// How many instances are opened (fetched and verified) ahead of the one
/// being sent: hides a remote store's latency.
const PREFETCH: usize = 2;

/// The current instances under a study (and series, and instance), in
/// series and instance order. 404 when there are none.
pub async fn locate(
    state: &DicomwebState,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Vec<InstanceLocation>, Error> {
    // A study still arriving from another hospital that the viewer reads
    // while it arrives: what is asked for is served once it is here and
    // verified (an instance the series stream has not brought yet is
    // fetched on its own first).
    let mut waited_for_instance = false;
    if let Some(live) = super::live(state, study) {
        let wanted = match instance {
            Some(i) if live.lists(i) => vec![i.to_string()],
            Some(_) => Vec::new(),
            None => live.instances_of(series),
        };
        if !wanted.is_empty() {
            waited_for_instance =
                live.wait_for(&wanted, instance.is_some()).await && instance.is_some();
        }
    }
    let mut found = locate_in(state.ingest.index(), study, series, instance).await?;
    // A series still arriving from another hospital is not served yet
    // (crate::peer::incomplete_series), but for an instance that was
    // waited for: it is here and verified.
    if let Some(region) = &state.region
        && !waited_for_instance
    {
        let hidden = crate::peer::incomplete_series(region, study);
        found.retain(|l| !hidden.contains(&l.series_instance_uid));
        if found.is_empty() {
            return Err(Error::NotFound(match (series, instance) {
                (_, Some(_)) => "instance",
                (Some(_), None) => "series",
                _ => "study",
            }));
        }
    }
    Ok(found)
}

/// [`locate`] over an index (the page's thumbnails use it too).
pub async fn locate_in(
    index: &crate::index::Index,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Vec<InstanceLocation>, Error> {
    let mut q = Query::new(Level::Image);
    let keys = [
        (tags::STUDY_INSTANCE_UID, Some(study), "study"),
        (tags::SERIES_INSTANCE_UID, series, "series"),
        (tags::SOP_INSTANCE_UID, instance, "instance"),
    ];
    for (tag, value, what) in keys {
        q.request(tag);
        if let Some(v) = value {
            Uid::parse(v).map_err(|e| Error::BadRequest(format!("{what} UID: {e}")))?;
            q.add_key(tag, v)
                .map_err(|e| Error::BadRequest(e.to_string()))?;
        }
    }
    // In series and instance order, by Series Number and Instance Number:
    // the order a viewer lays a stack out in, so that a series streamed to
    // another hospital's node (or a viewer) brings the first slice first,
    // and "the middle instance" of a series is its middle slice.
    q.request(tags::SERIES_NUMBER);
    q.request(tags::INSTANCE_NUMBER);
    let mut matches = query::collect(index, q)
        .await
        .map_err(|e| Error::Unavailable(format!("query: {e}")))?;
    let number = |m: &query::Match, tag| {
        m.get(tag)
            .and_then(|e| e.values.first())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(i64::MAX)
    };
    matches.sort_by_cached_key(|m| {
        let location = m.instance.as_ref();
        (
            number(m, tags::SERIES_NUMBER),
            location.map(|l| l.series_instance_uid.clone()),
            number(m, tags::INSTANCE_NUMBER),
            location.map(|l| l.sop_instance_uid.clone()),
        )
    });
    let found: Vec<InstanceLocation> = matches.into_iter().filter_map(|m| m.instance).collect();
    if found.is_empty() {
        return Err(Error::NotFound(match (series, instance) {
            (_, Some(_)) => "instance",
            (Some(_), None) => "series",
            _ => "study",
        }));
    }
    Ok(found)
}

pub async fn study(
    State(state): State<Arc<DicomwebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    retrieve(&state, &headers, &study, None, None).await
}

pub async fn series(
    State(state): State<Arc<DicomwebState>>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    retrieve(&state, &headers, &study, Some(&series), None).await
}

pub async fn instance(
    State(state): State<Arc<DicomwebState>>,
    Path((study, series, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    retrieve(&state, &headers, &study, Some(&series), Some(&instance)).await
}

/// A regional prior this node does not hold yet (it has been told who holds
/// it) is fetched from that hospital's node, verified, before it is served;
/// the viewer need not know it came from elsewhere.
async fn fetch_if_regional(state: &DicomwebState, study: &str) -> Result<(), Error> {
    let Some(region) = &state.region else {
        return Ok(());
    };
    // Arriving already: `locate` waits for what is asked.
    if super::live(state, study).is_some() {
        return Ok(());
    }
    match crate::peer::regional_holder(&state.ingest, study).await {
        Ok(Some(holding)) => crate::peer::fetch_study(
            region,
            &state.ingest,
            &holding,
            study,
            crate::peer::Asked::treatment("dicomweb", "WADO-RS retrieve".into()),
        )
        .await
        .map(|_| ())
        .map_err(|e| Error::Unavailable(format!("regional prior could not be fetched: {e}"))),
        Ok(None) => {
            crate::peer::touch(&state.ingest, study).await;
            Ok(())
        }
        Err(e) => Err(Error::Unavailable(e.to_string())),
    }
}

/// The transfer syntax a retrieve is served in (PS3.18 §8.7.3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wanted {
    /// `transfer-syntax=*`: each instance as stored.
    AsStored,
    /// A transfer syntax the client named: every instance in it (stored so,
    /// or converted).
    Syntax(String),
    /// No transfer-syntax parameter: the media type's default, Explicit VR
    /// Little Endian, for every instance that can be converted to it; an
    /// instance that cannot (JPEG 2000, JPEG-LS...) goes as stored, its
    /// part's Content-Type saying so, rather than failing the study.
    Default,
}

impl Wanted {
    /// The syntax to convert an instance to, if any.
    fn target(&self, stored: &str) -> Option<String> {
        let to = match self {
            Wanted::AsStored => return None,
            Wanted::Syntax(ts) => ts.as_str(),
            Wanted::Default => crate::transcode::EXPLICIT_VR_LITTLE_ENDIAN,
        };
        (stored != to && crate::transcode::can_convert(stored, to)).then(|| to.to_string())
    }
}

/// How the instances go out: as parts of `multipart/related; type=
/// "application/dicom"`, or, for one instance asked for as
/// `application/dicom` itself, as the whole body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packaging {
    Multipart,
    /// PS3.18's instance resource takes a single-part `application/dicom`
    /// too (the media type Microsoft's and Google's DICOMweb clients ask
    /// for by default); never for a study or series.
    SinglePart,
}

/// The first Accept range (by preference) that takes
/// `multipart/related; type="application/dicom"` (or, when `single` is
/// allowed, `application/dicom` named as such) in a transfer syntax every
/// instance can be served in.
fn wanted(headers: &HeaderMap, stored: &[&str], single: bool) -> Option<(Wanted, Packaging)> {
    media::accept(headers).iter().find_map(|range| {
        let packaging = if range.essence == "application/dicom" && single {
            Packaging::SinglePart
        } else {
            let multipart = range.admits("multipart/related");
            let part_ok = range
                .param("type")
                .is_none_or(|t| MediaType::parse(t).is_some_and(|t| t.admits("application/dicom")));
            if !(multipart && part_ok) {
                return None;
            }
            Packaging::Multipart
        };
        let wanted = match range.param("transfer-syntax") {
            Some("*") => Some(Wanted::AsStored),
            None => Some(Wanted::Default),
            Some(ts) => stored
                .iter()
                .all(|s| crate::transcode::can_convert(s, ts))
                .then(|| Wanted::Syntax(ts.to_string())),
        };
        wanted.map(|w| (w, packaging))
    })
}

/// An instance ready to be written as a part.
enum Prepared {
    Blob(VerifiedBlob),
    Converted(Bytes, String),
}

impl Prepared {
    /// Its media type (`application/dicom` in the transfer syntax it goes
    /// in), its length and its bytes: a part's, or a single-part body's.
    fn into_body(self, loc: &InstanceLocation) -> (String, u64, ByteStream) {
        match self {
            Prepared::Blob(blob) => (
                format!(
                    "application/dicom; transfer-syntax={}",
                    loc.transfer_syntax_uid
                ),
                blob.len(),
                blob_stream(blob),
            ),
            Prepared::Converted(bytes, ts) => (
                format!("application/dicom; transfer-syntax={ts}"),
                bytes.len() as u64,
                stream::once(async move { Ok(bytes) }).boxed(),
            ),
        }
    }
}

/// Opens (and verifies) an instance's blob and converts it when the
/// request wants another transfer syntax.
async fn prepare(
    store: &BlobStore,
    loc: &InstanceLocation,
    wanted: &Wanted,
) -> Result<Prepared, Error> {
    let blob = store.open_verified(&loc.blob_hash, loc.blob_size).await?;
    let Some(target) = wanted.target(&loc.transfer_syntax_uid) else {
        return Ok(Prepared::Blob(blob));
    };
    use tokio::io::AsyncReadExt;
    let mut whole = Vec::with_capacity(blob.len() as usize);
    blob.into_reader()
        .read_to_end(&mut whole)
        .await
        .map_err(|e| Error::Internal(format!("reading blob {}: {e}", loc.blob_hash)))?;
    let sop_instance_uid = loc.sop_instance_uid.clone();
    let loc = loc.clone();
    let converted = tokio::task::spawn_blocking(move || {
        crate::transcode::convert_part10(
            whole,
            &loc.sop_class_uid,
            &loc.sop_instance_uid,
            &loc.transfer_syntax_uid,
            &target,
        )
        .map(|bytes| (bytes, target))
    })
    .await
    .map_err(|e| Error::Internal(e.to_string()))?;
    match converted {
        Ok((bytes, ts)) => Ok(Prepared::Converted(Bytes::from(bytes), ts)),
        // The client named this syntax: anything else would be a part it
        // did not accept (PS3.18 8.7.3.5). For the first instance this is
        // a 406; later, the response is cut short.
        Err(why) if matches!(wanted, Wanted::Syntax(_)) => {
            tracing::warn!(%sop_instance_uid, reason = %why, "WADO-RS: instance cannot be converted to the transfer syntax asked for");
            Err(Error::NotAcceptable(format!(
                "instance {sop_instance_uid} cannot be converted to the transfer syntax asked for"
            )))
        }
        Err(why) => {
            // Convertible by syntax but not this instance (an odd pixel
            // encoding): served as stored, which the part's Content-Type
            // states.
            tracing::warn!(reason = %why, "WADO-RS: instance served in its stored transfer syntax");
            Ok(Prepared::Blob(
                store.open_verified(&loc.blob_hash, loc.blob_size).await?,
            ))
        }
    }
}

async fn retrieve(
    state: &DicomwebState,
    headers: &HeaderMap,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Response, Error> {
    fetch_if_regional(state, study).await?;
    let locations = locate(state, study, series, instance).await?;
    let stored: Vec<&str> = locations
        .iter()
        .map(|l| l.transfer_syntax_uid.as_str())
        .collect();
    let Some((wanted, packaging)) = wanted(headers, &stored, instance.is_some()) else {
        return Err(Error::NotAcceptable(
            "instances are served as multipart/related; type=\"application/dicom\" (one instance also as application/dicom), as stored (transfer-syntax=*) or in an uncompressed transfer syntax they can be converted to".into(),
        ));
    };
    if packaging == Packaging::SinglePart {
        let loc = locations.into_iter().next().expect("locate returns one");
        let (content_type, length, bytes) = prepare(state.ingest.store(), &loc, &wanted)
            .await?
            .into_body(&loc);
        let mut response = Response::new(Body::from_stream(bytes));
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(&content_type).expect("ASCII content type"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        return Ok(response);
    }
    let boundary = media::boundary();
    let content_type = media::multipart_content_type("application/dicom", &boundary);
    let store = state.ingest.store().clone();
    let part_boundary = boundary.clone();
    // The first instance is opened (fetched, verified, converted) before the
    // response starts, so that a request whose first blob is corrupt or
    // missing gets a status instead of a cut body.
    let mut locations = locations.into_iter();
    let first_loc = locations.next().expect("locate returns at least one");
    let first_ready = prepare(&store, &first_loc, &wanted).await?;
    let first = stream::once(async move { (first_loc, Ok(first_ready)) });
    let rest = stream::iter(locations)
        .map(move |loc| {
            let store = store.clone();
            let wanted = wanted.clone();
            async move {
                let ready = prepare(&store, &loc, &wanted).await;
                (loc, ready)
            }
        })
        .buffered(PREFETCH);
    let parts = first
        .chain(rest)
        .flat_map(move |(loc, ready)| -> ByteStream {
            match ready {
                Ok(prepared) => {
                    let (content_type, length, bytes) = prepared.into_body(&loc);
                    let head = media::part_head(
                        &part_boundary,
                        &content_type,
                        &[("Content-Length", length.to_string())],
                    );
                    stream::once(async move { Ok(Bytes::from(head)) })
                        .chain(bytes)
                        .chain(stream::once(async { Ok(Bytes::from_static(PART_END)) }))
                        .boxed()
                }
                Err(e) => {
                    // The response has started: cutting it is the only
                    // signal left. The detail goes to the log.
                    tracing::error!(sop_instance_uid = %loc.sop_instance_uid, error = %e, "WADO-RS: instance cannot be served");
                    stream::once(async { Err(io::Error::other("instance unavailable")) }).boxed()
                }
            }
        });
    Ok(multipart_response(&content_type, &boundary, parts))
}

fn blob_stream(blob: VerifiedBlob) -> ByteStream {
    match blob {
        VerifiedBlob::Memory(bytes) => stream::once(async move { Ok(bytes) }).boxed(),
        other => {
            tokio_util::io::ReaderStream::with_capacity(other.into_reader(), READ_CHUNK).boxed()
        }
    }
}

fn multipart_response(
    content_type: &str,
    boundary: &str,
    parts: impl futures::Stream<Item = Result<Bytes, io::Error>> + Send + 'static,
) -> Response {
    let closing = Bytes::from(media::closing(boundary));
    let body = parts.chain(stream::once(async move { Ok(closing) }));
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type).expect("ASCII content type"),
    );
    response
}

/// Parses a stored instance, up to (not including) `until` when given,
/// reading the verified blob on a blocking thread.
pub async fn open_object(
    store: &BlobStore,
    loc: &InstanceLocation,
    until: Option<Tag>,
) -> Result<DefaultDicomObject, Error> {
    let blob = store.open_verified(&loc.blob_hash, loc.blob_size).await?;
    let sop = loc.sop_instance_uid.clone();
    let parse = move |reader: &mut dyn io::Read| {
        let mut options = OpenFileOptions::new().read_preamble(ReadPreamble::Always);
        if let Some(tag) = until {
            options = options.read_until(tag);
        }
        options.from_reader(reader)
    };
    let result = match blob {
        VerifiedBlob::Memory(bytes) => {
            tokio::task::spawn_blocking(move || parse(&mut io::Cursor::new(bytes))).await
        }
        other => {
            let mut bridge = tokio_util::io::SyncIoBridge::new(other.into_reader());
            tokio::task::spawn_blocking(move || parse(&mut bridge)).await
        }
    };
    result
        .map_err(|e| Error::Internal(format!("parse task: {e}")))?
        .map_err(|e| Error::Internal(format!("stored instance {sop} does not parse: {e}")))
}

/// The whole instance, pixel data included.
pub async fn open_object_full(
    store: &BlobStore,
    loc: &InstanceLocation,
) -> Result<DefaultDicomObject, Error> {
    open_object(store, loc, None).await
}

fn instance_url(base: &str, loc: &InstanceLocation) -> String {
    format!(
        "{base}/studies/{}/series/{}/instances/{}",
        loc.study_instance_uid, loc.series_instance_uid, loc.sop_instance_uid
    )
}

pub async fn study_metadata(
    State(state): State<Arc<DicomwebState>>,
    Path(study): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    metadata(&state, &headers, &study, None, None).await
}

pub async fn series_metadata(
    State(state): State<Arc<DicomwebState>>,
    Path((study, series)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    metadata(&state, &headers, &study, Some(&series), None).await
}

pub async fn instance_metadata(
    State(state): State<Arc<DicomwebState>>,
    Path((study, series, instance)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    metadata(&state, &headers, &study, Some(&series), Some(&instance)).await
}

/// The metadata of each instance, as a DICOM JSON array streamed one
/// instance at a time; bulk data (Pixel Data and binary values over 1 KiB)
/// as BulkDataURI.
async fn metadata(
    state: &DicomwebState,
    headers: &HeaderMap,
    study: &str,
    series: Option<&str>,
    instance: Option<&str>,
) -> Result<Response, Error> {
    media::require_json(headers)?;
    // The metadata of a study or series still arriving is the holding
    // node's (the viewer lays the study out at once); each instance's
    // pixels are served once it is here and verified.
    if instance.is_none()
        && let Some(live) = super::live(state, study)
    {
        let path = match series {
            Some(series) => format!("/studies/{study}/series/{series}/metadata"),
            None => format!("/studies/{study}/metadata"),
        };
        return super::from_peer(&live, &path, &[], headers).await;
    }
    let locations = locate(state, study, series, instance).await?;
    let base = base_url(headers);
    let store = state.ingest.store().clone();
    let count = locations.len();
    // The first instance is read before the response starts (a status
    // rather than a cut body when it cannot be).
    let mut locations = locations.into_iter().enumerate();
    let (i0, loc0) = locations.next().expect("locate returns at least one");
    let obj0 = open_object(&store, &loc0, Some(tags::PIXEL_DATA)).await?;
    let base0 = base.clone();
    let first = stream::once(async move { (i0, loc0, Ok(obj0), base0) });
    let rest = stream::iter(locations)
        .map(move |(i, loc)| {
            let store = store.clone();
            let base = base.clone();
            async move {
                let obj = open_object(&store, &loc, Some(tags::PIXEL_DATA)).await;
                (i, loc, obj, base)
            }
        })
        .buffered(PREFETCH);
    let items = first
        .chain(rest)
        .map(move |(i, loc, obj, base)| match obj {
            Ok(obj) => {
                let url = instance_url(&base, &loc);
                let mut json = object_json(&obj, Some(&url));
                // Parsing stopped before Pixel Data: an image's pixel data is
                // announced as bulk data.
                if obj.get(tags::ROWS).is_some()
                    && let Value::Object(map) = &mut json
                {
                    let vr = if obj
                        .get(tags::BITS_ALLOCATED)
                        .and_then(|e| e.to_int::<u16>().ok())
                        .is_some_and(|b| b > 8)
                        && is_native(&loc.transfer_syntax_uid)
                    {
                        "OW"
                    } else {
                        "OB"
                    };
                    map.insert(
                        "7FE00010".into(),
                        serde_json::json!({"vr": vr, "BulkDataURI": format!("{url}/bulkdata/7FE00010")}),
                    );
                }
                let open = if i == 0 { "[" } else { "," };
                let close = if i + 1 == count { "]" } else { "" };
                Ok(Bytes::from(format!("{open}{json}{close}")))
            }
            Err(e) => {
                tracing::error!(sop_instance_uid = %loc.sop_instance_uid, error = %e, "WADO-RS metadata: instance cannot be read");
                Err(io::Error::other("instance unavailable"))
            }
        });
    let mut response = Response::new(Body::from_stream(items));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON));
    Ok(response)
}

/// Transfer syntaxes whose pixel data is native (not encapsulated).
fn is_native(ts: &str) -> bool {
    matches!(
        ts,
        "1.2.840.10008.1.2"
            | "1.2.840.10008.1.2.1"
            | "1.2.840.10008.1.2.1.99"
            | "1.2.840.10008.1.2.2"
    )
}

/// The media type of a frame in a transfer syntax (PS3.18 Table 8.7.3-2),
/// as stored: native frames as application/octet-stream (little endian).
pub fn frame_media_type(ts: &str) -> Option<&'static str> {
    if is_native(ts) {
        return Some("application/octet-stream");
    }
    Some(match ts {
        "1.2.840.10008.1.2.4.50"
        | "1.2.840.10008.1.2.4.51"
        | "1.2.840.10008.1.2.4.57"
        | "1.2.840.10008.1.2.4.70" => "image/jpeg",
        "1.2.840.10008.1.2.4.80" | "1.2.840.10008.1.2.4.81" => "image/jls",
        "1.2.840.10008.1.2.4.90" | "1.2.840.10008.1.2.4.91" => "image/jp2",
        "1.2.840.10008.1.2.4.92" | "1.2.840.10008.1.2.4.93" => "image/jpx",
        "1.2.840.10008.1.2.4.201" | "1.2.840.10008.1.2.4.202" | "1.2.840.10008.1.2.4.203" => {
            "image/jphc"
        }
        "1.2.840.10008.1.2.4.110" | "1.2.840.10008.1.2.4.111" | "1.2.840.10008.1.2.4.112" => {
            "image/jxl"
        }
        "1.2.840.10008.1.2.5" => "image/dicom-rle",
        _ => return None,
    })
}

/// The frames of an instance's pixel data, as stored (one entry per
/// frame; encapsulated fragments joined per frame).
pub fn frames_of(obj: &DefaultDicomObject) -> Result<Vec<Vec<u8>>, Error> {
    let pixel_data = obj
        .get(tags::PIXEL_DATA)
        .ok_or(Error::NotFound("pixel data"))?;
    let count = obj
        .get(tags::NUMBER_OF_FRAMES)
        .and_then(|e| e.to_int::<u32>().ok())
        .unwrap_or(1)
        .max(1) as usize;
    match pixel_data.value() {
        DicomValue::PixelSequence(seq) => {
            let fragments = seq.fragments();
            let offsets = seq.offset_table();
            if count == 1 {
                Ok(vec![fragments.concat()])
            } else if fragments.len() == count {
                Ok(fragments.to_vec())
            } else if offsets.len() == count {
                // Basic Offset Table: byte offsets of each frame's first
                // fragment item (8 bytes of item header each).
                let mut frames = vec![Vec::new(); count];
                let mut position = 0u64;
                for fragment in fragments {
                    let frame = offsets
                        .iter()
                        .rposition(|o| u64::from(*o) <= position)
                        .unwrap_or(0);
                    frames[frame].extend_from_slice(fragment);
                    position += 8 + fragment.len() as u64;
                }
                Ok(frames)
            } else {
                Err(Error::NotAcceptable(
                    "frames of this encapsulated pixel data cannot be told apart (no offset table)"
                        .into(),
                ))
            }
        }
        DicomValue::Primitive(v) => {
            let bytes = v.to_bytes();
            let size = bytes.len() / count;
            Ok(bytes
                .chunks(size.max(1))
                .take(count)
                .map(<[u8]>::to_vec)
                .collect())
        }
        DicomValue::Sequence(_) => Err(Error::Internal("Pixel Data is a sequence".into())),
    }
}

/// Counts the bytes read through it: where the pixel data starts.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: io::Read> io::Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Frames of native (uncompressed, little endian, not deflated) pixel data
/// read straight from the verified blob: the header is parsed up to Pixel
/// Data, then only the requested frames are read, so memory holds the
/// frames asked for, never the whole instance. `None` when the instance is
/// not of that kind (the caller parses it whole).
pub async fn native_frames(
    store: &BlobStore,
    loc: &InstanceLocation,
    numbers: Vec<usize>,
) -> Result<Option<Vec<Vec<u8>>>, Error> {
    let Some(mut stream) = native_frame_stream(store, loc, numbers).await? else {
        return Ok(None);
    };
    let mut frames = Vec::new();
    while let Some(frame) = stream.next().await {
        frames.push(frame.map_err(|e| Error::Internal(format!("stored instance: {e}")))?);
    }
    Ok(Some(frames))
}

/// The frames of a native instance as a stream, in the order asked, read
/// on a blocking thread and handed over through a channel of two: a
/// request for many frames holds a few in memory, not its whole answer
/// (issue 22: `frames/1,1,1,…` built 164 MB). Errors found before the first
/// frame (not native: `None`; a frame number past NumberOfFrames: 404)
/// come back before anything is streamed.
pub async fn native_frame_stream(
    store: &BlobStore,
    loc: &InstanceLocation,
    numbers: Vec<usize>,
) -> Result<Option<BoxStream<'static, Result<Vec<u8>, io::Error>>>, Error> {
    let ts_uid = loc.transfer_syntax_uid.clone();
    if !matches!(ts_uid.as_str(), "1.2.840.10008.1.2" | "1.2.840.10008.1.2.1") {
        return Ok(None);
    }
    let blob = store.open_verified(&loc.blob_hash, loc.blob_size).await?;
    let reader: Box<dyn io::Read + Send> = match blob {
        VerifiedBlob::Memory(bytes) => Box::new(io::Cursor::new(bytes)),
        other => Box::new(tokio_util::io::SyncIoBridge::new(other.into_reader())),
    };
    let (verdict_tx, verdict_rx) = tokio::sync::oneshot::channel();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, io::Error>>(2);
    tokio::task::spawn_blocking(move || {
        let pixels = match open_native_pixels(reader, &ts_uid) {
            Ok(Some(p)) => match p.check(&numbers) {
                Ok(()) => p,
                Err(e) => return drop(verdict_tx.send(Err(e))),
            },
            other => return drop(verdict_tx.send(other.map(|_| false))),
        };
        if verdict_tx.send(Ok(true)).is_err() {
            return;
        }
        let sent = pixels.emit(&numbers, |frame| tx.blocking_send(Ok(frame)).is_ok());
        if let Err(e) = sent {
            // Mid-stream: the body ends in error, the client sees it cut.
            let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
        }
    });
    match verdict_rx.await {
        Ok(Ok(true)) => Ok(Some(
            stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) }).boxed(),
        )),
        Ok(Ok(false)) => Ok(None),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(Error::Internal(format!("frame task: {e}"))),
    }
}

#[cfg(test)]
fn read_native_frames(
    reader: Box<dyn io::Read + Send>,
    ts_uid: &str,
    numbers: &[usize],
) -> Result<Option<Vec<Vec<u8>>>, Error> {
    let Some(pixels) = open_native_pixels(reader, ts_uid)? else {
        return Ok(None);
    };
    pixels.check(numbers)?;
    let mut frames = Vec::new();
    pixels.emit(numbers, |f| {
        frames.push(f);
        true
    })?;
    Ok(Some(frames))
}

/// The pixel data of a native instance, its reader positioned at the
/// first byte of Pixel Data.
struct NativePixels {
    reader: Counting<Box<dyn io::Read + Send>>,
    frame_size: u64,
    frames: u64,
}

/// Parses a stored instance up to its Pixel Data; `None` when the instance
/// is not native with whole frames (the caller parses it whole).
fn open_native_pixels(
    mut reader: Box<dyn io::Read + Send>,
    ts_uid: &str,
) -> Result<Option<NativePixels>, Error> {
    use dicom_core::Length;
    use dicom_encoding::transfer_syntax::TransferSyntaxIndex as _;
    use dicom_parser::dataset::{DataSetReader, DataToken};
    use std::io::Read as _;
    let internal = |e: &dyn std::fmt::Display| Error::Internal(format!("stored instance: {e}"));
    let mut head = [0u8; 144];
    reader.read_exact(&mut head).map_err(|e| internal(&e))?;
    let meta_len =
        crate::part10::file_meta_len(&head).ok_or_else(|| internal(&"not a Part-10 object"))?;
    io::copy(
        &mut io::Read::take(&mut reader, (meta_len - 144) as u64),
        &mut io::sink(),
    )
    .map_err(|e| internal(&e))?;
    let ts = dicom_transfer_syntax_registry::TransferSyntaxRegistry
        .get(ts_uid)
        .ok_or_else(|| internal(&"unknown transfer syntax"))?;
    let mut counting = Counting {
        inner: reader,
        count: 0,
    };
    let (mut rows, mut columns, mut samples, mut bits, mut frames) = (0u64, 0u64, 1u64, 0u64, 1u64);
    let mut pixel_len = None;
    {
        let tokens = DataSetReader::new_with_ts(&mut counting, ts).map_err(|e| internal(&e))?;
        let mut depth = 0usize;
        let mut current = None;
        for token in tokens {
            match token.map_err(|e| internal(&e))? {
                DataToken::SequenceStart { .. } | DataToken::PixelSequenceStart => depth += 1,
                DataToken::SequenceEnd => depth = depth.saturating_sub(1),
                DataToken::ElementHeader(h) if depth == 0 && h.tag == tags::PIXEL_DATA => {
                    pixel_len = match h.len {
                        Length(n) if h.len.is_defined() => Some(u64::from(n)),
                        _ => return Ok(None),
                    };
                    break;
                }
                DataToken::ElementHeader(h) if depth == 0 => current = Some(h.tag),
                DataToken::PrimitiveValue(v) if depth == 0 => {
                    let n = || v.to_int::<u64>().unwrap_or(0);
                    match current.take() {
                        Some(t) if t == tags::ROWS => rows = n(),
                        Some(t) if t == tags::COLUMNS => columns = n(),
                        Some(t) if t == tags::SAMPLES_PER_PIXEL => samples = n(),
                        Some(t) if t == tags::BITS_ALLOCATED => bits = n(),
                        Some(t) if t == tags::NUMBER_OF_FRAMES => frames = n().max(1),
                        _ => {}
                    }
                }
                _ => {}
            }
        }
    }
    let Some(pixel_len) = pixel_len else {
        return Err(Error::NotFound("pixel data"));
    };
    if bits == 0 || bits % 8 != 0 {
        return Ok(None);
    }
    // The header's numbers are the sender's: checked, not trusted.
    let frame_size = rows
        .checked_mul(columns)
        .and_then(|n| n.checked_mul(samples))
        .and_then(|n| n.checked_mul(bits / 8))
        .unwrap_or(0);
    if frame_size == 0 || frame_size.checked_mul(frames).is_none_or(|n| n > pixel_len) {
        return Ok(None);
    }
    Ok(Some(NativePixels {
        reader: counting,
        frame_size,
        frames,
    }))
}

impl NativePixels {
    fn check(&self, numbers: &[usize]) -> Result<(), Error> {
        if numbers.iter().any(|n| *n as u64 > self.frames) {
            return Err(Error::NotFound("frame"));
        }
        Ok(())
    }

    /// Reads the frames in ascending order and hands them to `send` in the
    /// order asked (`numbers` has no duplicates: [`frame_list`]); a frame
    /// read before its turn waits, so at most the frames asked for are
    /// held, each once. Stops when `send` returns false (the client left).
    fn emit(
        mut self,
        numbers: &[usize],
        mut send: impl FnMut(Vec<u8>) -> bool,
    ) -> Result<(), Error> {
        use std::io::Read as _;
        let internal = |e: &dyn std::fmt::Display| Error::Internal(format!("stored instance: {e}"));
        let mut order: Vec<usize> = numbers.to_vec();
        order.sort_unstable();
        let mut waiting = std::collections::BTreeMap::new();
        let mut next = 0;
        let mut position = 0u64; // within the pixel data
        for n in order {
            let start = (n as u64 - 1) * self.frame_size;
            io::copy(
                &mut io::Read::take(&mut self.reader, start - position),
                &mut io::sink(),
            )
            .map_err(|e| internal(&e))?;
            let mut frame = vec![0u8; self.frame_size as usize];
            self.reader
                .read_exact(&mut frame)
                .map_err(|e| internal(&e))?;
            position = start + self.frame_size;
            waiting.insert(n, frame);
            while let Some(frame) = numbers.get(next).and_then(|k| waiting.remove(k)) {
                if !send(frame) {
                    return Ok(());
                }
                next += 1;
            }
        }
        Ok(())
    }
}

/// `1,3,5` (1-based) as frame numbers (PS3.18 8.3.5.1.1: a list of
/// frame numbers), each at most once: a repeated number would make the
/// answer as large as the list is long (issue 22). Numbers past the
/// instance's NumberOfFrames are 404 where the instance is read, so a
/// list is never longer than the instance has frames.
fn frame_list(s: &str) -> Result<Vec<usize>, Error> {
    let numbers = s
        .split(',')
        .map(|n| {
            n.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=u32::MAX as usize).contains(n))
                .ok_or_else(|| {
                    Error::BadRequest("frame list: 1-based frame numbers, comma separated".into())
                })
        })
        .collect::<Result<Vec<usize>, Error>>()?;
    let mut seen = std::collections::HashSet::with_capacity(numbers.len());
    if !numbers.iter().all(|n| seen.insert(*n)) {
        return Err(Error::BadRequest(
            "frame list: each frame number at most once".into(),
        ));
    }
    Ok(numbers)
}

/// Whether an Accept range takes multipart/related parts of `part_type` in
/// transfer syntax `ts`.
fn accepts_part(range: &MediaType, part_type: &str, ts: &str) -> bool {
    if !range.admits("multipart/related") {
        return false;
    }
    let type_ok = range
        .param("type")
        .is_none_or(|t| MediaType::parse(t).is_some_and(|t| t.admits(part_type)));
    type_ok && transfer_syntax_ok(range.param("transfer-syntax"), ts)
}

/// The media type for frames (or pixel bulk data) stored in `ts`, and how
/// they go out: their own media type (PS3.18 Table 8.7.3-2) when an Accept
/// range takes it, or `application/octet-stream` when a range asks for
/// octets with `transfer-syntax=*` (as stored, whatever the encoding: what
/// OHIF asks for). Nothing is transcoded. As parts of a multipart/related
/// payload, or, when `single` (exactly one frame asked for), as a single
/// part payload when the range names a single part media type (PS3.18
/// 8.6: "only applicable for requests that return exactly one item"): a
/// viewer then reads the frame as it is, with no boundary to search for.
fn negotiate_pixel_payload(
    headers: &HeaderMap,
    ts: &str,
    single: bool,
) -> Result<(Packaging, &'static str), Error> {
    let native = frame_media_type(ts).ok_or_else(|| {
        Error::NotAcceptable(format!("frames of transfer syntax {ts} are not served"))
    })?;
    let octets_as_stored = |range: &MediaType| {
        range.param("transfer-syntax") == Some("*")
            && range.param("type").is_some_and(|t| {
                MediaType::parse(t).is_some_and(|t| t.essence == "application/octet-stream")
            })
    };
    for range in media::accept(headers) {
        if accepts_part(&range, native, ts) {
            return Ok((Packaging::Multipart, native));
        }
        if range.admits("multipart/related") && octets_as_stored(&range) {
            return Ok((Packaging::Multipart, "application/octet-stream"));
        }
        if single && range.essence != "*/*" && !range.admits("multipart/related") {
            if range.admits(native) && transfer_syntax_ok(range.param("transfer-syntax"), ts) {
                return Ok((Packaging::SinglePart, native));
            }
            if range.essence == "application/octet-stream"
                && range.param("transfer-syntax") == Some("*")
            {
                return Ok((Packaging::SinglePart, "application/octet-stream"));
            }
        }
    }
    Err(Error::NotAcceptable(format!(
        "these frames are served as multipart/related; type=\"{native}\" (or type=\"application/octet-stream\"; transfer-syntax=*), or, one frame, as {native} itself"
    )))
}

/// Whether a range's `transfer-syntax` parameter admits frames stored in
/// `ts`. Native frames go out as little endian octets: the explicit VR
/// little endian transfer syntax names them.
fn transfer_syntax_ok(wanted: Option<&str>, ts: &str) -> bool {
    match wanted {
        None | Some("*") => true,
        Some(wanted) => wanted == ts || (is_native(ts) && wanted == "1.2.840.10008.1.2.1"),
    }
}

/// The Content-Type of one frame (or bulk data item), as a part or as a
/// single part payload: the transfer syntax named unless native.
fn pixel_content_type(media_type: &str, ts: &str) -> String {
    if is_native(ts) {
        media_type.to_string()
    } else {
        format!("{media_type}; transfer-syntax={ts}")
    }
}

/// One frame (or bulk data item) as the whole payload.
fn single_part(media_type: &str, ts: &str, bytes: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(bytes));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&pixel_content_type(media_type, ts)).expect("ASCII content type"),
    );
    response
}

pub async fn frames(
    State(state): State<Arc<DicomwebState>>,
    Path((study, series, instance, frames)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let numbers = frame_list(&frames)?;
    let loc = locate(&state, &study, Some(&series), Some(&instance))
        .await?
        .remove(0);
    let ts = loc.transfer_syntax_uid.as_str();
    let (packaging, part_type) = negotiate_pixel_payload(&headers, ts, numbers.len() == 1)?;
    if let Some(mut frames) =
        native_frame_stream(state.ingest.store(), &loc, numbers.clone()).await?
    {
        if packaging == Packaging::SinglePart {
            let frame = frames
                .next()
                .await
                .ok_or(Error::NotFound("frame"))?
                .map_err(|e| Error::Internal(format!("reading frame: {e}")))?;
            return Ok(single_part(part_type, ts, frame));
        }
        return Ok(octet_part_stream(part_type, ts, frames));
    }
    // Encapsulated: the instance is parsed whole (its fragments must be
    // told apart); each frame asked for is moved out, never copied.
    let obj = open_object(state.ingest.store(), &loc, None).await?;
    let mut all: Vec<Option<Vec<u8>>> = frames_of(&obj)?.into_iter().map(Some).collect();
    drop(obj);
    let mut selected = Vec::with_capacity(numbers.len());
    for n in numbers {
        let frame = all.get_mut(n - 1).and_then(Option::take);
        selected.push(frame.ok_or(Error::NotFound("frame"))?);
    }
    if packaging == Packaging::SinglePart {
        return Ok(single_part(part_type, ts, selected.remove(0)));
    }
    Ok(octet_parts(part_type, ts, selected))
}

fn octet_parts(part_type: &str, ts: &str, parts: Vec<Vec<u8>>) -> Response {
    octet_part_stream(
        part_type,
        ts,
        stream::iter(parts.into_iter().map(Ok)).boxed(),
    )
}

/// Each item a multipart/related part, written as it comes.
fn octet_part_stream(
    part_type: &str,
    ts: &str,
    parts: BoxStream<'static, Result<Vec<u8>, io::Error>>,
) -> Response {
    let boundary = media::boundary();
    let content_type = media::multipart_content_type(part_type, &boundary);
    let part_content_type = pixel_content_type(part_type, ts);
    let head_boundary = boundary.clone();
    let chunks = parts.flat_map(move |part| {
        let chunks: Vec<Result<Bytes, io::Error>> = match part {
            Ok(part) => vec![
                Ok(Bytes::from(media::part_head(
                    &head_boundary,
                    &part_content_type,
                    &[("Content-Length", part.len().to_string())],
                ))),
                Ok(Bytes::from(part)),
                Ok(Bytes::from_static(PART_END)),
            ],
            Err(e) => vec![Err(e)],
        };
        stream::iter(chunks)
    });
    multipart_response(&content_type, &boundary, chunks)
}

/// A top-level element's value as bulk data (the BulkDataURI of the
/// metadata); Pixel Data as its frames, one part each.
pub async fn bulkdata(
    State(state): State<Arc<DicomwebState>>,
    Path((study, series, instance, tag)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Error> {
    let tag = query::tag_from_keyword_or_hex(&tag)
        .ok_or_else(|| Error::BadRequest(format!("bulk data {tag:?}: not a tag")))?;
    let loc = locate(&state, &study, Some(&series), Some(&instance))
        .await?
        .remove(0);
    if tag == tags::PIXEL_DATA {
        let ts = loc.transfer_syntax_uid.as_str();
        let obj = open_object(state.ingest.store(), &loc, None).await?;
        let mut frames = frames_of(&obj)?;
        drop(obj);
        let (packaging, part_type) = negotiate_pixel_payload(&headers, ts, frames.len() == 1)?;
        if packaging == Packaging::SinglePart {
            return Ok(single_part(part_type, ts, frames.remove(0)));
        }
        return Ok(octet_parts(part_type, ts, frames));
    }
    let obj = open_object(state.ingest.store(), &loc, Some(tags::PIXEL_DATA)).await?;
    let element = obj.get(tag).ok_or(Error::NotFound("bulk data"))?;
    let bytes = match element.value() {
        DicomValue::Primitive(v) => v.to_bytes().into_owned(),
        _ => return Err(Error::NotFound("bulk data")),
    };
    // One value: as a part, or as the whole payload when the preferred
    // range is application/octet-stream itself (PS3.18 8.6).
    let (octets, little_endian) = ("application/octet-stream", "1.2.840.10008.1.2.1");
    let packaging = media::accept(&headers).iter().find_map(|r| {
        if accepts_part(r, octets, little_endian) {
            Some(Packaging::Multipart)
        } else {
            (r.essence == octets && transfer_syntax_ok(r.param("transfer-syntax"), little_endian))
                .then_some(Packaging::SinglePart)
        }
    });
    match packaging {
        Some(Packaging::Multipart) => Ok(octet_parts(octets, little_endian, vec![bytes])),
        Some(Packaging::SinglePart) => Ok(single_part(octets, little_endian, bytes)),
        None => Err(Error::NotAcceptable(
            "bulk data is served as multipart/related; type=\"application/octet-stream\", or as application/octet-stream".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Part-10 object of three 2x2 8-bit frames: 1s, 2s and 3s.
    fn three_frames() -> Vec<u8> {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
        let mut obj = InMemDicomObject::new_empty();
        let put = |obj: &mut InMemDicomObject, tag, vr, v: PrimitiveValue| {
            obj.put(DataElement::new(tag, vr, v));
        };
        put(
            &mut obj,
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.7.2".into(),
        );
        put(&mut obj, tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4".into());
        put(
            &mut obj,
            tags::SAMPLES_PER_PIXEL,
            VR::US,
            PrimitiveValue::from(1u16),
        );
        put(&mut obj, tags::NUMBER_OF_FRAMES, VR::IS, "3".into());
        put(&mut obj, tags::ROWS, VR::US, PrimitiveValue::from(2u16));
        put(&mut obj, tags::COLUMNS, VR::US, PrimitiveValue::from(2u16));
        put(
            &mut obj,
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(8u16),
        );
        let pixels: Vec<u8> = [1u8, 2, 3].iter().flat_map(|v| [*v; 4]).collect();
        put(
            &mut obj,
            tags::PIXEL_DATA,
            VR::OB,
            PrimitiveValue::from(pixels),
        );
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.7.2")
                    .media_storage_sop_instance_uid("1.2.3.4"),
            )
            .unwrap();
        let mut out = Vec::new();
        file.write_all(&mut out).unwrap();
        out
    }

    #[test]
    fn native_frames_are_read_without_the_rest() {
        let bytes = three_frames();
        let read = |numbers: &[usize]| {
            read_native_frames(
                Box::new(io::Cursor::new(bytes.clone())),
                "1.2.840.10008.1.2.1",
                numbers,
            )
        };
        assert_eq!(
            read(&[3, 1]).unwrap().unwrap(),
            vec![vec![3u8; 4], vec![1u8; 4]]
        );
        assert_eq!(
            read(&[2, 3, 1]).unwrap().unwrap(),
            vec![vec![2u8; 4], vec![3u8; 4], vec![1u8; 4]]
        );
        assert_eq!(read(&[4]).unwrap_err().status().as_u16(), 404);
    }

    #[test]
    fn retrieve_negotiation() {
        let explicit = "1.2.840.10008.1.2.1";
        let implicit = "1.2.840.10008.1.2";
        let j2k = "1.2.840.10008.1.2.4.90";
        let jpeg = "1.2.840.10008.1.2.4.50";
        let dicom = "multipart/related; type=\"application/dicom\"";
        let with_ts = |ts: &str| format!("{dicom}; transfer-syntax={ts}");
        let cases: Vec<(String, Vec<&str>, Option<Wanted>)> = vec![
            ("*/*".into(), vec![explicit], Some(Wanted::Default)),
            (dicom.into(), vec![jpeg], Some(Wanted::Default)),
            (with_ts("*"), vec![j2k], Some(Wanted::AsStored)),
            (
                with_ts(explicit),
                vec![explicit],
                Some(Wanted::Syntax(explicit.into())),
            ),
            // Converted: implicit to explicit, JPEG baseline decoded.
            (
                with_ts(explicit),
                vec![implicit, jpeg],
                Some(Wanted::Syntax(explicit.into())),
            ),
            // JPEG 2000 cannot be decoded; nothing is encoded to JPEG.
            (with_ts(explicit), vec![j2k], None),
            (with_ts(jpeg), vec![explicit], None),
            (with_ts(jpeg), vec![jpeg], Some(Wanted::Syntax(jpeg.into()))),
            (
                "multipart/related; type=\"application/octet-stream\"".into(),
                vec![explicit],
                None,
            ),
            ("application/dicom+json".into(), vec![explicit], None),
        ];
        for (accept, stored, want) in cases {
            let mut headers = HeaderMap::new();
            headers.insert(header::ACCEPT, HeaderValue::from_str(&accept).unwrap());
            // As multipart parts, whether or not a single part may be.
            let want = want.map(|w| (w, Packaging::Multipart));
            assert_eq!(
                wanted(&headers, &stored, false),
                want,
                "{accept} {stored:?}"
            );
            assert_eq!(wanted(&headers, &stored, true), want, "{accept} {stored:?}");
        }
        // `application/dicom` itself: the whole body, for one instance only.
        let mut single = HeaderMap::new();
        single.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/dicom"),
        );
        assert_eq!(
            wanted(&single, &[jpeg], true),
            Some((Wanted::Default, Packaging::SinglePart))
        );
        assert_eq!(wanted(&single, &[jpeg], false), None);
        assert_eq!(Wanted::Default.target(implicit).as_deref(), Some(explicit));
        assert_eq!(Wanted::Default.target(explicit), None);
        assert_eq!(Wanted::Default.target(j2k), None);
        assert_eq!(Wanted::AsStored.target(jpeg), None);
        assert_eq!(frame_list("1,3").unwrap(), vec![1, 3]);
        assert!(frame_list("0").is_err());
        assert!(frame_list("a").is_err());
        assert!(frame_list("1,2,1").is_err(), "a repeated frame");
        assert!(frame_list("18446744073709551615").is_err());
        assert_eq!(
            frame_media_type("1.2.840.10008.1.2.4.50"),
            Some("image/jpeg")
        );
        let range = MediaType::parse("multipart/related; type=\"*/*\"").unwrap();
        assert!(accepts_part(&range, "image/jpeg", "1.2.840.10008.1.2.4.50"));
        let range =
            MediaType::parse("multipart/related; type=\"application/octet-stream\"").unwrap();
        assert!(!accepts_part(
            &range,
            "image/jpeg",
            "1.2.840.10008.1.2.4.50"
        ));
    }
}
