//! The blob store: every instance once, as a Part-10 object keyed by the
//! BLAKE3 hash of its bytes, on any backend object_store speaks.
//!
//! Writes go through a local staging file first, because the key is only
//! known once the last byte has been hashed: an anonymous `O_TMPFILE` file
//! where the file system has them (opened ahead by a thread of its own, so
//! that neither an inode allocation nor a directory entry is on the path an
//! acknowledgement waits on), else a named one. On the local file system the
//! staging area sits inside the store's root, so publishing is a `linkat`
//! (or a rename); the node does its own fsyncs because object_store's
//! `LocalFileSystem` does none. Reads and listings go through object_store on every backend.
//!
//! Keys are `ab/<64 hex digits>`: derived from the hash alone, never from
//! anything a peer sent. One level of 256 directories, created when the store
//! opens: creating directories as blobs arrive cost ext4 an inode and block
//! group search per new directory (measured: a second `ab/cd/` level doubled
//! the time to publish a blob into a young store), while 256 directories
//! still keep a hundred million blobs at a few hundred thousand entries per
//! hashed (htree) directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use futures::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use thiserror::Error;
use tokio::sync::oneshot;

use crate::config::{Durability, StorageConfig};
use crate::types::BlobHash;

/// Name of the staging directory inside a local store's root. Not a valid
/// key prefix (keys start with two hex digits), so listings never confuse a
/// staging file with a blob.
pub use crate::config::STAGING_DIR;

/// Blobs above this size go to S3 as a multipart upload, read from the
/// staging file one part at a time, so memory stays bounded.
const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
const MULTIPART_PART_SIZE: usize = 8 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum Error {
    #[error("blob {0} not found")]
    NotFound(BlobHash),
    #[error("blob {key} is corrupt: its BLAKE3 hash is {actual}")]
    Corrupt { key: BlobHash, actual: BlobHash },
    #[error("staging write failed: {0}")]
    Staging(#[source] std::io::Error),
    #[error("local file system: {0}")]
    Io(#[from] std::io::Error),
    #[error("object store: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("invalid storage configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether the failure is the store running out of room, which DICOM
    /// reports as 0xA700 Refused: Out of Resources.
    pub fn is_out_of_space(&self) -> bool {
        let io = match self {
            Error::Staging(e) | Error::Io(e) => e,
            _ => return false,
        };
        matches!(
            io.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        )
    }
}

enum Backend {
    Local { root: PathBuf },
    S3,
}

/// One blob as a listing shows it.
#[derive(Debug, Clone)]
pub struct BlobMeta {
    pub hash: BlobHash,
    pub size: u64,
    pub last_modified: SystemTime,
}

pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    backend: Backend,
    staging_dir: PathBuf,
    /// Picks the staging shard for the next object.
    next_shard: std::sync::atomic::AtomicUsize,
    /// Local file system only: the flush acknowledgements wait for (full
    /// durability) and the periodic one of crate::recovery.
    syncer: Option<GroupSync>,
    /// Whether an acknowledgement waits for a flush (full durability on
    /// local files; S3's completed PUT is durable by itself).
    ack_waits_for_flush: bool,
    /// The configured promise, as the metrics label what was stored.
    durability: Durability,
    /// Anonymous staging files made ahead; `None` where the file system
    /// has no `O_TMPFILE` (named staging files then).
    pool: Option<AnonymousPool>,
}

/// Staging files are spread over this many subdirectories: every create and
/// rename takes its directory's lock, and with one staging directory
/// concurrent associations queued on it (measured: 14% of the node's CPU
/// time spinning on that lock with four senders).
const STAGING_SHARDS: usize = 16;

/// Staging files older than this when the store opens were left by a crash
/// (no request takes an hour between its first and last byte being staged
/// and the blob being published) and are removed.
const STALE_STAGING: std::time::Duration = std::time::Duration::from_secs(3600);

/// Creates the staging shards and removes stale staging files.
fn prepare_staging(staging_dir: &Path) -> Result<(), Error> {
    let mut removed = 0u64;
    for shard in 0..STAGING_SHARDS {
        let dir = staging_dir.join(format!("{shard:x}"));
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_STAGING);
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
    }
    if removed > 0 {
        tracing::info!(removed, "removed staging files left by an earlier crash");
    }
    Ok(())
}

