//! The spool's on-disk format: append-only segment files of framed records.
//!
//! A frame is a magic (4 bytes), the payload length (`u32` LE), an 8-byte check, then the
//! payload. The check is a keyed MAC of length ‖ payload under the spool's key, 32 random bytes
//! kept in the spool directory (`spool.key`), so bytes a client controls (a model name) can
//! never pass for a frame of their own even if a crash tears the frame around them:
//! - [`MAGIC_BATCH`] (`IBXB`, what the writer makes): a batch frame, one per ≤ [`MAX_PAYLOAD`]
//!   of a worker's records each tick; its payload is the records as entries (each record's
//!   length, `u32` LE, then its [`RecordRef`] encoding: `ShipUsage`'s form, so the shipper
//!   sends a batch frame's payload as it is). Check: keyed BLAKE3 (key derived from the spool
//!   key), first 8 bytes — SIMD over the whole batch, a few ns per record;
//! - [`MAGIC`] (`IBXS`, the second format, still read): one record per frame, SipHash-2-4
//!   (64-bit tag; keyed with the key's last 16 bytes), ~0.1 µs per record;
//! - [`MAGIC_SHA256`] (`IBXU`, the first format, still read so a spool written before an
//!   upgrade ships): one record per frame, the first 8 bytes of SHA-256(key ‖ length ‖ payload).
//!
//! [`scan`] reads a segment's bytes front to back: a valid frame yields its records (borrowed
//! from the bytes: nothing is allocated per record); anything else (a torn tail after a crash,
//! a corrupted stretch) is skipped up to the next valid frame and counted once per stretch. It
//! never yields a partial record, the same frame twice, or a record no frame held; a batch
//! frame is taken whole or not at all (a corrupted byte loses the frame's records, ≤ 64 KiB).
//! Inside a checked batch frame, a record that does not decode (none does, by construction) is
//! skipped alone by the reader.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::record::{Entries, RecordRef};

pub const MAGIC_BATCH: [u8; 4] = *b"IBXB";
pub const MAGIC: [u8; 4] = *b"IBXS";
pub const MAGIC_SHA256: [u8; 4] = *b"IBXU";
// The resync after a bad stretch looks for the first byte of any.
const _: () = assert!(MAGIC[0] == MAGIC_SHA256[0] && MAGIC[0] == MAGIC_BATCH[0]);
const BATCH_CONTEXT: &str = "ibex-harness 2026-12-02 usage spool batch frame check";
pub const HEADER: usize = 16;
/// Records are < 1 KiB; anything claiming more is corruption.
pub const MAX_PAYLOAD: usize = 64 * 1024;
pub const KEY_FILE: &str = "spool.key";
const SUFFIX: &str = ".seg";

pub type Key = [u8; 32];

fn check(key: &Key, len: [u8; 4], payload: &[u8]) -> [u8; 8] {
    use std::hash::Hasher;
    let mut sip = [0; 16];
    sip.copy_from_slice(&key[16..]);
    let mut h = siphasher::sip::SipHasher24::new_with_key(&sip);
    h.write(&len);
    h.write(payload);
    h.finish().to_le_bytes()
}

