"""Stub of transformers' tests/exporters/test_export.py (not in the sdist): the torch.export / ONNX export tests are
not mixed in (see ../../conftest.py)."""


class ExportTesterMixin:
    pass
