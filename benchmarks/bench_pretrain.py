"""Training-step throughput, peak memory and model FLOPs utilisation of REFERS pretraining.

The paper's configuration: 3 views per study, ViT-B/16 radiograph transformer (224 px), softmax view fusion,
recurrent concatenation, a 1-layer report decoder of width 1024, a BERT-base-size text encoder built from its config
(no weights needed), reports of 100 tokens, SGD with momentum. One step = forward + backward + optimizer step.

- studies/s and images/s: median over `--steps` timed steps after `--warmup` steps.
- model FLOPs per step: counted with `torch.utils.flop_counter.FlopCounterMode` on one step (forward + backward).
- MFU: achieved model FLOP/s divided by the device's peak. On CPU the peak is *measured* (fp32 matrix multiply of
  `--gemm_size`, best of a few runs: what this machine's BLAS reaches), on GPU it is the bf16 dense peak of the card
  (`--peak_tflops`, default 989 for an H100 SXM).
- peak memory: `torch.cuda.max_memory_allocated` on GPU; on CPU the growth of the peak resident set during the
  timed steps over the resident size before the first step.

- `--gradient_checkpointing`: every layer of the radiograph transformer, the report decoder and BERT is recomputed
  in backward (what `run_pretrain.py --gradient_checkpointing` does), trading time for activation memory.

    python benchmarks/bench_pretrain.py --batch_size 2 --steps 3              # CPU
    python benchmarks/bench_pretrain.py --batch_size 32 --steps 1 --warmup 0 --no_flops [--gradient_checkpointing]
    python benchmarks/bench_pretrain.py --device cuda --bf16 --batch_size 32  # GPU, SDPA attention
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from modeling_refers import RefersConfig, RefersForPreTraining
from modeling_refers.file_utils import atomic_write_text


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measured_gemm_tflops(size: int, device: str, dtype: torch.dtype) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e12


def make_batch(config: RefersConfig, batch_size: int, report_length: int, device: str, dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, config.text_config.vocab_size, (batch_size, report_length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = config.bos_token_id, config.eos_token_id
    pixel_values = torch.randn(batch_size, config.num_views, 3, config.image_size, config.image_size,
                               generator=generator)
    return {
        "pixel_values": pixel_values.to(device, dtype),
        "view_mask": torch.ones(batch_size, config.num_views, dtype=torch.long, device=device),
        "input_ids": input_ids.to(device),
        "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": input_ids.to(device),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=2, help="studies per step (paper: 32)")
    parser.add_argument("--report_length", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 autocast (GPU, or a CPU with avx512_bf16 / AMX; emulated, slower, on AVX2 CPUs)")
    parser.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--gemm_size", type=int, default=2048)
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="GPU bf16 dense peak")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute every layer in backward")
    parser.add_argument("--no_flops", action="store_true",
                        help="skip the FLOP-counting pass (and MFU): one step less, for the large-batch memory runs")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    config = RefersConfig(attn_implementation=args.attn_implementation)
    model = RefersForPreTraining(config).to(args.device).train()
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.SGD(model.parameters(), lr=3e-3, momentum=0.9, weight_decay=1e-4)
    batch = make_batch(config, args.batch_size, args.report_length, args.device, torch.float32)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()

    flops_per_step = None
    if not args.no_flops:
        with FlopCounterMode(display=False) as counter:
            with autocast:
                loss = model(**batch).loss
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops_per_step = counter.get_total_flops()

    for _ in range(args.warmup):
        step()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base_rss, times = rss_bytes(), []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if args.device == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
        peak_tflops, peak_source = args.peak_tflops, "nominal bf16 dense peak (--peak_tflops)"
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak_tflops = measured_gemm_tflops(args.gemm_size, "cpu", torch.float32) if flops_per_step else None
        peak_source = f"measured fp32 GEMM {args.gemm_size}^3 on {args.threads} threads"

    seconds = statistics.median(times)
    achieved = flops_per_step / seconds / 1e12 if flops_per_step else None
    params = sum(p.numel() for p in model.parameters())
    result = {
        "device": args.device, "threads": args.threads, "bf16": args.bf16, "attn": args.attn_implementation,
        "gradient_checkpointing": args.gradient_checkpointing,
        "batch_studies": args.batch_size, "views": config.num_views, "report_tokens": args.report_length,
        "parameters_m": params / 1e6, "step_seconds_median": seconds,
        "studies_per_s": args.batch_size / seconds, "images_per_s": args.batch_size * config.num_views / seconds,
        "model_tflop_per_step": flops_per_step / 1e12 if flops_per_step else None, "achieved_tflops": achieved,
        "peak_tflops": peak_tflops, "peak_source": peak_source,
        "mfu": achieved / peak_tflops if achieved else None,
        "peak_memory_mib": peak_mib,
        "peak_memory_note": "max allocated" if args.device == "cuda" else "peak RSS of the process (model, optimizer"
                                                                        " state and activations)",
        "rss_before_timed_steps_mib": base_rss / 2**20,
    }
    for key, value in result.items():
        print(f"{key:>28}: {value:.4g}" if isinstance(value, float) else f"{key:>28}: {value}")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
