//! The doctor's page under `/ui`: sign in, find a patient, see their prior
//! imaging exams at this hospital and across the region, check an order for
//! a recent similar exam (互认), and record the decision; open a prior's
//! images in the node's viewer, fetching it from the hospital that holds it
//! first ([`images`], issue 19), with a thumbnail per series.
//!
//! Server-rendered HTML (minijinja; the templates in `templates/` are
//! compiled into the binary), Chinese by default and English with
//! `?lang=en` (kept in the `huren_lang` cookie), no JavaScript. The logic is
//! [`crate::priors`]'s, shared with the JSON API; this module only asks and
//! shows.
//!
//! Its own login ([`auth`]), not the DICOMweb bearer tokens. The patient's
//! identifier travels only in POST bodies and stays in the server-side
//! session: never in a URL, never in a log line. Every look at a patient is
//! appended to `ui_audit` with the doctor's user ID and the patient key.

pub mod auth;
mod i18n;
pub mod images;
pub mod throttle;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use axum::extract::rejection::FormRejection;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use minijinja::Environment;
use serde::Deserialize;
use serde_json::{Value, json};
use sqlx::Row;

pub use auth::{AuthError, add_user};
use auth::{Session, SessionPatient};
use i18n::Lang;

use crate::contract::{AccessBasis, HospitalDirectory, Laterality, Purpose, RegistryRecord};
use crate::http::AppState;
use crate::index::Index;
use crate::patient_key::IdentifierType;
use crate::priors::{self, CheckRequest, Decision, DecisionRequest, PatientRef};
use crate::publish::Region;
use crate::recognition::check::{Encounter, Order};
use crate::recognition::list::{LateralityRule, RecognitionList};

/// The templates, compiled in: the binary is the whole page.
const TEMPLATES: &[(&str, &str)] = &[
    ("base.html", include_str!("../../../templates/base.html")),
    ("login.html", include_str!("../../../templates/login.html")),
    (
        "message.html",
        include_str!("../../../templates/message.html"),
    ),
    ("find.html", include_str!("../../../templates/find.html")),
    (
        "patient.html",
        include_str!("../../../templates/patient.html"),
    ),
    ("check.html", include_str!("../../../templates/check.html")),
    (
        "decision.html",
        include_str!("../../../templates/decision.html"),
    ),
    ("study.html", include_str!("../../../templates/study.html")),
    (
        "images.html",
        include_str!("../../../templates/images.html"),
    ),
    (
        "images_live.html",
        include_str!("../../../templates/images_live.html"),
    ),
    (
        "images_progress.html",
        include_str!("../../../templates/images_progress.html"),
    ),
];

fn templates() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .unwrap_or_else(|e| panic!("template {name}: {e}"));
    }
    env
}

pub struct PageState {
    index: Index,
    region: Option<Arc<Region>>,
    templates: Environment<'static>,
    sign_in: throttle::SignInThrottle,
    /// Fetches of regional priors and thumbnails (issue 19).
    ingest: crate::ingest::Ingest,
    thumbnails: std::sync::Mutex<images::ThumbnailCache>,
}

pub fn router(state: &Arc<AppState>) -> Router {
    let page = Arc::new(PageState {
        index: state.ingest.index().clone(),
        region: state.region.clone(),
        templates: templates(),
        sign_in: throttle::SignInThrottle::default(),
        ingest: state.ingest.clone(),
        thumbnails: Default::default(),
    });
    Router::new()
        .route("/ui", get(|| async { Redirect::to("/ui/") }))
        .route("/ui/", get(find_page))
        .route("/ui/login", get(login_page).post(login))
        .route("/ui/logout", post(logout))
        .route("/ui/patient", get(patient_page).post(find_patient))
        .route("/ui/check", post(check))
        .route("/ui/decision", post(decision))
        .route("/ui/studies/{uid}", get(study_page))
        .route("/ui/studies/{uid}/confirm", post(confirm_items))
        .merge(images::routes())
        .layer(DefaultBodyLimit::max(64 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(page)
}

/// Pages carry PHI: never cached, never framed, no scripts at all. The
/// one exception is the page showing a prior as it arrives
/// (`images::open_images`), which frames the viewer and its own progress
/// strip, same origin only, and says so in its own headers.
async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; \
                 form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        );
    }
    if !h.contains_key(header::X_FRAME_OPTIONS) {
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

type Answer = Result<Response, Response>;

/// What every page request carries: language, cookies, the session.
struct Page {
    lang: Lang,
    /// `?lang=` was given: remember it.
    lang_chosen: bool,
    secure: bool,
    cookies: HashMap<String, String>,
    session: Option<Session>,
    /// The path the language switch reloads (GET pages; POST answers fall
    /// back to the patient's page).
    here: String,
    /// The client's address (sign-in throttling).
    peer: Option<std::net::IpAddr>,
}

impl FromRequestParts<Arc<PageState>> for Page {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<PageState>,
    ) -> Result<Self, Self::Rejection> {
        let cookies = auth::cookies(&parts.headers);
        let asked = parts.uri.query().and_then(|q| {
            q.split('&')
                .find_map(|pair| pair.strip_prefix("lang="))
                .and_then(Lang::parse)
        });
        let lang = asked
            .or_else(|| cookies.get(auth::LANG_COOKIE).and_then(|l| Lang::parse(l)))
            .unwrap_or(Lang::Zh);
        let session = match cookies.get(auth::SESSION_COOKIE) {
            Some(token) => match auth::load_session(&state.index, token).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(%error, "page: cannot read the session");
                    return Err(
                        (StatusCode::SERVICE_UNAVAILABLE, "service unavailable").into_response()
                    );
                }
            },
            None => None,
        };
        let here = if parts.method == axum::http::Method::GET {
            parts.uri.path().to_string()
        } else if session.as_ref().is_some_and(|s| s.patient.is_some()) {
            "/ui/patient".to_string()
        } else {
            "/ui/".to_string()
        };
        Ok(Page {
            lang,
            lang_chosen: asked.is_some(),
            secure: auth::over_tls(&parts.headers),
            cookies,
            session,
            here,
            peer: parts
                .extensions
                .get::<axum::extract::ConnectInfo<crate::tls::PeerAddr>>()
                .map(|c| c.0.0.ip()),
        })
    }
}

impl Page {
    fn t(&self, key: &str) -> &'static str {
        i18n::strings(self.lang).get(key).copied().unwrap_or("")
    }

    /// The signed-in session, or a redirect to the login.
    fn user(&self) -> Result<&Session, SeeOther> {
        self.session.as_ref().ok_or(SeeOther("/ui/login"))
    }

    /// The patient the session looks at, or a redirect to find one.
    fn patient(&self) -> Result<&SessionPatient, SeeOther> {
        self.user()?.patient.as_ref().ok_or(SeeOther("/ui/"))
    }
}

