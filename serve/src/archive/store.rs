//! Where archive inputs and outputs live: local paths, or object-store URLs
//! (`s3://`, `gs://`, `az://`/`abfs://`, `http(s)://`) through the
//! `object_store` crate, with credentials from the usual environment variables
//! (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
//!
//! Remote GeoTIFFs are read by **range requests**: [`Location::open`] gives a
//! [`RangeReader`] that fetches the header once (kept in a process-wide header
//! cache, so opening the same object again costs no request), and then only
//! the byte ranges that the raster announces for each window's strips/tiles
//! ([`geossl_raster::Source::will_read`]). A scene is never downloaded whole.
//! Every fetched byte is counted ([`fetched`]).
//!
//! Failures are typed ([`StoreError`], with a [`StoreErrorKind`] callers branch
//! on): a **transient** one (timeout, connection reset, HTTP 429 or 5xx,
//! throttling) is retried with exponential backoff until the retry time
//! ([`set_retry_time`]) runs out, and only then reported, as
//! [`StoreErrorKind::Unavailable`]; missing objects, refused credentials and
//! bad locations are reported at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};

/// Bytes fetched from the start of an object when it is first opened (a COG's
/// header and tile index are there; GDAL's first read is the same 16 KiB).
const HEAD_BYTES: u64 = 16 << 10;
/// Ranges of one window closer than this are fetched as one request.
const COALESCE_GAP: u64 = 32 << 10;
/// Fetched bytes a reader keeps for later reads (beyond the ranges just announced).
const READER_KEEP: usize = 32 << 20;
/// Headers kept for objects opened again.
const HEADER_CACHE_BYTES: usize = 64 << 20;

/// What went wrong with a location, as callers decide on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// No such object or file.
    NotFound,
    /// Credentials missing, refused or expired.
    Denied,
    /// The store did not answer (timeouts, connection resets, 429/5xx) through every retry.
    Unavailable,
    /// A location that cannot be used as given (scheme, URL, an HTTP server asked to list).
    Invalid,
    /// Anything else the store or the file system said.
    Other,
}

/// A failure at a location; the message names it.
#[derive(Debug, thiserror::Error)]
#[error("{location}: {message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub location: String,
    pub message: String,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, location: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError { kind, location: location.into(), message: message.into() }
    }

    fn io(location: impl std::fmt::Display, e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::NotFound => StoreErrorKind::NotFound,
            K::PermissionDenied => StoreErrorKind::Denied,
            _ => StoreErrorKind::Other,
        };
        StoreError::new(kind, location.to_string(), e.to_string())
    }

    fn store(location: &str, e: object_store::Error) -> Self {
        let kind = match &e {
            object_store::Error::NotFound { .. } => StoreErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                StoreErrorKind::Denied
            }
            e if transient(e) => StoreErrorKind::Unavailable,
            _ => StoreErrorKind::Other,
        };
        StoreError::new(kind, location, e.to_string())
    }

    /// The store error carried by an I/O error (from a [`RangeReader`]), if any.
    pub fn from_io(e: &std::io::Error) -> Option<&StoreError> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<StoreError>())
    }
}

