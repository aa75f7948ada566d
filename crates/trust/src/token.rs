//! API bearer tokens: generated from the system's CSPRNG, stored by agents only as SHA-256
//! digests (a tokens file leaks no credential), compared in constant time.

use crate::secret::random_bytes;
use crate::TrustError;
use contract::auth::{Grant, TokenEntry, TokensFile};
use std::path::Path;
use subtle::ConstantTimeEq;

/// Prefix of every token (so a token is recognisable in a leaked log or config).
pub const PREFIX: &str = "ferry_";

/// A fresh token: the prefix and 32 random bytes in hex.
pub fn generate() -> Result<String, TrustError> {
    Ok(format!("{PREFIX}{}", hex(&random_bytes::<32>()?)))
}

/// The SHA-256 of `token`, hex (what a tokens file stores).
pub fn digest(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The entry of `tokens` that `presented` matches, if any (every entry is compared, each in
/// constant time).
pub fn lookup<'a>(tokens: &'a TokensFile, presented: &str) -> Option<&'a TokenEntry> {
    let d = digest(presented);
    let mut found = None;
    for e in &tokens.tokens {
        if bool::from(e.sha256.as_bytes().ct_eq(d.as_bytes())) {
            found = Some(e);
        }
    }
    found
}

/// Reads a tokens file (a missing file is an error: an agent told to check tokens never runs
/// open by accident).
pub fn load(path: &Path) -> Result<TokensFile, TrustError> {
    let text = std::fs::read_to_string(path).map_err(|err| TrustError::File {
        what: "read the tokens file",
        path: path.to_path_buf(),
        err,
    })?;
    let f: TokensFile = serde_json::from_str(&text).map_err(|e| TrustError::Pem {
        path: path.to_path_buf(),
        what: format!("not a tokens file: {e}"),
    })?;
    for e in &f.tokens {
        if e.sha256.len() != 64 || !e.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(TrustError::Pem {
                path: path.to_path_buf(),
                what: format!("token {:?}: sha256 is not 64 hex digits", e.name),
            });
        }
    }
    Ok(f)
}

/// Issues a token named `name` with grant `role`: adds its digest to the tokens file at `path`
/// (created 0600 if missing; an entry of the same name is replaced) and returns the token, which
/// is not kept anywhere else.
pub fn issue(path: &Path, name: &str, role: Grant) -> Result<String, TrustError> {
    crate::identity::check_name("token", name)?;
    let mut f = if path.exists() {
        load(path)?
    } else {
        TokensFile::default()
    };
    let token = generate()?;
    f.tokens.retain(|e| e.name != name);
    f.tokens.push(TokenEntry {
        name: name.to_string(),
        role,
        sha256: digest(&token),
    });
    let text = serde_json::to_string_pretty(&f).expect("a tokens file serializes");
    crate::secret::write_private(path, text.as_bytes())?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_are_found_by_their_digest_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.json");
        let admin = issue(&p, "alice", Grant::Admin).unwrap();
        let viewer = issue(&p, "bob", Grant::Viewer).unwrap();
        assert!(admin.starts_with(PREFIX) && admin.len() == PREFIX.len() + 64);
        assert_ne!(admin, viewer);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            !text.contains(&admin[PREFIX.len()..]),
            "the file holds a token: {text}"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let f = load(&p).unwrap();
        assert_eq!(lookup(&f, &admin).map(|e| e.role), Some(Grant::Admin));
        assert_eq!(lookup(&f, &viewer).map(|e| e.name.as_str()), Some("bob"));
        assert!(lookup(&f, "ferry_0000").is_none());
        assert!(lookup(&f, &admin[..admin.len() - 1]).is_none());
        // Re-issuing a name replaces its token.
        let again = issue(&p, "alice", Grant::Operator).unwrap();
        let f = load(&p).unwrap();
        assert!(lookup(&f, &admin).is_none());
        assert_eq!(lookup(&f, &again).map(|e| e.role), Some(Grant::Operator));
        assert_eq!(f.tokens.len(), 2);
        // Bad names and bad files are refused.
        assert!(issue(&p, "../x", Grant::Admin).is_err());
        std::fs::write(
            &p,
            "{\"tokens\":[{\"name\":\"a\",\"role\":\"admin\",\"sha256\":\"zz\"}]}",
        )
        .unwrap();
        assert!(load(&p).is_err());
        assert!(load(&dir.path().join("missing.json")).is_err());
    }
}
