//! The ingest log of one ingest partition (one worker thread): every accepted batch is appended
//! here before its reply is sent, so that a restarted worker can replay what it accepted.
//!
//! Layout: `DIR/{first_epoch:020}-{seq:06}.seg`, segments in name order. A segment starts with
//! a 16-byte header: the magic `SUNDLOG\0`, the format version (u32 LE) and 4 reserved bytes.
//! Records follow, each `len: u32 LE | crc32c(payload): u32 LE | payload`, the payload being the
//! bincode encoding of a [`Record`]. Epochs never go back within a partition, so a segment holds
//! records with epochs from its first epoch up to the next segment's first epoch.
//!
//! On open, the last segment is scanned: a torn or corrupt tail (a short record, a checksum that
//! does not match, a payload that does not decode) is cut off at the last good record and
//! reported, never loaded. A failed append is cut off the same way before the error is
//! returned, so nothing half-written stays behind an acknowledged record.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use sundial_dataflows::row::Row;

/// The first bytes of every segment.
pub const MAGIC: &[u8; 8] = b"SUNDLOG\0";
/// The segment format this build writes and reads.
pub const VERSION: u32 = 1;
const HEADER_LEN: u64 = 16;
/// A segment is closed once it holds this much (a larger record gets a segment of its own),
/// unless `SUNDIAL_LOG_SEGMENT_BYTES` says otherwise (at least 4096).
pub const SEGMENT_BYTES: u64 = 64 << 20;

fn segment_bytes() -> u64 {
    static BYTES: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *BYTES.get_or_init(|| {
        std::env::var("SUNDIAL_LOG_SEGMENT_BYTES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(SEGMENT_BYTES, |b| b.max(4096))
    })
}
/// An append's buffer is kept for the next one up to this size.
const KEPT_FRAME_BYTES: usize = 16 << 20;
/// The largest record read back; anything larger is corruption.
const MAX_RECORD: u32 = 512 << 20;

/// What the log holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Record {
    /// The accepted events of one ingest batch.
    Batch {
        /// The epoch they entered at.
        epoch: u64,
        /// Their source.
        source: String,
        /// The producer's batch id, for answering its retries from the log.
        batch: Option<String>,
        /// The accepted events (late ones are not logged: they were never accepted).
        rows: Vec<Row>,
        /// The batch's outcome, answered again to a retry.
        rejected: u64,
        /// Events dropped as late.
        late: u64,
    },
    /// A dataflow started reading this partition at `epoch`: batches before it are not its input.
    Installed {
        /// The dataflow's catalog id.
        dataflow: u64,
        /// The partition's epoch when it was installed.
        epoch: u64,
    },
}

/// [`Record`] with borrowed parts, for appending without copying; bincode encodes it exactly as
/// the owned record (same variant order and fields).
#[derive(Serialize)]
enum RecordRef<'a> {
    Batch { epoch: u64, source: &'a str, batch: Option<&'a str>, rows: &'a [Row], rejected: u64, late: u64 },
}

impl Record {
    /// The epoch of the record.
    pub fn epoch(&self) -> u64 {
        match self {
            Record::Batch { epoch, .. } | Record::Installed { epoch, .. } => *epoch,
        }
    }
}

/// When appended records are synced to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After every record, data and metadata (`fsync`).
    Always,
    /// Once per ingest reply (`fdatasync`); each reply covers one record per partition.
    Batch,
    /// At most this often; replies do not wait, so a machine crash (not a process crash) can
    /// lose the last interval's acknowledged records.
    Interval(Duration),
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Fsync, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "batch" => Ok(Fsync::Batch),
            other => match other.strip_prefix("interval:") {
                Some(ms) => match ms.parse::<u64>() {
                    Ok(ms) if ms > 0 => Ok(Fsync::Interval(Duration::from_millis(ms))),
                    _ => Err(format!("{other:?}: the interval must be a positive number of milliseconds")),
                },
                None => Err(format!("{other:?} is not always, batch or interval:MS")),
            },
        }
    }
}

impl std::fmt::Display for Fsync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fsync::Always => write!(f, "always"),
            Fsync::Batch => write!(f, "batch"),
            Fsync::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

/// A segment file: its first epoch, sequence number and path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment {
    /// The epoch of its first record.
    pub first_epoch: u64,
    /// Orders segments with the same first epoch.
    pub seq: u64,
    /// The file.
    pub path: PathBuf,
}

