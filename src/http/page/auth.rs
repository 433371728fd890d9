//! The page's accounts, sessions, CSRF tokens and audit trail.
//!
//! - Accounts are node-local (`ui_user`): `huren user add` (or [`add_user`])
//!   creates them; passwords are hashed with argon2 (default parameters) and
//!   verified by argon2 (constant time). An unknown user costs the same
//!   verification as a wrong password and gets the same answer.
//! - A session is a random token in the `huren_session` cookie (HttpOnly,
//!   SameSite=Strict, Path=/, Secure behind TLS, 8 hours); the database
//!   keeps its SHA-256 only. It also authorises the viewer's read-only
//!   DICOMweb requests for the studies it opened (`ui_session_study`).
//! - Every session has a CSRF token, put in a hidden field of every form and
//!   checked on every POST. The login form, which has no session yet, uses a
//!   double-submit cookie (`huren_login_csrf`).
//! - `ui_audit` is append-only: what a doctor looked at, with the patient
//!   key, never the raw identifier.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use axum::http::HeaderMap;
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;

use crate::index::Index;
use crate::priors::PatientRef;

pub const SESSION_COOKIE: &str = "huren_session";
pub const LOGIN_CSRF_COOKIE: &str = "huren_login_csrf";
pub const LANG_COOKIE: &str = "huren_lang";
/// How long a session lasts from sign-in (no sliding renewal).
pub const SESSION_LIFETIME: Duration = Duration::from_secs(8 * 3600);
pub const MIN_PASSWORD_CHARS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The input is refused; the message says why (never echoes a password).
    #[error("{0}")]
    Invalid(String),
    #[error("user {0:?} exists already")]
    Exists(String),
    #[error("index: {0}")]
    Index(#[from] sqlx::Error),
    #[error("password hashing: {0}")]
    Hash(String),
}

