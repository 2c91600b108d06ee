"""The two-hop prompt item and its validation.

One item is one two-hop query: ``two_hop`` is the text ending right before the answer ("The capital of the
country where the Eiffel Tower is located is"), ``bridge`` the entity hop 1 resolves to ("France"), ``answer``
what hop 2 gives ("Paris"). Optional fields: ``e1`` (the first entity as written in ``two_hop``), ``r1``/``r2``
(relation names), ``hop1`` (one-hop prompt answered by the bridge), ``hop2`` (one-hop prompt with the bridge
explicit, answered by the answer) and ``pair`` (the id of a counterfactual partner item).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

REQUIRED = ("id", "two_hop", "bridge", "answer")
OPTIONAL = ("e1", "r1", "r2", "hop1", "hop2", "pair")


class PromptSetError(ValueError):
    """Bad prompt data; the message names the file, line and field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str) -> None:
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {'field ' + repr(field) + ': ' if field else ''}{message}")
        self.source, self.line, self.field = source, line, field


@dataclass(frozen=True)
class PromptItem:
    id: str
    two_hop: str
    bridge: str
    answer: str
    e1: str | None = None
    r1: str | None = None
    r2: str | None = None
    hop1: str | None = None
    hop2: str | None = None
    pair: str | None = None

    @property
    def composition(self) -> str | None:
        """``r1>r2``, the relation composition, when both relations are known."""
        return f"{self.r1}>{self.r2}" if self.r1 and self.r2 else None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in asdict(self).items() if v is not None}


_KNOWN = {f.name for f in fields(PromptItem)}


def make_item(record: dict[str, object], source: str, line: int) -> PromptItem:
    """Validate one record (a parsed JSON object or a mapped CSV row) into a :class:`PromptItem`."""
    unknown = sorted(set(record) - _KNOWN)
    if unknown:
        raise PromptSetError(source, line, unknown[0], f"unknown field (known: {', '.join(sorted(_KNOWN))})")
    values: dict[str, str] = {}
    for name in REQUIRED + OPTIONAL:
        value = record.get(name)
        if value is None or (name in OPTIONAL and value == ""):
            if name in REQUIRED:
                raise PromptSetError(source, line, name, "required field is missing")
            continue
        if not isinstance(value, str):
            raise PromptSetError(source, line, name, f"must be a string, got {type(value).__name__}")
        if not value.strip():
            raise PromptSetError(source, line, name, "must not be empty")
        values[name] = value
    for name in ("two_hop", "hop1", "hop2"):
        if name in values and values[name] != values[name].rstrip():
            raise PromptSetError(source, line, name, "prompt must end right before the answer, without trailing space")
    if "e1" in values and values["e1"] not in values["two_hop"]:
        raise PromptSetError(source, line, "e1", f"{values['e1']!r} does not occur in two_hop")
    return PromptItem(**values)


def check_set(items: list[PromptItem], where: list[tuple[str, int]]) -> None:
    """Set-level checks: unique ids, and ``pair`` naming an existing, different item. ``where[i]`` is the
    (file, line) item ``i`` came from."""
    seen: dict[str, tuple[str, int]] = {}
    for item, (source, line) in zip(items, where):
        if item.id in seen:
            first = "{}:{}".format(*seen[item.id])
            raise PromptSetError(source, line, "id", f"duplicate id {item.id!r} (first at {first})")
        seen[item.id] = (source, line)
    for item, (source, line) in zip(items, where):
        if item.pair is not None and (item.pair not in seen or item.pair == item.id):
            raise PromptSetError(source, line, "pair", f"{item.pair!r} is not the id of another item in the set")
