"""HTML pages of the reports: jinja2 templates (``analyses/templates/``), numbers formatted for people, and the
docstring definitions rendered through ``markdown``.

Every report page is a :class:`Section` list rendered into ``page.html``: a section opens with its findings in
plain words, then its HTML body and its figures (embedded as data URIs, each with a caption), so a page is one
self-contained file.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jinja2
import markdown
import numpy as np
import pandas as pd
from markupsafe import Markup

_ENV = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


@dataclass
class Figure:
    path: Path
    caption: str = ""


@dataclass
class Section:
    """A part of a page: ``findings`` is plain text (escaped), ``body`` trusted HTML, ``figures`` PNGs."""

    title: str
    findings: str = ""
    body: str = ""
    figures: list[Figure] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ numbers


def missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def count(value: Any) -> str:
    """An integer with thousands separators (ranks, counts): 6160 -> '6,160'."""
    return "–" if missing(value) else f"{int(round(float(value))):,}"


def pct(value: Any, digits: int = 1) -> str:
    """A rate as a percentage: 0.215 -> '21.5%'."""
    return "–" if missing(value) else f"{100 * float(value):.{digits}f}%"


def num(value: Any, digits: int = 2) -> str:
    """A real number with a fixed number of decimals."""
    return "–" if missing(value) else f"{float(value):.{digits}f}"


def seconds(value: Any) -> str:
    """A duration: '48 s', '3.2 min', '1.5 h'."""
    if missing(value):
        return "–"
    value = float(value)
    if value < 100:
        return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"
    return f"{value / 60:.1f} min" if value < 5400 else f"{value / 3600:.1f} h"


def points(value: Any) -> str:
    """A difference of two rates in percentage points, signed: 0.2 -> '+20.0 points' (never '%': 20% of a rate
    is not 20 points of it)."""
    return "–" if missing(value) else f"{100 * float(value):+.1f} points"


def signed_points(value: Any) -> str:
    """An interval bound of a rate difference, in points without the unit: 0.171 -> '+17.1'."""
    return "–" if missing(value) else f"{100 * float(value):+.1f}"


def p_value(value: Any) -> str:
    """A p-value for people, the one format of every page: ``p < 0.001`` below 0.001, else two significant digits
    (``p = 0.012``, ``p = 0.5``, ``p = 1``); never scientific notation."""
    if missing(value):
        return "p not computed"
    number = p_number(value)
    return f"p {number}" if number.startswith("<") else f"p = {number}"


def p_number(value: Any) -> str:
    """The number of :func:`p_value` alone, for a table cell or after "p = " in running text: ``< 0.001`` or two
    significant digits."""
    if missing(value):
        return "–"
    return "< 0.001" if float(value) < 0.001 else f"{float(value):.2g}"


def sig(value: Any, digits: int = 3) -> str:
    """A real number with ``digits`` significant digits and no scientific notation: 0.0969 -> '0.0969',
    1.2e-05 -> '0.000012', 12345.6 -> '12,346'."""
    if missing(value):
        return "–"
    value = float(value)
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return np.format_float_positional(value, precision=digits, unique=False, fractional=False, trim="-")


SMALL_N = 10  # an interval of no width from fewer items than this is shown as "n too small"


def too_small(low: Any, high: Any, n: Any, fmt: Callable[[Any], str] = lambda x: f"{float(x):.2f}") -> bool:
    """Whether an interval has no width as printed (every item gave the same value) on fewer than
    :data:`SMALL_N` items: such an interval says nothing about the uncertainty, so a page shows "n too small"
    instead of it."""
    if missing(low) or missing(high) or missing(n) or float(n) >= SMALL_N:
        return False
    unsigned = lambda x: re.sub(r"^[+-](?=[0.,]*\D*$)", "", fmt(x))  # noqa: E731  -0.00 is 0.00
    return unsigned(low) == unsigned(high)


def interval(values: Mapping[str, Any], key: str, fmt: Callable[[Any], str] = pct, with_n: bool = True,
             bounds: Callable[[Any], str] | None = None) -> str:
    """``values[key]`` with its interval when the summary has one (``KEY_ci_low``/``KEY_ci_high``, or ``KEY`` a
    dict with ``mean``/``ci_low``/``ci_high``/``n``); the bare value otherwise. ``with_n``: add "(n = N)";
    ``bounds``: the bounds' format (default ``fmt``). An interval of no width on fewer than :data:`SMALL_N` items
    is "n too small (n = N)" (:func:`too_small`)."""
    value = values.get(key)
    if isinstance(value, Mapping):
        low, high, n, value = value.get("ci_low"), value.get("ci_high"), value.get("n"), value.get("mean")
    else:
        low, high, n = values.get(f"{key}_ci_low"), values.get(f"{key}_ci_high"), values.get(f"{key}_n")
    bounds = bounds or fmt
    if too_small(low, high, n, bounds):
        return f"n too small (n = {count(n)})"
    text = fmt(value)
    if not missing(low) and not missing(high):
        text += f" [{bounds(low)}, {bounds(high)}]"
    if with_n and not missing(n):
        text += f" (n = {count(n)})"
    return text


# ------------------------------------------------------------------------------------------------ HTML parts

_ROLE = re.compile(r":(?:func|data|mod|class|meth|attr|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")


def doc_to_html(text: str, constants: Mapping[str, Any] | None = None) -> str:
    """Docstring text (reST-style roles and literals, ``-`` bullet lists) as HTML; a literal naming one of
    ``constants`` shows the value, e.g. ``TOP_K`` -> ``10`` (TOP_K)."""
    constants = constants or {}

    def literal(match: re.Match) -> str:
        name = match.group(1).split(".")[-1]
        return f"{constants[name]} (`{name}`)" if name in constants else f"`{match.group(1)}`"

    text = _ROLE.sub(literal, text)
    text = _LITERAL.sub(literal, text)
    text = re.sub(r"(?m)^(?!\s*- )(.+:)\n(\s*- )", r"\1\n\n\2", text)  # markdown needs a blank line before a list
    return markdown.markdown(text)


def image(path: Path, alt: str) -> Markup:
    """A PNG embedded as a data URI."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return Markup('<img alt="{}" src="data:image/png;base64,{}">').format(alt, Markup(data))


