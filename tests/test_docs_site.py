"""The documentation site (docs/): built with warnings as errors, every page opened in headless Chromium.

The build runs the README's command into a temporary folder (FLOWPP_DOCS_BUILT=<html dir> checks an
existing build instead). Each page is then loaded from disk, with no host name resolving, and
:func:`check_page` lists what a reader would see broken: math left as TeX, images that did not load,
errors in the browser console, internal links to files or anchors that do not exist. A screenshot of
the first tutorial is written to docs/_build/screenshots/tutorial.png and to the test's tmp folder.
Needs the ``docs`` extra (Sphinx, myst-nb, sphinx-mathjax-offline, selenium) and Debian's
chromium + chromium-driver; without them the tests skip and say what is missing.
"""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT = ROOT / "docs" / "_build" / "screenshots" / "tutorial.png"
BUILD_ARGS = ["-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs"]   # + the output folder

# TeX that MathJax should have replaced: $$, \( \) \[ \], \begin{...}, and $...$ around non-blank text.
RAW_TEX = re.compile(r"\$\$|\\[()\[\]]|\\begin\{|(?<![\\\w$])\$(?=[^\s$])[^$\n]{1,200}(?<=[^\s\\$])\$(?![\w$])")


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """(returncode, log, html folder) of one build, shared by the tests of this module."""
    given = os.environ.get("FLOWPP_DOCS_BUILT")
    if given:
        return 0, f"(FLOWPP_DOCS_BUILT={given}: not rebuilt)", Path(given).resolve()
    missing = [m for m in ("sphinx", "myst_nb", "sphinx-mathjax-offline") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (python -m pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("docs") / "html"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *BUILD_ARGS, str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    print(f"docs build: {time.perf_counter() - t0:.1f} s, exit {proc.returncode}")
    return proc.returncode, proc.stdout + proc.stderr, out


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by the system chromedriver (Selenium Manager is never consulted).

    No host name resolves, so anything the site fetched from the network (a MathJax CDN, web fonts)
    fails and shows up as a console error."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (python -m pip install -e '.[docs]')")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.isfile(p)]
    if missing:
        pytest.skip(f"{' and '.join(missing)} missing (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND"):     # no host resolves: the network is off
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_script_timeout(30)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


# ------------------------------------------------------------------ the checks of one page

_WAIT_FOR_MATHJAX = """
const done = arguments[arguments.length - 1];
const deadline = Date.now() + 20000;
(function poll() {
  const mj = window.MathJax;
  if (mj && mj.startup && mj.startup.promise) {
    mj.startup.promise.then(() => done('typeset'), (e) => done('error: ' + e));
  } else if (Date.now() > deadline || (!mj && document.readyState === 'complete')) {
    done(mj ? 'MathJax did not start within 20 s' : 'no MathJax');
  } else {
    setTimeout(poll, 50);
  }
})();
"""

# Visible text outside code, scripts and rendered math, one string per text node.
_VISIBLE_TEXT = """
const skip = 'pre, code, script, style, textarea, mjx-container, .highlight';
const out = [];
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  const el = n.parentElement;
  if (!el || el.closest(skip) || !n.textContent.trim()) continue;
  if (el.getClientRects().length === 0) continue;
  out.push(n.textContent);
}
return out;
"""

_MATH_AND_IMAGES = """
const math = [...document.querySelectorAll('.math')];
return {
  math: math.length,
  unrendered: math.filter(m => !m.querySelector('mjx-container')).map(m => m.textContent.slice(0, 80)),
  tex_errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error') || e.textContent),
  undefined_macros: [...document.querySelectorAll('mjx-assistive-mml mtext[mathcolor="red"]')].map(e => e.textContent),
  broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')),
  links: [...document.querySelectorAll('a[href]')].map(a => [a.getAttribute('href'), a.href]),
  ids: [...document.querySelectorAll('[id], a[name]')].map(e => e.id || e.getAttribute('name')),
};
"""

_ANCHORS = {}


def _anchors_of(path: Path):
    """The ids and names an HTML file defines (read once per file)."""
    if path not in _ANCHORS:
        text = path.read_text(encoding="utf-8", errors="replace")
        _ANCHORS[path] = set(re.findall(r"""\s(?:id|name)=["']([^"']+)["']""", text))
    return _ANCHORS[path]


