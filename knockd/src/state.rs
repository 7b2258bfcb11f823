//! State that must survive a restart: the consumed one-time sequences, so a
//! replay after a restart fails as it would have before.
//!
//! The record is two files in the state directory:
//! - `consumed.json`, a snapshot, replaced atomically (write a temporary
//!   file, fsync, rename, fsync the directory);
//! - `consumed.log`, one JSON line per sequence consumed since, appended.
//!
//! Accepting a knock must not wait for the snapshot to be rewritten: that
//! costs a rename and two syncs, and grows with the record. So the daemon
//! appends the sequences of every knock it judged in one wake-up with one
//! write and one `fdatasync`, and acts on none of them before that sync
//! returns ("recorded before the reply"). Compaction (a new snapshot, then
//! an empty log) happens at start-up and from the tick, never between a
//! knock and its reply.
//!
//! Why a crash at any instant cannot re-admit a replay:
//! - an appended line is acted on only after its sync, so a line lost or
//!   torn by power loss belongs to a knock nobody was answered for;
//! - a torn line can only be the last one (a later sync would have made it
//!   whole), so a last line without its newline, or one that does not
//!   parse, is cut off with a warning; a bad line anywhere else is
//!   corruption and stops the daemon: starting with a partial record would
//!   re-admit replays;
//! - compaction writes the snapshot before it empties the log, and a
//!   sequence in both is simply read twice.

use std::{
    fs::File,
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::auth::Consumed;

const SNAPSHOT: &str = "consumed.json";
const LOG: &str = "consumed.log";
/// A record far larger than the engine could ever hold is not ours.
const FILE_MAX: u64 = 16 << 20;
/// Lines the log may hold beyond twice the live record before the tick
/// compacts it: compaction is rare, and the log stays small.
const LOG_SLACK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is corrupt ({reason}); it records used one-time sequences, so knockd will not start without it: restore it, or remove it to accept that sequences from the last few minutes could be replayed"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} is corrupt ({reason}); it records the fleet's revokes this node carried out or has still to publish, so knockd will not start without it: restore it, or remove it (revokes of the last minute are then carried out again, and revokes made here while etcd was unreachable are lost)"
    )]
    CorruptRevokes { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + use<> {
    let path = path.to_owned();
    move |source| Error::Io { path, source }
}

/// The consumed-sequence record in a state directory.
#[derive(Debug)]
pub struct StateFile {
    dir: PathBuf,
    /// The log, open once [`load`](Self::load) has checked it.
    log: Option<File>,
    /// The log's length up to its last whole, synced line: appends go
    /// here, so a failed append leaves nothing behind that a later one
    /// could turn into a bad line in the middle.
    log_len: u64,
    /// Lines in the log.
    log_lines: usize,
    /// Whether an append failed, so the file may hold bytes past
    /// `log_len` that the next append must cut off first.
    dirty: bool,
}

impl StateFile {
    /// Uses `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<StateFile, Error> {
        crate::platform::create_private_dir(dir).map_err(io(dir))?;
        Ok(StateFile {
            dir: dir.to_owned(),
            log: None,
            log_len: 0,
            log_lines: 0,
            dirty: false,
        })
    }

    /// The snapshot's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(SNAPSHOT)
    }

    /// The log's path.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG)
    }

    /// Lines in the log since the last compaction.
    pub fn log_lines(&self) -> usize {
        self.log_lines
    }

    /// Reads the snapshot and the log (missing files are empty), cuts a
    /// torn last line off the log, and opens it for appending.
    pub fn load(&mut self) -> Result<Vec<Consumed>, Error> {
        let mut records = match read_bounded(&self.path())? {
            None => Vec::new(),
            Some(text) => serde_json::from_slice(&text).map_err(|e| Error::Corrupt {
                path: self.path(),
                reason: e.to_string(),
            })?,
        };
        let log_path = self.log_path();
        let text = read_bounded(&log_path)?.unwrap_or_default();
        let (logged, good_len) = parse_log(&text).map_err(|reason| Error::Corrupt {
            path: log_path.clone(),
            reason,
        })?;
        if good_len < text.len() {
            tracing::warn!(
                path = %log_path.display(),
                bytes = text.len() - good_len,
                "cut a torn last line off the consumed-sequence log (a crash while writing it; its knock was never answered)"
            );
        }
        let log = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&log_path)
            .map_err(io(&log_path))?;
        log.set_len(good_len as u64).map_err(io(&log_path))?;
        self.log_lines = logged.len();
        self.log_len = good_len as u64;
        self.log = Some(log);
        records.extend(logged);
        Ok(records)
    }

    /// Appends `records` with one write and one data sync. Only when this
    /// returns `Ok` are they on disk; on an error nothing of them counts.
    pub fn append(&mut self, records: &[Consumed]) -> Result<(), Error> {
        if records.is_empty() {
            return Ok(());
        }
        let log_path = self.log_path();
        let log = self.log.as_ref().expect("load() opens the log first");
        let mut text = Vec::with_capacity(records.len() * 128);
        for record in records {
            serde_json::to_writer(&mut text, record).expect("consumed records serialize");
            text.push(b'\n');
        }
        // Whatever a failed append left past `log_len` goes first.
        if self.dirty {
            log.set_len(self.log_len).map_err(io(&log_path))?;
            self.dirty = false;
        }
        self.dirty = true;
        crate::platform::write_all_at(log, &text, self.log_len).map_err(io(&log_path))?;
        crash_point("after_append");
        log.sync_data().map_err(io(&log_path))?;
        crash_point("after_sync");
        self.dirty = false;
        self.log_len += text.len() as u64;
        self.log_lines += records.len();
        Ok(())
    }

    /// Whether the log has grown enough, next to `live` records, to be
    /// worth compacting.
    pub fn wants_compaction(&self, live: usize) -> bool {
        self.log_lines > 2 * live + LOG_SLACK
    }

    /// Replaces the snapshot with `live` (atomically), then empties the log.
    pub fn compact(&mut self, live: &[Consumed]) -> Result<(), Error> {
        let text = serde_json::to_vec(live).expect("consumed records serialize");
        replace_file(&self.dir, SNAPSHOT, &text, "snapshot")?;
        if let Some(log) = &self.log {
            let log_path = self.log_path();
            // The snapshot holds every line now, so the log starts over
            // whether or not the truncation below reaches the disk.
            self.log_len = 0;
            self.log_lines = 0;
            self.dirty = true;
            log.set_len(0).map_err(io(&log_path))?;
            log.sync_all().map_err(io(&log_path))?;
            self.dirty = false;
            crash_point("after_log_truncate");
        }
        Ok(())
    }
}

