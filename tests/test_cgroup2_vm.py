"""Quick host-side tests of scripts/cgroup2-vm's pure parts (nothing here boots a guest).

The script has no .py suffix, so it is loaded from its path; its ``main`` is guarded.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shlex
import stat
import struct
import subprocess
import sys
import time
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "cgroup2-vm"


def load_script() -> ModuleType:
    loader = SourceFileLoader("cgroup2_vm", str(SCRIPT))
    spec = spec_from_loader("cgroup2_vm", loader)
    assert spec is not None
    module = module_from_spec(spec)
    sys.modules["cgroup2_vm"] = module  # dataclasses look their module up here
    loader.exec_module(module)
    return module


vm = load_script()


# --------------------------------------------------------------------------- modules

MODULES_DEP = """\
kernel/fs/9p/9p.ko.xz: kernel/fs/fscache/fscache.ko.xz kernel/fs/netfs/netfs.ko.xz \
kernel/net/9p/9pnet.ko.xz
kernel/fs/fscache/fscache.ko.xz: kernel/fs/netfs/netfs.ko.xz
kernel/fs/netfs/netfs.ko.xz:
kernel/net/9p/9pnet.ko.xz:
kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz
kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio-pci-modern-dev.ko
kernel/drivers/virtio/virtio-pci-modern-dev.ko:
kernel/fs/overlayfs/overlay.ko.xz:
"""
BUILTIN = "kernel/drivers/virtio/virtio_ring.ko\nkernel/drivers/virtio/virtio.ko\n"


def test_normalise_module_strips_dirs_suffixes_and_dashes() -> None:
    assert vm.normalise_module("kernel/a/virtio-pci-modern-dev.ko.xz") == "virtio_pci_modern_dev"
    assert vm.normalise_module("9pnet.ko") == "9pnet"
    assert vm.normalise_module("overlay") == "overlay"


def test_resolve_modules_puts_dependencies_first_once_and_skips_builtins() -> None:
    deps = vm.parse_modules_dep(MODULES_DEP)
    builtin = vm.parse_modules_builtin(BUILTIN)
    order = vm.resolve_modules(["virtio_pci", "9pnet_virtio", "9p", "overlay"], deps, builtin)
    names = [vm.normalise_module(p) for p in order]
    assert names == [
        "virtio_pci_modern_dev",
        "virtio_pci",
        "9pnet",
        "9pnet_virtio",
        "netfs",
        "fscache",
        "9p",
        "overlay",
    ]
    assert order[0] == "kernel/drivers/virtio/virtio-pci-modern-dev.ko"
    assert len(set(order)) == len(order)


def test_resolve_modules_names_a_missing_module_and_who_needs_it() -> None:
    deps = vm.parse_modules_dep("kernel/a.ko: kernel/b.ko\n")
    with pytest.raises(vm.StepError, match=r"kernel module b \(needed by a\)"):
        vm.resolve_modules(["a"], deps, set())


def test_resolve_modules_rejects_cycles() -> None:
    deps = vm.parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(vm.StepError, match="cycle"):
        vm.resolve_modules(["a"], deps, set())


def test_read_module_decompresses_xz_and_gz(tmp_path: Path) -> None:
    (tmp_path / "m.ko.xz").write_bytes(lzma.compress(b"ELFxz", format=lzma.FORMAT_XZ))
    (tmp_path / "m.ko.gz").write_bytes(gzip.compress(b"ELFgz"))
    (tmp_path / "m.ko").write_bytes(b"ELF")
    assert vm.read_module(tmp_path / "m.ko.xz") == b"ELFxz"
    assert vm.read_module(tmp_path / "m.ko.gz") == b"ELFgz"
    assert vm.read_module(tmp_path / "m.ko") == b"ELF"
    (tmp_path / "m.ko.zst").write_bytes(b"")
    with pytest.raises(vm.StepError, match="zstd"):
        vm.read_module(tmp_path / "m.ko.zst")


def fake_kernel_tree(tmp_path: Path, version: str, dep: str) -> None:
    (tmp_path / "boot").mkdir(exist_ok=True)
    (tmp_path / "boot" / f"vmlinuz-{version}").write_bytes(b"")
    moddir = tmp_path / "modules" / version
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(dep)
    (moddir / "modules.builtin").write_text(BUILTIN)


def test_find_kernel_takes_the_newest_kernel_that_has_9p(tmp_path: Path) -> None:
    fake_kernel_tree(tmp_path, "6.1.0-9-amd64", MODULES_DEP)
    fake_kernel_tree(tmp_path, "6.1.0-10-amd64", MODULES_DEP)
    fake_kernel_tree(tmp_path, "6.1.0-11-cloud-amd64", "kernel/fs/overlayfs/overlay.ko.xz:\n")
    kernel = vm.find_kernel(tmp_path / "boot", tmp_path / "modules")
    assert kernel is not None
    assert kernel.version == "6.1.0-10-amd64"
    assert vm.find_kernel(tmp_path / "nothing", tmp_path / "modules") is None


# --------------------------------------------------------------------------- binaries


def elf_header(with_interp: bool) -> bytes:
    """A minimal ELF64 header with one program header (PT_INTERP or PT_LOAD)."""
    header = bytearray(64 + 56)
    header[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    struct.pack_into("<I", header, 64, 3 if with_interp else 1)
    return bytes(header)


def test_static_busybox_detection() -> None:
    assert vm.elf_interpreter_free(elf_header(with_interp=False))
    assert not vm.elf_interpreter_free(elf_header(with_interp=True))
    assert not vm.elf_interpreter_free(b"#!/bin/sh\n")


def test_find_static_busybox_skips_dynamic_ones(tmp_path: Path) -> None:
    (tmp_path / "dynamic").write_bytes(elf_header(with_interp=True))
    (tmp_path / "static").write_bytes(elf_header(with_interp=False))
    paths = [str(tmp_path / n) for n in ("absent", "dynamic", "static")]
    assert vm.find_static_busybox(paths) == tmp_path / "static"
    assert vm.find_static_busybox(paths[:2]) is None


def bzimage(payload: bytes, setup_sects: int = 2) -> bytes:
    image = bytearray((setup_sects + 1) * 512)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<II", image, 0x248, 16, len(payload))
    return bytes(image) + b"\0" * 16 + payload + b"trailer"


def test_extract_vmlinux_from_xz_and_gzip_bzimages() -> None:
    elf = b"\x7fELF" + b"kernel" * 100
    xz = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    assert vm.extract_vmlinux(bzimage(xz + b"\x01\x02\x03\x04")) == elf
    assert vm.extract_vmlinux(bzimage(gzip.compress(elf))) == elf
    assert vm.extract_vmlinux(elf) == elf
    with pytest.raises(ValueError, match="HdrS"):
        vm.extract_vmlinux(b"\0" * 1024)
    with pytest.raises(ValueError, match="compression"):
        vm.extract_vmlinux(bzimage(b"\x28\xb5\x2f\xfd zstd"))


def test_cached_vmlinux_extracts_once_and_replaces_stale_copies(tmp_path: Path) -> None:
    elf = b"\x7fELF" + b"k" * 64
    image = tmp_path / "vmlinuz-6.1.0-1-amd64"
    image.write_bytes(bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ)))
    kernel = vm.Kernel("6.1.0-1-amd64", image, tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "vmlinux-6.1.0-1-amd64-old").write_bytes(b"stale")
    (cache / "vmlinux-5.10.0-1-amd64-other").write_bytes(b"other kernel")
    path, extracted = vm.cached_vmlinux(kernel, cache)
    assert extracted and path.read_bytes() == elf
    assert vm.cached_vmlinux(kernel, cache) == (path, False)
    assert sorted(p.name for p in cache.iterdir()) == [
        "vmlinux-5.10.0-1-amd64-other",
        path.name,
    ]


# --------------------------------------------------------------------------- initramfs


def read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """A minimal newc reader: {name: (mode, data, rdev)} up to the trailer."""
    entries = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[data_start : data_start + size], rdev)
        offset = data_start + size + (-size % 4)


def test_cpio_newc_round_trips_files_dirs_and_device_nodes() -> None:
    archive = vm.cpio_newc(
        [
            vm.CpioEntry("dev", stat.S_IFDIR | 0o755),
            vm.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
            vm.CpioEntry("init", stat.S_IFREG | 0o755, b"#!/bin/busybox sh\n"),
            vm.CpioEntry("odd", stat.S_IFREG | 0o644, b"12345"),
        ]
    )
    assert len(archive) % 4 == 0
    entries = read_cpio(archive)
    assert entries["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    assert entries["init"] == (stat.S_IFREG | 0o755, b"#!/bin/busybox sh\n", (0, 0))
    assert entries["odd"][1] == b"12345"
    assert stat.S_ISDIR(entries["dev"][0])


@pytest.mark.parametrize("script", ["INIT_SCRIPT", "STAGE2_SCRIPT"])
def test_guest_scripts_parse_as_posix_sh(script: str) -> None:
    proc = subprocess.run(
        ["sh", "-n"], input=getattr(vm, script), capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- commands


def make_job(tmp_path: Path, args: tuple[str, ...]) -> object:
    """A job whose 'python' prints its argv and environment, one item a line.

    Its 'busybox' runs the applet named first with the host's sh, as busybox would.
    """
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "ARG %s\\n" "$@"\nenv | sed "s/^/ENV /"\n')
    fake.chmod(0o755)
    busybox = tmp_path / "busybox"
    busybox.write_text('#!/bin/sh\nshift\nexec /bin/sh "$@"\n')
    busybox.chmod(0o755)
    return vm.GuestJob(
        checkout=str(tmp_path),
        python=str(fake),
        pytest_args=args,
        env=vm.guest_env({"NSBOX_SOAK": "1", "SECRET": "x", "CI": "true"}, 120),
        dropper=(),
        busybox=str(busybox),
    )


def source_and_eval(tmp_path: Path, job: object, var: str) -> list[str]:
    """What the guest does: source the quoted config, then eval one command from it."""
    config = tmp_path / "config"
    config.write_text(vm.guest_config(vm.guest_config_values(job, ["01-a.ko"])))
    proc = subprocess.run(
        ["sh", "-c", f'. "$0" && eval "${var}"', str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_root_command_survives_quoting_and_sets_a_clean_env(tmp_path: Path) -> None:
    job = make_job(tmp_path, ("tests/x.py", "-k", "a and not b's $HOME", "--junitxml=j-{run}.xml"))
    out = source_and_eval(tmp_path, job, "ROOT_CMD")
    args = [line[4:] for line in out if line.startswith("ARG ")]
    assert args == [
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "--basetemp=/tmp/pytest-root",
        "tests/x.py",
        "-k",
        "a and not b's $HOME",
        "--junitxml=j-root.xml",
    ]
    env = {
        line[4:].partition("=")[0]: line[4:].partition("=")[2] for line in out if line[:4] == "ENV "
    }
    assert env["NSBOX_EXPECT_CGROUP_V2"] == "1"
    assert env["NSBOX_SOAK"] == "1" and env["CI"] == "true"
    assert "SECRET" not in env
    assert env["HOME"] == "/root" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["COLUMNS"] == "120"


def test_rootless_command_moves_the_shell_into_the_delegated_cgroup_first(tmp_path: Path) -> None:
    job = make_job(tmp_path, ("-q", "--junitxml=j-{run}.xml"))
    argv = shlex.split(vm.rootless_command(job).partition(" && ")[2])
    assert argv[1:5] == [
        "sh",
        "-c",
        'echo $$ > "$0" && exec "$@"',
        vm.DELEGATED_CGROUP + "/cgroup.procs",
    ]
    assert "--basetemp=/tmp/pytest-nsbox-ci" in argv
    assert "--junitxml=j-rootless.xml" in argv
    assert "HOME=/tmp/home-nsbox-ci" in argv and "USER=nsbox-ci" in argv


def test_rootless_command_runs_pytest_in_the_cgroup_it_wrote(tmp_path: Path) -> None:
    """With a plain file standing in for cgroup.procs, the pid written is pytest's own."""
    job = make_job(tmp_path, ("-q",))
    procs = tmp_path / "procs"
    command = vm.rootless_command(job).replace(vm.DELEGATED_CGROUP + "/cgroup.procs", str(procs))
    fake = Path(job.python)
    fake.write_text('#!/bin/sh\necho "PID $$"\n')
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PID", procs.read_text().strip()]


