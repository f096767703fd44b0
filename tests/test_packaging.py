"""What a new user meets first: the README's opening lines, the files the README and
pyproject name, the license, and ``limiter.http`` without its extra."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import fakeredis
import pytest

from limiter import APILimits, Limiter

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
#: What the README says before its first section: what a user reads to install.
OPENING = README.split("\n## ", 1)[0]


def test_the_opening_lines_name_every_extra_and_a_one_line_redis() -> None:
    """Every extra a user may want (``dev`` is the project's own) is named as
    ``fleetlimit[<extra>]`` or ``[<extra>]`` before the first section, with a pip line for
    the two the SDK integration needs, and a local Redis comes in one command."""
    extras = set(PYPROJECT["project"]["optional-dependencies"]) - {"dev"}
    assert {"openai", "mcp", "chatbot"} <= extras
    for extra in extras:
        assert f"[{extra}]" in OPENING, f"the README's opening does not name [{extra}]"
    for extra in ("openai", "mcp"):
        assert re.search(rf"^pip install '\S*fleetlimit\[{extra}\]'", OPENING, re.MULTILINE)
    assert "`pip install 'fleetlimit[openai]'`" in OPENING
    redis_lines = [
        line
        for line in OPENING.splitlines()
        if line.startswith(("docker run", "redis-server", "podman run"))
    ]
    assert redis_lines == [
        "docker run -d -p 127.0.0.1:6379:6379 redis:7   # a local Redis (or: redis-server "
        "--bind 127.0.0.1)"
    ]
    assert 'Limiter.from_url("redis://127.0.0.1:6379/0"' in OPENING  # the Redis just started


#: A file name with one of these extensions, in prose or code (``test_*.py`` globs too).
_FILE = re.compile(r"(?<![\w/.:*-])[\w./*-]*[\w*]\.(?:md|py|toml|ya?ml|json|txt|lua|cfg|ini|sh)\b")


@pytest.mark.parametrize("name", ["README.md", "pyproject.toml"])
def test_every_file_named_exists(name: str) -> None:
    """The README and pyproject name only files a clone has (no DESIGN.md, API.md or
    ../shared): relative to the root, ``tests/`` or ``limiter/lua/``; absolute paths
    (``/etc/ssl/...``) and URLs are examples, not files of the project."""
    text = (ROOT / name).read_text(encoding="utf-8")
    text = re.sub(r"\w+://\S+", " ", text)  # URLs
    missing = []
    for found in sorted(set(_FILE.findall(text))):
        if found.startswith("/"):
            continue
        bases = [ROOT, ROOT / "tests", ROOT / "limiter" / "lua"]
        if not any(list(base.glob(found)) for base in bases):
            missing.append(found)
    assert missing == []
    assert "../shared" not in text


def test_the_license_is_the_mit_license_pyproject_declares() -> None:
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert PYPROJECT["project"]["license"] == "MIT"
    assert license_text.startswith("MIT License\n\nCopyright (c) ")
    authors = [author["name"] for author in PYPROJECT["project"]["authors"]]
    holder = license_text.splitlines()[2]
    copyright_line = re.fullmatch(r"Copyright \(c\) 20\d\d (.+)", holder)
    assert copyright_line is not None, holder
    assert copyright_line[1] == ", ".join(authors)
    assert "Permission is hereby granted, free of charge" in license_text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in license_text


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_limiter_http_without_its_extra_names_the_extra() -> None:
    """Without httpx2 (neither extra installed: simulated, the module blocked in
    sys.modules), ``from limiter.http import ...`` fails with an ImportError naming the
    extras; the limiter itself and its command line still import."""
    blocked = "import sys; sys.modules['httpx2'] = None; "
    done = _python(blocked + "from limiter.http import openai_client")
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ImportError: limiter.http needs the 'openai' or 'mcp' extra (httpx2 is not "
        "installed): pip install 'fleetlimit[openai]' (or 'fleetlimit[mcp]')"
    )
    assert "ModuleNotFoundError: import of httpx2 halted" in done.stderr  # the cause, kept
    done = _python(
        blocked + "import limiter, limiter.cli; from limiter import Limiter; print('ok')"
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_limiter_http_with_httpx2_broken_says_what_httpx2_says() -> None:
    """A broken httpx2 (one of its own imports missing) is not mistaken for a missing extra."""
    done = _python("import sys; sys.modules['idna'] = None; import limiter.http")
    assert done.returncode == 1
    assert "fleetlimit[" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        "ModuleNotFoundError: import of idna halted; None in sys.modules"
    )


async def test_each_sdk_factory_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """``openai_client`` without openai (installed with [mcp] only) and ``zapier_mcp``
    without mcp (installed with [openai] only) name the extra that brings them."""
    from limiter.http import openai_client, zapier_mcp

    redis = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    lim = Limiter(redis, {"openai": APILimits(max_concurrent=1), "zapier": APILimits()})
    try:
        monkeypatch.setitem(sys.modules, "openai", None)
        with pytest.raises(ImportError) as info:
            openai_client(lim, api_key="sk-test")
        assert str(info.value) == (
            "openai_client needs the 'openai' extra (openai is not installed): "
            "pip install 'fleetlimit[openai]'"
        )
        assert isinstance(info.value.__cause__, ModuleNotFoundError)
        monkeypatch.setitem(sys.modules, "mcp", None)
        with pytest.raises(ImportError) as info:
            async with zapier_mcp(lim, "http://127.0.0.1:9/mcp", "token"):
                pass
        assert str(info.value) == (
            "zapier_mcp needs the 'mcp' extra (mcp is not installed): pip install 'fleetlimit[mcp]'"
        )
    finally:
        await lim.aclose()
        await redis.aclose()
