"""Issue 13 on the pages: server folders behind the allow-list, file names shown literally (never as Markdown)."""

from __future__ import annotations

import html
import re

from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from app_fixtures import app_env, finish_batch, log_in, model_dir  # noqa: F401  (pytest fixtures)
from app_test_images import png_bytes, synthetic_cell

TIMEOUT = 180
# A file name full of Markdown: bold, a link, code, HTML, a heading mark, colour directive, maths, strike-through.
# (Streamlit's emoji shortcodes such as :smile: are not neutralised; see the issue report.)
EVIL = "**bold** [click](http://example.com) `code` <b>x</b> #1 :red[x] $x$ ~~s~~ _i_.png"


def start(page: str) -> AppTest:
    at = AppTest.from_file("../../app.py", default_timeout=TIMEOUT)
    at.run()
    log_in(at, "rita")
    at.switch_page(page).run()
    if page.endswith("batch_screening.py"):   # every run is a case: it needs a sample label
        at.text_input(key="batch_sample_label").input("SLIDE-H").run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def rendered_text(markdown_source: str) -> str:
    """What a reader sees of a Markdown string: rendered, tags removed."""
    return html.unescape(re.sub(r"<[^>]+>", "", MarkdownIt("commonmark").render(markdown_source))).strip()


def test_rendered_text_helper_can_fail():
    assert EVIL not in rendered_text(EVIL)  # unescaped, the name would be mangled


def test_single_image_shows_a_markdown_file_name_literally(app_env):
    at = start("pages/single_image.py")
    at.file_uploader(key="single_upload").set_value((EVIL, b"not an image", "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    (err,) = [e.value for e in at.error]
    assert EVIL in rendered_text(err)


def test_batch_shows_a_markdown_file_name_literally(app_env):
    at = start("pages/batch_screening.py")
    at.file_uploader[0].set_value([(EVIL, b"broken", "image/png"),
                                   ("ok.png", png_bytes(synthetic_cell(3)), "image/png")]).run()
    next(b for b in at.button if b.label == "Run screening").click().run()
    finish_batch(at)   # the run is a background job
    assert not at.exception, [e.value for e in at.exception]
    rows = at.session_state["batch_rows"]
    i = next(k for k, r in enumerate(rows) if r["file"] == EVIL)
    at.session_state["batch_open"] = i
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(EVIL in rendered_text(e.value) for e in at.error), [e.value for e in at.error]
    assert any(t.value == f"File: {EVIL}" for t in at.text)


def test_server_folders_off_without_roots(app_env, monkeypatch):
    monkeypatch.delenv("BCC_IMAGE_ROOTS", raising=False)
    at = start("pages/batch_screening.py")
    assert not [r for r in at.radio if r.key == "batch_mode"]
    assert not [t for t in at.text_input if t.key == "batch_folder"]


def test_server_folder_outside_the_roots_is_refused_like_a_missing_one(app_env, tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(png_bytes(synthetic_cell(4)))
    monkeypatch.setenv("BCC_IMAGE_ROOTS", str(allowed))
    at = start("pages/batch_screening.py")
    at.radio(key="batch_mode").set_value("Folder on the server").run()
    reasons = []
    for path in (outside, allowed / "missing", "/"):
        at.text_input(key="batch_folder").input(str(path)).run()
        next(b for b in at.button if b.label == "Run screening").click().run()
        finish_batch(at)   # the run is a background job
        assert not at.exception, [e.value for e in at.exception]
        rows = at.session_state["batch_rows"]
        assert len(rows) == 1 and rows[0]["status"] == "error"
        reasons.append(rows[0]["reason"].split(": ", 1)[1])
    assert len(set(reasons)) == 1 and "not found, or not inside" in reasons[0]
