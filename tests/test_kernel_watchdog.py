"""Unit tests of ha_watchdog's watchdog(4) support (SPEC §3.5 optional kernel_watchdog, §5).

No real device is touched: KernelWatchdog takes the device path, the ioctl, the opener and
the command runner as parameters, and these tests pass recording fakes.  The Watchdog tests
use a LocalCluster config (fake host commands, debug mode) and a sleeping child process as
the "agent", so even a fence can neither reboot nor kill anything real.

Facts checked (SPEC §5): WDIOCPATPAT = _IOW('W', 42, u_int) = 0x8004572A; its argument is a
uint32 WD_ACTIVE (0x8000000) | N, the timeout being 2**N ns, with N the smallest such that
2**N ns >= watchdog_timeout + 5 s; 0 disarms; FreeBSD 15 uses `/usr/sbin/watchdog -t SECONDS`
(`-t 0` disarms).
"""

import errno
import logging
import os
import struct
import subprocess
import sys
import time

import pytest

import ha_watchdog
import hoster_ha
from localcluster import LocalCluster


WDIOCPATPAT = 0x8004572A
WD_ACTIVE = 0x8000000


# -- fakes ---------------------------------------------------------------------------------

class FakeDevice:
    """Records opens and ioctls; returns a made-up descriptor."""

    FD = 97

    def __init__(self):
        self.opens = []
        self.ioctls = []

    def opener(self, path, flags):
        self.opens.append((path, flags))
        return self.FD

    def ioctl(self, fd, request, arg):
        self.ioctls.append((fd, request, arg))
        return 0

    def args(self):
        """The uint32 values passed, in order."""
        return [struct.unpack("I", a)[0] for _, _, a in self.ioctls]


class FakeRunner:
    def __init__(self, rc=0, err=""):
        self.calls, self.rc, self.err = [], rc, err

    def __call__(self, argv, timeout):
        self.calls.append((list(argv), timeout))
        return self.rc, "", self.err


class ListLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, level=None):
        return [r.getMessage() for r in self.records if level is None or r.levelno == level]


