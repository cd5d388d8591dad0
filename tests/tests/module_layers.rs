//! The import rules of `docs/ARCHITECTURE.md`, checked on the source: each daemon's top-level
//! modules form layers that import only downward (so there is no import circle).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level module → the top-level modules it names with `crate::`.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The graph of a crate's `src/`: a file's module is the first path component under `src/`
/// (`racks/store.rs` belongs to `racks`); `lib.rs` and `main.rs` only declare modules.
fn module_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        let first = relative.components().next().expect("a component").as_os_str().to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        let imports = graph.entry(module.clone()).or_default();
        for line in text.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            for (at, _) in line.match_indices("crate::") {
                // `metalrack_api::...` or `some_crate::` must not count: only a bare `crate::`.
                if line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let rest = &line[at + "crate::".len()..];
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                let is_module = src.join(format!("{name}.rs")).exists() || src.join(&name).is_dir();
                if !name.is_empty() && name != module && is_module {
                    imports.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle in `graph`, if it has one, as the modules along it.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(node: &str, graph: &Graph, done: &mut BTreeSet<String>, path: &mut Vec<String>) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn finds_a_cycle_when_there_is_one() {
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    graph.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&graph), None);
}

/// The region's layers, bottom first, as `region/src/lib.rs` and `docs/ARCHITECTURE.md` state
/// them. A module may import modules of lower layers only (within a layer, none of each other).
const REGION_LAYERS: &[&[&str]] = &[
    &["config", "metrics", "tls", "util"],
    &["db"],
    &["state"],
    &["secret", "users"],
    &["cluster", "machines", "racks"],
    &["catalogue"],
    &["http"],
    &["cli"],
];

/// The appliance's layers, bottom first, as `docs/ARCHITECTURE.md` states them.
const APPLIANCE_LAYERS: &[&[&str]] = &[
    &["config", "data_dir", "health", "power", "region_client"],
    &["status"],
    &["registration"],
    &["region_link", "snapshot"],
    &["pxe", "sync"],
    &["control", "heartbeat", "power_requests"],
    &["serve"],
    &["cli"],
];

/// Every import of a module in `graph` goes to a lower layer; no module is outside the layers.
fn check_layers(name: &str, graph: &Graph, layers: &[&[&str]]) {
    let layer_of = |module: &str| {
        layers.iter().position(|layer| layer.contains(&module)).unwrap_or_else(|| {
            panic!("{name} module {module:?} is in no layer: add it to the layers here and in docs/ARCHITECTURE.md")
        })
    };
    let mut violations = Vec::new();
    for (module, imports) in graph {
        for import in imports {
            if layer_of(import) >= layer_of(module) {
                violations.push(format!("{module} imports {import}"));
            }
        }
    }
    assert!(violations.is_empty(), "{name}: imports against the layers: {violations:#?}");
    // Implied by the layers; kept as the plainer statement.
    assert_eq!(find_cycle(graph), None);
}

#[test]
fn region_modules_import_only_lower_layers() {
    let graph = module_graph(&workspace().join("region/src"));
    assert!(graph.len() > 8, "the region's modules were found: {graph:?}");
    check_layers("region", &graph, REGION_LAYERS);
}

#[test]
fn appliance_modules_import_only_lower_layers() {
    let graph = module_graph(&workspace().join("appliance/src"));
    assert!(graph.len() > 8, "the appliance's modules were found: {graph:?}");
    check_layers("appliance", &graph, APPLIANCE_LAYERS);
}
