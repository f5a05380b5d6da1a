//! A listener's `users_file`: one `user:hash` per line, as Dovecot's
//! passwd-file writes them (an optional `{SCHEME}` prefix and any fields
//! after the hash are ignored). Hashes: `$argon2id$` (what
//! `poolrelay passwd` writes), `$2b$`/`$2a$`/`$2y$` bcrypt and `$6$`
//! SHA-512-crypt. Read with the config, so a reload reads it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Argon2, PasswordHash};

/// The hash schemes a users file may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Argon2,
    Bcrypt,
    Sha512Crypt,
}

#[derive(Clone, PartialEq, Eq)]
struct Entry {
    scheme: Scheme,
    hash: String,
}

/// The users of one `users_file`. Debug shows the path and the count,
/// never a hash.
#[derive(Clone, PartialEq, Eq)]
pub struct UsersFile {
    /// Where it was read from.
    pub path: PathBuf,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for UsersFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "UsersFile({}, {} users)",
            self.path.display(),
            self.len()
        )
    }
}

impl UsersFile {
    /// Reads and checks `path`; the error says which line is wrong and
    /// what to write instead.
    pub fn load(path: &Path) -> Result<UsersFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "\"{}\" cannot be read: {e}; create it with one user:hash per line (poolrelay passwd USER prints one)",
                path.display()
            )
        })?;
        UsersFile::parse(&text, path)
    }

    /// Parses users file text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<UsersFile, String> {
        let mut entries = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let at = |what: String| format!("\"{}\" line {}: {what}", path.display(), i + 1);
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, rest)) = line.split_once(':') else {
                return Err(at(
                    "expected user:hash (poolrelay passwd USER prints such a line)".into(),
                ));
            };
            if user.is_empty() || user.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(at(
                    "the user name is empty or holds spaces or control characters".into(),
                ));
            }
            let hash = rest.split(':').next().unwrap_or_default();
            // Dovecot's "{ARGON2ID}$argon2id$..." form.
            let hash = match hash.strip_prefix('{') {
                Some(tail) => tail.split_once('}').map(|(_, h)| h).unwrap_or(hash),
                None => hash,
            };
            let scheme = scheme_of(hash).map_err(at)?;
            if entries
                .insert(
                    user.to_string(),
                    Entry {
                        scheme,
                        hash: hash.to_string(),
                    },
                )
                .is_some()
            {
                return Err(at(format!(
                    "user \"{user}\" is listed twice; keep one line per user"
                )));
            }
        }
        Ok(UsersFile {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// How many users it lists.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when it lists nobody.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when `user` is listed.
    pub fn contains(&self, user: &str) -> bool {
        self.entries.contains_key(user)
    }

    /// Checks `password` for `user`. CPU-heavy by design (tens of
    /// milliseconds): call it off the async threads. An unknown user costs
    /// the same as a wrong password, so timing does not tell which names exist.
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.entries.get(user) {
            Some(entry) => verify(entry.scheme, &entry.hash, password),
            None => {
                if let Some(dummy) = dummy_hash() {
                    verify(Scheme::Argon2, dummy, password);
                }
                false
            }
        }
    }
}

/// A new argon2id hash of `password` (the algorithm's default cost), for
/// `poolrelay passwd`.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    Argon2::default()
        .hash_password(password)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

fn dummy_hash() -> Option<&'static str> {
    static DUMMY: OnceLock<Option<String>> = OnceLock::new();
    DUMMY
        .get_or_init(|| hash_password(b"no such user").ok())
        .as_deref()
}

