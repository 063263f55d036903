"""Code generation: .proto files -> ``_pb2`` modules, stubs, and Connect clients/handlers/plugins.

``python -m connectplugin.codegen`` (``make proto``) regenerates this project's code;
``generate()`` does the same for any proto tree. The protoc plugin itself is ``generator.py``.
"""

from .protoc import MARKER, PROJECT_TARGETS, CodegenError, Target, generate

__all__ = ["MARKER", "PROJECT_TARGETS", "CodegenError", "Target", "generate"]
