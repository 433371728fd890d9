//! The one matcher: C-FIND and QIDO-RS both describe what they look for as
//! a [`Query`] (a level, matching keys and return keys) and receive
//! [`Match`]es streamed from the index.
//!
//! Matching follows PS3.4 C.2.2.2: universal (empty or `*`), single value,
//! wildcard (`*`, `?`), range (dates and times, open at either end), list of
//! UIDs (and of codes, which workstations send for Modality), and person
//! names matched component by component. The SQL the matcher builds is a
//! prefilter that uses the index's indexes; every candidate row is then
//! checked in Rust against the exact semantics, so SQLite's ASCII-only case
//! folding or a collation cannot widen or narrow a result.
//!
//! Which attributes exist at which level, and where the index keeps them,
//! is one table ([`ATTRIBUTES`]); the conformance statement lists the same.

mod pattern;

use std::collections::BTreeMap;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use futures::TryStreamExt;
use sqlx::Row;
use thiserror::Error;
use tokio::sync::mpsc;

use crate::index::{Dialect, Index};
use crate::types::BlobHash;

pub use pattern::wildcard_match;

#[derive(Debug, Error)]
pub enum Error {
    /// The value is not repeated: it may be an identifier (issue 22).
    #[error("invalid value for {keyword} ({why})")]
    InvalidValue {
        keyword: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("index: {0}")]
    Database(#[from] sqlx::Error),
    #[error("index row: {0}")]
    Row(String),
}

/// Query/Retrieve level (PS3.4 C.6), in hierarchy order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Patient,
    Study,
    Series,
    Image,
}

impl Level {
    /// From the Query/Retrieve Level (0008,0052) value.
    pub fn from_code(code: &str) -> Option<Level> {
        match code.trim() {
            "PATIENT" => Some(Level::Patient),
            "STUDY" => Some(Level::Study),
            "SERIES" => Some(Level::Series),
            "IMAGE" => Some(Level::Image),
            _ => None,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Level::Patient => "PATIENT",
            Level::Study => "STUDY",
            Level::Series => "SERIES",
            Level::Image => "IMAGE",
        }
    }
}

/// How an attribute's values are matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Single value or wildcard, case-sensitive (LO, SH, ...).
    Text,
    /// Single value or list of UIDs (PS3.4 C.2.2.2.2).
    Uid,
    /// A code string: single value, wildcard, or a list of values (as
    /// workstations send Modality `CT\MR`).
    Code,
    Date,
    Time,
    PersonName,
    Integer,
    /// Modalities in Study: a study matches when any of its series'
    /// modalities is one of the values.
    Modalities,
    /// Computed counts and lists: return keys only.
    Computed,
}

/// An attribute the index knows: its level and the SQL expression that
/// reads it (table aliases `p`, `st`, `se`, `i`).
pub struct Attribute {
    pub tag: Tag,
    pub vr: VR,
    pub keyword: &'static str,
    pub level: Level,
    sql: &'static str,
    /// The PostgreSQL expression where it differs from `sql`.
    sql_postgres: Option<&'static str>,
    kind: Kind,
}

impl Attribute {
    fn expr(&self, dialect: Dialect) -> &'static str {
        match (dialect, self.sql_postgres) {
            (Dialect::Postgres, Some(pg)) => pg,
            _ => self.sql,
        }
    }
}

const fn attr(
    tag: Tag,
    vr: VR,
    keyword: &'static str,
    level: Level,
    sql: &'static str,
    kind: Kind,
) -> Attribute {
    Attribute {
        tag,
        vr,
        keyword,
        level,
        sql,
        sql_postgres: None,
        kind,
    }
}

