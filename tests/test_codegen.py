"""Code generation: real protoc runs, checked against the committed output and by importing it."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import connectplugin
from connectplugin.codegen import PROJECT_TARGETS, CodegenError, generate
from connectplugin.codegen.__main__ import main
from tests.kvget.gen.kvget.v1.kvget_connect import KV_GET_SERVICE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def kv(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("samples.kv.gen.kv.v1.kv_connect")


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.mark.parametrize("target", PROJECT_TARGETS, ids=lambda t: t.package)
def test_committed_output_matches_a_fresh_run(target, tmp_path):
    generate(target.proto_path, tmp_path / "out", target.package)
    fresh, committed = _tree(tmp_path / "out"), _tree(target.out)
    stale = sorted(
        name
        for name in fresh.keys() | committed.keys()
        if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"{target.out} is stale, run `make proto`: {stale}"


def test_kv_service_description(kv):
    methods = kv.KV_SERVICE.methods
    assert kv.KV_SERVICE.name == "kv.v1.KVService"
    assert list(methods) == ["Get", "Put", "Delete", "Watch"]
    assert [m.path for m in methods.values()] == [
        "/kv.v1.KVService/Get",
        "/kv.v1.KVService/Put",
        "/kv.v1.KVService/Delete",
        "/kv.v1.KVService/Watch",
    ]
    # Go's testdata declares no idempotency level on Get: POST only, never retried on a timeout.
    assert [m.idempotent for m in methods.values()] == [False, False, False, False]
    assert KV_GET_SERVICE.methods["Get"].idempotent  # tests/kvget declares NO_SIDE_EFFECTS
    assert [m.server_streaming for m in methods.values()] == [False, False, False, True]
    assert methods["Get"].input is kv.kv_pb2.GetRequest
    assert methods["Watch"].output is kv.kv_pb2.WatchEvent


def test_kv_plugin_definition(kv):
    plugin = kv.KV_PLUGIN
    assert (plugin.name, plugin.version, plugin.service_path) == (
        "kv",
        "1.0.0",
        "/kv.v1.KVService/",
    )
    assert plugin.service is kv.KV_SERVICE
    assert (plugin.client, plugin.handler) == (kv.KVServiceClient, kv.KVServiceHandler)
    assert kv.KVServiceHandler.service is kv.KV_SERVICE
    assert (
        kv.KVServiceClient.watch.__doc__
        == "Changes to keys under a prefix, in the order they happen."
    )


def test_framework_plugin_names():
    from connectplugin.gen.connectplugin.v1 import (
        handshake_connect,
        lifecycle_connect,
        plugininfo_connect,
    )

    assert handshake_connect.HANDSHAKE_PLUGIN.name == "handshake"
    assert lifecycle_connect.PLUGIN_CONTROL_PLUGIN.name == "plugin_control"
    # Message types from another file come from that file's module.
    method = plugininfo_connect.PLUGIN_IDENTITY_SERVICE.methods["GetPluginInfo"]
    assert method.output.DESCRIPTOR.fields_by_name[
        "provides"
    ].message_type.full_name == ("connectplugin.v1.ServiceDeclaration")
    assert hasattr(plugininfo_connect.PluginIdentityClient, "get_plugin_info")


@pytest.mark.parametrize(
    ("rpc", "kind"),
    [
        ("rpc Chat(stream Ping) returns (stream Ping);", "bidirectional streaming"),
        ("rpc Chat(stream Ping) returns (Ping);", "client streaming"),
    ],
)
def test_client_and_bidi_streaming_are_refused(rpc, kind, tmp_path):
    proto = tmp_path / "protos" / "chat.proto"
    proto.parent.mkdir()
    proto.write_text(
        f'syntax = "proto3";\npackage chat;\nmessage Ping {{}}\nservice Chat {{ {rpc} }}\n'
    )
    with pytest.raises(
        CodegenError,
        match=rf"chat\.Chat\.Chat is {kind}; .*only unary and server-streaming",
    ):
        generate(tmp_path / "protos", tmp_path / "out", "")
    assert not (tmp_path / "out").exists()


def test_handler_base_answers_unimplemented(kv):
    with pytest.raises(connectplugin.ConnectError) as caught:
        kv.KVServiceHandler().get(kv.kv_pb2.GetRequest(key="a"), None)
    assert caught.value.code == connectplugin.Code.UNIMPLEMENTED
    assert "kv.v1.KVService.Get" in caught.value.message


USER_PROTOS = {
    "money/v1/money.proto": """
        syntax = "proto3";
        package money.v1;
        message Money { string currency = 1; int64 units = 2; }
    """,
    "shop/v1/item.proto": """
        syntax = "proto3";
        package shop.v1;
        import "money/v1/money.proto";
        message Item { string sku = 1; money.v1.Money price = 2; }
    """,
    "shop/v1/catalog.proto": """
        syntax = "proto3";
        package shop.v1;
        import "google/protobuf/empty.proto";
        import "shop/v1/item.proto";
        message GetItemRequest { string sku = 1; }
        service CatalogService {
          rpc GetItem(GetItemRequest) returns (Item);
          rpc ListItems(google.protobuf.Empty) returns (stream Item);
        }
    """,
}


def test_user_protos_import_each_other_under_their_prefix(tmp_path, monkeypatch):
    for name, text in USER_PROTOS.items():
        path = tmp_path / "protos" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    generate(tmp_path / "protos", tmp_path / "acme" / "gen", "acme.gen")
    monkeypatch.syspath_prepend(str(tmp_path))
    catalog = importlib.import_module("acme.gen.shop.v1.catalog_connect")
    item_pb2 = sys.modules["acme.gen.shop.v1.item_pb2"]

    get_item = catalog.CATALOG_SERVICE.methods["GetItem"]
    assert get_item.output is item_pb2.Item
    assert (
        catalog.CATALOG_SERVICE.methods["ListItems"].input.DESCRIPTOR.full_name
        == "google.protobuf.Empty"
    )
    assert get_item.output(price={"currency": "EUR", "units": 3}).price.units == 3
    assert item_pb2.Item.__module__ == "acme.gen.shop.v1.item_pb2"
    assert (catalog.CATALOG_PLUGIN.name, catalog.CATALOG_PLUGIN.version) == (
        "catalog",
        "1.0.0",
    )


def test_output_directory_not_ours_is_not_replaced(tmp_path):
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "a.proto").write_text('syntax = "proto3";\nmessage A {}\n')
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "precious.py").write_text("")
    with pytest.raises(CodegenError, match="not generated by connectplugin.codegen"):
        generate(tmp_path / "protos", tmp_path / "src", "")
    assert (tmp_path / "src" / "precious.py").exists()


def test_files_of_deleted_protos_are_removed(tmp_path):
    protos = tmp_path / "protos"
    protos.mkdir()
    for name in ("a", "b"):
        (protos / f"{name}.proto").write_text(
            f'syntax = "proto3";\nmessage {name.upper()} {{}}\n'
        )
    generate(protos, tmp_path / "out", "")
    (protos / "b.proto").unlink()
    assert generate(protos, tmp_path / "out", "") == [
        "__init__.py",
        "a_pb2.py",
        "a_pb2.pyi",
    ]
    assert not (tmp_path / "out" / "b_pb2.py").exists()


def test_cli_prints_the_refusal_and_exits_nonzero(tmp_path, capsys):
    (tmp_path / "chat.proto").write_text(
        'syntax = "proto3";\nmessage P {}\nservice Chat { rpc Talk(stream P) returns (stream P); }\n'
    )
    assert (
        main(
            [
                "--proto-path",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
                "chat.proto",
            ]
        )
        == 1
    )
    assert "Chat.Talk is bidirectional streaming" in capsys.readouterr().err


# --- Typing: generated code and dispense(KV_PLUGIN) under mypy --strict ----------------------

# connectplugin's own modules are read for their types but not judged (follow_imports=silent),
# as mypy treats an installed package; the generated modules and the user's files are strict.
STRICT_CONFIG = """\
[mypy]
strict = True
[mypy-connectplugin,connectplugin.rpc.*,connectplugin.runtime.*,connectplugin.host.*]
follow_imports = silent
"""

TYPED_USER = """\
from typing import Any

