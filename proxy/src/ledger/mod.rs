//! The usage ledger's proxy side (SPEC §10): every forwarded request leaves one record in a
//! local spool, and a shipper moves the spool into authd (`RecordUsage`), deleting a segment
//! only after authd committed every record in it.
//!
//! Threads: a request appends its encoded record to its worker's in-memory buffer
//! ([`Recorder::record`]: one uncontended mutex, swapped out by the writer every tick) — that is
//! all the hot path does. The [`writer`] thread frames the buffers into the active segment and
//! fsyncs every 50 ms ([`writer::TICK`]), rotating segments; the [`shipper`] thread (its own
//! small tokio runtime) reads durable frames back and ships them in batches. A proxy restarted
//! on the same directory ships whatever is left. When the spool holds
//! `IBEX_USAGE_SPOOL_MAX_BYTES`, [`Recorder::admit`] says no and forwarded routes answer 503
//! `USAGE_UNAVAILABLE` until the shipper frees space.
//!
//! Not here: what a record says (built by the forwarding handler) and prices ([`prices`]).

pub mod meter;
pub mod prices;
pub mod record;
pub mod segment;
pub mod shipper;
pub mod stats;
pub mod stream_usage;
pub mod writer;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub use record::{RecordRef, UsageRecord};
pub use stats::Stats;

/// Default `IBEX_USAGE_SPOOL_MAX_BYTES`: 1 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_DIR: &str = ".ibex/spool";

#[derive(Debug, Clone)]
pub struct LedgerConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

/// A segment the shipper may read: `durable` bytes are fsynced whole frames; `sealed` means no
/// more will be written (a previous process's segments are sealed); `ours`: this process's
/// writer made it, so its durable bytes are exactly the whole frames it wrote (the shipper reads
/// them without re-checking; a previous process's segments are checked frame by frame, as a crash
/// may have torn them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentState {
    pub durable: u64,
    pub sealed: bool,
    pub ours: bool,
}

/// What the writer, the shipper and the workers share.
pub struct Shared {
    pub dir: PathBuf,
    pub key: segment::Key,
    pub max_bytes: u64,
    /// Size of the segments on disk (all of them, shipped or not, until deleted).
    pub disk_bytes: AtomicU64,
    /// Set by the writer: disk plus buffered bytes reached `max_bytes` (or the disk failed).
    pub full: AtomicBool,
    pub stop: AtomicBool,
    pub segments: Mutex<BTreeMap<u64, SegmentState>>,
    pub workers: Mutex<Vec<Arc<WorkerBuf>>>,
    pub stats: Stats,
    /// Wakes the shipper when the writer made new frames durable.
    pub durable: tokio::sync::Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain data behind; carry on with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub fn segments(&self) -> MutexGuard<'_, BTreeMap<u64, SegmentState>> {
        lock(&self.segments)
    }
}

/// Most bytes a worker holds for the writer; past it (a writer stuck in I/O) it refuses
/// metered requests like a full spool, so memory stays bounded.
pub const MAX_WORKER_BUF: usize = 16 << 20;

/// One worker's pending records: `u32` LE length + encoding, back to back ([`record::put_entry`]).
#[derive(Default)]
pub struct WorkerBuf {
    buf: Mutex<Buffered>,
    len: std::sync::atomic::AtomicUsize,
}

/// What a worker holds for the writer. The worker notes where each batch frame must start
/// ([`segment::MAX_PAYLOAD`] apart at most, at record boundaries) and how many records it holds
/// as it appends — its record is in its cache then — so the writer frames the bytes without
/// walking them (walking ~2,500 records of cold memory per tick was ~30 % of its CPU:
/// perf/RESULTS.md §15).
#[derive(Default)]
pub struct Buffered {
    pub bytes: Vec<u8>,
    /// Offsets where a new frame starts (the first starts at 0).
    pub cuts: Vec<usize>,
    pub records: u64,
}

impl Buffered {
    fn clear(&mut self) {
        self.bytes.clear();
        self.cuts.clear();
        self.records = 0;
    }

    /// Appends one record's entry, noting a cut when it would take the current frame past
    /// [`segment::MAX_PAYLOAD`].
    pub fn push(&mut self, record: &record::RecordRef<'_>) {
        let at = self.bytes.len();
        record::put_entry(record, &mut self.bytes);
        let start = self.cuts.last().copied().unwrap_or(0);
        if segment::starts_frame(start, at, self.bytes.len()) {
            self.cuts.push(at);
        }
        self.records += 1;
    }
}

