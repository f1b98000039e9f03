"""The guide as one PDF: execute every notebook in notebooks/, then print them as the chapters of one book.

    python -m project guide --out guide.pdf

Each notebook runs top to bottom in a fresh kernel (nbclient) inside a temporary working directory, so the
PDF shows outputs the code really produced. nbconvert turns it into HTML with MathJax 2 loaded from the local
`jupyter-server-mathjax` package (no network), and Debian's headless Chromium prints that HTML, math typeset and
figures embedded, to PDF. pypdf then joins a title page, a table of contents and the chapters into one file
with bookmarks, the contents rows linked to their chapters. Chapters are numbered from page 1 in their footers
and in the table of contents.
"""

from __future__ import annotations

import datetime
import html
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from project.files import atomic_path, check_new_file

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
BOOK_TITLE = "Build a Large Language Model from Scratch"
BOOK_SUBTITLE = "A GPT in PyTorch and PyTorch Lightning: the guide, every chapter executed"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# MathJax 2's combined config shipped by jupyter-server-mathjax; nbconvert's default name is not in that
# package, and a config that fails to load leaves the TeX untouched in the PDF without any error
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"
# the package ships only the STIX web fonts: ask for them, or MathJax falls back to a plain serif look-alike
MATHJAX_FONT = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null}});
</script>"""
PAGE_CSS = """
@page { size: A4; margin: 16mm 14mm 18mm 14mm;
        @bottom-center { content: counter(page); font: 9pt sans-serif; color: #555; }
        @bottom-left { content: "%(footer)s"; font: 9pt sans-serif; color: #888; } }
html { counter-reset: page %(first_page_minus_one)d; }
body { font-size: 11pt; }
/* code and long outputs wrap instead of running off the page edge */
pre, .jp-OutputArea-output pre { white-space: pre-wrap; overflow-wrap: anywhere; }
.jp-OutputArea-output img, .jp-RenderedImage img { max-width: 100%%; height: auto; break-inside: avoid; }
.jp-Cell { padding: 2px 0; }
h1, h2, h3 { break-after: avoid-page; }
.jp-InputArea-editor { overflow: visible; }
"""


@dataclass
class Chapter:
    """One executed notebook in the book: its title, where it starts (chapters count from page 1), its length."""

    notebook: Path
    title: str
    first_page: int
    pages: int
    execute_seconds: float


@dataclass
class GuideReport:
    """What `build_guide` wrote: the PDF, its page count and chapters, and how long each stage took."""

    out: Path
    pages: int
    chapters: list[Chapter]
    execute_seconds: float
    render_seconds: float


def find_chromium(search_path: str | None = None) -> str:
    """The Chromium executable on PATH (or on `search_path`); FileNotFoundError naming the fix when absent."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name, path=search_path)
        if found:
            return found
    raise FileNotFoundError("the guide is printed by headless Chromium, which is not on PATH: "
                            "install it (apt-get install chromium) or pass --chromium /path/to/chromium")


def check_chromium(chromium: str) -> str:
    """The executable `chromium` names, checked to run (`--version`): a one-line error before any notebook runs."""
    found = shutil.which(chromium)
    if found is None:
        raise FileNotFoundError(f"--chromium {chromium} is not an executable: install chromium (apt-get install "
                                "chromium) or pass the path of its executable")
    try:
        result = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValueError(f"--chromium {chromium} does not run ({type(err).__name__}: {err}): pass a working "
                         "Chromium or Chrome executable") from None
    if result.returncode != 0:
        raise ValueError(f"--chromium {chromium} does not run (`{chromium} --version` exited with "
                         f"{result.returncode}): pass a working Chromium or Chrome executable")
    return found


def mathjax_url() -> str:
    """file:// URL of the MathJax 2 that jupyter-server-mathjax ships, with a config that exists there."""
    try:
        import jupyter_server_mathjax
    except ImportError as err:  # the guide extra is missing
        raise FileNotFoundError("math in the guide needs the offline MathJax of jupyter-server-mathjax: "
                                "pip install -e '.[guide]'") from err
    script = Path(jupyter_server_mathjax.__file__).parent / "static" / "MathJax.js"
    if not script.is_file():
        raise FileNotFoundError(f"MathJax.js missing from jupyter-server-mathjax ({script}): reinstall it "
                                "(pip install --force-reinstall jupyter-server-mathjax)")
    return f"{script.as_uri()}?config={MATHJAX_CONFIG}"


def discover_notebooks(notebook_dir: Path = NOTEBOOK_DIR, names: list[str] | None = None) -> list[Path]:
    """The notebooks of the guide in reading order (sorted by file name), or those whose names start with `names`."""
    notebook_dir = Path(notebook_dir)
    if not notebook_dir.is_dir():
        raise NotADirectoryError(f"no notebook folder at {notebook_dir}: pass --notebook_dir path/to/notebooks")
    available = sorted(notebook_dir.glob("*.ipynb"))
    if not available:
        raise FileNotFoundError(f"no .ipynb files in {notebook_dir}: pass --notebook_dir path/to/notebooks")
    if not names:
        return available
    chosen = []
    for name in names:
        matches = [p for p in available if p.name == name or p.stem == name or p.name.startswith(name)]
        if len(matches) != 1:
            problem = "matches no notebook" if not matches else f"matches {len(matches)} notebooks"
            raise ValueError(f"--notebooks {name!r} {problem}: choose from {', '.join(p.stem for p in available)}")
        if matches[0] not in chosen:
            chosen.append(matches[0])
    return sorted(chosen)  # the book keeps the reading order whatever order they were asked in


def chapter_title(notebook) -> str:
    """The notebook's first level-1 markdown heading, e.g. "Chapter 3 — The transformer block"."""
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+?)\s*$", cell.source, flags=re.MULTILINE)
            if match:
                return match.group(1)
    return ""


def execute_notebook(path: Path, workdir: Path, timeout: int):
    """Run a notebook top to bottom in a fresh kernel whose working and temporary directory is `workdir`.

    Returns the executed notebook (nbformat node); a failing or slow cell raises ValueError naming the cell.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    notebook = nbformat.read(path, as_version=4)
    # the kernel sees this checkout's package, draws figures inline and keeps its scratch files in workdir;
    # one OpenMP thread: the models are tiny, and extra threads only contend on a small shared machine
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MPLBACKEND": "agg", "TMPDIR": str(workdir), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(workdir)}})
    try:
        # the kernel's own log lines (e.g. ipykernel's transport warning) would clutter the command's output
        client.execute(env=env, stderr=subprocess.DEVNULL)
    except CellTimeoutError as err:
        raise ValueError(f"{path.name}: a cell ran past --timeout {timeout} s: raise --timeout") from err
    except CellExecutionError as err:
        raise ValueError(f"{path.name}: a cell raised {err.ename}: {err.evalue}: run the notebook in Jupyter "
                         "to see the traceback") from err
    return notebook


def chapter_html(notebook, title: str, first_page: int) -> str:
    """The executed notebook as one self-contained HTML page: local MathJax, embedded figures, print CSS.

    Drops the notebook's stderr outputs (in place).
    """
    from nbconvert import HTMLExporter

    # stderr (library warnings, progress bars) is noise on paper; the notebook itself still shows it
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    exporter = HTMLExporter(template_name="lab", mathjax_url=mathjax_url(), exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(notebook, resources={"metadata": {"name": title}})
    css = PAGE_CSS % {"footer": css_string(title), "first_page_minus_one": first_page - 1}
    return body.replace("</head>", f"{MATHJAX_FONT}<style>{css}</style>\n</head>", 1)


def css_string(text: str) -> str:
    """`text` quoted for a CSS string literal."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def front_matter_html(chapters: list[Chapter], note: str) -> str:
    """Title page and table of contents, with each chapter's first page."""
    rows = "\n".join(
        f'<tr><td class="title">{html.escape(c.title)}</td><td class="page">{c.first_page}</td></tr>'
        for c in chapters)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(BOOK_TITLE)}</title><style>
@page {{ size: A4; margin: 25mm 22mm; }}
body {{ font-family: sans-serif; color: #222; }}
.cover {{ break-after: page; padding-top: 70mm; }}
.cover h1 {{ font-size: 30pt; margin: 0 0 8mm; }}
.cover p {{ font-size: 14pt; color: #444; }}
.cover .note {{ font-size: 10pt; color: #777; margin-top: 90mm; }}
h2 {{ font-size: 20pt; }}
table {{ width: 100%; border-collapse: collapse; font-size: 12pt; }}
td {{ padding: 3mm 0; border-bottom: 1px dotted #aaa; }}
td.page {{ text-align: right; width: 15mm; }}
</style></head><body>
<section class="cover"><h1>{html.escape(BOOK_TITLE)}</h1><p>{html.escape(BOOK_SUBTITLE)}</p>
<p class="note">{html.escape(note)}</p></section>
<section><h2>Contents</h2><table>{rows}</table></section>
</body></html>"""


def text_heights(page) -> dict[str, float]:
    """Each piece of text on a PDF page and the height of its baseline above the bottom edge, in points."""
    heights = {}

    def collect(text, cm, tm, font, size):
        if text.strip():
            heights[text.strip()] = tm[4] * cm[1] + tm[5] * cm[3] + cm[5]

    page.extract_text(visitor_text=collect)
    return heights


def print_to_pdf(chromium: str, html_path: Path, pdf_path: Path, timeout: int = 300) -> None:
    """Print an HTML file to PDF with headless Chromium, after its scripts (MathJax) have finished."""
    # the virtual time budget lets MathJax typeset everything before printing, without waiting in real time
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
               "--virtual-time-budget=60000", "--allow-file-access-from-files", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--print-to-pdf={pdf_path}", html_path.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0 or not pdf_path.is_file():
        raise RuntimeError(f"chromium could not print {html_path.name} (exit {result.returncode}): "
                           f"{result.stderr.strip()[-500:]}")


def build_guide(out: Path, notebook_dir: Path = NOTEBOOK_DIR, names: list[str] | None = None, timeout: int = 600,
                chromium: str | None = None, on_chapter: Callable[[Chapter], None] | None = None) -> GuideReport:
    """Execute the guide's notebooks and write them, with a title page and contents, to one PDF at `out`.

    `names` picks a subset (see `discover_notebooks`), `timeout` bounds each cell in seconds, `chromium` is the
    browser to print with (default: found on PATH) and `on_chapter` is called as each chapter is done.
    """
    from pypdf import PdfReader, PdfWriter
    from pypdf.annotations import Link
    from pypdf.constants import PageLabelStyle

    # every input and the output checked before minutes of execution, not after
    out = check_new_file(out, "--out")
    chromium = check_chromium(chromium or find_chromium())
    notebooks = discover_notebooks(notebook_dir, names)
    mathjax_url()  # the offline MathJax
    chapters: list[Chapter] = []
    chapter_pdfs: list[Path] = []
    execute_seconds = render_seconds = 0.0
    with tempfile.TemporaryDirectory(prefix="gpt-guide-") as scratch:
        scratch = Path(scratch)
        next_page = 1
        for index, path in enumerate(notebooks):
            workdir = scratch / f"run-{index}"
            workdir.mkdir()
            started = time.perf_counter()
            notebook = execute_notebook(path, workdir, timeout)
            executed_in = time.perf_counter() - started
            execute_seconds += executed_in
            started = time.perf_counter()
            title = chapter_title(notebook) or path.stem
            html_path, pdf_path = scratch / f"{index:02d}.html", scratch / f"{index:02d}.pdf"
            html_path.write_text(chapter_html(notebook, title, next_page), encoding="utf-8")
            print_to_pdf(chromium, html_path, pdf_path)
            pages = len(PdfReader(pdf_path).pages)
            chapters.append(Chapter(path, title, next_page, pages, executed_in))
            chapter_pdfs.append(pdf_path)
            next_page += pages
            render_seconds += time.perf_counter() - started
            if on_chapter is not None:
                on_chapter(chapters[-1])

        started = time.perf_counter()
        note = (f"Built {datetime.date.today().isoformat()} by `python -m project guide`: every notebook was "
                f"executed on this machine in {execute_seconds:.0f} s before printing.")
        front_html, front_pdf = scratch / "front.html", scratch / "front.pdf"
        front_html.write_text(front_matter_html(chapters, note), encoding="utf-8")
        print_to_pdf(chromium, front_html, front_pdf)

        writer = PdfWriter()
        writer.append(front_pdf, import_outline=False)
        front_pages = len(writer.pages)
        writer.add_outline_item(title="Contents", page_number=min(1, front_pages - 1))
        contents_page = min(1, front_pages - 1)
        rows = text_heights(writer.pages[contents_page])
        for chapter, pdf_path in zip(chapters, chapter_pdfs):
            start = len(writer.pages)
            writer.append(pdf_path, import_outline=False)
            writer.add_outline_item(title=chapter.title, page_number=start)
            if chapter.title in rows:  # the contents row becomes a link to the chapter's first page
                y = rows[chapter.title]
                width = float(writer.pages[contents_page].mediabox.width)
                writer.add_annotation(contents_page, Link(rect=(50, y - 6, width - 50, y + 14), target_page_index=start))
        # a viewer's page numbers then match the footers and the contents: roman front matter, chapters from 1
        writer.set_page_label(0, front_pages - 1, style=PageLabelStyle.LOWERCASE_ROMAN, start=1)
        writer.set_page_label(front_pages, len(writer.pages) - 1, style=PageLabelStyle.DECIMAL, start=1)
        writer.add_metadata({"/Title": BOOK_TITLE})
        writer.page_mode = "/UseOutlines"
        with atomic_path(out) as staging:  # a failure never leaves half a PDF
            writer.write(staging)
        render_seconds += time.perf_counter() - started
    return GuideReport(out, front_pages + next_page - 1, chapters, execute_seconds, render_seconds)
