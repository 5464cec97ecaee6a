//! Who may read keel's files: the data directory is 0700 and what keel
//! writes in it (the SQLite database and its `-wal`/`-shm`, the mail file,
//! the generated signing key) 0600, whatever the umask. They hold password
//! and session hashes, signing keys and sign-in links.
//!
//! Modes are set when a file is created and tightened (with a warning) when
//! an existing one is open to group or others; the process umask is left
//! alone (it is the operator's, and a library has no business changing a
//! process-wide setting). Unix only: elsewhere these are no-ops.

use std::path::Path;

use anyhow::Context as _;

/// Group and others: any of these bits open a file to other users.
#[cfg(unix)]
const SHARED_BITS: u32 = 0o077;

/// Creates `dir` (and its parents) with mode 0700, or makes an existing one
/// 0700 when group or others can reach it.
pub fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating KEEL_DATA_DIR {}", dir.display()))?;
        }
        // `recursive` gives the mode to every directory it creates, and
        // the umask may have taken bits off: set it on the last one.
        tighten(dir, 0o700).with_context(|| format!("making KEEL_DATA_DIR {} private (chmod 700)", dir.display()))
    }
    #[cfg(not(unix))]
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating KEEL_DATA_DIR {}", dir.display()))
    }
}

/// Creates `path` empty with mode 0600 unless it exists; makes an existing
/// one 0600 when group or others can read it.
pub fn prepare_private_file(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
    }
    tighten_if_exists(path)
}

/// Makes `path` 0600 when it exists and group or others can read it.
pub fn tighten_if_exists(path: &Path) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        if path.exists() {
            tighten(path, 0o600).with_context(|| format!("making {} private (chmod 600)", path.display()))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(unix)]
fn tighten(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path)?.permissions().mode() & 0o7777;
    if current & SHARED_BITS == 0 {
        return Ok(());
    }
    tracing::warn!(
        path = %path.display(),
        mode = format!("{current:o}"),
        now = format!("{mode:o}"),
        "was open to group or others; made private"
    );
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// In production the signing keys must be the keel user's alone: a key
/// file that group or others can read is refused, naming the fix.
pub fn check_key_file(path: &Path) -> anyhow::Result<()> {
    check_private(
        path,
        "KEEL_AUTH_KEYS_FILE",
        "chmod 600",
        " (on Kubernetes, defaultMode: 0400 on the secret volume)",
    )
}

/// In production an existing data directory that group or others can
/// reach is refused, naming the fix, rather than quietly tightened: someone
/// chose that mode, and the files in it may have been readable for a while.
pub fn check_data_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    check_private(dir, "KEEL_DATA_DIR", "chmod 700", "")
}

fn check_private(path: &Path, setting: &str, fix: &str, hint: &str) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).with_context(|| format!("reading {setting} {}", path.display()))?;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & SHARED_BITS != 0 {
            anyhow::bail!(
                "{setting} {path} is open to group or others (mode {mode:o}); KEEL_ENV=production \
                 needs it private to keel's user: {fix} {path}{hint}",
                path = path.display(),
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, setting, fix, hint);
    Ok(())
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_data_dir_and_its_files_are_private_and_wider_ones_are_tightened() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("a/keel-data");
        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        let file = dir.join("keel.db");
        prepare_private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        std::fs::write(&file, "kept").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        prepare_private_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "kept");

        tighten_if_exists(&dir.join("missing")).unwrap();
        assert!(!dir.join("missing").exists());
    }

    #[test]
    fn a_shared_data_dir_is_refused_naming_it_and_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("keel-data");
        check_data_dir(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        for shared in [0o755, 0o750, 0o701, 0o777] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(shared)).unwrap();
            let error = check_data_dir(&dir).unwrap_err().to_string();
            assert!(error.contains("KEEL_DATA_DIR"), "{error}");
            assert!(error.contains(&format!("chmod 700 {}", dir.display())), "{error}");
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_data_dir(&dir).unwrap();
    }

    #[test]
    fn a_shared_key_file_is_refused_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys.json");
        std::fs::write(&keys, "{}").unwrap();
        for shared in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(shared)).unwrap();
            let error = check_key_file(&keys).unwrap_err().to_string();
            assert!(error.contains(&keys.display().to_string()), "{error}");
            assert!(error.contains("chmod 600"), "{error}");
        }
        for private in [0o600, 0o400] {
            std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(private)).unwrap();
            check_key_file(&keys).unwrap();
        }
    }
}
