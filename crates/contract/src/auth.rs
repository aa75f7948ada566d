//! Who may call what on an agent's REST API: grants, the access each endpoint needs, and the
//! tokens file an agent checks bearer tokens against (`ferry token issue`; only digests are
//! stored there, never a token).

use serde::{Deserialize, Serialize};

/// What a credential is granted: a user's role (the roles of user certificates,
/// [`crate::trust::Role`]), or a peer agent's.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Grant {
    /// Reads everything (nodes, VMs, migrations, events, metrics).
    Viewer,
    /// A viewer who also starts, stops and migrates VMs and drains nodes.
    Operator,
    /// An operator who also creates and deletes VMs.
    Admin,
    /// A peer agent: what an operator may do (agents forward starts, stops, migrations and
    /// cancels to the VM's owner) and the internal endpoints; never an admin's.
    Node,
}

impl From<crate::trust::Role> for Grant {
    fn from(r: crate::trust::Role) -> Grant {
        match r {
            crate::trust::Role::Viewer => Grant::Viewer,
            crate::trust::Role::Operator => Grant::Operator,
            crate::trust::Role::Admin => Grant::Admin,
        }
    }
}

impl Grant {
    pub fn allows(self, access: Access) -> bool {
        match access {
            Access::Public | Access::Read => true,
            Access::Operate => self != Grant::Viewer,
            Access::Administer => self == Grant::Admin,
            Access::Internal => self == Grant::Node,
        }
    }
}

/// An unknown grant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown grant {0:?} (one of viewer, operator, admin, node)")]
pub struct UnknownGrant(pub String);

impl std::str::FromStr for Grant {
    type Err = UnknownGrant;
    fn from_str(s: &str) -> Result<Grant, UnknownGrant> {
        if s == "node" {
            return Ok(Grant::Node);
        }
        s.parse::<crate::trust::Role>()
            .map(Grant::from)
            .map_err(|_| UnknownGrant(s.to_string()))
    }
}

impl std::fmt::Display for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Grant::Viewer => "viewer",
            Grant::Operator => "operator",
            Grant::Admin => "admin",
            Grant::Node => "node",
        })
    }
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The web console's static files (its login page asks for the credential).
    Public,
    Read,
    Operate,
    Administer,
    Internal,
}

/// The access `method` on `path` needs. Reads are GETs; a write this table does not name needs
/// an admin (a new endpoint is closed until it is classified).
pub fn access_for(method: &str, path: &str) -> Access {
    let path = path.split('?').next().unwrap_or(path);
    if path.starts_with("/v1/internal/") {
        return Access::Internal;
    }
    let get = method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD");
    if get && is_console_asset(path) {
        return Access::Public;
    }
    if method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD") {
        return Access::Read;
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.to_ascii_uppercase().as_str(), parts.as_slice()) {
        ("POST", ["v1", "vms", _, "start" | "stop" | "migrate"]) => Access::Operate,
        ("POST", ["v1", "nodes", _, "drain" | "undrain"]) => Access::Operate,
        ("POST", ["v1", "migrations", _, "cancel"]) => Access::Operate,
        _ => Access::Administer,
    }
}

/// The web console's files: `/`, `/index.html`, `/favicon.svg` and `/assets/<name>` (one
/// level, no `..`); nothing else is served without a credential.
pub fn is_console_asset(path: &str) -> bool {
    match path {
        "/" | "/index.html" | "/favicon.svg" => true,
        _ => path.strip_prefix("/assets/").is_some_and(|n| {
            !n.is_empty()
                && !n.starts_with('.')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        }),
    }
}

/// One credential in a tokens file: its name, grant and the SHA-256 of the token (hex).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub name: String,
    pub role: Grant,
    pub sha256: String,
}

/// An agent's tokens file (`--api-tokens`).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct TokensFile {
    pub tokens: Vec<TokenEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_needs_the_access_its_role_table_says() {
        use Access::*;
        for (m, p, want) in [
            ("GET", "/v1/health", Read),
            ("GET", "/", Public),
            ("GET", "/index.html", Public),
            ("GET", "/assets/index-abc.js", Public),
            ("GET", "/assets/../v1/vms", Read),
            ("GET", "/assets/", Read),
            ("POST", "/", Administer),
            ("GET", "/v1/vms/a/targets", Read),
            ("GET", "/v1/vms/a/serial", Read),
            ("GET", "/v1/vms/a", Read),
            ("GET", "/v1/migrations/x/events", Read),
            ("GET", "/metrics", Read),
            ("POST", "/v1/vms/a/start", Operate),
            ("POST", "/v1/vms/a/stop", Operate),
            ("POST", "/v1/vms/a/migrate?dry_run=1", Operate),
            ("POST", "/v1/nodes/n1/drain", Operate),
            ("POST", "/v1/nodes/n1/undrain", Operate),
            ("POST", "/v1/migrations/x/cancel", Operate),
            ("POST", "/v1/vms", Administer),
            ("DELETE", "/v1/vms/a", Administer),
            ("PUT", "/v1/vms/a", Administer),
            ("POST", "/v1/something/new", Administer),
            ("POST", "/v1/internal/receive", Internal),
            ("GET", "/v1/internal/receive", Internal),
        ] {
            assert_eq!(access_for(m, p), want, "{m} {p}");
        }
    }

    #[test]
    fn grants_allow_what_they_say_and_no_more() {
        use Access::*;
        let table = [
            (Grant::Viewer, [true, false, false, false]),
            (Grant::Operator, [true, true, false, false]),
            (Grant::Admin, [true, true, true, false]),
            (Grant::Node, [true, true, false, true]),
        ];
        for (g, want) in table {
            for (access, w) in [Read, Operate, Administer, Internal].into_iter().zip(want) {
                assert_eq!(g.allows(access), w, "{g} {access:?}");
            }
            assert_eq!(g.to_string().parse::<Grant>(), Ok(g));
        }
        assert!("root".parse::<Grant>().is_err());
        assert_eq!(Grant::from(crate::trust::Role::Admin), Grant::Admin);
    }
}