/// Every attribute the matcher can match on or return, by level.
pub static ATTRIBUTES: &[Attribute] = &[
    attr(
        tags::PATIENT_NAME,
        VR::PN,
        "PatientName",
        Level::Patient,
        "p.patient_name",
        Kind::PersonName,
    ),
    attr(
        tags::PATIENT_ID,
        VR::LO,
        "PatientID",
        Level::Patient,
        "p.patient_id",
        Kind::Text,
    ),
    attr(
        tags::ISSUER_OF_PATIENT_ID,
        VR::LO,
        "IssuerOfPatientID",
        Level::Patient,
        "p.issuer_of_patient_id",
        Kind::Text,
    ),
    attr(
        tags::PATIENT_BIRTH_DATE,
        VR::DA,
        "PatientBirthDate",
        Level::Patient,
        "p.patient_birth_date",
        Kind::Date,
    ),
    attr(
        tags::PATIENT_SEX,
        VR::CS,
        "PatientSex",
        Level::Patient,
        "p.patient_sex",
        Kind::Code,
    ),
    attr(
        tags::NUMBER_OF_PATIENT_RELATED_STUDIES,
        VR::IS,
        "NumberOfPatientRelatedStudies",
        Level::Patient,
        "(SELECT CAST(COUNT(*) AS BIGINT) FROM study x WHERE x.patient_key = p.patient_key)",
        Kind::Computed,
    ),
    attr(
        tags::NUMBER_OF_PATIENT_RELATED_SERIES,
        VR::IS,
        "NumberOfPatientRelatedSeries",
        Level::Patient,
        "(SELECT CAST(COALESCE(SUM(x.number_of_study_related_series), 0) AS BIGINT) FROM study x WHERE x.patient_key = p.patient_key)",
        Kind::Computed,
    ),
    attr(
        tags::NUMBER_OF_PATIENT_RELATED_INSTANCES,
        VR::IS,
        "NumberOfPatientRelatedInstances",
        Level::Patient,
        "(SELECT CAST(COALESCE(SUM(x.number_of_study_related_instances), 0) AS BIGINT) FROM study x WHERE x.patient_key = p.patient_key)",
        Kind::Computed,
    ),
    attr(
        tags::STUDY_INSTANCE_UID,
        VR::UI,
        "StudyInstanceUID",
        Level::Study,
        "st.study_instance_uid",
        Kind::Uid,
    ),
    attr(
        tags::STUDY_DATE,
        VR::DA,
        "StudyDate",
        Level::Study,
        "st.study_date",
        Kind::Date,
    ),
    attr(
        tags::STUDY_TIME,
        VR::TM,
        "StudyTime",
        Level::Study,
        "st.study_time",
        Kind::Time,
    ),
    attr(
        tags::ACCESSION_NUMBER,
        VR::SH,
        "AccessionNumber",
        Level::Study,
        "st.accession_number",
        Kind::Text,
    ),
    attr(
        tags::STUDY_ID,
        VR::SH,
        "StudyID",
        Level::Study,
        "st.study_id",
        Kind::Text,
    ),
    attr(
        tags::REFERRING_PHYSICIAN_NAME,
        VR::PN,
        "ReferringPhysicianName",
        Level::Study,
        "st.referring_physician_name",
        Kind::PersonName,
    ),
    attr(
        tags::STUDY_DESCRIPTION,
        VR::LO,
        "StudyDescription",
        Level::Study,
        "st.study_description",
        Kind::Text,
    ),
    attr(
        tags::MODALITIES_IN_STUDY,
        VR::CS,
        "ModalitiesInStudy",
        Level::Study,
        "st.modalities_in_study",
        Kind::Modalities,
    ),
    attr(
        tags::NUMBER_OF_STUDY_RELATED_SERIES,
        VR::IS,
        "NumberOfStudyRelatedSeries",
        Level::Study,
        "CAST(st.number_of_study_related_series AS BIGINT)",
        Kind::Computed,
    ),
    attr(
        tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
        VR::IS,
        "NumberOfStudyRelatedInstances",
        Level::Study,
        "CAST(st.number_of_study_related_instances AS BIGINT)",
        Kind::Computed,
    ),
    Attribute {
        tag: tags::SOP_CLASSES_IN_STUDY,
        vr: VR::UI,
        keyword: "SOPClassesInStudy",
        level: Level::Study,
        sql: "(SELECT group_concat(c, '\\') FROM (SELECT DISTINCT i2.sop_class_uid AS c FROM series s2 \
              JOIN instance i2 ON i2.series_key = s2.series_key \
              WHERE s2.study_key = st.study_key AND i2.is_current = 1))",
        sql_postgres: Some(
            "(SELECT string_agg(DISTINCT i2.sop_class_uid, '\\') FROM series s2 \
             JOIN instance i2 ON i2.series_key = s2.series_key \
             WHERE s2.study_key = st.study_key AND i2.is_current = 1)",
        ),
        kind: Kind::Computed,
    },
    attr(
        tags::SERIES_INSTANCE_UID,
        VR::UI,
        "SeriesInstanceUID",
        Level::Series,
        "se.series_instance_uid",
        Kind::Uid,
    ),
    attr(
        tags::MODALITY,
        VR::CS,
        "Modality",
        Level::Series,
        "se.modality",
        Kind::Code,
    ),
    attr(
        tags::SERIES_NUMBER,
        VR::IS,
        "SeriesNumber",
        Level::Series,
        "CAST(se.series_number AS BIGINT)",
        Kind::Integer,
    ),
    attr(
        tags::SERIES_DESCRIPTION,
        VR::LO,
        "SeriesDescription",
        Level::Series,
        "se.series_description",
        Kind::Text,
    ),
    attr(
        tags::BODY_PART_EXAMINED,
        VR::CS,
        "BodyPartExamined",
        Level::Series,
        "se.body_part_examined",
        Kind::Code,
    ),
    attr(
        tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
        VR::IS,
        "NumberOfSeriesRelatedInstances",
        Level::Series,
        "CAST(se.number_of_series_related_instances AS BIGINT)",
        Kind::Computed,
    ),
    attr(
        tags::SOP_INSTANCE_UID,
        VR::UI,
        "SOPInstanceUID",
        Level::Image,
        "i.sop_instance_uid",
        Kind::Uid,
    ),
    attr(
        tags::SOP_CLASS_UID,
        VR::UI,
        "SOPClassUID",
        Level::Image,
        "i.sop_class_uid",
        Kind::Uid,
    ),
    attr(
        tags::INSTANCE_NUMBER,
        VR::IS,
        "InstanceNumber",
        Level::Image,
        "CAST(i.instance_number AS BIGINT)",
        Kind::Integer,
    ),
];

/// The attribute the index keeps under this tag.
pub fn attribute(tag: Tag) -> Option<&'static Attribute> {
    ATTRIBUTES.iter().find(|a| a.tag == tag)
}

/// A tag from a keyword (`PatientName`) or eight hex digits (`00100010`),
/// as QIDO-RS query parameters name attributes (PS3.18 §8.3.4.1).
pub fn tag_from_keyword_or_hex(s: &str) -> Option<Tag> {
    if s.len() == 8 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        let group = u16::from_str_radix(&s[..4], 16).ok()?;
        let element = u16::from_str_radix(&s[4..], 16).ok()?;
        return Some(Tag(group, element));
    }
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    dicom_dictionary_std::StandardDataDictionary
        .by_name(s)
        .map(|e| e.tag_range().inner())
}

/// A matching condition parsed from a key's value.
#[derive(Debug, Clone, PartialEq)]
enum Condition {
    Single(String),
    Wildcard(String),
    List(Vec<String>),
    /// Inclusive bounds, already padded to comparable strings.
    Range {
        from: Option<String>,
        to: Option<String>,
    },
    Name(String),
    Integer(i64),
}

