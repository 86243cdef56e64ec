# snapfs: quick start is `make demo` and `make test`. Both install what they need on Debian 12.

PYTHON   ?= /usr/bin/python3
VENV     ?= .venv
VPY      := $(VENV)/bin/python
APT_PKGS := qemu-system-x86 qemu-utils python3-libnbd libnbd-bin fuse3 python3-venv rsync util-linux
PYTEST_ARGS ?=

.PHONY: all deps apt venv demo test lint bench install clean

all: deps

deps: apt venv

# Debian packages: only when one is missing, so repeated runs do not touch apt.
apt:
	@if ! dpkg -s $(APT_PKGS) >/dev/null 2>&1; then \
	  echo "installing Debian packages: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi

# The venv sees Debian's python3-libnbd (not on PyPI) through --system-site-packages.
$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: apt $(VENV)/.stamp

demo: deps
	$(VPY) -m snapfs.demo

test: deps
	$(VENV)/bin/ruff check snapfs tests
	$(VENV)/bin/mypy
	$(VPY) -m pytest $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check snapfs tests
	$(VENV)/bin/ruff format --check snapfs tests
	$(VENV)/bin/mypy

bench: deps
	$(VPY) -m snapfs.bench

PREFIX ?= /usr/local
install: deps
	$(VPY) -m pip install -q --prefix $(PREFIX) .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
