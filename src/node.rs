//! `huren node`: wires the blob store, the index, the ingest path, the
//! DICOM server and the HTTP server together. The caller binds the sockets
//! (`main` from config, tests on port 0), so the same startup runs in both.

use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Durability, NodeConfig};
use crate::dicom::{self, DicomContext};
use crate::http::{self, AppState};
use crate::index::{self, CommitSync, Index};
use crate::ingest::Ingest;
use crate::storage::{self, BlobStore};

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// Another process (a running node, a restore) holds the data
    /// directory's lock.
    #[error(
        "data directory {path} is in use by another huren process{}: one node per data directory",
        pid.as_deref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    DataDirInUse {
        path: std::path::PathBuf,
        pid: Option<String>,
    },
    #[error("cannot lock data directory {path}")]
    DataDirLock {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
    #[error("index: {0}")]
    Index(#[from] index::Error),
    /// The SQLite index's file or directory (not the blob store's).
    #[error("index database file {path}")]
    IndexFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("recognition list: {0}")]
    Recognition(String),
    #[error("recovery at start: {0}")]
    Recovery(String),
    #[error("audit log: {0}")]
    Audit(String),
}

/// The data directory's lock: `<data_dir>/node.lock`, held with an
/// exclusive `flock(2)` for as long as a node (or a restore) runs. Two
/// nodes on one data directory would each recover, collect and index the
/// other's half-written work; the second is refused at start instead. The
/// kernel lets go of the lock when the process ends, kill -9 included, so
/// a crash never leaves it stale. `verify` and `backup` read beside a
/// running node and take no lock.
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &std::path::Path) -> Result<DataDirLock, StartError> {
        use std::io::{Read, Seek, Write};
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        private_dir(data_dir).map_err(|source| StartError::DataDir {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let path = data_dir.join("node.lock");
        let failed = |source| StartError::DataDirLock {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(failed)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(StartError::DataDirInUse {
                    path: data_dir.to_path_buf(),
                    pid: (!pid.is_empty()).then(|| pid.to_string()),
                });
            }
            return Err(failed(error));
        }
        // Who holds it, for the message the next one gets.
        file.set_len(0).map_err(failed)?;
        file.rewind().map_err(failed)?;
        writeln!(file, "{}", std::process::id()).map_err(failed)?;
        Ok(DataDirLock { _file: file })
    }
}

/// Opens the blob store and the index the configuration names.
pub async fn open_ingest(config: &NodeConfig) -> Result<Ingest, StartError> {
    private_dir(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = BlobStore::open(&config.storage, &config.data_dir, config.durability)?;
    // Full durability on local files with a SQLite index: one syncfs covers
    // the blob and the index's WAL, so commits need no fsync of their own
    // (crate::ingest orders the steps, crate::recovery repairs what a crash
    // between commit and flush can leave).
    let sqlite_path = sqlite_file(&config.database_url);
    let commit_sync = match (&sqlite_path, config.durability) {
        (Some(path), Durability::Full) if store.ack_waits_for_flush() => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
            let dir = dir.unwrap_or(std::path::Path::new("."));
            std::fs::create_dir_all(dir).map_err(|source| StartError::IndexFile {
                path: dir.to_path_buf(),
                source,
            })?;
            store.flush_also(dir)?;
            CommitSync::Deferred
        }
        (_, Durability::Full) => CommitSync::EveryCommit,
        (_, Durability::Relaxed) => CommitSync::Deferred,
    };
    if let Some(path) = &sqlite_path {
        // SQLite gives its -wal and -shm files the database file's mode.
        private_file(path).map_err(|source| StartError::IndexFile {
            path: path.to_path_buf(),
            source,
        })?;
    }
    let index = Index::open(&config.database_url, commit_sync).await?;
    let notes = crate::lifecycle::RejectionNotes {
        index: index.clone(),
        senders: crate::iocm::RejectionSenders::new(config.rejection_note_senders()),
    };
    Ok(Ingest::new(Arc::new(store), index).with_rejection_handler(Arc::new(notes)))
}

