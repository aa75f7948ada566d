//! One-time migration secrets.

use crate::TrustError;
use contract::trust::{MigrationSecret, SECRET_LEN};
use subtle::ConstantTimeEq;

/// `N` bytes from the system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], TrustError> {
    use rustls::crypto::ring::default_provider;
    let mut b = [0u8; N];
    default_provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| TrustError::Random)?;
    Ok(b)
}

/// A fresh secret.
pub fn generate() -> Result<MigrationSecret, TrustError> {
    Ok(MigrationSecret(random_bytes::<SECRET_LEN>()?))
}

/// Writes `secret` to `path`, readable by its owner only (a stale one is replaced).
pub fn write_file(path: &std::path::Path, secret: &MigrationSecret) -> Result<(), TrustError> {
    write_private(path, secret.to_hex().as_bytes())
}

/// Writes `bytes` to `path` readable by its owner only, replacing it atomically: a new file
/// with an unpredictable name next to it (created exclusively, 0600, never through a symlink)
/// is written, synced and renamed over `path`.
pub fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<(), TrustError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |what, err| TrustError::File {
        what,
        path: path.to_path_buf(),
        err,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".tmp-{}",
        random_bytes::<8>()?
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
    let tmp = std::path::PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| io("create", e))?;
        f.write_all(bytes).map_err(|e| io("write", e))?;
        f.sync_all().map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, path).map_err(|e| io("replace", e))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Whether two secrets are equal, in time independent of where they differ.
pub fn matches(a: &MigrationSecret, b: &MigrationSecret) -> bool {
    a.0.ct_eq(&b.0).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_secrets_differ_and_compare() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        assert!(matches(&a, &a.clone()));
        assert!(!matches(&a, &b));
        let mut c = a.clone();
        c.0[SECRET_LEN - 1] ^= 1;
        assert!(!matches(&a, &c));
    }
}
