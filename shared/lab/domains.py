"""Built-in domains, made from what every Python install has (nothing is downloaded).

* ``code``: Python source of standard-library modules, docstrings and comments removed (regenerated with
  ``ast.unparse``, so it holds code only), cut into documents of 12 lines;
* ``prose``: English paragraphs of standard-library docstrings (technical prose);
* ``math``: generated worked arithmetic and linear equations, from a seeded generator;
* ``unicode``: records of the Unicode Character Database that Python ships in ``unicodedata`` (code point, name,
  category, bidirectional class, decomposition), 8 consecutive named code points per document.

The text depends only on the Python version (its standard library and its ``unicodedata.unidata_version``).
Documents are deduplicated (first occurrence kept) and split deterministically: every 10th is held out for
testing. The demo uses the first three; the quality benchmark uses all four.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import random
import shutil
import unicodedata
from collections.abc import Callable
from pathlib import Path

SOURCE_MODULES = ("json.decoder", "textwrap", "string", "fractions", "heapq", "bisect", "shlex", "calendar",
                  "statistics", "difflib", "configparser", "ipaddress", "tarfile", "pprint")
DOC_MODULES = ("argparse", "collections", "csv", "datetime", "decimal", "email", "functools", "itertools",
               "logging", "pathlib", "re", "socket", "sqlite3", "subprocess", "threading", "unittest", "zipfile",
               "asyncio", "concurrent.futures", "contextlib", "dataclasses", "enum", "ftplib", "http.client",
               "http.server", "imaplib", "inspect", "io", "mailbox", "multiprocessing", "optparse", "pickle",
               "queue", "random", "selectors", "shutil", "smtplib", "ssl", "tempfile", "typing", "urllib.request",
               "uuid", "xml.dom.minidom", "zipimport")
DEMO_DOMAINS = ("code", "math", "prose")
HELD_OUT_EVERY = 10


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return tree


def code_documents() -> list[str]:
    documents = []
    for name in SOURCE_MODULES:
        source = ast.unparse(_without_docstrings(ast.parse(inspect.getsource(importlib.import_module(name)))))
        lines = [line for line in source.splitlines() if line.strip()]
        documents += ["\n".join(lines[start : start + 12]) for start in range(0, len(lines), 12)]
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


def math_documents(count: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 9)
        if rng.random() < 0.5:
            documents.append(
                f"Compute ({a} + {b}) * {c}. First {a} + {b} = {a + b}. Then {a + b} * {c} = {(a + b) * c}. "
                f"Answer: {(a + b) * c}."
            )
        else:
            x = rng.randint(-20, 20)
            documents.append(
                f"Solve {c}x + {a} = {c * x + a}. Subtract {a} from both sides: {c}x = {c * x}. "
                f"Divide both sides by {c}: x = {x}. Check: {c} * {x} + {a} = {c * x + a}."
            )
    return documents


def unicode_documents(per_document: int = 8) -> list[str]:
    records = []
    for point in range(0x20, 0x1000):  # Latin, Greek, Cyrillic, Hebrew, Arabic, Indic and more, up to Myanmar
        character = chr(point)
        name = unicodedata.name(character, None)
        if name is None:
            continue
        decomposition = unicodedata.decomposition(character) or "none"
        records.append(f"U+{point:04X} {name}; category {unicodedata.category(character)}; "
                       f"bidi {unicodedata.bidirectional(character)}; decomposition {decomposition}")
    return ["\n".join(records[start : start + per_document]) for start in range(0, len(records), per_document)]


DOMAINS: dict[str, Callable[[], list[str]]] = {
    "code": code_documents, "math": math_documents, "prose": prose_documents, "unicode": unicode_documents,
}


def write_domain(name: str, out_dir: Path) -> tuple[Path, Path]:
    """Write ``<name>.train.jsonl`` and ``<name>.test.jsonl`` and return their paths."""
    documents = list(dict.fromkeys(DOMAINS[name]()))  # a document in both splits would leak the test set
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = out_dir / f"{name}.train.jsonl", out_dir / f"{name}.test.jsonl"
    train.write_text("".join(json.dumps({"text": d}) + "\n" for i, d in enumerate(documents) if i % HELD_OUT_EVERY))
    test.write_text("".join(json.dumps({"text": d}) + "\n" for i, d in enumerate(documents)
                            if not i % HELD_OUT_EVERY))
    return train, test


def write_domains(names: list[str], out_dir: Path) -> dict[str, tuple[Path, Path]]:
    """Each domain's splits (``write_domain``), and ``out_dir/mixture`` holding their train splits, which a base
    pretrains on."""
    splits = {name: write_domain(name, out_dir) for name in names}
    mixture = out_dir / "mixture"
    mixture.mkdir(exist_ok=True)
    for name, (train, _) in splits.items():
        shutil.copyfile(train, mixture / f"{name}.jsonl")
    return splits
