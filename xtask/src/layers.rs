//! `cargo xtask layers`: the modules of relay-userspace and what each imports from the
//! others (`use crate::...` and inline `crate::module::` paths), in layers from the bottom;
//! fails on an import cycle, naming the modules in it and the files that close it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// Module -> (module it imports -> files that import it).
pub type Imports = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

pub fn run() -> anyhow::Result<()> {
    let src = crate::util::workspace_root().join("relay-userspace/src");
    let imports = read(&src)?;
    match layers(&imports) {
        Ok(layers) => {
            println!(
                "relay-userspace modules in layers, lowest first (each imports only from the layers before it):"
            );
            for (depth, modules) in layers.iter().enumerate() {
                println!("  {depth:>2}  {}", modules.join(", "));
            }
            Ok(())
        }
        Err(cycle) => bail!("{}", describe(&imports, &cycle)),
    }
}

/// Reads every `.rs` file under `src` except the binaries.
pub fn read(src: &Path) -> anyhow::Result<Imports> {
    let mut imports = Imports::new();
    let mut files = Vec::new();
    collect(src, &mut files)?;
    for file in files {
        let relative = file.strip_prefix(src).expect("under src");
        if relative.starts_with("bin") {
            continue;
        }
        let module = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .map(|name| name.trim_end_matches(".rs").to_owned())
            .expect("a file name");
        if module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let entry = imports.entry(module.clone()).or_default();
        for target in imported_modules(&text) {
            if target != module {
                entry
                    .entry(target)
                    .or_default()
                    .insert(relative.display().to_string());
            }
        }
    }
    Ok(imports)
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect(&path, files)?;
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// The top-level modules a file names after `crate::`: in `use crate::{a::x, b}` (nested
/// braces included) and in paths like `crate::c::y` anywhere. Comments are skipped.
pub fn imported_modules(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut modules = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        // `$crate::`, `my_crate::`: not this crate.
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest_trimmed = rest.trim_start();
        if let Some(group) = rest_trimmed.strip_prefix('{') {
            let mut depth = 1;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if depth == 1 && c == ',' {
                    modules.extend(first_identifier(&item));
                    item.clear();
                } else {
                    item.push(c);
                }
            }
            modules.extend(first_identifier(&item));
        } else {
            modules.extend(first_identifier(rest_trimmed));
        }
    }
    modules
}

fn first_identifier(text: &str) -> Option<String> {
    let name: String = text
        .trim_start()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty() && name != "self").then_some(name)
}

/// The modules in layers (layer 0 imports nothing of the others; layer n only from layers
/// below), or a cycle.
pub fn layers(imports: &Imports) -> Result<Vec<Vec<String>>, Vec<String>> {
    let modules: BTreeSet<&String> = imports
        .keys()
        .chain(imports.values().flat_map(|targets| targets.keys()))
        .collect();
    let mut depth: BTreeMap<&String, usize> = BTreeMap::new();
    while depth.len() < modules.len() {
        let before = depth.len();
        for module in &modules {
            if depth.contains_key(module) {
                continue;
            }
            let targets = imports.get(*module);
            let placed: Option<Vec<usize>> = targets
                .map(|targets| targets.keys().map(|t| depth.get(t).copied()).collect())
                .unwrap_or(Some(Vec::new()));
            if let Some(below) = placed {
                depth.insert(module, below.into_iter().map(|d| d + 1).max().unwrap_or(0));
            }
        }
        if depth.len() == before {
            let left: BTreeSet<&String> = modules
                .iter()
                .copied()
                .filter(|m| !depth.contains_key(m))
                .collect();
            return Err(find_cycle(imports, &left));
        }
    }
    let mut layers: Vec<Vec<String>> = Vec::new();
    for (module, d) in depth {
        if layers.len() <= d {
            layers.resize(d + 1, Vec::new());
        }
        layers[d].push(module.clone());
    }
    Ok(layers)
}

/// One cycle among `left` (modules that could not be placed): walk imports inside `left`
/// until a module repeats.
fn find_cycle(imports: &Imports, left: &BTreeSet<&String>) -> Vec<String> {
    let start = *left.iter().next().expect("something is left");
    let mut path: Vec<&String> = vec![start];
    loop {
        let current = *path.last().expect("not empty");
        let next = imports
            .get(current)
            .and_then(|targets| targets.keys().find(|t| left.contains(t)))
            .expect("a module that cannot be placed imports another that cannot");
        if let Some(at) = path.iter().position(|m| *m == next) {
            let mut cycle: Vec<String> = path[at..].iter().map(|m| (*m).clone()).collect();
            cycle.push(next.clone());
            return cycle;
        }
        path.push(next);
    }
}

fn describe(imports: &Imports, cycle: &[String]) -> String {
    let mut text = format!("import cycle: {}", cycle.join(" -> "));
    for pair in cycle.windows(2) {
        let files = &imports[&pair[0]][&pair[1]];
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        text.push_str(&format!(
            "\n  {} -> {}: {}",
            pair[0],
            pair[1],
            files.join(", ")
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_lines_and_inline_paths_are_read() {
        let text = "use crate::{\n    calls::{Calls, events::CallEvent},\n    datapath::{self, table::FlowTable},\n    time::monotonic_ns,\n};\nuse crate::paths;\n// crate::commented::out\nfn f() { crate::turn::driver::x(); $crate::not::this(); }\n";
        let modules: Vec<String> = imported_modules(text).into_iter().collect();
        assert_eq!(modules, ["calls", "datapath", "paths", "time", "turn"]);
    }

    #[test]
    fn a_cycle_is_found_and_named() {
        fn add(imports: &mut Imports, from: &str, to: &str) {
            imports
                .entry(from.into())
                .or_default()
                .entry(to.into())
                .or_default()
                .insert(format!("{from}.rs"));
        }
        let mut imports = Imports::new();
        add(&mut imports, "calls", "datapath");
        add(&mut imports, "turn", "datapath");
        add(&mut imports, "calls", "turn");
        assert_eq!(
            layers(&imports).unwrap(),
            [vec!["datapath"], vec!["turn"], vec!["calls"]]
        );
        add(&mut imports, "datapath", "calls");
        let cycle = layers(&imports).unwrap_err();
        assert_eq!(cycle.first(), cycle.last());
        assert!(cycle.contains(&"datapath".to_owned()), "{cycle:?}");
        assert!(describe(&imports, &cycle).contains("datapath -> calls: datapath.rs"));
    }

    /// The real thing: relay-userspace has no import cycle between its modules.
    #[test]
    fn relay_userspace_modules_have_no_import_cycle() {
        let src = crate::util::workspace_root().join("relay-userspace/src");
        let imports = read(&src).unwrap();
        assert!(imports.len() > 5, "read the modules: {imports:?}");
        if let Err(cycle) = layers(&imports) {
            panic!("{}", describe(&imports, &cycle));
        }
    }
}
