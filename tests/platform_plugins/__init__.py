"""Small plugins for the platform tests (``tests/test_platform.py``)."""
