//! Checkpoint files: `DATA_DIR/checkpoints/{epoch:020}/`, one `d{dataflow}-w{worker}.bin` per
//! dataflow and worker thread (that thread's aggregate state as of the epoch), and `COMPLETE`,
//! written last by the process once all its threads wrote theirs (the process's part: which
//! dataflows the checkpoint holds, and the batch ids it remembers).
//!
//! Every file is `SUNDCKPT | version: u32 LE | crc32c(payload): u32 LE | len: u64 LE | payload`,
//! written to a temporary name, synced, and renamed into place (then the directory is synced),
//! so a file is either whole or absent. A file of a newer format version is refused with a
//! message saying so; a checksum mismatch is reported as corruption.
//!
//! A checkpoint at epoch `C` holds every batch with an epoch before `C`; the ingest logs hold
//! the rest. Once every process has `C` complete (the coordinator says so), older checkpoints
//! and the log segments `C` covers are deleted.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use sundial_protocol::IngestOutcome;

/// The first bytes of every checkpoint file.
pub const MAGIC: &[u8; 8] = b"SUNDCKPT";
/// The checkpoint format this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER: usize = 24;
const COMPLETE: &str = "COMPLETE";

/// A process's part of a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessCheckpoint {
    /// The checkpoint's epoch.
    pub epoch: u64,
    /// Worker threads of the process.
    pub threads: usize,
    /// The dataflows (catalog ids) whose state every thread wrote.
    pub dataflows: Vec<u64>,
    /// Batch ids remembered for answering retries, with their outcomes.
    pub batches: Vec<(String, IngestOutcome)>,
}

/// The folder of the checkpoint at `epoch`.
pub fn dir(data_dir: &Path, epoch: u64) -> PathBuf {
    data_dir.join("checkpoints").join(format!("{epoch:020}"))
}

/// The file of one dataflow's state on one worker thread.
pub fn state_file(data_dir: &Path, epoch: u64, dataflow: u64, worker: usize) -> PathBuf {
    dir(data_dir, epoch).join(format!("d{dataflow}-w{worker}.bin"))
}

/// Writes `payload` to `path` atomically (temporary file, sync, rename, sync the folder).
pub fn write(path: &Path, payload: &[u8]) -> io::Result<()> {
    let parent = path.parent().ok_or_else(|| io::Error::other("a checkpoint file needs a folder"))?;
    fs::create_dir_all(parent)?;
    let tmp = path.with_extension("tmp");
    let result = (|| {
        let mut file = File::create(&tmp)?;
        let mut head = Vec::with_capacity(HEADER);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
        head.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.write_all(&head)?;
        file.write_all(payload)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(parent)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a file written by [`write`], checking its format version and checksum.
pub fn read(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return Err(format!("{}: not a sundial checkpoint file", path.display()));
    }
    let word = |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let version = word(8);
    if version > VERSION {
        return Err(format!(
            "{}: checkpoint format version {version} is newer than this build reads ({VERSION}); run a newer sundial",
            path.display()
        ));
    }
    if version != VERSION {
        return Err(format!("{}: checkpoint format version {version} is not supported", path.display()));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[16..24]);
    let payload = &bytes[HEADER..];
    if u64::from_le_bytes(len) != payload.len() as u64 || crc32c::crc32c(payload) != word(12) {
        return Err(format!("{}: corrupt checkpoint (length or checksum mismatch)", path.display()));
    }
    Ok(payload.to_vec())
}

/// Writes the process's `COMPLETE` file of a checkpoint.
pub fn write_complete(data_dir: &Path, part: &ProcessCheckpoint) -> io::Result<()> {
    let payload = bincode::serialize(part).map_err(|e| io::Error::other(e.to_string()))?;
    write(&dir(data_dir, part.epoch).join(COMPLETE), &payload)
}

/// Reads the process's `COMPLETE` file of the checkpoint at `epoch`.
pub fn read_complete(data_dir: &Path, epoch: u64) -> Result<ProcessCheckpoint, String> {
    let path = dir(data_dir, epoch).join(COMPLETE);
    let payload = read(&path)?;
    bincode::deserialize(&payload).map_err(|e| format!("{}: {e}", path.display()))
}

/// The epochs of the checkpoints this process has complete, oldest first.
pub fn complete(data_dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(data_dir.join("checkpoints")) else { return Vec::new() };
    let mut out: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join(COMPLETE).is_file())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .collect();
    out.sort_unstable();
    out
}

/// Sets the checkpoint at `epoch` aside as damaged (renamed to `{epoch}.damaged`, kept for
/// inspection), so that the next generation falls back to an older one. Returns the new path.
pub fn set_aside(data_dir: &Path, epoch: u64) -> io::Result<PathBuf> {
    let from = dir(data_dir, epoch);
    let to = from.with_extension("damaged");
    let _ = fs::remove_dir_all(&to);
    fs::rename(&from, &to)?;
    Ok(to)
}

/// Deletes every checkpoint folder before `epoch` (complete or not). Returns how many.
pub fn delete_before(data_dir: &Path, epoch: u64) -> io::Result<usize> {
    let entries = match fs::read_dir(data_dir.join("checkpoints")) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut deleted = 0;
    for entry in entries {
        let entry = entry?;
        let older = entry.file_name().to_str().and_then(|n| n.parse::<u64>().ok()).is_some_and(|e| e < epoch);
        if older {
            fs::remove_dir_all(entry.path())?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// Bytes of all checkpoint files.
pub fn bytes(data_dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(data_dir.join("checkpoints")) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| fs::read_dir(e.path()).ok())
        .flatten()
        .filter_map(|f| f.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_refuse_damage_and_newer_versions() {
        let dir = tempfile::tempdir().unwrap();
        let path = state_file(dir.path(), 42, 3, 1);
        write(&path, b"state").unwrap();
        assert_eq!(read(&path).unwrap(), b"state");

        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(read(&path).unwrap_err().contains("corrupt"));

        bytes[last] ^= 1;
        bytes[8] = 9;
        fs::write(&path, &bytes).unwrap();
        let err = read(&path).unwrap_err();
        assert!(err.contains("version 9 is newer"), "{err}");
    }

    #[test]
    fn only_complete_checkpoints_count_and_old_ones_go() {
        let dir = tempfile::tempdir().unwrap();
        for epoch in [10, 20, 30] {
            write(&state_file(dir.path(), epoch, 1, 0), b"x").unwrap();
        }
        for epoch in [10, 20] {
            let part = ProcessCheckpoint { epoch, threads: 1, dataflows: vec![1], batches: Vec::new() };
            write_complete(dir.path(), &part).unwrap();
        }
        assert_eq!(complete(dir.path()), vec![10, 20], "30 has no COMPLETE");
        assert_eq!(read_complete(dir.path(), 20).unwrap().dataflows, vec![1]);
        assert!(bytes(dir.path()) > 0);
        assert_eq!(delete_before(dir.path(), 20).unwrap(), 1);
        assert_eq!(complete(dir.path()), vec![20]);
    }
}
