//! `poolrelay import-listserv`: turns a LISTSERV `site.cfg` and list headers
//! into a commented poolrelay config with the same SMTP worker pools
//! (README.md, "Coming from LISTSERV").
//!
//! The result is TOML text rather than a [`Config`] because an operator
//! reviews and edits it before use: every setting carries a comment naming
//! the LISTSERV line it came from, and lines with no poolrelay equivalent are
//! kept as comments. The text is validated with [`Config::parse`] before it
//! is returned, so an import never hands out a config `poolrelay check` rejects.
//!
//! LISTSERV decides the pool itself; poolrelay has to recognise it from the
//! mail. The generated routes use only general matchers (envelope sender glob,
//! header glob), so the file shows exactly what happens:
//! null sender and `LISTSERV@` go to `-`; `owner-LIST@` with a `Sender:`
//! header naming `LIST@` is a posting (pool x of `Delivery-Pool= x,y`); other
//! mail from `owner-LIST@` is administrative mail (pool y); any other
//! `owner-*@` sender falls through to `defaults.list_pool` (`DEFAULT_LIST_POOL`).
//!
//! The work is split by input and output: [`site`] reads `site.cfg`, [`list`]
//! the list headers, [`routes`] derives the `[[route]]`s and [`render`]
//! writes the TOML, one function per section.

mod list;
mod render;
mod routes;
mod site;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::{Config, ConfigError};
use list::{List, parse_list};
use render::{c, render};
use site::parse_site;

/// Options of `poolrelay import-listserv` beyond the input files. The
/// defaults give the config an operator starts from; the address and host
/// options let a test suite point the result at loopback sinks without
/// editing the generated text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// `--port N`: every upstream, failover and fallback host gets port N.
    pub port: Option<u16>,
    /// `--list NAME=FILE`: list header files not named `LISTNAME.list`.
    pub lists: Vec<(String, PathBuf)>,
    /// Entries for `server.hosts` (host name -> "ip" or "ip:port"), used
    /// instead of DNS for the upstream names.
    pub hosts: Vec<(String, String)>,
    /// Address of the generated `[[listener]]`; default `127.0.0.1:2525`.
    pub listen: Option<SocketAddr>,
    /// Address of `[admin]`; default `127.0.0.1:9025`.
    pub admin: Option<SocketAddr>,
    /// `server.spool_dir`; default `var/spool`.
    pub spool_dir: Option<PathBuf>,
}

/// The outcome of [`import_listserv`].
#[derive(Debug, Clone)]
pub struct Import {
    /// The commented poolrelay TOML (what the binary prints on stdout).
    pub toml: String,
    /// One line per thing not imported or worth checking, each starting
    /// with `FILE:LINE:` or `FILE:` (what the binary prints on stderr).
    pub warnings: Vec<String>,
    /// `toml` parsed and validated, for `--check` (e.g. [`Config::describe`]).
    pub config: Config,
}

/// Reads a LISTSERV `site.cfg` (or unix `go.user`) and list header files and
/// returns the equivalent poolrelay config.
///
/// `list_headers` are named `LISTNAME.list` (any case); `opts.lists` adds
/// files under an explicit list name. Errors name the file and line of the
/// malformed LISTSERV setting.
pub fn import_listserv(
    site_cfg: &Path,
    list_headers: &[PathBuf],
    opts: &ImportOptions,
) -> Result<Import, ConfigError> {
    let site = Source::read(site_cfg)?;
    let mut lists = Vec::new();
    for path in list_headers {
        let name = list_name_from_path(path).ok_or_else(|| ConfigError {
            file: path.clone(),
            line: 0,
            message: "cannot tell the list name from the file name; name the file LISTNAME.list \
                      or pass it as --list LISTNAME=FILE"
                .to_string(),
        })?;
        lists.push((name, Source::read(path)?));
    }
    for (name, path) in &opts.lists {
        lists.push((name.clone(), Source::read(path)?));
    }
    import_sources(&site, &lists, opts)
}

/// Parses a `--list NAME=FILE` argument into the list name and the file.
pub fn parse_list_arg(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((name, file)) if !file.trim().is_empty() => {
            let name = name.trim();
            check_list_name(name)?;
            Ok((name.to_string(), PathBuf::from(file.trim())))
        }
        _ => Err(format!(
            "--list \"{arg}\" is not NAME=FILE; write e.g. --list EMERGENCY=headers/emergency.txt"
        )),
    }
}

/// The list name of `LISTNAME.list` (extension in any case), if the file is named so.
fn list_name_from_path(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let cut = name.len().checked_sub(".list".len())?;
    let (stem, ext) = (name.get(..cut)?, name.get(cut..)?);
    (ext.eq_ignore_ascii_case(".list") && check_list_name(stem).is_ok()).then(|| stem.to_string())
}

/// A list name must be usable inside a sender glob and a TOML string.
fn check_list_name(name: &str) -> Result<(), String> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || "*?@\"\\".contains(c);
    if name.is_empty() || name.chars().any(bad) {
        return Err(format!(
            "\"{name}\" is not a list name; write the LISTSERV list name, e.g. EMERGENCY"
        ));
    }
    Ok(())
}

/// One input file: its path (for errors and warnings) and its text.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    /// Reads a file; bytes that are not UTF-8 are replaced, because list
    /// files copied from a LISTSERV server may hold Latin-1 subscriber names.
    fn read(path: &Path) -> Result<Source, ConfigError> {
        let bytes = std::fs::read(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message: format!("cannot read the file: {e}"),
        })?;
        Ok(Source {
            path: path.to_path_buf(),
            text: String::from_utf8_lossy(&bytes).into_owned(),
        })
    }

    /// The file name alone: comments in the generated config stay the same
    /// wherever the input files were.
    fn short(&self) -> String {
        let name = self.path.file_name().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        c(&name)
    }

    fn err(&self, line: usize, message: String) -> ConfigError {
        ConfigError {
            file: self.path.clone(),
            line,
            message,
        }
    }

    fn warn(&self, line: usize, message: &str) -> String {
        format!("{}:{line}: {message}", self.path.display())
    }
}

/// Where a setting came from, for the comment above it.
#[derive(Debug, Clone)]
struct Origin {
    line: usize,
    text: String,
}

/// Parses everything and renders the TOML; the testable core of [`import_listserv`].
fn import_sources(
    site_src: &Source,
    lists: &[(String, Source)],
    opts: &ImportOptions,
) -> Result<Import, ConfigError> {
    if opts.port == Some(0) {
        return Err(site_src.err(0, "--port 0 is not a port; use 1-65535".to_string()));
    }
    let mut warnings = Vec::new();
    let site = parse_site(site_src, opts.port, &mut warnings)?;
    let mut parsed: Vec<List> = Vec::new();
    for (name, src) in lists {
        let list = parse_list(name, src, &mut warnings)?;
        if let Some(other) = parsed
            .iter()
            .find(|l| l.name.eq_ignore_ascii_case(&list.name))
        {
            return Err(src.err(
                0,
                format!(
                    "list {} is given twice (also {}); give each list once",
                    list.name, other.file
                ),
            ));
        }
        parsed.push(list);
    }
    let toml = render(site_src, &site, &parsed, opts, &mut warnings);
    let source = PathBuf::from(format!("{} (imported)", site_src.path.display()));
    let config = Config::parse(&toml, &source).map_err(|e| {
        site_src.err(
            0,
            format!(
                "the imported config is not valid on its line {}: {} (check the import options)",
                e.line, e.message
            ),
        )
    })?;
    Ok(Import {
        toml,
        warnings,
        config,
    })
}

#[cfg(test)]
mod tests;
