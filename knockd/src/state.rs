//! State that must survive a restart: the consumed one-time sequences, so a
//! replay after a restart fails as it would have before.
//!
//! The file is rewritten atomically (write a temporary file, fsync, rename,
//! fsync the directory), so a crash leaves the old or the new record, never
//! a torn one. A file that does not parse stops the daemon: starting with an
//! empty record would re-admit replays.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::auth::Consumed;

const FILE: &str = "consumed.json";
/// A record far larger than the engine could ever hold is not ours.
const FILE_MAX: u64 = 16 << 20;

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
}

/// The consumed-sequence record in a state directory.
#[derive(Debug, Clone)]
pub struct StateFile {
    dir: PathBuf,
}

impl StateFile {
    /// Uses `dir`, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<StateFile, Error> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| Error::Io {
                path: dir.to_owned(),
                source,
            })?;
        Ok(StateFile {
            dir: dir.to_owned(),
        })
    }

    /// The record's path.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Reads the record; a missing file is an empty record.
    pub fn load(&self) -> Result<Vec<Consumed>, Error> {
        let path = self.path();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        if meta.len() > FILE_MAX {
            return Err(Error::Corrupt {
                path,
                reason: format!("{} bytes", meta.len()),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(io)?;
        serde_json::from_str(&text).map_err(|e| Error::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Replaces the record atomically.
    pub fn save(&self, consumed: &[Consumed]) -> Result<(), Error> {
        let path = self.path();
        let tmp = self.dir.join(format!("{FILE}.tmp"));
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        let text = serde_json::to_vec(consumed).expect("consumed records serialize");
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&text).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        std::fs::File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(io(&self.dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_missing_and_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateFile::open(&dir.path().join("sub")).unwrap();
        assert!(state.load().unwrap().is_empty());
        let records = vec![Consumed {
            door: "ssh".into(),
            device: "laptop".into(),
            step: 58_000_000,
            nonce: [0xab; 16],
        }];
        state.save(&records).unwrap();
        assert_eq!(state.load().unwrap(), records);
        std::fs::write(state.path(), b"{not json").unwrap();
        let e = state.load().unwrap_err().to_string();
        assert!(
            e.contains("consumed.json is corrupt") && e.contains("will not start"),
            "{e}"
        );
    }
}
