"""Writing results safely: atomic file replacement, a lock per output folder, and output folders that never
lose results.

- Every file is written to a unique temporary name beside its target, flushed to disk, then renamed over
  it: a reader (or a run killed at any point) sees the old file or the new one, never half of one.
- A write that fails (a full disk, a read-only folder) raises ``WriteError`` naming the file.
- ``OutputFolder`` takes a lock on the folder (``.fod.lock``, an ``flock``: released by the kernel when
  its process dies, so the lock of a killed run is taken over), refuses to replace results unless told
  to, writes a command's products into a fresh staging folder inside it and moves them into place only
  when the command has succeeded (``commit``): a failed run leaves the previous results whole, and a
  replaced run leaves none of its old products behind.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

LOCK_NAME = ".fod.lock"
MANIFEST = ".fod-manifest.json"  # the files fod wrote into an output folder: --overwrite replaces only those
STAGE_PREFIX = ".fod-tmp-"
TMP_MARK = ".tmp"  # temporary files are NAME.tmp-PID-RANDOM (and NAME.tmp from older versions)

# A run's logs (fod.tracking): products of train and test, moved into place and replaced as the others are, but
# not results: a folder holding only the logs of a run killed before its first checkpoint takes a fresh run.
LOGS = ("log.csv", "tensorboard")
FOLDERS = ("heatmaps", "masks", "tensorboard")  # products that are folders
EVENTS_GLOB = "events.out.tfevents.*"  # TensorBoard's event files, the only files fod writes into tensorboard/
# What each command writes into its output folder, and the file that marks a folder as that command's.
PRODUCTS = {
    "train": ("checkpoint.pt", "config.toml", "metrics.json", "summary.png", "heatmaps", *LOGS),
    "test": ("metrics.json", "summary.png", "heatmaps", *LOGS),
    "predict": ("scores.json", "maps.npz", "heatmaps", "masks"),
}


class WriteError(OSError):
    """Writing a file failed; the message names the file and the reason (e.g. ENOSPC)."""

    def __str__(self):
        return str(self.strerror)


class FolderInUse(RuntimeError):
    """Another live process holds the output folder's lock."""


def _reason(exc: OSError, path=None) -> str:
    """Why, in words: the error's text and code ("No space left on device (ENOSPC)"). A short write reported
    without an error number (numpy: "16384 requested and 992 written") is named as a full disk when it is one."""
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    text = exc.strerror or str(exc)
    if not exc.errno and path is not None:
        try:
            if shutil.disk_usage(_nearest_existing(Path(path))).free < 1 << 20:
                text, code = f"{os.strerror(errno.ENOSPC)} ({text})", "ENOSPC"
        except OSError:
            pass
    return f"{text} ({code})" if code else text


@contextmanager
def writing(path):
    """Turn an OSError raised while writing ``path`` into a WriteError that names it and says why in words."""
    try:
        yield
    except WriteError:
        raise
    except OSError as exc:
        reason = _reason(exc, path)
        raise WriteError(exc.errno or (errno.ENOSPC if reason.endswith("(ENOSPC)") else None),
                         f"cannot write {path}: {reason}") from exc


def open_for_write(path: Path):
    """The one place that opens files for writing (tests inject faults here)."""
    return open(path, "xb")


def tmp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}-{os.getpid()}-{secrets.token_hex(4)}")


def write_temporary(path, write, fsync: bool = True) -> Path:
    """Call ``write(file)`` on a fresh temporary file beside ``path`` and flush it to disk; return its name (the
    caller renames it over ``path``, or removes it). A failure removes it and raises a WriteError naming ``path``."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        with writing(path):
            with open_for_write(tmp) as f:
                write(f)
                if fsync:
                    f.flush()
                    os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write(path, write, fsync: bool = True):
    """Call ``write(file)`` on a fresh temporary file, flush it to disk, rename it to ``path``."""
    tmp = write_temporary(path, write, fsync)
    try:
        with writing(path):
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_png(path, array):
    """A uint8 (H, W[, 3]) array as a PNG."""
    from PIL import Image
    atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"), fsync=False)


def write_npz(path, arrays: dict):
    """Arrays by name as a compressed .npz (np.load reads it). Written member by member: with
    np.savez_compressed(f, **arrays) an array named "file" (an image file.png) collides with its argument."""
    import zipfile

    import numpy as np

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as z:
            for name, arr in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)
    atomic_write(path, write)


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_writable(folder) -> None:
    """Raise a clear error unless ``folder`` exists as a writable folder or can be created (writes nothing
    that stays: a probe file in the nearest existing folder is created and removed)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"--output {folder} exists and is not a folder")
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise NotADirectoryError(f"cannot create output folder {folder}: {base} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fod-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = (f"output folder {folder} is not writable" if base == folder.absolute()
                else f"cannot create output folder {folder}: {base} is not writable")
        raise WriteError(exc.errno, f"{what} ({_reason(exc)})") from None


