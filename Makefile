# The companion's commands. The two that matter: `make reproduce` and `make test`.
PROFILE ?= tiny
# notebooks executed at once; auto: as many as the cores hold at the profile's pinned CPU threads (smoke and tiny
# compute with 1 thread each, so their numbers do not depend on JOBS), 1 for the GPU profiles
JOBS ?= auto
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
KERNEL := medlib
NOTEBOOKS := $(wildcard notebooks/[0-9][0-9]_*.py)

#  site: the companion site (reports/<profile>/site) from the executed notebooks, offline
.PHONY: lock setup browser reproduce site test test-long test-fast bench lab sync notebooks student backbones ldm clean help

help:
	@echo "make reproduce [PROFILE=smoke|tiny|gpu|paper]  execute every notebook -> reports/, figures/"
	@echo "    [DATA=my_data.toml] [OVERRIDES=\"eval.finetune_epochs=1 ...\"] [ONLY=\"01 03\"] [KEEP_GOING=1] [JOBS=auto|N]"
	@echo "make test                                      unit + integration + nbval tests (~10 min)"
	@echo "make test-long                                 the end-to-end runs (gpu switches, paper dry run, cards)"
	@echo "make student                                   the notebooks without solutions -> build/student/"
	@echo "make site [PROFILE=tiny]                       the companion site -> reports/<profile>/site/index.html"
	@echo "make setup | lock | bench | lab | sync | backbones | ldm | clean"

# lock: pin every package (with hashes) from pyproject.toml; commit pylock.toml and requirements.lock
lock:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip lock --quiet -e . -o pylock.toml
	$(PY) -m medlib.lock pins > requirements.lock

# setup is idempotent: it reruns only when pyproject.toml changes (or .venv is missing).
setup: $(STAMP)

$(STAMP): pyproject.toml pylock.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# torch from the local wheels with pip (never uv / poetry), then the package and its deps at the
	# versions of the lock (pylock.toml, as name==version constraints in requirements.lock).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c requirements.lock -e .
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (medlib)" >/dev/null
	touch $(STAMP)

reproduce: setup
	$(PY) -m medlib.reproduce --profile $(PROFILE) --kernel $(KERNEL) --jobs $(JOBS) --site $(if $(FORCE),--force,) \
		$(if $(DATA),--data "$(DATA)",) $(if $(OVERRIDES),--override $(OVERRIDES),) $(if $(ONLY),--only $(ONLY),) \
		$(if $(KEEP_GOING),--keep-going,)

# the rendered companion site: executed notebooks, summary, tables, benchmark and docs/ pages (nothing re-run)
site: setup
	$(PY) -m medlib.site build --profile $(PROFILE)

# nbval runs the committed notebooks on the smoke profile, writing into a scratch folder; it reuses the cache of
# the integration tests' smoke run (phantoms, features, the smoke LDM), which starts from an empty one.
SMOKE_RUN := $(CURDIR)/.cache/test-smoke-run
NBVAL_ENV := MEDLIB_PROFILE=smoke MEDLIB_FIGURES=$(CURDIR)/.cache/nbval/figures MEDLIB_REPORTS=$(CURDIR)/.cache/nbval/reports \
	MEDLIB_CACHE=$(SMOKE_RUN)/cache

# the site's browser check needs headless Chromium and its driver: Debian packages, installed when missing
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; } || \
	  echo "headless Chromium is not installed (needs root and apt-get): the browser check is skipped outside CI"

# test: everything but the end-to-end runs marked `long` (about 10 minutes on two cores); test-long: those
# (every notebook under the gpu switches, the paper dry run, the backbone cards' health, benchmarks). CI runs both.
test: setup browser
	rm -rf $(SMOKE_RUN)
	MEDLIB_TEST_SMOKE_RUN=$(SMOKE_RUN) $(PY) -m pytest -n 2 --dist loadgroup -m "not long" tests
	$(NBVAL_ENV) $(PY) -m pytest --nbval-lax -p no:xdist --nbval-kernel-name $(KERNEL) notebooks

test-long: setup
	$(PY) -m pytest -n 2 --dist loadgroup -m long tests

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow" tests

bench: setup
	$(PY) -m benchmarks.run --out reports/bench

lab: setup
	$(VENV)/bin/jupyter lab notebooks

sync: setup
	$(VENV)/bin/jupytext --sync $(NOTEBOOKS)

# the student edition: every notebook without its cells tagged "solution" (docs/course.md)
STUDENT_DIR ?= build/student
student: setup
	$(PY) -m medlib.teaching student --out $(STUDENT_DIR)

# the committed notebooks/*.ipynb show the tiny run's outputs (reports/tiny); nbval re-executes them on smoke
notebooks: setup
	$(PY) -m medlib.reproduce --profile tiny --publish-committed

backbones: setup
	$(PY) -m medlib.models build all --profile $(PROFILE)

# the DiNO-Diffusion LDM (VAE + UNet) of notebook 04; resumable: rerun continues an interrupted build
ldm: setup
	$(PY) -m medlib.diffusion build --profile $(PROFILE)

clean:
	rm -rf .cache reports/smoke reports/tiny reports/gpu reports/paper
