"""Stub of transformers' tests/utils/test_configuration_utils.py (not in the sdist): `config_common_kwargs`, read by
`ConfigTester.check_config_arguments_init`, which returns before reading it for a config with sub-configs (every
config here has `text_config`); a few common `PreTrainedConfig` kwargs all the same (see ../../conftest.py)."""

config_common_kwargs = {"return_dict": False, "output_hidden_states": True, "output_attentions": True,
                        "id2label": {0: "label"}, "problem_type": "regression"}
