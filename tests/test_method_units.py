"""Every pretraining method is one unit: its own configuration class and `model_type`, registered with every Auto class
that can load its folder (with the package, and with `trust_remote_code` in a fresh process without it), an old-style
folder (`model_type="refers"` holding a method's checkpoint) refused with a clear error, and one registry entry
(`PRETRAINING_METHODS`) that is all `run_pretrain.py` reads about a method."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from modeling_refers import (
    JoImTeRNetConfig,
    JoImTeRNetForPreTraining,
    MRMConfig,
    MRMForPreTraining,
    RadTexConfig,
    RadTexForPreTraining,
    RefersConfig,
    RefersForImageClassification,
    RefersForPreTraining,
    RefersModel,
)
from modeling_refers.training import pretraining

TEXT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=64)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           view_fusion_hidden_size=16, text_config=TEXT, decoder_hidden_size=32, decoder_num_attention_heads=4,
           decoder_intermediate_size=64, max_report_length=16, decoder_vocab_size=64)
METHODS = {  # model_type -> (config class, pretraining class, tiny config)
    "mrm": (MRMConfig, MRMForPreTraining, lambda: MRMConfig(**VIT, mrm_decoder_hidden_size=16,
                                                            mrm_decoder_num_hidden_layers=1,
                                                            mrm_decoder_num_attention_heads=2,
                                                            mrm_decoder_intermediate_size=32)),
    "joimternet": (JoImTeRNetConfig, JoImTeRNetForPreTraining, lambda: JoImTeRNetConfig(**VIT, projection_dim=16)),
    "radtex": (RadTexConfig, RadTexForPreTraining, lambda: RadTexConfig(
        backbone="resnet18", hidden_size=512, image_size=64, text_config=TEXT, decoder_hidden_size=32,
        decoder_num_attention_heads=4, decoder_intermediate_size=64, max_report_length=16, decoder_vocab_size=64)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One saved pretraining folder per method (and REFERS's)."""
    root = tmp_path_factory.mktemp("methods")
    made = {}
    for model_type, (_, model_class, make_config) in METHODS.items():
        torch.manual_seed(0)
        model_class(make_config()).save_pretrained(root / model_type)
        made[model_type] = root / model_type
    torch.manual_seed(0)
    RefersForPreTraining(RefersConfig(**VIT)).save_pretrained(root / "refers")
    made["refers"] = root / "refers"
    return made


def test_each_method_has_its_own_configuration_and_defaults():
    defaults = {
        MRMConfig: dict(use_report_generation=False, use_study_report_consistency=True, use_view_fusion=False,
                        aggregation="none", mrm_mask_ratio=0.75, mrm_report_mask_ratio=0.5,
                        mrm_decoder_hidden_size=512, mrm_decoder_num_hidden_layers=8),
        JoImTeRNetConfig: dict(use_report_generation=False, use_study_report_consistency=True, use_view_fusion=True,
                               use_study_projection=True, projection_dim=256),
        RadTexConfig: dict(backbone="resnet50", aggregation="none", hidden_size=2048, use_view_fusion=False,
                           use_report_generation=True, use_study_report_consistency=False),
    }
    for config_class, values in defaults.items():
        config = config_class()
        assert isinstance(config, RefersConfig) and config.model_type != "refers"
        assert {name: getattr(config, name) for name in values} == values, config_class.__name__
    assert MRMConfig.model_type == "mrm" and JoImTeRNetConfig.model_type == "joimternet"
    assert RadTexConfig.model_type == "radtex"
    # MRM's fields live in MRMConfig only
    assert not [name for name in RefersConfig().to_dict() if name.startswith("mrm_")]
    assert not hasattr(RefersConfig(), "mrm_mask_ratio")
    assert MRMConfig(mrm_reconstruction_size=448).input_image_size == 448 and RefersConfig().input_image_size == 224


@pytest.mark.parametrize("config_class, overrides, match", [
    (MRMConfig, dict(aggregation="recurrent_concat"), "MRMConfig needs backbone='vit' and aggregation 'none' or 'cls_add'"),
    (MRMConfig, dict(use_report_generation=True), "MRMConfig needs use_report_generation=False"),
    (MRMConfig, dict(mrm_decoder_hidden_size=30, mrm_decoder_num_attention_heads=4),
     r"MRMConfig.mrm_decoder_hidden_size \(30\) must be divisible"),
    (JoImTeRNetConfig, dict(use_study_projection=False, projection_dim=None),
     "JoImTeRNetConfig.use_study_projection must be True"),
    (JoImTeRNetConfig, dict(use_view_fusion=False), "JoImTeRNetConfig needs use_report_generation=False"),
    (RadTexConfig, dict(use_study_report_consistency=True), "RadTex trains report generation only: RadTexConfig"),
    (RadTexConfig, dict(hidden_size=30, num_attention_heads=4), None),  # a CNN: heads do not apply
])
def test_a_method_configuration_names_what_it_refuses(config_class, overrides, match):
    if match is None:
        config_class(**overrides)
        return
    with pytest.raises(ValueError, match=match):
        config_class(**overrides)


