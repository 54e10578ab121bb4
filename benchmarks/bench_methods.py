"""Training-step time of every pretraining method at the same view encoder, batch and reports.

Each method's model is built as `run_pretrain.py --method <name>` builds it (its defaults), with the radiograph
transformer of the paper (ViT-B/16, 224 px; RadTex: its timm ResNet-50), a BERT-base-size report encoder from its
config, 3-view studies and 100-token reports; one step = forward + backward + optimizer step (SGD, or AdamW for MRM),
median over `--steps` after one warm-up step. MRM encodes only the visible 25% of the patches: this shows what that
saves against REFERS at the same backbone.

    python benchmarks/bench_methods.py --batch_size 2 --steps 2 [--json out.json]
"""

import argparse
import json
import statistics
import time

import torch

from modeling_refers import (
    JoImTeRNetForPreTraining,
    MRMForPreTraining,
    RadTexForPreTraining,
    RefersConfig,
    RefersForPreTraining,
)

METHODS = {
    "refers": (RefersForPreTraining, lambda: RefersConfig()),
    "mrm": (MRMForPreTraining, lambda: MRMForPreTraining.default_config()),
    "joimternet": (JoImTeRNetForPreTraining, lambda: JoImTeRNetForPreTraining.default_config()),
    "radtex": (RadTexForPreTraining, lambda: RadTexForPreTraining.default_config()),
}


def make_batch(config: RefersConfig, batch_size: int, report_length: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, config.text_config.vocab_size, (batch_size, report_length), generator=generator)
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.eos_token_id
    return {"pixel_values": torch.randn(batch_size, config.num_views, 3, config.image_size, config.image_size,
                                        generator=generator),
            "view_mask": torch.ones(batch_size, config.num_views, dtype=torch.long), "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def time_method(name: str, batch_size: int, report_length: int, steps: int) -> dict:
    model_class, make_config = METHODS[name]
    torch.manual_seed(0)
    model = model_class(make_config()).train()
    optimizer = (torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95)) if name == "mrm"
                 else torch.optim.SGD(model.parameters(), lr=3e-3, momentum=0.9))
    batch = make_batch(model.config, batch_size, report_length)
    if name == "mrm":  # its labels are the masked-token targets: every other token here
        batch["labels"] = torch.where(torch.arange(report_length) % 2 == 0, -100, batch["input_ids"])
    times = []
    for index in range(steps + 1):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index:  # the first step warms up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"method": name, "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "step_seconds": seconds, "studies_per_s": batch_size / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=2, help="studies per step")
    parser.add_argument("--report_length", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    results = [time_method(name, args.batch_size, args.report_length, args.steps) for name in args.methods]
    reference = next((r["step_seconds"] for r in results if r["method"] == "refers"), None)
    for r in results:
        r["time_vs_refers"] = r["step_seconds"] / reference if reference else None
        print(f"{r['method']:>11}: {r['parameters_m']:7.1f} M parameters, {r['step_seconds']:6.2f} s/step, "
              f"{r['studies_per_s']:.3f} studies/s" + (f", {r['time_vs_refers']:.2f}x REFERS's step time"
                                                        if reference else ""))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"batch_studies": args.batch_size, "report_tokens": args.report_length, "threads":
                       torch.get_num_threads(), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
