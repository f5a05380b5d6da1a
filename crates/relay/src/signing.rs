//! DKIM signing (RFC 6376, RFC 8463) and ARC sealing (RFC 8617) at
//! acceptance. The listener calls [`Signing::stamp`] once per message,
//! after classification and before the spool write, and stores the
//! headers it returns in front of the message: retries and failover send
//! the stored bytes and never sign again.
//!
//! Which `[[dkim]]` entries sign is the config's pure rule
//! [`poolrelay_config::signing_entries`]; this module reads the `From:`
//! domain, builds the signers once per config generation and writes the
//! headers. A key that fails to sign leaves the message unsigned by that
//! key (logged and counted by the caller), never refused.

use std::net::IpAddr;

use mail_auth::arc::ArcSealer;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mail_auth::{ArcOutput, AuthenticatedMessage, AuthenticationResults};
use poolrelay_config::{Config, Dkim, DkimKey, signing_entries};

use crate::classifier::parse_headers;

/// A DKIM signer of one `[[dkim]]` entry, by key kind.
enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// An ARC sealer with the RSA key of one `[[dkim]]` entry.
type Sealer = ArcSealer<RsaKey<Sha256>, Done>;

/// The signers of one config generation, index for index with `config.dkim`.
pub struct Signing {
    /// `None` where the key could not be loaded into a signer (each use
    /// is then a signing failure; the config check makes this unlikely).
    dkim: Vec<Option<Signer>>,
    /// ARC sealers by pool, for pools with `arc_seal = true`: the entry's
    /// headers, and the same plus one more (see [`Signing::seal`]).
    arc: Vec<(String, String, [Sealer; 2])>,
}

/// What the relay knows about how a message came in (client address,
/// inbound TLS, SMTP AUTH identity), recorded in the
/// ARC-Authentication-Results header by [`authentication_results`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Arrival {
    /// The client's address.
    pub client: Option<IpAddr>,
    /// The TLS version of the inbound session (`TLSv1.3`), if any.
    pub tls: Option<String>,
    /// The SMTP AUTH identity the client authenticated as, if any.
    pub auth: Option<String>,
}

/// The outcome of [`Signing::stamp`].
#[derive(Debug, Default)]
pub struct Stamp {
    /// Header fields to put in front of the message (CRLF-terminated).
    pub headers: Vec<u8>,
    /// The domains that signed, one per signature.
    pub signed: Vec<String>,
    /// Keys that failed: (domain, kind `dkim`/`arc`, why).
    pub failed: Vec<(String, &'static str, String)>,
    /// The domain whose key sealed an ARC set, if any.
    pub sealed: Option<String>,
    /// Why an ARC seal was due but not added (the message carries a chain already).
    pub arc_skipped: Option<&'static str>,
}

fn dkim_signer(entry: &Dkim) -> Result<Signer, String> {
    Ok(match &entry.key {
        DkimKey::Rsa { pkcs1_der, .. } => Signer::Rsa(configured(rsa_key(pkcs1_der)?, entry)),
        DkimKey::Ed25519 { seed } => Signer::Ed25519(configured(ed25519_key(seed)?, entry)),
    })
}

/// A DKIM signer of `entry`'s domain, selector and headers, relaxed/relaxed.
fn configured<K: SigningKey>(key: K, entry: &Dkim) -> DkimSigner<K, Done> {
    DkimSigner::from_key(key)
        .domain(entry.domain.clone())
        .selector(entry.selector.clone())
        .headers(entry.headers.clone())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed)
}

/// An RSA signing key for mail-auth's ring signer, from PKCS#1 DER.
fn rsa_key(pkcs1_der: &[u8]) -> Result<RsaKey<Sha256>, String> {
    let der = rustls_pki_types::PrivatePkcs1KeyDer::from(pkcs1_der.to_vec());
    RsaKey::<Sha256>::from_key_der(rustls_pki_types::PrivateKeyDer::Pkcs1(der))
        .map_err(|e| e.to_string())
}

/// An Ed25519 signing key for mail-auth's ring signer, from its seed.
fn ed25519_key(seed: &[u8; 32]) -> Result<Ed25519Key, String> {
    use ring::signature::KeyPair;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
        .map_err(|e| format!("not an Ed25519 seed: {e}"))?;
    Ed25519Key::from_seed_and_public_key(seed, pair.public_key().as_ref())
        .map_err(|e| e.to_string())
}

