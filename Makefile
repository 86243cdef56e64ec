# snapfs: quick start is `make demo` and `make test`. Both install what they need on Debian 12.

PYTHON   ?= /usr/bin/python3
VENV     ?= .venv
VPY      := $(VENV)/bin/python
# e2fsprogs: the real-guest tests make and check the guest's ext4 (tests/test_guest.py).
# borgbackup, restic: restore points are tested under both (tests/test_points.py).
# gcc, libc6-dev, python3-dev: snapfs's compiled READ path (snapfs/_fastpath.c; without them
# snapfs still works, every READ served from Python), and the bench's prototypes in dev/.
APT_PKGS := qemu-system-x86 qemu-utils python3-libnbd libnbd-bin fuse3 python3-venv rsync util-linux \
            e2fsprogs borgbackup restic gcc libc6-dev python3-dev
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all deps apt venv demo test test-fast test-qemu10 qemu10 test-qemu9 qemu9 guest lint \
        bench install clean

all: deps

deps: apt venv

# Debian packages: only when one is missing, so repeated runs do not touch apt.
define apt_install
@if ! dpkg -s $(1) >/dev/null 2>&1; then \
  echo "installing Debian packages: $(1)"; \
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(1) >/dev/null; \
fi
endef

apt:
	$(call apt_install,$(APT_PKGS))

# The venv sees Debian's python3-libnbd (not on PyPI) through --system-site-packages; the
# floors in pyproject.toml keep Debian's older trio (pulled in by borgbackup) out of it.
# setup.py and the C source: a change rebuilds the compiled READ path in place.
$(VENV)/.stamp: pyproject.toml setup.py snapfs/_fastpath.c
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: apt $(VENV)/.stamp

demo: deps
	$(VPY) -m dev.demo

test: lint
	$(VPY) -m pytest $(PYTEST_ARGS)