impl BlobStore {
    /// Opens the configured store; `data_dir` holds the default local root
    /// and, for remote stores, the staging area.
    pub fn open(
        config: &StorageConfig,
        data_dir: &Path,
        durability: Durability,
    ) -> Result<BlobStore, Error> {
        match config {
            StorageConfig::Local { root } => {
                let root = root.clone().unwrap_or_else(|| data_dir.join("blobs"));
                let staging_dir = root.join(STAGING_DIR);
                std::fs::create_dir_all(&staging_dir)?;
                prepare_staging(&staging_dir)?;
                for dir in 0..=255u8 {
                    std::fs::create_dir_all(root.join(format!("{dir:02x}")))?;
                }
                let root = root.canonicalize()?;
                let store = LocalFileSystem::new_with_prefix(&root)?;
                let pool = AnonymousPool::start(&root.join(STAGING_DIR));
                Ok(BlobStore {
                    store: Arc::new(store),
                    staging_dir: root.join(STAGING_DIR),
                    next_shard: Default::default(),
                    syncer: Some(GroupSync::start(&root)?),
                    backend: Backend::Local { root },
                    ack_waits_for_flush: durability == Durability::Full,
                    durability,
                    pool,
                })
            }
            StorageConfig::S3 {
                bucket,
                endpoint,
                region,
                prefix,
                access_key_id,
                secret_access_key_file,
                allow_http,
            } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_allow_http(*allow_http);
                if let Some(endpoint) = endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(id) = access_key_id {
                    builder = builder.with_access_key_id(id);
                }
                if let Some(path) = secret_access_key_file {
                    let secret = std::fs::read_to_string(path).map_err(|e| {
                        Error::Config(format!("secret_access_key_file {}: {e}", path.display()))
                    })?;
                    builder = builder.with_secret_access_key(secret.trim());
                }
                let s3 = builder.build()?;
                let store: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                };
                let staging_dir = data_dir.join("staging");
                std::fs::create_dir_all(&staging_dir)?;
                prepare_staging(&staging_dir)?;
                Ok(BlobStore {
                    store,
                    backend: Backend::S3,
                    staging_dir,
                    next_shard: Default::default(),
                    syncer: None,
                    ack_waits_for_flush: false,
                    durability,
                    pool: AnonymousPool::start(&data_dir.join("staging")),
                })
            }
        }
    }

    pub fn key(hash: &BlobHash) -> ObjectPath {
        let hex = hash.to_hex();
        ObjectPath::from(format!("{}/{}", &hex[0..2], hex))
    }

    fn hash_of_key(key: &ObjectPath) -> Option<BlobHash> {
        let parts: Vec<_> = key.parts().collect();
        match parts.as_slice() {
            [dir, name] => {
                let hash = BlobHash::parse(name.as_ref()).ok()?;
                (dir.as_ref() == &hash.to_hex()[0..2]).then_some(hash)
            }
            _ => None,
        }
    }

    /// Starts a new object in the staging area, written from the calling
    /// thread (blocking; a short step, see `run_short_blocking`) and
    /// hashed as it goes. `prefix` is its first bytes.
    pub fn stage_inline(&self, prefix: &[u8]) -> Result<InlineStage, Error> {
        let file = match &self.pool {
            Some(pool) => pool.take(&self.staging_dir).map_err(Error::Staging)?,
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("in-")
                    .suffix(".part")
                    .tempfile_in(self.next_staging_shard())
                    .map_err(Error::Staging)?;
                let (file, temp) = temp.into_parts();
                StagingFile::Named { file, temp }
            }
        };
        let mut stage = InlineStage {
            file,
            hasher: blake3::Hasher::new(),
            len: 0,
        };
        stage.write(prefix).map_err(Error::Staging)?;
        Ok(stage)
    }

    /// Whether acknowledging a published blob must wait for [`Self::flush`]
    /// (full durability on local files).
    pub fn ack_waits_for_flush(&self) -> bool {
        self.ack_waits_for_flush
    }

    /// Makes the file system holding `path` part of every flush, when it is
    /// not the blob root's: the SQLite index beside the blobs is then made
    /// durable by the same syncfs(2) as the blob (one flush per
    /// acknowledgement instead of two).
    pub fn flush_also(&self, path: &Path) -> Result<(), Error> {
        if let Some(syncer) = &self.syncer {
            syncer.cover(path)?;
        }
        Ok(())
    }

    /// Waits until every blob published before the call is on stable
    /// storage: the next group-committed syncfs(2) on local files (one
    /// flush serves every caller waiting when it starts), nothing on S3.
    pub async fn flush(&self) -> Result<(), Error> {
        match &self.syncer {
            Some(syncer) => syncer.sync().await,
            None => Ok(()),
        }
    }

    /// Makes a staged object a blob: a rename on local files (durable only
    /// after [`Self::flush`]), a completed PUT on S3 (durable at once).
    pub async fn publish(&self, staged: Staged) -> Result<(), Error> {
        self.publish_kept(staged).await.map(|_| ())
    }

    /// [`publish`](Self::publish), giving back the staged object on a
    /// remote store: the ingest path asks [`ensure_published`]
    /// (Self::ensure_published) with it once its row has committed, so that
    /// a blob the collector removed meanwhile is put back (src/gc.rs).
    pub async fn publish_kept(&self, staged: Staged) -> Result<Option<Staged>, Error> {
        let key = Self::key(&staged.hash);
        match &self.backend {
            Backend::Local { root } => {
                let final_path = root.join(key.as_ref());
                // A link or rename is a short metadata operation, done on
                // this thread (see run_short_blocking).
                run_short_blocking(|| self.place(staged.file, &final_path))?;
                Ok(None)
            }
            Backend::S3 => {
                // Same key means same bytes: an existing object needs no
                // upload. S3 PUTs are atomic, so it cannot be a partial one.
                if self.store.head(&key).await.is_err() {
                    self.put_staged(&key, &staged).await?;
                }
                Ok(Some(staged))
            }
        }
    }

    /// Puts a staged file at `final_path` as a fresh file, replacing any
    /// blob there: an orphan left by a crash may not have reached the disk
    /// whole, while this copy was just hashed, and the collector relies on
    /// every publish making a new file (src/gc.rs).
    fn place(&self, file: StagingFile, final_path: &Path) -> Result<(), Error> {
        let recreate_parent = || -> Result<(), Error> {
            // The fan-out directories are made at open; one removed since
            // is made again.
            if let Some(parent) = final_path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            Ok(())
        };
        match file {
            StagingFile::Anonymous { file, proc_path } => {
                let linked = match link_anonymous(&proc_path, final_path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        recreate_parent()?;
                        link_anonymous(&proc_path, final_path)
                    }
                    other => other,
                };
                match linked {
                    Ok(()) => Ok(()),
                    // The blob exists (a duplicate, or a crash's orphan):
                    // linked under a staging name, then renamed over it.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        let temp = tempfile::Builder::new()
                            .prefix("dup-")
                            .make_in(self.next_staging_shard(), |name| {
                                link_anonymous(&proc_path, name)
                            })
                            .map_err(Error::Staging)?
                            .into_temp_path();
                        drop(file);
                        temp.persist(final_path).map_err(|e| Error::Io(e.error))
                    }
                    Err(e) => Err(Error::Io(e)),
                }
            }
            StagingFile::Named { temp, .. } => match temp.persist(final_path) {
                Ok(()) => Ok(()),
                Err(e) if e.error.kind() == std::io::ErrorKind::NotFound => {
                    recreate_parent()?;
                    e.path.persist(final_path).map_err(|e| Error::Io(e.error))
                }
                Err(e) => Err(Error::Io(e.error)),
            },
        }
    }

    async fn put_staged(&self, key: &ObjectPath, staged: &Staged) -> Result<(), Error> {
        if staged.len <= MULTIPART_THRESHOLD {
            let path = staged.path().to_path_buf();
            let bytes = tokio::fs::read(&path).await?;
            self.store.put(key, Bytes::from(bytes).into()).await?;
        } else {
            self.put_multipart_from_file(key, staged.path()).await?;
        }
        Ok(())
    }

    /// After the row naming a remote blob has committed: the blob is there,
    /// or is uploaded again from the staged copy. A collector that removed
    /// it before seeing the row is thereby undone (src/gc.rs).
    pub async fn ensure_published(&self, staged: Staged) -> Result<(), Error> {
        let key = Self::key(&staged.hash);
        match self.store.head(&key).await {
            Ok(_) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(blob = %staged.hash, "blob removed by the collector while being referenced; uploaded again");
                self.put_staged(&key, &staged).await
            }
            Err(e) => Err(Error::ObjectStore(e)),
        }
    }

    fn trash_key(hash: &BlobHash) -> ObjectPath {
        ObjectPath::from(format!("gc-trash/{}", hash.to_hex()))
    }

    /// The collector's first step on a remote store: a copy under
    /// `gc-trash/`, then the blob removed (src/gc.rs).
    /// False when the blob is gone already.
    pub async fn move_to_trash(&self, hash: &BlobHash) -> Result<bool, Error> {
        match self
            .store
            .copy(&Self::key(hash), &Self::trash_key(hash))
            .await
        {
            Ok(()) => {}
            Err(object_store::Error::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(Error::ObjectStore(e)),
        }
        self.store.delete(&Self::key(hash)).await?;
        Ok(true)
    }

    /// Puts a blob back from `gc-trash/` and removes the copy there.
    pub async fn restore_from_trash(&self, hash: &BlobHash) -> Result<(), Error> {
        self.store
            .copy(&Self::trash_key(hash), &Self::key(hash))
            .await?;
        self.purge_trash(hash).await
    }

    pub async fn purge_trash(&self, hash: &BlobHash) -> Result<(), Error> {
        match self.store.delete(&Self::trash_key(hash)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::ObjectStore(e)),
        }
    }

    /// Blobs a collector left in `gc-trash/` (a crash mid-pass).
    pub async fn list_trash(&self) -> Result<Vec<BlobHash>, Error> {
        let prefix = ObjectPath::from("gc-trash");
        let mut out = Vec::new();
        let mut stream = self.store.list(Some(&prefix));
        while let Some(meta) = stream.next().await {
            if let Some(hash) = meta?
                .location
                .filename()
                .and_then(|n| BlobHash::parse(n).ok())
            {
                out.push(hash);
            }
        }
        Ok(out)
    }

    async fn put_multipart_from_file(&self, key: &ObjectPath, path: &Path) -> Result<(), Error> {
        use tokio::io::AsyncReadExt;
        let upload = self.store.put_multipart(key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, MULTIPART_PART_SIZE);
        let mut file = tokio::fs::File::open(path).await?;
        let mut buf = vec![0u8; MULTIPART_PART_SIZE];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            writer.wait_for_capacity(2).await?;
            writer.write(&buf[..n]);
        }
        writer.finish().await?;
        Ok(())
    }

    async fn fetch(&self, hash: &BlobHash) -> Result<object_store::GetResult, Error> {
        self.store.get(&Self::key(hash)).await.map_err(|e| {
            crate::metrics::storage_error("read");
            match e {
                object_store::Error::NotFound { .. } => Error::NotFound(*hash),
                other => Error::ObjectStore(other),
            }
        })
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Readiness: the staging area takes a file, and the store answers (a
    /// local root still exists; an S3 bucket answers a HEAD, where "not
    /// found" is an answer).
    pub async fn check_reachable(&self) -> Result<(), Error> {
        let shard = self.next_staging_shard();
        run_short_blocking(|| tempfile::tempfile_in(shard)).map_err(Error::Staging)?;
        match &self.backend {
            Backend::Local { root } => {
                if !tokio::fs::metadata(root).await?.is_dir() {
                    return Err(Error::Config(format!(
                        "{} is not a directory",
                        root.display()
                    )));
                }
                Ok(())
            }
            Backend::S3 => match self.store.head(&ObjectPath::from("readiness-probe")).await {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e.into()),
            },
        }
    }

    /// Reads a whole blob and checks its hash. A mismatch is an error: a
    /// corrupt blob is never served.
    pub async fn get(&self, hash: &BlobHash) -> Result<Bytes, Error> {
        let result = self.fetch(hash).await?;
        let bytes = result.bytes().await?;
        expect_hash(hash, blake3::hash(&bytes))?;
        Ok(bytes)
    }

    /// The first `len` bytes of a blob, NOT verified: only for reading header
    /// attributes to describe a study (publication), never for serving.
    /// `len` must not exceed the blob's size (the index knows it).
    pub async fn get_prefix(&self, hash: &BlobHash, len: u64) -> Result<Bytes, Error> {
        self.store
            .get_range(&Self::key(hash), 0..len)
            .await
            .map_err(|e| match e {
                object_store::Error::NotFound { .. } => Error::NotFound(*hash),
                other => Error::ObjectStore(other),
            })
    }

    /// Streams a blob through the hasher without holding it; returns its size.
    pub async fn verify(&self, hash: &BlobHash) -> Result<u64, Error> {
        let result = self.fetch(hash).await?;
        let mut stream = result.into_stream();
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        expect_hash(hash, hasher.finalize())?;
        Ok(size)
    }

    /// Copies a blob to a local file, verifying it on the way; used to
    /// re-read headers when the index is rebuilt.
    pub async fn copy_to_file(&self, hash: &BlobHash, dest: &Path) -> Result<(), Error> {
        use tokio::io::AsyncWriteExt;
        let result = self.fetch(hash).await?;
        let mut stream = result.into_stream();
        let mut hasher = blake3::Hasher::new();
        let mut file = tokio::fs::File::create(dest).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            hasher.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        expect_hash(hash, hasher.finalize())?;
        Ok(())
    }

    /// Opens a blob for retrieval, verified before a byte of it is served:
    /// a corrupt blob is an error here, never a half-sent instance. Small
    /// blobs are read into memory; larger ones are hashed in a streaming
    /// pass and then served from a file (the blob itself on a local store,
    /// whose second read comes from the page cache; a verified temporary
    /// copy for a remote one), so memory stays bounded whatever the size.
    pub async fn open_verified(&self, hash: &BlobHash, size: u64) -> Result<VerifiedBlob, Error> {
        if size <= VERIFIED_IN_MEMORY_LIMIT {
            return Ok(VerifiedBlob::Memory(self.get(hash).await?));
        }
        match &self.backend {
            Backend::Local { root } => {
                let path = root.join(Self::key(hash).as_ref());
                let len = self.verify(hash).await?;
                let file = tokio::fs::File::open(&path).await.map_err(|e| {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        Error::NotFound(*hash)
                    } else {
                        Error::Io(e)
                    }
                })?;
                Ok(VerifiedBlob::File {
                    file,
                    len,
                    _temp: None,
                })
            }
            Backend::S3 => {
                let temp = tempfile::Builder::new()
                    .prefix("retrieve-")
                    .tempfile_in(self.next_staging_shard())?
                    .into_temp_path();
                self.copy_to_file(hash, &temp).await?;
                let file = tokio::fs::File::open(&temp).await?;
                let len = file.metadata().await?.len();
                Ok(VerifiedBlob::File {
                    file,
                    len,
                    _temp: Some(temp),
                })
            }
        }
    }

    /// Every blob in the store. Objects whose key is not a blob key (staging
    /// files, foreign objects) are left out.
    pub async fn list(&self) -> Result<Vec<BlobMeta>, Error> {
        let mut out = Vec::new();
        let mut stream = self.store.list(None);
        while let Some(meta) = stream.next().await {
            let meta = meta?;
            if let Some(hash) = Self::hash_of_key(&meta.location) {
                out.push(BlobMeta {
                    hash,
                    size: meta.size,
                    last_modified: meta.last_modified.into(),
                });
            }
        }
        Ok(out)
    }

    /// When the blob was last written, or `None` if the store lacks it.
    pub async fn last_modified(&self, hash: &BlobHash) -> Result<Option<SystemTime>, Error> {
        match self.store.head(&Self::key(hash)).await {
            Ok(meta) => Ok(Some(meta.last_modified.into())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::ObjectStore(e)),
        }
    }

    /// The blob root of a local store (`None` for a remote one): the
    /// collector (src/gc.rs) renames blobs within it, which a remote store
    /// cannot do atomically.
    pub fn local_root(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Local { root } => Some(root),
            Backend::S3 => None,
        }
    }

    /// Removes a blob; one already gone is `NotFound` (S3 answers a DELETE
    /// of a missing key with success, so there it is `Ok`).
    pub async fn delete(&self, hash: &BlobHash) -> Result<(), Error> {
        match self.store.delete(&Self::key(hash)).await {
            Ok(()) => Ok(()),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(*hash)),
            Err(e) => Err(e.into()),
        }
    }

    /// Where temporary files for this store go (same file system as a
    /// local store's blobs).
    pub fn staging_dir(&self) -> &Path {
        &self.staging_dir
    }

    fn next_staging_shard(&self) -> PathBuf {
        let shard = self
            .next_shard
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % STAGING_SHARDS;
        self.staging_dir.join(format!("{shard:x}"))
    }

    /// Files in the staging area now: instances being received, or, after
    /// a crash, left over until the next start.
    pub fn staged_file_count(&self) -> std::io::Result<usize> {
        let mut count = 0;
        for entry in std::fs::read_dir(&self.staging_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                count += std::fs::read_dir(entry.path())?.count();
            } else {
                count += 1;
            }
        }
        Ok(count)
    }
}

