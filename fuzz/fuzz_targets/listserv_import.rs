//! The LISTSERV importer (`import_listserv`, what `poolrelay
//! import-listserv` runs) on an arbitrary site.cfg and list headers.
//!
//! Input: the site.cfg text, then any number of list header files, each
//! after a line `==> NAME <==` (as `head` prints several files); NAME is
//! given as `--list NAME=FILE` after the same check the command line makes.
//!
//! Promises checked: an error names one of the input files and a line of
//! it (1-based) or 0 for the whole file; an import that succeeds hands out
//! TOML that `Config::parse` reads back to the same config, and every
//! warning starts with the input file it is about.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolrelay_config::{Config, ImportOptions, import_listserv, parse_list_arg};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("poolrelay-fuzz-listserv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    })
}

/// Splits the input at `==> NAME <==` lines: the site.cfg, then (name, text) per list.
fn split(input: &[u8]) -> (&[u8], Vec<(String, &[u8])>) {
    let mut starts = Vec::new();
    let mut pos = 0;
    for line in input.split_inclusive(|&b| b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if let Some(name) = text
            .strip_prefix(b"==> ")
            .and_then(|t| t.strip_suffix(b" <=="))
        {
            starts.push((
                pos,
                pos + line.len(),
                String::from_utf8_lossy(name).into_owned(),
            ));
        }
        pos += line.len();
    }
    let site_end = starts.first().map_or(input.len(), |s| s.0);
    let mut lists = Vec::new();
    for (i, (_, body, name)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(input.len(), |s| s.0);
        lists.push((name.clone(), &input[*body..end]));
    }
    (&input[..site_end], lists)
}

fn lines(bytes: &[u8]) -> usize {
    String::from_utf8_lossy(bytes).lines().count() + 1
}

fuzz_target!(|input: &[u8]| {
    let (site, lists) = split(input);
    if lists.len() > 4 {
        return;
    }
    let dir = dir();
    let site_path = dir.join("site.cfg");
    std::fs::write(&site_path, site).expect("write site.cfg");
    let mut opts = ImportOptions::default();
    let mut files: Vec<(PathBuf, usize)> = vec![(site_path.clone(), lines(site))];
    for (i, (name, text)) in lists.iter().enumerate() {
        let path = dir.join(format!("list{i}.txt"));
        std::fs::write(&path, text).expect("write list");
        // The command line refuses a name it cannot use; so does the import.
        // (A name with `=` would make `--list NAME=FILE` name another file.)
        if name.contains('=') {
            return;
        }
        let Ok(arg) = parse_list_arg(&format!("{name}={}", path.display())) else {
            return;
        };
        opts.lists.push(arg);
        files.push((path, lines(text)));
    }
    match import_listserv(&site_path, &[], &opts) {
        Err(e) => {
            let Some((_, n)) = files.iter().find(|(p, _)| *p == e.file) else {
                panic!("error names no input file: {e}");
            };
            assert!(e.line <= *n, "error on line {} of {n}: {e}", e.line);
            assert!(!e.message.trim().is_empty());
        }
        Ok(import) => {
            let mut again =
                Config::parse(&import.toml, Path::new("imported.toml")).unwrap_or_else(|e| {
                    panic!("the imported TOML does not parse: {e}\n{}", import.toml)
                });
            // The file name it was read from is the only difference allowed.
            again.source = import.config.source.clone();
            assert!(
                again == import.config,
                "the TOML reads back to another config"
            );
            for w in &import.warnings {
                assert!(
                    files
                        .iter()
                        .any(|(p, _)| w.starts_with(&format!("{}:", p.display()))),
                    "warning about no input file: {w}"
                );
            }
        }
    }
});
