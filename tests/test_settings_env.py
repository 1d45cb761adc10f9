"""The settings read the environment strictly: a value a helper does not know is an
``ImproperlyConfigured`` naming the variable, never a silent default; and the development
tools are installed only where ``MEMFUSE_TOOLS`` says."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from memfuse_project.env import envbool, envfloat, envint


@pytest.mark.parametrize("value", ["flase", "enabled", "2", "tru e"])
def test_envbool_refuses_an_unknown_word(monkeypatch, value):
    """A mistyped boolean ("flase") stops the start with the variable's name, not read as false."""
    monkeypatch.setenv("MEMFUSE_PROBE", value)
    with pytest.raises(ImproperlyConfigured, match="MEMFUSE_PROBE"):
        envbool("MEMFUSE_PROBE", False)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("TRUE", True),
        (" yes ", True),
        ("On", True),
        ("0", False),
        ("False", False),
        ("no", False),
        ("OFF", False),
    ],
)
def test_envbool_reads_the_words_it_knows(monkeypatch, value, expected):
    """1/0, true/false, yes/no and on/off, in any case and with spaces around, are read."""
    monkeypatch.setenv("MEMFUSE_PROBE", value)
    assert envbool("MEMFUSE_PROBE", not expected) is expected


def test_unset_or_empty_gives_the_default(monkeypatch):
    """An unset or empty variable gives each helper's default."""
    monkeypatch.delenv("MEMFUSE_PROBE", raising=False)
    assert envbool("MEMFUSE_PROBE", True) is True
    assert envint("MEMFUSE_PROBE", 7) == 7
    monkeypatch.setenv("MEMFUSE_PROBE", "")
    assert envfloat("MEMFUSE_PROBE", 0.5) == 0.5


@pytest.mark.parametrize(
    ("helper", "value"), [(envint, "ten"), (envint, "1.5"), (envfloat, "fast"), (envfloat, "nan"), (envfloat, "inf")]
)
def test_numbers_refuse_what_is_not_one(monkeypatch, helper, value):
    """An int or float variable that does not parse (or is not finite) names the variable."""
    monkeypatch.setenv("MEMFUSE_PROBE", value)
    with pytest.raises(ImproperlyConfigured, match="MEMFUSE_PROBE"):
        helper("MEMFUSE_PROBE", 1)


def test_numbers_are_read(monkeypatch):
    """A well-formed int or float is read as that number."""
    monkeypatch.setenv("MEMFUSE_PROBE", " 42 ")
    assert envint("MEMFUSE_PROBE", 1) == 42
    assert envfloat("MEMFUSE_PROBE", 1.0) == 42.0


def manage_commands(**env: str) -> set[str]:
    """The command names ``manage.py help --commands`` lists with ``env`` added (and no
    ``MEMFUSE_TOOLS`` of the caller's)."""
    inherited = {key: value for key, value in os.environ.items() if key != "MEMFUSE_TOOLS"}
    root = Path(__file__).resolve().parent.parent
    listed = subprocess.run(
        [sys.executable, "manage.py", "help", "--commands"],
        cwd=root,
        env={**inherited, "DJANGO_SETTINGS_MODULE": "memfuse_project.settings", "SECRET_KEY": "x", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    return set(listed.stdout.split())


TOOL_COMMANDS = {"memfuse_bench", "soak_bench", "interfaces_bench", "admin_screenshot", "chat_screenshot"}
OPERATOR_COMMANDS = {"create_tenant", "create_api_key", "import_memory", "reembed", "mcp_stdio", "locomo_eval"}


def test_the_tools_are_installed_only_where_memfuse_tools_says():
    """With MEMFUSE_TOOLS off, manage.py knows the operator commands and none of the tools';
    in a source checkout, by default, it knows both."""
    without = manage_commands(MEMFUSE_TOOLS="off")
    assert OPERATOR_COMMANDS <= without and not TOOL_COMMANDS & without
    assert TOOL_COMMANDS | OPERATOR_COMMANDS <= manage_commands()
