//! QIDO-RS (PS3.18 §10.6): searches over `crate::query`, the one matcher
//! C-FIND also uses. Query parameters become matching keys in DICOM
//! matching syntax; results stream out as a DICOM JSON array as the index
//! produces them.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query as UrlQuery, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::Response;
use dicom_core::Tag;
use dicom_dictionary_std::tags;
use serde_json::{Map, Value};

use super::json::{DICOM_JSON, attr, element_json, tag_key};
use super::{DicomwebState, base_url, media};
use crate::http::error::Error;
use crate::query::{self, Item, Level, Match, MatchOptions, Outcome, Query};

type Params = UrlQuery<Vec<(String, String)>>;
/// The peer grant the request was admitted under, if any.
type Grant = Option<axum::Extension<crate::http::GrantAccess>>;

/// The attributes each level returns without `includefield` (PS3.18
/// Tables 10.6.3-3 to -5, those the index keeps).
const STUDY_DEFAULTS: &[Tag] = &[
    tags::STUDY_DATE,
    tags::STUDY_TIME,
    tags::ACCESSION_NUMBER,
    tags::MODALITIES_IN_STUDY,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PATIENT_NAME,
    tags::PATIENT_ID,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::STUDY_INSTANCE_UID,
    tags::STUDY_ID,
    tags::NUMBER_OF_STUDY_RELATED_SERIES,
    tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
];
const SERIES_DEFAULTS: &[Tag] = &[
    tags::STUDY_INSTANCE_UID,
    tags::MODALITY,
    tags::SERIES_DESCRIPTION,
    tags::SERIES_NUMBER,
    tags::SERIES_INSTANCE_UID,
    tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
];
const INSTANCE_DEFAULTS: &[Tag] = &[
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_CLASS_UID,
    tags::SOP_INSTANCE_UID,
    tags::INSTANCE_NUMBER,
];

pub async fn studies(
    s: State<Arc<DicomwebState>>,
    g: Grant,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    search(s, g, h, p, Level::Study, None, None).await
}

pub async fn all_series(
    s: State<Arc<DicomwebState>>,
    g: Grant,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    search(s, g, h, p, Level::Series, None, None).await
}

pub async fn all_instances(
    s: State<Arc<DicomwebState>>,
    g: Grant,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    search(s, g, h, p, Level::Image, None, None).await
}

pub async fn study_series(
    s: State<Arc<DicomwebState>>,
    Path(study): Path<String>,
    g: Grant,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    search(s, g, h, p, Level::Series, Some(study), None).await
}

pub async fn study_instances(
    s: State<Arc<DicomwebState>>,
    Path(study): Path<String>,
    g: Grant,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    search(s, g, h, p, Level::Image, Some(study), None).await
}

pub async fn series_instances(
    s: State<Arc<DicomwebState>>,
    Path((study, series)): Path<(String, String)>,
    g: Grant,
    h: HeaderMap,
    p: Params,
) -> Result<Response, Error> {
    search(s, g, h, p, Level::Image, Some(study), Some(series)).await
}

