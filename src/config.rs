//! Node configuration: built-in defaults, then a TOML file, then environment
//! variables, then command-line flags, each overriding the one before.
//!
//! The defaults run a complete node with no file at all (local blob store and
//! SQLite under `./huren-data`), because the first thing a hospital IT team
//! does is start it and send it a study.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use thiserror::Error;

use crate::types::AeTitle;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("invalid setting {setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

/// When a C-STORE success is sent (PS3.4 B.2.3 leaves this to the SCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Success only after the blob is on stable storage (fsync of file and
    /// directory, or a completed S3 PUT) and the index transaction has
    /// committed with a synchronous WAL: survives kill -9 and power loss.
    Full,
    /// Success once the operating system has the bytes: survives a crash of
    /// the node process, not of the machine. For sites that rely on Storage
    /// Commitment for the formal promise.
    Relaxed,
}

/// How the served viewer (OHIF, through Cornerstone) draws its viewports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ViewerRendering {
    /// WebGL where the browser's WebGL is the GPU's, the CPU where it is
    /// software or missing (decided in the browser, src/http/viewer.rs).
    #[default]
    Auto,
    /// On the CPU, for workstations without a GPU (VDI, thin clients):
    /// there the browser's WebGL is itself software, and Cornerstone's pool
    /// of seven WebGL contexts alone takes about 1.5 s to create before the
    /// first image (docs/viewer.md).
    Cpu,
    /// WebGL, even where the viewer would fall back to the CPU.
    Webgl,
}

impl ViewerRendering {
    /// OHIF's `genericViewports.viewportRendering` value; `None` leaves
    /// OHIF's default.
    pub fn ohif_backend(self) -> Option<&'static str> {
        match self {
            ViewerRendering::Auto => None,
            ViewerRendering::Cpu => Some("cpu"),
            ViewerRendering::Webgl => Some("webgl"),
        }
    }
}

impl Durability {
    /// The mode's name, as configured and as the metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            Durability::Full => "full",
            Durability::Relaxed => "relaxed",
        }
    }
}

/// The staging directory's name under a local blob root: incoming
/// instances are written there before they are published into the store.
pub const STAGING_DIR: &str = ".staging";

/// Where blobs live. Each variant has an example in `storage-config/`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum StorageConfig {
    /// A directory on a local file system. The staging area for incoming
    /// instances is created inside it so that publishing a blob is a rename
    /// on one file system.
    Local {
        /// Defaults to `<data_dir>/blobs`.
        root: Option<PathBuf>,
    },
    /// Any S3-compatible server (Garage, MinIO, Ceph RGW, AWS).
    S3 {
        bucket: String,
        /// e.g. `http://127.0.0.1:3900`; unset means AWS itself.
        endpoint: Option<String>,
        /// Must equal the server's region (Garage: `s3_region`).
        region: String,
        /// Key prefix inside the bucket, so that several nodes or tests can
        /// share one bucket.
        #[serde(default)]
        prefix: String,
        /// Access key ID; falls back to `AWS_ACCESS_KEY_ID`.
        access_key_id: Option<String>,
        /// File holding the secret access key; falls back to
        /// `AWS_SECRET_ACCESS_KEY`. The secret itself never sits in a config
        /// file, so config files can be committed and shown.
        secret_access_key_file: Option<PathBuf>,
        /// Allow plain HTTP to the endpoint (loopback test servers).
        #[serde(default)]
        allow_http: bool,
    },
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig::Local { root: None }
    }
}

impl StorageConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }
}

/// A calling AE title allowed to store, optionally only from one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedPeer {
    pub ae_title: AeTitle,
    pub host: Option<IpAddr>,
}

impl AllowedPeer {
    /// `AE` or `AE@ip`.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "allowed_calling_ae_titles",
            reason,
        };
        let (ae, host) = match raw.rsplit_once('@') {
            Some((ae, host)) => {
                let ip = host
                    .parse::<IpAddr>()
                    .map_err(|e| invalid(format!("{raw:?}: host {host:?}: {e}")))?;
                (ae, Some(ip))
            }
            None => (raw, None),
        };
        let ae_title = AeTitle::parse(ae).map_err(|e| invalid(e.to_string()))?;
        Ok(AllowedPeer { ae_title, host })
    }

    pub fn admits(&self, calling_ae_title: &str, peer: IpAddr) -> bool {
        self.ae_title.as_str() == calling_ae_title.trim()
            && self.host.is_none_or(|host| host == peer)
    }
}

/// Another application entity the node knows by address: a workstation
/// that queries, a C-MOVE destination, a modality awaiting storage
/// commitment reports. The AE directory is the list of these
/// (`[[remote_ae]]` tables in the config file).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteAe {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// Associations the node requests to this AE use DICOM TLS (PS3.15
    /// B.1), verifying the AE's certificate against `tls_ca_file` and its
    /// host name (or IP address).
    #[serde(default)]
    pub tls: bool,
    /// May this AE query (C-FIND) when `query_retrieve_access = "listed"`.
    #[serde(default = "yes")]
    pub may_query: bool,
    /// May this AE retrieve (C-MOVE, C-GET) when `query_retrieve_access =
    /// "listed"`.
    #[serde(default = "yes")]
    pub may_retrieve: bool,
    /// May the node send instances to this AE as a C-MOVE destination.
    #[serde(default = "yes")]
    pub move_destination: bool,
}

fn yes() -> bool {
    true
}

impl RemoteAe {
    /// `AE@host:port`, with the default permissions and no TLS.
    pub fn parse(raw: &str) -> Result<RemoteAe, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            setting: "remote_aes",
            reason: format!("{raw:?}: {reason} (expected AE@host:port)"),
        };
        let (ae_title, address) = raw.split_once('@').ok_or_else(|| invalid("no @".into()))?;
        let (host, port) = address
            .rsplit_once(':')
            .ok_or_else(|| invalid("no :port".into()))?;
        let port: u16 = port.parse().map_err(|e| invalid(format!("port: {e}")))?;
        let ae_title = AeTitle::parse(ae_title).map_err(|e| invalid(e.to_string()))?;
        if host.is_empty() {
            return Err(invalid("no host".into()));
        }
        Ok(RemoteAe {
            ae_title: ae_title.as_str().to_string(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            tls: false,
            may_query: true,
            may_retrieve: true,
            move_destination: true,
        })
    }
}

/// Who may query and retrieve, once admitted to an association.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum QueryRetrieveAccess {
    /// Any calling AE the association policy admits: a closed network
    /// where `allowed_calling_ae_titles` is the gate.
    Any,
    /// Only AEs in the AE directory with `may_query` / `may_retrieve`: the
    /// default (issue 22), as Orthanc's: storing stays open to what the
    /// association policy admits, but a stranger's C-FIND would list every
    /// patient and its C-GET take their images.
    Listed,
}

