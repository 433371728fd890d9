//! From a DICOM study's attributes to the recognition items it is. Pure
//! code: no I/O, table-tested.
//!
//! A false recognition is worse than a miss (a doctor may skip an exam that
//! was never done), so whenever the attributes leave a doubt the study is
//! left unclassified, with the reason.
//!
//! Order of evidence (recognition-facts.md, "From a DICOM study to an
//! item"): procedure codes first (deployed platforms key on order and
//! charge-item codes), then the list's explicit rules, then modality, body
//! part and contrast against the items themselves.

use std::collections::BTreeSet;

use serde::Serialize;

use super::list::{Item, ItemContrast, LateralityRule, Projection, RecognitionList};
use crate::contract::Laterality;

/// The attributes of one series (its first instance speaks for it).
#[derive(Debug, Clone, Default)]
pub struct SeriesAttributes {
    pub modality: String,
    pub sop_class_uid: String,
    pub body_part_examined: String,
    pub series_description: String,
    pub protocol_name: String,
    pub image_type: String,
    /// ContrastBolusAgent or ContrastBolusAgentSequence present.
    pub contrast_agent: bool,
    pub contrast_route: String,
    /// Laterality, else ImageLaterality.
    pub laterality: String,
    pub view_position: String,
    /// Code values of PerformedProtocolCodeSequence and the like.
    pub codes: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct StudyAttributes {
    pub study_description: String,
    pub requested_procedure_description: String,
    /// Code values of ProcedureCodeSequence, RequestedProcedureCodeSequence
    /// and RequestAttributesSequence / ScheduledProtocolCodeSequence.
    pub codes: Vec<String>,
    pub series: Vec<SeriesAttributes>,
    /// For the hospital's local charge-item code table.
    pub hospital_id: Option<String>,
}

/// One item a study is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classified {
    pub code: String,
    pub laterality: Option<Laterality>,
    /// Radiographs: the projections the study has.
    pub views: Vec<Projection>,
    pub contrast: ItemContrast,
    /// Which evidence matched, for the operator and the audit.
    pub rule: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classification {
    pub items: Vec<Classified>,
    /// Why no item, when `items` is empty.
    pub unclassified: Option<String>,
}

/// SOP Classes that are not images of the exam: structured reports (dose
/// reports among them), presentation states, key objects.
const NOT_IMAGE_MODALITIES: &[&str] = &["SR", "PR", "KO", "DOC", "REG", "SEG", "RWV"];

fn radiograph(modality: &str) -> bool {
    matches!(modality, "DX" | "CR" | "DR")
}

/// Modalities match as families: DX, CR and DR are all radiographs.
fn same_modality(item: &str, study: &str) -> bool {
    item == study || (radiograph(item) && radiograph(study))
}

/// Byte spans where `pattern` occurs in `text`: Chinese (any non-ASCII)
/// anywhere; ASCII of three characters or more at the start of a word,
/// shorter ASCII only as a whole word (an "L" is not in "LUNG").
fn spans(text: &str, pattern: &str) -> Vec<(usize, usize)> {
    let pattern = pattern.trim();
    if pattern.is_empty() {
        return Vec::new();
    }
    let upper = text.to_uppercase();
    let p = pattern.to_uppercase();
    let mut out = Vec::new();
    if !p.is_ascii() {
        let mut from = 0;
        while let Some(i) = upper[from..].find(&p) {
            out.push((from + i, from + i + p.len()));
            from += i + p.len();
        }
        return out;
    }
    // ASCII: walk words with their offsets; a pattern with spaces is
    // matched against the word sequence.
    let is_sep = |c: char| !(c.is_ascii_alphanumeric() || c == '+');
    let pwords: Vec<&str> = p.split(' ').filter(|w| !w.is_empty()).collect();
    let mut starts = Vec::new();
    let mut prev_sep = true;
    for (i, c) in upper.char_indices() {
        if !is_sep(c) && prev_sep {
            starts.push(i);
        }
        prev_sep = is_sep(c);
    }
    for (k, &start) in starts.iter().enumerate() {
        let mut pos = start;
        let mut ok = true;
        for (j, pw) in pwords.iter().enumerate() {
            let Some(&wstart) = starts.get(k + j) else {
                ok = false;
                break;
            };
            if j > 0 && wstart < pos {
                ok = false;
                break;
            }
            let word_end = upper[wstart..]
                .find(is_sep)
                .map_or(upper.len(), |e| wstart + e);
            let word = &upper[wstart..word_end];
            let last = j + 1 == pwords.len();
            let matched = if p.len() >= 3 && last {
                word.starts_with(pw)
            } else {
                word == *pw
            };
            if !matched {
                ok = false;
                break;
            }
            pos = if last { wstart + pw.len() } else { word_end };
        }
        if ok {
            out.push((start, pos));
        }
    }
    out
}

fn contains_any(text: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| !spans(text, p).is_empty())
}

