"""Build the course site: every tutorial executed with its outputs and figures, plus the docs pages.

    python docs/build_site.py                 # full mode (the real numbers), into site/
    MINILORA_FAST=1 python docs/build_site.py # fast mode: a smoke build (the numbers mean nothing)
    python docs/build_site.py --out DIR --only 01,02 --jobs 2

Steps: jupytext reads each ``tutorials/NN_*.py`` as a notebook, nbclient executes it in a fresh
IPython kernel (figures are embedded in the outputs as PNG data), nbconvert's "basic" template
turns it into HTML, and every page is wrapped in one local layout (``docs/site.css``). The
Markdown pages (syllabus, the 2-hour lab, paper map, results, performance) go through mistune
(nbconvert's own Markdown parser); the exercises page is read from ``minilora.exercises`` (ids,
titles, what each check compares, the paper's equation; never a solution) and the API reference
from the docstrings with ``inspect``. Links between the sources (``02_lora_layer.py``,
``../docs/syllabus.md#capstone``) become links between the rendered pages. The kernels talk to
the builder over local IPC sockets, not TCP.

Why a small builder of our own rather than MkDocs-Material or Jupyter Book: the site must work
opened from disk with no network. Both generators pull web fonts, search indexes or JavaScript
bundles (and Jupyter Book a Sphinx theme) that assume a server or a CDN; here every page is plain
HTML + one CSS file, images are data: URIs or files next to the page, and nothing is fetched. The
dependencies (the ``docs`` extra) are the standard Jupyter pieces: jupytext, nbclient, nbconvert,
ipykernel.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import html
import importlib
import inspect
import os
import re
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TUTORIALS = os.path.join(REPO, "tutorials")

# (page file, source markdown in docs/, title in the navigation)
DOC_PAGES = [
    ("syllabus.html", "syllabus.md", "Syllabus"),
    ("lab.html", "lab.md", "A 2-hour lab"),
    ("paper_map.html", "paper_map.md", "Paper map"),
    ("results.html", "results.md", "Results"),
    ("performance.html", "performance.md", "Performance"),
]
# the modules of the API reference, in reading order
API_MODULES = [
    "minilora", "minilora.tensor", "minilora.function", "minilora.functional", "minilora.gradcheck",
    "minilora.nn", "minilora.models", "minilora.lora", "minilora.optim", "minilora.train",
    "minilora.data", "minilora.generate", "minilora.analysis", "minilora.io", "minilora.backend",
    "minilora.exercises", "minilora.diagrams",
]


def tutorial_files(only: list[str] | None = None) -> list[str]:
    names = sorted(n for n in os.listdir(TUTORIALS) if re.match(r"\d\d_.*\.py$", n))
    if only:
        names = [n for n in names if n[:2] in only]
    return [os.path.join(TUTORIALS, n) for n in names]


# ----------------------------------------------------------------------------- layout
def _nav(tutorials: list[tuple[str, str]], prefix: str) -> str:
    items = [f'<li><a href="{prefix}index.html">Home</a></li>']
    items += [f'<li><a href="{prefix}{page}">{html.escape(title)}</a></li>' for page, _, title in DOC_PAGES[:2]]
    items.append(f'<li><a href="{prefix}exercises.html">Exercises</a></li>')
    items.append('<li class="nav-head">Tutorials</li>')
    items += [f'<li><a href="{prefix}tutorials/{page}">{html.escape(title)}</a></li>' for page, title in tutorials]
    items.append('<li class="nav-head">Reference</li>')
    items += [f'<li><a href="{prefix}{page}">{html.escape(title)}</a></li>' for page, _, title in DOC_PAGES[2:]]
    items.append(f'<li><a href="{prefix}api.html">API reference</a></li>')
    return "<ul>" + "".join(items) + "</ul>"


def page(title: str, body: str, tutorials, prefix: str = "") -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · minilora course</title>
<link rel="stylesheet" href="{prefix}site.css">
<link rel="stylesheet" href="{prefix}pygments.css">
</head>
<body>
<nav class="sidebar"><p class="brand"><a href="{prefix}index.html">minilora</a></p>{_nav(tutorials, prefix)}</nav>
<main>
{body}
</main>
</body>
</html>
"""


def markdown_to_html(text: str) -> str:
    import mistune

    md = mistune.create_markdown(escape=False, plugins=["table", "strikethrough"])
    out = md(text)
    # links between the docs pages and to the tutorials point at their rendered pages
    out = re.sub(r'href="(?:\.\./docs/|docs/)?([a-z_]+)\.md(#[a-z0-9-]+)?"', r'href="\1.html\2"', out)
    out = re.sub(r'href="(?:\.\./)?tutorials/(\d\d_[a-z_0-9]+)\.py"', r'href="tutorials/\1.html"', out)
    return _heading_ids(out)