def make_log(name):
    log = logging.getLogger(f"test_kernel_watchdog.{name}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    h = ListLog()
    log.addHandler(h)
    return log, h


def kernel(timeout=10, release="14.2-RELEASE", device="/nonexistent/fido", runner=None,
           watchdogd_pidfile="/nonexistent/watchdogd.pid"):
    dev = FakeDevice()
    log, logs = make_log("kernel")
    k = ha_watchdog.KernelWatchdog(timeout, log, device=device, ioctl=dev.ioctl,
                                   opener=dev.opener, release=release,
                                   run=runner or FakeRunner(),
                                   watchdogd_pidfile=watchdogd_pidfile)
    return k, dev, logs


# -- the encoding --------------------------------------------------------------------------

def test_ioctl_constants_match_freebsd_headers():
    # _IOW('W', 42, u_int) = IOC_IN | (sizeof(u_int) << 16) | ('W' << 8) | 42
    assert ha_watchdog.WDIOCPATPAT == 0x80000000 | (4 << 16) | (ord("W") << 8) | 42
    assert ha_watchdog.WDIOCPATPAT == WDIOCPATPAT
    assert ha_watchdog.WD_ACTIVE == WD_ACTIVE


@pytest.mark.parametrize("n", [33, 34, 35, 36])
def test_patpat_arg_is_a_uint32_wd_active_or_n(n):
    arg = ha_watchdog.patpat_arg(n)
    assert isinstance(arg, bytes) and len(arg) == 4  # u_int, native byte order
    assert struct.unpack("I", arg)[0] == WD_ACTIVE | n


def test_patpat_arg_zero_disarms():
    assert ha_watchdog.patpat_arg(0) == b"\0\0\0\0"


@pytest.mark.parametrize("timeout, n", [
    (2, 33),     # 7 s    -> 2**33 ns = 8.59 s
    (10, 34),    # 15 s   -> 2**34 ns = 17.18 s (SPEC §5: N=34 ~ 17 s)
    (12, 34),    # 17 s   -> 17.18 s still covers it
    (13, 35),    # 18 s   -> 2**35 ns = 34.36 s
    (29, 35),    # 34 s   -> 34.36 s
    (30, 36),    # 35 s   -> 2**35 ns = 34.36 s is too short: 2**36 ns = 68.72 s
    (2.5, 33),   # decimals are allowed (SPEC §2)
])
def test_timeout_is_the_smallest_power_of_two_ns_at_least_watchdog_timeout_plus_5(timeout, n):
    k, _, _ = kernel(timeout)
    assert k.n == n
    assert k.seconds == 2 ** n / 1e9
    assert 2 ** n >= (timeout + 5) * 1e9 > 2 ** (n - 1)


# -- KernelWatchdog through the ioctl (FreeBSD < 15) ---------------------------------------

def test_pat_arms_with_wd_active_or_n_and_opens_the_device_once():
    k, dev, logs = kernel(10, device="/dev/fido-test")
    assert not k.use_command
    assert dev.opens == [] and dev.ioctls == []  # nothing touched before the first pat
    for _ in range(5):
        k.pat()
    assert dev.opens == [("/dev/fido-test", os.O_RDWR)]  # opened once, kept open
    assert [(fd, req) for fd, req, _ in dev.ioctls] == [(FakeDevice.FD, WDIOCPATPAT)] * 5
    assert dev.args() == [WD_ACTIVE | 34] * 5
    assert k.armed
    armed_lines = [m for m in logs.lines(hoster_ha.NOTICE) if "kernel watchdog armed" in m]
    assert len(armed_lines) == 1 and "2**34" in armed_lines[0], logs.lines()


def test_timeout_30_pats_with_n_36():
    k, dev, _ = kernel(30)
    k.pat()
    assert dev.args() == [WD_ACTIVE | 36]


def test_disarm_sends_zero_and_keeps_the_device_open():
    k, dev, logs = kernel(10)
    k.pat()
    k.disarm()
    assert dev.args() == [WD_ACTIVE | 34, 0]
    assert [a for _, _, a in dev.ioctls][-1] == b"\0\0\0\0"
    assert not k.armed
    assert any("kernel watchdog disarmed" in m for m in logs.lines(hoster_ha.NOTICE))
    k.disarm()  # already disarmed: nothing more is sent
    assert dev.args() == [WD_ACTIVE | 34, 0]
    k.pat()  # re-arm on the same descriptor
    assert dev.args() == [WD_ACTIVE | 34, 0, WD_ACTIVE | 34]
    assert len(dev.opens) == 1


def test_disarm_before_any_pat_touches_nothing():
    k, dev, _ = kernel(10)
    k.disarm()
    assert dev.opens == [] and dev.ioctls == []


def test_ioctl_error_propagates_as_oserror():
    k, dev, _ = kernel(10)

    def broken(fd, req, arg):
        raise OSError(25, "Inappropriate ioctl for device")
    k.ioctl = broken
    with pytest.raises(OSError):
        k.pat()
    assert not k.armed


# -- KernelWatchdog through watchdog(8) (FreeBSD 15) ---------------------------------------

@pytest.mark.parametrize("release, command", [
    ("14.2-RELEASE", False), ("14.3-STABLE", False), ("13.4-RELEASE-p2", False),
    ("15.0-RELEASE", True), ("15.0-CURRENT", True), ("16.0-CURRENT", True),
])
def test_freebsd_15_and_later_use_the_command(release, command):
    k, _, _ = kernel(10, release=release)
    assert k.use_command is command


@pytest.mark.parametrize("timeout", [10, 30])
def test_freebsd_15_pat_and_disarm_run_watchdog_8(timeout):
    runner = FakeRunner()
    k, dev, _ = kernel(timeout, release="15.0-RELEASE", runner=runner)
    k.pat()
    k.pat()
    k.disarm()
    assert dev.opens == [] and dev.ioctls == []  # no ioctl on FreeBSD 15
    argvs = [argv for argv, _ in runner.calls]
    assert len(argvs) == 3, argvs
    for argv in argvs[:2]:
        assert argv[:2] == ["/usr/sbin/watchdog", "-t"] and len(argv) == 3, argv
        seconds = float(argv[2])
        assert seconds >= timeout + 5, argv            # never shorter than the rule
        # whole seconds, at most the power-of-two timeout the §2 rule accounts for
        assert seconds <= k.seconds, (argv, k.seconds)
    assert argvs[2] == ["/usr/sbin/watchdog", "-t", "0"]
    assert all(t is not None and 0 < t <= 30 for _, t in runner.calls)  # bounded


@pytest.mark.parametrize("timeout", [10, 30])
def test_freebsd_15_command_passes_whole_seconds(timeout):
    """watchdog(8) documents `-t timeout` in seconds, and its parser (fetchtimeout() in
    usr.sbin/watchdogd/watchdogd.c: strtol() over the whole argument) rejects anything
    else with "-t argument is not a number" (EX_USAGE).  2**N ns is never a whole number
    of seconds, so the argument must be rounded up to an integer, never printed with a
    fraction ("17.1799").  A whole S with watchdog_timeout + 5 <= S <= 2**N ns keeps the
    kernel timeout within what the §2 rule accounts for, whether watchdog(8) uses S as is
    or rounds it up to a power of two nanoseconds (FreeBSD <= 14: seconds_to_pow2ns())."""
    runner = FakeRunner()
    k, _, _ = kernel(timeout, release="15.0-RELEASE", runner=runner)
    k.pat()
    (argv, _), = runner.calls
    assert argv[2].isdigit(), f"watchdog(8) would refuse {argv}: -t takes whole seconds"
    assert timeout + 5 <= int(argv[2]) <= k.seconds, (argv, k.seconds)


def test_freebsd_15_command_failure_raises_oserror_with_its_stderr():
    runner = FakeRunner(rc=1, err="watchdog: patting the dog: Operation not supported\n")
    k, _, _ = kernel(10, release="15.0-RELEASE", runner=runner)
    with pytest.raises(OSError) as e:
        k.pat()
    assert "Operation not supported" in str(e.value)
    assert not k.armed


# -- check(): a missing device ---------------------------------------------------------------

def test_check_missing_device_raises_a_clear_runtime_error(tmp_path):
    missing = str(tmp_path / "fido")
    k, _, _ = kernel(10, device=missing)
    with pytest.raises(RuntimeError) as e:
        k.check()
    msg = str(e.value)
    assert missing in msg and "does not exist" in msg
    assert "kernel_watchdog" in msg  # names the setting that asked for it


def test_check_existing_device_arms_once_and_disarms(tmp_path):
    """/dev/fido exists whenever the watchdog module is loaded, even with no driver: only
    arming tells.  check() arms with the real timeout, by the ioctl pat() uses, then
    disarms at once."""
    present = tmp_path / "fido"
    present.write_bytes(b"")
    k, dev, _ = kernel(10, device=str(present))
    k.check()
    assert dev.opens == [(str(present), os.O_RDWR)]
    assert dev.args() == [WD_ACTIVE | 34, 0]
    assert not k.armed  # the node arms it later, on the first armed heartbeat


def test_check_refuses_when_the_driver_is_missing_eopnotsupp(tmp_path):
    """No hardware driver: WDIOCPATPAT fails with EOPNOTSUPP (sys/dev/watchdog/watchdog.c)."""
    present = tmp_path / "fido"
    present.write_bytes(b"")
    k, dev, _ = kernel(10, device=str(present))

    def no_driver(fd, req, arg):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
    k.ioctl = no_driver
    with pytest.raises(RuntimeError) as e:
        k.check()
    msg = str(e.value)
    assert "\n" not in msg
    assert "no driver" in msg and "kernel_watchdog" in msg and str(present) in msg, msg
    assert "Operation not supported" in msg and "kldload" in msg, msg


def test_check_freebsd_15_probes_with_the_command_it_will_use(tmp_path):
    present = tmp_path / "fido"
    present.write_bytes(b"")
    runner = FakeRunner()
    k, dev, _ = kernel(10, release="15.0-RELEASE", device=str(present), runner=runner)
    k.check()
    assert [argv for argv, _ in runner.calls] == [["/usr/sbin/watchdog", "-t", "15"],
                                                  ["/usr/sbin/watchdog", "-t", "0"]]
    assert dev.ioctls == []


def test_check_freebsd_15_command_failure_is_refused(tmp_path):
    present = tmp_path / "fido"
    present.write_bytes(b"")
    runner = FakeRunner(rc=1, err="watchdog: patting the dog: Operation not supported\n")
    k, _, _ = kernel(10, release="15.0-RELEASE", device=str(present), runner=runner)
    with pytest.raises(RuntimeError) as e:
        k.check()
    assert "no driver" in str(e.value) and "/usr/sbin/watchdog" in str(e.value), str(e.value)
    assert len(runner.calls) == 1  # nothing was armed: nothing to disarm


def test_check_refuses_when_watchdogd_runs(tmp_path):
    """watchdogd(8) pats /dev/fido with its own timeout (128 s by default) and overrides ours.
    Its pid file (here a stand-in naming a live process: this test) is looked up first; the
    device is not touched."""
    present = tmp_path / "fido"
    present.write_bytes(b"")
    pidfile = tmp_path / "watchdogd.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    k, dev, _ = kernel(10, device=str(present), watchdogd_pidfile=str(pidfile))
    with pytest.raises(RuntimeError) as e:
        k.check()
    msg = str(e.value)
    assert "watchdogd" in msg and str(os.getpid()) in msg and "kernel_watchdog" in msg, msg
    assert dev.opens == [] and dev.ioctls == []
    pidfile.write_text("999999999\n")  # a stale pid file (no such process) is no obstacle
    k.check()
    assert dev.args() == [WD_ACTIVE | 34, 0]


def test_check_that_cannot_disarm_says_so(tmp_path):
    present = tmp_path / "fido"
    present.write_bytes(b"")
    k, dev, _ = kernel(10, device=str(present))
    calls = []

    def arm_only(fd, req, arg):
        calls.append(struct.unpack("I", arg)[0])
        if calls[-1] == 0:
            raise OSError(errno.EIO, "Input/output error")
    k.ioctl = arm_only
    with pytest.raises(RuntimeError) as e:
        k.check()
    assert calls == [WD_ACTIVE | 34, 0, 0, 0]  # three tries to disarm
    assert "could not be disarmed" in str(e.value) and "reset" in str(e.value)


# -- Watchdog + KernelWatchdog: pat on armed heartbeats only ---------------------------------

@pytest.fixture
def wd_env(tmp_path):
    """(cfg, a sleeping child standing in for the agent, its pid file written).

    cfg comes from a LocalCluster node (fake host commands) in debug mode, so a fence here
    only logs."""
    cluster = LocalCluster(str(tmp_path), debug=True)
    node = cluster["node1"]
    cfg = hoster_ha.load_config(node.config, debug=True)
    agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                             stdin=subprocess.DEVNULL)
    try:
        hoster_ha.write_atomic(os.path.join(cfg.run_dir, "hoster_ha.pid"),
                               f"{agent.pid}\n".encode())
        yield cfg, agent, node
    finally:
        agent.kill()
        agent.wait(5)