/// The canonical body parts a text names. A match inside a longer match of
/// another part does not count (胸 inside 胸椎 is the thoracic spine).
fn body_parts_in(list: &RecognitionList, text: &str) -> BTreeSet<String> {
    let mut found: Vec<(usize, usize, &str)> = Vec::new();
    for (part, synonyms) in &list.body_parts {
        for s in synonyms {
            for (a, b) in spans(text, s) {
                found.push((a, b, part.as_str()));
            }
        }
    }
    found
        .iter()
        .filter(|(a, b, part)| {
            !found
                .iter()
                .any(|(c, d, other)| other != part && c <= a && b <= d && (d - c) > (b - a))
        })
        .map(|(_, _, p)| p.to_string())
        .collect()
}

/// BodyPartExamined as a canonical part: the value itself, or a synonym.
fn body_part_of(list: &RecognitionList, value: &str) -> BTreeSet<String> {
    let v = value.trim();
    if v.is_empty() {
        return BTreeSet::new();
    }
    if let Some((part, _)) = list.body_parts.iter().find(|(part, syn)| {
        part.eq_ignore_ascii_case(v) || syn.iter().any(|s| s.eq_ignore_ascii_case(v))
    }) {
        return BTreeSet::from([part.clone()]);
    }
    // Free text in BodyPartExamined ("胸部平扫", "L-SPINE AP"): as a
    // description.
    body_parts_in(list, v)
}

#[derive(Debug, Clone, Copy, Default)]
struct Contrast {
    plain: bool,
    enhanced: bool,
    angiography: bool,
}

fn series_texts(s: &SeriesAttributes) -> String {
    format!("{} {} ", s.series_description, s.protocol_name)
}

