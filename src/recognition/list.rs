//! The mutual-recognition item list: data, not code.
//!
//! A region publishes it as a TOML file (docs/recognition.md describes the
//! format; deploy/recognition/jiangsu-example.toml is the shipped example):
//! items with their validity windows and marks, `satisfies` relations,
//! body-part vocabularies and matching rules from DICOM attributes to items,
//! per-hospital tables of local charge-item codes, eligibility rules between
//! hospitals, and the reasons a doctor may give to repeat an exam.
//!
//! [`RecognitionList::parse`] validates everything and reports every error
//! with its line and field; an invalid list is never activated.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::contract::Level;

/// Modalities an item may name (PS3.3 C.7.3.1.1.1), plus PET-CT for a
/// study with PT and diagnostic CT series.
pub const MODALITIES: &[&str] = &[
    "CT", "MR", "DX", "CR", "MG", "US", "PT", "PET-CT", "NM", "XA", "RF", "DR", "ES", "OCT",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemContrast {
    /// 平扫.
    None,
    /// 增强.
    Enhanced,
    /// 平扫+增强.
    PlainAndEnhanced,
    /// 血管成像 (CTA, MRA including non-contrast TOF).
    Angiography,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LateralityRule {
    /// The side plays no part (chest, head).
    None,
    /// The side is part of the match: a left knee MR does not recognise a
    /// right one.
    Required,
    /// The item is of both sides (髋关节MR（双侧）, 乳腺超声（双侧）): a study
    /// whose images show one side only never earns it.
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Projection {
    Pa,
    Ap,
    Lateral,
    Oblique,
}

impl Projection {
    /// A DICOM ViewPosition (PS3.3 C.8.11.5.1.1) as a projection.
    pub fn from_view_position(v: &str) -> Option<Projection> {
        match v.trim().to_ascii_uppercase().as_str() {
            "PA" => Some(Projection::Pa),
            "AP" => Some(Projection::Ap),
            "LL" | "RL" | "LAT" | "LATERAL" | "LLD" | "RLD" => Some(Projection::Lateral),
            "LAO" | "RAO" | "LPO" | "RPO" | "OBL" | "OBLIQUE" => Some(Projection::Oblique),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListMeta {
    /// The list's own version (e.g. "2026.1"); the content hash identifies
    /// the exact text.
    pub version: String,
    pub region: String,
    /// The mark recognised results carry (苏HR).
    pub mark: String,
    pub source: String,
    #[serde(default)]
    pub effective_from: Option<String>,
}

/// One recognisable imaging item.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// Structured like DB34/T 4791: exam type + body part + scan mode
    /// (CT-0301-01: CT, chest, plain).
    pub code: String,
    pub name_zh: String,
    pub name_en: String,
    pub modality: String,
    /// The canonical body part (a key of [`RecognitionList::body_parts`]).
    pub body_part: String,
    /// WS/T 364.8 code of the body part, where known.
    #[serde(default)]
    pub wst364: Option<String>,
    pub contrast: ItemContrast,
    #[serde(default = "no_laterality")]
    pub laterality: LateralityRule,
    /// Radiographs: the projections the item comprises.
    #[serde(default)]
    pub projections: Vec<Projection>,
    pub window_days: i64,
    /// true: the window is a regional default (no published per-item
    /// window was found; recognition-facts.md), not a published rule.
    #[serde(default)]
    pub window_is_default: bool,
    /// Overrides the list's mark.
    #[serde(default)]
    pub mark: Option<String>,
    #[serde(default)]
    pub effective_from: Option<String>,
    #[serde(default)]
    pub effective_to: Option<String>,
    pub source: String,
    /// Codes of the items a study of this item also counts as (a plain +
    /// enhanced study satisfies the plain order and the enhanced one).
    #[serde(default)]
    pub satisfies: Vec<String>,
    /// Refused by validation: a code value means nothing without its coding
    /// scheme designator (and hospital). Codes go in a `[[code_table]]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<String>,
}

fn no_laterality() -> LateralityRule {
    LateralityRule::None
}

/// An explicit matching rule: when every given condition holds, the study
/// is this item. Values of one condition are alternatives; text patterns
/// are case-insensitive substrings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    pub item: String,
    #[serde(default)]
    pub modality: Vec<String>,
    /// Against BodyPartExamined.
    #[serde(default)]
    pub body_part_examined: Vec<String>,
    /// Against StudyDescription, SeriesDescription, ProtocolName and
    /// RequestedProcedureDescription.
    #[serde(default)]
    pub description: Vec<String>,
    /// Any of these in a description vetoes the rule.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Refused by validation: codes go in a `[[code_table]]` with their
    /// coding scheme designator.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<String>,
}

/// The former per-hospital table without a coding scheme: refused by
/// validation with a pointer to `[[code_table]]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCodes {
    pub hospital_id: String,
    pub codes: BTreeMap<String, String>,
}

/// A code table: procedure, protocol or charge-item codes of ONE coding
/// scheme (the CodingSchemeDesignator written beside the CodeValue in
/// ProcedureCodeSequence, RequestedProcedureCodeSequence,
/// RequestAttributesSequence/ScheduledProtocolCodeSequence or
/// PerformedProtocolCodeSequence), and optionally of one hospital, mapped to
/// items. `CT0301` of one hospital's RIS is not `CT0301` of another's: a code
/// is evidence only through a table of its scheme (and hospital); a code of
/// an unknown scheme is ignored (recognition-facts.md, "Rules huren keeps").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeTable {
    pub name: String,
    /// CodingSchemeDesignator (0008,0102) as the hospital's systems write
    /// it; compared without regard to case.
    pub coding_scheme: String,
    /// The hospital (its ID in the directory) whose codes these are; none:
    /// the scheme is the region's own and means the same everywhere.
    #[serde(default)]
    pub hospital_id: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    /// Code value → item code.
    pub codes: BTreeMap<String, String>,
}

/// A reason a doctor may give to repeat an exam anyway.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    pub code: String,
    pub name_zh: String,
    pub name_en: String,
    /// false for 98 (no images received) and 99 (serial monitoring): these
    /// are not counted as non-recognition.
    pub counts_as_non_recognition: bool,
}

/// One way a prior's hospital can be eligible for the ordering hospital.
/// Every condition given must hold; a prior is eligible when any rule
/// holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EligibilityRule {
    pub name: String,
    #[serde(default)]
    pub prior_min_level: Option<Level>,
    #[serde(default)]
    pub prior_max_level: Option<Level>,
    #[serde(default)]
    pub order_min_level: Option<Level>,
    #[serde(default)]
    pub order_max_level: Option<Level>,
    /// The two hospitals share a medical group or community.
    #[serde(default)]
    pub same_group: bool,
    /// The two hospitals have the same level.
    #[serde(default)]
    pub same_level: bool,
    /// The prior's hospital is at least the ordering hospital's level.
    #[serde(default)]
    pub prior_at_least_order_level: bool,
    /// The ordering hospital opted in to accept lower-level results.
    #[serde(default)]
    pub order_accepts_lower_level_results: bool,
    #[serde(default)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eligibility {
    /// The prior's hospital must have passed QC (the directory's status).
    #[serde(default = "yes")]
    pub require_hospital_qc_passed: bool,
    #[serde(rename = "rule")]
    pub rules: Vec<EligibilityRule>,
}