from connectplugin import PluginClient
from samples.kv.gen.kv.v1 import kv_pb2
from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN, KVServiceClient


def value(plugin: PluginClient) -> bytes:
    kv: KVServiceClient = plugin.dispense(KV_PLUGIN)
    for event in plugin.dispense(KV_PLUGIN).watch(kv_pb2.WatchRequest(prefix="a")):
        print(event.key)
    return plugin.dispense(KV_PLUGIN).get(kv_pb2.GetRequest(key="a")).value + kv.put(
        kv_pb2.PutRequest(key="a", value=b"1")
    ).SerializeToString()


def by_name(plugin: PluginClient) -> Any:
    return plugin.dispense("kv").anything_goes()
"""

# Each line the type checker must refuse, with the error code it must give.
MISUSES = {
    'plugin.dispense(KV_PLUGIN).get(kv_pb2.PutRequest(key="a"))': "arg-type",
    'plugin.dispense(KV_PLUGIN).fetch(kv_pb2.GetRequest(key="a"))': "attr-defined",
    'n: int = plugin.dispense(KV_PLUGIN).get(kv_pb2.GetRequest(key="a")).value': "assignment",
    'plugin.dispense(KV_PLUGIN).watch(kv_pb2.WatchRequest()).key': "attr-defined",
}


def test_generated_code_and_typed_dispense_pass_mypy_strict_and_misuse_fails(tmp_path):
    (tmp_path / "mypy.ini").write_text(STRICT_CONFIG)
    (tmp_path / "typed_user.py").write_text(TYPED_USER)
    misuse = [
        "from connectplugin import PluginClient",
        "from samples.kv.gen.kv.v1 import kv_pb2",
        "from samples.kv.gen.kv.v1.kv_connect import KV_PLUGIN",
        "",
        "",
        "def misuse(plugin: PluginClient) -> None:",
        *(f"    {line}" for line in MISUSES),
    ]
    (tmp_path / "misuse.py").write_text("\n".join(misuse) + "\n")
    first_misuse = misuse.index("def misuse(plugin: PluginClient) -> None:") + 2

    result = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--config-file", "mypy.ini",
            # mypy's own cache (it invalidates what changed): a cold run takes ~20 s
            "--cache-dir", str(ROOT / ".mypy_cache" / "strict-codegen"), "--no-error-summary",
            "typed_user.py", "misuse.py",
            str(ROOT / "connectplugin" / "gen"), str(ROOT / "samples" / "kv" / "gen"),
        ],
        cwd=tmp_path, env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    expected = {
        f"misuse.py:{first_misuse + n}": code for n, code in enumerate(MISUSES.values())
    }
    found = {line.split(": error:")[0]: line for line in errors}
    assert set(found) == set(expected), result.stdout + result.stderr
    for where, code in expected.items():
        assert found[where].endswith(f"[{code}]"), found[where]


# --- protoc-gen-connectplugin: the installed protoc plugin, as protoc and buf run it ----------


def _protoc(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from grpc_tools import protoc

    plugin = Path(sys.executable).parent / "protoc-gen-connectplugin"  # the console script
    return subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={tmp_path / 'protos'}",
            f"--proto_path={Path(protoc.__file__).parent / '_proto'}",
            f"--plugin=protoc-gen-connectplugin={plugin}", *args,
        ],
        capture_output=True, text=True, timeout=60,
    )


def _write_protos(root: Path, protos: dict[str, str]) -> list[str]:
    for name, text in protos.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return [str(root / name) for name in protos]


def test_protoc_with_the_installed_plugin_writes_what_codegen_writes(tmp_path):
    files = _write_protos(tmp_path / "protos", USER_PROTOS)
    (tmp_path / "protoc").mkdir()
    done = _protoc(
        tmp_path, f"--connectplugin_out={tmp_path / 'protoc'}", "--connectplugin_opt=package=acme.gen", *files
    )
    generate(tmp_path / "protos", tmp_path / "codegen", "acme.gen")

    assert (done.returncode, done.stderr) == (0, "")
    connect = {k: v for k, v in _tree(tmp_path / "codegen").items() if k.endswith("_connect.py")}
    assert list(connect) == ["shop/v1/catalog_connect.py"]
    assert _tree(tmp_path / "protoc") == connect


def test_protoc_shows_the_plugins_refusal_and_fails(tmp_path):
    files = _write_protos(
        tmp_path / "protos",
        {"chat.proto": 'syntax = "proto3";\nmessage P {}\nservice Chat { rpc Talk(stream P) returns (stream P); }\n'},
    )
    done = _protoc(tmp_path, f"--connectplugin_out={tmp_path}", *files)

    assert done.returncode != 0
    assert "Chat.Talk is bidirectional streaming" in done.stderr
