"""Output directories that hadakit writes (checkpoints, exports): checked before the work, written atomically, and
replaced only when they hold what hadakit wrote.

The rules, the same for every writer:

* ``out`` that does not exist: its nearest existing ancestor must be a writable directory (checked up front, so a
  read-only parent fails before an hour of quantization, not after).
* ``out`` that exists: it must be a directory, and it is replaced only with ``force=True`` and only when it holds the
  writer's marker file (``hadakit.json`` for a checkpoint, ``hadakit_export.json`` for an export) — never a folder of
  the user's own files, never the working directory or one of its parents, the home directory, or a symlink.
* Writing goes to a hidden sibling ``.NAME.tmp-PID-XXXXXXXX`` that is renamed into place at the end; a previous
  directory is first moved aside and deleted only after the new one is in place (and put back if the rename fails).
  Stale temporaries of killed runs (their process is gone, or older than six hours) are removed at the next write.
  Directories and files get the normal modes of the user's umask (not ``mkdtemp``'s 0700 or the 0600 that
  safetensors writes).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["OutputDirError", "check_output_dir", "write_dir_atomically"]

_STALE_TMP_S = 6 * 3600


class OutputDirError(ValueError):
    """An output directory that hadakit refuses to write or replace (the message says why and what to do)."""


def _protected(resolved: Path) -> str | None:
    cwd = Path.cwd().resolve()
    if resolved == cwd:
        return "it is the working directory"
    if resolved in cwd.parents:
        return "it is a parent of the working directory"
    if resolved == Path.home().resolve():
        return "it is the home directory"
    if resolved == Path(resolved.anchor):
        return "it is the root of the file system"
    return None


def check_output_dir(out: str | Path, *, force: bool = False, marker: str,
                     is_ours: Callable[[Path], bool] | None = None, what: str = "checkpoint") -> Path:
    """Raise, before any work, when ``out`` cannot take a new ``what``; return it as a ``Path``.

    ``marker`` is the file a directory written by this writer holds; ``is_ours(marker_path)`` may check its content.
    Raises ``FileExistsError`` for an existing directory without ``force``, ``OutputDirError`` (a ``ValueError``)
    for anything ``force`` may not replace, ``PermissionError`` for an unwritable parent.
    """
    out = Path(out)
    if str(out) == "":
        raise OutputDirError(f"the output directory is an empty path: name a new directory for the {what}")
    if out.is_symlink():
        raise OutputDirError(f"output path {out} is a symbolic link; hadakit does not write through or replace links: "
                             f"name a new directory")
    resolved = out.resolve()
    if out.exists():
        if not out.is_dir():
            raise OutputDirError(f"output path {out} is a file, not a directory: name a new directory for the {what}")
        why = _protected(resolved)
        if why:
            raise OutputDirError(f"refusing to write the {what} into {out}: {why}; name a new directory "
                                 f"(--force never replaces it)")
        if not force:
            raise FileExistsError(f"output directory {out} already exists; pass force=True (--force) to replace a "
                                  f"previous {what}, or name a new directory")
        mark = out / marker
        ours = mark.is_file() and (is_ours is None or is_ours(mark))
        if not ours:
            raise OutputDirError(f"refusing to replace {out}: it is not a hadakit {what} (it has no {marker} written "
                                 f"by hadakit), and --force only replaces a previous hadakit {what}; remove it "
                                 f"yourself or name a new directory")
        parent = resolved.parent
    else:  # a path that does not exist is none of the protected directories
        parent = resolved.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise OutputDirError(f"cannot create {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the {what} {out}: directory {parent} is not writable; name a "
                              f"directory you can write to")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _clean_stale(parent: Path, name: str) -> None:
    """Remove ``.NAME.tmp-PID-*`` / ``.NAME.old-PID-*`` siblings whose process is gone or that are old."""
    now = time.time()
    for kind in ("tmp", "old"):
        for entry in parent.glob(f".{name}.{kind}-*"):
            try:
                pid = int(entry.name[len(f".{name}.{kind}-"):].split("-", 1)[0])
            except ValueError:
                pid = None
            try:
                stale = (pid is not None and pid != os.getpid() and not _pid_alive(pid)) \
                    or now - entry.stat().st_mtime > _STALE_TMP_S
            except OSError:
                continue
            if stale and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _make_dir(path: Path) -> None:
    path.mkdir()
    os.chmod(path, 0o777 & ~_umask())


def _normal_file_modes(root: Path) -> None:
    """Files the writers created with a private mode (safetensors writes 0600) get the umask's normal mode."""
    mode = 0o666 & ~_umask()
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink() and (f.stat().st_mode & 0o777) != mode:
            os.chmod(f, mode)


def write_dir_atomically(out: str | Path, write: Callable[[Path], None], *, force: bool = False, marker: str,
                         is_ours: Callable[[Path], bool] | None = None, what: str = "checkpoint") -> Path:
    """Check ``out`` (see :func:`check_output_dir`), call ``write(tmp)`` to fill a temporary sibling directory that
    must end up holding ``marker``, then rename it into place (replacing a previous one, see the module docstring).
    Nothing is left under ``out``'s name if ``write`` fails or the process is killed."""
    out = check_output_dir(out, force=force, marker=marker, is_ours=is_ours, what=what)
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(out.parent, out.name)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.tmp-{tag}"
    _make_dir(tmp)
    old = None
    try:
        write(tmp)
        _normal_file_modes(tmp)
        if not (tmp / marker).is_file():
            raise RuntimeError(f"internal error: the {what} writer did not write {marker}")
        if out.exists() or out.is_symlink():
            check_output_dir(out, force=force, marker=marker, is_ours=is_ours, what=what)  # still ours
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and old.exists():
            os.replace(old, out)  # put the previous one back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
