"""Quality benchmark: how much of each domain expert a DUME model keeps, against every baseline.

    pip install -e '.[benchmark]'
    python benchmarks/quality.py                                # small: 2 CPU cores, about 10 minutes
    python benchmarks/quality.py --config 115m --device cuda    # the authors' larger size, on a GPU host

Four built-in domains (dume.shared.lab.domains; every 10th document held out), a small Llama base with its own
byte-level BPE pretrained on their mixture, and one expert per domain fine-tuned from it with ``dume-node train``,
twice: MLPs only (the default, the headline) and every weight (the original method's setting). Trained models are
cached in the work directory, keyed by their settings and data, so a rerun skips training. Every method is
evaluated on the same held-out text (docs/quality.md describes each):

* ``base``, each ``expert:<domain>`` on every domain, ``weight-average``, ``oracle`` and ``random`` routing;
* ``dume``: k=1, built by a real loopback federation (a coordinator daemon, one ``dume-node join`` process per
  domain) in which three domains federate (``dynamic:three``) and the fourth then joins;
* in-process variants from the same statistics: ``dume:local`` (must equal ``dume``), ``dume:intercept``,
  ``dume:no-normalize``, ``dume:k2``, ``dume:stats-1%`` / ``-10%``, a rho sweep, and two routers measured here
  only, alone and combined: ``dume:lda`` (benchmarks/discriminant.py) and ``dume:routed-stats``
  (benchmarks/routed_statistics.py);
* ``btx:random`` and ``btx:dume``: routers trained by gradient on the pooled mixture (benchmarks/router_training.py);
* with experts fine-tuned in every weight: the experts, weight averaging, oracle, DUME and the provisional version
  of the late join.

Writes ``quality-<config>.json`` (every number), ``.md`` (the tables) and ``.png`` (perplexity per domain by
method) to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dume.shared.errors import DumeError
from dume.shared.lab.domains import DOMAINS, HELD_OUT_EVERY, write_domains
from dume.shared.lab.harness import FEDERATION_THREADS, Federation, cli, differing_files, quiet_loading, torch_threads
from dume.shared.lab.tiny import build_tiny_model, trained_tokenizer
from dume.shared.method.averaging import compute_basis
from dume.shared.method.data import PackedData, load_tokenizer, pack_documents, read_documents
from dume.shared.method.evaluation import perplexity
from dume.shared.method.merge import ExpertSpec, merge, open_experts
from dume.shared.method.registration import load_merged
from dume.shared.method.ridge import LayerRouter, solve_routers
from dume.shared.method.routers import MergeSettings, packed_contribution, solve_for_checkpoint, sum_contributions
from dume.shared.method.routing import build_routed_model, build_weight_averaged_model
from dume.shared.method.settings import DEFAULT_DATASET, EXPERT_WEIGHTINGS
from dume.shared.method.statistics import statistics_under_basis, upper_triangle
from dume.shared.method.training import TrainSettings, train

from discriminant import discriminant_routers
from quality_report import write_report
from routed_statistics import refined_routers
from router_training import RouterTraining, train_routers


@dataclass(frozen=True)
class Config:
    """One benchmark size: the model, its tokenizer and how long each part trains."""

    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    vocab_size: int
    sequence_length: int
    base_steps: int
    base_learning_rate: float
    expert_steps: int
    expert_learning_rate: float
    router_steps: int
    batch_size: int = 16


CONFIGS = {
    # Minutes on one core, for the test suite: exercises every stage, measures nothing.
    "tiny": Config(32, 64, 2, 4, 2, 320, 64, 20, 3e-3, 10, 1e-3, 5),
    "small": Config(128, 384, 4, 4, 2, 2048, 128, 1000, 3e-3, 300, 1e-3, 150),
    # The authors' smallest sizes (about 5M and 115M parameters with this vocabulary): for a GPU host.
    "5m": Config(256, 768, 6, 8, 4, 8192, 256, 8000, 1e-3, 2000, 3e-4, 1000, batch_size=32),
    "115m": Config(768, 2048, 12, 12, 4, 16384, 512, 30000, 6e-4, 5000, 1e-4, 2000, batch_size=32),
}
RHOS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1)
DYNAMIC_LATE = "unicode"  # the domain that joins the running three-domain federation
# The member with ten times the others' share of its data in the unequal-data scenario (statistics from all its
# documents, the others' from every 10th): the attacker of benchmarks/router_capture.py, here honest.
LARGE_MEMBER = "code"


class Bench:
    """The work directory, the configuration, the device and the clock of each stage.

    ``device`` is where models train and evaluate (--device); statistics are always collected on the CPU, as
    nodes do.
    """

    def __init__(self, workdir: Path, config_name: str, device: str) -> None:
        self.workdir, self.config_name, self.config = workdir, config_name, CONFIGS[config_name]
        self.device = device
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.domains = sorted(DOMAINS)

    def say(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f} s] {message}", flush=True)

    def stage(self, name: str, since: float) -> float:
        self.seconds[name] = round(time.monotonic() - since, 1)
        return time.monotonic()


def cached(path: Path, settings: dict[str, Any]) -> bool:
    """Whether ``path`` holds a model trained with exactly ``settings`` (otherwise it is removed for retraining)."""
    marker = path / "benchmark-settings.json"
    if marker.exists() and json.loads(marker.read_text()) == settings:
        return True
    shutil.rmtree(path, ignore_errors=True)
    return False


def mark_cached(path: Path, settings: dict[str, Any]) -> None:
    (path / "benchmark-settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def train_base(bench: Bench) -> Path:
    config, base = bench.config, bench.workdir / "base"
    mixture = bench.workdir / "data" / "mixture"
    data_hash = hashlib.sha256(b"".join(path.read_bytes() for path in sorted(mixture.iterdir()))).hexdigest()
    settings = {"model": asdict(config), "data_sha256": data_hash}
    if cached(base, settings):
        bench.say("base: cached")
        return base
    bench.say(f"base: a {config.vocab_size}-token BPE, then pretraining on the mixture ({config.base_steps} steps)")
    tokenizer = trained_tokenizer(read_documents(mixture), config.vocab_size)
    init = build_tiny_model("llama", bench.workdir / "init", tokenizer=tokenizer, hidden_size=config.hidden_size,
                            intermediate_size=config.intermediate_size, num_hidden_layers=config.layers,
                            num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
                            head_dim=config.hidden_size // config.heads,
                            max_position_embeddings=max(512, config.sequence_length))
    shutil.rmtree(base, ignore_errors=True)
    train(init, mixture, base, TrainSettings(steps=config.base_steps, learning_rate=config.base_learning_rate,
                                             batch_size=config.batch_size, sequence_length=config.sequence_length,
                                             trainable="all", device=bench.device))
    shutil.rmtree(init)
    mark_cached(base, settings)
    return base


def train_experts(bench: Bench, base: Path, splits: dict[str, tuple[Path, Path]], trainable: str) -> list[ExpertSpec]:
    """One expert per domain, each with ``dume-node train --trainable TRAINABLE`` in its own process."""
    config, specs = bench.config, []
    base_settings = json.loads((base / "benchmark-settings.json").read_text())
    for seed, name in enumerate(bench.domains, start=1):
        out = bench.workdir / f"experts-{trainable}" / name
        settings = {"base": base_settings, "domain": name, "seed": seed, "trainable": trainable}
        if cached(out, settings):
            bench.say(f"expert {name} ({trainable}): cached")
        else:
            bench.say(f"expert {name}: dume-node train --trainable {trainable} ({config.expert_steps} steps)")
            cli("node", "train", "--base", str(base), "--data", str(splits[name][0]), "--out", str(out),
                "--steps", str(config.expert_steps), "--learning-rate", str(config.expert_learning_rate),
                "--batch-size", str(config.batch_size), "--sequence-length", str(config.sequence_length),
                "--seed", str(seed), "--trainable", trainable, "--device", bench.device)
            mark_cached(out, settings)
        specs.append(ExpertSpec(name, out, splits[name][0]))
    return specs


def federate(bench: Bench, specs: list[ExpertSpec]) -> tuple[dict[str, Path], list[dict[str, Any]]]:
    """Three domains federate; the fourth joins. Exports every version from the three-domain exact one on.

    Returns {"dynamic:three": that version, "dynamic:provisional": the first version after the late join if it is
    provisional, "dume": the exact four-domain version}, and what each of those versions was.
    """
    root = bench.workdir / "federation"
    shutil.rmtree(root, ignore_errors=True)
    federation = Federation(root, threads=FEDERATION_THREADS, say=bench.say)
    names = [spec.name for spec in specs]
    early = [spec for spec in specs if spec.name != DYNAMIC_LATE]
    late = next(spec for spec in specs if spec.name == DYNAMIC_LATE)
    try:
        federation.init("--sequence-length", str(bench.config.sequence_length))
        federation.serve()
        tokens = federation.tokens(names)
        for spec in early:
            federation.join(spec.name, spec.model_dir, spec.data_path, tokens[spec.name])
        three = federation.wait_exact([spec.name for spec in early])["version"]
        federation.join(late.name, late.model_dir, late.data_path, tokens[late.name])
        four = federation.wait_exact(names)["version"]
        exported, versions = {}, []
        for version in range(three, four + 1):
            out = federation.export(root / "versions" / f"v{version}", version)
            block = json.loads((out / "config.json").read_text())["dume"]
            versions.append({"version": version, **{key: block[key] for key in ("exact", "members", "basis_hash")}})
            if version == three:
                exported["dynamic:three"] = out
            elif version == three + 1 and not block["exact"]:
                exported["dynamic:provisional"] = out
        exported["dume"] = out
    finally:
        federation.close()
    return exported, versions


def subsample(documents: list[str], fraction: float) -> list[str]:
    """Every (1/fraction)-th document: a deterministic share spread over the whole domain."""
    return documents[:: round(1 / fraction)]


def router_choices(model: torch.nn.Module, data: PackedData, device: str) -> list[torch.Tensor]:
    """Per layer, the router's first choice (argmax of its logits) for each real token, whatever the routing mode."""
    blocks = [layer.mlp for layer in model.model.layers]
    chosen: list[list[torch.Tensor]] = [[] for _ in blocks]

    def record(block, args, into):
        x = args[0].reshape(-1, args[0].shape[-1])
        into.append(torch.nn.functional.linear(x, block.router_weight, block.router_bias).argmax(dim=-1).cpu())

    hooks = [block.register_forward_pre_hook(lambda b, args, into=chosen[i]: record(b, args, into))
             for i, block in enumerate(blocks)]
    try:
        with torch.inference_mode():
            for input_ids, attention_mask in data.batches(8):
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    real = data.attention_mask.reshape(-1).bool()
    return [torch.cat(layer)[real] for layer in chosen]


