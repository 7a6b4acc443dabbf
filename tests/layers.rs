//! The code's shape: the top-level modules of `src/` import one another without a cycle, nor do
//! the files of one folder (of either crate), and no source file grows past 800 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The top-level modules that `text` names as `crate::module`, including those in
/// `crate::{a, b::c}` groups.
fn crate_references(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                found.insert(ident(item.trim()));
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.retain(|m| !m.is_empty());
    found
}

/// The import graph of `src/`'s top-level modules: module -> the modules it names.
fn import_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in rust_files(src) {
        let relative = file.strip_prefix(src).unwrap();
        let module = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        // `clickagg_dataflows::…` is another crate, and the words "crate::" in a string are not
        // an import; neither can make a cycle between these modules.
        let references = crate_references(&text.replace("clickagg_dataflows::", ""));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(references.into_iter().filter(|m| *m != module));
    }
    graph
}

/// A cycle in `graph`, if there is one, as the modules along it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_modules_of_src_import_without_a_cycle() {
    let graph = import_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() > 10, "the modules were found: {graph:?}");
    assert!(graph["run"].contains("sink") && graph["sink"].contains("storage"), "references were read: {graph:?}");
    assert_eq!(find_cycle(&graph), None, "{graph:#?}");
}

/// The modules `text` names among `siblings`: as `super::name` or as `crate::{path}::name`.
fn sibling_references(text: &str, path: &str, siblings: &BTreeSet<String>) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut found = BTreeSet::new();
    for prefix in ["super::".to_string(), format!("crate::{path}::")] {
        for (at, _) in text.match_indices(&prefix) {
            let rest = &text[at + prefix.len()..];
            let names: Vec<String> = match rest.strip_prefix('{') {
                Some(group) => group[..group.find('}').unwrap_or(group.len())].split(',').map(|i| ident(i.trim())).collect(),
                None => vec![ident(rest)],
            };
            found.extend(names.into_iter().filter(|n| siblings.contains(n)));
        }
    }
    found
}

/// For each folder under `src` (a crate's source root), the import graph of its files: file ->
/// the sibling files it names. A folder's `mod.rs` declares its children and is left out.
fn folder_graphs(src: &Path) -> BTreeMap<PathBuf, BTreeMap<String, BTreeSet<String>>> {
    let mut folders: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for file in rust_files(src) {
        folders.entry(file.parent().unwrap().to_path_buf()).or_default().push(file);
    }
    let mut graphs = BTreeMap::new();
    for (folder, files) in folders {
        let stem = |f: &Path| f.file_stem().unwrap().to_string_lossy().to_string();
        let siblings: BTreeSet<String> = files.iter().map(|f| stem(f)).filter(|s| !["mod", "lib", "main"].contains(&s.as_str())).collect();
        let path = folder.strip_prefix(src).unwrap().iter().map(|c| c.to_string_lossy().to_string()).collect::<Vec<_>>().join("::");
        let mut graph = BTreeMap::new();
        for file in files.iter().filter(|f| siblings.contains(&stem(f))) {
            // Code only: a doc link to a sibling is not an import.
            let text: String = std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(|l| format!("{l}\n"))
                .collect();
            let mut references = sibling_references(&text, &path, &siblings);
            references.remove(&stem(file));
            graph.insert(stem(file), references);
        }
        graphs.insert(folder, graph);
    }
    graphs
}

#[test]
fn the_files_of_each_folder_import_without_a_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut edges = 0;
    for src in ["src", "dataflows/src"] {
        for (folder, graph) in folder_graphs(&root.join(src)) {
            edges += graph.values().map(BTreeSet::len).sum::<usize>();
            assert_eq!(find_cycle(&graph), None, "in {}: {graph:#?}", folder.display());
        }
    }
    assert!(edges > 20, "references between files were read ({edges})");
    let siblings = ["state", "peek"].map(String::from).into();
    assert_eq!(sibling_references("use super::{peek::Peeks, x};\nuse crate::serve::state::S;", "serve", &siblings), siblings);
}

#[test]
fn the_cycle_finder_finds_one() {
    let graph: BTreeMap<String, BTreeSet<String>> = [("a", "b"), ("b", "c"), ("c", "a"), ("d", "a")]
        .into_iter()
        .map(|(from, to)| (from.to_string(), BTreeSet::from([to.to_string()])))
        .collect();
    assert_eq!(find_cycle(&graph), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    assert_eq!(crate_references("use crate::{model::Summary, output};\nlet x = crate::run::run;"), ["model", "output", "run"].map(String::from).into());
}

#[test]
fn no_source_file_is_over_800_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut long = Vec::new();
    for dir in ["src", "dataflows/src", "tests"] {
        for file in rust_files(&root.join(dir)) {
            let lines = std::fs::read_to_string(&file).unwrap().lines().count();
            let relative = file.strip_prefix(root).unwrap();
            if lines > 800 {
                long.push(format!("{} ({lines} lines)", relative.display()));
            }
        }
    }
    assert!(long.is_empty(), "files over 800 lines: {long:?}");
}
