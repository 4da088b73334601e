"""The confined process's own program: run by `sandbox.run_python` as `python -I -S -c <this
file's text>`, never imported (it confines the process that runs it, then runs the tool's code).

It cannot trust anything it inherits but its file descriptors. argv: the mount point of the new
root (an empty directory of the caller's), cpu seconds, memory bytes, processes, file bytes, tmp
bytes, the uid to run as (-1: unprivileged, a user namespace); stdin: the code. Kept one statement
per line, in the order it runs; `sandbox.py`'s docstring says what each layer does.
"""

# One statement per line, in the order it runs, as it ran as a string inside sandbox.py: not
# reformatted. F821: `fail` and `bind` name `ctypes` and `libc`, deleted at the end once unused.
# ruff: noqa: E501, E701, E702, E731, F821
# fmt: off
if __name__ != "__main__":
    raise ImportError("rlhf_cluster.tools.sandbox_child is the confined process's program (sandbox.run_python runs it)")
import ctypes
import os
import resource
import signal
import struct
import sys
from typing import NoReturn

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.syscall.restype = ctypes.c_long
mnt = sys.argv[1]
cpu_s, memory, nproc, fsize, tmp_bytes, uid = map(int, sys.argv[2:8])
code = sys.stdin.read()
def fail(what: str) -> NoReturn:
    sys.stderr.write(f"SANDBOX-SETUP: {what}: {os.strerror(ctypes.get_errno())}\n"); sys.stderr.flush(); os._exit(97)
# Per-architecture numbers: (audit arch, pivot_root, clone, clone3, prctl, the denied syscalls).
ARCHES = {
    "x86_64": (0xC000003E, 155, 56, 435, 157, (
        101, 103, 134, 153, 154, 155, 161, 163, 165, 166, 167, 168, 169, 170, 171, 172, 173, 175, 176, 179,
        212, 246, 248, 249, 250, 272, 298, 303, 304, 308, 310, 311, 312, 313, 320, 321, 323,
        425, 426, 427, 428, 429, 430, 431, 432, 433, 442)),
    "aarch64": (0xC00000B7, 41, 220, 435, 167, (
        117, 116, 39, 40, 41, 51, 60, 89, 97, 104, 105, 106, 142, 161, 162, 217, 218, 219, 224, 225, 241,
        264, 265, 268, 270, 271, 272, 273, 280, 282, 294, 425, 426, 427, 428, 429, 430, 431, 432, 433, 442)),
}
arch = ARCHES.get(os.uname().machine)
if arch is None:
    ctypes.set_errno(0); fail(f"seccomp: unsupported architecture {os.uname().machine}")
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x4000000, 0x8000000, 0x10000000, 0x20000000, 0x40000000
root = uid >= 0
outer_uid, outer_gid = os.getuid(), os.getgid()
os.umask(0o022)
if libc.unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | (0 if root else CLONE_NEWUSER)) != 0:
    fail("unshare(net, pid, mount, ipc, uts)")
if not root:
    # Only the caller's own uid and gid exist in the namespace (files on the tmpfs need a mapped
    # owner), as 0: the namespace's root alone may set its IPC limits. Its capabilities go below.
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {outer_uid} 1"), ("gid_map", f"0 {outer_gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError as exc:
        ctypes.set_errno(exc.errno or 0); fail("user namespace mapping")
child = os.fork()
if child:
    _, status = os.waitpid(child, 0)
    if os.WIFEXITED(status):
        os._exit(os.WEXITSTATUS(status))
    # An exit status alone cannot tell `sys.exit(139)` from a SIGSEGV: a signal death is marked.
    sys.stderr.write(f"\nSANDBOX-SIGNAL: {os.WTERMSIG(status)}\n"); sys.stderr.flush()
    os._exit(128 + os.WTERMSIG(status))
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
# The filesystem view: a tmpfs root holding read-only binds of what the interpreter needs, nothing else.
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 4096, 16384, 1 << 18
if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
    fail("mount(private)")
if libc.mount(b"tmpfs", mnt.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755") != 0:
    fail("mount(root tmpfs)")
def bind(src):
    dst = mnt + src
    if os.path.islink(src):  # a merged /usr: /bin -> usr/bin, /etc/localtime -> ...
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.readlink(src), dst)
        return
    if not os.path.exists(src) or os.path.lexists(dst):
        return
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "x").close()
    if libc.mount(src.encode(), dst.encode(), None, MS_BIND | MS_REC, None) != 0:
        fail(f"bind {src}")
system = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
python = sorted({os.path.abspath(p) for p in (sys.base_prefix, sys.base_exec_prefix)
                 if not any(p == s or p.startswith(s + "/") for s in system)})
etc = ["/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/nsswitch.conf"]
devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"]
try:
    for path in system + python + etc + devices:
        bind(path)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{mnt}/dev/{name}")
    for d in ("/dev/shm", "/proc", "/tmp"):
        os.makedirs(mnt + d)
except OSError as exc:
    ctypes.set_errno(exc.errno or 0); fail("build the filesystem view")
