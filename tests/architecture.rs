//! The code's shape, checked like behaviour: no module cycles in either crate, and no source
//! file doing so much that it outgrows a read. These are the rules README's Development
//! section states; a change that breaks one fails here with the module or file to split.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Lines a source file may have. The pgoutput decoder is one protocol, one file, and exempt;
/// so are test files.
const MAX_LINES: usize = 600;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The crate's top-level modules, each with the top-level modules its code (not its tests or
/// comments) names through `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap();
        let deps = graph.entry(top.clone()).or_default();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (at, _) in line.match_indices("crate::") {
                let name: String = line[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_through(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = path.last().unwrap().clone();
    for next in graph.get(&last).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_owned());
            return Some(cycle);
        }
        if !path.contains(next) {
            path.push(next.clone());
            if let Some(cycle) = cycle_through(graph, start, path) {
                return Some(cycle);
            }
            path.pop();
        }
    }
    None
}

fn assert_no_cycles(src: &str) {
    let graph = module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join(src));
    assert!(graph.len() > 3, "no modules found under {src}");
    for start in graph.keys() {
        if let Some(cycle) = cycle_through(&graph, start, &mut vec![start.clone()]) {
            panic!(
                "modules of {src} depend on each other in a cycle: {}",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_relays_modules_form_no_cycle() {
    assert_no_cycles("src");
}

#[test]
fn the_sinks_crates_modules_form_no_cycle() {
    assert_no_cycles("sinks/src");
}

#[test]
fn no_source_file_outgrows_a_read() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("sinks/src"), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|f| !f.ends_with("source/pgoutput.rs") && !f.ends_with("tests.rs"))
        .filter_map(|f| {
            let lines = fs::read_to_string(f).unwrap().lines().count();
            (lines > MAX_LINES).then(|| {
                format!(
                    "{} ({lines} lines)",
                    f.strip_prefix(root).unwrap().display()
                )
            })
        })
        .collect();
    assert!(
        long.is_empty(),
        "split these by job (README, Development): {long:?}"
    );
}
