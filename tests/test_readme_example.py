"""The README's Python example runs as written on the embedded model and passes the tokenizer to lens_queries,
so target flags (ambiguous first tokens) are set."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_readme_python_example_runs_and_flags_targets(one_thread) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Using it from Python"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "lens_queries(load_prompts(" in code and ", tokenizer)" in code
    printed = io.StringIO()
    scope: dict = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own example)
    assert len(scope["bridge"].groupby("layer")) == 30  # SmolLM2-135M: one median rank per layer
    assert "target_flags" in scope["rows"] and len(printed.getvalue().splitlines()) >= 30
