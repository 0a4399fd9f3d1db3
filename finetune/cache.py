"""The cache folder, and the one way every writer of a folder here (token stores, the embedded model,
`save_pretrained`, checkpoints) puts it in place.

`atomic_folder(path)` hands out a temporary folder beside `path`; when the block ends without an
error, every file in it is fsynced and the folder takes `path`'s place in one rename. A folder
already at `path` is swapped out in the same step (Linux's `renameat2(RENAME_EXCHANGE)`), so a
process killed at any moment leaves at `path` either the complete old folder or the complete new
one, never a mixture and never nothing (where the file system cannot swap, there is one instant with
the old version moved aside, and the next write puts it back). Temporary folders are hidden
(`.name.tmp-HOST-PID-...`); one left behind by a killed writer is removed by the next write to the
same path once that process is gone (or, for another machine's, after a day).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    'cache_dir',
    'cache_folder',
    'atomic_folder',
    'atomic_write_text',
    'remove_folder',
    'sweep',
    'scratch_folder',
    'exchange',
    'sha256_file',
]

_RENAME_EXCHANGE = 2  # linux/fs.h


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path`, else `$FINETUNE_CACHE`, else `~/.cache/finetune`."""
    if path is None:
        path = os.environ.get('FINETUNE_CACHE') or Path.home() / '.cache' / 'finetune'
    return Path(path).expanduser()


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read 4 MB at a time."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
    except (PermissionError, OSError):
        return True
    return True


_HOST = socket.gethostname().replace('-', '_').replace('.', '_')
STALE_SECONDS = 24 * 3600  # a temporary folder of another machine (shared cache) is left alone for this long


def _tmp_prefix(path: Path) -> str:
    return f'.{path.name}.tmp-'


def _leftovers(path: Path, any_name: bool = False) -> list[Path]:
    """Temporary folders of earlier writes to `path` (to anything in its folder, with `any_name`) whose writer
    is gone: dead on this host, or long silent."""
    prefix, out = _tmp_prefix(path), []
    for old in path.parent.iterdir() if path.parent.is_dir() else []:
        if any_name and old.name.startswith('.') and '.tmp-' in old.name:
            rest = old.name.split('.tmp-', 1)[1]
        elif old.name.startswith(prefix):
            rest = old.name[len(prefix) :]
        else:
            continue
        host, _, rest = rest.partition('-')
        pid = rest.split('-', 1)[0]
        if host == _HOST and pid.isdigit():
            gone = int(pid) != os.getpid() and not _pid_alive(int(pid))
        else:
            try:
                gone = time.time() - old.stat().st_mtime > STALE_SECONDS
            except OSError:
                continue
        if gone:
            out.append(old)
    return out


def sweep(folder: Path) -> None:
    """Remove every temporary folder in `folder` whose writer is gone (deletions and writes killed halfway)."""
    for old in _leftovers(Path(folder) / 'x', any_name=True):
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(path: Path) -> None:
    """Clean up after killed writers; a version moved aside just before a kill is put back first."""
    for old in _leftovers(path):
        aside = old / 'old'
        if aside.exists() and not path.exists():  # killed between the two renames of the fallback
            os.rename(aside, path)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    try:  # Linux says it without changing it
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('Umask:'):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def scratch_folder(name: str, cache: str | os.PathLike | None = None) -> Iterator[Path]:
    """A private temporary folder under the cache's `tmp/`, removed when the block ends (or by a later run)."""
    root = cache_folder('tmp', cache=cache)
    _remove_leftovers(root / name)
    tmp = Path(tempfile.mkdtemp(prefix=f'{_tmp_prefix(root / name)}{_HOST}-{os.getpid()}-', dir=root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    tmp = Path(tempfile.mkdtemp(prefix=f'{_tmp_prefix(path)}{_HOST}-{os.getpid()}-', dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        yield tmp
        _fsync_tree(tmp)
        _commit(tmp, path, overwrite)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Delete a folder so that it is never seen half deleted: hidden by one rename first, then removed."""
    path = Path(path)
    gone = path.with_name(f'{_tmp_prefix(path)}{_HOST}-{os.getpid()}-gone')
    os.rename(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace the file `path` with `text` in one rename: a reader sees the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f'{_tmp_prefix(path)}{_HOST}-{os.getpid()}')
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _commit(tmp: Path, path: Path, overwrite: bool) -> None:
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(f'{path} exists and is not empty')
    if not occupied:
        try:
            os.rename(tmp, path)  # replaces an empty folder too
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # a concurrent writer got there first
                raise FileExistsError(f'{path} exists and is not empty') from e
            raise
        return
    if path.is_dir() and not path.is_symlink() and exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old version
        return
    # no atomic exchange here: move the old version aside, the new one in, then delete the old one; a kill
    # between the two renames leaves the old version aside, and the next write to `path` puts it back
    aside = Path(tempfile.mkdtemp(prefix=f'{_tmp_prefix(path)}{_HOST}-{os.getpid()}-old-', dir=path.parent))
    os.rename(path, aside / 'old')
    os.rename(tmp, path)
    shutil.rmtree(aside, ignore_errors=True)