fn arc_sealer(entry: &Dkim, extra: &[&str]) -> Result<Sealer, String> {
    let DkimKey::Rsa { pkcs1_der, .. } = &entry.key else {
        return Err("ARC seals with RSA keys only".to_string());
    };
    let key = rsa_key(pkcs1_der)?;
    // The entry's headers plus the DKIM-Signature the relay just added.
    let mut headers = entry.headers.clone();
    headers.push("DKIM-Signature".to_string());
    headers.extend(extra.iter().map(|h| h.to_string()));
    Ok(ArcSealer::from_key(key)
        .domain(entry.domain.clone())
        .selector(entry.selector.clone())
        .headers(headers)
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed))
}

impl Signing {
    /// The signers of `config`'s `[[dkim]]` entries and ARC pools.
    pub fn new(config: &Config) -> Signing {
        let dkim = config
            .dkim
            .iter()
            .map(|entry| match dkim_signer(entry) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!(domain = %entry.domain, selector = %entry.selector, "DKIM key unusable, mail it would sign goes out unsigned: {e}");
                    None
                }
            })
            .collect();
        let mut arc = Vec::new();
        for pool in config.pool_names() {
            let Some(entry) = config.arc_key_for(&pool) else {
                continue;
            };
            match arc_sealer(entry, &[]).and_then(|a| Ok([a, arc_sealer(entry, &["Keywords"])?])) {
                Ok(s) => arc.push((pool, entry.domain.clone(), s)),
                Err(e) => {
                    tracing::error!(pool = %pool, domain = %entry.domain, "ARC key unusable, this pool's mail goes out unsealed: {e}")
                }
            }
        }
        Signing { dkim, arc }
    }

    /// Whether a message of `pool` may get any header from [`Signing::stamp`]:
    /// when not, the listener skips the blocking thread altogether.
    pub fn may_sign(&self, config: &Config, pool: &str) -> bool {
        config.dkim.iter().any(|d| d.serves(pool)) || self.arc.iter().any(|(p, _, _)| p == pool)
    }

    /// Signs `message` of `pool` from envelope `sender` with every entry
    /// [`signing_entries`] picks, then seals it when the pool says
    /// `arc_seal`. CPU-bound (about a millisecond per RSA signature plus
    /// hashing the body): run it off the async reactor.
    pub fn stamp(
        &self,
        config: &Config,
        pool: &str,
        sender: &str,
        message: &[u8],
        arrival: &Arrival,
    ) -> Stamp {
        let mut stamp = Stamp::default();
        let from = from_domain(message);
        let sender_domain = sender.rsplit_once('@').map(|(_, d)| d);
        for i in signing_entries(&config.dkim, pool, from.as_deref(), sender_domain) {
            let entry = &config.dkim[i];
            let signature = match self.dkim.get(i).and_then(Option::as_ref) {
                Some(Signer::Rsa(s)) => s.sign(message),
                Some(Signer::Ed25519(s)) => s.sign(message),
                None => {
                    stamp.failed.push((
                        entry.domain.clone(),
                        "dkim",
                        "the key could not be loaded".to_string(),
                    ));
                    continue;
                }
            };
            match signature {
                Ok(sig) => {
                    let mut field = Vec::new();
                    sig.write_header(&mut field);
                    drop_final_fold(&mut field);
                    stamp.headers.extend_from_slice(&field);
                    stamp.signed.push(entry.domain.clone());
                }
                Err(e) => stamp
                    .failed
                    .push((entry.domain.clone(), "dkim", e.to_string())),
            }
        }
        if let Some((_, domain, sealers)) = self.arc.iter().find(|(p, _, _)| p == pool) {
            self.seal(&mut stamp, config, domain, sealers, message, arrival);
        }
        stamp
    }

    fn seal(
        &self,
        stamp: &mut Stamp,
        config: &Config,
        domain: &str,
        sealers: &[Sealer; 2],
        message: &[u8],
        arrival: &Arrival,
    ) {
        // The seal covers the DKIM signatures just made.
        let mut signed = Vec::with_capacity(stamp.headers.len() + message.len());
        signed.extend_from_slice(&stamp.headers);
        signed.extend_from_slice(message);
        let Some(parsed) = AuthenticatedMessage::parse(&signed) else {
            stamp.failed.push((
                domain.to_string(),
                "arc",
                "the message cannot be parsed".into(),
            ));
            return;
        };
        if !parsed.as_headers.is_empty() || !parsed.ams_headers.is_empty() {
            // Adding set i=N+1 needs the chain verified first (DNS lookups
            // at acceptance); the list server that sealed it stays the last hop.
            stamp.arc_skipped = Some("the message carries an ARC chain already");
            return;
        }
        let authserv = authentication_results(&config.server.hostname, arrival);
        let mut results = AuthenticationResults::new(&authserv);
        if let Some(ip) = arrival.client {
            results = results.with_arc_result(&ArcOutput::default(), ip);
        }
        // The ARC-Message-Signature's own b= must not end in a fold (see
        // drop_final_fold), and it cannot be unfolded afterwards: the seal
        // covers it as written. Where it does, one more signed header
        // moves b= and the fold away.
        let mut last_error = String::new();
        for sealer in sealers {
            match sealer.seal(&parsed, &results, &ArcOutput::default()) {
                Ok(set) => {
                    let mut block = Vec::new();
                    set.write_header(&mut block);
                    let mut fields = split_fields(&block);
                    let ams_folded = fields.iter().any(|f| {
                        f.len() > 23
                            && f[..23].eq_ignore_ascii_case(b"ARC-Message-Signature: ")
                            && f.ends_with(FOLDED_END)
                    });
                    if ams_folded {
                        last_error = "the ARC-Message-Signature ends in a fold".to_string();
                        continue;
                    }
                    let mut arc = Vec::new();
                    for f in &mut fields {
                        if f.len() > 10 && f[..10].eq_ignore_ascii_case(b"ARC-Seal: ") {
                            drop_final_fold(f);
                        }
                        arc.extend_from_slice(f);
                    }
                    arc.extend_from_slice(&stamp.headers);
                    stamp.headers = arc;
                    stamp.sealed = Some(domain.to_string());
                    return;
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        stamp.failed.push((domain.to_string(), "arc", last_error));
    }
}

/// How a field ends when mail-auth folded the line right after the last
/// character of `b=`: `...b=XXXX\r\n\t;\r\n`.
const FOLDED_END: &[u8] = b"\r\n\t;\r\n";

/// Removes a fold between the end of `b=` and the final `;`. Verifiers
/// differ there: RFC 6376 §3.5 deletes the whitespace around `b=` when
/// verifying (as the signer did), dkimpy keeps it and fails such a
/// signature. Without the fold both agree. Safe for a field whose `b=` is
/// removed before hashing (DKIM-Signature, ARC-Seal), not for one covered
/// by another signature as written (ARC-Message-Signature).
fn drop_final_fold(field: &mut Vec<u8>) {
    if field.ends_with(FOLDED_END) {
        field.truncate(field.len() - FOLDED_END.len());
        field.extend_from_slice(b";\r\n");
    }
}

/// The header fields of a block of CRLF-terminated fields, each with its
/// folded continuation lines.
fn split_fields(block: &[u8]) -> Vec<Vec<u8>> {
    let mut fields: Vec<Vec<u8>> = Vec::new();
    for line in block.split_inclusive(|&b| b == b'\n') {
        match fields.last_mut() {
            Some(f) if line.starts_with(b" ") || line.starts_with(b"\t") => {
                f.extend_from_slice(line)
            }
            _ => fields.push(line.to_vec()),
        }
    }
    fields
}

/// The start of the ARC-Authentication-Results value: the relay's name
/// (authserv-id), then what it checked itself: SMTP AUTH (RFC 8601 `auth`
/// method) and inbound TLS. One line, single spaces: mail-auth writes it
/// unchanged into both the header and the seal's input, so it must already
/// be in relaxed canonical form. Client-given values are reduced to safe
/// characters.
pub fn authentication_results(hostname: &str, arrival: &Arrival) -> String {
    let token = |s: &str| -> String {
        s.chars()
            .filter(|c| c.is_ascii_alphanumeric() || "@._-+".contains(*c))
            .take(128)
            .collect()
    };
    let mut out = token(hostname);
    match &arrival.auth {
        Some(user) => {
            out.push_str("; auth=pass smtp.auth=");
            out.push_str(&token(user));
        }
        None => out.push_str("; auth=none"),
    }
    if let Some(tls) = &arrival.tls {
        out.push_str("; x-tls=pass policy.version=");
        out.push_str(&token(tls));
    }
    out
}

/// The domain of the single address of the message's `From:` field, lower
/// case; `None` when there is no `From:`, several, several addresses in
/// it, or no readable domain.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let headers = parse_headers(message);
    let mut froms = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("from"));
    let (_, value) = froms.next()?;
    if froms.next().is_some() {
        return None;
    }
    let value = strip_comments_and_quotes(value);
    if value.contains(',') {
        return None;
    }
    let addr = match (value.rfind('<'), value.rfind('>')) {
        (Some(open), Some(close)) if open < close => &value[open + 1..close],
        (None, None) => value.as_str(),
        _ => return None,
    };
    let (_, domain) = addr.trim().rsplit_once('@')?;
    let domain = domain.trim().trim_end_matches('.');
    let valid = !domain.is_empty()
        && domain.contains('.')
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    valid.then(|| domain.to_ascii_lowercase())
}

