//! Making what walship creates survive a power loss.
//!
//! A file's or directory's entry lives in its parent directory: until the
//! parent is fsynced, a power loss may forget the entry even though the
//! file's own data was synced (POSIX promises nothing more; ext4 without a
//! journal keeps exactly that). Every file and directory walship creates or
//! renames goes through here, or syncs its parent itself right after
//! (`rename` then [`sync_dir`]), before the call that needed it returns.

use crate::fs::Fs;
use std::fs::{File, OpenOptions};
use std::path::Path;

/// Fsyncs a directory so renames, creations and deletions in it are durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// `fs::create_dir_all`, durably: each directory it creates has its entry
/// synced in its parent (top down, so no synced entry names a directory
/// whose own entry could still be lost), and `dir`'s own entry is synced
/// even when it existed: a process that died between creating it and
/// syncing its parent left it unsynced, and this repairs that at the next
/// open.
pub fn create_dir_all(dir: &Path) -> std::io::Result<()> {
    create_dir_all_in(crate::fs::real(), dir)
}

/// Opens `path` for reading and writing, creating it if it does not exist;
/// its entry is synced in its parent before this returns (also when it
/// existed: see [`create_dir_all`]).
pub fn open_or_create(path: &Path) -> std::io::Result<(File, bool)> {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => {
            sync_parent(path)?;
            Ok((file, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)?;
            sync_parent(path)?;
            Ok((file, true))
        }
        Err(e) => Err(e),
    }
}

/// [`open_or_create`] through `fs`.
pub fn open_or_create_in(
    fs: &dyn Fs,
    path: &Path,
) -> std::io::Result<(Box<dyn crate::fs::FsFile>, bool)> {
    let opened = fs.open_or_create(path)?;
    fs.sync_dir(parent_of(path))?;
    Ok(opened)
}

/// Replaces `dir/name` with `bytes` atomically and durably: a temporary
/// file written and fsynced, renamed over `name`, the directory fsynced.
/// After a power loss at any point `name` holds the old bytes or the new
/// ones, and the new ones once this returned. Every small file walship
/// replaces goes through here (superblock, epoch history, assignment).
pub fn rewrite_atomic(fs: &dyn Fs, dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let file = fs.create(&tmp)?;
    file.write_at(bytes, 0)?;
    file.sync_all()?;
    drop(file);
    fs.rename(&tmp, &path)?;
    fs.sync_dir(dir)
}

/// [`create_dir_all`] through `fs`.
pub fn create_dir_all_in(fs: &dyn Fs, dir: &Path) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(path) = at {
        if path.as_os_str().is_empty() || fs.is_dir(path) {
            break;
        }
        missing.push(path);
        at = path.parent();
    }
    for created in missing.iter().rev() {
        fs.create_dir(created)?;
    }
    // Top down: each created directory's entry, and `dir`'s own even when
    // it existed (a process that died before syncing it left it unsynced).
    for created in missing.iter().rev() {
        fs.sync_dir(parent_of(created))?;
    }
    if missing.is_empty() {
        fs.sync_dir(parent_of(dir))?;
    }
    Ok(())
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

/// Fsyncs the directory that holds `path`.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    sync_dir(parent_of(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_every_missing_level_and_reopens_existing_files() {
        let root = tempfile::tempdir().unwrap();
        let deep = root.path().join("a/b/c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        create_dir_all(&deep).unwrap();
        let (mut file, created) = open_or_create(&deep.join("f")).unwrap();
        assert!(created);
        std::io::Write::write_all(&mut file, b"x").unwrap();
        let (_, created) = open_or_create(&deep.join("f")).unwrap();
        assert!(!created);
        assert_eq!(std::fs::read(deep.join("f")).unwrap(), b"x");
    }
}
