//! The cluster's certificate authority: `pagecast ca init` and
//! `pagecast ca issue`.
//!
//! A CA directory holds `ca.crt` and `ca.key` (owner-only), and
//! `domains.key` (owner-only): the cluster's dedup-domain secret, 32 random
//! bytes in hex from which each dedup domain's page-hash key is derived. A
//! node directory holds `ca.crt`, `node.crt` and `node.key`; a host's also
//! holds a copy of `domains.key`. Keys are ECDSA P-256; a node certificate
//! names its holder (subject CN), its role (subject OU) and serves as both
//! TLS client and server.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use rustls::pki_types::{CertificateDer, pem::PemObject};

use pagecast_pages::DomainSecret;

use crate::{AuthError, CA_CERT, NODE_CERT, NODE_KEY, Role, Tls, read_pem};

/// The CA's private key file.
pub const CA_KEY: &str = "ca.key";
/// The cluster's dedup-domain secret (in the CA directory and every host's
/// node directory).
pub const DOMAINS_KEY: &str = "domains.key";
/// Longest `domains.key` read (64 hex digits and whitespace).
const MAX_DOMAINS_KEY_BYTES: u64 = 256;
/// How long a CA is valid.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long a node certificate is valid unless told otherwise.
pub const DEFAULT_DAYS: u32 = 365;

/// A loaded CA: its certificate and key.
pub struct Authority {
    cert_pem: String,
    key: KeyPair,
    /// The cluster's dedup-domain secret (`domains.key`).
    domains: DomainSecret,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority(..)")
    }
}

fn ca_usages() -> Vec<KeyUsagePurpose> {
    vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ]
}

fn pki(path: &Path, why: impl Into<String>) -> AuthError {
    AuthError::Pki {
        path: path.to_owned(),
        why: why.into(),
    }
}

/// Checks a node name: 1 to 64 of `A-Z a-z 0-9 . _ -`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!(
            "a node name has 1 to 64 characters, {name:?} has {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "a node name may hold letters, digits, '.', '_' and '-'; {name:?} has {c:?}"
        ));
    }
    Ok(())
}

fn write_private(path: &Path, text: &str, private: bool) -> Result<(), AuthError> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    let mut f = opts
        .open(path)
        .map_err(|e| pki(path, format!("cannot create: {e}")))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| pki(path, format!("cannot write: {e}")))
}

/// A new dedup-domain secret.
fn new_domains_secret() -> Result<DomainSecret, AuthError> {
    let mut b = [0u8; 32];
    crate::random_bytes(&mut b)?;
    Ok(DomainSecret::from_bytes(b))
}

/// Reads and checks a `domains.key` (bounded; 64 hex digits, the format
/// `DomainSecret` parses). Errors name the file.
pub fn read_domains_secret(path: &Path) -> Result<DomainSecret, AuthError> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| pki(path, format!("cannot open: {e}")))?;
    let mut text = String::new();
    f.take(MAX_DOMAINS_KEY_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| pki(path, format!("cannot read: {e}")))?;
    if text.len() as u64 > MAX_DOMAINS_KEY_BYTES {
        return Err(pki(
            path,
            "is not a domain secret (64 hex digits): too long",
        ));
    }
    DomainSecret::parse(&text).map_err(|e| pki(path, e.to_string()))
}

/// The CA's dedup-domain secret; a CA made before domains existed gets one
/// now (written owner-only, once: a concurrent writer's file wins).
fn load_domains_secret(dir: &Path) -> Result<DomainSecret, AuthError> {
    let path = dir.join(DOMAINS_KEY);
    if !path.exists() {
        let fresh = new_domains_secret()?;
        match write_private(&path, &fresh.to_text(), true) {
            Ok(()) => return Ok(fresh),
            Err(_) if path.exists() => {}
            Err(e) => return Err(e),
        }
    }
    read_domains_secret(&path)
}

