"""The course site, built in fast mode and opened in a real (headless) Chromium.

``docs/build_site.py`` executes every tutorial and renders the site; this test takes the run's
fast-mode build (``MINILORA_FAST=1``, tests/sitebuild.py, shared with test_tutorials.py) and opens every page in Debian's ``chromium`` through the
DevTools protocol over a pipe (``--remote-debugging-pipe``: no port, no extra package). For each
page: no console error, no uncaught exception, no failed resource load; every ``<img>`` decoded
(naturalWidth > 0); a screenshot that is not blank; no reference to anything on the network.
Each tutorial page shows the figures its script promises (tests/test_tutorials.py's FIGURES).
The course reads in order: every tutorial's "Next:" is a link to the next page (09's to the
syllabus's capstone). The exercises page lists every exercise, the lab's minutes add up to at
most two hours, no page shows a solution or an answer of the teacher's key, and the build log
carries no warning.

The browser test is skipped, with the reason, when no Chromium is installed (``apt-get install
chromium``; .ci/run installs it); every test is, when the docs extra (nbclient, nbconvert,
ipykernel, jupytext) is missing.
"""

import base64
import glob
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from sitebuild import fast_site  # noqa: E402,F401  (a fixture: one fast-mode build per run)
from test_tutorials import FIGURES  # noqa: E402


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = _chromium()
pytestmark = pytest.mark.slow
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (Debian: apt-get install chromium)")


class Browser:
    """Headless Chromium driven by the DevTools protocol over fds 3/4 (JSON messages ended by NUL)."""

    def __init__(self, executable, profile):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def wire_fds():  # in the child: the pipe ends become fds 3 (commands in) and 4 (events out)
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_fds, pass_fds=(3, 4))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events = []

    def _read_message(self, deadline):
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method, params=None, session=None, timeout=60.0):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_for(self, method, session, timeout=60.0):
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method and event.get("sessionId") == session:
                return event
            self.events.append(event)

    def open(self, url, width=1280, height=1000):
        """Load ``url`` in a new tab; returns (target, session, errors seen while loading)."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.send(domain, session=session)
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=session)
        self.wait_for("Page.loadEventFired", session)
        errors = []
        for event in self.events:
            if event.get("sessionId") != session:
                continue
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                errors.append(f"{params['entry'].get('text')} {params['entry'].get('url', '')}")
        return target, session, errors

    def evaluate(self, session, expression):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=session)
        return result["result"].get("value")

    def screenshot(self, session):
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"])

    def close(self):
        try:
            self.send("Browser.close", timeout=10)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


@pytest.fixture(scope="module")
def site(fast_site):  # noqa: F811 (the fixture imported above)
    print(f"fast-mode site build: {fast_site['seconds']:.0f} s")
    return fast_site["site"]


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="minilora-chromium-")
    b = Browser(CHROMIUM, profile)
    yield b
    b.close()
    shutil.rmtree(profile, ignore_errors=True)


def _pages(site):
    return sorted(glob.glob(os.path.join(site, "*.html")) + glob.glob(os.path.join(site, "tutorials", "*.html")))


def test_site_has_every_page(site):
    names = {os.path.relpath(p, site) for p in _pages(site)}
    for expected in ("index.html", "syllabus.html", "lab.html", "exercises.html", "paper_map.html", "results.html",
                     "performance.html", "api.html"):
        assert expected in names
    for tutorial in FIGURES:
        assert f"tutorials/{tutorial[:-3]}.html" in names, f"{tutorial} has no page"


def test_pages_fetch_nothing_from_the_network(site):
    for path in _pages(site):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        remote = re.findall(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//[^"'\s>]+""", text)
        assert not remote, f"{os.path.relpath(path, site)} loads from the network: {remote[:3]}"
        assert "@import" not in text and "<script" not in text, f"{os.path.relpath(path, site)} has a script"


@needs_chromium
def test_every_page_renders_in_chromium(site, browser):
    from PIL import Image

    for path in _pages(site):
        name = os.path.relpath(path, site)
        target, session, errors = browser.open("file://" + path)
        assert not errors, f"{name}: console errors {errors}"
        images = browser.evaluate(session, "Array.from(document.images).map(i => ({src: i.src.slice(0, 60), "
                                           "ok: i.complete && i.naturalWidth > 0}))")
        broken = [i["src"] for i in images if not i["ok"]]
        assert not broken, f"{name}: images that did not load: {broken}"
        text = browser.evaluate(session, "document.body.innerText.length")
        assert text > 200, f"{name}: almost no text ({text} characters)"
        shot = Image.open(io.BytesIO(browser.screenshot(session))).convert("L")
        lo, hi = shot.getextrema()
        distinct = len(shot.histogram()) - shot.histogram().count(0)
        assert hi - lo > 100 and distinct > 20, f"{name}: the screenshot is blank ({lo}..{hi}, {distinct} grey levels)"
        if name.startswith("tutorials/"):
            stem = os.path.basename(name)[:-5]
            promised = len(FIGURES[stem + ".py"])
            figures = browser.evaluate(session, "Array.from(document.querySelectorAll('.output_area img'))"
                                                ".filter(i => i.naturalWidth > 200 && i.naturalHeight > 100).length")
            assert figures >= promised, f"{name}: shows {figures} figures, its script promises {promised}"
            exceptions = browser.evaluate(session, "document.querySelectorAll('.output_stderr').length")
            body = browser.evaluate(session, "document.body.innerText")
            assert "Traceback" not in body, f"{name}: a cell raised ({exceptions} stderr outputs)"
        browser.send("Target.closeTarget", {"targetId": target})


