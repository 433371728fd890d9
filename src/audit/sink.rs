//! Where audit messages go: the local append-only file, always; and, when
//! configured, a syslog collector over TLS (RFC 5424 messages framed by
//! octet counting as RFC 5425 says), from a background task behind a
//! bounded queue so that a slow or absent collector never holds up a
//! C-STORE.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Messages waiting for the collector; past this many the newest are
/// dropped (and counted) rather than held in memory without bound. At a
/// few KB each this is tens of MB at most: hours of a busy node's
/// messages while the collector is down.
pub const SYSLOG_QUEUE: usize = 10_000;

/// The local audit file: opened for append (O_APPEND), so every record
/// lands at the end whatever else writes to the file, and a record is
/// never overwritten.
pub struct File {
    path: PathBuf,
    file: std::sync::Mutex<std::fs::File>,
    /// Whether the last record could not be written (readiness says so).
    failing: std::sync::atomic::AtomicBool,
    /// Records that could not be written since start.
    failures: AtomicU64,
}

impl File {
    pub fn open(path: &Path) -> Result<File, String> {
        use std::os::unix::fs::DirBuilderExt;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            // Patient IDs and names are in it: the node's user's alone.
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(File {
            path: path.to_path_buf(),
            file: std::sync::Mutex::new(file),
            failing: Default::default(),
            failures: Default::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record (a line). One `write` of the whole line, no
    /// buffer in this process: a crash loses no record that was written.
    /// A record that cannot be written whole (a full disk) is cut off
    /// again, so that the file stays one whole record per line and the
    /// next record starts a line of its own.
    pub fn append(&self, line: &str) -> std::io::Result<()> {
        let mut record = String::with_capacity(line.len() + 1);
        record.push_str(line);
        record.push('\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let before = file.metadata().map(|m| m.len());
        let written = file.write_all(record.as_bytes());
        if let Err(error) = &written {
            self.failures.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::AUDIT_WRITE_FAILURES).increment(1);
            self.failing.store(true, Ordering::Relaxed);
            tracing::error!(path = %self.path.display(), %error, "cannot write the audit log");
            match before {
                Ok(len) => {
                    if let Err(e) = file.set_len(len) {
                        tracing::error!(path = %self.path.display(), error = %e, "cannot remove a partly written audit record");
                    }
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "cannot remove a partly written audit record")
                }
            }
        } else {
            self.failing.store(false, Ordering::Relaxed);
        }
        written
    }

    /// Whether the last record could not be written.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed)
    }

    /// Records that could not be written since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Forces what was written to stable storage (at stop).
    pub fn sync(&self) {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(error) = file.sync_data() {
            tracing::error!(path = %self.path.display(), %error, "cannot sync the audit log");
        }
    }
}

/// The producer side of the syslog task.
pub struct Syslog {
    /// Taken at close: the task then delivers what is queued and ends.
    queue: std::sync::Mutex<Option<mpsc::Sender<String>>>,
    dropped: Arc<AtomicU64>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Where the collector is and how to trust it.
pub struct SyslogTarget {
    /// `host:port`; the host is also the name its certificate must carry.
    pub address: String,
    pub ca_file: PathBuf,
}

impl Syslog {
    pub fn start(target: &SyslogTarget, hostname: &str) -> Result<Syslog, String> {
        let (host, _) = target
            .address
            .rsplit_once(':')
            .ok_or_else(|| format!("{}: expected host:port", target.address))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| format!("{}: {e}", target.address))?;
        let tls = client_config(&target.ca_file)?;
        let (queue, rx) = mpsc::channel(SYSLOG_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(deliver(
            target.address.clone(),
            server_name,
            tls,
            hostname.to_string(),
            rx,
            dropped.clone(),
        ));
        Ok(Syslog {
            queue: std::sync::Mutex::new(Some(queue)),
            dropped,
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Queues a message; never waits. A full queue drops it (the local
    /// file has it) and counts the drop.
    pub fn send(&self, xml: &str) {
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(queue) = queue.as_ref() {
            offer(queue, &self.dropped, xml);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lets the task deliver what is queued, for at most `grace`.
    pub async fn close(&self, grace: Duration) {
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(mut task) = task else { return };
        let queued = self
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|q| SYSLOG_QUEUE - q.capacity())
            .unwrap_or(0);
        tokio::select! {
            _ = &mut task => {}
            _ = tokio::time::sleep(grace) => {
                task.abort();
                tracing::warn!(
                    queued,
                    "audit syslog collector unreachable at stop: queued messages not sent (they are in the local audit log)"
                );
            }
        }
    }
}

/// Puts a message on the queue, or counts it as dropped when the queue is
/// full (or the task has ended). Returns whether it was queued.
fn offer(queue: &mpsc::Sender<String>, dropped: &AtomicU64, xml: &str) -> bool {
    if queue.try_send(xml.to_string()).is_ok() {
        return true;
    }
    let n = dropped.fetch_add(1, Ordering::Relaxed) + 1;
    // The first drop and then every thousandth: a log line per message
    // would flood the log exactly when the collector is already in trouble.
    if n == 1 || n.is_multiple_of(1000) {
        tracing::warn!(
            dropped = n,
            queue = SYSLOG_QUEUE,
            "audit syslog queue full: messages dropped (they are in the local audit log)"
        );
    }
    false
}

fn client_config(ca_file: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?
    {
        let cert = cert.map_err(|e| format!("{}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate", ca_file.display()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One RFC 5424 message framed for RFC 5425 (`MSG-LEN SP SYSLOG-MSG`).
/// PRI 85: facility 10 (security/authorization), severity 5 (notice), as
/// ATNA collectors expect; MSGID `DICOM+RFC3881` (PS3.15 A.6); the MSG is
/// the XML, marked UTF-8 with a BOM (RFC 5424 6.4).
pub fn frame(hostname: &str, pid: u32, xml: &str) -> Vec<u8> {
    let timestamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let message = format!("<85>1 {timestamp} {hostname} huren {pid} DICOM+RFC3881 - \u{FEFF}{xml}");
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

type Connection = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(
    address: &str,
    server_name: &ServerName<'static>,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Connection, String> {
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(tls.clone())
            .connect(server_name.clone(), tcp)
            .await
            .map_err(|e| e.to_string())
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "connection timed out".to_string())?
}

/// Sends queued messages in order, reconnecting with backoff; a message
/// whose write failed is sent again on the next connection (a collector
/// may see it twice, never not at all while the node runs).
async fn deliver(
    address: String,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    hostname: String,
    mut rx: mpsc::Receiver<String>,
    dropped: Arc<AtomicU64>,
) {
    let pid = std::process::id();
    let mut connection: Option<Connection> = None;
    let mut backoff = Duration::from_millis(500);
    let mut down_since_drops: Option<u64> = None;
    while let Some(xml) = rx.recv().await {
        let frame = frame(&hostname, pid, &xml);
        loop {
            if connection.is_none() {
                match connect(&address, &server_name, &tls).await {
                    Ok(c) => {
                        if let Some(before) = down_since_drops.take() {
                            tracing::info!(
                                collector = %address,
                                dropped_while_down = dropped.load(Ordering::Relaxed) - before,
                                "audit syslog collector reachable again"
                            );
                        }
                        connection = Some(c);
                        backoff = Duration::from_millis(500);
                    }
                    Err(error) => {
                        if down_since_drops.is_none() {
                            down_since_drops = Some(dropped.load(Ordering::Relaxed));
                            tracing::warn!(collector = %address, %error, "audit syslog collector unreachable; messages queue (up to {SYSLOG_QUEUE}) and stay in the local audit log");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            let c = connection.as_mut().expect("connected above");
            let sent = async {
                c.write_all(&frame).await?;
                c.flush().await
            }
            .await;
            match sent {
                Ok(()) => break,
                Err(error) => {
                    tracing::warn!(collector = %address, %error, "audit syslog connection lost; reconnecting");
                    connection = None;
                }
            }
        }
    }
    if let Some(mut c) = connection {
        let _ = c.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let (tx, mut rx) = mpsc::channel(2);
        let dropped = AtomicU64::new(0);
        let queued: Vec<bool> = (0..5)
            .map(|n| offer(&tx, &dropped, &n.to_string()))
            .collect();
        assert_eq!(queued, [true, true, false, false, false]);
        assert_eq!(dropped.load(Ordering::Relaxed), 3);
        // The oldest are kept, in order.
        assert_eq!(rx.recv().await.as_deref(), Some("0"));
        assert_eq!(rx.recv().await.as_deref(), Some("1"));
    }

    #[test]
    fn frames_count_octets() {
        let f = frame("node1", 42, "<AuditMessage>é</AuditMessage>");
        let text = String::from_utf8(f).unwrap();
        let (len, rest) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), rest.len());
        assert!(rest.starts_with("<85>1 "), "{rest}");
        assert!(rest.contains(" node1 huren 42 DICOM+RFC3881 - \u{FEFF}<AuditMessage>"));
    }
}