/// `value` without (comments) and without "quoted strings" (display
/// names may hold commas, `<` or `@`).
fn strip_comments_and_quotes(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted || depth > 0 => escaped = true,
            '"' if depth == 0 => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if quoted || depth > 0 => {}
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A config with an RSA key for example.org (pool A, ARC-sealed) and an
    /// Ed25519 key for example.com (every pool).
    fn config(dir: &str) -> Config {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("poolrelay-signing-{}-{dir}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut text =
            "[[listener]]\naddress = \"127.0.0.1:2525\"\n[pool.A]\narc_seal = true\n".to_string();
        for (name, pem, domain, extra) in [
            (
                "rsa",
                include_str!("../../config/src/testdata/dkim-rsa2048.pem"),
                "example.org",
                "pools = [\"A\"]\n",
            ),
            (
                "ed",
                include_str!("../../config/src/testdata/dkim-ed25519.pem"),
                "example.com",
                "algorithm = \"ed25519-sha256\"\n",
            ),
        ] {
            let path = dir.join(format!("{name}.pem"));
            std::fs::write(&path, pem).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            text.push_str(&format!(
                "[[dkim]]\ndomain = \"{domain}\"\nselector = \"s\"\nkey_file = \"{}\"\n{extra}",
                path.display()
            ));
        }
        let c = Config::parse(&text, Path::new("t.toml")).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        c
    }

    const MESSAGE: &[u8] =
        b"From: List <list@lists.example.org>\r\nTo: m@example.test\r\nSubject: s\r\n\r\nbody\r\n";

    #[test]
    fn aligned_keys_sign_and_the_pool_key_seals() {
        let c = config("ok");
        let s = Signing::new(&c);
        let arrival = Arrival {
            client: Some("192.0.2.7".parse().unwrap()),
            ..Arrival::default()
        };
        let stamp = s.stamp(&c, "A", "owner@example.org", MESSAGE, &arrival);
        assert!(stamp.failed.is_empty(), "{:?}", stamp.failed);
        assert_eq!(stamp.signed, ["example.org"]);
        assert_eq!(stamp.sealed.as_deref(), Some("example.org"));
        let fields = split_fields(&stamp.headers);
        let names: Vec<String> = fields
            .iter()
            .map(|f| {
                String::from_utf8_lossy(f)
                    .split(':')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "ARC-Seal",
                "ARC-Message-Signature",
                "ARC-Authentication-Results",
                "DKIM-Signature"
            ]
        );
        let text = String::from_utf8_lossy(&stamp.headers);
        assert!(text.contains("smtp.remote-ip=192.0.2.7"), "{text}");
        for f in &fields {
            assert!(f.ends_with(b"\r\n"), "{}", String::from_utf8_lossy(f));
        }
        let dkim = fields.last().unwrap();
        assert!(
            !dkim.ends_with(FOLDED_END),
            "{}",
            String::from_utf8_lossy(dkim)
        );

        // Pool B: only the Ed25519 key serves it, and it is not aligned:
        // no envelope match either (example.net).
        assert!(s.may_sign(&c, "B"));
        let stamp = s.stamp(&c, "B", "x@example.net", MESSAGE, &arrival);
        assert!(stamp.headers.is_empty() && stamp.signed.is_empty());
        // The envelope domain's key signs when From: has none.
        let stamp = s.stamp(&c, "B", "x@example.com", MESSAGE, &arrival);
        assert_eq!(stamp.signed, ["example.com"]);
    }

    #[test]
    fn an_unusable_key_is_a_failure_not_a_refusal() {
        let mut c = config("bad");
        c.dkim[0].key = DkimKey::Rsa {
            pkcs1_der: vec![1, 2, 3],
            bits: 2048,
        };
        let s = Signing::new(&c);
        let stamp = s.stamp(&c, "A", "owner@example.org", MESSAGE, &Arrival::default());
        assert!(stamp.signed.is_empty());
        assert!(
            stamp.headers.is_empty(),
            "nothing added: relayed as received"
        );
        assert_eq!(stamp.failed.len(), 1, "{:?}", stamp.failed);
        assert_eq!(stamp.failed[0].0, "example.org");
        assert_eq!(stamp.failed[0].1, "dkim");
    }

    #[test]
    fn a_message_with_an_arc_chain_is_signed_but_not_sealed_again() {
        let c = config("chain");
        let s = Signing::new(&c);
        let mut m = b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.test; s=s; b=AAAA\r\n".to_vec();
        m.extend_from_slice(MESSAGE);
        let stamp = s.stamp(&c, "A", "owner@example.org", &m, &Arrival::default());
        assert_eq!(stamp.signed, ["example.org"]);
        assert!(stamp.sealed.is_none());
        assert!(stamp.arc_skipped.is_some());
    }

    #[test]
    fn a_fold_before_the_final_semicolon_is_dropped() {
        let mut f = b"DKIM-Signature: v=1; b=AAAA\r\n\t;\r\n".to_vec();
        drop_final_fold(&mut f);
        assert_eq!(f, b"DKIM-Signature: v=1; b=AAAA;\r\n");
        let mut g = b"X: a;\r\n".to_vec();
        drop_final_fold(&mut g);
        assert_eq!(g, b"X: a;\r\n");
    }

    #[test]
    fn the_from_domain_is_read_from_the_one_address_of_the_one_from() {
        let d = |h: &str| from_domain(format!("{h}\r\nSubject: x\r\n\r\nbody\r\n").as_bytes());
        assert_eq!(d("From: a@Example.ORG").as_deref(), Some("example.org"));
        assert_eq!(
            d("From: \"Doe, John <x@evil.test>\" <john@lists.example.org>").as_deref(),
            Some("lists.example.org")
        );
        assert_eq!(
            d("From: (comment@evil.test) List <l@example.com> (x)").as_deref(),
            Some("example.com")
        );
        assert_eq!(
            d("From: List\r\n <l@example.com>").as_deref(),
            Some("example.com")
        );
        assert_eq!(d("From: a@example.org, b@example.com"), None);
        assert_eq!(d("From: a@example.org\r\nFrom: b@example.com"), None);
        assert_eq!(d("From: nobody"), None);
        assert_eq!(d("From: <a@bad_domain!.test>"), None);
        assert_eq!(d("Sender: a@example.org"), None);
    }

    #[test]
    fn authentication_results_record_auth_and_tls_on_one_safe_line() {
        let mut a = Arrival {
            client: Some("192.0.2.1".parse().unwrap()),
            ..Arrival::default()
        };
        assert_eq!(
            authentication_results("relay.example.org", &a),
            "relay.example.org; auth=none"
        );
        a.auth = Some("list\r\nX-Evil: 1 ;user".to_string());
        a.tls = Some("TLSv1.3".to_string());
        assert_eq!(
            authentication_results("relay.example.org", &a),
            "relay.example.org; auth=pass smtp.auth=listX-Evil1user; x-tls=pass policy.version=TLSv1.3"
        );
    }
}
