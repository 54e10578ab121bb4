#!/usr/bin/env python
"""Push a REFERS folder (pretrained or fine-tuned: weights, config, modeling code, processor, model card) to the Hub.

    python examples/push_refers_to_hub.py --model_dir runs/pretrain --repo_id your-org/refers-vit-base

The folder is loaded first (AutoModelForPreTraining / AutoModelForImageClassification / AutoModel, whichever its
config names), so a broken folder is refused before anything is uploaded. A model card (README.md) is written from
`results.json` when the folder has one, else a pretrained-model card, unless the folder already carries a card.
Only model files are uploaded (`modeling_refers.hub.upload.hub_files`, the list the Trainer's push uses too): config,
weights, processor / tokenizer files, the modeling code named in `auto_map`, the card and the figures it shows. Never
`training_args.bin`, `results.json`, `run_signature.json` or checkpoints; the per-image files `predictions.csv` (test
labels and scores) and `label_ids.json` (training image ids) only with `--include_predictions` / `--include_label_ids`.
The repo is created private unless `--hub_private_repo false`. `HF_ENDPOINT` / `HF_TOKEN` choose the Hub and account.
"""

from __future__ import annotations

import argparse
import json
import os

from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining
from transformers.hf_argparser import string_to_bool

import modeling_refers  # noqa: F401  (registers the Auto classes)
from modeling_refers.hub.upload import upload_model_folder
from modeling_refers.hub.model_card import make_model_card, save_model_card

AUTO_CLASSES = {
    "RefersForPreTraining": AutoModelForPreTraining,
    "RefersForImageClassification": AutoModelForImageClassification,
    "RefersModel": AutoModel,
}


def check_folder(model_dir: str):
    """Load the folder's model with its Auto class; raise a clear error if it is not a REFERS folder."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise FileNotFoundError(f"--model_dir {model_dir!r} has no config.json: pass a folder written by "
                                "save_pretrained / run_pretrain.py / run_finetune.py")
    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "refers":
        raise ValueError(f"--model_dir {model_dir!r} holds a {config.model_type!r} model, not a REFERS model")
    architecture = (config.architectures or ["RefersModel"])[0]
    if architecture not in AUTO_CLASSES:
        raise ValueError(f"--model_dir {model_dir!r}: unknown architecture {architecture!r}")
    return AUTO_CLASSES[architecture].from_pretrained(model_dir)


def ensure_model_card(model_dir: str, repo_id: str, overwrite: bool) -> None:
    path = os.path.join(model_dir, "README.md")
    if os.path.isfile(path) and not overwrite:
        return
    results_path = os.path.join(model_dir, "results.json")
    results = json.load(open(results_path)) if os.path.isfile(results_path) else None
    card = make_model_card(results, model_name=repo_id.split("/")[-1], repo_id=repo_id,
                           datasets=[results["dataset"]] if results else ())
    save_model_card(card, path)


def push(model_dir: str, repo_id: str, private: bool = True, overwrite_card: bool = False,
         commit_message: str = "Upload REFERS model", include_predictions: bool = False,
         include_label_ids: bool = False) -> str:
    check_folder(model_dir)
    ensure_model_card(model_dir, repo_id, overwrite_card)
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)  # an existing repo keeps its visibility
    commit = upload_model_folder(model_dir, repo_id, include_predictions=include_predictions,
                                 include_label_ids=include_label_ids, api=api, commit_message=commit_message)
    return commit.oid


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--repo_id", required=True, help="namespace/name on the Hub")
    parser.add_argument("--hub_private_repo", type=string_to_bool, default=True, metavar="{true,false}",
                        help="create the repo private (default: true; medical models); an existing repo keeps its "
                             "visibility")
    parser.add_argument("--private", action="store_true", help=argparse.SUPPRESS)  # old flag: private is the default
    parser.add_argument("--include_predictions", action="store_true",
                        help="also upload predictions.csv: the test labels and scores of every image")
    parser.add_argument("--include_label_ids", action="store_true",
                        help="also upload label_ids.json: the ids of the training images used")
    parser.add_argument("--overwrite_card", action="store_true", help="regenerate README.md even if one exists")
    args = parser.parse_args(argv)
    private = args.hub_private_repo or args.private
    oid = push(args.model_dir, args.repo_id, private, args.overwrite_card,
               include_predictions=args.include_predictions, include_label_ids=args.include_label_ids)
    print(f"pushed {args.model_dir} to {args.repo_id} ({'private' if private else 'public'} if new, commit {oid})")
    return oid


if __name__ == "__main__":
    main()