/// How names are matched; set per node (and per QIDO-RS request for
/// fuzzy matching).
#[derive(Debug, Clone, Copy)]
pub struct MatchOptions {
    /// Person names match regardless of case, the behaviour most PACS
    /// have and radiographers expect; PS3.4 leaves it to the SCP.
    pub case_insensitive_names: bool,
    /// QIDO-RS `fuzzymatching=true`: each name component given matches as
    /// a prefix, case-insensitively.
    pub fuzzy_names: bool,
    /// Most matches one query returns; past it the query ends with
    /// [`Outcome::LimitReached`].
    pub max_matches: Option<usize>,
}

impl Default for MatchOptions {
    fn default() -> Self {
        MatchOptions {
            case_insensitive_names: true,
            fuzzy_names: false,
            max_matches: None,
        }
    }
}

/// What a query asks for.
#[derive(Debug, Clone)]
pub struct Query {
    level: Level,
    /// Return keys (known or not), with their matching condition if any.
    keys: BTreeMap<Tag, Option<Condition>>,
    /// Keys given a value that take no part in matching (see `add_key`).
    ignored: Vec<Tag>,
    all: bool,
    limit: Option<usize>,
    offset: usize,
}

impl Query {
    pub fn new(level: Level) -> Query {
        Query {
            level,
            keys: BTreeMap::new(),
            ignored: Vec::new(),
            all: false,
            limit: None,
            offset: 0,
        }
    }

    pub fn level(&self) -> Level {
        self.level
    }

    /// Adds a key with a value in DICOM matching syntax. Keys the index
    /// does not know, keys of a lower level and computed keys do not take
    /// part in matching (PS3.4 C.2.2.1.1: unsupported keys are ignored) but
    /// are still returned, empty.
    pub fn add_key(&mut self, tag: Tag, value: &str) -> Result<(), Error> {
        let condition = match attribute(tag) {
            Some(a) if a.level <= self.level => parse_condition(a, value)?,
            _ => {
                if !value.is_empty() {
                    self.ignored.push(tag);
                }
                None
            }
        };
        self.keys.insert(tag, condition);
        Ok(())
    }

    /// The keys given a value that take no part in matching (unknown to
    /// the index, or of a lower level), in the order given.
    pub fn ignored_keys(&self) -> &[Tag] {
        &self.ignored
    }

    /// Adds a return key without matching.
    pub fn request(&mut self, tag: Tag) {
        self.keys.entry(tag).or_insert(None);
    }

    /// Returns every attribute the index keeps at and above the level.
    pub fn request_all(&mut self) {
        self.all = true;
    }

    pub fn set_limit(&mut self, limit: usize) {
        self.limit = Some(limit);
    }

    pub fn set_offset(&mut self, offset: usize) {
        self.offset = offset;
    }

    /// Whether a key is one the index cannot answer (returned empty).
    pub fn is_supported(&self, tag: Tag) -> bool {
        attribute(tag).is_some_and(|a| a.level <= self.level)
    }

    /// The keys that take part in matching.
    pub fn has_condition(&self, tag: Tag) -> bool {
        matches!(self.keys.get(&tag), Some(Some(_)))
    }

    /// The attributes returned for each match, in tag order.
    fn returned(&self) -> Vec<&'static Attribute> {
        ATTRIBUTES
            .iter()
            .filter(|a| a.level <= self.level && (self.all || self.keys.contains_key(&a.tag)))
            .collect()
    }
}

fn invalid(a: &Attribute, value: &str, why: &'static str) -> Error {
    Error::InvalidValue {
        keyword: a.keyword,
        value: value.to_string(),
        why,
    }
}

fn has_wildcard(s: &str) -> bool {
    s.contains(['*', '?'])
}

/// Parses a key's value; `None` is the universal match.
fn parse_condition(a: &Attribute, value: &str) -> Result<Option<Condition>, Error> {
    let value = value.trim_matches([' ', '\0']);
    if value.is_empty() || value.chars().all(|c| c == '*') {
        return Ok(None);
    }
    Ok(Some(match a.kind {
        Kind::Computed => return Ok(None),
        Kind::Uid | Kind::Code | Kind::Modalities if value.contains('\\') => {
            let values: Vec<String> = value
                .split('\\')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect();
            if values.is_empty() {
                return Ok(None);
            }
            Condition::List(values)
        }
        Kind::Uid if has_wildcard(value) => {
            return Err(invalid(a, value, "wildcards are not allowed in UIDs"));
        }
        Kind::Date => parse_range(a, value, 8, date_bound)?,
        Kind::Time => parse_range(a, value, 6, time_bound)?,
        Kind::PersonName => Condition::Name(value.to_string()),
        Kind::Integer => Condition::Integer(
            value
                .trim()
                .parse()
                .map_err(|_| invalid(a, value, "not an integer"))?,
        ),
        _ if has_wildcard(value) => Condition::Wildcard(value.to_string()),
        _ => Condition::Single(value.to_string()),
    }))
}

/// Which end of a range a bound is.
#[derive(Clone, Copy, PartialEq)]
enum End {
    Lower,
    Upper,
}

/// A date bound: eight digits naming a calendar date (20240230 is none:
/// refused, not matched as text). The old `YYYY.MM.DD` form is accepted.
fn date_bound(s: &str, _end: End) -> Option<String> {
    let digits: String = s.chars().filter(|c| *c != '.').collect();
    (digits.len() == 8
        && digits.chars().all(|c| c.is_ascii_digit())
        && chrono::NaiveDate::parse_from_str(&digits, "%Y%m%d").is_ok())
    .then_some(digits)
}