@pytest.mark.parametrize("model_type", list(METHODS))
def test_every_auto_class_loads_a_method_folder_as_its_own_class(folders, model_type):
    config_class, model_class, _ = METHODS[model_type]
    folder = folders[model_type]
    saved = json.loads((folder / "config.json").read_text())
    assert saved["model_type"] == model_type
    stem = {"mrm": "MRM", "joimternet": "JoImTeRNet", "radtex": "RadTex"}[model_type]
    backbone = {} if model_type == "radtex" else {"AutoBackbone": f"modeling_{model_type}.{stem}Backbone"}
    assert saved["auto_map"] == {
        **backbone,
        "AutoConfig": f"configuration_{model_type}.{config_class.__name__}",
        "AutoModel": f"modeling_{model_type}.{stem}Model",
        "AutoModelForImageClassification": f"modeling_{model_type}.{stem}ForImageClassification",
        "AutoModelForPreTraining": f"modeling_{model_type}.{model_class.__name__}",
    }
    assert type(AutoConfig.from_pretrained(folder)) is config_class

    pretraining, info = AutoModelForPreTraining.from_pretrained(folder, output_loading_info=True)
    assert type(pretraining) is model_class
    assert not info["missing_keys"] and not info["unexpected_keys"]

    base = AutoModel.from_pretrained(folder)
    assert type(base).__name__ == f"{stem}Model" and isinstance(base, RefersModel)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, pretraining.refers.state_dict()[key], rtol=0, atol=0)

    classifier, info = AutoModelForImageClassification.from_pretrained(folder, num_labels=3, output_loading_info=True)
    assert type(classifier).__name__ == f"{stem}ForImageClassification"
    assert isinstance(classifier, RefersForImageClassification)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]  # only the head is new
    assert not info["mismatched_keys"]
    # what is dropped is exactly what is not the backbone
    assert all(not key.startswith("refers.") for key in info["unexpected_keys"])

    if backbone:  # a radiograph transformer: its blocks as feature maps for dense heads
        # (transformers' AutoBackbone.from_pretrained reads Hub repositories only, a local folder goes to timm:
        # from_config picks the class, the class loads the folder)
        config = AutoConfig.from_pretrained(folder, out_indices=[1, 2])
        assert type(AutoBackbone.from_config(config)).__name__ == f"{stem}Backbone"
        features, info = type(AutoBackbone.from_config(config)).from_pretrained(folder, config=config,
                                                                              output_loading_info=True)
        assert not info["missing_keys"] and features.out_indices == [1, 2]
        torch.testing.assert_close(features.layers[0].state_dict()["layernorm_before.weight"],
                                   pretraining.refers.layers[0].state_dict()["layernorm_before.weight"], rtol=0, atol=0)
        maps = features(torch.randn(1, 3, 32, 32)).feature_maps
        assert [tuple(m.shape) for m in maps] == [(1, 32, 4, 4)] * 2


def test_the_refers_folder_still_loads_as_refers(folders):
    folder = folders["refers"]
    assert type(AutoConfig.from_pretrained(folder)) is RefersConfig
    assert type(AutoModelForPreTraining.from_pretrained(folder)) is RefersForPreTraining
    assert type(AutoModel.from_pretrained(folder)) is RefersModel
    assert type(AutoModelForImageClassification.from_pretrained(folder, num_labels=2)) is RefersForImageClassification


def test_method_folders_load_with_trust_remote_code_without_the_package(folders, tmp_path):
    """A fresh process that cannot import modeling_refers: every Auto class of every method folder loads the class its
    auto_map names, from the folder's own copy of the code, and the classifier has only its head new."""
    names = list(METHODS)
    script = textwrap.dedent(f"""
        import json, sys, transformers
        sys.modules["modeling_refers"] = None  # the package cannot be imported here
        folders = {json.dumps({name: str(folders[name]) for name in names})}
        for name, folder in folders.items():
            auto_map = json.load(open(f"{{folder}}/config.json"))["auto_map"]
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True)
            assert type(config).__name__ == auto_map["AutoConfig"].split(".")[-1], type(config)
            assert config.model_type == name
            for auto_name, target in auto_map.items():
                if auto_name in ("AutoConfig", "AutoBackbone"):  # AutoBackbone.from_pretrained: Hub repos only
                    continue
                extra = dict(num_labels=3) if auto_name == "AutoModelForImageClassification" else {{}}
                model, info = getattr(transformers, auto_name).from_pretrained(
                    folder, trust_remote_code=True, output_loading_info=True, **extra)
                assert type(model).__name__ == target.split(".")[-1], (name, auto_name, type(model))
                assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
                if auto_name == "AutoModelForImageClassification":
                    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"], info
                else:
                    assert not info["missing_keys"], (name, auto_name, info["missing_keys"])
        print("remote-ok")
    """)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "remote-ok" in run.stdout and "Do you wish" not in run.stdout + run.stderr