/// A QIDO-RS request as the matcher's query.
pub fn build_query(
    node_options: MatchOptions,
    level: Level,
    study: Option<&str>,
    series: Option<&str>,
    params: &[(String, String)],
) -> Result<(Query, MatchOptions), Error> {
    let bad = |m: String| Error::BadRequest(m);
    let mut query = Query::new(level);
    let mut options = node_options;
    let mut keys_seen = std::collections::HashSet::new();
    let defaults = match level {
        Level::Patient | Level::Study => STUDY_DEFAULTS,
        Level::Series => SERIES_DEFAULTS,
        Level::Image => INSTANCE_DEFAULTS,
    };
    for tag in defaults {
        query.request(*tag);
    }
    // The identifiers the retrieve URLs are built from.
    query.request(tags::STUDY_INSTANCE_UID);
    if level >= Level::Series {
        query.request(tags::SERIES_INSTANCE_UID);
    }
    if level == Level::Image {
        query.request(tags::SOP_INSTANCE_UID);
    }
    if let Some(study) = study {
        crate::types::Uid::parse(study).map_err(|e| bad(format!("Study Instance UID: {e}")))?;
        query
            .add_key(tags::STUDY_INSTANCE_UID, study)
            .map_err(|e| bad(e.to_string()))?;
    }
    if let Some(series) = series {
        crate::types::Uid::parse(series).map_err(|e| bad(format!("Series Instance UID: {e}")))?;
        query
            .add_key(tags::SERIES_INSTANCE_UID, series)
            .map_err(|e| bad(e.to_string()))?;
    }
    for (name, value) in params {
        match name.as_str() {
            "limit" => query.set_limit(
                value
                    .parse()
                    .map_err(|_| bad(format!("limit={value}: not a number")))?,
            ),
            "offset" => query.set_offset(
                value
                    .parse()
                    .map_err(|_| bad(format!("offset={value}: not a number")))?,
            ),
            "fuzzymatching" => {
                options.fuzzy_names = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(bad(format!("fuzzymatching={value}: true or false"))),
                }
            }
            "includefield" => {
                for field in value.split(',').map(str::trim).filter(|f| !f.is_empty()) {
                    if field == "all" {
                        query.request_all();
                    } else {
                        let tag = query::tag_from_keyword_or_hex(field).ok_or_else(|| {
                            bad(format!("includefield={field}: unknown attribute"))
                        })?;
                        query.request(tag);
                    }
                }
            }
            // Parameters of other DICOMweb services that do not change a
            // search.
            "accept" | "charset" => {}
            key => {
                if key.contains('.') {
                    return Err(bad(format!("{key}: sequence matching is not supported")));
                }
                let tag = query::tag_from_keyword_or_hex(key)
                    .ok_or_else(|| bad(format!("{key}: unknown attribute or parameter")))?;
                // The path's UIDs are the search's scope (PS3.18 10.6.1):
                // a query key for the same attribute would replace it and
                // widen the search past what the path (and a grant, or a
                // token's scope) allows. Refused, whatever its value.
                let fixed_by_path = (tag == tags::STUDY_INSTANCE_UID && study.is_some())
                    || (tag == tags::SERIES_INSTANCE_UID && series.is_some());
                if fixed_by_path {
                    return Err(bad(format!(
                        "{key}: fixed by the request path; a query parameter may not change it"
                    )));
                }
                // One condition per attribute: a second would replace the
                // first, and a check that read the first (the scope of a
                // grant or a session) would not be the search that runs.
                if !keys_seen.insert(tag) {
                    return Err(bad(format!(
                        "{key}: the attribute is given more than once; give one value (a list is a\\b)"
                    )));
                }
                query.add_key(tag, value).map_err(|e| bad(e.to_string()))?;
            }
        }
    }
    Ok((query, options))
}

/// The one study a search is keyed on: the value of its only Study
/// Instance UID key, read as [`build_query`] reads keys (by keyword or by
/// tag, in either case), when that value is one UID (no wildcard, no list).
/// None when the key is absent, repeated, or not one UID: such a search
/// is not scoped to a study, and a grant or a page session, which admit
/// one study, may not run it.
pub fn keyed_study(params: &[(String, String)]) -> Option<&str> {
    let mut keyed = params
        .iter()
        .filter(|(k, _)| query::tag_from_keyword_or_hex(k) == Some(tags::STUDY_INSTANCE_UID))
        .map(|(_, v)| v.as_str());
    let one = keyed.next()?;
    if keyed.next().is_some() {
        return None;
    }
    crate::types::Uid::parse(one).ok().map(|_| one)
}