/// Blobs up to this size are verified and served from memory.
const VERIFIED_IN_MEMORY_LIMIT: u64 = 8 * 1024 * 1024;

/// A blob whose hash has been checked, ready to be served.
pub enum VerifiedBlob {
    Memory(Bytes),
    File {
        file: tokio::fs::File,
        len: u64,
        /// The temporary copy of a remote blob, deleted when this drops.
        _temp: Option<tempfile::TempPath>,
    },
}

impl VerifiedBlob {
    pub fn len(&self) -> u64 {
        match self {
            VerifiedBlob::Memory(b) => b.len() as u64,
            VerifiedBlob::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole Part-10 object as a reader.
    pub fn into_reader(self) -> VerifiedReader {
        match self {
            VerifiedBlob::Memory(b) => VerifiedReader::Memory(std::io::Cursor::new(b)),
            VerifiedBlob::File { file, _temp, .. } => VerifiedReader::File(file, _temp),
        }
    }
}

/// Reads a [`VerifiedBlob`]; keeps a temporary copy alive while reading.
pub enum VerifiedReader {
    Memory(std::io::Cursor<Bytes>),
    File(tokio::fs::File, Option<tempfile::TempPath>),
}

impl tokio::io::AsyncRead for VerifiedReader {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            VerifiedReader::Memory(c) => std::pin::Pin::new(c).poll_read(cx, buf),
            VerifiedReader::File(f, _) => std::pin::Pin::new(f).poll_read(cx, buf),
        }
    }
}