/// A time bound, as a string comparable with stored `HHMMSS.FFFFFF`
/// values: an upper bound given to the minute covers that whole minute
/// (PS3.4 C.2.2.2.5: "1200" is 12:00:00 to 12:00:59.999999).
fn time_bound(s: &str, end: End) -> Option<String> {
    let s: String = s.chars().filter(|c| *c != ':').collect();
    let (whole, fraction) = s.split_once('.').unwrap_or((&s, ""));
    if whole.is_empty()
        || whole.len() > 6
        || whole.len() % 2 == 1
        || !whole.chars().all(|c| c.is_ascii_digit())
        || !fraction.chars().all(|c| c.is_ascii_digit())
        || fraction.len() > 6
    {
        return None;
    }
    // HH 00-23, MM 00-59, SS 00-60 (a leap second; PS3.5 Table 6.2-1 TM).
    let limits = [23u8, 59, 60];
    let in_range = whole
        .as_bytes()
        .chunks(2)
        .zip(limits)
        .all(|(pair, max)| (pair[0] - b'0') * 10 + (pair[1] - b'0') <= max);
    if !in_range {
        return None;
    }
    Some(match end {
        End::Lower => s.to_string(),
        End::Upper => {
            // Fill the unspecified precision with its largest value.
            let full = format!("{whole}{}", &"595959"[whole.len()..]);
            format!("{full}.{fraction}{}", "9".repeat(6 - fraction.len()))
        }
    })
}

fn parse_range(
    a: &Attribute,
    value: &str,
    _width: usize,
    bound: fn(&str, End) -> Option<String>,
) -> Result<Condition, Error> {
    let parse = |s: &str, end: End| -> Result<Option<String>, Error> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(None);
        }
        bound(s, end)
            .map(Some)
            .ok_or_else(|| invalid(a, value, "not a valid date or time"))
    };
    match value.split_once('-') {
        Some((from, to)) => {
            let from = parse(from, End::Lower)?;
            let to = parse(to, End::Upper)?;
            if from.is_none() && to.is_none() {
                return Err(invalid(a, value, "a range needs at least one bound"));
            }
            Ok(Condition::Range { from, to })
        }
        // A single date matches that day; a single time matches the whole
        // of the precision it is given in.
        None => Ok(Condition::Range {
            from: parse(value, End::Lower)?,
            to: parse(value, End::Upper)?,
        }),
    }
}

/// One value of a match: a DICOM element, its values as text (empty for
/// zero length).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub tag: Tag,
    pub vr: VR,
    pub values: Vec<String>,
}

/// Where an instance's bytes are, for retrieval.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceLocation {
    pub study_instance_uid: String,
    pub series_instance_uid: String,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax_uid: String,
    pub blob_hash: BlobHash,
    pub blob_size: u64,
}

/// One matching entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub level: Level,
    /// The returned attributes the index keeps, in tag order. Requested
    /// keys the index does not know are not here; the caller returns them
    /// empty.
    pub elements: Vec<Element>,
    /// Set for IMAGE-level matches.
    pub instance: Option<InstanceLocation>,
}

impl Match {
    pub fn get(&self, tag: Tag) -> Option<&Element> {
        self.elements.iter().find(|e| e.tag == tag)
    }

    /// The first value of an attribute, or "".
    pub fn first(&self, tag: Tag) -> &str {
        self.get(tag)
            .and_then(|e| e.values.first())
            .map(String::as_str)
            .unwrap_or("")
    }
}

/// What ended a query's stream, sent after the last match.
#[derive(Debug)]
pub enum Outcome {
    /// Every match was sent.
    Complete,
    /// More than [`MatchOptions::max_matches`] entities match; that many
    /// were sent.
    LimitReached,
    Failed(Error),
}

/// An item of a query's stream.
#[derive(Debug)]
pub enum Item {
    Match(Box<Match>),
    End(Outcome),
}

/// Runs a query in its own task; matches arrive on the returned channel as
/// the database produces them, ending with one [`Item::End`]. Dropping the
/// receiver (C-CANCEL, a closed HTTP connection) stops the query.
pub fn run(index: &Index, query: Query, options: MatchOptions) -> mpsc::Receiver<Item> {
    let (tx, rx) = mpsc::channel(32);
    let pool = index.pool().clone();
    let dialect = index.dialect();
    tokio::spawn(async move {
        let outcome = match stream(&pool, dialect, &query, options, &tx).await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::Failed(e),
        };
        let _ = tx.send(Item::End(outcome)).await;
    });
    rx
}

/// Collects every match of a query (for retrieval, where the whole list is
/// needed up front to count sub-operations).
pub async fn collect(index: &Index, query: Query) -> Result<Vec<Match>, Error> {
    let mut rx = run(index, query, MatchOptions::default());
    let mut out = Vec::new();
    while let Some(item) = rx.recv().await {
        match item {
            Item::Match(m) => out.push(*m),
            Item::End(Outcome::Failed(e)) => return Err(e),
            Item::End(_) => break,
        }
    }
    Ok(out)
}

/// A parameter of the generated SQL.
#[derive(Debug, Clone)]
enum Bind {
    Text(String),
    Int(i64),
}

struct Sql {
    text: String,
    binds: Vec<Bind>,
}

impl Sql {
    fn bind(&mut self, b: Bind) -> String {
        self.binds.push(b);
        format!("${}", self.binds.len())
    }
}

/// The literal text of a pattern before its first wildcard.
fn literal_prefix(pattern: &str) -> &str {
    let end = pattern.find(['*', '?']).unwrap_or(pattern.len());
    &pattern[..end]
}

