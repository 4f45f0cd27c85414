"""The quality benchmark's outputs: every number as JSON, the tables as markdown, perplexity by method as a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Rows of the headline table, in reading order: references first, then the method, then its variants.
HEADLINE = ("base", "weight-average", "random", "oracle", "dume", "dume:intercept", "dume:no-normalize", "dume:lda",
            "dume:routed-stats", "dume:routed-stats-by-layer", "dume:intercept+routed-stats",
            "dume:lda+routed-stats", "dume:k2", "dume:stats-1%", "dume:stats-10%", "dume:tokens-weighting",
            "dume:equal-weighting", "dume:unequal-data:tokens-weighting", "dume:unequal-data:equal-weighting",
            "dynamic:three", "dynamic:provisional", "btx:random", "btx:dume")


def write_report(results: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    plot(results, stem.with_suffix(".png"))


def markdown(results: dict[str, Any]) -> str:
    perplexity, retention = results["perplexity"], results["retention"]
    domains = sorted(results["domains"])
    rows = [label for label in HEADLINE if label in perplexity]
    lines = ["| method | " + " | ".join(domains) + " | mean retention | min retention |",
             "|---" * (len(domains) + 3) + "|"]
    for label in [*(f"expert:{name}" for name in domains), *rows]:
        cells = [f"{perplexity[label][name]:.3f}" if name in perplexity[label] else "-" for name in domains]
        kept = retention.get(label)
        tail = [f"{kept['mean']:.1%}", f"{kept['min']:.1%}"] if kept else ["", ""]
        lines.append(f"| {label} | " + " | ".join(cells + tail) + " |")
    lines += ["", "Retention per domain (expert perplexity / method perplexity on the expert's own domain):", "",
              "| method | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for label in rows:
        if label in retention:
            lines.append(f"| {label} | " + " | ".join(f"{retention[label][name]:.1%}" for name in domains) + " |")
    full = results["full_finetuning"]
    lines += ["", "Experts fine-tuned in every parameter (the paper's setting; retention against these experts):", "",
              "| method | " + " | ".join(domains) + " | mean retention | min retention |",
              "|---" * (len(domains) + 3) + "|"]
    for label, row in full["perplexity"].items():
        kept = full["retention"].get(label)
        tail = [f"{kept['mean']:.1%}", f"{kept['min']:.1%}"] if kept else ["", ""]
        lines.append(f"| {label} | " + " | ".join(f"{row[name]:.3f}" if name in row else "-" for name in domains)
                     + " | " + " | ".join(tail) + " |")
    versions = results["dynamic_addition"]["versions"]
    lines += ["", f"Dynamic addition ({results['dynamic_addition']['late']} joins last), versions published: "
              + "; ".join(f"{v['version']} {'exact' if v['exact'] else 'provisional'} over {', '.join(v['members'])}"
                          f" (basis {v['basis_hash'][:12]})" for v in versions)]
    local, federated = results["perplexity"]["dume:local"], results["perplexity"]["dume"]
    lines += ["", "Federated `dume` byte-identical to a local `dume merge`: "
              f"{'yes' if results['federated_byte_identical_to_merge'] else 'no'}; its perplexity (stock Mixtral "
              "classes) against the same routers in the library's own forward (`dume:local`): largest difference "
              f"{max(abs(local[name] - federated[name]) for name in domains):.2g}."]
    lines += ["", "Routing accuracy per layer (share of a domain's held-out tokens whose first expert is its own):",
              "", "| method | " + " | ".join(domains) + " |", "|---" * (len(domains) + 1) + "|"]
    for label, by_domain in results["routing_accuracy"].items():
        lines.append(f"| {label} | " + " | ".join(" ".join(f"{value:.2f}" for value in by_domain[name])
                                                 for name in domains) + " |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{stage} {value:g}" for stage, value in
                                                    results["seconds"].items()), ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    perplexity = results["perplexity"]
    domains = sorted(results["domains"])
    methods = ["expert (own domain)", *(label for label in HEADLINE if label in perplexity and label != "base")]
    values = {"expert (own domain)": {name: perplexity[f"expert:{name}"][name] for name in domains},
              **{label: perplexity[label] for label in methods[1:]}}
    figure, axes = pyplot.subplots(1, len(domains), figsize=(4 * len(domains), 4.5), sharey=False)
    for axis, name in zip(axes, domains, strict=True):
        heights = [values[label].get(name, float("nan")) for label in methods]
        colours = ["tab:green" if label.startswith("expert") else "navy" if label == "dume"
                   else "tab:blue" if label.startswith("dume") else "tab:orange" for label in methods]
        axis.bar(range(len(methods)), heights, color=colours)
        axis.set_xticks(range(len(methods)), methods, rotation=70, ha="right", fontsize=8)
        axis.set_title(name)
        axis.set_ylim(min(heights) * 0.9, max(heights) * 1.05)
    axes[0].set_ylabel("held-out perplexity (lower is better)")
    figure.suptitle(f"DUME quality benchmark ({results['config']['name']} configuration)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
