# The two commands: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The exact versions installed (pyproject.toml keeps the supported ranges); `make lock` re-resolves it.
LOCK := constraints.txt

.PHONY: demo test install docs lock chromium clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) -e '.[dev,docs]'
	touch $@

install: $(VENV)/.installed

# The newest versions pyproject.toml's ranges allow, resolved in a throwaway venv and frozen into the lock (its
# comment lines kept; the project's own editable line left out). Then `make test`, and commit both files.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e '.[dev,docs]'
	{ grep '^#' $(LOCK); .lock-venv/bin/python -m pip freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .lock-venv

demo: $(VENV)/.installed
	$(VENV)/bin/actstore demo

# The reference in docs/ (mkdocs.yml): --strict fails on a link to a missing page or heading and on a page left out
# of nav; .ci/check_links.py checks the README's links and docs/'s links to repository files. Offline; into site/.
docs: $(VENV)/.installed
	$(PY) -m mkdocs build --strict
	$(PY) .ci/check_links.py

# tests/test_browser.py renders the feature browser in headless Chromium (Debian's package).
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Two pytest-xdist workers: much of the suite waits on processes (Ray workers importing torch, Ray Train, the
# cluster's nodes), so the other worker's tests use that time. A file's tests stay on one worker, and so do the
# files on the service fixtures (tests/conftest.py), longest first; PYTEST_WORKERS=0: serially.
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed docs chromium
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf stores data .pytest_cache site