def watchdog_with_kernel(cfg, timeout=10):
    dev = FakeDevice()
    log, logs = make_log("watchdog")
    k = ha_watchdog.KernelWatchdog(timeout, log, device="/nonexistent/fido", ioctl=dev.ioctl,
                                   opener=dev.opener, release="14.2-RELEASE", run=FakeRunner())
    return ha_watchdog.Watchdog(cfg, log, kernel=k), k, dev, logs


def test_watchdog_pats_on_armed_heartbeats_and_disarms_on_an_unarmed_one(wd_env):
    cfg, agent, _ = wd_env
    w, k, dev, _ = watchdog_with_kernel(cfg)
    now = time.monotonic()
    w.heartbeat(agent.pid, False, now)           # unarmed: the kernel watchdog stays off
    assert dev.ioctls == []
    for i in range(3):
        w.heartbeat(agent.pid, True, now + i)    # armed: arm, then pat on every beat
    assert dev.args() == [WD_ACTIVE | 34] * 3 and k.armed
    ack = open(os.path.join(cfg.run_dir, "ha_watchdog.ack")).read()
    assert ack.split()[:2] == ["armed", str(agent.pid)]
    w.heartbeat(agent.pid, False, now + 3)       # the node disarmed: disarm the kernel too
    assert dev.args() == [WD_ACTIVE | 34] * 3 + [0] and not k.armed
    w.heartbeat(agent.pid, False, now + 4)       # still unarmed: nothing more
    assert dev.args() == [WD_ACTIVE | 34] * 3 + [0]
    assert len(dev.opens) == 1