/// A blob whose bytes do not hash to its key is corrupt: never served.
fn expect_hash(key: &BlobHash, computed: blake3::Hash) -> Result<(), Error> {
    let actual = BlobHash::from_hash(computed);
    if actual == *key {
        Ok(())
    } else {
        crate::metrics::storage_error("corrupt_read");
        Err(Error::Corrupt { key: *key, actual })
    }
}

/// A complete object in the staging area, hashed. Dropping it deletes the
/// file: nothing half-stored survives a failed request.
#[derive(Debug)]
pub struct Staged {
    pub hash: BlobHash,
    pub len: u64,
    file: StagingFile,
}

impl Staged {
    /// A path that opens the staged object: its name, or for an anonymous
    /// file its descriptor's entry in /proc (valid while this lives).
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

/// The file an object is staged in.
#[derive(Debug)]
enum StagingFile {
    /// An `O_TMPFILE` file: no name, so no directory work until it is
    /// linked into place, and nothing to clean up if the node dies first.
    Anonymous {
        file: std::fs::File,
        /// `/proc/self/fd/N`: what `linkat` and re-readers open.
        proc_path: PathBuf,
    },
    /// A named file in a staging shard, where the file system has no
    /// `O_TMPFILE`; removed when dropped.
    Named {
        file: std::fs::File,
        temp: tempfile::TempPath,
    },
}

impl StagingFile {
    fn path(&self) -> &Path {
        match self {
            StagingFile::Anonymous { proc_path, .. } => proc_path,
            StagingFile::Named { temp, .. } => temp,
        }
    }

