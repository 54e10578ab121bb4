"""The shared training glue (`modeling_refers.training.trainer`): the recipes' parameter groups and Lookahead, the
left/right swap reaching a separate decoder tokenizer, the processor sizes of each resize mode."""

import copy

import pytest
import torch
from transformers import TrainerCallback, TrainingArguments

from datasets_scripts import load_source_dataset
from modeling_refers import (
    RefersConfig,
    RefersForPreTraining,
    RefersImageProcessor,
    RefersProcessor,
    train_report_tokenizer,
)
from modeling_refers.loading import from_pretrained_checked
from modeling_refers.training.augmentation import RadiographTrainTransform
from modeling_refers.training.lookahead import Lookahead
from modeling_refers.processing_refers import swap_left_right
from modeling_refers.training.trainer import (
    PRETRAINING_RECIPES,
    RefersTrainer,
    StudyReportCollator,
    processor_sizes,
)

VOCAB, BOS, EOS, PAD = 64, 2, 3, 0


def tiny_model(vocab_size: int = VOCAB) -> RefersForPreTraining:
    torch.manual_seed(0)
    return RefersForPreTraining(RefersConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, view_fusion_hidden_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
        decoder_intermediate_size=64, decoder_dropout_prob=0.0, max_report_length=16, bos_token_id=BOS,
        eos_token_id=EOS, pad_token_id=PAD))


@pytest.fixture
def batch(radiographs):
    pixel_values = radiographs(6, size=32).reshape(2, 3, 3, 32, 32)
    input_ids = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    input_ids[:, 0], input_ids[:, -1] = BOS, EOS
    return dict(pixel_values=pixel_values, view_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]), input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids), labels=input_ids.clone())


def trainer_for(model, tmp_path, recipe: str) -> RefersTrainer:
    """A RefersTrainer wired as `run_pretrain.py --recipe <recipe>` wires it (backbone 3e-3, BERT 3e-4)."""
    args = TrainingArguments(output_dir=str(tmp_path / recipe), learning_rate=3e-3, weight_decay=1e-4, use_cpu=True,
                             report_to="none")
    settings = PRETRAINING_RECIPES[recipe]
    decoder_lr = 3e-3 if settings["decoder_learning_rate"] == "backbone" else 3e-4
    return RefersTrainer(model=model, args=args, text_learning_rate=3e-4, decoder_learning_rate=decoder_lr,
                         lookahead_steps=settings["lookahead_steps"], lookahead_alpha=settings["lookahead_alpha"],
                         optimizer_name=settings["optimizer_name"], adam_betas=settings.get("adam_betas", (0.9, 0.95)))


@pytest.mark.parametrize("recipe", ["paper", "official", "adamw"])
def test_recipe_parameter_groups(tmp_path, recipe):
    model = tiny_model()
    optimizer = trainer_for(model, tmp_path, recipe).create_optimizer()
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert set(lr_of) == set(names.values())  # every trainable parameter is in exactly one group
    for name, lr in lr_of.items():
        if name.startswith(("text_encoder.", "text_projection.")):
            expected = 3e-4  # BERT and its projection: 3e-4 in both (the official code's `contrastive_bert`)
        elif name.startswith("report_decoder."):
            expected = 3e-3 if recipe == "official" else 3e-4  # the paper's text (and adamw) vs the released code
        else:
            expected = 3e-3
        assert lr == expected, (recipe, name)
    if recipe == "official":
        assert isinstance(optimizer, Lookahead)
        assert {(g["lookahead_k"], g["lookahead_alpha"]) for g in optimizer.param_groups} == {(5, 0.5)}
        assert isinstance(optimizer.base_optimizer, torch.optim.SGD)
    elif recipe == "adamw":  # the paper's two learning rates, AdamW instead of SGD (short runs from random weights)
        assert type(optimizer) is torch.optim.AdamW
        assert {g["betas"] for g in optimizer.param_groups} == {(0.9, 0.999)}
    else:
        assert type(optimizer) is torch.optim.SGD