pub fn classify(list: &RecognitionList, study: &StudyAttributes) -> Classification {
    let v = &list.vocabulary;
    let study_text = format!(
        "{} {}",
        study.study_description, study.requested_procedure_description
    );
    let has_pt = study.series.iter().any(|s| s.modality == "PT");
    // The series that are the exam.
    let diagnostic: Vec<&SeriesAttributes> = study
        .series
        .iter()
        .filter(|s| {
            let text = series_texts(s);
            let modality = s.modality.trim().to_uppercase();
            if NOT_IMAGE_MODALITIES.contains(&modality.as_str())
                || s.sop_class_uid.starts_with("1.2.840.10008.5.1.4.1.1.88.")
                || contains_any(&text, &v.not_images)
            {
                return false;
            }
            if s.image_type.to_uppercase().contains("LOCALIZER")
                || contains_any(&text, &v.localizer)
            {
                return false;
            }
            // The CT of a PET-CT is part of the PET-CT exam, not a
            // diagnostic CT of its own (in doubt, don't: even a CT not
            // described as attenuation correction is not taken as one); a
            // CT described as attenuation correction is not diagnostic even
            // when the PT series went elsewhere.
            if modality == "CT" && (has_pt || contains_any(&text, &v.attenuation_ct)) {
                return false;
            }
            !modality.is_empty() && modality != "OT"
        })
        .collect();
    if diagnostic.is_empty() {
        return unclassified("no_diagnostic_series");
    }
    let mut modalities: BTreeSet<String> = diagnostic
        .iter()
        .map(|s| s.modality.trim().to_uppercase())
        .collect();
    if has_pt {
        modalities = BTreeSet::from(["PET-CT".to_string()]);
    }

    // Laterality from the attributes, else from the descriptions.
    let mut sides = BTreeSet::new();
    for s in &diagnostic {
        match s.laterality.trim().to_uppercase().as_str() {
            "L" => {
                sides.insert(Laterality::Left);
            }
            "R" => {
                sides.insert(Laterality::Right);
            }
            "B" => {
                sides.insert(Laterality::Both);
            }
            _ => {}
        }
    }
    if sides.is_empty() {
        let all_text = format!(
            "{study_text} {}",
            diagnostic
                .iter()
                .map(|s| series_texts(s))
                .collect::<String>()
        );
        if contains_any(&all_text, &v.both) {
            sides.insert(Laterality::Both);
        } else {
            if contains_any(&all_text, &v.left) {
                sides.insert(Laterality::Left);
            }
            if contains_any(&all_text, &v.right) {
                sides.insert(Laterality::Right);
            }
        }
    }
    let laterality = match sides.len() {
        0 => None,
        1 => sides.into_iter().next(),
        // Left and right series in one study: both sides.
        _ => Some(Laterality::Both),
    };
    let views: Vec<Projection> = diagnostic
        .iter()
        .filter_map(|s| Projection::from_view_position(&s.view_position))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    let mut contrast = Contrast::default();
    for s in &diagnostic {
        let text = series_texts(s);
        let agent = s.contrast_agent && !s.contrast_route.to_uppercase().contains("ORAL");
        let described_plain = contains_any(&text, &v.plain);
        let described_enhanced = contains_any(&text, &v.enhanced);
        // Angiography words only for CT, MR and XA series: "TOF" also
        // names time-of-flight PET reconstructions.
        if matches!(
            s.modality.trim().to_uppercase().as_str(),
            "CT" | "MR" | "XA"
        ) && (contains_any(&text, &v.angiography)
            || s.image_type.to_uppercase().contains("ANGIO"))
        {
            contrast.angiography = true;
        }
        if (agent || described_enhanced) && !described_plain {
            contrast.enhanced = true;
        } else {
            contrast.plain = true;
        }
    }
    if !contrast.angiography
        && !has_pt
        && diagnostic.iter().any(|s| {
            matches!(
                s.modality.trim().to_uppercase().as_str(),
                "CT" | "MR" | "XA"
            )
        })
        && contains_any(&study_text, &v.angiography)
    {
        contrast.angiography = true;
    }

    let mut found: Vec<Classified> = Vec::new();
    let mut doubt: Option<&'static str> = None;
    let add = |item: &Item,
               rule: String,
               found: &mut Vec<Classified>,
               doubt: &mut Option<&'static str>| {
        if found.iter().any(|c| c.code == item.code) {
            return;
        }
        let lat = match item.laterality {
            LateralityRule::None => None,
            LateralityRule::Required => match laterality {
                Some(l) => Some(l),
                None => {
                    *doubt = Some("laterality_unknown");
                    return;
                }
            },
        };
        found.push(Classified {
            code: item.code.clone(),
            laterality: lat,
            views: if radiograph(&item.modality) {
                views.clone()
            } else {
                Vec::new()
            },
            contrast: item.contrast,
            rule,
        });
    };
    let fits_modality = |item: &Item| modalities.iter().any(|m| same_modality(&item.modality, m));

    // 1. Procedure codes.
    let mut codes: Vec<&str> = study.codes.iter().map(String::as_str).collect();
    for s in &diagnostic {
        codes.extend(s.codes.iter().map(String::as_str));
    }
    for code in &codes {
        let code = code.trim();
        let mut by_code: Vec<(&Item, String)> = Vec::new();
        for item in &list.items {
            if item.codes.iter().any(|c| c == code) {
                by_code.push((item, format!("code {code}")));
            }
        }
        for rule in &list.rules {
            if rule.codes.iter().any(|c| c == code)
                && let Some(item) = list.item(&rule.item)
            {
                by_code.push((item, format!("rule {:?} (code {code})", rule.name)));
            }
        }
        if let Some(hospital) = &study.hospital_id {
            for table in list
                .local_codes
                .iter()
                .filter(|t| &t.hospital_id == hospital)
            {
                if let Some(item) = table.codes.get(code).and_then(|c| list.item(c)) {
                    by_code.push((item, format!("local code {code} of {hospital}")));
                }
            }
        }
        for (item, rule) in by_code {
            // A code that names an item of another modality than the
            // images is a mismatch between order and exam: no item.
            if fits_modality(item) {
                add(item, rule, &mut found, &mut doubt);
            } else {
                doubt = Some("code_modality_mismatch");
            }
        }
    }
    if !found.is_empty() {
        return done(found);
    }

    // 2. Explicit rules.
    let descriptions = format!(
        "{study_text} {}",
        diagnostic
            .iter()
            .map(|s| series_texts(s))
            .collect::<String>()
    );
    for rule in &list.rules {
        let Some(item) = list.item(&rule.item) else {
            continue;
        };
        if !rule.modality.is_empty()
            && !modalities
                .iter()
                .any(|m| rule.modality.iter().any(|r| same_modality(r, m)))
        {
            continue;
        }
        if !fits_modality(item) {
            continue;
        }
        let body_ok = rule.body_part_examined.is_empty()
            || diagnostic
                .iter()
                .any(|s| contains_any(&s.body_part_examined, &rule.body_part_examined));
        let desc_ok = rule.description.is_empty() || contains_any(&descriptions, &rule.description);
        let codes_ok = rule.codes.is_empty();
        let excluded = contains_any(&descriptions, &rule.exclude);
        if body_ok && desc_ok && codes_ok && !excluded && contrast_fits(item.contrast, contrast) {
            add(
                item,
                format!("rule {:?}", rule.name),
                &mut found,
                &mut doubt,
            );
        }
    }
    if !found.is_empty() {
        return done(found);
    }

    // 3. Modality, body part and contrast against the items.
    let mut parts = BTreeSet::new();
    for s in &diagnostic {
        parts.extend(body_part_of(list, &s.body_part_examined));
    }
    if parts.is_empty() {
        parts = body_parts_in(list, &descriptions);
    }
    if parts.is_empty() {
        return unclassified("body_part_unknown");
    }
    for part in &parts {
        let candidates: Vec<&Item> = list
            .items
            .iter()
            .filter(|i| &i.body_part == part && fits_modality(i))
            .collect();
        let pick = |want: ItemContrast| -> Vec<&Item> {
            candidates
                .iter()
                .copied()
                .filter(|i| i.contrast == want)
                .collect()
        };
        let chosen: Vec<&Item> = if contrast.angiography {
            pick(ItemContrast::Angiography)
        } else if contrast.plain && contrast.enhanced {
            let both = pick(ItemContrast::PlainAndEnhanced);
            if both.is_empty() {
                let mut v = pick(ItemContrast::None);
                v.extend(pick(ItemContrast::Enhanced));
                v
            } else {
                both
            }
        } else if contrast.enhanced {
            pick(ItemContrast::Enhanced)
        } else {
            pick(ItemContrast::None)
        };
        // Radiographs: the item with the most projections the study has.
        let chosen: Vec<&Item> = if chosen.iter().any(|i| !i.projections.is_empty()) {
            let fitting: Vec<&Item> = chosen
                .iter()
                .copied()
                .filter(|i| i.projections.iter().all(|p| views.contains(p)))
                .collect();
            match fitting.iter().map(|i| i.projections.len()).max() {
                Some(max) => fitting
                    .into_iter()
                    .filter(|i| i.projections.len() == max)
                    .collect(),
                None => {
                    doubt = Some("views_unknown");
                    Vec::new()
                }
            }
        } else {
            chosen
        };
        for item in chosen {
            add(
                item,
                format!(
                    "modality {} body part {part} contrast {:?}",
                    item.modality, item.contrast
                ),
                &mut found,
                &mut doubt,
            );
        }
    }
    if found.is_empty() {
        return unclassified(doubt.unwrap_or("no_item_matched"));
    }
    done(found)
}

