"""Container health check: exit 0 when ``GET /health/ready`` answers 200, else 1.

    python healthcheck.py [URL]

The default URL is ``http://127.0.0.1:$LONGHAUL_PORT/health/ready`` (port 8000 when unset).
Standard library only, so the image needs no curl; proxies from the environment are ignored
because the check is always local.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    port = os.environ.get("LONGHAUL_PORT", "8000")
    url = args[0] if args else f"http://127.0.0.1:{port}/health/ready"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # 503 while models load
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    if status != 200:
        sys.stderr.write(f"unhealthy: {url} answered {status}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