fn check_batch(key: &Key, len: [u8; 4], payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new_keyed(&blake3::derive_key(BATCH_CONTEXT, key));
    h.update(&len);
    h.update(payload);
    let mut out = [0; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn check_sha256(key: &Key, len: [u8; 4], payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(key);
    h.update(len);
    h.update(payload);
    let d = h.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Frames `entries` (records as [`put_entry`](super::record::put_entry) wrote them, back to
/// back: a worker's buffer) into batch frames of at most [`MAX_PAYLOAD`] bytes, cut at entry
/// boundaries, appended to `out`; returns how many records they hold. A cut entry at the end
/// (never made by `put_entry`) is left out.
pub fn frame_entries(key: &Key, entries: &[u8], out: &mut Vec<u8>) -> u64 {
    let mut records = 0;
    let mut cuts = Vec::new();
    let mut end = 0;
    for entry in Entries::new(entries) {
        let start = cuts.last().copied().unwrap_or(0);
        if starts_frame(start, end, end + 4 + entry.len()) {
            cuts.push(end);
        }
        end += 4 + entry.len();
        records += 1;
    }
    frame_cut(key, &entries[..end], &cuts, out);
    records
}

/// Whether the entry at `[at, end)` must start a new batch frame, the current one starting at
/// `frame_start`: it would take that frame past [`MAX_PAYLOAD`] (and the frame holds another).
pub fn starts_frame(frame_start: usize, at: usize, end: usize) -> bool {
    end - frame_start > MAX_PAYLOAD && at > frame_start
}

/// [`frame_entries`] for entries whose frame boundaries are known (`cuts`: where each frame
/// after the first starts, ascending; a worker notes them as it appends, [`Buffered`]): no walk.
///
/// [`Buffered`]: super::Buffered
pub fn frame_cut(key: &Key, entries: &[u8], cuts: &[usize], out: &mut Vec<u8>) {
    let mut start = 0;
    for &cut in cuts {
        frame_as(MAGIC_BATCH, check_batch, key, &entries[start..cut], out);
        start = cut;
    }
    if start < entries.len() {
        frame_as(MAGIC_BATCH, check_batch, key, &entries[start..], out);
    }
}

/// Appends one frame of the second format holding one record's `payload` to `out` (for the
/// tests and the bench; the writer makes batch frames, [`frame_cut`]).
pub fn frame(key: &Key, payload: &[u8], out: &mut Vec<u8>) {
    frame_as(MAGIC, check, key, payload, out);
}

/// A frame of the first format (SHA-256 check), as a spool written before the upgrade holds
/// (for the tests and the bench; the writer makes [`frame`]s).
pub fn frame_sha256(key: &Key, payload: &[u8], out: &mut Vec<u8>) {
    frame_as(MAGIC_SHA256, check_sha256, key, payload, out);
}

fn frame_as(
    magic: [u8; 4],
    check: fn(&Key, [u8; 4], &[u8]) -> [u8; 8],
    key: &Key,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    out.extend_from_slice(&magic);
    out.extend_from_slice(&len);
    out.extend_from_slice(&check(key, len, payload));
    out.extend_from_slice(payload);
}

/// One step of a scan, with the offset just past what it covers.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<'a> {
    /// A record of a one-record frame (the older formats), the payload it was decoded from (its
    /// compact encoding), and the offset past its frame.
    Record(RecordRef<'a>, &'a [u8], usize),
    /// A batch frame's records, and the offset past it.
    Batch(BatchFrame<'a>, usize),
    /// A stretch that is no valid frame (torn or corrupted), skipped.
    Skipped(usize),
}

/// The entries of one batch frame (records as the writer framed them; the reader decodes each,
/// and one that does not decode is the reader's to skip, never the whole frame's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchFrame<'a> {
    /// The records as entries (length + encoding), as `ShipUsage` carries them.
    pub entries: &'a [u8],
    /// How many entries.
    pub count: u64,
}

impl<'a> BatchFrame<'a> {
    /// The records that decode, in order.
    pub fn records(&self) -> impl Iterator<Item = RecordRef<'a>> + 'a {
        Entries::new(self.entries).filter_map(RecordRef::decode)
    }
}

enum Frame<'a> {
    One(RecordRef<'a>, &'a [u8]),
    Batch(BatchFrame<'a>),
}

/// A batch frame's payload: at least one entry, and the entries' lengths add up to it.
fn batch_at(payload: &[u8]) -> Option<BatchFrame<'_>> {
    let mut walk = Entries::new(payload);
    let count = walk.by_ref().count() as u64;
    (count > 0 && walk.rest().is_empty()).then_some(BatchFrame {
        entries: payload,
        count,
    })
}

/// The valid frame at the start of `bytes`: its record(s) and length. `key: None` takes the
/// frame as written without its check (bytes this process framed itself, read back from a
/// frame boundary).
fn frame_at<'a>(key: Option<&Key>, bytes: &'a [u8]) -> Option<(Frame<'a>, usize)> {
    let head = bytes.get(..HEADER)?;
    let check: fn(&Key, [u8; 4], &[u8]) -> [u8; 8] = match head[..4].try_into().ok()? {
        MAGIC_BATCH => check_batch,
        MAGIC => check,
        MAGIC_SHA256 => check_sha256,
        _ => return None,
    };
    let batch = head[..4] == MAGIC_BATCH;
    let len_bytes: [u8; 4] = head[4..8].try_into().ok()?;
    let len = usize::try_from(u32::from_le_bytes(len_bytes)).ok()?;
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(HEADER..HEADER + len)?;
    if let Some(key) = key {
        if head[8..16] != check(key, len_bytes, payload) {
            return None;
        }
    }
    let frame = if batch {
        Frame::Batch(batch_at(payload)?)
    } else {
        Frame::One(RecordRef::decode(payload)?, payload)
    };
    Some((frame, HEADER + len))
}

/// Scans `bytes` (offsets relative to `base`), in order.
pub fn scan<'a>(key: &Key, bytes: &'a [u8], base: usize) -> Vec<Item<'a>> {
    Scan::new(key, bytes, base).collect()
}

/// [`scan`] step by step: a reader that stops early (a full batch) verifies nothing past it.
pub struct Scan<'k, 'a> {
    key: &'k Key,
    /// Skip the checks of frames that parse (see [`Scan::trusted`]).
    trusted: bool,
    bytes: &'a [u8],
    base: usize,
    pos: usize,
    /// Where a frame may still start that the end of `bytes` cuts (see [`Scan::read_short`]):
    /// nothing from here on is skipped as torn.
    limit: usize,
}

