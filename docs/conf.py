"""Sphinx configuration of the companion site (built by ``python -m medlib.site build --profile tiny``).

``medlib.site`` copies this folder into a staging tree beside the cleaned executed notebooks
(``notebooks/``), the summary and tables pages (``results/``) and the benchmark page, then builds
static HTML fully offline: nothing is executed again and nothing is fetched from the network.
"""

import json
import os
from pathlib import Path

_here = Path(__file__).parent
_profile = os.environ.get("MEDLIB_SITE_PROFILE") or (
    json.loads((_here / "_site_profile.json").read_text())["profile"] if (_here / "_site_profile.json").exists()
    else "tiny")

project = "DINOv2 in medical imaging: a companion"
author = "the medlib contributors"
copyright = "the medlib contributors, Apache-2.0"
html_title = f"DINOv2 in medical imaging (profile {_profile})"

extensions = ["myst_nb"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "README.md", "_site_profile.json"]
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type"]

# The notebooks were executed by `make reproduce`; the site only renders their outputs.
nb_execution_mode = "off"
nb_merge_streams = True
nb_output_stderr = "show"

html_theme = "sphinx_book_theme"
html_static_path = ["_static"]
html_css_files = ["medlib.css"]
html_show_sourcelink = False
html_copy_source = False
html_last_updated_fmt = None
html_theme_options = {
    "home_page_in_toc": True,
    "show_toc_level": 2,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
    "use_issues_button": False,
    "use_edit_page_button": False,
    "launch_buttons": {},
    "navigation_with_keys": False,
}
html_context = {"default_mode": "light"}
