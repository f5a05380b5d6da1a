//! A listener's TLS and AUTH keys, and the `[user.NAME]` tables.

use super::*;
use crate::raw::RawUser;
use crate::{AuthPolicy, ListenerTls, ListenerTlsMode, User, UsersFile};

/// The TLS and AUTH part of a [`Listener`].
pub(super) struct ListenerSecurity {
    pub tls: Option<ListenerTls>,
    pub require_tls: bool,
    pub auth: AuthPolicy,
    pub users_file: Option<std::sync::Arc<UsersFile>>,
    pub auth_plaintext: bool,
}

impl Ctx<'_> {
    pub(super) fn listener_security(
        &mut self,
        r: &RawListener,
        line: usize,
        address: SocketAddr,
    ) -> ListenerSecurity {
        let mode = match &r.tls {
            None => None,
            Some(v) => match v.get_ref().trim() {
                "starttls" => Some(Some(ListenerTlsMode::Starttls)),
                "implicit" => Some(Some(ListenerTlsMode::Implicit)),
                "off" => Some(None),
                other => {
                    self.at(v, format!("listener tls = \"{other}\" is not a TLS mode; write \"starttls\", \"implicit\" (TLS from the first byte, port 465 style) or \"off\""));
                    Some(None)
                }
            },
        };
        let cert = r.tls_cert.as_ref().and_then(|v| self.path("tls_cert", v));
        let key = r.tls_key.as_ref().and_then(|v| self.path("tls_key", v));
        let tls = match (&r.tls_cert, &r.tls_key, cert, key) {
            (Some(cv), Some(kv), Some(cert), Some(key)) => {
                // Port 465 is the submissions port: TLS from the first byte.
                let default_mode = if address.port() == 465 {
                    ListenerTlsMode::Implicit
                } else {
                    ListenerTlsMode::Starttls
                };
                match mode.unwrap_or(Some(default_mode)) {
                    None => None,
                    Some(mode) => self.load_tls(cv, kv, mode, cert, key),
                }
            }
            (Some(_), None, _, _) => {
                self.at_line(line, "listener has tls_cert but no tls_key; add tls_key = \"/etc/poolrelay/tls/key.pem\" (the certificate's private key, PEM)".to_string());
                None
            }
            (None, Some(_), _, _) => {
                self.at_line(line, "listener has tls_key but no tls_cert; add tls_cert = \"/etc/poolrelay/tls/cert.pem\" (the certificate chain, PEM, leaf first)".to_string());
                None
            }
            _ => {
                if let (Some(v), Some(Some(mode))) = (&r.tls, mode) {
                    self.at(v, format!("listener tls = \"{}\" needs a certificate; add tls_cert and tls_key (PEM files), or write tls = \"off\"", mode.name()));
                }
                None
            }
        };
        let require_tls = r.require_tls.as_ref().is_some_and(|v| *v.get_ref());
        if let Some(v) = &r.require_tls
            && *v.get_ref()
            && tls.is_none()
        {
            self.at(v, "require_tls = true on a listener without TLS would refuse every message; add tls_cert and tls_key, or remove require_tls".to_string());
        }
        let auth = match &r.auth {
            None => AuthPolicy::Off,
            Some(v) => match v.get_ref().trim() {
                "off" => AuthPolicy::Off,
                "optional" => AuthPolicy::Optional,
                "required" => AuthPolicy::Required,
                other => {
                    self.at(v, format!("listener auth = \"{other}\" is not an AUTH setting; write \"off\", \"optional\" (relay_from addresses need no AUTH) or \"required\""));
                    AuthPolicy::Off
                }
            },
        };
        let auth_plaintext = r.auth_plaintext.as_ref().is_some_and(|v| *v.get_ref());
        let users_file = match &r.users_file {
            Some(v) => {
                if auth == AuthPolicy::Off {
                    self.at(v, "users_file is set but auth is off, so nobody could use it; add auth = \"optional\" or \"required\", or remove users_file".to_string());
                }
                self.path("users_file", v)
                    .and_then(|path| match UsersFile::load(&path) {
                        Ok(users) => Some(std::sync::Arc::new(users)),
                        Err(e) => {
                            self.at(v, format!("users_file {e}"));
                            None
                        }
                    })
            }
            None => {
                if auth != AuthPolicy::Off {
                    let at = r
                        .auth
                        .as_ref()
                        .map(|v| self.line(&v.span()))
                        .unwrap_or(line);
                    self.at_line(at, "auth is on but no users_file is given; add users_file = \"/etc/poolrelay/users\" (lines of user:hash, made with poolrelay passwd USER)".to_string());
                }
                None
            }
        };
        if auth != AuthPolicy::Off && tls.is_none() && !auth_plaintext {
            let at = r
                .auth
                .as_ref()
                .map(|v| self.line(&v.span()))
                .unwrap_or(line);
            self.at_line(at, "auth is on but the listener has no TLS, and AUTH is offered only after TLS; add tls_cert and tls_key, or auth_plaintext = true if the network path is trusted".to_string());
        }
        ListenerSecurity {
            tls,
            require_tls,
            auth,
            users_file,
            auth_plaintext,
        }
    }

    fn load_tls(
        &mut self,
        cert_v: &Str,
        key_v: &Str,
        mode: ListenerTlsMode,
        cert: PathBuf,
        key: PathBuf,
    ) -> Option<ListenerTls> {
        if let Err(e) = std::fs::File::open(&key) {
            self.at(key_v, format!("tls_key \"{}\" cannot be read: {e}; fix the path or the file's permissions (the relay's user must read it)", key.display()));
            return None;
        }
        match poolrelay_smtp::ServerTls::load(&cert, &key) {
            Ok(server) => Some(ListenerTls {
                mode,
                cert,
                key,
                server,
            }),
            Err(e) => {
                let key_text = format!("\"{}\"", key.display());
                let (at, key) = if e.starts_with(&key_text) {
                    (key_v, "tls_key")
                } else {
                    (cert_v, "tls_cert")
                };
                self.at(at, format!("listener {key} {e}"));
                None
            }
        }
    }

    pub(super) fn users(
        &mut self,
        raw: Option<BTreeMap<String, Located<RawUser>>>,
        pools: &BTreeMap<String, Pool>,
    ) -> BTreeMap<String, User> {
        let mut out = BTreeMap::new();
        for (name, item) in raw.into_iter().flatten() {
            let line = match &item.span {
                Some(span) => self.line(span),
                None => self
                    .text
                    .find(&format!("[user.{name}]"))
                    .map(|at| line_of(self.text, at))
                    .unwrap_or(0),
            };
            let pool = match &item.value.pool {
                Some(p) => self
                    .known_pool(&format!("user {name} pool"), p, pools)
                    .then(|| p.get_ref().clone()),
                None => None,
            };
            out.insert(name, User { pool, line });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::{AuthPolicy, Config, ConfigError};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    #[track_caller]
    fn error_at(text: &str, line: usize, needle: &str) {
        match parse(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => {
                assert_eq!(e.line, line, "{e}\n{text}");
                assert!(e.message.contains(needle), "{e}");
            }
        }
    }

    fn users_file(text: &str) -> tempfile_path::Path {
        tempfile_path::write(text)
    }

    /// A file under the target directory's temp space, removed on drop.
    mod tempfile_path {
        pub struct Path(pub std::path::PathBuf);
        impl Drop for Path {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> Path {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "poolrelay-users-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&p, text).expect("write users file");
            Path(p)
        }
    }

    const HEAD: &str = "[[listener]]\naddress = \"127.0.0.1:2525\"\n";

    #[test]
    fn auth_needs_users_and_tls_or_plaintext() {
        error_at(
            &format!("{HEAD}auth = \"optional\"\nauth_plaintext = true\n"),
            3,
            "no users_file",
        );
        let hash = crate::hash_password(b"pw").expect("hash");
        let users = users_file(&format!("alice:{hash}\n"));
        let path = users.0.display().to_string();
        error_at(
            &format!("{HEAD}auth = \"required\"\nusers_file = \"{path}\"\n"),
            3,
            "AUTH is offered only after TLS",
        );
        error_at(&format!("{HEAD}auth = \"sometimes\"\n"), 3, "\"optional\"");
        error_at(
            &format!("{HEAD}users_file = \"{path}\"\n"),
            3,
            "auth is off",
        );
        let c = parse(&format!(
            "{HEAD}auth = \"required\"\nusers_file = \"{path}\"\nauth_plaintext = true\n"
        ))
        .expect("valid");
        let l = &c.listeners[0];
        assert_eq!(l.auth, AuthPolicy::Required);
        assert!(l.auth_plaintext && l.tls.is_none());
        let users = l.users_file.as_ref().expect("users");
        assert!(users.contains("alice") && users.verify("alice", b"pw"));
    }

    #[test]
    fn a_bad_users_file_line_is_named_at_the_users_file_key() {
        let users = users_file("# ok\nbob:plaintext\n");
        let path = users.0.display().to_string();
        error_at(
            &format!("{HEAD}auth = \"optional\"\nauth_plaintext = true\nusers_file = \"{path}\"\n"),
            5,
            "line 2: unsupported hash",
        );
        error_at(
            &format!(
                "{HEAD}auth = \"optional\"\nauth_plaintext = true\nusers_file = \"/nonexistent/users\"\n"
            ),
            5,
            "cannot be read",
        );
    }

    #[test]
    fn user_tables_and_user_routes() {
        error_at(
            &format!("{HEAD}\n[user.alice]\npool = \"Q\"\n"),
            5,
            "user alice pool \"Q\" is not a known pool",
        );
        let c = parse(&format!(
            "{HEAD}\n[pool.A]\n\n[user.alice]\npool = \"A\"\n\n[[route]]\npool = \"A\"\nuser = \"list-*\"\n"
        ))
        .expect("valid");
        assert_eq!(c.users["alice"].pool.as_deref(), Some("A"));
        assert_eq!(c.users["alice"].line, 6);
        assert_eq!(c.routes[0].user.as_deref(), Some("list-*"));
        error_at(
            &format!("{HEAD}\n[[route]]\npool = \"-\"\nuser = \"\"\n"),
            6,
            "matches no user",
        );
    }
}
