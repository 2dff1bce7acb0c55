//! `docker build` without a Docker engine: no engine runs on the development machines, so this
//! test assembles exactly the files the Dockerfile's build stage sees and runs cargo on them.
//!
//! 1. `.dockerignore` is applied to the repository's files as Docker applies it (patterns
//!    anchored at the context's root, `*` and `?` within a path segment, `**` for any number of
//!    segments, `!` to let a path back in, the last matching line winning, a pattern matching a
//!    directory matching everything below it).
//! 2. The `COPY` lines of the build stage (the stage the runtime stage copies the binary from)
//!    are replayed into a temp dir, relative to the stage's `WORKDIR`; a source that is missing
//!    or ignored fails, as `docker build` would.
//! 3. `cargo check --locked --offline` runs in that `WORKDIR` (the registry cache is already
//!    populated by the normal build; `CARGO_TARGET_DIR` is the project's `target/`, whose
//!    dependencies `cargo clippy` has checked already, so only the package itself is checked;
//!    the release profile would need the same files). A file the build needs but no `COPY` brings,
//!    a manifest target without its source or an `include_str!` of a file left out, fails here.
//!
//! Also: `.dockerignore` keeps `target/`, `data/` (master key, admin token), `.git` and the
//! benchmark results out of the context.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// .dockerignore
// ---------------------------------------------------------------------------------------------

struct Pattern {
    segments: Vec<String>,
    exception: bool,
}

struct Ignore {
    patterns: Vec<Pattern>,
}

impl Ignore {
    fn parse(text: &str) -> Ignore {
        let mut patterns = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (exception, pattern) = match line.strip_prefix('!') {
                Some(rest) => (true, rest.trim()),
                None => (false, line),
            };
            assert!(
                !pattern.contains('[') && !pattern.contains('\\'),
                ".dockerignore: character classes and escapes are not modelled here: {line}"
            );
            let segments: Vec<String> = pattern
                .trim_start_matches('/')
                .trim_end_matches('/')
                .split('/')
                .filter(|s| !s.is_empty() && *s != ".")
                .map(str::to_string)
                .collect();
            for s in &segments {
                assert!(
                    s == "**" || !s.contains("**"),
                    ".dockerignore: `**` is modelled only as a whole path segment: {line}"
                );
            }
            patterns.push(Pattern {
                segments,
                exception,
            });
        }
        Ignore { patterns }
    }

    /// Is `path` (relative, `/`-separated) left out of the build context?
    fn excludes(&self, path: &str) -> bool {
        let segments: Vec<&str> = path.split('/').collect();
        let mut excluded = false;
        for pattern in &self.patterns {
            // The pattern matches the path or one of its parent directories.
            let hit =
                (1..=segments.len()).any(|n| match_segments(&pattern.segments, &segments[..n]));
            if hit {
                excluded = !pattern.exception;
            }
        }
        excluded
    }

    /// Could an exception let back in something below the excluded directory `dir`?
    fn may_include_below(&self, dir: &str) -> bool {
        let segments: Vec<&str> = dir.split('/').collect();
        self.patterns
            .iter()
            .filter(|p| p.exception)
            .any(|p| prefix_may_match(&p.segments, &segments))
    }
}

fn match_segments(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| match_segments(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((segment, path_rest)) => glob(first, segment) && match_segments(rest, path_rest),
            None => false,
        },
    }
}

/// Could a path below `dir` match `pattern`?
fn prefix_may_match(pattern: &[String], dir: &[&str]) -> bool {
    match (pattern.split_first(), dir.split_first()) {
        (_, None) => true,
        (None, Some(_)) => true, // the pattern matched a parent of `dir`
        (Some((first, _)), _) if first == "**" => true,
        (Some((first, rest)), Some((segment, dir_rest))) => {
            glob(first, segment) && prefix_may_match(rest, dir_rest)
        }
    }
}

/// `*` (any run of characters) and `?` (one character) within one path segment.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    go(&p, &t)
}

fn dockerignore() -> Ignore {
    let text = fs::read_to_string(repo().join(".dockerignore"))
        .expect(".dockerignore is missing: the whole checkout (target/, data/) would be sent");
    Ignore::parse(&text)
}