fn yes() -> bool {
    true
}

/// Words that tell the classifier what a series is, as data: Chinese,
/// English and pinyin abbreviations as real headers carry them. ASCII words
/// of three letters or more match the start of a word of the header text,
/// shorter ones a whole word; Chinese words match anywhere.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vocabulary {
    /// A series described so is enhanced (when its contrast attributes are
    /// absent, as they often are).
    pub enhanced: Vec<String>,
    /// A series described so is plain, whatever else it says.
    pub plain: Vec<String>,
    /// Angiography (CTA, MRA, non-contrast TOF).
    pub angiography: Vec<String>,
    /// Localizer / scout series: not the exam.
    pub localizer: Vec<String>,
    /// Dose reports and screen captures of protocols: not the exam.
    pub not_images: Vec<String>,
    /// The CT of a PET-CT that only corrects attenuation: not a diagnostic CT.
    pub attenuation_ct: Vec<String>,
    pub left: Vec<String>,
    pub right: Vec<String>,
    pub both: Vec<String>,
    /// Calibration and coil-sensitivity scans (ASSET calibration, SENSE
    /// reference, CLEAR reference, coil survey): not the exam.
    #[serde(default)]
    pub calibration: Vec<String>,
    /// Whole ContrastBolusAgent values that mean no agent (NONE, N/A, 无,
    /// 未用, -): compared with the trimmed value, case-insensitive.
    #[serde(default)]
    pub no_contrast_agent: Vec<String>,
    /// Agents given by mouth (water, mannitol, diatrizoate): alone they do
    /// not make an enhanced (增强) scan.
    #[serde(default)]
    pub oral_agent: Vec<String>,
    /// ContrastBolusRoute values for the mouth.
    #[serde(default)]
    pub oral_route: Vec<String>,
    /// Words of a study description that make the study a PET exam (its CT
    /// or MR series are part of it, never a CT or MR exam of their own).
    #[serde(default)]
    pub pet_study: Vec<String>,
    /// Modalities whose images are angiography by nature (XA: DSA).
    #[serde(default)]
    pub angiography_modalities: Vec<String>,
    /// Radiograph views in descriptions and View Code Sequence meanings.
    #[serde(default)]
    pub view_pa: Vec<String>,
    #[serde(default)]
    pub view_ap: Vec<String>,
    #[serde(default)]
    pub view_lateral: Vec<String>,
    #[serde(default)]
    pub view_oblique: Vec<String>,
    /// A frontal view whose direction is not said (正位): the item's PA or
    /// AP, or the body part's `[frontal_default]`.
    #[serde(default)]
    pub view_frontal: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListFile {
    list: ListMeta,
    eligibility: Eligibility,
    vocabulary: Vocabulary,
    #[serde(default)]
    body_parts: BTreeMap<String, Vec<String>>,
    #[serde(default, rename = "item")]
    items: Vec<Spanned<Item>>,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<Rule>>,
    #[serde(default, rename = "local_codes")]
    local_codes: Vec<Spanned<LocalCodes>>,
    #[serde(default, rename = "code_table")]
    code_tables: Vec<Spanned<CodeTable>>,
    #[serde(default)]
    body_part_contains: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    body_part_groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    frontal_default: BTreeMap<String, Projection>,
    #[serde(default, rename = "reason")]
    reasons: Vec<Spanned<Reason>>,
}