/// Creates `dir` (and its parents) 0700, and narrows it to 0700 if it
/// exists: the data directory holds the index (names, IDs, birth dates,
/// sessions, password hashes) and the blobs (issue 22). The umask set in
/// main.rs does the same for everything created below it.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Creates the SQLite index file 0600 before SQLite does (its own default is
/// 0644 less the umask), and narrows an existing one to 0600.
fn private_file(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        match std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The database file of a `sqlite:` URL.
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//").split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// A running node.
pub struct Node {
    pub ingest: Ingest,
    pub dicom_addr: std::net::SocketAddr,
    pub http_addr: std::net::SocketAddr,
    /// The DICOM TLS listener's address, when configured.
    pub dicom_tls_addr: Option<std::net::SocketAddr>,
    /// The node's part in the region, when configured.
    pub region: Option<Arc<crate::publish::Region>>,
    dicom_task: JoinHandle<()>,
    tls_tasks: Vec<JoinHandle<()>>,
    http_task: JoinHandle<std::io::Result<()>>,
    region_tasks: Vec<JoinHandle<()>>,
    sweeper: JoinHandle<()>,
    audit: crate::audit::Audit,
    /// Held until the node is dropped (after `wait`).
    _lock: DataDirLock,
}

impl Node {
    pub async fn start(
        config: &NodeConfig,
        dicom_listener: TcpListener,
        http_listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Node, StartError> {
        crate::metrics::install(crate::metrics::Process::Node);
        crate::metrics::register_durability(config.durability.as_str());
        let lock = DataDirLock::acquire(&config.data_dir)?;
        let ingest = open_ingest(config).await?;
        // Before the first association is accepted: the listeners' sockets
        // are bound, but nothing is read from them until the tasks below.
        crate::recovery::recover(&ingest, config.gc_grace)
            .await
            .map_err(|e| StartError::Recovery(e.to_string()))?;
        let sweeper =
            crate::recovery::spawn_sweeper(ingest.clone(), config.flush_interval, shutdown.clone());
        let audit = crate::audit::Audit::open(config).map_err(StartError::Audit)?;
        let dicom_addr = dicom_listener.local_addr().map_err(storage::Error::Io)?;
        let http_addr = http_listener.local_addr().map_err(storage::Error::Io)?;
        let tls = NodeTls::open(config).await.map_err(StartError::Tls)?;
        let region = match config.region.clone() {
            Some(region) => Some(
                crate::publish::Region::new(
                    ingest.index().clone(),
                    ingest.store().clone(),
                    region,
                    &config.data_dir,
                    config.tls_ca_file.as_deref(),
                )
                .map_err(StartError::Recognition)?,
            ),
            None => None,
        };
        if let Some(r) = &region {
            r.set_ingest(ingest.clone());
        }
        let mut dicom_context = DicomContext::new(config, ingest.clone());
        dicom_context.region = region.clone();
        dicom_context.audit = audit.clone();
        let ctx = Arc::new(dicom_context);
        let region_tasks = match &region {
            Some(r) => {
                tracing::info!(
                    hospital_id = %r.config().hospital_id,
                    registry = %r.config().registry_url,
                    "publishing to the regional registry"
                );
                r.spawn(shutdown.clone())
            }
            None => Vec::new(),
        };
        let dicom_task = tokio::spawn(dicom::listener::run(
            dicom_listener,
            ctx.clone(),
            shutdown.clone(),
        ));
        let state = Arc::new(AppState {
            ae_title: config.ae_title.to_string(),
            ingest: ingest.clone(),
            dicomweb: config.dicomweb.clone(),
            match_options: crate::query::MatchOptions {
                case_insensitive_names: config.case_insensitive_names,
                fuzzy_names: false,
                max_matches: Some(config.max_query_matches),
            },
            region: region.clone(),
            audit: audit.clone(),
            started: Default::default(),
            viewer_dir: config.viewer_dir(),
            viewer_rendering: config.viewer_rendering,
        });
        let mut region_tasks = region_tasks;
        region_tasks.extend(crate::lifecycle::spawn(
            ingest.clone(),
            region.clone(),
            config
                .retention_days
                .map(|days| crate::lifecycle::Retention { days }),
            config.gc_interval.map(|_| crate::gc::Options {
                grace: config.gc_grace,
                progress: false,
            }),
            // Retention alone runs hourly.
            config
                .gc_interval
                .unwrap_or(std::time::Duration::from_secs(3600)),
            audit.clone(),
            shutdown.clone(),
        ));
        let started = state.started.clone();
        let https = tls.is_some();
        let dicom_tls_addr = tls.as_ref().and_then(|t| t.dicom_addr());
        let http_listener = NodeTls::http_listener(tls.as_ref(), http_listener);
        let http_task = tokio::spawn(http::run(http_listener, state.clone(), shutdown.clone()));
        let tls_tasks = match tls {
            Some(tls) => tls.spawn(ctx, state, shutdown),
            None => Vec::new(),
        };
        tracing::info!(ae_title = %config.ae_title, "DICOM listening on {dicom_addr}");
        tracing::info!(
            "HTTP listening on {http_addr}{}",
            if https { " (HTTPS)" } else { "" }
        );
        audit.application_start();
        started.store(true, std::sync::atomic::Ordering::Release);
        Ok(Node {
            ingest,
            dicom_addr,
            http_addr,
            dicom_tls_addr,
            dicom_task,
            tls_tasks,
            http_task,
            region,
            region_tasks,
            sweeper,
            audit,
            _lock: lock,
        })
    }

    /// Waits for both servers to stop (after the shutdown token fires).
    pub async fn wait(self) {
        let _ = self.dicom_task.await;
        match self.http_task.await {
            Ok(Err(e)) => tracing::error!(error = %e, "HTTP server failed"),
            Err(e) => tracing::error!(error = %e, "HTTP server task failed"),
            Ok(Ok(())) => {}
        }
        for task in self.tls_tasks {
            let _ = task.await;
        }
        for task in self.region_tasks {
            let _ = task.await;
        }
        let _ = self.sweeper.await;
        if let Err(e) = crate::recovery::sweep(&self.ingest).await {
            tracing::warn!(error = %e, "final flush at stop failed; the next start checks the rows");
        }
        self.audit.application_stop().await;
        self.ingest.index().close().await;
    }
}

/// The node's own TLS, opened from its config: the certificate shared by
/// HTTPS and the DICOM TLS listener, and the listeners TLS adds.
pub struct NodeTls {
    resolver: Arc<crate::tls::CertificateResolver>,
    https: Arc<rustls::ServerConfig>,
    dicom: Option<(Arc<crate::dicom::tls::DicomTls>, TcpListener)>,
    http_plain: Option<TcpListener>,
}

impl NodeTls {
    /// Reads the certificates and binds the DICOM TLS and loopback
    /// plain-HTTP listeners the config names. These optional listeners
    /// are bound here rather than by the caller so that `Node::start`
    /// keeps one signature; the addresses they got are logged.
    pub async fn open(config: &crate::config::NodeConfig) -> Result<Option<NodeTls>, String> {
        let Some(tls) = &config.server_tls else {
            return Ok(None);
        };
        let resolver =
            crate::tls::CertificateResolver::load(&tls.certificate_file, &tls.private_key_file)?;
        let https = crate::tls::https_config(resolver.clone())?;
        let dicom = match config.dicom_tls_listen {
            Some(addr) => {
                let dicom_tls = crate::dicom::tls::DicomTls::new(tls, resolver.clone())?;
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen for DICOM TLS on {addr}: {e}"))?;
                Some((dicom_tls, listener))
            }
            None => None,
        };
        let http_plain = match config.http_plain_listen {
            Some(addr) => {
                crate::tls::require_loopback(addr, "http_plain_listen")?;
                Some(
                    TcpListener::bind(addr)
                        .await
                        .map_err(|e| format!("cannot listen for plain HTTP on {addr}: {e}"))?,
                )
            }
            None => None,
        };
        Ok(Some(NodeTls {
            resolver,
            https,
            dicom,
            http_plain,
        }))
    }

    /// The node's HTTP port: HTTPS when TLS is configured.
    pub fn http_listener(tls: Option<&NodeTls>, listener: TcpListener) -> crate::tls::HttpListener {
        match tls {
            Some(tls) => crate::tls::HttpListener::tls(listener, tls.https.clone()),
            None => listener.into(),
        }
    }

    /// The address of the DICOM TLS listener, if there is one.
    pub fn dicom_addr(&self) -> Option<std::net::SocketAddr> {
        self.dicom
            .as_ref()
            .and_then(|(_, listener)| listener.local_addr().ok())
    }

    /// Serves the DICOM TLS and plain-HTTP listeners until shutdown, and
    /// reloads the certificates on SIGHUP.
    pub fn spawn(
        self,
        ctx: Arc<crate::dicom::DicomContext>,
        state: Arc<crate::http::AppState>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut reload: Vec<Arc<dyn crate::tls::Reload>> = vec![self.resolver.clone()];
        if let Some((dicom_tls, _)) = &self.dicom {
            reload.push(dicom_tls.clone());
        }
        // Before the listeners are announced: SIGHUP's default action is
        // to end the process.
        crate::tls::spawn_reload_on_sighup(reload, shutdown.clone());
        let mut tasks = Vec::new();
        if let Some((dicom_tls, listener)) = self.dicom {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(ae_title = %ctx.ae_title, "DICOM TLS listening on {addr}");
            }
            tasks.push(tokio::spawn(crate::dicom::listener::run_tls(
                listener,
                ctx,
                dicom_tls,
                shutdown.clone(),
            )));
        }
        if let Some(listener) = self.http_plain {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!("loopback plain HTTP on {addr}");
            }
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = crate::http::run(listener.into(), state, shutdown).await {
                    tracing::error!(error = %e, "plain HTTP server failed");
                }
            }));
        }
        tasks
    }
}
