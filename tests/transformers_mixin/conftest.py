"""transformers' own common model tests (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`) on every class.

Not part of the default suite: this folder is collected only when `TRANSFORMERS_TESTS_DIR` names the `tests/` folder
of an unpacked transformers source distribution (the version installed here), e.g.

    pip download transformers==5.25.0 --no-deps --no-binary :all: -d /tmp/tf
    tar xzf /tmp/tf/transformers-5.25.0.tar.gz -C /tmp/tf
    pip install parameterized
    TRANSFORMERS_TESTS_DIR=/tmp/tf/transformers-5.25.0/tests pytest tests/transformers_mixin

(The mixin skips about 40% of its tests on CPU -- GPU, flash attention, compile ...; `REFERS_NO_SKIP=1`, which turns
skips into failures for CI, must not be set here.)

That folder is imported as the package `transformers_tests`. The sdist ships the top-level `tests/test_*_common.py`
files but not three modules they import; `transformers_stubs/` (searched after that folder, so a full transformers
git checkout uses its own) supplies them, and this conftest answers the one call that would read the
tests/__init__.py the sdist lacks:

- `generation/test_utils.py`: `GenerationTesterMixin` (the generation tests; no class here is a generative LM that
  transformers' `generate()` drives: RefersForPreTraining has its own report `generate`), empty.
- `exporters/test_export.py`: `ExportTesterMixin` (torch.export / ONNX export tests), empty.
- `utils/test_configuration_utils.py`: `config_common_kwargs`, the common `PreTrainedConfig` kwargs that
  `ConfigTester.check_config_arguments_init` sets; that check returns early for configs with sub-configs (all ours).
"""

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

STUBS = Path(__file__).parent / "transformers_stubs"
collect_ignore = ["transformers_stubs"]
TESTS_DIR = os.environ.get("TRANSFORMERS_TESTS_DIR", "")


def pytest_configure(config):
    # the markers transformers' own conftest.py registers, which the mixins use
    for marker in ("slow", "accelerate_tests", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
                   "torch_compile_test"):
        config.addinivalue_line("markers", f"{marker}: a transformers test marker (its tests/conftest.py)")


if not TESTS_DIR:
    collect_ignore_glob = ["*.py"]  # the default suite does not run transformers' mixins (see the docstring)
else:
    if not (Path(TESTS_DIR) / "test_modeling_common.py").is_file():
        raise FileNotFoundError(
            f"TRANSFORMERS_TESTS_DIR={TESTS_DIR!r} must be the tests/ folder of an unpacked transformers source "
            "distribution (with test_modeling_common.py); see tests/transformers_mixin/conftest.py")
    try:
        import parameterized  # noqa: F401  (test_modeling_common imports it)
    except ImportError as error:
        raise ImportError("transformers' test_modeling_common.py needs `parameterized`: "
                          "pip install parameterized") from error
    spec = importlib.machinery.ModuleSpec("transformers_tests", None, is_package=True)
    spec.submodule_search_locations = [str(Path(TESTS_DIR).resolve()), str(STUBS)]
    sys.modules.setdefault("transformers_tests", importlib.util.module_from_spec(spec))
    # test_configuration_common.py runs `direct_transformers_import(<its folder>)`, which executes that folder's
    # __init__.py (empty in transformers' git tree, absent from the sdist) and whose result it never uses: imported
    # here with that call answering the installed transformers
    import transformers
    from unittest import mock

    with mock.patch("transformers.utils.direct_transformers_import", return_value=transformers):
        importlib.import_module("transformers_tests.test_configuration_common")
