"""The plugin side of serving, as its host sees it: the identity a plugin accepts."""

from __future__ import annotations

import pytest

from connectplugin import Code, ConnectError
from connectplugin.gen.connectplugin.v1 import plugininfo_pb2
from connectplugin.gen.connectplugin.v1.plugininfo_connect import PluginIdentityClient
from tests.helpers import provider_ids, provider_process

# --- runtime identity -------------------------------------------------------------------------


def test_a_plugin_refuses_a_second_runtime_identity_without_its_current_token(host):
    client = host.launch(provider_process("svc"), name="p")
    identity = PluginIdentityClient(client.rpc)
    request = plugininfo_pb2.SetRuntimeIdentityRequest(
        runtime_id="intruder", runtime_token="t" * 32, host_url="http://127.0.0.1:9"
    )

    with pytest.raises(ConnectError) as e:
        identity.set_runtime_identity(request, timeout=5)

    assert e.value.code is Code.PERMISSION_DENIED
    assert provider_ids(host, "svc") == [host.runtime_id(client)]
