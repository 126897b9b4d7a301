//! The architecture, checked: crate boundaries from `cargo tree`, no import cycles between the
//! modules of a crate, and size limits on files and functions (docs/architecture.md). A future
//! edit that breaks one of these fails the suite.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use flotilla_tests::workspace_root;

/// The packages `package` depends on (normal and build dependencies, all features), by name.
fn dependencies(manifest: &Path, package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--locked", "--edges", "normal,build", "--prefix", "none", "--format", "{p}", "--package"])
        .arg(package)
        .arg("--manifest-path")
        .arg(manifest)
        .output()
        .expect("run cargo tree");
    assert!(output.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_free_of(manifest: &Path, package: &str, forbidden: &[&str]) {
    let deps = dependencies(manifest, package);
    assert!(deps.contains(package), "cargo tree did not list {package} itself: {deps:?}");
    for name in forbidden {
        assert!(!deps.contains(*name), "{package} must not depend on {name}, but its dependency graph has it");
    }
}

const LIBTORCH: &[&str] = &["tch", "torch-sys"];

#[test]
fn the_wire_engine_merge_data_gguf_and_front_end_do_not_depend_on_libtorch() {
    let manifest = workspace_root().join("Cargo.toml");
    for package in [
        "flotilla-files",
        "flotilla-wire",
        "flotilla-engine",
        "flotilla-merge",
        "flotilla-data",
        "flotilla-gguf",
        "flotilla-coordinator",
    ] {
        assert_free_of(&manifest, package, LIBTORCH);
    }
}

#[test]
fn the_engine_has_no_async_runtime_and_no_network() {
    let manifest = workspace_root().join("Cargo.toml");
    assert_free_of(&manifest, "flotilla-engine", &["tokio", "quinn", "quinn-proto", "rustls", "tch", "torch-sys"]);
    // Secure aggregation is the protocol's logic; the coordinator and devices carry its messages.
    assert_free_of(&manifest, "flotilla-secagg", &["tokio", "quinn", "quinn-proto", "rustls", "tch", "torch-sys"]);
    // The one way to replace a file: nothing but the standard library, so every crate can use it.
    let files = dependencies(&manifest, "flotilla-files");
    assert!(files.iter().all(|d| d == "flotilla-files"), "flotilla-files depends on {files:?}");
}

#[test]
fn the_fuzz_crate_does_not_link_libtorch() {
    let manifest = workspace_root().join("fuzz/Cargo.toml");
    assert_free_of(&manifest, "flotilla-fuzz", LIBTORCH);
    let deps = dependencies(&manifest, "flotilla-fuzz");
    assert!(deps.contains("flotilla-wire") && deps.contains("flotilla-gguf"), "it fuzzes the wire and GGUF crates");
}

#[test]
fn libtorch_enters_only_through_the_torch_side() {
    // The crates that may link libtorch: the torch side and what is built on it.
    let manifest = workspace_root().join("Cargo.toml");
    let deps = dependencies(&manifest, "flotilla-torch");
    assert!(deps.contains("tch"), "flotilla-torch is where libtorch lives");
    for package in ["flotilla-certs", "flotilla-study", "flotilla-tests"] {
        assert_free_of(&manifest, package, LIBTORCH);
    }
}

/// The device's side of the protocol reaches training only through the `LocalTrainer` trait, so a
/// second training backend (Android has no upstream libtorch) can come without touching it: the
/// session and the modules it imports, transitively, never name libtorch or the torch side.
#[test]
fn the_device_session_reaches_training_only_through_the_trainer_trait() {
    let src = workspace_root().join("edge-client/src");
    let graph = module_graph(&src);
    let mut reached: BTreeSet<String> = BTreeSet::new();
    let mut frontier = vec!["session".to_string()];
    while let Some(module) = frontier.pop() {
        if reached.insert(module.clone()) {
            frontier.extend(graph.get(&module).into_iter().flatten().cloned());
        }
    }
    assert!(reached.contains("local_trainer") && reached.contains("secure_session"), "{reached:?}");
    assert!(!reached.contains("trainer"), "the session must not import the libtorch trainer: {reached:?}");
    for module in &reached {
        let file = [src.join(format!("{module}.rs")), src.join(module).join("mod.rs")]
            .into_iter()
            .find(|path| path.exists())
            .expect("a module file");
        let text = std::fs::read_to_string(&file).expect("read source");
        let code: String = non_test_part(&text).lines().map(strip_literals).collect::<Vec<_>>().join("\n");
        for forbidden in ["flotilla_torch", "tch::"] {
            let named = code
                .match_indices(forbidden)
                .any(|(i, _)| !code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_'));
            assert!(!named, "{} names {forbidden}", file.display());
        }
    }
}

/// A module's path from the crate root: `serve/driver/status.rs` is `[serve, driver, status]`, a
/// `mod.rs` names its directory, and `lib.rs`, `main.rs` and `bin/` are the root (empty).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src).expect("under src").with_extension("");
    let mut path: Vec<String> = relative.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    if path.last().is_some_and(|last| last == "mod") {
        path.pop();
    }
    if path.first().is_some_and(|first| ["lib", "main", "bin"].contains(&first.as_str())) {
        path.clear();
    }
    path
}

/// The module paths that `code` (of the module at `own`) names: `crate::a::b`, each item of
/// `crate::{a::b, c}`, and `super::x` resolved from `own`.
fn named_modules(code: &str, own: &[String]) -> Vec<Vec<String>> {
    let path_at = |text: &str| -> Vec<String> {
        text.split("::")
            .map(|segment| segment.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>())
            .take_while(|segment| !segment.is_empty())
            .collect()
    };
    let mut named = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        named.push(path_at(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        named.push(path_at(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            named.push(path_at(rest));
        }
    }
    for (i, _) in code.match_indices("super::") {
        if code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut rest = &code[i..];
        let mut up = 0;
        while let Some(after) = rest.strip_prefix("super::") {
            up += 1;
            rest = after;
        }
        let mut path: Vec<String> = own[..own.len().saturating_sub(up)].to_vec();
        path.extend(path_at(rest));
        named.push(path);
    }
    named.retain(|path| !path.is_empty());
    named
}

/// For every module that has submodules (the crate root included, as `""`), the graph of its
/// children: an edge a → b when code in a (or below it) names b (or something below it). Items
/// re-exported by a parent are not modules and draw no edge.
fn module_graphs(src: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut graphs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for file in rust_files(src) {
        let own = module_path(src, &file);
        let text = std::fs::read_to_string(&file).expect("read source");
        // Code only: a module named in a comment or a string is not an import.
        let code: String = non_test_part(&text).lines().map(strip_literals).collect::<Vec<_>>().join("\n");
        let named = named_modules(&code, &own);
        for depth in 0..own.len() {
            let graph = graphs.entry(own[..depth].join("/")).or_default();
            let uses = graph.entry(own[depth].clone()).or_default();
            for path in &named {
                if path.len() > depth && path[..depth] == own[..depth] && path[depth] != own[depth] {
                    uses.insert(path[depth].clone());
                }
            }
        }
    }
    for graph in graphs.values_mut() {
        let modules: BTreeSet<String> = graph.keys().cloned().collect();
        for uses in graph.values_mut() {
            uses.retain(|m| modules.contains(m));
        }
    }
    graphs
}

/// The crate's top-level modules (`src/x.rs` or `src/x/mod.rs`) and, for each, the other
/// top-level modules its files name.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    module_graphs(src).remove("").unwrap_or_default()
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
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
fn the_cycle_finder_finds_cycles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c")])), None);
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).map(|c| c.len()), Some(4));
}

/// Every crate of the product, by directory: the fitness checks below cover each one.
const PRODUCT_CRATES: [&str; 13] = [
    "common/files",
    "common/wire",
    "common/engine",
    "common/merge",
    "common/data",
    "common/gguf",
    "common/secagg",
    "common/torch",
    "certs",
    "coordinator",
    "coordinator/torch",
    "edge-client",
    "study",
];

/// Directories (relative to `root`, `/`-separated) that hold a `Cargo.toml`, down to `depth` levels,
/// outside build outputs, packages and run folders.
fn crate_dirs(root: &Path, relative: &str, depth: usize, found: &mut Vec<String>) {
    let dir = if relative.is_empty() { root.to_path_buf() } else { root.join(relative) };
    if !relative.is_empty() && dir.join("Cargo.toml").is_file() {
        found.push(relative.to_string());
    }
    if depth == 0 {
        return;
    }
    for entry in std::fs::read_dir(&dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let skipped =
            name.starts_with('.') || ["target", "dist", "runs", "src", "tests", "fuzz"].contains(&name.as_str());
        if entry.path().is_dir() && !skipped {
            let child = if relative.is_empty() { name } else { format!("{relative}/{name}") };
            crate_dirs(root, &child, depth - 1, found);
        }
    }
}

/// The list cannot drift: every crate directory (but the tests and the fuzzers) is on it.
#[test]
fn the_fitness_checks_cover_every_crate() {
    let mut crates = Vec::new();
    crate_dirs(&workspace_root(), "", 2, &mut crates);
    crates.sort();
    let mut listed: Vec<String> = PRODUCT_CRATES.iter().map(|c| c.to_string()).collect();
    listed.sort();
    assert_eq!(crates, listed);
}

/// The top level is the one the product was specified with: the shared crates under `common/`, the
/// coordinator's two crates under `coordinator/`.
#[test]
fn the_top_level_keeps_the_specified_layout() {
    let root = workspace_root();
    for entry in ["Cargo.toml", "coordinator", "edge-client", "common", "certs", "tests", "deploy", "README.md"] {
        assert!(root.join(entry).exists(), "{entry} is missing from the top level");
    }
    let loose: Vec<String> = PRODUCT_CRATES
        .iter()
        .filter(|c| !c.contains('/') && !["coordinator", "edge-client", "certs", "study"].contains(c))
        .map(|c| c.to_string())
        .collect();
    assert!(loose.is_empty(), "shared crates belong under common/: {loose:?}");
}

/// A crate's package is named for its directory (`flotilla-` and the path without `common/`, `/` as
/// `-`) and so is each binary it builds, so `cargo run -p X` starts the binary called X. The one
/// exception is the device: its directory, `edge-client/`, is fixed by the product's specified top
/// level, while `flotilla-edge` is the name installed on every device and in every edge package.
#[test]
fn directory_package_and_binary_names_match() {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    for krate in PRODUCT_CRATES {
        let manifest = root.join(krate).join("Cargo.toml");
        let package = packages
            .iter()
            .find(|p| Path::new(p["manifest_path"].as_str().unwrap()) == manifest)
            .unwrap_or_else(|| panic!("{krate} is not a workspace member"));
        let name = package["name"].as_str().unwrap();
        let expected = match krate {
            "edge-client" => "flotilla-edge".to_string(),
            _ => format!("flotilla-{}", krate.trim_start_matches("common/").replace('/', "-")),
        };
        assert_eq!(name, expected, "{krate}/Cargo.toml");
        for target in package["targets"].as_array().unwrap() {
            if target["kind"].as_array().unwrap().iter().any(|k| k == "bin") {
                assert_eq!(target["name"].as_str(), Some(name), "{krate}: a binary named unlike its package");
            }
        }
    }
}

#[test]
fn no_crate_has_an_import_cycle_between_its_modules() {
    let root = workspace_root();
    for krate in PRODUCT_CRATES {
        let graphs = module_graphs(&root.join(krate).join("src"));
        // A one-file crate has no modules to order.
        let top = graphs.get("").map_or(0, |g| g.len());
        assert!(top > 1 || ["coordinator", "common/files"].contains(&krate), "{krate}: no modules found");
        // At every level: the crate's modules, and the submodules of each module.
        for (parent, graph) in &graphs {
            if let Some(cycle) = find_cycle(graph) {
                panic!("{krate}/src/{parent}: modules import each other in a cycle: {}", cycle.join(" → "));
            }
        }
    }
}

/// The coordinator's wings stand in order, each on those before it only (docs/architecture.md):
/// the configuration at the bottom, the command line at the top.
#[test]
fn the_coordinator_wings_stand_in_order() {
    let wings = ["config", "model", "records", "serve", "commands"];
    let graph = module_graph(&workspace_root().join("coordinator/torch/src"));
    assert_eq!(graph.keys().map(String::as_str).collect::<BTreeSet<_>>(), wings.into_iter().collect());
    for (floor, wing) in wings.iter().enumerate() {
        for used in &graph[*wing] {
            let below = wings[..floor].contains(&used.as_str());
            assert!(below, "coordinator/torch/src/{wing} uses {used}, which does not stand below it");
        }
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The text before the file's unit-test module (the whole file when it has none).
fn non_test_part(text: &str) -> &str {
    text.find("#[cfg(test)]\nmod tests").map_or(text, |i| &text[..i])
}

/// Source files of the product (not tests, benches or test helpers).
fn product_files() -> Vec<PathBuf> {
    let root = workspace_root();
    PRODUCT_CRATES
        .iter()
        .flat_map(|krate| rust_files(&root.join(krate).join("src")))
        .filter(|path| path.file_name().is_some_and(|n| n != "tests.rs"))
        .collect()
}

const MAX_FILE_LINES: usize = 600;
const MAX_FUNCTION_LINES: usize = 80;
/// Written in a comment just above a longer function, with the reason.
const LONG_FUNCTION_REASON: &str = "// Long function:";

/// Functions (name, first line, length in lines) of `code`, found by brace matching outside string
/// and character literals and comments.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(after) = [
            "fn ",
            "pub fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) async fn ",
            "unsafe fn ",
            "pub unsafe fn ",
            "pub(crate) unsafe fn ",
        ]
        .iter()
        .find_map(|prefix| trimmed.strip_prefix(prefix)) else {
            continue;
        };
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let mut depth = 0i64;
        let mut opened = false;
        let mut end = None;
        'lines: for (j, body_line) in lines.iter().enumerate().skip(i) {
            for c in strip_literals(body_line).chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break 'lines, // a declaration without a body
                    _ => {}
                }
                if opened && depth == 0 {
                    end = Some(j);
                    break 'lines;
                }
            }
        }
        if let Some(end) = end {
            found.push((name, i, end - i + 1));
        }
    }
    found
}

