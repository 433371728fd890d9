//! From a DICOM study's attributes to the recognition items it is, each with
//! the evidence it rests on and a confidence. Pure code: no I/O,
//! table-tested.
//!
//! A false recognition (an item the images do not show) is the worst error:
//! the doctor skips an exam that was never done (recognition-facts.md, "Rules
//! huren keeps"). So every item is `certain` only when its sources agree, and
//! `needs_confirmation` (shown as information, never a warning) when they
//! disagree or say too little; where sources contradict each other the
//! classifier claims less, never the coarser or the attribute's guess.
//!
//! How (docs/recognition.md, "Classification"):
//! 1. **Series first.** Each diagnostic series (localizers, calibration
//!    scans, dose reports, secondary captures, PR/KO/SR/PDF, request forms
//!    and CAD results are not) gets its body parts from its
//!    SeriesDescription/ProtocolName and BodyPartExamined, checked against
//!    the study's descriptions (StudyDescription, RequestedProcedure-
//!    Description, the code meanings): a description naming a finer part
//!    than BodyPartExamined wins (HEAD → sinus), a group stands for its
//!    members (全腹 → abdomen + pelvis), a contradiction is doubt. Radiograph
//!    and mammography series are read per instance (body part, side, view).
//! 2. **Compose the study**: series of one modality family and body part
//!    make one item: contrast from the series (ContrastBolus* attributes and
//!    words; "no contrast" values and oral agents are not 增强), angiography
//!    series apart (a CTA with its plain head is two items), sides from
//!    Laterality, ImageLaterality and the descriptions, views per region.
//! 3. **Codes** through the list's code tables (scheme + hospital) agree
//!    with the images (certain), say less than them (the lesser item), or
//!    disagree (needs_confirmation); they never overrule the images.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::list::{Item, ItemContrast, LateralityRule, Projection, RecognitionList};
use crate::contract::Laterality;

/// A coded entry: ProcedureCodeSequence and the like.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Code {
    pub value: String,
    /// CodingSchemeDesignator: without it a code means nothing.
    pub scheme: String,
    pub meaning: String,
}

/// What one instance says for itself (radiographs and mammograms carry
/// side, view and even body part per image).
#[derive(Debug, Clone, Default)]
pub struct InstanceAttributes {
    pub sop_instance_uid: String,
    /// This instance's BodyPartExamined where it has one (a DR series may
    /// hold a chest and an abdomen image); empty: the series' value.
    pub body_part_examined: String,
    pub image_laterality: String,
    pub view_position: String,
    /// View Code Sequence: the code meaning, else the code value.
    pub view_code: String,
}

/// The attributes of one series (those of its first instance), with the
/// instances read.
#[derive(Debug, Clone, Default)]
pub struct SeriesAttributes {
    pub series_instance_uid: String,
    pub modality: String,
    pub sop_class_uid: String,
    pub body_part_examined: String,
    pub series_description: String,
    pub protocol_name: String,
    pub image_type: String,
    /// ContrastBolusAgent as written ("NONE", "无" and the like are read
    /// with the list's vocabulary).
    pub contrast_agent: String,
    /// ContrastBolusAgentSequence has an item.
    pub contrast_agent_sequence: bool,
    pub contrast_route: String,
    /// ContrastBolusIngredient or ContrastBolusVolume (above 0) recorded,
    /// or an intravenous ContrastBolusRoute: whether or not an agent is
    /// named.
    pub contrast_bolus_recorded: bool,
    /// Laterality (0020,0060), series level.
    pub laterality: String,
    /// PerformedProtocolCodeSequence.
    pub codes: Vec<Code>,
    /// Images in the series: instances times their frames (an enhanced
    /// multi-frame CT is one instance); 0 when not known (counted as
    /// enough).
    pub images: u32,
    /// Every instance of a radiograph or mammography series; for other
    /// series the first (its ImageLaterality). Empty is one instance with
    /// no attributes of its own.
    pub instances: Vec<InstanceAttributes>,
}

#[derive(Debug, Clone, Default)]
pub struct StudyAttributes {
    pub study_description: String,
    pub requested_procedure_description: String,
    /// ProcedureCodeSequence, RequestedProcedureCodeSequence and
    /// RequestAttributesSequence / ScheduledProtocolCodeSequence.
    pub codes: Vec<Code>,
    pub series: Vec<SeriesAttributes>,
    /// The hospital whose code tables apply.
    pub hospital_id: Option<String>,
    /// The patient's age in whole years at the study (PatientAge, else
    /// PatientBirthDate and StudyDate); `None` when not known.
    pub patient_age_years: Option<u32>,
    /// PatientSex as written (M, F, O or empty).
    pub patient_sex: String,
}

/// Below this age a radiograph's 正位 is not taken PA by convention: small
/// children are imaged AP, lying or held.
const CHILD_YEARS: u32 = 6;

/// Whether an item may produce a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Confidence {
    /// Every source agrees: may produce a warning.
    Certain,
    /// Sources disagree or say too little: shown as information only, until
    /// the hospital that did the exam confirms it.
    NeedsConfirmation,
}

/// One source an item rests on: an attribute (or a code table) and the
/// value that counted, in which series and instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evidence {
    /// A DICOM keyword (BodyPartExamined, SeriesDescription, ViewPosition,
    /// ContrastBolusAgent, ...), or `code table <name>`.
    pub attribute: String,
    pub value: String,
    /// Series Instance UIDs (none: a study-level attribute).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub series: Vec<String>,
    /// SOP Instance UIDs, for attributes read per instance.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<String>,
}

/// One item a study is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classified {
    pub code: String,
    pub confidence: Confidence,
    pub laterality: Option<Laterality>,
    /// Radiographs: the projections the region's images have.
    pub views: Vec<Projection>,
    pub contrast: ItemContrast,
    /// Why the item needs confirmation (empty when certain).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub doubts: Vec<String>,
    pub evidence: Vec<Evidence>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub items: Vec<Classified>,
    /// Why no item, when `items` is empty.
    pub unclassified: Option<String>,
}

/// Modalities that are not images of the exam: structured reports (dose
/// reports, CAD results among them), presentation states, key objects,
/// encapsulated documents.
const NOT_IMAGE_MODALITIES: &[&str] = &["SR", "PR", "KO", "DOC", "REG", "SEG", "RWV", "OT"];

/// SOP Class UID prefixes that are never the acquisition: structured
/// reports (PS3.4 Annex O), secondary capture (report pages, screen saves,
/// scanned request forms: PS3.3 A.8), encapsulated documents (PS3.3 A.45),
/// presentation states (PS3.4 Annex N).
const NOT_IMAGE_SOP_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.88",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.104",
    "1.2.840.10008.5.1.4.1.1.11",
];

/// Images for processing (PS3.3 A.26, A.27, A.28: the detector's raw
/// data, PresentationIntentType FOR PROCESSING): not meant to be read, so
/// never the exam, however complete the views.
const FOR_PROCESSING_SOP_CLASSES: &[&str] = &[
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.3.1",
];

/// Words that say, in any region's headers, that a contrast agent was (or
/// may have been) given, whatever the list's vocabulary holds: abbreviations
/// too short or too loose to be the list's `enhanced` words. A CT or MR
/// series whose contrast nothing else states (no plain or enhanced word of
/// the list, no agent) while its or its study's descriptions carry one of
/// these is not taken for plain: the item needs confirmation
/// (`contrast_unstated`). Without this floor a region's list that lacks a
/// word ("CECT", "ABD+C", "Thorax KM", "强化") made a post-contrast study a
/// certain plain exam.
const CONTRAST_HINTS: &[&str] = &[
    "CONTRAST",
    "KONTRAST",
    "CE",
    "CECT",
    "KM",
    "ENH",
    "GAD",
    "GD",
    "T1C",
    "T1 POST",
    "POST C",
    "PV",
    "IV",
    "+C",
    "C+",
    "+GD",
    "钆",
    "强化",
    "造影剂",
    "对比剂",
    "注药",
    "注射",
    "三期",
    "多期",
    "双期",
    "两期",
    "四期",
    // Agents by drug or brand name, as hospitals type them into a
    // protocol or description instead of ContrastBolusAgent (some are also
    // given by mouth: a hint, not proof).
    "碘海醇",
    "碘克沙醇",
    "碘帕醇",
    "碘普罗胺",
    "碘佛醇",
    "碘美普尔",
    "欧乃派克",
    "优维显",
    "威视派克",
    "典比乐",
    "钆喷酸",
    "钆双胺",
    "钆特酸",
    "钆布醇",
    "马根维显",
    "OMNIPAQUE",
    "ULTRAVIST",
    "VISIPAQUE",
    "ISOVUE",
    "OPTIRAY",
    "IOPAMIRO",
    "IOMERON",
    "IOHEXOL",
    "IOPAMIDOL",
    "IODIXANOL",
    "IOPROMIDE",
    "IOVERSOL",
    "MAGNEVIST",
    "DOTAREM",
    "GADAVIST",
    "GADOVIST",
    "PROHANCE",
    "MULTIHANCE",
    "PRIMOVIST",
    "EOVIST",
    "OMNISCAN",
    "CLARISCAN",
];

/// MR only: a post-contrast series named the vendors' way (Siemens
/// `t1_se_tra_post`, Philips `T1W_SE_tra post`), late enhancement. "POST"
/// is not a CT hint: a head CT's "Post Fossa" series is plain.
const MR_CONTRAST_HINTS: &[&str] = &["LGE", "PSIR", "DELAYED ENHANCEMENT"];

/// MR's vendor POST suffix: the whole word POST, not POSTERIOR, and not
/// the posterior fossa ("AX T2 POST FOSSA" is a plain series).
fn mr_post_suffix(text: &Text) -> bool {
    let words: Vec<&str> = ascii_words(&text.0, false)
        .into_iter()
        .map(|(a, b)| &text.0[a..b])
        .collect();
    words
        .iter()
        .enumerate()
        .any(|(i, w)| *w == "POST" && !words.get(i + 1).is_some_and(|n| n.starts_with("FOS")))
}

/// Words of a quality-control exam: a phantom scanned under a patient's ID
/// is not the patient's exam.
const PHANTOM_WORDS: &[&str] = &[
    "PHANTOM",
    "CATPHAN",
    "QA",
    "ACR QA",
    "DAILY QA",
    "模体",
    "水模",
    "体模",
    "头模",
    "每日质控",
    "日常质控",
    "质控扫描",
];

/// A dental cone-beam CT (Modality CT, often BodyPartExamined HEAD): a
/// small volume of the jaws, never the head CT of the list.
const CONE_BEAM_WORDS: &[&str] = &["CBCT", "CONE BEAM", "CONEBEAM", "锥形束", "口腔CT", "牙科"];

/// Words that make a region's study another exam than the region's own
/// item: a fetal or obstetric scan of the mother's abdomen or heart, a
/// vascular ultrasound of the abdomen, an MR cholangiography. The item is
/// unsure (`description_qualifies_region`); per modality family, "" for
/// all.
const QUALIFIER_WORDS: &[(&str, &[&str])] = &[
    (
        "",
        &[
            "胎儿",
            "FETAL",
            "FETUS",
            "产科",
            "OB",
            "OBSTETRIC",
            "孕",
            "TRIMESTER",
        ],
    ),
    (
        "US",
        &[
            "血管", "VASCULAR", "ARTERY", "ARTERIES", "VEIN", "静脉", "动脉",
        ],
    ),
    ("MR", &["MRCP", "胰胆管", "CHOLANGIO"]),
    // A toe is no foot film, as a finger is no hand film (趾骨 inside a
    // foot film's name is the foot's own bones).
    ("DX", &["拇趾", "足趾", "小趾", "TOE", "HALLUX"]),
    // An apical lordotic chest film is another view.
    ("DX", &["前弓位", "LORDOTIC"]),
    // A pulmonary-vein or left-atrium CTA (before ablation): 肺 in 肺静脉
    // is no chest CT.
    (
        "CT",
        &[
            "肺静脉",
            "左心房",
            "左房",
            "PULMONARY VEIN",
            "LEFT ATRI",
            "LA PV",
        ],
    ),
];