async fn search(
    State(state): State<Arc<DicomwebState>>,
    grant: Grant,
    headers: HeaderMap,
    UrlQuery(params): Params,
    level: Level,
    study: Option<String>,
    series: Option<String>,
) -> Result<Response, Error> {
    // A grant names one study: the search actually run must be scoped to
    // it (build_query refuses a query key that would replace the path's
    // Study Instance UID), whatever path the request came in on.
    // A search keyed on exactly the grant's study (`/studies?
    // StudyInstanceUID=…`, as a viewer searches for the study it opens) is
    // scoped to it as well: the key is one UID, matched exactly.
    let scoped = study.as_deref().or(match keyed_study(&params) {
        Some(one) if level != Level::Patient => Some(one),
        _ => None,
    });
    if let Some(axum::Extension(crate::http::GrantAccess(grant))) = &grant
        && scoped != Some(grant.study_instance_uid.as_str())
    {
        return Err(Error::Forbidden(
            "a grant admits searches within its own study only",
        ));
    }
    media::require_json(&headers)?;
    // A study still arriving from another hospital, which the viewer reads
    // while it arrives: the holding node answers the search within it.
    let searched = study
        .clone()
        .or_else(|| keyed_study(&params).map(str::to_string));
    if grant.is_none()
        && level != Level::Patient
        && let Some(searched) = searched
        && let Some(live) = super::live(&state, &searched)
    {
        // The holding node admits a grant's searches within its study: the
        // study goes in the path (a study search keeps it as its one key).
        let in_path: Vec<(String, String)> = params
            .iter()
            .filter(|(k, _)| k != "StudyInstanceUID" && k != "0020000D")
            .cloned()
            .collect();
        let (path, params) = match (level, &series) {
            (Level::Study, _) => ("/studies".to_string(), params),
            (Level::Series, _) => (format!("/studies/{searched}/series"), in_path),
            (_, Some(se)) => (
                format!("/studies/{searched}/series/{se}/instances"),
                in_path,
            ),
            (_, None) => (format!("/studies/{searched}/instances"), in_path),
        };
        return super::from_peer(&live, &path, &params, &headers).await;
    }
    let (query, options) = build_query(
        state.match_options,
        level,
        study.as_deref(),
        series.as_deref(),
        &params,
    )?;
    // Keys that take no part in matching (the index does not keep them)
    // are ignored; the answer says so (a Warning, RFC 9111 §5.5: 299), so
    // that a client that filtered on one knows it got everything. Named as
    // the request spelled them.
    let ignored: Vec<&str> = params
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| {
            query::tag_from_keyword_or_hex(k).is_some_and(|t| query.ignored_keys().contains(&t))
        })
        .collect();
    let warning = (!ignored.is_empty()).then(|| {
        HeaderValue::from_str(&format!(
            "299 huren \"The following query keys were ignored (not kept by the index, or of a level below the search): {}\"",
            ignored.join(", ")
        ))
        .ok()
    })
    .flatten();
    let requested: Vec<Tag> = params
        .iter()
        .filter(|(k, _)| k == "includefield")
        .flat_map(|(_, v)| {
            v.split(',')
                .map(str::trim)
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter_map(|f| query::tag_from_keyword_or_hex(&f))
        .collect();
    let base = base_url(&headers);
    let mut rx = query::run(state.ingest.index(), query, options);
    // A series still arriving from another hospital is not shown yet
    // (crate::peer::incomplete_series): its matches are left out.
    let searched_study = study.clone().or_else(|| {
        params
            .iter()
            .find(|(k, _)| k == "StudyInstanceUID" || k == "0020000D")
            .map(|(_, v)| v.clone())
    });
    let hidden = match (&state.region, searched_study) {
        (Some(region), Some(study)) => crate::peer::incomplete_series(region, &study),
        _ => Vec::new(),
    };
    if !hidden.is_empty() && level != Level::Study && level != Level::Patient {
        let (tx, filtered) = tokio::sync::mpsc::channel(32);
        tokio::spawn(async move {
            while let Some(item) = rx.recv().await {
                if let Item::Match(m) = &item
                    && hidden
                        .iter()
                        .any(|s| s == m.first(tags::SERIES_INSTANCE_UID))
                {
                    continue;
                }
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        rx = filtered;
    }

    // The first item decides the status: a failure before any match is a
    // 503; no match is 200 with an empty array. PS3.18 once said 204 (no
    // body) and now says 200 (8.3.4.4): clients written to either read an
    // empty array, while some (Orthanc's DICOMweb plugin) fail on a 204.
    let first = match rx.recv().await {
        Some(Item::Match(m)) => m,
        Some(Item::End(Outcome::Failed(e))) => {
            return Err(Error::Unavailable(format!("query: {e}")));
        }
        Some(Item::End(_)) | None => return Ok(json_array_response("[]".into(), warning)),
    };
    let first_json = match_json(&first, level, &base, &requested);
    let stream = futures::stream::unfold(
        (rx, Some(first_json), false),
        move |(mut rx, pending, done)| {
            let base = base.clone();
            let requested = requested.clone();
            async move {
                if done {
                    return None;
                }
                if let Some(first) = pending {
                    let chunk = format!("[{first}");
                    return Some((Ok::<_, std::io::Error>(chunk), (rx, None, false)));
                }
                match rx.recv().await {
                    Some(Item::Match(m)) => {
                        let chunk = format!(",{}", match_json(&m, level, &base, &requested));
                        Some((Ok(chunk), (rx, None, false)))
                    }
                    Some(Item::End(Outcome::Failed(e))) => {
                        // Headers are sent: the only honest signal left is
                        // to cut the body (the client sees invalid JSON).
                        tracing::error!(error = %e, "QIDO-RS query failed mid-stream");
                        Some((Err(std::io::Error::other("query failed")), (rx, None, true)))
                    }
                    Some(Item::End(_)) | None => Some((Ok("]".to_string()), (rx, None, true))),
                }
            }
        },
    );
    Ok(json_array_response(Body::from_stream(stream), warning))
}

/// A DICOM JSON array answer, with the Warning of keys set aside.
fn json_array_response(body: Body, warning: Option<HeaderValue>) -> Response {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON));
    if let Some(w) = warning {
        response.headers_mut().insert(header::WARNING, w);
    }
    response
}

/// One match in the DICOM JSON model, with its retrieve URL and any
/// requested attribute the index does not keep (empty).
fn match_json(m: &Match, level: Level, base: &str, requested: &[Tag]) -> Value {
    // Tag order (PS3.18 F.2.1 lists attributes in ascending tag order).
    let mut map = std::collections::BTreeMap::new();
    for e in &m.elements {
        map.insert(tag_key(e.tag), element_json(e.vr, &e.values));
    }
    for tag in requested {
        let key = tag_key(*tag);
        map.entry(key).or_insert_with(|| {
            let vr = dicom_core::dictionary::DataDictionary::by_tag(
                &dicom_dictionary_std::StandardDataDictionary,
                *tag,
            )
            .map(|e| dicom_core::dictionary::DataDictionaryEntry::vr(e).relaxed())
            .unwrap_or(dicom_core::VR::UN);
            attr(vr.to_string(), vec![])
        });
    }
    let study = m.first(tags::STUDY_INSTANCE_UID);
    let url = match level {
        Level::Patient | Level::Study => format!("{base}/studies/{study}"),
        Level::Series => format!(
            "{base}/studies/{study}/series/{}",
            m.first(tags::SERIES_INSTANCE_UID)
        ),
        Level::Image => format!(
            "{base}/studies/{study}/series/{}/instances/{}",
            m.first(tags::SERIES_INSTANCE_UID),
            m.first(tags::SOP_INSTANCE_UID)
        ),
    };
    map.insert(
        tag_key(tags::RETRIEVE_URL),
        attr("UR", vec![Value::from(url)]),
    );
    Value::Object(map.into_iter().collect::<Map<String, Value>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters() {
        let ok = [
            p(&[("PatientName", "Zhang*"), ("limit", "10"), ("offset", "5")]),
            p(&[("00100020", "HUR-1"), ("includefield", "all")]),
            p(&[
                ("StudyDate", "20240101-20241231"),
                ("fuzzymatching", "true"),
            ]),
            p(&[("includefield", "PatientAge,00081030")]),
            p(&[("ModalitiesInStudy", "CT\\MR")]),
        ];
        for params in ok {
            assert!(
                build_query(MatchOptions::default(), Level::Study, None, None, &params).is_ok(),
                "{params:?}"
            );
        }
        let bad = [
            p(&[("limit", "ten")]),
            p(&[("NoSuchAttribute", "x")]),
            p(&[("includefield", "NoSuchAttribute")]),
            p(&[("fuzzymatching", "maybe")]),
            p(&[("ReferencedStudySequence.ReferencedSOPInstanceUID", "1.2")]),
            p(&[("StudyInstanceUID", "1.2.*")]),
            p(&[("StudyDate", "yesterday")]),
        ];
        for params in bad {
            let e = build_query(MatchOptions::default(), Level::Study, None, None, &params)
                .unwrap_err();
            assert_eq!(
                e.status(),
                axum::http::StatusCode::BAD_REQUEST,
                "{params:?}"
            );
        }
        assert!(
            build_query(
                MatchOptions::default(),
                Level::Series,
                Some("not a uid"),
                None,
                &[]
            )
            .is_err()
        );
    }
}
