//! DKIM and ARC for the end-to-end tests: keys made with openssl, and an
//! independent verifier, Python's dkimpy, with its DNS lookups answered
//! from the test's own TXT records (no network).
//!
//! dkimpy is found at `$POOLRELAY_DKIMPY` (a Python interpreter that can
//! `import dkim`), else in the venv `.ci/run` makes:
//! `<target dir>/dkimpy-venv/bin/python`. Without it the tests fail saying
//! how to install it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::command::run_with_deadline;
use crate::process::{set_mode, workspace_root};

/// How to install the verifier, for failure messages.
pub const DKIMPY_INSTALL: &str = "python3 -m venv target/dkimpy-venv && \
     target/dkimpy-venv/bin/pip install dkimpy==1.1.8 pynacl==1.6.2 authres==1.2.0 dnspython==2.9.2 \
     (use $CARGO_TARGET_DIR instead of target when set, or point POOLRELAY_DKIMPY at a python3 that can import dkim, nacl and authres)";

/// A signing key the test made, and its DNS record.
#[derive(Debug, Clone)]
pub struct TestKey {
    /// The signing domain.
    pub domain: String,
    /// The selector.
    pub selector: String,
    /// The PEM private key file (mode 600).
    pub path: PathBuf,
    /// `ed25519-sha256` or `rsa-sha256`.
    pub algorithm: &'static str,
    /// The TXT record to publish at `SELECTOR._domainkey.DOMAIN`.
    pub txt: String,
}

impl TestKey {
    /// A 2048-bit RSA key in `dir`, made by `openssl genpkey`.
    pub fn rsa(dir: &Path, domain: &str, selector: &str) -> TestKey {
        TestKey::make(dir, domain, selector, false)
    }

    /// An Ed25519 key in `dir`, made by `openssl genpkey`.
    pub fn ed25519(dir: &Path, domain: &str, selector: &str) -> TestKey {
        TestKey::make(dir, domain, selector, true)
    }

    fn make(dir: &Path, domain: &str, selector: &str, ed: bool) -> TestKey {
        let path = dir.join(format!("{selector}.{domain}.pem"));
        let p = path.to_string_lossy().into_owned();
        let mut args = vec!["genpkey", "-algorithm"];
        if ed {
            args.push("ed25519");
        } else {
            args.extend(["RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
        }
        args.extend(["-out", &p]);
        openssl(&args);
        set_mode(&path, 0o600);
        let der = openssl_bytes(&["pkey", "-in", &p, "-pubout", "-outform", "DER"]);
        // RSA: the SubjectPublicKeyInfo; Ed25519 (RFC 8463): the raw 32-byte key.
        let (k, public) = if ed {
            ("ed25519", der[der.len().saturating_sub(32)..].to_vec())
        } else {
            ("rsa", der)
        };
        TestKey {
            domain: domain.to_string(),
            selector: selector.to_string(),
            path,
            algorithm: if ed { "ed25519-sha256" } else { "rsa-sha256" },
            txt: format!("v=DKIM1; k={k}; p={}", base64(&public)),
        }
    }

    /// The `[[dkim]]` table for this key, with `extra` key lines.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[[dkim]]\ndomain = \"{}\"\nselector = \"{}\"\nkey_file = {}\nalgorithm = \"{}\"\n{extra}\n",
            self.domain,
            self.selector,
            crate::relay::toml_str(&self.path.to_string_lossy()),
            self.algorithm
        )
    }
}

fn openssl(args: &[&str]) {
    openssl_bytes(args);
}

fn openssl_bytes(args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}); install it: apt-get install openssl")
        });
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn base64(bytes: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The Python interpreter with dkimpy; panics saying how to install it.
pub fn dkimpy() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("POOLRELAY_DKIMPY") {
        Some(p) if !p.is_empty() => vec![PathBuf::from(p)],
        _ => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .filter(|t| !t.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            vec![
                target.join("dkimpy-venv/bin/python"),
                workspace_root().join("target/dkimpy-venv/bin/python"),
            ]
        }
    };
    for python in &candidates {
        if python.is_file() {
            let ok = std::process::Command::new(python)
                .args(["-c", "import dkim, dkim.dnsplug, nacl, authres"])
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return python.clone();
            }
        }
    }
    panic!(
        "the DKIM verifier (Python dkimpy) is not installed: looked for {candidates:?}; install it with: {DKIMPY_INSTALL}"
    );
}

