//! Modules point one way: the `crate::<module>` references between the library's
//! top-level modules form no cycle, and the leaf modules (shared vocabulary) import
//! nothing but other leaves.
//!
//! The graph is read from the source text: every `src/**/*.rs` except the binary's
//! `main.rs` and the crate root, a submodule counting as its top-level parent; comments,
//! string and char literals and `#[cfg(test)]` items (test modules) are ignored.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Modules that hold vocabulary shared by several layers. They may import each other,
/// nothing else of the crate.
const LEAVES: &[&str] = &[
    "connections",
    "credentials",
    "files",
    "limits",
    "metrics",
    "priority",
    "protocol",
    "secret",
    "state",
    "status",
];

/// The layers, highest first: a module imports only modules of lower layers (or, among
/// the leaves, other leaves). Request → EmailEngine contract → cache → fetch → provider,
/// with the composition root above and config and the vocabulary below.
const LAYERS: &[&[&str]] = &[
    &["cli"],
    &["sidecar"],
    &["server", "reload"],
    &["ui"],
    &["pickup"],
    &["shared", "error"],
    &["options"],
    &["cache"],
    &["consent"],
    &["upstream"],
    &["config"],
    &["provider"],
];

/// `from → to`, with the first place (`file:line`) the reference appears.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = crate_graph();
    // Shown with `cargo test --test architecture -- --nocapture`.
    println!("the module graph:\n{}", render(&graph));
    let cycles = cycles(&graph, &|_: &str, _: &str| false);
    assert!(
        cycles.is_empty(),
        "import cycles among src/ modules (each edge with where it is made):\n{}\nthe graph:\n{}",
        cycles
            .iter()
            .map(|c| render_cycle(&graph, c))
            .collect::<Vec<_>>()
            .join("\n"),
        render(&graph)
    );
}

