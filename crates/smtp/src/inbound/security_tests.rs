use super::*;

fn config(security: Security) -> SessionConfig {
    SessionConfig {
        hostname: "relay.test".into(),
        max_message_size: 10_000,
        max_recipients: 10,
        max_line_length: 512,
        relay_allowed: false,
        max_hops: 50,
        security,
        mt_priority: Some(crate::MtPriorityPolicy::Mixer),
        // Not trusted by address: only AUTH can make a raise count.
        mt_priority_trusted: false,
    }
}

fn starttls_auth() -> Security {
    Security {
        starttls: true,
        require_tls: false,
        auth: AuthPolicy::Optional,
        auth_plaintext: false,
    }
}

fn tls13() -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3",
        cipher: "TLS13_AES_256_GCM_SHA384".into(),
    }
}

/// A client driven by hand: what it saw, and the outputs the driver acts on.
struct Client {
    session: Session,
    replies: String,
    starttls: bool,
    attempts: Vec<AuthAttempt>,
    messages: Vec<Transaction>,
    closed: bool,
    /// The verdict given to every AUTH attempt.
    verdict: AuthVerdict,
}

impl Client {
    fn new(security: Security) -> Client {
        Client::with_config(config(security))
    }

    fn with_config(config: SessionConfig) -> Client {
        let peer = SocketAddr::from(([127, 0, 0, 2], 40000));
        let (session, banner) = Session::new(config, peer);
        Client {
            session,
            replies: String::from_utf8_lossy(&banner).into_owned(),
            starttls: false,
            attempts: Vec::new(),
            messages: Vec::new(),
            closed: false,
            verdict: AuthVerdict::Accepted,
        }
    }

    /// Sends `input`; returns the replies it produced.
    fn send(&mut self, input: &str) -> String {
        let before = self.replies.len();
        let mut outputs = self.session.feed(input.as_bytes());
        while !outputs.is_empty() {
            let mut next = Vec::new();
            for output in outputs {
                match output {
                    Output::Reply(bytes) => self.replies.push_str(&String::from_utf8_lossy(&bytes)),
                    Output::Message(t) => {
                        self.messages.push(*t);
                        let reply = self.session.queued("Q");
                        self.replies.push_str(&String::from_utf8_lossy(&reply));
                        next.extend(self.session.feed(&[]));
                    }
                    Output::StartTls => self.starttls = true,
                    Output::Authenticate(attempt) => {
                        let out = self.session.authenticated(&attempt, self.verdict);
                        self.attempts.push(attempt);
                        next.extend(out);
                        next.extend(self.session.feed(&[]));
                    }
                    Output::Close => self.closed = true,
                }
            }
            outputs = next;
        }
        self.replies[before..].to_string()
    }

    /// Completes a STARTTLS the way the driver does.
    fn handshake(&mut self) {
        assert!(self.starttls, "no STARTTLS was asked for");
        self.starttls = false;
        self.session.tls_started(tls13());
    }
}

fn b64(s: &str) -> String {
    crate::base64::encode(s.as_bytes())
}

#[test]
fn starttls_is_offered_before_tls_and_auth_only_after() {
    let mut c = Client::new(starttls_auth());
    let ehlo = c.send("EHLO client.test\r\n");
    assert!(ehlo.contains("250-STARTTLS\r\n"), "{ehlo}");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let refused = c.send(&format!("AUTH PLAIN {}\r\n", b64("\0u\0p")));
    assert!(refused.starts_with("538 5.7.11 "), "{refused}");
    assert!(c.attempts.is_empty());
    assert_eq!(c.send("STARTTLS\r\n"), "220 2.0.0 Ready to start TLS\r\n");
    c.handshake();
    let ehlo = c.send("EHLO client.test\r\n");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    assert!(c.send("STARTTLS\r\n").starts_with("503 5.5.1 "));
}

