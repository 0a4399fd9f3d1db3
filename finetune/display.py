"""Showing tables where the user is: HTML in a notebook, plain text in a terminal."""

from __future__ import annotations

__all__ = ['in_notebook', 'show_table']


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == 'ZMQInteractiveShell'


def show_table(df, index: bool = False) -> None:
    """Display a DataFrame: rendered in a notebook, printed in a terminal or script."""
    if in_notebook():
        from IPython.display import display

        try:
            display(df if index else df.style.hide(axis='index'))
        except ImportError:  # pandas' Styler needs jinja2
            display(df)
    else:
        print(df.to_string(index=index))
