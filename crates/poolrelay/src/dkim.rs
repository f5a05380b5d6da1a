//! `poolrelay dkim keygen`: a new signing key, written owner-only, and the
//! DNS TXT record and `[[dkim]]` table to go with it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use clap::{Args as ClapArgs, ValueEnum};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};

/// `poolrelay dkim keygen` options.
#[derive(ClapArgs)]
pub struct KeygenArgs {
    /// The signing domain (d=), e.g. example.org.
    #[arg(long)]
    domain: String,
    /// The selector: the key is published at SELECTOR._domainkey.DOMAIN.
    #[arg(long)]
    selector: String,
    /// The algorithm.
    #[arg(long, value_enum, default_value_t = Algorithm::RsaSha256)]
    algorithm: Algorithm,
    /// RSA key size in bits (2048 or more).
    #[arg(long, default_value_t = 2048)]
    bits: usize,
    /// Where to write the key (default: SELECTOR.DOMAIN.pem); never overwritten.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Algorithm {
    #[value(name = "rsa-sha256")]
    RsaSha256,
    #[value(name = "ed25519-sha256")]
    Ed25519Sha256,
}

/// Makes the key, writes it (mode 600, never over an existing file) and
/// prints what to publish and configure. Errors say what went wrong.
pub fn keygen(args: &KeygenArgs) -> Result<String, String> {
    let domain = args
        .domain
        .trim()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let selector = args.selector.trim().to_string();
    let label_ok = |s: &str| {
        !s.is_empty()
            && s.split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if !label_ok(&domain) || !domain.contains('.') {
        return Err(format!("--domain {:?} is not a domain name", args.domain));
    }
    if !label_ok(&selector) {
        return Err(format!(
            "--selector {:?} is not a DNS label; use letters, digits and -",
            args.selector
        ));
    }
    let (pem, k, public, algorithm) = match args.algorithm {
        Algorithm::RsaSha256 => {
            if args.bits < poolrelay_config::MIN_RSA_BITS {
                return Err(format!(
                    "--bits {}: receivers refuse RSA keys under {} bits",
                    args.bits,
                    poolrelay_config::MIN_RSA_BITS
                ));
            }
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, args.bits)
                .map_err(|e| format!("cannot make an RSA key: {e}"))?;
            let pem = key
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| format!("cannot encode the key: {e}"))?;
            let public = key
                .to_public_key()
                .to_public_key_der()
                .map_err(|e| format!("cannot encode the public key: {e}"))?;
            (
                pem.to_string(),
                "rsa",
                public.as_bytes().to_vec(),
                "rsa-sha256",
            )
        }
        Algorithm::Ed25519Sha256 => {
            use ring::signature::KeyPair;
            let rng = ring::rand::SystemRandom::new();
            let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
                .map_err(|_| "cannot make an Ed25519 key".to_string())?;
            let pair = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref())
                .map_err(|_| "cannot read the new Ed25519 key".to_string())?;
            let pem = pem_encode("PRIVATE KEY", doc.as_ref());
            // RFC 8463: the TXT record holds the raw 32-byte public key.
            (
                pem,
                "ed25519",
                pair.public_key().as_ref().to_vec(),
                "ed25519-sha256",
            )
        }
    };
    let path = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{selector}.{domain}.pem")));
    write_new_private(&path, pem.as_bytes())?;
    let txt = zone_strings(&format!(
        "v=DKIM1; k={k}; p={}",
        poolrelay_smtp::base64::encode(&public)
    ));
    Ok(format!(
        "wrote {path} (mode 600)\n\n\
         publish this TXT record:\n{selector}._domainkey.{domain}. IN TXT {txt}\n\n\
         and add to the config:\n[[dkim]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nkey_file = \"{path}\"\nalgorithm = \"{algorithm}\"\n",
        path = path.display()
    ))
}

/// A TXT value as zone-file strings: DNS caps one character-string at 255
/// bytes (RFC 1035), so a 2048-bit key's record is written as several
/// quoted strings, which receivers join (RFC 6376 §3.6.2.2).
fn zone_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|chunk| format!("\"{}\"", String::from_utf8_lossy(chunk)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_new_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            format!(
                "cannot create {}: {e} (an existing key is never overwritten; choose --out)",
                path.display()
            )
        })?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = poolrelay_smtp::base64::encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn txt_values_are_split_into_strings_of_at_most_255_bytes() {
        let value = "p=".to_string() + &"A".repeat(400);
        let zone = zone_strings(&value);
        let strings: Vec<&str> = zone.split(' ').map(|s| s.trim_matches('"')).collect();
        assert_eq!(
            strings.iter().map(|s| s.len()).collect::<Vec<_>>(),
            [255, 147]
        );
        assert_eq!(strings.concat(), value);
        assert_eq!(zone_strings("v=DKIM1"), "\"v=DKIM1\"");
    }
}