def test_lookahead_pulls_back_half_way_to_the_initial_weights_every_5_steps(tmp_path, batch):
    """Lookahead (k 5, alpha 0.5), the official code's: steps 1-4 are plain SGD; at step 5 the weights become
    initial + 0.5 * (fast - initial). timm's default would start the slow weights at step 5 (no pull-back)."""
    reference = tiny_model()
    initial = {n: p.detach().clone() for n, p in reference.named_parameters()}
    looked = copy.deepcopy(reference)
    plain_opt = trainer_for(reference, tmp_path, "paper")
    plain_opt.decoder_learning_rate = 3e-3  # the same groups as the official recipe, without Lookahead
    plain = plain_opt.create_optimizer()
    ahead = trainer_for(looked, tmp_path, "official").create_optimizer()

    def step(model, optimizer):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()

    for index in range(1, 6):
        step(reference, plain)
        step(looked, ahead)
        fast = dict(reference.named_parameters())
        for name, param in looked.named_parameters():
            if index < 5:
                torch.testing.assert_close(param, fast[name], rtol=0, atol=0, msg=f"step {index}: {name}")
            else:
                expected = initial[name] + 0.5 * (fast[name] - initial[name])
                torch.testing.assert_close(param, expected, rtol=1e-6, atol=1e-7, msg=name)
    moved = [n for n, p in reference.named_parameters() if not torch.equal(p, initial[n])]
    assert len(moved) > 10  # the check above compared weights that did change


def test_lookahead_slow_weights_start_at_step_0_by_hand_and_resume_from_its_state_dict():
    """SGD (lr 0.1, no momentum) on loss = sum(w), so every step moves w by -0.1; w0 = 1, k 5, alpha 0.5.
    Step 5: fast 0.5, slow 1 + 0.5 * (0.5 - 1) = 0.75 (slow weights started at step 5, as timm's, would give 0.5).
    Step 10: fast 0.75 - 0.5 = 0.25, slow 0.75 + 0.5 * (0.25 - 0.75) = 0.5. A copy resumed at step 7 from the
    state_dict ends at the same weights."""

    def run(param, optimizer, steps):
        for _ in range(steps):
            optimizer.zero_grad()
            param.sum().backward()
            optimizer.step()

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = Lookahead(torch.optim.SGD([weight], lr=0.1), alpha=0.5, k=5)
    run(weight, optimizer, 4)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.6))
    run(weight, optimizer, 1)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.75))
    run(weight, optimizer, 2)
    saved, at_step_7 = copy.deepcopy(optimizer.state_dict()), weight.detach().clone()
    run(weight, optimizer, 3)
    torch.testing.assert_close(weight.detach(), torch.full((3,), 0.5))

    resumed = torch.nn.Parameter(at_step_7)
    resumed_optimizer = Lookahead(torch.optim.SGD([resumed], lr=0.1), alpha=0.5, k=5)
    resumed_optimizer.load_state_dict(saved)
    assert resumed_optimizer.param_groups is resumed_optimizer.base_optimizer.param_groups
    run(resumed, resumed_optimizer, 3)
    torch.testing.assert_close(resumed.detach(), weight.detach(), rtol=0, atol=0)
    for alpha, k in ((1.5, 5), (0.5, 0), (0.5, 2.5)):
        with pytest.raises(ValueError, match="Lookahead (alpha|k)"):
            Lookahead(torch.optim.SGD([weight], lr=0.1), alpha=alpha, k=k)


@pytest.fixture(scope="module")
def studies_with_sides(shared_data_dir):
    """Real COVID-19-collection studies whose clinical notes say "left" or "right"."""
    train = load_source_dataset("covid19_studies", shared_data_dir / "covid19_collection")["train"]
    rows = [row for row in train if swap_left_right(row["report"]) != row["report"]][:4]
    assert len(rows) == 4
    return rows, list(train["report"])