/// The segments in `dir`, in order (none when it does not exist).
pub fn segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let Some(stem) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".seg")) else {
            continue;
        };
        let Some((epoch, seq)) = stem.split_once('-') else { continue };
        if let (Ok(first_epoch), Ok(seq)) = (epoch.parse(), seq.parse()) {
            out.push(Segment { first_epoch, seq, path });
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the segments of `dir` whose records all have epochs before `epoch` (a checkpoint at
/// `epoch` covers them). The newest segment is never deleted. Returns the bytes freed.
pub fn delete_covered(dir: &Path, epoch: u64) -> io::Result<u64> {
    let segs = segments(dir)?;
    let mut freed = 0;
    for pair in segs.windows(2) {
        // Every record of a segment is at most the next segment's first epoch.
        if pair[1].first_epoch < epoch {
            freed += fs::metadata(&pair[0].path).map(|m| m.len()).unwrap_or(0);
            fs::remove_file(&pair[0].path)?;
        }
    }
    Ok(freed)
}

/// Bytes of all segments in `dir`.
pub fn bytes(dir: &Path) -> u64 {
    segments(dir).map(|s| s.iter().filter_map(|s| fs::metadata(&s.path).ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

/// Why a log cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O error.
    #[error("ingest log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A segment of another format.
    #[error("ingest log {path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

fn check_header(path: &Path, header: &[u8]) -> Result<(), LogError> {
    if header.len() < HEADER_LEN as usize || &header[..8] != MAGIC {
        return Err(LogError::Format { path: path.to_path_buf(), reason: "not a sundial log segment".into() });
    }
    let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    if version != VERSION {
        return Err(LogError::Format {
            path: path.to_path_buf(),
            reason: format!("segment format version {version}; this build reads version {VERSION} only"),
        });
    }
    Ok(())
}

/// Reads the next record of `reader`, which has `left` bytes to go: `Ok(None)` at a clean end,
/// `Err(reason)` for a torn or corrupt record. A damaged length field cannot make it allocate
/// more than the file holds.
fn next_record(reader: &mut impl Read, scratch: &mut Vec<u8>, left: u64) -> Result<Option<(Record, u64)>, String> {
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match reader.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(format!("torn record header ({got} of 8 bytes)")),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len > MAX_RECORD {
        return Err(format!("record length {len} is beyond any record"));
    }
    if u64::from(len) + 8 > left {
        return Err(format!("torn record ({len} bytes announced, {} left)", left.saturating_sub(8)));
    }
    scratch.clear();
    scratch.resize(len as usize, 0);
    reader.read_exact(scratch).map_err(|_| format!("torn record (fewer than its {len} bytes)"))?;
    if crc32c::crc32c(scratch) != crc {
        return Err("record checksum mismatch".into());
    }
    let record = bincode::deserialize(scratch).map_err(|e| format!("record does not decode: {e}"))?;
    Ok(Some((record, 8 + u64::from(len))))
}

/// The appending end of one partition's log.
pub struct Log {
    /// Held (locked) while the log is open: one writer per partition, even while the
    /// computation of a killed worker is still exiting.
    _lock: File,
    dir: PathBuf,
    fsync: Fsync,
    /// The open segment, its length, and its sequence number.
    current: Option<(File, u64, u64)>,
    next_seq: u64,
    last_sync: Instant,
    scratch: Vec<u8>,
    /// The buffer records are encoded into, kept between appends.
    frame: Vec<u8>,
}

impl Log {
    /// Opens (creating) the log in `dir`, cutting a torn or corrupt tail off its last segment.
    /// Returns the log and what was cut, for the worker's log.
    pub fn open(dir: &Path, fsync: Fsync) -> Result<(Log, Option<String>), LogError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock(dir)?;
        let segs = segments(dir).map_err(io_err(dir))?;
        let next_seq = segs.iter().map(|s| s.seq + 1).max().unwrap_or(0);
        let mut log = Log {
            _lock: lock,
            dir: dir.to_path_buf(),
            fsync,
            current: None,
            next_seq,
            last_sync: Instant::now(),
            scratch: Vec::new(),
            frame: Vec::new(),
        };
        let mut cut = None;
        if let Some(last) = segs.last() {
            let path = &last.path;
            let mut file = OpenOptions::new().read(true).write(true).open(path).map_err(io_err(path))?;
            let size = file.metadata().map_err(io_err(path))?.len();
            let mut header = [0u8; HEADER_LEN as usize];
            if size < HEADER_LEN {
                // Torn while being created: start the segment again.
                file.set_len(0).map_err(io_err(path))?;
                write_header(&mut file).map_err(io_err(path))?;
                file.sync_all().map_err(io_err(path))?;
                cut = Some(format!("{}: torn header ({size} bytes); rewritten", path.display()));
                log.current = Some((file, HEADER_LEN, last.seq));
                return Ok((log, cut));
            }
            file.read_exact(&mut header).map_err(io_err(path))?;
            check_header(path, &header)?;
            let mut reader = BufReader::new(&mut file);
            let mut good = HEADER_LEN;
            loop {
                match next_record(&mut reader, &mut log.scratch, size - good) {
                    Ok(Some((_, n))) => good += n,
                    Ok(None) => break,
                    Err(reason) => {
                        cut = Some(format!(
                            "{}: {reason} at byte {good}; cut {} bytes off the tail",
                            path.display(),
                            size - good
                        ));
                        break;
                    }
                }
            }
            drop(reader);
            if good < size {
                file.set_len(good).map_err(io_err(path))?;
                file.sync_all().map_err(io_err(path))?;
            }
            file.seek(SeekFrom::Start(good)).map_err(io_err(path))?;
            log.current = Some((file, good, last.seq));
        }
        Ok((log, cut))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sync policy.
    pub fn fsync(&self) -> Fsync {
        self.fsync
    }

    /// Appends a [`Record::Batch`] of borrowed rows (encoded exactly as the owned record).
    pub fn append_batch(
        &mut self,
        epoch: u64,
        source: &str,
        batch: Option<&str>,
        rows: &[Row],
        rejected: u64,
        late: u64,
    ) -> Result<(), LogError> {
        let record = RecordRef::Batch { epoch, source, batch, rows, rejected, late };
        self.append_encoded(|frame| bincode::serialize_into(frame, &record), epoch, true)
    }

    /// Appends `record` and syncs it as the policy says (`sync`: this append ends an ingest
    /// reply). On error, whatever part of the record reached the file is cut off again.
    pub fn append(&mut self, record: &Record, sync: bool) -> Result<(), LogError> {
        self.append_encoded(|frame| bincode::serialize_into(frame, record), record.epoch(), sync)
    }

    /// Appends the record `encode` writes. It is encoded once, straight after the frame's
    /// length and checksum, into a buffer kept for the next append (no sizing pass, no copy of
    /// the payload into the frame, no fresh pages per batch).
    fn append_encoded(
        &mut self,
        encode: impl FnOnce(&mut Vec<u8>) -> bincode::Result<()>,
        epoch: u64,
        sync: bool,
    ) -> Result<(), LogError> {
        let mut frame = std::mem::take(&mut self.frame);
        frame.clear();
        frame.extend_from_slice(&[0; 8]);
        let appended = match encode(&mut frame) {
            Ok(()) => {
                let payload = &frame[8..];
                let (len, crc) = ((payload.len() as u32).to_le_bytes(), crc32c::crc32c(payload).to_le_bytes());
                frame[..4].copy_from_slice(&len);
                frame[4..8].copy_from_slice(&crc);
                self.append_frame(&frame, epoch, sync)
            }
            Err(e) => Err(LogError::Io { path: self.dir.clone(), source: io::Error::other(e.to_string()) }),
        };
        // Kept for the next append unless a rare huge record made it large.
        if frame.capacity() <= KEPT_FRAME_BYTES {
            self.frame = frame;
        }
        appended
    }

    fn append_frame(&mut self, frame: &[u8], epoch: u64, sync: bool) -> Result<(), LogError> {
        let full = self
            .current
            .as_ref()
            .is_none_or(|(_, len, _)| *len > HEADER_LEN && len + frame.len() as u64 > segment_bytes());
        if full {
            self.roll(epoch)?;
        }
        let path = self.dir.clone();
        let Some((file, len, _)) = self.current.as_mut() else {
            return Err(LogError::Io { path, source: io::Error::other("no open segment") });
        };
        let written = file.write_all(frame).and_then(|()| match self.fsync {
            Fsync::Always => file.sync_all(),
            Fsync::Batch if sync => file.sync_data(),
            Fsync::Interval(every) if self.last_sync.elapsed() >= every => {
                self.last_sync = Instant::now();
                file.sync_data()
            }
            _ => Ok(()),
        });
        match written {
            Ok(()) => {
                *len += frame.len() as u64;
                Ok(())
            }
            Err(source) => {
                // Nothing half-written may stay: cut back to the last whole record.
                let _ = file.set_len(*len).and_then(|()| file.seek(SeekFrom::Start(*len)).map(|_| ()));
                Err(LogError::Io { path, source })
            }
        }
    }

    /// Starts a new segment whose first record has `epoch`.
    fn roll(&mut self, epoch: u64) -> Result<(), LogError> {
        let seq = self.next_seq;
        let path = self.dir.join(format!("{epoch:020}-{seq:06}.seg"));
        let mut file = OpenOptions::new().create_new(true).read(true).write(true).open(&path).map_err(io_err(&path))?;
        let created = write_header(&mut file).and_then(|()| file.sync_all()).and_then(|()| sync_dir(&self.dir));
        if let Err(source) = created {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(LogError::Io { path, source });
        }
        self.next_seq += 1;
        self.current = Some((file, HEADER_LEN, seq));
        Ok(())
    }

    /// Syncs what was appended (for the interval policy's timer and for shutdown).
    pub fn sync(&mut self) -> Result<(), LogError> {
        if let Some((file, _, _)) = &self.current {
            file.sync_data().map_err(io_err(&self.dir))?;
        }
        self.last_sync = Instant::now();
        Ok(())
    }
}

/// How long opening a log waits for another process to let go of it.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes the log's lock file, waiting a while for a previous holder (the computation of a
/// killed worker exits within milliseconds).
fn lock(dir: &Path) -> Result<File, LogError> {
    let path = dir.join("LOCK");
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(LogError::Format {
                    path,
                    reason: format!("another process holds the log (still locked after {LOCK_WAIT:?})"),
                })
            }
            Err(fs::TryLockError::Error(source)) => return Err(LogError::Io { path, source }),
        }
    }
}

fn write_header(file: &mut File) -> io::Result<()> {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    file.write_all(&header)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Calls `f` with every record of the log in `dir` with an epoch at or after `from`, in order.
/// A corrupt record in a segment before the last ends that segment's replay and is reported in
/// the returned list (the last segment's tail was cut when the log was opened).
pub fn replay(dir: &Path, from: u64, mut f: impl FnMut(Record)) -> Result<Vec<String>, LogError> {
    let segs = segments(dir).map_err(io_err(dir))?;
    let mut problems = Vec::new();
    let mut scratch = Vec::new();
    for (i, seg) in segs.iter().enumerate() {
        // Skip segments whose records all precede `from`.
        if segs.get(i + 1).is_some_and(|next| next.first_epoch < from) {
            continue;
        }
        let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
        let size = file.metadata().map_err(io_err(&seg.path))?.len();
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut header = [0u8; HEADER_LEN as usize];
        if reader.read_exact(&mut header).is_err() {
            continue;
        }
        check_header(&seg.path, &header)?;
        let mut offset = HEADER_LEN;
        loop {
            match next_record(&mut reader, &mut scratch, size.saturating_sub(offset)) {
                Ok(Some((record, n))) => {
                    offset += n;
                    if record.epoch() >= from {
                        f(record);
                    }
                }
                Ok(None) => break,
                Err(reason) => {
                    problems.push(format!(
                        "{}: {reason} at byte {offset}; the rest of the segment is skipped",
                        seg.path.display()
                    ));
                    break;
                }
            }
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sundial_protocol::value::Datum;

    fn batch(epoch: u64, n: usize) -> Record {
        Record::Batch {
            epoch,
            source: "tx".into(),
            batch: Some(format!("b{epoch}")),
            rows: (0..n)
                .map(|i| Row { time: i as i64, values: vec![Datum::UInt(i as u64), Datum::Str("m".into())].into() })
                .collect(),
            rejected: 1,
            late: 0,
        }
    }

    fn all(dir: &Path, from: u64) -> Vec<Record> {
        let mut out = Vec::new();
        let problems = replay(dir, from, |r| out.push(r)).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        out
    }

    #[test]
    fn records_come_back_in_order_from_an_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, cut) = Log::open(dir.path(), Fsync::Batch).unwrap();
        assert!(cut.is_none());
        for e in 1..=5 {
            log.append(&batch(e * 10, 3), true).unwrap();
        }
        log.append(&Record::Installed { dataflow: 7, epoch: 60 }, false).unwrap();
        drop(log);
        assert_eq!(all(dir.path(), 0).len(), 6);
        let later = all(dir.path(), 30);
        assert_eq!(later.iter().map(Record::epoch).collect::<Vec<_>>(), vec![30, 40, 50, 60]);
        assert_eq!(later[0], batch(30, 3));
        // Reopening appends after what is there.
        let (mut log, cut) = Log::open(dir.path(), Fsync::Always).unwrap();
        assert!(cut.is_none());
        log.append(&batch(70, 1), true).unwrap();
        assert_eq!(all(dir.path(), 65).len(), 1);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_and_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), Fsync::Batch).unwrap();
        for e in 1..=3 {
            log.append(&batch(e, 10), true).unwrap();
        }
        drop(log);
        let seg = segments(dir.path()).unwrap().pop().unwrap().path;
        let whole = fs::metadata(&seg).unwrap().len();
        // A torn write: half of a fourth record.
        let (mut log, _) = Log::open(dir.path(), Fsync::Batch).unwrap();
        log.append(&batch(4, 10), true).unwrap();
        drop(log);
        let with_fourth = fs::metadata(&seg).unwrap().len();
        let file = OpenOptions::new().write(true).open(&seg).unwrap();
        file.set_len(whole + (with_fourth - whole) / 2).unwrap();
        let (log, cut) = Log::open(dir.path(), Fsync::Batch).unwrap();
        assert!(cut.as_deref().unwrap().contains("torn record"), "{cut:?}");
        assert_eq!(fs::metadata(&seg).unwrap().len(), whole);
        drop(log);
        assert_eq!(all(dir.path(), 0).len(), 3);

        // A flipped byte in the last record: its checksum no longer matches.
        let mut bytes = fs::read(&seg).unwrap();
        let last = bytes.len() - 3;
        bytes[last] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        let (_, cut) = Log::open(dir.path(), Fsync::Batch).unwrap();
        assert!(cut.as_deref().unwrap().contains("checksum mismatch"), "{cut:?}");
        assert_eq!(all(dir.path(), 0).len(), 2);
    }

    #[test]
    fn borrowed_batches_read_back_as_owned_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), Fsync::Batch).unwrap();
        let Record::Batch { rows, .. } = batch(5, 4) else { unreachable!() };
        log.append_batch(5, "tx", Some("b5"), &rows, 1, 0).unwrap();
        assert_eq!(all(dir.path(), 0), vec![batch(5, 4)]);
    }

    #[test]
    fn one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = Log::open(dir.path(), Fsync::Batch).unwrap();
        let opener = {
            let dir = dir.path().to_path_buf();
            std::thread::spawn(move || Log::open(&dir, Fsync::Batch).map(|_| ()))
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!opener.is_finished(), "the second opener waits");
        drop(first);
        opener.join().unwrap().unwrap();
    }

    #[test]
    fn other_formats_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("00000000000000000001-000000.seg"), b"SUNDLOG\0\x09\0\0\0\0\0\0\0").unwrap();
        let err = Log::open(dir.path(), Fsync::Batch).err().unwrap().to_string();
        assert!(err.contains("format version 9"), "{err}");
    }

    #[test]
    fn segments_roll_and_covered_ones_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(dir.path(), Fsync::Interval(Duration::from_secs(1))).unwrap();
        // Force small segments by rolling by hand.
        for e in [10u64, 20, 30] {
            log.roll(e).unwrap();
            log.append(&batch(e, 2), false).unwrap();
            log.append(&batch(e + 5, 2), false).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 3);
        // A checkpoint at 20 covers epochs < 20: the first segment (10, 15) only.
        delete_covered(dir.path(), 20).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 3, "20 is not < 20: the segment may hold epoch 20");
        delete_covered(dir.path(), 21).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 2);
        assert_eq!(all(dir.path(), 21).iter().map(Record::epoch).collect::<Vec<_>>(), vec![25, 30, 35]);
        delete_covered(dir.path(), 1_000).unwrap();
        assert_eq!(segments(dir.path()).unwrap().len(), 1, "the newest segment stays");
        assert!(bytes(dir.path()) > 0);
    }

    #[test]
    fn fsync_policies_parse() {
        assert_eq!("always".parse::<Fsync>().unwrap(), Fsync::Always);
        assert_eq!("batch".parse::<Fsync>().unwrap(), Fsync::Batch);
        assert_eq!("interval:50".parse::<Fsync>().unwrap(), Fsync::Interval(Duration::from_millis(50)));
        assert!("interval:0".parse::<Fsync>().is_err());
        assert!("sometimes".parse::<Fsync>().is_err());
    }
}
