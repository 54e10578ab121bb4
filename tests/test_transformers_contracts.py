"""The contracts transformers' common model tests check for in-library models, on every REFERS class: untied
weights, output flags and tuples, attention implementations, feature getters, export / compile, DDP, Auto classes."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from modeling_refers import RefersConfig, RefersForImageClassification, RefersForPreTraining, RefersModel
from modeling_refers.loading import from_pretrained_checked
from modeling_refers.file_utils import atomic_write_text

VOCAB, BOS, EOS, PAD = 64, 2, 3, 0


def tiny(**overrides) -> RefersConfig:
    values = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, view_fusion_hidden_size=16, hidden_dropout_prob=0.0,
        text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        decoder_hidden_size=32, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
        decoder_intermediate_size=64, decoder_dropout_prob=0.0, max_report_length=16, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD,
    )
    values.update(overrides)
    return RefersConfig(**values)


@pytest.fixture
def batch(radiographs):
    """Two real 3-view studies (the second with a padded view) and their report tokens."""
    pixel_values = radiographs(6, size=32).reshape(2, 3, 3, 32, 32)
    input_ids = torch.randint(5, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    input_ids[:, 0], input_ids[0, -1] = BOS, EOS
    input_ids[1, 8], input_ids[1, 9:] = EOS, PAD
    attention_mask = (input_ids != PAD).long()
    return dict(pixel_values=pixel_values, view_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), input_ids=input_ids,
                attention_mask=attention_mask, labels=input_ids.masked_fill(attention_mask == 0, -100))


def _equal_nested(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------------
# Tied and untied weights
# ---------------------------------------------------------------------------------------------------------------------


def test_untied_decoder_is_saved_and_comes_back_identical(batch, tmp_path):
    model = RefersForPreTraining(tiny(tie_word_embeddings=False))
    decoder = model.report_decoder.decoder
    assert decoder.cls.predictions.decoder.weight is not decoder.bert.embeddings.word_embeddings.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(**batch).loss.backward()
    optimizer.step()  # the output layer now differs from the embeddings and from any fresh initialisation
    assert not torch.equal(decoder.cls.predictions.decoder.weight, decoder.bert.embeddings.word_embeddings.weight)
    model.eval().save_pretrained(tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert "report_decoder.decoder.cls.predictions.decoder.weight" in stored
    reloaded = RefersForPreTraining.from_pretrained(tmp_path).eval()
    own, other = model.state_dict(), reloaded.state_dict()
    assert set(own) == set(other) and all(torch.equal(own[k], other[k]) for k in own)
    assert torch.equal(model(**batch).report_logits, reloaded(**batch).report_logits)


def test_tied_decoder_stores_one_copy_and_reties(tmp_path):
    RefersForPreTraining(tiny()).save_pretrained(tmp_path)
    assert "report_decoder.decoder.cls.predictions.decoder.weight" not in load_file(tmp_path / "model.safetensors")
    decoder = RefersForPreTraining.from_pretrained(tmp_path).report_decoder.decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def tiny_mrm(**overrides):
    from modeling_refers import MRMConfig

    values = tiny().to_dict()
    values = {key: values[key] for key in ("image_size", "patch_size", "hidden_size", "num_hidden_layers",
                                           "num_attention_heads", "intermediate_size", "text_config")}
    return MRMConfig(**values, mrm_decoder_hidden_size=16, mrm_decoder_num_hidden_layers=1,
                     mrm_decoder_num_attention_heads=2, mrm_decoder_intermediate_size=32, **overrides)


def mrm_batch(batch):
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, [2, 5]] = batch["input_ids"][:, [2, 5]]
    return dict(pixel_values=batch["pixel_values"], view_mask=batch["view_mask"], input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"], labels=labels)


@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_mrm_masked_lm_head_is_tied_to_the_word_embeddings_and_stays_tied(batch, tmp_path, official):
    """As BertForMaskedLM (and MRM's official MyBertMaskedLM): one matrix reads and predicts report words, one bias;
    a training step moves both together, the folder stores one copy and loads tied again."""
    from modeling_refers import MRMConfig, MRMForPreTraining

    config = MRMConfig.from_official(**tiny_mrm().to_diff_dict()) if official else tiny_mrm()
    model = MRMForPreTraining(config)
    head, words = model.report_head.predictions, model.text_encoder.embeddings.word_embeddings
    assert head.decoder.weight is words.weight and head.decoder.bias is head.bias and head.bias.requires_grad
    before = words.weight.detach().clone()
    torch.optim.SGD(model.parameters(), lr=0.5).zero_grad()
    model(**mrm_batch(batch), generator=torch.Generator().manual_seed(0)).loss.backward()
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0  # the output bias learns
    torch.optim.SGD([words.weight], lr=0.5).step()
    assert not torch.equal(words.weight, before) and head.decoder.weight is words.weight
    model.save_pretrained(tmp_path)
    assert "report_head.predictions.decoder.weight" not in load_file(tmp_path / "model.safetensors")
    reloaded = MRMForPreTraining.from_pretrained(tmp_path)
    assert reloaded.report_head.predictions.decoder.weight is reloaded.text_encoder.embeddings.word_embeddings.weight
    assert torch.equal(reloaded.text_encoder.embeddings.word_embeddings.weight, words.weight)


def test_mrm_untied_masked_lm_head_is_its_own_saved_weight(tmp_path):
    from modeling_refers import MRMForPreTraining

    model = MRMForPreTraining(tiny_mrm(tie_word_embeddings=False))
    head, words = model.report_head.predictions, model.text_encoder.embeddings.word_embeddings
    assert head.decoder.weight is not words.weight and not head.bias.requires_grad  # the idle copy is frozen
    model.save_pretrained(tmp_path)
    assert "report_head.predictions.decoder.weight" in load_file(tmp_path / "model.safetensors")
    reloaded = MRMForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(reloaded.report_head.predictions.decoder.weight, head.decoder.weight)
    assert reloaded.report_head.predictions.decoder.weight is not reloaded.text_encoder.embeddings.word_embeddings.weight


# ---------------------------------------------------------------------------------------------------------------------
# Output flags, tuples, attention implementations
# ---------------------------------------------------------------------------------------------------------------------


def test_pretraining_returns_hidden_states_attentions_and_tuples(batch):
    config = tiny(attn_implementation="eager")
    model = RefersForPreTraining(config).eval()
    out = model(**batch, output_hidden_states=True, output_attentions=True)
    seq = 1 + config.num_patches
    assert len(out.hidden_states) == config.num_hidden_layers + 1 and out.hidden_states[0].shape == (6, seq, 32)
    assert len(out.attentions) == config.num_hidden_layers and out.attentions[0].shape == (6, 4, seq, seq)
    assert len(out.decoder_hidden_states) == 2 + 1 and len(out.decoder_attentions) == 2
    memory = config.num_views * config.num_patches
    assert out.cross_attentions[0].shape == (2, 4, 12, memory)
    # cross-attention never looks at the padded view of study 1 (its tokens are masked in the memory)
    assert torch.all(out.cross_attentions[0][1, :, :, 2 * config.num_patches:] == 0)
    assert len(out.text_hidden_states) == 2 + 1 and len(out.text_attentions) == 2
    plain = model(**batch)
    assert plain.hidden_states is None and plain.decoder_attentions is None
    as_tuple = model(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and _equal_nested(as_tuple, plain.to_tuple())
    assert torch.equal(as_tuple[0], plain.loss)


@pytest.mark.parametrize("model_class", [RefersModel, RefersForImageClassification])
def test_backbone_and_classifier_tuples_follow_the_dataclass_order(model_class, batch):
    model = model_class(tiny(num_labels=3)).eval()
    inputs = dict(pixel_values=batch["pixel_values"], view_mask=batch["view_mask"])
    assert _equal_nested(model(**inputs, return_dict=False), model(**inputs).to_tuple())


def test_eager_and_sdpa_agree_for_pretraining(batch):
    sdpa = RefersForPreTraining(tiny(attn_implementation="sdpa")).eval()
    eager = RefersForPreTraining(tiny(attn_implementation="eager")).eval()
    eager.load_state_dict(sdpa.state_dict())
    a, b = sdpa(**batch), eager(**batch)
    for key in ("loss_report", "loss_contrast", "report_logits", "logits_per_study", "study_embeds"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0, msg=key)


def _attention_implementations(model) -> set:
    return {module.config._attn_implementation for module in model.modules() if isinstance(module, PreTrainedModel)}


def test_attn_implementation_reaches_decoder_and_text_encoder(tmp_path):
    RefersForPreTraining(tiny()).save_pretrained(tmp_path)
    model = RefersForPreTraining.from_pretrained(tmp_path, attn_implementation="eager")
    assert _attention_implementations(model) == {"eager"}
    assert model.config.decoder_config._attn_implementation == "eager"
    assert model.config.text_config._attn_implementation == "eager"
    assert model.report_decoder.decoder.config is model.config.decoder_config  # the sub-config, not a copy
    model.set_attn_implementation("sdpa")
    assert _attention_implementations(model) == {"sdpa"}
    assert model.config.decoder_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------------------------------
# Feature getters (CLIP's contract)
# ---------------------------------------------------------------------------------------------------------------------


def test_feature_getters_follow_the_clip_contract(batch):
    model = RefersForPreTraining(tiny()).eval()
    out = model(**batch)
    study = model.get_study_features(batch["pixel_values"], batch["view_mask"], output_hidden_states=True)
    text = model.get_text_features(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    # the study side is a BaseModelOutputWithPooling; the text side is the encoder's own output (BERT's
    # ...WithPoolingAndCrossAttentions), with the projected embedding in `pooler_output`, as CLIP returns them
    assert isinstance(study, BaseModelOutputWithPooling) and text.pooler_output.shape == (2, 96)
    torch.testing.assert_close(study.pooler_output, out.study_embeds)
    torch.testing.assert_close(text.pooler_output, out.report_embeds)
    assert len(study.hidden_states) == 3 and len(text.hidden_states) == 3
    study_tuple = model.get_study_features(batch["pixel_values"], batch["view_mask"], return_dict=False)
    text_tuple = model.get_text_features(batch["input_ids"], batch["attention_mask"], return_dict=False)
    assert torch.equal(study_tuple[1], study.pooler_output) and torch.equal(text_tuple[1], text.pooler_output)


# ---------------------------------------------------------------------------------------------------------------------
# torch.export / torch.compile
# ---------------------------------------------------------------------------------------------------------------------


def test_export_studies_with_any_view_mask(batch):
    model = RefersModel(tiny()).eval()
    traced_mask = torch.tensor([[1, 1, 1], [1, 1, 1]])
    program = torch.export.export(model, (batch["pixel_values"],), {"view_mask": traced_mask})
    other_mask = torch.tensor([[1, 0, 1], [1, 0, 0]])
    exported = program.module()(batch["pixel_values"], view_mask=other_mask)
    eager = model(batch["pixel_values"], view_mask=other_mask)
    torch.testing.assert_close(exported.study_embeds, eager.study_embeds)
    torch.testing.assert_close(exported.view_weights, eager.view_weights)
    changed = batch["pixel_values"].clone()
    changed[:, 1] = 5.0  # masked views' pixels change nothing, in the exported graph too
    again = program.module()(changed, view_mask=other_mask)
    assert torch.equal(again.study_embeds, exported.study_embeds)


def test_export_single_images_and_pretraining(batch):
    classifier = RefersForImageClassification(tiny(num_labels=3)).eval()
    images = batch["pixel_values"][:, 0]
    program = torch.export.export(classifier, (images,))
    torch.testing.assert_close(program.module()(images).logits, classifier(images).logits)

    model = RefersForPreTraining(tiny()).eval()
    program = torch.export.export(model, (), dict(batch))
    torch.testing.assert_close(program.module()(**batch).loss, model(**batch).loss)


def test_compile_fullgraph_on_studies_images_and_pretraining(batch):
    torch._dynamo.reset()
    backbone = RefersModel(tiny()).eval()
    compiled = torch.compile(backbone, fullgraph=True, backend="aot_eager")
    inputs = dict(pixel_values=batch["pixel_values"], view_mask=batch["view_mask"])
    torch.testing.assert_close(compiled(**inputs).study_embeds, backbone(**inputs).study_embeds)
    images = batch["pixel_values"][:, 0]
    torch.testing.assert_close(compiled(images).study_pooled_output, backbone(images).study_pooled_output)
    model = RefersForPreTraining(tiny()).eval()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(**batch).loss, model(**batch).loss)


# ---------------------------------------------------------------------------------------------------------------------
# DistributedDataParallel without the unused-parameter search
# ---------------------------------------------------------------------------------------------------------------------


def test_single_image_classifier_trains_under_ddp_without_unused_parameters(batch, tmp_path):
    """Two DDP steps (gloo, one process) with find_unused_parameters=False: DDP raises on the second step if any
    parameter got no gradient in the first (the view fusion did, for single images, before they became one-view
    studies)."""
    script = textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel
        from modeling_refers import RefersConfig, RefersForImageClassification
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        config = RefersConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64, view_fusion_hidden_size=16, num_labels=3,
                              problem_type="multi_label_classification")
        model = DistributedDataParallel(RefersForImageClassification(config), find_unused_parameters=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        images = torch.load({str(tmp_path / 'x.pt')!r})
        for step in range(3):
            optimizer.zero_grad()
            model(images, labels=torch.ones(images.shape[0], 3)).loss.backward()
            optimizer.step()
        dist.destroy_process_group()
        print("ddp-ok")
        """
    )
    torch.save(batch["pixel_values"][:, 0].contiguous(), tmp_path / "x.pt")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ddp-ok" in run.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Auto classes without the package (trust_remote_code), file modes, loading reports
