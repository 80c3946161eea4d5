"""deploy/multihost.py refuses arguments it cannot run with before it builds anything (and
without root, so these run everywhere)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "multihost.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("multihost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "0"], "--replicas 0: give 2..252"),
        (["--replicas", "1"], "--replicas 1: give 2..252"),
        (["--replicas", "253"], "--replicas 253: give 2..252"),
        (["--poll-interval", "0"], "--poll-interval 0.0: give a number of seconds above 0"),
        (["--poll-interval", "nan"], "--poll-interval nan"),
        (["--load-seconds", "-1"], "--load-seconds -1.0"),
    ],
)
def test_arguments_it_cannot_run_with_are_one_usage_line(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    script = _script()
    # As if not root: should the check ever go, the script stops at its root check instead of
    # building namespaces on the machine that runs the tests.
    monkeypatch.setattr(script.os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
