//! Who a certificate names.
//!
//! Naming rule (one Ferry identity per certificate, in a DNS subject alternative name):
//! * a node `NAME`: `NAME.node.ferry` (CN = `NAME`); node certificates may also name the
//!   node's addresses (IP or DNS SANs) for clients that connect by address.
//! * a user `USER` with role `ROLE` (viewer, operator, admin): `USER.ROLE.user.ferry`
//!   (CN = `USER`, OU = `ROLE` for people reading the certificate; the SAN is what counts).
//!
//! Names are DNS labels: 1-63 characters of `a-z`, `0-9` and `-`, not starting or ending
//! with `-`. A node certificate can never be mistaken for a user's (different suffixes), and a
//! node's identity is checked by the ordinary TLS name check against `NAME.node.ferry`.

use crate::TrustError;
use contract::trust::Role;
use std::fmt;

/// DNS suffix of node identities.
pub const NODE_SUFFIX: &str = "node.ferry";
/// DNS suffix of user identities.
pub const USER_SUFFIX: &str = "user.ferry";

/// A Ferry identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    Node(String),
    User { name: String, role: Role },
}

/// Checks a node or user name against the naming rule.
pub fn check_name(what: &'static str, name: &str) -> Result<(), TrustError> {
    let bad = |why| TrustError::BadName {
        what,
        name: name.to_string(),
        why,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(bad("1-63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only a-z, 0-9 and '-'"));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(bad("must not start or end with '-'"));
    }
    Ok(())
}

impl Identity {
    /// A node identity (name checked).
    pub fn node(name: &str) -> Result<Identity, TrustError> {
        check_name("node", name)?;
        Ok(Identity::Node(name.to_string()))
    }

    /// A user identity (name checked).
    pub fn user(name: &str, role: Role) -> Result<Identity, TrustError> {
        check_name("user", name)?;
        Ok(Identity::User {
            name: name.to_string(),
            role,
        })
    }

    /// The DNS SAN that carries this identity.
    pub fn dns_name(&self) -> String {
        match self {
            Identity::Node(n) => format!("{n}.{NODE_SUFFIX}"),
            Identity::User { name, role } => format!("{name}.{role}.{USER_SUFFIX}"),
        }
    }

    /// The identity a DNS SAN carries, if it is one of Ferry's.
    pub fn from_dns_name(dns: &str) -> Option<Identity> {
        if let Some(n) = dns.strip_suffix(&format!(".{NODE_SUFFIX}")) {
            return Identity::node(n).ok();
        }
        let rest = dns.strip_suffix(&format!(".{USER_SUFFIX}"))?;
        let (name, role) = rest.rsplit_once('.')?;
        Identity::user(name, role.parse().ok()?).ok()
    }

    /// The Ferry identities a DER certificate names (its DNS SANs that follow the rule).
    pub fn all_in_cert(der: &[u8]) -> Vec<Identity> {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Vec::new();
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return Vec::new();
        };
        san.value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::DNSName(d) => Identity::from_dns_name(d),
                _ => None,
            })
            .collect()
    }

    /// The one Ferry identity a certificate names (`None` if it names none or several).
    pub fn of_cert(der: &[u8]) -> Option<Identity> {
        let mut all = Identity::all_in_cert(der);
        (all.len() == 1).then(|| all.remove(0))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Node(n) => write!(f, "node {n}"),
            Identity::User { name, role } => write!(f, "user {name} ({role})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule_and_round_trip() {
        for id in [
            Identity::node("node-1").unwrap(),
            Identity::user("alice", Role::Operator).unwrap(),
        ] {
            assert_eq!(Identity::from_dns_name(&id.dns_name()), Some(id));
        }
        for bad in ["", "A", "a.b", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(Identity::node(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Identity::from_dns_name("a.root.user.ferry"), None);
        assert_eq!(Identity::from_dns_name("a.b.node.ferry"), None);
        assert_eq!(Identity::from_dns_name("example.com"), None);
    }
}