#[test]
fn bytes_pipelined_after_starttls_never_run() {
    let mut c = Client::new(starttls_auth());
    c.send("EHLO client.test\r\n");
    // A man in the middle appends commands to the client's STARTTLS.
    let replies = c.send("STARTTLS\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<a@b.test>\r\n");
    assert_eq!(replies, "220 2.0.0 Ready to start TLS\r\n");
    assert!(c.starttls);
    c.handshake();
    // The session starts over: no HELO known, no sender kept.
    let replies = c.send("RCPT TO:<a@b.test>\r\n");
    assert!(replies.starts_with("503 5.5.1 need MAIL"), "{replies}");
    let replies = c.send("MAIL FROM:<a@b.test>\r\n");
    assert!(replies.starts_with("503 5.5.1 send HELO"), "{replies}");
    assert!(c.session.tls().is_some());
}

#[test]
fn starttls_not_offered_or_with_parameters() {
    let mut c = Client::new(Security::default());
    let ehlo = c.send("EHLO client.test\r\n");
    assert!(
        !ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    assert!(c.send("STARTTLS\r\n").starts_with("502 5.5.1 "));
    assert!(c.send("AUTH PLAIN\r\n").starts_with("502 5.5.1 "));
    let mut c = Client::new(starttls_auth());
    c.send("EHLO client.test\r\n");
    assert!(c.send("STARTTLS now\r\n").starts_with("501 5.5.4 "));
    assert!(!c.starttls);
}

#[test]
fn require_tls_refuses_mail_until_starttls() {
    let mut c = Client::new(Security {
        require_tls: true,
        ..starttls_auth()
    });
    c.send("EHLO client.test\r\n");
    let replies = c.send("MAIL FROM:<a@b.test>\r\n");
    assert_eq!(replies, "530 5.7.0 Must issue a STARTTLS command first\r\n");
    assert_eq!(c.session.take_rejections(), vec![Rejection::TlsRequired]);
    c.send("STARTTLS\r\n");
    c.handshake();
    c.send("EHLO client.test\r\n");
    assert!(c.send("MAIL FROM:<a@b.test>\r\n").starts_with("250 "));
}

#[test]
fn authenticated_client_relays_from_anywhere() {
    let mut c = Client::new(starttls_auth());
    c.send("EHLO client.test\r\nSTARTTLS\r\n");
    c.handshake();
    c.send("EHLO client.test\r\n");
    c.send("MAIL FROM:<a@b.test>\r\n");
    let denied = c.send("RCPT TO:<x@y.test>\r\n");
    assert!(denied.starts_with("554 5.7.1 "), "{denied}");
    // AUTH is not allowed inside a transaction.
    assert!(c.send("AUTH LOGIN\r\n").starts_with("503 5.5.1 "));
    c.send("RSET\r\n");
    let ok = c.send(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0s3cret")));
    assert_eq!(ok, "235 2.7.0 Authentication successful\r\n");
    assert_eq!(
        c.attempts,
        vec![AuthAttempt {
            username: "alice".into(),
            password: b"s3cret".to_vec(),
            refused: false,
        }]
    );
    assert_eq!(c.session.authenticated_user(), Some("alice"));
    assert!(format!("{:?}", c.attempts[0]).contains("<redacted>"));
    assert!(!format!("{:?}", c.attempts[0]).contains("s3cret"));
    let ehlo = c.send("EHLO client.test\r\n");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    assert!(c.send("AUTH PLAIN\r\n").starts_with("503 5.5.1 already"));
    c.send("MAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n");
    c.send("Subject: hi\r\n\r\nbody\r\n.\r\n");
    let [t] = c.messages.as_slice() else {
        panic!("{}", c.replies)
    };
    assert_eq!(t.user.as_deref(), Some("alice"));
    assert_eq!(t.tls, Some(tls13()));
    let header = String::from_utf8_lossy(&t.message);
    assert!(
        header.starts_with(
            "Received: from client.test ([127.0.0.2])\r\n\t(using TLSv1.3 with cipher TLS13_AES_256_GCM_SHA384)\r\n\tby relay.test (poolrelay) with ESMTPSA\r\n\tfor <x@y.test>; "
        ),
        "{header}"
    );
}

#[test]
fn login_exchange_and_cancel() {
    let mut c = Client::new(Security {
        auth_plaintext: true,
        starttls: false,
        ..starttls_auth()
    });
    let ehlo = c.send("EHLO client.test\r\n");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
    assert_eq!(c.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(c.send("*\r\n"), "501 5.0.0 Authentication cancelled\r\n");
    assert_eq!(c.send("AUTH LOGIN\r\n"), "334 VXNlcm5hbWU6\r\n");
    assert_eq!(c.send("!!!!\r\n"), "501 5.5.2 Cannot decode response\r\n");
    assert_eq!(
        c.send(&format!("AUTH LOGIN {}\r\n", b64("bob"))),
        "334 UGFzc3dvcmQ6\r\n"
    );
    c.verdict = AuthVerdict::Refused;
    // The password line is a response, never a command, whatever it says.
    assert_eq!(
        c.send(&format!("{}\r\n", b64("QUIT"))),
        "535 5.7.8 Authentication credentials invalid\r\n"
    );
    assert_eq!(c.attempts[0].username, "bob");
    assert_eq!(c.attempts[0].password, b"QUIT");
    assert_eq!(c.session.authenticated_user(), None);
    // Received says ESMTP: no TLS, no AUTH.
    assert_eq!(c.session.protocol(false), "ESMTP");
    c.verdict = AuthVerdict::Accepted;
    c.send(&format!("AUTH PLAIN\r\n{}\r\n", b64("bob\0bob\0pw")));
    assert_eq!(c.session.authenticated_user(), Some("bob"));
    assert_eq!(c.session.protocol(false), "ESMTPA");
    assert_eq!(c.session.protocol(true), "UTF8SMTPA");
}

#[test]
fn bad_auth_requests() {
    // Lines long enough for an over-long password.
    let mut c = Client::with_config(SessionConfig {
        max_line_length: 4096,
        ..config(Security {
            auth_plaintext: true,
            ..starttls_auth()
        })
    });
    assert!(c.send("AUTH PLAIN\r\n").starts_with("503 5.5.1 send EHLO"));
    c.send("EHLO client.test\r\n");
    assert!(c.send("AUTH CRAM-MD5\r\n").starts_with("504 5.5.4 "));
    assert!(c.send("AUTH\r\n").starts_with("501 5.5.4 "));
    assert!(c.send("AUTH PLAIN a b\r\n").starts_with("501 5.5.4 "));
    // Acting as someone else, and a response without its NULs.
    let other = c.send(&format!("AUTH PLAIN {}\r\n", b64("root\0bob\0pw")));
    assert!(other.starts_with("535 5.7.8 "), "{other}");
    let malformed = c.send(&format!("AUTH PLAIN {}\r\n", b64("bobpw")));
    assert!(malformed.starts_with("501 5.5.2 "), "{malformed}");
    let control = c.send(&format!("AUTH PLAIN {}\r\n", b64("\0bo\nb\0pw")));
    assert!(control.starts_with("535 5.7.8 "), "{control}");
    let long_password = format!("\0bob\0{}", "p".repeat(MAX_PASSWORD + 1));
    let long = c.send(&format!("AUTH PLAIN {}\r\n", b64(&long_password)));
    assert!(long.starts_with("535 5.7.8 "), "{long}");
    c.send("AUTH LOGIN\r\n");
    let long_user = c.send(&format!("{}\r\n", b64(&"u".repeat(MAX_USERNAME + 1))));
    assert!(long_user.starts_with("535 5.7.8 "), "{long_user}");
    // Each went to the owner, to be counted, delayed and limited like a
    // wrong password, but as refused: nothing to check, nothing to leak.
    // The owner here accepts everything; the session still refuses.
    assert_eq!(c.attempts.len(), 5, "{:?}", c.attempts);
    assert!(
        c.attempts
            .iter()
            .all(|a| a.refused && a.username.is_empty() && a.password.is_empty()),
        "{:?}",
        c.attempts
    );
    assert_eq!(c.session.authenticated_user(), None);
    // A refused attempt can still end the session when the owner says so.
    c.verdict = AuthVerdict::TooManyFailures;
    let bye = c.send(&format!("AUTH PLAIN {}\r\n", b64("bobpw")));
    assert!(bye.starts_with("421 4.7.0 "), "{bye}");
    assert!(c.closed);
}

#[test]
fn acceptable_user_names() {
    assert!(username_acceptable("alice@example.org"));
    assert!(username_acceptable(&"u".repeat(MAX_USERNAME)));
    assert!(!username_acceptable(&"u".repeat(MAX_USERNAME + 1)));
    assert!(!username_acceptable(""));
    assert!(!username_acceptable("a\tb"));
}

#[test]
fn auth_required_refuses_mail_and_too_many_failures_close() {
    let mut c = Client::new(Security {
        auth: AuthPolicy::Required,
        ..starttls_auth()
    });
    c.send("EHLO client.test\r\n");
    let refused = c.send("MAIL FROM:<a@b.test>\r\n");
    assert!(
        refused.starts_with("530 5.7.0 Authentication required"),
        "{refused}"
    );
    c.send("STARTTLS\r\n");
    c.handshake();
    c.send("EHLO client.test\r\n");
    assert_eq!(
        c.send("MAIL FROM:<a@b.test>\r\n"),
        "530 5.7.0 Authentication required\r\n"
    );
    c.verdict = AuthVerdict::TooManyFailures;
    let bye = c.send(&format!("AUTH PLAIN {}\r\nNOOP\r\n", b64("\0u\0p")));
    assert_eq!(
        bye,
        "421 4.7.0 relay.test too many authentication failures, closing\r\n"
    );
    assert!(c.closed);
    assert!(c.session.is_closed());
}

#[test]
fn starttls_after_auth_is_refused_and_tls_forgets_the_user() {
    // auth_plaintext lets a client authenticate before STARTTLS.
    let mut c = Client::new(Security {
        auth_plaintext: true,
        ..starttls_auth()
    });
    c.send("EHLO client.test\r\n");
    c.send(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0pw")));
    assert_eq!(c.session.authenticated_user(), Some("alice"));
    let refused = c.send("STARTTLS\r\n");
    assert_eq!(refused, "503 5.5.1 STARTTLS not permitted after AUTH\r\n");
    assert!(!c.starttls);
    // Should TLS start anyway (a driver's own choice), the identity given
    // in the clear does not carry over (RFC 3207 §4.2).
    c.session.tls_started(tls13());
    assert_eq!(c.session.authenticated_user(), None);
    let ehlo = c.send("EHLO client.test\r\n");
    assert!(ehlo.contains("250-AUTH PLAIN LOGIN\r\n"), "{ehlo}");
}

#[test]
fn received_protocols() {
    let mut c = Client::new(starttls_auth());
    c.send("EHLO client.test\r\nSTARTTLS\r\n");
    c.handshake();
    c.send("EHLO client.test\r\n");
    assert_eq!(c.session.protocol(false), "ESMTPS");
    assert_eq!(c.session.protocol(true), "UTF8SMTPS");
    c.send("HELO client.test\r\n");
    assert_eq!(c.session.protocol(false), "SMTP");
}

#[test]
fn an_authenticated_clients_mt_priority_raise_is_kept() {
    let mut c = Client::new(starttls_auth());
    c.send("EHLO client.test\r\nSTARTTLS\r\n");
    c.handshake();
    c.send("EHLO client.test\r\n");
    // Before AUTH (relay refused anyway): the raise is lowered.
    assert!(!c.session.mt_priority_trusted());
    let ok = c.send(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0s3cret")));
    assert!(ok.starts_with("235 "), "{ok}");
    assert!(c.session.mt_priority_trusted());
    c.send("MAIL FROM:<a@b.test> MT-PRIORITY=6\r\nRCPT TO:<x@y.test>\r\nDATA\r\n");
    c.send("Subject: hi\r\n\r\nbody\r\n.\r\n");
    let [t] = c.messages.as_slice() else {
        panic!("{}", c.replies)
    };
    assert_eq!(t.mt_priority, Some(6));
}