/// Words of an English study description that name no exam of their own:
/// a description made only of them (with the modality and numbers) is no
/// item name (`names_an_exam`).
const GENERIC_WORDS: &[&str] = &[
    "CT",
    "MR",
    "MRI",
    "DX",
    "CR",
    "DR",
    "US",
    "MG",
    "XR",
    "ROUTINE",
    "SCAN",
    "SCANS",
    "EXAM",
    "STUDY",
    "PROTOCOL",
    "ADULT",
    "CHILD",
    "PEDIATRIC",
    "PAEDIATRIC",
    "PLAIN",
    "WITH",
    "WITHOUT",
    "AND",
    "THE",
    "FOR",
    "OF",
    "STANDARD",
    "STD",
    "SERIES",
    "IMAGING",
    "IMAGES",
    "SPIRAL",
    "HELICAL",
    "AXIAL",
    "HIGH",
    "RES",
    "RESOLUTION",
    "LOW",
    "DOSE",
    "EMERGENCY",
    "ER",
    "STAT",
    "FOLLOW",
    "UP",
    "NC",
    "WO",
    "W",
    "O",
    "C",
    "ENH",
    "ENHANCED",
    "CONTRAST",
    "NON",
    "PRE",
    "POST",
    "REPEAT",
    "SEQ",
    "SEQUENCE",
    "DEFAULT",
    "GENERAL",
    "BASIC",
    "ERWACHSENER",
    "NATIV",
    "PA",
    "AP",
    "LAT",
    "LATERAL",
    "VIEW",
    "VIEWS",
    "1V",
    "2V",
    "PORTABLE",
    "UPRIGHT",
    "SUPINE",
    "ERECT",
    "LEFT",
    "RIGHT",
    "BILATERAL",
    "BOTH",
    "LT",
    "RT",
    "L",
    "R",
    "ECHO",
    "TTE",
    "TRANSTHORACIC",
    "DOPPLER",
    "COLOR",
    "COLOUR",
    "COMPLETE",
    "LIMITED",
];

/// PET tracers other than FDG (the list's PET-CT items are FDG scans).
const PET_TRACERS_NOT_FDG: &[&str] = &[
    "PSMA",
    "DOTATATE",
    "DOTATOC",
    "DOTANOC",
    "FAPI",
    "FES",
    "FLT",
    "CHOLINE",
    "FCH",
    "FDOPA",
    "DOPA",
    "NAF",
    "FLUCICLOVINE",
    "AMYLOID",
    "TAU",
    "胆碱",
    "生长抑素",
    "氟化钠",
    "多巴",
];

/// Body parts of one sex only, by the list's canonical names.
const MALE_PARTS: &[&str] = &["PROSTATE", "TESTIS", "SCROTUM"];
const FEMALE_PARTS: &[&str] = &["UTERUS", "OVARY", "CERVIX"];

/// A radiograph of a surgical or biopsy specimen (标本): not the patient.
const SPECIMEN_WORDS: &[&str] = &["标本", "SPECIMEN"];

/// A study of nuclear medicine whose CT came as its own study (the SPECT/CT's
/// localisation CT): the CT is part of the nuclear exam.
const NUCLEAR_STUDY_WORDS: &[&str] = &["SPECT"];

/// Upright positions: a pair of films upright and lying (腹部立卧位) has
/// its upright film.
const UPRIGHT_WORDS: &[&str] = &["立位", "立卧", "站立", "ERECT", "UPRIGHT", "STANDING"];

/// Lying positions of a radiograph: not an upright (立位) film.
const LYING_WORDS: &[&str] = &[
    "卧位",
    "仰卧",
    "侧卧",
    "俯卧",
    "SUPINE",
    "DECUBITUS",
    "PRONE",
    "LYING",
    "新生儿",
    "NEONATAL",
];

/// A procedure or a scan for another purpose than diagnosis: a guided
/// biopsy, ablation or drainage, a radiotherapy planning CT, a bone density
/// scan. Read in a series' own text always, in the study's only where it
/// names no plain or enhanced scan ("胸部CT平扫（肺穿刺术后复查）" is a
/// diagnostic follow-up).
const PROCEDURE_WORDS: &[&str] = &[
    "穿刺",
    "活检",
    "BIOPSY",
    "GUIDED",
    "引导",
    "消融",
    "ABLATION",
    "DRAINAGE",
    "引流",
    "放疗",
    "RADIOTHERAPY",
    "RT PLANNING",
    "SIMULATION",
    "模拟定位",
    "QCT",
    "骨密度",
    "BONE DENSITY",
    "BMD",
];

/// A perfusion series: another exam, never the plain or enhanced scan of
/// the region it sits beside (头颅CT平扫+CT灌注成像 keeps its plain head).
const PERFUSION_WORDS: &[&str] = &["灌注", "PERFUSION"];

/// A spinal junction (颈胸段, 胸腰段, 腰骶段) is a spine exam: its 颈 and 胸
/// are not the neck and the chest.
const SPINE_JUNCTION_WORDS: &[&str] = &[
    "颈胸段",
    "胸腰段",
    "腰骶段",
    "CERVICOTHORACIC",
    "THORACOLUMBAR",
    "LUMBOSACRAL",
];

/// Words of a bedside or portable film: its 正位 (frontal) is AP, whatever
/// the region's `[frontal_default]` says (a supine or sitting patient is
/// imaged front to back).
const BEDSIDE_WORDS: &[&str] = &[
    "床旁",
    "床边",
    "卧位",
    "仰卧",
    "坐位",
    "半卧",
    "ICU",
    "监护",
    "BEDSIDE",
    "PORTABLE",
    "SUPINE",
    "SITTING",
    "SEMI ERECT",
    "SEMIERECT",
];

/// Fewer images than this in the series an item of these modalities rests
/// on is not the exam (one slice of a chest does not show the chest); the
/// item needs confirmation (`too_few_images`). Radiographs and mammograms
/// are judged by their views instead.
fn minimum_images(family: &str) -> u32 {
    match family {
        "CT" | "MR" | "PET-CT" => 3,
        "US" => 2,
        _ => 1,
    }
}

/// `uid` is `root` or under it (".7" is secondary capture, ".77" is not).
fn under(uid: &str, root: &str) -> bool {
    uid.trim() == root || uid.trim().starts_with(&format!("{root}."))
}

fn radiograph(modality: &str) -> bool {
    matches!(modality, "DX" | "CR" | "DR")
}

/// The modality family an item of the list names: DX, CR and DR are all
/// radiographs.
fn family(modality: &str) -> String {
    let m = modality.trim().to_uppercase();
    if radiograph(&m) { "DX".into() } else { m }
}

/// Full-width forms (ＣＴ, ＋, （）) and the ideographic space as the ASCII
/// they stand for: Chinese input methods write both.
fn normalize(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
            '\u{3000}' => ' ',
            _ => c,
        })
        .collect::<String>()
        .to_uppercase()
}