/// The settings a TOML config file may hold. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    ae_title: Option<String>,
    dicom_listen: Option<SocketAddr>,
    http_listen: Option<SocketAddr>,
    dicom_port: Option<u16>,
    http_port: Option<u16>,
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    max_associations: Option<usize>,
    max_pdu_length: Option<u32>,
    artim_timeout_secs: Option<u64>,
    idle_timeout_secs: Option<u64>,
    flush_interval_secs: Option<u64>,
    durability: Option<Durability>,
    require_called_ae_title: Option<bool>,
    allowed_calling_ae_titles: Option<Vec<String>>,
    storage_config: Option<PathBuf>,
    storage: Option<StorageConfig>,
    remote_ae: Option<Vec<RemoteAe>>,
    query_retrieve_access: Option<QueryRetrieveAccess>,
    rejection_note_ae_titles: Option<Vec<String>>,
    max_query_matches: Option<usize>,
    case_insensitive_names: Option<bool>,
    retention_days: Option<u32>,
    gc_interval_secs: Option<u64>,
    gc_grace_secs: Option<u64>,
    tls_ca_file: Option<PathBuf>,
    tls_certificate_file: Option<PathBuf>,
    tls_private_key_file: Option<PathBuf>,
    dicom_tls_listen: Option<SocketAddr>,
    http_plain_listen: Option<SocketAddr>,
    server_tls: Option<crate::tls::ServerTlsConfig>,
    dicomweb: Option<DicomwebFileConfig>,
    region: Option<RegionFileConfig>,
    audit_log: Option<PathBuf>,
    audit_syslog_tls: Option<String>,
    audit_syslog_ca_file: Option<PathBuf>,
    viewer_dir: Option<PathBuf>,
    viewer_rendering: Option<ViewerRendering>,
}

/// The `[region]` table of a TOML config file: how the node takes part in
/// the regional registry. Secrets (the registry token, the region secret)
/// are named by file, never written into the config itself.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionFileConfig {
    registry_url: Option<String>,
    hospital_id: Option<String>,
    registry_token_file: Option<PathBuf>,
    region_secret_file: Option<PathBuf>,
    federation_secret_file: Option<PathBuf>,
    identifier_issuers: Option<Vec<String>>,
    study_quiet_secs: Option<f64>,
    publish_max_backoff_secs: Option<f64>,
    directory_interval_secs: Option<f64>,
    recognition_list_file: Option<PathBuf>,
    cfind_regional_priors: Option<bool>,
    ohif_url: Option<String>,
    peer_parallel: Option<usize>,
    peer_bandwidth: Option<u64>,
    peer_cache_budget_bytes: Option<u64>,
    prefetch_priors: Option<bool>,
}

/// Settings of the node's part in the region (src/publish.rs).
#[derive(Debug, Clone)]
pub struct RegionConfig {
    /// Base URL of the regional registry (`https://registry.example/`).
    pub registry_url: String,
    /// This hospital's ID in the registry's directory (统一社会信用代码).
    pub hospital_id: String,
    /// The bearer token the registry issued to this hospital.
    pub registry_token: String,
    pub region_secret: crate::patient_key::RegionSecret,
    /// Issuers of Patient ID whose IDs are cross-enterprise identifiers,
    /// and of which document type: `RESIDENT_ID=RID` makes an
    /// OtherPatientIDsSequence item (or the Patient ID itself) issued by
    /// `RESIDENT_ID` a resident ID number.
    pub identifier_issuers: Vec<(String, crate::patient_key::IdentifierType)>,
    /// A study with no new instance for this long is complete.
    pub study_quiet_time: Duration,
    pub publish_batch_size: usize,
    pub publish_max_backoff: Duration,
    pub directory_interval: Duration,
    /// A recognition list file to use instead of the registry's (a node
    /// testing a list before the region publishes it).
    pub recognition_list_file: Option<PathBuf>,
    /// Study-level C-FIND for a patient also returns the recognised
    /// regional priors the registry shows this hospital.
    pub cfind_regional_priors: bool,
    /// An OHIF viewer's base URL: prior links open there.
    pub ohif_url: Option<String>,
    /// Instances fetched from a peer at once.
    pub peer_parallel: usize,
    /// Bytes per second all peer fetches together may take from the
    /// hospital's link; 0: no cap.
    pub peer_bandwidth: u64,
    /// Bytes of cached peer studies kept; least recently used evicted past it.
    pub peer_cache_budget_bytes: u64,
    /// An order-time check that finds recognised priors at other hospitals
    /// starts fetching them at once.
    pub prefetch_priors: bool,
    /// The federation's pseudonym secret (docs/federation.md): set at the
    /// nodes of a cross-province pilot's hospitals only.
    pub federation_secret: Option<crate::patient_key::FederationSecret>,
}

impl RegionConfig {
    pub fn identifier_type_of(&self, issuer: &str) -> Option<crate::patient_key::IdentifierType> {
        let issuer = issuer.trim();
        if issuer.is_empty() {
            return None;
        }
        self.identifier_issuers
            .iter()
            .find(|(i, _)| i == issuer)
            .map(|(_, t)| *t)
    }
}

/// Reads a secret from a file (first line, blanks trimmed).
fn read_secret(setting: &'static str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| ConfigError::Invalid {
            setting,
            reason: format!("cannot read {}: {e}", path.display()),
        })
}

/// The `[dicomweb]` table of a TOML config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DicomwebFileConfig {
    open: Option<bool>,
    max_request_bytes: Option<u64>,
    cors_allowed_origins: Option<Vec<String>>,
    #[serde(default)]
    tokens: Vec<TokenConfig>,
}

/// What a DICOMweb bearer token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// QIDO-RS and WADO-RS (GET, HEAD).
    Read,
    /// STOW-RS (POST).
    Write,
}

/// A DICOMweb bearer token as configured: only the SHA-256 of the token is
/// kept (a config file or its backup never holds a usable secret). Tokens
/// are random strings of at least 128 bits: a fast hash is enough for them,
/// unlike passwords.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it; appears in the log, never the token.
    pub name: String,
    /// Lower-case hex SHA-256 of the token (`printf %s TOKEN | sha256sum`).
    pub sha256: String,
    pub scopes: Vec<Scope>,
}

