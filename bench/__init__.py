"""Benchmarks of connectplugin against a bare WSGI ceiling and connectrpc: ``python -m bench``."""