def routing_accuracy(model: torch.nn.Module, held_out: dict[str, PackedData], names: list[str],
                     device: str) -> dict[str, list]:
    """Per domain and layer, the share of real held-out tokens whose first routed expert is the domain's own."""
    return {domain: [round(float((layer == names.index(domain)).float().mean()), 4)
                     for layer in router_choices(model, data, device)] for domain, data in held_out.items()}


def oracle_path_accuracy(experts: dict, basis: dict, routers: list[LayerRouter], held_out: dict[str, PackedData],
                         device: str) -> dict[str, list]:
    """Routing accuracy on the hidden states the statistics describe: each domain sent through its own expert in
    every layer while the routers only watch. Its gap to ``routing_accuracy`` is what earlier misrouting costs."""
    names = list(routers[0].experts)
    result = {}
    for domain, data in held_out.items():
        model = build_routed_model(experts, basis, routers, mode="oracle", oracle_expert=domain).to(device).eval()
        result[domain] = [round(float((layer == names.index(domain)).float().mean()), 4)
                          for layer in router_choices(model, data, device)]
    return result


def evaluate(model: torch.nn.Module, held_out: dict[str, PackedData], device: str,
             domains: list[str] | None = None) -> dict[str, float]:
    model.to(device).eval()
    return {name: round(perplexity(model, data), 4) for name, data in held_out.items()
            if domains is None or name in domains}


