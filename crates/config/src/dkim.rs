//! `[[dkim]]`: the signing keys, read and checked when the config is
//! loaded (so at start and on every reload), and the one rule that says
//! which entries sign a message ([`signing_entries`]).

use std::path::{Path, PathBuf};

use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::DecodePrivateKey;
use rsa::traits::PublicKeyParts;

/// The smallest RSA key accepted, in bits (RFC 8301 asks verifiers to
/// refuse smaller ones).
pub const MIN_RSA_BITS: usize = 2048;

/// The header fields signed when an entry gives no `headers`: what a
/// receiver shows or a list rewrites. `From` is listed twice (oversigned),
/// so a second `From:` added on the way breaks the signature.
pub const DEFAULT_DKIM_HEADERS: &[&str] = &[
    "From",
    "From",
    "Reply-To",
    "Sender",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Post",
    "List-Help",
    "List-Subscribe",
    "List-Owner",
    "List-Archive",
];

/// A signing algorithm (`algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimAlgorithm {
    /// `rsa-sha256`, the default: every verifier knows it.
    RsaSha256,
    /// `ed25519-sha256` (RFC 8463): short keys; publish an RSA key beside it
    /// for verifiers that do not know it yet.
    Ed25519Sha256,
}

impl DkimAlgorithm {
    /// The word in the config and in the signature's `a=` tag.
    pub fn as_str(self) -> &'static str {
        match self {
            DkimAlgorithm::RsaSha256 => "rsa-sha256",
            DkimAlgorithm::Ed25519Sha256 => "ed25519-sha256",
        }
    }
}

/// A private key, as read from `key_file`. Its `Debug` shows the kind and
/// size only, never the key.
#[derive(Clone, PartialEq, Eq)]
pub enum DkimKey {
    /// An RSA key as PKCS#1 DER, and its size in bits.
    Rsa {
        /// PKCS#1 DER of the private key.
        pkcs1_der: Vec<u8>,
        /// Modulus size.
        bits: usize,
    },
    /// An Ed25519 key: its 32-byte seed.
    Ed25519 {
        /// The private seed.
        seed: [u8; 32],
    },
}

impl std::fmt::Debug for DkimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.kind())
    }
}

impl DkimKey {
    /// What kind of key this is, for `check --print` and errors: `RSA 2048 bits`, `Ed25519`.
    pub fn kind(&self) -> String {
        match self {
            DkimKey::Rsa { bits, .. } => format!("RSA {bits} bits"),
            DkimKey::Ed25519 { .. } => "Ed25519".to_string(),
        }
    }

    /// The algorithm this key signs with.
    pub fn algorithm(&self) -> DkimAlgorithm {
        match self {
            DkimKey::Rsa { .. } => DkimAlgorithm::RsaSha256,
            DkimKey::Ed25519 { .. } => DkimAlgorithm::Ed25519Sha256,
        }
    }
}

/// One `[[dkim]]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Dkim {
    /// `domain`: the signing domain (`d=`), lower case.
    pub domain: String,
    /// `selector`: the DNS name the public key is published under
    /// (`SELECTOR._domainkey.DOMAIN`).
    pub selector: String,
    /// `key_file` as written.
    pub key_file: PathBuf,
    /// The key read from `key_file`.
    pub key: DkimKey,
    /// `algorithm`, default `rsa-sha256`; always matches the key.
    pub algorithm: DkimAlgorithm,
    /// `pools`: the pools whose mail this entry signs; empty = every pool.
    pub pools: Vec<String>,
    /// `headers`: the header fields signed ([`DEFAULT_DKIM_HEADERS`] by default).
    pub headers: Vec<String>,
    /// `envelope_fallback`, default true: also sign mail whose envelope
    /// sender is in `domain` when no entry matches its `From:` domain.
    pub envelope_fallback: bool,
    /// Line of the `[[dkim]]` header.
    pub line: usize,
}

impl Dkim {
    /// Whether this entry signs mail of `pool`.
    pub fn serves(&self, pool: &str) -> bool {
        self.pools.is_empty() || self.pools.iter().any(|p| p == pool)
    }
}