impl WorkerBuf {
    /// Swaps the pending records out for `spare` (emptied; its capacity is reused).
    pub fn take(&self, spare: &mut Buffered) {
        spare.clear();
        let mut buf = lock(&self.buf);
        std::mem::swap(&mut *buf, spare);
        self.len.store(0, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        lock(&self.buf).bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A worker's handle: the only part of the ledger the request path touches.
#[derive(Clone)]
pub struct Recorder {
    buf: Arc<WorkerBuf>,
    shared: Arc<Shared>,
}

impl Recorder {
    /// False while the spool is full: the request must be refused (503 USAGE_UNAVAILABLE).
    pub fn admit(&self) -> bool {
        !self.shared.full.load(Ordering::Relaxed)
            && self.buf.len.load(Ordering::Relaxed) < MAX_WORKER_BUF
    }

    /// Appends one record (at the end of its request). Never blocks on I/O; the lock is the
    /// worker's own, shared only with the writer's swap once per tick.
    pub fn record(&self, record: &UsageRecord) {
        self.record_ref(&record.borrowed());
    }

    /// [`Recorder::record`] from borrowed parts: the request path's form (no allocation unless
    /// the worker's buffer grows).
    pub fn record_ref(&self, record: &record::RecordRef<'_>) {
        let mut buf = lock(&self.buf.buf);
        buf.push(record);
        self.buf.len.store(buf.bytes.len(), Ordering::Relaxed);
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

/// The running ledger: writer and shipper threads over one spool directory.
pub struct Ledger {
    shared: Arc<Shared>,
    /// Held for the life of the ledger: one process per spool directory.
    _lock: std::fs::File,
    writer: Option<std::thread::JoinHandle<()>>,
    shipper: Option<std::thread::JoinHandle<()>>,
}

impl Ledger {
    /// Opens (or creates) the spool and starts the writer; [`Ledger::ship`] starts the shipper.
    pub fn open(config: &LedgerConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.dir)
            .with_context(|| format!("creating IBEX_USAGE_SPOOL_DIR {}", config.dir.display()))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(config.dir.join("lock"))
            .context("opening the spool lock")?;
        if lock.try_lock().is_err() {
            anyhow::bail!(
                "IBEX_USAGE_SPOOL_DIR {} is in use by another process (each proxy needs its own)",
                config.dir.display()
            );
        }
        let key = segment::load_key(&config.dir).context("reading the spool key")?;
        let existing = segment::list(&config.dir).context("listing the spool")?;
        let mut segments = BTreeMap::new();
        let mut bytes = 0;
        for (id, len) in &existing {
            segments.insert(
                *id,
                SegmentState {
                    durable: *len,
                    sealed: true,
                    ours: false,
                },
            );
            bytes += len;
        }
        let next_id = existing.last().map_or(1, |(id, _)| id + 1);
        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            key,
            max_bytes: config.max_bytes.max(1),
            disk_bytes: AtomicU64::new(bytes),
            full: AtomicBool::new(bytes >= config.max_bytes),
            stop: AtomicBool::new(false),
            segments: Mutex::new(segments),
            workers: Mutex::new(Vec::new()),
            stats: Stats::default(),
            durable: tokio::sync::Notify::new(),
        });
        if !existing.is_empty() {
            tracing::info!(
                segments = existing.len(),
                bytes,
                "usage spool holds records from a previous run; shipping them"
            );
        }
        let writer = writer::spawn(shared.clone(), next_id)?;
        Ok(Ledger {
            shared,
            _lock: lock,
            writer: Some(writer),
            shipper: None,
        })
    }

    /// Starts the shipper thread sending to `sink`.
    pub fn ship<S: shipper::Sink + Send + 'static>(&mut self, sink: S) -> anyhow::Result<()> {
        self.shipper = Some(shipper::spawn(self.shared.clone(), sink)?);
        Ok(())
    }

    /// A handle for one worker (call once per worker thread).
    pub fn recorder(&self) -> Recorder {
        Self::recorder_for(&self.shared)
    }

    pub fn recorder_for(shared: &Arc<Shared>) -> Recorder {
        let buf = Arc::new(WorkerBuf::default());
        lock(&shared.workers).push(buf.clone());
        Recorder {
            buf,
            shared: shared.clone(),
        }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Writes and fsyncs what the workers hold, then stops both threads. What is not shipped
    /// stays in the spool for the next start.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.durable.notify_one();
        if let Some(w) = self.writer.take() {
            w.thread().unpark();
            let _ = w.join();
        }
        if let Some(s) = self.shipper.take() {
            let _ = s.join();
        }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests;
