"""The protoc plugin: a ``<name>_connect.py`` beside each ``<name>_pb2.py`` that declares services.

protoc runs it as ``protoc-gen-connectplugin``: a CodeGeneratorRequest arrives on stdin, a
CodeGeneratorResponse leaves on stdout. One option, ``package=PREFIX``, names the Python package
the generated tree is imported under (``--connectplugin_opt=package=connectplugin.gen``).

Each module holds, per service, the runtime description (``Service``/``Method``), a typed client,
a handler base class whose methods answer UNIMPLEMENTED, and a ``Plugin`` binding the three.
"""

from __future__ import annotations

import keyword
import re
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf import descriptor_pb2
from google.protobuf.compiler import plugin_pb2

from connectplugin.rpc.service import snake_case

LINE_LENGTH = 88
"""What ruff format would allow; the layout helpers below follow its choices."""

_NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
# Field numbers in descriptor.proto, for finding comments in SourceCodeInfo.
_SERVICE_FIELD = 6
_METHOD_FIELD = 2


class PluginError(Exception):
    """A .proto this plugin cannot generate code for; protoc shows the message to the user."""


def main() -> int:
    request = plugin_pb2.CodeGeneratorRequest.FromString(sys.stdin.buffer.read())
    sys.stdout.buffer.write(generate(request).SerializeToString())
    return 0


def generate(
    request: plugin_pb2.CodeGeneratorRequest,
) -> plugin_pb2.CodeGeneratorResponse:
    """Build the response; errors go into ``response.error``, as the plugin protocol asks."""
    response = plugin_pb2.CodeGeneratorResponse(
        # Only services and methods are read, so field presence and editions features don't matter.
        supported_features=plugin_pb2.CodeGeneratorResponse.FEATURE_PROTO3_OPTIONAL
        | plugin_pb2.CodeGeneratorResponse.FEATURE_SUPPORTS_EDITIONS,
        minimum_edition=descriptor_pb2.EDITION_PROTO2,
        maximum_edition=descriptor_pb2.EDITION_2024,
    )
    try:
        prefix = _parse_parameter(request.parameter)
        files = {f.name: f for f in request.proto_file}
        types = _index_types(request.proto_file)
        for name in request.file_to_generate:
            proto = files[name]
            if proto.service:
                content = _Module(proto, types, prefix).render()
                response.file.add(
                    name=module_name(name).replace(".", "/") + "_connect.py",
                    content=content,
                )
    except PluginError as e:
        del response.file[:]
        response.error = str(e)
    return response


def module_name(proto_name: str) -> str:
    """``kv/v1/kv.proto`` -> ``kv.v1.kv``: protoc's Python module path, without ``_pb2``."""
    return proto_name.removesuffix(".proto").replace("-", "_").replace("/", ".")


def python_module(proto_name: str, prefix: str) -> str:
    """The import path of a file's ``_pb2`` module; well-known types stay under google.protobuf."""
    module = module_name(proto_name) + "_pb2"
    if proto_name.startswith("google/protobuf/") or not prefix:
        return module
    return f"{prefix}.{module}"


def _parse_parameter(parameter: str) -> str:
    prefix = ""
    for item in filter(None, parameter.split(",")):
        key, _, value = item.partition("=")
        if key != "package":
            raise PluginError(
                f"unknown option {item!r}; the only option is package=PREFIX"
            )
        if value and not all(part.isidentifier() for part in value.split(".")):
            raise PluginError(f"package={value!r} is not a dotted Python package name")
        prefix = value
    return prefix


