//! The spool writer thread: every [`TICK`] it swaps out each worker's buffer, frames the
//! records into the active segment, fsyncs once, and only then tells the shipper the new bytes
//! are durable. It rotates to a new segment past [`segment_max`] so shipped segments can be
//! deleted, and keeps [`Shared::full`] up to date for the workers' admission check.
//!
//! A failed write is rolled back (the file truncated to its last durable length) and retried on
//! the next tick with the same records, with the spool marked full meanwhile: records are never
//! dropped and never written twice.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::segment::{self, frame};
use super::{SegmentState, Shared};

/// fsync cadence (SPEC/issue: at most every 50 ms).
pub const TICK: Duration = Duration::from_millis(10);

/// Segment size at which the writer rotates: 1/16 of the bound, within [4 KiB, 8 MiB].
pub fn segment_max(max_bytes: u64) -> u64 {
    (max_bytes / 16).clamp(4 << 10, 8 << 20)
}

struct Active {
    id: u64,
    file: File,
    len: u64,
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
        },
    );
    Ok(Active { id, file, len: 0 })
}

pub fn spawn(shared: Arc<Shared>, first_id: u64) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let active = open(&shared, first_id)?;
    Ok(std::thread::Builder::new()
        .name("ibex-ledger-writer".into())
        .spawn(move || run(&shared, active))?)
}

fn run(shared: &Shared, mut active: Active) {
    let mut spare = Vec::new();
    // Framed bytes not yet durable, and how many records they hold.
    let mut pending: Vec<u8> = Vec::new();
    let mut pending_records = 0u64;
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
            let mut rest = spare.as_slice();
            while rest.len() >= 4 {
                let (len, tail) = rest.split_at(4);
                let len = usize::try_from(u32::from_le_bytes([len[0], len[1], len[2], len[3]]))
                    .unwrap_or(usize::MAX);
                let Some(payload) = tail.get(..len) else {
                    break;
                };
                frame(&shared.key, payload, &mut pending);
                pending_records += 1;
                rest = &tail[len..];
            }
            buffered += u64::try_from(w.len()).unwrap_or(0);
        }
        if !pending.is_empty() {
            match write(&mut active, &pending) {
                Ok(()) => {
                    if failing {
                        tracing::info!("usage spool writable again");
                        failing = false;
                    }
                    shared
                        .disk_bytes
                        .fetch_add(u64::try_from(pending.len()).unwrap_or(0), Ordering::Relaxed);
                    shared
                        .stats
                        .spooled
                        .fetch_add(pending_records, Ordering::Relaxed);
                    if let Some(s) = shared.segments().get_mut(&active.id) {
                        s.durable = active.len;
                    }
                    pending.clear();
                    pending_records = 0;
                    shared.durable.notify_one();
                }
                Err(err) => {
                    if !failing {
                        tracing::error!(error = %err, "usage spool write failed; refusing metered requests until it works");
                        failing = true;
                    }
                }
            }
        }
        // Past its size, or whenever the spool is full (so the shipper can delete what it
        // acknowledged and free the space even when the bound is smaller than a segment).
        let rotate = active.len >= segment_max(shared.max_bytes)
            || (active.len > 0 && shared.full.load(Ordering::Relaxed));
        if rotate && !failing {
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

/// Appends and fsyncs; on error truncates back so a retry never duplicates a frame.
fn write(active: &mut Active, bytes: &[u8]) -> std::io::Result<()> {
    let result = active
        .file
        .write_all(bytes)
        .and_then(|()| active.file.sync_data());
    match result {
        Ok(()) => {
            active.len += u64::try_from(bytes.len()).unwrap_or(0);
            Ok(())
        }
        Err(err) => {
            let _ = active.file.set_len(active.len);
            Err(err)
        }
    }
}