/// Fleet mode's revoke book (`cluster::revokes`) in `dir`; `None` when
/// there is none yet (a node's first start in fleet mode).
#[cfg(feature = "daemon")]
pub fn load_revokes(dir: &Path) -> Result<Option<crate::cluster::revokes::Book>, Error> {
    let path = dir.join(crate::cluster::revokes::FILE);
    match read_bounded(&path)? {
        None => Ok(None),
        Some(text) => serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| Error::CorruptRevokes {
                path,
                reason: e.to_string(),
            }),
    }
}

/// Writes the revoke book (atomically).
#[cfg(feature = "daemon")]
pub fn save_revokes(dir: &Path, book: &crate::cluster::revokes::Book) -> Result<(), Error> {
    let text = serde_json::to_vec(book).expect("the revoke book serializes");
    replace_file(dir, crate::cluster::revokes::FILE, &text, "revokes")
}

/// Replaces `dir/name` with `bytes` atomically: a temporary file, synced,
/// renamed over it, and the directory synced, so a crash leaves the old
/// file or the new one, never a torn one. `label` names the crash points
/// (`after_LABEL_write`, `_rename`, `_sync`).
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8], label: &str) -> Result<(), Error> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    crash_point(&format!("after_{label}_write"));
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    crash_point(&format!("after_{label}_rename"));
    File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io(dir))?;
    crash_point(&format!("after_{label}_sync"));
    Ok(())
}

/// A file's bytes; `None` if it does not exist; corrupt if it is larger
/// than any record of ours.
pub fn read_bounded(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    if meta.len() > FILE_MAX {
        return Err(Error::Corrupt {
            path: path.to_owned(),
            reason: format!("{} bytes", meta.len()),
        });
    }
    std::fs::read(path).map(Some).map_err(io(path))
}

