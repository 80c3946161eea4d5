"""Reads deploy/Dockerfile and .dockerignore the way the tests need them: the install step, entry
point, command, health check and user of each image, so that the tests run what the recipe
says rather than a copy of it that could drift."""

from __future__ import annotations

import fnmatch
import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[str]:
    out: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    return out


def stages(path: Path = DOCKERFILE) -> dict[str, Stage]:
    result: dict[str, Stage] = {}
    current: Stage | None = None
    for line in _logical_lines(path.read_text()):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            assert len(words) == 3 and words[1].upper() == "AS", f"unnamed stage: {line}"
            current = Stage(words[2], words[0])
            result[current.name] = current
        elif current is not None:
            current.instructions.append((keyword, args.strip()))
    return result


def inherited(all_stages: dict[str, Stage], name: str, keyword: str) -> str | None:
    """An instruction as the image built from stage ``name`` ends up with (parents included)."""
    stage: Stage | None = all_stages[name]
    while stage is not None:
        value = stage.last(keyword)
        if value is not None:
            return value
        stage = all_stages.get(stage.parent)
    return None


def exec_form(value: str | None) -> list[str]:
    """ENTRYPOINT/CMD/HEALTHCHECK CMD must be JSON arrays: no shell between the signal and the
    process."""
    assert value is not None
    parsed = json.loads(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), value
    return parsed


def healthcheck_command(all_stages: dict[str, Stage], name: str) -> list[str]:
    value = inherited(all_stages, name, "HEALTHCHECK")
    assert value is not None, f"no HEALTHCHECK for {name}"
    _, _, command = value.partition("CMD ")
    return exec_form(command)


def install_step(all_stages: dict[str, Stage], name: str) -> list[str]:
    """The install.sh command line of the build stage whose venv image ``name`` copies."""
    copies = [c for c in all_stages[name].all("COPY") if c.startswith("--from=")]
    assert len(copies) == 1, copies
    build = copies[0].split()[0].removeprefix("--from=")
    runs = [r for r in all_stages[build].all("RUN") if "deploy/install.sh" in r]
    assert len(runs) == 1, runs
    words = shlex.split(runs[0])
    while "=" in words[0] and not words[0].startswith("/"):  # VAR=value prefixes
        words.pop(0)
    return words


def copy_context(dest: Path) -> Path:
    """Copy what .dockerignore lets into the build context: an allow-list (``*`` first, then
    ``!path`` entries, then exclusion globs). The test installs from this copy, so a file the
    build needs but the context leaves out fails here, not in someone's docker build."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore must start with '*' (an allow-list)"
    allowed = [line[1:].rstrip("/") for line in lines[1:] if line.startswith("!")]
    excluded = [line.removeprefix("**/") for line in lines[1:] if not line.startswith("!")]

    def ignore(_dir: str, names: list[str]) -> list[str]:
        return [n for n in names if any(fnmatch.fnmatch(n, pat) for pat in excluded)]

    for rel in allowed:
        src = ROOT / rel
        if not src.exists():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=ignore)
        else:
            shutil.copy2(src, target)
    return dest
