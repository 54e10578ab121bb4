"""MRM: exact patch-mask ratio, patchify against transformers' ViT-MAE, the MAE loss by hand (masked patches only,
per-patch normalization), the masked-report loss on masked positions only, visible-only encoding, super-resolution,
whole-word report masking on real reports, and `run_pretrain.py --method mrm`."""

import pytest
import torch

from modeling_refers import MRMForPreTraining, RefersForImageClassification
from modeling_refers.loading import from_pretrained_checked
from modeling_refers.modeling_mrm import masked_patch_loss, patchify, random_patch_masking

VOCAB = 64


def tiny_config(**overrides):
    values = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, hidden_dropout_prob=0.0, mrm_decoder_hidden_size=16,
                  mrm_decoder_num_hidden_layers=1, mrm_decoder_num_attention_heads=2, mrm_decoder_intermediate_size=32,
                  text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                   vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    values.update(overrides)
    return MRMForPreTraining.default_config(**values)


@pytest.fixture
def studies(radiographs):
    ids = torch.randint(5, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, [2, 3, 6]] = ids[:, [2, 3, 6]]
    return dict(pixel_values=radiographs(6, size=32).reshape(2, 3, 3, 32, 32),
                view_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), input_ids=ids, attention_mask=torch.ones_like(ids),
                labels=labels)


def test_random_masking_hides_exactly_the_ratio_and_restores():
    ids_keep, mask, ids_restore = random_patch_masking(5, 196, 0.75, torch.Generator().manual_seed(0))
    assert ids_keep.shape == (5, 49) and mask.sum(dim=1).tolist() == [147.0] * 5  # 196 - int(196 * 0.25)
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)  # the kept patches are exactly the unmasked ones
    order = torch.arange(196).expand(5, -1)
    shuffled = torch.gather(order, 1, ids_restore.argsort(dim=1))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), order)


def test_patchify_matches_transformers_vit_mae(radiographs):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    images = radiographs(2, size=32)
    reference = ViTMAEForPreTraining(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32, decoder_hidden_size=16,
                                                  decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                                  decoder_intermediate_size=32))
    torch.testing.assert_close(patchify(images, 8), reference.patchify(images), rtol=0, atol=0)


def test_masked_patch_loss_by_hand():
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]]])  # one image, 3 patches of 2 values
    prediction = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [1.0, -1.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patches 0 and 2 masked
    # raw: patch 0 ((0-1)^2 + (0-3)^2) / 2 = 5, patch 2 ((1-0)^2 + (-1-4)^2) / 2 = 13 -> (5 + 13) / 2 = 9
    assert masked_patch_loss(target, prediction, mask, norm_pix_loss=False).item() == pytest.approx(9.0)
    # normalized per patch (unbiased var, eps 1e-6): patch 0 -> (-1, 1) / sqrt(2 + 1e-6) * sqrt(2)... written out:
    def norm(values):
        mean = sum(values) / 2
        var = sum((v - mean) ** 2 for v in values) / 1  # torch.var is unbiased
        return [(v - mean) / (var + 1e-6) ** 0.5 for v in values]
    t0, t2 = norm([1.0, 3.0]), norm([0.0, 4.0])
    expected = (((0 - t0[0]) ** 2 + (0 - t0[1]) ** 2) / 2 + ((1 - t2[0]) ** 2 + (-1 - t2[1]) ** 2) / 2) / 2
    assert masked_patch_loss(target, prediction, mask).item() == pytest.approx(expected, rel=1e-6)


def test_model_encodes_visible_patches_only_and_both_losses_are_what_they_say(studies):
    torch.manual_seed(0)
    model = MRMForPreTraining(tiny_config()).eval()
    lengths = []
    model.refers.layers[0].register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    out = model(**studies, generator=torch.Generator().manual_seed(1))
    assert lengths == [1 + 4]  # 16 patches, 75% masked: the aggregation token and the 4 visible ones
    real_images = studies["pixel_values"].flatten(0, 1)[studies["view_mask"].flatten().bool()]
    assert out.reconstruction.shape == (5, 16, 8 * 8 * 3) and out.mask.sum(dim=1).tolist() == [12.0] * 5
    recomputed = masked_patch_loss(patchify(real_images, 8), out.reconstruction, out.mask)
    torch.testing.assert_close(out.loss_image, recomputed)
    logits, labels = out.report_logits, studies["labels"]
    picked = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[picked], labels[picked])
    torch.testing.assert_close(out.loss_report, manual)  # masked positions only
    torch.testing.assert_close(out.loss, out.loss_image + out.loss_report)

    # pixels inside masked patches never reach the encoder: the reconstruction does not change
    changed = studies["pixel_values"].clone()
    first = changed[0, 0]
    masked_patch = int(out.mask[0].nonzero()[0])
    row, col = divmod(masked_patch, 4)
    first[:, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] = torch.rand(3, 8, 8)
    again = model(**dict(studies, pixel_values=changed), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.reconstruction, out.reconstruction)


