//! `huren backup DIR` and `huren restore DIR`.
//!
//! A backup is a directory:
//! - `index.sqlite` (SQLite: `VACUUM INTO`, a consistent copy taken inside
//!   one read transaction while the node goes on ingesting), or
//!   `index.pgdump` (PostgreSQL: `pg_dump --format=custom`, one
//!   repeatable-read snapshot; pg_dump must be on the PATH);
//! - `blobs/ab/<hash>`: every blob the index copy names. Blobs are immutable
//!   and content-addressed, so a blob already in DIR is never copied again:
//!   a second backup to the same DIR copies only the new ones;
//! - `manifest.tsv`: the blobs of this backup (hash, size), and
//!   `backup.json`: when, which index, how many.
//!
//! The index is copied first and the blobs after: every row of the copy
//! was committed after its blob was durable (the ingest invariant), so every
//! blob it names exists when the blobs are copied. Each blob is hashed on
//! the way out (and on the way back in at restore): a backup never carries
//! a corrupt blob silently.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sqlx::{Connection, Row};
use thiserror::Error;

use crate::config::NodeConfig;
use crate::index::Dialect;
use crate::ingest::Ingest;
use crate::progress::Progress;
use crate::storage::{self, BlobStore};
use crate::types::BlobHash;

#[derive(Debug, Error)]
pub enum Error {
    #[error("index: {0}")]
    Database(#[from] sqlx::Error),
    #[error("index: {0}")]
    Index(#[from] crate::index::Error),
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

const SQLITE_FILE: &str = "index.sqlite";
const PGDUMP_FILE: &str = "index.pgdump";
const MANIFEST_FILE: &str = "manifest.tsv";
const INFO_FILE: &str = "backup.json";

#[derive(Debug, Serialize, Deserialize)]
pub struct BackupInfo {
    pub created_at: String,
    /// `sqlite` or `postgres`.
    pub index: String,
    pub blobs: u64,
    pub bytes: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub blobs: u64,
    pub blobs_copied: u64,
    pub bytes_copied: u64,
}

/// The file of a `sqlite:` database URL.
pub fn sqlite_path(database_url: &str) -> Option<PathBuf> {
    let rest = database_url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//").split('?').next()?;
    (!path.is_empty()).then(|| PathBuf::from(path))
}

fn blob_file(dir: &Path, hash: &BlobHash) -> PathBuf {
    dir.join("blobs").join(BlobStore::key(hash).as_ref())
}

/// Takes an online backup of the node's index and blobs into `dir`.
pub async fn backup(
    ingest: &Ingest,
    database_url: &str,
    dir: &Path,
    progress: bool,
) -> Result<BackupReport, Error> {
    std::fs::create_dir_all(dir.join("blobs")).map_err(io(dir))?;
    let index = ingest.index();
    let (kind, hashes) = match index.dialect() {
        Dialect::Sqlite => {
            let partial = dir.join(format!("{SQLITE_FILE}.partial"));
            let _ = std::fs::remove_file(&partial);
            let target = partial
                .to_str()
                .ok_or_else(|| Error::Invalid("backup directory is not UTF-8".into()))?
                .replace('\'', "''");
            // One read transaction: the copy is the index as of one commit,
            // while the writer goes on (WAL).
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM INTO '{target}'")))
                .execute(index.pool())
                .await?;
            let hashes = snapshot_hashes(&partial).await?;
            std::fs::File::open(&partial)
                .and_then(|f| f.sync_all())
                .map_err(io(&partial))?;
            let file = dir.join(SQLITE_FILE);
            std::fs::rename(&partial, &file).map_err(io(&file))?;
            ("sqlite", hashes)
        }
        Dialect::Postgres => {
            let partial = dir.join(format!("{PGDUMP_FILE}.partial"));
            let status = tokio::process::Command::new("pg_dump")
                .arg("--format=custom")
                .arg("--file")
                .arg(&partial)
                .arg(database_url)
                .status()
                .await
                .map_err(|e| {
                    Error::Invalid(format!(
                        "cannot run pg_dump ({e}); install the PostgreSQL client of the \
                         server's version, or back the database up with your own \
                         pg_dump / base backup + WAL archive (docs/operations.md)"
                    ))
                })?;
            if !status.success() {
                return Err(Error::Invalid(format!("pg_dump failed: {status}")));
            }
            // The dump is one snapshot; the rows it holds were committed
            // before it began, so the blobs the live index names now are a
            // superset of what it needs (less any deleted and collected
            // since: the collector's grace period covers a backup's run).
            let hashes: Vec<BlobHash> = index.blob_hashes().await?.into_iter().collect();
            let file = dir.join(PGDUMP_FILE);
            std::fs::rename(&partial, &file).map_err(io(&file))?;
            ("postgres", hashes)
        }
    };

    let store = ingest.store();
    let bar = if progress {
        Progress::new("backup", hashes.len() as u64, "blobs")
    } else {
        Progress::hidden()
    };
    let mut report = BackupReport {
        blobs: hashes.len() as u64,
        ..Default::default()
    };
    let mut manifest = String::new();
    let mut total_bytes = 0u64;
    for hash in &hashes {
        let dest = blob_file(dir, hash);
        let size = match std::fs::metadata(&dest) {
            Ok(meta) => meta.len(),
            Err(_) => {
                let parent = dest.parent().expect("blob file has a parent");
                std::fs::create_dir_all(parent).map_err(io(parent))?;
                let temp = tempfile::Builder::new()
                    .prefix(".partial-")
                    .tempfile_in(parent)
                    .map_err(io(parent))?
                    .into_temp_path();
                // Hash-checked on the way.
                store.copy_to_file(hash, &temp).await?;
                std::fs::File::open(&temp)
                    .and_then(|f| f.sync_all())
                    .map_err(io(&temp))?;
                temp.persist(&dest).map_err(|e| Error::Io {
                    path: dest.clone(),
                    source: e.error,
                })?;
                let size = std::fs::metadata(&dest).map_err(io(&dest))?.len();
                report.blobs_copied += 1;
                report.bytes_copied += size;
                size
            }
        };
        total_bytes += size;
        manifest.push_str(&format!("{}\t{size}\n", hash.to_hex()));
        bar.inc(1, size);
    }
    bar.finish();
    let manifest_path = dir.join(MANIFEST_FILE);
    std::fs::write(&manifest_path, manifest).map_err(io(&manifest_path))?;
    let info = BackupInfo {
        created_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        index: kind.to_string(),
        blobs: report.blobs,
        bytes: total_bytes,
    };
    let info_path = dir.join(INFO_FILE);
    std::fs::write(
        &info_path,
        serde_json::to_vec_pretty(&info).expect("backup info serialises"),
    )
    .map_err(io(&info_path))?;
    Ok(report)
}

async fn snapshot_hashes(path: &Path) -> Result<Vec<BlobHash>, Error> {
    let url = format!("sqlite://{}?mode=ro", path.display());
    let mut conn = sqlx::AnyConnection::connect(&url).await?;
    let rows = sqlx::query("SELECT DISTINCT blob_hash FROM instance ORDER BY blob_hash")
        .fetch_all(&mut conn)
        .await?;
    conn.close().await?;
    rows.iter()
        .map(|r| {
            let hex: String = r.try_get(0)?;
            BlobHash::parse(&hex).map_err(|_| Error::Invalid(format!("bad blob hash {hex:?}")))
        })
        .collect()
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    pub blobs: u64,
    pub blobs_copied: u64,
}

/// Brings a stopped node's data back from a backup: the blobs first (each
/// one hashed again on the way in), then the index, so that an interrupted
/// restore never leaves a row without its blob. An existing SQLite index is
/// replaced only with `force`.
pub async fn restore(
    config: &NodeConfig,
    dir: &Path,
    force: bool,
    progress: bool,
) -> Result<RestoreReport, Error> {
    let info_path = dir.join(INFO_FILE);
    let info: BackupInfo =
        serde_json::from_slice(&std::fs::read(&info_path).map_err(io(&info_path))?)
            .map_err(|e| Error::Invalid(format!("{}: {e}", info_path.display())))?;
    let sqlite_target = sqlite_path(&config.database_url);
    match (info.index.as_str(), &sqlite_target) {
        ("sqlite", Some(target)) => {
            if target.exists() && !force {
                return Err(Error::Invalid(format!(
                    "{} exists: stop the node and give --force to replace it",
                    target.display()
                )));
            }
        }
        ("postgres", None) => {}
        (kind, _) => {
            return Err(Error::Invalid(format!(
                "the backup holds a {kind} index; the node is configured for {}",
                config.database_url.split(':').next().unwrap_or("?")
            )));
        }
    }

    std::fs::create_dir_all(&config.data_dir).map_err(io(&config.data_dir))?;
    let store = Arc::new(BlobStore::open(
        &config.storage,
        &config.data_dir,
        config.durability,
    )?);
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = std::fs::read_to_string(&manifest_path).map_err(io(&manifest_path))?;
    let hashes = manifest
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let hex = l.split('\t').next().unwrap_or("");
            BlobHash::parse(hex).map_err(|_| Error::Invalid(format!("manifest line {l:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bar = if progress {
        Progress::new("restore", hashes.len() as u64, "blobs")
    } else {
        Progress::hidden()
    };
    let mut report = RestoreReport {
        blobs: hashes.len() as u64,
        ..Default::default()
    };
    for hash in hashes {
        if store.last_modified(&hash).await?.is_some() {
            bar.inc(1, 0);
            continue;
        }
        let source = blob_file(dir, &hash);
        let staged = {
            let store = store.clone();
            let source = source.clone();
            tokio::task::spawn_blocking(move || -> Result<storage::Staged, Error> {
                use std::io::Read;
                let mut file = std::fs::File::open(&source).map_err(io(&source))?;
                let mut stage = store.stage_inline(&[])?;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = file.read(&mut buf).map_err(io(&source))?;
                    if n == 0 {
                        break;
                    }
                    stage.write(&buf[..n]).map_err(io(&source))?;
                }
                Ok(stage.finish())
            })
            .await
            .map_err(|e| Error::Invalid(e.to_string()))??
        };
        if staged.hash != hash {
            return Err(Error::Invalid(format!(
                "{} hashes to {}, not its name: the backup is damaged",
                source.display(),
                staged.hash
            )));
        }
        let size = staged.len;
        store.publish(staged).await?;
        report.blobs_copied += 1;
        bar.inc(1, size);
    }
    bar.finish();

    match sqlite_target {
        Some(target) => {
            if let Some(parent) = target.parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let partial = target.with_extension("sqlite.restore-partial");
            let source = dir.join(SQLITE_FILE);
            std::fs::copy(&source, &partial).map_err(io(&source))?;
            std::fs::File::open(&partial)
                .and_then(|f| f.sync_all())
                .map_err(io(&partial))?;
            // The WAL of the index being replaced must not be replayed
            // over the restored file.
            for suffix in ["-wal", "-shm"] {
                let mut side = target.clone().into_os_string();
                side.push(suffix);
                let _ = std::fs::remove_file(PathBuf::from(side));
            }
            std::fs::rename(&partial, &target).map_err(io(&target))?;
        }
        None => {
            let source = dir.join(PGDUMP_FILE);
            let status = tokio::process::Command::new("pg_restore")
                .args(["--clean", "--if-exists", "--no-owner", "--dbname"])
                .arg(&config.database_url)
                .arg(&source)
                .status()
                .await
                .map_err(|e| Error::Invalid(format!("cannot run pg_restore: {e}")))?;
            if !status.success() {
                return Err(Error::Invalid(format!("pg_restore failed: {status}")));
            }
        }
    }
    Ok(report)
}
