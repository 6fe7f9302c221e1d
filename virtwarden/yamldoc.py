"""YAML loading that remembers where each value came from.

Configuration and policy errors are reported as ``file:line: field: message``; this
module loads YAML documents into plain Python data together with the line of every
mapping key and sequence item, addressed by its path (a tuple of keys and indexes).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Document:
    data: Any
    file: str
    line: int  # line of the document's start (1-based)
    lines: dict[Path, int] = field(default_factory=dict)

    def line_of(self, path: Path) -> int:
        """Line of the deepest known prefix of ``path``."""
        for end in range(len(path), -1, -1):
            found = self.lines.get(tuple(path[:end]))
            if found is not None:
                return found
        return self.line


class YamlSyntaxError(ValueError):
    def __init__(self, file: str, line: int, message: str) -> None:
        super().__init__(f"{file}:{line}: {message}")
        self.file, self.line, self.message = file, line, message


def load_documents(text: str, file: str) -> list[Document]:
    """Every document of ``text``, each with its line map. Raises YamlSyntaxError."""
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise YamlSyntaxError(file, line, f"YAML syntax: {e.problem or e}") from e
    docs = []
    for node in nodes:
        if node is None:
            continue
        lines: dict[Path, int] = {}
        _index(node, (), lines)
        data = yaml.SafeLoader(text).construct_document(node)
        docs.append(Document(data=data, file=file, line=node.start_mark.line + 1, lines=lines))
    return docs


def _index(node: yaml.Node, path: Path, lines: dict[Path, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            lines[path + (key,)] = key_node.start_mark.line + 1
            _index(value_node, path + (key,), lines)
            lines[path + (key,)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, path + (i,), lines)


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
