"""A plugin that dies before it serves: a last word on stderr, then an uncaught exception."""

import sys

if __name__ == "__main__":
    print("crash_on_start: cannot open /nonexistent/config.toml", file=sys.stderr, flush=True)
    raise RuntimeError("plugin failed to initialise")
