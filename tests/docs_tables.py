"""The docs' tables of formats, engines and ResLoRA rules, made from the library's registries.

Each table stands in a docs page between `<!-- registry: NAME -->` and `<!-- end registry -->`;
tests/docs/test_docs.py checks that every one is what the registry gives today. After changing a
registry, rewrite them with

    python tests/docs_tables.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "docs" / "architecture.md"]
_BLOCK = re.compile(r"(<!-- registry: (\w+) -->\n)(.*?)(<!-- end registry -->)", re.DOTALL)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def input_formats() -> str:
    from loramerge.formats.registry import INPUT_FORMATS

    rows = [
        [
            f"`{e.name}`",
            e.description,
            f"`formats/{e.module}.py`",
            f"`{e.sniff_name}`, `{e.read_name}`",
        ]
        for e in INPUT_FORMATS
    ]
    return _table(["`--format`", "what", "module", "sniffer, reader"], rows)


def output_formats() -> str:
    from loramerge.formats.registry import OUTPUT_FORMATS

    rows = [
        [
            f"`{e.name}`",
            e.description,
            f"`formats/{e.module}.py`",
            "a folder" if e.suffix is None else f"a `{e.suffix}` file",
            f"`{e.engine}`" if e.engine else "",
        ]
        for e in OUTPUT_FORMATS
    ]
    return _table(["`--to`", "what", "module", "OUT is", "engine profile applied"], rows)


def engines() -> str:
    from loramerge.engines.profiles import ENGINES

    rows = [
        [
            f"`{e.name}`",
            e.reads,
            ", ".join(f"`{f}`" for f in e.formats),
            f"`servers.{e.rewrite_name}`",
            f"[{e.name}](engines/{e.name}.md)",
        ]
        for e in ENGINES
    ]
    return _table(["`--engine`", "what it reads", "writes", "rewrite", "docs"], rows)


def reslora_rules() -> str:
    from loramerge.ops.reslora_table import RULES

    rows = [
        [
            f"`{r.kind}`",
            f"`{r.norms}`" if r.norms else "-",
            f"`{r.ms_rule}`" if r.ms_rule else "-",
            f"`{r.function}`",
            r.reads or "the factors only",
            "yes" if r.exact else "no",
        ]
        for r in RULES
    ]
    return _table(["type", "`--norms`", "`--ms-rule`", "rule", "reads", "exact"], rows)


TABLES = {
    "input_formats": input_formats,
    "output_formats": output_formats,
    "engines": engines,
    "reslora_rules": reslora_rules,
}


def blocks(text: str) -> dict[str, str]:
    """The registry tables a page holds, by name."""
    return {match.group(2): match.group(3) for match in _BLOCK.finditer(text)}


def rewrite(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + m.group(4), text)


if __name__ == "__main__":
    for page in PAGES:
        page.write_text(rewrite(page.read_text()))
    sys.exit(0)