def run(bench: Bench, out_dir: Path) -> dict[str, Any]:
    config, domains, device = bench.config, bench.domains, bench.device
    mark = time.monotonic()
    splits = write_domains(bench.domains, bench.workdir / "data")
    base = train_base(bench)
    mark = bench.stage("base", mark)
    specs = train_experts(bench, base, splits, "mlp")
    full_specs = train_experts(bench, base, splits, "all")
    mark = bench.stage("experts", mark)
    bench.say("federation: three domains join, then the fourth (coordinator and node processes on loopback)")
    federated, versions = federate(bench, specs)
    reference = bench.workdir / "federation" / "merge"
    with torch_threads(FEDERATION_THREADS):  # the nodes' thread count: a float32 forward may differ across counts
        merge(specs, reference, MergeSettings(sequence_length=config.sequence_length))
    identical = not differing_files(federated["dume"], reference)
    bench.say(f"the federated version is byte-identical to a local `dume merge`: {'yes' if identical else 'no'}")
    mark = bench.stage("federation", mark)

    tokenizer = load_tokenizer(base)
    held_out = {name: pack_documents(read_documents(splits[name][1]), tokenizer, config.sequence_length)
                for name in domains}
    ppl: dict[str, dict[str, float]] = {}
    accuracy: dict[str, dict[str, list]] = {}
    bench.say("evaluating the base, the experts, weight averaging, oracle and random routing, federated versions")
    ppl["base"] = evaluate(load_model(base), held_out, device)
    for spec in specs:
        ppl[f"expert:{spec.name}"] = evaluate(load_model(spec.model_dir), held_out, device)
    experts = open_experts(specs)
    names = sorted(experts)
    ppl["weight-average"] = evaluate(build_weight_averaged_model(experts), held_out, device)
    basis = compute_basis(experts)
    ppl["oracle"] = oracle_perplexity(experts, basis, held_out, device)
    ppl["random"] = evaluate(build_routed_model(experts, basis, mode="random", top_k=1), held_out, device)
    for label, path in federated.items():
        ppl[label] = evaluate(load_model(path), held_out, device)
    mark = bench.stage("baselines", mark)

    bench.say("statistics under the basis from 1%, 10% and 100% of each member's training documents")
    statistics = {fraction: all_statistics(experts, basis, specs, tokenizer, config, fraction)
                  for fraction in (0.01, 0.1, 1.0)}
    defaults = MergeSettings()
    variants = {  # label: (statistics, router intercept, top-k)
        "dume:intercept": (statistics[1.0], not defaults.router_bias, defaults.top_k),
        "dume:k2": (statistics[1.0], defaults.router_bias, 2),
        "dume:stats-1%": (statistics[0.01], defaults.router_bias, defaults.top_k),
        "dume:stats-10%": (statistics[0.1], defaults.router_bias, defaults.top_k),
    }
    routers = {label: solve_routers(stats, defaults.rho, bias) for label, (stats, bias, _) in variants.items()}
    # The federation's routers (``dume``, default weighting) built in process: the variants above and below are the
    # method as published (experts weighed by their tokens), each compared with ``dume:tokens-weighting``.
    routers["dume:local"] = weighted_routers(statistics[1.0], defaults.expert_weighting)
    routers["dume:no-normalize"] = solve_routers(statistics[1.0], defaults.rho, normalize=False)
    unequal = {name: statistics[1.0 if name == LARGE_MEMBER else 0.1][name] for name in names}
    for weighting in EXPERT_WEIGHTINGS:  # the product's layered solve, as the coordinator and `dume merge` run it
        routers[f"dume:{weighting}-weighting"] = weighted_routers(statistics[1.0], weighting)
        routers[f"dume:unequal-data:{weighting}-weighting"] = weighted_routers(unequal, weighting)
    routers["dume:lda"] = discriminant_routers(statistics[1.0])
    packed_train = {spec.name: pack_documents(read_documents(spec.data_path), tokenizer, config.sequence_length)
                    for spec in specs}
    ridge = partial(solve_routers, rho=defaults.rho)
    published = routers["dume:tokens-weighting"]
    routers["dume:routed-stats"] = refined_routers(experts, basis, published, packed_train, ridge)
    routers["dume:routed-stats-by-layer"] = refined_routers(experts, basis, published, packed_train, ridge,
                                                            layer_by_layer=True)
    routers["dume:intercept+routed-stats"] = refined_routers(experts, basis, routers["dume:intercept"], packed_train,
                                                             partial(ridge, router_bias=True))
    routers["dume:lda+routed-stats"] = refined_routers(experts, basis, routers["dume:lda"], packed_train,
                                                       discriminant_routers)
    for label, layer_routers in routers.items():
        top_k = variants[label][2] if label in variants else 1
        model = build_routed_model(experts, basis, layer_routers, top_k)
        ppl[label] = evaluate(model, held_out, device)
        accuracy[label] = routing_accuracy(model, held_out, names, device)
    accuracy["dume:local (oracle path)"] = oracle_path_accuracy(experts, basis, routers["dume:local"], held_out, device)
    rho_sweep = []
    for bias in (False, True):
        for rho in RHOS:
            model = build_routed_model(experts, basis, solve_routers(statistics[1.0], rho, bias), 1)
            rho_sweep.append({"router_bias": bias, "rho": rho, "perplexity": evaluate(model, held_out, device),
                              "routing_accuracy": routing_accuracy(model, held_out, names, device)})
    mark = bench.stage("dume variants", mark)

    bench.say(f"trained routers (BTX-style): {config.router_steps} AdamW steps on the pooled mixture, k=2")
    mixture = pack_documents(read_documents(bench.workdir / "data" / "mixture"), tokenizer, config.sequence_length)
    router_losses = {}
    for label, random_init in (("btx:random", True), ("btx:dume", False)):
        model = build_routed_model(experts, basis, solve_routers(statistics[1.0]), 2).to(device)
        router_losses[label] = train_routers(model, mixture, RouterTraining(config.router_steps,
                                                                            batch_size=config.batch_size), random_init)
        ppl[label] = evaluate(model, held_out, device)
        accuracy[label] = routing_accuracy(model, held_out, names, device)
    mark = bench.stage("trained routers", mark)

    bench.say("experts fine-tuned in full (the paper's setting): experts, weight averaging, oracle, DUME")
    full = full_finetuning(full_specs, held_out, tokenizer, config, device)
    bench.stage("full fine-tuning", mark)
    bench.seconds["total"] = round(time.monotonic() - bench.started, 1)

    results = {
        "config": {"name": bench.config_name, **asdict(config)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads()},
        "domains": {name: {"train_documents": len(read_documents(splits[name][0])),
                           "test_documents": len(read_documents(splits[name][1])),
                           "test_tokens": held_out[name].num_tokens} for name in domains},
        "held_out_every": HELD_OUT_EVERY,
        "defaults": asdict(defaults),
        "perplexity": ppl,
        "retention": retention_table(ppl, domains),
        "routing_accuracy": accuracy,
        "rho_sweep": rho_sweep,
        "expert_weighting": {"default": defaults.expert_weighting, "large_member": LARGE_MEMBER,
                             "statistics_tokens": token_counts(statistics[1.0]),
                             "unequal_data_tokens": token_counts(unequal)},
        "dynamic_addition": {"late": DYNAMIC_LATE, "versions": versions},
        "federated_byte_identical_to_merge": identical,
        "router_training_loss": {label: [losses[0], losses[-1]] for label, losses in router_losses.items()},
        "full_finetuning": {"perplexity": full, "retention": retention_table(full, domains)},
        "seconds": bench.seconds,
    }
    write_report(results, out_dir / f"quality-{bench.config_name}")
    return results


