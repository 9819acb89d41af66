"""``python -m service --store STORE [--host H] [--port P]``: serve a model store over HTTP."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from model_store import StoreNotFoundError
from service.app import create_app
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__)
    parser.add_argument(
        "--store", type=Path, help="model store root (default: LONGHAUL_STORE or ./models)"
    )
    parser.add_argument("--host", help="bind address (default: LONGHAUL_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: LONGHAUL_PORT or 8000)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    settings = Settings(**overrides)  # environment first, command line wins
    try:
        app = create_app(settings)
    except StoreNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The service writes its own access line per request (service/api/logs.py); in JSON mode
    # uvicorn's loggers keep no handlers of their own and go through the service's JSON root.
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, log_config=None if settings.log_format == "json" else LOGGING_CONFIG,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
