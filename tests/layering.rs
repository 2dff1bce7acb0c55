//! The layering written in `src/lib.rs` (its "Layers" table) holds in the code: no module
//! imports from a layer below its own. Every `crate::` path outside comments and unit-test
//! modules is checked, grouped `use crate::{a, b::c}` forms included.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path (`routing::layer`) → layer, from the table in `lib.rs`.
fn layers() -> BTreeMap<String, u32> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let mut layers = BTreeMap::new();
    for line in lib.lines().filter_map(|l| l.strip_prefix("//! | ")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let Ok(layer) = cells[0].trim().parse::<u32>() else {
            continue;
        };
        for module in cells[1].split(',') {
            let module = module.trim().trim_matches('`');
            assert!(
                layers.insert(module.to_owned(), layer).is_none(),
                "{module} is in two layers"
            );
        }
    }
    assert!(layers.len() > 20, "the table was not found in lib.rs");
    layers
}

/// The layer of a module path: its most specific entry in the table.
fn layer_of(layers: &BTreeMap<String, u32>, module: &str) -> Option<(String, u32)> {
    let parts: Vec<&str> = module.split("::").collect();
    (1..=parts.len()).rev().find_map(|n| {
        let prefix = parts[..n].join("::");
        layers.get(&prefix).map(|l| (prefix, *l))
    })
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/routing/layer.rs` → `routing::layer`; `src/auth/mod.rs` → `auth`.
fn module_of(file: &Path) -> String {
    let relative = file.strip_prefix(src()).unwrap().with_extension("");
    let mut parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without its unit tests and comment lines.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every module path named after `crate::` (a grouped `use` gives one per item).
fn paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let path: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let path = path.trim_end_matches(':').to_owned();
        if rest[path.len()..].trim_start_matches(':').starts_with('{') {
            // `crate::a::{b, c::d}`: each item under `a`.
            let open = rest.find('{').unwrap();
            let close = rest[open..].find('}').unwrap() + open;
            for item in rest[open + 1..close].split(',') {
                let item = item.trim().split("::").next().unwrap_or("").trim();
                if !item.is_empty() && item != "self" {
                    found.push(format!("{path}::{item}"));
                }
            }
            found.push(path);
        } else if !path.is_empty() {
            found.push(path);
        }
    }
    found
}

#[test]
fn no_module_imports_from_a_layer_below_its_own() {
    let layers = layers();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut violations = Vec::new();
    let mut unlisted = Vec::new();
    for file in &files {
        let module = module_of(file);
        if module == "lib" || module == "main" {
            continue;
        }
        let Some((_, own)) = layer_of(&layers, &module) else {
            unlisted.push(module);
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for path in paths(&code(&text)) {
            let Some((target, layer)) = layer_of(&layers, &path) else {
                continue;
            };
            if layer > own {
                violations.push(format!(
                    "{module} (layer {own}) imports {path} ({target}, layer {layer})"
                ));
            }
        }
    }
    assert!(
        unlisted.is_empty(),
        "modules missing from the table in lib.rs: {unlisted:?}"
    );
    violations.sort();
    violations.dedup();
    assert!(
        violations.is_empty(),
        "imports from a lower layer:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_grouped_and_nested_paths() {
    let found = paths(&code(
        "use crate::a::{b, c::d};\nlet x = crate::e::f::g();\n// crate::h\n",
    ));
    assert_eq!(found, ["a::b", "a::c", "a", "e::f::g"]);
    assert_eq!(
        code("x\n// crate::h\n#[cfg(test)]\nmod tests { crate::i }"),
        "x"
    );
}