def _read(site, name):
    with open(os.path.join(site, name), encoding="utf-8") as f:
        return f.read()


def test_next_links_walk_the_course_in_order(site):
    names = sorted(FIGURES)
    for i, tutorial in enumerate(names):
        text = _read(site, f"tutorials/{tutorial[:-3]}.html")
        links = re.findall(r'Next:</strong>\s*<a href="([^"]+)"', text)
        expected = (f"{names[i + 1][:-3]}.html" if i + 1 < len(names)
                    else "../syllabus.html#capstone-doras-backward-derived-and-gradchecked")
        assert links == [expected], f"{tutorial}: Next links to {links}, expected {expected}"
        target, _, anchor = expected.partition("#")
        linked = _read(site, os.path.normpath(os.path.join("tutorials", target)))
        assert not anchor or f'id="{anchor}"' in linked, f"{target} has no section #{anchor}"
    assert "end of the course" not in _read(site, "tutorials/07_gpu.html")


def test_exercises_page_lists_every_exercise_and_no_solution(site):
    from minilora import exercises as ex

    text = _read(site, "exercises.html")
    pages = {name[:2]: f'href="tutorials/{name[:-3]}.html"' for name in FIGURES}
    for exercise in ex.exercises():
        assert f"<b>{exercise.id}</b>" in text and exercise.check in text
        assert html.escape(exercise.paper) in text and pages[exercise.id[:2]] in text
        assert exercise.solution.splitlines()[0] not in text  # its `def solution_...(...)` line


def test_no_student_page_shows_the_teachers_key(site):
    from minilora import exercises as ex
    from minilora.exercises.key import PREDICT

    for path in _pages(site):
        text = html.unescape(_read(site, os.path.relpath(path, site)))
        name = os.path.relpath(path, site)
        for exercise in ex.exercises():
            assert exercise.solution.splitlines()[0] not in text, f"{name} shows the solution of {exercise.id}"
        for _, _, answer in PREDICT:
            assert answer[:60] not in text, f"{name} shows an answer of the teacher's key"


def test_lab_fits_two_hours_and_names_real_exercises(site):
    from minilora import exercises as ex

    with open(os.path.join(REPO, "docs", "lab.md"), encoding="utf-8") as f:
        lab = f.read()
    rows = [line.split("|") for line in lab.splitlines() if re.match(r"\|\s*\d+\s*\|\s*\d+\s*\|", line)]
    minutes = [int(row[2]) for row in rows]
    total = re.search(r"\|\s*\|\s*\*\*(\d+)\*\*\s*\|", lab)
    assert len(rows) >= 5 and total and sum(minutes) == int(total.group(1)) <= 120, minutes
    ids = {e.id for e in ex.exercises()}
    named = set(re.findall(r"\b(\d\d\.\d)\b", lab.split("## Machine time")[0]))  # not the seconds below
    assert named and named <= ids, named - ids
    text = _read(site, "lab.html")
    assert 'href="exercises.html"' in text and 'href="tutorials/02_lora_layer.html"' in text


def test_the_build_log_has_no_warning(fast_site):  # noqa: F811 (the fixture imported above)
    log = fast_site["log"]
    assert "without encryption" not in log and "arning" not in log and "*****" not in log, log[-3000:]


def test_tutorial_08_compares_with_peft_when_it_is_installed(site):
    for module in ("torch", "transformers", "peft"):
        pytest.importorskip(module, reason=f"{module} is not installed (the docs extra installs it)")
    text = _read(site, "tutorials/08_to_peft.html")
    assert "PEFT vs minilora logits: max |difference|" in text
    outputs = re.findall(r'<div class="output[^"]*">(.*?)</div>', text, re.S)
    assert not any("skipped: torch" in o for o in outputs)


def test_make_docs_reuses_an_active_virtual_environment(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")  # an existing venv: make has nothing to build for it

    def plan(**env):
        base = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "DOCS_VENV", "TORCH_INDEX")}
        return subprocess.run(["make", "-n", "docs"], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                              check=True).stdout

    active = plan(VIRTUAL_ENV=str(tmp_path))
    assert f"{tmp_path}/bin/python -m pip install --quiet --quiet" in active and "-m venv" not in active
    assert f"{tmp_path}/bin/python docs/build_site.py" in active
    assert ".venv/bin/python -m pip install --quiet" in plan(VIRTUAL_ENV="")
    cpu = plan(VIRTUAL_ENV=str(tmp_path), TORCH_INDEX="https://download.pytorch.org/whl/cpu")
    assert "--extra-index-url https://download.pytorch.org/whl/cpu -e '.[docs]'" in cpu


def test_the_docs_extra_holds_what_the_pages_need():
    """The docs extra alone builds every page: PEFT's comparison runs, and no kernel warns about widgets."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11's")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        docs = tomllib.load(f)["project"]["optional-dependencies"]["docs"]
    names = {re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0] for requirement in docs}
    assert {"jupytext", "nbclient", "nbconvert", "ipykernel", "matplotlib", "ipywidgets",
            "torch", "transformers", "peft"} <= names, names
    assert "torch==2.13.0" in docs
