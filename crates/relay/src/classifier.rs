//! Decides the pool of a message: the authenticated user's pool
//! (`[user.NAME] pool`), else the listener's pinned pool, else the first
//! `[[route]]` whose matchers all match, else `defaults.list_pool` for
//! `owner-*@` senders, else `-`.

use poolrelay_config::{Config, DEFAULT_POOL, Route};

/// What the classifier looks at.
pub struct Facts<'a> {
    /// Name of the listener that accepted the message.
    pub listener: &'a str,
    /// The listener's pinned pool, if any.
    pub pinned_pool: Option<&'a str>,
    /// The user the client authenticated as (AUTH), if any.
    pub user: Option<&'a str>,
    /// That user's pinned pool (`[user.NAME] pool`), if any.
    pub user_pool: Option<&'a str>,
    /// Envelope sender; empty for `<>`.
    pub sender: &'a str,
    /// Envelope recipients.
    pub recipients: &'a [&'a str],
    /// The message bytes (only the header section is read).
    pub message: &'a [u8],
    /// Its MT-PRIORITY; 0 when it has none (RFC 6710's default), so a
    /// route for `"<= 0"` takes mail without one.
    pub mt_priority: i8,
}

/// The decision and why it was made, for the per-message log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The pool the message goes to.
    pub pool: String,
    /// Line of the route that matched; 0 when none did.
    pub route_line: usize,
    /// Short reason: "user", "listener", "route", "list_pool", "default".
    pub reason: &'static str,
}

/// The routes of one config, ready to match.
#[derive(Debug, Clone)]
pub struct Classifier {
    routes: Vec<Route>,
    list_pool: String,
}

impl Classifier {
    /// Builds the classifier from a validated config.
    pub fn new(config: &Config) -> Classifier {
        Classifier {
            routes: config.routes.clone(),
            list_pool: config.defaults.list_pool.clone(),
        }
    }

    /// Classifies one message. All its recipients stay together in one pool.
    pub fn classify(&self, facts: &Facts<'_>) -> Decision {
        if let Some(pool) = facts.user_pool {
            return Decision {
                pool: pool.to_string(),
                route_line: 0,
                reason: "user",
            };
        }
        if let Some(pool) = facts.pinned_pool {
            return Decision {
                pool: pool.to_string(),
                route_line: 0,
                reason: "listener",
            };
        }
        let mut headers: Option<Vec<(String, String)>> = None;
        for route in &self.routes {
            if route_matches(route, facts, &mut headers) {
                return Decision {
                    pool: route.pool.clone(),
                    route_line: route.line,
                    reason: "route",
                };
            }
        }
        if glob_match("owner-*@*", facts.sender) {
            Decision {
                pool: self.list_pool.clone(),
                route_line: 0,
                reason: "list_pool",
            }
        } else {
            Decision {
                pool: DEFAULT_POOL.to_string(),
                route_line: 0,
                reason: "default",
            }
        }
    }
}

fn route_matches(
    route: &Route,
    facts: &Facts<'_>,
    headers: &mut Option<Vec<(String, String)>>,
) -> bool {
    if let Some(listener) = &route.listener
        && listener != facts.listener
    {
        return false;
    }
    if let Some(user) = &route.user
        && !facts.user.is_some_and(|u| glob_match(user, u))
    {
        return false;
    }
    if let Some(sender) = &route.sender {
        let matched = if sender.is_empty() {
            facts.sender.is_empty()
        } else {
            glob_match(sender, facts.sender)
        };
        if !matched {
            return false;
        }
    }
    if let Some(pattern) = &route.recipient
        && !facts.recipients.iter().any(|r| glob_match(pattern, r))
    {
        return false;
    }
    if let Some(range) = route.mt_priority
        && !range.contains(facts.mt_priority)
    {
        return false;
    }
    if let Some(header) = &route.header {
        // Parsed lazily: most routes match on the envelope alone.
        let parsed = headers.get_or_insert_with(|| parse_headers(facts.message));
        return parsed.iter().any(|(name, value)| {
            name.eq_ignore_ascii_case(&header.name) && glob_match(&header.value, value)
        });
    }
    true
}

