//! `huren registry`: the regional registry, and the client nodes use to
//! reach it.
//!
//! - [`proto`]: the bodies of the contract (proto/huren.openapi.json).
//! - [`db`]: hospitals, study records, consents and the hash-chained audit
//!   trail on SQLite or PostgreSQL.
//! - [`server`]: the `/v1` HTTP API.
//! - [`refusals`]: the bound on how fast refusals fill the audit trail.
//! - [`federation`]: registries of several provinces asking each other
//!   (docs/federation.md).
//! - [`client`]: what a node uses to publish, pull the directory and ask
//!   for priors.
//!
//! The registry keeps no state outside its database, so several processes
//! on one PostgreSQL serve one region.

pub mod client;
pub mod db;
pub mod federation;
pub mod refusals;
pub mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::contract::AuditEntry;
use server::RegistryState;

/// Settings of `huren registry`; each also from the environment.
#[derive(Debug, Clone, Default, Args)]
pub struct RegistryArgs {
    /// HTTP listen address [default: 0.0.0.0:8090]
    #[arg(long, env = "HUREN_REGISTRY_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Directory of the embedded SQLite database and the generated admin
    /// token [default: ./huren-registry-data]
    #[arg(long, env = "HUREN_REGISTRY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// sqlite://path or postgres://user:pass@host/db [default:
    /// sqlite://<data_dir>/registry.sqlite]
    #[arg(long, env = "HUREN_REGISTRY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// File holding the admin token. Without it (and without
    /// HUREN_REGISTRY_ADMIN_TOKEN) the first start writes a random one to
    /// <data_dir>/admin-token, readable by its owner only.
    #[arg(long, env = "HUREN_REGISTRY_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Largest request body in bytes (a publication batch of 500 records is
    /// about 400 KB) [default: 8388608]
    #[arg(long, env = "HUREN_REGISTRY_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<usize>,

    /// Recognition list to activate at start (validated; an invalid list is
    /// logged with every error and the active one stays)
    #[arg(long, env = "HUREN_REGISTRY_RECOGNITION_LIST")]
    pub recognition_list: Option<PathBuf>,

    /// Certificate chain (PEM) served on the listen address, which is then
    /// HTTPS only; read again on SIGHUP
    #[arg(
        long,
        env = "HUREN_REGISTRY_TLS_CERTIFICATE_FILE",
        requires = "tls_private_key_file"
    )]
    pub tls_certificate_file: Option<PathBuf>,

    /// Private key (PEM) of --tls-certificate-file
    #[arg(
        long,
        env = "HUREN_REGISTRY_TLS_PRIVATE_KEY_FILE",
        requires = "tls_certificate_file"
    )]
    pub tls_private_key_file: Option<PathBuf>,

    /// Break-the-glass grants one hospital may be issued per hour; past
    /// it, emergency grants are refused (403) and audited [default: 20]
    #[arg(long, env = "HUREN_REGISTRY_EMERGENCY_GRANTS_PER_HOUR")]
    pub emergency_grants_per_hour: Option<u32>,

    /// The latest expiry a new consent may have, in days from its
    /// recording; a later one is refused (400), not shortened, so that the
    /// hospital tells the patient the span that really holds [default: 365]
    #[arg(long, env = "HUREN_REGISTRY_MAX_CONSENT_DAYS")]
    pub max_consent_days: Option<u32>,

    /// Refusals (401, 403) of one caller audited one by one per minute;
    /// past it one entry says so and the rest are counted, summarized when
    /// the minute ends [default: 20]
    #[arg(long, env = "HUREN_REGISTRY_AUDIT_REFUSALS_PER_MINUTE")]
    pub audit_refusals_per_minute: Option<u32>,

    /// Federation configuration (TOML, docs/federation.md): this
    /// registry's member ID, the other members' URLs and public keys, the
    /// federation's recognition list, the consent policy and the deadline
    #[arg(long, env = "HUREN_REGISTRY_FEDERATION_CONFIG")]
    pub federation_config: Option<PathBuf>,

    /// Plain HTTP beside HTTPS, loopback addresses only (local probes and
    /// admin scripts)
    #[arg(
        long,
        env = "HUREN_REGISTRY_PLAIN_LISTEN",
        requires = "tls_certificate_file"
    )]
    pub plain_listen: Option<SocketAddr>,
}

