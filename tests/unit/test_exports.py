"""Each shared module declares its public names, and they exist."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import shared

MODULES = [m.name for m in pkgutil.iter_modules(shared.__path__, "shared.") if not m.name.split(".")[-1].startswith("_")]


@pytest.mark.parametrize("name", MODULES)
def test_module_all_is_declared_and_resolves(name: str) -> None:
    """__all__ exists and every name in it is defined."""
    module = importlib.import_module(name)
    assert hasattr(module, "__all__"), f"{name} has no __all__"
    for export in module.__all__:
        assert hasattr(module, export), f"{name}.__all__ names missing {export}"


@pytest.mark.parametrize("name", ["shared.protocol", "shared.session", "shared.sse", "shared.subjects", "shared.errors", "shared.settings", "shared.messages"])
def test_core_imports_no_io_library(name: str) -> None:
    """The pure core imports none of asyncio, nats, redis, httpx or starlette."""
    source = importlib.import_module(name).__file__
    assert source is not None
    text = Path(source).read_text()
    for library in ("asyncio", "nats", "redis", "httpx", "starlette"):
        assert f"import {library}" not in text and f"from {library}" not in text, (name, library)