def test_dropper_prefers_setpriv_then_runuser() -> None:
    assert vm.dropper_argv("/usr/bin/setpriv", "/sbin/runuser", "u") == [
        "/usr/bin/setpriv",
        "--reuid=u",
        "--regid=u",
        "--clear-groups",
        "--",
    ]
    assert vm.dropper_argv(None, "/sbin/runuser", "u") == ["/sbin/runuser", "-u", "u", "--"]
    with pytest.raises(vm.StepError, match="setpriv"):
        vm.dropper_argv(None, None, "u")


def test_qemu_command_shares_root_read_only_and_checkout_read_write(tmp_path: Path) -> None:
    cmd = vm.qemu_command(
        "qemu",
        tmp_path / "vmlinux",
        tmp_path / "initrd",
        console_log=tmp_path / "console.log",
        checkout=Path("/work/main"),
        results=tmp_path / "results",
        kvm=False,
    )
    shares = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "-virtfs"]
    assert any("path=/," in s and "mount_tag=hostroot" in s and "readonly=on" in s for s in shares)
    checkout = next(s for s in shares if "mount_tag=checkout" in s)
    assert "path=/work/main," in checkout and "readonly" not in checkout
    assert cmd[cmd.index("-accel") + 1] == "tcg,thread=multi"
    assert cmd[cmd.index("-machine") + 1] == "q35"
    assert cmd[cmd.index("-smp") + 1] == "2"
    assert "-no-reboot" in cmd
    kvm_cmd = vm.qemu_command(
        "qemu",
        tmp_path / "v",
        tmp_path / "i",
        console_log=tmp_path / "c",
        checkout=tmp_path,
        results=tmp_path,
        kvm=True,
    )
    assert kvm_cmd[kvm_cmd.index("-accel") + 1] == "kvm"


