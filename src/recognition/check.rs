//! The duplicate-exam check: an order and the patient's priors → warn,
//! no_warn or info, with the evidence. Pure code, table-tested.
//!
//! What a warning must check, all of it (recognition-facts.md, "What a
//! warning must check"): identity verified and access authorised; the prior
//! maps to an item that satisfies the ordered item; the prior is within its
//! validity window; the source institution is eligible for the ordering one
//! and QC-qualified; the images can be retrieved.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::list::{Item, LateralityRule, Projection, RecognitionList};
use crate::contract::{Hospital, ItemConfidence, Laterality, QcStatus, StudyRecord};

pub use crate::contract::Encounter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Warn,
    NoWarn,
    Info,
}

/// Why a prior does not count; one per prior.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotCounted {
    OutOfWindow,
    IneligibleHospital,
    /// QC failed or still pending.
    QcFailed,
    NoConsent,
    ImagesUnavailable,
    DifferentModality,
    DifferentRegion,
    ContrastNotSatisfied,
    DifferentLaterality,
    ViewNotSatisfied,
    PriorUnclassified,
    /// The prior's item would count, but the classifier is not certain of
    /// it (its sources disagree or say too little): shown as information
    /// until the hospital that did the exam confirms it.
    NeedsConfirmation,
    /// The prior's dates cannot be true: a study date after the day of the
    /// check (a modality's clock, or another study's header), or a report
    /// issued before the study was done. Its window cannot be told.
    DatesInconsistent,
}

/// One prior as the check sees it.
#[derive(Debug, Clone)]
pub struct Prior {
    pub hospital_id: String,
    /// From the directory; `None` when the hospital is not in it.
    pub hospital: Option<Hospital>,
    pub record: StudyRecord,
}

/// A prior in the answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PriorView {
    pub hospital_id: String,
    pub hospital_name: Option<String>,
    pub hospital_level: Option<String>,
    pub study_instance_uid: String,
    pub study_date: Option<String>,
    pub report_issued_date: Option<String>,
    /// The report's state at the holding hospital: the doctor reads a
    /// preliminary report differently from a final one.
    pub report_status: crate::contract::ReportStatus,
    /// The date the window counts from: the report's, else the study's.
    pub window_from: Option<String>,
    /// `report_issued_date`, or `study_date` where no report date is known.
    pub window_basis: &'static str,
    /// Calendar days (Asia/Shanghai) since the study date: when the exam
    /// was done (recognition-facts.md, "Rules huren keeps").
    pub days_ago: Option<i64>,
    /// Calendar days since `window_from`: what the validity window is
    /// measured with. A study done two years ago whose report was issued
    /// today is 730 days ago and 0 days into its window.
    pub days_since_window_from: Option<i64>,
    pub window_days: i64,
    pub item_code: Option<String>,
    pub item_name_zh: Option<String>,
    pub item_name_en: Option<String>,
    pub mark: Option<String>,
    pub images_available: bool,
    /// What the prior is made of, for the doctor to judge what it shows.
    pub number_of_series: i64,
    pub number_of_instances: i64,
    /// The shown item's confidence (`None`: a node that predates it).
    pub confidence: Option<ItemConfidence>,
    /// The attributes the shown item rests on, without their values.
    pub evidence: Vec<String>,
    /// The eligibility rule that made the hospital's result count.
    pub eligibility: Option<String>,
    pub reason: Option<NotCounted>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckResult {
    pub outcome: Outcome,
    pub ordered_item: String,
    pub cited: Option<PriorView>,
    pub other_qualifying: Vec<PriorView>,
    pub not_counted: Vec<PriorView>,
    /// For the whole answer: no_prior, identity_unverified,
    /// emergency_info_only, no_consent.
    pub reasons: Vec<String>,
    /// Other hospitals' priors withheld for want of consent.
    pub withheld_count: i64,
}

/// The ordered exam: an item, or what identifies one.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Order {
    #[serde(default)]
    pub item_code: Option<String>,
    #[serde(default)]
    pub modality: Option<String>,
    #[serde(default)]
    pub body_part: Option<String>,
    #[serde(default)]
    pub contrast: Option<super::list::ItemContrast>,
    #[serde(default)]
    pub laterality: Option<Laterality>,
    #[serde(default)]
    pub projections: Vec<Projection>,
}

