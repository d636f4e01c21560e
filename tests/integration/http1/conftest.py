"""Every test here runs on asyncio's event loop and on uvloop's, the one `mlproxy extproc`
runs on: the HTTP/1.1 client's protocol callbacks differ between the two."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