/// Whether an object-store failure is worth retrying: the transport failed (connection refused or reset,
/// timeout, an interrupted or undecodable response), or the service answered 429, 5xx or throttled.
fn transient(e: &object_store::Error) -> bool {
    let object_store::Error::Generic { .. } = e else { return false };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<object_store::client::HttpError>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            if matches!(
                io.kind(),
                K::ConnectionReset
                    | K::ConnectionAborted
                    | K::ConnectionRefused
                    | K::TimedOut
                    | K::BrokenPipe
                    | K::UnexpectedEof
                    | K::Interrupted
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    // Statuses reach here only as text (object_store keeps its retry error private).
    let text = e.to_string();
    text.contains("status code: 429")
        || text.contains("status code: 5")
        || text.contains("Server returned error response")
        || text.contains("SlowDown")
}

/// How long transient failures are retried, in milliseconds.
static RETRY_MS: AtomicU64 = AtomicU64::new(120_000);

/// How long a store request that fails transiently is retried (with backoff from 0.25 s, doubling up to
/// 8 s) before the failure is reported; zero leaves only object_store's own few quick retries.
pub fn set_retry_time(d: Duration) {
    RETRY_MS.store(d.as_millis().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
}

/// Runs `op` again while it fails transiently and the retry time lasts.
async fn retrying<T, F, Fut>(what: &str, mut op: F) -> Result<T, object_store::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, object_store::Error>>,
{
    let budget = Duration::from_millis(RETRY_MS.load(Ordering::Relaxed));
    let start = Instant::now();
    let mut delay = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if transient(&e) && start.elapsed() + delay <= budget => {
                tracing::warn!(what, attempt, error = %e, retry_in_ms = delay.as_millis() as u64, "transient store failure; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(8));
                attempt += 1;
            }
            r => return r,
        }
    }
}

static FETCHED_BYTES: AtomicU64 = AtomicU64::new(0);
static FETCH_REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Counts one request that brought `bytes` bytes.
fn count(bytes: usize) {
    FETCHED_BYTES.fetch_add(bytes as u64, Ordering::Relaxed);
    FETCH_REQUESTS.fetch_add(1, Ordering::Relaxed);
}

/// Bytes `r` of the object, counted; the error names the object and the range.
async fn get_range(store: &dyn ObjectStore, path: &ObjPath, label: &str, r: Range<u64>) -> Result<Bytes, StoreError> {
    let b = retrying(label, || store.get_range(path, r.clone()))
        .await
        .map_err(|e| StoreError::store(&format!("{label} (bytes {r:?})"), e))?;
    count(b.len());
    Ok(b)
}

/// Bytes and requests fetched from object stores by this process so far.
pub fn fetched() -> (u64, u64) {
    (FETCHED_BYTES.load(Ordering::Relaxed), FETCH_REQUESTS.load(Ordering::Relaxed))
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("geossl-store")
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the object-store runtime: {e}"))
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// Whether `s` is a URL (`scheme://…`) rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.split_once("://").is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '-')
    })
}

/// A local path or an object in a store.
#[derive(Clone)]
pub struct Location {
    repr: String,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Local(PathBuf),
    Remote { store: Arc<dyn ObjectStore>, path: ObjPath, url: url::Url },
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repr)
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repr)
    }
}

fn retry() -> object_store::RetryConfig {
    // Fail an unreachable store within seconds, not the library's default minutes.
    object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
        ..Default::default()
    }
}

/// Whether any AWS credential source is configured in the environment.
fn aws_credentials_configured() -> bool {
    [
        "AWS_ACCESS_KEY_ID",
        "AWS_SKIP_SIGNATURE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_METADATA_ENDPOINT",
    ]
    .iter()
    .any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()))
}

/// One store per bucket/container/origin, shared by every location in it.
fn store_for(url: &url::Url) -> Result<Arc<dyn ObjectStore>, StoreError> {
    // TLS through rustls with ring (the build leaves out aws-lc); once per process, before the first client.
    static TLS: std::sync::Once = std::sync::Once::new();
    TLS.call_once(|| {
        // Err only when a provider is already installed, which is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let key = format!("{}://{}", url.scheme(), url.authority());
    let mut stores = STORES.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = stores.get(&key) {
        return Ok(s.clone());
    }
    let err = |e: object_store::Error| StoreError::new(StoreErrorKind::Invalid, url.as_str(), e.to_string());
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => {
            if !aws_credentials_configured() {
                return Err(StoreError::new(
                    StoreErrorKind::Denied,
                    url.as_str(),
                    "no AWS credentials in the environment: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                     (from a Secret on Kubernetes), AWS_WEB_IDENTITY_TOKEN_FILE, AWS_SKIP_SIGNATURE=true for a \
                     public bucket, or AWS_METADATA_ENDPOINT to use the instance's credentials",
                ));
            }
            Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.as_str())
                    .with_retry(retry())
                    .build()
                    .map_err(err)?,
            )
        }
        "gs" => Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry())
                .build()
                .map_err(err)?,
        ),
        "az" | "azure" | "abfs" | "abfss" => Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry())
                .build()
                .map_err(err)?,
        ),
        "http" | "https" => Arc::new(
            object_store::http::HttpBuilder::new()
                .with_url(format!("{}://{}", url.scheme(), url.authority()))
                .with_client_options(object_store::ClientOptions::new().with_allow_http(url.scheme() == "http"))
                .with_retry(retry())
                .build()
                .map_err(err)?,
        ),
        other => {
            return Err(StoreError::new(
                StoreErrorKind::Invalid,
                url.as_str(),
                format!("unsupported scheme {other}:// (use s3://, gs://, az://, http(s):// or a path)"),
            ))
        }
    };
    stores.insert(key, store.clone());
    Ok(store)
}