def test_gradient_reaches_both_branches_and_the_classifier_loads(studies, tmp_path):
    torch.manual_seed(0)
    model = MRMForPreTraining(tiny_config())
    assert model.report_decoder is None
    model(**studies).loss.backward()
    for name in ("refers.embeddings.patch_embeddings.projection.weight", "image_decoder.decoder_pred.weight",
                 "report_condition.weight", "report_head.predictions.transform.dense.weight",
                 "text_encoder.encoder.layer.0.attention.self.query.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    model.save_pretrained(tmp_path / "mrm")
    _, report = from_pretrained_checked(RefersForImageClassification, tmp_path / "mrm", num_labels=2)
    assert report.new_keys == ["classifier.bias", "classifier.weight"]
    assert MRMForPreTraining.from_pretrained(tmp_path / "mrm").config.mrm_mask_ratio == 0.75


def test_super_resolution_target(radiographs, studies):
    """The official code's option: 2x larger target images, each 8-px input patch predicts its 16 x 16 pixels."""
    torch.manual_seed(0)
    model = MRMForPreTraining(tiny_config(mrm_reconstruction_size=64)).eval()
    large = radiographs(6, size=64).reshape(2, 3, 3, 64, 64)
    out = model(**dict(studies, pixel_values=large), generator=torch.Generator().manual_seed(1))
    assert out.reconstruction.shape == (5, 16, 16 * 16 * 3)
    real = large.flatten(0, 1)[studies["view_mask"].flatten().bool()]
    torch.testing.assert_close(out.loss_image, masked_patch_loss(patchify(real, 16), out.reconstruction, out.mask))


def test_super_resolution_encoder_input_is_bilinear_with_antialias_by_default(radiographs):
    """The paper's reading (the default): the 2x target image reaches the encoder resized bilinear with antialias."""
    model = MRMForPreTraining(tiny_config(mrm_reconstruction_size=64))
    assert (model.config.mrm_resize_mode, model.config.mrm_resize_antialias) == ("bilinear", True)
    images = radiographs(2, size=64)
    interpolate = torch.nn.functional.interpolate
    expected = interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    # on a real radiograph the antialias matters: without it, 2x bilinear is a plain 2 x 2 mean
    assert not torch.allclose(expected, interpolate(images, size=(32, 32), mode="bilinear", antialias=False,
                                                    align_corners=False))
    assert torch.equal(model.encoder_inputs(images), expected)


@pytest.mark.parametrize("hidden_act, activation", [("relu", torch.relu), ("silu", torch.nn.functional.silu)])
def test_image_decoder_follows_the_models_layer_norm_eps_and_activation(hidden_act, activation):
    torch.manual_seed(0)
    decoder = MRMForPreTraining(tiny_config(layer_norm_eps=1e-5, hidden_act=hidden_act)).image_decoder
    norms = [module for module in decoder.modules() if isinstance(module, torch.nn.LayerNorm)]
    assert len(norms) == 3 and all(norm.eps == 1e-5 for norm in norms)  # before / after attention, and the final one
    # the LayerNorm's output is that of eps 1e-5 (a low-variance input, where eps matters)
    x = torch.randn(2, 5, 16) * 1e-3
    final = decoder.decoder_norm
    torch.testing.assert_close(final(x), torch.nn.functional.layer_norm(x, (16,), final.weight, final.bias, eps=1e-5))
    # the MLP is fc2(activation(fc1(x))) with the model's activation
    mlp = decoder.decoder_layers[0].mlp
    x = torch.randn(2, 5, 16) * 3
    torch.testing.assert_close(mlp(x), mlp.fc2(activation(mlp.fc1(x))))
    assert not torch.allclose(activation(mlp.fc1(x)), torch.nn.functional.gelu(mlp.fc1(x)))  # not ViT-MAE's default


@pytest.mark.parametrize("overrides, match", [
    (dict(mrm_mask_ratio=1.0), r"mrm_mask_ratio must be in \(0, 1\)"),
    (dict(mrm_mask_ratio=0.0), r"mrm_mask_ratio must be in \(0, 1\)"),
    (dict(mrm_report_mask_ratio=1.5), r"mrm_report_mask_ratio must be in \(0, 1\)"),
    (dict(mrm_reconstruction_size=48), "must be None or a multiple of image_size"),
])
def test_bad_mrm_configs_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_recurrent_concat_is_refused():
    with pytest.raises(ValueError, match="aggregation 'none' or 'cls_add'"):
        MRMForPreTraining(tiny_config(aggregation="recurrent_concat"))


def test_report_masking_masks_whole_words_of_real_reports(shared_data_dir):
    from datasets_scripts import load_covid19_studies
    from modeling_refers import RefersImageProcessor, RefersProcessor, train_report_tokenizer
    from modeling_refers.training.trainer import MaskedReportCollator, processor_sizes

    rows = list(load_covid19_studies(shared_data_dir / "covid19_collection")["train"])[:24]
    tokenizer = train_report_tokenizer([r["report"] for r in rows], vocab_size=200)
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), tokenizer, num_views=2, max_length=48)
    batch = MaskedReportCollator(processor, train=False, mask_ratio=0.5)(rows)
    original = tokenizer([r["report"] for r in rows], padding="longest", truncation=True, max_length=48)["input_ids"]
    mask_id = tokenizer.mask_token_id
    masked = batch["labels"] != -100
    assert torch.equal(batch["input_ids"][masked], torch.full((int(masked.sum()),), mask_id))
    assert torch.equal(batch["labels"][masked], torch.tensor(original)[masked])
    assert torch.equal(batch["input_ids"][~masked], torch.tensor(original)[~masked])
    # whole words: a continuation piece (##...) is masked exactly when the piece before it is
    for row, ids in enumerate(original):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        for t in range(1, len(tokens)):
            if tokens[t].startswith("##"):
                assert bool(masked[row, t]) == bool(masked[row, t - 1]), (row, tokens[t - 1], tokens[t])
    special = torch.tensor([[tid in tokenizer.all_special_ids for tid in ids] for ids in original])
    share = masked.sum().item() / (~special).sum().item()
    assert 0.35 < share < 0.65  # Bernoulli(0.5) per word over ~700 words: 0.5 +- 5 standard deviations


