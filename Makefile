# `make generate`: install, regenerate every kernel (eager and C++) and derivation, print the verification table.
# `make test`:     install (TeX included), run the test suite (generated/ checked fresh among its tests).
# `make latex`:    build/derivations/all.pdf, every derivation in one book.
# `make dist`:     dist/derive-*.tar.gz and dist/derive-*.whl, to install derive in another repository.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# TikZ (texlive-pictures) draws the compute graphs; pdftoppm (poppler-utils) lets the tests look at the pages
TEX_PACKAGES := texlive-latex-base texlive-latex-recommended texlive-pictures latexmk poppler-utils
# the C++ kernels are compiled on first use (torch.utils.cpp_extension; ninja comes from pip)
NATIVE_PACKAGES := g++
# the backends of the built-in kernels in generated/ (derive generate --backend ...)
BACKENDS := --backend cpp --backend triton
# the Markdown documents are checked as GitHub renders them: its parser (cmark-gfm) and MathJax (npm,
# pinned by tests/mathjax/package-lock.json); only the missing ones are installed (a Node.js from
# another source ships its own npm, which Debian's npm package conflicts with)
DOC_PACKAGES = $(if $(shell command -v cmark-gfm),,cmark-gfm) $(if $(shell command -v npm),,nodejs npm)
MATHJAX := tests/mathjax/node_modules/.installed

.PHONY: install generate verify check test tex native doc-tools latex dist clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,demo]'
	touch $@

install: $(STAMP)

generate: install native
	$(BIN)/derive generate $(BACKENDS)
	$(BIN)/derive verify

check: install
	$(BIN)/derive check $(BACKENDS)

# Derivations are compiled for real in the tests, so TeX is part of the test set-up.
tex:
	@{ command -v latexmk && kpsewhich tikz.sty && command -v pdftoppm; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEX_PACKAGES) >/dev/null; \
	  else echo "latexmk, tikz.sty or pdftoppm not found: sudo apt-get install $(TEX_PACKAGES)"; exit 1; fi; }

$(MATHJAX): tests/mathjax/package-lock.json
	@{ command -v cmark-gfm && command -v npm; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DOC_PACKAGES) >/dev/null; \
	  else echo "cmark-gfm or npm not found: sudo apt-get install $(DOC_PACKAGES)"; exit 1; fi; }
	cd tests/mathjax && npm ci --no-audit --no-fund --loglevel=error
	touch $@

doc-tools: $(MATHJAX)

# one PDF of every layer's derivations, with a table of contents: build/derivations/all.pdf
latex: install tex
	$(BIN)/derive latex

# a C++ compiler for the native kernels (without one they fall back to the eager kernels, with a warning)
native:
	@command -v g++ >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(NATIVE_PACKAGES) >/dev/null; \
	  else echo "g++ not found: sudo apt-get install $(NATIVE_PACKAGES)"; exit 1; fi; }

# the tests run on every core (pytest-xdist), each file on one worker: a file's module fixtures
# (two ranks, compiled documents, the native kernels' extension) are built once
# (the suite checks generated/ is fresh, as `make check` does: tests/test_files.py)
test: install tex native doc-tools
	$(BIN)/python -m pytest -q -n auto --dist loadfile --durations=15

# the sdist and a wheel (setup.py copies templates/ into the package); `pip install dist/derive-*.whl`
dist: install
	rm -rf dist
	$(BIN)/python -c "from setuptools import build_meta as b; b.build_sdist('dist'); b.build_wheel('dist')" >/dev/null
	@ls dist

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis dist tests/mathjax/node_modules