impl Location {
    /// A local path (`file://` URLs too) or an object-store URL.
    pub fn parse(s: &str) -> Result<Location, StoreError> {
        if !is_url(s) {
            return Ok(Location::local(Path::new(s)));
        }
        let invalid = |m: String| StoreError::new(StoreErrorKind::Invalid, s, m);
        let url = url::Url::parse(s).map_err(|e| invalid(format!("not a URL: {e}")))?;
        if url.scheme() == "file" {
            let p = url.to_file_path().map_err(|()| invalid("not a local file URL".into()))?;
            return Ok(Location::local(&p));
        }
        let store = store_for(&url)?;
        // The bucket/container is the store's (`store_for` refuses other schemes); the object is the URL's path.
        let path = ObjPath::from_url_path(url.path()).map_err(|e| invalid(e.to_string()))?;
        Ok(Location { repr: s.to_string(), kind: Kind::Remote { store, path, url } })
    }

    pub fn local(p: &Path) -> Location {
        Location { repr: p.display().to_string(), kind: Kind::Local(p.to_path_buf()) }
    }

    pub fn is_remote(&self) -> bool {
        matches!(self.kind, Kind::Remote { .. })
    }

    /// The local path, for a local location.
    pub fn as_local(&self) -> Option<&Path> {
        match &self.kind {
            Kind::Local(p) => Some(p),
            Kind::Remote { .. } => None,
        }
    }

    /// The location as given (a path or a URL).
    pub fn as_str(&self) -> &str {
        &self.repr
    }

    /// The last part of the path (`…/T33UUP_B04.tif` → `T33UUP_B04.tif`).
    pub fn file_name(&self) -> String {
        self.repr.trim_end_matches('/').rsplit('/').next().unwrap_or(&self.repr).to_string()
    }

    /// `name` inside this directory or prefix.
    pub fn join(&self, name: &str) -> Location {
        match &self.kind {
            Kind::Local(p) => Location::local(&p.join(name)),
            Kind::Remote { store, path, url } => {
                let mut url = url.clone();
                let base = url.path().trim_end_matches('/').to_string();
                url.set_path(&format!("{base}/{name}"));
                Location {
                    repr: format!("{}/{name}", self.repr.trim_end_matches('/')),
                    kind: Kind::Remote { store: store.clone(), path: path.clone().join(name), url },
                }
            }
        }
    }

    /// Resolves a (possibly relative) reference against this location, as a
    /// STAC asset `href` against its item.
    pub fn resolve(&self, href: &str) -> Result<Location, StoreError> {
        if is_url(href) || Path::new(href).is_absolute() {
            return Location::parse(href);
        }
        match &self.kind {
            Kind::Local(p) => Ok(Location::local(&p.parent().unwrap_or(Path::new(".")).join(href))),
            Kind::Remote { url, .. } => {
                let u = url.join(href).map_err(|e| {
                    StoreError::new(StoreErrorKind::Invalid, href, format!("relative to {}: {e}", self.repr))
                })?;
                Location::parse(u.as_str())
            }
        }
    }

