# hoster_ha -- works with GNU make and BSD make (bmake, FreeBSD's make):
# plain POSIX make syntax only (no $(shell), conditionals, pattern rules, :=).
#
#   make test       the test suite (pytest)
#   make sim-soak   100,000 random simulator schedules on every core (SIM_SOAK_SEEDS=N,
#                   SIM_SOAK_MINUTES=M to bound the run time); a table of violations
#   make bench      the benchmarks, one markdown report (about 13 minutes on 2 cores)
#   make demo       3 candidates + 2 workers on loopback, fake host commands: a failover
#   make lint       sh -n and shellcheck on the rc.d script, mandoc -T lint on the man page
#   make install    [DESTDIR=/stage] [PREFIX=/usr/local]
#   make uninstall  same variables as install

PYTHON?=	python3
PREFIX?=	/usr/local
DESTDIR?=
# The interpreter written into the installed scripts' first line and into
# the installed rc.d script.
INSTALL_PYTHON?=	$(PREFIX)/bin/python3

SBINDIR=	$(DESTDIR)$(PREFIX)/sbin
RCDIR=		$(DESTDIR)$(PREFIX)/etc/rc.d
ETCDIR=		$(DESTDIR)$(PREFIX)/etc/hoster_ha
MAN8DIR=	$(DESTDIR)$(PREFIX)/share/man/man8

.PHONY: all test demo soak sim-soak bench lint install uninstall

all:
	@echo "targets: test demo soak sim-soak bench lint install uninstall (see the top of Makefile)"

# With pytest-xdist installed (CI installs it) the tests run on 3 workers: a network
# test or a cluster test mostly waits, and a simulator chunk mostly computes.
# tests/conftest.py keeps together what shares a cluster (TEST_JOBS=1: one at a time).
TEST_JOBS?=	3
test:
	@if [ "$(TEST_JOBS)" -gt 1 ] && $(PYTHON) -c 'import xdist' 2>/dev/null; then \
		echo "$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadgroup tests"; \
		$(PYTHON) -m pytest -q -n $(TEST_JOBS) --dist loadgroup tests; \
	else \
		echo "$(PYTHON) -m pytest -q tests  (pip install pytest-xdist: 3 workers, faster)"; \
		$(PYTHON) -m pytest -q tests; \
	fi

demo:
	$(PYTHON) tools/demo.py

soak:
	$(PYTHON) tools/soak.py

sim-soak:
	$(PYTHON) tools/sim_soak.py

bench:
	$(PYTHON) bench/all.py

lint:
	sh -n rc.d/hoster_ha
	@if command -v shellcheck >/dev/null 2>&1; then \
		echo "shellcheck -s sh rc.d/hoster_ha"; \
		shellcheck -s sh rc.d/hoster_ha; \
	else \
		echo "lint: shellcheck is not installed, skipped"; \
	fi
	@if command -v mandoc >/dev/null 2>&1; then \
		echo "mandoc -T lint -W warning hoster_ha.8"; \
		mandoc -T lint -W warning hoster_ha.8; \
	else \
		echo "lint: mandoc is not installed, skipped"; \
	fi

# The rc.d script names the interpreter and the agent by absolute path
# (/usr/local/...): rewrite them for $(PREFIX) / $(INSTALL_PYTHON).
# A warning (not an error: a staging DESTDIR may be built elsewhere) when the
# interpreter named in the scripts does not exist here.
install:
	@if [ ! -x "$(INSTALL_PYTHON)" ]; then \
		echo "warning: INSTALL_PYTHON $(INSTALL_PYTHON) does not exist: the installed" \
		    "scripts name it on their first line (pkg install python3 provides" \
		    "/usr/local/bin/python3; python311 alone does not)" >&2; \
	fi
	install -d $(SBINDIR) $(RCDIR) $(ETCDIR) $(MAN8DIR)
	sed '1s|^#!.*|#!$(INSTALL_PYTHON)|' hoster_ha.py > $(SBINDIR)/hoster_ha.py
	chmod 755 $(SBINDIR)/hoster_ha.py
	sed '1s|^#!.*|#!$(INSTALL_PYTHON)|' ha_watchdog.py > $(SBINDIR)/ha_watchdog.py
	chmod 755 $(SBINDIR)/ha_watchdog.py
	sed -e 's|/usr/local/bin/python3|$(INSTALL_PYTHON)|g' \
	    -e 's|/usr/local/sbin/hoster_ha.py|$(PREFIX)/sbin/hoster_ha.py|g' \
	    -e 's|/usr/local/etc/hoster_ha/|$(PREFIX)/etc/hoster_ha/|g' \
	    rc.d/hoster_ha > $(RCDIR)/hoster_ha
	chmod 755 $(RCDIR)/hoster_ha
	install -m 644 ha_config.json.example $(ETCDIR)/ha_config.json.example
	install -m 644 hoster_ha.8 $(MAN8DIR)/hoster_ha.8

# Leaves $(ETCDIR) in place while it holds anything else (ha_config.json, secret).
uninstall:
	rm -f $(SBINDIR)/hoster_ha.py $(SBINDIR)/ha_watchdog.py
	rm -f $(RCDIR)/hoster_ha
	rm -f $(ETCDIR)/ha_config.json.example
	rm -f $(MAN8DIR)/hoster_ha.8
	rmdir $(ETCDIR) 2>/dev/null || true