/// A redirect (303) to another page of the site.
struct SeeOther(&'static str);

impl From<SeeOther> for Response {
    fn from(to: SeeOther) -> Response {
        Redirect::to(to.0).into_response()
    }
}

/// How the page shows the patient: a resident ID masked, a local ID as is.
fn patient_label(p: &SessionPatient) -> String {
    match (&p.patient.identifier, &p.patient.patient_id) {
        (Some(number), _) => {
            let chars: Vec<char> = number.trim().chars().collect();
            if chars.len() > 8 {
                let head: String = chars[..4].iter().collect();
                let tail: String = chars[chars.len() - 4..].iter().collect();
                format!("{head}{}{tail}", "*".repeat(chars.len() - 8))
            } else {
                "*".repeat(chars.len())
            }
        }
        (None, Some(pid)) if p.patient.issuer_of_patient_id.is_empty() => pid.clone(),
        (None, Some(pid)) => format!("{pid} ({})", p.patient.issuer_of_patient_id),
        (None, None) => String::new(),
    }
}

impl PageState {
    fn region(&self) -> Option<&Arc<Region>> {
        self.region.as_ref()
    }

    async fn hospital_name(&self) -> Option<String> {
        let region = self.region.as_ref()?;
        let id = &region.config().hospital_id;
        Some(
            region
                .directory()
                .await
                .and_then(|d| d.hospitals.into_iter().find(|h| &h.hospital_id == id))
                .map(|h| h.name)
                .unwrap_or_else(|| id.clone()),
        )
    }

    async fn render(&self, page: &Page, status: StatusCode, name: &str, ctx: Value) -> Response {
        let mut base = json!({
            "t": i18n::strings(page.lang),
            "lang": page.lang.code(),
            "other_lang": page.lang.other().code(),
            "here": page.here,
            "hospital": self.hospital_name().await,
        });
        if let Some(s) = &page.session {
            base["user"] = json!({"user_id": s.user_id, "display_name": s.display_name});
            base["csrf"] = json!(s.csrf_token);
            if let Some(p) = &s.patient {
                base["patient_label"] = json!(patient_label(p));
            }
        }
        if let (Value::Object(b), Value::Object(c)) = (&mut base, ctx) {
            b.extend(c);
        }
        let body = self
            .templates
            .get_template(name)
            .and_then(|t| t.render(&base));
        let mut response = match body {
            Ok(html) => (status, Html(html)).into_response(),
            Err(error) => {
                tracing::error!(%error, template = name, "page: template failed");
                return (StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response();
            }
        };
        if page.lang_chosen {
            let cookie = auth::set_cookie(
                auth::LANG_COOKIE,
                page.lang.code(),
                365 * 86400,
                page.secure,
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                response.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        response
    }

    /// A page with a title and one message.
    async fn message(
        &self,
        page: &Page,
        status: StatusCode,
        title_key: &str,
        text: String,
        back: Option<(&str, &str)>,
    ) -> Response {
        let kind = if status.is_success() { "info" } else { "error" };
        self.render(
            page,
            status,
            "message.html",
            json!({
                "title": page.t(title_key),
                "text": text,
                "kind": kind,
                "back": back.map(|b| b.0),
                "back_label": back.map(|b| page.t(b.1)),
            }),
        )
        .await
    }

    async fn error(&self, page: &Page, status: StatusCode, key: &str) -> Response {
        let back = page.session.as_ref().map(|s| {
            if s.patient.is_some() {
                ("/ui/patient", "back_to_patient")
            } else {
                ("/ui/", "new_patient")
            }
        });
        self.message(page, status, "error_title", page.t(key).to_string(), back)
            .await
    }

    /// The node has no region: the page cannot do anything useful.
    async fn need_region(&self, page: &Page) -> Result<&Arc<Region>, Response> {
        match self.region() {
            Some(r) => Ok(r),
            None => Err(self
                .message(
                    page,
                    StatusCode::CONFLICT,
                    "no_region_title",
                    page.t("no_region_text").to_string(),
                    None,
                )
                .await),
        }
    }

    /// 503 for the index (the detail goes to the log, not the page).
    async fn unavailable(
        &self,
        page: &Page,
        what: &str,
        error: &(dyn std::fmt::Display + Sync),
    ) -> Response {
        tracing::error!(%error, what, "page: request failed");
        self.error(page, StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            .await
    }

    async fn priors_error(&self, page: &Page, e: priors::Error) -> Response {
        match e {
            priors::Error::Invalid(m) => {
                let text = format!("{}{m}", page.t("bad_request"));
                self.message(
                    page,
                    StatusCode::BAD_REQUEST,
                    "error_title",
                    text,
                    back(page),
                )
                .await
            }
            priors::Error::NoList => {
                self.error(page, StatusCode::SERVICE_UNAVAILABLE, "no_list")
                    .await
            }
            priors::Error::NotFound(_) => {
                self.error(page, StatusCode::NOT_FOUND, "not_found").await
            }
            priors::Error::Refused(m) => {
                let text = format!("{}{m}", page.t("registry_refused"));
                self.message(page, StatusCode::FORBIDDEN, "error_title", text, back(page))
                    .await
            }
            priors::Error::Registry(m) => {
                let text = format!("{}{m}", page.t("registry_refused"));
                self.message(
                    page,
                    StatusCode::BAD_GATEWAY,
                    "error_title",
                    text,
                    back(page),
                )
                .await
            }
            priors::Error::Index(m) => self.unavailable(page, "priors", &m).await,
        }
    }

    async fn audit(
        &self,
        page: &Page,
        action: &str,
        patient_key: Option<&str>,
        detail: &str,
    ) -> Result<(), Response> {
        let user = page.user()?;
        // The look is refused when it cannot be audited.
        match auth::audit(&self.index, &user.user_id, action, patient_key, detail).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.unavailable(page, "audit", &e).await),
        }
    }

    /// A POST's CSRF token must be the session's.
    async fn check_csrf(&self, page: &Page, given: &str) -> Result<(), Response> {
        let session = page.user()?;
        if auth::csrf_ok(&session.csrf_token, given) {
            Ok(())
        } else {
            Err(self.error(page, StatusCode::FORBIDDEN, "forbidden").await)
        }
    }
}

fn back(page: &Page) -> Option<(&'static str, &'static str)> {
    page.session.as_ref().map(|s| {
        if s.patient.is_some() {
            ("/ui/patient", "back_to_patient")
        } else {
            ("/ui/", "new_patient")
        }
    })
}

/// A form body; a malformed one is a 400 page.
async fn form<T>(
    state: &PageState,
    page: &Page,
    form: Result<Form<T>, FormRejection>,
) -> Result<T, Response> {
    match form {
        Ok(Form(f)) => Ok(f),
        Err(rejection) => {
            let text = format!("{}{}", page.t("bad_request"), rejection.body_text());
            Err(state
                .message(
                    page,
                    StatusCode::BAD_REQUEST,
                    "error_title",
                    text,
                    back(page),
                )
                .await)
        }
    }
}

fn with_cookie(mut response: Response, cookie: String) -> Response {
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

// ------------------------------------------------------------------ sign-in

async fn login_page(State(state): State<Arc<PageState>>, page: Page) -> Answer {
    state.need_region(&page).await?;
    if page.session.is_some() {
        return Ok(Redirect::to("/ui/").into_response());
    }
    Ok(login_form(&state, &page, StatusCode::OK, None, "").await)
}

/// The login form with a fresh double-submit token (there is no session
/// yet to hold one).
async fn login_form(
    state: &PageState,
    page: &Page,
    status: StatusCode,
    error: Option<&str>,
    user_id: &str,
) -> Response {
    let token = auth::random_hex(32);
    let response = state
        .render(
            page,
            status,
            "login.html",
            json!({"login_csrf": token, "error": error, "user_id": user_id}),
        )
        .await;
    with_cookie(
        response,
        auth::set_cookie(auth::LOGIN_CSRF_COOKIE, &token, 3600, page.secure),
    )
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct LoginForm {
    csrf: String,
    user_id: String,
    password: String,
}

async fn login(
    State(state): State<Arc<PageState>>,
    page: Page,
    body: Result<Form<LoginForm>, FormRejection>,
) -> Answer {
    state.need_region(&page).await?;
    let f = form(&state, &page, body).await?;
    let expected = page
        .cookies
        .get(auth::LOGIN_CSRF_COOKIE)
        .map(String::as_str)
        .unwrap_or("");
    if !auth::csrf_ok(expected, &f.csrf) {
        return Err(state.error(&page, StatusCode::FORBIDDEN, "forbidden").await);
    }
    // Refused before the password is checked: a guesser learns nothing,
    // and costs no argon2 verification.
    if let Err(wait) = state
        .sign_in
        .check(&f.user_id, page.peer, std::time::Instant::now())
    {
        crate::audit::sign_in_throttled(&f.user_id, wait);
        let minutes = wait.as_secs().div_ceil(60).max(1);
        let text = page
            .t("login_throttled")
            .replace("{minutes}", &minutes.to_string());
        let response = state
            .message(
                &page,
                StatusCode::TOO_MANY_REQUESTS,
                "login_title",
                text,
                None,
            )
            .await;
        let mut response = response;
        response.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from_str(&wait.as_secs().max(1).to_string()).expect("digits"),
        );
        return Ok(response);
    }
    let user = match auth::authenticate(&state.index, &f.user_id, &f.password).await {
        Ok(u) => u,
        Err(e) => return Err(state.unavailable(&page, "login", &e).await),
    };
    let Some(user_id) = user else {
        state
            .sign_in
            .failed(&f.user_id, page.peer, std::time::Instant::now());
        crate::audit::user_authentication(&f.user_id, true, false);
        let shown: String = f.user_id.trim().chars().take(64).collect();
        return Ok(login_form(
            &state,
            &page,
            StatusCode::UNAUTHORIZED,
            Some(page.t("login_failed")),
            &shown,
        )
        .await);
    };
    if let Some(old) = &page.session {
        let _ = auth::end_session(&state.index, &old.session_hash).await;
    }
    let token = match auth::create_session(&state.index, &user_id).await {
        Ok(t) => t,
        Err(e) => return Err(state.unavailable(&page, "login", &e).await),
    };
    if let Err(e) = auth::audit(&state.index, &user_id, "sign_in", None, "").await {
        return Err(state.unavailable(&page, "audit", &e).await);
    }
    crate::audit::user_authentication(&user_id, true, true);
    state.sign_in.succeeded(&user_id);
    let response = Redirect::to("/ui/").into_response();
    let response = with_cookie(
        response,
        auth::set_cookie(
            auth::SESSION_COOKIE,
            &token,
            auth::SESSION_LIFETIME.as_secs(),
            page.secure,
        ),
    );
    Ok(with_cookie(
        response,
        auth::set_cookie(auth::LOGIN_CSRF_COOKIE, "", 0, page.secure),
    ))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct CsrfOnly {
    csrf: String,
}

async fn logout(
    State(state): State<Arc<PageState>>,
    page: Page,
    body: Result<Form<CsrfOnly>, FormRejection>,
) -> Answer {
    let f = form(&state, &page, body).await?;
    state.check_csrf(&page, &f.csrf).await?;
    let session = page.user()?;
    state.audit(&page, "sign_out", None, "").await?;
    crate::audit::user_authentication(&session.user_id, false, true);
    if let Err(e) = auth::end_session(&state.index, &session.session_hash).await {
        return Err(state.unavailable(&page, "logout", &e).await);
    }
    Ok(with_cookie(
        Redirect::to("/ui/login").into_response(),
        auth::set_cookie(auth::SESSION_COOKIE, "", 0, page.secure),
    ))
}

// ------------------------------------------------------------------ find

async fn find_page(State(state): State<Arc<PageState>>, page: Page) -> Answer {
    state.need_region(&page).await?;
    page.user()?;
    Ok(state
        .render(&page, StatusCode::OK, "find.html", json!({"kind": "rid"}))
        .await)
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct FindForm {
    csrf: String,
    /// `rid` (resident ID number) or `pid` (local Patient ID).
    kind: String,
    identifier: String,
    patient_id: String,
    issuer: String,
}

async fn find_patient(
    State(state): State<Arc<PageState>>,
    page: Page,
    body: Result<Form<FindForm>, FormRejection>,
) -> Answer {
    let region = state.need_region(&page).await?;
    let f = form(&state, &page, body).await?;
    state.check_csrf(&page, &f.csrf).await?;
    let session = page.user()?;
    let by_pid = f.kind == "pid";
    let refuse = |key: &'static str| {
        let state = state.clone();
        let page = &page;
        async move {
            state
                .render(
                    page,
                    StatusCode::BAD_REQUEST,
                    "find.html",
                    json!({"error": page.t(key), "kind": if by_pid { "pid" } else { "rid" }}),
                )
                .await
        }
    };
    let patient = if by_pid {
        let pid = f.patient_id.trim();
        if pid.is_empty() {
            return Err(refuse("err_empty_pid").await);
        }
        PatientRef {
            patient_id: Some(pid.to_string()),
            issuer_of_patient_id: f.issuer.trim().to_string(),
            ..PatientRef::default()
        }
    } else {
        let number = f.identifier.trim();
        if number.is_empty() {
            return Err(refuse("err_empty_rid").await);
        }
        PatientRef {
            identifier_type: Some(IdentifierType::ResidentId),
            identifier: Some(number.to_string()),
            ..PatientRef::default()
        }
    };
    let (patient_key, note) = match priors::resolve_patient(region, &patient).await {
        Ok(Ok(key)) => (Some(key), None),
        // "check_digit (…)": the code names the words.
        Ok(Err(why)) => {
            let code = why.split_whitespace().next().unwrap_or("").to_string();
            if !by_pid {
                let key = match code.as_str() {
                    "check_digit" => "id_check_digit",
                    _ => "id_identifier_format",
                };
                return Err(refuse(key).await);
            }
            (None, Some(code))
        }
        Err(e) => return Err(state.priors_error(&page, e).await),
    };
    let sp = SessionPatient {
        patient,
        patient_key,
        note,
    };
    if let Err(e) = auth::set_patient(&state.index, &session.session_hash, &sp).await {
        return Err(state.unavailable(&page, "session", &e).await);
    }
    let detail = format!(
        "by={}{}",
        if by_pid { "patient_id" } else { "resident_id" },
        sp.note
            .as_deref()
            .map(|n| format!(" unverified={n}"))
            .unwrap_or_default()
    );
    state
        .audit(&page, "find_patient", sp.patient_key.as_deref(), &detail)
        .await?;
    Ok(Redirect::to("/ui/patient").into_response())
}

// ------------------------------------------------------------------ timeline

/// `YYYYMMDD` (the index) or `YYYY-MM-DD` (records) as `YYYY-MM-DD`.
fn iso_date(d: &str) -> Option<String> {
    let d = d.trim();
    if d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()) {
        Some(format!("{}-{}-{}", &d[..4], &d[4..6], &d[6..]))
    } else if d.is_empty() {
        None
    } else {
        Some(d.to_string())
    }
}

fn item_name(lang: Lang, name_zh: &str, name_en: &str) -> String {
    match lang {
        Lang::Zh => name_zh.to_string(),
        Lang::En => name_en.to_string(),
    }
}

/// A record's items with their names and marks.
fn record_items(lang: Lang, list: Option<&RecognitionList>, record: &Value) -> Vec<Value> {
    let items = record["items"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|i| {
            let code = i["code"].as_str().unwrap_or("");
            let found = list.and_then(|l| l.item(code).map(|item| (l, item)));
            json!({
                "code": code,
                "name": found.map(|(_, it)| item_name(lang, &it.name_zh, &it.name_en)).unwrap_or_else(|| code.to_string()),
                "mark": found.map(|(l, it)| l.mark_of(it).to_string()),
                "side": i["laterality"].as_str(),
            })
        })
        .collect()
}

fn regional_entry(
    lang: Lang,
    region: &Region,
    list: Option<&RecognitionList>,
    directory: Option<&HospitalDirectory>,
    r: &RegistryRecord,
) -> Value {
    let hospital =
        directory.and_then(|d| d.hospitals.iter().find(|h| h.hospital_id == r.hospital_id));
    let record = serde_json::to_value(&r.record).unwrap_or(Value::Null);
    let uid = &r.record.study_instance_uid;
    json!({
        "uid": uid,
        "date": r.record.study_date,
        "time": r.record.study_time,
        "hospital": hospital.map(|h| h.name.clone()).unwrap_or_else(|| r.hospital_id.clone()),
        "level": hospital.map(|h| h.level.name()),
        "own": r.hospital_id == region.config().hospital_id,
        "items": record_items(lang, list, &record),
        "classified": !r.record.items.is_empty(),
        "modalities": r.record.modalities.join(", "),
        "body_parts": r.record.body_parts.join(", "),
        "report_status": r.record.report_status.as_str(),
        "report_date": r.record.report_issued_date,
        "qc": r.record.qc_status.as_str(),
        "images_available": r.record.images_available,
        "series": r.record.number_of_series,
        "instances": r.record.number_of_instances,
        "link": priors::link(region, uid),
        "local_only": false,
    })
}

/// This node's studies of the patient that the regional answer does not
/// list (not published, or not publishable).
async fn local_entries(
    state: &PageState,
    lang: Lang,
    region: &Region,
    list: Option<&RecognitionList>,
    patient: &SessionPatient,
    listed: &BTreeSet<String>,
    hospital: &str,
) -> Result<Vec<Value>, sqlx::Error> {
    let pool = state.index.pool();
    let mut uids: BTreeSet<String> = BTreeSet::new();
    if let Some(pid) = &patient.patient.patient_id {
        for r in sqlx::query(
            "SELECT st.study_instance_uid FROM study st \
             JOIN patient p ON p.patient_key = st.patient_key \
             WHERE p.patient_id = $1 AND p.issuer_of_patient_id = $2",
        )
        .bind(pid.trim())
        .bind(patient.patient.issuer_of_patient_id.trim())
        .fetch_all(pool)
        .await?
        {
            uids.insert(r.try_get(0)?);
        }
    }
    if let Some(key) = &patient.patient_key {
        for r in
            sqlx::query("SELECT study_instance_uid FROM study_publication WHERE patient_key = $1")
                .bind(key)
                .fetch_all(pool)
                .await?
        {
            uids.insert(r.try_get(0)?);
        }
    }
    let mut out = Vec::new();
    for uid in uids.difference(listed) {
        if let Some(study) = local_study(state, lang, list, uid).await? {
            out.push(json!({
                "uid": uid,
                "date": study["date"],
                "time": study["time"],
                "hospital": hospital,
                "level": Value::Null,
                "own": true,
                "items": study["items"],
                "classified": study["items"].as_array().is_some_and(|a| !a.is_empty()),
                "modalities": study["modalities"],
                "body_parts": "",
                "report_status": study["report_status"],
                "report_date": study["report_date"],
                "qc": study["qc"],
                "images_available": true,
                "series": study["series"],
                "instances": study["instances"],
                "link": priors::link(region, uid),
                "local_only": study["publication"] != "published",
            }));
        }
    }
    Ok(out)
}

/// A study of this node's index, as the pages show it.
async fn local_study(
    state: &PageState,
    lang: Lang,
    list: Option<&RecognitionList>,
    uid: &str,
) -> Result<Option<Value>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT st.study_date, st.study_time, st.study_description, st.accession_number, \
         st.modalities_in_study, st.number_of_study_related_series, \
         st.number_of_study_related_instances, r.report_status, r.report_issued_date, \
         r.qc_status, sp.state, sp.record, cs.hospital_id FROM study st \
         LEFT JOIN study_report r ON r.study_instance_uid = st.study_instance_uid \
         LEFT JOIN study_publication sp ON sp.study_instance_uid = st.study_instance_uid \
         LEFT JOIN cached_study cs ON cs.study_instance_uid = st.study_instance_uid \
         WHERE st.study_instance_uid = $1",
    )
    .bind(uid)
    .fetch_optional(state.index.pool())
    .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let date: String = r.try_get(0)?;
    let time: String = r.try_get(1)?;
    let record: Option<String> = r.try_get(11)?;
    let record: Value = record
        .and_then(|j| serde_json::from_str(&j).ok())
        .unwrap_or(Value::Null);
    let publication: Option<String> = r.try_get(10)?;
    Ok(Some(json!({
        "uid": uid,
        "date": iso_date(&date),
        "time": time,
        "description": r.try_get::<String, _>(2)?,
        "accession": r.try_get::<String, _>(3)?,
        "modalities": r.try_get::<String, _>(4)?.replace('\\', ", "),
        "series": r.try_get::<i64, _>(5)?,
        "instances": r.try_get::<i64, _>(6)?,
        "report_status": r.try_get::<Option<String>, _>(7)?.unwrap_or_else(|| "none".into()),
        "report_date": r.try_get::<Option<String>, _>(8)?,
        "qc": r.try_get::<Option<String>, _>(9)?.unwrap_or_else(|| "pending".into()),
        "publication": publication.unwrap_or_else(|| "pending".into()),
        // A regional prior fetched here: its report, QC and publication are
        // the holding hospital's, not this node's (which never publishes a
        // copy); the page says whose it is instead.
        "copy_of": r.try_get::<Option<String>, _>(12)?,
        "items": record_items(lang, list, &record),
    })))
}

/// The item select: the list's items grouped by modality, in list order.
fn item_groups(lang: Lang, list: &RecognitionList) -> Vec<Value> {
    let mut groups: Vec<(String, Vec<Value>)> = Vec::new();
    for item in &list.items {
        let entry = json!({
            "code": item.code,
            "name": item_name(lang, &item.name_zh, &item.name_en),
            "needs_side": item.laterality == LateralityRule::Required,
        });
        match groups.iter_mut().find(|(m, _)| *m == item.modality) {
            Some((_, items)) => items.push(entry),
            None => groups.push((item.modality.clone(), vec![entry])),
        }
    }
    groups
        .into_iter()
        .map(|(modality, items)| json!({"modality": modality, "items": items}))
        .collect()
}

async fn patient_page(State(state): State<Arc<PageState>>, page: Page) -> Answer {
    let region = state.need_region(&page).await?;
    let patient = page.patient()?.clone();
    let user_id = page.user()?.user_id.clone();
    let timeline = timeline(&state, &page, region, &patient, &user_id).await?;
    Ok(state
        .render(&page, StatusCode::OK, "patient.html", timeline)
        .await)
}

/// The timeline and the check form's context (audited as a look).
async fn timeline(
    state: &PageState,
    page: &Page,
    region: &Arc<Region>,
    patient: &SessionPatient,
    user_id: &str,
) -> Result<Value, Response> {
    let list = region.list();
    let directory = region.directory().await;
    let hospital = state.hospital_name().await.unwrap_or_default();
    let mut entries: Vec<Value> = Vec::new();
    let mut reached = true;
    let mut registry_error = None;
    let mut withheld = 0;
    let mut access = "none";
    if let Some(key) = &patient.patient_key {
        match priors::priors(region, key, Purpose::Treatment, None, user_id).await {
            Ok((answer, r)) => {
                reached = r;
                withheld = answer.withheld_count;
                access = match answer.access {
                    AccessBasis::Consent => "consent",
                    AccessBasis::BreakTheGlass => "break_the_glass",
                    AccessBasis::None => "none",
                };
                entries.extend(answer.records.iter().filter(|r| !r.retracted).map(|r| {
                    regional_entry(page.lang, region, list.as_deref(), directory.as_ref(), r)
                }));
            }
            Err(priors::Error::Registry(m)) => registry_error = Some(m),
            Err(e) => return Err(state.priors_error(page, e).await),
        }
    }
    let listed: BTreeSet<String> = entries
        .iter()
        .filter_map(|e| e["uid"].as_str().map(str::to_string))
        .collect();
    match local_entries(
        state,
        page.lang,
        region,
        list.as_deref(),
        patient,
        &listed,
        &hospital,
    )
    .await
    {
        Ok(local) => entries.extend(local),
        Err(e) => return Err(state.unavailable(page, "timeline", &e).await),
    }
    // Thumbnails for the studies held here (the hospital's own, and
    // regional priors already fetched); a regional prior not fetched yet
    // gets them once it is.
    for e in entries.iter_mut() {
        let uid = e["uid"].as_str().unwrap_or("").to_string();
        match images::series_of(&state.index, Some(region.as_ref()), &uid).await {
            Ok(series) => e["thumbs"] = json!(series),
            Err(err) => return Err(state.unavailable(page, "timeline", &err).await),
        }
        // This node's last fetch of it failed: say which failure.
        if let Some(f) = crate::peer::progress(region, &uid)
            .filter(|p| p.state == crate::peer::FetchState::Failed)
            .and_then(|p| p.failure)
        {
            e["fetch_failed"] = json!(f.kind);
        }
    }
    // Newest first; undated last.
    entries.sort_by(|a, b| {
        let key = |e: &Value| {
            (
                e["date"].as_str().unwrap_or("").to_string(),
                e["time"].as_str().unwrap_or("").to_string(),
            )
        };
        key(b).cmp(&key(a))
    });
    let detail = format!(
        "records={} withheld={withheld} registry_reached={reached}",
        entries.len()
    );
    state
        .audit(
            page,
            "view_timeline",
            patient.patient_key.as_deref(),
            &detail,
        )
        .await?;
    crate::audit::patient_viewed(
        user_id,
        patient.patient.patient_id.as_deref(),
        patient.patient_key.as_deref(),
    );
    let unverified = patient.note.as_deref().map(|code| {
        page.t(match code {
            "check_digit" => "id_check_digit",
            "identifier_format" => "id_identifier_format",
            _ => "id_no_identifier",
        })
    });
    Ok(json!({
        "entries": entries,
        "registry_reached": reached,
        "registry_error": registry_error,
        "withheld_count": withheld,
        "access": access,
        "unverified": unverified,
        "no_list": list.is_none(),
        "groups": list.as_deref().map(|l| item_groups(page.lang, l)).unwrap_or_default(),
        "list_name": list.as_deref().map(|l| format!("{} {}", l.meta.region, l.meta.version)),
    }))
}

// ------------------------------------------------------------------ check

#[derive(Deserialize, Default)]
#[serde(default)]
struct CheckForm {
    csrf: String,
    item_code: String,
    laterality: String,
    encounter: String,
    break_the_glass: Option<String>,
}

async fn check(
    State(state): State<Arc<PageState>>,
    page: Page,
    body: Result<Form<CheckForm>, FormRejection>,
) -> Answer {
    let region = state.need_region(&page).await?;
    let f = form(&state, &page, body).await?;
    state.check_csrf(&page, &f.csrf).await?;
    let patient = page.patient()?.clone();
    let user_id = page.user()?.user_id.clone();
    let Some(list) = region.list() else {
        return Err(state
            .error(&page, StatusCode::SERVICE_UNAVAILABLE, "no_list")
            .await);
    };
    let refuse = |key: &'static str| {
        let state = &state;
        let page = &page;
        async move {
            state
                .message(
                    page,
                    StatusCode::BAD_REQUEST,
                    "error_title",
                    page.t(key).to_string(),
                    back(page),
                )
                .await
        }
    };
    let Some(item) = list.item(f.item_code.trim()) else {
        return Err(refuse("err_no_item").await);
    };
    let laterality = match f.laterality.trim() {
        "L" => Some(Laterality::Left),
        "R" => Some(Laterality::Right),
        "B" => Some(Laterality::Both),
        _ => None,
    };
    if item.laterality == LateralityRule::Required && laterality.is_none() {
        return Err(refuse("err_side_needed").await);
    }
    let encounter = match f.encounter.as_str() {
        "inpatient" => Encounter::Inpatient,
        "emergency" => Encounter::Emergency,
        _ => Encounter::Outpatient,
    };
    let break_the_glass = f.break_the_glass.is_some_and(|v| !v.is_empty());
    let request = CheckRequest {
        patient: patient.patient.clone(),
        order: Order {
            item_code: Some(item.code.clone()),
            laterality: if item.laterality == LateralityRule::Required {
                laterality
            } else {
                None
            },
            ..Order::default()
        },
        ordering_doctor: user_id,
        encounter,
        break_the_glass,
        as_of: None,
    };
    let answer = match priors::run_check(region, &request).await {
        Ok(a) => a,
        Err(e) => return Err(state.priors_error(&page, e).await),
    };
    let outcome = serde_json::to_value(answer.outcome).unwrap_or(Value::Null);
    let detail = format!(
        "check_id={} item={} outcome={} encounter={} break_the_glass={break_the_glass}",
        answer.check_id,
        item.code,
        outcome.as_str().unwrap_or(""),
        f.encounter
    );
    state
        .audit(
            &page,
            "order_check",
            patient.patient_key.as_deref(),
            &detail,
        )
        .await?;
    let answer = serde_json::to_value(&answer).expect("the answer serialises");
    Ok(render_check(
        &state,
        &page,
        &list,
        answer,
        StatusCode::OK,
        None,
        json!({}),
    )
    .await)
}

/// The check's answer as the page shows it: names in the page's language,
/// each prior with its link.
async fn render_check(
    state: &PageState,
    page: &Page,
    list: &RecognitionList,
    mut answer: Value,
    status: StatusCode,
    error: Option<&str>,
    form: Value,
) -> Response {
    let links = answer["links"].clone();
    let name = |v: &Value, zh: &str, en: &str| -> Value {
        match (v[zh].as_str(), v[en].as_str()) {
            (Some(z), Some(e)) => json!(item_name(page.lang, z, e)),
            _ => Value::Null,
        }
    };
    answer["ordered_item"]["name"] = name(&answer["ordered_item"], "name_zh", "name_en");
    let mut fix = |p: &mut Value| {
        if p.is_object() {
            p["item_name"] = name(p, "item_name_zh", "item_name_en");
            let uid = p["study_instance_uid"].as_str().unwrap_or("").to_string();
            p["link"] = links[&uid].clone();
        }
    };
    fix(&mut answer["cited"]);
    for key in ["other_qualifying", "not_counted"] {
        if let Some(a) = answer[key].as_array_mut() {
            a.iter_mut().for_each(&mut fix);
        }
    }
    let reasons: Vec<Value> = list
        .reasons
        .iter()
        .map(|r| json!({"code": r.code, "name": item_name(page.lang, &r.name_zh, &r.name_en)}))
        .collect();
    // The cited prior's series as thumbnails when its images are here; and
    // when this node's last fetch of them failed, which failure (the
    // doctor should know before relying on images that cannot be opened).
    let cited_uid = answer["cited"]["study_instance_uid"].as_str();
    let cited_series = match cited_uid {
        Some(uid) => {
            match images::series_of(&state.index, state.region().map(|r| r.as_ref()), uid).await {
                Ok(s) => s,
                Err(e) => return state.unavailable(page, "check", &e).await,
            }
        }
        None => Vec::new(),
    };
    let cited_failure = cited_uid
        .zip(state.region())
        .and_then(|(uid, region)| crate::peer::progress(region, uid))
        .filter(|p| p.state == crate::peer::FetchState::Failed)
        .and_then(|p| p.failure)
        .map(|f| json!({"kind": f.kind, "detail": f.detail}));
    state
        .render(
            page,
            status,
            "check.html",
            json!({"answer": answer, "reasons": reasons, "error": error, "form": form,
                   "cited_series": cited_series, "cited_failure": cited_failure}),
        )
        .await
}

// ------------------------------------------------------------------ decision

#[derive(Deserialize, Default, serde::Serialize)]
#[serde(default)]
struct DecisionForm {
    #[serde(skip_serializing)]
    csrf: String,
    check_id: String,
    decision: String,
    reason_code: String,
    free_text: String,
}

async fn decision(
    State(state): State<Arc<PageState>>,
    page: Page,
    body: Result<Form<DecisionForm>, FormRejection>,
) -> Answer {
    let region = state.need_region(&page).await?;
    let f = form(&state, &page, body).await?;
    state.check_csrf(&page, &f.csrf).await?;
    let user_id = page.user()?.user_id.clone();
    let Some(list) = region.list() else {
        return Err(state
            .error(&page, StatusCode::SERVICE_UNAVAILABLE, "no_list")
            .await);
    };
    // Only the doctor who ran the check decides on it.
    let row = sqlx::query(
        "SELECT user_id, patient_key, result, decision FROM recognition_check WHERE check_id = $1",
    )
    .bind(f.check_id.trim())
    .fetch_optional(state.index.pool())
    .await;
    let row = match row {
        Ok(Some(r)) => r,
        Ok(None) => return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await),
        Err(e) => return Err(state.unavailable(&page, "decision", &e).await),
    };
    let fields = (|| -> Result<(String, Option<String>, String, Option<String>), sqlx::Error> {
        Ok((
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        ))
    })();
    let (owner, patient_key, result, decided) = match fields {
        Ok(f) => f,
        Err(e) => return Err(state.unavailable(&page, "decision", &e).await),
    };
    if owner != user_id {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    }
    let answer: Value = serde_json::from_str(&result).unwrap_or(Value::Null);
    let form_echo = serde_json::to_value(&f).unwrap_or(Value::Null);
    let again = |key: &'static str| {
        let (state, page, list, answer, form_echo) =
            (&state, &page, &list, answer.clone(), form_echo.clone());
        async move {
            render_check(
                state,
                page,
                list,
                answer,
                StatusCode::BAD_REQUEST,
                Some(page.t(key)),
                form_echo,
            )
            .await
        }
    };
    if decided.is_some() {
        return Err(again("err_decided").await);
    }
    let decision = match f.decision.as_str() {
        "accepted" => Decision::Accepted,
        "repeated" => Decision::Repeated,
        _ => return Err(again("err_no_decision").await),
    };
    let reason_code = f.reason_code.trim();
    let reason_code = match decision {
        Decision::Repeated if reason_code.is_empty() => return Err(again("err_no_reason").await),
        Decision::Repeated => Some(reason_code.to_string()),
        Decision::Accepted => None,
    };
    let recorded = priors::decide(
        region,
        &DecisionRequest {
            check_id: f.check_id.trim().to_string(),
            decision,
            reason_code,
            free_text: Some(f.free_text.clone()),
            doctor: user_id,
        },
    )
    .await;
    let recorded = match recorded {
        Ok(r) => r,
        Err(priors::Error::Invalid(m)) => {
            let (state, page) = (&state, &page);
            return Err(render_check(
                state,
                page,
                &list,
                answer,
                StatusCode::BAD_REQUEST,
                Some(&m),
                form_echo,
            )
            .await);
        }
        Err(e) => return Err(state.priors_error(&page, e).await),
    };
    let decision_word = match recorded.decision {
        Decision::Accepted => "accepted",
        Decision::Repeated => "repeated",
    };
    // The free text may name the patient: it stays in recognition_check,
    // not in the audit detail.
    let detail = format!(
        "check_id={} decision={decision_word} reason={}",
        recorded.check_id,
        recorded.reason_code.as_deref().unwrap_or("-")
    );
    state
        .audit(&page, "decision", patient_key.as_deref(), &detail)
        .await?;
    let reason_name = recorded
        .reason_code
        .as_deref()
        .and_then(|c| list.reason(c))
        .map(|r| item_name(page.lang, &r.name_zh, &r.name_en));
    let ordered = &answer["ordered_item"];
    Ok(state
        .render(
            &page,
            StatusCode::OK,
            "decision.html",
            json!({
                "decision": decision_word,
                "reason_code": recorded.reason_code,
                "reason_name": reason_name,
                "non_recognition": recorded.non_recognition,
                "check_id": recorded.check_id,
                "list_version": recorded.list_version,
                "item_name": item_name(
                    page.lang,
                    ordered["name_zh"].as_str().unwrap_or(""),
                    ordered["name_en"].as_str().unwrap_or(""),
                ),
            }),
        )
        .await)
}