fn scheme_of(hash: &str) -> Result<Scheme, String> {
    if hash.starts_with("$argon2") {
        PasswordHash::new(hash)
            .map(|_| Scheme::Argon2)
            .map_err(|e| {
                format!(
                    "the argon2 hash is malformed ({e}); make a new one with poolrelay passwd USER"
                )
            })
    } else if ["$2b$", "$2a$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
        // $2b$NN$ then 22 characters of salt and 31 of hash.
        let ok = hash.len() == 60
            && hash.as_bytes().get(3) == Some(&b'$')
            && hash.as_bytes().get(6) == Some(&b'$')
            && hash[4..6].bytes().all(|b| b.is_ascii_digit());
        if ok {
            Ok(Scheme::Bcrypt)
        } else {
            Err(
                "the bcrypt hash is malformed; it looks like $2b$10$ followed by 53 characters"
                    .into(),
            )
        }
    } else if hash.starts_with("$6$") {
        sha_crypt::PasswordHashRef::new(hash)
            .map(|_| Scheme::Sha512Crypt)
            .map_err(|_| "the SHA-512-crypt hash is malformed; it looks like $6$salt$hash (mkpasswd -m sha-512)".into())
    } else {
        Err("unsupported hash; use $argon2id$ (poolrelay passwd USER), $2b$ bcrypt or $6$ SHA-512-crypt".into())
    }
}

fn verify(scheme: Scheme, hash: &str, password: &[u8]) -> bool {
    match scheme {
        Scheme::Argon2 => PasswordHash::new(hash)
            .map(|h| Argon2::default().verify_password(password, &h).is_ok())
            .unwrap_or(false),
        Scheme::Bcrypt => bcrypt::verify(password, hash).unwrap_or(false),
        Scheme::Sha512Crypt => sha_crypt::ShaCrypt::default()
            .verify_password(password, hash)
            .is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users(text: &str) -> Result<UsersFile, String> {
        UsersFile::parse(text, Path::new("users"))
    }

    #[test]
    fn every_scheme_verifies() {
        let argon = hash_password(b"correct horse").expect("hash");
        assert!(argon.starts_with("$argon2id$"), "{argon}");
        // `openssl passwd -6 -salt saltsalt 'correct horse'`
        let sha = "$6$saltsalt$hRM5XZ86KXEw9UOmjigeVqFgULtFB2sgpC9lXQDfMib3Zgw7mEiUvBJI2EplzfAqxL5Vvwp2scFtv/uamSo5z0";
        let bcrypt = bcrypt::hash(b"correct horse", 4).expect("bcrypt");
        let text =
            format!("# users\n\nalice:{argon}\nbob:{{SHA512-CRYPT}}{sha}::::\ncarol:{bcrypt}\n");
        let u = users(&text).expect("parses");
        assert_eq!(u.len(), 3);
        for user in ["alice", "bob", "carol"] {
            assert!(u.verify(user, b"correct horse"), "{user}");
            assert!(!u.verify(user, b"correct horsE"), "{user}");
            assert!(!u.verify(user, b""), "{user}");
        }
        assert!(!u.verify("dave", b"correct horse"));
        assert!(!format!("{u:?}").contains("argon2"));
    }

    #[test]
    fn known_bcrypt_vectors_verify() {
        // Solar Designer's test vector ($2a$) and the same as $2b$.
        for prefix in ["$2a$", "$2b$"] {
            let line =
                format!("eve:{prefix}05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW\n");
            let u = users(&line).expect("parses");
            assert!(u.verify("eve", b"U*U"), "{prefix}");
            assert!(!u.verify("eve", b"U*V"), "{prefix}");
        }
    }

    #[test]
    fn bad_lines_name_their_line() {
        let e = users("a:$argon2id$v=19$m=19456,t=2,p=1$bad\n").unwrap_err();
        assert!(e.contains("line 1") && e.contains("argon2"), "{e}");
        let e = users("# c\nplain:secret\n").unwrap_err();
        assert!(
            e.contains("line 2") && e.contains("unsupported hash"),
            "{e}"
        );
        let e = users("nocolon\n").unwrap_err();
        assert!(e.contains("user:hash"), "{e}");
        let e = users("x:$2b$04$short\n").unwrap_err();
        assert!(e.contains("bcrypt"), "{e}");
        let e = users("x:$6$\n").unwrap_err();
        assert!(e.contains("SHA-512"), "{e}");
        let h = hash_password(b"p").expect("hash");
        let e = users(&format!("x:{h}\nx:{h}\n")).unwrap_err();
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
    }
}
