#!/usr/bin/env python
"""Fine-tune a REFERS radiograph transformer on a labelled target data set with 1%, 10% or 100% of the labels.

    python examples/run_finetune.py --dataset_name nih_chestxray14 --data_dir /data/nih \
        --model_name_or_path runs/pretrain --label_ratio 0.01 --seed 0 --output_dir runs/nih-1pct --do_train --do_predict

Initialisation (`init` in results.json): a REFERS checkpoint folder (`--model_name_or_path`, a pretraining or
fine-tuning checkpoint; only the classifier head is new), a local timm ViT state dict (`--timm_weights`, e.g. an
ImageNet ViT-B/16 you downloaded), or random (neither). The paper's recipe is the default: SGD momentum 0.9, lr 3e-3,
linear warm-up then cosine decay, batch 128, the pretraining augmentations; BCE for multi-label, cross entropy for
single-label data sets, gradients clipped at norm 10 (the official code's value). The checkpoint with the best
validation mean AUC is kept and evaluated on test, and `results.json` records per-class AUC, mean AUC, config, seed,
ratio, the label ids used, the data (folder, image size, images per split) and the steps trained.

Nothing is written before the inputs are known good. A run in an `--output_dir` that holds checkpoints resumes them
only when they come from the same run (`run_signature.json`: data, label ratio, seed, starting point and recipe);
otherwise it stops with the fields that differ. `--start_fresh` deletes the old checkpoints and starts again. `--push_to_hub
--hub_model_id org/name` pushes the model with a model card filled from those results.
"""

from modeling_refers.finetune_refers import main

if __name__ == "__main__":
    main()
