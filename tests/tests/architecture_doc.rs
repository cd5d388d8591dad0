//! `docs/ARCHITECTURE.md` names only paths that exist: a moved or deleted file fails this test
//! until the map is updated.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_owned()
}

/// Every file and directory of the repository, relative to its root (build output and VCS data
/// left out).
fn repository_paths(root: &Path) -> Vec<String> {
    let mut paths = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let name = path.file_name().unwrap().to_string_lossy();
            if name == "target" || name == ".git" {
                continue;
            }
            paths.push(path.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            if path.is_dir() {
                pending.push(path);
            }
        }
    }
    paths
}

/// The `code spans` of a Markdown text that look like repository paths: with a `/` or a source
/// file extension, and none of the marks of a URL, a data-dir path (`DATA/...`), an API route or
/// a placeholder.
fn path_spans(markdown: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        for (i, piece) in line.split('`').enumerate() {
            if i % 2 == 0 {
                continue;
            }
            let span = piece.trim();
            let looks_like_path =
                span.contains('/') || [".rs", ".toml", ".md", ".sql", ".css"].iter().any(|ext| span.ends_with(ext));
            let excluded = span.is_empty()
                || span.contains([' ', '?', '<', '{', '*', ':', '='])
                || span.starts_with(['/', '.'])
                || span.starts_with("DATA/")
                || span.starts_with("rack/");
            if looks_like_path && !excluded {
                spans.push(span.trim_end_matches('/').to_owned());
            }
        }
    }
    spans
}

#[test]
fn every_path_the_architecture_doc_names_exists() {
    let root = workspace();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md")).expect("read the doc");
    let paths = repository_paths(&root);
    let spans = path_spans(&doc);
    assert!(spans.len() > 50, "the doc's paths were found: {spans:?}");
    let missing: Vec<_> = spans
        .iter()
        .filter(|span| {
            // A full path from the root must exist as written; a shorter one (`tftp/wire.rs` in
            // a list about `appliance/src/pxe/`) must be the end of some path.
            !paths.iter().any(|p| p == *span || p.ends_with(&format!("/{span}")))
        })
        .collect();
    assert!(missing.is_empty(), "docs/ARCHITECTURE.md names paths that do not exist: {missing:#?}");
}

#[test]
fn path_spans_skip_what_is_not_a_repository_path() {
    let text = "see `region/src/lib.rs`, `DATA/chunks`, `GET rack/catalogue?after=REV`, `/MAAS/`, \
                `Catalogue::open`, `../shared/DESIGN.md`\n```\nnot/in/a/span.rs\n```\n`x.toml`";
    assert_eq!(path_spans(text), vec!["region/src/lib.rs".to_owned(), "x.toml".to_owned()]);
}