@pytest.mark.parametrize("model_type", list(METHODS))
def test_an_old_style_folder_is_refused_by_the_auto_class_and_loads_with_its_method_class(folders, model_type,
                                                                                          tmp_path):
    """A folder saved before each method had its own model_type (`model_type: "refers"` holding a method's
    checkpoint): AutoModelForPreTraining would have dropped the method's heads; it now says what to do, and that
    works."""
    config_class, model_class, _ = METHODS[model_type]
    old = tmp_path / "old"
    reference = model_class.from_pretrained(folders[model_type])
    reference.save_pretrained(old)
    config = json.loads((old / "config.json").read_text())
    config["model_type"] = "refers"
    config["auto_map"] = {key: value for key, value in config["auto_map"].items() if key != "AutoConfig"}
    (old / "config.json").write_text(json.dumps(config))
    name = model_class.__name__
    with pytest.raises(ValueError, match=rf"saved by {name}.*{name}\.from_pretrained\(folder\)"):
        AutoModelForPreTraining.from_pretrained(old)
    loaded, info = model_class.from_pretrained(old, output_loading_info=True)
    assert type(loaded.config) is config_class
    assert loaded.config.to_dict()["decoder_config"] == reference.config.to_dict()["decoder_config"]
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.save_pretrained(tmp_path / "resaved")
    assert type(AutoModelForPreTraining.from_pretrained(tmp_path / "resaved")) is model_class
    # its backbone still fine-tunes as before: the classifier reads the old configuration
    classifier, info = RefersForImageClassification.from_pretrained(old, num_labels=2, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["classifier.bias", "classifier.weight"]


# ---------------------------------------------------------------------------------------------------------------------
# The method registry
# ---------------------------------------------------------------------------------------------------------------------


def test_the_registry_holds_every_method_and_run_pretrain_has_no_method_branches():
    registry = pretraining.PRETRAINING_METHODS
    assert set(registry) == {"refers", "mrm", "joimternet", "radtex"}
    for name, method in registry.items():
        assert method.model_class.config_class is method.config_class, name
        assert method.config_class().model_type == name
        assert method.recipes and all(recipe in pretraining.RECIPES for recipe in method.recipes)
    source = inspect.getsource(pretraining)
    for literal in ('method == "', "method == '", 'method != "', 'recipe == "mrm"'):
        assert literal not in source, literal


@pytest.mark.parametrize("name", ["refers", "mrm", "joimternet", "radtex"])
def test_the_logged_loss_parts_are_the_method_output_and_sum_to_its_loss(name):
    """The registry's loss parts are fields of the model's output, none missing, and `loss` is their sum."""
    method = pretraining.PRETRAINING_METHODS[name]
    config = RefersConfig(**VIT) if name == "refers" else METHODS[name][2]()
    torch.manual_seed(0)
    model = method.model_class(config).train()
    size = config.image_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (2, 8), generator=generator)
    labels = ids.clone() if name != "mrm" else torch.where(torch.rand(2, 8, generator=generator) < 0.5, ids, -100)
    labels[:, 0] = ids[:, 0]
    batch = dict(pixel_values=torch.randn(2, 3, 3, size, size, generator=generator),
                 view_mask=torch.tensor([[1, 1, 1], [1, 0, 0]]), input_ids=ids, attention_mask=torch.ones_like(ids),
                 labels=labels)
    if name == "joimternet":
        batch.pop("labels")
    outputs = model(**batch)
    present = {key for key in outputs if key.startswith("loss_") and outputs[key] is not None}
    assert set(method.loss_parts) <= present
    torch.testing.assert_close(outputs.loss, sum(outputs[key] for key in method.loss_parts))


def test_a_recipe_of_another_method_is_refused_naming_both():
    from types import SimpleNamespace

    model_args = SimpleNamespace(method="refers", model_name_or_path=None, config_name=None,
                                 text_encoder_name_or_path=None, tokenizer_name_or_path=None, timm_weights=None)
    data_args = SimpleNamespace(resize="square", prepared_data_dir="prepared", data_dir=None, dataset_name="mimic_cxr")
    with pytest.raises(ValueError, match="--recipe mrm goes with --method mrm, and --method refers with --recipe "
                                         "paper or official or adamw"):
        pretraining.check_inputs(model_args, data_args, SimpleNamespace(recipe="mrm"))
    training_args = SimpleNamespace(recipe=None)
    pretraining.check_inputs(SimpleNamespace(**{**vars(model_args), "method": "mrm"}), data_args, training_args)
    assert training_args.recipe == "mrm"  # the method's first recipe is its default