def test_kvm_only_with_hardware_virtualisation_flags() -> None:
    cpuinfo = "processor\t: 0\nflags\t\t: fpu sse2 {}\n"
    assert not vm.kvm_usable(cpuinfo.format("hypervisor"), dev_kvm_accessible=True)
    assert vm.kvm_usable(cpuinfo.format("vmx"), dev_kvm_accessible=True)
    assert vm.kvm_usable(cpuinfo.format("svm"), dev_kvm_accessible=True)
    assert not vm.kvm_usable(cpuinfo.format("vmx"), dev_kvm_accessible=False)


def test_apt_install_is_minimal_and_skips_initramfs_tools() -> None:
    cmds = vm.apt_commands(["qemu-system-x86", "busybox-static"])
    assert cmds[0][:2] == ["apt-get", "update"]
    assert "--no-install-recommends" in cmds[1] and cmds[1][-2:] == [
        "qemu-system-x86",
        "busybox-static",
    ]
    env = vm.apt_env({"PATH": "/bin"})
    assert env["INITRD"] == "No" and env["PATH"] == "/bin"


def test_missing_tools_as_non_root_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vm, "locate_tools", lambda: (None, None, Path("/bin/busybox")))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(vm.StepError) as info:
        vm.ensure_tools(vm.Deadline.after(10))
    assert info.value.code == vm.EXIT_QEMU_UNAVAILABLE
    assert "qemu-system-x86" in str(info.value) and "linux-image-amd64" in str(info.value)
    assert "busybox-static" not in str(info.value)