def oracle_perplexity(experts: dict, basis: dict, held_out: dict[str, PackedData], device: str) -> dict[str, float]:
    """Each domain through its own expert's MLPs with the shared basis: what perfect routing would give."""
    return {name: evaluate(build_routed_model(experts, basis, mode="oracle", oracle_expert=name), held_out,
                           device, [name])[name] for name in held_out}


def all_statistics(experts: dict, basis: dict, specs: list[ExpertSpec], tokenizer, config: Config,
                   fraction: float = 1.0) -> dict[str, torch.Tensor]:
    """Each member's statistics, computed as its node computes them (one thread), from a share of its documents."""
    statistics = {}
    for spec in specs:
        documents = subsample(read_documents(spec.data_path), fraction)
        packed = pack_documents(documents, tokenizer, config.sequence_length)
        with torch_threads(FEDERATION_THREADS):
            statistics[spec.name] = statistics_under_basis(experts[spec.name], basis, packed, 8)
    return statistics


def weighted_routers(statistics: dict[str, torch.Tensor], weighting: str) -> list[LayerRouter]:
    """Routers from each member's whole statistics through the product's layered solve (``solve_for_checkpoint``,
    what the coordinator publishes), with experts weighed by ``weighting`` (``MergeSettings.expert_weighting``)."""
    experts = {name: sum_contributions([packed_contribution(name, DEFAULT_DATASET, upper_triangle(gram))])
               for name, gram in statistics.items()}
    return solve_for_checkpoint(experts, MergeSettings(expert_weighting=weighting), "").routers


