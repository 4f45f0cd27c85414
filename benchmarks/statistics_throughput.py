"""Statistics throughput and accuracy: what collecting G costs next to the model's own forward pass, and how far
its float32 products move G and the routers from an all-float64 computation.

For random-initialised Llama models shaped like real ones (hidden 1024 with MLP 3072, as Qwen3-0.6B; hidden 2048
with MLP 8192, as Llama-3.2-1B; fewer layers, so that it runs on a laptop CPU), in float32 and bfloat16, on the same
batches, side by side in one run:

* ``forward``: the decoder stack's plain forward (``model.model``; the LM head would only add to it);
* ``statistics``: ``collect_statistics`` as nodes run it (float32 upper-triangle Gram, float64 accumulator, the
  forward stopped after the last router input), and its ratio to ``forward`` (target >= 0.9);
* ``float64 reference``: the previous method (float64 Gram of the full matrix on one thread), for comparison;
* accuracy: the largest entry error of G relative to its Cauchy-Schwarz bound, the relative Frobenius error, and
  the share of held-out tokens (three synthetic members with different token ranges) that the routers solved from
  each G send to the same expert (target >= 0.999).

    python benchmarks/statistics_throughput.py [--device cpu] [--layers 4] [--batches 4]

Prints a table and writes ``benchmarks/results/statistics_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dume.shared.lab.harness import torch_threads
from dume.shared.method.data import PackedData
from dume.shared.method.ridge import solve_routers
from dume.shared.method.statistics import collect_statistics

from rho_sweep import router_inputs

SHAPES = {1024: 3072, 2048: 8192}  # hidden size -> MLP size
MEMBERS = 3
SEQUENCE, ROWS = 256, 8  # tokens per row, rows per batch: the federation's defaults


def random_model(hidden: int, layers: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=SHAPES[hidden],
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=8,
                         head_dim=64, max_position_embeddings=SEQUENCE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


def member_batches(member: int, batches: int, seed: int) -> PackedData:
    """Token ids drawn from the member's own slice of the vocabulary: members whose hidden states differ."""
    generator = torch.Generator().manual_seed(seed)
    width = 32000 // MEMBERS
    ids = torch.randint(member * width, (member + 1) * width, (batches * ROWS, SEQUENCE), generator=generator)
    return PackedData(ids, torch.ones_like(ids))


def float64_reference(inputs: list[torch.Tensor]) -> torch.Tensor:
    """The previous method's G: [x;1]^T [x;1] of every layer in float64, full matrix, on one thread."""
    with torch_threads(1):
        grams = []
        for x in inputs:
            augmented = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
            grams.append((augmented.T @ augmented).cpu())
        return torch.stack(grams)


def seconds_per_batch(run, batches: int) -> float:
    """Seconds per batch of ``run()`` over ``batches`` batches, after one warm-up run (allocations, kernels); on a
    GPU until its queued kernels are done."""
    run()
    synchronize()
    started = time.perf_counter()
    run()
    synchronize()
    return (time.perf_counter() - started) / batches


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(hidden: int, dtype: torch.dtype, layers: int, batches: int, device: str) -> dict:
    model = random_model(hidden, layers, dtype, device)
    data = member_batches(0, batches, seed=1)

    def forward() -> None:
        with torch.inference_mode():
            for input_ids, attention_mask in data.batches(ROWS):
                model.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)

    timings = {"forward": seconds_per_batch(forward, batches),
               "statistics": seconds_per_batch(lambda: collect_statistics(model, data, ROWS), batches),
               "float64_reference": seconds_per_batch(
                   lambda: float64_reference(router_inputs(model, data, ROWS, device)), batches)}

    statistics, references, held_out = {}, {}, {}
    for member in range(MEMBERS):
        train = member_batches(member, batches, seed=10 + member)
        statistics[f"m{member}"] = collect_statistics(model, train, ROWS)
        references[f"m{member}"] = float64_reference(router_inputs(model, train, ROWS, device))
        held_out[member] = router_inputs(model, member_batches(member, 1, seed=100 + member), ROWS, device)
    errors = []
    for name in statistics:
        gram, exact = statistics[name], references[name]
        diagonal = exact.diagonal(dim1=1, dim2=2)
        scale = torch.sqrt(diagonal[:, :, None] * diagonal[:, None, :])
        errors.append((float(((gram - exact).abs() / scale).max()),
                       float(torch.linalg.matrix_norm(gram - exact).max() / torch.linalg.matrix_norm(exact).min())))
    ours, theirs = solve_routers(statistics), solve_routers(references)
    agree = total = 0
    for member, inputs in held_out.items():
        for layer, x in enumerate(inputs):
            mine = (x.cpu() @ ours[layer].weight.T).argmax(dim=1)
            reference_choice = (x.cpu() @ theirs[layer].weight.T).argmax(dim=1)
            agree += int((mine == reference_choice).sum())
            total += len(x)
    return {
        "hidden_size": hidden, "intermediate_size": SHAPES[hidden], "layers": layers,
        "dtype": str(dtype).removeprefix("torch."), "tokens_per_batch": ROWS * SEQUENCE,
        "seconds_per_batch": {key: round(value, 4) for key, value in timings.items()},
        "statistics_over_forward": round(timings["forward"] / timings["statistics"], 3),
        "float64_reference_over_forward": round(timings["forward"] / timings["float64_reference"], 3),
        "max_entry_error_relative_to_bound": max(error[0] for error in errors),
        "max_relative_frobenius_error": max(error[1] for error in errors),
        "routing_agreement_with_float64": round(agree / total, 5),
        "held_out_tokens": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per measurement")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/statistics_throughput.json"))
    args = parser.parse_args()
    rows = [measure(hidden, dtype, args.layers, args.batches, args.device)
            for hidden in SHAPES for dtype in (torch.float32, torch.bfloat16)]
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    print(f"{'hidden':>6} {'dtype':>8} {'forward s':>10} {'stats s':>8} {'ratio':>6} {'f64 ratio':>9} "
          f"{'G error':>9} {'agreement':>9}")
    for row in rows:
        seconds = row["seconds_per_batch"]
        print(f"{row['hidden_size']:>6} {row['dtype']:>8} {seconds['forward']:>10.3f} {seconds['statistics']:>8.3f} "
              f"{row['statistics_over_forward']:>6.3f} {row['float64_reference_over_forward']:>9.3f} "
              f"{row['max_entry_error_relative_to_bound']:>9.1e} {row['routing_agreement_with_float64']:>9.5f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"device": device or platform.machine(), "platform": platform.platform(),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
