//! The layer rule, checked on the source text: a module imports only from
//! its own layer or the layers below it, and no two modules import each
//! other, directly or through others. The order is written once here and in
//! DESIGN.md ("Layers").

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest first.
const LAYERS: [&str; 10] = [
    "core", "config", "observe", "source", "sink", "pipeline", "store", "app", "dev", "cli",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/store/writeback.rs` → ["store", "writeback"]; `src/sink/webhook/mod.rs`
/// → ["sink", "webhook"].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|l| l == "mod" || l == "lib" || l == "main")
    {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` path in the text, and `super::…` resolved against `module`.
fn imports(text: &str, module: &[String], is_mod_rs: bool) -> BTreeSet<Vec<String>> {
    let mut out = BTreeSet::new();
    // A module's unit tests (`#[cfg(test)] mod tests { … }`, last in the
    // file) are not part of what the module depends on: like the
    // integration tests, they may use the dev fakes.
    let text = match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    };
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let segs = |rest: &str| -> Vec<String> {
        rest.split("::")
            .map(|s| {
                s.chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                    .collect::<String>()
            })
            .take_while(|s| !s.is_empty())
            .take(2)
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let p = segs(&code[i + "crate::".len()..]);
        if !p.is_empty() {
            out.insert(p);
        }
    }
    for (i, _) in code.match_indices("super::") {
        if i > 0 && code[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        // In `a/b.rs` super is `a`; in `a/b/mod.rs` (module a::b) super is also `a`.
        let mut base: Vec<String> = module.to_vec();
        let _ = is_mod_rs;
        base.pop();
        let mut rest = &code[i + "super::".len()..];
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        let mut p = base;
        p.extend(segs(rest));
        p.truncate(2);
        if !p.is_empty() {
            out.insert(p);
        }
    }
    out
}

#[test]
fn imports_follow_the_layer_order_and_have_no_cycles() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 20, "found the source files");
    let rank = |layer: &str| LAYERS.iter().position(|l| *l == layer);
    let mut wrong = Vec::new();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        let Some(layer) = module.first() else {
            continue; // lib.rs, main.rs
        };
        let Some(own) = rank(layer) else {
            wrong.push(format!("{}: not in a declared layer", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("readable source");
        let is_mod = file.ends_with("mod.rs");
        let from = module
            .iter()
            .take(2)
            .cloned()
            .collect::<Vec<_>>()
            .join("::");
        for target in imports(&text, &module, is_mod) {
            let Some(to_rank) = rank(&target[0]) else {
                continue; // a local name that is not a layer
            };
            if to_rank > own {
                wrong.push(format!(
                    "{}: `{}` ({}) imports `{}` ({}), a higher layer",
                    file.display(),
                    from,
                    layer,
                    target.join("::"),
                    target[0]
                ));
            }
            let to = target.join("::");
            if to != from && !from.starts_with(&format!("{to}::")) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // Cycles between modules (layer::module), found by depth-first search.
    let mut cycles = BTreeSet::new();
    for start in graph.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                // `store` (the layer's mod.rs) and `store::x` are one node's parent and child.
                if next == start {
                    let mut c = path.clone();
                    let min = c.iter().min().cloned().unwrap_or_default();
                    let at = c.iter().position(|x| *x == min).unwrap_or(0);
                    c.rotate_left(at);
                    cycles.insert(c.join(" -> "));
                } else if !path.contains(next) && path.len() < 12 {
                    let mut p = path.clone();
                    p.push(next.clone());
                    stack.push((next.clone(), p));
                }
            }
        }
    }
    for c in &cycles {
        wrong.push(format!("import cycle: {c}"));
    }
    assert!(
        wrong.is_empty(),
        "layer order {:?} broken:\n{}",
        LAYERS,
        wrong.join("\n")
    );
}