/// DICOMweb (PS3.18) on the HTTP port, under `/dicom-web`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DicomwebConfig {
    /// Serve DICOMweb without a token. Off by default: a node listens on
    /// every interface and its studies are patient data; an open node logs
    /// a warning at start.
    pub open: bool,
    /// Bearer tokens and their scopes.
    pub tokens: Vec<TokenConfig>,
    /// Largest STOW-RS request body; a larger announced Content-Length is
    /// refused with 413 before a byte is read.
    pub max_request_bytes: u64,
    /// Origins (`https://viewer.example.org`, or `*`) a browser may call
    /// DICOMweb from (CORS); empty means same origin only.
    pub cors_allowed_origins: Vec<String>,
}

impl Default for DicomwebConfig {
    fn default() -> Self {
        DicomwebConfig {
            open: false,
            tokens: Vec::new(),
            max_request_bytes: 4 * 1024 * 1024 * 1024,
            cors_allowed_origins: Vec::new(),
        }
    }
}

/// Settings of `huren node` (and of the maintenance commands that open the
/// same store and index). Each flag can also be given in the environment or
/// in the TOML file named by `--config`, under the same name in snake case.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// TOML config file. Keys are the long flag names in snake_case, plus an
    /// optional [storage] table (see storage-config/).
    #[arg(long, env = "HUREN_CONFIG")]
    pub config: Option<PathBuf>,

    /// This node's AE title [default: HUREN]
    #[arg(long, env = "HUREN_AE_TITLE")]
    pub ae_title: Option<String>,

    /// DICOM listen address [default: 0.0.0.0:11112]
    #[arg(long, env = "HUREN_DICOM_LISTEN")]
    pub dicom_listen: Option<SocketAddr>,

    /// HTTP listen address (health, DICOMweb, the JSON API) [default: 0.0.0.0:8080]
    #[arg(long, env = "HUREN_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,

    /// DICOM port, keeping the listen address's IP (shorthand for
    /// --dicom-listen 0.0.0.0:PORT)
    #[arg(long, env = "HUREN_DICOM_PORT")]
    pub dicom_port: Option<u16>,

    /// HTTP port, keeping the listen address's IP
    #[arg(long, env = "HUREN_HTTP_PORT")]
    pub http_port: Option<u16>,

    /// Directory for the SQLite index, the local blob store and the staging
    /// area [default: ./huren-data]
    #[arg(long, env = "HUREN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Index database: sqlite://path or postgres://user:pass@host/db
    /// [default: sqlite://<data_dir>/index.sqlite]
    #[arg(long, env = "HUREN_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Blob store configuration file (see storage-config/) [default: local
    /// file system under <data_dir>/blobs]
    #[arg(long, env = "HUREN_STORAGE_CONFIG")]
    pub storage_config: Option<PathBuf>,

    /// Concurrent associations; the next caller gets A-ASSOCIATE-RJ
    /// (transient, local limit exceeded) [default: 64]
    #[arg(long, env = "HUREN_MAX_ASSOCIATIONS")]
    pub max_associations: Option<usize>,

    /// Largest P-DATA-TF PDU a peer may send us; also bounds the memory one
    /// association buffers [default: 131072, the most dcmtk sends]
    #[arg(long, env = "HUREN_MAX_PDU_LENGTH")]
    pub max_pdu_length: Option<u32>,

    /// Seconds a new connection may take to send its A-ASSOCIATE-RQ (the
    /// ARTIM timer, PS3.8 §9.1.5) [default: 30]
    #[arg(long, env = "HUREN_ARTIM_TIMEOUT_SECS")]
    pub artim_timeout_secs: Option<u64>,

    /// Seconds an established association may stay silent before it is
    /// aborted [default: 300]
    #[arg(long, env = "HUREN_IDLE_TIMEOUT_SECS")]
    pub idle_timeout_secs: Option<u64>,

    /// Seconds between the background flushes of local blob storage: they
    /// let the node forget which index rows a crash could leave without a
    /// blob (full durability), and bound what a power loss can take
    /// (relaxed) [default: 10]
    #[arg(long, env = "HUREN_FLUSH_INTERVAL_SECS")]
    pub flush_interval_secs: Option<u64>,

    /// When C-STORE success is sent: `full` (after fsync and index commit)
    /// or `relaxed` (once the OS has the bytes) [default: full]
    #[arg(long, env = "HUREN_DURABILITY", value_enum)]
    pub durability: Option<Durability>,

    /// Reject associations whose called AE title is not ours [default: false,
    /// because many modalities are configured with a generic called AE]
    #[arg(long, env = "HUREN_REQUIRE_CALLED_AE_TITLE")]
    pub require_called_ae_title: Option<bool>,

    /// Calling AE titles allowed to associate, comma separated, each `AE` or
    /// `AE@ip` [default: empty = any calling AE title]
    #[arg(long, env = "HUREN_ALLOWED_CALLING_AE_TITLES", value_delimiter = ',')]
    pub allowed_calling_ae_titles: Option<Vec<String>>,

    /// Who may query and retrieve: `any` admitted calling AE, or only
    /// `listed` AEs of the AE directory [default: listed]
    #[arg(long, env = "HUREN_QUERY_RETRIEVE_ACCESS", value_enum)]
    pub query_retrieve_access: Option<QueryRetrieveAccess>,

    /// Calling AE titles whose IOCM rejection notes are applied, comma
    /// separated [default: the allowed calling AE titles, else the AE
    /// directory's]; a note from any other AE is refused (0124)
    #[arg(long, env = "HUREN_REJECTION_NOTE_AE_TITLES", value_delimiter = ',')]
    pub rejection_note_ae_titles: Option<Vec<String>>,

    /// Most matches one C-FIND or QIDO-RS query returns; past it the query
    /// ends with status A700 (C-FIND) [default: 10000]
    #[arg(long, env = "HUREN_MAX_QUERY_MATCHES")]
    pub max_query_matches: Option<usize>,

    /// Match person names regardless of case [default: true]
    #[arg(long, env = "HUREN_CASE_INSENSITIVE_NAMES")]
    pub case_insensitive_names: Option<bool>,

    /// Remove studies older than this many days, counted from the Study
    /// Date (from the last received instance when a study has none); each
    /// removal is recorded with reason 113039 "Data Retention Policy
    /// Expired" [default: off]
    #[arg(long, env = "HUREN_RETENTION_DAYS")]
    pub retention_days: Option<u32>,

    /// Run the collector of unreferenced blobs (and the retention policy)
    /// every this many seconds; 0 turns the periodic collector off
    /// (`huren gc` still works) [default: 0]
    #[arg(long, env = "HUREN_GC_INTERVAL_SECS")]
    pub gc_interval_secs: Option<u64>,

    /// Unreferenced blobs younger than this are never collected: an ingest
    /// may have published one and not yet committed its row [default: 3600]
    #[arg(long, env = "HUREN_GC_GRACE_SECS")]
    pub gc_grace_secs: Option<u64>,

    /// AE directory entries, comma separated, each `AE@host:port`: added to
    /// the config file's `[[remote_ae]]` tables (replacing one of the same
    /// title), with the default permissions and no TLS
    #[arg(long, env = "HUREN_REMOTE_AES", value_delimiter = ',')]
    pub remote_aes: Option<Vec<String>>,
    /// Serve DICOMweb without a bearer token [default: false; tokens are
    /// configured in the [dicomweb] table of the config file]
    #[arg(long, env = "HUREN_DICOMWEB_OPEN")]
    pub dicomweb_open: Option<bool>,

    /// File holding the operator's bearer token (read and write scopes,
    /// named "operator") for the JSON API and DICOMweb; the node keeps its
    /// SHA-256 only. Other tokens go in the config file's [[dicomweb.tokens]]
    #[arg(long, env = "HUREN_OPERATOR_TOKEN_FILE")]
    pub operator_token_file: Option<PathBuf>,

    /// Largest STOW-RS request body in bytes [default: 4294967296]
    #[arg(long, env = "HUREN_DICOMWEB_MAX_REQUEST_BYTES")]
    pub dicomweb_max_request_bytes: Option<u64>,

    /// Origins allowed to call DICOMweb from a browser (CORS), comma
    /// separated, or `*` [default: none]
    #[arg(
        long,
        env = "HUREN_DICOMWEB_CORS_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub dicomweb_cors_allowed_origins: Option<Vec<String>>,

    /// Regional registry base URL; with it the node publishes its exam
    /// index [default: none, the node stays local]
    #[arg(long, env = "HUREN_REGISTRY_URL")]
    pub registry_url: Option<String>,

    /// This hospital's ID in the registry (统一社会信用代码)
    #[arg(long, env = "HUREN_HOSPITAL_ID")]
    pub hospital_id: Option<String>,

    /// File holding the registry's token for this hospital (or the token
    /// itself in HUREN_REGISTRY_TOKEN)
    #[arg(long, env = "HUREN_REGISTRY_TOKEN_FILE")]
    pub registry_token_file: Option<PathBuf>,

    /// File holding the region's patient-key secret (or the secret itself
    /// in HUREN_REGION_SECRET); never logged
    #[arg(long, env = "HUREN_REGION_SECRET_FILE")]
    pub region_secret_file: Option<PathBuf>,

    /// File holding the federation's pseudonym secret (or the secret
    /// itself in HUREN_FEDERATION_SECRET), at the nodes of a cross-province
    /// pilot's hospitals only; never logged (docs/federation.md)
    #[arg(long, env = "HUREN_FEDERATION_SECRET_FILE")]
    pub federation_secret_file: Option<PathBuf>,

    /// Issuers of Patient ID that issue cross-enterprise identifiers,
    /// comma separated, each ISSUER=TYPE with TYPE one of RID, PASSPORT,
    /// HKMO, TW, MILITARY [default: none; mappings through the API only]
    #[arg(long, env = "HUREN_IDENTIFIER_ISSUERS", value_delimiter = ',')]
    pub identifier_issuers: Option<Vec<String>>,

    /// Seconds without a new instance after which a study is complete and
    /// published [default: 60]
    #[arg(long, env = "HUREN_STUDY_QUIET_SECS")]
    pub study_quiet_secs: Option<f64>,

    /// Longest wait between retries while the registry is unreachable
    /// [default: 300]
    #[arg(long, env = "HUREN_PUBLISH_MAX_BACKOFF_SECS")]
    pub publish_max_backoff_secs: Option<f64>,

    /// Seconds between conditional GETs of the hospital directory
    /// [default: 300]
    #[arg(long, env = "HUREN_DIRECTORY_INTERVAL_SECS")]
    pub directory_interval_secs: Option<f64>,

    /// Recognition list file to use instead of the registry's [default:
    /// the registry's, cached in <data_dir>/recognition-list.toml]
    #[arg(long, env = "HUREN_RECOGNITION_LIST")]
    pub recognition_list: Option<PathBuf>,

    /// Study-level C-FIND for a patient also returns recognised regional
    /// priors (marked with their institution, this node's AE as
    /// RetrieveAETitle) [default: false]
    #[arg(long, env = "HUREN_CFIND_REGIONAL_PRIORS")]
    pub cfind_regional_priors: Option<bool>,

    /// OHIF viewer base URL for the links to prior images [default: the
    /// node's own DICOMweb]
    #[arg(long, env = "HUREN_OHIF_URL")]
    pub ohif_url: Option<String>,

    /// Instances fetched from a peer node at once [default: 4]
    #[arg(long, env = "HUREN_PEER_PARALLEL")]
    pub peer_parallel: Option<usize>,

    /// Bytes per second all fetches from peer nodes together may take
    /// from the hospital's link (e.g. 6250000 for 50 Mbit/s), so that a
    /// doctor opening a prior does not fill the link; 0: no cap [default: 0]
    #[arg(long, env = "HUREN_PEER_BANDWIDTH")]
    pub peer_bandwidth: Option<u64>,

    /// Bytes of studies fetched from peers kept as a cache; the least
    /// recently used are evicted past it, the hospital's own never
    /// [default: 107374182400]
    #[arg(long, env = "HUREN_PEER_CACHE_BUDGET_BYTES")]
    pub peer_cache_budget_bytes: Option<u64>,

    /// Start fetching recognised priors from other hospitals as soon as an
    /// order-time check finds them [default: false]
    #[arg(long, env = "HUREN_PREFETCH_PRIORS")]
    pub prefetch_priors: Option<bool>,

    /// DICOM audit messages (PS3.15 A.5), one XML message per line, appended
    /// [default: <data_dir>/audit.log]
    #[arg(long, env = "HUREN_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,

    /// Also send audit messages to this syslog collector over TLS
    /// (RFC 5424/5425), `host:port` [default: none]
    #[arg(long, env = "HUREN_AUDIT_SYSLOG_TLS")]
    pub audit_syslog_tls: Option<String>,

    /// CA certificates (PEM) the syslog collector's certificate must chain to
    #[arg(long, env = "HUREN_AUDIT_SYSLOG_CA_FILE")]
    pub audit_syslog_ca_file: Option<PathBuf>,

    /// OHIF Viewer's files, served under /viewer (put there by
    /// deploy/install-viewer.sh) [default: <data_dir>/viewer]
    #[arg(long, env = "HUREN_VIEWER_DIR")]
    pub viewer_dir: Option<PathBuf>,

    /// How the viewer draws: auto (WebGL where it is the GPU's, the CPU
    /// where the browser's WebGL is software), cpu, webgl [default: auto]
    #[arg(long, env = "HUREN_VIEWER_RENDERING", value_enum)]
    pub viewer_rendering: Option<ViewerRendering>,
    /// DICOM TLS listen address (PS3.15 B.9, BCP 195; 2762 by convention),
    /// beside the plain one; needs [server_tls] in the config file
    #[arg(long, env = "HUREN_DICOM_TLS_LISTEN")]
    pub dicom_tls_listen: Option<SocketAddr>,

    /// A plain-HTTP listener beside the HTTPS port, loopback addresses only
    /// (local probes and scripts); only with [server_tls]
    #[arg(long, env = "HUREN_HTTP_PLAIN_LISTEN")]
    pub http_plain_listen: Option<SocketAddr>,
}

