//! The classification table: study headers written the way Chinese
//! hospitals' CT, MR, DR/CR, mammography, ultrasound, PET-CT and DSA
//! equipment writes them (tests/data/recognition-headers.jsonl, one study a
//! row), made into Part-10 files here (raw bytes: GB18030, GBK, ISO 2022 IR
//! 58, GBK under a wrong or missing Specific Character Set) and classified
//! by the real binary, `huren recognition classify`, with the SHIPPED list
//! (deploy/recognition/jiangsu-example.toml): the path a stored study takes.
//!
//! A row gives the expected items with their confidence, or none. Scoring
//! (docs/recognition.md, "The classification table"):
//! - a **false recognition** is a `certain` item that no expected `certain`
//!   item satisfies (same item or one it `satisfies`, same side or an
//!   expected "both"): a warning the images do not support. There must be
//!   none.
//! - a row is **correct** when the items are exactly the expected ones:
//!   code and confidence, and the side of a `certain` item;
//! - anything else is a **miss** (an item not found, or found only as
//!   `needs_confirmation`, or an extra `needs_confirmation` item).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::Tag;
use dicom_dictionary_std::{tags, uids};
use huren::recognition::list::RecognitionList;
use serde_json::Value;

use crate::support::repo_path;

/// The share of rows that must be classified exactly as expected.
const CORRECT_BAR: f64 = 0.95;

struct Writer {
    charset: String,
}

impl Writer {
    /// Bytes of a text value in the row's character set: the raw bytes a
    /// modality writes, not what it declares.
    fn text(&self, s: &str) -> Vec<u8> {
        let gbk = |s: &str| encoding_rs::GBK.encode(s).0.into_owned();
        match self.charset.as_str() {
            "GB18030" => encoding_rs::GB18030.encode(s).0.into_owned(),
            "GBK" | "" | "ISO_IR 100+GBK" | "ISO_IR 192+GBK" => gbk(s),
            // ISO 2022: G1 designated to GB 2312 at the start of a value
            // that needs it (PS3.5 6.1.2.5.3).
            "\\ISO 2022 IR 58" => {
                if s.is_ascii() {
                    s.as_bytes().to_vec()
                } else {
                    let mut v = b"\x1b$)A".to_vec();
                    v.extend(gbk(s));
                    v
                }
            }
            _ => s.as_bytes().to_vec(),
        }
    }

    fn declared(&self) -> Option<&str> {
        match self.charset.as_str() {
            "" => None,
            "ISO_IR 100+GBK" => Some("ISO_IR 100"),
            "ISO_IR 192+GBK" => Some("ISO_IR 192"),
            other => Some(other),
        }
    }
}

/// One data element, explicit VR little endian.
fn element(tag: Tag, vr: &str, value: &[u8]) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == "UI" || vr == "OB" { 0 } else { b' ' });
    }
    let mut out = Vec::new();
    out.extend(tag.0.to_le_bytes());
    out.extend(tag.1.to_le_bytes());
    out.extend(vr.as_bytes());
    if matches!(vr, "OB" | "OW" | "SQ" | "UN" | "UT" | "UC" | "UR") {
        out.extend([0, 0]);
        out.extend((v.len() as u32).to_le_bytes());
    } else {
        out.extend((v.len() as u16).to_le_bytes());
    }
    out.extend(v);
    out
}

