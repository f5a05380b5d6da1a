//! `poolrelay queue ...` and `poolrelay reload`: the operator's commands,
//! spoken to a running relay over its admin API (like `postqueue`/`kcli`).
//!
//! Exit codes: 0 done, 1 the relay refused or failed (message on stderr),
//! 2 usage or connection trouble.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

/// Where the admin API is and how to authenticate.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Admin API base URL (default: http://<admin.address> from the config).
    #[arg(long, global = true)]
    admin: Option<String>,
    /// File holding the bearer token (default: admin.token_file from the config).
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Config file to read the defaults from.
    #[arg(short, long, global = true)]
    config: Option<PathBuf>,
}

/// The queue subcommands.
#[derive(clap::Subcommand)]
pub enum QueueCommand {
    /// A table per pool: ready, deferred, held, oldest age, last-minute rate, priority.
    Summary {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List queued messages (like postqueue -p).
    List {
        /// Only this pool (default: every pool).
        #[arg(long)]
        pool: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// At most this many per pool.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// One message: envelope, recipient states, headers.
    Show {
        /// Queue id.
        id: String,
    },
    /// Hold a pool: it keeps accepting and keeping mail but delivers nothing.
    Hold {
        /// The pool.
        #[arg(long)]
        pool: String,
    },
    /// Release a held pool.
    Release {
        /// The pool.
        #[arg(long)]
        pool: String,
    },
    /// Retry deferred mail now: a pool, or one message.
    Flush {
        /// The pool.
        #[arg(long, conflicts_with = "id")]
        pool: Option<String>,
        /// A queue id.
        id: Option<String>,
    },
    /// Delete messages without a bounce: ids, or --pool P --all.
    Delete {
        /// Queue ids.
        ids: Vec<String>,
        /// With --all: every message of this pool.
        #[arg(long, requires = "all")]
        pool: Option<String>,
        /// Delete every message of --pool.
        #[arg(long, requires = "pool")]
        all: bool,
    },
    /// Move a message to another pool.
    Move {
        /// Queue id.
        id: String,
        /// Target pool.
        #[arg(long)]
        to: String,
    },
    /// Bounce a message now (DSN to its sender).
    Bounce {
        /// Queue id.
        id: String,
    },
}

struct Api {
    host: String,
    token: Option<String>,
}

/// The outcome of one API call: HTTP status and JSON body.
struct Answer {
    status: u16,
    body: Value,
}

impl Api {
    fn from(target: &Target) -> Result<Api, String> {
        let path = crate::config_path(target.config.clone());
        let config = match poolrelay_config::Config::load(&path) {
            Ok(c) => Some(c),
            Err(e) => {
                // Say why its admin address and token are not used (a
                // token file others can read is refused, for one).
                if path.exists() {
                    eprintln!("warning: config not used: {e}");
                }
                None
            }
        };
        let base = match (&target.admin, &config) {
            (Some(url), _) => url.clone(),
            (None, Some(c)) => format!("http://{}", c.admin.address),
            (None, None) => "http://127.0.0.1:9025".to_string(),
        };
        let host = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("--admin {base:?}: only http:// URLs are supported"))?
            .trim_end_matches('/')
            .to_string();
        let token_file = target
            .token_file
            .clone()
            .or_else(|| config.as_ref().and_then(|c| c.admin.token_file.clone()));
        let token = match token_file {
            Some(path) => Some(
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        Ok(Api { host, token })
    }

    /// One HTTP/1.1 request with `Connection: close`; the admin API is local and small.
    fn call(&self, method: &str, path: &str) -> Result<Answer, String> {
        let mut stream = TcpStream::connect(&self.host).map_err(|e| {
            format!(
                "cannot reach the admin API at {}: {e} (is the relay running?)",
                self.host
            )
        })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
            self.host
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| format!("admin API write failed: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .map_err(|e| format!("admin API read failed: {e}"))?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or("admin API sent a malformed response")?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or("admin API sent no status")?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        let body = serde_json::from_str(&body).unwrap_or(Value::String(body));
        Ok(Answer { status, body })
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// Runs `poolrelay reload`.
pub fn reload(target: &Target) -> i32 {
    match Api::from(target).and_then(|api| api.call("POST", "/api/v1/reload")) {
        Ok(a) => report(a, |b| {
            b["message"].as_str().unwrap_or("reloaded").to_string()
        }),
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> i32 {
    eprintln!("poolrelay: {message}");
    2
}

/// Prints the outcome of a mutating call; returns the exit code.
fn report(answer: Answer, ok: impl Fn(&Value) -> String) -> i32 {
    if (200..300).contains(&answer.status) {
        println!("{}", ok(&answer.body));
        0
    } else {
        let msg = answer.body["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| answer.body.to_string());
        eprintln!("poolrelay: {msg} (HTTP {})", answer.status);
        1
    }
}

/// Prints the outcome of `delete --pool P --all`. The relay answers 409 when
/// messages being delivered were left; a relay that answers 200 with a
/// non-zero `busy` count is treated the same, as the delete was partial.
fn report_delete_all(answer: Answer, pool: &str) -> i32 {
    let busy = answer.body["busy"].as_u64().unwrap_or(0);
    if let Some(corrupt) = answer.body["corrupt"].as_array()
        && !corrupt.is_empty()
    {
        let ids: Vec<&str> = corrupt.iter().filter_map(|v| v.as_str()).collect();
        eprintln!(
            "poolrelay: skipped {} corrupt records of pool {pool} ({}); `poolrelay queue delete ID` removes one",
            ids.len(),
            ids.join(", ")
        );
    }
    if (200..300).contains(&answer.status) && busy > 0 {
        eprintln!(
            "poolrelay: deleted {} messages of pool {pool}; {busy} not deleted: being delivered right now, try again in a moment",
            num(&answer.body["deleted"])
        );
        return 1;
    }
    report(answer, |b| {
        format!("deleted {} messages of pool {pool}", num(&b["deleted"]))
    })
}

/// Runs one `poolrelay queue` command; returns the exit code.
pub fn run(target: &Target, command: QueueCommand) -> i32 {
    let api = match Api::from(target) {
        Ok(a) => a,
        Err(e) => return fail(&e),
    };
    let result = match command {
        QueueCommand::Summary { json } => api.call("GET", "/api/v1/pools").map(|a| {
            if json || a.status != 200 {
                print_json_or_error(a)
            } else {
                print_summary(&a.body);
                0
            }
        }),
        QueueCommand::List { pool, json, limit } => list(&api, pool, json, limit),
        QueueCommand::Show { id } => api
            .call("GET", &format!("/api/v1/messages/{id}"))
            .map(print_json_or_error),
        QueueCommand::Hold { pool } => api
            .call("POST", &format!("/api/v1/pools/{}/hold", encode(&pool)))
            .map(|a| report(a, |_| format!("pool {pool} held"))),
        QueueCommand::Release { pool } => api
            .call("POST", &format!("/api/v1/pools/{}/release", encode(&pool)))
            .map(|a| report(a, |_| format!("pool {pool} released"))),
        QueueCommand::Flush {
            pool: Some(pool), ..
        } => api
            .call("POST", &format!("/api/v1/pools/{}/flush", encode(&pool)))
            .map(|a| report(a, |_| format!("pool {pool} flushed"))),
        QueueCommand::Flush {
            pool: None,
            id: Some(id),
        } => api
            .call("POST", &format!("/api/v1/messages/{id}/flush"))
            .map(|a| report(a, |_| format!("{id} flushed"))),
        QueueCommand::Flush {
            pool: None,
            id: None,
        } => return fail("queue flush needs --pool P or a queue id"),
        QueueCommand::Delete {
            pool: Some(pool),
            all: true,
            ..
        } => api
            .call(
                "POST",
                &format!("/api/v1/pools/{}/delete-all", encode(&pool)),
            )
            .map(|a| report_delete_all(a, &pool)),
        QueueCommand::Delete { ids, .. } => {
            if ids.is_empty() {
                return fail("queue delete needs queue ids, or --pool P --all");
            }
            let mut code = 0;
            for id in ids {
                match api.call("POST", &format!("/api/v1/messages/{id}/delete")) {
                    Ok(a) => code = code.max(report(a, |_| format!("{id} deleted"))),
                    Err(e) => return fail(&e),
                }
            }
            Ok(code)
        }
        QueueCommand::Move { id, to } => api
            .call(
                "POST",
                &format!("/api/v1/messages/{id}/move?to={}", encode(&to)),
            )
            .map(|a| report(a, |_| format!("{id} moved to pool {to}"))),
        QueueCommand::Bounce { id } => api
            .call("POST", &format!("/api/v1/messages/{id}/bounce"))
            .map(|a| report(a, |_| format!("{id} bounced"))),
    };
    result.unwrap_or_else(|e| fail(&e))
}

/// Percent-encodes a pool name for a URL path ("-" stays as is).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn print_json_or_error(a: Answer) -> i32 {
    if a.status == 200 {
        println!(
            "{}",
            serde_json::to_string_pretty(&a.body).unwrap_or_default()
        );
        0
    } else {
        report(a, |_| String::new())
    }
}

fn print_summary(body: &Value) {
    println!(
        "{:<8} {:>8} {:>9} {:>6} {:>9} {:>12} {:>9} {:>5}  DESCRIPTION",
        "POOL", "READY", "DEFERRED", "HELD", "INFLIGHT", "OLDEST", "SENT/MIN", "PRIO"
    );
    for p in body.as_array().into_iter().flatten() {
        let held = p["held"].as_bool().unwrap_or(false);
        println!(
            "{:<8} {:>8} {:>9} {:>6} {:>9} {:>12} {:>9} {:>5}  {}",
            p["pool"].as_str().unwrap_or("?"),
            num(&p["ready"]),
            num(&p["deferred"]),
            if held { "yes" } else { "no" },
            num(&p["in_flight"]),
            age(p["oldest_age_seconds"].as_f64().unwrap_or(0.0)),
            num(&p["delivered_last_minute"]),
            signed(&p["priority"]),
            p["description"].as_str().unwrap_or("")
        );
    }
}

/// A JSON number as text, so table widths apply (Value's Display ignores them).
fn num(v: &Value) -> String {
    v.as_u64().map_or_else(|| v.to_string(), |n| n.to_string())
}

/// A priority as text; "0" for a relay too old to report one.
fn signed(v: &Value) -> String {
    v.as_i64().unwrap_or(0).to_string()
}

fn age(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0 => "-".to_string(),
        1..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

fn list(api: &Api, pool: Option<String>, json: bool, limit: usize) -> Result<i32, String> {
    let pools: Vec<String> = match pool {
        Some(p) => vec![p],
        None => {
            let a = api.call("GET", "/api/v1/pools")?;
            if a.status != 200 {
                return Ok(report(a, |_| String::new()));
            }
            a.body
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["pool"].as_str().map(str::to_string))
                .collect()
        }
    };
    let mut all = Vec::new();
    for p in &pools {
        let a = api.call(
            "GET",
            &format!("/api/v1/pools/{}/messages?limit={limit}", encode(p)),
        )?;
        if a.status != 200 {
            return Ok(report(a, |_| String::new()));
        }
        all.extend(a.body.as_array().cloned().unwrap_or_default());
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Array(all)).unwrap_or_default()
        );
        return Ok(0);
    }
    println!(
        "{:<17} {:<6} {:>4} {:>4} {:>8} {:>9} {:>5} {:>8}  SENDER / LAST REPLY",
        "QUEUE ID", "POOL", "PRIO", "MTP", "SIZE", "AGE", "TRIES", "PENDING"
    );
    for m in &all {
        let sender = m["sender"].as_str().unwrap_or("");
        println!(
            "{:<17} {:<6} {:>4} {:>4} {:>8} {:>9} {:>5} {:>4}/{:<3}  <{}>",
            m["id"].as_str().unwrap_or("?"),
            m["pool"].as_str().unwrap_or("?"),
            signed(&m["priority"]),
            // The message's own MT-PRIORITY; "-" when it has none.
            m["mt_priority"]
                .as_i64()
                .map_or_else(|| "-".to_string(), |v| v.to_string()),
            num(&m["size"]),
            age(m["age_seconds"].as_f64().unwrap_or(0.0)),
            num(&m["attempts"]),
            num(&m["pending"]),
            num(&m["recipients"]),
            sender
        );
        if let Some(reply) = m["last_reply"].as_str() {
            println!("{:<17} ({reply})", "");
        }
        if let Some(corrupt) = m["corrupt"].as_str() {
            println!("{:<17} CORRUPT: {corrupt}", "");
        }
        if let Some(waiting) = m["waiting"].as_str() {
            println!("{:<17} waiting: {waiting}", "");
        }
    }
    println!("-- {} messages", all.len());
    Ok(0)
}
