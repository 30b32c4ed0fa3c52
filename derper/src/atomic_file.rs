//! Atomic file writes for secrets and certificates (the server key file, generated
//! certificates). A leaf module: it imports nothing from the crate.

use std::fs;
use std::io::{self, Write as _};
use std::path::Path;

/// Writes `data` to `path` atomically: a new, randomly named temporary file next to it,
/// created exclusively (`O_EXCL`, so nothing planted at that name, file or symlink, is
/// followed or reused) with `mode` from the start, fsynced, then renamed over `path`.
/// Readers see the old file or the whole new one, never a partial or wider-permission one.
pub(crate) fn write_file_atomic(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let mut f = opts.open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    // Best effort: make the rename durable.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