def test_run_pretrain_method_mrm(tmp_path, shared_data_dir):
    from modeling_refers.training import pretraining

    trainer = pretraining.main([
        "--method", "mrm", "--output_dir", str(tmp_path / "run"), "--data_dir",
        str(shared_data_dir / "covid19_collection"), "--config_overrides",
        "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        "mrm_decoder_hidden_size=16,mrm_decoder_num_hidden_layers=1,mrm_decoder_num_attention_heads=2,"
        "mrm_decoder_intermediate_size=32", "--text_encoder_name_or_path", "none", "--report_tokenizer_vocab_size",
        "300", "--text_config_overrides", "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--max_train_samples", "8",
        "--max_eval_samples", "4", "--max_steps", "2", "--eval_steps", "1", "--save_steps", "1", "--logging_steps", "1",
        "--max_report_length", "32", "--use_cpu", "--dataloader_pin_memory", "false", "--do_train"])
    assert type(trainer.model) is MRMForPreTraining
    optimizer = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {g["betas"] for g in optimizer.param_groups} == {(0.9, 0.95)}
    assert all(g["initial_lr"] == pytest.approx(1.5e-4 * 4 / 256) for g in optimizer.param_groups)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.05, 0.0}
    assert trainer.loss_parts == ("loss_image", "loss_report")  # the registry's, logged beside the loss
    for entry in (e for e in trainer.state.log_history if "loss" in e):
        assert entry["loss_image"] + entry["loss_report"] == pytest.approx(entry["loss"], abs=2e-4)
        assert not {"loss_contrast", "loss_global", "loss_local"} & set(entry)
    with pytest.raises(ValueError, match=r"--method mrm with --recipe mrm\b.*; got --method mrm --recipe paper"):
        pretraining.main(["--output_dir", str(tmp_path / "x"), "--method", "mrm", "--recipe", "paper"])