/// Byte spans of the ASCII words of a text: letters and digits, and `+`
/// where the pattern has one ("C+" is a word, "PA+LAT" two).
fn ascii_words(text: &str, keep_plus: bool) -> Vec<(usize, usize)> {
    let in_word = |c: char| c.is_ascii_alphanumeric() || (keep_plus && c == '+');
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (in_word(c), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                out.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

/// Byte spans of `text` (normalised) where `pattern` occurs: Chinese (any
/// non-ASCII) anywhere; ASCII as words: a pattern of three characters or
/// more matches the start of a word ("ENHANC" → ENHANCED), a shorter one
/// only a whole word (an "L" is not in "LUNG"); a pattern of several words
/// matches them in sequence ("SI JOINT" → "SI Joints", "L-SPINE").
fn spans(text: &str, pattern: &str) -> Vec<(usize, usize)> {
    let p = normalize(pattern.trim());
    if p.is_empty() {
        return Vec::new();
    }
    if !p.is_ascii() {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some(i) = text[from..].find(&p) {
            out.push((from + i, from + i + p.len()));
            from += i + p.len();
        }
        return out;
    }
    let keep_plus = p.contains('+');
    let pwords: Vec<&str> = ascii_words(&p, keep_plus)
        .into_iter()
        .map(|(a, b)| &p[a..b])
        .collect();
    if pwords.is_empty() {
        return Vec::new();
    }
    let words = ascii_words(text, keep_plus);
    if keep_plus && pwords.len() == 1 {
        // A plus word is written glued to its neighbours as often as apart
        // ("ABD+C", "T1WI+C", "PLAIN+C+"): it matches inside a word, as
        // long as its letters are not part of longer letters ("+C" is not
        // in "PET+CT").
        let pw = pwords[0];
        let glued = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
        let starts_alnum = pw.starts_with(|c: char| c.is_ascii_alphanumeric());
        let ends_alnum = pw.ends_with(|c: char| c.is_ascii_alphanumeric());
        let mut out = Vec::new();
        for (a, b) in words {
            let w = &text[a..b];
            let mut from = 0;
            while let Some(i) = w[from..].find(pw) {
                let at = from + i;
                let end = at + pw.len();
                let before = w[..at].chars().next_back();
                let after = w[end..].chars().next();
                if !((starts_alnum && glued(before)) || (ends_alnum && glued(after))) {
                    out.push((a + at, a + end));
                }
                from = at + 1;
            }
        }
        return out;
    }
    let mut out = Vec::new();
    for k in 0..words.len() {
        if k + pwords.len() > words.len() {
            break;
        }
        let ok = pwords.iter().enumerate().all(|(j, pw)| {
            let (a, b) = words[k + j];
            let w = &text[a..b];
            if j + 1 == pwords.len() && p.len() >= 3 {
                w.starts_with(pw)
            } else {
                w == *pw
            }
        });
        if ok {
            let (a, _) = words[k];
            let (la, _) = words[k + pwords.len() - 1];
            out.push((a, la + pwords[pwords.len() - 1].len()));
        }
    }
    out
}

/// Text prepared for matching: normalised once.
struct Text(String);

impl Text {
    fn new(s: &str) -> Text {
        Text(normalize(s))
    }
    fn any(&self, patterns: &[String]) -> bool {
        patterns.iter().any(|p| !spans(&self.0, p).is_empty())
    }
    fn any_of(&self, patterns: &[&str]) -> bool {
        patterns.iter().any(|p| !spans(&self.0, p).is_empty())
    }
}

/// Whether one of `words` occurs in `text` other than inside a longer
/// body part name of the list (血管 in 颈部血管 is the carotid region, not a
/// qualifier of the neck).
fn outside_parts(list: &RecognitionList, text: &Text, words: &[&str]) -> bool {
    let names: Vec<(usize, usize)> = list
        .body_parts
        .values()
        .flatten()
        .flat_map(|synonym| spans(&text.0, synonym))
        .collect();
    words.iter().any(|w| {
        spans(&text.0, w).into_iter().any(|(a, b)| {
            !names
                .iter()
                .any(|&(c, d)| c <= a && b <= d && (d - c) > (b - a))
        })
    })
}

/// The canonical body parts a text names. A match inside a longer match of
/// another part does not count (胸 inside 胸椎 is the thoracic spine); a
/// coarse part named beside a finer part it holds gives way ("Head^Sinus"
/// is the sinus) — within one part of a merged order, not across its parts
/// ("肝胆胰脾+双肾" is the abdomen and the kidneys).
fn parts_in(list: &RecognitionList, text: &Text) -> BTreeSet<String> {
    text.0
        .split(['+', '、', '，', ',', ';', '；', '及', '和', '与'])
        .flat_map(|segment| parts_in_segment(list, segment))
        .collect()
}

fn parts_in_segment(list: &RecognitionList, text: &str) -> BTreeSet<String> {
    let text = Text(text.to_string());
    let mut found: Vec<(usize, usize, &str)> = Vec::new();
    for (part, synonyms) in &list.body_parts {
        for s in synonyms {
            for (a, b) in spans(&text.0, s) {
                found.push((a, b, part.as_str()));
            }
        }
    }
    let parts: BTreeSet<String> = found
        .iter()
        .filter(|(a, b, part)| {
            !found
                .iter()
                .any(|(c, d, other)| other != part && c <= a && b <= d && (d - c) > (b - a))
        })
        .map(|(_, _, p)| p.to_string())
        .collect();
    drop_coarse(list, parts)
}

fn drop_coarse(list: &RecognitionList, parts: BTreeSet<String>) -> BTreeSet<String> {
    parts
        .iter()
        .filter(|p| !parts.iter().any(|q| q != *p && list.contains_part(p, q)))
        .cloned()
        .collect()
}

/// BodyPartExamined as canonical parts: the value itself, a synonym, or
/// free text ("CHEST ROUTINE ADULT").
fn attribute_parts(list: &RecognitionList, value: &str) -> BTreeSet<String> {
    let v = value.trim();
    if v.is_empty() {
        return BTreeSet::new();
    }
    let n = normalize(v);
    if let Some((part, _)) = list
        .body_parts
        .iter()
        .find(|(part, syn)| normalize(part) == n || syn.iter().any(|s| normalize(s) == n))
    {
        return BTreeSet::from([part.clone()]);
    }
    parts_in(list, &Text::new(v))
}

/// Whether two parts speak of the same region: equal, one holds the other,
/// or one is a group with the other (or a part of it) among its members.
fn related(list: &RecognitionList, a: &str, b: &str) -> bool {
    a == b
        || list.contains_part(a, b)
        || list.contains_part(b, a)
        || group_has(list, a, b)
        || group_has(list, b, a)
}

fn group_has(list: &RecognitionList, group: &str, part: &str) -> bool {
    list.body_part_groups
        .get(group)
        .is_some_and(|m| m.iter().any(|m| m == part || list.contains_part(m, part)))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Plain,
    Enhanced,
    Angiography,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum View {
    Pa,
    Ap,
    Lateral,
    Oblique,
    /// 正位: frontal, direction not said.
    Frontal,
}

/// Evidence gathered for one item, merged by attribute and value.
#[derive(Default)]
struct Ledger(Vec<Evidence>);

impl Ledger {
    fn add(&mut self, attribute: &str, value: &str, series: &str, instance: &str) {
        let value = value.trim();
        if value.is_empty() {
            return;
        }
        let e = match self
            .0
            .iter_mut()
            .find(|e| e.attribute == attribute && e.value == value)
        {
            Some(e) => e,
            None => {
                self.0.push(Evidence {
                    attribute: attribute.to_string(),
                    value: value.to_string(),
                    series: Vec::new(),
                    instances: Vec::new(),
                });
                self.0.last_mut().expect("just pushed")
            }
        };
        if !series.is_empty() && !e.series.iter().any(|s| s == series) {
            e.series.push(series.to_string());
        }
        if !instance.is_empty() && !e.instances.iter().any(|s| s == instance) {
            e.instances.push(instance.to_string());
        }
    }
}

/// A series, or the images of a radiograph series that share one
/// BodyPartExamined.
struct Unit<'a> {
    series: &'a SeriesAttributes,
    family: String,
    body_part_examined: String,
    instances: Vec<InstanceAttributes>,
    /// Regions and how they were found.
    parts: BTreeSet<String>,
    doubts: BTreeSet<&'static str>,
    kind: Kind,
    /// The kind comes from an attribute or a word, not from their absence.
    kind_explicit: bool,
}

impl Unit<'_> {
    fn text(&self) -> Text {
        Text::new(&format!(
            "{} {}",
            self.series.series_description, self.series.protocol_name
        ))
    }
}

/// Why a series is not an image of the exam, if it is not.
fn not_diagnostic(list: &RecognitionList, s: &SeriesAttributes, pet_study: bool) -> bool {
    let v = &list.vocabulary;
    let modality = s.modality.trim().to_uppercase();
    let text = Text::new(&format!("{} {}", s.series_description, s.protocol_name));
    let image_type = s.image_type.to_uppercase();
    let image_type_has = |v: &str| image_type.split('\\').any(|c| c.trim() == v);
    modality.is_empty()
        || NOT_IMAGE_MODALITIES.contains(&modality.as_str())
        || NOT_IMAGE_SOP_CLASSES
            .iter()
            .any(|p| under(&s.sop_class_uid, p))
        || FOR_PROCESSING_SOP_CLASSES.contains(&s.sop_class_uid.trim())
        || image_type_has("LOCALIZER")
        || image_type_has("SCREEN SAVE")
        || image_type_has("CAD")
        || text.any(&v.localizer)
        || text.any(&v.calibration)
        || text.any(&v.not_images)
        // The CT (or MR) of a PET study is part of the PET exam, never a
        // CT exam of its own (recognition-facts.md: a PET-CT is not a CT
        // exam); a CT described as attenuation correction is not
        // diagnostic even when its PT series went elsewhere.
        || (matches!(modality.as_str(), "CT" | "MR") && pet_study)
        || (modality == "CT" && text.any(&v.attenuation_ct))
}

/// The series' contrast: from words first (a plain word wins over an
/// agent copied to every series of the exam), then the agent attributes.
fn series_kind(list: &RecognitionList, s: &SeriesAttributes) -> (Kind, bool) {
    let v = &list.vocabulary;
    let text = Text::new(&format!("{} {}", s.series_description, s.protocol_name));
    let modality = s.modality.trim().to_uppercase();
    if v.angiography_modalities.iter().any(|m| m == &modality) {
        return (Kind::Angiography, true);
    }
    // Angiography words only for CT and MR: "TOF" also names
    // time-of-flight PET reconstructions.
    if matches!(modality.as_str(), "CT" | "MR")
        && (text.any(&v.angiography) || s.image_type.to_uppercase().contains("ANGIO"))
    {
        return (Kind::Angiography, true);
    }
    if text.any(&v.plain) {
        return (Kind::Plain, true);
    }
    if text.any(&v.enhanced) {
        return (Kind::Enhanced, true);
    }
    let agent = s.contrast_agent.trim();
    let (agent_given, oral) = contrast_agent(
        v,
        &s.contrast_agent,
        s.contrast_agent_sequence,
        &s.contrast_route,
    );
    if agent_given && !oral {
        return (Kind::Enhanced, true);
    }
    (Kind::Plain, agent_given || !agent.is_empty())
}

/// What a series' contrast attributes say, read with the list's
/// vocabulary: whether an agent was given (a value such as NONE, 无 or -
/// is no agent) and whether it went by mouth (oral contrast alone does
/// not make an enhanced scan). The publisher's record-level summary reads
/// them the same way.
pub fn contrast_agent(
    v: &crate::recognition::list::Vocabulary,
    agent: &str,
    agent_sequence: bool,
    route: &str,
) -> (bool, bool) {
    let agent = agent.trim();
    let given = (!agent.is_empty()
        && !v
            .no_contrast_agent
            .iter()
            .any(|n| normalize(n.trim()) == normalize(agent)))
        || agent_sequence;
    let oral = Text::new(route).any(&v.oral_route)
        || (!agent.is_empty() && Text::new(agent).any(&v.oral_agent));
    (given, oral)
}

fn sides_in(list: &RecognitionList, text: &Text) -> BTreeSet<Laterality> {
    let v = &list.vocabulary;
    let mut out = BTreeSet::new();
    if text.any(&v.both) {
        out.insert(Laterality::Both);
    }
    if text.any(&v.left) {
        out.insert(Laterality::Left);
    }
    if text.any(&v.right) {
        out.insert(Laterality::Right);
    }
    out
}

fn side_of(value: &str) -> Option<Laterality> {
    match value.trim().to_uppercase().as_str() {
        "L" => Some(Laterality::Left),
        "R" => Some(Laterality::Right),
        "B" => Some(Laterality::Both),
        _ => None,
    }
}

fn views_in(list: &RecognitionList, text: &Text) -> BTreeSet<View> {
    let v = &list.vocabulary;
    let mut out = BTreeSet::new();
    for (words, view) in [
        (&v.view_pa, View::Pa),
        (&v.view_ap, View::Ap),
        (&v.view_lateral, View::Lateral),
        (&v.view_oblique, View::Oblique),
        (&v.view_frontal, View::Frontal),
    ] {
        if text.any(words) {
            out.insert(view);
        }
    }
    out
}

/// ViewPosition (PS3.3 C.8.11.5.1.1 defined terms) as a view.
fn view_of_position(v: &str) -> Option<View> {
    Projection::from_view_position(v).map(|p| match p {
        Projection::Pa => View::Pa,
        Projection::Ap => View::Ap,
        Projection::Lateral => View::Lateral,
        Projection::Oblique => View::Oblique,
    })
}

/// Study-level text sources, by keyword.
fn study_sources(study: &StudyAttributes) -> Vec<(&'static str, String)> {
    let mut out = vec![
        ("StudyDescription", study.study_description.clone()),
        (
            "RequestedProcedureDescription",
            study.requested_procedure_description.clone(),
        ),
    ];
    for c in &study.codes {
        out.push(("CodeMeaning", c.meaning.clone()));
    }
    out.retain(|(_, t)| !t.trim().is_empty());
    out
}

pub fn classify(list: &RecognitionList, study: &StudyAttributes) -> Classification {
    let v = &list.vocabulary;
    let sources = study_sources(study);
    let study_text = Text::new(
        &sources
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    );
    let has_pt = study
        .series
        .iter()
        .any(|s| s.modality.trim().eq_ignore_ascii_case("PT"));
    // A SPECT/CT's CT (an NM series beside it) is the nuclear exam's
    // localisation and attenuation scan, never a CT exam: as a PET's.
    let has_nm = study
        .series
        .iter()
        .any(|s| s.modality.trim().eq_ignore_ascii_case("NM"));
    let pet_study =
        has_pt || has_nm || study_text.any(&v.pet_study) || study_text.any_of(NUCLEAR_STUDY_WORDS);
    let has_pet_ct_series = study
        .series
        .iter()
        .any(|s| s.modality.trim().eq_ignore_ascii_case("CT"));
    let phantom = |t: &str| Text::new(t).any_of(PHANTOM_WORDS);
    if phantom(&study_text.0)
        || study
            .series
            .iter()
            .any(|s| phantom(&format!("{} {}", s.series_description, s.protocol_name)))
    {
        return unclassified("phantom");
    }
    if study_text.any_of(SPECIMEN_WORDS) {
        return unclassified("specimen");
    }
    // Contrast the list's words leave unsaid at the study level.
    let study_contrast_unsaid = study_kinds(list, &study_text).is_empty();

    // Diagnostic series, radiographs split by their images' body part.
    let mut units: Vec<Unit> = Vec::new();
    for s in &study.series {
        if not_diagnostic(list, s, pet_study) {
            continue;
        }
        let modality = s.modality.trim().to_uppercase();
        let series_text = Text::new(&format!("{} {}", s.series_description, s.protocol_name));
        if matches!(modality.as_str(), "CT" | "MR") && series_text.any_of(PERFUSION_WORDS) {
            continue;
        }
        if modality == "CT"
            && (study_text.any_of(CONE_BEAM_WORDS) || series_text.any_of(CONE_BEAM_WORDS))
        {
            continue;
        }
        let fam = if modality == "PT" {
            "PET-CT".to_string()
        } else {
            family(&modality)
        };
        let instances = if s.instances.is_empty() {
            vec![InstanceAttributes::default()]
        } else {
            s.instances.clone()
        };
        let (kind, kind_explicit) = series_kind(list, s);
        // Plain only for want of any word or agent, while a description
        // hints at contrast: not a certain plain exam (CONTRAST_HINTS).
        let contrast_unstated = !kind_explicit
            && matches!(fam.as_str(), "CT" | "MR")
            && study_contrast_unsaid
            && (series_text.any_of(CONTRAST_HINTS)
                || study_text.any_of(CONTRAST_HINTS)
                || (fam == "MR"
                    && (series_text.any_of(MR_CONTRAST_HINTS)
                        || study_text.any_of(MR_CONTRAST_HINTS)
                        || mr_post_suffix(&series_text)
                        || mr_post_suffix(&study_text)))
                // An ingredient, a volume or an intravenous route recorded
                // without an agent: something was injected.
                || s.contrast_bolus_recorded);
        let mut by_part: BTreeMap<String, Vec<InstanceAttributes>> = BTreeMap::new();
        for i in instances {
            let bp = if i.body_part_examined.trim().is_empty() {
                s.body_part_examined.clone()
            } else {
                i.body_part_examined.clone()
            };
            by_part.entry(bp).or_default().push(i);
        }
        for (bp, instances) in by_part {
            units.push(Unit {
                series: s,
                family: fam.clone(),
                body_part_examined: bp,
                instances,
                parts: BTreeSet::new(),
                doubts: if contrast_unstated {
                    BTreeSet::from(["contrast_unstated"])
                } else {
                    BTreeSet::new()
                },
                kind,
                kind_explicit,
            });
        }
    }
    if units.is_empty() {
        return unclassified("no_diagnostic_series");
    }

    // 1. Each unit's body parts.
    let study_parts = parts_in(list, &study_text);
    // A Chinese study description is the hospital's item name; so is an
    // English one with a word beyond the generic ("OB 2ND TRIMESTER",
    // "MRCP", "CATPHAN": not "ROUTINE").
    let names_an_exam = study_text
        .0
        .chars()
        .any(|c| ('\u{4E00}'..='\u{9FFF}').contains(&c))
        || ascii_words(&study_text.0, false).iter().any(|&(a, b)| {
            let w = &study_text.0[a..b];
            w.len() >= 2
                && w.bytes().any(|c| c.is_ascii_alphabetic())
                && !GENERIC_WORDS.contains(&w)
        });
    for u in &mut units {
        let a = attribute_parts(list, &u.body_part_examined);
        let d = parts_in(list, &u.text());
        let (mut parts, from_attribute) = if !d.is_empty() {
            if !a.is_empty() && !a.iter().all(|x| d.iter().any(|y| related(list, x, y))) {
                // BodyPartExamined left over from another patient or
                // protocol: the description is the series; doubt remains.
                u.doubts
                    .insert("body_part_examined_contradicts_description");
            }
            (d, false)
        } else if !a.is_empty() {
            (a, true)
        } else {
            (study_parts.clone(), false)
        };
        if from_attribute && study_parts.is_empty() && names_an_exam {
            // The hospital's item name (阑尾彩超, 急诊CT) names no region the
            // list knows: the coarse attribute alone may not be the exam.
            u.doubts.insert("study_description_names_no_known_region");
        }
        if !study_parts.is_empty() && parts != study_parts {
            let mut resolved = BTreeSet::new();
            for r in &parts {
                if study_parts.contains(r) {
                    resolved.insert(r.clone());
                    continue;
                }
                let groups: Vec<&String> = study_parts
                    .iter()
                    .filter(|g| group_has(list, g, r))
                    .collect();
                let finer: Vec<&String> = study_parts
                    .iter()
                    .filter(|d| list.contains_part(r, d))
                    .collect();
                let coarser = study_parts.iter().any(|d| list.contains_part(d, r));
                if !groups.is_empty() {
                    resolved.extend(groups.into_iter().cloned());
                } else if !finer.is_empty() {
                    // HEAD kept for a sinus CT: the finer part is the exam,
                    // with or without an item of its own.
                    resolved.extend(finer.into_iter().cloned());
                } else if coarser {
                    resolved.insert(r.clone());
                } else if from_attribute {
                    // Never the attribute's region against the
                    // descriptions.
                    u.doubts
                        .insert("body_part_examined_contradicts_study_description");
                    resolved.extend(study_parts.iter().cloned());
                } else {
                    u.doubts.insert("series_contradicts_study_description");
                    resolved.insert(r.clone());
                }
            }
            parts = resolved;
        }
        u.parts = parts;
        let text = u.text();
        let qualified = QUALIFIER_WORDS.iter().any(|(fam, words)| {
            (fam.is_empty() || *fam == u.family)
                && (outside_parts(list, &study_text, words) || outside_parts(list, &text, words))
        });
        if qualified {
            u.doubts.insert("description_qualifies_region");
        }
        if u.family == "CT"
            && (text.any_of(PROCEDURE_WORDS)
                || (study_contrast_unsaid && study_text.any_of(PROCEDURE_WORDS)))
        {
            u.doubts.insert("description_qualifies_region");
        }
        if study_text.any_of(SPINE_JUNCTION_WORDS) || text.any_of(SPINE_JUNCTION_WORDS) {
            u.doubts.insert("spine_junction");
        }
    }
    if units.iter().all(|u| u.parts.is_empty())
        && study.codes.is_empty()
        && units.iter().all(|u| u.series.codes.is_empty())
    {
        return unclassified("body_part_unknown");
    }

    // 2. Compose: one group per modality family and body part.
    let mut groups: BTreeMap<(String, String), Vec<usize>> = BTreeMap::new();
    for (i, u) in units.iter().enumerate() {
        for p in &u.parts {
            groups
                .entry((u.family.clone(), p.clone()))
                .or_default()
                .push(i);
        }
    }
    // The study's contrast words, from what was done (StudyDescription,
    // the codes' meanings) before what was asked (RequestedProcedure-
    // Description): a request for 增强 the patient refused is no 增强.
    let done_text = Text::new(
        &sources
            .iter()
            .filter(|(k, _)| *k != "RequestedProcedureDescription")
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>()
            .join(" "),
    );
    let (study_kinds, request_only) = match study_kinds(list, &done_text) {
        k if !k.is_empty() => (k, false),
        _ => {
            let k = study_kinds(list, &study_text);
            let only = !k.is_empty();
            (k, only)
        }
    };
    let study_sides = sides_in(list, &study_text);
    let study_views = views_in(list, &study_text);
    let mut found: Vec<Classified> = Vec::new();
    for ((fam, part), members) in &groups {
        let members: Vec<&Unit> = members.iter().map(|&i| &units[i]).collect();
        // The study's contrast words speak for its series only where no
        // series of the modality says anything itself.
        let study = StudyWords {
            sources: &sources,
            // Contrast is a CT and MR matter in the list: a PET-CT's
            // "胸部增强CT" says nothing of the PET.
            kinds: if !matches!(fam.as_str(), "CT" | "MR")
                || units.iter().any(|u| &u.family == fam && u.kind_explicit)
            {
                BTreeSet::new()
            } else {
                study_kinds.clone()
            },
            sides: study_sides.clone(),
            views: study_views.clone(),
            child: study.patient_age_years.is_some_and(|a| a < CHILD_YEARS),
            request_only,
        };
        found.extend(compose(list, fam, part, &members, &study));
    }
    if has_pt && !has_pet_ct_series {
        for c in found.iter_mut().filter(|c| c.code.starts_with("PET")) {
            doubt(c, "pet_without_ct");
        }
    }
    // The list's PET-CT items are FDG scans; another tracer (PSMA,
    // DOTATATE, FAPI ...) is another exam.
    let all_descriptions = Text::new(&format!(
        "{} {}",
        study_text.0,
        study
            .series
            .iter()
            .map(|s| format!("{} {}", s.series_description, s.protocol_name))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    if all_descriptions.any_of(PET_TRACERS_NOT_FDG) {
        for c in found.iter_mut().filter(|c| c.code.starts_with("PET")) {
            doubt(c, "pet_tracer_not_fdg");
        }
    }
    // Text the decoder could not read (GBK bytes under a declared UTF-8,
    // say) may have held the words that decide: claim less.
    if all_descriptions.0.contains('\u{FFFD}') {
        for c in found.iter_mut() {
            doubt(c, "text_unreadable");
        }
    }
    // A body part of the other sex (a woman's pelvis whose BodyPartExamined
    // says PROSTATE): the header is another patient's or a protocol's.
    let sex = study.patient_sex.trim().to_uppercase();
    for c in found.iter_mut() {
        let part = list
            .item(&c.code)
            .map(|i| i.body_part.as_str())
            .unwrap_or("");
        if (sex == "F" && MALE_PARTS.contains(&part))
            || (sex == "M" && FEMALE_PARTS.contains(&part))
        {
            doubt(c, "sex_contradicts_body_part");
        }
    }
    // An upright (立位) item from a film taken lying: not the same exam
    // (free air and fluid levels show only upright).
    if all_descriptions.any_of(LYING_WORDS) && !all_descriptions.any_of(UPRIGHT_WORDS) {
        for c in found.iter_mut() {
            if list
                .item(&c.code)
                .is_some_and(|i| i.name_zh.contains("立位"))
            {
                doubt(c, "position_differs");
            }
        }
    }

    // 3. Rules: descriptions that name an item outright, where the images
    // made none of that modality.
    let all_text = Text::new(&format!(
        "{} {}",
        study_text.0,
        units
            .iter()
            .map(|u| u.text().0)
            .collect::<Vec<_>>()
            .join(" ")
    ));
    for rule in &list.rules {
        let Some(item) = list.item(&rule.item) else {
            continue;
        };
        let fitting: Vec<&Unit> = units
            .iter()
            .filter(|u| family(&item.modality) == u.family || item.modality == u.family)
            .filter(|u| {
                rule.modality.is_empty()
                    || rule
                        .modality
                        .iter()
                        .any(|m| family(m) == u.family || m == &u.family)
            })
            .collect();
        if fitting.is_empty()
            || found.iter().any(|c| {
                list.item(&c.code)
                    .is_some_and(|i| family(&i.modality) == family(&item.modality))
            })
        {
            continue;
        }
        let body_ok = rule.body_part_examined.is_empty()
            || fitting
                .iter()
                .any(|u| Text::new(&u.body_part_examined).any(&rule.body_part_examined));
        let desc_ok = rule.description.is_empty() || all_text.any(&rule.description);
        if !body_ok || !desc_ok || all_text.any(&rule.exclude) {
            continue;
        }
        let kinds: BTreeSet<Kind> = fitting.iter().map(|u| u.kind).collect();
        if !contrast_fits(item.contrast, &kinds) {
            continue;
        }
        let mut ledger = Ledger::default();
        ledger.add("rule", &rule.name, "", "");
        for (k, t) in &sources {
            if Text::new(t).any(&rule.description) {
                ledger.add(k, t, "", "");
            }
        }
        let mut c = Classified {
            code: item.code.clone(),
            confidence: Confidence::Certain,
            laterality: None,
            views: Vec::new(),
            contrast: item.contrast,
            doubts: Vec::new(),
            evidence: ledger.0,
        };
        if item.laterality == LateralityRule::Required {
            doubt(&mut c, "laterality_unknown");
        }
        found.push(c);
    }

    // 4. Codes, through the list's code tables.
    apply_codes(list, study, &units, &mut found);

    if found.is_empty() {
        let reason = if units.iter().all(|u| u.parts.is_empty()) {
            "body_part_unknown"
        } else {
            "no_item_matched"
        };
        return unclassified(reason);
    }
    done(found)
}

/// Contrast words of the study's descriptions.
fn study_kinds(list: &RecognitionList, text: &Text) -> BTreeSet<Kind> {
    let v = &list.vocabulary;
    let mut out = BTreeSet::new();
    if text.any(&v.plain) {
        out.insert(Kind::Plain);
    }
    if text.any(&v.enhanced) {
        out.insert(Kind::Enhanced);
    }
    if text.any(&v.angiography) {
        out.insert(Kind::Angiography);
    }
    out
}

fn doubt(c: &mut Classified, why: &str) {
    c.confidence = Confidence::NeedsConfirmation;
    if !c.doubts.iter().any(|d| d == why) {
        c.doubts.push(why.to_string());
    }
}

fn contrast_fits(item: ItemContrast, kinds: &BTreeSet<Kind>) -> bool {
    match item {
        ItemContrast::Angiography => kinds.contains(&Kind::Angiography),
        ItemContrast::None => kinds.contains(&Kind::Plain),
        ItemContrast::Enhanced => kinds.contains(&Kind::Enhanced),
        ItemContrast::PlainAndEnhanced => {
            kinds.contains(&Kind::Plain) && kinds.contains(&Kind::Enhanced)
        }
    }
}

/// What the study-level descriptions say, for one modality family.
struct StudyWords<'a> {
    sources: &'a [(&'static str, String)],
    /// Contrast words, where no series of the family says anything.
    kinds: BTreeSet<Kind>,
    sides: BTreeSet<Laterality>,
    views: BTreeSet<View>,
    /// A small child (`CHILD_YEARS`): no PA by convention.
    child: bool,
    /// `kinds` come from the request alone.
    request_only: bool,
}