/// Every file of the build context: the repository directory as it is on disk (untracked
/// files too, as Docker sends them) minus what `.dockerignore` leaves out. Paths relative,
/// `/`-separated, sorted.
fn context_files(ignore: &Ignore) -> Vec<String> {
    fn walk(root: &Path, rel: &str, ignore: &Ignore, out: &mut Vec<String>) {
        let dir = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                if !ignore.excludes(&path) || ignore.may_include_below(&path) {
                    walk(root, &path, ignore, out);
                }
            } else if !ignore.excludes(&path) {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&repo(), "", ignore, &mut files);
    files.sort();
    files
}

// ---------------------------------------------------------------------------------------------
// Dockerfile
// ---------------------------------------------------------------------------------------------

struct Stage {
    name: Option<String>,
    /// (instruction in upper case, arguments) in order.
    instructions: Vec<(String, String)>,
}

/// The Dockerfile's stages, with continuation lines joined and comments dropped.
fn stages() -> Vec<Stage> {
    let text = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if !current.is_empty() && trimmed.starts_with('#') {
            continue; // a comment inside a continued instruction
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                logical.push(std::mem::take(&mut current));
            }
        }
    }
    let mut stages: Vec<Stage> = Vec::new();
    for line in logical {
        let (instruction, args) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
        let (instruction, args) = (instruction.to_ascii_uppercase(), args.trim().to_string());
        if instruction == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            let name = match words.as_slice() {
                [.., as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                _ => None,
            };
            stages.push(Stage {
                name,
                instructions: vec![(instruction, args)],
            });
        } else {
            stages
                .last_mut()
                .expect("an instruction before the first FROM")
                .instructions
                .push((instruction, args));
        }
    }
    stages
}

/// The stage the binary is built in: the one the last stage copies from.
fn build_stage(stages: &[Stage]) -> &Stage {
    let last = stages.last().expect("a FROM line");
    let from = last
        .instructions
        .iter()
        .filter(|(i, _)| i == "COPY")
        .find_map(|(_, args)| {
            args.split_whitespace()
                .find_map(|w| w.strip_prefix("--from="))
        })
        .expect("the runtime stage copies the binary with COPY --from=");
    stages
        .iter()
        .find(|s| s.name.as_deref() == Some(from))
        .unwrap_or_else(|| panic!("no stage named {from}"))
}

struct Copy {
    sources: Vec<String>,
    dest: String,
}

/// The build stage's `COPY` lines from the context (not `--from=` another stage), with their
/// destinations made absolute against the `WORKDIR` in force; and the final `WORKDIR`.
fn context_copies(stage: &Stage) -> (Vec<Copy>, String) {
    let mut workdir = "/".to_string();
    let mut copies = Vec::new();
    for (instruction, args) in &stage.instructions {
        match instruction.as_str() {
            "WORKDIR" => {
                workdir = if args.starts_with('/') {
                    args.clone()
                } else {
                    format!("{}/{args}", workdir.trim_end_matches('/'))
                }
            }
            "ADD" => panic!("the build stage uses ADD ({args}); only COPY is modelled here"),
            "COPY" => {
                let words: Vec<String> = if args.starts_with('[') {
                    serde_json::from_str(args).expect("COPY [\"src\", …, \"dest\"]")
                } else {
                    args.split_whitespace().map(str::to_string).collect()
                };
                if words.iter().any(|w| w.starts_with("--from=")) {
                    continue;
                }
                let words: Vec<String> =
                    words.into_iter().filter(|w| !w.starts_with("--")).collect();
                let (dest, sources) = words.split_last().expect("COPY SRC… DEST");
                assert!(!sources.is_empty(), "COPY {args}: no source");
                let dest = if dest.starts_with('/') {
                    dest.clone()
                } else {
                    format!("{}/{dest}", workdir.trim_end_matches('/'))
                };
                copies.push(Copy {
                    sources: sources.to_vec(),
                    dest,
                });
            }
            _ => {}
        }
    }
    (copies, workdir)
}

/// `rel` of a container path inside `root` (the temp dir standing for the image's `/`).
fn in_root(root: &Path, container_path: &str) -> PathBuf {
    let mut path = root.to_path_buf();
    for part in container_path
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
    {
        assert_ne!(part, "..", "{container_path}");
        path.push(part);
    }
    path
}

