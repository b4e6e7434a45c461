//! The spool writer thread: every [`TICK`] (50 ms, the fsync bound) it swaps out each
//! worker's buffer, appends its records in batch frames ([`frame_cut`]) to the active
//! segment and fsyncs once, and only then tells the shipper the new bytes are durable — so a
//! killed process or a lost machine loses at most one tick's records, those still in memory. It
//! rotates to a new segment past [`segment_max`] so shipped segments can be deleted, and keeps
//! [`Shared::full`] up to date for the workers' admission check.
//!
//! Framed bytes stay in memory until their fsync succeeded: a failed write is rolled back (the
//! file truncated to what it held before), a failed fsync to the last durable length, and the
//! same bytes are written again on the next tick, with the spool marked full meanwhile: records
//! are never dropped and never written twice. (One tick, one write, one fsync: the writer's cost
//! is mostly per tick — the wake-up, the swap, the syscalls — not per record; perf/RESULTS.md
//! §12 and §15.)

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::segment::{self, frame_cut};
use super::{SegmentState, Shared};

/// How often the workers' buffers are written to the segment and fsynced: the bound.
pub const TICK: Duration = Duration::from_millis(50);

pub fn segment_max(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(4 << 10, 8 << 20)
}

struct Active {
    id: u64,
    file: File,
    /// Bytes fsynced (whole frames).
    durable: u64,
}

fn open(shared: &Shared, id: u64) -> std::io::Result<Active> {
    let path = segment::segment_path(&shared.dir, id);
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&path)?;
    segment::sync_dir(&shared.dir)?;
    shared.segments().insert(
        id,
        SegmentState {
            durable: 0,
            sealed: false,
            ours: true,
        },
    );
    Ok(Active {
        id,
        file,
        durable: 0,
    })
}

pub fn spawn(shared: Arc<Shared>, first_id: u64) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let active = open(&shared, first_id)?;
    Ok(std::thread::Builder::new()
        .name("ibex-ledger-writer".into())
        .spawn(move || run(&shared, active))?)
}

fn run(shared: &Shared, mut active: Active) {
    let mut spare = super::Buffered::default();
    // Framed bytes not yet durable, how many records they hold, and how many of them are in
    // the file already (after `active.durable`).
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_records = 0u64;
    let mut written = 0usize;
    let mut failing = false;
    loop {
        let stopping = shared.stop.load(Ordering::SeqCst);
        let workers: Vec<_> = shared
            .workers
            .lock()
            .map(|w| w.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let mut buffered = 0u64;
        for w in &workers {
            w.take(&mut spare);
            frame_cut(&shared.key, &spare.bytes, &spare.cuts, &mut pending);
            pending_records += spare.records;
            buffered += u64::try_from(w.len()).unwrap_or(0);
        }
        let mut ok = true;
        if written < pending.len() {
            match append(&mut active, written, &pending[written..]) {
                Ok(()) => written = pending.len(),
                Err(err) => {
                    ok = false;
                    fail(&mut failing, "write", &err);
                }
            }
        }
        let size = active.durable + pending.len() as u64;
        // Past its size, or whenever the spool is full (so the shipper can delete what it
        // acknowledged and free the space even when the bound is smaller than a segment).
        let rotate = size >= segment_max(shared.max_bytes)
            || (size > 0 && shared.full.load(Ordering::Relaxed));
        if ok && written > 0 {
            match active.file.sync_data() {
                Ok(()) => {
                    if failing {
                        tracing::info!("usage spool writable again");
                        failing = false;
                    }
                    active.durable += pending.len() as u64;
                    shared
                        .disk_bytes
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    shared
                        .stats
                        .spooled
                        .fetch_add(pending_records, Ordering::Relaxed);
                    if let Some(s) = shared.segments().get_mut(&active.id) {
                        s.durable = active.durable;
                    }
                    pending.clear();
                    pending_records = 0;
                    written = 0;
                    shared.durable.notify_one();
                }
                Err(err) => {
                    // What the failed fsync covered may or may not be on disk: cut back to the
                    // last durable length and write it all again.
                    let _ = active.file.set_len(active.durable);
                    written = 0;
                    ok = false;
                    fail(&mut failing, "fsync", &err);
                }
            }
        }
        if rotate && ok && pending.is_empty() {
            match open(shared, active.id + 1) {
                Ok(next) => {
                    if let Some(s) = shared.segments().get_mut(&active.id) {
                        s.sealed = true;
                    }
                    active = next;
                    shared.durable.notify_one();
                }
                Err(err) => tracing::error!(error = %err, "cannot open a new usage spool segment"),
            }
        }
        let used = shared.disk_bytes.load(Ordering::Relaxed)
            + buffered
            + u64::try_from(pending.len()).unwrap_or(0);
        shared.stats.spool_bytes.store(used, Ordering::Relaxed);
        shared
            .full
            .store(failing || used >= shared.max_bytes, Ordering::Relaxed);
        if stopping && (pending.is_empty() || failing) && workers.iter().all(|w| w.is_empty()) {
            if !pending.is_empty() {
                tracing::error!(
                    records = pending_records,
                    "usage records could not be written at shutdown"
                );
            }
            return;
        }
        std::thread::park_timeout(TICK);
    }
}

fn fail(failing: &mut bool, what: &str, err: &std::io::Error) {
    if !*failing {
        tracing::error!(error = %err, op = what, "usage spool write failed; refusing metered requests until it works");
        *failing = true;
    }
}

/// Appends `bytes` after the `written` bytes already in the file past its durable length; on
/// error truncates back so a retry never duplicates a frame.
fn append(active: &mut Active, written: usize, bytes: &[u8]) -> std::io::Result<()> {
    let result = active.file.write_all(bytes);
    if result.is_err() {
        let _ = active.file.set_len(active.durable + written as u64);
    }
    result
}