def test_watchdog_ignores_a_heartbeat_from_a_stranger(wd_env):
    cfg, agent, _ = wd_env
    w, k, dev, logs = watchdog_with_kernel(cfg)
    w.heartbeat(os.getpid(), True, time.monotonic())  # not the PID in hoster_ha.pid
    assert dev.ioctls == [] and not k.armed and w.agent_pid is None
    assert any("ignoring a heartbeat" in m for m in logs.lines(logging.WARNING))


def test_watchdog_kernel_error_is_logged_once_at_err_not_raised(wd_env):
    """A pat that fails is an error, not a wall message (EMERG is the fence's), and it is
    logged once, not on every heartbeat; a recovery is logged too."""
    cfg, agent, _ = wd_env
    w, k, dev, logs = watchdog_with_kernel(cfg)
    good = k.ioctl

    def broken(fd, req, arg):
        raise OSError(6, "Device not configured")
    k.ioctl = broken
    now = time.monotonic()
    for i in range(5):
        w.heartbeat(agent.pid, True, now + i)
    errors = [m for m in logs.lines(logging.ERROR) if "kernel watchdog" in m]
    assert len(errors) == 1 and "Device not configured" in errors[0], logs.lines()
    assert not logs.lines(hoster_ha.EMERG) and not logs.lines(hoster_ha.ALERT), logs.lines()
    k.ioctl = good
    w.heartbeat(agent.pid, True, now + 5)
    assert any("works again" in m for m in logs.lines(hoster_ha.NOTICE)), logs.lines()
    k.ioctl = broken
    w.heartbeat(agent.pid, True, now + 6)  # a new failure after a recovery: logged again
    assert len([m for m in logs.lines(logging.ERROR) if "kernel watchdog" in m]) == 2