def _index_types(
    files: Iterable[descriptor_pb2.FileDescriptorProto],
) -> dict[str, tuple[str, str]]:
    """Map each fully qualified message name (``.kv.v1.GetRequest``) to (file, Python name)."""
    index: dict[str, tuple[str, str]] = {}

    def add(
        scope: str,
        python: str,
        messages: Iterable[descriptor_pb2.DescriptorProto],
        file: str,
    ) -> None:
        for message in messages:
            index[f"{scope}.{message.name}"] = (file, f"{python}{message.name}")
            add(
                f"{scope}.{message.name}",
                f"{python}{message.name}.",
                message.nested_type,
                file,
            )

    for f in files:
        add(f".{f.package}" if f.package else "", "", f.message_type, f.name)
    return index


@dataclass(frozen=True)
class _Names:
    """The Python names one service gets."""

    constant: str  # KV_SERVICE
    plugin_constant: str  # KV_PLUGIN
    plugin: str  # kv
    client: str  # KVServiceClient
    handler: str  # KVServiceHandler

    @classmethod
    def of(cls, service: str) -> _Names:
        base = (
            service[: -len("Service")]
            if service.endswith("Service") and service != "Service"
            else service
        )
        upper = snake_case(base).upper()
        return cls(
            f"{upper}_SERVICE",
            f"{upper}_PLUGIN",
            snake_case(base),
            f"{service}Client",
            f"{service}Handler",
        )


