"""pand_jax.hugepages: the command-line tools restart once with glibc.malloc.hugetlb=1 where
the kernel takes transparent huge pages on advice, keeping the user's arguments and tunables."""

import os
import subprocess
import sys
import textwrap

import pytest

from pand_jax import hugepages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = ("train", "evaluate", "predict", "export", "reproduce", "convert_weights")
BENCHES = ("cpu_ops", "data", "inference", "losses", "nsd_step", "student", "teacher")
THP = "/sys/kernel/mm/transparent_hugepage"


class Relaunched(Exception):
    pass


@pytest.fixture
def execve(monkeypatch):
    """Records os.execve's arguments instead of replacing the test process."""
    calls = []

    def record(path, argv, env):
        calls.append((path, argv, env))
        raise Relaunched

    monkeypatch.setattr(os, "execve", record)
    return calls


@pytest.mark.parametrize(
    "thp, glibc, tunables, relaunches",
    [
        ("madvise", (2, 36), None, True),
        ("madvise", (2, 35), "glibc.malloc.tcache_count=0", True),
        ("madvise", (2, 36), "glibc.malloc.hugetlb=0", False),  # the user's value stands
        ("madvise", (2, 34), None, False),  # glibc without the tunable
        ("madvise", (), None, False),  # not glibc (musl, macOS)
        ("always", (2, 36), None, False),  # huge pages without advice
        ("never", (2, 36), None, False),
        ("", (2, 36), None, False),  # no THP in this kernel
    ],
)
def test_relaunch_only_where_it_helps(monkeypatch, execve, thp, glibc, tunables, relaunches):
    monkeypatch.setattr(hugepages, "transparent_huge_pages", lambda: thp)
    monkeypatch.setattr(hugepages, "glibc_version", lambda: glibc)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-u", "train.py", "--demo"])
    if tunables is None:
        monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    else:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    if not relaunches:
        hugepages.relaunch_with_huge_pages()
        assert execve == []
        return
    with pytest.raises(Relaunched):
        hugepages.relaunch_with_huge_pages()
    [(path, argv, env)] = execve
    assert path == sys.executable and argv == [sys.executable, "-u", "train.py", "--demo"]
    expected = (
        "glibc.malloc.hugetlb=1" if tunables is None else tunables + ":glibc.malloc.hugetlb=1"
    )
    assert env["GLIBC_TUNABLES"] == expected
    assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == {
        k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"
    }


def test_a_failed_restart_runs_on(monkeypatch):
    monkeypatch.setattr(hugepages, "transparent_huge_pages", lambda: "madvise")
    monkeypatch.setattr(hugepages, "glibc_version", lambda: (2, 36))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)

    def fail(*args):
        raise PermissionError("no exec here")

    monkeypatch.setattr(os, "execve", fail)
    assert hugepages.relaunch_with_huge_pages() is None


@pytest.mark.parametrize(
    "text, mode",
    [
        ("always [madvise] never\n", "madvise"),
        ("[always] madvise never\n", "always"),
        ("always madvise [never]\n", "never"),
        ("garbage\n", ""),
    ],
)
def test_transparent_huge_pages_reads_the_selected_mode(tmp_path, text, mode):
    path = tmp_path / "enabled"
    path.write_text(text)
    assert hugepages.transparent_huge_pages(str(path)) == mode
    assert hugepages.transparent_huge_pages(str(tmp_path / "missing")) == ""