    fn file(&mut self) -> &mut std::fs::File {
        match self {
            StagingFile::Anonymous { file, .. } | StagingFile::Named { file, .. } => file,
        }
    }
}

/// An object being written into the staging area by its caller's thread.
pub struct InlineStage {
    file: StagingFile,
    hasher: blake3::Hasher,
    len: u64,
}

impl InlineStage {
    /// Appends bytes (blocking).
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.file.file().write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// The complete object. No flush is needed: every write went straight
    /// to the operating system.
    pub fn finish(self) -> Staged {
        Staged {
            hash: BlobHash::from_hash(self.hasher.finalize()),
            len: self.len,
            file: self.file,
        }
    }
}

/// Opens an anonymous file (`O_TMPFILE`) in `dir`, readable and writable
/// by the node alone.
fn open_anonymous(dir: &Path) -> std::io::Result<StagingFile> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o600)
        .open(dir)?;
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    Ok(StagingFile::Anonymous { file, proc_path })
}

/// Gives an anonymous file the name `to`. `linkat` through /proc (with
/// AT_SYMLINK_FOLLOW) needs no privilege, unlike AT_EMPTY_PATH.
fn link_anonymous(proc_path: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let from = std::ffi::CString::new(proc_path.as_os_str().as_bytes())?;
    let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both are NUL-terminated paths that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Anonymous staging files opened ahead of need by a thread of their own:
/// allocating an inode is the costly part of creating a file on ext4 (its
/// inode search skips every inode freed in the last seconds, 20% of the
/// node's CPU time in the relaxed-mode profile of docs/benchmarks.md), and
/// this takes it off the path an acknowledgement waits on. The files have
/// no name, so a crash leaves nothing behind; each gets its modification
/// time when the object is written into it, so the collector's age check
/// (src/gc.rs) sees the time of the ingest, not of the pool.
struct AnonymousPool {
    ready: Arc<std::sync::Mutex<Vec<StagingFile>>>,
    /// Wakes the filler; dropped with the store, which ends the thread.
    wake: std::sync::mpsc::SyncSender<()>,
}

/// Files kept ready: more than the instances several associations stage at
/// once, few enough that the open descriptors do not matter.
const POOL_SIZE: usize = 32;

impl AnonymousPool {
    /// A pool for `dir`, or `None` when its file system has no `O_TMPFILE`
    /// or the node cannot link through /proc (staging then uses named
    /// files).
    fn start(dir: &Path) -> Option<AnonymousPool> {
        if let Err(e) = Self::probe(dir) {
            tracing::info!(dir = %dir.display(), error = %e, "no anonymous staging files here; staging uses named files");
            return None;
        }
        let ready = Arc::new(std::sync::Mutex::new(Vec::with_capacity(POOL_SIZE)));
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let dir = dir.to_path_buf();
        let filling = ready.clone();
        let started = std::thread::Builder::new()
            .name("huren-staging".into())
            .spawn(move || {
                loop {
                    loop {
                        let missing =
                            POOL_SIZE.saturating_sub(filling.lock().expect("staging pool").len());
                        if missing == 0 {
                            break;
                        }
                        match open_anonymous(&dir) {
                            Ok(file) => filling.lock().expect("staging pool").push(file),
                            Err(e) => {
                                // Takers open their own meanwhile and see
                                // the error themselves.
                                tracing::warn!(error = %e, "cannot open staging files ahead");
                                break;
                            }
                        }
                    }
                    if woken.recv().is_err() {
                        return;
                    }
                }
            });
        match started {
            Ok(_) => Some(AnonymousPool { ready, wake }),
            Err(_) => None,
        }
    }

    /// Opens, writes, links and removes one anonymous file.
    fn probe(dir: &Path) -> std::io::Result<()> {
        let mut file = open_anonymous(dir)?;
        file.file().write_all(b"probe")?;
        let name = dir.join(format!("probe-{}", std::process::id()));
        let _ = std::fs::remove_file(&name);
        link_anonymous(file.path(), &name)?;
        std::fs::remove_file(&name)
    }

    fn take(&self, dir: &Path) -> std::io::Result<StagingFile> {
        let (file, left) = {
            let mut ready = self.ready.lock().expect("staging pool");
            let file = ready.pop();
            (file, ready.len())
        };
        // The filler is woken once the pool is down to half, not at every
        // take: a wake-up costs this thread a futex call and the filler a
        // context switch, per instance (7% of the node's CPU with one
        // sender of small instances, docs/benchmarks.md); so it is paid
        // once per POOL_SIZE / 2 instances and the filler opens them in a
        // run.
        if left <= POOL_SIZE / 2 {
            let _ = self.wake.try_send(());
        }
        match file {
            Some(file) => Ok(file),
            // Faster than the filler: open one here.
            None => open_anonymous(dir),
        }
    }
}

/// Group commit for the local file system: callers that need their writes
/// on stable storage wait for the next `syncfs(2)`, and one call covers every
/// caller that was waiting when it started. With several associations
/// storing at once, each pays a fraction of one flush instead of several
/// fsyncs of its own. Covers the blob root's file system and any other
/// added with `cover` (the SQLite index's, when it lives elsewhere).
struct GroupSync {
    tx: std::sync::mpsc::Sender<oneshot::Sender<std::io::Result<()>>>,
    /// One open directory per file system to flush, distinct by device.
    file_systems: Arc<std::sync::Mutex<Vec<(u64, std::fs::File)>>>,
}

impl GroupSync {
    fn start(root: &Path) -> std::io::Result<GroupSync> {
        let file_systems = Arc::new(std::sync::Mutex::new(Vec::<(u64, std::fs::File)>::new()));
        let (tx, rx) = std::sync::mpsc::channel::<oneshot::Sender<std::io::Result<()>>>();
        let shared = file_systems.clone();
        std::thread::Builder::new()
            .name("huren-syncfs".into())
            .spawn(move || {
                use std::os::fd::AsRawFd;
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let mut err = None;
                    for (_, dir) in shared.lock().expect("syncfs list").iter() {
                        // SAFETY: syncfs only reads the descriptor, which the
                        // list keeps open.
                        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
                            err = Some(std::io::Error::last_os_error());
                        }
                    }
                    for reply in waiting {
                        let result = match &err {
                            None => Ok(()),
                            Some(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        };
                        let _ = reply.send(result);
                    }
                }
            })?;
        let sync = GroupSync { tx, file_systems };
        sync.cover(root)?;
        Ok(sync)
    }

    fn cover(&self, path: &Path) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let dir = std::fs::File::open(path)?;
        let dev = dir.metadata()?.dev();
        let mut list = self.file_systems.lock().expect("syncfs list");
        if !list.iter().any(|(d, _)| *d == dev) {
            list.push((dev, dir));
        }
        Ok(())
    }

    async fn sync(&self) -> Result<(), Error> {
        let (reply, wait) = oneshot::channel();
        self.tx
            .send(reply)
            .map_err(|_| Error::Io(std::io::Error::other("sync thread stopped")))?;
        wait.await
            .map_err(|_| Error::Io(std::io::Error::other("sync thread stopped")))??;
        Ok(())
    }
}