fn valid_user_id(user_id: &str) -> bool {
    (1..=64).contains(&user_id.len())
        && user_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// Creates a doctor's account at this node.
pub async fn add_user(
    index: &Index,
    user_id: &str,
    display_name: &str,
    password: &str,
) -> Result<(), AuthError> {
    let user_id = user_id.trim();
    let display_name = display_name.trim();
    if !valid_user_id(user_id) {
        return Err(AuthError::Invalid(
            "the user ID must be 1 to 64 characters of letters, digits, '.', '_', '-' and '@'"
                .into(),
        ));
    }
    if display_name.is_empty() || display_name.chars().count() > 64 {
        return Err(AuthError::Invalid(
            "the name must be 1 to 64 characters".into(),
        ));
    }
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(AuthError::Invalid(format!(
            "the password must have at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    if password.len() > 1024 {
        return Err(AuthError::Invalid(
            "the password is limited to 1024 bytes".into(),
        ));
    }
    let password = password.to_string();
    let hash = tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))??;
    let inserted = sqlx::query(
        "INSERT INTO ui_user (user_id, display_name, password_hash, created_at) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(user_id)
    .bind(display_name)
    .bind(&hash)
    .bind(now())
    .execute(index.pool())
    .await?
    .rows_affected();
    if inserted == 0 {
        return Err(AuthError::Exists(user_id.to_string()));
    }
    Ok(())
}

fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// A hash no password matches: an unknown user is verified against it, so
/// that the answer takes as long as for a known one.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&random_hex(32)).expect("argon2 hashes a random password"))
}

fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// The user ID when the password is right; `None` for a wrong password and
/// for an unknown user alike.
pub async fn authenticate(
    index: &Index,
    user_id: &str,
    password: &str,
) -> Result<Option<String>, sqlx::Error> {
    let row = sqlx::query("SELECT user_id, password_hash FROM ui_user WHERE user_id = $1")
        .bind(user_id.trim())
        .fetch_optional(index.pool())
        .await?;
    let (found, hash) = match row {
        Some(r) => (Some(r.try_get::<String, _>(0)?), r.try_get::<String, _>(1)?),
        None => (None, String::new()),
    };
    let password = password.to_string();
    let ok = tokio::task::spawn_blocking(move || {
        let hash = if hash.is_empty() { dummy_hash() } else { &hash };
        verify_password(hash, &password)
    })
    .await
    .unwrap_or(false);
    Ok(found.filter(|_| ok))
}

/// The patient a session is looking at.
#[derive(Debug, Clone)]
pub struct SessionPatient {
    pub patient: PatientRef,
    /// `None`: the identity cannot be verified (`note` says why).
    pub patient_key: Option<String>,
    pub note: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub session_hash: String,
    pub user_id: String,
    pub display_name: String,
    pub csrf_token: String,
    pub patient: Option<SessionPatient>,
}

pub fn random_hex(bytes: usize) -> String {
    crate::common::random_hex(bytes)
}

fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn now() -> String {
    crate::common::now_rfc3339()
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// Starts a session; returns the cookie's token (shown once, kept hashed).
pub async fn create_session(index: &Index, user_id: &str) -> Result<String, sqlx::Error> {
    let token = random_hex(32);
    let now = SystemTime::now();
    // Expired sessions go when someone signs in: no sweeper task needed.
    sqlx::query("DELETE FROM ui_session WHERE expires_at < $1")
        .bind(rfc3339(now))
        .execute(index.pool())
        .await?;
    sqlx::query(
        "DELETE FROM ui_session_study WHERE session_hash NOT IN \
         (SELECT session_hash FROM ui_session)",
    )
    .execute(index.pool())
    .await?;
    sqlx::query(
        "INSERT INTO ui_session (session_hash, user_id, csrf_token, created_at, expires_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(sha256_hex(&token))
    .bind(user_id)
    .bind(random_hex(32))
    .bind(rfc3339(now))
    .bind(rfc3339(now + SESSION_LIFETIME))
    .execute(index.pool())
    .await?;
    Ok(token)
}

/// The live session a cookie's token names.
pub async fn load_session(index: &Index, token: &str) -> Result<Option<Session>, sqlx::Error> {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT s.session_hash, s.user_id, u.display_name, s.csrf_token, s.patient, \
         s.patient_key, s.patient_note FROM ui_session s \
         JOIN ui_user u ON u.user_id = s.user_id \
         WHERE s.session_hash = $1 AND s.expires_at > $2",
    )
    .bind(sha256_hex(token))
    .bind(now())
    .fetch_optional(index.pool())
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let patient_json: Option<String> = r.try_get(4)?;
    let patient = patient_json
        .and_then(|j| serde_json::from_str::<PatientRef>(&j).ok())
        .map(|patient| -> Result<SessionPatient, sqlx::Error> {
            Ok(SessionPatient {
                patient,
                patient_key: r.try_get(5)?,
                note: r.try_get(6)?,
            })
        })
        .transpose()?;
    Ok(Some(Session {
        session_hash: r.try_get(0)?,
        user_id: r.try_get(1)?,
        display_name: r.try_get(2)?,
        csrf_token: r.try_get(3)?,
        patient,
    }))
}

pub async fn end_session(index: &Index, session_hash: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ui_session WHERE session_hash = $1")
        .bind(session_hash)
        .execute(index.pool())
        .await?;
    sqlx::query("DELETE FROM ui_session_study WHERE session_hash = $1")
        .bind(session_hash)
        .execute(index.pool())
        .await?;
    Ok(())
}

/// Lets the session's viewer read a study (the doctor opened it from the
/// page).
pub async fn open_study(
    index: &Index,
    session_hash: &str,
    study_instance_uid: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ui_session_study (session_hash, study_instance_uid, opened_at) \
         VALUES ($1, $2, $3) ON CONFLICT (session_hash, study_instance_uid) DO NOTHING",
    )
    .bind(session_hash)
    .bind(study_instance_uid)
    .bind(now())
    .execute(index.pool())
    .await?;
    Ok(())
}

/// Takes back what [`open_study`] let the session read: the study's fetch
/// was refused (no consent), so the session must not read the study should
/// it arrive here later by another doctor's fetch.
pub async fn close_study(
    index: &Index,
    session_hash: &str,
    study_instance_uid: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ui_session_study WHERE session_hash = $1 AND study_instance_uid = $2")
        .bind(session_hash)
        .bind(study_instance_uid)
        .execute(index.pool())
        .await?;
    Ok(())
}

/// The user of the live session a cookie's token names, when that session
/// opened `study_instance_uid` from the page: what authorises the viewer's
/// DICOMweb reads.
pub async fn session_may_read(
    index: &Index,
    token: &str,
    study_instance_uid: &str,
) -> Result<Option<String>, sqlx::Error> {
    if token.len() != 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(None);
    }
    let row = sqlx::query(
        "SELECT s.user_id FROM ui_session s JOIN ui_session_study v \
         ON v.session_hash = s.session_hash \
         WHERE s.session_hash = $1 AND s.expires_at > $2 AND v.study_instance_uid = $3",
    )
    .bind(sha256_hex(token))
    .bind(now())
    .bind(study_instance_uid)
    .fetch_optional(index.pool())
    .await?;
    row.map(|r| r.try_get(0)).transpose()
}