impl<'k, 'a> Scan<'k, 'a> {
    pub fn new(key: &'k Key, bytes: &'a [u8], base: usize) -> Self {
        Scan {
            key,
            trusted: false,
            bytes,
            base,
            pos: 0,
            limit: bytes.len(),
        }
    }

    /// The bytes end where a read stopped, not where the segment does (the shipper reads at
    /// most a batch's bytes at a time): a frame the end cuts is not torn. The scan stops before
    /// any position a whole frame would not fit behind, rather than skip it, so the next read,
    /// from the offset of the last item, sees it whole.
    pub fn read_short(mut self) -> Self {
        self.limit = self.bytes.len().saturating_sub(HEADER + MAX_PAYLOAD);
        self
    }

    /// A scan of whole frames this process's writer wrote, from a frame boundary (a segment of
    /// this process up to its durable length): nothing a crash could tear, so each frame is
    /// taken without recomputing its check. Anything that does not parse is still scanned with
    /// the checks, as [`Scan::new`] does.
    pub fn trusted(key: &'k Key, bytes: &'a [u8], base: usize) -> Self {
        Scan {
            trusted: true,
            ..Scan::new(key, bytes, base)
        }
    }
}

impl<'a> Iterator for Scan<'_, 'a> {
    type Item = Item<'a>;

    fn next(&mut self) -> Option<Item<'a>> {
        let (bytes, pos) = (self.bytes, self.pos);
        if pos >= bytes.len() {
            return None;
        }
        let fast = if self.trusted {
            frame_at(None, &bytes[pos..])
        } else {
            None
        };
        if let Some((frame, len)) = fast.or_else(|| frame_at(Some(self.key), &bytes[pos..])) {
            self.pos = pos + len;
            let end = self.base + self.pos;
            return Some(match frame {
                Frame::One(record, payload) => Item::Record(record, payload, end),
                Frame::Batch(batch) => Item::Batch(batch, end),
            });
        }
        if pos >= self.limit {
            // Perhaps a frame cut by where the read stopped: for the next read.
            return None;
        }
        // Once anything failed to parse, check every frame from here on.
        self.trusted = false;
        // Skip to the next position that starts a valid frame (or the end, or the limit).
        let limit = self.limit;
        let mut next = pos + 1;
        while next < limit {
            match bytes[next..limit].iter().position(|&b| b == MAGIC[0]) {
                None => next = limit,
                Some(i) => {
                    next += i;
                    if frame_at(Some(self.key), &bytes[next..]).is_some() {
                        break;
                    }
                    next += 1;
                }
            }
        }
        self.pos = next.min(limit);
        Some(Item::Skipped(self.base + self.pos))
    }
}

pub fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

/// Segment ids in `dir` with their sizes, oldest first.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        // A segment the shipper deleted since the directory was read is simply gone.
        match entry.metadata() {
            Ok(m) => out.push((id, m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads `[from, to)` of a segment.
pub fn read_range(dir: &Path, id: u64, from: u64, to: u64) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    read_range_into(dir, id, from, to, &mut buf)?;
    Ok(buf)
}

/// [`read_range`] into `buf` (cleared first; its capacity is reused).
pub fn read_range_into(
    dir: &Path,
    id: u64,
    from: u64,
    to: u64,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    use std::io::Seek;
    buf.clear();
    let mut file = fs::File::open(segment_path(dir, id))?;
    file.seek(io::SeekFrom::Start(from))?;
    buf.reserve(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
    file.take(to.saturating_sub(from)).read_to_end(buf)?;
    Ok(())
}

/// At most `cap` bytes of `[from, to)` into `buf`; true when that stopped short of `to` (scan
/// them with [`Scan::read_short`]). `cap` must exceed a whole frame ([`HEADER`] +
/// [`MAX_PAYLOAD`]) so every read makes progress.
pub fn read_capped_into(
    dir: &Path,
    id: u64,
    from: u64,
    to: u64,
    cap: u64,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    debug_assert!(cap > (HEADER + MAX_PAYLOAD) as u64);
    let end = to.min(from.saturating_add(cap));
    read_range_into(dir, id, from, end, buf)?;
    Ok(end < to)
}

/// The spool's key: read from `dir`, or made (random) and written durably on first use.
pub fn load_key(dir: &Path) -> io::Result<Key> {
    let path = dir.join(KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => bytes
            .try_into()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "spool.key is not 32 bytes")),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            let key: Key = rand::random();
            let tmp = dir.join("spool.key.tmp");
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&key)?;
            file.sync_all()?;
            fs::rename(&tmp, &path)?;
            sync_dir(dir)?;
            Ok(key)
        }
        Err(err) => Err(err),
    }
}

/// Makes a created, renamed or removed entry of `dir` durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
#[path = "segment_tests.rs"]
mod tests;
