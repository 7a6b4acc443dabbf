//! The documentation a newcomer reads first: the README stays short, every relative link in the
//! README and in docs/ reaches a file of this repository, nothing points outside it, the README
//! links every page of docs/, and the commands CI runs are the README's own.

use std::path::{Component, Path, PathBuf};

/// The README's size limit, in bytes: the depth belongs in docs/.
const README_MAX_BYTES: u64 = 15 * 1024;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every `docs/*.md`, as paths under `root`.
fn documents(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    if let Ok(entries) = std::fs::read_dir(root.join("docs")) {
        let mut pages: Vec<PathBuf> =
            entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "md")).collect();
        pages.sort();
        files.extend(pages);
    }
    files
}

/// Markdown text with fenced code blocks blanked and inline code spans removed, line by line,
/// so that `[from, to)` in code is not taken for a link.
fn prose_lines(text: &str) -> Vec<String> {
    let mut fenced = false;
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                fenced = !fenced;
                return String::new();
            }
            if fenced {
                return String::new();
            }
            // Even-numbered pieces between backticks are prose; odd ones are code spans.
            line.split('`').step_by(2).collect::<Vec<_>>().join(" ")
        })
        .collect()
}

/// Every link target in `text`, with its line number: inline links `[text](target "title")`,
/// reference definitions `[name]: target`, and HTML `href="…"`/`src="…"`.
fn link_targets(text: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    for (index, line) in prose_lines(text).iter().enumerate() {
        let number = index + 1;
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push((number, after[..end].to_string()));
            rest = &after[end..];
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') && !trimmed.starts_with("[^") {
            if let Some(close) = trimmed.find("]:") {
                targets.push((number, trimmed[close + 2..].to_string()));
            }
        }
        for attribute in ["href=\"", "src=\""] {
            let mut rest = line.as_str();
            while let Some(at) = rest.find(attribute) {
                let after = &rest[at + attribute.len()..];
                let end = after.find('"').unwrap_or(after.len());
                targets.push((number, after[..end].to_string()));
                rest = &after[end..];
            }
        }
    }
    targets
}

/// `path` with `.` and `..` resolved lexically; `None` when `..` climbs above its start.
fn normalize(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Some(out)
}

/// What is wrong with one link target found in `file` (under `root`), if anything: a link
/// that mentions `../shared`, a relative link that leaves the repository, or one whose file is
/// missing. Links with a scheme (`https:`, `mailto:`) and links to an anchor of the same page
/// are not files and are not checked here.
fn problem(root: &Path, file: &Path, raw: &str) -> Option<String> {
    let target = raw.trim().trim_start_matches('<');
    let target = target.split(|c: char| c.is_whitespace() || c == '>').next().unwrap_or("");
    if raw.contains("../shared") {
        return Some(format!("{raw:?} points outside the repository (../shared)"));
    }
    let (path, fragment) = target.split_once('#').unwrap_or((target, ""));
    let path = path.split('?').next().unwrap_or("");
    let has_scheme = path.split_once(':').is_some_and(|(scheme, _)| {
        !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
    });
    if has_scheme {
        return None;
    }
    if path.starts_with('/') {
        return Some(format!("{raw:?} is an absolute path: links must be relative to the page"));
    }
    let page = if path.is_empty() {
        file.to_path_buf()
    } else {
        let relative = file.parent().unwrap_or(Path::new("")).strip_prefix(root).unwrap_or(Path::new("")).join(path);
        match normalize(&relative) {
            None => return Some(format!("{raw:?} leaves the repository")),
            Some(inside) if !root.join(&inside).exists() => return Some(format!("{raw:?}: {} does not exist", inside.display())),
            Some(inside) => root.join(inside),
        }
    };
    let is_markdown = page.extension().is_some_and(|x| x == "md");
    if !fragment.is_empty() && is_markdown {
        let text = std::fs::read_to_string(&page).unwrap_or_default();
        if !heading_slugs(&text).iter().any(|slug| slug == fragment) {
            return Some(format!("{raw:?}: {} has no heading #{fragment}", page.strip_prefix(root).unwrap_or(&page).display()));
        }
    }
    None
}

/// The anchors a Markdown renderer gives the headings of `text`, GitHub's way: lower case,
/// punctuation dropped (but `-` and `_`), spaces as hyphens.
fn heading_slugs(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut slugs = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let Some(title) = line.strip_prefix('#').filter(|_| !fenced) else { continue };
        let title = title.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        slugs.push(slug);
    }
    slugs
}

