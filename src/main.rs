use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use huren::config::NodeArgs;
use huren::contract::{HospitalUpdate, Level, NewHospital, QcStatus};
use huren::node::{self, Node};
use huren::registry::RegistryArgs;
use huren::registry::db::{AuditRecord, Db};
use huren::verify;

/// jemalloc, not glibc's malloc: see Cargo.toml for why (measured in
/// docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// huren: the imaging result-sharing node of a regional health cloud.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hospital node: DICOM (C-ECHO, C-STORE, C-FIND, C-MOVE,
    /// C-GET, Storage Commitment), DICOMweb, the JSON API, and publishing to
    /// the regional registry when one is configured.
    Node(NodeArgs),
    /// Run the regional registry (no subcommand), or administer it.
    Registry(RegistryCommand),
    /// The mutual-recognition list: validate it, classify studies with it,
    /// import a region's CSV table.
    Recognition {
        #[command(subcommand)]
        command: RecognitionCommand,
    },
    /// Check every indexed blob against its BLAKE3 key; report missing,
    /// corrupt and orphaned blobs. Exits 1 if any blob is missing or corrupt.
    Verify {
        #[command(flatten)]
        node: NodeArgs,
        /// Delete orphaned blobs (blobs no index row names) older than
        /// --orphan-grace-secs.
        #[arg(long)]
        remove_orphans: bool,
        /// Orphans younger than this may belong to an ingest in progress on
        /// a running node and are never removed.
        #[arg(long, default_value_t = 3600)]
        orphan_grace_secs: u64,
        /// Rebuild the index from the blob store: index every blob the index
        /// does not name.
        #[arg(long)]
        reindex: bool,
        /// Write the scrub's results in the Prometheus text format to this
        /// file (for node_exporter's textfile collector: a finished
        /// command is never scraped).
        #[arg(long)]
        metrics_file: Option<std::path::PathBuf>,
    },
    /// Delete a study, series or instance from the node: gone from every
    /// query and retrieval at once, recorded (who, why), retracted from or
    /// re-published to the registry; the blobs go at the next collection.
    Delete {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, conflicts_with_all = ["series", "instance"], required_unless_present_any = ["series", "instance"])]
        study: Option<String>,
        #[arg(long, conflicts_with = "instance")]
        series: Option<String>,
        #[arg(long)]
        instance: Option<String>,
        /// Why (recorded)
        #[arg(long)]
        reason: String,
        /// A CID 7011 code: 113001 quality, 113037 patient safety, 113038
        /// wrong worklist entry, 113039 retention expired
        #[arg(long)]
        reason_code: Option<String>,
    },
    /// Remove blobs no index row names (left by deletions or crashes),
    /// older than --grace-secs; safe while the node runs (src/gc.rs).
    Gc {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
    /// Online backup into DIR: a consistent copy of the index, and the
    /// blobs not already in DIR.
    Backup {
        #[command(flatten)]
        node: NodeArgs,
        dir: std::path::PathBuf,
    },
    /// Bring a stopped node's index and blobs back from a backup DIR.
    Restore {
        #[command(flatten)]
        node: NodeArgs,
        dir: std::path::PathBuf,
        /// Replace an existing SQLite index
        #[arg(long)]
        force: bool,
    },
    /// Doctor accounts of the node's page (/ui).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a doctor's account. The password is read from --password-file
    /// or the environment variable HUREN_USER_PASSWORD (never a flag: a
    /// command line is visible to every user of the machine); at least 8
    /// characters.
    Add {
        #[command(flatten)]
        node: NodeArgs,
        /// The user ID the doctor signs in with (letters, digits, . _ - @)
        user_id: String,
        /// The name the page shows, e.g. 李医生
        #[arg(long)]
        name: String,
        /// A file whose first line is the password
        #[arg(long)]
        password_file: Option<std::path::PathBuf>,
    },
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct RegistryCommand {
    #[command(subcommand)]
    command: Option<RegistrySub>,
    #[command(flatten)]
    args: RegistryArgs,
}

#[derive(Subcommand)]
enum RecognitionCommand {
    /// Validate a list; prints every error with its line and field, exit 1
    /// if any.
    CheckList { file: std::path::PathBuf },
    /// Classify Part-10 files (directories recursively, grouped by Study
    /// Instance UID): per study, each item with its confidence and the
    /// evidence it rests on; one JSON object per study, or text to read.
    Classify {
        /// The list [default: deploy/recognition/jiangsu-example.toml]
        #[arg(long)]
        list: Option<std::path::PathBuf>,
        /// The hospital whose local code table applies
        #[arg(long)]
        hospital_id: Option<String>,
        /// `json` (one object per study per line) or `text` (for a person)
        #[arg(long, default_value = "json", value_parser = ["json", "text"])]
        format: String,
        #[arg(required = true)]
        paths: Vec<std::path::PathBuf>,
    },
    /// Convert a region's CSV table into [[item]] tables (stdout).
    ImportCsv { file: std::path::PathBuf },
}

#[derive(Subcommand)]
enum RegistrySub {
    /// Activate a recognition list (validated first; an invalid list is
    /// refused and the active one stays).
    RecognitionList {
        #[command(flatten)]
        registry: RegistryArgs,
        file: std::path::PathBuf,
    },
    /// The hospital directory: add, list and change hospitals.
    Hospital {
        #[command(subcommand)]
        command: HospitalCommand,
    },
    /// The audit trail: verify its hash chain, list or export it.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Federation keys (docs/federation.md).
    Federation {
        #[command(subcommand)]
        command: FederationCommand,
    },
}

#[derive(Subcommand)]
enum FederationCommand {
    /// Write a new Ed25519 signing key (mode 600; refused if the file
    /// exists) and print its public key for the other members'
    /// configurations.
    Keygen {
        #[arg(long)]
        key_file: std::path::PathBuf,
    },
    /// Print the public key of a signing key file.
    PublicKey {
        #[arg(long)]
        key_file: std::path::PathBuf,
    },
    /// Check a federation configuration (keys, members, the federation's
    /// recognition list) without starting.
    Check { config: std::path::PathBuf },
}

#[derive(clap::Args)]
struct HospitalFields {
    /// Name, e.g. 南京市第一医院
    #[arg(long)]
    name: Option<String>,
    /// Level: 三级甲等 三级乙等 三级 二级甲等 二级乙等 二级 一级, or 3A 3B 3 2A 2B 2 1
    #[arg(long)]
    level: Option<String>,
    /// Medical group or community memberships (repeat, or comma separated)
    #[arg(long = "group", value_delimiter = ',')]
    groups: Option<Vec<String>>,
    /// A tertiary hospital that accepts lower-level results
    #[arg(long)]
    accepts_lower_level_results: Option<bool>,
    /// QC status: pending, passed or failed
    #[arg(long)]
    qc_status: Option<String>,
    /// DICOMweb base URL of the hospital's node
    #[arg(long)]
    dicomweb_base_url: Option<String>,
    /// Write the issued token to this file (mode 600) instead of stdout
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum HospitalCommand {
    /// Add a hospital; prints (or writes) its node's token, shown once.
    Add {
        #[command(flatten)]
        registry: RegistryArgs,
        /// Hospital ID (统一社会信用代码)
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: HospitalFields,
    },
    /// List the directory as JSON lines.
    List {
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Change a hospital; --rotate-token issues a new token.
    Set {
        #[command(flatten)]
        registry: RegistryArgs,
        #[arg(long)]
        id: String,
        #[command(flatten)]
        fields: HospitalFields,
        #[arg(long)]
        rotate_token: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Walk the hash chain; exit 1 naming the first changed, inserted or
    /// deleted entry.
    Verify {
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Write the trail (or the entries after --after-seq) as JSON lines or
    /// CSV.
    Export {
        #[command(flatten)]
        registry: RegistryArgs,
        /// jsonl or csv
        #[arg(long, default_value = "jsonl")]
        format: String,
        #[arg(long, default_value_t = 0)]
        after_seq: i64,
    },
}

fn main() -> ExitCode {
    // Everything huren writes holds PHI or secrets (the index: names, IDs,
    // birth dates, sessions, password hashes; blobs; the audit log; the
    // registry's database and tokens; backups): files 0600, directories
    // 0700, whatever the caller's umask, for every subcommand and before
    // anything is created. The systemd units set UMask=0077 as well.
    // SAFETY: umask only swaps the process's file mode mask; no thread
    // exists yet.
    unsafe {
        libc::umask(0o077);
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUREN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(move || OneLine {
            inner: std::io::stderr(),
            escape: !ansi,
        })
        // Operators and tests read the log from files and pipes: no colour
        // codes there.
        .with_ansi(ansi)
        .init();
    let cli = Cli::parse();
    huren::tls::raise_open_files_limit();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("huren: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// One event, one line: wire text (a calling AE title, a UID, a header)
/// logged with `%` could carry a newline or an escape code and forge a
/// line or rewrite a terminal (issue 22). Wire strings are logged with `?`
/// (escaped by `Debug`); this catches whatever else slips through: every
/// control character but the event's final newline is written as `\xNN`.
/// The formatter hands each event over in one `write` (tracing-subscriber
/// formats into a buffer first). Off on a terminal, whose colour codes are
/// the formatter's own.
struct OneLine<W> {
    inner: W,
    escape: bool,
}

impl<W: std::io::Write> std::io::Write for OneLine<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let body = buf.strip_suffix(b"\n").unwrap_or(buf);
        let control = |b: u8| (b < 0x20 && b != b'\t') || b == 0x7f;
        if !self.escape || !body.iter().any(|&b| control(b)) {
            self.inner.write_all(buf)?;
            return Ok(buf.len());
        }
        let mut out = Vec::with_capacity(buf.len() + 16);
        for &b in body {
            if control(b) {
                out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
            } else {
                out.push(b);
            }
        }
        if body.len() < buf.len() {
            out.push(b'\n');
        }
        self.inner.write_all(&out)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::User {
            command:
                UserCommand::Add {
                    node: args,
                    user_id,
                    name,
                    password_file,
                },
        } => {
            let password = match &password_file {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
                None => std::env::var("HUREN_USER_PASSWORD").map_err(|_| {
                    anyhow::anyhow!("give the password with --password-file or HUREN_USER_PASSWORD")
                })?,
            };
            anyhow::ensure!(
                password.chars().count() >= huren::http::page::auth::MIN_PASSWORD_CHARS,
                "the password must have at least {} characters",
                huren::http::page::auth::MIN_PASSWORD_CHARS
            );
            let config = args.resolve()?;
            let ingest = node::open_ingest(&config).await?;
            let result =
                huren::http::page::add_user(ingest.index(), &user_id, &name, &password).await;
            ingest.index().close().await;
            result?;
            println!("user {} added", user_id.trim());
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(args) => {
            let config = args.resolve()?;
            let dicom = TcpListener::bind(config.dicom_listen)
                .await
                .with_context(|| format!("cannot listen for DICOM on {}", config.dicom_listen))?;
            let http = TcpListener::bind(config.http_listen)
                .await
                .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
            let shutdown = CancellationToken::new();
            let signals = StopSignals::install().context("signal handlers")?;
            let node = Node::start(&config, dicom, http, shutdown.clone()).await?;
            signals.wait().await;
            tracing::info!("shutting down: no new associations; finishing those in progress");
            shutdown.cancel();
            node.wait().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Delete {
            node: args,
            study,
            series,
            instance,
            reason,
            reason_code,
        } => {
            use huren::lifecycle::{self, Deletion, Scope, Source};
            let parse = |raw: String| -> anyhow::Result<String> {
                Ok(huren::types::Uid::parse(&raw)
                    .map_err(|_| anyhow::anyhow!("{raw:?} is not a valid UID"))?
                    .as_str()
                    .to_string())
            };
            let scope = match (study, series, instance) {
                (Some(uid), _, _) => Scope::Study(parse(uid)?),
                (_, Some(uid), _) => Scope::Series(parse(uid)?),
                (_, _, Some(uid)) => Scope::Instance(parse(uid)?),
                _ => anyhow::bail!("give --study, --series or --instance"),
            };
            anyhow::ensure!(!reason.trim().is_empty(), "--reason must not be empty");
            if let Some(code) = &reason_code {
                anyhow::ensure!(
                    lifecycle::reason_meaning(code).is_some(),
                    "--reason-code {code} is not one of 113001, 113037, 113038, 113039"
                );
            }
            let config = args.resolve()?;
            let ingest = node::open_ingest(&config).await?;
            // The node's own audit log (appended to alongside a running
            // node: one write per message).
            let audit = huren::audit::Audit::open(&config).map_err(|e| anyhow::anyhow!(e))?;
            let actor = std::env::var("SUDO_USER")
                .or_else(|_| std::env::var("USER"))
                .map(|u| format!("cli:{u}"))
                .unwrap_or_else(|_| "cli".into());
            let outcome = lifecycle::delete(
                ingest.index(),
                None,
                &Deletion {
                    scopes: vec![scope],
                    source: Source::Operator,
                    actor,
                    reason_code: reason_code.unwrap_or_default(),
                    reason: reason.trim().to_string(),
                    rejection_note_uid: None,
                    rejected_in: None,
                    audit: audit.clone(),
                },
            )
            .await;
            audit.close().await;
            ingest.index().close().await;
            let outcome = outcome?;
            println!("instances removed: {}", outcome.instances_removed);
            for uid in &outcome.studies_removed {
                println!("study removed: {uid}");
            }
            for uid in &outcome.studies_changed {
                println!("study changed: {uid}");
            }
            Ok(if outcome.instances_removed == 0 {
                eprintln!("huren: nothing matched");
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Gc {
            node: args,
            grace_secs,
        } => {
            let config = args.resolve()?;
            let ingest = node::open_ingest(&config).await?;
            let report = huren::gc::collect(
                &ingest,
                &huren::gc::Options {
                    grace: Duration::from_secs(grace_secs),
                    progress: true,
                },
            )
            .await;
            ingest.index().close().await;
            let report = report?;
            println!(
                "blobs listed: {}; unreferenced: {}; removed: {} ({} bytes); kept: {}",
                report.listed,
                report.unreferenced,
                report.removed,
                report.removed_bytes,
                report.kept
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { node: args, dir } => {
            let config = args.resolve()?;
            let ingest = node::open_ingest(&config).await?;
            let report = huren::backup::backup(&ingest, &config.database_url, &dir, true).await;
            ingest.index().close().await;
            let report = report?;
            // The audit trail goes with the data it describes: a copy as of
            // now (the node keeps appending to its own). Restore leaves it
            // in DIR for the auditor; the restored node starts a new file.
            let audit_log = config
                .audit_log
                .clone()
                .unwrap_or_else(|| huren::audit::default_path(&config.data_dir));
            if audit_log.exists() {
                let copy = dir.join("audit.log");
                std::fs::copy(&audit_log, &copy).map_err(|e| {
                    anyhow::anyhow!("copying the audit log {}: {e}", audit_log.display())
                })?;
            }
            println!(
                "backup in {}: {} blobs, {} copied ({} bytes)",
                dir.display(),
                report.blobs,
                report.blobs_copied,
                report.bytes_copied
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            node: args,
            dir,
            force,
        } => {
            let config = args.resolve()?;
            // Not under a running node: it would serve the index being
            // replaced.
            let _lock = huren::node::DataDirLock::acquire(&config.data_dir)?;
            let report = huren::backup::restore(&config, &dir, force, true).await?;
            println!(
                "restored from {}: {} blobs ({} copied into the store); run huren verify",
                dir.display(),
                report.blobs,
                report.blobs_copied
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Registry(cmd) => registry(cmd).await,
        Command::Recognition { command } => recognition(command),
        Command::Verify {
            node: args,
            remove_orphans,
            orphan_grace_secs,
            reindex,
            metrics_file,
        } => {
            let metrics = huren::metrics::install(huren::metrics::Process::Verify);
            let config = args.resolve()?;
            let ingest = node::open_ingest(&config).await?;
            let options = verify::Options {
                remove_orphans,
                orphan_grace: Duration::from_secs(orphan_grace_secs),
                reindex,
                progress: true,
            };
            let report = verify::run(&ingest, &options).await?;
            if let Some(path) = &metrics_file {
                huren::metrics::write_textfile(&metrics, path)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            println!(
                "blobs verified: {} ({} bytes)",
                report.blobs_checked, report.bytes_checked
            );
            if reindex {
                println!("blobs reindexed: {}", report.reindexed);
            }
            for (hash, why) in &report.unindexable {
                println!("unindexable: {hash}: {why}");
            }
            for hash in &report.missing {
                println!("missing: {hash}");
            }
            for hash in &report.corrupt {
                println!("corrupt: {hash}");
            }
            println!("missing: {}", report.missing.len());
            println!("corrupt: {}", report.corrupt.len());
            println!(
                "orphans: {} (not errors: blobs of instances never acknowledged){}",
                report.orphans.len(),
                if remove_orphans {
                    format!("; removed {}", report.orphans_removed)
                } else {
                    String::new()
                }
            );
            ingest.index().close().await;
            Ok(if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn recognition(command: RecognitionCommand) -> anyhow::Result<ExitCode> {
    match command {
        RecognitionCommand::CheckList { file } => match huren::recognition::load(&file) {
            Ok(list) => {
                println!(
                    "{}: valid: version {}, {} items, {} rules, {} reasons, content hash {}",
                    file.display(),
                    list.meta.version,
                    list.items.len(),
                    list.rules.len(),
                    list.reasons.len(),
                    list.content_hash
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(errors) => {
                println!("{errors}");
                Ok(ExitCode::from(1))
            }
        },
        RecognitionCommand::ImportCsv { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            print!(
                "{}",
                huren::recognition::import_csv(&text).map_err(anyhow::Error::msg)?
            );
            Ok(ExitCode::SUCCESS)
        }
        RecognitionCommand::Classify {
            list,
            hospital_id,
            format,
            paths,
        } => {
            let path = list.unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("deploy/recognition/jiangsu-example.toml")
            });
            let list = huren::recognition::load(&path).map_err(anyhow::Error::msg)?;
            for line in huren::publish::classify_files(&list, hospital_id.as_deref(), &paths)? {
                if format == "text" {
                    print!("{}", classification_text(&list, &line));
                } else {
                    println!("{line}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One study's classification (a JSON line of `classify_files`) for a
/// person: each item with its name, confidence, contrast, side and views,
/// then the evidence, one attribute a line, with how many series and
/// instances show it; or why the study has no item.
fn classification_text(list: &huren::recognition::list::RecognitionList, line: &str) -> String {
    use std::fmt::Write;
    let v: serde_json::Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(_) => return format!("{line}\n"),
    };
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let mut out = String::new();
    if let Some(error) = v.get("error") {
        let _ = writeln!(out, "{}: {}", s(&v["file"]), s(error));
        return out;
    }
    let _ = writeln!(out, "study {}", s(&v["study_instance_uid"]));
    let items = v["items"].as_array().cloned().unwrap_or_default();
    for item in &items {
        let code = s(&item["code"]);
        let name = list
            .item(&code)
            .map(|i| i.name_zh.clone())
            .unwrap_or_default();
        let _ = write!(out, "  {code} {name}: {}", s(&item["confidence"]));
        if let Some(c) = item["contrast"].as_str() {
            let _ = write!(out, ", contrast {c}");
        }
        if let Some(l) = item["laterality"].as_str() {
            let _ = write!(out, ", side {l}");
        }
        let views: Vec<String> = item["views"]
            .as_array()
            .map(|a| a.iter().map(s).collect())
            .unwrap_or_default();
        if !views.is_empty() {
            let _ = write!(out, ", views {}", views.join(" "));
        }
        out.push('\n');
        {
            for d in item["doubts"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "    doubt: {}",
                    d.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| d.to_string())
                );
            }
        }
        for e in item["evidence"].as_array().into_iter().flatten() {
            let count = |k: &str| e[k].as_array().map_or(0, Vec::len);
            let mut whence = Vec::new();
            if count("series") > 0 {
                whence.push(format!("{} series", count("series")));
            }
            if count("instances") > 0 {
                whence.push(format!("{} instances", count("instances")));
            }
            let _ = writeln!(
                out,
                "    {} = {:?}{}",
                s(&e["attribute"]),
                s(&e["value"]),
                if whence.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", whence.join(", "))
                }
            );
        }
    }
    if items.is_empty() {
        let why = match &v["unclassified"] {
            serde_json::Value::Null => "no item".to_string(),
            serde_json::Value::String(r) => r.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(out, "  no item: {why}");
    }
    out
}

fn cli_audit(action: &'static str, detail: String) -> AuditRecord {
    AuditRecord {
        actor: "admin".into(),
        user_id: format!(
            "cli:{}",
            std::env::var("USER").unwrap_or_else(|_| "unknown".into())
        ),
        action,
        patient_key: None,
        purpose: None,
        records_returned: 0,
        outcome: "ok".into(),
        detail,
    }
}

fn parse_fields(fields: &HospitalFields) -> anyhow::Result<HospitalUpdate> {
    let level = match &fields.level {
        Some(l) => Some(Level::parse(l).ok_or_else(|| {
            anyhow::anyhow!("--level {l:?}: use 三级甲等 三级乙等 三级 二级甲等 二级乙等 二级 一级 or 3A 3B 3 2A 2B 2 1")
        })?),
        None => None,
    };
    let qc_status =
        match &fields.qc_status {
            Some(q) => Some(QcStatus::parse(q).ok_or_else(|| {
                anyhow::anyhow!("--qc-status {q:?}: use pending, passed or failed")
            })?),
            None => None,
        };
    Ok(HospitalUpdate {
        name: fields.name.clone(),
        level,
        groups: fields.groups.clone().map(|g| {
            g.into_iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect()
        }),
        accepts_lower_level_results: fields.accepts_lower_level_results,
        qc_status,
        dicomweb_base_url: fields.dicomweb_base_url.clone(),
        rotate_token: false,
    })
}

fn give_token(token: &str, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    match file {
        Some(path) => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot write {}", path.display()))?;
            writeln!(f, "{token}")?;
            eprintln!("token written to {}", path.display());
        }
        None => println!("token: {token}"),
    }
    Ok(())
}

async fn registry(cmd: RegistryCommand) -> anyhow::Result<ExitCode> {
    let Some(sub) = cmd.command else {
        let args = cmd.args;
        let listener = TcpListener::bind(args.listen())
            .await
            .with_context(|| format!("cannot listen on {}", args.listen()))?;
        let shutdown = CancellationToken::new();
        let signals = StopSignals::install().context("signal handlers")?;
        let mut server = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { huren::registry::run(listener, &args, shutdown).await }
        });
        tokio::select! {
            _ = signals.wait() => {
                tracing::info!("registry shutting down");
                shutdown.cancel();
                (&mut server).await??;
            }
            result = &mut server => result??,
        }
        return Ok(ExitCode::SUCCESS);
    };
    match sub {
        RegistrySub::RecognitionList { registry, file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let db = Db::open(&registry.database_url()).await?;
            let by = format!(
                "cli:{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into())
            );
            let result = db.activate_list(&text, &by).await;
            db.close().await;
            match result {
                Ok(activated) => println!("{}", serde_json::to_string(&activated)?),
                Err(huren::registry::db::Error::Invalid(errors)) => {
                    for e in errors.lines() {
                        println!("{}:{e}", file.display());
                    }
                    println!("not activated: the active list stays");
                    return Ok(ExitCode::from(1));
                }
                Err(e) => return Err(e.into()),
            }
        }
        RegistrySub::Federation { command } => match command {
            FederationCommand::Keygen { key_file } => {
                let public = huren::registry::federation::generate_key(&key_file)
                    .map_err(anyhow::Error::msg)?;
                println!("{public}");
            }
            FederationCommand::PublicKey { key_file } => {
                let public = huren::registry::federation::public_key_of(&key_file)
                    .map_err(anyhow::Error::msg)?;
                println!("{public}");
            }
            FederationCommand::Check { config } => {
                match huren::registry::federation::Federation::load(&config) {
                    Ok(f) => println!(
                        "{}: federation {}, member {} ({}), {} other members, consent policy {}, deadline {} ms, list {}",
                        config.display(),
                        f.name,
                        f.member_id,
                        f.province,
                        f.members.len(),
                        f.consent_policy.as_str(),
                        f.deadline.as_millis(),
                        f.list.content_hash
                    ),
                    Err(e) => {
                        println!("{}: {e}", config.display());
                        return Ok(ExitCode::from(1));
                    }
                }
            }
        },
        RegistrySub::Hospital { command } => match command {
            HospitalCommand::Add {
                registry,
                id,
                fields,
            } => {
                let db = Db::open(&registry.database_url()).await?;
                let u = parse_fields(&fields)?;
                let new = NewHospital {
                    hospital_id: id.trim().to_string(),
                    name: u
                        .name
                        .clone()
                        .ok_or_else(|| anyhow::anyhow!("--name is required"))?,
                    level: u
                        .level
                        .ok_or_else(|| anyhow::anyhow!("--level is required"))?,
                    groups: u.groups.clone().unwrap_or_default(),
                    accepts_lower_level_results: u.accepts_lower_level_results.unwrap_or(false),
                    qc_status: u.qc_status.unwrap_or(QcStatus::Passed),
                    dicomweb_base_url: u.dicomweb_base_url.clone(),
                };
                let (token, sha) = huren::registry::server::new_hospital_token(&new.hospital_id);
                let h = db
                    .add_hospital(
                        &new,
                        &sha,
                        cli_audit(
                            "hospital_add",
                            format!("hospital {} level {}", new.hospital_id, new.level.name()),
                        ),
                    )
                    .await?;
                println!("{}", serde_json::to_string(&h)?);
                give_token(&token, fields.token_file.as_deref())?;
                db.close().await;
            }
            HospitalCommand::List { registry } => {
                let db = Db::open(&registry.database_url()).await?;
                for h in db.hospitals().await? {
                    println!("{}", serde_json::to_string(&h)?);
                }
                db.close().await;
            }
            HospitalCommand::Set {
                registry,
                id,
                fields,
                rotate_token,
            } => {
                let db = Db::open(&registry.database_url()).await?;
                let mut u = parse_fields(&fields)?;
                u.rotate_token = rotate_token;
                let token = rotate_token.then(|| huren::registry::server::new_hospital_token(&id));
                let h = db
                    .update_hospital(
                        &id,
                        &u,
                        token.as_ref().map(|(_, sha)| sha.as_str()),
                        cli_audit(
                            "hospital_set",
                            format!("hospital {id}: {}", serde_json::to_string(&u)?),
                        ),
                    )
                    .await?;
                println!("{}", serde_json::to_string(&h)?);
                if let Some((token, _)) = token {
                    give_token(&token, fields.token_file.as_deref())?;
                }
                db.close().await;
            }
        },
        RegistrySub::Audit { command } => match command {
            AuditCommand::Verify { registry } => {
                let db = Db::open(&registry.database_url()).await?;
                let result = db.verify_audit().await?;
                db.close().await;
                return Ok(match result {
                    Ok(n) => {
                        println!("audit chain intact: {n} entries");
                        ExitCode::SUCCESS
                    }
                    Err((seq, why)) => {
                        println!("audit chain broken at entry {seq}: {why}");
                        ExitCode::from(1)
                    }
                });
            }
            AuditCommand::Export {
                registry,
                format,
                after_seq,
            } => {
                anyhow::ensure!(
                    format == "jsonl" || format == "csv",
                    "--format {format:?}: use jsonl or csv"
                );
                let db = Db::open(&registry.database_url()).await?;
                let mut after = after_seq;
                let mut out = std::io::stdout().lock();
                use std::io::Write;
                if format == "csv" {
                    out.write_all(huren::registry::AUDIT_CSV_HEADER.as_bytes())?;
                }
                loop {
                    let page = db.audit_page(after, 5000).await?;
                    let text = if format == "csv" {
                        huren::registry::audit_csv(&page.entries)
                            .split_once('\n')
                            .map(|(_, rest)| rest.to_string())
                            .unwrap_or_default()
                    } else {
                        huren::registry::audit_jsonl(&page.entries)
                    };
                    out.write_all(text.as_bytes())?;
                    match page.next_after_seq {
                        Some(n) => after = n,
                        None => break,
                    }
                }
                db.close().await;
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, caught from the moment this is made: made before
/// a server starts, so that a stop sent as soon as it listens (systemd
/// stopping a unit just started) is a clean shutdown, not the signal's
/// default of ending the process on the spot.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<StopSignals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                term: signal(SignalKind::terminate())?,
                interrupt: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
