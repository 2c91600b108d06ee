"""The HTML report page, built from real (tiny-model) lens, attribution and memory runs: no raw docstring markup,
numbers written for people, every section opening with its findings; and, in a real headless browser where one is
installed (Chromium/Chrome; skipped otherwise), every image loads, no raw markup is visible, and a screenshot is
saved (to $BRIDGEPROBE_SCREENSHOT when set)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_model
from test_memory import ITEMS, WordTokenizer
from bridgeprobe.analyses.memory_report import memory_section, write_memory_outputs
from bridgeprobe.analyses.patching_report import attribution_section
from bridgeprobe.analyses.report import write_lens_report
from bridgeprobe.probes.model.hooks import NativeHooks
from bridgeprobe.probes.readouts.lens import lens_batch, lens_queries
from bridgeprobe.probes.memory.analysis import run_memory
from bridgeprobe.probes.memory.plans import MemoryConfig
from bridgeprobe.probes.runs.pipeline import item_pairs, run_patching

RAW_MARKUP = (":func:`", ":data:`", ":mod:`", ":class:`", ":meth:`", "``")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _browser() -> str | None:
    return next((path for path in map(shutil.which, BROWSERS) if path), None)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """index.html of a tiny Llama run with the attribution and memory sections."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("page")
    hooked = NativeHooks(tiny_model("llama"), WordTokenizer())
    lens = pd.DataFrame(lens_batch(hooked, lens_queries(ITEMS)))
    pairs, _ = item_pairs(ITEMS, hooked.tokenizer, skip_unequal=True)
    patching = run_patching(hooked, pairs, out, sites=["resid_pre", "attn_out", "mlp_out"], method="attribution",
                            direction="denoise", name="attribution", settings={"model": "tiny"})
    run = {"model": "tiny-llama", "model_class": type(hooked.model).__name__, "n_layers": hooked.n_layers,
           "settings": {"prompts": ["test set"]}, "timings": {"load_model_s": 0.4, "lens_s": 312.5},
           "versions": {"torch": torch.__version__}}
    memory = run_memory(hooked, ITEMS, out, MemoryConfig(batch_items=3, backpatch_groups=("correct", "hop_failed")),
                        settings={"model": "tiny"}).frame
    summary = write_memory_outputs(memory, out, run)
    sections = [attribution_section(patching.frame, out, run["model"]),
                memory_section(summary, [out / name for name in summary["figures"]])]
    write_lens_report(lens, ITEMS, out, run, sections)
    return out / "index.html"