class _Module:
    """Renders the ``_connect.py`` module for one .proto file."""

    def __init__(
        self,
        proto: descriptor_pb2.FileDescriptorProto,
        types: dict[str, tuple[str, str]],
        prefix: str,
    ):
        self.proto = proto
        self.types = types
        self.prefix = prefix
        self.comments = {
            tuple(loc.path): _clean_comment(loc.leading_comments)
            for loc in proto.source_code_info.location
            if loc.leading_comments.strip()
        }
        self._check()
        self.aliases = self._aliases()

    def _check(self) -> None:
        seen: set[str] = set()
        for service in self.proto.service:
            names = _Names.of(service.name)
            for name in (
                names.constant,
                names.plugin_constant,
                names.client,
                names.handler,
            ):
                if name in seen:
                    raise PluginError(
                        f"{self._qualified(service)}: the Python name {name} is taken by another service in {self.proto.name}"
                    )
                seen.add(name)
            attrs: set[str] = set()
            for method in service.method:
                where = f"{self._qualified(service)}.{method.name}"
                if method.client_streaming:
                    kind = (
                        "bidirectional streaming"
                        if method.server_streaming
                        else "client streaming"
                    )
                    raise PluginError(
                        f"{where} is {kind}; Connect over WSGI/HTTP-1.1 carries only unary and "
                        "server-streaming calls"
                    )
                attr = snake_case(method.name)
                if keyword.iskeyword(attr) or attr == "service" or attr in attrs:
                    raise PluginError(
                        f"{where}: its Python name {attr!r} is a keyword, reserved or used twice"
                    )
                attrs.add(attr)

    def _aliases(self) -> dict[str, str]:
        """Local names for the _pb2 modules in use: ``kv_pb2``, or a longer one when two clash."""
        modules = sorted(
            {
                python_module(self.types[t][0], self.prefix)
                for service in self.proto.service
                for method in service.method
                for t in (method.input_type, method.output_type)
            }
        )
        leaves = [m.rpartition(".")[2] for m in modules]
        aliases = {}
        for module, leaf in zip(modules, leaves):
            if leaves.count(leaf) > 1:
                unprefixed = (
                    module.removeprefix(f"{self.prefix}.") if self.prefix else module
                )
                leaf = unprefixed.replace(".", "_")
            aliases[module] = leaf
        return aliases

    def _qualified(self, service: descriptor_pb2.ServiceDescriptorProto) -> str:
        return (
            f"{self.proto.package}.{service.name}"
            if self.proto.package
            else service.name
        )

    def _type(self, type_name: str) -> str:
        file, python = self.types[type_name]
        return f"{self.aliases[python_module(file, self.prefix)]}.{python}"

    def render(self) -> str:
        lines = [
            f"# Generated by connectplugin.codegen from {self.proto.name}. DO NOT EDIT.",
            '"""Service descriptions, typed clients, handler base classes and plugin definitions."""',
            "",
            *self._imports(),
        ]
        for index, service in enumerate(self.proto.service):
            lines += self._service(index, service)
        return "\n".join(lines) + "\n"

    def _imports(self) -> list[str]:
        streaming = any(
            m.server_streaming for s in self.proto.service for m in s.method
        )
        names = "Iterator, Mapping" if streaming else "Mapping"
        third_party: list[str] = []
        first_party = [
            "from connectplugin import rpc",
            "from connectplugin.rpc import Method, Service",
            "from connectplugin.runtime.plugin import Plugin",
        ]
        for module, alias in self.aliases.items():
            parent, _, leaf = module.rpartition(".")
            line = f"from {parent} import {leaf}" if parent else f"import {leaf}"
            if alias != leaf:
                line += f" as {alias}"
            if module.startswith("google.protobuf."):
                third_party.append(line)
            else:
                first_party.append(line)
        # isort's order: plain imports first, then from-imports by module.
        first_party.sort(
            key=lambda line: (line.startswith("from "), line.split()[1].lower())
        )
        sections = [
            ["from __future__ import annotations"],
            [f"from collections.abc import {names}"],
            sorted(third_party),
            first_party,
        ]
        out = []
        for section in sections:
            out += [*section, ""] if section else []
        return out[:-1]

    def _service(
        self, index: int, service: descriptor_pb2.ServiceDescriptorProto
    ) -> list[str]:
        names = _Names.of(service.name)
        qualified = self._qualified(service)
        comment = self.comments.get((_SERVICE_FIELD, index), "")
        docs = [
            self.comments.get((_SERVICE_FIELD, index, _METHOD_FIELD, m), "")
            for m in range(len(service.method))
        ]
        # One blank line after the imports, two between top-level blocks (ruff's layout).
        return [
            *([""] if index == 0 else ["", ""]),
            *self._description(names, qualified, service),
            "",
            "",
            *self._client(names, qualified, comment, service, docs),
            "",
            "",
            *self._handler(names, qualified, comment, service, docs),
            "",
            "",
            *self._plugin(names),
        ]

    def _description(
        self,
        names: _Names,
        qualified: str,
        service: descriptor_pb2.ServiceDescriptorProto,
    ) -> list[str]:
        lines = [
            f"{names.constant} = Service(",
            f'    name="{qualified}",',
            "    methods={",
        ]
        for method in service.method:
            idempotent = method.options.idempotency_level == _NO_SIDE_EFFECTS
            lines += [
                f'        "{method.name}": Method(',
                f'            service="{qualified}",',
                f'            name="{method.name}",',
                f"            input={self._type(method.input_type)},",
                f"            output={self._type(method.output_type)},",
                f"            server_streaming={method.server_streaming},",
                f"            idempotent={idempotent},",
                "        ),",
            ]
        return [*lines, "    },", ")"]

    def _client(
        self,
        names: _Names,
        qualified: str,
        comment: str,
        service: descriptor_pb2.ServiceDescriptorProto,
        docs: list[str],
    ) -> list[str]:
        lines = [
            f"class {names.client}:",
            *_docstring(
                _paragraphs(f"Typed client for ``{qualified}``.", comment), "    "
            ),
            "",
            "    def __init__(self, client: rpc.Client) -> None:",
            "        self._client = client",
        ]
        for method, doc in zip(service.method, docs):
            output = self._type(method.output_type)
            if method.server_streaming:
                returns, call = (
                    f"rpc.ServerStream[{output}]",
                    "call_server_stream",
                )
            else:
                returns, call = output, "call_unary"
            params = [
                "self",
                f"request: {self._type(method.input_type)}",
                "*",
                "timeout: float | None = None",
                "headers: Mapping[str, str | bytes] | None = None",
                "cancel: rpc.CancelToken | None = None",
            ]
            args = [
                f'{names.constant}.methods["{method.name}"]',
                "request",
                "timeout=timeout",
                "headers=headers",
                "cancel=cancel",
            ]
            lines += [
                "",
                *_layout(
                    "    ",
                    f"def {snake_case(method.name)}(",
                    params,
                    f") -> {returns}:",
                ),
                *(_docstring(doc, "        ") if doc else []),
                # Service.methods holds Method[Any, Any]: the annotated local gives the
                # unary answer its type without a cast (mypy --strict: no Any returned).
                *(
                    _layout("        ", f"return self._client.{call}(", args, ")")
                    if method.server_streaming
                    else [
                        *_layout(
                            "        ",
                            f"response: {output} = self._client.{call}(",
                            args,
                            ")",
                        ),
                        "        return response",
                    ]
                ),
            ]
        return lines

    def _handler(
        self,
        names: _Names,
        qualified: str,
        comment: str,
        service: descriptor_pb2.ServiceDescriptorProto,
        docs: list[str],
    ) -> list[str]:
        doc = _paragraphs(
            f"Base class for ``{qualified}`` implementations.",
            comment,
            "Subclass it and override the methods you serve; the others answer UNIMPLEMENTED.",
        )
        lines = [
            f"class {names.handler}:",
            *_docstring(doc, "    "),
            "",
            f"    service = {names.constant}",
        ]
        for method, doc in zip(service.method, docs):
            output = self._type(method.output_type)
            returns = f"Iterator[{output}]" if method.server_streaming else output
            params = [
                "self",
                f"request: {self._type(method.input_type)}",
                "ctx: rpc.Context",
            ]
            error = [
                "rpc.Code.UNIMPLEMENTED",
                f'"{qualified}.{method.name} is not implemented"',
            ]
            lines += [
                "",
                *_layout(
                    "    ",
                    f"def {snake_case(method.name)}(",
                    params,
                    f") -> {returns}:",
                ),
                *(_docstring(doc, "        ") if doc else []),
                *_layout("        ", "raise rpc.ConnectError(", error, ")"),
            ]
        return lines

    def _plugin(self, names: _Names) -> list[str]:
        version = re.fullmatch(r"v(\d+)", self.proto.package.rpartition(".")[2])
        return [
            f"{names.plugin_constant}: Plugin[{names.client}] = Plugin(",
            f'    name="{names.plugin}",',
            f'    version="{version.group(1) if version else 0}.0.0",',
            f"    service={names.constant},",
            f"    client={names.client},",
            f"    handler={names.handler},",
            ")",
        ]


def _clean_comment(text: str) -> str:
    return textwrap.dedent(
        "\n".join(line.rstrip() for line in text.splitlines())
    ).strip()


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(filter(None, texts))


def _docstring(text: str, indent: str) -> list[str]:
    text = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    if text.endswith('"'):
        text = text[:-1] + '\\"'
    first, *rest = text.split("\n")
    if not rest:
        return [f'{indent}"""{first}"""']
    return [
        f'{indent}"""{first}',
        *[f"{indent}{line}" if line else "" for line in rest],
        f'{indent}"""',
    ]


def _layout(indent: str, head: str, args: list[str], tail: str) -> list[str]:
    """``head args tail`` as ruff format lays it out: one line, args on one line, or one per line."""
    one_line = f"{indent}{head}{', '.join(args)}{tail}"
    if len(one_line) <= LINE_LENGTH:
        return [one_line]
    inner = f"{indent}    "
    if len(inner + ", ".join(args)) <= LINE_LENGTH:
        return [f"{indent}{head}", inner + ", ".join(args), f"{indent}{tail}"]
    return [f"{indent}{head}", *[f"{inner}{arg}," for arg in args], f"{indent}{tail}"]


if __name__ == "__main__":
    sys.exit(main())
