"""Registries: names in, objects out; unknown names fail with the close matches suggested.

Every test that must register something uses a fresh Registry, so the shared registries
(MODELS, LOSSES, ...) hold exactly what bench defines.
"""

import inspect

import pytest

import bench  # noqa: F401  (populates the registries)
from bench.errors import BenchError, RegistryError
from bench.registry import ALL, LOSSES, MODELS, Registry

ENTRIES = [(kind, name) for kind, registry in ALL.items() for name in registry.names()]


def test_unknown_name_suggests_the_close_match():
    with pytest.raises(RegistryError) as caught:
        MODELS.get("vea")
    message = str(caught.value)
    assert "unknown model 'vea'" in message
    assert "did you mean 'vae'" in message
    assert "bench list models" in message  # and says where to see every name


def test_unknown_name_is_a_key_error_and_a_bench_error():
    """Callers may catch it as a KeyError; the CLI catches it as a BenchError."""
    with pytest.raises(KeyError):
        LOSSES.get("bec")
    with pytest.raises(BenchError, match="did you mean 'bce'"):
        LOSSES.entry("bec")


def test_unknown_name_without_close_match_lists_the_known_names():
    message = MODELS.unknown_message("transformer")
    assert "did you mean" not in message
    for name in MODELS.names():
        assert name in message


def test_names_filters_with_fnmatch_and_sorts():
    assert MODELS.names("*ae") == ["ae", "cvae", "iwae", "vae"]
    registry = Registry("thing")
    for name in ("vae-small", "ae", "vae", "cvae"):
        registry.register(name)(object())
    assert registry.names() == ["ae", "cvae", "vae", "vae-small"]
    assert registry.names("vae*") == ["vae", "vae-small"]
    assert registry.names("?vae") == ["cvae"]
    assert list(registry) == registry.names()
    assert len(registry) == 4 and "vae" in registry and "gan" not in registry


def test_register_defaults_to_the_dashed_object_name_and_keeps_metadata():
    registry = Registry("thing")

    @registry.register(colour="red")
    def my_thing():
        """A thing."""

    assert registry.names() == ["my-thing"]
    assert registry.get("my-thing") is my_thing
    assert registry.meta("my-thing") == {"colour": "red"}
    assert registry.entry("my-thing").summary == "A thing."


def test_registering_a_name_twice_raises():
    registry = Registry("thing")
    registry.register("a")(object())
    with pytest.raises(RegistryError, match="'a' is registered twice"):
        registry.register("a")(object())


@pytest.mark.parametrize("kind,name", ENTRIES, ids=[f"{k}:{n}" for k, n in ENTRIES])
def test_every_entry_has_a_one_line_summary(kind, name):
    """`bench list` shows the first docstring line; it must say what the entry is on its own."""
    entry = ALL[kind].entry(name)
    doc = inspect.getdoc(entry.obj) or ""
    first_paragraph = doc.split("\n\n")[0]
    assert entry.summary, f"{kind} {name!r} has no docstring"
    assert first_paragraph == entry.summary, f"{kind} {name!r}: summary runs over several lines"
    assert len(entry.summary) <= 100