impl Order {
    /// The item an order is for.
    pub fn item<'a>(&self, list: &'a RecognitionList) -> Result<&'a Item, String> {
        if let Some(code) = &self.item_code {
            return list
                .item(code)
                .ok_or_else(|| format!("item {code:?} is not in list {}", list.meta.version));
        }
        let (Some(m), Some(b)) = (&self.modality, &self.body_part) else {
            return Err("give item_code, or modality and body_part".into());
        };
        let contrast = self.contrast.unwrap_or(super::list::ItemContrast::None);
        let mut projections = self.projections.clone();
        projections.sort();
        list.items
            .iter()
            .find(|i| {
                let mut p = i.projections.clone();
                p.sort();
                i.modality.eq_ignore_ascii_case(m)
                    && i.body_part.eq_ignore_ascii_case(b)
                    && i.contrast == contrast
                    && (projections.is_empty() || p == projections)
            })
            .ok_or_else(|| {
                format!(
                    "no item of list {} for {m} {b} {contrast:?}",
                    list.meta.version
                )
            })
    }
}

pub struct CheckInput<'a> {
    pub list: &'a RecognitionList,
    pub order: &'a Order,
    pub ordering_hospital: &'a Hospital,
    pub priors: &'a [Prior],
    pub withheld_count: i64,
    pub as_of: NaiveDate,
    pub encounter: Encounter,
    pub identity_verified: bool,
}

/// The eligibility rule under which a prior hospital's results count at the
/// ordering hospital, if any (the list's rules, data not code).
pub fn eligible(list: &RecognitionList, prior: &Hospital, order: &Hospital) -> Option<String> {
    if prior.hospital_id == order.hospital_id {
        return Some("同一医院 (same hospital)".into());
    }
    if list.eligibility.require_hospital_qc_passed && prior.qc_status != QcStatus::Passed {
        return None;
    }
    list.eligibility
        .rules
        .iter()
        .find(|r| {
            r.prior_min_level.is_none_or(|l| prior.level >= l)
                && r.prior_max_level.is_none_or(|l| prior.level <= l)
                && r.order_min_level.is_none_or(|l| order.level >= l)
                && r.order_max_level.is_none_or(|l| order.level <= l)
                && (!r.same_group || prior.groups.iter().any(|g| order.groups.contains(g)))
                && (!r.same_level || prior.level == order.level)
                && (!r.prior_at_least_order_level || prior.level >= order.level)
                && (!r.order_accepts_lower_level_results || order.accepts_lower_level_results)
        })
        .map(|r| r.name.clone())
}