    /// Opens the object for reading by ranges (a buffered file, for a local path).
    pub fn open(&self) -> Result<Box<dyn geossl_raster::Source + Send>, StoreError> {
        match &self.kind {
            Kind::Local(p) => {
                let f = std::fs::File::open(p).map_err(|e| StoreError::io(p.display(), &e))?;
                Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, f)))
            }
            Kind::Remote { store, path, .. } => Ok(Box::new(RangeReader::open(store.clone(), path, &self.repr)?)),
        }
    }

    /// The whole object; `None` when there is none.
    pub fn read(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.kind {
            Kind::Local(p) => match std::fs::read(p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::io(p.display(), &e)),
            },
            Kind::Remote { store, path, .. } => {
                let got = block_on(retrying(&self.repr, || async { store.get(path).await?.bytes().await }));
                match got {
                    Ok(b) => {
                        count(b.len());
                        Ok(Some(b.to_vec()))
                    }
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(StoreError::store(&self.repr, e)),
                }
            }
        }
    }

    /// Whether the object exists.
    pub fn exists(&self) -> Result<bool, StoreError> {
        match &self.kind {
            Kind::Local(p) => Ok(p.exists()),
            Kind::Remote { store, path, .. } => match block_on(retrying(&self.repr, || store.head(path))) {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(StoreError::store(&self.repr, e)),
            },
        }
    }

    /// Writes `bytes` atomically: readers see the old object or the new one,
    /// never a part (a temporary file and a rename locally; one PUT remotely).
    /// With `create_only`, an existing object is kept and `false` returned.
    pub fn write(&self, bytes: &[u8], create_only: bool) -> Result<bool, StoreError> {
        match &self.kind {
            Kind::Local(p) => {
                if create_only && p.exists() {
                    return Ok(false);
                }
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir.display(), &e))?;
                }
                let name = p.file_name().ok_or_else(|| {
                    StoreError::new(StoreErrorKind::Invalid, p.display().to_string(), "not a file path")
                })?;
                let tmp = p.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
                let r = std::fs::write(&tmp, bytes).and_then(|()| {
                    if create_only {
                        // Hard-link: fails if another writer got there first.
                        let r = std::fs::hard_link(&tmp, p);
                        let _ = std::fs::remove_file(&tmp);
                        r
                    } else {
                        std::fs::rename(&tmp, p)
                    }
                });
                match r {
                    Ok(()) => Ok(true),
                    Err(e) if create_only && e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => {
                        let _ = std::fs::remove_file(&tmp);
                        Err(StoreError::io(p.display(), &e))
                    }
                }
            }
            Kind::Remote { store, path, .. } => {
                let mode = if create_only { PutMode::Create } else { PutMode::Overwrite };
                let payload = PutPayload::from(bytes.to_vec());
                let put =
                    || store.put_opts(path, payload.clone(), PutOptions { mode: mode.clone(), ..Default::default() });
                match block_on(retrying(&self.repr, put)) {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                    Err(e) => Err(StoreError::store(&self.repr, e)),
                }
            }
        }
    }

    /// A local file to make this location's content in before [`Location::publish`]: a hidden sibling of
    /// a local path (so the publishing rename stays on one file system), a file in the temporary
    /// directory for an object. `tag` keeps spools of one process apart.
    pub fn spool(&self, tag: &str) -> PathBuf {
        match &self.kind {
            Kind::Local(p) => p.with_file_name(format!(".{}.spool-{tag}-{}", self.file_name(), std::process::id())),
            Kind::Remote { .. } => {
                std::env::temp_dir().join(format!("geossl-spool-{tag}-{}-{}", std::process::id(), self.file_name()))
            }
        }
    }

    /// Publishes the finished file `spool` here, atomically — readers see the old object or the new one,
    /// never a part: a rename for a local path, one multipart upload (which appears when complete) for an
    /// object. The spool is gone afterwards, whether or not publishing succeeded.
    pub fn publish(&self, spool: &Path) -> Result<(), StoreError> {
        let r = self.publish_inner(spool);
        let _ = std::fs::remove_file(spool);
        r
    }

    fn publish_inner(&self, spool: &Path) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Local(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir.display(), &e))?;
                }
                std::fs::rename(spool, p).map_err(|e| StoreError::io(p.display(), &e))
            }
            Kind::Remote { store, path, .. } => {
                let at = format!("{} (uploading {})", self.repr, spool.display());
                block_on(retrying(&self.repr, || async {
                    let mut f = std::fs::File::open(spool)
                        .map_err(|e| object_store::Error::Generic { store: "local spool", source: Box::new(e) })?;
                    let upload = store.put_multipart(path).await?;
                    let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, 16 << 20);
                    let mut buf = vec![0u8; 4 << 20];
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(|e| object_store::Error::Generic { store: "local spool", source: Box::new(e) })?;
                        if n == 0 {
                            break;
                        }
                        w.wait_for_capacity(4).await?;
                        w.write(&buf[..n]);
                    }
                    w.finish().await.map(|_| ())
                }))
                .map_err(|e| StoreError::store(&at, e))
            }
        }
    }

    /// Every object under this directory or prefix (recursively), sorted.
    pub fn list(&self) -> Result<Vec<Location>, StoreError> {
        match &self.kind {
            Kind::Local(p) => {
                fn walk(d: &Path, out: &mut Vec<PathBuf>) -> Result<(), StoreError> {
                    for e in std::fs::read_dir(d).map_err(|e| StoreError::io(d.display(), &e))? {
                        let p = e.map_err(|e| StoreError::io(d.display(), &e))?.path();
                        if p.is_dir() {
                            walk(&p, out)?;
                        } else {
                            out.push(p);
                        }
                    }
                    Ok(())
                }
                let mut out = Vec::new();
                walk(p, &mut out)?;
                out.sort();
                Ok(out.iter().map(|p| Location::local(p)).collect())
            }
            Kind::Remote { store, path, url } => {
                use futures_util::TryStreamExt;
                if matches!(url.scheme(), "http" | "https") {
                    return Err(StoreError::new(
                        StoreErrorKind::Invalid,
                        &self.repr,
                        "an HTTP server cannot be listed; name its files",
                    ));
                }
                let prefix = (!path.as_ref().is_empty()).then_some(path);
                let metas: Vec<object_store::ObjectMeta> =
                    block_on(retrying(&self.repr, || store.list(prefix).try_collect()))
                        .map_err(|e| StoreError::store(&format!("{} (listing)", self.repr), e))?;
                let base = self.repr.trim_end_matches('/');
                let mut out: Vec<Location> = metas
                    .into_iter()
                    .filter_map(|m| {
                        let rel = m.location.prefix_match(path)?.map(|p| p.as_ref().to_string()).collect::<Vec<_>>();
                        let mut u = url.clone();
                        u.set_path(&format!("/{}", m.location.as_ref()));
                        Some(Location {
                            repr: format!("{base}/{}", rel.join("/")),
                            kind: Kind::Remote { store: store.clone(), path: m.location, url: u },
                        })
                    })
                    .collect();
                out.sort_by(|a, b| a.repr.cmp(&b.repr));
                Ok(out)
            }
        }
    }

    /// Removes the object (nothing when there is none).
    pub fn remove(&self) -> Result<(), StoreError> {
        match &self.kind {
            Kind::Local(p) => match std::fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::io(p.display(), &e)),
                _ => Ok(()),
            },
            Kind::Remote { store, path, .. } => match block_on(retrying(&self.repr, || store.delete(path))) {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(StoreError::store(&self.repr, e)),
            },
        }
    }

    /// Reads the object through [`parquet`]'s chunk interface: a remote
    /// Parquet file is read by ranges (footer, then the columns asked for).
    pub fn parquet_reader(&self) -> Result<ParquetSource, StoreError> {
        match &self.kind {
            Kind::Local(p) => {
                let f = std::fs::File::open(p).map_err(|e| StoreError::io(p.display(), &e))?;
                Ok(ParquetSource::Local(f))
            }
            Kind::Remote { store, path, .. } => {
                let size = block_on(retrying(&self.repr, || store.head(path)))
                    .map_err(|e| StoreError::store(&self.repr, e))?
                    .size;
                Ok(ParquetSource::Remote { store: store.clone(), path: path.clone(), size })
            }
        }
    }
}

