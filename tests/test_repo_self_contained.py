"""The repository explains itself: no tracked file points to material a clone does not have
(development notes outside the repository, their numbered checks, tracker issue numbers), and
every relative Markdown link in README.md and docs/ resolves to a file of the repository.
Method math, byte model and measurement advice live in docs/ (docs/README.md is the index)."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# What a reader of a clone cannot follow. The patterns are precise on purpose: "shared memory"
# or "shared by" are fine, a path that starts with shared/ (or ../shared) is not.
FORBIDDEN = {
    "the external specification file": re.compile(r"ALGORITHMS\.md", re.I),
    "a path into a folder outside the repository": re.compile(
        r"(?<![\w.\-/])(?:\.\./)*shared/", re.I),
    "the specification's numeric check scripts": re.compile(
        r"spec_checks|(?<![\w/])checks/\w+\.py", re.I),
    "a seed document of the specification": re.compile(r"\bseed 00\d\b", re.I),
    "a development issue number": re.compile(r"\bissues?\s*#?\s*\d+", re.I),
}

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:   # not a git checkout
        pytest.skip(f"git ls-files is unavailable here: {exc}")
    return [p for p in out.decode().split("\0") if p]


def _text(path: Path):
    """The file's text, or None for a binary or missing file (a tracked file deleted in the
    working tree, or a submodule)."""
    try:
        data = path.read_bytes()
    except (IsADirectoryError, FileNotFoundError):
        return None
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_pointer_outside_the_repository():
    offenders = []
    for rel in _tracked_files():
        if rel == THIS:
            continue                      # this file must spell the patterns out
        text = _text(ROOT / rel)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    offenders.append(f"{rel}:{lineno}: {what}: {line.strip()[:120]}")
    assert not offenders, ("tracked files point outside the repository (explain it in docs/ "
                           "and point there instead):\n" + "\n".join(offenders))


def test_the_patterns_can_fail():
    """Each pattern catches the kind of line it is meant for and spares the legitimate uses."""
    bad = ["see ../shared/ALGORITHMS.md section 4", "(shared/GPU.md)", "issue 4's targets",
           "Issue #12", "checks/verify.py test 3", "shared/spec_checks/bytes2.py",
           "seed 003 Alg. 1"]
    good = ["Triton shared memory", "the shared subspace primitives", "shared by all methods",
            "lowrank_fused/testing/parity.py", "an issue with bf16", "bench/shared_cache.py"]
    for line in bad:
        assert any(p.search(line) for p in FORBIDDEN.values()), line
    for line in good:
        assert not any(p.search(line) for p in FORBIDDEN.values()), line


def _markdown_files():
    files = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [f for f in files if f.is_file()]


def test_docs_exist():
    for page in ("docs/README.md", "docs/bytes.md", "docs/backends.md", "docs/gpu.md",
                 "docs/conventions.md", "docs/methods/galore.md",
                 "docs/methods/adaptive_adamw.md", "docs/methods/adarankgrad.md",
                 "docs/methods/ldadam.md", "docs/methods/adamem.md", "docs/methods/adapm.md",
                 "docs/methods/adamw.md", "docs/methods/adafactor.md"):
        assert (ROOT / page).is_file(), f"{page} is missing"


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_markdown_links_resolve(md):
    """Each relative link names a tracked file (or a folder holding one): what a clone has."""
    tracked = set(_tracked_files())
    folders = {p.rsplit("/", i)[0] for p in tracked for i in range(1, p.count("/") + 1)}
    broken = []
    text = md.read_text(encoding="utf-8")
    for lineno, line in enumerate(text.splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue                  # a URL, mailto: or an anchor in the same page
            path = (md.parent / target.split("#", 1)[0]).resolve()
            try:
                rel = path.relative_to(ROOT).as_posix()
            except ValueError:
                rel = None                # outside the repository
            if rel is None or (rel not in tracked and rel not in folders and rel != "."):
                broken.append(f"{md.relative_to(ROOT)}:{lineno}: {target}")
    assert not broken, ("relative links to files a clone does not have (missing or not "
                        "tracked):\n" + "\n".join(broken))


def test_link_pattern_finds_links():
    """The link pattern finds inline links, links with a title, images and URLs."""
    line = 'a [page](docs/x.md#part), ![plot](p.png "t"), [`code`](y.md) and [url](https://e.x)'
    assert LINK.findall(line) == ["docs/x.md#part", "p.png", "y.md", "https://e.x"]