/// A validated list.
#[derive(Debug, Clone, Serialize)]
pub struct RecognitionList {
    pub meta: ListMeta,
    /// BLAKE3 of the file's bytes: the version every warning records and
    /// the ETag the registry serves it under.
    pub content_hash: String,
    pub eligibility: Eligibility,
    pub vocabulary: Vocabulary,
    /// Canonical body part → synonyms (DICOM values, Chinese, pinyin
    /// abbreviations), matched against BodyPartExamined and descriptions.
    pub body_parts: BTreeMap<String, Vec<String>>,
    pub items: Vec<Item>,
    pub rules: Vec<Rule>,
    pub code_tables: Vec<CodeTable>,
    /// Coarse part → the finer parts it holds (HEAD → SINUS, TEMPORALBONE):
    /// a description naming the finer part wins over a coarse
    /// BodyPartExamined, and a finer part without an item gives no item.
    pub body_part_contains: BTreeMap<String, Vec<String>>,
    /// A part that is several parts at once (全腹 = ABDOMEN + PELVIS): where
    /// it has no item of its own, a study of it is each member's item.
    pub body_part_groups: BTreeMap<String, Vec<String>>,
    /// The projection a frontal view (正位) of a body part means, where the
    /// list has items for both PA and AP (a chest 正位 is PA by convention).
    pub frontal_default: BTreeMap<String, Projection>,
    pub reasons: Vec<Reason>,
    #[serde(skip)]
    by_code: HashMap<String, usize>,
}

/// One problem of a list, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    pub line: usize,
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.message)
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

