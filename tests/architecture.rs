//! The module graph of src/ (docs/ARCHITECTURE.md): no import cycle
//! between files, and the layer rules that keep it so. A file "imports"
//! another when it names a path into it (`crate::a::b`, `super::c`, in a
//! `use` or inline), outside `#[cfg(test)] mod tests`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::support::repo_path;

/// src/ file → the src/ files it imports.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn module_of(rel: &str) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_string)
        .collect();
    if parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        parts.clear();
    }
    parts
}

fn collect(dir: &Path, root: &Path, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .replace('\\', "/");
            out.insert(rel, std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The source without its unit tests and comments.
fn code(source: &str) -> String {
    let mut text = source;
    if let Some(at) = source.find("#[cfg(test)]")
        && source[at + "#[cfg(test)]".len()..]
            .trim_start()
            .starts_with("mod tests")
    {
        text = &source[..at];
    }
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else if let Some(at) = line.find(" // ") {
                &line[..at]
            } else {
                line
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The paths a `use` tree starting at `text` names, each as segments.
fn paths(text: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut segments = prefix;
    let mut i = 0;
    let bytes: Vec<char> = text.chars().collect();
    loop {
        let start = i;
        while i < bytes.len() && is_ident(bytes[i]) {
            i += 1;
        }
        let ident: String = bytes[start..i].iter().collect();
        if i < bytes.len() && bytes[i] == '{' {
            // A group: each comma-separated tree inside.
            i += 1;
            loop {
                while i < bytes.len() && (bytes[i].is_whitespace() || bytes[i] == ',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == '}' {
                    i += 1;
                    return i;
                }
                let rest: String = bytes[i..].iter().collect();
                let used = paths(&rest, segments.clone(), out);
                i += used.max(1);
                // Skip an `as alias` and anything up to the next separator.
                while i < bytes.len() && bytes[i] != ',' && bytes[i] != '}' {
                    i += 1;
                }
            }
        }
        if ident.is_empty() {
            out.push(segments);
            return i;
        }
        if ident != "self" {
            segments.push(ident);
        }
        if i + 1 < bytes.len() && bytes[i] == ':' && bytes[i + 1] == ':' {
            i += 2;
            continue;
        }
        out.push(segments);
        return i;
    }
}

fn graph() -> Graph {
    let root = repo_path("src");
    let mut files = BTreeMap::new();
    collect(&root, &root, &mut files);
    let modules: BTreeMap<Vec<String>, String> = files
        .keys()
        .map(|rel| (module_of(rel), rel.clone()))
        .collect();
    let resolve = |path: &[String]| -> Option<String> {
        (1..=path.len())
            .rev()
            .find_map(|n| modules.get(&path[..n]).cloned())
    };
    let mut graph = Graph::new();
    for (rel, source) in &files {
        let text = code(source);
        let me = module_of(rel);
        let mut named = Vec::new();
        for (marker, base) in [
            ("crate::", Vec::new()),
            ("super::", me[..me.len().saturating_sub(1)].to_vec()),
        ] {
            let mut from = 0;
            while let Some(at) = text[from..].find(marker) {
                let at = from + at;
                from = at + marker.len();
                if text[..at].chars().next_back().is_some_and(is_ident) {
                    continue;
                }
                paths(&text[from..], base.clone(), &mut named);
            }
        }
        let imports = graph.entry(rel.clone()).or_default();
        for path in named {
            if let Some(target) = resolve(&path)
                && &target != rel
            {
                imports.insert(target);
            }
        }
    }
    graph
}

/// Strongly connected components with more than one file (Tarjan).
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        found: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.found.push(component);
            }
        }
    }
    let mut s = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.found
}

fn within(file: &str, area: &str) -> bool {
    if let Some(dir) = area.strip_suffix('/') {
        file.starts_with(&format!("{dir}/"))
    } else {
        file == area
    }
}

/// (who, may not import, why): an area is a folder ("http/") or a file.
const RULES: &[(&[&str], &[&str], &str)] = &[
    (
        &["audit/"],
        &["http/", "dicom/"],
        "audit is a sink: the protocols hand it plain facts",
    ),
    (
        &["recognition/"],
        &[
            "registry/",
            "index/",
            "storage.rs",
            "http/",
            "dicom/",
            "publish.rs",
        ],
        "recognition is pure: it reads the contract's types and the list",
    ),
    (
        &["http/"],
        &["dicom/"],
        "the two protocols share ingest, not each other",
    ),
    (
        &["dicom/"],
        &["http/"],
        "the two protocols share ingest, not each other",
    ),
    (
        &["tls.rs", "metrics.rs", "config.rs"],
        &[
            "dicom/",
            "http/",
            "storage.rs",
            "index/",
            "ingest.rs",
            "registry/",
            "publish.rs",
            "peer.rs",
        ],
        "leaves: configuration is data, metrics a sink, TLS makes configurations",
    ),
    (
        &["storage.rs", "index/"],
        &["dicom/", "http/", "ingest.rs", "registry/", "publish.rs"],
        "storage knows blobs, the index rows; neither knows a protocol",
    ),
    (
        &["registry/"],
        &[
            "dicom/",
            "storage.rs",
            "index/",
            "ingest.rs",
            "http/",
            "publish.rs",
            "peer.rs",
        ],
        "the registry is its own server: nothing of the node's archive",
    ),
    (
        &["contract.rs"],
        &[
            "registry/",
            "recognition/",
            "http/",
            "dicom/",
            "publish.rs",
            "peer.rs",
            "priors.rs",
            "index/",
            "storage.rs",
        ],
        "the node-registry contract is the bottom: everyone imports it",
    ),
];

#[test]
fn the_module_graph_has_no_cycle_and_keeps_its_layers() {
    let graph = graph();
    assert!(graph.len() > 40, "src/ read: {} files", graph.len());
    let cycles = cycles(&graph);
    let mut broken: Vec<String> = cycles
        .iter()
        .map(|c| format!("import cycle between {} files: {}", c.len(), c.join(", ")))
        .collect();
    for (file, imports) in &graph {
        for (who, forbidden, why) in RULES {
            if !who.iter().any(|area| within(file, area)) {
                continue;
            }
            for target in imports {
                if forbidden.iter().any(|area| within(target, area)) {
                    broken.push(format!("{file} imports {target}: {why}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

/// The checker itself finds what it is meant to find.
#[test]
fn the_checker_reads_paths_and_finds_cycles() {
    let mut named = Vec::new();
    paths(
        "a::{b, c::{d as e, self}, f}::g;",
        vec!["crate".into()],
        &mut named,
    );
    let named: BTreeSet<String> = named.iter().map(|p| p.join("::")).collect();
    for expected in [
        "crate::a::b",
        "crate::a::c::d",
        "crate::a::c",
        "crate::a::f",
    ] {
        assert!(named.contains(expected), "{expected} in {named:?}");
    }
    let mut graph = Graph::new();
    graph.insert("a.rs".into(), ["b.rs".to_string()].into());
    graph.insert("b.rs".into(), ["c.rs".to_string()].into());
    graph.insert("c.rs".into(), ["a.rs".to_string()].into());
    graph.insert("d.rs".into(), ["a.rs".to_string()].into());
    assert_eq!(cycles(&graph), vec![vec!["a.rs", "b.rs", "c.rs"]]);
    assert!(within("http/dicomweb/qido.rs", "http/"));
    assert!(!within("http.rs", "http/"));
    assert!(
        code("use a;\n#[cfg(test)]\nmod tests { use crate::x; }")
            .find("crate::x")
            .is_none()
    );
}
