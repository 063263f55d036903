"""A "plugin" that never says where it listens: it prints its pid on stderr and sleeps."""

import os
import sys
import time

if __name__ == "__main__":
    print(f"silent: pid {os.getpid()}", file=sys.stderr, flush=True)
    time.sleep(60)
