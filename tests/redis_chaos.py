"""A chaos worker of a simulated host: ``python -m tests.redis_chaos CONFIG_JSON``.

Calls random keys of KEYS until the ``stop`` file exists. fn records each execution (key and a fresh
token) in ``runs`` before it returns ``key:token``; each call's outcome goes to ``out`` as one line:
``key value`` or ``key !ErrorType``.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from pathlib import Path

import mpflight


def main() -> None:
    config = json.loads(sys.argv[1])
    d = Path(config["dir"])
    rng = random.Random(config["seed"])
    group = mpflight.Group(config["name"], redis=config["url"], host_id=config["host"], timeout=10.0,
                           lease=1.0, redis_timeout=0.5)  # fmt: skip
    runs = os.open(d / "runs", os.O_WRONLY | os.O_APPEND)
    out = os.open(d / "out", os.O_WRONLY | os.O_APPEND)

    def fn(key: str) -> str:
        token = uuid.uuid4().hex
        os.write(runs, f"{key} {token}\n".encode())
        time.sleep(rng.random() * 0.03)
        return f"{key}:{token}"

    while not (d / "stop").exists():
        key = f"k{rng.randrange(config['keys'])}"
        try:
            line = f"{key} {group.do(key, fn, key)}\n"
        except (mpflight.AbortError, TimeoutError, mpflight.MPFlightError) as e:
            line = f"{key} !{type(e).__name__}\n"
        os.write(out, line.encode())
    group.close()


if __name__ == "__main__":
    main()