def test_untraversable_ancestors_lists_dirs_others_cannot_enter(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    checkout = closed / "open" / "checkout"
    checkout.mkdir(parents=True)
    closed.chmod(0o700)
    try:
        assert str(closed) in vm.untraversable_ancestors(checkout)
        assert str(checkout.parent) not in vm.untraversable_ancestors(checkout)
    finally:
        closed.chmod(0o755)


# --------------------------------------------------------------------------- status


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("root=0\nrootless=0\n", 0),
        ("root=1\nrootless=0\n", 1),
        ("root=0\nrootless=2\n", 2),
        ("root=5\nrootless=1\n", 5),
        ("root=0\nrootless=setup-failed\n", vm.EXIT_GUEST_SETUP),
        ("root=1\nrootless=setup-failed\n", 1),
        ("root=0\n", vm.EXIT_NO_STATUS),
        ("", vm.EXIT_NO_STATUS),
        ("root=garbage\nrootless=0\n", vm.EXIT_NO_STATUS),
    ],
)
def test_exit_status_is_root_first_then_rootless(text: str, code: int) -> None:
    assert vm.final_exit_code(vm.parse_status(text))[0] == code


def test_missing_status_is_explained() -> None:
    code, problems = vm.final_exit_code({"root": "0"})
    assert code == vm.EXIT_NO_STATUS
    assert problems == ["the rootless run produced no exit status"]


def test_no_status_is_91_only_when_qemu_itself_failed() -> None:
    assert vm.no_status_code(False, 1, b"") == vm.EXIT_QEMU_UNAVAILABLE
    assert vm.no_status_code(False, 1, b"[ 0.1] Linux version") == vm.EXIT_NO_STATUS
    assert vm.no_status_code(False, 0, b"") == vm.EXIT_NO_STATUS
    assert vm.no_status_code(True, None, b"") == vm.EXIT_NO_STATUS


