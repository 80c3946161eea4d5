"""The examples in docs/*.md and README.md run, against a live server.

A fenced block runs when the line just before its fence is ``<!-- test -->``:

* ``python`` blocks run in order, one namespace per file (so later blocks may use what earlier
  ones defined), with ``FERRY_TARGET`` set in their globals to the test server's inference
  address, ``FERRY_MANAGEMENT_TARGET`` to its management address (uploads, conversions) and
  ``FERRY_HTTP_TARGET`` to its inference HTTP listener (the Open Inference Protocol's REST form);
* ``console`` blocks run each ``$ ferry ...`` line through ``ferry.cli.main`` and expect exit
  status 0; both variables are also set in the environment, where the CLI reads its defaults.

The server serves the repository a user gets from the README's commands (``make demo``, ``make
serve``: the Makefile's ``example-repo`` step, ``python -m ferry.server.examples``), not the test
suite's own: an example that needs a model the user does not have fails here too. Everything runs
in a temporary working directory, so examples may write files freely.
"""

from __future__ import annotations

import re
import shlex
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serverutil import ServerThread

from ferry.server import examples

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- test -->"
FENCE = re.compile(r"^```(\w+)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str


def runnable_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        marked = i > 0 and lines[i - 1].strip() == MARK
        if marked:
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            blocks.append(Block(path, i + 1, m.group(1), code))
        i = end + 1
    return blocks


def doc_files() -> list[Path]:
    return [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


DOCS_WITH_EXAMPLES = [p for p in doc_files() if p.is_file() and runnable_blocks(p)]
# Examples that run a real conversion (torch export in a child process: seconds, not
# milliseconds), marked like the other tests that export with torch.
SLOW_DOCS = {"conversion.md", "README.md"}


@pytest.fixture
def readme_server(tmp_path: Path) -> Iterator[ServerThread]:
    """A server on the repository `make example-repo` writes (what `make serve` serves)."""
    repository = tmp_path / "model-repository"
    assert examples.main(["--repository", str(repository)]) == 0
    with ServerThread(repository) as srv:
        yield srv


def test_the_readme_repository_is_what_the_docs_use(readme_server: ServerThread) -> None:
    """The models the docs' examples name are the ones `make serve` serves, and only those."""
    from ferry.client import InferenceClient

    with InferenceClient(readme_server.target) as client:
        served = {m.name for m in client.list_models()}
    assert served == set(examples.DEFAULT_EXAMPLES)
    used = set()
    for path in DOCS_WITH_EXAMPLES:
        for block in runnable_blocks(path):
            used |= set(re.findall(r'(?:infer|model_metadata|statistics)\("(\w+)"', block.code))
            used |= set(re.findall(r"\$ ferry (?:infer|models \w+) (\w+)", block.code))
    used = {name for name in used if not name.startswith("no_such")}  # the error examples
    assert used and used <= served, f"docs use models `make serve` does not serve: {used - served}"


def run_console(block: Block) -> None:
    from ferry.cli import main

    for raw in block.code.splitlines():
        line = raw.strip()
        if not line.startswith("$ ferry "):
            continue
        argv = shlex.split(line[len("$ ferry ") :], comments=True)
        code = main(argv)
        assert code == 0, f"{block.path.name}:{block.line}: `ferry {' '.join(argv)}` -> {code}"


def test_marked_blocks_are_found() -> None:
    """The harness itself: a marker before a fence makes a block runnable, nothing else does."""
    sample = ROOT / "docs" / "sdk.md"
    assert sample in DOCS_WITH_EXAMPLES
    assert all(
        b.lang in ("python", "console") for p in DOCS_WITH_EXAMPLES for b in runnable_blocks(p)
    )


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_DOCS else p
        for p in DOCS_WITH_EXAMPLES
    ],
    ids=lambda p: p.name,
)
def test_doc_examples_run(
    path: Path, readme_server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = readme_server
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("FERRY_TARGET", server.target)
    monkeypatch.setenv("FERRY_MANAGEMENT_TARGET", server.management_target)
    namespace: dict[str, Any] = {
        "__name__": "__docs__",
        "FERRY_TARGET": server.target,
        "FERRY_MANAGEMENT_TARGET": server.management_target,
        "FERRY_HTTP_TARGET": server.http_target,
    }
    for block in runnable_blocks(path):
        where = f"{path.relative_to(ROOT)}:{block.line}"
        if block.lang == "python":
            exec(compile(block.code, where, "exec"), namespace)
        elif block.lang == "console":
            run_console(block)
        else:
            pytest.fail(f"{where}: cannot run a {block.lang!r} block; mark python or console")