/// A LIKE pattern equivalent to a DICOM wildcard pattern.
fn like_pattern(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len() + 2);
    for c in pattern.chars() {
        match c {
            '*' => out.push('%'),
            '?' => out.push('_'),
            '%' | '_' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out
}

/// The SQL prefilter for one condition; `None` when the Rust check alone
/// decides.
fn sql_condition(
    a: &Attribute,
    c: &Condition,
    dialect: Dialect,
    options: &MatchOptions,
    sql: &mut Sql,
) -> Option<String> {
    let expr = a.expr(dialect);
    match (a.kind, c) {
        // A correlated EXISTS rather than `IN (SELECT ...)`: with a
        // selective key beside it (a date range) the planner drives from
        // that key and probes series_modality_idx per study, instead of
        // first collecting every study with a CT series.
        (Kind::Modalities, Condition::Single(v)) => {
            let p = sql.bind(Bind::Text(v.clone()));
            Some(format!(
                "EXISTS (SELECT 1 FROM series x WHERE x.modality = {p} AND x.study_key = st.study_key)"
            ))
        }
        (Kind::Modalities, Condition::List(vs)) => {
            let ps: Vec<String> = vs.iter().map(|v| sql.bind(Bind::Text(v.clone()))).collect();
            Some(format!(
                "EXISTS (SELECT 1 FROM series x WHERE x.modality IN ({}) AND x.study_key = st.study_key)",
                ps.join(", ")
            ))
        }
        (Kind::Modalities, _) => None,
        (_, Condition::Single(v)) => {
            let p = sql.bind(Bind::Text(v.clone()));
            Some(format!("{expr} = {p}"))
        }
        (_, Condition::List(vs)) => {
            let ps: Vec<String> = vs.iter().map(|v| sql.bind(Bind::Text(v.clone()))).collect();
            Some(format!("{expr} IN ({})", ps.join(", ")))
        }
        (_, Condition::Wildcard(v)) => {
            // LIKE is case-insensitive for ASCII in SQLite: a superset of
            // the case-sensitive match, narrowed in Rust.
            let p = sql.bind(Bind::Text(like_pattern(v)));
            Some(format!("{expr} LIKE {p} ESCAPE '\\'"))
        }
        (_, Condition::Range { from, to }) => {
            let mut parts = vec![format!("{expr} <> ''")];
            if let Some(from) = from {
                let p = sql.bind(Bind::Text(from.clone()));
                parts.push(format!("{expr} >= {p}"));
            }
            if let Some(to) = to {
                let p = sql.bind(Bind::Text(to.clone()));
                parts.push(format!("{expr} <= {p}"));
            }
            Some(parts.join(" AND "))
        }
        (_, Condition::Integer(n)) => {
            let p = sql.bind(Bind::Int(*n));
            Some(format!("{expr} = {p}"))
        }
        (_, Condition::Name(v)) => name_prefilter(expr, v, dialect, options, sql),
    }
}

/// The text every name a pattern matches starts with: its components
/// joined by `^` while each is given in full (a component matched
/// component-wise must equal the stored one), then the literal start of the
/// next. An empty component (`^Na`, `Li^^M`) stops it: that component
/// matches anything. Fuzzy matching makes every component a prefix, so
/// only the first counts.
fn name_literal_prefix(pattern: &str, fuzzy: bool) -> String {
    let mut prefix = String::new();
    for (i, component) in pattern.split('^').enumerate() {
        let literal = literal_prefix(component);
        if literal.is_empty() {
            break;
        }
        if i > 0 {
            prefix.push('^');
        }
        prefix.push_str(literal);
        if fuzzy || literal.len() < component.len() {
            break;
        }
    }
    prefix
}

/// The case-folded forms a stored name starting with `prefix` can take in
/// SQL: lower() folds ASCII (always) but, on SQLite and on PostgreSQL under
/// the C ctype, leaves other letters as stored, so each non-ASCII cased
/// letter may appear in either case. At most 8 forms: past the third such
/// letter the prefix is cut, which only widens the prefilter.
fn case_variants(prefix: &str) -> Vec<String> {
    let mut variants = vec![String::new()];
    for c in prefix.chars() {
        if c.is_ascii() {
            let c = c.to_ascii_lowercase();
            variants.iter_mut().for_each(|v| v.push(c));
        } else if c.is_lowercase() || c.is_uppercase() {
            if variants.len() >= 8 {
                break;
            }
            let lower: String = c.to_lowercase().collect();
            let upper: String = c.to_uppercase().collect();
            variants = variants
                .into_iter()
                .flat_map(|v| {
                    let mut forms = vec![format!("{v}{lower}")];
                    if upper != lower {
                        forms.push(format!("{v}{upper}"));
                    }
                    forms
                })
                .collect();
        } else {
            variants.iter_mut().for_each(|v| v.push(c));
        }
    }
    variants.dedup();
    variants
}

/// Whether SQL can fold a character's case the way Rust does: SQLite's
/// lower() folds ASCII only, and so does PostgreSQL's under the C ctype.
fn foldable_in_sql(c: char) -> bool {
    c.is_ascii() || !(c.is_lowercase() || c.is_uppercase())
}

/// The SQL expression for the second component group (Ideographic) and
/// what follows it; the whole value when it has no `=`. An expression index
/// of migration 0004 serves it for Patient's Name.
fn second_group(expr: &str, dialect: Dialect) -> String {
    match dialect {
        Dialect::Sqlite => format!("substr({expr}, instr({expr}, '=') + 1)"),
        Dialect::Postgres => {
            format!("substr({expr}, strpos({expr}, '=') + 1) COLLATE \"C\"")
        }
    }
}

/// Narrows the rows a person-name pattern can match, using the name
/// indexes where the pattern allows; the exact match is decided in Rust.
///
/// - The literal prefix of the pattern's family name component starts the
///   Alphabetic group, which starts the stored value: a range on the
///   (case-folded) value. Folding stops at the first non-ASCII cased
///   letter, which SQL may fold differently: `Mü*` uses the range of `m`.
/// - A prefix without any cased letter (Chinese, Japanese, Korean) may also
///   start the Ideographic group: a second range on that group, OR-ed.
/// - Anything else (a leading wildcard, a pattern with `=`): a substring
///   test on the longest literal run, or no prefilter.
fn name_prefilter(
    expr: &str,
    pattern: &str,
    dialect: Dialect,
    options: &MatchOptions,
    sql: &mut Sql,
) -> Option<String> {
    let insensitive = options.case_insensitive_names || options.fuzzy_names;
    let column = if insensitive {
        match dialect {
            Dialect::Sqlite => format!("lower({expr})"),
            Dialect::Postgres => format!("lower({expr}) COLLATE \"C\""),
        }
    } else {
        match dialect {
            Dialect::Sqlite => expr.to_string(),
            Dialect::Postgres => format!("{expr} COLLATE \"C\""),
        }
    };
    let fold = |s: &str| {
        if insensitive {
            s.to_lowercase()
        } else {
            s.to_string()
        }
    };
    let range = |column: &str, prefix: &str, sql: &mut Sql| {
        let hi = format!("{prefix}\u{10FFFF}");
        let p1 = sql.bind(Bind::Text(prefix.to_string()));
        let p2 = sql.bind(Bind::Text(hi));
        format!("({column} >= {p1} AND {column} < {p2})")
    };
    if !pattern.contains('=') {
        let literal = name_literal_prefix(pattern, options.fuzzy_names);
        if !literal.is_empty() {
            let variants = if insensitive {
                case_variants(&literal)
            } else {
                vec![literal.clone()]
            };
            let cased = literal
                .chars()
                .any(|c| c.is_lowercase() || c.is_uppercase());
            let mut ranges: Vec<String> = variants.iter().map(|v| range(&column, v, sql)).collect();
            if !cased && expr == "p.patient_name" {
                // Chinese, Japanese, Korean: the Ideographic group too.
                ranges.push(range(&second_group(expr, dialect), &literal, sql));
            } else if !cased && !literal.is_ascii() {
                // Could sit in a later group, which has no index here.
                ranges.clear();
            }
            if !ranges.is_empty() {
                return Some(format!("({})", ranges.join(" OR ")));
            }
        }
    }
    // The longest literal run must appear somewhere in the value.
    let longest = pattern
        .split(['*', '?', '^', '='])
        .map(str::trim)
        .max_by_key(|s| s.chars().count())
        .unwrap_or("");
    if longest.is_empty() || (insensitive && !longest.chars().all(foldable_in_sql)) {
        return None;
    }
    let p = sql.bind(Bind::Text(format!("%{}%", like_pattern(&fold(longest)))));
    let column = if insensitive {
        format!("lower({expr})")
    } else {
        expr.to_string()
    };
    Some(format!("{column} LIKE {p} ESCAPE '\\'"))
}

/// The exact check of one condition against a stored value.
fn condition_holds(a: &Attribute, c: &Condition, stored: &str, options: &MatchOptions) -> bool {
    match (a.kind, c) {
        (Kind::Modalities, _) => stored
            .split('\\')
            .any(|m| value_matches(c, m.trim(), false)),
        (Kind::PersonName, Condition::Name(p)) => pattern::name_matches(
            p,
            stored,
            options.case_insensitive_names || options.fuzzy_names,
            options.fuzzy_names,
        ),
        _ => value_matches(c, stored, false),
    }
}

fn value_matches(c: &Condition, stored: &str, insensitive: bool) -> bool {
    match c {
        Condition::Single(v) => stored == v,
        Condition::List(vs) => vs.iter().any(|v| {
            if has_wildcard(v) {
                wildcard_match(v, stored, insensitive)
            } else {
                v == stored
            }
        }),
        Condition::Wildcard(p) => wildcard_match(p, stored, insensitive),
        Condition::Range { from, to } => {
            !stored.is_empty()
                && from.as_deref().is_none_or(|f| stored >= f)
                && to.as_deref().is_none_or(|t| stored <= t)
        }
        Condition::Integer(n) => stored.trim().parse::<i64>().ok() == Some(*n),
        Condition::Name(p) => pattern::name_matches(p, stored, insensitive, false),
    }
}

/// The columns every IMAGE-level row carries for retrieval, after the
/// returned attributes.
const LOCATION_COLUMNS: &str = "st.study_instance_uid, se.series_instance_uid, i.sop_class_uid, \
     i.sop_instance_uid, i.transfer_syntax_uid, i.blob_hash, CAST(i.blob_size AS BIGINT)";

fn build_sql(
    query: &Query,
    dialect: Dialect,
    options: &MatchOptions,
) -> (Sql, Vec<&'static Attribute>, bool) {
    let returned = query.returned();
    // Conditions are read back too, for the exact check in Rust.
    let mut selected: Vec<&'static Attribute> = returned.clone();
    for (tag, c) in &query.keys {
        if c.is_some()
            && let Some(a) = attribute(*tag)
            && !selected.iter().any(|s| s.tag == a.tag)
        {
            selected.push(a);
        }
    }
    let mut sql = Sql {
        text: String::new(),
        binds: Vec::new(),
    };
    let mut columns: Vec<String> = selected
        .iter()
        .map(|a| a.expr(dialect).to_string())
        .collect();
    if columns.is_empty() {
        columns.push("1".into());
    }
    let (from, key) = match query.level {
        Level::Patient => ("patient p".to_string(), "p.patient_key"),
        Level::Study => (
            "study st JOIN patient p ON p.patient_key = st.patient_key".to_string(),
            "st.study_key",
        ),
        Level::Series => (
            "series se JOIN study st ON st.study_key = se.study_key \
             JOIN patient p ON p.patient_key = st.patient_key"
                .to_string(),
            "se.series_key",
        ),
        Level::Image => (
            "instance i JOIN series se ON se.series_key = i.series_key \
             JOIN study st ON st.study_key = se.study_key \
             JOIN patient p ON p.patient_key = st.patient_key"
                .to_string(),
            "i.instance_key",
        ),
    };
    let mut wheres = Vec::new();
    // Only what holds a current instance is found: a study or series whose
    // every instance was sent again under another study (a new version
    // elsewhere) keeps its row for the earlier versions, but is empty.
    match query.level {
        Level::Image => wheres.push("i.is_current = 1".to_string()),
        Level::Series => wheres.push("se.number_of_series_related_instances > 0".to_string()),
        Level::Study => wheres.push("st.number_of_study_related_instances > 0".to_string()),
        Level::Patient => wheres.push(
            "EXISTS (SELECT 1 FROM study x WHERE x.patient_key = p.patient_key \
             AND x.number_of_study_related_instances > 0)"
                .to_string(),
        ),
    }
    let mut exact_in_sql = true;
    for (tag, c) in &query.keys {
        let (Some(c), Some(a)) = (c, attribute(*tag)) else {
            continue;
        };
        if matches!(c, Condition::Name(_) | Condition::Wildcard(_))
            || (a.kind == Kind::Modalities
                && !matches!(c, Condition::Single(_) | Condition::List(_)))
            || (matches!(c, Condition::List(vs) if vs.iter().any(|v| has_wildcard(v))))
        {
            exact_in_sql = false;
        }
        if let Some(w) = sql_condition(a, c, dialect, options, &mut sql) {
            wheres.push(w);
        }
    }
    let mut text = format!("SELECT {}", columns.join(", "));
    if query.level == Level::Image {
        text.push_str(", ");
        text.push_str(LOCATION_COLUMNS);
    }
    text.push_str(&format!(" FROM {from}"));
    if !wheres.is_empty() {
        text.push_str(" WHERE ");
        text.push_str(&wheres.join(" AND "));
    }
    // A stable order when pages are asked for, so that QIDO-RS offset pages
    // do not overlap. Without paging no order is imposed: the planner stays
    // free to walk the most selective index (a date range, a name prefix)
    // instead of the primary key.
    if query.limit.is_some() || query.offset > 0 {
        text.push_str(&format!(" ORDER BY {key}"));
    }
    if exact_in_sql {
        let wanted = effective_limit(query, options);
        if let Some(limit) = wanted {
            // Clamped, not wrapped: 2^64-1 as i64 is -1, which SQLite
            // reads as "no limit" (issue 22: offset=18446744073709551615
            // returned everything).
            let p = sql.bind(Bind::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
            text.push_str(&format!(" LIMIT {p}"));
        }
        if query.offset > 0 {
            // SQLite takes OFFSET only after a LIMIT; -1 is none.
            if wanted.is_none() && dialect == Dialect::Sqlite {
                text.push_str(" LIMIT -1");
            }
            let p = sql.bind(Bind::Int(i64::try_from(query.offset).unwrap_or(i64::MAX)));
            text.push_str(&format!(" OFFSET {p}"));
        }
    }
    sql.text = text;
    (sql, selected, exact_in_sql)
}

/// Rows wanted from the database: the page, plus one to tell that the
/// node's maximum was exceeded.
fn effective_limit(query: &Query, options: &MatchOptions) -> Option<usize> {
    match (query.limit, options.max_matches) {
        (Some(l), Some(m)) => Some(l.min(m + 1)),
        (Some(l), None) => Some(l),
        (None, Some(m)) => Some(m + 1),
        (None, None) => None,
    }
}

fn text_of(row: &sqlx::any::AnyRow, i: usize) -> Result<String, Error> {
    if let Ok(v) = row.try_get::<Option<String>, _>(i) {
        return Ok(v.unwrap_or_default());
    }
    match row.try_get::<Option<i64>, _>(i) {
        Ok(v) => Ok(v.map(|n| n.to_string()).unwrap_or_default()),
        Err(e) => Err(Error::Row(format!("column {i}: {e}"))),
    }
}

async fn stream(
    pool: &sqlx::AnyPool,
    dialect: Dialect,
    query: &Query,
    options: MatchOptions,
    tx: &mpsc::Sender<Item>,
) -> Result<Outcome, Error> {
    let (sql, selected, exact_in_sql) = build_sql(query, dialect, &options);
    tracing::debug!(sql = %sql.text, "query");
    // The text is built from this module's own fragments; every value a
    // peer sent is a bound parameter.
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.text.clone()));
    for b in &sql.binds {
        q = match b {
            Bind::Text(s) => q.bind(s.clone()),
            Bind::Int(n) => q.bind(*n),
        };
    }
    let mut rows = q.fetch(pool);
    let returned: Vec<Tag> = query.returned().iter().map(|a| a.tag).collect();
    let mut skipped = 0usize;
    let mut sent = 0usize;
    while let Some(row) = rows.try_next().await? {
        let mut values = Vec::with_capacity(selected.len());
        for i in 0..selected.len() {
            values.push(text_of(&row, i)?);
        }
        if !exact_in_sql {
            let holds = query.keys.iter().all(|(tag, c)| {
                let (Some(c), Some(pos)) = (c, selected.iter().position(|a| a.tag == *tag)) else {
                    return true;
                };
                condition_holds(selected[pos], c, &values[pos], &options)
            });
            if !holds {
                continue;
            }
            if skipped < query.offset {
                skipped += 1;
                continue;
            }
            if query.limit.is_some_and(|l| sent >= l) {
                return Ok(Outcome::Complete);
            }
        }
        if options.max_matches.is_some_and(|m| sent >= m) {
            return Ok(Outcome::LimitReached);
        }
        let instance = if query.level == Level::Image {
            let base = selected.len();
            let hash_text = text_of(&row, base + 5)?;
            Some(InstanceLocation {
                study_instance_uid: text_of(&row, base)?,
                series_instance_uid: text_of(&row, base + 1)?,
                sop_class_uid: text_of(&row, base + 2)?,
                sop_instance_uid: text_of(&row, base + 3)?,
                transfer_syntax_uid: text_of(&row, base + 4)?,
                blob_hash: BlobHash::parse(&hash_text)
                    .map_err(|_| Error::Row(format!("bad blob hash {hash_text:?}")))?,
                blob_size: text_of(&row, base + 6)?.parse().unwrap_or(0),
            })
        } else {
            None
        };
        let elements = selected
            .iter()
            .zip(values)
            .filter(|(a, _)| returned.contains(&a.tag))
            .map(|(a, v)| Element {
                tag: a.tag,
                vr: a.vr,
                values: split_values(a, v),
            })
            .collect();
        let m = Match {
            level: query.level,
            elements,
            instance,
        };
        if tx.send(Item::Match(Box::new(m))).await.is_err() {
            // The receiver is gone (cancelled): stop reading.
            return Ok(Outcome::Complete);
        }
        sent += 1;
    }
    Ok(Outcome::Complete)
}