/// A Parquet file, local or remote, for `parquet`'s synchronous readers.
#[derive(Debug)]
pub enum ParquetSource {
    Local(std::fs::File),
    Remote { store: Arc<dyn ObjectStore>, path: ObjPath, size: u64 },
}

impl parquet::file::reader::Length for ParquetSource {
    fn len(&self) -> u64 {
        match self {
            ParquetSource::Local(f) => f.len(),
            ParquetSource::Remote { size, .. } => *size,
        }
    }
}

impl parquet::file::reader::ChunkReader for ParquetSource {
    type T = Box<dyn Read + Send>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        match self {
            ParquetSource::Local(f) => Ok(Box::new(f.get_read(start)?)),
            ParquetSource::Remote { size, .. } => {
                Ok(Box::new(std::io::Cursor::new(self.get_bytes(start, (*size - start.min(*size)) as usize)?)))
            }
        }
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        match self {
            ParquetSource::Local(f) => f.get_bytes(start, length),
            ParquetSource::Remote { store, path, .. } => {
                block_on(get_range(store.as_ref(), path, path.as_ref(), start..start + length as u64))
                    .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
            }
        }
    }
}

/// Cached headers: object → (size, its first bytes).
type HeaderCache = (HashMap<String, (u64, Bytes)>, VecDeque<String>, usize);

