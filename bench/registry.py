"""One small Registry class and the registries of the harness.

Adding a model, loss, architecture, dataset, preset or metric is one decorated definition in
one file (timm-style); tests are parametrised over the registries so new entries are tested
for free. Unknown names fail with the close matches suggested.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from bench.errors import RegistryError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    meta: dict = field(default_factory=dict)

    @property
    def summary(self) -> str:
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return doc.splitlines()[0] if doc else ""


class Registry:
    """Name -> object, with optional metadata per entry."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str | None = None, **meta: Any) -> Callable[[Any], Any]:
        def decorate(obj: Any) -> Any:
            key = name or obj.__name__.replace("_", "-")
            if key in self._entries:
                raise RegistryError(f"{self.kind} {key!r} is registered twice; rename one of them")
            self._entries[key] = Entry(key, obj, dict(meta))
            return obj

        return decorate

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self.unknown_message(name)) from None

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def meta(self, name: str) -> dict:
        return self.entry(name).meta

    def unknown_message(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), list(self._entries), n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
        return (f"unknown {self.kind} {name!r}: {hint}"
                f"known {self.plural}: {', '.join(sorted(self._entries))} "
                f"(`bench list {self.plural}`)")

    @property
    def plural(self) -> str:
        return self.kind + ("es" if self.kind.endswith("s") else "s")

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


MODELS = Registry("model")
LOSSES = Registry("loss")
ARCHS = Registry("arch")
DATASETS = Registry("dataset")
PRESETS = Registry("preset")
METRICS = Registry("metric")

ALL = {r.plural: r for r in (MODELS, LOSSES, ARCHS, DATASETS, PRESETS, METRICS)}