def prepare_output(output, *, resume: bool = False, overwrite: bool = False, products=()) -> Path:
    """A plain output folder for a simple writer (no lock, no staging; the train/test/predict commands use
    OutputFolder): checked to be writable, existing ``products`` refused unless resume/overwrite, created."""
    out = Path(output)
    check_writable(out)
    existing = [p for p in products if (out / p).exists()]
    if existing and not (resume or overwrite):
        raise FileExistsError(f"{out} already holds {', '.join(existing)}; pass --overwrite to replace it, or "
                              "choose another --output")
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    return out


def refuse_inside(output, data):
    """An output folder inside the dataset would be read back as data (e.g. a new defect type)."""
    out, data = Path(output).absolute().resolve(), Path(data).absolute().resolve()
    if out == data or data in out.parents:
        raise ValueError(f"--output {output} is inside the dataset folder {data}: results written there would be read "
                         "as data; choose a folder outside it")


def refuse_inputs_inside(output, inputs):
    """Results written into the folder of a command's own inputs could replace them (--overwrite)."""
    out = Path(output).absolute().resolve()
    inside = [str(p) for p in inputs if out in Path(p).absolute().resolve().parents]
    if inside:
        raise ValueError(f"--output {output} holds input images of this command ({', '.join(inside[:3])}): choose an "
                         "output folder that does not contain them")


class OutputLock:
    """An exclusive flock on FOLDER/.fod.lock holding the owner's PID and command."""

    def __init__(self, folder: Path, what: str):
        self.path, self.what, self.fd = Path(folder) / LOCK_NAME, what, None

    def acquire(self):
        while True:
            with writing(self.path):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "PID unknown"
                os.close(fd)
                raise FolderInUse(f"output folder {self.path.parent} is in use by another fod process ({holder}); "
                                  "wait for it to finish or choose another --output") from None
            try:  # the file may have been removed by its previous holder between our open and our lock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        try:
            with writing(self.path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"PID {os.getpid()}: {self.what}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
                          0)
        except WriteError:
            self.release()  # a full disk: the lock file goes too
            raise

    def release(self):
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)  # closing releases the flock
            self.fd = None


_NAMES = sorted({MANIFEST} | {n for ps in PRODUCTS.values() for n in ps})
_STALE = re.compile("(" + "|".join(re.escape(n) for n in _NAMES) + r")\.tmp(-\d+-[0-9a-f]{8})?")


def remove_stale_temporaries(folder: Path):
    """Temporary files and staging folders left by killed runs (call only while holding the lock). Only
    names fod itself uses: a user's own files in the folder are never touched."""
    for p in Path(folder).iterdir():
        if p.name.startswith(STAGE_PREFIX) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif _STALE.fullmatch(p.name) and p.is_file():
            p.unlink()


def _files_of(folder: Path, name: str) -> set[str]:
    """Manifest entries NAME/FILE of the files fod writes in product folder ``folder`` (in tensorboard/ only its
    event files)."""
    return {f"{name}/{f.name}" for f in folder.glob(EVENTS_GLOB if name == LOGS[1] else "*") if f.is_file()}


