"""Stub of transformers' tests/generation/test_utils.py (not in the sdist): no class here is driven by transformers'
`generate()`, so the generation tests are not mixed in (see ../../conftest.py)."""


class GenerationTesterMixin:
    pass