/// The resolved configuration every component reads.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub ae_title: AeTitle,
    pub dicom_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub storage: StorageConfig,
    pub max_associations: usize,
    pub max_pdu_length: u32,
    pub artim_timeout: Duration,
    pub idle_timeout: Duration,
    /// Background flush of local blob storage (crate::recovery).
    pub flush_interval: Duration,
    pub durability: Durability,
    pub require_called_ae_title: bool,
    /// Empty means any calling AE title may associate.
    pub allowed_calling_ae_titles: Vec<AllowedPeer>,
    /// The AE directory.
    pub remote_aes: Vec<RemoteAe>,
    pub query_retrieve_access: QueryRetrieveAccess,
    /// Set explicitly; `None`: see [`NodeConfig::rejection_note_senders`].
    pub rejection_note_ae_titles: Option<Vec<String>>,
    pub max_query_matches: usize,
    pub case_insensitive_names: bool,
    /// Retention policy in days (src/lifecycle.rs); `None`: studies are
    /// kept until deleted.
    pub retention_days: Option<u32>,
    /// The periodic collector's interval; `None`: off.
    pub gc_interval: Option<Duration>,
    pub gc_grace: Duration,
    /// DICOM TLS to remote AEs marked `tls`: the CA certificates (PEM) their
    /// certificates must chain to, and optionally the node's own
    /// certificate chain and private key (PEM) for peers that require
    /// client authentication.
    pub tls_ca_file: Option<PathBuf>,
    pub tls_certificate_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    /// The node's own TLS: HTTPS on `http_listen` and the certificate of
    /// the DICOM TLS listener. `None`: plain HTTP, no DICOM TLS listener.
    pub server_tls: Option<crate::tls::ServerTlsConfig>,
    /// The DICOM TLS listener, beside `dicom_listen`.
    pub dicom_tls_listen: Option<SocketAddr>,
    /// Plain HTTP beside HTTPS, loopback only.
    pub http_plain_listen: Option<SocketAddr>,
    pub dicomweb: DicomwebConfig,
    /// The node's part in the region; `None`: it stays local.
    pub region: Option<RegionConfig>,
    /// The DICOM audit log (PS3.15 A.5); `None`: `<data_dir>/audit.log`.
    pub audit_log: Option<PathBuf>,
    /// A syslog collector (`host:port`) that also receives every audit
    /// message, over TLS verified against `audit_syslog_ca_file`.
    pub audit_syslog_tls: Option<String>,
    pub audit_syslog_ca_file: Option<PathBuf>,
    /// The viewer's installed files (deploy/install-viewer.sh); `None`:
    /// `<data_dir>/viewer`.
    pub viewer_dir: Option<PathBuf>,
    /// How the viewer draws its viewports.
    pub viewer_rendering: ViewerRendering,
}

