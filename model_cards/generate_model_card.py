"""Write a REFERS Hub model card (README.md) from results.json files: a thin CLI over `make_model_card`.

Fine-tuned model (model-index filled from the measured AUCs):
    python model_cards/generate_model_card.py --results outputs/nih/results.json --output README.md \
        --model-name refers-vit-base-nih-chestxray14 --repo-id <namespace>/refers-vit-base-nih-chestxray14 \
        --base-model <namespace>/refers-vit-base-pretrained

Pretrained model (no --results: no model-index, pipeline_tag feature-extraction):
    python model_cards/generate_model_card.py --output model_cards/refers-vit-base-pretrained.md \
        --model-name refers-vit-base-pretrained
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


try:
    from modeling_refers.hub.model_card import DEFAULT_TAGS, load_results, make_model_card, save_model_card
except ImportError:  # run from a checkout where the package is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_refers.hub.model_card import DEFAULT_TAGS, load_results, make_model_card, save_model_card


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", action="append", default=[], help="results.json (repeat for several test sets)")
    parser.add_argument("--output", required=True, help="where to write the card (e.g. README.md)")
    parser.add_argument("--model-name", required=True, help="card title and model-index name")
    parser.add_argument("--repo-id", default=None, help="Hub id used in the usage snippet (default: --model-name)")
    parser.add_argument("--base-model", action="append", default=[], help="Hub id of the base model (repeatable)")
    parser.add_argument("--dataset", action="append", default=[], help="Hub dataset id for YAML `datasets`")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--pipeline-tag", default=None, help="default: image-classification with results, else "
                        "feature-extraction")  # fmt: skip
    parser.add_argument("--tag", action="append", default=[], help=f"extra tag (always included: {DEFAULT_TAGS})")
    parser.add_argument("--extra-body-file", default=None, help="Markdown file appended to the body")
    parser.add_argument("--training-data-file", default=None, help="Markdown file replacing the 'Training data' text")
    return parser.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    results = [load_results(p) for p in args.results] or None
    base_model = args.base_model[0] if len(args.base_model) == 1 else (args.base_model or None)
    card = make_model_card(
        results,
        model_name=args.model_name,
        base_model=base_model,
        datasets=args.dataset,
        license=args.license,
        pipeline_tag=args.pipeline_tag,
        tags=(*DEFAULT_TAGS, *args.tag),
        extra_body=Path(args.extra_body_file).read_text(encoding="utf-8") if args.extra_body_file else "",
        repo_id=args.repo_id,
        training_data=Path(args.training_data_file).read_text(encoding="utf-8") if args.training_data_file else None,
    )
    path = save_model_card(card, args.output)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