impl RegistryArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("huren-registry-data"))
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.data_dir().join("registry.sqlite").display()
            )
        })
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| "0.0.0.0:8090".parse().expect("valid default"))
    }

    /// The admin token: from the environment, the named file, or the
    /// generated file in the data directory.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        if let Ok(token) = std::env::var("HUREN_REGISTRY_ADMIN_TOKEN")
            && !token.trim().is_empty()
        {
            return Ok(token.trim().to_string());
        }
        let path = match &self.admin_token_file {
            Some(p) => p.clone(),
            None => {
                let p = self.data_dir().join("admin-token");
                if !p.exists() {
                    write_secret_file(&p, &crate::common::random_hex(32))?;
                    tracing::info!(path = %p.display(), "generated the registry admin token");
                }
                p
            }
        };
        let token = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("cannot read the admin token {}: {e}", path.display()))?;
        let token = token.trim().to_string();
        anyhow::ensure!(
            token.len() >= 16,
            "the admin token in {} is shorter than 16 characters",
            path.display()
        );
        Ok(token)
    }
}

fn write_secret_file(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(f, "{content}")?;
    Ok(())
}

/// Opens the database and serves until `shutdown` fires. The caller binds
/// the listener (main from config, tests on port 0).
pub async fn run(
    listener: TcpListener,
    args: &RegistryArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    crate::metrics::install(crate::metrics::Process::Registry);
    let db = db::Db::open(&args.database_url())
        .await?
        .with_emergency_grants_per_hour(
            args.emergency_grants_per_hour
                .unwrap_or(db::DEFAULT_EMERGENCY_GRANTS_PER_HOUR),
        )
        .with_max_consent_days(
            args.max_consent_days
                .unwrap_or(db::DEFAULT_MAX_CONSENT_DAYS),
        );
    let token = args.admin_token()?;
    let federation = match &args.federation_config {
        Some(path) => {
            let f = federation::Federation::load(path).map_err(anyhow::Error::msg)?;
            crate::metrics::register_federation_members(f.members.iter().map(|m| m.id.as_str()));
            tracing::info!(
                federation = %f.name,
                member_id = %f.member_id,
                members = f.members.len(),
                consent_policy = f.consent_policy.as_str(),
                deadline_ms = f.deadline.as_millis() as u64,
                list = %f.list.content_hash,
                "federation configured"
            );
            Some(Arc::new(f))
        }
        None => None,
    };
    if let Some(path) = &args.recognition_list {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        match db.activate_list(&text, "startup").await {
            Ok(a) => {
                tracing::info!(version = %a.version, content_hash = %a.content_hash, items = a.items, "recognition list active")
            }
            Err(db::Error::Invalid(errors)) => tracing::error!(
                file = %path.display(),
                errors = %errors.replace('\n', "; "),
                "recognition list refused; the active list stays"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    let state = Arc::new(RegistryState {
        db: db.clone(),
        admin_token_sha256: Sha256::digest(token.as_bytes()).into(),
        max_request_bytes: args.max_request_bytes.unwrap_or(8 << 20),
        refusals: refusals::Limiter::new(
            args.audit_refusals_per_minute
                .unwrap_or(refusals::DEFAULT_PER_MINUTE),
        ),
        federation,
    });
    // Callers who stopped being refused still get their minute's summary;
    // federation nonces past the skew are forgotten.
    let summaries = {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {
                        server::flush_refusal_summaries(&state).await;
                        if state.federation.is_some()
                            && let Err(error) = state
                                .db
                                .forget_old_nonces(
                                    federation::unix_now(),
                                    federation::MAX_SKEW_SECS,
                                )
                                .await
                        {
                            tracing::warn!(%error, "old federation nonces could not be forgotten");
                        }
                    }
                }
            }
        })
    };
    let (listener, plain) = tls_listeners(listener, args, &shutdown).await?;
    // The peer address reaches the handlers (a refusal's audit entry).
    let router = server::router(state);
    let plain = plain.map(|plain| {
        let (router, shutdown) = (router.clone(), shutdown.clone());
        tokio::spawn(async move {
            crate::tls::serve(crate::tls::HttpListener::Plain(plain), router, shutdown).await
        })
    });
    crate::tls::serve(listener, router, shutdown.clone()).await?;
    if let Some(plain) = plain {
        plain.await??;
    }
    let _ = summaries.await;
    db.close().await;
    Ok(())
}