fn contrast_fits(item: ItemContrast, c: Contrast) -> bool {
    match item {
        ItemContrast::Angiography => c.angiography,
        ItemContrast::None => c.plain && !c.angiography,
        ItemContrast::Enhanced => c.enhanced && !c.angiography,
        ItemContrast::PlainAndEnhanced => c.plain && c.enhanced && !c.angiography,
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
    Classification {
        items,
        unclassified: None,
    }
}

/// Repairs header text dicom-rs decoded under the wrong character set:
/// GBK/GB18030 bytes in a data set whose Specific Character Set is empty
/// (decoded as ISO 8859-1, so each byte is one char up to U+00FF), and the
/// ISO 2022 escape designators of ISO 2022 IR 58 left in the text.
/// `specific_character_set` is the data set's (0008,0005) as written.
pub fn repair_text(text: &str, specific_character_set: &str) -> String {
    // ESC, intermediates 0x20-0x2F, final 0x30-0x7E (ISO 2022 designators).
    let mut stripped = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut had_escape = false;
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            had_escape = true;
            while let Some(&n) = chars.peek() {
                chars.next();
                if ('\u{30}'..='\u{7e}').contains(&n) {
                    break;
                }
            }
            continue;
        }
        stripped.push(c);
    }
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
    stripped
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small list with the shapes of the shipped example: enough items to
    /// tell plain from enhanced, sides, views and PET-CT apart.
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
enhanced = ["增强", "+C", "C+", "ENHANCED", "动脉期", "静脉期", "POST", "ZQ"]
plain = ["平扫", "PLAIN", "NON CONTRAST", "PS"]
angiography = ["CTA", "MRA", "TOF", "血管成像", "ANGIO"]
localizer = ["LOCALIZER", "SCOUT", "TOPOGRAM", "SURVIEW", "定位"]
not_images = ["DOSE", "剂量", "PATIENT PROTOCOL", "SCREEN SAVE"]
attenuation_ct = ["CTAC", "AC CT", "衰减校正", "CT FOR AC"]
left = ["左", "LEFT", "L"]
right = ["右", "RIGHT", "R"]
both = ["双侧", "双", "BILATERAL", "BOTH"]

