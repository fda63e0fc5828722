//! The owner lock of a SQLite store: an OS lock on `<db>.lock`, held for the
//! store's lifetime and dropped by the OS when the process dies, so one
//! daemon at a time owns the file and a second one is refused with the
//! holder's pid and host.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use batchrouter_core::{StoreError, Timestamp};

/// The lock file next to the database.
fn lock_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".lock");
    db.with_file_name(name)
}

/// Takes the owner lock of `db` and writes who holds it into the lock file.
pub(super) fn take_lock(db: &Path) -> Result<File, StoreError> {
    let path = lock_path(db);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| {
            StoreError::Unavailable(format!("cannot open lock file {}: {e}", path.display()))
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(StoreError::Locked(format!(
                "{} is in use by another batchrouterd ({}); the SQLite store belongs to one daemon at a time — use PostgreSQL to run several",
                db.display(),
                if holder.is_empty() { "holder unknown" } else { holder }
            )));
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(StoreError::Unavailable(format!(
                "cannot lock {}: {e}",
                path.display()
            )))
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let info = format!(
        "pid {} on {} since {} ms",
        std::process::id(),
        host.trim(),
        Timestamp::now().as_millis()
    );
    let _ = file.set_len(0);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.write_all(info.as_bytes());
    Ok(file)
}
