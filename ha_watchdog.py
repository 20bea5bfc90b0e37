#!/usr/bin/env python3
"""ha_watchdog: the companion process of hoster_ha.py (SPEC §3.5).

hoster_ha.py starts it (same --config, same mode) in its own session.  The agent
sends a heartbeat every ping_interval from its control loop: SIGUSR1 when the node
is armed, SIGHUP when it is not.  The watchdog acknowledges the armed state by
writing run_dir/ha_watchdog.ack ("armed PID" or "unarmed PID"); the agent counts
itself armed only after that.

For an armed node, no heartbeat for watchdog_timeout, or the agent's PID gone,
means the agent can no longer be trusted: the watchdog SIGKILLs it (a paused
manager must never resume), logs the reason at EMERG, writes the fence record,
locks and destroys the running VMs and reboots -- or, with --ha-debug, logs each
step as "(DEBUG) would ..." and exits 1.  SIGTERM is an orderly stand-down.
A new agent is never adopted while the node is armed: if the armed agent's PID
is gone, the heartbeat of its successor does not save the host from the fence.
An unarmed agent's death is logged at ALERT (EMERG is the fence's alone).

It reads the same config file and shares the fencing code of hoster_ha.py, which
lies beside it.
"""

import argparse
import os
import signal
import stat
import sys
import time

sys.dont_write_bytecode = True  # installed in sbin: no __pycache__ beside the scripts
HOSTER_HA_PROGRAM = True        # hoster_ha then keeps ssl unloaded until a tls section needs it
HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, HERE)


def import_agent():
    """The agent module beside this file: from the bytecode the agent named in
    HOSTER_HA_BYTECODE (the state_dir/pycache file it runs itself; compiling the file here
    would keep about 13 MiB in this process), if that file is ours and writable by nobody
    else; else from the source."""
    pyc = os.environ.pop("HOSTER_HA_BYTECODE", "")
    if pyc:
        from importlib.machinery import SourcelessFileLoader
        from importlib.util import module_from_spec, spec_from_loader
        try:
            st = os.lstat(pyc)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and \
                    not st.st_mode & 0o022:
                loader = SourcelessFileLoader("hoster_ha", pyc)
                mod = module_from_spec(spec_from_loader("hoster_ha", loader))
                mod.__file__ = os.path.join(HERE, "hoster_ha.py")
                sys.modules["hoster_ha"] = mod
                loader.exec_module(mod)
                return mod
        except Exception:   # any trouble with the bytecode: the source below
            sys.modules.pop("hoster_ha", None)
    import hoster_ha
    return hoster_ha


ha = import_agent()

SIGNALS = (signal.SIGUSR1, signal.SIGHUP, signal.SIGTERM, signal.SIGINT)

# watchdog(4) and its probe live in hoster_ha (its doctor and preflight use them too)
WDIOCPATPAT, WD_ACTIVE, FIDO = ha.WDIOCPATPAT, ha.WD_ACTIVE, ha.FIDO
WATCHDOGD_PID, patpat_arg, freebsd_major = ha.WATCHDOGD_PID, ha.patpat_arg, ha.freebsd_major
KernelWatchdog = ha.KernelWatchdog