[body_parts]
HEAD = ["HEAD", "BRAIN", "SKULL", "头颅", "头部", "颅脑", "脑", "TL", "TLPS"]
CHEST = ["CHEST", "THORAX", "LUNG", "胸部", "胸", "肺", "XB", "XBPS", "XBZQ"]
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
codes = ["CT0301"]

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

[[local_codes]]
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

    /// A series: modality, BodyPartExamined, SeriesDescription, ImageType,
    /// contrast agent, route, laterality, view.
    fn s(m: &str, bp: &str, desc: &str) -> SeriesAttributes {
        SeriesAttributes {
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

    fn enhanced(x: SeriesAttributes) -> SeriesAttributes {
        with(x, |x| {
            x.contrast_agent = true;
            x.contrast_route = "IV".into();
        })
    }

    fn side(x: SeriesAttributes, l: &str) -> SeriesAttributes {
        with(x, |x| x.laterality = l.into())
    }

    fn view(x: SeriesAttributes, v: &str) -> SeriesAttributes {
        with(x, |x| x.view_position = v.into())
    }

    fn localizer(x: SeriesAttributes) -> SeriesAttributes {
        with(x, |x| x.image_type = "ORIGINAL\\PRIMARY\\LOCALIZER".into())
    }

    fn study(desc: &str, series: Vec<SeriesAttributes>) -> StudyAttributes {
        StudyAttributes {
            study_description: desc.into(),
            series,
            ..StudyAttributes::default()
        }
    }

    fn codes(mut st: StudyAttributes, c: &[&str]) -> StudyAttributes {
        st.codes = c.iter().map(|c| c.to_string()).collect();
        st
    }

    /// Expected: the item codes (with side where relevant) or "!reason".
    fn expect(c: &Classification) -> String {
        if let Some(r) = &c.unclassified {
            return format!("!{r}");
        }
        c.items
            .iter()
            .map(|i| match i.laterality {
                Some(l) => format!(
                    "{}:{}",
                    i.code,
                    serde_json::to_value(l).unwrap().as_str().unwrap()
                ),
                None => i.code.clone(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn classification_table() {
        let list = test_list();
        let ct = |bp: &str, d: &str| s("CT", bp, d);
        let mr = |bp: &str, d: &str| s("MR", bp, d);
        let dx = |bp: &str, d: &str| s("DX", bp, d);
        let cases: Vec<(&str, StudyAttributes, &str)> = vec![
            // --- CT chest, vendors' spellings
            (
                "GE chest plain",
                study("CHEST ROUTINE", vec![ct("CHEST", "5mm Lung")]),
                "CT-03-01",
            ),
            (
                "Siemens thorax",
                study("Thorax^01_Routine", vec![ct("THORAX", "Thorax 1.0 B70f")]),
                "CT-03-01",
            ),
            (
                "Philips lung",
                study("Chest", vec![ct("LUNG", "Lung 1mm")]),
                "CT-03-01",
            ),
            (
                "Chinese body part",
                study("", vec![ct("胸部", "肺窗")]),
                "CT-03-01",
            ),
            (
                "Chinese description, empty body part",
                study("胸部CT平扫", vec![ct("", "1.25mm")]),
                "CT-03-01",
            ),
            (
                "pinyin abbreviation",
                study("XBPS", vec![ct("", "S1")]),
                "CT-03-01",
            ),
            (
                "free text body part",
                study("", vec![ct("CHEST ROUTINE ADULT", "axial")]),
                "CT-03-01",
            ),
            (
                "localizer ignored",
                study(
                    "胸部CT",
                    vec![
                        localizer(ct("CHEST", "Topogram 0.6 T20s")),
                        ct("CHEST", "Lung"),
                    ],
                ),
                "CT-03-01",
            ),
            (
                "scout by description",
                study("", vec![ct("CHEST", "SCOUT"), ct("CHEST", "Lung 5mm")]),
                "CT-03-01",
            ),
            (
                "dose report ignored",
                study(
                    "CHEST",
                    vec![ct("CHEST", "Lung"), s("SR", "", "Dose Report")],
                ),
                "CT-03-01",
            ),
            (
                "dose screen capture ignored",
                study(
                    "CHEST",
                    vec![ct("CHEST", "Lung"), s("CT", "", "Patient Protocol")],
                ),
                "CT-03-01",
            ),
            (
                "dose SR by SOP class",
                study(
                    "CHEST",
                    vec![
                        ct("CHEST", "Lung"),
                        with(s("CT", "", "x"), |x| {
                            x.sop_class_uid = "1.2.840.10008.5.1.4.1.1.88.67".into()
                        }),
                    ],
                ),
                "CT-03-01",
            ),
            // --- contrast
            (
                "plain + enhanced by attributes",
                study(
                    "CHEST",
                    vec![ct("CHEST", "Lung"), enhanced(ct("CHEST", "Lung"))],
                ),
                "CT-03-03",
            ),
            (
                "plain + enhanced by description",
                study(
                    "胸部CT平扫+增强",
                    vec![ct("CHEST", "平扫"), ct("CHEST", "增强 动脉期")],
                ),
                "CT-03-03",
            ),
            (
                "enhanced only",
                study("CHEST", vec![enhanced(ct("CHEST", "Lung"))]),
                "CT-03-02",
            ),
            (
                "enhanced by C+",
                study("CHEST C+", vec![ct("CHEST", "Chest C+ 5mm")]),
                "CT-03-02",
            ),
            (
                "oral contrast alone is plain",
                study(
                    "ABDOMEN",
                    vec![with(enhanced(s("CT", "ABDOMEN", "Abd")), |x| {
                        x.contrast_route = "ORAL".into()
                    })],
                ),
                "CT-04-01",
            ),
            (
                "agent but described plain",
                study(
                    "CHEST",
                    vec![with(ct("CHEST", "平扫"), |x| x.contrast_agent = true)],
                ),
                "CT-03-01",
            ),
            (
                "venous phase",
                study("胸部增强", vec![ct("CHEST", "静脉期")]),
                "CT-03-02",
            ),
            ("ZQ pinyin", study("XBZQ", vec![ct("", "ZQ")]), "CT-03-02"),
            // --- body parts that contain each other
            (
                "thoracic spine not chest",
                study("胸椎CT", vec![ct("", "bone")]),
                "CT-05-01",
            ),
            (
                "TSPINE value",
                study("", vec![ct("TSPINE", "bone")]),
                "CT-05-01",
            ),
            (
                "head CT",
                study("颅脑CT平扫", vec![ct("HEAD", "Brain 5mm")]),
                "CT-01-01",
            ),
            (
                "brain synonym",
                study("", vec![ct("BRAIN", "H30s")]),
                "CT-01-01",
            ),
            ("skull", study("", vec![ct("SKULL", "H60s")]), "CT-01-01"),
            (
                "two body parts",
                study("胸部+腹部CT", vec![ct("", "axial")]),
                "CT-03-01,CT-04-01",
            ),
            (
                "no body part anywhere",
                study("ROUTINE", vec![ct("", "axial 5mm")]),
                "!body_part_unknown",
            ),
            (
                "body part without item",
                study("", vec![ct("KNEE", "bone")]),
                "!no_item_matched",
            ),
            // --- angiography
            (
                "coronary CTA by rule",
                study("冠脉CTA", vec![ct("HEART", "Cardiac 0.6")]),
                "CT-09-04",
            ),
            (
                "coronary by English description",
                study("CT CORONARY ANGIO", vec![ct("", "BestDiast")]),
                "CT-09-04",
            ),
            (
                "MRA TOF without contrast is angiography",
                study("头颅MRA", vec![mr("HEAD", "TOF 3D multi-slab")]),
                "MR-01-04",
            ),
            (
                "TOF by series only",
                study("", vec![mr("BRAIN", "3D TOF")]),
                "MR-01-04",
            ),
            (
                "head MR plain",
                study(
                    "头颅MR平扫",
                    vec![mr("HEAD", "T1 SE"), mr("HEAD", "T2 FSE")],
                ),
                "MR-01-01",
            ),
            (
                "head MR Siemens",
                study(
                    "Head^Routine",
                    vec![mr("HEAD", "t2_tse_tra"), mr("HEAD", "t1_fl2d_tra")],
                ),
                "MR-01-01",
            ),
            // --- laterality
            (
                "left knee by Laterality",
                study("KNEE MR", vec![side(mr("KNEE", "PD FS"), "L")]),
                "MR-07-01:L",
            ),
            (
                "right knee by Laterality",
                study("", vec![side(mr("KNEE", "PD FS"), "R")]),
                "MR-07-01:R",
            ),
            (
                "left knee by ImageLaterality only",
                study("", vec![side(mr("KNEE", "T1"), "L")]),
                "MR-07-01:L",
            ),
            (
                "left knee in Chinese",
                study("左膝关节MR", vec![mr("", "PD FS sag")]),
                "MR-07-01:L",
            ),
            (
                "right knee in English",
                study("MR RIGHT KNEE", vec![mr("KNEE", "sag")]),
                "MR-07-01:R",
            ),
            (
                "both knees",
                study("双膝关节MR", vec![mr("KNEE", "sag")]),
                "MR-07-01:B",
            ),
            (
                "left and right series make both",
                study(
                    "",
                    vec![side(mr("KNEE", "a"), "L"), side(mr("KNEE", "b"), "R")],
                ),
                "MR-07-01:B",
            ),
            (
                "knee side unknown",
                study("KNEE MR", vec![mr("KNEE", "PD FS")]),
                "!laterality_unknown",
            ),
            (
                "L inside a word is not left",
                study("LUMBAR", vec![mr("LSPINE", "sag T2")]),
                "MR-06-01",
            ),
            (
                "L-SPINE synonym",
                study("", vec![mr("L-SPINE", "T2 sag")]),
                "MR-06-01",
            ),
            (
                "腰椎 in Chinese",
                study("腰椎MR平扫", vec![mr("", "T2 sag")]),
                "MR-06-01",
            ),
            // --- radiographs and views
            (
                "DX chest PA",
                study("CHEST PA", vec![view(dx("CHEST", "PA"), "PA")]),
                "DX-03-01",
            ),
            (
                "DX chest PA + lateral",
                study(
                    "胸部正侧位",
                    vec![
                        view(dx("CHEST", "PA"), "PA"),
                        view(dx("CHEST", "LAT"), "LL"),
                    ],
                ),
                "DX-03-02",
            ),
            (
                "CR chest PA + RL",
                study(
                    "CHEST",
                    vec![
                        view(s("CR", "CHEST", "PA"), "PA"),
                        view(s("CR", "CHEST", "LAT"), "RL"),
                    ],
                ),
                "DX-03-02",
            ),
            (
                "DX chest AP only",
                study("CHEST AP BEDSIDE", vec![view(dx("CHEST", "AP"), "AP")]),
                "!views_unknown",
            ),
            (
                "DX chest no view",
                study("CHEST", vec![dx("CHEST", "x")]),
                "!views_unknown",
            ),
            (
                "DX knee left",
                study("KNEE", vec![side(view(dx("KNEE", "AP"), "AP"), "L")]),
                "DX-07-01:L",
            ),
            (
                "DX knee side from ImageLaterality",
                study("", vec![side(view(dx("KNEE", "LAT"), "LL"), "R")]),
                "DX-07-01:R",
            ),
            // --- mammography, ultrasound
            (
                "MG left",
                study(
                    "MAMMO",
                    vec![
                        side(s("MG", "BREAST", "L CC"), "L"),
                        side(s("MG", "BREAST", "L MLO"), "L"),
                    ],
                ),
                "MG-01-01:L",
            ),
            (
                "MG bilateral",
                study(
                    "乳腺钼靶",
                    vec![
                        side(s("MG", "BREAST", "L CC"), "L"),
                        side(s("MG", "BREAST", "R CC"), "R"),
                    ],
                ),
                "MG-01-01:B",
            ),
            (
                "MG in Chinese body part",
                study("", vec![side(s("MG", "乳腺", "CC"), "R")]),
                "MG-01-01:R",
            ),
            (
                "US abdomen",
                study("腹部超声", vec![s("US", "", "")]),
                "US-04-01",
            ),
            (
                "US abdomen English",
                study("US ABDOMEN", vec![s("US", "ABDOMEN", "")]),
                "US-04-01",
            ),
            // --- PET-CT
            (
                "PET-CT with AC CT",
                study(
                    "PET-CT 全身",
                    vec![
                        s("PT", "WHOLEBODY", "PET AC"),
                        s("CT", "WHOLEBODY", "CTAC 3.75"),
                    ],
                ),
                "PETCT-01",
            ),
            (
                "PET-CT CT is not a chest CT",
                study(
                    "PET/CT",
                    vec![
                        s("PT", "WHOLEBODY", "WB"),
                        s("CT", "CHEST", "Chest diagnostic"),
                    ],
                ),
                "PETCT-01",
            ),
            (
                "AC CT without its PT is not diagnostic",
                study("", vec![s("CT", "CHEST", "CTAC")]),
                "!no_diagnostic_series",
            ),
            (
                "PET-CT whole body in Chinese",
                study("", vec![s("PT", "全身", "PET"), s("CT", "全身", "CT")]),
                "PETCT-01",
            ),
            // --- codes
            (
                "procedure code",
                codes(study("whatever", vec![ct("", "")]), &["CT0301"]),
                "CT-03-01",
            ),
            (
                "code only in requested sequence, no text",
                codes(study("", vec![ct("", "")]), &["CT0301"]),
                "CT-03-01",
            ),
            (
                "code in a series' performed protocol",
                study(
                    "",
                    vec![with(ct("", ""), |x| x.codes = vec!["CT0301".into()])],
                ),
                "CT-03-01",
            ),
            (
                "code of another modality",
                codes(study("", vec![mr("", "")]), &["CT0301"]),
                "!body_part_unknown",
            ),
            (
                "local charge code",
                StudyAttributes {
                    hospital_id: Some("HOSPB".into()),
                    ..codes(study("", vec![ct("", "")]), &["250301001"])
                },
                "CT-03-01",
            ),
            (
                "local code of another hospital",
                StudyAttributes {
                    hospital_id: Some("HOSPC".into()),
                    ..codes(study("", vec![ct("", "")]), &["250301001"])
                },
                "!body_part_unknown",
            ),
            (
                "unknown code falls back to attributes",
                codes(study("HEAD", vec![ct("HEAD", "")]), &["XYZ"]),
                "CT-01-01",
            ),
            // --- not the exam
            (
                "only a localizer",
                study("CHEST", vec![localizer(ct("CHEST", "topo"))]),
                "!no_diagnostic_series",
            ),
            (
                "only a dose report",
                study("CHEST", vec![s("SR", "", "Dose")]),
                "!no_diagnostic_series",
            ),
            (
                "only secondary capture OT",
                study("CHEST", vec![s("OT", "CHEST", "")]),
                "!no_diagnostic_series",
            ),
            ("empty study", study("", vec![]), "!no_diagnostic_series"),
            (
                "key object only",
                study("", vec![s("KO", "", "")]),
                "!no_diagnostic_series",
            ),
            // --- messy text
            (
                "lower-case english",
                study("chest routine", vec![ct("chest", "lung")]),
                "CT-03-01",
            ),
            (
                "full-width plus in 平扫＋增强",
                study(
                    "胸部平扫＋增强",
                    vec![ct("CHEST", "平扫"), ct("CHEST", "增强")],
                ),
                "CT-03-03",
            ),
            (
                "Chinese with spaces",
                study("胸 部 CT", vec![ct("", "x")]),
                "CT-03-01",
            ),
            (
                "brain in protocol name only",
                study(
                    "",
                    vec![with(ct("", "axial"), |x| {
                        x.protocol_name = "BRAIN ROUTINE".into()
                    })],
                ),
                "CT-01-01",
            ),
            (
                "requested procedure description",
                StudyAttributes {
                    requested_procedure_description: "头颅平扫".into(),
                    ..study("", vec![ct("", "")])
                },
                "CT-01-01",
            ),
            (
                "ultrasound of unknown part",
                study("超声", vec![s("US", "", "")]),
                "!body_part_unknown",
            ),
            (
                "MR knee plus spine mixed",
                study("", vec![side(mr("KNEE", "a"), "L"), mr("LSPINE", "b")]),
                "MR-06-01,MR-07-01:L",
            ),
            (
                "MR head enhanced without enhanced item",
                study("HEAD", vec![enhanced(mr("HEAD", "T1 C+"))]),
                "!no_item_matched",
            ),
        ];
        assert!(cases.len() >= 80, "{} cases", cases.len());
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
        assert_eq!(repair_text("CHEST", ""), "CHEST");
    }

    #[test]
    fn matching_words() {
        assert!(spans("LUMBAR", "L").is_empty());
        assert!(!spans("L KNEE", "L").is_empty());
        assert!(!spans("XBPS", "XBPS").is_empty());
        assert!(!spans("CHEST C+", "C+").is_empty());
        assert!(spans("ABC+", "C+").is_empty());
        assert!(!spans("Chest non contrast", "NON CONTRAST").is_empty());
        assert!(!spans("胸部CT", "胸").is_empty());
    }
}