impl Authority {
    /// A new CA (in memory).
    pub fn generate() -> Result<Self, AuthError> {
        let key = KeyPair::generate().map_err(|e| AuthError::Random(e.to_string()))?;
        let mut id = [0u8; 6];
        crate::random_bytes(&mut id)?;
        let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, format!("pagecast cluster CA {id}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = ca_usages();
        let now = SystemTime::now();
        p.not_before = (now - Duration::from_secs(3600)).into();
        p.not_after = (now + CA_VALIDITY).into();
        let cert = p
            .self_signed(&key)
            .map_err(|e| AuthError::Random(format!("cannot sign the CA certificate: {e}")))?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key,
            domains: new_domains_secret()?,
        })
    }

    /// Makes a new CA in `dir` (created if needed); refuses to replace one.
    pub fn init(dir: &Path) -> Result<Self, AuthError> {
        if dir.join(CA_KEY).exists() {
            return Err(pki(
                dir,
                "already holds a CA (ca.key); a new CA would orphan every certificate it issued",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| pki(dir, format!("cannot create: {e}")))?;
        let a = Self::generate()?;
        write_private(&dir.join(CA_KEY), &a.key.serialize_pem(), true)?;
        write_private(&dir.join(CA_CERT), &a.cert_pem, false)?;
        write_private(&dir.join(DOMAINS_KEY), &a.domains.to_text(), true)?;
        Ok(a)
    }

    /// Reads the CA of `dir`.
    pub fn load(dir: &Path) -> Result<Self, AuthError> {
        let cert_pem = read_pem(&dir.join(CA_CERT))?;
        let key_path = dir.join(CA_KEY);
        let key = KeyPair::from_pem(&read_pem(&key_path)?)
            .map_err(|e| pki(&key_path, format!("is not a private key: {e}")))?;
        let domains = load_domains_secret(dir)?;
        let a = Authority {
            cert_pem,
            key,
            domains,
        };
        // Check that the two belong together before handing it out: a
        // certificate it signs must chain to the CA certificate.
        a.check().map_err(|why| {
            pki(
                dir,
                format!("ca.crt and ca.key do not belong together: {why}"),
            )
        })?;
        Ok(a)
    }

    /// The CA certificate's subject name, to sign under.
    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, String> {
        let der = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| format!("ca.crt holds no certificate: {e}"))?;
        let attrs = crate::der::subject(&der).ok_or("ca.crt does not parse")?;
        let cn = attrs
            .into_iter()
            .find(|(o, _)| o == crate::der::CN)
            .map(|(_, v)| v)
            .ok_or("ca.crt names no common name")?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        p.key_usages = ca_usages();
        Ok(Issuer::new(p, &self.key))
    }

    /// Signs a throwaway certificate and verifies it against the CA
    /// certificate.
    fn check(&self) -> Result<(), String> {
        let now = SystemTime::now();
        let (cert, _) = self
            .sign("check", Role::Reader, now, now + Duration::from_secs(60))
            .map_err(|e| e.to_string())?;
        let leaf = CertificateDer::from_pem_slice(cert.as_bytes()).map_err(|e| e.to_string())?;
        let ca =
            CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca).map_err(|e| e.to_string())?;
        let parsed =
            rustls::server::ParsedCertificate::try_from(&leaf).map_err(|e| e.to_string())?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &[],
            rustls::pki_types::UnixTime::now(),
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
        )
        .map_err(|e| e.to_string())
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Signs a certificate for `name` with `role`, valid from `not_before`
    /// to `not_after`; returns the certificate and key as PEM.
    pub fn sign(
        &self,
        name: &str,
        role: Role,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), AuthError> {
        check_name(name).map_err(|e| pki(Path::new(name), e))?;
        let issuer = self.issuer().map_err(AuthError::Random)?;
        let key = KeyPair::generate().map_err(|e| AuthError::Random(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, role.as_str());
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        let mut serial = [0u8; 16];
        crate::random_bytes(&mut serial)?;
        serial[0] &= 0x7f;
        p.serial_number = Some(serial.to_vec().into());
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        let cert = p
            .signed_by(&key, &issuer)
            .map_err(|e| AuthError::Random(format!("cannot sign a certificate: {e}")))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A node identity valid for `days` from now, in memory.
    pub fn issue(&self, name: &str, role: Role, days: u32) -> Result<Tls, AuthError> {
        let now = SystemTime::now();
        let (cert, key) = self.sign(
            name,
            role,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(u64::from(days) * 86_400),
        )?;
        Tls::from_pem(&self.cert_pem, &cert, &key).map_err(|e| pki(Path::new(name), e))
    }

    /// Writes a node directory `out` for `name` with `role`, valid for
    /// `days`; refuses to replace an existing key.
    pub fn issue_to(
        &self,
        name: &str,
        role: Role,
        days: u32,
        out: &Path,
    ) -> Result<PathBuf, AuthError> {
        let now = SystemTime::now();
        self.write_node(
            name,
            role,
            now - Duration::from_secs(3600),
            now + Duration::from_secs(u64::from(days) * 86_400),
            out,
        )
    }

    /// Writes a node directory with an explicit validity window.
    pub fn write_node(
        &self,
        name: &str,
        role: Role,
        not_before: SystemTime,
        not_after: SystemTime,
        out: &Path,
    ) -> Result<PathBuf, AuthError> {
        if out.join(NODE_KEY).exists() {
            return Err(pki(
                out,
                "already holds a node key (node.key); not replaced",
            ));
        }
        let (cert, key) = self.sign(name, role, not_before, not_after)?;
        std::fs::create_dir_all(out).map_err(|e| pki(out, format!("cannot create: {e}")))?;
        write_private(&out.join(NODE_KEY), &key, true)?;
        write_private(&out.join(NODE_CERT), &cert, false)?;
        let ca = out.join(CA_CERT);
        if ca.exists() {
            std::fs::remove_file(&ca).map_err(|e| pki(&ca, format!("cannot replace: {e}")))?;
        }
        write_private(&ca, &self.cert_pem, false)?;
        if role == Role::Host {
            let path = out.join(DOMAINS_KEY);
            if path.exists() {
                std::fs::remove_file(&path)
                    .map_err(|e| pki(&path, format!("cannot replace: {e}")))?;
            }
            write_private(&path, &self.domains.to_text(), true)?;
        }
        Ok(out.to_owned())
    }
}