/// Glob with ASCII case folding: `*` any run of bytes, `?` one byte.
/// Works on bytes without allocating: classification runs for every
/// message against every route, so this is on the hot path. (Non-ASCII
/// bytes of SMTPUTF8 addresses compare exactly.)
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // Iterative matcher with one backtrack point: linear in practice, no recursion.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        // A star is a wildcard even where the text has a star.
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == b'?' || p[pi].eq_ignore_ascii_case(&t[ti])) {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// The header fields of a message, unfolded, in order. Stops at the first
/// empty line; tolerates a message without a body.
pub fn parse_headers(message: &[u8]) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for raw_line in message.split(|&b| b == b'\n') {
        let line = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
        if line.is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(line);
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(text.trim());
            }
            continue;
        }
        if let Some((name, value)) = text.split_once(':') {
            fields.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use poolrelay_config::HeaderMatch;

    fn route(pool: &str, line: usize) -> Route {
        Route {
            pool: pool.into(),
            sender: None,
            recipient: None,
            header: None,
            listener: None,
            user: None,
            mt_priority: None,
            line,
        }
    }

    fn classifier(routes: Vec<Route>) -> Classifier {
        Classifier {
            routes,
            list_pool: "A".into(),
        }
    }

    fn facts<'a>(sender: &'a str, rcpts: &'a [&'a str], message: &'a [u8]) -> Facts<'a> {
        Facts {
            listener: "main",
            pinned_pool: None,
            user: None,
            user_pool: None,
            sender,
            recipients: rcpts,
            message,
            mt_priority: 0,
        }
    }

    #[test]
    fn globs_are_case_insensitive_and_anchored() {
        assert!(glob_match("owner-*@*", "OWNER-list@Example.org"));
        assert!(!glob_match("owner-*@*", "xowner-list@example.org"));
        assert!(glob_match("*@example.org", "a@EXAMPLE.ORG"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "abbc"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*a*b*", "xxaxxbxx"));
    }

    #[test]
    fn a_star_is_a_wildcard_even_where_the_text_has_a_star() {
        // `*` is a valid character of a local part; the pattern's star
        // must not be taken as a literal for it.
        assert!(glob_match("*", "*x"));
        assert!(glob_match("*@example.org", "*a@example.org"));
        assert!(glob_match("owner-*@*", "owner-*list@example.org"));
        assert!(glob_match("a*", "a*"));
        assert!(!glob_match("*b", "*a"));
    }

    #[test]
    fn first_matching_route_wins() {
        let mut r1 = route("B", 10);
        r1.sender = Some("owner-emergency@*".into());
        let mut r2 = route("C", 20);
        r2.sender = Some("owner-*@*".into());
        let c = classifier(vec![r1, r2]);
        let d = c.classify(&facts("owner-emergency@lists.test", &["x@y"], b""));
        assert_eq!((d.pool.as_str(), d.route_line), ("B", 10));
        let d = c.classify(&facts("owner-big@lists.test", &["x@y"], b""));
        assert_eq!((d.pool.as_str(), d.route_line), ("C", 20));
    }

    #[test]
    fn unmatched_owner_mail_goes_to_list_pool_and_the_rest_to_default() {
        let c = classifier(vec![]);
        assert_eq!(c.classify(&facts("owner-x@h", &[], b"")).pool, "A");
        assert_eq!(c.classify(&facts("", &[], b"")).pool, "-");
        assert_eq!(c.classify(&facts("joe@h", &[], b"")).pool, "-");
    }

    #[test]
    fn empty_sender_pattern_matches_only_the_null_sender() {
        let mut r = route("Z", 1);
        r.sender = Some(String::new());
        let c = classifier(vec![r]);
        assert_eq!(c.classify(&facts("", &[], b"")).pool, "Z");
        assert_eq!(c.classify(&facts("a@b", &[], b"")).pool, "-");
    }

    #[test]
    fn header_matcher_reads_folded_headers_only() {
        let mut r = route("B", 5);
        r.header = Some(HeaderMatch {
            name: "sender".into(),
            value: "*<EMERGENCY@lists.test>".into(),
        });
        let c = classifier(vec![r]);
        let msg = b"Subject: hi\r\nSender: Emergency list\r\n <emergency@LISTS.test>\r\n\r\nSender: no\r\n";
        assert_eq!(c.classify(&facts("owner-emergency@x", &[], msg)).pool, "B");
        let body_only = b"Subject: hi\r\n\r\nSender: <emergency@lists.test>\r\n";
        assert_eq!(
            c.classify(&facts("owner-emergency@x", &[], body_only)).pool,
            "A"
        );
    }

    #[test]
    fn pinned_listener_overrides_routes() {
        let mut r = route("C", 1);
        r.sender = Some("*".into());
        let c = classifier(vec![r]);
        let mut f = facts("owner-x@h", &[], b"");
        f.pinned_pool = Some("B");
        assert_eq!(c.classify(&f).pool, "B");
    }

    #[test]
    fn recipient_matcher_matches_any_recipient() {
        let mut r = route("R", 1);
        r.recipient = Some("*@vip.test".into());
        let c = classifier(vec![r]);
        assert_eq!(
            c.classify(&facts("a@b", &["x@y", "boss@VIP.test"], b""))
                .pool,
            "R"
        );
        assert_eq!(c.classify(&facts("a@b", &["x@y"], b"")).pool, "-");
    }

    #[test]
    fn user_pool_overrides_the_listener_and_user_matches_only_authenticated_mail() {
        let mut r = route("U", 3);
        r.user = Some("list-*".into());
        let c = classifier(vec![r]);
        let mut f = facts("a@b", &["x@y"], b"");
        assert_eq!(c.classify(&f).pool, "-");
        f.user = Some("LIST-news");
        let d = c.classify(&f);
        assert_eq!((d.pool.as_str(), d.reason), ("U", "route"));
        f.user = Some("alice");
        assert_eq!(c.classify(&f).pool, "-");
        f.pinned_pool = Some("B");
        f.user_pool = Some("A");
        let d = c.classify(&f);
        assert_eq!((d.pool.as_str(), d.reason), ("A", "user"));
    }

    #[test]
    fn mt_priority_matcher_takes_mail_without_one_as_zero() {
        let ranges = poolrelay_config::parse_mt_priority_range;
        let mut urgent = route("B", 1);
        urgent.mt_priority = ranges(">= 5").ok();
        let mut low = route("L", 2);
        low.mt_priority = ranges("<= -1").ok();
        let mut zero = route("Z", 3);
        zero.mt_priority = ranges("0").ok();
        let c = classifier(vec![urgent, low, zero]);
        let pool = |mt_priority| {
            let mut f = facts("a@b", &[], b"");
            f.mt_priority = mt_priority;
            c.classify(&f).pool
        };
        assert_eq!(
            [pool(9), pool(5), pool(4), pool(-1), pool(-9), pool(0)],
            ["B", "B", "-", "L", "L", "Z"]
        );
    }

    #[test]
    fn the_mt_priority_rewrite_leaves_one_field_as_this_parser_reads_headers() {
        // What an upstream without MT-PRIORITY receives must carry exactly
        // one MT-Priority field, however odd the header it came with.
        for message in [
            &b"Subject: a\r\nMT-Priority: 2\r\n\r\nbody"[..],
            b"MT-Priority: 2\nmt-priority:\n 4\nTo: x\n\nMT-Priority: 9\n",
            b" leading continuation\r\nMT-Priority : 1\r\n",
            b"garbage line\r\nMT-Priority\x0b: 3\r\n\tfolded\r\nX: y",
            b"\x0cMT-Priority: 5\r\nMT-Priority\xc2\x85: 6\r\n\r\n",
            b"X: 1\r\r\nMT-Priority: 7\r",
            b"",
        ] {
            let rewritten = poolrelay_smtp::mt_priority::set_header(message, -4);
            let found: Vec<String> = parse_headers(&rewritten)
                .into_iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("MT-Priority"))
                .map(|(_, v)| v)
                .collect();
            assert_eq!(found, ["-4"], "{:?}", String::from_utf8_lossy(message));
        }
    }
}