def _link_problem(href: str, resolved: str, site: Path, ids: set):
    """Why a link (``href`` as written, ``resolved`` by the browser) is dead, or None.

    ``ids`` are the anchors of the page it is on. External (http, mailto, ...) links are not followed."""
    url = urlparse(resolved)
    if url.scheme != "file":
        return None
    if href.startswith("#"):
        frag = unquote(href[1:])
        return None if not frag or frag in ids else f"anchor {href!r} not on the page"
    target = Path(unquote(url.path))
    if site not in target.parents and target != site:
        return f"{href!r} leaves the site ({target})"
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{href!r}: {target.relative_to(site)} does not exist"
    frag = unquote(url.fragment)
    if frag and target.suffix == ".html" and frag not in _anchors_of(target):
        return f"{href!r}: no anchor {frag!r} in {target.relative_to(site)}"
    return None


def check_page(driver, page: Path, site: Path):
    """Load ``page`` and return its problems (empty when the page is fine), one string each.

    * math: once MathJax is done, every ``.math`` element Sphinx wrote holds an ``mjx-container``
      (MathJax's output), none shows a TeX error or an undefined macro (MathJax draws them in red),
      and no TeX delimiters ($...$, $$, \\( \\), \\[ \\], \\begin{) remain in the visible text outside
      code: catches a missing or unreachable MathJax, markdown math that the MyST extensions did not
      turn into math, and formulas MathJax could not parse;
    * images: every ``<img>`` is complete with a natural width: catches outputs or figures not copied;
    * console: no SEVERE message (script errors, resources that failed to load, e.g. a CDN offline);
    * links: every link inside the site points to an existing file, and to an existing anchor.
    """
    driver.get_log("browser")                                  # drop what earlier pages left
    driver.get(page.as_uri())
    problems = []
    status = driver.execute_async_script(_WAIT_FOR_MATHJAX)
    info = driver.execute_script(_MATH_AND_IMAGES)
    if info["math"] and status != "typeset":
        problems.append(f"math: {info['math']} math elements but MathJax: {status}")
    if info["unrendered"]:
        problems.append(f"math: {len(info['unrendered'])} not rendered, first {info['unrendered'][0]!r}")
    for err in info["tex_errors"]:
        problems.append(f"math: TeX error {err!r}")
    for macro in info["undefined_macros"]:
        problems.append(f"math: undefined TeX macro {macro!r}")
    for text in driver.execute_script(_VISIBLE_TEXT):
        m = RAW_TEX.search(text)
        if m:
            problems.append(f"raw TeX in visible text: {text[max(0, m.start() - 30):m.end() + 30]!r}")
    for src in info["broken_images"]:
        problems.append(f"image not loaded: {src}")
    for entry in driver.get_log("browser"):
        if entry["level"] == "SEVERE":
            problems.append(f"console: {entry['message']}")
    ids = set(info["ids"])
    for href, resolved in info["links"]:
        why = _link_problem(href, resolved, site, ids)
        if why:
            problems.append(f"link {why}")
    return problems


# ------------------------------------------------------------------ the screenshot

# Scroll to the first figure with typeset math at most 550 px above it (display math preferred).
_SCROLL_TO_MATH_AND_FIGURE = """
const top = e => e.getBoundingClientRect().top + window.scrollY;
const images = [...document.querySelectorAll('.body img')].map(top);
for (const [sel, what] of [['mjx-container[display="true"]', 'display math'], ['mjx-container', 'inline math']]) {
  const maths = [...document.querySelectorAll(sel)].map(top);
  for (const y of images) {
    const above = maths.filter(m => m < y && y - m < 550);
    if (above.length) { window.scrollTo(0, Math.max(0, Math.min(...above) - 60)); return what + ' and a figure'; }
  }
}
const first = document.querySelector('mjx-container');
if (first) { window.scrollTo(0, top(first) - 60); return 'math, no figure near it'; }
return 'top of page';
"""


def _screenshot(driver, page: Path, tmp_path: Path):
    driver.get(page.as_uri())
    driver.execute_async_script(_WAIT_FOR_MATHJAX)
    where = driver.execute_script(_SCROLL_TO_MATH_AND_FIGURE)
    time.sleep(0.3)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(SCREENSHOT)), "screenshot failed"
    shutil.copy(SCREENSHOT, tmp_path / SCREENSHOT.name)
    print(f"screenshot of {page.name} ({where}): {SCREENSHOT} and {tmp_path / SCREENSHOT.name}")
    return driver.execute_script("return document.querySelectorAll('mjx-container').length")