# The same without the slow scale tests (CI runs them: make test).
test-fast: lint
	$(VPY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The real-QEMU tests again, against Debian 13's QEMU 10.0 (what Proxmox VE 9 users run), in a
# chroot built once and kept in QEMU10_ROOT. snapfs itself runs on the host.
QEMU10_ROOT ?= /var/cache/snapfs-dev/qemu-10.0
DEBIAN_MIRROR ?= http://deb.debian.org/debian
qemu10: $(QEMU10_ROOT)/.stamp

$(QEMU10_ROOT)/.stamp:
	@command -v debootstrap >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
	mkdir -p $(dir $(QEMU10_ROOT))
	rm -rf $(QEMU10_ROOT).tmp
	debootstrap --variant=minbase --include=qemu-system-x86,qemu-utils trixie \
	  $(QEMU10_ROOT).tmp $(DEBIAN_MIRROR) >$(QEMU10_ROOT).log 2>&1 || \
	  { tail -20 $(QEMU10_ROOT).log; exit 1; }
	rm -rf $(QEMU10_ROOT) && mv $(QEMU10_ROOT).tmp $(QEMU10_ROOT)
	chroot $(QEMU10_ROOT) qemu-system-x86_64 --version | head -1
	touch $@

# The same against QEMU 9.2 (what Proxmox VE 8.4 ships), from Ubuntu 25.04. Its Release file is
# checked against Ubuntu's archive key kept in dev/keys (fingerprint F6EC B376 2474 EDA9 D21B
# 7022 8719 20D1 991B C93C). Ubuntu moves a release to old-releases some months after its end
# of life, so both archives are tried.
QEMU9_ROOT ?= /var/cache/snapfs-dev/qemu-9.2
UBUNTU_MIRRORS ?= http://archive.ubuntu.com/ubuntu http://old-releases.ubuntu.com/ubuntu
qemu9: $(QEMU9_ROOT)/.stamp

$(QEMU9_ROOT)/.stamp:
	@command -v debootstrap >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
	mkdir -p $(dir $(QEMU9_ROOT))
	@for mirror in $(UBUNTU_MIRRORS); do \
	  rm -rf $(QEMU9_ROOT).tmp; \
	  echo "debootstrap plucky from $$mirror"; \
	  debootstrap --variant=minbase --keyring=$(CURDIR)/dev/keys/ubuntu-archive-2018.gpg \
	    --include=qemu-system-x86,qemu-utils plucky $(QEMU9_ROOT).tmp $$mirror \
	    /usr/share/debootstrap/scripts/gutsy >$(QEMU9_ROOT).log 2>&1 && break; \
	  tail -5 $(QEMU9_ROOT).log; rm -rf $(QEMU9_ROOT).tmp; \
	done; test -d $(QEMU9_ROOT).tmp
	rm -rf $(QEMU9_ROOT) && mv $(QEMU9_ROOT).tmp $(QEMU9_ROOT)
	chroot $(QEMU9_ROOT) qemu-system-x86_64 --version | head -1
	touch $@

# The real Linux guest with Debian's qemu-guest-agent that tests/test_guest.py boots: kernel and
# initramfs from Debian 12 packages (apt-get download, nothing installed), built once and kept in
# GUEST_CACHE. The tests build it themselves when missing; this only does it ahead of time.
GUEST_CACHE ?= /var/cache/snapfs-dev/guest
guest: deps
	SNAPFS_GUEST_CACHE=$(GUEST_CACHE) $(VPY) -m dev.devguest

test-qemu10: deps qemu10
	SNAPFS_TEST_QEMU_ROOT=$(QEMU10_ROOT) $(VPY) -m pytest -m qemu $(PYTEST_ARGS)

test-qemu9: deps qemu9
	SNAPFS_TEST_QEMU_ROOT=$(QEMU9_ROOT) $(VPY) -m pytest -m qemu $(PYTEST_ARGS)

lint: deps
	$(VENV)/bin/ruff check snapfs dev tests
	$(VENV)/bin/ruff format --check snapfs dev tests
	$(VENV)/bin/mypy

bench: deps
	$(VPY) -m dev.bench $(BENCH_ARGS)

# make install [PREFIX=/usr/local]: snapfs in its own venv ($(PREFIX)/lib/snapfs, seeing Debian's
# python3-libnbd), the command, man page, bash completion, systemd units and the rsync provider.
PREFIX  ?= /usr/local
BINDIR  := $(PREFIX)/bin
APPDIR  := $(PREFIX)/lib/snapfs
MANDIR  := $(PREFIX)/share/man/man1
COMPDIR := $(PREFIX)/share/bash-completion/completions
UNITDIR := $(PREFIX)/lib/systemd/system
DOCDIR  := $(PREFIX)/share/doc/snapfs
install: deps
	$(VPY) -m dev.manpage --check contrib
	$(PYTHON) -m venv --system-site-packages $(APPDIR)
	@# Built from a copy: a build leaves build/ and *.egg-info behind, not in the work tree.
	src=$$(mktemp -d) && cp -r pyproject.toml setup.py README.md snapfs $$src/ && \
	  $(APPDIR)/bin/pip install -q --no-build-isolation $$src; rc=$$?; rm -rf $$src; exit $$rc
	install -d $(BINDIR) $(MANDIR) $(COMPDIR) $(UNITDIR) $(DOCDIR)
	ln -sf $(APPDIR)/bin/snapfs $(BINDIR)/snapfs
	install -m 0755 contrib/snapfs-rsync-remote $(BINDIR)/snapfs-rsync-remote
	install -m 0644 contrib/snapfs.1 $(MANDIR)/snapfs.1
	install -m 0644 contrib/snapfs.bash-completion $(COMPDIR)/snapfs
	for unit in snapfs-backup@.service snapfs-backup@.timer; do \
	  sed 's|@BINDIR@|$(BINDIR)|g' contrib/$$unit > $(UNITDIR)/$$unit && chmod 0644 $(UNITDIR)/$$unit; \
	done
	sed 's|/usr/local/bin|$(BINDIR)|g' contrib/snapfs.default > $(DOCDIR)/snapfs.default
	@echo "installed into $(PREFIX); copy $(DOCDIR)/snapfs.default to /etc/default/snapfs to configure the timer"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache snapfs/*.so
