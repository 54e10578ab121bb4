#!/usr/bin/env python
"""Write reports for held-out studies with a REFERS pretraining checkpoint and score them against the references.

    python examples/run_generate.py --model_name_or_path runs/pretrain --output_dir runs/generate

Decodings: greedy and beam search (`--num_beams 1 3`). Scores (`modeling_refers.metrics.report_generation_metrics`):
BLEU-1..4, ROUGE-L and CIDEr from pycocoevalcap, METEOR from pycocoevalcap when Java is found, ROUGE-L F1 from
rouge-score and corpus BLEU from sacrebleu. Writes `reports.jsonl` (one line per study: reference and each decoding),
`results.json` (scores per decoding), `report_examples.png` (views, reference, reports) and `metrics.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os


from modeling_refers.tasks.common import add_source_split_arguments, load_pretraining_folder, load_source_split
from modeling_refers.metrics import report_generation_metrics
from modeling_refers.file_utils import atomic_write_text
from modeling_refers.tasks.generation import generate_reports, metrics_bar_png, report_examples_png

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A run_pretrain.py output folder.")
    parser.add_argument("--output_dir", required=True)
    add_source_split_arguments(parser)
    parser.add_argument("--num_beams", type=int, nargs="+", default=[1, 3], help="1 = greedy.")
    parser.add_argument("--max_new_tokens", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_examples", type=int, default=6, help="Studies drawn in report_examples.png.")
    parser.add_argument("--no_meteor", action="store_true", help="Skip METEOR (a Java program) even if Java is found.")
    args = parser.parse_args(argv)
    if any(k < 1 for k in args.num_beams):
        parser.error(f"--num_beams must be >= 1, got {args.num_beams}")
    if args.max_new_tokens < 1:
        parser.error(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model, processor, tokenizer = load_pretraining_folder(args.model_name_or_path, need_decoder=True)
    rows = load_source_split(args, min_studies=1, purpose="report generation")
    studies, references, ids = rows["images"], rows["report"], rows["study_id"]

    generated, scores = {}, {}
    for beams in args.num_beams:
        name = "greedy" if beams == 1 else f"beam{beams}"
        generated[name] = generate_reports(model, processor, studies, tokenizer, batch_size=args.batch_size,
                                           desc=f"Generating ({name})", num_beams=beams,
                                           max_new_tokens=args.max_new_tokens)
        scores[name] = report_generation_metrics(generated[name], references, meteor=False if args.no_meteor else None)
        logger.info("%s: %s", name, {k: round(v, 4) for k, v in scores[name].items() if isinstance(v, float)})

    os.makedirs(args.output_dir, exist_ok=True)
    lines = [json.dumps({"study_id": i, "reference": r, **{k: v[n] for k, v in generated.items()}})
             for n, (i, r) in enumerate(zip(ids, references))]
    atomic_write_text(os.path.join(args.output_dir, "reports.jsonl"), "\n".join(lines) + "\n")
    shown = min(args.num_examples, len(rows))
    report_examples_png(studies[:shown], {k: v[:shown] for k, v in generated.items()}, references[:shown],
                        os.path.join(args.output_dir, "report_examples.png"), study_ids=ids[:shown])
    metrics_bar_png(scores, os.path.join(args.output_dir, "metrics.png"),
                    title=f"Report generation, {len(rows)} {args.split} studies of {args.dataset_name}")
    results = {
        "model": os.path.abspath(args.model_name_or_path), "dataset": args.dataset_name,
        "data_dir": os.path.abspath(args.data_dir), "split": args.split, "num_studies": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "scores": {k: {m: v for m, v in s.items() if m != "per_report"} for k, s in scores.items()},
    }
    atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
