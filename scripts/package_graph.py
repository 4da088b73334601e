"""The folder-level import graph of `rlhf_cluster/` and `actors/`, as a Mermaid diagram for
docs/operations.md (between its `package-graph` markers), read from the code's own imports.

    .venv/bin/python scripts/package_graph.py          # print the diagram
    .venv/bin/python scripts/package_graph.py --write  # put it into docs/operations.md

`tests/unit/test_imports.py` fails when the page's diagram is not the code's.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.unit.test_imports import folder_edges  # noqa: E402 - the graph test's reader, one reader of imports

PAGE = REPO / "docs" / "operations.md"
START, END = "<!-- package-graph:start (scripts/package_graph.py --write) -->", "<!-- package-graph:end -->"


def mermaid() -> str:
    def node(folder: str) -> str:
        return folder.replace("/", "_")

    folders = sorted({f for edge in folder_edges() for f in edge})
    lines = ["```mermaid", "flowchart TD"]
    lines += [f'  {node(f)}["{f}/"]' for f in folders]
    lines += [f"  {node(a)} --> {node(b)}" for a, b in folder_edges()]
    lines.append("```")
    return "\n".join(lines)


def page_with_diagram(page: str) -> str:
    head, _, rest = page.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{mermaid()}\n{END}{tail}"


if __name__ == "__main__":
    if "--write" in sys.argv:
        PAGE.write_text(page_with_diagram(PAGE.read_text()))
        print(f"wrote the diagram into {PAGE}")
    else:
        print(mermaid())