// ------------------------------------------------------------------ study

async fn study_page(
    State(state): State<Arc<PageState>>,
    page: Page,
    Path(raw): Path<String>,
) -> Answer {
    let region = state.need_region(&page).await?;
    let user_id = page.user()?.user_id.clone();
    let Ok(uid) = crate::types::Uid::parse(&raw) else {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    };
    let uid = uid.as_str().to_string();
    let list = region.list();
    let study = match local_study(&state, page.lang, list.as_deref(), &uid).await {
        Ok(s) => s,
        Err(e) => return Err(state.unavailable(&page, "study", &e).await),
    };
    if let Some(mut study) = study {
        if let Some(holder) = study["copy_of"].as_str().map(str::to_string) {
            study["copy_of_name"] = json!(images::hospital_name(region, &holder).await);
        }
        let (series, patient_key) = match study_series(&state, &uid).await {
            Ok(s) => s,
            Err(e) => return Err(state.unavailable(&page, "study", &e).await),
        };
        state
            .audit(
                &page,
                "view_study",
                patient_key.as_deref(),
                &format!("study={uid} held=here"),
            )
            .await?;
        crate::audit::study_viewed(&user_id, &state.index, &uid);
        let recognition = recognition_context(region, page.lang, list.as_deref(), &uid).await;
        return Ok(state
            .render(
                &page,
                StatusCode::OK,
                "study.html",
                json!({"study": study, "series": series, "recognition": recognition,
                       "csrf": page.user()?.csrf_token}),
            )
            .await);
    }
    // Not held here: which hospital of the current patient's records holds it.
    let mut elsewhere = Value::Null;
    let key = page
        .session
        .as_ref()
        .and_then(|s| s.patient.as_ref())
        .and_then(|p| p.patient_key.clone());
    if let Some(key) = &key {
        match priors::priors(region, key, Purpose::Treatment, None, &user_id).await {
            Ok((answer, _)) => {
                let directory = region.directory().await;
                if let Some(r) = answer
                    .records
                    .iter()
                    .find(|r| r.record.study_instance_uid == uid)
                {
                    elsewhere =
                        regional_entry(page.lang, region, list.as_deref(), directory.as_ref(), r);
                }
            }
            Err(priors::Error::Registry(_)) => {}
            Err(e) => return Err(state.priors_error(&page, e).await),
        }
    }
    let held = if elsewhere.is_null() {
        "unknown"
    } else {
        "elsewhere"
    };
    state
        .audit(
            &page,
            "view_study",
            key.as_deref(),
            &format!("study={uid} held={held}"),
        )
        .await?;
    let status = if elsewhere.is_null() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    Ok(state
        .render(&page, status, "study.html", json!({"elsewhere": elsewhere}))
        .await)
}

