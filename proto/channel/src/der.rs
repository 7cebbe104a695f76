//! The little of X.509 pagecast reads itself: the subject's common name
//! and organizational unit of a certificate whose chain rustls (webpki)
//! has already verified, and of the CA's own certificate. A bounded DER
//! walk: every length is checked against what remains, nothing is
//! allocated before it is.

/// One TLV at the start of `b`: its tag, contents and what follows.
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |l, &x| (l << 8) | usize::from(x));
        (len, &b[n..])
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

fn expect(b: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, content, rest) = tlv(b)?;
    (tag == want).then_some((content, rest))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// id-at-commonName, 2.5.4.3.
pub(crate) const CN: &[u8] = &[0x55, 0x04, 0x03];
/// id-at-organizationalUnitName, 2.5.4.11.
pub(crate) const OU: &[u8] = &[0x55, 0x04, 0x0b];

/// The subject's attributes of a DER certificate, as (OID, text) pairs;
/// `None` if it does not parse or a value is not text.
pub(crate) fn subject(der: &[u8]) -> Option<Vec<(Vec<u8>, String)>> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, optional.
    if let Some((0xa0, _, r)) = tlv(rest) {
        rest = r;
    }
    let (_, r) = expect(rest, 0x02)?; // serialNumber
    let (_, r) = expect(r, SEQUENCE)?; // signature
    let (_, r) = expect(r, SEQUENCE)?; // issuer
    let (_, r) = expect(r, SEQUENCE)?; // validity
    let (mut name, _) = expect(r, SEQUENCE)?; // subject
    let mut out = Vec::new();
    while !name.is_empty() {
        let (mut rdn, r) = expect(name, SET)?;
        name = r;
        while !rdn.is_empty() {
            let (atv, r) = expect(rdn, SEQUENCE)?;
            rdn = r;
            let (oid, r) = expect(atv, OID)?;
            let (tag, value, _) = tlv(r)?;
            // UTF8String, PrintableString, IA5String.
            if !matches!(tag, 0x0c | 0x13 | 0x16) {
                return None;
            }
            out.push((oid.to_vec(), String::from_utf8(value.to_vec()).ok()?));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_bytes_are_refused_or_read_without_panicking(
            b in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let _ = subject(&b);
        }

        #[test]
        fn a_cut_or_altered_certificate_never_panics(cut in 0usize..600, at in 0usize..600, x in 1u8..=255) {
            let ca = crate::ca::Authority::generate().unwrap();
            let now = std::time::SystemTime::now();
            let (cert, _) = ca
                .sign("node-1", crate::Role::Reader, now, now + std::time::Duration::from_secs(60))
                .unwrap();
            use rustls::pki_types::{CertificateDer, pem::PemObject};
            let mut der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap().to_vec();
            let whole = subject(&der).unwrap();
            proptest::prop_assert!(whole.contains(&(CN.to_vec(), "node-1".into())));
            proptest::prop_assert!(whole.contains(&(OU.to_vec(), "reader".into())));
            if at < der.len() {
                der[at] ^= x;
            }
            der.truncate(cut.max(1));
            let _ = subject(&der);
        }
    }
}
