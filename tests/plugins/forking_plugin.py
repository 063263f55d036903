"""A KV plugin that starts a helper process which inherits its stdout and stderr.

The helper outlives the plugin by up to two seconds, so the host sees the plugin exit
while its output pipes are still open (as with any plugin that spawns workers).
"""

import subprocess
import sys

from instrumented import HANDSHAKE, PLUGINS, InstrumentedStore

from connectplugin import Health, serve

if __name__ == "__main__":
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"], stdin=subprocess.DEVNULL)
    health = Health()
    serve(PLUGINS, {"kv": InstrumentedStore(health)}, handshake=HANDSHAKE, health=health)
