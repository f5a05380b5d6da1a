//! Golden files of the LISTSERV import: each directory under
//! `tests/listserv/` holds a `site.cfg`, its `*.list` headers and the
//! `expected.toml` that `poolrelay import-listserv` prints for them (no
//! options). Run with `UPDATE_GOLDEN=1` to rewrite the expected files after
//! an intended change, then review the diff.

use std::path::{Path, PathBuf};

use poolrelay_config::{Config, ImportOptions, import_listserv};

/// The reference configurations of README.md ("The three reference
/// configurations"), plus the unix-quoted window and rate-limit example.
const CASES: &[&str] = &["ref1", "ref2", "ref3", "unix"];

#[test]
fn generated_toml_matches_the_golden_files() {
    // Relative paths keep warnings and errors the same on every machine.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).expect("cd to the crate");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for case in CASES {
        let dir = Path::new("tests/listserv").join(case);
        let mut lists: Vec<PathBuf> = std::fs::read_dir(&dir)
            .expect("read the case directory")
            .map(|e| e.expect("directory entry").path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("list"))
            })
            .collect();
        lists.sort();
        let import = import_listserv(&dir.join("site.cfg"), &lists, &ImportOptions::default())
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        // The golden text is a valid config on its own.
        Config::parse(&import.toml, &dir.join("expected.toml"))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let golden = dir.join("expected.toml");
        if update {
            std::fs::write(&golden, &import.toml).expect("write the golden file");
            continue;
        }
        let expected = std::fs::read_to_string(&golden).unwrap_or_default();
        if expected != import.toml {
            eprintln!(
                "--- {} (expected)\n{expected}\n--- generated\n{}",
                golden.display(),
                import.toml
            );
            stale.push(golden.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "generated TOML differs from {stale:?}; if the change is intended, rerun with UPDATE_GOLDEN=1 and review the diff"
    );
}

/// The `--check` output README.md shows for reference configuration 2 is
/// what the import prints for the command written above it (an abridged
/// line ends with `...`; the lines keep their order).
#[test]
fn readme_reference_2_check_output_is_what_check_prints() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("../../README.md")).expect("read README.md");
    let command = "$ poolrelay import-listserv site.cfg ORGLIST.list COMLIST.list --check";
    let block: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with(command))
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .collect();
    assert!(block.len() > 5, "README.md no longer shows `{command}`");
    let dir = root.join("tests/listserv/ref2");
    let lists = [dir.join("ORGLIST.list"), dir.join("COMLIST.list")];
    let import = import_listserv(&dir.join("site.cfg"), &lists, &ImportOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let printed = import.config.describe();
    let mut printed_lines = printed.lines();
    for line in block {
        let shown = line.trim_end().trim_end_matches("...").trim_end();
        assert!(
            printed_lines.any(|p| p.starts_with(shown)),
            "README.md shows `{shown}`, which `--check` does not print at that place:\n{printed}"
        );
    }
}
