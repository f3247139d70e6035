"""The documentation says only what the tree holds, and the README's examples run.

- every relative link in README.md and docs/*.md resolves to a file or folder of the
  checkout, and its ``#anchor`` (if any) to a heading of the target page;
- every ``benchmarks/results/...`` path cited exists (a figure comes with its result);
- every repository path cited (``scripts/...``, ``tests/...``, ``sft_kernels/...``, ...)
  exists, in prose and in command blocks alike (the changelog excepted: it names old paths);
- every module run with ``python -m sft_kernels...`` / ``--module sft_kernels...`` exists;
- every docs page is linked from the README, and the README's two commands are the
  Makefile's targets (``.ci/run`` calls ``make test``);
- each ```python block of README.md, and each example block of docs/*.md (one that imports
  something; a bare signature is not run), runs as written, in a fresh process on CPU
  (CUDA hidden), within a time limit.
"""

import glob
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
PAGES = [README] + DOCS
# each README example must finish well inside this on a 2-core machine (seconds each when idle)
EXAMPLE_TIMEOUT_S = 120

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")
# a path of the repository: starts at a top-level folder, not inside a longer path or URL
REPO_PATH = re.compile(r"(?<![\w./$-])((?:\.ci|benchmarks|docs|examples|scripts|sft_kernels|tests)/[\w.*/-]*)")
RESULT_PATH = re.compile(r"benchmarks/results/[^\s`'\")<>{}\]]*")
MODULE = re.compile(r"(?:python -m|--module)\s+(sft_kernels(?:\.\w+)*)(\.<)?")


def _rel(path):
    return os.path.relpath(path, ROOT)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _prose(text):
    """The text without fenced code blocks (links there do not render)."""
    return FENCE.sub("", text)


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path):
    seen, out = {}, set()
    for line in _prose(_read(path)).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _strip(path):
    return path.rstrip(".,:;")


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    bad = []
    for text, target in LINK.findall(_prose(_read(page))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(dest):
            bad.append(f"[{text}]({target}): no {_rel(dest)}")
        elif not dest.startswith(ROOT + os.sep):
            bad.append(f"[{text}]({target}): outside the repository")
        elif anchor and dest.endswith(".md") and anchor not in _anchors(dest):
            bad.append(f"[{text}]({target}): no heading #{anchor} in {_rel(dest)}")
    assert not bad, f"{_rel(page)}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_cited_results_exist(page):
    text = _read(page)
    missing = sorted({_strip(p) for p in RESULT_PATH.findall(text) if not os.path.exists(os.path.join(ROOT, _strip(p)))})
    assert not missing, f"{_rel(page)} cites results that are not committed: {missing}"


@pytest.mark.parametrize("page", [p for p in PAGES if not p.endswith("changelog.md")], ids=_rel)
def test_cited_repository_paths_exist(page):
    missing = set()
    for path in REPO_PATH.findall(_read(page)):
        path = _strip(path)
        if not glob.glob(os.path.join(ROOT, path)):
            missing.add(path)
    assert not missing, f"{_rel(page)} names paths the tree does not have: {sorted(missing)}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_cited_modules_exist(page):
    missing = set()
    for name, placeholder in MODULE.findall(_read(page)):
        if placeholder:  # python -m sft_kernels.bench.<name>
            continue
        base = os.path.join(ROOT, *name.split("."))
        if not (os.path.isfile(base + ".py") or os.path.isfile(os.path.join(base, "__main__.py"))):
            missing.add(name)
    assert not missing, f"{_rel(page)} runs modules that do not exist: {sorted(missing)}"


def test_readme_links_every_docs_page():
    linked = {os.path.normpath(os.path.join(ROOT, t.partition("#")[0])) for _, t in LINK.findall(_prose(_read(README)))}
    unlinked = [_rel(d) for d in DOCS if d not in linked]
    assert DOCS, "docs/ holds no pages"
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_readme_names_the_two_commands():
    text = _read(README)
    assert "make demo" in text and "make test" in text
    targets = re.findall(r"^([\w-]+):", _read(os.path.join(ROOT, "Makefile")), re.M)
    assert {"demo", "test"} <= set(targets), targets
    assert "make test" in _read(os.path.join(ROOT, ".ci", "run"))


def _blocks(page):
    return re.findall(r"^```python\n(.*?)^```", _read(page), re.S | re.M)


BLOCKS = _blocks(README)
# A block that runs only on several ranks under a launcher says so on its first line
# ("# on every rank ..."): it is compiled, not run.
LAUNCHED = re.compile(r"\A# on every rank")
DOC_BLOCKS = [(page, i) for page in DOCS for i, code in enumerate(_blocks(page))
              if re.search(r"^\s*(from|import) ", code, re.M) and not LAUNCHED.match(code)]
LAUNCHED_BLOCKS = [(page, i) for page in DOCS for i, code in enumerate(_blocks(page)) if LAUNCHED.match(code)]


def test_readme_has_examples():
    assert len(BLOCKS) >= 3, "the README shows one example per op and the Hugging Face one"


def _run_block(code, name, tmp_path):
    if re.search(r"^\s*(from|import) transformers\b", code, re.M):
        pytest.importorskip("transformers")
    script = tmp_path / "block.py"
    script.write_text(code)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the package as this interpreter has it
    env.pop("TRITON_INTERPRET", None)
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=EXAMPLE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} ran past {EXAMPLE_TIMEOUT_S} s:\n{code}")
    assert proc.returncode == 0, (f"{name} failed:\n{textwrap.indent(code, '  ')}\n"
                                  f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=lambda i: f"python-block-{i}")
def test_readme_example_runs(index, tmp_path):
    _run_block(BLOCKS[index], f"README.md python block {index}", tmp_path)


@pytest.mark.parametrize("page,index", LAUNCHED_BLOCKS, ids=[f"{_rel(p)}-{i}" for p, i in LAUNCHED_BLOCKS])
def test_docs_launcher_blocks_compile(page, index):
    compile(_blocks(page)[index], f"{_rel(page)} python block {index}", "exec")


@pytest.mark.parametrize("page,index", DOC_BLOCKS, ids=[f"{_rel(p)}-{i}" for p, i in DOC_BLOCKS])
def test_docs_example_runs(page, index, tmp_path):
    _run_block(_blocks(page)[index], f"{_rel(page)} python block {index}", tmp_path)
