"""mkdocs hook: the notebooks in ``notebooks/`` as pages of the site, with their stored outputs.

``docs/notebooks`` is a link to ``../notebooks``, so every ``notebooks/*.ipynb`` is a page (rendered by
mkdocs-jupyter, which does not execute it: the outputs are the ones stored in the file, see
``notebooks/README.md``, the section's index page). mkdocs rewrites and checks links only in Markdown pages, so for
a notebook page this hook

* rewrites links to the docs written as they work on a code host, ``../docs/<page>.md#anchor``, into the
  page's URL on the site, and fails the build (an error, so also under ``mkdocs build -q``) for a link to a
  missing page;
* records the page's anchors, so that mkdocs also checks links *into* a notebook
  (``notebooks/00_quickstart.ipynb#2-three-optimizers-in-optaxchain`` from a Markdown page);
* fails the build for a notebook page without any stored output (a notebook committed without running
  ``make notebook-outputs``).

``notebooks/README.md`` gets the same ``../docs/`` links rewritten.
"""

from __future__ import annotations

import re

from mkdocs.plugins import get_plugin_logger
from mkdocs.utils import get_relative_url

log = get_plugin_logger(__name__)

_DOCS_LINK = re.compile(r'href="(?:\.\./)+docs/([^"#]+\.md)(#[^"]*)?"')
_MD_DOCS_LINK = re.compile(r"\]\(\.\./docs/")
_ID = re.compile(r'\sid="([^"]+)"')
_OUTPUT = re.compile(r'class="[^"]*\bjp-OutputArea-output\b')  # an output cell (the page's CSS names it too)


def on_page_markdown(markdown, page, config, files):
    """``notebooks/README.md`` (the section's index page) links to the docs as ``../docs/<page>.md`` too."""
    if page.file.src_uri.startswith("notebooks/"):
        return _MD_DOCS_LINK.sub("](../", markdown)
    return markdown


def on_page_content(html, page, config, files):
    if not page.file.src_uri.endswith(".ipynb"):
        return html
    page.present_anchor_ids = set(_ID.findall(html))
    if not _OUTPUT.search(html):
        log.error("%s has no stored outputs: run `make notebook-outputs` and commit it", page.file.src_uri)

    def rewrite(match):
        target = files.get_file_from_path(match.group(1))
        if target is None or not target.is_documentation_page():
            log.error("%s links to %s, which is not a page of the docs", page.file.src_uri, match.group(0))
            return match.group(0)
        return f'href="{get_relative_url(target.url, page.file.url)}{match.group(2) or ""}"'

    return _DOCS_LINK.sub(rewrite, html)