def test_gradient_reaches_exactly_the_parameters_each_method_trains(studies, radiographs):
    """After one backward pass, the parameters outside the graph (no gradient at all) are exactly the ones a method
    leaves idle. (A zero gradient is not idle: timm's ResNet zero-initialises each block's last BatchNorm, so the
    layers inside a block get exactly zero gradient on the first step.)"""
    from modeling_refers import JoImTeRNetForPreTraining, RadTexForPreTraining

    def idle(model, batch):
        model(**batch).loss.backward()
        return {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}

    torch.manual_seed(0)
    assert idle(MRMForPreTraining(tiny_config()), studies) == set()  # BERT is built without its pooler
    joim = JoImTeRNetForPreTraining(JoImTeRNetForPreTraining.default_config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        view_fusion_hidden_size=16, projection_dim=16, text_config=tiny_config().text_config.to_dict()))
    batch = {k: v for k, v in studies.items() if k != "labels"}
    batch["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"][:1]])[:2]
    assert idle(joim, batch) == set()
    radtex = RadTexForPreTraining(RadTexForPreTraining.default_config(
        backbone="resnet18", hidden_size=512, image_size=64, decoder_hidden_size=32, decoder_num_attention_heads=4,
        decoder_intermediate_size=64, max_report_length=16, bos_token_id=2, eos_token_id=3, pad_token_id=0,
        text_config=tiny_config().text_config.to_dict()))
    images = radiographs(6, size=64).reshape(2, 3, 3, 64, 64)
    ids = studies["input_ids"]
    assert idle(radtex, dict(pixel_values=images, view_mask=studies["view_mask"], labels=ids)) == set()


def test_noise_decides_the_masked_patches_and_makes_the_forward_deterministic(studies):
    """`noise` (as ViT-MAE's): the int(P * 0.25) patches with the smallest noise of each real view are kept, the rest
    masked; the same noise gives the same outputs (what transformers' common tests need from a random-masking model)."""
    torch.manual_seed(0)
    model = MRMForPreTraining(tiny_config()).eval()
    noise = torch.rand(5, 16, generator=torch.Generator().manual_seed(4))  # 5 real views, 16 patches
    first = model(**studies, noise=noise)
    kept = noise.argsort(dim=1)[:, :4]
    expected = torch.ones(5, 16).scatter_(1, kept, 0.0)
    assert torch.equal(first.mask, expected)
    second = model(**studies, noise=noise)
    torch.testing.assert_close(second.loss, first.loss, rtol=0, atol=0)
    torch.testing.assert_close(second.reconstruction, first.reconstruction, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"`noise` must have shape \(real views, patches\) = \(5, 16\)"):
        model(**studies, noise=noise[:4])


