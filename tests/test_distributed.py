"""Several processes (torch.distributed with gloo on CPU, as NCCL on GPUs): global contrastive negatives, and the
scripts under torchrun compared with one process."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modeling_refers import RefersConfig, RefersForPreTraining

VOCAB, BOS, EOS, PAD = 64, 2, 3, 0
# float32 sums in another order (all-reduce of two halves vs one batch): equal to ~1e-7 relative; 1e-5 leaves room
# for the 4-layer chains without hiding a missing term (those change gradients at the 1e-2 level, see the test).
RTOL, ATOL = 1e-5, 1e-6


# Child processes do not inherit pytest's warning filters: they print every deprecation (Python hides
# DeprecationWarning outside __main__ by default) and the test reads back the ones raised at our lines.
SHOW_DEPRECATIONS = {"PYTHONWARNINGS": "default::DeprecationWarning,default::FutureWarning"}
_OWN_WARNING = re.compile(r"^.*[/\\](?:modeling_refers|datasets_scripts|examples)[/\\]\S+\.py:\d+: "
                          r"(?:Deprecation|Future)Warning: .*$", re.MULTILINE)


def own_deprecation_warnings(stderr: str) -> list[str]:
    """The DeprecationWarning / FutureWarning lines of a child's stderr that point at our files."""
    return _OWN_WARNING.findall(stderr)


def tiny_config(**overrides) -> RefersConfig:
    values = dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, view_fusion_hidden_size=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                         vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        use_report_generation=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )
    values.update(overrides)
    return RefersConfig(**values)


WORKER = textwrap.dedent(
    """
    import json, sys, torch, torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel
    from modeling_refers import RefersConfig, RefersForPreTraining

    def run(rank, folder, global_negatives):
        dist.init_process_group("gloo", init_method=f"file://{folder}/store-{global_negatives}", rank=rank,
                                world_size=2)
        config = RefersConfig.from_pretrained(folder)
        config.contrastive_global_negatives = global_negatives
        torch.manual_seed(0)
        model = RefersForPreTraining(config)
        model.load_state_dict(torch.load(f"{folder}/weights.pt"))
        model = DistributedDataParallel(model, find_unused_parameters=False)
        inputs = torch.load(f"{folder}/inputs.pt")
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in inputs.items()}  # rank r: studies 2r, 2r + 1
        out = model(**half)
        out.loss.backward()  # DDP averages the two processes' gradients
        losses = [torch.zeros(()) for _ in range(2)]
        dist.all_gather(losses, out.loss.detach())
        if rank == 0:
            grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
            torch.save({"losses": torch.stack(losses), "grads": grads,
                        "logits_shape": list(out.logits_per_study.shape)},
                       f"{folder}/result-{global_negatives}.pt")
        dist.destroy_process_group()

    if __name__ == "__main__":
        folder = sys.argv[1]
        for global_negatives in (True, False):
            mp.spawn(run, args=(folder, global_negatives), nprocs=2, join=True)
        print("workers-ok")
    """
)


