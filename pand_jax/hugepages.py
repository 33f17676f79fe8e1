"""Huge pages for XLA:CPU's step memory: the command-line tools restart once with glibc's
`glibc.malloc.hugetlb=1` tunable.

XLA:CPU takes each execution's temporary buffer from malloc (about 160 MB for a MobileNet-V2
224 px eval step at batch 16, more in training), and glibc maps a block that large afresh from
the kernel and unmaps it on free, so every step writes to new memory: one page fault per 4 KiB
page (85k per ResNet-18 224 px training step, 224k per MobileNet-V2 one, up to half a second of
kernel time on 2 cores). With the tunable, malloc asks the kernel (madvise) to back its
mappings with 2 MiB transparent huge pages, which Linux does when
/sys/kernel/mm/transparent_hugepage/enabled reads `madvise` (the usual default; `always` needs
no advice, `never` ignores it): a few hundred faults per step instead (bench/RESULTS.md).

glibc reads tunables only when a process starts, hence the restart (os.execve: the same process
id, arguments and streams, before JAX is imported). A `glibc.malloc.hugetlb` value already in
GLIBC_TUNABLES is kept (`=0` turns this off). Code that imports pand_jax as a library can start
Python with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` itself.
"""

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
GLIBC_WITH_TUNABLE = (2, 35)
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages(path: str = THP_ENABLED) -> str:
    """The kernel's THP mode ("always", "madvise" or "never"); "" where there is none."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, ...]:
    """The running C library's version if it is glibc, else ()."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()
    except (AttributeError, ValueError, OSError):  # no confstr (macOS, Windows) or not glibc
        return ()


def relaunch_with_huge_pages() -> None:
    """Restart this command with the tunable set where it helps; returns where it does not."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (
        TUNABLE in tunables
        or glibc_version() < GLIBC_WITH_TUNABLE
        or transparent_huge_pages() != "madvise"
    ):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, f"{TUNABLE}=1"])))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # cannot start the interpreter again: run on without huge pages
        pass