fn date(s: &Option<String>) -> Option<NaiveDate> {
    s.as_deref()
        .and_then(|d| NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
}

/// Today in Asia/Shanghai (UTC+8, no daylight saving since 1991).
pub fn today_in_shanghai() -> NaiveDate {
    (chrono::Utc::now() + chrono::Duration::hours(8)).date_naive()
}

/// The modalities of a prior as an exam: its items' where it has items;
/// else its series' modalities, where the CT or MR series of a study with a
/// PT series are the PET exam's (classification rule 7), not exams of
/// their own.
fn exam_modalities(list: &RecognitionList, r: &StudyRecord) -> Vec<String> {
    let of_items: Vec<String> = r
        .items
        .iter()
        .filter_map(|i| list.item(&i.code))
        .map(|i| i.modality.clone())
        .collect();
    if !r.items.is_empty() {
        return of_items;
    }
    let pet = r.modalities.iter().any(|m| m.eq_ignore_ascii_case("PT"));
    r.modalities
        .iter()
        .map(|m| {
            if pet && (m.eq_ignore_ascii_case("CT") || m.eq_ignore_ascii_case("PT")) {
                "PET-CT".to_string()
            } else if pet && m.eq_ignore_ascii_case("MR") {
                "PET-MR".to_string()
            } else {
                m.clone()
            }
        })
        .collect()
}

pub fn check(input: &CheckInput) -> Result<CheckResult, String> {
    let list = input.list;
    let ordered = input.order.item(list)?;
    let ordered_laterality = input.order.laterality;
    if ordered.laterality == LateralityRule::Required && ordered_laterality.is_none() {
        return Err(format!(
            "item {} needs the side (laterality L, R or B)",
            ordered.code
        ));
    }
    let ordered_projections = if input.order.projections.is_empty() {
        ordered.projections.clone()
    } else {
        input.order.projections.clone()
    };
    let mut result = CheckResult {
        outcome: Outcome::NoWarn,
        ordered_item: ordered.code.clone(),
        cited: None,
        other_qualifying: Vec::new(),
        not_counted: Vec::new(),
        reasons: Vec::new(),
        withheld_count: input.withheld_count,
    };
    if !input.identity_verified {
        result.reasons.push("identity_unverified".into());
        return Ok(result);
    }
    let mut qualifying: Vec<PriorView> = Vec::new();
    for prior in input.priors {
        let r = &prior.record;
        let report_date = date(&r.report_issued_date);
        let (from, basis) = match report_date {
            Some(d) => (Some(d), "report_issued_date"),
            None => (date(&r.study_date), "study_date"),
        };
        // Two dates, two meanings: "days ago" is when the exam was done;
        // the window counts from the report (recognition-facts.md).
        let days_since_window_from = from.map(|d| (input.as_of - d).num_days());
        let days_ago = date(&r.study_date).map(|d| (input.as_of - d).num_days());
        // The item of the prior that satisfies the order, if any: a
        // certain one first (only certain items may warn; an item without
        // a confidence comes from a node that predates it).
        let unconfirmed = |i: &crate::contract::RecordItem| {
            i.confidence == Some(ItemConfidence::NeedsConfirmation) && i.confirmed_by.is_none()
        };
        let satisfying = r
            .items
            .iter()
            .filter_map(|i| list.item(&i.code).map(|item| (i, item)))
            .filter(|(_, item)| list.satisfies(&item.code, &ordered.code))
            .min_by_key(|(i, _)| unconfirmed(i));
        let shown_record_item = satisfying.map(|(i, _)| i).or_else(|| r.items.first());
        let shown_item = satisfying
            .map(|(_, item)| item)
            .or_else(|| r.items.first().and_then(|i| list.item(&i.code)));
        let mut view = PriorView {
            hospital_id: prior.hospital_id.clone(),
            hospital_name: prior.hospital.as_ref().map(|h| h.name.clone()),
            hospital_level: prior.hospital.as_ref().map(|h| h.level.name().to_string()),
            study_instance_uid: r.study_instance_uid.clone(),
            study_date: r.study_date.clone(),
            report_issued_date: r.report_issued_date.clone(),
            report_status: r.report_status,
            window_from: from.map(|d| d.format("%Y-%m-%d").to_string()),
            window_basis: basis,
            days_ago,
            days_since_window_from,
            window_days: ordered.window_days,
            item_code: shown_item.map(|i| i.code.clone()),
            item_name_zh: shown_item.map(|i| i.name_zh.clone()),
            item_name_en: shown_item.map(|i| i.name_en.clone()),
            mark: shown_item.map(|i| list.mark_of(i).to_string()),
            images_available: r.images_available,
            number_of_series: r.number_of_series,
            number_of_instances: r.number_of_instances,
            // Confirmed at the holding hospital: certain, whatever the
            // classifier said.
            confidence: shown_record_item.and_then(|i| {
                if i.confirmed_by.is_some() {
                    Some(ItemConfidence::Certain)
                } else {
                    i.confidence
                }
            }),
            evidence: shown_record_item
                .map(|i| i.evidence.clone())
                .unwrap_or_default(),
            eligibility: None,
            reason: None,
        };
        let same_modality = |m: &str| {
            m.eq_ignore_ascii_case(&ordered.modality)
                || (matches!(m, "DX" | "CR" | "DR")
                    && matches!(ordered.modality.as_str(), "DX" | "CR" | "DR"))
        };
        let reason = if let Some((record_item, _)) = satisfying {
            // The item's own views where it has them (a chest PA beside an
            // abdominal AP), else the study's.
            let positions = if record_item.view_positions.is_empty() {
                &r.view_positions
            } else {
                &record_item.view_positions
            };
            let views: Vec<Projection> = positions
                .iter()
                .filter_map(|v| Projection::from_view_position(v))
                .collect();
            let side = if ordered.laterality == LateralityRule::None {
                None
            } else {
                match (record_item.laterality, ordered_laterality) {
                    (Some(Laterality::Both), _) => None,
                    (Some(p), Some(o)) if p == o => None,
                    // The prior's side is not known (or its sources
                    // disagree): not "the other side", unsure.
                    (None, _) => Some(NotCounted::NeedsConfirmation),
                    _ => Some(NotCounted::DifferentLaterality),
                }
            };
            let study_date = date(&r.study_date);
            if let Some(reason) = side {
                Some(reason)
            } else if !ordered_projections.iter().all(|p| views.contains(p)) {
                Some(NotCounted::ViewNotSatisfied)
            } else if study_date.is_some_and(|d| d > input.as_of)
                || matches!((study_date, report_date), (Some(s), Some(r)) if r < s)
            {
                Some(NotCounted::DatesInconsistent)
            } else if days_since_window_from.is_none_or(|d| d > ordered.window_days || d < 0) {
                Some(NotCounted::OutOfWindow)
            } else {
                let eligibility = match &prior.hospital {
                    Some(h) => eligible(list, h, input.ordering_hospital),
                    None => None,
                };
                view.eligibility = eligibility.clone();
                if eligibility.is_none() {
                    Some(NotCounted::IneligibleHospital)
                } else if r.qc_status != QcStatus::Passed {
                    Some(NotCounted::QcFailed)
                } else if !r.images_available {
                    Some(NotCounted::ImagesUnavailable)
                } else if unconfirmed(record_item) {
                    Some(NotCounted::NeedsConfirmation)
                } else {
                    None
                }
            }
        } else if !exam_modalities(list, r).iter().any(|m| same_modality(m)) {
            // Items, not series modalities: a PET-CT's CT series do not make
            // it a CT exam (recognition-facts.md, "Rules huren keeps").
            Some(NotCounted::DifferentModality)
        } else if r.items.is_empty() {
            Some(NotCounted::PriorUnclassified)
        } else {
            let items: Vec<&Item> = r.items.iter().filter_map(|i| list.item(&i.code)).collect();
            let same_part: Vec<&&Item> = items
                .iter()
                .filter(|i| i.body_part == ordered.body_part && same_modality(&i.modality))
                .collect();
            if same_part
                .iter()
                .any(|i| i.contrast == ordered.contrast && i.projections != ordered.projections)
            {
                // A PA film for a PA + lateral order.
                Some(NotCounted::ViewNotSatisfied)
            } else if !same_part.is_empty() {
                Some(NotCounted::ContrastNotSatisfied)
            } else {
                Some(NotCounted::DifferentRegion)
            }
        };
        view.reason = reason;
        match reason {
            None => qualifying.push(view),
            Some(_) => result.not_counted.push(view),
        }
    }
    // The newest qualifying prior is cited.
    qualifying.sort_by(|a, b| {
        b.window_from
            .cmp(&a.window_from)
            .then_with(|| a.study_instance_uid.cmp(&b.study_instance_uid))
    });
    let mut qualifying = qualifying.into_iter();
    result.cited = qualifying.next();
    result.other_qualifying = qualifying.collect();
    if input.priors.is_empty() && input.withheld_count == 0 {
        result.reasons.push("no_prior".into());
    }
    if input.withheld_count > 0 {
        result.reasons.push("no_consent".into());
    }
    result.outcome = if input.encounter == Encounter::Emergency {
        result.reasons.push("emergency_info_only".into());
        Outcome::Info
    } else if result.cited.is_some() {
        Outcome::Warn
    } else {
        Outcome::NoWarn
    };
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{Contrast, Level, RecordItem, ReportStatus};
    use crate::recognition::classify::tests::test_list;

    fn hospital(id: &str, level: Level, groups: &[&str]) -> Hospital {
        Hospital {
            hospital_id: id.into(),
            name: format!("医院{id}"),
            level,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            accepts_lower_level_results: false,
            qc_status: QcStatus::Passed,
            dicomweb_base_url: None,
            province: None,
        }
    }

    fn record(uid: &str, item: &str, report: Option<&str>) -> StudyRecord {
        StudyRecord {
            study_instance_uid: uid.into(),
            record_version: 1,
            patient_key: "0".repeat(64),
            items: if item.is_empty() {
                vec![]
            } else {
                let (code, side) = item.split_once(':').unwrap_or((item, ""));
                vec![RecordItem {
                    confirmed_by: None,
                    confidence: None,
                    evidence: Vec::new(),
                    view_positions: Vec::new(),
                    code: code.into(),
                    laterality: match side {
                        "L" => Some(Laterality::Left),
                        "R" => Some(Laterality::Right),
                        "B" => Some(Laterality::Both),
                        _ => None,
                    },
                }]
            },
            modalities: vec![
                if item.is_empty() {
                    "CT"
                } else {
                    item.split('-').next().unwrap()
                }
                .into(),
            ],
            body_parts: vec![],
            contrast: Contrast::None,
            laterality: vec![],
            view_positions: vec![],
            study_date: Some("2026-01-01".into()),
            study_time: None,
            report_status: if report.is_some() {
                ReportStatus::Final
            } else {
                ReportStatus::None
            },
            report_issued_date: report.map(str::to_string),
            qc_status: QcStatus::Passed,
            images_available: true,
            number_of_series: 1,
            number_of_instances: 1,
            bytes: 1,
            content_root: "0".repeat(64),
            federation_pseudonym: None,
        }
    }

    struct Case {
        name: &'static str,
        order: Order,
        ordering: Hospital,
        priors: Vec<Prior>,
        withheld: i64,
        encounter: Encounter,
        verified: bool,
        /// outcome, then the cited study (or -), then each not-counted reason.
        want: &'static str,
    }

    fn order(code: &str) -> Order {
        let (code, side) = code.split_once(':').unwrap_or((code, ""));
        Order {
            item_code: Some(code.into()),
            laterality: match side {
                "L" => Some(Laterality::Left),
                "R" => Some(Laterality::Right),
                _ => None,
            },
            ..Order::default()
        }
    }

    fn prior(h: &Hospital, r: StudyRecord) -> Prior {
        Prior {
            hospital_id: h.hospital_id.clone(),
            hospital: Some(h.clone()),
            record: r,
        }
    }

    fn summarise(r: &CheckResult) -> String {
        let mut s = format!(
            "{} {}",
            serde_json::to_value(r.outcome).unwrap().as_str().unwrap(),
            r.cited
                .as_ref()
                .map_or("-".to_string(), |c| c.study_instance_uid.clone())
        );
        for n in &r.not_counted {
            s.push(' ');
            s.push_str(
                serde_json::to_value(n.reason.unwrap())
                    .unwrap()
                    .as_str()
                    .unwrap(),
            );
        }
        for reason in &r.reasons {
            s.push_str(" !");
            s.push_str(reason);
        }
        s
    }

    #[test]
    fn check_table() {
        let list = test_list();
        // as_of 2026-03-01; CT windows are 30 days, DX 14, MR 90.
        let as_of = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        let a = hospital("A", Level::TertiaryA, &["南京医联体"]);
        let b = hospital("B", Level::SecondaryA, &[]);
        let c_low = hospital("C", Level::SecondaryB, &[]);
        let d_low_group = hospital("D", Level::Primary, &["南京医联体"]);
        let mut b_qc_failed = hospital("BQ", Level::TertiaryA, &[]);
        b_qc_failed.qc_status = QcStatus::Failed;
        let mut a_opt_in = a.clone();
        a_opt_in.accepts_lower_level_results = true;
        let with = |mut r: StudyRecord, f: &dyn Fn(&mut StudyRecord)| {
            f(&mut r);
            r
        };
        fn day(d: &str) -> Option<&str> {
            Some(d)
        }
        let case = |name, order_code: &str, ordering: &Hospital, priors: Vec<Prior>, want| Case {
            name,
            order: order(order_code),
            ordering: ordering.clone(),
            priors,
            withheld: 0,
            encounter: Encounter::Outpatient,
            verified: true,
            want,
        };
        let mut cases = vec![
            // Window edges: report 30 days before as_of is in, 31 out.
            case(
                "window W is in",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-01-30")))],
                "warn s1",
            ),
            case(
                "window W+1 is out",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-01-29")))],
                "no_warn - out_of_window",
            ),
            case(
                "study date when no report",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", None), &|r| {
                        r.study_date = Some("2026-02-20".into())
                    }),
                )],
                "warn s1",
            ),
            case(
                "no dates at all",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", None), &|r| r.study_date = None),
                )],
                "no_warn - out_of_window",
            ),
            case(
                "a report issued before its study was done",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", day("2026-01-01")), &|r| {
                        r.study_date = Some("2026-02-25".into())
                    }),
                )],
                "no_warn - dates_inconsistent",
            ),
            case(
                "a study dated after the day of the check",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", day("2026-02-25")), &|r| {
                        r.study_date = Some("2026-08-01".into())
                    }),
                )],
                "no_warn - dates_inconsistent",
            ),
            case(
                "the side of a prior not known: unsure, not the other side",
                "MR-07-01:L",
                &a,
                vec![prior(&b, record("s1", "MR-07-01", day("2026-02-25")))],
                "no_warn - needs_confirmation",
            ),
            case(
                "DX 14 days edge in",
                "DX-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("x", "DX-03-01", day("2026-02-15")), &|r| {
                        r.view_positions = vec!["PA".into()]
                    }),
                )],
                "warn x",
            ),
            case(
                "DX 15 days out",
                "DX-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("x", "DX-03-01", day("2026-02-14")), &|r| {
                        r.view_positions = vec!["PA".into()]
                    }),
                )],
                "no_warn - out_of_window",
            ),
            // satisfies and contrast
            case(
                "plain+enhanced satisfies plain order",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-03-03", day("2026-02-20")))],
                "warn s1",
            ),
            case(
                "plain+enhanced satisfies enhanced order",
                "CT-03-02",
                &a,
                vec![prior(&b, record("s1", "CT-03-03", day("2026-02-20")))],
                "warn s1",
            ),
            case(
                "plain does not satisfy enhanced",
                "CT-03-02",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-02-20")))],
                "no_warn - contrast_not_satisfied",
            ),
            case(
                "plain does not satisfy plain+enhanced",
                "CT-03-03",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-02-20")))],
                "no_warn - contrast_not_satisfied",
            ),
            case(
                "different region",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-01-01", day("2026-02-20")))],
                "no_warn - different_region",
            ),
            case(
                "different modality",
                "CT-01-01",
                &a,
                vec![prior(&b, record("s1", "MR-01-01", day("2026-02-20")))],
                "no_warn - different_modality",
            ),
            case(
                "unclassified prior",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "", day("2026-02-20")))],
                "no_warn - prior_unclassified",
            ),
            // laterality
            case(
                "same side",
                "MR-07-01:L",
                &a,
                vec![prior(&b, record("k", "MR-07-01:L", day("2026-02-20")))],
                "warn k",
            ),
            case(
                "other side",
                "MR-07-01:R",
                &a,
                vec![prior(&b, record("k", "MR-07-01:L", day("2026-02-20")))],
                "no_warn - different_laterality",
            ),
            case(
                "both sides cover one",
                "MR-07-01:R",
                &a,
                vec![prior(&b, record("k", "MR-07-01:B", day("2026-02-20")))],
                "warn k",
            ),
            // projections
            case(
                "PA+LAT prior satisfies PA order",
                "DX-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("x", "DX-03-02", day("2026-02-20")), &|r| {
                        r.view_positions = vec!["PA".into(), "LL".into()]
                    }),
                )],
                "warn x",
            ),
            case(
                "PA prior does not satisfy PA+LAT",
                "DX-03-02",
                &a,
                vec![prior(
                    &b,
                    with(record("x", "DX-03-01", day("2026-02-20")), &|r| {
                        r.view_positions = vec!["PA".into()]
                    }),
                )],
                "no_warn - view_not_satisfied",
            ),
            case(
                "views missing on the record",
                "DX-03-01",
                &a,
                vec![prior(&b, record("x", "DX-03-02", day("2026-02-20")))],
                "no_warn - view_not_satisfied",
            ),
            // eligibility by level, group, opt-in; QC
            case(
                "二甲 prior at 三甲",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-02-20")))],
                "warn s1",
            ),
            case(
                "二乙 prior at 三甲: ineligible",
                "CT-03-01",
                &a,
                vec![prior(&c_low, record("s1", "CT-03-01", day("2026-02-20")))],
                "no_warn - ineligible_hospital",
            ),
            case(
                "二乙 prior at 三甲 that opted in",
                "CT-03-01",
                &a_opt_in,
                vec![prior(&c_low, record("s1", "CT-03-01", day("2026-02-20")))],
                "warn s1",
            ),
            case(
                "一级 prior in the same medical group",
                "CT-03-01",
                &a,
                vec![prior(
                    &d_low_group,
                    record("s1", "CT-03-01", day("2026-02-20")),
                )],
                "warn s1",
            ),
            case(
                "二甲 prior at 二乙 (lower accepts upper)",
                "CT-03-01",
                &c_low,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-02-20")))],
                "warn s1",
            ),
            case(
                "二乙 prior at 二乙",
                "CT-03-01",
                &c_low,
                vec![prior(
                    &hospital("E", Level::Primary, &[]),
                    record("s1", "CT-03-01", day("2026-02-20")),
                )],
                "warn s1",
            ),
            case(
                "hospital failing QC",
                "CT-03-01",
                &a,
                vec![prior(
                    &b_qc_failed,
                    record("s1", "CT-03-01", day("2026-02-20")),
                )],
                "no_warn - ineligible_hospital",
            ),
            case(
                "hospital not in directory",
                "CT-03-01",
                &a,
                vec![Prior {
                    hospital_id: "Z".into(),
                    hospital: None,
                    record: record("s1", "CT-03-01", day("2026-02-20")),
                }],
                "no_warn - ineligible_hospital",
            ),
            case(
                "study QC pending",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", day("2026-02-20")), &|r| {
                        r.qc_status = QcStatus::Pending
                    }),
                )],
                "no_warn - qc_failed",
            ),
            case(
                "study QC failed",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", day("2026-02-20")), &|r| {
                        r.qc_status = QcStatus::Failed
                    }),
                )],
                "no_warn - qc_failed",
            ),
            case(
                "images unavailable",
                "CT-03-01",
                &a,
                vec![prior(
                    &b,
                    with(record("s1", "CT-03-01", day("2026-02-20")), &|r| {
                        r.images_available = false
                    }),
                )],
                "no_warn - images_unavailable",
            ),
            case(
                "own hospital always eligible",
                "CT-03-01",
                &c_low,
                vec![prior(&c_low, record("s1", "CT-03-01", day("2026-02-20")))],
                "warn s1",
            ),
            // several priors: the newest qualifying is cited
            case(
                "newest cited",
                "CT-03-01",
                &a,
                vec![
                    prior(&b, record("old", "CT-03-01", day("2026-02-05"))),
                    prior(&b, record("new", "CT-03-03", day("2026-02-25"))),
                    prior(
                        &b,
                        with(record("out", "CT-03-01", day("2025-12-01")), &|r| {
                            r.study_date = Some("2025-11-28".into())
                        }),
                    ),
                ],
                "warn new out_of_window",
            ),
            case("no prior", "CT-03-01", &a, vec![], "no_warn - !no_prior"),
        ];
        cases.push(Case {
            withheld: 2,
            want: "no_warn - !no_consent",
            ..case("consent missing: only counted", "CT-03-01", &a, vec![], "")
        });
        cases.push(Case {
            withheld: 1,
            want: "warn s1 !no_consent",
            ..case(
                "own prior and a withheld one",
                "CT-03-01",
                &a,
                vec![prior(&a, record("s1", "CT-03-01", day("2026-02-20")))],
                "",
            )
        });
        cases.push(Case {
            encounter: Encounter::Emergency,
            want: "info s1 !emergency_info_only",
            ..case(
                "emergency: info only",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-02-20")))],
                "",
            )
        });
        // Items, not series modalities: a PET-CT holds CT series, and is
        // not a CT exam (issue 17 section 3).
        let petct = |r: StudyRecord| with(r, &|r| r.modalities = vec!["CT".into(), "PT".into()]);
        cases.push(case(
            "PET-CT prior for a chest CT order",
            "CT-03-01",
            &a,
            vec![prior(&b, petct(record("p", "PETCT-01", day("2026-02-20"))))],
            "no_warn - different_modality",
        ));
        cases.push(case(
            "unclassified PT + CT study for a chest CT order",
            "CT-03-01",
            &a,
            vec![prior(&b, petct(record("p", "", day("2026-02-20"))))],
            "no_warn - different_modality",
        ));
        cases.push(case(
            "unclassified CT study for a chest CT order",
            "CT-03-01",
            &a,
            vec![prior(&b, record("p", "", day("2026-02-20")))],
            "no_warn - prior_unclassified",
        ));
        // Only certain items warn: an unconfirmed one is shown, with why.
        let unconfirmed = |r: StudyRecord| {
            with(r, &|r| {
                r.items[0].confidence = Some(ItemConfidence::NeedsConfirmation);
            })
        };
        cases.push(case(
            "needs_confirmation never warns",
            "CT-03-01",
            &a,
            vec![prior(
                &b,
                unconfirmed(record("s1", "CT-03-01", day("2026-02-20"))),
            )],
            "no_warn - needs_confirmation",
        ));
        cases.push(case(
            "a certain item warns beside an unconfirmed one",
            "CT-03-01",
            &a,
            vec![
                prior(&b, unconfirmed(record("s1", "CT-03-01", day("2026-02-20")))),
                prior(
                    &b,
                    with(record("s2", "CT-03-01", day("2026-02-21")), &|r| {
                        r.items[0].confidence = Some(ItemConfidence::Certain);
                    }),
                ),
            ],
            "warn s2 needs_confirmation",
        ));
        cases.push(Case {
            verified: false,
            want: "no_warn - !identity_unverified",
            ..case(
                "identity unverified",
                "CT-03-01",
                &a,
                vec![prior(&b, record("s1", "CT-03-01", day("2026-02-20")))],
                "",
            )
        });
        let mut failures = Vec::new();
        for c in &cases {
            let got = check(&CheckInput {
                list: &list,
                order: &c.order,
                ordering_hospital: &c.ordering,
                priors: &c.priors,
                withheld_count: c.withheld,
                as_of,
                encounter: c.encounter,
                identity_verified: c.verified,
            })
            .map(|r| summarise(&r))
            .unwrap_or_else(|e| format!("error {e}"));
            if got != c.want {
                failures.push(format!("{}: got {got:?}, want {:?}", c.name, c.want));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn days_ago_from_the_study_the_window_from_the_report() {
        let list = test_list();
        let a = hospital("A", Level::TertiaryA, &[]);
        let b = hospital("B", Level::SecondaryA, &[]);
        // Done two years ago, reported today.
        let mut r = record("s1", "CT-03-01", Some("2026-03-01"));
        r.study_date = Some("2024-03-01".into());
        let priors = [prior(&b, r)];
        let got = check(&CheckInput {
            list: &list,
            order: &order("CT-03-01"),
            ordering_hospital: &a,
            priors: &priors,
            withheld_count: 0,
            as_of: NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
            encounter: Encounter::Outpatient,
            identity_verified: true,
        })
        .unwrap();
        let cited = got.cited.expect("within the window of its report");
        assert_eq!(cited.days_ago, Some(730));
        assert_eq!(cited.days_since_window_from, Some(0));
        assert_eq!(cited.window_basis, "report_issued_date");
        assert_eq!(cited.window_from.as_deref(), Some("2026-03-01"));
    }

    #[test]
    fn orders_by_attributes_and_errors() {
        let list = test_list();
        let o = Order {
            modality: Some("CT".into()),
            body_part: Some("CHEST".into()),
            contrast: Some(super::super::list::ItemContrast::Enhanced),
            ..Order::default()
        };
        assert_eq!(o.item(&list).unwrap().code, "CT-03-02");
        assert!(order("NOPE").item(&list).is_err());
        let knee = order("MR-07-01");
        let a = hospital("A", Level::TertiaryA, &[]);
        let err = check(&CheckInput {
            list: &list,
            order: &knee,
            ordering_hospital: &a,
            priors: &[],
            withheld_count: 0,
            as_of: NaiveDate::from_ymd_opt(2026, 3, 1).unwrap(),
            encounter: Encounter::Outpatient,
            identity_verified: true,
        })
        .unwrap_err();
        assert!(err.contains("laterality"));
    }
}