def token_counts(statistics: dict[str, torch.Tensor]) -> dict[str, int]:
    """The tokens each member's statistics record (the count in G's last entry)."""
    return {name: int(round(float(gram[0, -1, -1]))) for name, gram in statistics.items()}


def full_finetuning(specs: list[ExpertSpec], held_out: dict[str, PackedData], tokenizer, config: Config,
                    device: str) -> dict[str, dict[str, float]]:
    """The same methods on experts fine-tuned in every parameter, whose shared weights drift apart.

    Also the provisional version of a late join, built as the coordinator builds it: the four-member basis, the
    three earlier members' statistics under their three-member basis, the late member masked out.
    """
    experts = open_experts(specs)
    ppl = {f"expert:{spec.name}": evaluate(load_model(spec.model_dir), held_out, device) for spec in specs}
    ppl["weight-average"] = evaluate(build_weight_averaged_model(experts), held_out, device)
    basis = compute_basis(experts)
    ppl["oracle"] = oracle_perplexity(experts, basis, held_out, device)
    routers = solve_routers(all_statistics(experts, basis, specs, tokenizer, config))
    ppl["dume"] = evaluate(build_routed_model(experts, basis, routers, 1), held_out, device)
    early = [spec for spec in specs if spec.name != DYNAMIC_LATE]
    early_experts = {spec.name: experts[spec.name] for spec in early}
    stale = all_statistics(early_experts, compute_basis(early_experts), early, tokenizer, config)
    ppl["dynamic:provisional"] = evaluate(build_routed_model(experts, basis, solve_routers(stale), 1), held_out, device)
    return ppl


