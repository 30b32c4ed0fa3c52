//! The relay's and the operator's modules form one-way graphs: no module imports one that
//! imports it back, directly or through others (issue 18).
//!
//! The test reads `derper/src/**/*.rs` and `operator/src/**/*.rs`, builds the module dependency
//! graph of each crate from the paths in the code and fails naming every cycle it finds, with
//! the line that makes each edge.
//!
//! What counts, kept simple on purpose:
//! * a module is one file: `a.rs` and `a/mod.rs` are `a`, `a/b.rs` is `a::b`; `lib.rs` is
//!   the crate root (it only declares modules, so edges to it are dropped);
//! * an edge `m → n` is any path in `m` that names `n`: `crate::…`, `super::…`, `self::…`
//!   and paths that start with the name of one of `m`'s child modules, in `use` trees
//!   (braces expanded) and in code. A path resolves to the longest prefix that is a known
//!   module, so `crate::server::Server` is an edge to `server` and `crate::server::conn::X`
//!   one to `server::conn`;
//! * `mod x;` declarations are not edges (declaring a child is not using it).
//!
//! What it ignores, and why that is honest for this crate:
//! * comments, doc comments included (an intra-doc link is not an import), and string and
//!   character literals;
//! * items under `#[cfg(test)]` (the `mod tests { … }` blocks) and files named `tests.rs`:
//!   test code may reach anywhere;
//! * `main.rs` and `src/bin/`: separate crates that use the library as `derper::…`;
//! * names brought in by a glob or by a `use` of a module and then used unqualified: the
//!   `use` itself is the edge, so nothing is lost;
//! * method calls on values (`server.handle_derp(…)`): only the type's module is seen (an
//!   inherent `impl` in another module depends on the type's module, not the reverse);
//! * macros and `#[path]` attributes (the crate uses neither for modules).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// One source file: its module path (`""` for the root) and its text.
struct Source {
    module: String,
    file: String,
    text: String,
}

/// Where an edge comes from: file and 1-based line of its first occurrence.
type Edges = BTreeMap<String, BTreeMap<String, (String, usize)>>;

/// Reads every `.rs` file below `dir` (the crate's `src` is `root`, named `krate` in reports).
fn collect(krate: &str, dir: &Path, root: &Path, out: &mut Vec<Source>) {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let rel = p.strip_prefix(root).expect("under root").to_path_buf();
        if p.is_dir() {
            if rel == Path::new("bin") {
                continue;
            }
            collect(krate, &p, root, out);
            continue;
        }
        if p.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name == "tests.rs" || rel == Path::new("main.rs") {
            continue;
        }
        let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        out.push(Source {
            module: module_of(&rel.to_string_lossy()),
            file: format!("{krate}/src/{}", rel.to_string_lossy()),
            text,
        });
    }
}

/// `a/b.rs` → `a::b`, `a/mod.rs` → `a`, `lib.rs` → `""`.
fn module_of(rel: &str) -> String {
    let stem = rel.strip_suffix(".rs").unwrap_or(rel);
    let mut parts: Vec<&str> = stem.split('/').collect();
    if matches!(parts.last(), Some(&"mod") | Some(&"lib")) {
        parts.pop();
    }
    parts.join("::")
}

