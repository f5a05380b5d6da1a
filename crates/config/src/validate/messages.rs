//! Turning the TOML parser's messages into ones an operator can act on,
//! and "did you mean" suggestions.

use std::path::Path;

use super::line_of;
use crate::ConfigError;

/// A TOML syntax or shape error, reworded to say what to write instead.
pub(super) fn toml_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map_or(0, |s| line_of(text, s.start));
    let source_line = text.lines().nth(line.saturating_sub(1)).unwrap_or("");
    ConfigError {
        file: path.to_path_buf(),
        line,
        message: match e.message().trim() {
            // The TOML parser gives no reason for some bytes (a lone CR
            // at the start of a line): still say what to write.
            "" => "not valid TOML here (a control character such as a lone carriage return?); \
                   write key = value, a [table] header or a # comment"
                .to_string(),
            msg => reword(msg, source_line),
        },
    }
}

/// The names between backticks in a serde message, in order.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

/// Rewords serde's messages about unknown, missing and mistyped keys.
fn reword(msg: &str, source_line: &str) -> String {
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        let names = backticked(rest);
        let Some((key, valid)) = names.split_first() else {
            return msg.to_string();
        };
        if valid.is_empty() {
            return format!("unknown key `{key}`: this table takes no keys; remove it");
        }
        let hint = closest(key, valid.iter().copied())
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        return format!(
            "unknown key `{key}`{hint}; remove it or use one of: {}",
            valid.join(", ")
        );
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        let key = backticked(rest).first().copied().unwrap_or("");
        let example = match key {
            "address" => "address = \"127.0.0.1:2525\"",
            "host" => "host = \"smarthost.example.org:25\"",
            "pool" => "pool = \"A\" (the pool the route sends to)",
            "name" => "name = \"List-Id\" (header = { name = \"...\", value = \"glob\" })",
            "value" => "value = \"*glob*\" (header = { name = \"...\", value = \"glob\" })",
            _ => "it",
        };
        return format!("missing key `{key}`; add {example}");
    }
    if msg.contains("expected a borrowed string") {
        // A table made by dotted keys where a plain value was expected.
        return format!(
            "`{}` makes a table of a key that takes a plain value; write key = value \
             (dotted keys such as pool.A.description only work at the top of the file, before any [table])",
            source_line.split('=').next().unwrap_or("").trim()
        );
    }
    if msg.starts_with("invalid type:") || msg.starts_with("invalid value:") {
        let msg = plain_expectation(msg);
        let msg = msg.as_str();
        let header = source_line.trim();
        if msg.contains("expected a sequence")
            && header.starts_with('[')
            && !header.starts_with("[[")
        {
            let name = header
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            return format!(
                "{msg}; [{name}] may appear several times: write [[{name}]] (double brackets) for each entry"
            );
        }
        let hint = if msg.contains("expected a string") {
            "; put the value in double quotes"
        } else if msg.contains("expected a sequence") {
            return match msg
                .strip_prefix("invalid type: string ")
                .and_then(|r| r.split_once(", expected"))
            {
                Some((quoted, _)) => format!("{msg}; write a list, e.g. [{quoted}]"),
                None => format!("{msg}; write a list, e.g. [\"a\", \"b\"]"),
            };
        } else if msg.contains("expected a whole number") || msg.contains("expected a number") {
            "; write a plain number without quotes"
        } else if msg.contains("expected a table") {
            "; write a [section] with keys below it, or an inline table { key = \"value\" }"
        } else {
            ""
        };
        return format!("{msg}{hint}");
    }
    // TOML syntax errors come on several lines.
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Replaces serde's Rust type names after "expected" with words.
fn plain_expectation(msg: &str) -> String {
    let Some((head, expected)) = msg.split_once(", expected ") else {
        return msg.to_string();
    };
    let words = match expected {
        "i64" | "u64" | "usize" => "a whole number",
        "f64" => "a number",
        "a spanned value" => "a table",
        e if e.starts_with("struct ") || e.starts_with("a map") => "a table",
        e => e,
    };
    format!("{head}, expected {words}")
}

/// The candidate closest to `word` by edit distance, if close enough to be a typo.
pub(crate) fn closest<'a>(
    word: &str,
    candidates: impl Iterator<Item = &'a str>,
) -> Option<&'a str> {
    let w = word.to_ascii_lowercase();
    candidates
        .map(|c| (edit_distance(&w, &c.to_ascii_lowercase()), c))
        .filter(|&(d, c)| d <= 2.max(c.len() / 4) && d < c.len())
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