# ------------------------------------------------------------------ tests


def test_docs_build_passes_with_warnings_as_errors(built_site):
    """The README's build command exits 0: no Sphinx, docutils, MyST or notebook warning anywhere."""
    rc, log, _ = built_site
    assert rc == 0, f"sphinx build failed (exit {rc}):\n{log[-6000:]}"


def test_every_page_renders_in_chromium(built_site, browser, tmp_path):
    """Every built page passes :func:`check_page`; pages with math show it typeset; a screenshot is kept."""
    rc, _, site = built_site
    if rc != 0:
        pytest.fail("the build failed (see test_docs_build_passes_with_warnings_as_errors)")
    pages = sorted(p for p in site.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)
    tutorials = sorted(site.glob("tutorials/*.html"))
    assert tutorials, "no tutorial page was built"
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file(), "MathJax is not served from the site"
    failures = {}
    for page in pages:
        problems = check_page(browser, page, site)
        if problems:
            failures[str(page.relative_to(site))] = problems[:10]
    assert not failures, "\n".join(f"{p}:\n  " + "\n  ".join(v) for p, v in failures.items())
    n_math = _screenshot(browser, tutorials[0], tmp_path)
    assert n_math > 0, f"{tutorials[0].name} shows no typeset math"


def test_check_page_reports_broken_pages(browser, tmp_path):
    """The checks can fail: a hand-made page with raw TeX, unrendered math, a broken image, a script
    from the network, a dead link and a missing anchor gets each reported, while the same TeX inside
    <pre> and <code> and an external link are left alone."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "ok.html").write_text('<html><body><p id="here">target</p></body></html>')
    page = site / "broken.html"
    page.write_text("""<html><head><script src="https://cdn.example.org/mathjax/tex-chtml.js"></script></head><body>
      <p>inline math left raw: $x^2$ here</p>
      <span class="math notranslate nohighlight">\\(y\\)</span>
      <pre>code keeps $z$ and \\(w\\)</pre> <code>$$v$$</code>
      <img src="missing.png" alt="gone">
      <a href="nowhere.html">dead</a> <a href="ok.html#here">fine</a> <a href="ok.html#gone">no anchor</a>
      <a href="https://www.python.org/">external, not followed</a>
    </body></html>""")
    problems = check_page(browser, page, site)
    text = "\n".join(problems)
    assert "raw TeX in visible text: 'inline math left raw: $x^2$ here'" in text, text
    assert "math: 1 not rendered" in text, text
    assert "image not loaded: missing.png" in text, text
    assert re.search(r"console: .*missing\.png", text), text
    assert re.search(r"console: .*cdn\.example\.org", text), text      # a script from the network is refused
    assert "'nowhere.html': nowhere.html does not exist" in text, text
    assert "no anchor 'gone' in ok.html" in text, text
    assert "$z$" not in text and "(w" not in text and "$$v" not in text and "python.org" not in text, text


def test_check_page_reports_tex_errors(browser, tmp_path):
    """A formula MathJax cannot typeset (an undefined macro, a TeX syntax error) is reported, a valid
    one is not; MathJax is loaded from the sphinx-mathjax-offline package that the site serves."""
    spec = importlib.util.find_spec("sphinx-mathjax-offline")
    if spec is None:
        pytest.skip("sphinx-mathjax-offline is not installed (python -m pip install -e '.[docs]')")
    mathjax = Path(spec.submodule_search_locations[0]) / "static" / "mathjax" / "tex-chtml.js"
    page = tmp_path / "tex.html"
    page.write_text(f"""<html><head>
      <script>window.MathJax = {{options: {{processHtmlClass: "math"}}}}</script>
      <script defer src="{mathjax.as_uri()}"></script></head><body class="tex2jax_ignore">
      <span class="math">\\(\\alpha + \\beta\\)</span> <span class="math">\\(\\undefinedmacro x\\)</span>
      <span class="math">\\(x^{{2}}_{{1}}^{{3}}\\)</span>
    </body></html>""")
    problems = check_page(browser, page, tmp_path)
    text = "\n".join(problems)
    assert "math: undefined TeX macro '\\\\undefinedmacro'" in text, text
    assert "math: TeX error 'Double exponent: use braces to clarify'" in text, text
    assert len(problems) == 2, text