fn header_cache() -> &'static Mutex<HeaderCache> {
    static CACHE: OnceLock<Mutex<HeaderCache>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// A remote object read by range requests, as [`Read`] + [`Seek`]: what the
/// raster announces is fetched together (ranges within 32 KiB merged, the
/// requests concurrent); any other read fetches from its position on, at
/// least 64 KiB and twice as much as the last for sequential reads.
pub struct RangeReader {
    store: Arc<dyn ObjectStore>,
    path: ObjPath,
    label: String,
    size: u64,
    pos: u64,
    /// Fetched extents by start, and their order of arrival (for eviction).
    extents: BTreeMap<u64, Bytes>,
    arrival: VecDeque<u64>,
    held: usize,
    next_fetch: u64,
    last_end: u64,
    /// Ends of the strips/tiles announced so far: a decoder that reads on past one (tiff's deflate and zstd
    /// readers buffer ahead) is at the end of its data, and gets end-of-file instead of a fetch.
    chunk_ends: std::collections::HashSet<u64>,
    /// Fetches started by [`geossl_raster::Source::prefetch`], not yet taken.
    pending: Vec<(Range<u64>, Fetching)>,
}

/// A background fetch of one byte range.
type Fetching = tokio::task::JoinHandle<Result<Bytes, StoreError>>;

/// Background fetches one reader keeps in flight at most.
const MAX_PENDING: usize = 32;

impl std::fmt::Debug for RangeReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RangeReader").field("object", &self.label).field("size", &self.size).finish()
    }
}

