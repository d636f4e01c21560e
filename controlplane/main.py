"""`mlproxy controlplane`: serve the API with uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from controlplane.app import create_app
from controlplane.settings import Settings, SettingsError

__all__ = ["serve"]

log = logging.getLogger(__name__)


def serve(host: str, port: int) -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as err:
        log.error("control plane cannot start: %s", err)
        return 2
    app = create_app(settings)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return 0
