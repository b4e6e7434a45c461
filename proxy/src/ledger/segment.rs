//! The spool's on-disk format: append-only segment files of framed records.
//!
//! A frame is `MAGIC` (4 bytes), the payload length (`u32` LE), an 8-byte check, then the
//! payload (a [`UsageRecord`] encoding). The check is the first 8 bytes of
//! SHA-256(spool key ‖ length ‖ payload); the key is 32 random bytes kept in the spool directory
//! (`spool.key`), so bytes a client controls (a model name) can never pass for a frame of their
//! own even if a crash tears the frame around them.
//!
//! [`scan`] reads a segment's bytes front to back: a valid frame yields its record; anything
//! else (a torn tail after a crash, a corrupted stretch) is skipped up to the next valid frame
//! and counted once per stretch. It never yields a partial record, the same frame twice, or a
//! record no frame held.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::record::UsageRecord;

pub const MAGIC: [u8; 4] = *b"IBXU";
pub const HEADER: usize = 16;
/// Records are < 1 KiB; anything claiming more is corruption.
pub const MAX_PAYLOAD: usize = 64 * 1024;
pub const KEY_FILE: &str = "spool.key";
const SUFFIX: &str = ".seg";

pub type Key = [u8; 32];

fn check(key: &Key, len: [u8; 4], payload: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(key);
    h.update(len);
    h.update(payload);
    let d = h.finalize();
    let mut out = [0; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Appends one frame holding `payload` to `out`.
pub fn frame(key: &Key, payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_le_bytes();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len);
    out.extend_from_slice(&check(key, len, payload));
    out.extend_from_slice(payload);
}

/// One step of a scan, with the offset just past what it covers.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Record(Box<UsageRecord>, usize),
    /// A stretch that is no valid frame (torn or corrupted), skipped.
    Skipped(usize),
}

/// The valid frame at the start of `bytes`: its record and length.
fn frame_at(key: &Key, bytes: &[u8]) -> Option<(UsageRecord, usize)> {
    let head = bytes.get(..HEADER)?;
    if head[..4] != MAGIC {
        return None;
    }
    let len_bytes: [u8; 4] = head[4..8].try_into().ok()?;
    let len = usize::try_from(u32::from_le_bytes(len_bytes)).ok()?;
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(HEADER..HEADER + len)?;
    if head[8..16] != check(key, len_bytes, payload) {
        return None;
    }
    Some((UsageRecord::decode(payload)?, HEADER + len))
}

/// Scans `bytes` (offsets relative to `base`), in order.
pub fn scan(key: &Key, bytes: &[u8], base: usize) -> Vec<Item> {
    let mut items = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        if let Some((record, len)) = frame_at(key, &bytes[pos..]) {
            pos += len;
            items.push(Item::Record(Box::new(record), base + pos));
            continue;
        }
        // Skip to the next position that starts a valid frame (or the end).
        let mut next = pos + 1;
        while next < bytes.len() {
            match bytes[next..].iter().position(|&b| b == MAGIC[0]) {
                None => next = bytes.len(),
                Some(i) => {
                    next += i;
                    if frame_at(key, &bytes[next..]).is_some() {
                        break;
                    }
                    next += 1;
                }
            }
        }
        pos = next.min(bytes.len());
        items.push(Item::Skipped(base + pos));
    }
    items
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
        out.push((id, entry.metadata()?.len()));
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads `[from, to)` of a segment.
pub fn read_range(dir: &Path, id: u64, from: u64, to: u64) -> io::Result<Vec<u8>> {
    use std::io::Seek;
    let mut file = fs::File::open(segment_path(dir, id))?;
    file.seek(io::SeekFrom::Start(from))?;
    let mut buf = Vec::with_capacity(usize::try_from(to.saturating_sub(from)).unwrap_or(0));
    file.take(to.saturating_sub(from)).read_to_end(&mut buf)?;
    Ok(buf)
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