/// Keeps the patient the doctor looks at in the session (server side).
pub async fn set_patient(
    index: &Index,
    session_hash: &str,
    patient: &SessionPatient,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE ui_session SET patient = $2, patient_key = $3, patient_note = $4 \
         WHERE session_hash = $1",
    )
    .bind(session_hash)
    .bind(serde_json::to_string(&patient.patient).expect("PatientRef serialises"))
    .bind(patient.patient_key.clone())
    .bind(patient.note.clone())
    .execute(index.pool())
    .await?;
    Ok(())
}

/// Whether a form's token is the expected one (constant time; an empty
/// expected token matches nothing).
pub fn csrf_ok(expected: &str, given: &str) -> bool {
    !expected.is_empty() && bool::from(expected.as_bytes().ct_eq(given.as_bytes()))
}

/// Appends to the page's audit trail.
pub async fn audit(
    index: &Index,
    user_id: &str,
    action: &str,
    patient_key: Option<&str>,
    detail: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO ui_audit (at, user_id, action, patient_key, detail) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(now())
    .bind(user_id)
    .bind(action)
    .bind(patient_key.map(str::to_string))
    .bind(detail)
    .execute(index.pool())
    .await?;
    Ok(())
}

/// The request's cookies (every Cookie header; the first of a name wins).
pub fn cookies(headers: &HeaderMap) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for value in headers.get_all(axum::http::header::COOKIE) {
        let Ok(text) = value.to_str() else { continue };
        for pair in text.split(';') {
            if let Some((name, value)) = pair.trim().split_once('=') {
                out.entry(name.trim().to_string())
                    .or_insert_with(|| value.trim().trim_matches('"').to_string());
            }
        }
    }
    out
}

/// A Set-Cookie value for the page: Path=/, SameSite=Strict, HttpOnly,
/// Secure when the request came over TLS. `max_age` 0 deletes the cookie.
/// Path=/ rather than /ui: the viewer's DICOMweb requests
/// (`/dicom-web/…`, same origin) carry the session too (issue 19). That is
/// safe because only GET and HEAD accept it there, for the studies the
/// session opened, and SameSite=Strict keeps it off other sites' requests.
pub fn set_cookie(name: &str, value: &str, max_age: u64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{}",
        if secure { "; Secure" } else { "" }
    )
}

/// Whether the request reached the proxy in front of the node over TLS.
pub fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_and_fail() {
        let hash = hash_password("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horsf"));
        assert!(!verify_password(dummy_hash(), "correct horse"));
        assert!(!verify_password("not a phc string", "x"));
    }

    #[test]
    fn cookies_and_csrf() {
        let mut h = HeaderMap::new();
        h.append("cookie", "a=1; huren_session=abc".parse().unwrap());
        h.append("cookie", "huren_lang=en".parse().unwrap());
        let c = cookies(&h);
        assert_eq!(c["huren_session"], "abc");
        assert_eq!(c["huren_lang"], "en");
        assert!(csrf_ok("abc", "abc"));
        assert!(!csrf_ok("abc", "abd"));
        assert!(!csrf_ok("abc", ""));
        assert!(!csrf_ok("", ""));
        assert!(set_cookie("x", "y", 10, true).ends_with("; Secure"));
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert!(over_tls(&h));
    }

    #[test]
    fn user_ids() {
        assert!(valid_user_id("dr.li"));
        assert!(valid_user_id("wang_01@ward-3"));
        assert!(!valid_user_id(""));
        assert!(!valid_user_id("dr li"));
        assert!(!valid_user_id("张医生"));
    }
}