impl RangeReader {
    fn open(store: Arc<dyn ObjectStore>, path: &ObjPath, label: &str) -> Result<Self, StoreError> {
        let cached = header_cache().lock().unwrap_or_else(|e| e.into_inner()).0.get(label).cloned();
        let (size, head) = match cached {
            Some(c) => c,
            None => {
                let size = match block_on(retrying(label, || store.head(path))) {
                    Ok(m) => m.size,
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(StoreError::new(StoreErrorKind::NotFound, label, "no such object"))
                    }
                    Err(e) => return Err(StoreError::store(label, e)),
                };
                count(0); // the HEAD request
                let head = fetch(&store, path, label, 0..size.min(HEAD_BYTES))?;
                let mut c = header_cache().lock().unwrap_or_else(|e| e.into_inner());
                c.2 += head.len();
                c.1.push_back(label.to_string());
                c.0.insert(label.to_string(), (size, head.clone()));
                while c.2 > HEADER_CACHE_BYTES {
                    let Some(old) = c.1.pop_front() else { break };
                    if let Some((_, b)) = c.0.remove(&old) {
                        c.2 -= b.len();
                    }
                }
                (size, head)
            }
        };
        let mut r = RangeReader {
            store,
            path: path.clone(),
            label: label.to_string(),
            size,
            pos: 0,
            extents: BTreeMap::new(),
            arrival: VecDeque::new(),
            held: 0,
            next_fetch: HEAD_BYTES,
            last_end: 0,
            chunk_ends: Default::default(),
            pending: Vec::new(),
        };
        r.insert(0, head);
        Ok(r)
    }

    fn insert(&mut self, start: u64, b: Bytes) {
        self.held += b.len();
        if let Some(old) = self.extents.insert(start, b) {
            self.held -= old.len();
        } else {
            self.arrival.push_back(start);
        }
    }

    /// Drops the oldest extents beyond [`READER_KEEP`], keeping the `keep` newest.
    fn evict(&mut self, keep: usize) {
        while self.held > READER_KEEP && self.arrival.len() > keep {
            let Some(old) = self.arrival.pop_front() else { break };
            if let Some(b) = self.extents.remove(&old) {
                self.held -= b.len();
            }
        }
    }

    /// The fetched extent holding byte `pos`, if any: (its start, its bytes).
    fn extent_at(&self, pos: u64) -> Option<(u64, &Bytes)> {
        self.extents.range(..=pos).rev().find(|(s, b)| pos < *s + b.len() as u64).map(|(s, b)| (*s, b))
    }

    fn covered(&self, r: &Range<u64>) -> bool {
        self.extent_at(r.start).is_some_and(|(s, b)| r.end <= s + b.len() as u64)
    }
}

impl RangeReader {
    /// Waits for the background fetches overlapping `ranges` and keeps what they brought.
    fn settle(&mut self, ranges: &[Range<u64>]) -> std::io::Result<()> {
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i].0;
            if ranges.iter().any(|r| r.start < p.end && p.start < r.end) {
                let (r, handle) = self.pending.swap_remove(i);
                let b = block_on(handle)
                    .map_err(|e| {
                        std::io::Error::other(StoreError::new(
                            StoreErrorKind::Other,
                            &self.label,
                            format!("fetch task: {e}"),
                        ))
                    })?
                    .map_err(std::io::Error::other)?;
                self.insert(r.start, b);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    /// `ranges` less what is fetched or being fetched, merged where closer than [`COALESCE_GAP`].
    fn missing(&self, ranges: &[Range<u64>]) -> std::io::Result<Vec<Range<u64>>> {
        let mut merged: Vec<Range<u64>> = Vec::new();
        for r in ranges.iter().filter(|r| r.start < r.end && !self.covered(r)) {
            if r.end > self.size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: the file is {} bytes but its tile/strip index points to bytes {r:?} (truncated?)",
                        self.label, self.size
                    ),
                ));
            }
            if self.pending.iter().any(|(p, _)| p.start <= r.start && r.end <= p.end) {
                continue;
            }
            match merged.last_mut() {
                Some(m) if r.start <= m.end + COALESCE_GAP => m.end = m.end.max(r.end),
                _ => merged.push(r.clone()),
            }
        }
        Ok(merged)
    }
}

impl Drop for RangeReader {
    fn drop(&mut self) {
        for (_, h) in &self.pending {
            h.abort();
        }
    }
}

