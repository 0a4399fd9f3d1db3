"""The cache folder, and the one way every writer of a folder here (token stores, the embedded model,
`save_pretrained`, checkpoints) puts it in place.

`atomic_folder(path)` hands out a temporary folder beside `path`; when the block ends without an
error, every file in it is fsynced and the folder takes `path`'s place in one rename. A folder
already at `path` is swapped out in the same step (Linux's `renameat2(RENAME_EXCHANGE)`), so a
process killed at any moment leaves at `path` either the complete old folder or the complete new
one, never a mixture and never nothing. Temporary folders are hidden (`.name.tmp-PID-...`), and one
left behind by a killed writer is removed by the next write to the same path once that process is
gone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ['cache_dir', 'cache_folder', 'atomic_folder', 'exchange']

_RENAME_EXCHANGE = 2  # linux/fs.h


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path`, else `$FINETUNE_CACHE`, else `~/.cache/finetune`."""
    if path is None:
        path = os.environ.get('FINETUNE_CACHE') or Path.home() / '.cache' / 'finetune'
    return Path(path).expanduser()


def cache_folder(*parts: str, cache: str | os.PathLike | None = None) -> Path:
    """`cache_dir(cache)/parts...`, created if missing; an error that says what to set when it cannot be."""
    folder = cache_dir(cache).joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f'cannot write the cache under {folder}: {e}; set FINETUNE_CACHE or pass cache=') from e
    return folder


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms that cannot open a folder (Windows) have nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system cannot (then nothing changed)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):  # a file system without the exchange
        return False
    raise OSError(err, f'cannot swap {a} and {b}: {os.strerror(err)}')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(path: Path) -> None:
    """Temporary folders of earlier writes to `path` whose process is gone (killed mid-write)."""
    for old in path.parent.glob(f'.{path.name}.tmp-*'):
        try:
            pid = int(old.name[len(path.name) + 6 :].split('-', 1)[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder that becomes `path` when the block succeeds; removed, with `path` untouched, if not.

    `path` may be missing or an empty folder; with `overwrite=True` it may also hold an older
    version, which is replaced atomically and then deleted. Otherwise an existing non-empty `path`
    raises `FileExistsError` at the end (a concurrent writer got there first: callers whose content
    is the same, such as the token cache, keep theirs). Folders get the user's usual permissions.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.tmp-{os.getpid()}-', dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, path, overwrite)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f'{path} exists and is not empty')
    if not occupied:
        if path.exists():
            path.rmdir()  # an empty folder: nothing to keep
        os.rename(tmp, path)
        return
    if path.is_dir() and exchange(tmp, path):
        shutil.rmtree(tmp)  # tmp now holds the old version
        return
    # no atomic exchange here: move the old version aside, the new one in, then delete the old one
    aside = Path(tempfile.mkdtemp(prefix=f'.{path.name}.tmp-{os.getpid()}-old-', dir=path.parent))
    os.rename(path, aside / 'old')
    os.rename(tmp, path)
    shutil.rmtree(aside)