/// Whether `domain` is `entry_domain` or one of its subdomains (relaxed
/// DMARC alignment: `lists.example.org` is aligned with `example.org`).
/// Both compared case-insensitively.
pub fn domain_within(domain: &str, entry_domain: &str) -> bool {
    let domain = domain.trim_end_matches('.');
    let entry = entry_domain.trim_end_matches('.');
    if domain.eq_ignore_ascii_case(entry) {
        return true;
    }
    domain.len() > entry.len() + 1
        && domain.as_bytes()[domain.len() - entry.len() - 1] == b'.'
        && domain[domain.len() - entry.len()..].eq_ignore_ascii_case(entry)
}

/// Which entries sign a message of `pool`, as indexes into `entries`:
///
/// 1. every entry serving the pool whose domain is the `From:` domain or
///    a parent of it (so the signature aligns with `From:` for DMARC);
/// 2. if none does, every entry serving the pool with `envelope_fallback`
///    whose domain is the envelope sender's domain or a parent of it
///    (a signature that builds the sending domain's reputation, not aligned);
/// 3. else none: the message is relayed unsigned.
///
/// `from_domain` is the domain of the single `From:` address (None when
/// the header is missing, has several addresses or cannot be read);
/// `sender_domain` that of the envelope sender (None for `<>`).
pub fn signing_entries(
    entries: &[Dkim],
    pool: &str,
    from_domain: Option<&str>,
    sender_domain: Option<&str>,
) -> Vec<usize> {
    let serving = || entries.iter().enumerate().filter(|(_, e)| e.serves(pool));
    if let Some(from) = from_domain {
        let aligned: Vec<usize> = serving()
            .filter(|(_, e)| domain_within(from, &e.domain))
            .map(|(i, _)| i)
            .collect();
        if !aligned.is_empty() {
            return aligned;
        }
    }
    match sender_domain {
        Some(sender) => serving()
            .filter(|(_, e)| e.envelope_fallback && domain_within(sender, &e.domain))
            .map(|(i, _)| i)
            .collect(),
        None => Vec::new(),
    }
}

/// Reads a PEM private key (PKCS#8 `PRIVATE KEY` as `openssl genpkey`
/// writes, or PKCS#1 `RSA PRIVATE KEY`). The error says what is wrong.
pub(crate) fn read_key(path: &Path) -> Result<DkimKey, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot be read: {e}"))?;
    parse_key(&text)
}

/// Parses a PEM private key; see [`read_key`].
pub(crate) fn parse_key(text: &str) -> Result<DkimKey, String> {
    let text = text.trim();
    if text.contains("-----BEGIN RSA PRIVATE KEY-----") {
        let key = rsa::RsaPrivateKey::from_pkcs1_pem(text)
            .map_err(|e| format!("is not a readable RSA private key ({e})"))?;
        return rsa_key(&key);
    }
    if !text.contains("-----BEGIN PRIVATE KEY-----") {
        return Err("holds no PEM private key (\"-----BEGIN PRIVATE KEY-----\" or \"-----BEGIN RSA PRIVATE KEY-----\")".to_string());
    }
    if let Ok(key) = rsa::RsaPrivateKey::from_pkcs8_pem(text) {
        return rsa_key(&key);
    }
    let (_, doc) = rsa::pkcs8::SecretDocument::from_pem(text)
        .map_err(|e| format!("is not a readable PEM private key ({e})"))?;
    let info = rsa::pkcs8::PrivateKeyInfo::try_from(doc.as_bytes())
        .map_err(|e| format!("is not a readable PKCS#8 private key ({e})"))?;
    // id-Ed25519 (RFC 8410): the key is an OCTET STRING holding the 32-byte seed.
    const ED25519: rsa::pkcs8::ObjectIdentifier =
        rsa::pkcs8::ObjectIdentifier::new_unwrap("1.3.101.112");
    if info.algorithm.oid != ED25519 {
        return Err(format!(
            "holds a key of algorithm {}, neither RSA nor Ed25519",
            info.algorithm.oid
        ));
    }
    match info.private_key {
        [0x04, 0x20, seed @ ..] if seed.len() == 32 => {
            let mut out = [0u8; 32];
            out.copy_from_slice(seed);
            Ok(DkimKey::Ed25519 { seed: out })
        }
        _ => Err("holds a malformed Ed25519 key".to_string()),
    }
}

