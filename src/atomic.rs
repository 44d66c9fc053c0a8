//! Files written whole or not at all: every file absorb writes (PNGs, animations, token files,
//! batch manifests, reports) goes through [`write`], so an interrupted run never leaves a
//! truncated file and an existing one is replaced only by a complete one.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// How the temporary file is named: `{prefix}XXXXXX{suffix}` in the target's directory. A batch
/// shard tags its own so that a rerun deletes its leftovers and no other shard's.
#[derive(Debug, Clone, Copy)]
pub struct Temp<'a> {
    /// Start of the name, e.g. `.absorb-`.
    pub prefix: &'a str,
    /// End of the name, e.g. `.png.tmp`.
    pub suffix: &'a str,
}

impl Temp<'static> {
    /// `.absorb-XXXXXX.png.tmp`: an untagged PNG.
    pub const PNG: Temp<'static> = Temp {
        prefix: ".absorb-",
        suffix: ".png.tmp",
    };
    /// `.absorb-XXXXXX.tmp`: any other file.
    pub const FILE: Temp<'static> = Temp {
        prefix: ".absorb-",
        suffix: ".tmp",
    };
}

/// Writes `bytes` to `path` through a temporary file in the same directory, synced, then
/// renamed over `path`. New files are readable by everyone (0644 less the umask), like any other
/// tool's output (and other pods sharing a volume); the temporary file would otherwise stay
/// private (0600) after the rename.
pub fn write(path: &Path, bytes: &[u8], temp: Temp<'_>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |e| Error::io(path, e);
    let tmp = tempfile::Builder::new()
        .prefix(temp.prefix)
        .suffix(temp.suffix)
        .permissions(std::fs::Permissions::from_mode(0o644))
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, e))?;
    // Through the file itself: the temporary file's own errors would name its random path.
    tmp.as_file().write_all(bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_and_no_temporary_file_stays() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("a.json");
        std::fs::write(&path, b"old").unwrap();
        write(&path, b"new contents", Temp::FILE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o044, 0o044, "readable by group and others: {mode:o}");
        let e = write(&d.path().join("missing/a.json"), b"x", Temp::FILE).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }
}
