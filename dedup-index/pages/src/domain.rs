//! Dedup domains: which VMs may share page content.
//!
//! Cross-VM page sharing is a side channel (a tenant that can tell whether
//! a page it guesses exists elsewhere learns what others run), so every VM
//! belongs to a domain and pages are compared only within one. The
//! cluster-wide domain ([`CLUSTER_DOMAIN`], the default) names pages with
//! plain BLAKE3-256; any other domain names them with keyed BLAKE3, its key
//! derived from the cluster's domain secret and the domain's name
//! ([`DomainSecret::key_for`]). Hosts hold the secret; the index, operators
//! and readers never see it, and hashes of two domains are unrelated.

use crate::hash::ContentKey;

/// The default domain every VM belongs to unless told otherwise: one
/// cluster-wide domain, hashed with plain BLAKE3.
pub const CLUSTER_DOMAIN: &str = "cluster";

/// Longest domain name, in bytes.
pub const MAX_DOMAIN_BYTES: usize = 64;

/// Context string of the key derivation (BLAKE3 `derive_key`).
const KDF_CONTEXT: &str = "pagecast 2026-12-01 dedup domain page key";

/// Why a domain or its key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// A name the cluster does not accept.
    #[error("domain name {0:?} must be 1 to 64 letters, digits, '.', '_' or '-'")]
    BadName(String),
    /// A keyed domain on a host without the cluster's domain secret.
    #[error(
        "domain {0:?} needs the cluster's domain secret (domains.key in this host's TLS \
         directory; `pagecast ca issue --role host` writes it)"
    )]
    NoSecret(String),
    /// The secret's text is not 64 hex digits.
    #[error("a domain secret is 64 hex digits: {0}")]
    BadSecret(String),
}

/// The domain name as stored: empty means [`CLUSTER_DOMAIN`].
pub fn normalize(domain: &str) -> &str {
    if domain.is_empty() {
        CLUSTER_DOMAIN
    } else {
        domain
    }
}

/// Checks a domain name: 1 to 64 of `A-Z a-z 0-9 . _ -` (empty means the
/// cluster-wide domain and is accepted).
pub fn check_domain(domain: &str) -> Result<(), DomainError> {
    if domain.is_empty() {
        return Ok(());
    }
    if domain.len() > MAX_DOMAIN_BYTES
        || !domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(DomainError::BadName(domain.to_owned()));
    }
    Ok(())
}

/// The cluster's domain secret: 32 random bytes every host holds, from
/// which each domain's key is derived. Debug output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct DomainSecret([u8; 32]);

impl std::fmt::Debug for DomainSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DomainSecret(..)")
    }
}

impl DomainSecret {
    /// Wraps 32 secret bytes.
    pub const fn from_bytes(b: [u8; 32]) -> Self {
        DomainSecret(b)
    }

    /// Parses the file form: 64 hex digits, surrounding whitespace allowed.
    pub fn parse(text: &str) -> Result<Self, DomainError> {
        let t = text.trim();
        if t.len() != 64 {
            return Err(DomainError::BadSecret(format!(
                "found {} characters",
                t.chars().count()
            )));
        }
        let mut out = [0u8; 32];
        for (i, pair) in t.as_bytes().chunks_exact(2).enumerate() {
            let s = std::str::from_utf8(pair).map_err(|_| {
                DomainError::BadSecret(format!("non-hex text at position {}", 2 * i))
            })?;
            out[i] = u8::from_str_radix(s, 16).map_err(|_| {
                DomainError::BadSecret(format!("{s:?} at position {} is not hex", 2 * i))
            })?;
        }
        Ok(DomainSecret(out))
    }

    /// The file form: 64 hex digits and a newline.
    pub fn to_text(&self) -> String {
        let mut s: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
        s.push('\n');
        s
    }

    /// The content key of `domain`: plain BLAKE3 for the cluster-wide
    /// domain, keyed BLAKE3 with a key derived from this secret and the
    /// name otherwise.
    pub fn key_for(&self, domain: &str) -> Result<ContentKey, DomainError> {
        key_for(Some(self), domain)
    }
}

/// The key of `domain` for offline analysis (`scan`, `plan` of images):
/// domains are kept apart exactly as the cluster's keys keep them, but the
/// key is public (derived from an all-zero secret), so it must never name a
/// running VM's pages.
pub fn analysis_key(domain: &str) -> Result<ContentKey, DomainError> {
    key_for(Some(&DomainSecret::from_bytes([0; 32])), domain)
}

/// The content key of `domain` given the secret this host holds, if any:
/// the cluster-wide domain needs none, any other domain does.
pub fn key_for(secret: Option<&DomainSecret>, domain: &str) -> Result<ContentKey, DomainError> {
    check_domain(domain)?;
    let domain = normalize(domain);
    if domain == CLUSTER_DOMAIN {
        return Ok(ContentKey::CLUSTER);
    }
    let secret = secret.ok_or_else(|| DomainError::NoSecret(domain.to_owned()))?;
    let mut material = Vec::with_capacity(32 + domain.len());
    material.extend_from_slice(&secret.0);
    material.extend_from_slice(domain.as_bytes());
    Ok(ContentKey::keyed(blake3::derive_key(
        KDF_CONTEXT,
        &material,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_cluster_domain_is_plain_blake3_and_needs_no_secret() {
        assert_eq!(key_for(None, ""), Ok(ContentKey::CLUSTER));
        assert_eq!(key_for(None, "cluster"), Ok(ContentKey::CLUSTER));
        assert_eq!(
            key_for(None, "tenant-a"),
            Err(DomainError::NoSecret("tenant-a".into()))
        );
    }

    #[test]
    fn keys_differ_by_domain_and_by_secret() {
        let s = DomainSecret::from_bytes([9; 32]);
        let t = DomainSecret::from_bytes([8; 32]);
        let a = s.key_for("a").unwrap();
        assert!(!a.is_cluster());
        assert_ne!(a, s.key_for("b").unwrap());
        assert_ne!(a, t.key_for("a").unwrap());
        assert_eq!(a, s.key_for("a").unwrap());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_domain("tenant_a.prod-1").is_ok());
        for bad in ["a b", "a/b", "ünï", &"x".repeat(65)] {
            assert!(
                matches!(check_domain(bad), Err(DomainError::BadName(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn secret_text_round_trips_and_bad_text_is_named() {
        let s = DomainSecret::from_bytes(core::array::from_fn(|i| i as u8 * 7));
        assert_eq!(DomainSecret::parse(&s.to_text()), Ok(s.clone()));
        assert!(DomainSecret::parse("abc").is_err());
        assert!(DomainSecret::parse(&"g".repeat(64)).is_err());
        assert_eq!(format!("{s:?}"), "DomainSecret(..)");
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_text_never_panics(s in ".{0,100}") {
            let _ = DomainSecret::parse(&s);
        }

        #[test]
        fn any_secret_round_trips(b in any::<[u8; 32]>()) {
            let s = DomainSecret::from_bytes(b);
            prop_assert_eq!(DomainSecret::parse(&s.to_text()).unwrap(), s);
        }
    }
}