/// Replays the copies into `root` as Docker would from a context of `files`; returns what was
/// copied, as container paths.
fn replay(copies: &[Copy], files: &[String], root: &Path) -> Vec<String> {
    let mut copied = Vec::new();
    for copy in copies {
        let into_dir = copy.dest.ends_with('/') || copy.sources.len() > 1;
        for source in &copy.sources {
            assert!(
                !source.contains(['*', '?']),
                "COPY {source}: wildcards are not modelled here"
            );
            let source = source
                .trim_start_matches("./")
                .trim_start_matches('/')
                .trim_end_matches('/');
            let mut found = false;
            for file in files {
                let target = if file == source {
                    if into_dir {
                        format!(
                            "{}/{}",
                            copy.dest.trim_end_matches('/'),
                            file.rsplit('/').next().unwrap()
                        )
                    } else {
                        copy.dest.clone()
                    }
                } else if let Some(below) = file.strip_prefix(&format!("{source}/")) {
                    format!("{}/{below}", copy.dest.trim_end_matches('/'))
                } else {
                    continue;
                };
                found = true;
                let to = in_root(root, &target);
                fs::create_dir_all(to.parent().unwrap()).unwrap();
                fs::copy(repo().join(file), &to).unwrap();
                copied.push(target);
            }
            assert!(
                found,
                "COPY {source}: not in the build context (missing from the repository, or left \
                 out by .dockerignore); `docker build` would fail here"
            );
        }
    }
    copied
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn dockerignore_keeps_build_output_secrets_and_history_out() {
    let ignore = dockerignore();
    for path in [
        "target/release/stepgate",
        "target/debug/deps/x.rlib",
        "data/master.key",
        "data/admin.token",
        "data/stepgate.db",
        ".git/HEAD",
        ".git",
        "bench/results/20261201T165141Z-auth.md",
        "src/secrets/twilio.token",
        "src/test.db",
        "certs/gateway.pem",
        "certs/gateway.key",
        ".env",
    ] {
        assert!(
            ignore.excludes(path),
            ".dockerignore lets {path} into the build context"
        );
    }
    // What the build needs gets through (the COPY test below checks every source).
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "src/main.rs",
        "src/secrets.rs",
        "assets/security/app.js",
    ] {
        assert!(!ignore.excludes(path), ".dockerignore leaves out {path}");
    }
    // And on the disk as it is now (the worktree may hold target/ and data/).
    let files = context_files(&ignore);
    for file in &files {
        for forbidden in ["target/", "data/", ".git/", "bench/results/"] {
            assert!(
                !file.starts_with(forbidden),
                "{file} is in the build context"
            );
        }
        assert!(file != ".git", ".git is in the build context");
    }
}

#[test]
fn the_build_stage_compiles_from_exactly_the_files_its_copy_lines_bring() {
    let stages = stages();
    assert!(stages.len() >= 2, "a multi-stage build");
    let stage = build_stage(&stages);
    let runs: Vec<&str> = stage
        .instructions
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "the build stage runs `cargo build --release --locked`, which this test mirrors: {runs:?}"
    );

    // The Rust image is at least the manifest's rust-version.
    let (_, from) = &stage.instructions[0];
    let image = from.split_whitespace().next().unwrap();
    let version = image
        .strip_prefix("rust:")
        .and_then(|v| v.split('-').next())
        .unwrap_or_else(|| panic!("the build stage is FROM rust:VERSION…: {image}"));
    let manifest = fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let wanted = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"'))
        .expect("rust-version in Cargo.toml");
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    assert!(
        parse(version) >= parse(wanted),
        "{image} is older than rust-version {wanted}"
    );

    let ignore = dockerignore();
    let files = context_files(&ignore);
    let (copies, workdir) = context_copies(stage);
    let root = tempfile::tempdir().unwrap();
    let copied = replay(&copies, &files, root.path());
    for file in &copied {
        assert!(
            !file.contains("/data/") && !file.contains("/target/"),
            "{file} reaches the build stage"
        );
    }

    let build_dir = in_root(root.path(), &workdir);
    // The project's own target directory: after `cargo clippy` (CI runs it first) or any
    // earlier run of this test the dependencies are checked already, so only the package
    // itself is (its path differs, so its artifacts do not touch the project's own).
    let target_dir = repo().join("target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(cargo)
        .args(["check", "--locked", "--offline"])
        .current_dir(&build_dir)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .output()
        .expect("run cargo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    assert!(
        out.status.success(),
        "cargo check in the Docker build context ({} files copied into {workdir}) failed:\n{}",
        copied.len(),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}