class OutputFolder:
    """The output folder of one command run.

    ``check()`` (no writes): the folder can be created or written, and holds no results of another kind
    and none of this command's unless ``overwrite``/``resume``. ``with folder.open() as o``: create it,
    take the lock, repeat the checks under it, remove stale temporaries, make ``o.stage`` (a fresh
    folder inside it). Write the products into ``o.stage`` and call ``o.commit()``: each product moves
    into place and every product of this command not produced this time is removed (no stale heat maps).
    If the body fails, the stage is deleted and the previous results stay whole; a folder this run
    created is removed again if nothing was written to it.
    """

    def __init__(self, path, command: str, *, overwrite: bool = False, resume: bool = False):
        self.path, self.command = Path(path), command
        self.products = PRODUCTS[command]
        self.overwrite, self.resume = overwrite, resume
        self.stage: Optional[Path] = None
        self.in_place: set[str] = set()  # products written directly into the folder (train's checkpoint)
        self.created: list[Path] = []
        self.lock: Optional[OutputLock] = None

    def existing(self) -> list[str]:
        """This command's results in the folder (its logs alone are none)."""
        return [p for p in self.products if p not in LOGS and (self.path / p).exists()] if self.path.is_dir() else []

    def _check_contents(self):
        if not self.path.is_dir():
            return
        if self.command != "train" and (self.path / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.path} holds a training run (checkpoint.pt); fod {self.command} does not "
                                  "write into a training run's folder: choose another --output")
        if self.command != "predict" and (self.path / "scores.json").exists():
            raise FileExistsError(f"{self.path} holds the results of fod predict (scores.json); choose another "
                                  "--output")
        if self.command == "train" and (self.path / "metrics.json").exists() \
                and not (self.path / "checkpoint.pt").exists():
            raise FileExistsError(f"{self.path} holds the results of fod test (metrics.json without a "
                                  "checkpoint.pt); choose another --output")
        if self.command == "predict" and (self.path / "metrics.json").exists():
            raise FileExistsError(f"{self.path} holds the results of fod test or train (metrics.json); choose another "
                                  "--output")
        not_dirs = [p for p in self.products if p in FOLDERS and (self.path / p).exists()
                    and not ((self.path / p).is_dir() and not (self.path / p).is_symlink())]
        if not_dirs:
            raise FileExistsError(f"{self.path} holds {', '.join(not_dirs)}, which is not a folder; fod {self.command} "
                                  "writes a folder of that name there: move it, or choose another --output")
        existing = self.existing()
        # logs fod did not write (no manifest names them) are a user's, unless they sit beside this command's own
        # results (a run of a fod version that kept no manifest)
        listed = self._manifest()
        foreign = [n for n in LOGS if n in self.products and (self.path / n).exists() and n not in listed
                   and not any(r.startswith(n + "/") for r in listed)]
        if foreign and not existing:
            raise FileExistsError(f"{self.path} holds {', '.join(foreign)}, which fod did not write (not in "
                                  f"{MANIFEST}) and would replace: move them, or choose another --output")
        if existing and not (self.overwrite or self.resume):
            hint = "pass --resume to continue that run, --overwrite to replace it" if self.command == "train" \
                else "pass --overwrite to replace them"
            raise FileExistsError(f"{self.path} already holds {', '.join(existing)}; {hint}, or choose another "
                                  "--output")

    def check(self) -> "OutputFolder":
        check_writable(self.path)
        self._check_contents()
        return self

    @property
    def replacing(self) -> bool:
        """True if this run replaces earlier results (its products are staged until it succeeds)."""
        return self.overwrite and bool(self.existing())

    @contextmanager
    def open(self):
        self.check()
        missing = []
        p = self.path.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self.created = [m for m in reversed(missing)]
        try:
            self.lock = OutputLock(self.path, f"fod {self.command}")
            self.lock.acquire()
            self._check_contents()  # again, now that no other fod process can change the folder
            remove_stale_temporaries(self.path)
            self.stage = self.path / f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            with writing(self.stage):
                self.stage.mkdir()
            try:
                yield self
            except WriteError as exc:  # name the file where it was going, not its staging copy
                raise WriteError(exc.errno, str(exc).replace(str(self.stage), str(self.path))) from exc
        finally:
            if self.stage is not None and self.stage.exists():
                shutil.rmtree(self.stage, ignore_errors=True)
            self.stage = None
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            manifest = self.path / MANIFEST
            if manifest.is_file() and [p.name for p in self.path.iterdir()] == [MANIFEST]:
                manifest.unlink()  # a manifest of nothing (this run's claim, write_in_place, and nothing written)
            for d in reversed(self.created):  # folders this run created and left empty
                try:
                    d.rmdir()
                except OSError:
                    break

    def _manifest(self) -> set[str]:
        """The files (relative paths) fod wrote into the folder, as its manifest lists them (empty: none)."""
        try:
            files = json.loads((self.path / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return set()
        # only plain names of this command's products, or NAME/FILE in one of its folders: an edited manifest
        # cannot point outside the folder ("heatmaps/../../x")
        return {f for f in files if isinstance(f, str) and (f in self.products or (
            f.count("/") == 1 and f.split("/")[0] in self.products and f.split("/")[1] not in ("", ".", "..")))}

    def _write_manifest(self, files):
        atomic_write_text(self.path / MANIFEST, json.dumps({"command": self.command, "files": sorted(files)},
                                                           indent=1))

    def write_in_place(self, names):
        """This run writes ``names`` directly into the folder (not staged): the manifest names them before they
        are written, so that a run killed before its commit leaves files fod knows as its own."""
        self.in_place = set(names)
        self._write_manifest(self._manifest() | self.in_place)

    def _in_place_files(self) -> set[str]:
        """The products this run wrote in place, as manifest entries: a folder (tensorboard/) by its files, so
        that a later --overwrite removes them and leaves a user's file there alone."""
        out = set()
        for n in self.in_place:
            p = self.path / n
            if p.is_dir() and not p.is_symlink():
                out |= _files_of(p, n)
            elif p.exists():
                out.add(n)
        return out

    def commit(self):
        """Move the staged products into place; remove this command's products that were not made this time.
        In product folders (heatmaps/, masks/) only the files fod wrote (the manifest) are replaced or removed:
        a user's file there is never touched, and one that a new file would replace stops the commit first."""
        assert self.stage is not None, "commit() outside open()"
        made = {p.name for p in self.stage.iterdir()}
        prev = self._manifest()
        new = set()
        for n in self.products:
            if n in made:
                st = self.stage / n
                new |= {f"{n}/{f.name}" for f in st.iterdir()} if st.is_dir() else {n}
        clash = sorted(r for r in new if "/" in r and r not in prev
                       and ((self.path / r).exists() or (self.path / r).is_symlink()))
        if clash:
            raise FileExistsError(f"{self.path} holds {', '.join(clash[:5])}, which fod did not write (not in "
                                  f"{MANIFEST}) and would replace: move them, or choose another --output")
        trash = self.stage / ".replaced"
        trash.mkdir()
        self._write_manifest(prev | new | self._in_place_files())  # a crash: both
        # metrics.json / scores.json last: once they are there, the rest of the run is in place too
        order = sorted(self.products, key=lambda n: n in ("metrics.json", "scores.json"))
        for name in order:
            target = self.path / name
            if name in self.in_place and name not in made:
                continue  # written in place by this run (train's checkpoint, its live logs)
            if (self.stage / name).is_dir() or (name not in made and target.is_dir() and not target.is_symlink()):
                (trash / name).mkdir()
                owned = {r for r in prev if r.startswith(name + "/")}
                if name == LOGS[1] and name in prev and target.is_dir():  # a folder fod claimed whole (a killed run)
                    owned |= _files_of(target, name)
                for rel in sorted(owned):
                    if (self.path / rel).is_file() and not (self.path / rel).is_symlink():
                        os.replace(self.path / rel, trash / rel)
                if name in made:
                    with writing(target):
                        target.mkdir(exist_ok=True)
                    for f in (self.stage / name).iterdir():
                        with writing(target / f.name):
                            os.replace(f, target / f.name)
                elif not any(target.iterdir()):
                    target.rmdir()
            elif name in made:
                with writing(target):
                    os.replace(self.stage / name, target)
            elif name not in self.in_place and (target.exists() or target.is_symlink()):
                os.replace(target, trash / name)
        self._write_manifest(new | self._in_place_files())
        self.created = []  # the folder holds results now: keep it