/// A sequence of items, each a sorted list of encoded elements.
fn sequence(tag: Tag, items: &[Vec<(Tag, Vec<u8>)>]) -> Vec<u8> {
    let mut body = Vec::new();
    for item in items {
        let mut item = item.clone();
        item.sort_by_key(|(t, _)| *t);
        let content: Vec<u8> = item.into_iter().flat_map(|(_, b)| b).collect();
        body.extend(0xFFFEu16.to_le_bytes());
        body.extend(0xE000u16.to_le_bytes());
        body.extend((content.len() as u32).to_le_bytes());
        body.extend(content);
    }
    let mut out = Vec::new();
    out.extend(tag.0.to_le_bytes());
    out.extend(tag.1.to_le_bytes());
    out.extend(b"SQ\0\0");
    out.extend((body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// (CodeValue, CodingSchemeDesignator, CodeMeaning) items.
fn code_items(w: &Writer, codes: &Value) -> Vec<Vec<(Tag, Vec<u8>)>> {
    codes
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let c = c.as_array().unwrap();
            let s = |i: usize| c[i].as_str().unwrap();
            let mut item = vec![(
                tags::CODE_VALUE,
                element(tags::CODE_VALUE, "SH", &w.text(s(0))),
            )];
            if !s(1).is_empty() {
                item.push((
                    tags::CODING_SCHEME_DESIGNATOR,
                    element(tags::CODING_SCHEME_DESIGNATOR, "SH", s(1).as_bytes()),
                ));
            }
            if !s(2).is_empty() {
                item.push((
                    tags::CODE_MEANING,
                    element(tags::CODE_MEANING, "LO", &w.text(s(2))),
                ));
            }
            item
        })
        .collect()
}

/// The default SOP Class of a row's modality (a row may name another).
fn sop_class(modality: &str) -> &'static str {
    match modality {
        "CT" => uids::CT_IMAGE_STORAGE,
        "MR" => uids::MR_IMAGE_STORAGE,
        "DX" => uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        "CR" => uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
        "MG" => uids::DIGITAL_MAMMOGRAPHY_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        "US" => uids::ULTRASOUND_IMAGE_STORAGE,
        "PT" => uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE,
        "NM" => uids::NUCLEAR_MEDICINE_IMAGE_STORAGE,
        "XA" => uids::X_RAY_ANGIOGRAPHIC_IMAGE_STORAGE,
        "SR" => uids::ENHANCED_SR_STORAGE,
        "PR" => uids::GRAYSCALE_SOFTCOPY_PRESENTATION_STATE_STORAGE,
        "KO" => uids::KEY_OBJECT_SELECTION_DOCUMENT_STORAGE,
        "DOC" => uids::ENCAPSULATED_PDF_STORAGE,
        _ => uids::SECONDARY_CAPTURE_IMAGE_STORAGE,
    }
}

fn uid(parts: &[&str]) -> String {
    let h = blake3::hash(parts.join("/").as_bytes());
    let n = u128::from_be_bytes(h.as_bytes()[..16].try_into().unwrap());
    format!("2.25.{n}")
}