/// HTTPS on the listen address when a certificate is configured (reloaded
/// on SIGHUP), and the loopback plain-HTTP listener beside it.
async fn tls_listeners(
    listener: TcpListener,
    args: &RegistryArgs,
    shutdown: &CancellationToken,
) -> anyhow::Result<(crate::tls::HttpListener, Option<TcpListener>)> {
    let addr = listener.local_addr()?;
    let (Some(cert), Some(key)) = (&args.tls_certificate_file, &args.tls_private_key_file) else {
        anyhow::ensure!(
            args.plain_listen.is_none(),
            "--plain-listen needs --tls-certificate-file: without TLS, --listen is already plain HTTP"
        );
        tracing::info!("registry HTTP listening on {addr}");
        return Ok((listener.into(), None));
    };
    let resolver = crate::tls::CertificateResolver::load(cert, key).map_err(anyhow::Error::msg)?;
    let https = crate::tls::https_config(resolver.clone()).map_err(anyhow::Error::msg)?;
    let plain = match args.plain_listen {
        Some(plain) => {
            crate::tls::require_loopback(plain, "--plain-listen").map_err(anyhow::Error::msg)?;
            let plain = TcpListener::bind(plain)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {plain}: {e}"))?;
            tracing::info!("registry loopback plain HTTP on {}", plain.local_addr()?);
            Some(plain)
        }
        None => None,
    };
    crate::tls::spawn_reload_on_sighup(vec![resolver], shutdown.clone());
    tracing::info!("registry HTTP listening on {addr} (HTTPS)");
    Ok((crate::tls::HttpListener::tls(listener, https), plain))
}

/// Audit entries as JSON lines, one object a line.
pub fn audit_jsonl(entries: &[AuditEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        out.push_str(&serde_json::to_string(e).expect("entry serialises"));
        out.push('\n');
    }
    out
}

pub const AUDIT_CSV_HEADER: &str = "seq,at,actor,user_id,action,patient_key,purpose,records_returned,outcome,detail,prev_hash,hash\n";

/// Audit entries as RFC 4180 CSV with a header line. A cell that a
/// spreadsheet would read as a formula (it starts with `=`, `+`, `-`, `@`,
/// a tab or a carriage return: OWASP "CSV Injection") is written with a
/// leading `'` and quoted, so that it shows as text; a cell with a comma,
/// quote or line break is quoted, quotes doubled.
pub fn audit_csv(entries: &[AuditEntry]) -> String {
    let mut out = String::from(AUDIT_CSV_HEADER);
    for e in entries {
        let seq = e.seq.to_string();
        let n = e.records_returned.to_string();
        let fields = [
            seq.as_str(),
            &e.at,
            &e.actor,
            &e.user_id,
            &e.action,
            e.patient_key.as_deref().unwrap_or(""),
            e.purpose.as_deref().unwrap_or(""),
            &n,
            &e.outcome,
            &e.detail,
            &e.prev_hash,
            &e.hash,
        ];
        for (i, f) in fields.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            csv_cell(&mut out, f);
        }
        out.push('\n');
    }
    out
}

fn csv_cell(out: &mut String, s: &str) {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    if formula || s.contains([',', '"', '\n', '\r']) {
        out.push('"');
        if formula {
            out.push('\'');
        }
        out.push_str(&s.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(s);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn csv_cells() {
        for (cell, written) in [
            ("ok", "ok"),
            ("", ""),
            ("a,b", "\"a,b\""),
            ("say \"hi\"", "\"say \"\"hi\"\"\""),
            ("=HYPERLINK(\"x\")", "\"'=HYPERLINK(\"\"x\"\")\""),
            ("+1", "\"'+1\""),
            ("-2+3", "\"'-2+3\""),
            ("@SUM(A1)", "\"'@SUM(A1)\""),
            ("\tcmd", "\"'\tcmd\""),
            ("\r=1", "\"'\r=1\""),
            ("line\nbreak", "\"line\nbreak\""),
            ("a=b", "a=b"),
        ] {
            let mut out = String::new();
            super::csv_cell(&mut out, cell);
            assert_eq!(out, written, "{cell:?}");
        }
    }
}
