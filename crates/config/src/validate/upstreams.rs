//! `[[upstream]]` and `[[route]]` tables.

use super::*;

impl Ctx<'_> {
    pub(super) fn upstreams(
        &mut self,
        raw: Option<Vec<Spanned<crate::raw::RawUpstream>>>,
        pools: &BTreeMap<String, Pool>,
    ) -> Vec<Upstream> {
        let mut out = Vec::new();
        for item in raw.iter().flatten() {
            let line = self.line(&item.span());
            let r = item.get_ref();
            let host = self.host("upstream host", &r.host).unwrap_or_default();
            let workers = match &r.workers {
                Some(v) if *v.get_ref() < 1 => {
                    let msg = format!(
                        "upstream workers = {} leaves {} without workers; write workers = 1 or more, or remove this [[upstream]]",
                        v.get_ref(),
                        r.host.get_ref()
                    );
                    self.at(v, msg);
                    1
                }
                Some(v) => self.int("workers", v, 1, "").unwrap_or(1),
                None => 1,
            };
            let pool_list = match &r.pools {
                None => pool_order(pools),
                Some(list) if list.get_ref().is_empty() => {
                    self.at(list, "upstream serves no pool: pools = [] is empty; list the pools it delivers, e.g. pools = [\"A\", \"-\"], or omit pools to serve every pool".to_string());
                    Vec::new()
                }
                Some(list) => {
                    let mut names: Vec<String> = Vec::new();
                    for p in list.get_ref() {
                        let name = p.get_ref();
                        if name == "*" {
                            self.at(p, "upstream pools entry \"*\": omit pools to serve every pool, or list the pools, e.g. pools = [\"A\", \"-\"]".to_string());
                        } else if names.contains(name) {
                            self.at(
                                p,
                                format!("upstream pools lists \"{name}\" twice; keep one"),
                            );
                        } else if self.known_pool("upstream pools entry", p, pools) {
                            names.push(name.clone());
                        }
                    }
                    names
                }
            };
            let reserve_workers = match &r.reserve_workers {
                None => 0,
                Some(v) => {
                    let n: usize = self.int("reserve_workers", v, 0, "").unwrap_or_default();
                    let urgent = pool_list
                        .iter()
                        .filter(|p| pools.get(*p).is_some_and(|p| p.priority > 0))
                        .count();
                    let ordinary = pool_list.len() - urgent;
                    if n > 0 && n >= workers && ordinary > 0 {
                        self.at(v, format!("upstream reserve_workers = {n} keeps all {workers} workers of {} for pools above priority 0, so its other pools would never be delivered here; write reserve_workers = {} or less, or raise workers", r.host.get_ref(), workers - 1));
                    } else if n > workers {
                        self.at(v, format!("upstream reserve_workers = {n} is more than its workers = {workers}; write reserve_workers = {workers} or less"));
                    } else if n > 0 && urgent == 0 && !pool_list.is_empty() {
                        self.at(v, format!("upstream reserve_workers = {n}, but none of the pools it serves has a priority above 0, so the reserved workers would never deliver; give the urgent pool e.g. priority = 5, or remove reserve_workers"));
                    }
                    n
                }
            };
            let failover = r
                .failover
                .iter()
                .flatten()
                .filter_map(|h| self.host("upstream failover", h))
                .collect();
            let window = match &r.window {
                Some(v) => match parse_window(v.get_ref()) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        self.at(v, format!("upstream window: {e}"));
                        None
                    }
                },
                None => None,
            };
            let tls = match &r.tls {
                Some(v) => match v.get_ref().trim().to_ascii_lowercase().as_str() {
                    "opportunistic" => TlsMode::Opportunistic,
                    "required" => TlsMode::Required,
                    "implicit" => TlsMode::Implicit,
                    "off" => TlsMode::Off,
                    _ => {
                        self.at(v, format!("upstream tls \"{}\" is not a TLS mode; write \"opportunistic\" (STARTTLS when offered), \"required\" (STARTTLS or retry later), \"implicit\" (TLS from the first byte, port 465) or \"off\"", v.get_ref()));
                        TlsMode::Opportunistic
                    }
                },
                None => TlsMode::Opportunistic,
            };
            let max_messages_per_connection = match &r.max_messages_per_connection {
                Some(v) => self
                    .int("max_messages_per_connection", v, 1, "")
                    .unwrap_or(100),
                None => 100,
            };
            let idle_timeout = match &r.idle_timeout {
                Some(v) => self
                    .unit("idle_timeout", v, parse_duration)
                    .unwrap_or_default(),
                None => Duration::from_secs(10),
            };
            let defaults = Timeouts::default();
            let mut stage = |key: &str, v: &Option<Unit>, default: Duration| match v {
                Some(v) => self.positive_duration(key, v).unwrap_or(default),
                None => default,
            };
            let timeouts = Timeouts {
                connect: stage("connect_timeout", &r.connect_timeout, defaults.connect),
                greeting: stage("greeting_timeout", &r.greeting_timeout, defaults.greeting),
                ehlo: stage("ehlo_timeout", &r.ehlo_timeout, defaults.ehlo),
                mail: stage("mail_timeout", &r.mail_timeout, defaults.mail),
                rcpt: stage("rcpt_timeout", &r.rcpt_timeout, defaults.rcpt),
                data_init: stage(
                    "data_init_timeout",
                    &r.data_init_timeout,
                    defaults.data_init,
                ),
                data_block: stage(
                    "data_block_timeout",
                    &r.data_block_timeout,
                    defaults.data_block,
                ),
                data_end: stage("data_end_timeout", &r.data_end_timeout, defaults.data_end),
            };
            let tls_ca_file = r
                .tls_ca_file
                .as_ref()
                .and_then(|v| self.path("upstream tls_ca_file", v));
            if let Some(a) = &r.auth {
                let plaintext = r.auth_plaintext.as_ref().is_some_and(|v| *v.get_ref());
                let problem = match tls {
                    TlsMode::Opportunistic => Some(
                        "auth with tls = \"opportunistic\" would send the password to whoever answers, unverified (a man in the middle can offer any certificate); write tls = \"required\" (STARTTLS, certificate checked) or \"implicit\" (port 465); for a private smarthost without a valid certificate add tls_verify = false",
                    ),
                    TlsMode::Off if !plaintext => Some(
                        "auth with tls = \"off\" sends the password in clear; write tls = \"required\" or \"implicit\", or set auth_plaintext = true if the path to the smarthost is trusted (e.g. loopback)",
                    ),
                    _ => None,
                };
                if let Some(problem) = problem {
                    self.at(&a.value.username, format!("upstream {}: {problem}", host));
                }
            }
            let auth_password_file = r
                .auth
                .as_ref()
                .and_then(|a| self.path("upstream auth.password_file", &a.value.password_file));
            let auth = match (&r.auth, &auth_password_file) {
                (Some(a), Some(path)) => {
                    self.password(&a.value.password_file, path)
                        .map(|password| Credentials {
                            username: a.value.username.get_ref().clone(),
                            password,
                            allow_plaintext: r
                                .auth_plaintext
                                .as_ref()
                                .is_some_and(|v| *v.get_ref()),
                        })
                }
                _ => None,
            };
            out.push(Upstream {
                timeouts,
                tls_verify: r.tls_verify.as_ref().is_none_or(|v| *v.get_ref()),
                tls_ca_file,
                auth,
                auth_password_file,
                mx: r.mx.as_ref().is_some_and(|v| *v.get_ref()),
                host,
                workers,
                reserve_workers,
                pools: pool_list,
                failover,
                window,
                tls,
                max_messages_per_connection,
                idle_timeout,
                line,
            });
        }
        out
    }

    pub(super) fn routes(
        &mut self,
        raw: Option<Vec<Spanned<crate::raw::RawRoute>>>,
        pools: &BTreeMap<String, Pool>,
        listeners: &[Listener],
    ) -> Vec<Route> {
        let raw = raw.unwrap_or_default();
        let lines: Vec<usize> = raw.iter().map(|r| self.line(&r.span())).collect();
        let mut out = Vec::new();
        for (i, item) in raw.iter().enumerate() {
            let line = lines[i];
            let r = item.get_ref();
            self.known_pool("route pool", &r.pool, pools);
            let sender = r.sender.as_ref().map(|s| match s.get_ref().trim() {
                "<>" => String::new(),
                other => other.to_string(),
            });
            let recipient = r.recipient.as_ref().map(|s| s.get_ref().trim().to_string());
            if let (Some(v), Some("")) = (&r.recipient, recipient.as_deref()) {
                self.at(v, "route recipient = \"\" matches no recipient; write a glob such as \"*@example.org\", or omit recipient".to_string());
            }
            let header = match &r.header {
                Some(h) => {
                    let name = h.value.name.get_ref().trim();
                    let valid =
                        !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
                    if !valid {
                        self.at(&h.value.name, format!("route header name \"{}\" is not a header field name; write it without the colon, e.g. header = {{ name = \"List-Id\", value = \"*news*\" }}", h.value.name.get_ref()));
                    }
                    Some(HeaderMatch {
                        name: name.to_string(),
                        value: h.value.value.get_ref().clone(),
                    })
                }
                None => None,
            };
            let listener = match &r.listener {
                Some(v) => {
                    if !listeners.iter().any(|l| &l.name == v.get_ref()) {
                        let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
                        let hint = closest(v.get_ref(), names.iter().copied())
                            .map(|c| format!(" (did you mean \"{c}\"?)"))
                            .unwrap_or_default();
                        self.at(v, format!("route listener \"{}\" names no listener{hint}; use the name of a [[listener]] (its `name`, by default its address): {}", v.get_ref(), names.join(", ")));
                    }
                    Some(v.get_ref().clone())
                }
                None => None,
            };
            let user = r.user.as_ref().map(|s| s.get_ref().trim().to_string());
            if let (Some(v), Some("")) = (&r.user, user.as_deref()) {
                self.at(v, "route user = \"\" matches no user; write a user name or a glob such as \"list-*\", or omit user".to_string());
            }
            let mt_priority = match &r.mt_priority {
                Some(v) => self.unit("route mt_priority", v, parse_mt_priority_range),
                None => None,
            };
            let route = Route {
                pool: r.pool.get_ref().clone(),
                sender,
                recipient,
                header,
                listener,
                user,
                mt_priority,
                line,
            };
            if route.is_catch_all()
                && r.mt_priority.is_none()
                && let Some(next) = lines.get(i + 1)
            {
                self.at_line(line, format!("route has no matcher, so it takes every message and the route on line {next} can never match; add sender, recipient, header, listener, user or mt_priority, or move it to the end as the catch-all"));
            }
            out.push(route);
        }
        out
    }
}
