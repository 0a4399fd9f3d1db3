"""`python -m finetune ...` is the `finetune` command (and `torchrun -m finetune train ...` launches it)."""

from .cli import main

if __name__ == '__main__':
    main()