fn fetch(store: &Arc<dyn ObjectStore>, path: &ObjPath, label: &str, r: Range<u64>) -> Result<Bytes, StoreError> {
    tracing::debug!(object = label, start = r.start, len = r.end - r.start, "fetch");
    block_on(get_range(store.as_ref(), path, label, r))
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.size || buf.is_empty() {
            return Ok(0);
        }
        if self.extent_at(self.pos).is_none() {
            let at = self.pos..self.pos + 1;
            self.settle(std::slice::from_ref(&at))?;
        }
        if self.extent_at(self.pos).is_none() {
            if self.chunk_ends.contains(&self.pos) {
                return Ok(0);
            }
            // Sequential reads fetch more each time; a jump starts small again.
            self.next_fetch = if self.pos == self.last_end { (self.next_fetch * 2).min(8 << 20) } else { HEAD_BYTES };
            let len = self.next_fetch.max(buf.len() as u64);
            let r = self.pos..(self.pos + len).min(self.size);
            let b = fetch(&self.store, &self.path, &self.label, r.clone()).map_err(std::io::Error::other)?;
            if (b.len() as u64) < r.end - r.start {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{}: {} bytes at {} (asked {r:?})", self.label, b.len(), r.start),
                ));
            }
            self.insert(r.start, b);
            self.evict(1);
        }
        let (start, b) = self.extent_at(self.pos).ok_or_else(|| std::io::Error::other("fetched extent vanished"))?;
        let off = (self.pos - start) as usize;
        let n = buf.len().min(b.len() - off);
        buf[..n].copy_from_slice(&b[off..off + n]);
        self.pos += n as u64;
        self.last_end = self.pos;
        Ok(n)
    }
}

impl Seek for RangeReader {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let p = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = p.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

impl geossl_raster::Source for RangeReader {
    fn will_read(&mut self, ranges: &[Range<u64>]) -> std::io::Result<()> {
        self.chunk_ends.extend(ranges.iter().map(|r| r.end));
        self.settle(ranges)?;
        let merged = self.missing(ranges)?;
        if merged.is_empty() {
            return Ok(());
        }
        tracing::debug!(object = %self.label, ranges = ?merged, "fetch announced");
        let (store, path, label) = (self.store.as_ref(), &self.path, self.label.as_str());
        let got = block_on(futures_util::future::try_join_all(
            merged.iter().map(|r| get_range(store, path, label, r.clone())),
        ))
        .map_err(std::io::Error::other)?;
        let n = got.len();
        for (r, b) in merged.iter().zip(got) {
            self.insert(r.start, b);
        }
        self.evict(n);
        Ok(())
    }

    fn prefetch(&mut self, ranges: &[Range<u64>]) {
        self.chunk_ends.extend(ranges.iter().map(|r| r.end));
        // A range past the end is reported when it is read.
        let Ok(merged) = self.missing(ranges) else { return };
        for r in merged {
            if self.pending.len() >= MAX_PENDING {
                break;
            }
            tracing::debug!(object = %self.label, range = ?r, "prefetch");
            let (store, path, label) = (self.store.clone(), self.path.clone(), self.label.clone());
            let range = r.clone();
            let task = runtime().spawn(async move { get_range(store.as_ref(), &path, &label, range).await });
            self.pending.push((r, task));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert!(is_url("s3://b/k.tif") && is_url("https://x/y") && is_url("gs://b"));
        assert!(!is_url("/data/x.tif") && !is_url("rel/x.tif") && !is_url("C:/x"));
        let l = Location::parse("/data/scenes").expect("local");
        assert_eq!(l.join("a.tif").as_str(), "/data/scenes/a.tif");
        assert_eq!(l.join("a.tif").resolve("b.tif").expect("relative").as_str(), "/data/scenes/b.tif");
        let e = Location::parse("ftp://host/x.tif").expect_err("ftp").to_string();
        assert!(e.contains("unsupported scheme ftp://"), "{e}");
    }

    /// HTTPS clients get their TLS crypto provider (ring) installed: a request to a closed port is a
    /// connection error naming the object, not a panic for want of a provider.
    #[test]
    fn https_stores_have_a_tls_provider() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let l = Location::parse(&format!("https://127.0.0.1:{port}/scene.tif")).expect("https location");
        let e = l.exists().expect_err("nothing listens there").to_string();
        assert!(e.contains("scene.tif"), "{e}");
    }
}