// ------------------------------------------------- confirmation at the source

/// The classifier's items of a local study with their evidence, the
/// confirmation, and the list's items to choose from (issue 17 section 2):
/// for the hospital's own technologists and radiologists.
async fn recognition_context(
    region: &Region,
    lang: Lang,
    list: Option<&RecognitionList>,
    uid: &str,
) -> Value {
    let (Some(list), Ok(r)) = (list, crate::confirm::study_recognition(region, uid).await) else {
        return Value::Null;
    };
    let name = |code: &str| {
        list.item(code)
            .map(|i| item_name(lang, &i.name_zh, &i.name_en))
            .unwrap_or_else(|| code.to_string())
    };
    let side = |l: &Value| l.as_str().map(str::to_string);
    let choice = |code: &str, l: Option<String>| match l {
        Some(l) => format!("{code}:{l}"),
        None => code.to_string(),
    };
    let classified: Vec<Value> = r
        .classification
        .as_ref()
        .and_then(|c| c["items"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|i| {
            let code = i["code"].as_str().unwrap_or("");
            json!({
                "code": code, "name": name(code), "laterality": i["laterality"],
                "confidence": i["confidence"], "doubts": i["doubts"],
                "evidence": i["evidence"],
            })
        })
        .collect();
    // Checked: the confirmation's items where one holds, else the
    // classifier's.
    let checked: BTreeSet<String> = match &r.confirmation {
        Some(c) if !c.lapsed => c
            .items
            .iter()
            .map(|i| {
                choice(
                    &i.code,
                    i.laterality
                        .and_then(|l| serde_json::to_value(l).ok())
                        .and_then(|v| side(&v)),
                )
            })
            .collect(),
        _ => classified
            .iter()
            .map(|i| choice(i["code"].as_str().unwrap_or(""), side(&i["laterality"])))
            .collect(),
    };
    let mut choices = Vec::new();
    for item in &list.items {
        let sides: &[Option<&str>] = match item.laterality {
            LateralityRule::None => &[None],
            LateralityRule::Required => &[Some("L"), Some("R"), Some("B")],
            LateralityRule::Both => &[Some("B")],
        };
        for l in sides {
            let value = choice(&item.code, l.map(str::to_string));
            choices.push(json!({
                "value": value, "code": item.code, "side": l,
                "name": item_name(lang, &item.name_zh, &item.name_en),
                "checked": checked.contains(&value),
            }));
        }
    }
    json!({
        "classified": classified,
        "unclassified": r.classification.as_ref().map(|c| c["unclassified"].clone()),
        "confirmation": r.confirmation,
        "images_available": r.images_available,
        "record_version": r.record_version,
        "choices": choices,
    })
}

/// The hospital confirms or corrects a study's items: `item` is repeated
/// (CODE, or CODE:L|R|B for an item with a side), `role` names who.
async fn confirm_items(
    State(state): State<Arc<PageState>>,
    page: Page,
    Path(raw): Path<String>,
    body: Result<Form<Vec<(String, String)>>, FormRejection>,
) -> Answer {
    let region = state.need_region(&page).await?;
    let fields = form(&state, &page, body).await?;
    let field = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    state.check_csrf(&page, field("csrf")).await?;
    let user_id = page.user()?.user_id.clone();
    let Ok(uid) = crate::types::Uid::parse(&raw) else {
        return Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await);
    };
    let uid = uid.as_str().to_string();
    let Some(role) = crate::contract::ConfirmerRole::parse(field("role")) else {
        return Err(state
            .message(
                &page,
                StatusCode::BAD_REQUEST,
                "error_title",
                page.t("confirm_role_missing").to_string(),
                None,
            )
            .await);
    };
    let mut items = Vec::new();
    for (_, v) in fields.iter().filter(|(k, _)| k == "item") {
        let (code, side) = v.split_once(':').unwrap_or((v.as_str(), ""));
        let laterality = match side {
            "" => None,
            other => match serde_json::from_value::<Laterality>(json!(other)) {
                Ok(l) => Some(l),
                Err(_) => {
                    return Err(state
                        .error(&page, StatusCode::BAD_REQUEST, "bad_request")
                        .await);
                }
            },
        };
        items.push(crate::publish::ConfirmedItem {
            code: code.to_string(),
            laterality,
        });
    }
    let request = crate::confirm::ConfirmationRequest {
        role,
        user_id: user_id.clone(),
        items,
    };
    let patient_key = match study_series(&state, &uid).await {
        Ok((_, key)) => key,
        Err(e) => return Err(state.unavailable(&page, "study", &e).await),
    };
    state
        .audit(
            &page,
            "confirm_items",
            patient_key.as_deref(),
            &format!("study={uid} role={}", role.as_str()),
        )
        .await?;
    match crate::confirm::confirm(region, &uid, &request).await {
        Ok(_) => Ok(Redirect::to(&format!("/ui/studies/{uid}?confirmed=1")).into_response()),
        Err(crate::confirm::Error::Invalid(m)) => Err(state
            .message(&page, StatusCode::BAD_REQUEST, "error_title", m, None)
            .await),
        Err(crate::confirm::Error::NotFound) => {
            Err(state.error(&page, StatusCode::NOT_FOUND, "not_found").await)
        }
        Err(crate::confirm::Error::NotClassified) => Err(state
            .message(
                &page,
                StatusCode::CONFLICT,
                "error_title",
                page.t("not_classified").to_string(),
                None,
            )
            .await),
        Err(crate::confirm::Error::Index(e)) => Err(state.unavailable(&page, "confirm", &e).await),
    }
}

