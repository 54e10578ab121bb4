#!/usr/bin/env python
"""Pretrain a REFERS radiograph transformer from studies and their free-text reports (report generation +
study-report consistency), with the Trainer.

One CPU or GPU:
    python examples/run_pretrain.py --output_dir runs/pretrain --do_train --do_eval

Several GPUs / nodes (the Trainer runs under accelerate / torchrun as is):
    accelerate launch --num_processes 8 examples/run_pretrain.py --output_dir runs/pretrain --do_train --do_eval --bf16
    torchrun --nproc_per_node 8 examples/run_pretrain.py ...

Data: any source-domain builder of `datasets_scripts` (`--dataset_name mimic_cxr|iu_xray|covid19_studies|
study_folder`, `--data_dir`), by default the real COVID-19-collection studies shipped in `sample_data/`.
The defaults are the paper's recipe (`--recipe paper`): SGD momentum 0.9, weight decay 1e-4 except LayerNorm and
biases, learning rate 3e-3 (radiograph transformer) and 3e-4 (report decoder and BERT), linear warm-up then cosine
decay, batch 32, gradients clipped at norm 10 (the official code's value; the paper does not say), the checkpoint with
the lowest validation loss kept. `--recipe official` is the released code's: the report decoder at 3e-3 too (only
BERT at 3e-4) and SGD inside Lookahead (k 5, alpha 0.5). A run started again in the same --output_dir resumes only
when it is the same run (`run_signature.json`: data, starting point, recipe, seed, ...); `--start_fresh` starts over.
"""

from modeling_refers.pretrain_refers import main

if __name__ == "__main__":
    main()