fn rsa_key(key: &rsa::RsaPrivateKey) -> Result<DkimKey, String> {
    let der = key
        .to_pkcs1_der()
        .map_err(|e| format!("holds an RSA key that cannot be encoded ({e})"))?;
    Ok(DkimKey::Rsa {
        pkcs1_der: der.as_bytes().to_vec(),
        bits: key.size() * 8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(domain: &str, pools: &[&str], envelope_fallback: bool) -> Dkim {
        Dkim {
            domain: domain.to_string(),
            selector: "s".to_string(),
            key_file: PathBuf::from("k"),
            key: DkimKey::Ed25519 { seed: [0; 32] },
            algorithm: DkimAlgorithm::Ed25519Sha256,
            pools: pools.iter().map(|p| p.to_string()).collect(),
            headers: Vec::new(),
            envelope_fallback,
            line: 1,
        }
    }

    #[test]
    fn a_domain_is_within_itself_and_its_parents_only() {
        assert!(domain_within("example.org", "example.org"));
        assert!(domain_within("Lists.Example.ORG", "example.org"));
        assert!(domain_within("a.b.example.org.", "EXAMPLE.org"));
        assert!(!domain_within("badexample.org", "example.org"));
        assert!(!domain_within("example.org", "lists.example.org"));
        assert!(!domain_within("org", "example.org"));
    }

    #[test]
    fn every_entry_aligned_with_from_signs() {
        let e = [
            entry("example.org", &[], true),
            entry("example.com", &[], true),
            entry("lists.example.org", &[], true),
        ];
        assert_eq!(
            signing_entries(&e, "A", Some("lists.example.org"), Some("example.com")),
            vec![0, 2]
        );
        assert_eq!(signing_entries(&e, "A", Some("example.com"), None), vec![1]);
    }

    #[test]
    fn an_entry_signs_only_the_pools_it_lists() {
        let e = [
            entry("example.org", &["A"], true),
            entry("example.org", &["B"], true),
        ];
        assert_eq!(signing_entries(&e, "B", Some("example.org"), None), vec![1]);
        assert_eq!(
            signing_entries(&e, "-", Some("example.org"), Some("example.org")),
            Vec::<usize>::new()
        );
    }

    #[test]
    fn without_an_aligned_key_the_envelope_domain_signs_if_allowed() {
        let e = [
            entry("example.org", &[], true),
            entry("example.com", &[], false),
        ];
        // From: a domain without a key, envelope sender in example.org.
        assert_eq!(
            signing_entries(&e, "A", Some("gmail.test"), Some("lists.example.org")),
            vec![0]
        );
        // The envelope domain's entry says envelope_fallback = false: unsigned.
        assert!(signing_entries(&e, "A", Some("gmail.test"), Some("example.com")).is_empty());
        // No From: at all: the envelope domain.
        assert_eq!(signing_entries(&e, "A", None, Some("example.org")), vec![0]);
        // The null sender and no From: unsigned.
        assert!(signing_entries(&e, "A", None, None).is_empty());
        // An aligned entry wins over the envelope domain's.
        assert_eq!(
            signing_entries(&e, "A", Some("example.com"), Some("example.org")),
            vec![1]
        );
    }

    #[test]
    fn keys_are_read_from_pem_and_never_shown() {
        let ed = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJ1hsZ3v/VpguoRK9JLsLMREScVpezJpGXA7rAMcrn9g\n-----END PRIVATE KEY-----\n";
        let key = parse_key(ed).unwrap();
        assert_eq!(key.algorithm(), DkimAlgorithm::Ed25519Sha256);
        assert_eq!(format!("{key:?}"), "Ed25519");
        assert!(
            parse_key("hello")
                .unwrap_err()
                .contains("no PEM private key")
        );
        assert!(
            parse_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----")
                .unwrap_err()
                .contains("not a readable")
        );
    }
}