# ---------------------------------------------------------------------------------------------------------------------


def test_every_folder_maps_every_auto_class_that_loads_it(tmp_path):
    # every folder of the radiograph transformer also builds a RefersBackbone (AutoBackbone); a timm CNN one does not
    # (RefersBackbone refuses it: transformers' TimmBackbone is the CNN's)
    with_backbone = {"AutoConfig", "AutoBackbone", "AutoModel", "AutoModelForImageClassification"}
    folders = {
        "base": (RefersModel(tiny()), with_backbone),
        "clf": (RefersForImageClassification(tiny(num_labels=2)), with_backbone),
        "pretrain": (RefersForPreTraining(tiny()), with_backbone | {"AutoModelForPreTraining"}),
        "cnn": (RefersModel(tiny(backbone="resnet18", hidden_size=512, image_size=64, aggregation="none")),
                {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}),
    }
    for name, (model, expected) in folders.items():
        model.save_pretrained(tmp_path / name)
        auto_map = json.loads((tmp_path / name / "config.json").read_text())["auto_map"]
        assert set(auto_map) == expected, name
    weight = "layers.1.attention.q_proj.weight"
    expected_weight = {name: getattr(folders[name][0], "refers", folders[name][0]).state_dict()[weight]
                       for name in ("base", "clf", "pretrain")}  # RefersModel is the transformer itself
    torch.save(expected_weight, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import json, sys, torch, transformers
        from huggingface_hub.errors import HFValidationError
        root = {str(tmp_path)!r}
        expected = torch.load(f"{{root}}/expected.pt")
        for name in ("base", "clf", "pretrain", "cnn"):
            folder = f"{{root}}/{{name}}"
            auto_map = json.load(open(f"{{folder}}/config.json"))["auto_map"]
            for auto_name, target in auto_map.items():
                if auto_name == "AutoConfig":
                    continue
                if auto_name == "AutoBackbone":
                    # transformers 5.25's AutoBackbone.from_pretrained asks the Hub whether the name is a repository
                    # (offline too): a local folder is refused; from_config picks the class, the class loads the folder
                    try:
                        transformers.AutoBackbone.from_pretrained(folder, trust_remote_code=True)
                        raise AssertionError("AutoBackbone.from_pretrained now reads local folders: update the README")
                    except HFValidationError:
                        pass
                    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=True, out_indices=[1, 2])
                    backbone_class = type(transformers.AutoBackbone.from_config(config, trust_remote_code=True))
                    model, info = backbone_class.from_pretrained(folder, config=config, output_loading_info=True)
                    assert not info["missing_keys"], info["missing_keys"]
                    assert torch.equal(model.state_dict()[{weight!r}], expected[name])
                    maps = model(torch.randn(1, 3, 32, 32)).feature_maps
                    assert [tuple(m.shape) for m in maps] == [(1, 32, 4, 4)] * 2, [m.shape for m in maps]
                else:
                    model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True)
                assert type(model).__name__ == target.split(".")[-1], (name, auto_name, type(model))
                assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert "modeling_refers" not in sys.modules
        print("remote-ok")
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "remote-ok" in run.stdout and "Do you wish" not in run.stdout + run.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        with open(tmp_path / "plain.txt", "w") as handle:  # what open() gives: the reference
            handle.write("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "results.json").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "plain.txt").st_mode) == mode


def test_checked_loading_shows_one_summary_not_the_key_table(tmp_path, caplog):
    import logging

    from transformers.utils import logging as hf_logging

    RefersForPreTraining(tiny()).save_pretrained(tmp_path)
    records: list[str] = []
    collector = logging.Handler(level=logging.WARNING)
    collector.emit = lambda record: records.append(record.getMessage())
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addHandler(collector)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    try:
        RefersForImageClassification.from_pretrained(tmp_path, num_labels=2)
        assert any("UNEXPECTED" in r for r in records)  # transformers' own per-key table, hidden by the checked load
        records.clear()
        with caplog.at_level("WARNING", logger="modeling_refers"):
            _, report = from_pretrained_checked(RefersForImageClassification, tmp_path, num_labels=2)
    finally:
        report_logger.removeHandler(collector)
        hf_logging.set_verbosity(verbosity)
    assert not any("UNEXPECTED" in r for r in records)
    summary = [r.getMessage() for r in caplog.records if "RefersForImageClassification from" in r.getMessage()]
    assert len(summary) == 1 and "text_encoder" in summary[0]
    assert report.dropped_by_module()["text_encoder"] > 10


def test_image_classification_pipeline_runs_without_prompt_and_gives_sigmoid_scores(tmp_path, shared_data_dir):
    """`pipeline("image-classification", model=folder)` after `import modeling_refers`, stdin closed: no custom-code
    prompt (the saved auto_map must not make AutoVideoProcessor ask), no torchvision-backend message, and for a
    multi-label fine-tuned folder the scores are the sigmoid of the model's logits."""
    from modeling_refers import RefersImageProcessor

    labels = ["Atelectasis", "Cardiomegaly", "Effusion"]
    config = tiny(num_labels=3, problem_type="multi_label_classification",
                  id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    RefersForImageClassification(config).save_pretrained(tmp_path / "clf")
    RefersImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32}).save_pretrained(
        tmp_path / "clf")
    image = sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))[0]
    script = textwrap.dedent(
        f"""
        import json, torch
        import modeling_refers
        from transformers import AutoImageProcessor, AutoModelForImageClassification, pipeline
        folder, image = {str(tmp_path / "clf")!r}, {str(image)!r}
        classify = pipeline("image-classification", model=folder, top_k=None)
        got = {{row["label"]: row["score"] for row in classify(image)}}
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        inputs = AutoImageProcessor.from_pretrained(folder)(image, return_tensors="pt")
        with torch.no_grad():
            expected = torch.sigmoid(model(**inputs).logits)[0].tolist()
        print("SCORES", json.dumps({{"got": got, "expected": expected}}))
        """
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "Do you wish to run the custom code" not in output
    assert "Requested torchvision backend is not available" not in output
    scores = json.loads(output.split("SCORES ", 1)[1].splitlines()[0])
    assert sorted(scores["got"]) == sorted(labels)
    for index, name in enumerate(labels):
        assert scores["got"][name] == pytest.approx(scores["expected"][index], abs=1e-6)
    # sigmoid, not softmax: independent per-label scores that need not sum to one
    assert sum(scores["got"].values()) != pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Gradient checkpointing (`--gradient_checkpointing` in the scripts: the Trainer calls gradient_checkpointing_enable)
# ---------------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_recomputes_every_layer_and_gives_the_same_gradients(batch):
    """Radiograph transformer, report decoder and text encoder layers are recomputed in backward (each layer's
    forward runs twice), and the gradients equal those without checkpointing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    torch.manual_seed(0)
    model = RefersForPreTraining(tiny()).train()  # dropout is 0 in the tiny config: both runs are deterministic

    def run(checkpointing: bool):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()  # the Trainer's names (5.x also has activation_checkpointing_*)
        calls = {}
        # transformers checkpoints a layer's `forward` (its own hooks stay outside): count its attention's calls
        hooks = [module.attention.register_forward_hook(
                     lambda m, a, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
                 for name, module in model.named_modules() if isinstance(module, GradientCheckpointingLayer)]
        model.zero_grad()
        model(**batch).loss.backward()
        for hook in hooks:
            hook.remove()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls

    plain, plain_calls = run(False)
    checkpointed, checkpointed_calls = run(True)
    groups = {name.split(".")[0] for name in checkpointed_calls}
    assert {"refers", "report_decoder", "text_encoder"} <= groups
    assert set(plain_calls.values()) == {1} and set(checkpointed_calls.values()) == {2}
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
