//! socktrace: TCP socket lifecycles per owning process. The binary
//! (`main.rs`) is the command line over this library; the fuzz targets
//! (`fuzz/`) call its parsers.
//!
//! Data flows through one module per stage: `probes` (kernel programs) →
//! `decode` (ring buffer records) → `sockets` (per-socket state and owners)
//! → `watch` (per-process reports) → the views (`output`, `serve`), all of
//! them speaking the records of `model`. `collector` runs the loop between
//! the stages, `pipeline` sets it up, and `commands` has one module per
//! subcommand; `cli` turns the command line into their options.

pub mod cli;
pub mod clock;
pub mod collector;
pub mod commands;
pub mod containers;
pub mod decode;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod privileges;
pub mod probes;
pub mod procfs;
pub mod scope;
pub mod serve;
pub mod sockets;
pub mod tcp;
pub mod text;
pub mod watch;

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, fs, path::Path};

    const README: &str = include_str!("../../README.md");

    /// The paths of the README's layout table: the first cell's backquoted
    /// names, a bare name standing beside the path before it.
    fn layout_paths() -> Vec<String> {
        let table = README
            .split_once("## Layout")
            .expect("README has a layout")
            .1
            .lines()
            .skip_while(|line| !line.starts_with("| path |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'));
        let mut paths = Vec::new();
        for row in table {
            let cell = row.split('|').nth(1).unwrap_or_default();
            let mut dir = String::new();
            for name in cell.split('`').skip(1).step_by(2) {
                if name.contains('/') {
                    dir = name
                        .rsplit_once('/')
                        .map(|(d, _)| d)
                        .unwrap_or("")
                        .to_string();
                    paths.push(name.to_string());
                } else if dir.is_empty() {
                    paths.push(name.to_string());
                } else {
                    paths.push(format!("{dir}/{name}"));
                }
            }
        }
        paths
    }

    #[test]
    fn the_readme_layout_matches_the_tree() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let paths = layout_paths();
        for path in &paths {
            assert!(
                root.join(path).exists(),
                "README names {path}, which does not exist"
            );
        }
        let listed: BTreeSet<&str> = paths.iter().map(|p| p.trim_end_matches('/')).collect();
        for entry in fs::read_dir(root.join("tracer-user/src")).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let path = format!("tracer-user/src/{name}");
            let inside = listed.iter().any(|p| p.starts_with(&format!("{path}/")));
            assert!(
                listed.contains(path.as_str()) || inside,
                "the README's layout does not name {path}"
            );
        }
    }
}
