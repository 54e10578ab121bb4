"""Forward throughput and peak memory of `RefersModel` (ViT-B/16) against timm's `vit_base_patch16_224`.

Same batch, same thread count, one run. Throughput rounds alternate between the models (so load on the machine
affects all of them alike) and the median round is reported. Peak memory is measured in a fresh child process per
model (peak resident set size during the timed forwards, minus the resident size before the first forward) on CPU,
or `torch.cuda.max_memory_allocated` on GPU.

    python benchmarks/bench_backbone.py --batch_size 8 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import statistics
import time

import torch


MODELS = ("timm", "none", "cls_add", "recurrent_concat")


def build(name: str, attn_implementation: str = "sdpa"):
    if name == "timm":
        import timm

        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    from modeling_refers import RefersConfig, RefersModel

    config = RefersConfig(aggregation=name, attn_implementation=attn_implementation)
    return RefersModel(config)


def forward(model, name: str, pixel_values: torch.Tensor) -> torch.Tensor:
    if name == "timm":
        return model.forward_features(pixel_values)
    return model(pixel_values).last_hidden_state


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _peak_memory_child(name, batch_size, threads, device, queue):
    torch.set_num_threads(threads)
    model = build(name).to(device).eval()
    pixel_values = torch.randn(batch_size, 3, 224, 224, device=device)
    with torch.inference_mode():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward(model, name, pixel_values)
            torch.cuda.synchronize()
            queue.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            base = _rss_bytes()
            forward(model, name, pixel_values)
            queue.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2**20)


def peak_memory_mib(name, batch_size, threads, device) -> float:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_peak_memory_child, args=(name, batch_size, threads, device, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = {name: build(name).to(args.device, dtype).eval() for name in MODELS}
    pixel_values = torch.randn(args.batch_size, 3, 224, 224, device=args.device, dtype=dtype)
    seconds = {name: [] for name in MODELS}
    with torch.inference_mode():
        for name in MODELS:  # warm-up
            forward(models[name], name, pixel_values)
        for _ in range(args.rounds):
            for name in MODELS:
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                forward(models[name], name, pixel_values)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
    del models

    results = {}
    for name in MODELS:
        median = statistics.median(seconds[name])
        results[name] = {
            "images_per_s": args.batch_size / median,
            "peak_mem_mib": peak_memory_mib(name, args.batch_size, args.threads, args.device),
        }
    timm_rate = results["timm"]["images_per_s"]
    print(f"device={args.device} dtype={args.dtype} threads={args.threads} batch={args.batch_size} "
          f"rounds={args.rounds} (median round)")
    print(f"{'model':<28}{'images/s':>10}{'time vs timm':>14}{'peak MiB':>10}")
    for name in MODELS:
        label = "timm vit_base_patch16_224" if name == "timm" else f"RefersModel {name}"
        ratio = timm_rate / results[name]["images_per_s"]
        results[name]["time_ratio_vs_timm"] = ratio
        print(f"{label:<28}{results[name]['images_per_s']:>10.2f}{ratio:>13.3f}x{results[name]['peak_mem_mib']:>10.0f}")
    overhead = results["none"]["images_per_s"] / results["recurrent_concat"]["images_per_s"] - 1
    print(f"recurrent-concat overhead vs aggregation='none': {100 * overhead:+.1f}% time")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