/// Blanks comments and string/char literals (keeping newlines, so offsets and line numbers
/// stay), then blanks every item under `#[cfg(test)]`.
fn strip(src: &str) -> Vec<u8> {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let is_ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut out, i, end);
            i = end;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            let mut j = i;
            while j < b.len() {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if c == b'r'
            && (i == 0
                || !is_ident(b[i - 1])
                || (b[i - 1] == b'b' && (i < 2 || !is_ident(b[i - 2]))))
            && matches!(b.get(i + 1), Some(b'#') | Some(b'"'))
        {
            // Raw string r"…", r#"…"#, br"…".
            let hashes = b[i + 1..].iter().take_while(|&&c| c == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let start = i + 2 + hashes;
            let end = b[start..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |p| start + p + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, j + 1);
            i = j + 1;
        } else if c == b'\'' {
            // A char literal ('a', '\n', '\u{1F}'), or a lifetime ('a) which stays.
            if b.get(i + 1) == Some(&b'\\') {
                let end = b[i + 2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map_or(b.len(), |p| i + 3 + p);
                blank(&mut out, i, end);
                i = end;
            } else if let Some(len) = src[i + 1..].chars().next().map(char::len_utf8)
                && b.get(i + 1 + len) == Some(&b'\'')
            {
                blank(&mut out, i, i + 2 + len);
                i += 2 + len;
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    // Items under #[cfg(test)]: up to the first `;` or the matching `}` of the first `{`.
    let pat = b"#[cfg(test)]";
    let mut i = 0;
    while let Some(p) = out[i..].windows(pat.len()).position(|w| w == pat) {
        let start = i + p;
        let mut j = start + pat.len();
        let mut depth = 0usize;
        while j < out.len() {
            match out[j] {
                b';' if depth == 0 => break,
                b'{' => depth += 1,
                b'}' if depth <= 1 => break,
                b'}' => depth -= 1,
                _ => {}
            }
            j += 1;
        }
        for c in &mut out[start..(j + 1).min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        i = j.min(out.len());
    }
    out
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Colons,
    Open,
    Close,
    Comma,
    Semi,
    Star,
    Other,
}

/// Tokens with their 1-based line.
fn tokens(src: &[u8]) -> Vec<(Tok, usize)> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < src.len() {
        let c = src[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if c.is_ascii_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let j = i + src[i..]
                .iter()
                .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'_')
                .count();
            let word = String::from_utf8_lossy(&src[i..j]).into_owned();
            out.push((Tok::Ident(word), line));
            i = j;
        } else if c == b':' && src.get(i + 1) == Some(&b':') {
            out.push((Tok::Colons, line));
            i += 2;
        } else {
            let t = match c {
                b'{' => Tok::Open,
                b'}' => Tok::Close,
                b',' => Tok::Comma,
                b';' => Tok::Semi,
                b'*' => Tok::Star,
                _ => Tok::Other,
            };
            out.push((t, line));
            i += 1;
        }
    }
    out
}

/// Expands a `use` tree starting at `toks[*i]` into its paths (segments only; `as` renames
/// and globs end a path).
fn use_tree(toks: &[(Tok, usize)], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(*i).map(|t| &t.0) {
            Some(Tok::Ident(w)) if w == "as" => {
                *i += 2;
                out.push(path);
                return;
            }
            Some(Tok::Ident(w)) => {
                path.push(w.clone());
                *i += 1;
            }
            Some(Tok::Colons) => *i += 1,
            Some(Tok::Open) => {
                *i += 1;
                loop {
                    use_tree(toks, i, &path, out);
                    match toks.get(*i).map(|t| &t.0) {
                        Some(Tok::Comma) => {
                            *i += 1;
                            if toks.get(*i).map(|t| &t.0) == Some(&Tok::Close) {
                                *i += 1;
                                return;
                            }
                        }
                        Some(Tok::Close) => {
                            *i += 1;
                            return;
                        }
                        _ => return,
                    }
                }
            }
            Some(Tok::Star) => {
                *i += 1;
                out.push(path);
                return;
            }
            _ => {
                out.push(path);
                return;
            }
        }
    }
}

/// The module a path names, from module `cur`: the longest prefix that is a known module.
/// `None` for paths that are not relative to this crate.
fn resolve(
    cur: &str,
    segs: &[String],
    modules: &BTreeSet<String>,
    children: &BTreeSet<String>,
) -> Option<String> {
    let first = segs.first()?;
    let mut base: Vec<String> = if cur.is_empty() {
        Vec::new()
    } else {
        cur.split("::").map(str::to_owned).collect()
    };
    let mut rest = segs;
    match first.as_str() {
        "crate" => {
            base.clear();
            rest = &segs[1..];
        }
        "super" | "self" => {
            while let Some(s) = rest.first() {
                match s.as_str() {
                    "super" => {
                        base.pop();
                    }
                    "self" => {}
                    _ => break,
                }
                rest = &rest[1..];
            }
        }
        w if children.contains(w) && segs.len() > 1 => {}
        _ => return None,
    }
    let mut best = base.join("::");
    let mut path = base;
    for s in rest {
        path.push(s.clone());
        let name = path.join("::");
        if modules.contains(&name) {
            best = name;
        } else {
            break;
        }
    }
    Some(best)
}

fn graph(sources: &[Source]) -> Edges {
    let modules: BTreeSet<String> = sources.iter().map(|s| s.module.clone()).collect();
    let mut edges = Edges::new();
    for s in sources {
        let children: BTreeSet<String> = modules
            .iter()
            .filter_map(|m| {
                let rest = if s.module.is_empty() {
                    Some(m.as_str())
                } else {
                    m.strip_prefix(&format!("{}::", s.module))
                }?;
                (!rest.is_empty() && !rest.contains("::")).then(|| rest.to_owned())
            })
            .collect();
        let stripped = strip(&s.text);
        let toks = tokens(&stripped);
        let out = edges.entry(s.module.clone()).or_default();
        let mut add = |segs: &[String], line: usize| {
            if let Some(to) = resolve(&s.module, segs, &modules, &children)
                && to != s.module
                && !to.is_empty()
            {
                out.entry(to).or_insert_with(|| (s.file.clone(), line));
            }
        };
        let mut i = 0;
        while i < toks.len() {
            let (tok, line) = &toks[i];
            let prev_colons = i > 0 && toks[i - 1].0 == Tok::Colons;
            match tok {
                Tok::Ident(w) if w == "use" => {
                    i += 1;
                    let mut paths = Vec::new();
                    use_tree(&toks, &mut i, &[], &mut paths);
                    for p in paths {
                        add(&p, *line);
                    }
                }
                Tok::Ident(w) if !prev_colons => {
                    let mut segs = vec![w.clone()];
                    let mut j = i + 1;
                    while toks.get(j).map(|t| &t.0) == Some(&Tok::Colons) {
                        match toks.get(j + 1).map(|t| &t.0) {
                            Some(Tok::Ident(n)) => {
                                segs.push(n.clone());
                                j += 2;
                            }
                            _ => break,
                        }
                    }
                    if segs.len() > 1 {
                        add(&segs, *line);
                    }
                    i = j;
                }
                _ => i += 1,
            }
        }
    }
    edges
}

/// Strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a Edges,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(st: &mut State<'a>, v: &'a str) {
        st.index.insert(v, st.next);
        st.low.insert(v, st.next);
        st.next += 1;
        st.stack.push(v);
        st.on_stack.insert(v);
        let edges = st.edges;
        for w in edges.get(v).into_iter().flat_map(|m| m.keys()) {
            let w = w.as_str();
            if !edges.contains_key(w) {
                continue;
            }
            if !st.index.contains_key(w) {
                visit(st, w);
                let lw = st.low[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if st.on_stack.contains(w) {
                let iw = st.index[w];
                let lv = st.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if st.low[v] == st.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = st.stack.pop() {
                st.on_stack.remove(w);
                comp.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                st.out.push(comp);
            }
        }
    }
    let mut st = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !st.index.contains_key(v.as_str()) {
            visit(&mut st, v);
        }
    }
    st.out.sort();
    st.out
}

/// The shortest cycle through the first module of a strongly connected component (BFS),
/// as a path that starts and ends with that module.
fn shortest_cycle(edges: &Edges, comp: &[String]) -> Vec<String> {
    let start = &comp[0];
    let mut prev: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start.as_str()]);
    while let Some(v) = queue.pop_front() {
        for w in edges[v].keys().filter(|w| comp.contains(w)) {
            if w == start {
                let mut path = vec![start.clone()];
                let mut at = v;
                while at != start {
                    path.push(at.to_owned());
                    at = prev[at];
                }
                path.push(start.clone());
                path.reverse();
                return path;
            }
            if !prev.contains_key(w.as_str()) {
                prev.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    comp.to_vec()
}

/// A readable report: each cycle's modules and the edges between them, with where each
/// edge is made.
fn report(edges: &Edges, cycles: &[Vec<String>]) -> String {
    let mut s = String::new();
    for c in cycles {
        s.push_str(&format!("import cycle among {}:\n", c.join(", ")));
        s.push_str(&format!(
            "    e.g. {}\n",
            shortest_cycle(edges, c).join(" -> ")
        ));
        for from in c {
            for (to, (file, line)) in &edges[from] {
                if c.contains(to) {
                    s.push_str(&format!("    {from} -> {to}   ({file}:{line})\n"));
                }
            }
        }
    }
    s
}

/// Reads `<crate>/src` of the workspace and fails naming every import cycle.
fn assert_no_cycles(krate: &str, expected_module: &str) {
    let root = derp_tests::k8s::workspace_root().join(krate).join("src");
    let mut sources = Vec::new();
    collect(krate, &root, &root, &mut sources);
    assert!(
        sources.iter().any(|s| s.module == expected_module),
        "expected to read {krate}/src (found {} files)",
        sources.len()
    );
    let edges = graph(&sources);
    let found = cycles(&edges);
    assert!(
        found.is_empty(),
        "{krate}/src has import cycles:\n{}",
        report(&edges, &found)
    );
}

#[test]
fn relay_modules_have_no_import_cycles() {
    assert_no_cycles("derper", "server");
}

#[test]
fn operator_modules_have_no_import_cycles() {
    assert_no_cycles("operator", "plan");
}

fn src(module: &str, text: &str) -> Source {
    Source {
        module: module.to_owned(),
        file: format!("{module}.rs"),
        text: text.to_owned(),
    }
}

#[test]
fn the_detector_finds_cycles_through_use_trees_paths_and_child_names() {
    let sources = [
        src("", "pub mod a; pub mod b; pub mod c; pub mod p;"),
        src("a", "use crate::{b::{self, Thing as T}, x};"),
        src("b", "fn f() { let _ = crate::c::make(); }"),
        src("c", "use super::a::X;"),
        // A parent and its child through a child-relative path and `super`.
        src("p", "mod k; pub use k::Item;"),
        src("p::k", "pub struct Item(super::Other);"),
    ];
    let edges = graph(&sources);
    assert_eq!(
        cycles(&edges),
        vec![
            vec!["a".to_owned(), "b".to_owned(), "c".to_owned()],
            vec!["p".to_owned(), "p::k".to_owned()],
        ]
    );
}

#[test]
fn the_detector_ignores_comments_literals_and_test_modules() {
    let sources = [
        src("", "pub mod a; pub mod b;"),
        src(
            "a",
            "//! See [`crate::b`].\n/// [`crate::b::X`]\n/* crate::b */\nfn f() -> char { let _ = \"crate::b::x\"; let _ = r#\"crate::b\"#; '\"' }\n#[cfg(test)]\nmod tests { use crate::b; }",
        ),
        src("b", "use crate::a;\nfn g<'a>(x: &'a str) -> &'a str { x }"),
    ];
    let edges = graph(&sources);
    assert!(cycles(&edges).is_empty(), "{edges:?}");
    assert_eq!(edges["b"].keys().collect::<Vec<_>>(), vec!["a"]);
    assert!(edges["a"].is_empty(), "{edges:?}");
}