/// A local study's series with their current instances, and its patient
/// key. As on the timeline, a series a failed fetch left incomplete is not
/// listed (images::series_of).
async fn study_series(
    state: &PageState,
    uid: &str,
) -> Result<(Vec<Value>, Option<String>), sqlx::Error> {
    let pool = state.index.pool();
    let hidden = state
        .region()
        .map(|r| crate::peer::incomplete_series(r, uid))
        .unwrap_or_default();
    let series = sqlx::query(
        "SELECT se.series_instance_uid, se.modality, se.series_number, se.series_description, \
         se.body_part_examined FROM series se JOIN study st ON st.study_key = se.study_key \
         WHERE st.study_instance_uid = $1",
    )
    .bind(uid)
    .fetch_all(pool)
    .await?;
    let instances = sqlx::query(
        "SELECT se.series_instance_uid, i.instance_number, i.sop_class_uid, i.blob_size \
         FROM instance i JOIN series se ON se.series_key = i.series_key \
         JOIN study st ON st.study_key = se.study_key \
         WHERE st.study_instance_uid = $1 AND i.is_current = 1",
    )
    .bind(uid)
    .fetch_all(pool)
    .await?;
    let mut by_series: HashMap<String, Vec<(Option<i64>, Value)>> = HashMap::new();
    for r in &instances {
        let number: Option<i64> = r.try_get(1)?;
        let sop_class: String = r.try_get(2)?;
        let sop_name = crate::storage_sop_classes::STORAGE_SOP_CLASSES
            .iter()
            .find(|(u, _)| *u == sop_class)
            .map(|(_, name)| name.to_string())
            .unwrap_or(sop_class);
        by_series.entry(r.try_get(0)?).or_default().push((
            number,
            json!({"number": number, "sop_class": sop_name, "size": r.try_get::<i64, _>(3)?}),
        ));
    }
    let mut out: Vec<(Option<i64>, String, Value)> = Vec::new();
    for r in &series {
        let series_uid: String = r.try_get(0)?;
        if hidden.contains(&series_uid) {
            continue;
        }
        let number: Option<i64> = r.try_get(2)?;
        let mut list = by_series.remove(&series_uid).unwrap_or_default();
        list.sort_by_key(|(n, _)| n.unwrap_or(i64::MAX));
        out.push((
            number,
            series_uid.clone(),
            json!({
                "uid": series_uid,
                "modality": r.try_get::<String, _>(1)?,
                "number": number,
                "description": r.try_get::<String, _>(3)?,
                "body_part": r.try_get::<String, _>(4)?,
                "instances": list.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
            }),
        ));
    }
    out.sort_by(|a, b| (a.0.unwrap_or(i64::MAX), &a.1).cmp(&(b.0.unwrap_or(i64::MAX), &b.1)));
    let key =
        sqlx::query("SELECT patient_key FROM study_publication WHERE study_instance_uid = $1")
            .bind(uid)
            .fetch_optional(pool)
            .await?
            .map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()?
            .flatten();
    Ok((out.into_iter().map(|(_, _, v)| v).collect(), key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_compile_and_render() {
        let env = templates();
        let t = i18n::strings(Lang::Zh);
        let answer = json!({
            "check_id": "abc", "outcome": "warn",
            "ordered_item": {"code": "CT-0301-01", "name": "胸部CT平扫", "mark": "苏HR", "window_days": 30, "window_is_default": true},
            "cited": {"hospital_id": "H", "hospital_name": "第二医院", "hospital_level": "二级甲等",
                      "study_instance_uid": "1.2", "study_date": "2026-11-30", "report_issued_date": null,
                      "window_basis": "study_date", "days_ago": 1, "window_days": 30, "item_name": "胸部CT平扫+增强",
                      "mark": "苏HR", "images_available": true, "eligibility": "规则", "reason": null, "link": "/ui/studies/1.2"},
            "other_qualifying": [], "reasons": [], "withheld_count": 0, "registry_reached": true,
            "not_counted": [{"hospital_id": "H", "study_instance_uid": "1.3", "reason": "out_of_window", "images_available": false}],
            "list_version": "0123456789abcdef", "list_name": "2026.1",
        });
        let html = env
            .get_template("check.html")
            .unwrap()
            .render(json!({"t": t, "answer": answer, "reasons": [{"code": "01", "name": "病情变化"}], "form": {}, "here": "/ui/patient", "other_lang": "en", "lang": "zh"}))
            .unwrap();
        assert!(html.contains("该患者近期做过类似检查"), "{html}");
        assert!(html.contains("第二医院"));
        assert!(html.contains("1 天"));
        assert!(html.contains("超出互认有效期"));
        assert!(html.contains("自检查日期起算"));
        assert!(html.contains("01 病情变化"));
    }

    #[test]
    fn labels_and_dates() {
        let p = SessionPatient {
            patient: PatientRef {
                identifier_type: Some(IdentifierType::ResidentId),
                identifier: Some("11010519491231002X".into()),
                ..PatientRef::default()
            },
            patient_key: None,
            note: None,
        };
        assert_eq!(patient_label(&p), "1101**********002X");
        assert_eq!(iso_date("20240314").as_deref(), Some("2024-03-14"));
        assert_eq!(iso_date(""), None);
    }
}
