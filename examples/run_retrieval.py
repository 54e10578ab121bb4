#!/usr/bin/env python
"""Image-to-report and report-to-image retrieval over held-out studies with a REFERS pretraining checkpoint.

    python examples/run_retrieval.py --model_name_or_path runs/pretrain --output_dir runs/retrieval

The study embedding (`get_study_features`) and the report embedding (`get_text_features`) are the two sides of
the study-report consistency loss; their cosine similarity ranks every report for every study and every study for
every report. A report with the same text as the study's own counts as correct. Writes `results.json` (Recall@1/5/10
in percent and median rank, both ways, as JoImTeRNet reports them), `retrieval_table.md`, `top_reports.jsonl`
(per study: its top reports with similarity and correctness), `similarity.png` and `retrieval_examples.png`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os


from modeling_refers.tasks.common import add_source_split_arguments, load_pretraining_folder, load_source_split
from modeling_refers.file_utils import atomic_write_text
from modeling_refers.tasks.retrieval import (
    retrieval_examples_png,
    retrieve,
    similarity_png,
    top_k,
)

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="A run_pretrain.py output folder.")
    parser.add_argument("--output_dir", required=True)
    add_source_split_arguments(parser)
    parser.add_argument("--top_k", type=int, default=5, help="Reports listed per study in top_reports.jsonl.")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_examples", type=int, default=6, help="Query studies drawn in retrieval_examples.png.")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top_k must be >= 1, got {args.top_k}")
    return args


def markdown_table(metrics: dict, num_studies: int, title: str) -> str:
    ks = [key for key in metrics["image_to_report"] if key.startswith("R@")]
    lines = [f"{title}\n", "| direction | " + " | ".join(ks) + " | median rank | mean rank |",
             "|---|" + "---:|" * (len(ks) + 2)]
    for direction, name in (("image_to_report", "image -> report"), ("report_to_image", "report -> image")):
        row = metrics[direction]
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in ks) +
                     f" | {row['median_rank']:.1f} | {row['mean_rank']:.1f} |")
    lines.append(f"\nRecall@K in percent over {num_studies} studies; chance R@1 = {100 / num_studies:.1f}%, "
                 f"chance median rank = {(num_studies + 1) / 2:.1f}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model, processor, _ = load_pretraining_folder(args.model_name_or_path, need_text_encoder=True)
    rows = load_source_split(args, min_studies=2, purpose="retrieval")
    studies, reports, ids = rows["images"], rows["report"], rows["study_id"]
    out = retrieve(model, processor, studies, reports, batch_size=args.batch_size)
    similarity, relevance = out.similarity.numpy(), out.relevance.numpy()

    os.makedirs(args.output_dir, exist_ok=True)
    best = top_k(similarity, args.top_k)
    lines = []
    for q, study_id in enumerate(ids):
        lines.append(json.dumps({
            "study_id": study_id, "report": reports[q],
            "rank_of_own_report": out.metrics["ranks"]["image_to_report"][q],
            "top_reports": [{"rank": r, "study_id": ids[j], "similarity": round(float(similarity[q, j]), 5),
                             "correct": bool(relevance[q, j]), "report": reports[j]}
                            for r, j in enumerate(best[q], start=1)],
        }))
    atomic_write_text(os.path.join(args.output_dir, "top_reports.jsonl"), "\n".join(lines) + "\n")
    title = f"Retrieval on {len(rows)} {args.split} studies of {args.dataset_name}"
    atomic_write_text(os.path.join(args.output_dir, "retrieval_table.md"), markdown_table(out.metrics, len(rows), title))
    similarity_png(similarity, relevance, os.path.join(args.output_dir, "similarity.png"), title=title)
    queries = list(range(min(args.num_examples, len(rows))))
    retrieval_examples_png(studies, reports, similarity, relevance, os.path.join(args.output_dir,
                           "retrieval_examples.png"), queries=queries, k=min(3, len(rows)))
    results = {
        "model": os.path.abspath(args.model_name_or_path), "dataset": args.dataset_name,
        "data_dir": os.path.abspath(args.data_dir), "split": args.split, "num_studies": len(rows),
        "image_to_report": out.metrics["image_to_report"], "report_to_image": out.metrics["report_to_image"],
    }
    atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    logger.info("%s\n%s", title, markdown_table(out.metrics, len(rows), title))
    return results


if __name__ == "__main__":
    main()