class Watchdog:
    def __init__(self, cfg, log, kernel=None):
        self.cfg, self.log, self.kernel = cfg, log, kernel
        self.paths = ha.Paths(cfg)
        self.agent_pid = None
        self.armed = False
        self.last_beat = time.monotonic()
        self.acked = None
        self.newcomer = None       # an agent that beat while the armed one was watched
        self.ignored = None        # the last PID whose heartbeat was ignored (warned once)
        self.kernel_error = None   # the kernel watchdog's last error, logged once

    def heartbeat(self, pid, armed, now):
        if pid != self.agent_pid:
            if ha.read_pid(self.paths.pid) != pid:
                self.ignore(pid, f"not the agent in {self.paths.pid}")
                return
            if self.agent_pid is not None and self.armed:
                # The armed agent we watch has been replaced.  Never adopt its successor:
                # if the old one is gone, check() fences (the candidates still count the
                # armed incarnation); if it lives, the newcomer is a second agent.
                self.newcomer = pid
                self.ignore(pid, f"the node is armed by hoster_ha PID {self.agent_pid}; a new "
                                 "agent is not adopted while armed")
                return
            self.log.log(ha.NOTICE, f"watching hoster_ha (PID {pid})")
            self.agent_pid, self.newcomer = pid, None
        if armed != self.armed:
            self.log.log(ha.NOTICE, f"node {'armed' if armed else 'disarmed'} by hoster_ha "
                                    f"(PID {pid})")
        self.armed, self.last_beat = armed, now
        self.kernel_pat(armed)
        if self.acked != (pid, armed):
            self.write_ack(armed, pid)
            self.acked = (pid, armed)

    def ignore(self, pid, why):
        if pid != self.ignored:  # once per PID, not on every heartbeat
            self.ignored = pid
            self.log.warning(f"ignoring a heartbeat from PID {pid}: {why} (not logged again for it)")

    def write_ack(self, armed, pid):
        """run_dir/ha_watchdog.ack: "armed|unarmed AGENT_PID DEBUG|PRODUCTION"."""
        mode = "DEBUG" if self.cfg.debug else "PRODUCTION"
        ha.write_atomic(self.paths.wd_ack,
                        f"{'armed' if armed else 'unarmed'} {pid} {mode}\n".encode(), mode=0o644)

    def kernel_pat(self, armed):
        """Pat watchdog(4) while armed heartbeats arrive; disarm it when the node disarms."""
        if self.kernel is None:
            return
        try:
            self.kernel.pat() if armed else self.kernel.disarm()
        except OSError as e:
            if self.kernel_error is None:  # once, at ERR: not on every heartbeat
                self.log.error(f"kernel watchdog: {e} (not logged again until it works)")
            self.kernel_error = str(e)
            return
        if self.kernel_error is not None:
            self.log.log(ha.NOTICE, "kernel watchdog works again")
            self.kernel_error = None

    def check(self, now):
        """The reason to fence, or None."""
        if self.agent_pid is None:
            return None
        alive = ha.pid_alive(self.agent_pid)
        if not self.armed:
            if not alive:
                self.log.log(ha.ALERT, f"hoster_ha (PID {self.agent_pid}) is gone; the node "
                                       "was not armed, so nothing else is done")
                self.agent_pid = None
            return None
        return ha.watchdog_verdict(True, alive, now - self.last_beat,
                                   self.cfg.watchdog_timeout, self.agent_pid, self.newcomer)

    def fence(self, reason):
        # The commands we run (bhyvectl, shutdown) must not inherit our blocked signals;
        # our own handlers do nothing (a fence is not interrupted) and reset at exec.
        for sig in SIGNALS:
            signal.signal(sig, lambda *_: None)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        debug = self.cfg.debug
        say = "(DEBUG) would " if debug else ""
        # The agent, and a newcomer that claims its pid file: neither may act any more.
        pids = [self.agent_pid]
        if self.newcomer is not None and ha.read_pid(self.paths.pid) == self.newcomer:
            pids.append(self.newcomer)
        for pid in pids:
            self.log.log(ha.NOTICE if debug else ha.ALERT, f"{say}SIGKILL hoster_ha (PID {pid})")
            if not debug:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.log.log(ha.EMERG, f"{reason}, initiating fencing")
        ha.EventLog(self.paths.events, self.cfg.hostname).append("watchdog_fence", reason=reason)
        # the armed agent's incarnation: its fence may be confirmed to the candidates
        incarnation = ha.read_incarnation(self.paths.incarnation, self.agent_pid)
        ha.fence_host(self.cfg, ha.Host(self.cfg, self.log), self.log, reason, debug,
                      incarnation=incarnation)
        if self.cfg.commands.get("notify"):   # after the fence's commands: never delays them
            ha.notify_detached(self.cfg.commands["notify"], self.cfg.hostname, self.log,
                               "watchdog_fence", f"{reason}, initiating fencing", reason=reason)
        if debug:
            self.log.log(ha.NOTICE, "(DEBUG) exiting with status 1 to simulate the failure")
        self.stand_down(disarm=False)  # a fence that hangs is still reset by the kernel
        # Blocked again: heartbeats of a newcomer (debug mode leaves it alive) must not kill
        # us with their default action while the interpreter exits.
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        return 1

    def stand_down(self, disarm=True):
        if disarm:
            self.kernel_pat(False)
        ha.remove_file(self.paths.wd_pid, only_if_pid=os.getpid())
        ha.remove_file(self.paths.wd_ack)

    def run(self):
        step = min(0.5, self.cfg.ping_interval / 4)
        while True:
            info = signal.sigtimedwait(SIGNALS, step)
            now = time.monotonic()
            if info is not None:
                if info.si_signo in (signal.SIGTERM, signal.SIGINT):
                    self.log.log(ha.NOTICE, "ha_watchdog standing down (orderly stop)")
                    self.stand_down()
                    return 0
                self.heartbeat(info.si_pid, info.si_signo == signal.SIGUSR1, now)
            reason = self.check(now)
            if reason:
                return self.fence(reason)


def main(argv=None):
    p = argparse.ArgumentParser(prog="ha_watchdog.py",
                                description="Companion watchdog of hoster_ha.py (started by it).")
    p.add_argument("--config", metavar="PATH")
    p.add_argument("--ha-debug", action="store_true")
    args = p.parse_args(argv)
    # Signals wait, blocked, for sigtimedwait(): that is our handler, installed before the
    # pid file announces us.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    path = ha.find_config_path(args.config)
    try:
        cfg = ha.load_config(path, debug=args.ha_debug)
    except ha.ConfigError as e:
        print(f"ha_watchdog: {e}", file=sys.stderr)
        return 2
    log = ha.setup_logging(cfg, "ha_watchdog")
    paths = ha.Paths(cfg)
    other = ha.read_pid(paths.wd_pid)
    if other is not None and other != os.getpid():
        print(f"ha_watchdog: already running as PID {other} ({paths.wd_pid})", file=sys.stderr)
        return 1
    kernel = None
    if cfg.kernel_watchdog:
        if cfg.debug:
            log.log(ha.NOTICE, "(DEBUG) would arm the kernel watchdog (/dev/fido) while armed")
        else:
            kernel = KernelWatchdog(cfg.watchdog_timeout, log, watchdogd_pidfile=os.path.join(
                cfg.run_dir, WATCHDOGD_PID))
            try:
                kernel.check()
            except RuntimeError as e:
                log.error(str(e))
                print(f"ha_watchdog: {e}", file=sys.stderr)
                return 1
            log.log(ha.NOTICE, f"kernel watchdog {kernel.device} works (armed for a test and "
                               "disarmed); armed while the node is")
    os.makedirs(cfg.run_dir, exist_ok=True)
    watchdog = Watchdog(cfg, log, kernel)
    watchdog.write_ack(False, 0)  # our mode, before the pid file announces us
    ha.write_pid_file(paths.wd_pid)
    log.log(ha.NOTICE, f"ha_watchdog started ({'DEBUG' if cfg.debug else 'PRODUCTION'} mode, "
                       f"watchdog_timeout {cfg.watchdog_timeout:g} s)")
    return watchdog.run()


if __name__ == "__main__":
    sys.exit(main())
