# `make generate`: install, regenerate every kernel and derivation, print the verification table.
# `make test`:     install (TeX included), check generated/ is fresh, run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEX_PACKAGES := texlive-latex-base texlive-latex-recommended latexmk

.PHONY: install generate verify check test tex clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,demo]'
	touch $@

install: $(STAMP)

generate: install
	$(BIN)/derive generate
	$(BIN)/derive verify

check: install
	$(BIN)/derive check

# Derivations are compiled for real in the tests, so TeX is part of the test set-up.
tex:
	@command -v latexmk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEX_PACKAGES) >/dev/null; \
	  else echo "latexmk not found: sudo apt-get install $(TEX_PACKAGES)"; exit 1; fi; }

test: install tex
	$(BIN)/derive check
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