@pytest.mark.parametrize("flip_probability", [1.0, 0.0])
def test_left_right_swap_reaches_a_separate_decoder_tokenizer(studies_with_sides, flip_probability):
    rows, all_reports = studies_with_sides
    decoder_tokenizer = train_report_tokenizer(all_reports, vocab_size=300)
    text_tokenizer = train_report_tokenizer(all_reports, vocab_size=200)
    image_processor = RefersImageProcessor(**processor_sizes(32))
    processor = RefersProcessor(image_processor, text_tokenizer, num_views=2, max_length=64)
    collate = StudyReportCollator(processor, train=True, decoder_tokenizer=decoder_tokenizer,
                                  train_transform=RadiographTrainTransform(flip_probability=flip_probability))
    batch = collate(rows)

    reports = [row["report"] for row in rows]
    seen = [swap_left_right(r) for r in reports] if flip_probability == 1.0 else reports
    expected = decoder_tokenizer(seen, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(batch["decoder_input_ids"], expected["input_ids"])
    assert torch.equal(batch["labels"], expected["input_ids"].masked_fill(expected["attention_mask"] == 0, -100))
    assert torch.equal(batch["decoder_attention_mask"], expected["attention_mask"])
    unswapped = decoder_tokenizer(reports, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    # the two tokenizations differ, so the comparison above tells a swapped report from an unswapped one
    assert (batch["decoder_input_ids"].shape == unswapped["input_ids"].shape
            and torch.equal(batch["decoder_input_ids"], unswapped["input_ids"])) == (flip_probability == 0.0)
    # the text encoder's tokens are swapped alike (the processor's own swap)
    text_expected = text_tokenizer(seen, padding="longest", truncation=True, max_length=64, return_tensors="pt")
    assert torch.equal(batch["input_ids"], text_expected["input_ids"])
    assert "flipped" not in batch


def test_collators_swap_the_report_exactly_when_the_study_is_mirrored(studies_with_sides):
    """Random flips (p 0.5, nothing else random): a study whose pixels are the mirror of its evaluation pixels has
    left / right swapped once in both tokenizations; a study left as it is keeps its report."""
    rows, all_reports = studies_with_sides
    rows = [dict(row, images=row["images"][:1]) for row in rows] * 3  # one view each: view choice is not random
    decoder_tokenizer = train_report_tokenizer(all_reports, vocab_size=300)
    text_tokenizer = train_report_tokenizer(all_reports, vocab_size=200)
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), text_tokenizer, num_views=1,
                                max_length=64)
    flips = RadiographTrainTransform(rotation_degrees=0, random_crop=False, color_jitter_probability=0.0)
    torch.manual_seed(1)
    batch = StudyReportCollator(processor, train=True, decoder_tokenizer=decoder_tokenizer, train_transform=flips)(rows)
    plain = StudyReportCollator(processor, train=False, decoder_tokenizer=decoder_tokenizer)(rows)
    flipped = []
    for index in range(len(rows)):
        image, reference = batch["pixel_values"][index], plain["pixel_values"][index]
        assert torch.equal(image, reference) != torch.equal(image, reference.flip(-1))  # one or the other
        flipped.append(torch.equal(image, reference.flip(-1)))
    assert 0 < sum(flipped) < len(rows)
    for tokenizer, key in ((decoder_tokenizer, "decoder_input_ids"), (text_tokenizer, "input_ids")):
        seen = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch[key]]
        for row, flag, text in zip(rows, flipped, seen):
            report = swap_left_right(row["report"]) if flag else row["report"]
            expected = tokenizer(report, truncation=True, max_length=64)["input_ids"]
            assert text == tokenizer.decode(expected, skip_special_tokens=True), (flag, key)


def test_processor_sizes_per_resize_mode():
    assert processor_sizes(224) == {"size": {"height": 256, "width": 256}, "crop_size": {"height": 224, "width": 224}}
    # 112 * 256 / 224 = 128: the paper's ratio at any size
    assert processor_sizes(112, "shortest_edge") == {"size": {"shortest_edge": 128},
                                                     "crop_size": {"height": 112, "width": 112}}
    with pytest.raises(ValueError, match="resize must be one of"):
        processor_sizes(224, "crop")


