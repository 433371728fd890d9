//! `huren node`: wires the blob store, the index, the ingest path, the
//! DICOM server and the HTTP server together. The caller binds the sockets
//! (`main` from config, tests on port 0), so the same startup runs in both.

use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::dicom::{self, DicomContext};
use crate::http::{self, AppState};
use crate::index::{self, Index};
use crate::ingest::Ingest;
use crate::storage::{self, BlobStore};

#[derive(Debug, Error)]
pub enum StartError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("blob store: {0}")]
    Storage(#[from] storage::Error),
    #[error("index: {0}")]
    Index(#[from] index::Error),
    #[error("recognition list: {0}")]
    Recognition(String),
}

/// Opens the blob store and the index the configuration names.
pub async fn open_ingest(config: &NodeConfig) -> Result<Ingest, StartError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    let store = BlobStore::open(&config.storage, &config.data_dir, config.durability)?;
    let index = Index::open(&config.database_url, config.durability).await?;
    Ok(Ingest::new(Arc::new(store), index))
}

/// A running node.
pub struct Node {
    pub ingest: Ingest,
    pub dicom_addr: std::net::SocketAddr,
    pub http_addr: std::net::SocketAddr,
    /// The node's part in the region, when configured.
    pub region: Option<Arc<crate::publish::Region>>,
    dicom_task: JoinHandle<()>,
    http_task: JoinHandle<std::io::Result<()>>,
    region_tasks: Vec<JoinHandle<()>>,
}

impl Node {
    pub async fn start(
        config: &NodeConfig,
        dicom_listener: TcpListener,
        http_listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<Node, StartError> {
        let ingest = open_ingest(config).await?;
        let dicom_addr = dicom_listener.local_addr().map_err(storage::Error::Io)?;
        let http_addr = http_listener.local_addr().map_err(storage::Error::Io)?;
        let region = match config.region.clone() {
            Some(region) => Some(
                crate::publish::Region::new(
                    ingest.index().clone(),
                    ingest.store().clone(),
                    region,
                    &config.data_dir,
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
        let dicom_task = tokio::spawn(dicom::listener::run(dicom_listener, ctx, shutdown.clone()));
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
            shutdown.clone(),
        ));
        let http_task = tokio::spawn(http::run(http_listener, state, shutdown));
        tracing::info!(ae_title = %config.ae_title, "DICOM listening on {dicom_addr}");
        tracing::info!("HTTP listening on {http_addr}");
        Ok(Node {
            ingest,
            dicom_addr,
            http_addr,
            dicom_task,
            http_task,
            region,
            region_tasks,
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
        for task in self.region_tasks {
            let _ = task.await;
        }
        self.ingest.index().close().await;
    }
}