fn split_values(a: &Attribute, v: String) -> Vec<String> {
    if v.is_empty() {
        return Vec::new();
    }
    match a.vr {
        // Multi-valued as stored: backslash-separated.
        VR::CS | VR::UI => v.split('\\').map(str::to_string).collect(),
        _ => vec![v],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(tag: Tag, v: &str) -> Option<Condition> {
        parse_condition(attribute(tag).unwrap(), v).unwrap()
    }

    #[test]
    fn parses_matching_types() {
        assert_eq!(cond(tags::PATIENT_ID, ""), None);
        assert_eq!(cond(tags::PATIENT_ID, "*"), None);
        assert_eq!(
            cond(tags::PATIENT_ID, "12*"),
            Some(Condition::Wildcard("12*".into()))
        );
        assert_eq!(
            cond(tags::STUDY_INSTANCE_UID, "1.2\\1.3"),
            Some(Condition::List(vec!["1.2".into(), "1.3".into()]))
        );
        assert_eq!(
            cond(tags::STUDY_DATE, "20200101-"),
            Some(Condition::Range {
                from: Some("20200101".into()),
                to: None
            })
        );
        assert_eq!(
            cond(tags::STUDY_TIME, "1000-1200"),
            Some(Condition::Range {
                from: Some("1000".into()),
                to: Some("120059.999999".into())
            })
        );
        assert!(parse_condition(attribute(tags::STUDY_DATE).unwrap(), "2020-13").is_err());
        assert!(parse_condition(attribute(tags::SOP_INSTANCE_UID).unwrap(), "1.2.*").is_err());
    }

    #[test]
    fn time_ranges_cover_their_precision() {
        let c = cond(tags::STUDY_TIME, "-1200").unwrap();
        assert!(value_matches(&c, "120059", false));
        assert!(value_matches(&c, "115959.123", false));
        assert!(!value_matches(&c, "120100", false));
        let c = cond(tags::STUDY_TIME, "10").unwrap();
        assert!(value_matches(&c, "103000", false));
        assert!(!value_matches(&c, "110000", false));
    }

    #[test]
    fn impossible_dates_and_times_are_refused() {
        let cases = [
            (tags::STUDY_DATE, "20240229", true),
            (tags::STUDY_DATE, "20240230", false),
            (tags::STUDY_DATE, "20231301-", false),
            (tags::STUDY_DATE, "20240101-20240231", false),
            (tags::STUDY_TIME, "235960", true),
            (tags::STUDY_TIME, "250000", false),
            (tags::STUDY_TIME, "1260", false),
            (tags::STUDY_TIME, "-2400", false),
        ];
        for (tag, value, ok) in cases {
            let parsed = parse_condition(attribute(tag).unwrap(), value);
            assert_eq!(parsed.is_ok(), ok, "{value}");
        }
    }

    #[test]
    fn name_prefixes() {
        let cases = [
            ("Li^Shuh*", false, "Li^Shuh"),
            ("Li", false, "Li"),
            ("Li^Shuhua", false, "Li^Shuhua"),
            ("^Na", false, ""),
            ("Li^^Mid", false, "Li"),
            ("*ming", false, ""),
            ("Wa?g^X", false, "Wa"),
            ("wa^xiao", true, "wa"),
            ("王^小*", false, "王^小"),
        ];
        for (pattern, fuzzy, want) in cases {
            assert_eq!(name_literal_prefix(pattern, fuzzy), want, "{pattern}");
        }
        assert_eq!(case_variants("López^M"), vec!["lópez^m", "lÓpez^m"]);
        assert_eq!(case_variants("王^小"), vec!["王^小"]);
        assert_eq!(case_variants("ÄÖÜß").len(), 8);
    }

    #[test]
    fn keywords_and_hex_name_tags() {
        assert_eq!(
            tag_from_keyword_or_hex("PatientName"),
            Some(tags::PATIENT_NAME)
        );
        assert_eq!(
            tag_from_keyword_or_hex("0020000D"),
            Some(tags::STUDY_INSTANCE_UID)
        );
        assert_eq!(tag_from_keyword_or_hex("NoSuchKeyword"), None);
    }
}