@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_fixed_sincos_tables_stay_frozen_after_loading_and_training(official, studies, tmp_path):
    # ViT-MAE's decoder table is a fixed 2-D sin-cos table in every mode (the encoder's too with the official switch);
    # transformers' from_pretrained hands parameters back trainable: the model must freeze them again
    config = tiny_config()
    if official:
        config = MRMForPreTraining.config_class.from_official(**{k: v for k, v in config.to_diff_dict().items()
                                                                 if k in ("image_size", "patch_size", "hidden_size",
                                                                          "num_hidden_layers", "num_attention_heads",
                                                                          "intermediate_size", "text_config")
                                                                 or k.startswith("mrm_decoder_")},
                                                              mrm_reconstruction_size=32)
    MRMForPreTraining(config).save_pretrained(tmp_path)
    model = MRMForPreTraining.from_pretrained(tmp_path)
    table = model.image_decoder.decoder_pos_embed
    assert not table.requires_grad
    assert model.refers.embeddings.position_embeddings.requires_grad is not official  # learned in the paper's mode
    # MAE's table by hand (its get_2d_sincos_pos_embed): row 0 the class token's zeros, then patch (h, w) of the 4 x 4
    # grid -> [sin(w f), cos(w f), sin(h f), cos(h f)], f = 10000 ** -(i / (D / 4))
    quarter = config.mrm_decoder_hidden_size // 4
    frequencies = 10000.0 ** -(torch.arange(quarter, dtype=torch.float64) / quarter)
    h, w = torch.meshgrid(torch.arange(4.0, dtype=torch.float64), torch.arange(4.0, dtype=torch.float64), indexing="ij")
    w, h = w.flatten()[:, None] * frequencies, h.flatten()[:, None] * frequencies
    reference = torch.cat([torch.zeros(1, 4 * quarter, dtype=torch.float64),
                           torch.cat([w.sin(), w.cos(), h.sin(), h.cos()], dim=1)])
    torch.testing.assert_close(table[0], reference.to(table.dtype), rtol=0, atol=1e-6)

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    model.train()
    model(**studies, noise=torch.rand(5, 16, generator=torch.Generator().manual_seed(1))).loss.backward()
    optimizer.step()
    assert table.grad is None
    assert torch.equal(table, before["image_decoder.decoder_pos_embed"])
    assert not torch.equal(model.image_decoder.mask_token, before["image_decoder.mask_token"])  # the step did train


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[MASK]": 3, "[SEP]": 4, "clear": 5, "lungs": 6}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  mask_token="[MASK]", sep_token="[SEP]")


def test_saved_processor_normalizes_as_the_model_was_trained(tmp_path, shared_data_dir):
    # run_pretrain saves `build_processor(config, ...)`: with MRM's official image pipeline, its evaluation transform
    # (bicubic resize to the 2x target, no crop, mean 0.4978 / std 0.2449), checked against `official_image_transform`
    from PIL import Image

    from modeling_refers import MRMConfig, RefersProcessor
    from modeling_refers.training.mrm_official import official_image_transform
    from modeling_refers.training.pretraining import build_processor

    official = MRMConfig.from_official(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                       num_attention_heads=4, intermediate_size=64)
    build_processor(official, _tiny_tokenizer()).save_pretrained(tmp_path)
    processor = RefersProcessor.from_pretrained(tmp_path)
    assert list(processor.image_processor.image_mean) == [0.4978] * 3
    assert list(processor.image_processor.image_std) == [0.2449] * 3
    assert processor.image_processor.crop_size.height == 64 and not processor.image_processor.do_center_crop
    image = Image.open(sorted((shared_data_dir / "nih_chestxray14_sample" / "images").glob("*.png"))[0]).convert("RGB").resize((200, 200))
    pixels = processor(images=[[image]], return_tensors="pt")["pixel_values"].reshape(-1, 3, 64, 64)[0]
    reference = official_image_transform(train=False, size=64)(image)
    assert pixels.shape == reference.shape == (3, 64, 64)
    # PIL bicubic (the processor) vs torchvision's on the same PIL image: one grey level at most (1 / 255 / 0.2449)
    torch.testing.assert_close(pixels, reference, rtol=0, atol=1 / 255 / 0.2449 + 1e-4)
    paper = build_processor(MRMConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=4, intermediate_size=64), _tiny_tokenizer())
    assert list(paper.image_processor.image_mean) == [0.5] * 3 and paper.image_processor.crop_size.height == 32