/// What dkimpy made of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// One `(d=, a=, pass)` per DKIM-Signature, top first.
    pub dkim: Vec<(String, String, bool)>,
    /// `arc_verify`'s chain validation: `pass`, `fail` or `none`.
    pub arc: String,
    /// dkimpy's explanation of the ARC result.
    pub arc_reason: String,
}

const VERIFY_PY: &str = r#"
import json, sys, dkim
message = open(sys.argv[1], 'rb').read()
records = json.load(open(sys.argv[2]))
def dnsfunc(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    txt = records.get(name.rstrip('.').lower())
    return txt.encode() if txt is not None else None
d = dkim.DKIM(message)
out = {'dkim': [], 'arc': '', 'arc_reason': ''}
sigs = [v for (k, v) in d.headers if k.lower() == b'dkim-signature']
for i, value in enumerate(sigs):
    tags = dkim.util.parse_tag_value(b''.join(value.split()))
    try:
        ok = dkim.DKIM(message).verify(idx=i, dnsfunc=dnsfunc)
    except dkim.DKIMException:
        ok = False
    out['dkim'].append([tags.get(b'd', b'').decode(), tags.get(b'a', b'').decode(), bool(ok)])
cv, results, reason = dkim.arc_verify(message, dnsfunc=dnsfunc)
out['arc'] = cv.decode() if isinstance(cv, bytes) else str(cv)
out['arc_reason'] = str(reason)
print(json.dumps(out))
"#;

/// Verifies every DKIM signature and the ARC chain of `message` with
/// dkimpy, looking keys up in `keys` only.
pub fn verify(message: &[u8], keys: &[&TestKey]) -> Verdict {
    let python = dkimpy();
    let dir = crate::process::new_tempdir("poolrelay-dkim-");
    let msg = dir.path().join("message.eml");
    fs::write(&msg, message).expect("write the message");
    let records: BTreeMap<String, String> = keys
        .iter()
        .map(|k| {
            (
                format!("{}._domainkey.{}", k.selector, k.domain).to_ascii_lowercase(),
                k.txt.clone(),
            )
        })
        .collect();
    let rec = dir.path().join("records.json");
    fs::write(&rec, serde_json::to_vec(&records).expect("json")).expect("write the records");
    let script = dir.path().join("verify.py");
    fs::write(&script, VERIFY_PY).expect("write the script");
    let mut cmd = std::process::Command::new(&python);
    cmd.arg(&script).arg(&msg).arg(&rec);
    let out = run_with_deadline(cmd, "dkimpy", Duration::from_secs(60));
    assert!(
        out.status.success(),
        "dkimpy failed on the message:\n{}\n{}",
        out.stderr,
        String::from_utf8_lossy(message)
    );
    let v: serde_json::Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("dkimpy printed no JSON ({e}): {}", out.stdout));
    Verdict {
        dkim: v["dkim"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s[0].as_str().unwrap_or_default().to_string(),
                    s[1].as_str().unwrap_or_default().to_string(),
                    s[2].as_bool().unwrap_or(false),
                )
            })
            .collect(),
        arc: v["arc"].as_str().unwrap_or_default().to_string(),
        arc_reason: v["arc_reason"].as_str().unwrap_or_default().to_string(),
    }
}

/// `raw` (a message as the sink stored it) with its body changed.
pub fn tamper_body(raw: &str) -> String {
    match raw.find("\r\n\r\n") {
        Some(end) => format!("{}\r\n\r\ntampered{}", &raw[..end], &raw[end + 4..]),
        None => panic!("no body to tamper with in {raw:?}"),
    }
}

/// How many header fields named `name` the header section of `raw` has.
pub fn count_fields(raw: &str, name: &str) -> usize {
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    head.split("\r\n")
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
        })
        .count()
}