def table(frame: pd.DataFrame, formats: Mapping[str, Callable[[Any], str]] | None = None,
          default: Callable[[Any], str] | None = None) -> str:
    """A DataFrame as an HTML table; ``formats`` per column (e.g. :func:`count` for ranks, :func:`pct` for
    rates), ``default`` for the other numeric columns (3 significant digits, :func:`sig`)."""
    formats = formats or {}
    default = default or sig
    shown, numeric = frame.copy(), []
    for column in shown.columns:
        numeric.append(column in formats or pd.api.types.is_numeric_dtype(shown[column]))
        if column in formats:
            shown[column] = shown[column].map(formats[column])
        elif pd.api.types.is_float_dtype(shown[column]):
            shown[column] = shown[column].map(default)
        elif pd.api.types.is_integer_dtype(shown[column]):
            shown[column] = shown[column].map(count)
    shown = shown.astype(object).where(shown.notna(), "")
    return _ENV.get_template("table.html").render(columns=[str(c).replace("_", " ") for c in shown.columns],
                                                  rows=shown.itertuples(index=False), numeric=numeric)


def key_values(facts: Mapping[str, Any]) -> str:
    """A two-column table of labels and values (HTML; values that are :class:`~markupsafe.Markup` stay HTML)."""
    return _ENV.get_template("key_values.html").render(facts=facts)


def render(title: str, sections: Sequence[Section], intro: str = "", facts: Mapping[str, Any] | None = None,
           footer: str = "", provenance: Mapping[str, Any] | None = None, finding: str = "") -> str:
    """The whole page; ``finding`` (:mod:`analyses.findings`) opens it under the title, then ``provenance``
    (:func:`analyses.provenance.provenance`) as a box."""
    from bridgeprobe.analyses.provenance import provenance_line

    return _ENV.get_template("page.html").render(title=title, finding=finding, intro=intro, facts=facts or {},
                                                 sections=sections,
                                                 footer=footer, image=image,
                                                 provenance=provenance_line(provenance) if provenance else "")
