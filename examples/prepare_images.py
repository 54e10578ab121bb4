#!/usr/bin/env python
"""Decode a data set's radiographs once, at a chosen short side, and save it with `datasets` (Arrow shards), so
training reads small images instead of decoding full-resolution originals every epoch.

    python examples/prepare_images.py --dataset_name mimic_cxr --data_dir /data/mimic-cxr-jpg \
        --output_dir /data/prepared/mimic_cxr-256 --short_side 256 --num_proc 16

Any builder of `datasets_scripts`: source-domain studies (`mimic_cxr`, `iu_xray`, `covid19_studies`,
`study_folder`: rows with `images` and `report`) or target-domain data sets (`nih_chestxray14`, `vinbigdata`,
`shenzhen_tb`, `covid19`, `covid19_viral_bacterial`: rows with `image` and `labels`). Rows, splits, labels and
reports are kept as the builder gives them; each image is decoded as the image processor decodes it (JPEGs with
PIL's `draft()`), its short side brought down to `--short_side` (never up) and stored as PNG (lossless; or
`--image_format JPEG --jpeg_quality 95`). An interrupted run started again with the same arguments goes on from
the chunks already done; run again when finished, it does nothing. Load the result with
`datasets_scripts.prepared_images.load_prepared_dataset(output_dir)`.
"""

from __future__ import annotations

import argparse
import logging
import os


from datasets_scripts import SOURCE_DATASETS, TARGET_DATASETS, load_source_dataset, load_target_dataset
from datasets_scripts.prepared_images import IMAGE_FORMATS, prepare_images

logger = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_name", required=True, choices=sorted({*SOURCE_DATASETS, *TARGET_DATASETS}))
    parser.add_argument("--data_dir", required=True, help="The data set's folder, as distributed.")
    parser.add_argument("--output_dir", required=True, help="The prepared data set's folder (created).")
    parser.add_argument("--short_side", type=int, default=256, help="Short side in pixels (default 256, the paper's).")
    parser.add_argument("--num_proc", type=int, default=None, help="Processes decoding images (datasets.map).")
    parser.add_argument("--image_format", default="PNG", choices=IMAGE_FORMATS)
    parser.add_argument("--jpeg_quality", type=int, default=95, help="With --image_format JPEG.")
    parser.add_argument("--no_jpeg_draft", action="store_true",
                        help="Decode JPEG originals at full size (default: PIL draft() at the smallest scale >= the "
                             "short side).")
    parser.add_argument("--num_shards", type=int, default=None, help="Arrow files per split (default: 500 MB each).")
    parser.add_argument("--rows_per_chunk", type=int, default=10_000,
                        help="Rows decoded and cached at a time (what an interrupted run redoes at most).")
    parser.add_argument("--split_dir", default=None, help="Target data sets: the folder of the split lists.")
    parser.add_argument("--image_dir", default=None, help="iu_xray only: the PNG image folder.")
    parser.add_argument("--no_verify_images", action="store_true",
                        help="Do not decode every image while building the rows (they are decoded in preparing).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace a prepared folder made from another source or with other settings.")
    args = parser.parse_args(argv)
    if args.short_side < 1:
        parser.error(f"--short_side must be >= 1, got {args.short_side}")
    if args.num_proc is not None and args.num_proc < 1:
        parser.error(f"--num_proc must be >= 1, got {args.num_proc}")
    if not os.path.isdir(args.data_dir):
        parser.error(f"--data_dir {args.data_dir!r}: no such folder")
    if args.image_dir is not None and args.dataset_name != "iu_xray":
        parser.error("--image_dir is for --dataset_name iu_xray only")
    if args.split_dir is not None and args.dataset_name not in TARGET_DATASETS:
        parser.error(f"--split_dir is for the target data sets ({', '.join(sorted(TARGET_DATASETS))}) only")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    kwargs = {"verify_images": not args.no_verify_images}
    if args.dataset_name in SOURCE_DATASETS:
        if args.dataset_name == "iu_xray":
            kwargs["image_dir"] = args.image_dir
        data = load_source_dataset(args.dataset_name, args.data_dir, **kwargs)
    else:
        if args.split_dir is not None:
            kwargs["split_dir"] = args.split_dir
        data = load_target_dataset(args.dataset_name, args.data_dir, **kwargs)
    source = {"dataset_name": args.dataset_name, "data_dir": os.path.abspath(args.data_dir),
              "split_dir": os.path.abspath(args.split_dir) if args.split_dir else None,
              "image_dir": os.path.abspath(args.image_dir) if args.image_dir else None}
    prepared = prepare_images(
        data, args.output_dir, short_side=args.short_side, num_proc=args.num_proc, image_format=args.image_format,
        jpeg_quality=args.jpeg_quality, jpeg_draft=not args.no_jpeg_draft, num_shards=args.num_shards,
        rows_per_chunk=args.rows_per_chunk, source=source, overwrite=args.overwrite)
    logger.info("%s: %s", args.output_dir, {name: len(split) for name, split in prepared.items()})
    return prepared


if __name__ == "__main__":
    main()