def test_lookahead_arguments_reach_the_optimizer_and_bad_ones_are_refused(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    model = tiny_model()
    optimizer = RefersTrainer(model=model, args=args, lookahead_steps=3, lookahead_alpha=0.3).create_optimizer()
    assert isinstance(optimizer, Lookahead)
    assert {(g["lookahead_k"], g["lookahead_alpha"]) for g in optimizer.param_groups} == {(3, 0.3)}
    for alpha in (0.0, 1.0):  # the closed interval's ends are valid
        RefersTrainer(model=model, args=args, lookahead_steps=5, lookahead_alpha=alpha)
    for steps, alpha in ((-1, 0.5), (5, -0.1), (5, 1.5)):
        with pytest.raises(ValueError, match="lookahead_steps must be >= 0 and lookahead_alpha in \\[0, 1\\]"):
            RefersTrainer(model=model, args=args, lookahead_steps=steps, lookahead_alpha=alpha)


def test_evaluation_batches_come_from_the_eval_collator(tmp_path):
    """Training batches through `data_collator` (augmenting), evaluation and prediction through
    `eval_data_collator`; the training collator is back in place afterwards."""
    from datasets import Dataset

    def tagging(tag):
        return lambda rows: {"tag": tag, "n": torch.tensor(len(rows))}

    train, evaluate = tagging("train"), tagging("eval")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_train_batch_size=2, per_device_eval_batch_size=3)
    data = Dataset.from_dict({"x": list(range(6))})
    trainer = RefersTrainer(model=tiny_model(), args=args, data_collator=train, eval_data_collator=evaluate,
                            train_dataset=data, eval_dataset=data)
    assert next(iter(trainer.get_eval_dataloader()))["tag"] == "eval"
    assert next(iter(trainer.get_test_dataloader(data)))["tag"] == "eval"
    assert trainer.data_collator is train
    first = next(iter(trainer.get_train_dataloader()))
    assert first["tag"] == "train" and int(first["n"]) == 2
    plain = RefersTrainer(model=tiny_model(), args=args, data_collator=train, train_dataset=data, eval_dataset=data)
    assert next(iter(plain.get_eval_dataloader()))["tag"] == "train"  # no eval collator: the one collator


def test_worker_generator_is_seeded_from_torch_and_kept_per_worker():
    from modeling_refers.training.trainer import worker_generator

    torch.manual_seed(5)
    cache = {}
    generator = worker_generator(cache)
    assert worker_generator(cache) is generator and len(cache) == 1  # one per process / worker, reused
    import numpy as np

    assert generator.random() == np.random.default_rng(5).random()  # the Trainer seeds torch (per worker)
    torch.manual_seed(6)
    assert worker_generator({}).random() != np.random.default_rng(5).random()


def test_study_collator_is_reproducible_per_seed_and_names_a_bad_study(studies_with_sides, tmp_path):
    rows, all_reports = studies_with_sides
    tokenizer = train_report_tokenizer(all_reports, vocab_size=200)
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), tokenizer, num_views=2, max_length=32)

    def collate(seed, train=True):
        torch.manual_seed(seed)
        return StudyReportCollator(processor, train=train)(rows)

    first, again, other = collate(0), collate(0), collate(1)
    assert torch.equal(first["pixel_values"], again["pixel_values"])
    assert not torch.equal(first["pixel_values"], other["pixel_values"])  # augmentation draws from the seed
    assert torch.equal(collate(0, train=False)["pixel_values"], collate(1, train=False)["pixel_values"])
    broken = [dict(rows[0]), dict(rows[1], images=[str(tmp_path / "missing.png")])]
    with pytest.raises(FileNotFoundError, match=f"id {rows[1]['study_id']!r}"):
        StudyReportCollator(processor, train=False)(broken)


# ---------------------------------------------------------------------------------------------------------------------
# Resuming only from complete checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def write_checkpoint(folder, step: int, **save_kwargs):
    """A Trainer-like `checkpoint-<step>`: the tiny model's weights and a trainer_state.json."""
    from transformers import TrainerState

    tiny_model().save_pretrained(folder, **save_kwargs)
    TrainerState(global_step=step).save_to_json(str(folder / "trainer_state.json"))
    return folder


def cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_resume_skips_an_incomplete_newest_checkpoint_and_names_it(tmp_path, caplog):
    from modeling_refers.training.trainer import incomplete_checkpoint, resume_checkpoint

    out = tmp_path / "run"
    for step in (1, 2, 10):
        write_checkpoint(out / f"checkpoint-{step}", step)
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none")
    assert resume_checkpoint(args) == str(out / "checkpoint-10")  # complete: the newest (by step, not by name)

    cut_in_half(out / "checkpoint-10" / "model.safetensors")
    (out / "checkpoint-2" / "trainer_state.json").unlink()
    with caplog.at_level("WARNING", logger="modeling_refers.training.trainer"):
        assert resume_checkpoint(args) == str(out / "checkpoint-1")
    warned = caplog.text
    assert f"Skipping the incomplete checkpoint {out / 'checkpoint-10'}" in warned
    assert f"{out / 'checkpoint-10' / 'model.safetensors'} is truncated" in warned
    assert f"{out / 'checkpoint-2' / 'trainer_state.json'} is missing" in warned

    # an explicit --resume_from_checkpoint that is incomplete is refused, naming the file
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none",
                             resume_from_checkpoint=str(out / "checkpoint-10"))
    with pytest.raises(ValueError, match=r"checkpoint-10/model.safetensors is truncated"):
        resume_checkpoint(args)
    (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_st')
    assert "trainer_state.json is not valid JSON" in incomplete_checkpoint(str(out / "checkpoint-1"))


def test_sharded_checkpoints_count_only_with_every_shard_whole(tmp_path):
    from modeling_refers.training.trainer import incomplete_checkpoint

    folder = write_checkpoint(tmp_path / "checkpoint-3", 3, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert incomplete_checkpoint(str(folder)) is None
    cut_in_half(shards[-1])
    assert f"{shards[-1]} is truncated" in incomplete_checkpoint(str(folder))
    shards[-1].unlink()
    assert f"names shards that are not in the folder: {shards[-1].name}" in incomplete_checkpoint(str(folder))
    cut_in_half(folder / "model.safetensors.index.json")
    assert "is not a readable shard index" in incomplete_checkpoint(str(folder))


def test_safetensors_check_reads_the_header_against_the_file_size(tmp_path):
    from modeling_refers.loading import safetensors_problem

    folder = write_checkpoint(tmp_path / "checkpoint-1", 1)
    path = folder / "model.safetensors"
    whole = path.read_bytes()
    assert safetensors_problem(path) is None
    header_length = int.from_bytes(whole[:8], "little")
    path.write_bytes(whole[:-1])  # one byte short: the header is readable, the data is not all there
    assert "is truncated: its header says the tensor data is" in safetensors_problem(path)
    path.write_bytes(whole[: 8 + header_length // 2])  # cut inside the header
    assert f"its header length says {header_length} bytes of header" in safetensors_problem(path)
    path.write_bytes(whole[:5])
    assert "fewer than the 8-byte safetensors header length" in safetensors_problem(path)
    path.write_bytes(whole + b"\0" * 4)
    assert "4 bytes follow the last tensor" in safetensors_problem(path)


def test_loading_a_half_written_folder_names_the_truncated_file(tmp_path):
    from modeling_refers import RefersForImageClassification

    folder = tmp_path / "pretrained"
    tiny_model().save_pretrained(folder)
    from_pretrained_checked(RefersForImageClassification, folder, num_labels=2)  # whole: loads
    cut_in_half(folder / "model.safetensors")
    with pytest.raises(OSError, match=rf"Cannot load RefersForImageClassification from '{folder}': "
                                      rf"{folder / 'model.safetensors'} is truncated"):
        from_pretrained_checked(RefersForImageClassification, folder, num_labels=2)


# ---------------------------------------------------------------------------------------------------------------------
# A diverging run stops loudly
# ---------------------------------------------------------------------------------------------------------------------


class PoisonBeforeStep(TrainerCallback):
    """Before optimizer step `step` (1-based) fills one parameter with NaN, as a diverged update would, so that the
    loss part reading it goes non-finite."""

    def __init__(self, parameter: str, step: int):
        self.parameter, self.step = parameter, step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step - 1:
            with torch.no_grad():
                model.get_parameter(self.parameter).fill_(float("nan"))


def test_non_finite_training_loss_stops_the_run_naming_step_part_and_studies(studies_with_sides, tmp_path):
    """Without the check the Trainer hid the NaN from the logged loss, stepped on NaN gradients and saved a NaN
    checkpoint-3; now step 3 raises before backward, and checkpoint-2 stays the last (good) one."""
    from datasets import Dataset
    from safetensors.torch import load_file

    rows, all_reports = studies_with_sides
    tokenizer = train_report_tokenizer(all_reports, vocab_size=120)
    processor = RefersProcessor(RefersImageProcessor(**processor_sizes(32)), tokenizer, num_views=3, max_length=16)
    collator = StudyReportCollator(processor, train=False)
    ids = [row["study_id"] for row in rows]
    assert collator(rows)["study_ids"] == ids
    out = tmp_path / "run"
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_train_batch_size=len(rows), max_steps=5, save_steps=1, logging_steps=1,
                             learning_rate=1e-3)
    trainer = RefersTrainer(model=tiny_model(len(tokenizer)), args=args, data_collator=collator,
                            train_dataset=Dataset.from_list(rows), callbacks=[PoisonBeforeStep("text_projection.weight", step=3)])
    with pytest.raises(FloatingPointError) as raised:
        trainer.train()
    message = str(raised.value)
    assert message.startswith("The training loss at step 3 is not finite: loss_contrast = nan, on the batch of "
                              "study_ids [")
    assert "loss_report" not in message  # the decoder's loss was still finite: only the part that went is named
    assert all(repr(study_id) in message for study_id in ids)
    assert f"the last checkpoint in {str(out)!r} is the last good one" in message
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())


def test_non_finite_evaluation_loss_stops_naming_the_images(shared_data_dir, tmp_path):
    """Fine-tuning batches carry `image_ids`; they never reach the model (its forward signature stays as exported),
    and a NaN evaluation loss raises instead of being dropped from `eval_loss`."""
    from datasets_scripts import load_target_dataset
    from modeling_refers import RefersForImageClassification
    from modeling_refers.training.trainer import ImageLabelCollator

    data = load_target_dataset("nih_chestxray14", shared_data_dir / "nih_chestxray14_sample")["validation"]
    data = data.select(range(3))
    config = tiny_model().config
    config.num_labels, config.problem_type = len(data[0]["labels"]), "multi_label_classification"
    model = RefersForImageClassification(config)
    collator = ImageLabelCollator(RefersImageProcessor(**processor_sizes(32)), train=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_eval_batch_size=3)
    trainer = RefersTrainer(model=model, args=args, data_collator=collator, eval_dataset=data)
    assert collator(list(data))["image_ids"] == list(data["image_id"])
    received = []
    model.register_forward_pre_hook(lambda module, args, kwargs: received.append(set(kwargs)), with_kwargs=True)
    assert set(trainer.evaluate()) >= {"eval_loss"}  # finite
    assert received == [{"pixel_values", "labels"}]  # the ids were kept aside
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError) as raised:
        trainer.evaluate()
    assert str(raised.value).startswith(
        f"The evaluation loss after step 0 is not finite: loss = nan, on the batch of image_ids {list(data['image_id'])}.")


@pytest.mark.parametrize("batch_size,workers", [(7, 2), (50, 0)])
def test_predict_keeps_the_dataset_order_with_workers_and_a_ragged_last_batch(tmp_path, batch_size, workers):
    """`RefersTrainer.predict` through `ImageLabelCollator` returns one row per image in the dataset's order (labels
    and scores), with dataloader workers and an eval batch size that does not divide the set (predictions.csv pairs
    these rows with the dataset's image ids): each score equals the model run on that image alone."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    from modeling_refers import RefersForImageClassification
    from modeling_refers.training.trainer import ImageLabelCollator

    rng = np.random.default_rng(0)
    n = 23
    images = [Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)) for _ in range(n)]
    labels = rng.integers(0, 2, (n, 3)).astype(np.float32).tolist()
    data = Dataset.from_dict({"image_id": [f"img{i:02d}" for i in range(n)], "image": images, "labels": labels})
    torch.manual_seed(0)
    model = RefersForImageClassification(RefersConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        aggregation="none", num_labels=3, problem_type="multi_label_classification")).eval()
    processor = RefersImageProcessor(**processor_sizes(32))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False,
                             per_device_eval_batch_size=batch_size, dataloader_num_workers=workers,
                             dataloader_pin_memory=False)
    trainer = RefersTrainer(model=model, args=args, data_collator=ImageLabelCollator(processor, train=True),
                            eval_data_collator=ImageLabelCollator(processor, train=False))
    out = trainer.predict(data)
    logits = out.predictions[0] if isinstance(out.predictions, tuple) else out.predictions
    np.testing.assert_array_equal(out.label_ids, np.asarray(labels))
    with torch.no_grad():
        alone = np.concatenate([model(**processor([image], return_tensors="pt")).logits.numpy() for image in images])
    assert logits.shape == (n, 3)
    np.testing.assert_allclose(logits, alone, atol=1e-5)