def test_every_tool_and_bench_relaunches_first():
    """Each top-level command restarts before it imports JAX (so the restart costs no import);
    each bench script restarts too, so benchmarks measure what the commands run."""
    script = textwrap.dedent(f"""
        import os, runpy, sys
        from pand_jax import hugepages
        hugepages.transparent_huge_pages = lambda: "madvise"
        hugepages.glibc_version = lambda: (2, 36)
        os.environ.pop("GLIBC_TUNABLES", None)
        class Relaunched(Exception):
            pass
        def execve(path, argv, env):
            raise Relaunched("jax imported" if "jax" in sys.modules else "before jax")
        os.execve = execve
        for path in {[f"{t}.py" for t in TOOLS] + [f"bench/{b}.py" for b in BENCHES]!r}:
            sys.path.insert(0, os.path.dirname(os.path.abspath(path)))  # as `python path` does
            try:
                runpy.run_path(path, run_name="__main__")
                print(path, "ran without restarting")
            except Relaunched as e:
                print(path, e)
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert {f"{t}.py": lines[f"{t}.py"] for t in TOOLS} == {f"{t}.py": "before jax" for t in TOOLS}
    assert all(lines[f"bench/{b}.py"] != "ran without restarting" for b in BENCHES), lines


@pytest.mark.parametrize("mode", ["madvise", "always", "never", ""])
def test_the_restart_backs_malloc_with_huge_pages(tmp_path, mode):
    """A real restart in a child that reads THP mode `mode` (injected): under `madvise` (with a
    glibc that has the tunable) it runs twice, with the user's tunables and arguments kept and
    the tunable added, otherwise once, unchanged. Then, by this machine's own THP mode, its
    64 MiB malloc's mapping (/proc/self/smaps):
    - `never` or no THP: not eligible for huge pages (THPeligible 0), none in it;
    - `madvise`: eligible, and at least 32 MiB in huge pages, exactly when the restart asked
      (glibc.malloc.hugetlb=1: malloc advises MADV_HUGEPAGE, and an advised fault compacts
      memory for a huge page); else neither;
    - `always`: eligible whatever the advice; at least 32 MiB in huge pages where a fault
      compacts memory for one (advised, or the kernel's defrag mode `always`); without that
      the kernel takes only huge pages it finds free, so the figure depends on the machine's
      memory and only its unit is asserted (whole huge pages)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        textwrap.dedent(f"""
        import ctypes, os, sys
        from pand_jax import hugepages
        hugepages.transparent_huge_pages = lambda: {mode!r}
        print("start", sys.argv[1:], flush=True)
        hugepages.relaunch_with_huge_pages()
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        size = 64 << 20
        address = libc.malloc(size)
        ctypes.memset(address, 1, size)
        huge, eligible, inside = 0, None, False
        for line in open("/proc/self/smaps"):
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                inside = start <= address < end
            elif inside and first == "AnonHugePages:":
                huge = int(line.split()[1])
            elif inside and first == "THPeligible:":
                eligible = int(line.split()[1])
        print("tunables", os.environ.get("GLIBC_TUNABLES"))
        print("eligible", eligible)
        print("huge_kib", huge)
    """)
    )
    env = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    out = subprocess.run(
        [sys.executable, str(probe), "a", "--b"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    restarts = mode == "madvise" and hugepages.glibc_version() >= hugepages.GLIBC_WITH_TUNABLE
    assert lines[:-3] == ["start ['a', '--b']"] * (2 if restarts else 1)
    tunables = "glibc.malloc.tcache_count=0" + (":glibc.malloc.hugetlb=1" if restarts else "")
    assert lines[-3] == f"tunables {tunables}"
    eligible = lines[-2].split()[1]
    huge_kib = int(lines[-1].split()[1])
    kernel = hugepages.transparent_huge_pages()
    if kernel in ("never", ""):
        # a kernel without THP may not print the field at all
        assert eligible in ("0", "None") and huge_kib == 0, (kernel, lines)
    elif kernel == "madvise":
        if restarts:
            assert eligible == "1" and huge_kib >= 32 << 10, (kernel, lines)
        else:
            assert eligible == "0" and huge_kib == 0, (kernel, lines)
    else:
        assert kernel == "always", kernel
        assert eligible == "1", (kernel, lines)
        defrag = hugepages.transparent_huge_pages(f"{THP}/defrag")
        if restarts or defrag == "always":
            assert huge_kib >= 32 << 10, (kernel, defrag, lines)
        else:
            with open(f"{THP}/hpage_pmd_size") as f:
                assert huge_kib % (int(f.read()) >> 10) == 0, (kernel, defrag, lines)