def test_stand_down_disarms_the_kernel_watchdog(wd_env):
    cfg, agent, _ = wd_env
    w, k, dev, _ = watchdog_with_kernel(cfg)
    w.heartbeat(agent.pid, True, time.monotonic())
    hoster_ha.write_pid_file(w.paths.wd_pid)     # as main() does
    w.stand_down()
    assert dev.args() == [WD_ACTIVE | 34, 0] and not k.armed
    assert not os.path.exists(w.paths.wd_pid) and not os.path.exists(w.paths.wd_ack)


def test_fence_does_not_disarm_the_kernel_watchdog(wd_env):
    """A fence that hangs must still be reset by the kernel: fence() stands down with
    disarm=False.  (Debug-mode cfg with fake commands: the fence only logs.)"""
    cfg, agent, node = wd_env
    assert cfg.debug
    w, k, dev, logs = watchdog_with_kernel(cfg)
    now = time.monotonic()
    w.heartbeat(agent.pid, True, now)
    w.heartbeat(agent.pid, True, now + 0.5)
    reason = w.check(now + 0.5 + cfg.watchdog_timeout)
    assert reason and "no heartbeat" in reason
    assert w.fence(reason) == 1
    assert dev.args() == [WD_ACTIVE | 34] * 2 and k.armed  # no 0 sent: still armed
    assert agent.poll() is None                 # debug: the SIGKILL is only logged
    text = "\n".join(logs.lines())
    assert "(DEBUG) would SIGKILL" in text and "(DEBUG) would reboot" in text
    assert not os.path.exists(w.paths.wd_ack)
    calls = node.calls()
    assert "shutdown" not in calls and "reboot" not in calls and "bhyvectl" not in calls
