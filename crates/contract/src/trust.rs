//! Trust: what identifies and authorizes a peer across process boundaries — user roles, the
//! files that make up a TLS identity, how a migration channel is secured, and the one-time
//! secret that binds a migration to the receiver its destination created for it.
//!
//! Certificates and their naming rules are the `trust` crate's; this module holds only the
//! serde types the processes exchange.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// What a user may do (encoded in a user certificate, see the `trust` crate).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Also starts, stops, migrates and drains.
    Operator,
    /// Also creates and deletes VMs and manages nodes.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown role name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (one of viewer, operator, admin)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;
    fn from_str(s: &str) -> Result<Role, UnknownRole> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownRole(s.to_string()))
    }
}

/// The PEM files of one TLS identity: its certificate (chain), its private key and the cluster
/// CA that peers must be signed by.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How a migration channel (control and every data connection) is carried.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "mode", rename_all = "lowercase", deny_unknown_fields)]
pub enum Transport {
    /// Mutual TLS: this side presents `files.cert`; the peer must present a certificate of
    /// the cluster CA that names node `peer_node`.
    Tls { files: TlsFiles, peer_node: String },
    /// Plaintext and unauthenticated (explicitly asked for, with a warning).
    Insecure,
}

/// Length of a [`MigrationSecret`] in bytes.
pub const SECRET_LEN: usize = 32;

/// The one-time secret a receiver is created with; the migration's source presents it after
/// its Hello. Its `Debug` does not show it; it travels as lowercase hex.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationSecret(pub [u8; SECRET_LEN]);

/// A secret that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a migration secret is {SECRET_LEN} bytes as 64 hex digits (got {0} characters that are not)"
)]
pub struct BadSecret(pub usize);

impl MigrationSecret {
    /// The secret as 64 lowercase hex digits (for a secret file or a control line).
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace allowed: a file's trailing newline).
    pub fn from_hex(s: &str) -> Result<MigrationSecret, BadSecret> {
        let t = s.trim();
        let bad = || BadSecret(t.len());
        if t.len() != 2 * SECRET_LEN || !t.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; SECRET_LEN];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(MigrationSecret(out))
    }
}

impl fmt::Debug for MigrationSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MigrationSecret(..)")
    }
}

impl TryFrom<String> for MigrationSecret {
    type Error = BadSecret;
    fn try_from(s: String) -> Result<Self, BadSecret> {
        MigrationSecret::from_hex(&s)
    }
}

impl From<MigrationSecret> for String {
    fn from(s: MigrationSecret) -> String {
        s.to_hex()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_as_hex_and_stay_out_of_debug() {
        let s = MigrationSecret([0xa5; SECRET_LEN]);
        assert_eq!(
            MigrationSecret::from_hex(&format!("{}\n", s.to_hex())),
            Ok(s.clone())
        );
        assert!(!format!("{s:?}").contains("a5"));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MigrationSecret>(&json).unwrap(), s);
        assert!(MigrationSecret::from_hex("abcd").is_err());
        assert!(MigrationSecret::from_hex(&"zz".repeat(SECRET_LEN)).is_err());
    }

    #[test]
    fn roles_parse_by_name() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
