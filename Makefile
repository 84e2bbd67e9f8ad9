# Every target does its own set-up on a fresh Debian 12 machine (as root): apt packages, then a
# venv made from Debian's /usr/bin/python3 with --system-site-packages, so the code runs on the
# exact library versions Raspberry Pi OS bookworm ships.
SHELL := /bin/bash
PY_SYS := /usr/bin/python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := avahi-daemon avahi-utils dbus iproute2 util-linux nftables python3-venv \
	python3-pydbus python3-gi python3-zeroconf python3-pyroute2 python3-scapy python3-yaml \
	python3-prometheus-client python3-sdnotify python3-cryptography prometheus
PYTEST_ARGS ?=

.PHONY: deps lint test test-all demo bench clean

.stamp-apt: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@touch $@

$(VENV)/.stamp: requirements-dev.txt .stamp-apt
	$(PY_SYS) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

deps: $(VENV)/.stamp

lint: deps
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy

test: deps lint
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow" tests

test-all: deps lint
	$(PY) -m pytest $(PYTEST_ARGS) tests

demo: deps
	$(PY) -m tests.lab demo

bench: deps
	$(PY) -m bench

clean:
	rm -rf $(VENV) .stamp-apt .pytest_cache .mypy_cache .ruff_cache
