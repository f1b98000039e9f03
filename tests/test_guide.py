"""`python -m project guide`: the notebooks executed and printed as one PDF (project/guide.py)."""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from pypdf import PdfReader

from conftest import REPO, run_cli
from project.commands import main
from project.guide import MATHJAX_CONFIG, discover_notebooks, find_chromium, mathjax_url

APPENDIX = REPO / "notebooks" / "appendix-a-manual-derivatives.ipynb"
RAW_TEX = re.compile(r"\$|\\frac|\\bar|\\sum|\\operatorname")  # what un-typeset math leaves in the text


def test_notebooks_are_found_in_reading_order_with_the_appendix_last():
    found = discover_notebooks()
    assert found == sorted(found) and len(found) >= 6
    assert found[-1] == APPENDIX
    assert discover_notebooks(names=["appendix", "01"]) == [found[0], APPENDIX]  # reading order, not asked order
    with pytest.raises(ValueError, match="matches no notebook: choose from 01-tokens-and-embeddings"):
        discover_notebooks(names=["99-nothing"])
    with pytest.raises(ValueError, match="matches [0-9]+ notebooks"):
        discover_notebooks(names=["0"])


def test_mathjax_is_the_local_copy_with_a_config_it_ships():
    # the config file must exist in the package: a missing one leaves raw TeX in the PDF without any error
    url = mathjax_url()
    assert url.startswith("file://") and url.endswith(f"?config={MATHJAX_CONFIG}")
    static = Path(url.removeprefix("file://").split("?")[0]).parent
    for name in MATHJAX_CONFIG.split(","):
        assert (static / "config" / f"{name}.js").is_file(), name


def test_missing_chromium_is_one_line_naming_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture):
    empty = tmp_path / "bin"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        find_chromium(search_path=str(empty))
    monkeypatch.setenv("PATH", str(empty))  # a machine without chromium: checked before any notebook runs
    with pytest.raises(SystemExit) as exit_info:
        main(["guide", "--out", str(tmp_path / "guide.pdf")])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "apt-get install chromium" in lines[0]
    assert not (tmp_path / "guide.pdf").exists()


def test_unknown_notebook_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as exit_info:
        main(["guide", "--out", str(tmp_path / "guide.pdf"), "--notebooks", "01,99-nothing"])
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --notebooks '99-nothing' matches no notebook: choose from")


def footer(page) -> list[str]:
    """Text pieces printed in the page's bottom margin (below 18 mm), i.e. its page number and chapter title."""
    pieces = []

    def collect(text, cm, tm, font, size):
        y = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]  # baseline height above the bottom edge, in points
        if text.strip() and y < 40:
            pieces.append(text.strip())

    page.extract_text(visitor_text=collect)
    return sorted(pieces, key=lambda piece: not piece.isdigit())  # the number first


def write_small_chapter(path: Path) -> None:
    """A quick notebook with inline and display math, an output and a figure."""
    nb = new_notebook(cells=[
        new_markdown_cell("# Chapter 0 — A small test chapter\n\nThe ratio $\\frac{\\alpha}{\\beta}$ inline, and "
                          "displayed:\n$$\\sum_{i=1}^{n} \\omega_i = 1.$$"),
        new_code_cell("%matplotlib inline\nimport matplotlib.pyplot as plt\nprint('sum of squares:', "
                      "sum(i * i for i in range(10)))\nplt.plot([0, 1, 4, 9]); plt.title('a parabola'); plt.show()"),
    ])
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_guide_pdf_has_contents_chapters_figures_and_typeset_math(tmp_path: Path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    write_small_chapter(notebooks / "00-small.ipynb")
    shutil.copy(APPENDIX, notebooks / APPENDIX.name)
    # the check for raw TeX below means something only if the math is in the prose and not in the code
    for path in notebooks.glob("*.ipynb"):
        cells = nbformat.read(path, as_version=4).cells
        assert any("\\frac" in c.source for c in cells if c.cell_type == "markdown"), path.name
        assert not any("$" in c.source for c in cells if c.cell_type == "code"), path.name

    out = tmp_path / "guide.pdf"
    result = run_cli("guide", "--out", str(out), "--notebook_dir", str(notebooks), "--timeout", "170",
                     cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"wrote .*guide\.pdf: \d+ pages, 2 chapters", result.stdout), result.stdout

    pdf = PdfReader(out)
    titles = [item["/Title"] for item in pdf.outline]
    assert titles == ["Contents", "Chapter 0 — A small test chapter", "Appendix A — The manual derivatives"]
    starts = [pdf.get_destination_page_number(item) for item in pdf.outline]
    assert starts[0] == 1 and starts[1] == 2 and starts[2] > starts[1]  # title page, contents, then the chapters
    # the contents list each chapter with the page number printed in its footer (chapters count from 1)
    contents = pdf.pages[1].extract_text()
    appendix_page = starts[2] - starts[1] + 1
    assert re.search(r"Chapter 0 — A small test chapter\s*1\b", contents), contents
    assert re.search(rf"Appendix A — The manual derivatives\s*{appendix_page}\b", contents), contents
    page_ids = [page.indirect_reference.idnum for page in pdf.pages]
    links = [page_ids.index(a.get_object()["/Dest"][0].idnum) for a in pdf.pages[1].get("/Annots", [])]
    assert links == starts[1:]  # each contents row links to its chapter
    assert pdf.page_labels[starts[2]] == str(appendix_page)
    assert footer(pdf.pages[starts[2]]) == [str(appendix_page), "Appendix A — The manual derivatives"]
    assert footer(pdf.pages[-1])[0] == str(len(pdf.pages) - starts[1])

    text = {i: page.extract_text() for i, page in enumerate(pdf.pages)}
    leftovers = {i: RAW_TEX.findall(t) for i, t in text.items() if RAW_TEX.search(t)}
    assert not leftovers, f"raw TeX on pages {leftovers}"
    small_chapter = "".join(text[i] for i in range(starts[1], starts[2]))
    glyphs = unicodedata.normalize("NFKC", small_chapter)  # MathJax sets variables in mathematical italic: 𝛼 -> α
    assert all(symbol in glyphs for symbol in "αβω∑"), small_chapter  # the TeX became typeset symbols
    assert "sum of squares: 285" in small_chapter  # outputs come from really running the code
    appendix = "".join(text[i] for i in range(starts[2], len(pdf.pages)))
    assert "hand-computed gradients = autograd's" in appendix
    images = [len(pdf.pages[i].images) for i in range(len(pdf.pages))]
    assert sum(images[starts[1]:starts[2]]) >= 1
    assert sum(images[starts[2]:]) >= 3  # GELU, attention and the per-parameter comparison