/// The log's records and the length of its whole lines. The last line may
/// be torn (no newline, or not parseable); any other bad line is an error.
fn parse_log(text: &[u8]) -> Result<(Vec<Consumed>, usize), String> {
    let mut records = Vec::new();
    let mut good = 0;
    let mut rest = text;
    let mut line_no = 0;
    while !rest.is_empty() {
        line_no += 1;
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            break; // torn: no newline
        };
        let (line, after) = (&rest[..end], &rest[end + 1..]);
        match serde_json::from_slice::<Consumed>(line) {
            Ok(record) => records.push(record),
            Err(_) if after.is_empty() => break, // torn last line
            Err(e) => return Err(format!("line {line_no}: {e}")),
        }
        good += end + 1;
        rest = after;
    }
    Ok((records, good))
}

/// Test builds stop dead (SIGKILL, as a crash or power cut would) at the
/// named step when `KNOCKD_CRASH_AT` names it, so tests can kill the
/// daemon between every pair of steps of recording and acting on a knock.
/// Release builds ignore the variable.
pub fn crash_point(name: &str) {
    if cfg!(debug_assertions) && std::env::var_os("KNOCKD_CRASH_AT").is_some_and(|v| v == name) {
        crate::platform::die();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: u8) -> Consumed {
        Consumed {
            door: "ssh".into(),
            device: "laptop".into(),
            step: 58_000_000 + u64::from(n),
            nonce: [n; 16],
        }
    }

    #[test]
    fn snapshot_and_log_round_trip_and_compact() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateFile::open(&dir.path().join("sub")).unwrap();
        assert!(state.load().unwrap().is_empty());
        state.append(&[record(1)]).unwrap();
        state.append(&[record(2), record(3)]).unwrap();
        assert_eq!(state.log_lines(), 3);

        let mut again = StateFile::open(&dir.path().join("sub")).unwrap();
        assert_eq!(again.load().unwrap(), vec![record(1), record(2), record(3)]);
        again.compact(&[record(2), record(3)]).unwrap();
        assert_eq!(std::fs::metadata(again.log_path()).unwrap().len(), 0);
        again.append(&[record(4)]).unwrap();

        let mut third = StateFile::open(&dir.path().join("sub")).unwrap();
        assert_eq!(third.load().unwrap(), vec![record(2), record(3), record(4)]);
    }

    #[test]
    fn a_corrupt_snapshot_or_middle_line_stops_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateFile::open(dir.path()).unwrap();
        state.load().unwrap();
        std::fs::write(state.path(), b"{not json").unwrap();
        let e = state.load().unwrap_err().to_string();
        assert!(
            e.contains("consumed.json is corrupt") && e.contains("will not start"),
            "{e}"
        );
        std::fs::remove_file(state.path()).unwrap();
        let good = serde_json::to_string(&record(1)).unwrap();
        std::fs::write(state.log_path(), format!("{good}\ngarbage\n{good}\n")).unwrap();
        let e = state.load().unwrap_err().to_string();
        assert!(
            e.contains("consumed.log is corrupt (line 2"),
            "names the file and the line: {e}"
        );
    }

    /// Power lost at any byte of the log: every prefix loads, holds exactly
    /// the whole lines, and the next append starts on a fresh line.
    #[test]
    fn every_torn_prefix_of_the_log_loads_its_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateFile::open(dir.path()).unwrap();
        state.load().unwrap();
        let records: Vec<Consumed> = (1..=4).map(record).collect();
        for r in &records {
            state.append(std::slice::from_ref(r)).unwrap();
        }
        let full = std::fs::read(state.log_path()).unwrap();
        let ends: Vec<usize> = full
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .map(|(i, _)| i + 1)
            .collect();
        for cut in 0..=full.len() {
            std::fs::write(state.log_path(), &full[..cut]).unwrap();
            let mut torn = StateFile::open(dir.path()).unwrap();
            let loaded = torn.load().unwrap();
            let whole = ends.iter().filter(|&&end| end <= cut).count();
            assert_eq!(loaded, records[..whole], "cut at {cut}");
            torn.append(&[record(9)]).unwrap();
            let mut after = StateFile::open(dir.path()).unwrap();
            let mut expect = records[..whole].to_vec();
            expect.push(record(9));
            assert_eq!(after.load().unwrap(), expect, "append after a cut at {cut}");
        }
    }

    #[test]
    fn compaction_waits_for_the_log_to_outgrow_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let mut state = StateFile::open(dir.path()).unwrap();
        state.load().unwrap();
        assert!(!state.wants_compaction(0));
        let batch: Vec<Consumed> = (0..=255).map(record).collect();
        for _ in 0..17 {
            state.append(&batch).unwrap();
        }
        assert!(state.wants_compaction(10));
        assert!(!state.wants_compaction(3000));
    }
}
