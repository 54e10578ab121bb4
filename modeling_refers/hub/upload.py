"""What a push to the Hub uploads: an allow-list, the one list for `RefersTrainer.push_to_hub` (and its pushes at
each save during training) and `examples/push_refers_to_hub.py`.

A training output folder holds much that must not leave the machine: `training_args.bin` (a pickle holding
`--hub_token` in plain text when one is given), `run_signature.json` and the checkpoints (absolute local paths),
`results.json`, and per-image files (`predictions.csv`: test labels and scores per image; `label_ids.json`: the
training image ids). A push uploads only what a model repo needs to load and describe the model:

- config and weights: `config.json`, `generation_config.json`, `model.safetensors` (or its shards and index);
- processor / tokenizer files (the top folder and `report_tokenizer/`);
- the modeling code named in an `auto_map` (config, processor, tokenizer), with the files it imports relatively;
- the model card `README.md` and the local figures it shows (`![...](roc_curve.png)`, `<img src=...>`).

Per-image files go only when asked for by name (`include_predictions`, `include_label_ids`). Files that older
versions uploaded and that are not uploaded now are deleted from the repo's head by the same commit.
"""

import glob
import json
import os
import re
from pathlib import Path

from huggingface_hub import HfApi

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
PROCESSOR_FILES = (
    "preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "tokenizer.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model",
)
# Subfolders that hold a tokenizer of their own (run_pretrain.py: the report decoder's tokenizer).
TOKENIZER_SUBFOLDERS = ("report_tokenizer",)
CARD = "README.md"
_FIGURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")
_MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'][^)]*)?\)")
_HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
# Per-image files, uploaded only when asked for: the `include_*` argument that adds each.
PER_IMAGE_FILES = {"predictions.csv": "include_predictions", "label_ids.json": "include_label_ids"}
# Files of an output folder that stay local; a push deletes them from the repo's head if an earlier push left them.
LOCAL_ONLY_FILES = ("training_args.bin", "run_signature.json", "results.json", "trainer_state.json",
                    "all_results.json", "train_results.json", "eval_results.json", "test_results.json",
                    *PER_IMAGE_FILES)
# Trainer checkpoint folders an earlier push may have left (`--hub_strategy checkpoint`, older push scripts).
LOCAL_ONLY_FOLDERS = ("last-checkpoint/*", "checkpoint-*/*")


def _auto_map_modules(value) -> list[str]:
    """The module names in one `auto_map` value ("module.Class", ["module.Class", None], {"pil": ...})."""
    if isinstance(value, str):
        if "--" in value:  # "org/repo--module.Class": code that lives in another repo
            return []
        return [value.rsplit(".", 1)[0]] if "." in value else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [module for item in value for module in _auto_map_modules(item)]
    return []


def _code_files(folder: Path, subfolder: str = "") -> set[str]:
    from transformers.dynamic_module_utils import get_relative_import_files

    base = folder / subfolder
    files: set[str] = set()
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        path = base / name
        if not path.is_file():
            continue
        try:
            auto_map = json.loads(path.read_text(encoding="utf-8")).get("auto_map") or {}
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{path}: not a JSON object with an optional 'auto_map' ({err})") from err
        for module in _auto_map_modules(list(auto_map.values()) if isinstance(auto_map, dict) else auto_map):
            code = base / (module.replace(".", "/") + ".py")
            if not code.is_file():
                continue
            for found in [str(code), *get_relative_import_files(str(code))]:
                found = Path(found).resolve()
                if found.is_relative_to(folder.resolve()):
                    files.add(found.relative_to(folder.resolve()).as_posix())
    return files


def _card_figures(folder: Path) -> set[str]:
    card = folder / CARD
    if not card.is_file():
        return set()
    text = card.read_text(encoding="utf-8")
    figures = set()
    for target in _MARKDOWN_IMAGE.findall(text) + _HTML_IMAGE.findall(text):
        if "://" in target or target.startswith(("/", "#", "data:")) or not target.lower().endswith(_FIGURE_SUFFIXES):
            continue
        path = (folder / target).resolve()
        if path.is_file() and path.is_relative_to(folder.resolve()):
            figures.add(path.relative_to(folder.resolve()).as_posix())
    return figures


def hub_files(folder: str | os.PathLike, include_predictions: bool = False,
              include_label_ids: bool = False) -> list[str]:
    """The files of `folder` (relative, '/'-separated, sorted) that a push uploads; see the module docstring."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{os.fspath(folder)!r} is not a folder: expected a model folder to push")
    names = {name for name in os.listdir(folder) if (folder / name).is_file() and not (folder / name).is_symlink()}
    files = {name for name in names if name in MODEL_FILES or name in PROCESSOR_FILES or _SHARD.fullmatch(name)}
    if CARD in names:
        files.add(CARD)
    files |= _code_files(folder) | _card_figures(folder)
    for sub in TOKENIZER_SUBFOLDERS:
        if (folder / sub).is_dir():
            files |= {f"{sub}/{name}" for name in os.listdir(folder / sub)
                      if name in PROCESSOR_FILES and (folder / sub / name).is_file()}
            files |= _code_files(folder, sub)
    wanted = {"include_predictions": include_predictions, "include_label_ids": include_label_ids}
    files |= {name for name, flag in PER_IMAGE_FILES.items() if wanted[flag] and name in names}
    return sorted(files)


def upload_model_folder(folder: str | os.PathLike, repo_id: str, include_predictions: bool = False,
                        include_label_ids: bool = False, api: HfApi | None = None, **upload_kwargs):
    """`HfApi.upload_folder` of `hub_files(folder, ...)` only (the rest of `folder` stays local); the same commit
    deletes from the repo's head the local-only files an earlier push may have left there. `upload_kwargs` go to
    `upload_folder` (`commit_message`, `token`, `revision`, `run_as_future`, ...)."""
    files = hub_files(folder, include_predictions=include_predictions, include_label_ids=include_label_ids)
    if "config.json" not in files:  # an empty allow-list would make an empty commit, not a model repo
        raise FileNotFoundError(f"{os.fspath(folder)!r} has no config.json: nothing to push (expected a folder "
                                "written by save_pretrained / run_pretrain.py / run_finetune.py)")
    stale = [glob.escape(name) for name in LOCAL_ONLY_FILES if name not in files] + list(LOCAL_ONLY_FOLDERS)
    return (api or HfApi()).upload_folder(folder_path=os.fspath(folder), repo_id=repo_id,
                                          allow_patterns=[glob.escape(name) for name in files],
                                          delete_patterns=stale, **upload_kwargs)


def check_hub_arguments(args) -> None:
    """Refuse `--push_to_hub` with `--hub_strategy checkpoint` / `all_checkpoints`, before anything is written or
    created: those upload whole Trainer checkpoints (`training_args.bin` with the token, `trainer_state.json` with
    local paths, optimizer state), which the allow-list keeps local."""
    strategy = str(getattr(args.hub_strategy, "value", args.hub_strategy))
    if getattr(args, "push_to_hub", False) and strategy in ("checkpoint", "all_checkpoints"):
        raise ValueError(
            f"--hub_strategy {strategy!r} uploads whole training checkpoints (training_args.bin holds --hub_token, "
            "trainer_state.json local paths); refers pushes only the model files. Use --hub_strategy every_save or "
            "end.")