/// The items of one modality family and body part, from the units that
/// show it.
fn compose(
    list: &RecognitionList,
    fam: &str,
    part: &str,
    units: &[&Unit],
    study: &StudyWords,
) -> Vec<Classified> {
    let sources = study.sources;
    let study_sides = &study.sides;
    let study_views = &study.views;
    let candidates: Vec<&Item> = list
        .items
        .iter()
        .filter(|i| i.body_part == part && family(&i.modality) == fam)
        .collect();
    if candidates.is_empty() {
        // A group without an item of its own (全腹) is its members'.
        if let Some(members) = list.body_part_groups.get(part) {
            return members
                .iter()
                .flat_map(|m| compose(list, fam, m, units, study))
                .collect();
        }
        return Vec::new();
    }
    let mut ledger = Ledger::default();
    let mut doubts: BTreeSet<&'static str> = BTreeSet::new();
    for u in units {
        doubts.extend(u.doubts.iter().copied());
        let uid = u.series.series_instance_uid.as_str();
        ledger.add("Modality", &u.series.modality, uid, "");
        if attribute_parts(list, &u.body_part_examined)
            .iter()
            .any(|p| related(list, p, part))
        {
            let per_image = u.instances.iter().any(|i| !i.body_part_examined.is_empty());
            for i in &u.instances {
                ledger.add(
                    "BodyPartExamined",
                    &u.body_part_examined,
                    uid,
                    if per_image { &i.sop_instance_uid } else { "" },
                );
            }
        }
        for (k, t) in [
            ("SeriesDescription", &u.series.series_description),
            ("ProtocolName", &u.series.protocol_name),
        ] {
            if parts_in(list, &Text::new(t))
                .iter()
                .any(|p| related(list, p, part))
            {
                ledger.add(k, t, uid, "");
            }
        }
    }
    for (k, t) in sources {
        if parts_in(list, &Text::new(t))
            .iter()
            .any(|p| related(list, p, part))
        {
            ledger.add(k, t, "", "");
        }
    }

    // Contrast.
    let study_kinds = &study.kinds;
    let mut kinds: BTreeSet<Kind> = units.iter().map(|u| u.kind).collect();
    if !study_kinds.is_empty() {
        // Plain is what neutral series are anyway; more than plain only
        // in the request is not known to have been done.
        if study.request_only && study_kinds.iter().any(|k| *k != Kind::Plain) {
            doubts.insert("contrast_only_in_request");
        }
        // Nothing in the series says: the study's words do (冠脉CTA with
        // series "Cardiac 0.625"). Angiography words only for CT and MR.
        kinds = study_kinds
            .iter()
            .copied()
            .filter(|k| *k != Kind::Angiography || matches!(fam, "CT" | "MR"))
            .collect();
        if kinds.is_empty() {
            kinds.insert(Kind::Plain);
        }
        for (k, t) in sources {
            if !study_kinds_of(list, t).is_empty() {
                ledger.add(k, t, "", "");
            }
        }
    } else {
        for u in units.iter().filter(|u| u.kind_explicit) {
            let uid = u.series.series_instance_uid.as_str();
            ledger.add("ContrastBolusAgent", &u.series.contrast_agent, uid, "");
            if u.series.contrast_agent_sequence {
                ledger.add("ContrastBolusAgentSequence", "present", uid, "");
            }
            ledger.add("ContrastBolusRoute", &u.series.contrast_route, uid, "");
        }
        // The study's words against what the images show: a "plain" study
        // whose only series carries an agent is a contradiction.
        let base: BTreeSet<Kind> = kinds
            .iter()
            .copied()
            .filter(|k| *k != Kind::Angiography)
            .collect();
        let study_base: BTreeSet<Kind> = study_kinds_of(
            list,
            &sources
                .iter()
                .map(|(_, t)| t.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        )
        .iter()
        .copied()
        .filter(|k| *k != Kind::Angiography)
        .collect();
        if matches!(fam, "CT" | "MR")
            && !study_base.is_empty()
            && !base.is_empty()
            && study_base.is_disjoint(&base)
        {
            doubts.insert("contrast_contradicts_study_description");
        }
    }

    // Which items: the angiography item apart, and one for the rest.
    let pick = |c: ItemContrast| candidates.iter().copied().filter(move |i| i.contrast == c);
    let mut chosen: Vec<&Item> = Vec::new();
    if kinds.contains(&Kind::Angiography) {
        chosen.extend(pick(ItemContrast::Angiography));
    }
    let plain = kinds.contains(&Kind::Plain);
    let enhanced = kinds.contains(&Kind::Enhanced);
    if plain && enhanced {
        let both: Vec<&Item> = pick(ItemContrast::PlainAndEnhanced).collect();
        if both.is_empty() {
            chosen.extend(pick(ItemContrast::None));
            chosen.extend(pick(ItemContrast::Enhanced));
        } else {
            chosen.extend(both);
        }
    } else if enhanced {
        chosen.extend(pick(ItemContrast::Enhanced));
    } else if plain {
        chosen.extend(pick(ItemContrast::None));
    }
    if chosen.is_empty() {
        return Vec::new();
    }

    // Sides: per image and series (the images), then the descriptions.
    let mut image_sides: BTreeSet<Laterality> = BTreeSet::new();
    let mut side_conflict = false;
    for u in units {
        let uid = u.series.series_instance_uid.as_str();
        let series_side = side_of(&u.series.laterality);
        if let Some(s) = series_side {
            image_sides.insert(s);
            ledger.add("Laterality", &u.series.laterality, uid, "");
        }
        for i in &u.instances {
            if let Some(s) = side_of(&i.image_laterality) {
                image_sides.insert(s);
                ledger.add(
                    "ImageLaterality",
                    &i.image_laterality,
                    uid,
                    &i.sop_instance_uid,
                );
                if series_side.is_some_and(|ss| ss != s && ss != Laterality::Both) {
                    side_conflict = true;
                }
            }
        }
        let described = sides_in(list, &u.text());
        if !described.is_empty() {
            let attr: BTreeSet<Laterality> = series_side
                .into_iter()
                .chain(
                    u.instances
                        .iter()
                        .filter_map(|i| side_of(&i.image_laterality)),
                )
                .collect();
            if !attr.is_empty() && attr != described {
                side_conflict = true;
            }
            image_sides.extend(described);
            ledger.add("SeriesDescription", &u.series.series_description, uid, "");
        }
    }
    let image_side = match (
        image_sides.contains(&Laterality::Left) || image_sides.contains(&Laterality::Both),
        image_sides.contains(&Laterality::Right) || image_sides.contains(&Laterality::Both),
    ) {
        (true, true) => Some(Laterality::Both),
        (true, false) => Some(Laterality::Left),
        (false, true) => Some(Laterality::Right),
        _ => None,
    };
    let study_side = match (
        study_sides.contains(&Laterality::Both)
            || (study_sides.contains(&Laterality::Left)
                && study_sides.contains(&Laterality::Right)),
        study_sides.contains(&Laterality::Left),
        study_sides.contains(&Laterality::Right),
    ) {
        (true, _, _) => Some(Laterality::Both),
        (false, true, false) => Some(Laterality::Left),
        (false, false, true) => Some(Laterality::Right),
        _ => None,
    };
    if let (Some(i), Some(s)) = (image_side, study_side)
        && i != s
    {
        // Ordered right, the images say left; ordered both, one side
        // imaged: never the attribute's side, never both.
        side_conflict = true;
    }

    // Views, radiographs only.
    let views = if fam == "DX" {
        // The study's own view words speak for this region only when the
        // study names no other (胸部正位+腰椎正侧位 is two regions' views).
        let study_parts = parts_in(
            list,
            &Text::new(
                &sources
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        );
        // What was done says so: the StudyDescription, not the request
        // or a code (a code of PA + lateral on one PA film is the lesser
        // item, certain).
        let study_claims: BTreeSet<View> = if study_parts.iter().all(|p| related(list, p, part)) {
            sources
                .iter()
                .filter(|(k, _)| *k == "StudyDescription")
                .flat_map(|(_, t)| views_in(list, &Text::new(t)))
                .collect()
        } else {
            BTreeSet::new()
        };
        Some(views_of(
            list,
            part,
            units,
            study_views,
            &study_claims,
            &mut ledger,
        ))
    } else {
        None
    };
    if fam == "DX" && image_side == Some(Laterality::Both) {
        // Both sides imaged: each side's own views, never pooled (a left AP
        // and a right lateral are not both knees AP and lateral).
        let mut per_side: BTreeMap<Laterality, BTreeSet<View>> = BTreeMap::new();
        for u in units {
            for i in &u.instances {
                let side = side_of(&i.image_laterality).or(side_of(&u.series.laterality));
                if let (Some(side @ (Laterality::Left | Laterality::Right)), Some(v)) =
                    (side, view_of_position(&i.view_position))
                {
                    per_side.entry(side).or_default().insert(v);
                }
            }
        }
        let mut sets = per_side.values();
        if let (Some(a), Some(b)) = (sets.next(), sets.next())
            && a != b
        {
            doubts.insert("views_differ_between_sides");
        }
    }
    // Too few images to be the exam (one slice of a chest), when the
    // count is known for every series.
    let images: Option<u32> = units
        .iter()
        .map(|u| (u.series.images > 0).then_some(u.series.images))
        .sum();
    if images.is_some_and(|n| n < minimum_images(fam)) {
        doubts.insert("too_few_images");
    }
    if fam == "MG" {
        // A mammogram is two views of each breast imaged (CC and MLO): a
        // side with one image, or one view exposed twice, is not the exam.
        // Views by ViewPosition (or its code); where no image of a side
        // says, its images are counted.
        let mut per_side: BTreeMap<Laterality, (usize, BTreeSet<String>)> = BTreeMap::new();
        for u in units {
            for i in &u.instances {
                if let Some(side) = side_of(&i.image_laterality).or(side_of(&u.series.laterality)) {
                    let entry = per_side.entry(side).or_default();
                    entry.0 += 1;
                    let view = if i.view_position.trim().is_empty() {
                        i.view_code.trim().to_uppercase()
                    } else {
                        i.view_position.trim().to_uppercase()
                    };
                    if !view.is_empty() {
                        entry.1.insert(view);
                    }
                }
            }
        }
        if per_side
            .values()
            .any(|(n, views)| *n < 2 || (!views.is_empty() && views.len() < 2))
        {
            doubts.insert("too_few_images");
        }
    }
    // Only derived copies (reformats, a re-sent secondary copy): no image
    // of the acquisition itself.
    let derived = |u: &&Unit| {
        let t = u.series.image_type.to_uppercase();
        let mut v = t.split('\\').map(str::trim);
        v.next() == Some("DERIVED") && v.next() == Some("SECONDARY")
    };
    if units.iter().all(derived) {
        doubts.insert("derived_images_only");
    }

    let mut out = Vec::new();
    for item in chosen {
        let mut c = Classified {
            code: item.code.clone(),
            confidence: Confidence::Certain,
            laterality: None,
            views: Vec::new(),
            contrast: item.contrast,
            doubts: Vec::new(),
            evidence: ledger.0.clone(),
        };
        for d in &doubts {
            doubt(&mut c, d);
        }
        match item.laterality {
            LateralityRule::None => {}
            LateralityRule::Both => {
                // A unilateral exam never earns a "both sides" item.
                let one =
                    |s: Option<Laterality>| matches!(s, Some(Laterality::Left | Laterality::Right));
                if one(image_side) || (image_side.is_none() && one(study_side)) {
                    continue;
                }
                if side_conflict {
                    doubt(&mut c, "laterality_conflict");
                }
            }
            LateralityRule::Required => {
                if side_conflict {
                    doubt(&mut c, "laterality_conflict");
                } else if let Some(s) = image_side {
                    c.laterality = Some(s);
                } else if let Some(s) = study_side {
                    c.laterality = Some(s);
                    for (k, t) in sources {
                        if !sides_in(list, &Text::new(t)).is_empty() {
                            c.evidence.push(Evidence {
                                attribute: k.to_string(),
                                value: t.clone(),
                                series: Vec::new(),
                                instances: Vec::new(),
                            });
                        }
                    }
                    if s == Laterality::Both {
                        // Both sides only in the order: the images must
                        // show them.
                        doubt(&mut c, "both_sides_not_in_images");
                    }
                } else {
                    doubt(&mut c, "laterality_unknown");
                }
            }
        }
        out.push(c);
    }
    let bedside = units.iter().any(|u| u.text().any_of(BEDSIDE_WORDS))
        || sources
            .iter()
            .any(|(_, t)| Text::new(t).any_of(BEDSIDE_WORDS));
    match views {
        None => out,
        Some(seen) => {
            // A child's 正位 with no direction anywhere: the region's
            // convention (PA) is an adult's.
            let defaulted = seen.views.contains(&View::Frontal)
                && !seen.views.contains(&View::Pa)
                && !seen.views.contains(&View::Ap);
            let mut fitted = fit_views(list, part, seen, bedside, out);
            if defaulted && study.child && !bedside {
                for c in &mut fitted {
                    doubt(c, "frontal_view_of_a_child");
                }
            }
            fitted
        }
    }
}

fn study_kinds_of(list: &RecognitionList, t: &str) -> BTreeSet<Kind> {
    study_kinds(list, &Text::new(t))
}

/// What the region's images say of their views: per image (ViewPosition,
/// View Code Sequence), else the descriptions, with the number of images
/// as a check. `None` inside: no view known, or the descriptions claim
/// more views than there are images.
struct Seen {
    views: BTreeSet<View>,
    known: bool,
}

fn views_of(
    list: &RecognitionList,
    _part: &str,
    units: &[&Unit],
    study_views: &BTreeSet<View>,
    study_claims: &BTreeSet<View>,
    ledger: &mut Ledger,
) -> Seen {
    let mut per_image: BTreeSet<View> = BTreeSet::new();
    let mut images = 0;
    let mut without = 0;
    for u in units {
        let uid = u.series.series_instance_uid.as_str();
        for i in &u.instances {
            images += 1;
            if let Some(v) = view_of_position(&i.view_position) {
                per_image.insert(v);
                ledger.add("ViewPosition", &i.view_position, uid, &i.sop_instance_uid);
            } else if let Some(v) = views_in(list, &Text::new(&i.view_code)).into_iter().next() {
                per_image.insert(v);
                ledger.add("ViewCodeSequence", &i.view_code, uid, &i.sop_instance_uid);
            } else {
                without += 1;
            }
        }
    }
    if without == 0 {
        // Every image says its view; a description claiming more views
        // than there are images (正侧位 on one image) is still a doubt.
        let mut claimed: BTreeSet<View> = units
            .iter()
            .flat_map(|u| views_in(list, &u.text()))
            .collect();
        claimed.extend(study_claims.iter().copied());
        let claimed = claimed.iter().filter(|v| **v != View::Frontal).count()
            + usize::from(
                claimed.contains(&View::Frontal)
                    && !claimed.contains(&View::Pa)
                    && !claimed.contains(&View::Ap),
            );
        return Seen {
            known: claimed <= images,
            views: per_image,
        };
    }
    let mut described: BTreeSet<View> = BTreeSet::new();
    for u in units {
        let d = views_in(list, &u.text());
        if !d.is_empty() {
            ledger.add(
                "SeriesDescription",
                &u.series.series_description,
                &u.series.series_instance_uid,
                "",
            );
        }
        described.extend(d);
    }
    if described.is_empty() {
        described = study_views.clone();
    }
    let mut all = per_image;
    all.extend(described.iter().copied());
    // 正侧位 on one image: which one is it?
    let distinct = all.iter().filter(|v| **v != View::Frontal).count()
        + usize::from(
            all.contains(&View::Frontal) && !all.contains(&View::Pa) && !all.contains(&View::Ap),
        );
    Seen {
        known: !described.is_empty() && distinct <= images,
        views: all,
    }
}

/// Radiographs: the item with the most projections the views cover. No
/// view known: the region's smallest items, unconfirmed.
fn fit_views(
    list: &RecognitionList,
    part: &str,
    seen: Seen,
    bedside: bool,
    out: Vec<Classified>,
) -> Vec<Classified> {
    let frontal_default = if bedside {
        Some(Projection::Ap)
    } else {
        list.frontal_default.get(part).copied()
    };
    let covers = |p: &Projection| -> bool {
        let want = match p {
            Projection::Pa => View::Pa,
            Projection::Ap => View::Ap,
            Projection::Lateral => View::Lateral,
            Projection::Oblique => View::Oblique,
        };
        seen.views.contains(&want)
            || (matches!(p, Projection::Pa | Projection::Ap)
                && seen.views.contains(&View::Frontal)
                && frontal_default.is_none_or(|d| d == *p))
    };
    let projections = |c: &Classified| -> Vec<Projection> {
        list.item(&c.code)
            .map(|i| i.projections.clone())
            .unwrap_or_default()
    };
    let as_projections: Vec<Projection> = seen
        .views
        .iter()
        .filter_map(|v| match v {
            View::Pa => Some(Projection::Pa),
            View::Ap => Some(Projection::Ap),
            View::Lateral => Some(Projection::Lateral),
            View::Oblique => Some(Projection::Oblique),
            View::Frontal => frontal_default,
        })
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if !seen.known {
        let min = out.iter().map(|c| projections(c).len()).min().unwrap_or(0);
        return out
            .into_iter()
            .filter(|c| projections(c).len() == min)
            .map(|mut c| {
                doubt(&mut c, "views_unknown");
                c
            })
            .collect();
    }
    let fitting: Vec<Classified> = out
        .into_iter()
        .filter(|c| projections(c).iter().all(covers))
        .collect();
    let Some(max) = fitting.iter().map(|c| projections(c).len()).max() else {
        return Vec::new();
    };
    fitting
        .into_iter()
        .filter(|c| projections(c).len() == max)
        .map(|mut c| {
            c.views = as_projections.clone();
            c
        })
        .collect()
}

/// Codes through the code tables: agreeing with the images they confirm
/// them, saying less they give the lesser item, disagreeing they make the
/// images' items unconfirmed; where the images say nothing of a modality,
/// the code's item (of the images' modality only) stands.
fn apply_codes(
    list: &RecognitionList,
    study: &StudyAttributes,
    units: &[Unit],
    found: &mut Vec<Classified>,
) {
    let hospital = study.hospital_id.as_deref();
    let mut coded: Vec<(&Item, Evidence)> = Vec::new();
    let mut all: Vec<(&Code, &str)> = study.codes.iter().map(|c| (c, "")).collect();
    for u in units {
        all.extend(
            u.series
                .codes
                .iter()
                .map(|c| (c, u.series.series_instance_uid.as_str())),
        );
    }
    for (code, series) in all {
        for (table, item) in list.code_items(&code.scheme, &code.value, hospital) {
            if coded.iter().any(|(i, _)| i.code == item.code) {
                continue;
            }
            coded.push((
                item,
                Evidence {
                    attribute: format!("code table {}", table.name),
                    value: format!("{} {}", code.scheme.trim(), code.value.trim()),
                    series: if series.is_empty() {
                        Vec::new()
                    } else {
                        vec![series.to_string()]
                    },
                    instances: Vec::new(),
                },
            ));
        }
    }
    if coded.is_empty() {
        return;
    }
    let families: BTreeSet<String> = units.iter().map(|u| u.family.clone()).collect();
    // The families the images made items of (before any code's item).
    let imaged: BTreeSet<String> = found
        .iter()
        .filter_map(|c| list.item(&c.code).map(|i| family(&i.modality)))
        .collect();
    let mut disagree = false;
    let mut confirmed: BTreeSet<String> = BTreeSet::new();
    for (item, evidence) in &coded {
        let fam = family(&item.modality);
        if !families.contains(&fam) && !families.contains(&item.modality) {
            // A code of another modality than the images: the order and
            // the exam disagree. The code makes no item.
            disagree = true;
            continue;
        }
        let same_part: Vec<usize> = found
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                list.item(&c.code)
                    .is_some_and(|i| family(&i.modality) == fam && i.body_part == item.body_part)
            })
            .map(|(n, _)| n)
            .collect();
        let same_family = imaged.contains(&fam);
        if let Some(&n) = same_part.iter().find(|&&n| {
            list.satisfies(&found[n].code, &item.code) || list.satisfies(&item.code, &found[n].code)
        }) {
            let image_code = found[n].code.clone();
            if list.satisfies(&image_code, &item.code) && image_code != item.code {
                // The images show more than the code: the lesser item,
                // which the exam certainly is.
                found[n].code = item.code.clone();
                found[n].contrast = item.contrast;
            }
            found[n].evidence.push(evidence.clone());
            confirmed.insert(found[n].code.clone());
        } else if !same_family {
            // The images say nothing of this modality's region: the
            // code's item, with the images' sides where it needs one.
            let mut c = Classified {
                code: item.code.clone(),
                confidence: Confidence::Certain,
                laterality: None,
                views: Vec::new(),
                contrast: item.contrast,
                doubts: Vec::new(),
                evidence: vec![evidence.clone()],
            };
            // What the images say of their contrast for themselves (a
            // calcium score is plain) against the code's item (a CCTA):
            // the code never overrules them.
            let stated: BTreeSet<Kind> = units
                .iter()
                .filter(|u| u.family == fam && u.kind_explicit)
                .map(|u| u.kind)
                .collect();
            if !stated.is_empty() && !contrast_fits(item.contrast, &stated) {
                doubt(&mut c, "code_contradicts_images");
            }
            let sides: BTreeSet<Laterality> = units
                .iter()
                .filter(|u| u.family == fam)
                .flat_map(|u| {
                    side_of(&u.series.laterality).into_iter().chain(
                        u.instances
                            .iter()
                            .filter_map(|i| side_of(&i.image_laterality)),
                    )
                })
                .collect();
            match item.laterality {
                LateralityRule::Required => match sides.len() {
                    1 => c.laterality = sides.into_iter().next(),
                    0 => doubt(&mut c, "laterality_unknown"),
                    _ => c.laterality = Some(Laterality::Both),
                },
                LateralityRule::Both if sides.len() == 1 => continue,
                _ => {}
            }
            if !item.projections.is_empty() {
                let seen: BTreeSet<Projection> = units
                    .iter()
                    .filter(|u| u.family == fam)
                    .flat_map(|u| {
                        u.instances
                            .iter()
                            .filter_map(|i| Projection::from_view_position(&i.view_position))
                    })
                    .collect();
                if !item.projections.iter().all(|p| seen.contains(p)) {
                    doubt(&mut c, "views_unknown");
                }
                c.views = seen.into_iter().collect();
            }
            found.push(c);
            confirmed.insert(item.code.clone());
        } else {
            disagree = true;
        }
    }
    // Image items the codes do not confirm, where codes and images
    // disagree: unconfirmed (codes never overrule the images, and the
    // images do not overrule the order either).
    if disagree {
        for c in found.iter_mut() {
            if !confirmed.contains(&c.code) {
                doubt(c, "code_disagrees_with_images");
            }
        }
    }
}