/// Writes one row's study; returns its Study Instance UID.
fn write_study(row: &Value, dir: &Path) -> String {
    let id = row["id"].as_str().unwrap();
    let w = Writer {
        charset: row["charset"].as_str().unwrap_or("ISO_IR 192").to_string(),
    };
    let study_uid = uid(&[id, "study"]);
    let study = &row["study"];
    let study_dir = dir.join(id);
    for (s, series) in row["series"].as_array().unwrap().iter().enumerate() {
        let series_uid = uid(&[id, "series", &s.to_string()]);
        let modality = series["Modality"].as_str().unwrap();
        let sop_class = series["SOPClassUID"]
            .as_str()
            .unwrap_or_else(|| sop_class(modality));
        let instances: Vec<Value> = match series.get("instances") {
            Some(v) => v.as_array().unwrap().clone(),
            None => vec![Value::Object(Default::default()); series["n"].as_u64().unwrap() as usize],
        };
        let series_dir = study_dir.join(format!("{s:02}"));
        std::fs::create_dir_all(&series_dir).unwrap();
        for (i, inst) in instances.iter().enumerate() {
            let sop_uid = uid(&[id, "instance", &s.to_string(), &i.to_string()]);
            let mut e: Vec<(Tag, Vec<u8>)> = Vec::new();
            let text = |tag: Tag, vr: &str, v: &str, e: &mut Vec<(Tag, Vec<u8>)>| {
                e.push((tag, element(tag, vr, &w.text(v))));
            };
            if let Some(cs) = w.declared() {
                text(tags::SPECIFIC_CHARACTER_SET, "CS", cs, &mut e);
            }
            text(tags::SOP_CLASS_UID, "UI", sop_class, &mut e);
            text(tags::SOP_INSTANCE_UID, "UI", &sop_uid, &mut e);
            text(tags::STUDY_DATE, "DA", "20260105", &mut e);
            text(tags::MODALITY, "CS", modality, &mut e);
            text(
                tags::MANUFACTURER,
                "LO",
                row["vendor"].as_str().unwrap_or(""),
                &mut e,
            );
            text(tags::PATIENT_NAME, "PN", "Test^Table", &mut e);
            text(tags::PATIENT_ID, "LO", &format!("TBL-{id}"), &mut e);
            text(tags::STUDY_INSTANCE_UID, "UI", &study_uid, &mut e);
            text(tags::SERIES_INSTANCE_UID, "UI", &series_uid, &mut e);
            text(tags::SERIES_NUMBER, "IS", &(s + 1).to_string(), &mut e);
            text(tags::INSTANCE_NUMBER, "IS", &(i + 1).to_string(), &mut e);
            for (key, tag, vr) in [
                ("StudyDescription", tags::STUDY_DESCRIPTION, "LO"),
                (
                    "RequestedProcedureDescription",
                    tags::REQUESTED_PROCEDURE_DESCRIPTION,
                    "LO",
                ),
            ] {
                if let Some(v) = study[key].as_str() {
                    text(tag, vr, v, &mut e);
                }
            }
            for (key, tag) in [
                ("ProcedureCodeSequence", tags::PROCEDURE_CODE_SEQUENCE),
                (
                    "RequestedProcedureCodeSequence",
                    tags::REQUESTED_PROCEDURE_CODE_SEQUENCE,
                ),
            ] {
                if let Some(c) = study.get(key) {
                    e.push((tag, sequence(tag, &code_items(&w, c))));
                }
            }
            if let Some(c) = study.get("RequestAttributesSequence") {
                let inner = sequence(tags::SCHEDULED_PROTOCOL_CODE_SEQUENCE, &code_items(&w, c));
                e.push((
                    tags::REQUEST_ATTRIBUTES_SEQUENCE,
                    sequence(
                        tags::REQUEST_ATTRIBUTES_SEQUENCE,
                        &[vec![(tags::SCHEDULED_PROTOCOL_CODE_SEQUENCE, inner)]],
                    ),
                ));
            }
            // Series attributes, then the instance's own (which win).
            let mut attrs: BTreeMap<String, Value> = series
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| {
                    !matches!(k.as_str(), "Modality" | "SOPClassUID" | "n" | "instances")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (k, v) in inst.as_object().unwrap() {
                attrs.insert(k.clone(), v.clone());
            }
            for (key, v) in &attrs {
                let simple = |tag: Tag, vr: &'static str| Some((tag, vr));
                let t = match key.as_str() {
                    "BodyPartExamined" => simple(tags::BODY_PART_EXAMINED, "CS"),
                    "SeriesDescription" => simple(tags::SERIES_DESCRIPTION, "LO"),
                    "ProtocolName" => simple(tags::PROTOCOL_NAME, "LO"),
                    "ImageType" => simple(tags::IMAGE_TYPE, "CS"),
                    "ContrastBolusAgent" => simple(tags::CONTRAST_BOLUS_AGENT, "LO"),
                    "ContrastBolusRoute" => simple(tags::CONTRAST_BOLUS_ROUTE, "LO"),
                    "Laterality" => simple(tags::LATERALITY, "CS"),
                    "ImageLaterality" => simple(tags::IMAGE_LATERALITY, "CS"),
                    "ViewPosition" => simple(tags::VIEW_POSITION, "CS"),
                    "NumberOfFrames" => simple(tags::NUMBER_OF_FRAMES, "IS"),
                    "PatientAge" => simple(tags::PATIENT_AGE, "AS"),
                    "PatientSex" => simple(tags::PATIENT_SEX, "CS"),
                    _ => None,
                };
                if let Some((tag, vr)) = t {
                    text(tag, vr, v.as_str().unwrap(), &mut e);
                    continue;
                }
                match key.as_str() {
                    "ContrastBolusAgentSequence" => {
                        let item = vec![
                            (
                                tags::CODE_VALUE,
                                element(tags::CODE_VALUE, "SH", b"C-B0322"),
                            ),
                            (
                                tags::CODING_SCHEME_DESIGNATOR,
                                element(tags::CODING_SCHEME_DESIGNATOR, "SH", b"SRT"),
                            ),
                            (
                                tags::CODE_MEANING,
                                element(tags::CODE_MEANING, "LO", b"Iohexol"),
                            ),
                        ];
                        e.push((
                            tags::CONTRAST_BOLUS_AGENT_SEQUENCE,
                            sequence(tags::CONTRAST_BOLUS_AGENT_SEQUENCE, &[item]),
                        ));
                    }
                    "PerformedProtocolCodeSequence" => e.push((
                        tags::PERFORMED_PROTOCOL_CODE_SEQUENCE,
                        sequence(tags::PERFORMED_PROTOCOL_CODE_SEQUENCE, &code_items(&w, v)),
                    )),
                    "ViewCodeSequence" => {
                        let one = Value::Array(vec![v.clone()]);
                        e.push((
                            tags::VIEW_CODE_SEQUENCE,
                            sequence(tags::VIEW_CODE_SEQUENCE, &code_items(&w, &one)),
                        ));
                    }
                    other => panic!("{id}: attribute {other} is not written by this test"),
                }
            }
            e.sort_by_key(|(t, _)| *t);
            let data: Vec<u8> = e.into_iter().flat_map(|(_, b)| b).collect();
            let mut meta = Vec::new();
            meta.extend(element(tags::FILE_META_INFORMATION_VERSION, "OB", &[0, 1]));
            meta.extend(element(
                tags::MEDIA_STORAGE_SOP_CLASS_UID,
                "UI",
                sop_class.as_bytes(),
            ));
            meta.extend(element(
                tags::MEDIA_STORAGE_SOP_INSTANCE_UID,
                "UI",
                sop_uid.as_bytes(),
            ));
            meta.extend(element(
                tags::TRANSFER_SYNTAX_UID,
                "UI",
                uids::EXPLICIT_VR_LITTLE_ENDIAN.as_bytes(),
            ));
            meta.extend(element(
                tags::IMPLEMENTATION_CLASS_UID,
                "UI",
                b"1.2.826.0.1.3680043.10.1501",
            ));
            let mut file = vec![0u8; 128];
            file.extend(b"DICM");
            file.extend(element(
                tags::FILE_META_INFORMATION_GROUP_LENGTH,
                "UL",
                &(meta.len() as u32).to_le_bytes(),
            ));
            file.extend(meta);
            file.extend(data);
            std::fs::write(series_dir.join(format!("{:03}.dcm", i + 1)), file).unwrap();
        }
    }
    study_uid
}

#[derive(Debug, Clone, PartialEq)]
struct Got {
    code: String,
    confidence: String,
    laterality: Option<String>,
}

fn laterality_ok(
    list: &RecognitionList,
    code: &str,
    want: Option<&str>,
    got: Option<&str>,
) -> bool {
    let needs_side = list
        .item(code)
        .is_some_and(|i| i.laterality == huren::recognition::list::LateralityRule::Required);
    !needs_side || want == got || (want == Some("B") && got.is_some())
}

/// Runs the table; returns the report (one line per class and the
/// failures) and the totals (rows, correct, false recognitions).
fn run_table() -> (String, usize, usize, usize) {
    let text = std::fs::read_to_string(repo_path("tests/data/recognition-headers.jsonl")).unwrap();
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let list_path = repo_path("deploy/recognition/jiangsu-example.toml");
    let list = huren::recognition::load(&list_path).unwrap();
    let work = tempfile::tempdir().unwrap();
    // Rows grouped by the hospital whose code tables apply (one run each).
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        groups
            .entry(r["hospital"].as_str().unwrap_or("").to_string())
            .or_default()
            .push(i);
    }
    let mut by_uid: BTreeMap<String, usize> = BTreeMap::new();
    let mut answers: BTreeMap<usize, Value> = BTreeMap::new();
    for (g, (hospital, members)) in groups.iter().enumerate() {
        let dir: PathBuf = work.path().join(format!("h{g}"));
        for &i in members {
            by_uid.insert(write_study(&rows[i], &dir), i);
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_huren"));
        cmd.args(["recognition", "classify", "--list"])
            .arg(&list_path);
        if !hospital.is_empty() {
            cmd.args(["--hospital-id", hospital]);
        }
        let out = cmd.arg(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "huren recognition classify: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let uid = v["study_instance_uid"]
                .as_str()
                .unwrap_or_else(|| panic!("not a study: {line}"));
            answers.insert(by_uid[uid], v);
        }
    }
    #[derive(Default)]
    struct Tally {
        rows: usize,
        correct: usize,
        false_recognitions: usize,
        misses: usize,
    }
    let mut tally: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let id = row["id"].as_str().unwrap();
        let answer = answers
            .get(&i)
            .unwrap_or_else(|| panic!("{id}: no answer from classify"));
        let got: Vec<Got> = answer["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|it| Got {
                code: it["code"].as_str().unwrap().to_string(),
                // The classifier before confidence existed: all certain.
                confidence: it["confidence"].as_str().unwrap_or("certain").to_string(),
                laterality: it["laterality"].as_str().map(|l| match l {
                    "left" => "L".to_string(),
                    "right" => "R".to_string(),
                    "both" => "B".to_string(),
                    other => other.to_string(),
                }),
            })
            .collect();
        let want: Vec<Got> = row["expect"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| Got {
                code: e["item"].as_str().unwrap().to_string(),
                confidence: e["confidence"].as_str().unwrap().to_string(),
                laterality: e["laterality"].as_str().map(str::to_string),
            })
            .collect();
        let false_items: Vec<&Got> = got
            .iter()
            .filter(|g| g.confidence == "certain")
            .filter(|g| {
                !want.iter().any(|w| {
                    w.confidence == "certain"
                        && list.satisfies(&w.code, &g.code)
                        && laterality_ok(
                            &list,
                            &g.code,
                            w.laterality.as_deref(),
                            g.laterality.as_deref(),
                        )
                })
            })
            .collect();
        let matches = |w: &Got, g: &Got| {
            w.code == g.code
                && w.confidence == g.confidence
                && (w.confidence != "certain" || {
                    let needs_side = list.item(&w.code).is_some_and(|i| {
                        i.laterality == huren::recognition::list::LateralityRule::Required
                    });
                    !needs_side || w.laterality == g.laterality
                })
        };
        let exact =
            got.len() == want.len() && want.iter().all(|w| got.iter().any(|g| matches(w, g)));
        let t = tally
            .entry(row["class"].as_str().unwrap().to_string())
            .or_default();
        t.rows += 1;
        let show = |v: &[Got]| {
            v.iter()
                .map(|g| {
                    format!(
                        "{}{}({})",
                        g.code,
                        g.laterality
                            .as_deref()
                            .map(|l| format!(":{l}"))
                            .unwrap_or_default(),
                        g.confidence
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !false_items.is_empty() {
            t.false_recognitions += 1;
            failures.push(format!(
                "FALSE {id}: got [{}] want [{}] ({})",
                show(&got),
                show(&want),
                answer["unclassified"]
            ));
        } else if exact {
            t.correct += 1;
        } else {
            t.misses += 1;
            failures.push(format!(
                "miss  {id}: got [{}] want [{}] ({})",
                show(&got),
                show(&want),
                answer["unclassified"]
            ));
        }
    }
    let mut report = format!(
        "{:<16} {:>5} {:>8} {:>6} {:>7}\n",
        "class", "rows", "correct", "false", "misses"
    );
    let (mut n, mut c, mut f, mut m) = (0, 0, 0, 0);
    for (class, t) in &tally {
        report.push_str(&format!(
            "{class:<16} {:>5} {:>8} {:>6} {:>7}\n",
            t.rows, t.correct, t.false_recognitions, t.misses
        ));
        n += t.rows;
        c += t.correct;
        f += t.false_recognitions;
        m += t.misses;
    }
    report.push_str(&format!("{:<16} {n:>5} {c:>8} {f:>6} {m:>7}\n", "total"));
    report.push_str(&failures.join("\n"));
    (report, n, c, f)
}

#[test]
fn recognition_table() {
    let (report, rows, correct, false_recognitions) = run_table();
    println!("{report}");
    assert!(rows >= 300, "{rows} rows: the table needs at least 300");
    assert_eq!(
        false_recognitions, 0,
        "false recognitions (an item the images do not show):\n{report}"
    );
    assert!(
        correct as f64 >= CORRECT_BAR * rows as f64,
        "{correct} of {rows} correct, below {CORRECT_BAR}:\n{report}"
    );
}

/// `huren recognition classify --format text` for a person: per study,
/// each item with its name and confidence, the doubts of an unsure one,
/// and the evidence with the values read.
#[test]
fn classify_prints_items_confidence_and_evidence_as_text() {
    let text = std::fs::read_to_string(repo_path("tests/data/recognition-headers.jsonl")).unwrap();
    let row = |id: &str| -> Value {
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|r| r["id"] == id)
            .unwrap_or_else(|| panic!("row {id}"))
    };
    let work = tempfile::tempdir().unwrap();
    let certain = write_study(&row("base-ge-chest"), work.path());
    let unsure = write_study(&row("bp-chest-left-abd"), work.path());
    let out = Command::new(env!("CARGO_BIN_EXE_huren"))
        .args(["recognition", "classify", "--format", "text", "--list"])
        .arg(repo_path("deploy/recognition/jiangsu-example.toml"))
        .arg(work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    let study = |uid: &str| -> String {
        let start = printed
            .find(&format!("study {uid}\n"))
            .unwrap_or_else(|| panic!("no study {uid} in\n{printed}"));
        let rest = &printed[start + 1..];
        let end = rest.find("\nstudy ").map_or(rest.len(), |e| e + 1);
        printed[start..start + 1 + end].to_string()
    };
    let c = study(&certain);
    assert!(c.contains("  CT-0301-01 胸部CT平扫: certain"), "{c}");
    assert!(c.contains("    Modality = \"CT\""), "{c}");
    assert!(
        c.contains("    StudyDescription = \"CHEST ROUTINE\""),
        "{c}"
    );
    assert!(!c.contains("doubt:"), "{c}");
    let u = study(&unsure);
    assert!(u.contains("CT-0401-01"), "{u}");
    assert!(u.contains(": needs_confirmation"), "{u}");
    assert!(u.contains("    doubt: "), "{u}");
    assert!(
        u.contains("    doubt: body_part_examined_contradicts_description"),
        "{u}"
    );
    assert!(
        u.contains("    SeriesDescription = \"Abdomen  5.0  B30f\""),
        "{u}"
    );
}
