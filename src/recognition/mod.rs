//! Mutual recognition (互认): the item list, classification of a study into
//! items, and the duplicate-exam check. Pure code: no I/O, no async; the
//! node and the registry feed it.
//!
//! - [`list`]: the region's list (TOML), validated with line and field.
//! - [`classify`]: a study's attributes → its items, or why none.
//! - [`check`]: an order and the patient's priors → warn / no_warn / info.

pub mod check;
pub mod classify;
pub mod list;

use list::RecognitionList;

/// Converts a region's CSV table (header: code, name_zh, name_en,
/// modality, body_part, contrast, laterality, projections, window_days,
/// mark, source; projections separated by '|') into `[[item]]` tables to
/// paste into a list. The result is not a list of its own: vocabulary,
/// body parts, eligibility and reasons are the region's, written once.
pub fn import_csv(csv_text: &str) -> Result<String, String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_reader(csv_text.as_bytes());
    let headers = reader.headers().map_err(|e| e.to_string())?.clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| format!("CSV has no column {name:?}"))
    };
    let cols = [
        "code",
        "name_zh",
        "name_en",
        "modality",
        "body_part",
        "contrast",
        "laterality",
        "projections",
        "window_days",
        "mark",
        "source",
    ]
    .map(col);
    let mut idx = Vec::new();
    for c in cols {
        idx.push(c?);
    }
    let mut out = String::new();
    for (n, record) in reader.records().enumerate() {
        let record = record.map_err(|e| format!("CSV row {}: {e}", n + 2))?;
        let get = |i: usize| record.get(idx[i]).unwrap_or("").to_string();
        let window: i64 = get(8).parse().map_err(|_| {
            format!(
                "CSV row {}: window_days {:?} is not a number",
                n + 2,
                get(8)
            )
        })?;
        let projections: Vec<String> = get(7)
            .split('|')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| format!("{:?}", p.to_ascii_uppercase()))
            .collect();
        let q = |s: String| toml::Value::String(s).to_string();
        out.push_str("[[item]]\n");
        out.push_str(&format!("code = {}\n", q(get(0))));
        out.push_str(&format!("name_zh = {}\n", q(get(1))));
        out.push_str(&format!("name_en = {}\n", q(get(2))));
        out.push_str(&format!("modality = {}\n", q(get(3))));
        out.push_str(&format!("body_part = {}\n", q(get(4))));
        out.push_str(&format!("contrast = {}\n", q(get(5))));
        let laterality = if get(6).is_empty() {
            "none".to_string()
        } else {
            get(6)
        };
        out.push_str(&format!("laterality = {}\n", q(laterality)));
        if !projections.is_empty() {
            out.push_str(&format!("projections = [{}]\n", projections.join(", ")));
        }
        out.push_str(&format!("window_days = {window}\n"));
        if !get(9).is_empty() {
            out.push_str(&format!("mark = {}\n", q(get(9))));
        }
        out.push_str(&format!("source = {}\n\n", q(get(10))));
    }
    Ok(out)
}

/// Loads a list file, reporting every problem.
pub fn load(path: &std::path::Path) -> Result<RecognitionList, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    RecognitionList::parse(&text).map_err(|errors| {
        errors
            .iter()
            .map(|e| format!("{}:{e}", path.display()))
            .collect::<Vec<_>>()
            .join("\n")
    })
}
