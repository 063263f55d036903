"""The sample KV plugin, first noting its launch (its pid) in ``$WEBAPP_LAUNCH_LOG`` if set,
so a test counts every launch, even one that a process made and stopped before it looked."""

from __future__ import annotations

import os

from samples.kv import plugin

if __name__ == "__main__":
    log = os.environ.get("WEBAPP_LAUNCH_LOG")
    if log:
        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")
    plugin.main()