def load_model(path: Path) -> torch.nn.Module:
    return load_merged(path)  # a dense expert or a merged checkpoint, router-bias ones included


def retention_table(perplexities: dict[str, dict[str, float]], domains: list[str]) -> dict[str, dict[str, float]]:
    """Per method: expert ppl / method ppl on each expert's own domain, then their mean and minimum."""
    table = {}
    for label, row in perplexities.items():
        if label.startswith("expert:") or not all(name in row for name in domains):
            continue
        values = {name: perplexities[f"expert:{name}"][name] / row[name] for name in domains}
        table[label] = {**{name: round(value, 4) for name, value in values.items()},
                        "mean": round(sum(values.values()) / len(values), 4),
                        "min": round(min(values.values()), 4)}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--workdir", type=Path, help="cache of data and trained models (default .bench/<config>)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu", help="torch device for training and evaluation, e.g. cuda")
    args = parser.parse_args()
    workdir = (args.workdir or Path(".bench") / args.config).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(workdir, args.config, args.device)
    try:
        with quiet_loading():
            results = run(bench, args.out)
    except DumeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    dume = results["retention"]["dume"]
    bench.say(f"dume k=1 retention: mean {dume['mean']:.1%}, min {dume['min']:.1%}; wrote {args.out}/"
              f"quality-{args.config}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