impl NodeConfig {
    /// The configuration used when nothing is set: what `huren node` runs
    /// with on a fresh machine.
    /// The calling AE titles whose IOCM rejection notes are applied: the
    /// configured list; by default the AEs allowed to store, and when
    /// storing is open to every AE, the AE directory's. An empty result
    /// means no AE may reject.
    pub fn rejection_note_senders(&self) -> Vec<String> {
        if let Some(list) = &self.rejection_note_ae_titles {
            return list.clone();
        }
        if !self.allowed_calling_ae_titles.is_empty() {
            return self
                .allowed_calling_ae_titles
                .iter()
                .map(|p| p.ae_title.as_str().to_string())
                .collect();
        }
        self.remote_aes.iter().map(|r| r.ae_title.clone()).collect()
    }

    pub fn defaults_in(data_dir: impl Into<PathBuf>) -> NodeConfig {
        let data_dir = data_dir.into();
        NodeConfig {
            ae_title: AeTitle::parse("HUREN").expect("valid default"),
            dicom_listen: "0.0.0.0:11112".parse().expect("valid default"),
            http_listen: "0.0.0.0:8080".parse().expect("valid default"),
            database_url: default_database_url(&data_dir),
            data_dir,
            storage: StorageConfig::default(),
            max_associations: 64,
            max_pdu_length: 131072,
            artim_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
            flush_interval: Duration::from_secs(10),
            durability: Durability::Full,
            require_called_ae_title: false,
            allowed_calling_ae_titles: Vec::new(),
            remote_aes: Vec::new(),
            query_retrieve_access: QueryRetrieveAccess::Listed,
            rejection_note_ae_titles: None,
            max_query_matches: 10_000,
            case_insensitive_names: true,
            retention_days: None,
            gc_interval: None,
            gc_grace: Duration::from_secs(3600),
            tls_ca_file: None,
            tls_certificate_file: None,
            tls_private_key_file: None,
            server_tls: None,
            dicom_tls_listen: None,
            http_plain_listen: None,
            dicomweb: DicomwebConfig::default(),
            region: None,
            audit_log: None,
            audit_syslog_tls: None,
            audit_syslog_ca_file: None,
            viewer_dir: None,
            viewer_rendering: ViewerRendering::Auto,
        }
    }

    /// Where the viewer's files are served from.
    pub fn viewer_dir(&self) -> PathBuf {
        self.viewer_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("viewer"))
    }

    /// The directory entry of an AE title.
    pub fn remote_ae(&self, ae_title: &str) -> Option<&RemoteAe> {
        self.remote_aes
            .iter()
            .find(|r| r.ae_title.trim() == ae_title.trim())
    }

    /// The directory incoming instances are written to before they are
    /// published into the blob store.
    pub fn staging_dir(&self) -> PathBuf {
        match &self.storage {
            StorageConfig::Local { root } => root
                .clone()
                .unwrap_or_else(|| self.data_dir.join("blobs"))
                .join(STAGING_DIR),
            StorageConfig::S3 { .. } => self.data_dir.join("staging"),
        }
    }
}

fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("index.sqlite").display())
}

