"""Built-in demo domains, made from what every Python install has (nothing is downloaded).

* ``code``: lines of Python source from standard-library modules, grouped into documents of 6 lines;
* ``prose``: English paragraphs from standard-library docstrings;
* ``math``: generated worked arithmetic.

Documents are split deterministically: every 10th document is held out for testing.
"""

from __future__ import annotations

import importlib
import json
import inspect
import random
from pathlib import Path

SOURCE_MODULES = ("json.decoder", "textwrap", "string", "fractions", "heapq", "bisect", "shlex", "calendar")
DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "itertools",
               "logging", "pathlib", "re", "socket", "sqlite3", "subprocess", "threading", "unittest", "zipfile")


def code_documents() -> list[str]:
    documents = []
    for name in SOURCE_MODULES:
        lines = [line for line in inspect.getsource(importlib.import_module(name)).splitlines() if line.strip()]
        documents += ["\n".join(lines[start : start + 6]) for start in range(0, len(lines), 6)]
    return documents


def prose_documents() -> list[str]:
    documents = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj) or obj is module) else None
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(text) > 80 and not text.startswith((">>>", "-", "*")):
                    documents.append(text)
    return sorted(set(documents))


def math_documents(count: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        documents.append(
            f"Compute ({a} + {b}) * {c}. First {a} + {b} = {a + b}. Then {a + b} * {c} = {(a + b) * c}. "
            f"Answer: {(a + b) * c}."
        )
    return documents


DOMAINS = {"code": code_documents, "math": math_documents, "prose": prose_documents}


def write_domain(name: str, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<name>.train.jsonl`` and ``<name>.test.jsonl`` and return their paths."""
    documents = DOMAINS[name]()
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = out_dir / f"{name}.train.jsonl", out_dir / f"{name}.test.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for i, d in enumerate(documents) if i % 10))
    test.write_text("".join(json.dumps({"text": d}) + "\n" for i, d in enumerate(documents) if not i % 10))
    return train, test
