"""One caller of a simulated host: ``python -m tests.redis_hosts CONFIG_JSON``.

It calls the key once through ``Group(name, redis=url, host_id=host)``; fn records its execution in
``runs`` (one line: host, pid, fence), waits for the ``gate`` file (or its host's, ``gate-HOST``), then returns or raises as ``mode``
says. The caller appends its outcome to ``out`` as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import mpflight

GATE_WAIT = 60.0  # fn never waits longer than this for its gate: a stuck test ends


def _fn(config: dict[str, Any]) -> Any:
    d = Path(config["dir"])
    with open(d / "runs", "a") as f:
        f.write(f"{config['host']} {os.getpid()} {mpflight.fence()}\n")
    end = time.monotonic() + GATE_WAIT
    gates = (d / "gate", d / f"gate-{config['host']}")
    while not any(g.exists() for g in gates) and time.monotonic() < end:
        time.sleep(0.005)
    mode = config["mode"]
    if mode == "raise":
        raise ValueError(f"boom from {config['host']}")
    if mode == "big":
        return b"x" * (20 * 1024 * 1024)
    return {"key": config["key"], "host": config["host"], "pid": os.getpid()}


def main() -> None:
    config = json.loads(sys.argv[1])
    options = config.get("options", {})
    redis: Any = config["url"]
    if config.get("cluster"):  # a Redis Cluster: a client of this process, made here
        from redis.cluster import ClusterNode, RedisCluster

        redis = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", config["cluster"])], socket_timeout=2)
    group = mpflight.Group(config["name"], redis=redis, host_id=config["host"], **options)
    record: dict[str, Any] = {"host": config["host"], "pid": os.getpid()}
    try:
        result = group.do_ex(config["key"], _fn, config)
        value = result.value
        record.update(
            shared=result.shared, value=f"{len(value)} bytes" if isinstance(value, bytes) else value
        )
    except Exception as e:
        record.update(error=type(e).__name__, message=str(e), notes=getattr(e, "__notes__", []))
    record["stats"] = dict(group.stats())
    group.close()
    with open(Path(config["dir"]) / "out", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