impl NodeArgs {
    pub fn resolve(&self) -> Result<NodeConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source: Box::new(source),
                })?
            }
            None => FileConfig::default(),
        };

        let data_dir = self
            .data_dir
            .clone()
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("huren-data"));
        let mut config = NodeConfig::defaults_in(data_dir);

        if let Some(ae) = self.ae_title.as_ref().or(file.ae_title.as_ref()) {
            config.ae_title = AeTitle::parse(ae).map_err(|e| ConfigError::Invalid {
                setting: "ae_title",
                reason: e.to_string(),
            })?;
        }
        if let Some(addr) = self.dicom_listen.or(file.dicom_listen) {
            config.dicom_listen = addr;
        }
        if let Some(addr) = self.http_listen.or(file.http_listen) {
            config.http_listen = addr;
        }
        if let Some(port) = self.dicom_port.or(file.dicom_port) {
            config.dicom_listen.set_port(port);
        }
        if let Some(port) = self.http_port.or(file.http_port) {
            config.http_listen.set_port(port);
        }
        if let Some(url) = self.database_url.clone().or(file.database_url) {
            config.database_url = url;
        }
        let storage_file = self
            .storage_config
            .as_ref()
            .or(file.storage_config.as_ref());
        match (storage_file, file.storage) {
            (Some(path), _) => config.storage = StorageConfig::from_file(path)?,
            (None, Some(storage)) => config.storage = storage,
            (None, None) => {}
        }
        if let Some(n) = self.max_associations.or(file.max_associations) {
            if n == 0 {
                return Err(ConfigError::Invalid {
                    setting: "max_associations",
                    reason: "must be at least 1".into(),
                });
            }
            config.max_associations = n;
        }
        if let Some(len) = self.max_pdu_length.or(file.max_pdu_length) {
            // PS3.8 Annex D.1: the smallest maximum length a node may announce
            // is 4096 bytes; above 16 MiB one buffered PDU would defeat the
            // bounded-memory promise.
            if !(4096..=16 * 1024 * 1024).contains(&len) {
                return Err(ConfigError::Invalid {
                    setting: "max_pdu_length",
                    reason: format!("{len} is outside 4096..=16777216"),
                });
            }
            config.max_pdu_length = len;
        }
        if let Some(secs) = self.artim_timeout_secs.or(file.artim_timeout_secs) {
            config.artim_timeout = Duration::from_secs(secs.max(1));
        }
        if let Some(secs) = self.idle_timeout_secs.or(file.idle_timeout_secs) {
            config.idle_timeout = Duration::from_secs(secs.max(1));
        }
        if let Some(secs) = self.flush_interval_secs.or(file.flush_interval_secs) {
            config.flush_interval = Duration::from_secs(secs.max(1));
        }
        if let Some(durability) = self.durability.or(file.durability) {
            config.durability = durability;
        }
        if let Some(require) = self
            .require_called_ae_title
            .or(file.require_called_ae_title)
        {
            config.require_called_ae_title = require;
        }
        if let Some(list) = self
            .allowed_calling_ae_titles
            .clone()
            .or(file.allowed_calling_ae_titles)
        {
            config.allowed_calling_ae_titles = list
                .iter()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(AllowedPeer::parse)
                .collect::<Result<_, _>>()?;
        }
        if let Some(remote) = file.remote_ae {
            for r in &remote {
                AeTitle::parse(&r.ae_title).map_err(|e| ConfigError::Invalid {
                    setting: "remote_ae.ae_title",
                    reason: e.to_string(),
                })?;
            }
            config.remote_aes = remote;
        }
        for raw in self.remote_aes.iter().flatten() {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let remote = RemoteAe::parse(raw)?;
            config.remote_aes.retain(|r| r.ae_title != remote.ae_title);
            config.remote_aes.push(remote);
        }
        config.tls_ca_file = file.tls_ca_file;
        config.tls_certificate_file = file.tls_certificate_file;
        config.tls_private_key_file = file.tls_private_key_file;
        if let Some(r) = config.remote_aes.iter().find(|r| r.tls)
            && config.tls_ca_file.is_none()
        {
            return Err(ConfigError::Invalid {
                setting: "tls_ca_file",
                reason: format!(
                    "remote AE {} uses TLS: tls_ca_file must name the CA certificates to verify it",
                    r.ae_title
                ),
            });
        }
        if config.tls_certificate_file.is_some() != config.tls_private_key_file.is_some() {
            return Err(ConfigError::Invalid {
                setting: "tls_certificate_file",
                reason: "tls_certificate_file and tls_private_key_file go together".into(),
            });
        }
        if config.remote_aes.iter().any(|r| r.tls) {
            // Checked here so that a bad file stops the start, not the
            // first C-MOVE; the associations build their own.
            let ca_file = config.tls_ca_file.as_deref().expect("checked above");
            crate::tls::client_config(
                ca_file,
                config.tls_certificate_file.as_deref(),
                config.tls_private_key_file.as_deref(),
            )
            .map_err(|reason| ConfigError::Invalid {
                setting: "tls_ca_file",
                reason,
            })?;
        }
        self.resolve_server_tls(
            &mut config,
            file.server_tls,
            file.dicom_tls_listen,
            file.http_plain_listen,
        )?;
        if let Some(access) = self.query_retrieve_access.or(file.query_retrieve_access) {
            config.query_retrieve_access = access;
        }
        if let Some(list) = self
            .rejection_note_ae_titles
            .clone()
            .or(file.rejection_note_ae_titles)
        {
            let mut titles = Vec::new();
            for raw in list.iter().map(|r| r.trim()).filter(|r| !r.is_empty()) {
                let ae = AeTitle::parse(raw).map_err(|e| ConfigError::Invalid {
                    setting: "rejection_note_ae_titles",
                    reason: e.to_string(),
                })?;
                titles.push(ae.as_str().to_string());
            }
            config.rejection_note_ae_titles = Some(titles);
        }
        if let Some(n) = self.max_query_matches.or(file.max_query_matches) {
            config.max_query_matches = n.max(1);
        }
        if let Some(ci) = self.case_insensitive_names.or(file.case_insensitive_names) {
            config.case_insensitive_names = ci;
        }
        if let Some(days) = self.retention_days.or(file.retention_days) {
            config.retention_days = (days > 0).then_some(days);
        }
        if let Some(secs) = self.gc_interval_secs.or(file.gc_interval_secs) {
            config.gc_interval = (secs > 0).then(|| Duration::from_secs(secs));
        }
        if let Some(secs) = self.gc_grace_secs.or(file.gc_grace_secs) {
            config.gc_grace = Duration::from_secs(secs);
        }
        let web = file.dicomweb.unwrap_or_default();
        if let Some(open) = self.dicomweb_open.or(web.open) {
            config.dicomweb.open = open;
        }
        if let Some(n) = self.dicomweb_max_request_bytes.or(web.max_request_bytes) {
            config.dicomweb.max_request_bytes = n;
        }
        if let Some(origins) = self
            .dicomweb_cors_allowed_origins
            .clone()
            .or(web.cors_allowed_origins)
        {
            config.dicomweb.cors_allowed_origins = origins
                .iter()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
        }
        for token in &web.tokens {
            let valid = token.sha256.len() == 64
                && token
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !valid {
                return Err(ConfigError::Invalid {
                    setting: "dicomweb.tokens",
                    reason: format!(
                        "token {:?}: sha256 must be 64 lower-case hex digits",
                        token.name
                    ),
                });
            }
        }
        config.dicomweb.tokens = web.tokens;
        if let Some(path) = &self.operator_token_file {
            let token = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                setting: "operator_token_file",
                reason: format!("{}: {e}", path.display()),
            })?;
            let token = token.trim();
            if token.len() < 16 {
                return Err(ConfigError::Invalid {
                    setting: "operator_token_file",
                    reason: format!("{}: a token of at least 16 characters", path.display()),
                });
            }
            config.dicomweb.tokens.push(TokenConfig {
                name: "operator".into(),
                sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes())),
                scopes: vec![Scope::Read, Scope::Write],
            });
        }
        config.region = self.resolve_region(file.region.unwrap_or_default())?;
        config.audit_log = self.audit_log.clone().or(file.audit_log);
        config.viewer_dir = self.viewer_dir.clone().or(file.viewer_dir);
        config.viewer_rendering = self
            .viewer_rendering
            .or(file.viewer_rendering)
            .unwrap_or_default();
        config.audit_syslog_tls = self.audit_syslog_tls.clone().or(file.audit_syslog_tls);
        config.audit_syslog_ca_file = self
            .audit_syslog_ca_file
            .clone()
            .or(file.audit_syslog_ca_file);
        if let Some(address) = &config.audit_syslog_tls {
            if !address
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            {
                return Err(ConfigError::Invalid {
                    setting: "audit_syslog_tls",
                    reason: format!("{address:?}: expected host:port"),
                });
            }
            if config.audit_syslog_ca_file.is_none() {
                return Err(ConfigError::Invalid {
                    setting: "audit_syslog_ca_file",
                    reason: "audit_syslog_tls needs the CA certificates to verify the collector"
                        .into(),
                });
            }
        }
        Ok(config)
    }

    fn resolve_server_tls(
        &self,
        config: &mut NodeConfig,
        server_tls: Option<crate::tls::ServerTlsConfig>,
        dicom_tls_listen: Option<SocketAddr>,
        http_plain_listen: Option<SocketAddr>,
    ) -> Result<(), ConfigError> {
        let invalid =
            |setting: &'static str, reason: String| ConfigError::Invalid { setting, reason };
        config.server_tls = server_tls;
        config.dicom_tls_listen = self.dicom_tls_listen.or(dicom_tls_listen);
        config.http_plain_listen = self.http_plain_listen.or(http_plain_listen);
        if let Some(tls) = &config.server_tls {
            tls.validate().map_err(|r| invalid("server_tls", r))?;
        } else if config.dicom_tls_listen.is_some() {
            return Err(invalid(
                "dicom_tls_listen",
                "needs [server_tls]: the certificate and key the listener presents".into(),
            ));
        } else if config.http_plain_listen.is_some() {
            return Err(invalid(
                "http_plain_listen",
                "only with [server_tls]: without TLS, http_listen is already plain HTTP".into(),
            ));
        }
        if let Some(addr) = config.http_plain_listen {
            crate::tls::require_loopback(addr, "http_plain_listen")
                .map_err(|r| invalid("http_plain_listen", r))?;
        }
        Ok(())
    }

    fn resolve_region(&self, file: RegionFileConfig) -> Result<Option<RegionConfig>, ConfigError> {
        let Some(registry_url) = self.registry_url.clone().or(file.registry_url) else {
            return Ok(None);
        };
        let invalid = |setting: &'static str, reason: &str| ConfigError::Invalid {
            setting,
            reason: reason.to_string(),
        };
        if !(registry_url.starts_with("http://") || registry_url.starts_with("https://")) {
            return Err(invalid("registry_url", "must be an http(s) URL"));
        }
        let hospital_id = self
            .hospital_id
            .clone()
            .or(file.hospital_id)
            .ok_or_else(|| invalid("hospital_id", "required with registry_url"))?;
        let registry_token = match std::env::var("HUREN_REGISTRY_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
            _ => {
                let path = self
                    .registry_token_file
                    .clone()
                    .or(file.registry_token_file)
                    .ok_or_else(|| {
                        invalid(
                            "registry_token_file",
                            "required with registry_url (or HUREN_REGISTRY_TOKEN)",
                        )
                    })?;
                read_secret("registry_token_file", &path)?
            }
        };
        let secret = match std::env::var("HUREN_REGION_SECRET") {
            Ok(s) if !s.trim().is_empty() => s,
            _ => {
                let path = self
                    .region_secret_file
                    .clone()
                    .or(file.region_secret_file)
                    .ok_or_else(|| {
                        invalid(
                            "region_secret_file",
                            "required with registry_url (or HUREN_REGION_SECRET)",
                        )
                    })?;
                read_secret("region_secret_file", &path)?
            }
        };
        let region_secret = crate::patient_key::RegionSecret::from_secret(&secret)
            .map_err(|reason| invalid("region_secret_file", &reason))?;
        let federation_secret = match std::env::var("HUREN_FEDERATION_SECRET") {
            Ok(s) if !s.trim().is_empty() => Some(s),
            _ => match self
                .federation_secret_file
                .clone()
                .or(file.federation_secret_file)
            {
                Some(path) => Some(read_secret("federation_secret_file", &path)?),
                None => None,
            },
        }
        .map(|s| crate::patient_key::FederationSecret::from_secret(&s))
        .transpose()
        .map_err(|reason| invalid("federation_secret_file", &reason))?;
        let mut identifier_issuers = Vec::new();
        for raw in self
            .identifier_issuers
            .clone()
            .or(file.identifier_issuers)
            .unwrap_or_default()
        {
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let (issuer, kind) = raw
                .rsplit_once('=')
                .ok_or_else(|| invalid("identifier_issuers", "each entry is ISSUER=TYPE"))?;
            let kind = crate::patient_key::IdentifierType::parse(kind).ok_or_else(|| {
                invalid(
                    "identifier_issuers",
                    "TYPE is one of RID, PASSPORT, HKMO, TW, MILITARY",
                )
            })?;
            identifier_issuers.push((issuer.trim().to_string(), kind));
        }
        let secs = |v: Option<f64>, default: f64| -> Duration {
            Duration::from_secs_f64(v.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(default))
        };
        Ok(Some(RegionConfig {
            registry_url,
            hospital_id,
            registry_token,
            region_secret,
            identifier_issuers,
            study_quiet_time: secs(self.study_quiet_secs.or(file.study_quiet_secs), 60.0),
            publish_batch_size: 500,
            publish_max_backoff: secs(
                self.publish_max_backoff_secs
                    .or(file.publish_max_backoff_secs),
                300.0,
            )
            .max(Duration::from_millis(100)),
            directory_interval: secs(
                self.directory_interval_secs
                    .or(file.directory_interval_secs),
                300.0,
            )
            .max(Duration::from_secs(1)),
            recognition_list_file: self.recognition_list.clone().or(file.recognition_list_file),
            cfind_regional_priors: self
                .cfind_regional_priors
                .or(file.cfind_regional_priors)
                .unwrap_or(false),
            ohif_url: self.ohif_url.clone().or(file.ohif_url),
            peer_parallel: self
                .peer_parallel
                .or(file.peer_parallel)
                .unwrap_or(4)
                .clamp(1, 64),
            peer_bandwidth: self.peer_bandwidth.or(file.peer_bandwidth).unwrap_or(0),
            peer_cache_budget_bytes: self
                .peer_cache_budget_bytes
                .or(file.peer_cache_budget_bytes)
                .unwrap_or(100 << 30),
            prefetch_priors: self
                .prefetch_priors
                .or(file.prefetch_priors)
                .unwrap_or(false),
            federation_secret,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_aes_from_flags() {
        let args = NodeArgs {
            remote_aes: Some(vec![
                "MOVESCU@127.0.0.1:11113".into(),
                "WS1@ws1.local:104".into(),
            ]),
            ..NodeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.remote_aes.len(), 2);
        let r = config.remote_ae("MOVESCU").unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.tls),
            ("127.0.0.1", 11113, false)
        );
        assert!(r.move_destination && r.may_query && r.may_retrieve);
        for bad in [
            "NOAT",
            "A@host",
            "A@host:x",
            "A@:104",
            "WAY_TOO_LONG_AE_TITLE@h:1",
        ] {
            let args = NodeArgs {
                remote_aes: Some(vec![bad.into()]),
                ..NodeArgs::default()
            };
            assert!(args.resolve().is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_need_no_file() {
        let config = NodeArgs::default().resolve().unwrap();
        assert_eq!(config.ae_title.as_str(), "HUREN");
        assert_eq!(config.dicom_listen.port(), 11112);
        assert_eq!(config.http_listen.port(), 8080);
        assert_eq!(config.data_dir, PathBuf::from("huren-data"));
        assert_eq!(config.database_url, "sqlite://huren-data/index.sqlite");
        assert_eq!(config.storage, StorageConfig::Local { root: None });
        assert_eq!(config.durability, Durability::Full);
    }

    #[test]
    fn flags_override_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huren.toml");
        std::fs::write(
            &path,
            r#"
ae_title = "FROMFILE"
data_dir = "/srv/huren"
max_associations = 8
durability = "relaxed"
allowed_calling_ae_titles = ["CT1", "PACS@10.0.0.5"]
viewer_rendering = "cpu"
[storage]
backend = "local"
root = "/srv/blobs"
"#,
        )
        .unwrap();
        let args = NodeArgs {
            config: Some(path),
            ae_title: Some("FROMFLAG".into()),
            dicom_port: Some(4242),
            ..NodeArgs::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.ae_title.as_str(), "FROMFLAG");
        assert_eq!(config.max_associations, 8);
        assert_eq!(config.dicom_listen, "0.0.0.0:4242".parse().unwrap());
        assert_eq!(config.durability, Durability::Relaxed);
        assert_eq!(config.viewer_rendering, ViewerRendering::Cpu);
        assert_eq!(config.database_url, "sqlite:///srv/huren/index.sqlite");
        assert_eq!(
            config.storage,
            StorageConfig::Local {
                root: Some("/srv/blobs".into())
            }
        );
        assert_eq!(config.staging_dir(), PathBuf::from("/srv/blobs/.staging"));
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let other: IpAddr = "10.0.0.6".parse().unwrap();
        assert!(config.allowed_calling_ae_titles[0].admits("CT1", other));
        assert!(config.allowed_calling_ae_titles[1].admits("PACS", ip));
        assert!(!config.allowed_calling_ae_titles[1].admits("PACS", other));
    }

    #[test]
    fn dicomweb_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huren.toml");
        std::fs::write(
            &path,
            r#"
[dicomweb]
max_request_bytes = 1000
cors_allowed_origins = ["https://viewer.example.org"]
[[dicomweb.tokens]]
name = "ohif"
sha256 = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
scopes = ["read"]
"#,
        )
        .unwrap();
        let config = NodeArgs {
            config: Some(path.clone()),
            ..NodeArgs::default()
        }
        .resolve()
        .unwrap();
        assert!(!config.dicomweb.open);
        assert_eq!(config.dicomweb.max_request_bytes, 1000);
        assert_eq!(config.dicomweb.tokens[0].scopes, vec![Scope::Read]);
        assert_eq!(
            config.dicomweb.cors_allowed_origins,
            vec!["https://viewer.example.org"]
        );
        std::fs::write(
            &path,
            "[[dicomweb.tokens]]\nname = \"x\"\nsha256 = \"secret\"\nscopes = []\n",
        )
        .unwrap();
        assert!(
            NodeArgs {
                config: Some(path),
                ..NodeArgs::default()
            }
            .resolve()
            .is_err()
        );
    }

    #[test]
    fn invalid_settings_are_refused() {
        let cases = [
            NodeArgs {
                ae_title: Some("WAY_TOO_LONG_AE_TITLE".into()),
                ..NodeArgs::default()
            },
            NodeArgs {
                max_pdu_length: Some(100),
                ..NodeArgs::default()
            },
            NodeArgs {
                max_associations: Some(0),
                ..NodeArgs::default()
            },
            NodeArgs {
                allowed_calling_ae_titles: Some(vec!["CT1@not-an-ip".into()]),
                ..NodeArgs::default()
            },
            NodeArgs {
                audit_syslog_tls: Some("collector-without-port".into()),
                audit_syslog_ca_file: Some("ca.pem".into()),
                ..NodeArgs::default()
            },
            NodeArgs {
                audit_syslog_tls: Some("collector:6514".into()),
                ..NodeArgs::default()
            },
        ];
        for args in cases {
            assert!(args.resolve().is_err(), "{args:?}");
        }
    }
}
