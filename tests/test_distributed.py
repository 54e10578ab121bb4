"""Several processes (torch.distributed with gloo on CPU, as NCCL on GPUs): global contrastive negatives, and the
scripts under torchrun compared with one process."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_refers import RefersConfig, RefersForPreTraining

VOCAB, BOS, EOS, PAD = 64, 2, 3, 0
# float32 sums in another order (all-reduce of two halves vs one batch): equal to ~1e-7 relative; 1e-5 leaves room
# for the 4-layer chains without hiding a missing term (those change gradients at the 1e-2 level, see the test).
RTOL, ATOL = 1e-5, 1e-6


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
                         text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "workers-ok" in run.stdout

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