class _Text(HTMLParser):
    """The visible text of a page, and its sections as (title, first paragraph's class)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.sections: list[list[str]] = []
        self._skip = 0
        self._in_h2 = False
        self._after_h2 = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("style", "script"):
            self._skip += 1
        if tag == "h2":
            self._in_h2 = True
            self.sections.append(["", ""])
        elif self._after_h2 and tag == "p":
            self.sections[-1][1] = dict(attrs).get("class") or ""
            self._after_h2 = False
        elif self._after_h2 and tag in ("table", "figure", "div", "img"):
            self._after_h2 = False

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self._skip -= 1
        if tag == "h2":
            self._in_h2, self._after_h2 = False, True

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)
        if self._in_h2:
            self.sections[-1][0] += data


def test_page_reads_like_a_page(page: Path) -> None:
    html = page.read_text()
    parsed = _Text()
    parsed.feed(html)
    text = "".join(parsed.text)
    assert not [m for m in RAW_MARKUP if m in text]
    assert not re.search(r"\d\.\d+e[+-]\d", text), "numbers in scientific notation"
    assert "{'" not in text and "_s':" not in text, "a raw dictionary"
    assert "TOP_K" in text and "10 (TOP_K)" in text  # the constant named with its value
    assert re.search(r"<div class=\"definitions\">\s*<ul>\s*<li>", html), "the definitions are a list"
    titles = dict(parsed.sections)
    for title in ("Where the bridge is readable (logit lens)", "By outcome", "Per-layer attribution",
                  "Shared latent memory"):
        assert titles.get(title) == "findings", (title, titles)
    findings = re.search(r'<p class="findings">(.*?)</p>', html, re.S).group(1)
    assert f"On {len(ITEMS)} two-hop prompts" in findings
    assert "312 s" in html or "5.2 min" in html  # timings as durations


ROOT = Path(__file__).resolve().parent.parent
CHECKED_IN = {"reproduce": ROOT / "reports" / "identity" / "reproduce" / "index.html",
              "finetune": ROOT / "reports" / "identity" / "finetune" / "index.html",
              "memory (full analysis)": ROOT / "reports" / "smollm2-135m" / "memory" / "memory.html"}
# after load: broken images, raw markup in the visible text, whether the finding follows the title, and pairs of
# text boxes that overlap (leaf elements with text, not nested in each other)
CHECK = ("<script>window.addEventListener('load', () => {"
         "const broken = [...document.images].filter(i => !i.complete || i.naturalWidth === 0).length;"
         "const marks = MARKS.filter(m => document.body.innerText.includes(m));"
         "const first = document.querySelector('h1').nextElementSibling;"
         "const boxes = [...document.querySelectorAll('h1,h2,p,li,td,th,figcaption,code')]"
         ".filter(e => e.innerText.trim() && ![...e.children].some(c => c.innerText && c.innerText.trim()))"
         ".map(e => [e, e.getBoundingClientRect()]).filter(([e, r]) => r.width > 0 && r.height > 0);"
         "let overlaps = [];"
         "for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {"
         "const [a, ra] = boxes[i], [b, rb] = boxes[j];"
         "if (a.contains(b) || b.contains(a)) continue;"
         "const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);"
         "const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);"
         "if (w > 2 && h > 2) overlaps.push(a.innerText.slice(0, 30) + ' / ' + b.innerText.slice(0, 30)); }"
         "document.body.setAttribute('data-images', document.images.length);"
         "document.body.setAttribute('data-broken', broken);"
         "document.body.setAttribute('data-markup', marks.join('|'));"
         "document.body.setAttribute('data-first', first ? first.className : '');"
         "document.body.setAttribute('data-overlaps', overlaps.slice(0, 5).join(' || '));});</script>")


def _in_browser(page: Path, tmp_path: Path) -> dict[str, str]:
    """The CHECK attributes of ``page`` loaded in headless Chromium."""
    probe = tmp_path / f"probe-{page.name}"  # the pages are self-contained (images inline)
    probe.write_text(page.read_text().replace("</body>", CHECK.replace("MARKS", repr(list(RAW_MARKUP))) + "</body>"))
    browser = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,900"]
    dom = subprocess.run([*browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    return dict(re.findall(r'data-(\w+)="([^"]*)"', body))


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium/Chrome on this machine (apt-get install chromium)")
def test_page_in_a_headless_browser(page: Path, tmp_path: Path) -> None:
    """Chromium loads the page; a script run after load counts broken images and raw markup in the visible text,
    checks that the finding opens the page and that no two text boxes overlap; then a screenshot of the page."""
    attributes = _in_browser(page, tmp_path)
    assert int(attributes["images"]) >= 5, attributes
    assert attributes["broken"] == "0" and attributes["markup"] == "", attributes
    assert attributes["first"] == "finding" and attributes["overlaps"] == "", attributes
    browser = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = Path(os.environ.get("BRIDGEPROBE_SCREENSHOT", tmp_path / "page.png"))
    subprocess.run([*browser, "--window-size=1200,6000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium/Chrome on this machine (apt-get install chromium)")
@pytest.mark.parametrize("kind", ["memory (tiny run)", *CHECKED_IN])
def test_every_page_type_in_a_headless_browser(kind: str, page: Path, tmp_path: Path) -> None:
    """The memory page and the identity pages, like the main page: images load, no raw markup, the finding
    first, no overlapping text."""
    path = page.parent / "memory.html" if kind == "memory (tiny run)" else CHECKED_IN[kind]
    attributes = _in_browser(path, tmp_path)
    assert int(attributes["images"]) >= 1 and attributes["broken"] == "0", attributes
    assert attributes["markup"] == "" and attributes["first"] == "finding", attributes
    assert attributes["overlaps"] == "", attributes


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium/Chrome on this machine (apt-get install chromium)")
def test_the_browser_check_sees_overlapping_text_and_a_missing_finding(tmp_path: Path) -> None:
    """The check can fail: a caption drawn over a paragraph, and a page that opens without its finding."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><h1>Title</h1><p>first paragraph of text</p>"
                   "<p style='position:absolute;top:60px;left:10px'>a caption drawn over it</p>"
                   "<p>more text</p></body></html>")
    attributes = _in_browser(bad, tmp_path)
    assert attributes["first"] == "" and "first paragraph" in attributes["overlaps"], attributes


def test_docstring_markup_and_numbers_are_written_for_people() -> None:
    from bridgeprobe.analyses.page import count, doc_to_html, interval, seconds

    html = doc_to_html("Definitions (see :func:`layer_evidence`):\n- ``rank`` below ``TOP_K``;\n- effect of at least "
                       ":data:`MIN_EFFECT`", {"TOP_K": 10, "MIN_EFFECT": 0.1})
    assert "<ul>" in html and html.count("<li>") == 2 and "`" not in html and ":func:" not in html
    assert "10 (<code>TOP_K</code>)" in html and "0.1 (<code>MIN_EFFECT</code>)" in html
    assert "<code>layer_evidence</code>" in html
    assert count(6160.0) == "6,160" and count(float("nan")) == "–"
    assert seconds(48.2) == "48 s" and seconds(312.5) == "5.2 min"
    summary = {"rate": 0.215, "rate_ci_low": 0.2, "rate_ci_high": 0.25, "rate_n": 794, "bare": 0.5}
    assert interval(summary, "rate") == "21.5% [20.0%, 25.0%] (n = 794)"
    assert interval(summary, "rate", with_n=False) == "21.5% [20.0%, 25.0%]"
    assert interval(summary, "bare") == "50.0%"  # no interval in the summary: the value alone