def test_global_negatives_two_processes_equal_one_process_with_the_whole_batch(tmp_path, radiographs):
    """2 processes x 2 studies with all-gathered embeddings = 1 process x 4 studies: the same InfoNCE loss (mean of
    the two processes' losses) and the same gradients (DDP's average). Without global negatives both differ."""
    config = tiny_config()
    torch.manual_seed(0)
    model = RefersForPreTraining(config)
    input_ids = torch.randint(5, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    input_ids[:, 0], input_ids[:, -1] = BOS, EOS
    inputs = dict(pixel_values=radiographs(12, size=32).reshape(4, 3, 3, 32, 32),
                  view_mask=torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
                  input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "worker.py").write_text(WORKER)

    out = model(**inputs)
    out.loss.backward()
    reference = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    run = subprocess.run([sys.executable, str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=600, stdin=subprocess.DEVNULL, env=dict(os.environ, **SHOW_DEPRECATIONS))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "workers-ok" in run.stdout
    assert own_deprecation_warnings(run.stderr) == []  # the autograd all-gather is torch's current one

    shared = torch.load(tmp_path / "result-True.pt")
    assert shared["logits_shape"] == [2, 4]  # each process scores its 2 studies against all 4 reports
    torch.testing.assert_close(shared["losses"].mean(), out.loss.detach(), rtol=RTOL, atol=ATOL)
    assert shared["grads"].keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(shared["grads"][name], grad, rtol=RTOL, atol=ATOL, msg=name)

    local = torch.load(tmp_path / "result-False.pt")  # per-process negatives (the official code's)
    assert local["logits_shape"] == [2, 2]
    assert not torch.allclose(local["losses"].mean(), out.loss.detach(), rtol=1e-3)
    differs = [n for n in reference if not torch.allclose(local["grads"][n], reference[n], rtol=1e-3, atol=1e-5)]
    assert len(differs) > len(reference) // 2


# ---------------------------------------------------------------------------------------------------------------------
# The scripts under torchrun (what `accelerate launch --multi_gpu` drives on GPUs), on CPU with gloo
# ---------------------------------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NO_DROPOUT = "hidden_dropout_prob=0.0,attention_probs_dropout_prob=0.0"
TINY = ("image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64,"
        f"view_fusion_hidden_size=16,decoder_hidden_size=32,decoder_num_attention_heads=4,"
        f"decoder_intermediate_size=64,decoder_dropout_prob=0.0,{NO_DROPOUT}")
REPORT_TOKENS = 8  # every report used is longer: each study has 7 next-token targets, on every process alike


def torchrun(script: str, args: list[str], nproc: int = 2, launcher: list[str] | None = None
             ) -> subprocess.CompletedProcess:
    """Run an example script under `torchrun --standalone` (or another `launcher` command line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **SHOW_DEPRECATIONS)
    launcher = launcher or [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(nproc)]
    run = subprocess.run([*launcher, str(EXAMPLES / script), *args], capture_output=True, text=True, timeout=600,
                         env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, (run.stdout[-2000:], run.stderr[-4000:])
    assert own_deprecation_warnings(run.stderr) == []
    return run


def pretrain_args(out: Path, data_dir: Path, batch: int, tokenizer: Path) -> list[str]:
    return ["--output_dir", str(out), "--data_dir", str(data_dir), "--config_overrides", TINY,
            "--text_encoder_name_or_path", "none", "--tokenizer_name_or_path", str(tokenizer), "--text_config_overrides",
            f"hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64,{NO_DROPOUT}",
            "--per_device_train_batch_size", str(batch), "--max_train_samples", "12", "--max_steps", "3",
            "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_steps", "1", "--logging_steps",
            "1", "--max_report_length", str(REPORT_TOKENS), "--augment", "false", "--use_cpu",
            "--dataloader_pin_memory", "false", "--do_train", "--seed", "0", "--train_sampling_strategy", "sequential"]


def _losses(out: Path) -> list[tuple[int, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [(e["step"], e["loss"]) for e in state["log_history"] if "loss" in e]


def test_run_pretrain_two_processes_equal_one_process_with_the_double_batch(tmp_path, shared_data_dir):
    """torchrun 2 x batch 2 vs one process x batch 4, same seed and data order (a sequential sampler, whose batches
    accelerate shards: process r takes batches r, r + 2, ...; a random sampler is shared the same way, but its
    permutation is drawn differently from one process's): the same logged losses and the same weights after 3
    steps. Dropout 0 and no augmentation make both deterministic; tolerance as above. Then checkpoints come from
    one writer, and an interrupted 2-process run resumes to the same weights."""
    from safetensors.torch import load_file

    from transformers import AutoTokenizer

    from datasets_scripts import load_covid19_studies
    from modeling_refers import train_report_tokenizer

    data_dir = shared_data_dir / "covid19_collection"
    single, double = tmp_path / "one", tmp_path / "two"
    # One vocabulary for both runs: tokenizers' WordPiece trainer breaks ties at the vocabulary cut in hash order,
    # so two trainings on 12 reports can keep different tokens (within a run, rank 0 trains and the others load).
    reports = load_covid19_studies(data_dir)["train"]["report"][:12]
    tokenizer_dir = tmp_path / "tokenizer"
    train_report_tokenizer(reports, vocab_size=300, output_dir=tokenizer_dir)
    subprocess_env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(EXAMPLES / "run_pretrain.py"),
                          *pretrain_args(single, data_dir, 4, tokenizer_dir)],
                         capture_output=True, text=True, timeout=600, env=subprocess_env, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:]
    torchrun("run_pretrain.py", pretrain_args(double, data_dir, 2, tokenizer_dir))

    # the premise of comparing mean losses: every report fills the 8 tokens (derived from the files)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert min(len(tokenizer(r)["input_ids"]) for r in reports) > REPORT_TOKENS

    # the logged parts are averaged over the processes like the loss itself, so they add up to it
    state_two = json.loads((double / "trainer_state.json").read_text())
    for entry in (e for e in state_two["log_history"] if "loss" in e):
        assert entry["loss_report"] + entry["loss_contrast"] == pytest.approx(entry["loss"], abs=2e-4)
    one, two = _losses(single), _losses(double)
    assert [step for step, _ in one] == [step for step, _ in two] == [1, 2, 3]
    for (_, a), (_, b) in zip(one, two):
        assert b == pytest.approx(a, rel=RTOL)
    weights_one, weights_two = load_file(single / "model.safetensors"), load_file(double / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=RTOL, atol=ATOL, msg=name)
    signature = json.loads((double / "run_signature.json").read_text())
    assert signature["world_size"] == 2 and signature["per_device_train_batch_size"] == 2
    assert sorted(p.name for p in double.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]

    # interrupted after step 2 (last checkpoint lost): 2 processes resume it and reach the same weights. Resumed
    # with `accelerate launch --multi_gpu --num_processes 2`, which on a machine without GPUs starts the same one
    # process group (torchrun underneath): the run signature's world size must match, or the resume is refused.
    import shutil

    shutil.rmtree(double / "checkpoint-3")
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
    resumed = torchrun("run_pretrain.py", pretrain_args(double, data_dir, 2, tokenizer_dir), launcher=accelerate)
    assert "2 process(es), 2 studies each per step; FSDP off; global contrastive negatives on" in resumed.stderr
    assert "checkpoint-2" in resumed.stdout + resumed.stderr
    state = json.loads((double / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    again = load_file(double / "model.safetensors")
    for name in weights_two:
        torch.testing.assert_close(again[name], weights_two[name], rtol=RTOL, atol=ATOL, msg=name)


def test_run_finetune_evaluates_each_example_once_under_two_processes(tmp_path, shared_data_dir):
    """The test set (181 or 77 images: not a multiple of 2 x batch 16) predicted by 2 processes: every image once
    in predictions.csv, the same scores and the same mean AUC as one process."""
    import pandas as pd

    args = ["--dataset_name", "nih_chestxray14", "--data_dir", str(shared_data_dir / "nih_chestxray14_sample"),
            "--config_overrides", "image_size=32,patch_size=8,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,"
            "intermediate_size=64,view_fusion_hidden_size=16", "--per_device_eval_batch_size", "16", "--do_predict",
            "--max_eval_samples", "40", "--use_cpu", "--dataloader_pin_memory", "false", "--seed", "0"]
    run = subprocess.run([sys.executable, str(EXAMPLES / "run_finetune.py"), "--output_dir", str(tmp_path / "one"),
                          *args], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-4000:]
    torchrun("run_finetune.py", ["--output_dir", str(tmp_path / "two"), *args])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    predictions_one = pd.read_csv(tmp_path / "one" / "predictions.csv")
    predictions_two = pd.read_csv(tmp_path / "two" / "predictions.csv")
    from datasets_scripts import load_nih_chestxray14

    test_size = len(load_nih_chestxray14(shared_data_dir / "nih_chestxray14_sample")["test"])
    assert test_size % 32 != 0  # the last batch is padded across processes: duplicates would show
    assert len(predictions_two) == test_size and predictions_two["image_id"].is_unique
    pd.testing.assert_frame_equal(predictions_two, predictions_one, rtol=1e-5)
    assert two["mean_auc"] == pytest.approx(one["mean_auc"], rel=1e-6)
    assert two["validation_mean_auc"] == pytest.approx(one["validation_mean_auc"], rel=1e-6)


def test_fsdp_request_on_cpu_runs_as_ddp_and_says_so(tmp_path, shared_data_dir):
    """accelerate turns FSDP on only for GPU-like devices (`AcceleratorState`: MULTI_GPU, MULTI_XPU, ...; not
    MULTI_CPU), so `accelerate launch --use_fsdp` on CPU trains with plain DDP. The script says so in its log rather
    than letting a user believe the model is sharded; the README's FSDP command is for GPUs. If accelerate ever
    shards on CPU, this test fails and the README must change."""
    out = tmp_path / "fsdp"
    accelerate = [str(Path(sys.executable).with_name("accelerate")), "launch", "--use_fsdp", "--num_processes", "2",
                  "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
                  "--fsdp_transformer_layer_cls_to_wrap", "RefersLayer,BertLayer"]
    args = pretrain_args(out, shared_data_dir / "covid19_collection", 2, tmp_path / "unused")
    index = args.index("--tokenizer_name_or_path")
    args[index : index + 2] = ["--report_tokenizer_vocab_size", "300"]
    args[args.index("--max_steps") + 1] = "2"
    run = torchrun("run_pretrain.py", args, launcher=accelerate)
    assert "2 process(es), 2 studies each per step; FSDP off" in run.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert json.loads((out / "run_signature.json").read_text())["world_size"] == 2