/// Every link problem of every document under `root`, as `file:line: problem`.
fn link_problems(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for file in documents(root) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            problems.push(format!("{}: cannot be read", file.display()));
            continue;
        };
        let name = file.strip_prefix(root).unwrap_or(&file).display().to_string();
        if text.contains("../shared") {
            problems.push(format!("{name}: mentions ../shared, which is outside the repository"));
        }
        for (line, raw) in link_targets(&text) {
            if let Some(problem) = problem(root, &file, &raw) {
                problems.push(format!("{name}:{line}: {problem}"));
            }
        }
    }
    problems
}

#[test]
fn readme_is_at_most_15_kib() {
    let size = std::fs::metadata(root().join("README.md")).expect("README.md exists").len();
    assert!(size <= README_MAX_BYTES, "README.md is {size} bytes; at most {README_MAX_BYTES}: move the depth to docs/");
}

#[test]
fn every_relative_link_reaches_a_file_of_the_repository() {
    let problems = link_problems(&root());
    assert!(problems.is_empty(), "broken or outside links:\n{}", problems.join("\n"));
}

/// The README is read in a clone, often offline: its links stay inside the repository (the
/// pages of docs/ may cite upstream projects).
#[test]
fn the_readme_and_docs_link_only_inside_the_repository() {
    let mut outside = Vec::new();
    for path in documents(&root()) {
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.strip_prefix(root()).unwrap().display().to_string();
        outside.extend(
            link_targets(&text)
                .into_iter()
                .filter(|(_, target)| target.contains("://") || target.trim().starts_with("mailto:"))
                .map(|(line, target)| format!("{name}:{line}: {target}")),
        );
    }
    assert!(outside.is_empty(), "the docs link outside the repository:\n{}", outside.join("\n"));
}

#[test]
fn the_readme_links_every_page_of_docs() {
    let root = root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let linked: Vec<String> = link_targets(&readme).into_iter().map(|(_, t)| t.split('#').next().unwrap_or("").to_string()).collect();
    let pages: Vec<PathBuf> = documents(&root).into_iter().skip(1).collect();
    assert!(pages.len() >= 6, "docs/ should hold the contract, architecture, HTTP API, durability, cluster and performance pages");
    for page in pages {
        let relative = page.strip_prefix(&root).unwrap().display().to_string();
        assert!(linked.contains(&relative), "README.md does not link {relative}");
    }
}

/// .ci/run runs the README's commands exactly as a new user types them.
#[test]
fn ci_runs_the_readme_commands() {
    let root = root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    let commands: Vec<&str> = ci.lines().map(str::trim).filter(|l| l.starts_with("cargo ")).collect();
    assert!(!commands.is_empty(), ".ci/run runs no cargo command");
    for command in commands {
        assert!(readme.contains(command), "README.md does not show `{command}`, which .ci/run runs");
    }
}

/// The checker itself finds each kind of bad link, and passes good ones, in a scratch tree.
#[test]
fn the_link_checker_catches_each_kind_of_bad_link() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::create_dir_all(root.join("datasets")).unwrap();
    std::fs::write(root.join("datasets/README.md"), "x").unwrap();
    std::fs::write(
        root.join("README.md"),
        "# Top\n[ok](datasets/README.md) [page](docs/a.md#a-page-heading) [web](https://example.com/x) [here](#top)\n\
         `[code](nowhere.md)` and [gone](missing.md)\n\
         ```\n[fenced](also-nowhere.md)\n```\n",
    )
    .unwrap();
    std::fs::write(
        root.join("docs/a.md"),
        "## A page: heading\n[up](../datasets/README.md) [spec](../../shared/SPEC.md) [out](../../etc/passwd)\n\
         [lost anchor](../README.md#nowhere) [own lost anchor](#bottom)\n\
         [ref]: ../nope.md \"title\"\n<a href=\"../missing.html\">x</a>\n",
    )
    .unwrap();
    let problems = link_problems(root);
    let text = problems.join("\n");
    for expected in ["README.md:3:", "missing.md", "shared", "leaves the repository", "nope.md", "missing.html", "#nowhere", "#bottom"] {
        assert!(text.contains(expected), "expected a problem with {expected:?} in:\n{text}");
    }
    for fine in ["datasets/README.md\"", "example.com", "nowhere.md", "#top", "#a-page-heading"] {
        assert!(!text.contains(fine), "{fine:?} was flagged:\n{text}");
    }
    // README.md:3 (missing.md); docs/a.md: the ../shared mention, the SPEC link, ../../etc, two
    // lost anchors, nope.md, missing.html.
    assert_eq!(problems.len(), 8, "{text}");
}