fn unclassified(reason: &str) -> Classification {
    Classification {
        items: Vec::new(),
        unclassified: Some(reason.to_string()),
    }
}

fn done(mut items: Vec<Classified>) -> Classification {
    items.sort_by(|a, b| a.code.cmp(&b.code));
    items.dedup_by(|b, a| {
        if a.code == b.code {
            // The same item twice (two regions, a rule): the more doubtful
            // reading stays.
            if b.confidence > a.confidence {
                a.confidence = b.confidence;
                a.doubts.append(&mut b.doubts);
            }
            true
        } else {
            false
        }
    });
    Classification {
        items,
        unclassified: None,
    }
}

/// Repairs header text dicom-rs decoded under the wrong character set:
/// GBK/GB18030 bytes in a data set whose Specific Character Set is empty
/// (decoded as ISO 8859-1, so each byte is one char up to U+00FF), and the
/// ISO 2022 escapes, read by crate::charset as the index reads them.
/// `specific_character_set` is the data set's (0008,0005) as written.
pub fn repair_text(text: &str, specific_character_set: &str) -> String {
    // ISO 2022 escapes: what follows each is read in the set it designates
    // (the same decoding the index applies).
    let had_escape = text.contains('\u{1b}');
    let terms: Vec<&str> = specific_character_set.split('\\').collect();
    let stripped = crate::charset::decode_code_extensions(text, &terms);
    let scs = specific_character_set.to_ascii_uppercase();
    let default_repertoire = scs
        .split('\\')
        .next()
        .map(|first| {
            first.trim().is_empty() || first.trim() == "ISO_IR 6" || first.trim() == "ISO 2022 IR 6"
        })
        .unwrap_or(true);
    let latin1_bytes = stripped.chars().all(|c| (c as u32) <= 0xFF)
        && stripped.chars().any(|c| (c as u32) >= 0x80);
    if (default_repertoire || had_escape || scs.contains("IR 58")) && latin1_bytes {
        let bytes: Vec<u8> = stripped.chars().map(|c| c as u32 as u8).collect();
        if let Some(decoded) =
            encoding_rs::GB18030.decode_without_bom_handling_and_without_replacement(&bytes)
        {
            return decoded.into_owned();
        }
    }
    // Code strings (CS: BodyPartExamined) are of the default repertoire in
    // the standard, so a library may decode them byte by byte even under
    // ISO_IR 192 or GB18030, where modalities write Chinese in them: decode
    // them in the declared set.
    if latin1_bytes
        && (scs.contains("ISO_IR 192") || scs.contains("GB18030") || scs.contains("GBK"))
    {
        let bytes: Vec<u8> = stripped.chars().map(|c| c as u32 as u8).collect();
        let decoded = if scs.contains("ISO_IR 192") {
            String::from_utf8(bytes).ok()
        } else {
            encoding_rs::GB18030
                .decode_without_bom_handling_and_without_replacement(&bytes)
                .map(|d| d.into_owned())
        };
        if let Some(d) = decoded {
            return d;
        }
    }
    // Declared ISO_IR 100 (Latin-1), written in GBK by a Chinese RIS or
    // modality: repaired only when the bytes decode cleanly into Chinese of
    // two high bytes a character, as GB 2312 text is (a Latin-1 "Müller",
    // whose ü would pair with the l, stays).
    let latin1_declared = scs
        .split('\\')
        .next()
        .is_some_and(|first| first.trim() == "ISO_IR 100");
    if latin1_declared && latin1_bytes {
        let bytes: Vec<u8> = stripped.chars().map(|c| c as u32 as u8).collect();
        if let Some(decoded) =
            encoding_rs::GB18030.decode_without_bom_handling_and_without_replacement(&bytes)
            && bytes.iter().filter(|b| **b >= 0x80).count()
                == 2 * decoded.chars().filter(|c| !c.is_ascii()).count()
            && decoded.chars().filter(|c| !c.is_ascii()).all(|c| {
                ('\u{4E00}'..='\u{9FFF}').contains(&c)
                    || ('\u{3000}'..='\u{303F}').contains(&c)
                    || ('\u{FF00}'..='\u{FFEF}').contains(&c)
            })
        {
            return decoded.into_owned();
        }
    }
    stripped
}