fn valid_date(s: &str) -> bool {
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

impl RecognitionList {
    /// Parses and validates; every problem found is reported, not only the
    /// first.
    pub fn parse(text: &str) -> Result<RecognitionList, Vec<ListError>> {
        let file: ListFile = toml::from_str(text).map_err(|e| {
            vec![ListError {
                line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
                field: "(syntax)".into(),
                message: e.message().to_string(),
            }]
        })?;
        let mut errors = Vec::new();
        let mut err = |offset: usize, field: String, message: String| {
            errors.push(ListError {
                line: line_of(text, offset),
                field,
                message,
            });
        };
        let meta_line = text.find("[list]").unwrap_or(0);
        if file.list.version.trim().is_empty() {
            err(meta_line, "list.version".into(), "missing".into());
        }
        if file.list.mark.trim().is_empty() {
            err(meta_line, "list.mark".into(), "missing".into());
        }
        let elig_line = text.find("[eligibility").unwrap_or(0);
        if file.eligibility.rules.is_empty() {
            err(
                elig_line,
                "eligibility.rule".into(),
                "no eligibility rule: no prior could ever count".into(),
            );
        }
        let mut codes: HashMap<&str, usize> = HashMap::new();
        for (i, item) in file.items.iter().enumerate() {
            let at = item.span().start;
            let it = item.get_ref();
            let f = |name: &str| format!("item {}: {name}", it.code);
            if it.code.trim().is_empty() {
                err(at, "item.code".into(), "missing".into());
            } else if codes.insert(it.code.as_str(), i).is_some() {
                err(at, f("code"), "duplicate item code".into());
            }
            if it.name_zh.trim().is_empty() {
                err(at, f("name_zh"), "missing name".into());
            }
            if it.name_en.trim().is_empty() {
                err(at, f("name_en"), "missing name".into());
            }
            if !MODALITIES.contains(&it.modality.as_str()) {
                err(
                    at,
                    f("modality"),
                    format!("unknown modality {:?}", it.modality),
                );
            }
            if !file.body_parts.contains_key(&it.body_part) {
                err(
                    at,
                    f("body_part"),
                    format!("{:?} is not a key of [body_parts]", it.body_part),
                );
            }
            if it.window_days <= 0 {
                err(
                    at,
                    f("window_days"),
                    format!("{} is not > 0", it.window_days),
                );
            }
            for (name, d) in [
                ("effective_from", &it.effective_from),
                ("effective_to", &it.effective_to),
            ] {
                if let Some(d) = d
                    && !valid_date(d)
                {
                    err(at, f(name), format!("{d:?} is not YYYY-MM-DD"));
                }
            }
            if !it.projections.is_empty() && !matches!(it.modality.as_str(), "DX" | "CR" | "DR") {
                err(
                    at,
                    f("projections"),
                    "projections are for radiographs (DX, CR)".into(),
                );
            }
            if it.source.trim().is_empty() {
                err(at, f("source"), "missing source reference".into());
            }
        }
        // Two items a study cannot be told apart by are an overlap.
        let mut signatures: HashMap<
            (
                String,
                String,
                ItemContrast,
                LateralityRule,
                Vec<Projection>,
            ),
            &str,
        > = HashMap::new();
        for item in &file.items {
            let it = item.get_ref();
            let mut projections = it.projections.clone();
            projections.sort();
            let sig = (
                it.modality.clone(),
                it.body_part.clone(),
                it.contrast,
                it.laterality,
                projections,
            );
            if let Some(other) = signatures.insert(sig, it.code.as_str()) {
                err(
                    item.span().start,
                    format!("item {}", it.code),
                    format!(
                        "overlaps item {other}: same modality, body part, contrast, laterality and projections"
                    ),
                );
            }
        }
        for item in &file.items {
            let it = item.get_ref();
            for s in &it.satisfies {
                if !codes.contains_key(s.as_str()) {
                    err(
                        item.span().start,
                        format!("item {}: satisfies", it.code),
                        format!("unknown item {s:?}"),
                    );
                } else if s == &it.code {
                    err(
                        item.span().start,
                        format!("item {}: satisfies", it.code),
                        "an item satisfies itself already".into(),
                    );
                }
            }
        }
        // satisfies cycles: depth-first search over the relation.
        let graph: HashMap<&str, Vec<&str>> = file
            .items
            .iter()
            .map(|i| {
                let it = i.get_ref();
                (
                    it.code.as_str(),
                    it.satisfies.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        let mut reported = BTreeSet::new();
        for item in &file.items {
            let start = item.get_ref().code.as_str();
            let mut stack = vec![(start, vec![start])];
            while let Some((node, path)) = stack.pop() {
                for &next in graph.get(node).into_iter().flatten() {
                    if next == start && path.len() > 1 {
                        let mut cycle: Vec<&str> = path.clone();
                        cycle.sort();
                        if reported.insert(cycle.join(",")) {
                            err(
                                item.span().start,
                                format!("item {start}: satisfies"),
                                format!("cycle: {} -> {start}", path.join(" -> ")),
                            );
                        }
                    } else if !path.contains(&next) {
                        let mut p = path.clone();
                        p.push(next);
                        stack.push((next, p));
                    }
                }
            }
        }
        // A code value alone means nothing (CT0301 of one hospital's RIS
        // is not CT0301 of another's): codes live in code tables with their
        // coding scheme designator.
        const CODES_MOVED: &str = "a code value means nothing without its coding scheme designator (and hospital): put it in a [[code_table]] with coding_scheme";
        for item in &file.items {
            if !item.get_ref().codes.is_empty() {
                err(
                    item.span().start,
                    format!("item {}: codes", item.get_ref().code),
                    CODES_MOVED.into(),
                );
            }
        }
        for table in &file.local_codes {
            err(
                table.span().start,
                format!("local_codes {}", table.get_ref().hospital_id),
                CODES_MOVED.into(),
            );
        }
        let mut rule_signatures: HashMap<String, (&str, &str)> = HashMap::new();
        for rule in &file.rules {
            let at = rule.span().start;
            let r = rule.get_ref();
            let f = |name: &str| format!("rule {:?}: {name}", r.name);
            if r.name.trim().is_empty() {
                err(at, "rule.name".into(), "missing name".into());
            }
            if !codes.contains_key(r.item.as_str()) {
                err(at, f("item"), format!("unknown item {:?}", r.item));
            }
            for m in &r.modality {
                if !MODALITIES.contains(&m.as_str()) {
                    err(at, f("modality"), format!("unknown modality {m:?}"));
                }
            }
            if !r.codes.is_empty() {
                err(at, f("codes"), CODES_MOVED.into());
            }
            if r.body_part_examined.is_empty() && r.description.is_empty() {
                err(at, f("(conditions)"), "a rule needs body_part_examined or description: modality alone matches too much".into());
            }
            let mut sig = [
                r.modality.clone(),
                r.body_part_examined.clone(),
                r.description.clone(),
                r.exclude.clone(),
            ];
            for v in &mut sig {
                for s in v.iter_mut() {
                    *s = s.to_lowercase();
                }
                v.sort();
            }
            let key = format!("{sig:?}");
            if let Some((other_name, other_item)) =
                rule_signatures.insert(key, (r.name.as_str(), r.item.as_str()))
                && other_item != r.item
            {
                err(
                    at,
                    f("(conditions)"),
                    format!(
                        "overlaps rule {other_name:?}: the same conditions name item {other_item}"
                    ),
                );
            }
        }
        // Code tables: a scheme, known items, and one meaning per (scheme,
        // hospital, code value).
        let mut code_meaning: HashMap<(String, Option<String>, String), &str> = HashMap::new();
        for table in &file.code_tables {
            let at = table.span().start;
            let t = table.get_ref();
            let f = |name: &str| format!("code_table {:?}: {name}", t.name);
            if t.name.trim().is_empty() {
                err(at, "code_table.name".into(), "missing name".into());
            }
            if t.coding_scheme.trim().is_empty() {
                err(
                    at,
                    f("coding_scheme"),
                    "missing: a code table is of one coding scheme designator".into(),
                );
            }
            if t.hospital_id
                .as_deref()
                .is_some_and(|h| h.trim().is_empty())
            {
                err(
                    at,
                    f("hospital_id"),
                    "empty: omit it for a region-wide scheme".into(),
                );
            }
            if t.codes.is_empty() {
                err(at, f("codes"), "no codes".into());
            }
            for (value, item) in &t.codes {
                if !codes.contains_key(item.as_str()) {
                    err(
                        at,
                        f(&format!("codes.{value}")),
                        format!("unknown item {item:?}"),
                    );
                }
                let key = (
                    t.coding_scheme.trim().to_uppercase(),
                    t.hospital_id.clone(),
                    value.trim().to_string(),
                );
                if let Some(other) = code_meaning.insert(key, item.as_str())
                    && other != item
                {
                    err(
                        at,
                        f(&format!("codes.{value}")),
                        format!(
                            "the same scheme and hospital already map {value:?} to item {other}"
                        ),
                    );
                }
            }
        }
        // Body-part relations name known parts.
        for (table, relation) in [
            ("body_part_contains", &file.body_part_contains),
            ("body_part_groups", &file.body_part_groups),
        ] {
            let at = text.find(&format!("[{table}]")).unwrap_or(0);
            for (part, members) in relation {
                for p in std::iter::once(part).chain(members) {
                    if !file.body_parts.contains_key(p) {
                        err(
                            at,
                            format!("{table}.{part}"),
                            format!("{p:?} is not a key of [body_parts]"),
                        );
                    }
                }
                if members.contains(part) {
                    err(
                        at,
                        format!("{table}.{part}"),
                        "a part cannot hold itself".into(),
                    );
                }
                if table == "body_part_groups" && members.len() < 2 {
                    err(
                        at,
                        format!("{table}.{part}"),
                        "a group has two members or more".into(),
                    );
                }
            }
        }
        for part in file.frontal_default.keys() {
            if !file.body_parts.contains_key(part) {
                err(
                    text.find("[frontal_default]").unwrap_or(0),
                    format!("frontal_default.{part}"),
                    format!("{part:?} is not a key of [body_parts]"),
                );
            }
        }
        let mut reason_codes = BTreeSet::new();
        for reason in &file.reasons {
            let r = reason.get_ref();
            if !reason_codes.insert(r.code.clone()) {
                err(
                    reason.span().start,
                    format!("reason {}", r.code),
                    "duplicate reason code".into(),
                );
            }
            if r.name_zh.trim().is_empty() || r.name_en.trim().is_empty() {
                err(
                    reason.span().start,
                    format!("reason {}", r.code),
                    "missing name".into(),
                );
            }
        }
        if file.reasons.is_empty() {
            err(
                0,
                "reason".into(),
                "no reasons to repeat an exam: a doctor could not override".into(),
            );
        }
        for (part, synonyms) in &file.body_parts {
            if synonyms.iter().any(|s| s.trim().is_empty()) {
                err(
                    text.find("[body_parts]").unwrap_or(0),
                    format!("body_parts.{part}"),
                    "empty synonym".into(),
                );
            }
        }
        if !errors.is_empty() {
            errors.sort_by_key(|e| e.line);
            return Err(errors);
        }
        let items: Vec<Item> = file.items.into_iter().map(Spanned::into_inner).collect();
        let by_code = items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.code.clone(), i))
            .collect();
        Ok(RecognitionList {
            meta: file.list,
            content_hash: blake3::hash(text.as_bytes()).to_hex().to_string(),
            eligibility: file.eligibility,
            vocabulary: file.vocabulary,
            body_parts: file.body_parts,
            items,
            rules: file.rules.into_iter().map(Spanned::into_inner).collect(),
            code_tables: file
                .code_tables
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            body_part_contains: file.body_part_contains,
            body_part_groups: file.body_part_groups,
            frontal_default: file.frontal_default,
            reasons: file.reasons.into_iter().map(Spanned::into_inner).collect(),
            by_code,
        })
    }

    pub fn item(&self, code: &str) -> Option<&Item> {
        self.by_code.get(code).map(|&i| &self.items[i])
    }

    /// Whether `coarse` holds `finer` (transitively) in `[body_part_contains]`.
    pub fn contains_part(&self, coarse: &str, finer: &str) -> bool {
        let mut stack = vec![coarse];
        let mut seen = BTreeSet::new();
        while let Some(p) = stack.pop() {
            if !seen.insert(p) {
                continue;
            }
            for f in self.body_part_contains.get(p).into_iter().flatten() {
                if f == finer {
                    return true;
                }
                stack.push(f);
            }
        }
        false
    }

    /// The items a code of `scheme` means for a study of `hospital`: the
    /// region's tables of that scheme and the hospital's own.
    pub fn code_items<'a>(
        &'a self,
        scheme: &str,
        value: &str,
        hospital: Option<&str>,
    ) -> Vec<(&'a CodeTable, &'a Item)> {
        let scheme = scheme.trim();
        if scheme.is_empty() {
            return Vec::new();
        }
        self.code_tables
            .iter()
            .filter(|t| t.coding_scheme.trim().eq_ignore_ascii_case(scheme))
            .filter(|t| t.hospital_id.is_none() || t.hospital_id.as_deref() == hospital)
            .filter_map(|t| {
                t.codes
                    .get(value.trim())
                    .and_then(|c| self.item(c))
                    .map(|i| (t, i))
            })
            .collect()
    }

    pub fn reason(&self, code: &str) -> Option<&Reason> {
        self.reasons.iter().find(|r| r.code == code)
    }

    /// Whether a study that is item `prior` counts for an order of item
    /// `ordered`: the same item, or reachable through `satisfies`.
    pub fn satisfies(&self, prior: &str, ordered: &str) -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![prior];
        while let Some(code) = stack.pop() {
            if code == ordered {
                return true;
            }
            if !seen.insert(code) {
                continue;
            }
            if let Some(item) = self.item(code) {
                stack.extend(item.satisfies.iter().map(String::as_str));
            }
        }
        false
    }

    /// The mark an item's results carry.
    pub fn mark_of<'a>(&'a self, item: &'a Item) -> &'a str {
        item.mark.as_deref().unwrap_or(&self.meta.mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recognition::classify::tests::TEST_LIST;

    #[test]
    fn shipped_example_list_is_valid() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/recognition/jiangsu-example.toml"
        ))
        .unwrap();
        let list = RecognitionList::parse(&text).unwrap_or_else(|e| {
            panic!(
                "{}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(list.items.len() >= 60, "{} items", list.items.len());
        for m in ["CT", "MR", "DX", "MG", "US", "PET-CT", "XA"] {
            assert!(list.items.iter().any(|i| i.modality == m), "no {m} item");
        }
        assert!(list.items.iter().all(|i| !i.name_zh.is_empty()));
        assert_eq!(list.meta.mark, "苏HR");
        let codes: Vec<&str> = list.reasons.iter().map(|r| r.code.as_str()).collect();
        for c in ["01", "02", "03", "04", "05", "06", "07", "08", "98", "99"] {
            assert!(codes.contains(&c), "reason {c}");
        }
        assert!(!list.reason("98").unwrap().counts_as_non_recognition);
        assert!(list.reason("01").unwrap().counts_as_non_recognition);
    }

    /// Each kind of error, reported with its line and field; several at
    /// once are all reported.
    #[test]
    fn validation_errors() {
        let base = TEST_LIST;
        let item_at = |code: &str| base.find(&format!("code = \"{code}\"")).unwrap();
        let line_at = |offset: usize| base[..offset].matches('\n').count() + 1;
        let cases: Vec<(String, &str, &str)> = vec![
            (
                base.replacen("modality = \"MG\"", "modality = \"XX\"", 1),
                "item MG-01-01: modality",
                "unknown modality",
            ),
            (
                base.replacen("window_days = 180", "window_days = 0", 1),
                "item MG-01-01: window_days",
                "not > 0",
            ),
            (
                base.replacen("name_zh = \"乳腺钼靶\"", "name_zh = \"\"", 1),
                "item MG-01-01: name_zh",
                "missing name",
            ),
            (
                base.replacen("body_part = \"BREAST\"", "body_part = \"TOE\"", 1),
                "item MG-01-01: body_part",
                "not a key",
            ),
            (
                base.replacen(
                    "satisfies = [\"DX-03-01\"]",
                    "satisfies = [\"DX-03-01\"]\n",
                    1,
                )
                .replacen(
                    "name_en = \"Chest radiograph, PA\"\n",
                    "name_en = \"Chest radiograph, PA\"\nsatisfies = [\"DX-03-02\"]\n",
                    1,
                ),
                "satisfies",
                "cycle",
            ),
            (
                base.replacen(
                    "satisfies = [\"CT-03-01\", \"CT-03-02\"]",
                    "satisfies = [\"CT-99\"]",
                    1,
                ),
                "item CT-03-03: satisfies",
                "unknown item",
            ),
            (
                base.replacen("contrast = \"enhanced\"", "contrast = \"none\"", 1),
                "item CT-03-02",
                "overlaps item CT-03-01",
            ),
            (
                base.replacen("code = \"CT-04-01\"", "code = \"CT-01-01\"", 1),
                "item CT-01-01: code",
                "duplicate",
            ),
            (
                format!(
                    "{base}\n[[rule]]\nname = \"dup\"\nitem = \"CT-01-01\"\nmodality = [\"CT\"]\ndescription = [\"冠脉\", \"CORONARY\"]\n"
                ),
                "rule \"dup\": (conditions)",
                "overlaps rule",
            ),
            (
                format!(
                    "{base}\n[[rule]]\nname = \"vague\"\nitem = \"CT-01-01\"\nmodality = [\"CT\"]\n"
                ),
                "rule \"vague\": (conditions)",
                "modality alone",
            ),
            (
                base.replacen(
                    "code = \"US-04-01\"",
                    "code = \"US-04-01\"\nprojections = [\"AP\"]",
                    1,
                ),
                "item US-04-01: projections",
                "radiographs",
            ),
            (
                base.replacen(
                    "name_en = \"Chest CT, plain\"",
                    "name_en = \"Chest CT, plain\"\nsource = \"\"",
                    1,
                )
                .replacen(
                    "contrast = \"none\"\nwindow_days = 30\nsource = \"test\"\n\n[[item]]\ncode = \"CT-03-02\"",
                    "contrast = \"none\"\nwindow_days = 30\n\n[[item]]\ncode = \"CT-03-02\"",
                    1,
                ),
                "item CT-03-01: source",
                "missing source",
            ),
            (
                base.replacen(
                    "code = \"CT-01-01\"",
                    "code = \"CT-01-01\"\ncodes = [\"CT0101\"]",
                    1,
                ),
                "item CT-01-01: codes",
                "coding scheme",
            ),
            (
                format!("{base}\n[[local_codes]]\nhospital_id = \"H\"\ncodes = {{ \"1\" = \"CT-01-01\" }}\n"),
                "local_codes H",
                "coding scheme",
            ),
            (
                base.replacen("coding_scheme = \"99TEST\"", "coding_scheme = \" \"", 1),
                "code_table \"region\": coding_scheme",
                "missing",
            ),
            (
                base.replacen("\"CT0301\" = \"CT-03-01\"", "\"CT0301\" = \"CT-99\"", 1),
                "code_table \"region\": codes.CT0301",
                "unknown item",
            ),
            (
                format!("{base}\n[body_part_contains]\nHEAD = [\"SINUS\"]\n"),
                "body_part_contains.HEAD",
                "not a key",
            ),
            (
                format!("{base}\n[body_part_groups]\nCHEST = [\"CHEST\", \"HEAD\"]\n"),
                "body_part_groups.CHEST",
                "itself",
            ),
        ];
        for (text, field, message) in &cases {
            let errors = RecognitionList::parse(text)
                .err()
                .unwrap_or_else(|| panic!("{field}: accepted"));
            assert!(
                errors
                    .iter()
                    .any(|e| e.field.contains(field) && e.message.contains(message) && e.line > 1),
                "{field} / {message}: got {errors:?}"
            );
        }
        // Line numbers point at the item.
        let text = base.replacen("window_days = 180", "window_days = -1", 1);
        let errors = RecognitionList::parse(&text).unwrap_err();
        assert_eq!(
            errors[0].line,
            line_at(item_at("MG-01-01")) - 1,
            "{errors:?}"
        );
        // A syntax error has its line too.
        let errors = RecognitionList::parse("[list]\nversion = \n").unwrap_err();
        assert_eq!(errors[0].line, 2);
        // An unknown field is refused by name.
        let errors = RecognitionList::parse(&base.replacen(
            "window_days = 14\nsource",
            "window_dayz = 14\nsource",
            1,
        ))
        .unwrap_err();
        assert!(errors[0].message.contains("window_dayz"), "{errors:?}");
        // Several errors at once.
        let text = base
            .replacen("window_days = 180", "window_days = 0", 1)
            .replacen("modality = \"US\"", "modality = \"XX\"", 1);
        assert_eq!(RecognitionList::parse(&text).unwrap_err().len(), 2);
    }

    #[test]
    fn satisfies_is_transitive() {
        let list = RecognitionList::parse(TEST_LIST).unwrap();
        assert!(list.satisfies("CT-03-03", "CT-03-01"));
        assert!(list.satisfies("CT-03-03", "CT-03-03"));
        assert!(!list.satisfies("CT-03-01", "CT-03-03"));
        assert!(list.satisfies("DX-03-02", "DX-03-01"));
    }
}
