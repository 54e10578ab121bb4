"""Training REFERS and the other methods: `trainer` (the Trainer subclass, the collators, the optimiser recipes),
`pretraining` (the method registry and the pretraining run, `main(argv)`), `finetuning` (the fine-tuning run),
`augmentation` (train-time torchvision transforms), `mrm_official` (MRM's official data side), `report_tokenizer`
(the decoder's vocabulary) and `run_signature` (what a run's output folder records to refuse a mismatched resume).
A new pretraining method is one entry in `pretraining.PRETRAINING_METHODS`."""
