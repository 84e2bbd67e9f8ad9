# Every target does its own set-up on a fresh Debian 12 machine (as root): apt packages, then a
# venv made from Debian's /usr/bin/python3 with --system-site-packages, so the code runs on the
# exact library versions Raspberry Pi OS bookworm ships.
SHELL := /bin/bash
PY_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
# etcd-server and etcd-client: the lab's k3s stand-in runs a real etcd per server node
# (tests/lab/k3s/); its etcdctl asks each node what the cluster is.
APT_PACKAGES := avahi-daemon avahi-utils dbus iproute2 util-linux nftables python3-venv \
	python3-pydbus python3-gi python3-zeroconf python3-pyroute2 python3-scapy python3-yaml \
	python3-prometheus-client python3-sdnotify python3-cryptography prometheus \
	etcd-server etcd-client
PYTEST_ARGS ?=

.PHONY: deps lint test test-all demo bench bench-check clean deb deb-deps pi-gen-stage image-test

# $(call apt_install,PACKAGES): install whichever of PACKAGES are missing (one recipe for the
# three stamps below: the tests', the benchmarks' and the package's and image tests' tools).
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@
endef

# Debian's etcd-server enables and starts etcd.service; the lab starts its own etcds inside its
# nodes, and a host etcd would only hold 2379/2380 and a data dir: mask it before installing.
.stamp-apt: Makefile
	@if [ -d /etc/systemd/system ] && [ ! -e /etc/systemd/system/etcd.service ]; then \
		ln -s /dev/null /etc/systemd/system/etcd.service; fi
	$(call apt_install,$(APT_PACKAGES))

$(VENV)/.stamp: requirements-dev.txt .stamp-apt
	$(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

deps: $(VENV)/.stamp

lint: deps
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy

test: deps deb-deps lint
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests

test-all: deps deb-deps lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: deps
	$(PY) -m tests.lab demo

# The benchmarks also draw a picture (Debian's matplotlib) and count packets on the lab's bridge.
BENCH_TOOLS := python3-matplotlib tcpdump
.stamp-bench-tools: Makefile
	$(call apt_install,$(BENCH_TOOLS))

bench: deps .stamp-bench-tools
	$(PY) -m bench

# Ratios ours / stock tools from a fresh run against the newest committed bench/results/*.json;
# fails when one worsened past the noise margin of the recorded spread (bench/check.py).
bench-check: deps .stamp-bench-tools
	$(PY) -m bench.check

# The Debian package, built the Debian way (debhelper 13, dh-python, pybuild) from a copy of the
# working tree's tracked and unignored files, so the checkout stays clean. pybuild needs Debian's
# /usr/bin/python3 first on PATH. `lintian` must report no errors.
# ... and what the image tests need: mmdebstrap builds the rootfs, systemd-nspawn boots it, qemu
# runs arm64 (user mode through binfmt_misc; the full kernel boot in make test-all).
DEB_TOOLS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools lintian \
	shellcheck mmdebstrap systemd-container arch-test qemu-user-static binfmt-support qemu-system-arm
DEB_VERSION := $(shell sed -n '1s/.*(\(.*\)).*/\1/p' debian/changelog)
DEB := dist/sugarkube-agent_$(DEB_VERSION)_all.deb

.stamp-deb-tools: Makefile
	$(call apt_install,$(DEB_TOOLS))

deb-deps: .stamp-deb-tools

deb: .stamp-deb-tools
	rm -rf build/deb && mkdir -p build/deb/src dist
	git ls-files -co --exclude-standard -z | xargs -0 tar -c --no-recursion -f - | tar -x -C build/deb/src
	cd build/deb/src && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -b -us -uc -tc >../build.log 2>&1 \
		|| { tail -n 40 ../build.log; exit 1; }
	mv build/deb/sugarkube-agent_$(DEB_VERSION)_all.deb $(DEB)
	env PATH=/usr/sbin:/usr/bin:/sbin:/bin lintian --fail-on error $(DEB)
	@echo "built $(DEB)"

# The pi-gen stage installs the .deb it finds in its files/ (image/pi-gen/README section in the
# top-level README); the boot tests install the same file with the stage's own 00-run.sh.
PI_GEN_FILES := image/pi-gen/stage-sugarkube/00-sugarkube/files
pi-gen-stage: deb
	rm -f $(PI_GEN_FILES)/sugarkube-agent_*_all.deb && mkdir -p $(PI_GEN_FILES)
	cp $(DEB) $(PI_GEN_FILES)/

# The package installed by the pi-gen stage's script into a bookworm rootfs (mmdebstrap, cached in
# /var/cache/sugarkube-image) and booted with systemd-nspawn: one node, three nodes forming a
# cluster through systemd, install/purge, arm64 under qemu-user (also part of `make test`); the
# arm64 kernel boot under qemu-system-aarch64 is slow: `make test-all` runs it.
image-test: deps deb-deps
	$(PY) -m pytest $(PYTEST_ARGS) -m "image and not slow" tests/image

clean:
	rm -rf $(VENV) .stamp-apt .stamp-deb-tools .stamp-bench-tools .pytest_cache .mypy_cache .ruff_cache build dist