#[test]
fn leaf_modules_import_only_leaves() {
    let graph = crate_graph();
    let mut wrong = Vec::new();
    for leaf in LEAVES {
        assert!(graph.contains_key(*leaf), "no module `{leaf}` in src/");
        for (to, at) in &graph[*leaf] {
            if !LEAVES.contains(&to.as_str()) {
                wrong.push(format!("  {leaf} -> {to} ({at})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "leaf modules importing a higher module:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn every_module_imports_only_lower_layers() {
    let graph = crate_graph();
    let layer_of = |m: &str| -> usize {
        LAYERS
            .iter()
            .position(|layer| layer.contains(&m))
            .unwrap_or(if LEAVES.contains(&m) {
                LAYERS.len()
            } else {
                usize::MAX
            })
    };
    let mut wrong = Vec::new();
    for (from, tos) in &graph {
        let from_layer = layer_of(from);
        assert_ne!(
            from_layer,
            usize::MAX,
            "module `{from}` is in no layer: add it to LAYERS or LEAVES"
        );
        for (to, at) in tos {
            let to_layer = layer_of(to);
            let leaf_to_leaf = from_layer == LAYERS.len() && to_layer == LAYERS.len();
            if to_layer <= from_layer && !leaf_to_leaf {
                wrong.push(format!("  {from} -> {to} ({at})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports that point up or sideways:\n{}\nthe graph:\n{}",
        wrong.join("\n"),
        render(&graph)
    );
}

/// The scanner itself: what counts as a reference and what does not.
#[test]
fn references_are_found_in_code_only() {
    let src = r####"
        use crate::{alpha, beta::{B, C}, gamma::D};
        use crate::delta::E;
        fn f() { let _ = crate::epsilon::f(); let _ = 'c'; let _: &'static str = "crate::no1"; }
        // crate::no2
        /* crate::no3 /* nested crate::no4 */ crate::no5 */
        const R: &str = r#"crate::no6 " still a string"#;
        macro_rules! m { () => { $crate::no7 } }
        #[cfg(test)]
        mod tests { use crate::no8; fn g() { crate::no9::x() } }
        #[cfg(test)]
        use crate::no10;
        fn h() -> char { '"' } // a quote in a char literal ends nothing
        struct S<'a>(&'a crate::zeta::Z);
    "####;
    let found: Vec<String> = references(src).into_iter().map(|(m, _)| m).collect();
    assert_eq!(
        found,
        ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"],
        "{src}"
    );
}

#[test]
fn a_cycle_is_found_and_allowed_edges_break_it() {
    let mut g = Graph::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        g.entry(a.into())
            .or_default()
            .insert(b.into(), String::new());
        g.entry(b.into()).or_default();
    }
    let none = |_: &str, _: &str| false;
    assert_eq!(cycles(&g, &none), vec![vec!["a", "b", "c"]]);
    let allow = |a: &str, b: &str| (a, b) == ("b", "c");
    assert!(cycles(&g, &allow).is_empty());
}

fn crate_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let rel = file.strip_prefix(&src).expect("under src/");
        if rel == Path::new("lib.rs") || rel == Path::new("main.rs") || rel.starts_with("bin") {
            continue;
        }
        let first = rel.components().next().expect("a file name");
        let first = first.as_os_str().to_str().expect("UTF-8 file names");
        let module = first.strip_suffix(".rs").unwrap_or(first).to_owned();
        let text = std::fs::read_to_string(&file).expect("readable source");
        let edges = graph.entry(module.clone()).or_default();
        for (to, line) in references(&text) {
            if to != module {
                edges
                    .entry(to)
                    .or_insert_with(|| format!("src/{}:{line}", rel.display()));
            }
        }
    }
    graph
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src/") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Punct(char),
}

/// Tokens of Rust source with their line, without comments and literals.
fn tokens(src: &str) -> Vec<(Tok, usize)> {
    let c: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(c[i] == '\n');
                    i += 1;
                }
            }
        } else if ch == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                line += usize::from(c[i] == '\n');
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if (ch == 'r' || (ch == 'b' && at(i + 1) == 'r'))
            && matches!(at(i + 1 + usize::from(ch == 'b')), '"' | '#')
        {
            // A raw string: r"…", r#"…"#, br"…".
            i += 1 + usize::from(ch == 'b');
            let mut hashes = 0;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            if at(i) != '"' {
                continue;
            }
            i += 1;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += 1 + hashes;
                    break;
                }
                line += usize::from(c[i] == '\n');
                i += 1;
            }
        } else if ch == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while i < c.len() && is_ident(c[i]) {
                    i += 1;
                }
            }
        } else if is_ident(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            // b"…" and b'…' byte literals: the prefix is not an identifier.
            if word == "b" && matches!(at(i), '"' | '\'') {
                continue;
            }
            if !word.starts_with(|d: char| d.is_ascii_digit()) {
                out.push((Tok::Ident(word), line));
            }
        } else {
            out.push((Tok::Punct(ch), line));
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The top-level modules named after `crate::`, with the line of each mention, in order,
/// outside `#[cfg(test)]` items.
fn references(src: &str) -> Vec<(String, usize)> {
    let toks = strip_cfg_test(tokens(src));
    let ident = |i: usize| match toks.get(i) {
        Some((Tok::Ident(s), _)) => Some(s.as_str()),
        _ => None,
    };
    let punct = |i: usize, p: char| matches!(toks.get(i), Some((Tok::Punct(q), _)) if *q == p);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        let is_path = ident(i) == Some("crate")
            && punct(i + 1, ':')
            && punct(i + 2, ':')
            && !(i > 0 && punct(i - 1, '$'));
        if !is_path {
            i += 1;
            continue;
        }
        let line = toks[i].1;
        i += 3;
        if let Some(m) = ident(i) {
            out.push((m.to_owned(), line));
            continue;
        }
        if !punct(i, '{') {
            continue;
        }
        // `crate::{a, b::{c, d}}`: the first segment of each path at the group's depth.
        let mut depth = 0;
        let mut expect_module = true;
        while i < toks.len() {
            match &toks[i].0 {
                Tok::Punct('{') => {
                    depth += 1;
                    expect_module = depth == 1;
                }
                Tok::Punct('}') => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                Tok::Punct(',') => expect_module = depth == 1,
                Tok::Ident(m) if expect_module => {
                    if m != "self" {
                        out.push((m.clone(), toks[i].1));
                    }
                    expect_module = false;
                }
                _ => {}
            }
            i += 1;
        }
    }
    out
}

/// Drops every item carrying `#[cfg(test)]`: up to its `;`, or through its first
/// brace-delimited body (a `use` item always ends at its `;`).
fn strip_cfg_test(toks: Vec<(Tok, usize)>) -> Vec<(Tok, usize)> {
    let attr = ["#", "[", "cfg", "(", "test", ")", "]"];
    let text = |t: &Tok| match t {
        Tok::Ident(s) => s.clone(),
        Tok::Punct(p) => p.to_string(),
    };
    let mut out = Vec::with_capacity(toks.len());
    let mut i = 0;
    while i < toks.len() {
        let is_attr = attr
            .iter()
            .enumerate()
            .all(|(k, a)| toks.get(i + k).is_some_and(|(t, _)| text(t) == *a));
        if !is_attr {
            let (t, line) = &toks[i];
            out.push((
                match t {
                    Tok::Ident(s) => Tok::Ident(s.clone()),
                    Tok::Punct(p) => Tok::Punct(*p),
                },
                *line,
            ));
            i += 1;
            continue;
        }
        i += attr.len();
        let is_use = toks.get(i).is_some_and(|(t, _)| text(t) == "use");
        let mut depth = 0i32;
        while i < toks.len() {
            let t = text(&toks[i].0);
            i += 1;
            match t.as_str() {
                "{" => depth += 1,
                "}" => {
                    depth -= 1;
                    if depth == 0 && !is_use {
                        break;
                    }
                }
                ";" if depth == 0 => break,
                _ => {}
            }
        }
    }
    out
}

/// Every elementary cycle through an edge that is not allowed, each once, starting at
/// its smallest module.
fn cycles(graph: &Graph, allowed: &dyn Fn(&str, &str) -> bool) -> Vec<Vec<String>> {
    let mut found = BTreeSet::new();
    for (a, tos) in graph {
        for b in tos.keys() {
            if allowed(a, b) {
                continue;
            }
            // Shortest way back from b to a.
            let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
            let mut queue = VecDeque::from([b.as_str()]);
            let mut seen = BTreeSet::from([b.as_str()]);
            while let Some(n) = queue.pop_front() {
                if n == a {
                    break;
                }
                for m in graph.get(n).into_iter().flat_map(|t| t.keys()) {
                    if !allowed(n, m) && seen.insert(m.as_str()) {
                        prev.insert(m.as_str(), n);
                        queue.push_back(m.as_str());
                    }
                }
            }
            if !seen.contains(a.as_str()) {
                continue;
            }
            let mut cycle = vec![a.clone()];
            let mut n = a.as_str();
            while n != b {
                n = prev[n];
                cycle.push(n.to_owned());
            }
            // cycle is a, then back from a to b: reverse the tail to read a → b → … → a.
            cycle[1..].reverse();
            let start = (0..cycle.len()).min_by_key(|&k| &cycle[k]).unwrap_or(0);
            cycle.rotate_left(start);
            found.insert(cycle);
        }
    }
    found.into_iter().collect()
}

fn render_cycle(graph: &Graph, cycle: &[String]) -> String {
    let mut s = String::from(" ");
    for (k, from) in cycle.iter().enumerate() {
        let to = &cycle[(k + 1) % cycle.len()];
        let _ = write!(s, " {from} -> {to} ({})", graph[from][to]);
    }
    s
}

fn render(graph: &Graph) -> String {
    let mut s = String::new();
    for (from, tos) in graph {
        let to: Vec<&str> = tos.keys().map(String::as_str).collect();
        let _ = writeln!(s, "  {from} -> {}", to.join(", "));
    }
    s
}