# A /proc of this PID namespace only: no other process (the caller's environment) is visible.
if libc.mount(b"proc", (mnt + "/proc").encode(), b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
    fail("mount(proc)")
# SysV shared memory lives in this IPC namespace (gone with it); cap it like /dev/shm, and remove
# a segment as soon as no process holds it.
try:
    for name, value in (("shmmax", tmp_bytes), ("shmall", tmp_bytes // os.sysconf("SC_PAGE_SIZE")), ("shm_rmid_forced", 1)):
        with open(f"{mnt}/proc/sys/kernel/{name}", "w") as f:
            f.write(str(value))
except OSError as exc:
    ctypes.set_errno(exc.errno or 0); fail("cap SysV shared memory")
# Everything so far read-only, recursively (mount_setattr, Linux 5.12; Landlock needs 5.13 anyway).
class MountAttr(ctypes.Structure): _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]
attr = MountAttr(1, 0, 0, 0)  # MOUNT_ATTR_RDONLY
if libc.syscall(442, -100, mnt.encode(), 0x8000, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:  # AT_RECURSIVE
    fail("read-only view")
for d in ("/tmp", "/dev/shm"):
    if libc.mount(b"tmpfs", (mnt + d).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777".encode()) != 0:
        fail(f"mount({d})")
os.chdir(mnt)
if libc.syscall(arch[1], b".", b".") != 0:  # pivot_root: the host's tree is stacked under the new root...
    fail("pivot_root")
if libc.umount2(b".", 2) != 0:  # ...and detached (MNT_DETACH): no path leads back to it
    fail("detach the host's root")
os.chdir("/tmp")
if root:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)  # clears every capability
else:
    class CapHeader(ctypes.Structure): _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class CapData(ctypes.Structure): _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    # Every capability in the namespace, for good: none in the bounding set, and uid 0 gains none
    # at execve (SECBIT_NOROOT, locked), then none held now.
    PR_CAPBSET_DROP, PR_SET_SECUREBITS = 24, 28
    cap = 0
    while libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) == 0:
        cap += 1
    if cap < 38 or libc.prctl(PR_SET_SECUREBITS, 0x3, 0, 0, 0) != 0:
        fail("drop the capability bounding set")
    if libc.capset(ctypes.byref(CapHeader(0x20080522, 0)), (CapData * 2)()) != 0:
        fail("drop capabilities")
# A change of credentials clears the parent-death signal: set it again (seccomp keeps it set).
libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
for limit, value in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, memory), (resource.RLIMIT_NPROC, nproc),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("no_new_privs")
# Landlock: every file access it knows is handled, so denied except beneath the view's paths
# (read and execute) and /tmp, /dev/shm (everything).
abi = libc.syscall(444, None, 0, 1)
if abi < 1:
    fail("landlock")
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1, 2, 4, 8
read = EXECUTE | READ_FILE | READ_DIR
write = WRITE_FILE | sum(1 << bit for bit in range(4, 13))  # REMOVE_DIR .. MAKE_SYM
truncate = (1 << 14) if abi >= 3 else 0
ioctl_dev = (1 << 15) if abi >= 5 else 0
everything = read | write | truncate | ioctl_dev | ((1 << 13) if abi >= 2 else 0)  # REFER from ABI 2
class RulesetAttr(ctypes.Structure): _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]
class PathBeneath(ctypes.Structure): _pack_ = 1; _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]
# TCP bind/connect (ABI 4) with no rule: none; abstract unix sockets and signals (ABI 6): this call's only.
ruleset_attr = RulesetAttr(everything, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
ruleset = libc.syscall(444, ctypes.byref(ruleset_attr), 8 if abi < 4 else 16 if abi < 6 else 24, 0)
if ruleset < 0:
    fail("landlock_create_ruleset")
rules = [(p, read) for p in system + python + ["/etc", "/proc"]]
rules += [("/dev", read | WRITE_FILE | truncate | ioctl_dev), ("/tmp", everything), ("/dev/shm", everything)]
for path, access in rules:
    if not os.path.exists(path):
        continue
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    rule = PathBeneath(access, fd)
    if libc.syscall(445, ruleset, 1, ctypes.byref(rule), 0) != 0:
        fail(f"landlock_add_rule {path}")
    os.close(fd)
if libc.syscall(446, ruleset, 0) != 0:
    fail("landlock_restrict_self")
os.close(ruleset)
# seccomp: a deny-list (EPERM) of kernel interfaces the code has no use for; clone3 answers ENOSYS
# (its flags are out of the filter's reach: the C library falls back to clone, whose flags are
# checked); another architecture's syscalls (x32, i386) kill the process.
LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06
ALLOW, KILL, EPERM, ENOSYS = 0x7FFF0000, 0x80000000, 0x50000 | 1, 0x50000 | 38
audit, _, clone, clone3, prctl, denied = arch
op = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
prog = [op(LD, 4), op(JEQ, audit, 1, 0), op(RET, KILL), op(LD, 0)]
if audit == 0xC000003E:
    prog += [op(JGE, 0x40000000, 0, 1), op(RET, KILL)]
for nr in denied:
    prog += [op(JEQ, nr, 0, 1), op(RET, EPERM)]
prog += [op(JEQ, clone3, 0, 1), op(RET, ENOSYS)]
prog += [op(JEQ, clone, 0, 4), op(LD, 16), op(JSET, 0x7E020000, 0, 1), op(RET, EPERM), op(RET, ALLOW)]  # CLONE_NEW*
prog += [op(JEQ, prctl, 0, 4), op(LD, 16), op(JEQ, PR_SET_PDEATHSIG, 0, 1), op(RET, EPERM), op(RET, ALLOW)]
prog += [op(RET, ALLOW)]
filters = ctypes.create_string_buffer(b"".join(prog))
class Fprog(ctypes.Structure): _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog), ctypes.addressof(filters))
if libc.prctl(PR_SET_SECCOMP, 2, ctypes.byref(fprog), 0, 0) != 0:  # SECCOMP_MODE_FILTER
    fail("seccomp")
del libc, ctypes, attr, ruleset_attr, rule, fprog, filters
exec(compile(code, "<tool>", "exec"), {"__name__": "__main__"})
