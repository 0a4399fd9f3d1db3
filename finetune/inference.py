"""What fastai users call after training, made right for an LM: get_preds, predict, show_results, Interpretation.

A language model's full predictions (a probability for every vocabulary entry at every position)
do not fit in memory for a validation set: 2,048 blocks of 512 tokens over a 49k vocabulary are
200 GB. So `get_preds` keeps, per position, the most likely next token id (or what `act` makes of
each batch's logits, reduced by you), and the labels; `with_decoded` adds the predictions as
text, `with_loss` each row's mean token loss. `predict(text)` continues a text, as fastai's
`LMLearner.predict` does; `show_results` shows, per row, the corpus, the input text, the
target continuation and the model's greedy next tokens. `CausalLMInterpretation` lists the rows
with the highest loss (the worst-modelled documents of each corpus).
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.interpret import Interpretation

from .display import show_table
from .loss import HeadInput
from .packing import IGNORE_INDEX

__all__ = ['CausalLMInterpretation', 'KeepPredictions', 'decode_rows', 'predict_text', 'results_table']


class KeepPredictions(Callback):
    """For `get_preds`: reduce each batch's output at once (argmax, or `act(logits)`), never keeping full logits."""

    order = 30

    def __init__(self, act=None):
        self.act = act

    def after_loss(self):
        pred = self.pred
        if self.act is None:
            self.learn.pred = pred.argmax(-1)
        else:
            self.learn.pred = self.act(pred.logits() if isinstance(pred, HeadInput) else pred)


def decode_rows(tokenizer, ids: torch.Tensor, trunc_at: int | None = None) -> list[str]:
    """Each row of token ids as text (masked positions left out), cut at `trunc_at` characters."""
    texts = [tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in ids.tolist()]
    return [t if trunc_at is None or len(t) <= trunc_at else t[:trunc_at] + '…' for t in texts]


def predict_text(learn, item, max_new_tokens: int | None = None, n_words: int | None = None, **kwargs) -> str:
    """`item` (a text, or token ids such as `dls.valid_ds[0][0]`) continued by the model; the text, prompt included."""
    if isinstance(item, torch.Tensor) or (isinstance(item, (list, tuple)) and item and isinstance(item[0], int)):
        ids = item.tolist() if isinstance(item, torch.Tensor) else list(item)
        item = learn.tokenizer.decode([int(t) for t in ids if t != IGNORE_INDEX])
    if not isinstance(item, str):
        raise TypeError(f'predict takes a text or a row of token ids, not {type(item).__name__}')
    if max_new_tokens is None and n_words is not None:
        max_new_tokens = n_words  # fastai's LMLearner counts words; here it is tokens
    return learn.generate(item, max_new_tokens=max_new_tokens, **kwargs)


def results_table(learn, dl, max_n: int = 6, trunc_at: int = 200):
    """The corpus, input text, target continuation and greedy prediction of `max_n` rows of one batch of `dl`."""
    import pandas as pd

    x, y, *rest = dl.one_batch()
    x, y = x[:max_n], y[:max_n]
    preds = learn.get_preds(dl=[(x, y, *[r[:max_n] for r in rest])], reorder=False)[0]
    names = list(getattr(learn.dls, 'names', []))
    rows = []
    tok = learn.tokenizer
    for i in range(len(x)):
        row = {'corpus': names[int(rest[0][i])] if rest and names else ''}
        row['input'] = decode_rows(tok, x[i : i + 1], trunc_at)[0]
        row['target'] = decode_rows(tok, y[i : i + 1, -32:])[0]  # the last tokens: where a reader looks first
        guess = torch.where(y[i : i + 1, -32:] == IGNORE_INDEX, IGNORE_INDEX, preds[i : i + 1, -32:].to(y.device))
        row['prediction'] = decode_rows(tok, guess)[0]  # at the same positions as the target
        rows.append(row)
    return pd.DataFrame(rows)


class CausalLMInterpretation(Interpretation):
    """fastai's `Interpretation` for a causal LM: rows ranked by their mean token loss, shown as text."""

    def plot_top_losses(self, k: int = 9, largest: bool = True, corpus: str | None = None, trunc_at: int = 200,
                        show: bool = True):  # fmt: skip
        """The `k` rows with the highest (or lowest) loss, optionally of one corpus: corpus, loss, perplexity, text."""
        import math

        import pandas as pd

        dls = self.learn.dls
        names = list(getattr(dls, 'names', []))
        losses, idx = self.top_losses(None, largest)
        rows = []
        for loss, i in zip(losses.tolist(), idx.tolist()):
            x, _, *rest = self.dl.create_item(self.dl.get_idxs()[i])
            name = names[int(rest[0])] if rest and names else ''
            if corpus is not None and name != corpus:
                continue
            text = decode_rows(self.learn.tokenizer, x[None], trunc_at)[0]
            rows.append({'corpus': name, 'loss': loss, 'perplexity': math.exp(loss), 'text': text})
            if len(rows) == k:
                break
        table = pd.DataFrame(rows)
        if not show:
            return table
        show_table(table)