/// Runs a short file-system step (creating a staging file, writing one
/// fragment to the page cache, a rename) on the calling task's own thread.
///
/// These steps take tens of microseconds; handing them to another thread
/// (`spawn_blocking`) or handing the worker's core away (`block_in_place`)
/// cost more than the step itself (measured on the ingest path: 5,000 small
/// instances took 1.8-2.5 s this way against 2.7-2.9 s with
/// `block_in_place`). The bound on how long they block is the page cache's:
/// a write stalls only when the kernel throttles dirty pages, which slows
/// every writer alike.
pub fn run_short_blocking<T>(step: impl FnOnce() -> T) -> T {
    step()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The filler, woken only once the pool is down to half, keeps up: a
    /// run of takes three times the pool's size all get a file, and the
    /// pool is full again afterwards.
    #[test]
    fn the_staging_pool_refills_after_a_run_of_takes() {
        let dir = tempfile::tempdir().unwrap();
        let pool = AnonymousPool::start(dir.path())
            .expect("the test's file system has O_TMPFILE (Linux tmpfs and ext4 do)");
        let full = || pool.ready.lock().unwrap().len() == POOL_SIZE;
        let wait_full = || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !full() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the pool was not refilled within 10 s"
                );
                std::thread::yield_now();
            }
        };
        wait_full();
        let taken: Vec<StagingFile> = (0..3 * POOL_SIZE)
            .map(|_| pool.take(dir.path()).unwrap())
            .collect();
        assert_eq!(taken.len(), 3 * POOL_SIZE);
        wait_full();
    }

    #[test]
    fn opening_removes_stale_staging_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig::Local { root: None };
        let store = BlobStore::open(&config, dir.path(), Durability::Relaxed).unwrap();
        let shard = store.staging_dir().join("3");
        let stale = shard.join("in-stale.part");
        let fresh = shard.join("in-fresh.part");
        std::fs::write(&fresh, b"being received").unwrap();
        let file = std::fs::File::create(&stale).unwrap();
        file.set_modified(SystemTime::now() - 2 * STALE_STAGING)
            .unwrap();
        drop(file);
        assert_eq!(store.staged_file_count().unwrap(), 2);
        drop(store);
        let store = BlobStore::open(&config, dir.path(), Durability::Relaxed).unwrap();
        assert!(!stale.exists(), "a crash's leftover is removed");
        assert!(
            fresh.exists(),
            "a file another process may be writing stays"
        );
        assert_eq!(store.staged_file_count().unwrap(), 1);
    }

    /// Staging leaves no name behind, and publishing the same bytes again
    /// puts a fresh file in place (the collector's age check relies on it,
    /// src/gc.rs), through the duplicate path of `place`.
    #[tokio::test]
    async fn anonymous_staging_publishes_a_fresh_file_each_time() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let config = StorageConfig::Local { root: None };
        let store = BlobStore::open(&config, dir.path(), Durability::Relaxed).unwrap();
        assert!(store.pool.is_some(), "the test directory has O_TMPFILE");
        let mut inodes = Vec::new();
        for _ in 0..2 {
            let mut stage = store.stage_inline(b"prefix").unwrap();
            stage.write(b" and body").unwrap();
            let staged = stage.finish();
            assert_eq!(
                store.staged_file_count().unwrap(),
                0,
                "no name while staged"
            );
            let hash = staged.hash;
            store.publish(staged).await.unwrap();
            let path = store
                .local_root()
                .unwrap()
                .join(BlobStore::key(&hash).as_ref());
            assert_eq!(std::fs::read(&path).unwrap(), b"prefix and body");
            inodes.push(std::fs::metadata(&path).unwrap().ino());
        }
        assert_ne!(inodes[0], inodes[1], "the second publish is a new file");
        assert_eq!(
            store.staged_file_count().unwrap(),
            0,
            "nothing left in staging"
        );
    }

    #[test]
    fn keys_come_from_the_hash_alone() {
        let hash = BlobHash::from_hash(blake3::hash(b"x"));
        let key = BlobStore::key(&hash);
        let hex = hash.to_hex();
        assert_eq!(key.as_ref(), format!("{}/{}", &hex[..2], hex));
        assert_eq!(BlobStore::hash_of_key(&key), Some(hash));
        let cases = [".staging/in-1.part", "ab/cd", "zz/zz", "00/00/00", "00/"];
        for case in cases {
            assert_eq!(
                BlobStore::hash_of_key(&ObjectPath::from(case)),
                None,
                "{case}"
            );
        }
        // A key whose directories disagree with its name is not a blob.
        let wrong_dir = format!("00/{hex}");
        if !hex.starts_with("00") {
            assert_eq!(BlobStore::hash_of_key(&ObjectPath::from(wrong_dir)), None);
        }
    }
}