/// A line without its string and character literals and its `//` comment.
fn strip_literals(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_string = true,
            '/' if chars.peek() == Some(&'/') => break,
            '\'' => {
                // A character literal ('x', '\n', '{') or a lifetime ('a): skip a literal whole.
                let rest: String = chars.clone().take(3).collect();
                if let Some(escaped) = rest.strip_prefix('\\') {
                    let close = escaped.find('\'').map_or(0, |k| k + 2);
                    for _ in 0..close {
                        chars.next();
                    }
                } else if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            _ => out.push(c),
        }
    }
    out
}

#[test]
fn the_function_finder_measures_bodies() {
    let code =
        "fn a() {\n    let s = \"{\";\n    let c = '{';\n}\nfn b();\npub fn c<'x>(v: &'x str) -> &'x str {\n    v\n}\n";
    assert_eq!(functions(code), vec![("a".to_string(), 0, 4), ("c".to_string(), 5, 3)]);
}

#[test]
fn no_product_file_or_function_is_too_long_without_a_reason() {
    let mut problems = Vec::new();
    for file in product_files() {
        let text = std::fs::read_to_string(&file).expect("read source");
        let code = non_test_part(&text);
        let lines: Vec<&str> = code.lines().collect();
        if lines.len() > MAX_FILE_LINES {
            problems.push(format!("{}: {} lines (limit {MAX_FILE_LINES})", file.display(), lines.len()));
        }
        for (name, start, length) in functions(code) {
            let reasoned =
                lines[start.saturating_sub(3)..start].iter().any(|l| l.trim_start().starts_with(LONG_FUNCTION_REASON));
            if length > MAX_FUNCTION_LINES && !reasoned {
                problems.push(format!(
                    "{}:{}: fn {name} has {length} lines (limit {MAX_FUNCTION_LINES}; or say why in a `{LONG_FUNCTION_REASON}` comment above it)",
                    file.display(),
                    start + 1
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

/// The crate diagram in docs/architecture.md is the dependency graph: every arrow between two
/// crates is a normal dependency in the first one's Cargo.toml, and every such dependency has its
/// arrow, so the picture cannot drift from the build.
#[test]
fn the_documented_crate_diagram_is_the_dependency_graph() {
    let root = workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let diagram = doc.split("```mermaid").nth(1).and_then(|d| d.split("```").next()).expect("a mermaid diagram");
    // Nodes: `id[flotilla-name<br/>...]`; arrows: `a --> b`.
    let mut names = BTreeMap::new();
    let mut drawn = BTreeSet::new();
    for line in diagram.lines().map(str::trim) {
        if let Some((id, rest)) = line.split_once('[') {
            let name = rest.split(['<', ']']).next().unwrap_or_default();
            if name.starts_with("flotilla-") && !id.contains(' ') {
                names.insert(id.to_string(), name.to_string());
            }
        } else if let Some((from, to)) = line.split_once("-->") {
            drawn.insert((from.trim().to_string(), to.trim().to_string()));
        }
    }
    let drawn: BTreeSet<(String, String)> =
        drawn.into_iter().map(|(a, b)| (names[&a].clone(), names[&b].clone())).collect();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let documented: BTreeSet<&String> = names.values().collect();
    let mut built = BTreeSet::new();
    for package in metadata["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap().to_string();
        if !documented.contains(&name) {
            continue;
        }
        for dependency in package["dependencies"].as_array().unwrap() {
            let target = dependency["name"].as_str().unwrap().to_string();
            if dependency["kind"].is_null() && documented.contains(&target) {
                built.insert((name.clone(), target));
            }
        }
    }
    let missing: Vec<_> = built.difference(&drawn).collect();
    let extra: Vec<_> = drawn.difference(&built).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "arrows missing from the diagram: {missing:?}; drawn but not built: {extra:?}"
    );
}

/// The crate table in docs/architecture.md is enforced: each crate's "must not depend on" column
/// (the crate names before any `;` or `(`; "everything": nothing but itself) holds for its whole
/// normal and build dependency tree, so the table cannot promise what the build does not keep.
#[test]
fn the_documented_forbidden_dependencies_hold() {
    let root = workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/architecture.md")).unwrap();
    let mut checked = 0;
    for row in doc.lines().filter(|l| l.starts_with("| `flotilla-")) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let package = cells[1].trim_matches('`');
        let forbidden_cell = cells[5];
        let manifest = match package {
            "flotilla-fuzz" => root.join("fuzz/Cargo.toml"),
            _ => root.join("Cargo.toml"),
        };
        let tree = dependencies(&manifest, package);
        assert!(tree.contains(package), "{package}: not found by cargo tree");
        if forbidden_cell == "everything" {
            assert!(tree.iter().all(|d| d == package), "{package} may depend on nothing, but has {tree:?}");
        } else {
            let names = forbidden_cell.split([';', '(']).next().unwrap_or_default();
            for name in names.split(',').map(str::trim).filter(|n| !n.is_empty() && *n != "—") {
                assert!(!tree.contains(name), "{package} must not depend on {name} (docs/architecture.md), but does");
            }
        }
        checked += 1;
    }
    assert!(checked >= 15, "the table lists every crate ({checked} rows read)");
}
