//! Every word of the page, in both languages, in one place. Templates name
//! them as `t.key`; a test checks that every key a template uses is here.
//! Placeholders (`{n}`) are filled in the template with `replace`.

use std::collections::BTreeMap;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Zh,
    En,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        }
    }

    pub fn parse(s: &str) -> Option<Lang> {
        match s.trim() {
            "zh" | "zh-CN" | "zh-cn" => Some(Lang::Zh),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    pub fn other(self) -> Lang {
        match self {
            Lang::Zh => Lang::En,
            Lang::En => Lang::Zh,
        }
    }
}

/// (key, 中文, English).
const STRINGS: &[(&str, &str, &str)] = &[
    // Frame.
    (
        "app_title",
        "影像检查结果互认 · 医生工作台",
        "Imaging result recognition · doctor's page",
    ),
    ("lang_switch", "English", "中文"),
    ("signed_in_as", "当前医生", "Signed in as"),
    ("sign_out", "退出登录", "Sign out"),
    ("current_patient", "当前患者", "Current patient"),
    ("new_patient", "查找其他患者", "Find another patient"),
    ("back_to_patient", "返回患者页面", "Back to the patient"),
    (
        "no_phi_note",
        "患者标识只保存在服务器端会话中，不出现在网址和日志里；每次查看都记入审计。",
        "The patient's identifier stays in your server-side session, never in a URL or a log; every look is audited.",
    ),
    // Sign-in.
    ("login_title", "医生登录", "Doctor sign-in"),
    ("user_id", "用户名", "User ID"),
    ("password", "密码", "Password"),
    ("sign_in", "登录", "Sign in"),
    (
        "login_failed",
        "用户名或密码错误。",
        "Wrong user ID or password.",
    ),
    (
        "login_throttled",
        "登录失败次数过多，请 {minutes} 分钟后再试。",
        "Too many failed sign-ins: try again in {minutes} minutes.",
    ),
    // No region, errors.
    (
        "no_region_title",
        "本节点未加入区域影像平台",
        "This node is not part of a region",
    ),
    (
        "no_region_text",
        "节点没有配置区域登记中心（registry_url），无法查询和互认其他医院的检查结果。请联系信息科。",
        "The node has no regional registry configured (registry_url): other hospitals' exams cannot be looked up or recognised. Ask the IT department.",
    ),
    (
        "error_title",
        "无法完成请求",
        "The request could not be completed",
    ),
    (
        "forbidden",
        "表单已失效（缺少或错误的安全令牌）。请刷新页面后重试。",
        "The form has expired (missing or wrong security token). Reload the page and try again.",
    ),
    (
        "unavailable",
        "服务暂时不可用，请稍后重试。",
        "The service is unavailable; try again later.",
    ),
    ("not_found", "未找到。", "Not found."),
    ("bad_request", "请求有误：", "Bad request: "),
    (
        "no_list",
        "区域互认项目清单尚未生效，暂不能进行互认检查。",
        "No recognition list is active yet: orders cannot be checked.",
    ),
    (
        "registry_refused",
        "区域平台拒绝了查询：",
        "The regional registry refused the query: ",
    ),
    ("no_patient", "请先查找患者。", "Find a patient first."),
    // Find a patient.
    ("find_title", "查找患者", "Find a patient"),
    ("by_rid", "身份证号", "Resident ID number (身份证号)"),
    ("by_pid", "本院患者ID", "Local Patient ID"),
    (
        "issuer",
        "患者ID签发机构（可选）",
        "Issuer of Patient ID (optional)",
    ),
    ("find_button", "查询", "Find"),
    (
        "continue_patient",
        "继续查看当前患者",
        "Continue with the current patient",
    ),
    (
        "err_empty_rid",
        "请输入身份证号。",
        "Enter the resident ID number.",
    ),
    (
        "err_empty_pid",
        "请输入本院患者ID。",
        "Enter the local Patient ID.",
    ),
    (
        "id_check_digit",
        "身份证号校验位错误，请核对。",
        "The resident ID number's check digit is wrong: check the number.",
    ),
    (
        "id_identifier_format",
        "证件号码格式不正确。",
        "The identifier's format is wrong.",
    ),
    (
        "id_no_identifier",
        "该患者在本院没有可跨院核验的证件号。",
        "This patient has no cross-enterprise identifier at this hospital.",
    ),
    // Timeline.
    (
        "timeline_title",
        "既往影像检查（本院及区域）",
        "Prior imaging exams (this hospital and the region)",
    ),
    (
        "identity_unverified",
        "患者身份无法跨院核验：",
        "The patient's identity cannot be verified across hospitals: ",
    ),
    (
        "identity_unverified_tail",
        "只显示本院的检查，互认检查不会提示。",
        "Only this hospital's exams are shown and the order check gives no warning.",
    ),
    (
        "registry_unreachable",
        "未能连接区域平台：只显示本院已发布的检查。",
        "The regional registry could not be reached: only this hospital's published exams are shown.",
    ),
    (
        "withheld",
        "另有 {n} 项其他医院的检查需患者授权后才能查看。",
        "{n} exams at other hospitals need the patient's consent.",
    ),
    (
        "access_consent",
        "患者已授权本院查看其他医院的检查。",
        "The patient has consented to this hospital seeing other hospitals' exams.",
    ),
    (
        "access_break_the_glass",
        "紧急查看（破窗）：未经授权查看，已审计。",
        "Break-the-glass access: shown without consent, audited.",
    ),
    (
        "no_priors",
        "没有找到既往影像检查。",
        "No prior imaging exams found.",
    ),
    ("col_date", "检查日期", "Study date"),
    ("col_item", "检查项目", "Exam"),
    ("col_hospital", "检查医院", "Hospital"),
    ("col_report", "报告", "Report"),
    ("col_qc", "质控", "QC"),
    ("col_status", "互认状态", "Recognition"),
    ("col_open", "影像", "Images"),
    ("this_hospital", "本院", "this hospital"),
    ("report_none", "无报告", "No report"),
    ("report_preliminary", "初步报告", "Preliminary"),
    ("report_final", "正式报告", "Final"),
    ("report_amended", "修订报告", "Amended"),
    ("qc_passed", "质控合格", "Passed"),
    ("qc_pending", "待质控", "Pending"),
    ("qc_failed", "质控不合格", "Failed"),
    ("classified", "已归入互认项目", "Recognised item"),
    ("unclassified", "未归入互认项目", "Not a recognised item"),
    (
        "local_only",
        "仅本院（未发布到区域平台）",
        "This hospital only (not published to the region)",
    ),
    (
        "images_unavailable",
        "影像不可调阅",
        "Images not retrievable",
    ),
    ("open", "查看", "Open"),
    (
        "series_instances",
        "{s} 个序列，{i} 幅图像",
        "{s} series, {i} images",
    ),
    // The order check.
    ("check_title", "开单前互认检查", "Check an order"),
    ("item", "检查项目", "Exam item"),
    ("choose", "请选择", "Choose"),
    ("laterality", "侧别", "Side"),
    (
        "laterality_hint",
        "仅分左右侧的项目需要",
        "only for exams of one side",
    ),
    ("side_none", "不适用", "n/a"),
    ("side_L", "左侧", "Left"),
    ("side_R", "右侧", "Right"),
    ("side_B", "双侧", "Both"),
    ("needs_side", "（需选侧别）", " (side needed)"),
    ("encounter", "就诊类型", "Encounter"),
    ("enc_outpatient", "门诊", "Outpatient"),
    ("enc_inpatient", "住院", "Inpatient"),
    ("enc_emergency", "急诊", "Emergency"),
    (
        "btg",
        "紧急查看（破窗）：未经患者授权查看其他医院的结果，将被审计",
        "Break the glass: see other hospitals' results without consent (audited)",
    ),
    (
        "check_button",
        "检查是否可互认",
        "Check for a recent similar exam",
    ),
    (
        "err_side_needed",
        "该项目需要选择侧别。",
        "This exam needs the side.",
    ),
    ("err_no_item", "请选择检查项目。", "Choose an exam item."),
    // The check's answer.
    ("result_title", "互认检查结果", "Order check result"),
    ("ordered", "本次开单", "Ordered"),
    (
        "warn_title",
        "该患者近期做过类似检查",
        "This patient recently had a similar exam",
    ),
    (
        "warn_text",
        "下列检查结果在互认有效期内，可代替本次检查。请与患者沟通后选择处理意见。",
        "The exam below is within its recognition window and can stand in for this order. Talk to the patient, then record your decision.",
    ),
    (
        "no_warn_title",
        "未发现可互认的近期检查",
        "No recent exam to recognise",
    ),
    (
        "no_warn_text",
        "可以按原计划开单。",
        "The order may go ahead.",
    ),
    (
        "info_title",
        "急诊：既往结果仅供参考",
        "Emergency: prior results for information only",
    ),
    ("evidence", "可互认的检查", "The recognisable exam"),
    ("hospital", "检查医院", "Hospital"),
    ("level", "医院等级", "Level"),
    ("study_date", "检查日期", "Study date"),
    ("report_date", "报告日期", "Report issued"),
    ("report_state", "报告状态", "Report"),
    ("prior_made_of", "影像构成", "Made of"),
    (
        "prior_series_images",
        "{series} 个序列，{n} 幅图像",
        "{series} series, {n} images",
    ),
    ("prior_basis", "判定依据", "Matched on"),
    (
        "prior_unsure",
        "（分类待确认）",
        "(classification unconfirmed)",
    ),
    ("days_ago", "距今", "Days ago"),
    // Confirmation at the source (issue 17 section 2).
    (
        "recognition_title",
        "互认项目（本院确认）",
        "Recognition items (confirmed here)",
    ),
    ("confidence_certain", "确定", "certain"),
    (
        "confidence_needs_confirmation",
        "待确认",
        "needs confirmation",
    ),
    ("evidence_attribute", "依据", "Attribute"),
    ("evidence_value", "值", "Value"),
    ("evidence_where", "来源", "Where"),
    ("evidence_images", "幅图像", "images"),
    (
        "no_classified_item",
        "未识别出互认项目",
        "No recognition item found",
    ),
    (
        "confirm_hint",
        "请核对检查实际所做的项目：确认或改选后重新发布，确认的项目可用于互认提示。",
        "Check what the exam was: confirm or choose other items; the record is published again and confirmed items may give a warning.",
    ),
    ("confirm_role", "确认人角色", "Confirmed as"),
    ("role_radiologist", "诊断医师", "Radiologist"),
    ("role_technologist", "技师", "Technologist"),
    ("confirm_choose_items", "改选项目", "Choose other items"),
    ("confirm_submit", "确认项目", "Confirm items"),
    (
        "confirmed_by_radiologist",
        "已由诊断医师确认",
        "Confirmed by a radiologist",
    ),
    (
        "confirmed_by_technologist",
        "已由技师确认",
        "Confirmed by a technologist",
    ),
    ("corrected", "已改选", "corrected"),
    (
        "confirmation_lapsed",
        "确认后图像已变化，请重新确认",
        "The images changed after the confirmation: confirm again",
    ),
    (
        "confirm_role_missing",
        "请选择确认人角色",
        "Choose who confirms (role)",
    ),
    (
        "not_classified",
        "该检查尚未完成识别",
        "The study has not been classified yet",
    ),
    // Two dates, two meanings (issue 17): the exam's age from the study
    // date, the window from the report date.
    ("done_days_ago", "{n} 天前检查", "done {n} days ago"),
    ("window_elapsed", "已过 {n} 天", "{n} days elapsed"),
    ("days", "{n} 天", "{n} days"),
    ("window", "互认有效期", "Recognition window"),
    (
        "window_from_report_issued_date",
        "自报告日期起算",
        "counted from the report date",
    ),
    (
        "window_from_study_date",
        "自检查日期起算",
        "counted from the study date",
    ),
    ("window_default", "区域默认值", "regional default"),
    ("mark", "互认标识", "Mark"),
    ("eligibility", "互认依据", "Eligibility rule"),
    ("open_images", "查看影像", "Open the images"),
    // The viewer and the fetch of a prior's images (issue 19).
    ("images_title", "影像", "Images"),
    (
        "fetching",
        "正在从{hospital}获取影像，每个序列到齐并校验后即可查看。",
        "Fetching the images from {hospital}; each series can be viewed once it is complete and verified.",
    ),
    (
        "fetching_live",
        "正在从{hospital}获取影像：查看器中的每幅图像到达并校验后即显示。",
        "Fetching the images from {hospital}: the viewer shows each image once it has arrived and been verified.",
    ),
    (
        "fetch_done",
        "全部 {it} 幅图像已到达并校验。",
        "All {it} images have arrived and been verified.",
    ),
    (
        "fetch_progress",
        "序列 {s} / {st}，图像 {i} / {it}",
        "Series {s} of {st}, images {i} of {it}",
    ),
    (
        "open_arrived",
        "打开已到达的序列",
        "Open the series that have arrived",
    ),
    ("open_viewer", "在查看器中打开", "Open in the viewer"),
    (
        "images_failed_title",
        "影像无法打开",
        "The images cannot be opened",
    ),
    (
        "fail_peer_down",
        "持有该检查的医院节点无法访问（{hospital}）：对方节点未响应或返回错误。",
        "The node of the hospital holding the study cannot be reached ({hospital}): it did not answer, or answered with an error.",
    ),
    (
        "fail_no_consent",
        "区域注册中心拒绝调阅：患者未授权本院调阅该检查（或授权已过期、已撤回）。",
        "The regional registry refused: the patient has not authorised this hospital (or the consent expired or was revoked).",
    ),
    (
        "fail_integrity",
        "影像校验失败：对方发送的数据与其发布的内容不符，未保存任何未经校验的数据。",
        "The images failed verification: what the other node sent does not match what it published; nothing unverified was kept.",
    ),
    (
        "fail_registry",
        "无法连接区域注册中心，暂时无法获取授权。",
        "The regional registry cannot be reached: no authorisation can be obtained now.",
    ),
    (
        "fail_local",
        "本节点出错，请稍后重试。",
        "This node failed; try again later.",
    ),
    ("retry", "重试", "Try again"),
    ("series_images", "{n} 幅", "{n} images"),
    (
        "thumbs_after_fetch",
        "影像调阅后显示缩略图",
        "Thumbnails appear once the images are fetched",
    ),
    (
        "other_qualifying",
        "其他可互认的检查",
        "Other qualifying exams",
    ),
    ("not_counted", "不计入互认的检查", "Exams that do not count"),
    ("reason", "原因", "Reason"),
    (
        "nc_out_of_window",
        "超出互认有效期",
        "Outside the recognition window",
    ),
    (
        "nc_ineligible_hospital",
        "该医院的结果不在本院互认范围内",
        "That hospital's results are not recognised here",
    ),
    (
        "nc_qc_failed",
        "质控未通过或尚待质控",
        "QC failed or still pending",
    ),
    (
        "nc_no_consent",
        "未获患者授权",
        "No consent from the patient",
    ),
    (
        "nc_images_unavailable",
        "影像不可调阅",
        "Images not retrievable",
    ),
    (
        "nc_different_modality",
        "检查类型不同",
        "Different modality",
    ),
    (
        "nc_different_region",
        "检查部位不同",
        "Different body region",
    ),
    (
        "nc_contrast_not_satisfied",
        "平扫/增强方式不满足本次开单",
        "Contrast does not satisfy the order",
    ),
    ("nc_different_laterality", "侧别不同", "Other side"),
    (
        "nc_view_not_satisfied",
        "投照体位不满足本次开单",
        "Views do not satisfy the order",
    ),
    (
        "nc_dates_inconsistent",
        "检查日期或报告日期有误，无法判断有效期",
        "Study or report date impossible: the window cannot be told",
    ),
    (
        "nc_prior_unclassified",
        "未归入互认项目",
        "Not a recognised item",
    ),
    (
        "nc_needs_confirmation",
        "检查项目待检查医院确认（仅供参考）",
        "Item awaiting confirmation by the hospital that did the exam (for information)",
    ),
    ("r_no_prior", "没有既往检查。", "No prior exam."),
    (
        "r_identity_unverified",
        "患者身份无法跨院核验：不作互认提示。",
        "The patient's identity cannot be verified: no warning is given.",
    ),
    (
        "r_emergency_info_only",
        "急诊患者：既往结果仅供参考，不作互认提示。",
        "Emergency: priors are shown for information, never as a warning.",
    ),
    (
        "r_no_consent",
        "部分其他医院的检查因未获患者授权未能参与判断。",
        "Some exams at other hospitals were not considered: no consent.",
    ),
    ("list_version", "互认项目清单", "Recognition list"),
    (
        "registry_not_reached_check",
        "未能连接区域平台：只根据本院的检查判断。",
        "The regional registry could not be reached: only this hospital's exams were considered.",
    ),
    // The decision.
    ("decision_title", "处理意见", "Your decision"),
    (
        "accept",
        "采纳既往结果（撤销本次开单）",
        "Accept the prior result (drop this order)",
    ),
    ("repeat", "仍需重新检查", "Repeat the exam"),
    ("repeat_reason", "重新检查的理由", "Reason for repeating"),
    ("free_text", "补充说明（可选）", "Note (optional)"),
    ("submit", "提交", "Submit"),
    (
        "err_no_decision",
        "请选择处理意见。",
        "Choose accept or repeat.",
    ),
    (
        "err_no_reason",
        "选择\u{201c}仍需重新检查\u{201d}时必须选择理由。",
        "A repeat needs a reason.",
    ),
    (
        "err_decided",
        "该检查已有处理意见。",
        "This check has a decision already.",
    ),
    ("decided_title", "处理意见已记录", "Decision recorded"),
    (
        "decided_accepted",
        "已采纳既往结果，本次开单已撤销。",
        "The prior result was accepted; this order is dropped.",
    ),
    (
        "decided_repeated",
        "已记录重新检查。理由：",
        "The repeat was recorded. Reason: ",
    ),
    (
        "non_recognition_yes",
        "计入\u{201c}未互认\u{201d}统计。",
        "Counted as non-recognition.",
    ),
    (
        "non_recognition_no",
        "不计入\u{201c}未互认\u{201d}统计。",
        "Not counted as non-recognition.",
    ),
    ("check_id", "检查记录号", "Check ID"),
    // A study.
    ("study_title", "检查详情", "Study"),
    ("study_uid", "检查实例UID", "Study Instance UID"),
    ("modalities", "检查类型", "Modalities"),
    ("description", "检查描述", "Description"),
    ("accession", "检查号", "Accession number"),
    ("series", "序列", "Series"),
    ("series_number", "序列号", "No."),
    ("body_part", "部位", "Body part"),
    ("instances", "图像", "Images"),
    ("instance_number", "图像号", "No."),
    ("sop_class", "SOP 类", "SOP Class"),
    ("size", "大小（字节）", "Size (bytes)"),
    ("publication", "区域发布", "Publication"),
    ("regional_copy", "区域影像副本", "Regional copy"),
    (
        "regional_copy_note",
        "检查由以下医院完成并保存，报告与质控以该院为准（见患者时间轴）：",
        "Done and held at the hospital below, whose report and QC apply (see the patient's timeline):",
    ),
    ("pub_pending", "待发布", "pending"),
    (
        "pub_published",
        "已发布到区域平台",
        "published to the region",
    ),
    (
        "pub_local_only",
        "仅本院（无可核验的证件号）",
        "this hospital only (no verifiable identifier)",
    ),
    ("pub_retracted", "已撤回", "retracted"),
    (
        "held_elsewhere",
        "本院未保存该检查。影像保存在：",
        "This node does not hold the study. It is held by:",
    ),
    (
        "held_elsewhere_hint",
        "请通过区域影像平台或该医院调阅影像。",
        "Open the images through the regional viewer or at that hospital.",
    ),
    (
        "study_unknown",
        "本院未保存该检查，当前患者的区域记录中也没有。",
        "This node does not hold the study, and the current patient's regional records do not name it.",
    ),
];

/// The strings of one language, by key.
pub fn strings(lang: Lang) -> &'static BTreeMap<&'static str, &'static str> {
    static ZH: OnceLock<BTreeMap<&str, &str>> = OnceLock::new();
    static EN: OnceLock<BTreeMap<&str, &str>> = OnceLock::new();
    match lang {
        Lang::Zh => ZH.get_or_init(|| STRINGS.iter().map(|s| (s.0, s.1)).collect()),
        Lang::En => EN.get_or_init(|| STRINGS.iter().map(|s| (s.0, s.2)).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_filled() {
        let mut seen = std::collections::BTreeSet::new();
        for (key, zh, en) in STRINGS {
            assert!(seen.insert(*key), "duplicate key {key}");
            assert!(!zh.is_empty() && !en.is_empty(), "{key} is empty");
        }
    }

    /// Every `t.key` and `t["prefix_" ~ …]` of every template exists.
    #[test]
    fn templates_use_known_keys() {
        let zh = strings(Lang::Zh);
        for (name, source) in super::super::TEMPLATES {
            let mut rest = *source;
            while let Some(i) = rest.find("t.") {
                let before = rest[..i].chars().last();
                rest = &rest[i + 2..];
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
                    continue;
                }
                let key: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(zh.contains_key(key.as_str()), "{name}: unknown key t.{key}");
            }
        }
        // Keys built from enum values (not_counted reasons, report and QC
        // states, check reasons, sides, encounters).
        for prefix_values in [
            (
                "nc_",
                &[
                    "out_of_window",
                    "ineligible_hospital",
                    "qc_failed",
                    "no_consent",
                    "images_unavailable",
                    "different_modality",
                    "different_region",
                    "contrast_not_satisfied",
                    "different_laterality",
                    "view_not_satisfied",
                    "prior_unclassified",
                    "needs_confirmation",
                    "dates_inconsistent",
                ][..],
            ),
            ("report_", &["none", "preliminary", "final", "amended"][..]),
            ("qc_", &["passed", "pending", "failed"][..]),
            (
                "r_",
                &[
                    "no_prior",
                    "identity_unverified",
                    "emergency_info_only",
                    "no_consent",
                ][..],
            ),
            ("side_", &["L", "R", "B"][..]),
            ("enc_", &["outpatient", "inpatient", "emergency"][..]),
            (
                "pub_",
                &["pending", "published", "local_only", "retracted"][..],
            ),
            ("window_from_", &["report_issued_date", "study_date"][..]),
            (
                "fail_",
                &["peer_down", "no_consent", "integrity", "registry", "local"][..],
            ),
        ] {
            for v in prefix_values.1 {
                let key = format!("{}{v}", prefix_values.0);
                assert!(zh.contains_key(key.as_str()), "missing key {key}");
            }
        }
        assert_eq!(strings(Lang::En).len(), zh.len());
    }
}
