//! The cluster CA and the certificates it issues, as PEM files in one directory:
//!
//! ```text
//! DIR/ca.pem            the CA certificate (give it to every node and user)
//! DIR/ca.key            the CA key (0600; only `ferry pki issue` needs it)
//! DIR/node-NAME.pem     a node certificate (SAN NAME.node.ferry + its addresses) …
//! DIR/node-NAME.key     … and its key (0600)
//! DIR/user-NAME.pem     a user certificate (SAN NAME.ROLE.user.ferry) …
//! DIR/user-NAME.key     … and its key (0600)
//! ```
//! Keys are ECDSA P-256. Node certificates serve and authenticate (server + client auth),
//! user certificates only authenticate (client auth).

use crate::identity::Identity;
use crate::TrustError;
use contract::trust::TlsFiles;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// Validity of the CA.
pub const CA_DAYS: i64 = 3650;
/// Default validity of an issued certificate.
pub const CERT_DAYS: i64 = 365;

/// An in-memory CA: its certificate (PEM) and key.
pub struct Ca {
    pub cert_pem: String,
    key: KeyPair,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

fn validity(p: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for hosts whose clocks disagree.
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(days);
}

fn serial(p: &mut CertificateParams) -> Result<(), TrustError> {
    let mut s = crate::secret::random_bytes::<16>()?;
    s[0] &= 0x7f; // positive
    p.serial_number = Some(rcgen::SerialNumber::from_slice(&s));
    Ok(())
}

impl Ca {
    /// A new CA named `name` (its common name).
    pub fn generate(name: &str) -> Result<Ca, TrustError> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "ferry");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut p, CA_DAYS);
        serial(&mut p)?;
        let cert = p.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// The CA of `dir` (written by [`init`]).
    pub fn load(dir: &Path) -> Result<Ca, TrustError> {
        let cert_pem = read(&dir.join(CA_CERT))?;
        let key_path = dir.join(CA_KEY);
        let key = KeyPair::from_pem(&read(&key_path)?).map_err(|e| TrustError::Pem {
            path: key_path,
            what: format!("not a usable private key: {e}"),
        })?;
        Ok(Ca { cert_pem, key })
    }

    /// A certificate for `id`, valid `days` days. A node's may also name `addresses` (IP
    /// addresses or DNS names).
    pub fn issue(
        &self,
        id: &Identity,
        addresses: &[String],
        days: i64,
    ) -> Result<Issued, TrustError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "ferry");
        let mut sans = vec![SanType::DnsName(id.dns_name().try_into()?)];
        match id {
            Identity::Node(name) => {
                dn.push(DnType::CommonName, name.as_str());
                dn.push(DnType::OrganizationalUnitName, "node");
                for a in addresses {
                    sans.push(match a.parse::<std::net::IpAddr>() {
                        Ok(ip) => SanType::IpAddress(ip),
                        Err(_) => SanType::DnsName(
                            a.clone()
                                .try_into()
                                .map_err(|_| TrustError::BadAddress(a.clone()))?,
                        ),
                    });
                }
                p.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
            }
            Identity::User { name, role } => {
                if let Some(a) = addresses.first() {
                    return Err(TrustError::BadAddress(format!(
                        "{a} (a user certificate names no addresses)"
                    )));
                }
                dn.push(DnType::CommonName, name.as_str());
                dn.push(DnType::OrganizationalUnitName, role.as_str());
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, days);
        serial(&mut p)?;
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn read(path: &Path) -> Result<String, TrustError> {
    std::fs::read_to_string(path).map_err(|err| TrustError::File {
        what: "read",
        path: path.to_path_buf(),
        err,
    })
}

/// Writes `data` to `path` through a fresh (O_EXCL) temporary file in the same directory,
/// created with `mode`, synced, then renamed over `path`.
fn write_file(path: &Path, data: &str, mode: u32) -> Result<(), TrustError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(
        ".{name}.{}.{:x}.tmp",
        std::process::id(),
        u64::from_le_bytes(crate::secret::random_bytes::<8>()?)
    ));
    let io = |what, err| TrustError::File {
        what,
        path: path.to_path_buf(),
        err,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    let r = f
        .write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = r {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", e));
    }
    Ok(())
}

/// Creates the cluster CA in `dir` (created if missing). Refuses to replace an existing CA
/// unless `force`. Returns the CA certificate's path.
pub fn init(dir: &Path, force: bool) -> Result<PathBuf, TrustError> {
    std::fs::create_dir_all(dir).map_err(|err| TrustError::File {
        what: "create",
        path: dir.to_path_buf(),
        err,
    })?;
    let cert = dir.join(CA_CERT);
    if !force && (cert.exists() || dir.join(CA_KEY).exists()) {
        return Err(TrustError::Exists { path: cert });
    }
    let ca = Ca::generate("ferry cluster CA")?;
    write_file(&dir.join(CA_KEY), &ca.key.serialize_pem(), 0o600)?;
    write_file(&cert, &ca.cert_pem, 0o644)?;
    Ok(cert)
}

/// The files of node `name`'s identity in `dir`.
pub fn node_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("node-{name}.pem")),
        key: dir.join(format!("node-{name}.key")),
        ca: dir.join(CA_CERT),
    }
}

/// The files of user `name`'s identity in `dir`.
pub fn user_files(dir: &Path, name: &str) -> TlsFiles {
    TlsFiles {
        cert: dir.join(format!("user-{name}.pem")),
        key: dir.join(format!("user-{name}.key")),
        ca: dir.join(CA_CERT),
    }
}

/// Issues a certificate for `id` with the CA of `dir` and writes it there (key 0600).
pub fn issue(
    dir: &Path,
    id: &Identity,
    addresses: &[String],
    days: i64,
) -> Result<TlsFiles, TrustError> {
    let ca = Ca::load(dir)?;
    let issued = ca.issue(id, addresses, days)?;
    let files = match id {
        Identity::Node(n) => node_files(dir, n),
        Identity::User { name, .. } => user_files(dir, name),
    };
    write_file(&files.key, &issued.key_pem, 0o600)?;
    write_file(&files.cert, &issued.cert_pem, 0o644)?;
    Ok(files)
}