#[cfg(test)]
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small list with the shapes of the shipped example, for the list's
    /// validation and the check's tests. The classification cases below
    /// run against the shipped list itself.
    pub(crate) const TEST_LIST: &str = r#"
[list]
version = "test-1"
region = "测试"
mark = "苏HR"
source = "unit tests"

[eligibility]
require_hospital_qc_passed = true
[[eligibility.rule]]
name = "二级甲等及以上互认"
prior_min_level = "二级甲等"
order_min_level = "二级甲等"
[[eligibility.rule]]
name = "二级乙等及以下互认"
prior_max_level = "二级乙等"
order_max_level = "二级乙等"
[[eligibility.rule]]
name = "下级认可二甲及以上"
prior_min_level = "二级甲等"
order_max_level = "二级乙等"
[[eligibility.rule]]
name = "医联体内互认"
same_group = true
[[eligibility.rule]]
name = "三级医院自愿认可下级"
order_min_level = "三级"
order_accepts_lower_level_results = true

[vocabulary]
enhanced = ["增强", "+C", "C+", "ENHANCED", "动脉期", "静脉期", "ZQ"]
plain = ["平扫", "PLAIN", "NON CONTRAST", "PS"]
angiography = ["CTA", "MRA", "TOF", "血管成像", "ANGIO"]
localizer = ["LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "定位"]
not_images = ["DOSE REPORT", "剂量报告", "PATIENT PROTOCOL"]
attenuation_ct = ["CTAC", "AC CT", "衰减校正", "CT FOR AC"]
left = ["左", "LEFT", "L"]
right = ["右", "RIGHT", "R"]
both = ["双侧", "双", "BILATERAL", "BOTH"]

[body_parts]
HEAD = ["HEAD", "BRAIN", "SKULL", "头颅", "头部", "颅脑", "脑", "TL", "TLPS"]
CHEST = ["CHEST", "THORAX", "LUNG", "胸部", "胸", "肺", "XB", "XBPS"]
ABDOMEN = ["ABDOMEN", "腹部", "上腹", "FB"]
TSPINE = ["TSPINE", "T-SPINE", "胸椎"]
LSPINE = ["LSPINE", "L-SPINE", "腰椎"]
KNEE = ["KNEE", "膝关节", "膝"]
BREAST = ["BREAST", "乳腺"]
WHOLEBODY = ["WHOLEBODY", "WHOLE BODY", "全身"]
CORONARY = ["CORONARY", "冠脉", "冠状动脉"]

[[item]]
code = "CT-01-01"
name_zh = "头颅CT平扫"
name_en = "Head CT, plain"
modality = "CT"
body_part = "HEAD"
contrast = "none"
window_days = 30
source = "test"

[[item]]
code = "CT-03-01"
name_zh = "胸部CT平扫"
name_en = "Chest CT, plain"
modality = "CT"
body_part = "CHEST"
contrast = "none"
window_days = 30
source = "test"

[[item]]
code = "CT-03-02"
name_zh = "胸部CT增强"
name_en = "Chest CT, enhanced"
modality = "CT"
body_part = "CHEST"
contrast = "enhanced"
window_days = 30
source = "test"

[[item]]
code = "CT-03-03"
name_zh = "胸部CT平扫+增强"
name_en = "Chest CT, plain and enhanced"
modality = "CT"
body_part = "CHEST"
contrast = "plain_and_enhanced"
window_days = 30
source = "test"
satisfies = ["CT-03-01", "CT-03-02"]

[[item]]
code = "CT-04-01"
name_zh = "腹部CT平扫"
name_en = "Abdomen CT, plain"
modality = "CT"
body_part = "ABDOMEN"
contrast = "none"
window_days = 30
source = "test"

[[item]]
code = "CT-05-01"
name_zh = "胸椎CT平扫"
name_en = "Thoracic spine CT, plain"
modality = "CT"
body_part = "TSPINE"
contrast = "none"
window_days = 30
source = "test"

[[item]]
code = "CT-09-04"
name_zh = "冠状动脉CTA"
name_en = "Coronary CTA"
modality = "CT"
body_part = "CORONARY"
contrast = "angiography"
window_days = 30
source = "test"

[[item]]
code = "MR-01-01"
name_zh = "头颅MR平扫"
name_en = "Head MR, plain"
modality = "MR"
body_part = "HEAD"
contrast = "none"
window_days = 90
source = "test"

[[item]]
code = "MR-01-04"
name_zh = "头颅MRA"
name_en = "Head MRA"
modality = "MR"
body_part = "HEAD"
contrast = "angiography"
window_days = 90
source = "test"

[[item]]
code = "MR-07-01"
name_zh = "膝关节MR平扫"
name_en = "Knee MR, plain"
modality = "MR"
body_part = "KNEE"
contrast = "none"
laterality = "required"
window_days = 90
source = "test"

[[item]]
code = "MR-06-01"
name_zh = "腰椎MR平扫"
name_en = "Lumbar spine MR, plain"
modality = "MR"
body_part = "LSPINE"
contrast = "none"
window_days = 90
source = "test"

[[item]]
code = "DX-03-01"
name_zh = "胸部正位片"
name_en = "Chest radiograph, PA"
modality = "DX"
body_part = "CHEST"
contrast = "none"
projections = ["PA"]
window_days = 14
source = "test"

[[item]]
code = "DX-03-02"
name_zh = "胸部正侧位片"
name_en = "Chest radiograph, PA and lateral"
modality = "DX"
body_part = "CHEST"
contrast = "none"
projections = ["PA", "LATERAL"]
window_days = 14
source = "test"
satisfies = ["DX-03-01"]

[[item]]
code = "DX-07-01"
name_zh = "膝关节正侧位片"
name_en = "Knee radiograph"
modality = "DX"
body_part = "KNEE"
contrast = "none"
laterality = "required"
window_days = 14
source = "test"

[[item]]
code = "MG-01-01"
name_zh = "乳腺钼靶"
name_en = "Mammography"
modality = "MG"
body_part = "BREAST"
contrast = "none"
laterality = "required"
window_days = 180
source = "test"

[[item]]
code = "US-04-01"
name_zh = "腹部超声"
name_en = "Abdominal ultrasound"
modality = "US"
body_part = "ABDOMEN"
contrast = "none"
window_days = 30
source = "test"

[[item]]
code = "PETCT-01"
name_zh = "全身PET-CT"
name_en = "Whole-body PET-CT"
modality = "PET-CT"
body_part = "WHOLEBODY"
contrast = "none"
window_days = 90
source = "test"

[[rule]]
name = "冠脉CTA (描述)"
item = "CT-09-04"
modality = ["CT"]
description = ["冠脉", "CORONARY"]

[[code_table]]
name = "region"
coding_scheme = "99TEST"
codes = { "CT0301" = "CT-03-01" }

[[code_table]]
name = "HOSPB charge items"
coding_scheme = "99HOSPB"
hospital_id = "HOSPB"
codes = { "250301001" = "CT-03-01" }

[[reason]]
code = "01"
name_zh = "病情变化"
name_en = "Condition changed"
counts_as_non_recognition = true

[[reason]]
code = "98"
name_zh = "未收到图像"
name_en = "No images received"
counts_as_non_recognition = false
"#;

    pub(crate) fn test_list() -> RecognitionList {
        RecognitionList::parse(TEST_LIST).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn shipped() -> RecognitionList {
        RecognitionList::parse(include_str!(
            "../../deploy/recognition/jiangsu-example.toml"
        ))
        .unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn s(m: &str, bp: &str, desc: &str) -> SeriesAttributes {
        SeriesAttributes {
            series_instance_uid: format!("1.2.3.{}", desc.len()),
            modality: m.into(),
            body_part_examined: bp.into(),
            series_description: desc.into(),
            image_type: "ORIGINAL\\PRIMARY\\AXIAL".into(),
            ..SeriesAttributes::default()
        }
    }

    fn with(mut x: SeriesAttributes, f: impl FnOnce(&mut SeriesAttributes)) -> SeriesAttributes {
        f(&mut x);
        x
    }

    fn agent(x: SeriesAttributes, a: &str) -> SeriesAttributes {
        with(x, |x| x.contrast_agent = a.into())
    }

    /// Instances: (ImageLaterality, ViewPosition).
    fn images(x: SeriesAttributes, i: &[(&str, &str)]) -> SeriesAttributes {
        with(x, |x| {
            x.instances = i
                .iter()
                .enumerate()
                .map(|(n, (l, v))| InstanceAttributes {
                    sop_instance_uid: format!("1.2.4.{n}"),
                    image_laterality: l.to_string(),
                    view_position: v.to_string(),
                    ..InstanceAttributes::default()
                })
                .collect()
        })
    }

    fn study(desc: &str, series: Vec<SeriesAttributes>) -> StudyAttributes {
        StudyAttributes {
            study_description: desc.into(),
            series,
            ..StudyAttributes::default()
        }
    }

    fn coded(mut st: StudyAttributes, value: &str, scheme: &str) -> StudyAttributes {
        st.codes.push(Code {
            value: value.into(),
            scheme: scheme.into(),
            meaning: String::new(),
        });
        st
    }

    fn hospital(mut st: StudyAttributes, h: &str) -> StudyAttributes {
        st.hospital_id = Some(h.into());
        st
    }

    /// Items as CODE[:side][?] (? = needs_confirmation), or "!reason".
    fn expect(c: &Classification) -> String {
        if let Some(r) = &c.unclassified {
            return format!("!{r}");
        }
        c.items
            .iter()
            .map(|i| {
                let side = i
                    .laterality
                    .map(|l| format!(":{}", serde_json::to_value(l).unwrap().as_str().unwrap()))
                    .unwrap_or_default();
                let q = if i.confidence == Confidence::Certain {
                    ""
                } else {
                    "?"
                };
                format!("{}{side}{q}", i.code)
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The rules of docs/recognition.md, a case or two each, against the
    /// shipped list (tests/recognition_table.rs runs 400 headers through the
    /// binary).
    #[test]
    fn classification_rules() {
        let list = shipped();
        let ct = |bp: &str, d: &str| s("CT", bp, d);
        let mr = |bp: &str, d: &str| s("MR", bp, d);
        let dx = |bp: &str, i: &[(&str, &str)]| images(s("DX", bp, ""), i);
        let lat = |x: SeriesAttributes, l: &str| with(x, |x| x.laterality = l.into());
        let cases: Vec<(&str, StudyAttributes, &str)> = vec![
            (
                "attribute alone",
                study("", vec![ct("CHEST", "5mm")]),
                "CT-0301-01",
            ),
            (
                "description and attribute agree",
                study("胸部CT平扫", vec![ct("CHEST", "Lung")]),
                "CT-0301-01",
            ),
            (
                "finer description wins: sinus",
                study("鼻窦CT平扫", vec![ct("HEAD", "1.25mm")]),
                "CT-0103-01",
            ),
            (
                "finer part without item: no item",
                study("骶髂关节CT", vec![ct("PELVIS", "Bone")]),
                "!no_item_matched",
            ),
            (
                "Head^Pituitary is not a head MR",
                study("Head^Pituitary", vec![mr("HEAD", "t1")]),
                "!no_item_matched",
            ),
            (
                "leftover CHEST against the study",
                study("颅脑CT平扫", vec![ct("CHEST", "5mm")]),
                "CT-0101-01?",
            ),
            (
                "leftover CHEST against the series",
                study("", vec![ct("CHEST", "Brain 5mm")]),
                "CT-0101-01?",
            ),
            (
                "全腹 is abdomen and pelvis",
                study("全腹CT平扫", vec![ct("ABDOMEN", "5mm")]),
                "CT-0401-01,CT-0501-01",
            ),
            (
                "upper abdomen alone",
                study("上腹部CT平扫", vec![ct("ABDOMEN", "5mm")]),
                "CT-0401-01",
            ),
            (
                "NONE is no contrast",
                study("CHEST", vec![agent(ct("CHEST", "5mm"), "NONE")]),
                "CT-0301-01",
            ),
            (
                "无 is no contrast",
                study("CHEST", vec![agent(ct("CHEST", "5mm"), "无")]),
                "CT-0301-01",
            ),
            (
                "oral water is not 增强",
                study(
                    "腹部CT",
                    vec![with(agent(ct("ABDOMEN", "5mm"), "WATER"), |x| {
                        x.contrast_route = "ORAL".into()
                    })],
                ),
                "CT-0401-01",
            ),
            (
                "plain and an agent",
                study(
                    "CHEST",
                    vec![ct("CHEST", "5mm"), agent(ct("CHEST", "5mm"), "OMNIPAQUE")],
                ),
                "CT-0301-03",
            ),
            (
                "a plain word wins over a copied agent",
                study("", vec![agent(ct("CHEST", "平扫"), "OMNIPAQUE")]),
                "CT-0301-01",
            ),
            (
                "study plain, series enhanced",
                study("胸部CT平扫", vec![agent(ct("CHEST", "5mm"), "Ultravist")]),
                "CT-0301-02?",
            ),
            (
                "CTA with its plain head",
                study("", vec![ct("HEAD", "Brain 5mm"), ct("HEAD", "CTA 0.625")]),
                "CT-0101-01,CT-0101-04",
            ),
            (
                "MRA with the plain head MR",
                study("", vec![mr("HEAD", "Ax T2"), mr("HEAD", "3D TOF")]),
                "MR-0101-01,MR-0101-04",
            ),
            (
                "head-neck CTA",
                study("头颈CTA", vec![ct("HEAD", "0.625")]),
                "CT-0204-04",
            ),
            (
                "coronary CTA by the study's words",
                study("冠脉CTA", vec![ct("HEART", "Cardiac 75%")]),
                "CT-0303-04",
            ),
            (
                "calcium score is not a CTA",
                study("冠脉钙化积分", vec![ct("HEART", "Score")]),
                "!no_item_matched",
            ),
            (
                "coronary angiography, XA",
                study("冠状动脉造影", vec![s("XA", "", "")]),
                "XA-0303-04",
            ),
            (
                "localizer only",
                study(
                    "CHEST",
                    vec![with(ct("CHEST", "x"), |x| {
                        x.image_type = "ORIGINAL\\PRIMARY\\LOCALIZER".into()
                    })],
                ),
                "!no_diagnostic_series",
            ),
            (
                "ASSET calibration only",
                study("头颅MR", vec![mr("HEAD", "ASSET Cal")]),
                "!no_diagnostic_series",
            ),
            (
                "secondary capture with Modality CT",
                study(
                    "胸部CT",
                    vec![with(ct("CHEST", "report"), |x| {
                        x.sop_class_uid = "1.2.840.10008.5.1.4.1.1.7".into()
                    })],
                ),
                "!no_diagnostic_series",
            ),
            (
                "PET-CT is not a chest CT",
                study(
                    "PET/CT",
                    vec![s("PT", "WHOLEBODY", "PET WB"), ct("CHEST", "Chest 1.0")],
                ),
                "PETCT-0901-01",
            ),
            (
                "a PET-CT's CT alone",
                study("PET/CT", vec![ct("CHEST", "Chest 1.0")]),
                "!no_diagnostic_series",
            ),
            (
                "four-view mammogram in one series",
                study(
                    "MAMMO",
                    vec![images(
                        s("MG", "BREAST", ""),
                        &[("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO")],
                    )],
                ),
                "MG-0304-01:B",
            ),
            (
                "mammogram ordered both, one side imaged",
                study(
                    "双乳钼靶",
                    vec![images(s("MG", "BREAST", ""), &[("L", "CC"), ("L", "MLO")])],
                ),
                "MG-0304-01?",
            ),
            (
                "knees, one side per image",
                study(
                    "",
                    vec![dx(
                        "KNEE",
                        &[("L", "AP"), ("L", "LL"), ("R", "AP"), ("R", "LL")],
                    )],
                ),
                "DX-0802-02:B",
            ),
            (
                "chest PA + lateral in one series",
                study("", vec![dx("CHEST", &[("", "PA"), ("", "LL")])]),
                "DX-0301-02",
            ),
            (
                "a chest 正位 is PA",
                study("胸部正位", vec![dx("CHEST", &[("", "")])]),
                "DX-0301-01",
            ),
            (
                "a chest without a view",
                study("胸部DR", vec![dx("CHEST", &[("", "")])]),
                "DX-0301-01?,DX-0301-05?",
            ),
            (
                "chest PA and abdomen AP: two items",
                study(
                    "",
                    vec![dx("CHEST", &[("", "PA")]), dx("ABDOMEN", &[("", "AP")])],
                ),
                "DX-0301-01,DX-0401-01",
            ),
            (
                "side conflict",
                study("右膝关节MR平扫", vec![lat(mr("KNEE", "PD"), "L")]),
                "MR-0802-01?",
            ),
            (
                "side unknown",
                study("KNEE", vec![mr("KNEE", "PD")]),
                "MR-0802-01?",
            ),
            (
                "a left hip never earns the both-hips item",
                study("左髋关节MR", vec![lat(mr("HIP", "STIR"), "L")]),
                "!no_item_matched",
            ),
            (
                "full-width text",
                study("胸部ＣＴ平扫", vec![ct("", "５ｍｍ")]),
                "CT-0301-01",
            ),
            (
                "CXR",
                study("CXR PA", vec![dx("", &[("", "PA")])]),
                "DX-0301-01",
            ),
            (
                "the region's code",
                coded(study("", vec![ct("", "5mm")]), "CT0301", "99JSHR"),
                "CT-0301-01",
            ),
            (
                "a code without its scheme",
                coded(study("", vec![ct("", "5mm")]), "CT0301", ""),
                "!body_part_unknown",
            ),
            (
                "a code of another modality",
                coded(study("", vec![mr("HEAD", "t2")]), "CT0301", "99JSHR"),
                "MR-0101-01?",
            ),
            (
                "a code of another region",
                coded(
                    study("头颅CT平扫", vec![ct("HEAD", "5mm")]),
                    "CT0301",
                    "99JSHR",
                ),
                "CT-0101-01?",
            ),
            (
                "a code that says less than the images",
                coded(
                    study(
                        "",
                        vec![ct("CHEST", "5mm"), agent(ct("CHEST", "5mm"), "OMNIPAQUE")],
                    ),
                    "CT0301",
                    "99JSHR",
                ),
                "CT-0301-01",
            ),
            (
                "a hospital's code at another hospital",
                hospital(
                    coded(study("", vec![ct("", "5mm")]), "210300001-03", "99NJSF"),
                    "OTHER",
                ),
                "!body_part_unknown",
            ),
            (
                "a hospital's code",
                hospital(
                    coded(study("", vec![ct("", "5mm")]), "210300001-03", "99NJSF"),
                    "91320100466000002B",
                ),
                "CT-0301-01",
            ),
        ];
        let mut failures = Vec::new();
        for (name, st, want) in &cases {
            let got = expect(&classify(&list, st));
            if &got != want {
                failures.push(format!("{name}: got {got}, want {want}"));
            }
        }
        assert!(
            failures.is_empty(),
            "{} failures:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn evidence_names_attributes_series_and_instances() {
        let list = shipped();
        let st = study(
            "胸部正侧位",
            vec![images(s("DX", "CHEST", ""), &[("", "PA"), ("", "LL")])],
        );
        let c = classify(&list, &st);
        let item = &c.items[0];
        assert_eq!(item.confidence, Confidence::Certain);
        let vp: Vec<&Evidence> = item
            .evidence
            .iter()
            .filter(|e| e.attribute == "ViewPosition")
            .collect();
        assert_eq!(vp.len(), 2, "{:?}", item.evidence);
        assert_eq!(vp[1].instances, vec!["1.2.4.1".to_string()]);
        assert!(
            item.evidence
                .iter()
                .any(|e| e.attribute == "BodyPartExamined" && e.value == "CHEST")
        );
        assert!(
            item.evidence
                .iter()
                .any(|e| e.attribute == "StudyDescription")
        );
        let st = coded(study("", vec![s("CT", "CHEST", "5mm")]), "CT0301", "99JSHR");
        let c = classify(&list, &st);
        assert!(
            c.items[0]
                .evidence
                .iter()
                .any(|e| e.attribute.starts_with("code table") && e.value == "99JSHR CT0301"),
            "{:?}",
            c.items[0].evidence
        );
    }

    #[test]
    fn text_repair() {
        // GBK bytes of 胸部平扫 under an empty Specific Character Set, as
        // dicom-rs decodes them (ISO 8859-1: one char per byte).
        let gbk: Vec<u8> = encoding_rs::GBK.encode("胸部平扫").0.into_owned();
        let latin1: String = gbk.iter().map(|&b| b as char).collect();
        assert_eq!(repair_text(&latin1, ""), "胸部平扫");
        assert_eq!(repair_text(&latin1, "ISO_IR 6"), "胸部平扫");
        // ISO 2022 IR 58: escape designators left in by a GBK decode.
        assert_eq!(
            repair_text("\u{1b}$)A胸部\u{1b}(B CT", "ISO 2022 IR 58"),
            "胸部 CT"
        );
        // The same bytes with designators, decoded as Latin-1 (first value
        // of "\ISO 2022 IR 58" is empty).
        let mut ir58 = vec![0x1b, b'$', b')', b'A'];
        ir58.extend(&gbk);
        let latin1: String = ir58.iter().map(|&b| b as char).collect();
        assert_eq!(repair_text(&latin1, "\\ISO 2022 IR 58"), "胸部平扫");
        // GB18030 decoded right is left alone; Latin-1 text under ISO_IR 100 too.
        assert_eq!(repair_text("胸部CT", "GB18030"), "胸部CT");
        assert_eq!(repair_text("Müller", "ISO_IR 100"), "Müller");
        // GBK bytes under a declared ISO_IR 100 (Latin-1).
        let gbk_latin1: String = gbk.iter().map(|&b| b as char).collect();
        assert_eq!(repair_text(&gbk_latin1, "ISO_IR 100"), "胸部平扫");
        // UTF-8 bytes of a code string (BodyPartExamined 胸部) decoded byte
        // by byte under ISO_IR 192.
        let utf8_latin1: String = "胸部".bytes().map(|b| b as char).collect();
        assert_eq!(repair_text(&utf8_latin1, "ISO_IR 192"), "胸部");
        assert_eq!(repair_text("CHEST", ""), "CHEST");
    }

    #[test]
    fn matching_words() {
        let m = |text: &str, p: &str| !spans(&normalize(text), p).is_empty();
        assert!(!m("LUMBAR", "L"));
        assert!(m("L KNEE", "L"));
        assert!(m("XBPS", "XBPS"));
        assert!(m("CHEST C+", "C+"));
        assert!(!m("ABC+", "C+"));
        // Plus words glued to their neighbours, not inside longer letters.
        assert!(m("Routine Abd+C", "+C"));
        assert!(m("T1WI+C AX", "+C"));
        assert!(m("CT HEAD PLAIN+C+", "+C"));
        assert!(m("CT HEAD PLAIN+C+", "C+"));
        assert!(!m("PET+CT", "+C"));
        assert!(!m("CHEST PA+LAT", "+C"));
        assert!(m("CHEST PA+LAT", "PA"));
        assert!(m("Chest non contrast", "NON CONTRAST"));
        assert!(m("SI Joints 1.0", "SI JOINT"));
        assert!(m("L-Spine 2.0", "L-SPINE"));
        assert!(m("胸部ＣＴ", "胸部CT"));
        assert!(m("ＣＨＥＳＴ", "CHEST"));
        assert!(m("胸部CT", "胸"));
    }
}