def _slug(text: str) -> str:
    """'Capstone: DoRA's backward' -> 'capstone-doras-backward': the id of a heading, as GitHub makes it."""
    plain = re.sub(r"<[^>]+>", "", html.unescape(text)).lower().replace("'", "").replace("’", "")
    return re.sub(r"[^a-z0-9]+", "-", plain).strip("-")


def _heading_ids(out: str) -> str:
    """Give every <h2>/<h3> without an id one made from its text, so a page's sections can be linked."""
    return re.sub(r"<(h[23])>(.*?)</\1>", lambda m: f'<{m.group(1)} id="{_slug(m.group(2))}">{m.group(2)}</{m.group(1)}>',
                  out)


def tutorial_links(body: str) -> str:
    """Links of a tutorial page: ``03_x.py`` -> ``03_x.html``, ``../docs/name.md#part`` -> ``../name.html#part``."""
    body = re.sub(r'href="(\d\d_[a-z_0-9]+)\.py"', r'href="\1.html"', body)
    return re.sub(r'href="\.\./docs/([a-z_]+)\.md(#[a-z0-9-]+)?"', r'href="../\1.html\2"', body)


# ----------------------------------------------------------------------------- tutorials
def execute_tutorial(path: str, timeout: int, env: dict | None = None) -> tuple[object, float]:
    """The tutorial as an executed notebook (nbformat node) and the seconds it took.

    The kernel gets this process's environment updated with ``env``, and ``MINILORA_OUT`` set to a
    temporary folder (the figures are embedded in the outputs). A cell that raises raises
    ``nbclient.exceptions.CellExecutionError`` here, with the cell and its traceback.
    """
    import jupytext
    import nbclient

    notebook = jupytext.read(path)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    from traitlets.config import Config

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minilora-site-") as work:
        # IPC (Unix sockets beside the connection file) rather than TCP: nothing listens on a port,
        # and the kernel has no "running over TCP without encryption" warning to print
        config = Config({"KernelManager": {"transport": "ipc"}})
        client = nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3", config=config,
                                         resources={"metadata": {"path": REPO}})
        env = {**os.environ, **(env or {}), "MINILORA_OUT": work,  # figures are embedded in the outputs
               "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)}
        client.execute(env=env)
    return notebook, time.perf_counter() - start


def _notebook_title(notebook, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", cell.source, re.MULTILINE)
            if m:
                return m.group(1).strip()
    return fallback


def notebook_body(notebook) -> str:
    from nbconvert import HTMLExporter

    widget = "application/vnd.jupyter.widget-view+json"  # a live widget: its static HTML needs jQuery from a CDN
    notebook.metadata.pop("widgets", None)  # the widget state, stored as a <script> block
    for cell in notebook.cells:
        if cell.get("outputs"):
            cell.outputs = [o for o in cell.outputs if widget not in o.get("data", {})]
    exporter = HTMLExporter(template_name="basic")
    exporter.exclude_input_prompt = True
    exporter.exclude_output_prompt = True
    body, _ = exporter.from_notebook_node(notebook)
    return f'<div class="notebook">{tutorial_links(body)}</div>'


# ----------------------------------------------------------------------------- API reference
def _doc(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return f"<pre class=\"doc\">{html.escape(doc)}</pre>" if doc else ""


def _signature(obj) -> str:
    try:
        return html.escape(str(inspect.signature(obj)))
    except (TypeError, ValueError):
        return ""


def api_reference() -> str:
    parts = ["<h1>API reference</h1>",
             "<p>Read from the docstrings of the installed package (the same text as <code>help()</code>).</p>"]
    toc = []
    for name in API_MODULES:
        module = importlib.import_module(name)
        anchor = name.replace(".", "-")
        toc.append(f'<li><a href="#{anchor}"><code>{name}</code></a></li>')
        parts.append(f'<section class="api-module"><h2 id="{anchor}"><code>{name}</code></h2>{_doc(module)}')
        public = getattr(module, "__all__", None)
        if public is None:
            public = [n for n, v in vars(module).items() if not n.startswith("_")
                      and (inspect.isfunction(v) or inspect.isclass(v)) and getattr(v, "__module__", "") == name]
        for member in public:
            obj = getattr(module, member, None)
            if obj is None or inspect.ismodule(obj) or not (inspect.isclass(obj) or callable(obj)):
                continue
            kind = "class" if inspect.isclass(obj) else "def"
            parts.append(f'<div class="api-item"><h3 id="{anchor}-{member}"><code>{kind} {member}{_signature(obj)}'
                         f'</code></h3>{_doc(obj)}')
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if meth_name.startswith("_") or not (inspect.isfunction(meth) or isinstance(meth, property)):
                        continue
                    target = meth.fget if isinstance(meth, property) else meth
                    sig = "" if isinstance(meth, property) else _signature(target)
                    doc = inspect.getdoc(target)
                    if doc:
                        parts.append(f'<div class="api-method"><h4><code>{member}.{meth_name}{sig}</code></h4>'
                                     f'{_doc(target)}</div>')
            parts.append("</div>")
        parts.append("</section>")
    parts.insert(2, "<ul class=\"toc\">" + "".join(toc) + "</ul>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- exercises
def _check_text(check) -> str:
    """A check's docstring without the hint_level note, as HTML (``code`` -> <code>)."""
    doc = (inspect.getdoc(check) or "").split("hint_level:")[0].strip()
    escaped = html.escape(re.sub(r"\s*\n\s*", " ", doc))
    return re.sub(r"``(.+?)``", r"<code>\1</code>", escaped)


def exercises_body(tutorials: list[tuple[str, str]]) -> str:
    """Every exercise of the course: id, tutorial, what you write, what its check compares, the paper.

    Read from ``minilora.exercises`` (the same registry the checks use); no solution is on it.
    """
    from minilora import exercises as ex

    pages = {page[:2]: (page, title) for page, title in tutorials}
    rows = []
    for exercise in ex.exercises():
        page, title = pages.get(exercise.id[:2], (None, exercise.id[:2]))
        where = f'<a href="tutorials/{page}">{html.escape(title)}</a>' if page else html.escape(title)
        rows.append(f"<tr><td><b>{exercise.id}</b></td><td>{where}</td><td>{html.escape(exercise.title)}<br>"
                    f"<code>{exercise.check}(your_function)</code></td>"
                    f"<td>{_check_text(getattr(ex, exercise.check))}</td><td>{html.escape(exercise.paper)}</td></tr>")
    return f"""<h1>Exercises</h1>
<p>All {len(rows)} exercises of the course. Each sits at the end of its tutorial as a stub that raises
<code>NotImplementedError</code>, followed by its check: write the function, run the cell. A right answer
prints ✓. A wrong one gets a diagnosis of <i>your</i> answer first (which entries differ and what that
usually means), then a hint; <code>show_hint("02.1", 2)</code> or <code>check_dA(my_dA, hint_level=2)</code>
gives the formula, and <code>show_solution("02.1")</code> a solution. No check prints the answer to a
wrong attempt, and no page of this site shows a solution.</p>
<p>The <a href="lab.html">2-hour lab</a> picks the exercises for one session.</p>
<table class="exercises">
<thead><tr><th>id</th><th>tutorial</th><th>you write</th><th>what the check does</th><th>the paper</th></tr></thead>
<tbody>
{"".join(rows)}
</tbody>
</table>
"""


# ----------------------------------------------------------------------------- index
def index_body(tutorials: list[tuple[str, str]], fast: bool) -> str:
    rows = "".join(f'<li><a href="tutorials/{p}">{html.escape(t)}</a></li>' for p, t in tutorials)
    mode = ('<p class="notice">This site was built in <b>fast mode</b> (<code>MINILORA_FAST=1</code>): a smoke '
            "build with a few training steps, so the numbers and curves in it mean nothing. "
            "<code>make docs</code> builds it in full mode.</p>") if fast else ""
    return f"""<h1>Learn LoRA by building it</h1>
{mode}
<p>A course on <i>LoRA: Low-Rank Adaptation of Large Language Models</i> (Hu et al. 2021,
arXiv 2106.09685) built on <b>minilora</b>: an autograd engine on NumPy, a tiny GPT-2 whose backward
passes are written by hand, and the LoRA layer h = W₀x + (α/r)·B·A·x. Every tutorial below was
executed to build this page: the outputs and figures are the ones the code produced.</p>
<p>Start with the <a href="syllabus.html">syllabus</a>: learning objectives, prerequisites, the time each
tutorial takes, questions to answer before you run a cell, and the capstone. Teaching one session?
<a href="lab.html">A 2-hour lab</a> is a path through the course for one sitting, and the
<a href="exercises.html">exercises page</a> lists all exercises and what each check does.</p>
<h2>Tutorials</h2>
<ol class="tutorials">{rows}</ol>
<h2>Reference</h2>
<ul>
<li><a href="paper_map.html">Paper map</a>: each equation, table and figure of the paper → the code and the tutorial that shows it</li>
<li><a href="results.html">Results</a>: the paper's experiments in miniature</li>
<li><a href="performance.html">Performance</a>: timings of this machine</li>
<li><a href="api.html">API reference</a>: the docstrings</li>
</ul>
<p>Run a tutorial yourself, in a virtual environment (<code>python3 -m venv .venv &amp;&amp; . .venv/bin/activate</code>):
<code>pip install -e '.[notebook]'</code>, then
<code>jupytext --to notebook tutorials/01_autograd.py &amp;&amp; jupyter lab tutorials/01_autograd.ipynb</code>.</p>
"""


# ----------------------------------------------------------------------------- build
def build(out: str, only: list[str] | None = None, jobs: int = 1, timeout: int = 900,
          notebooks: str | None = None) -> dict:
    """Build the site into ``out``; returns {tutorial: seconds}.

    ``notebooks``: a folder to also write the executed notebooks to (``NN_name.ipynb``).
    """
    from pygments.formatters import HtmlFormatter

    fast = os.environ.get("MINILORA_FAST", "").strip() not in ("", "0")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would be stored as kilobytes of redraws
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "tutorials"))
    shutil.copy(os.path.join(HERE, "site.css"), os.path.join(out, "site.css"))
    with open(os.path.join(out, "pygments.css"), "w", encoding="utf-8") as f:
        f.write(HtmlFormatter(style="default").get_style_defs(".highlight"))
    if os.path.isdir(os.path.join(HERE, "figures")):
        shutil.copytree(os.path.join(HERE, "figures"), os.path.join(out, "figures"))

    paths = tutorial_files(only)
    timings: dict[str, float] = {}
    executed: dict[str, object] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(execute_tutorial, p, timeout): p for p in paths}
        for future in concurrent.futures.as_completed(futures):
            path = futures[future]
            notebook, seconds = future.result()
            executed[path] = notebook
            if notebooks:
                import nbformat

                os.makedirs(notebooks, exist_ok=True)
                stem = os.path.splitext(os.path.basename(path))[0]
                nbformat.write(notebook, os.path.join(notebooks, stem + ".ipynb"))
            timings[os.path.basename(path)] = seconds
            print(f"executed {os.path.basename(path)} in {seconds:.1f} s", flush=True)
    tutorials = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        tutorials.append((stem + ".html", _notebook_title(executed[path], stem)))
    for path, (page_name, title) in zip(paths, tutorials):
        body = notebook_body(executed[path])
        if fast:
            body = ('<p class="notice">Built in fast mode: a few training steps, so the numbers and curves '
                    "on this page mean nothing.</p>") + body
        with open(os.path.join(out, "tutorials", page_name), "w", encoding="utf-8") as f:
            f.write(page(title, body, tutorials, prefix="../"))

    for page_name, source, title in DOC_PAGES:
        with open(os.path.join(HERE, source), encoding="utf-8") as f:
            body = markdown_to_html(f.read())
        with open(os.path.join(out, page_name), "w", encoding="utf-8") as f:
            f.write(page(title, body, tutorials))
    with open(os.path.join(out, "exercises.html"), "w", encoding="utf-8") as f:
        f.write(page("Exercises", exercises_body(tutorials), tutorials))
    with open(os.path.join(out, "api.html"), "w", encoding="utf-8") as f:
        f.write(page("API reference", api_reference(), tutorials))
    with open(os.path.join(out, "index.html"), "w", encoding="utf-8") as f:
        f.write(page("Learn LoRA by building it", index_body(tutorials, fast), tutorials))
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "site"), help="output folder (default: site/)")
    parser.add_argument("--only", default="", help="comma-separated tutorial numbers, e.g. 01,02 (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="tutorials executed at once (default 1)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per notebook cell (default 900)")
    parser.add_argument("--notebooks", default=None, help="also write the executed notebooks (.ipynb) here")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    start = time.perf_counter()
    timings = build(args.out, [s.strip() for s in args.only.split(",") if s.strip()] or None, args.jobs, args.timeout,
                    notebooks=args.notebooks)
    print(f"site built in {time.perf_counter() - start:.1f} s ({len(timings)} tutorials): "
          f"{os.path.join(args.out, 'index.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