# --------------------------------------------------------------------------- console


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_console_stream_echoes_text_and_records_split_markers() -> None:
    out = io.StringIO()
    clock = FakeClock()
    stream = vm.ConsoleStream(out, clock)
    stream.feed_bytes(b"booting\r\n@@cgroup2-vm:job-")
    assert "@@" not in out.getvalue()
    clock.now = 105.0
    stream.feed_bytes(b"start@@\r\n..F")
    assert out.getvalue().endswith("..F")
    stream.feed_bytes("é\n@@cgroup2-vm:run-end:root:1@@\n".encode()[:1])
    stream.feed_bytes("é\n@@cgroup2-vm:run-end:root:1@@\n".encode()[1:])
    stream.close()
    assert stream.markers == {"job-start": 105.0, "run-end:root:1": 105.0}
    assert out.getvalue() == (
        "booting\ncgroup2-vm: [guest] job-start\n..Fé\ncgroup2-vm: [guest] run-end:root:1\n"
    )


def test_guest_timings_from_markers() -> None:
    result = vm.GuestResult(
        0,
        False,
        {
            "job-start": 15.0,
            "run-start:root": 15.0,
            "run-end:root:0": 45.0,
            "run-start:rootless": 45.5,
            "run-end:rootless:1": 75.5,
            "halt": 76.0,
        },
        started=10.0,
        ended=76.5,
    )
    assert vm.guest_timings(result) == [
        ("boot to job start", 5.0),
        ("root run", 30.0),
        ("rootless run", 30.0),
        ("shutdown", 0.5),
    ]
    assert vm.format_timings([("a", 1.25), ("b", None)]) == "a 1.2s, b -"


def test_tail_lines_drops_carriage_returns() -> None:
    assert vm.tail_lines("a\r\nb\r\nc\r\n", 2) == "b\nc"


# --------------------------------------------------------------------------- args, dirs


def test_parse_args_defaults_and_passthrough() -> None:
    args = vm.parse_args([])
    assert args.pytest_args == vm.DEFAULT_PYTEST_ARGS
    assert args.timeout == 900
    args = vm.parse_args(["--timeout", "60", "--keep", "--", "-x", "--lf", "tests/a.py"])
    assert (args.timeout, args.keep, args.pytest_args) == (60, True, ("-x", "--lf", "tests/a.py"))
    with pytest.raises(SystemExit):
        vm.parse_args(["--timeout", "0"])


def test_stale_workdirs_are_only_dead_unkept_own_ones(tmp_path: Path) -> None:
    for name in ("cgroup2-vm-111-abc", "cgroup2-vm-222-def", "cgroup2-vm-333-ghi", "cgroup2-vm-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "cgroup2-vm-333-ghi" / vm.KEPT_MARKER).touch()
    stale = vm.stale_workdirs(tmp_path, alive=lambda pid: pid == 222)
    assert [p.name for p in stale] == ["cgroup2-vm-111-abc"]


def test_deadline_counts_down() -> None:
    clock = FakeClock()
    deadline = vm.Deadline.after(10, clock)
    clock.now += 4
    assert deadline.left() == 6 and not deadline.expired()
    clock.now += 7
    assert deadline.left() == 0 and deadline.expired()


def test_cache_dir_follows_env() -> None:
    assert vm.default_cache_dir({"NSBOX_VM_CACHE": "/c"}) == Path("/c")
    assert vm.default_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/pytest-nsbox")
    assert vm.default_cache_dir({"HOME": "/h"}) == Path("/h/.cache/pytest-nsbox")


# --------------------------------------------------------------------------- run_guest


def test_run_guest_kills_a_chatty_guest_at_the_deadline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A guest that never stops printing must still be stopped by --timeout."""
    console = tmp_path / "console.log"
    spam = ["sh", "-c", 'while :; do echo spam >> "$0"; done', str(console)]
    result = vm.run_guest(spam, console, tmp_path / "qemu.log", vm.Deadline.after(0.3))
    assert result.timed_out and result.returncode is None
    size = console.stat().st_size
    time.sleep(0.1)
    assert console.stat().st_size == size, "the fake QEMU is still writing"
    assert "spam" in capsys.readouterr().out


def test_run_guest_streams_until_exit_and_records_markers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    console = tmp_path / "console.log"
    guest = [
        "sh",
        "-c",
        'printf "hello\\r\\n@@cgroup2-vm:job-start@@\\r\\n" >> "$0"; exit 3',
        str(console),
    ]
    result = vm.run_guest(guest, console, tmp_path / "qemu.log", vm.Deadline.after(10))
    assert (result.returncode, result.timed_out) == (3, False)
    assert list(result.markers) == ["job-start"]
    assert capsys.readouterr().out == "hello\ncgroup2-vm: [guest] job-start\n"
