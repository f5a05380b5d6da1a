//! Reading list header files: `Delivery-Pool=` and `List-Address=`.

use super::site::parse_pool_pair;
use super::{Source, check_list_name};
use crate::ConfigError;
use crate::units::is_host_name;

/// A list and what its header says.
#[derive(Debug)]
pub(super) struct List {
    pub(super) name: String,
    pub(super) file: String,
    /// `Delivery-Pool= x,y`: (postings, admin, line).
    pub(super) delivery: Option<(String, String, usize)>,
    /// `List-Address=`: (local part if given, host, line).
    pub(super) address: Option<(Option<String>, String, usize)>,
}

/// `Keyword=` at the start of a token: the keyword and the rest of the token.
fn keyword_token(token: &str) -> Option<(&str, &str)> {
    let (kw, rest) = token.split_once('=')?;
    let mut chars = kw.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then_some((kw, rest))
}

/// The `Keyword= value` pairs of one list header line (after the `*`): a
/// value runs until the next `Keyword=` token, as LISTSERV writes several
/// keywords on one line.
fn keyword_pairs(body: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for token in body.split_whitespace() {
        if let Some((kw, rest)) = keyword_token(token) {
            pairs.push((kw.to_string(), rest.to_string()));
        } else if let Some((_, value)) = pairs.last_mut() {
            if !value.is_empty() {
                value.push(' ');
            }
            value.push_str(token);
        }
        // Text before the first keyword is the list title or a comment.
    }
    pairs
}

/// `List-Address= name@host` or `List-Address= host`.
fn parse_list_address(value: &str) -> Result<(Option<String>, String), String> {
    const FORM: &str =
        "write List-Address= LISTNAME@LISTS.EXAMPLE.ORG or List-Address= LISTS.EXAMPLE.ORG";
    let v = value.trim();
    let (local, host) = match v.split_once('@') {
        Some((local, host)) => {
            check_list_name(local).map_err(|e| format!("{e}; {FORM}"))?;
            (Some(local.to_ascii_lowercase()), host)
        }
        None => (None, v),
    };
    let host = host.to_ascii_lowercase();
    let host = host.strip_suffix('.').unwrap_or(&host);
    if !is_host_name(host) {
        return Err(format!("\"{value}\" is not a list address; {FORM}"));
    }
    Ok((local, host.to_string()))
}

/// Parses one list header file.
pub(super) fn parse_list(
    name: &str,
    src: &Source,
    warnings: &mut Vec<String>,
) -> Result<List, ConfigError> {
    check_list_name(name).map_err(|m| src.err(0, m))?;
    let mut list = List {
        name: name.to_string(),
        file: src.short(),
        delivery: None,
        address: None,
    };
    let mut skipped: Vec<String> = Vec::new();
    for (i, raw) in src.text.lines().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        let Some(body) = line.strip_prefix('*') else {
            // Subscriber records and `PUT` lines are expected here; only a
            // keyword without its `*` is probably a mistake worth reporting.
            if line
                .split_whitespace()
                .next()
                .and_then(keyword_token)
                .is_some()
            {
                warnings.push(src.warn(
                    no,
                    &format!("ignored: \"{line}\" is not a list header line (header lines start with '*', e.g. * Delivery-Pool= B,A)"),
                ));
            }
            continue;
        };
        for (kw, value) in keyword_pairs(body) {
            match kw.to_ascii_lowercase().as_str() {
                "delivery-pool" => {
                    let (x, y) = parse_pool_pair(
                        &value,
                        "write Delivery-Pool= x or Delivery-Pool= x,y (postings to x, administrative mail to y), e.g. Delivery-Pool= B,A",
                    )
                    .map_err(|m| src.err(no, format!("Delivery-Pool: {m}")))?;
                    if let Some((_, _, earlier)) = list.delivery.replace((x, y, no)) {
                        warnings.push(src.warn(
                            earlier,
                            &format!(
                                "Delivery-Pool is given again on line {no}; the later one is used"
                            ),
                        ));
                    }
                }
                "list-address" => {
                    let (local, host) = parse_list_address(&value)
                        .map_err(|m| src.err(no, format!("List-Address: {m}")))?;
                    if let Some((_, _, earlier)) = list.address.replace((local, host, no)) {
                        warnings.push(src.warn(
                            earlier,
                            &format!(
                                "List-Address is given again on line {no}; the later one is used"
                            ),
                        ));
                    }
                }
                _ => {
                    if !skipped.iter().any(|s| s.eq_ignore_ascii_case(&kw)) {
                        skipped.push(kw);
                    }
                }
            }
        }
    }
    if !skipped.is_empty() {
        warnings.push(format!(
            "{}: list {name}: keywords with no relay meaning were skipped: {}",
            src.path.display(),
            skipped.join(", ")
        ));
    }
    Ok(list)
}
