"""finetune: domain fine-tuning of Hugging Face causal LMs with fastai.

Name corpora, pack them into token blocks, and fine-tune any `AutoModelForCausalLM` with a real
fastai `Learner`. The public names are re-exported here; each lives in the module of its stage.
"""

import warnings

with warnings.catch_warnings():
    # fastai.layers calls torch.jit.script at import time, which recent torch deprecates: nothing a user can act on
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    import fastai.data.block  # noqa: F401

from .build import causal_lm_learner
from .checkpoint import SaveCheckpoint
from .corpora import Corpus
from .data import LMBlock, LMDataLoader, LMDataLoaders, lm_datablock, lm_dataloaders
from .evaluate import CorpusPerplexity, Perplexity, corpus_perplexity
from .generate import generate
from .learner import CausalLMLearner
from .loss import CausalLMLoss
from .mix import CorpusMix, MixSampler, pack_corpora
from .mix_report import MixChecks, MixReport, mix_report
from .models import load_model, load_tokenizer
from .packing import PackedCorpora
from .probe import share_sweep, target_data_curve
from .runlog import plot_run
from .tokens import PackedBlocks, TokenStore, build_token_store

__version__ = '0.1.0'

__all__ = [
    'Corpus',
    'CorpusMix',
    'MixSampler',
    'MixChecks',
    'MixReport',
    'mix_report',
    'TokenStore',
    'PackedBlocks',
    'build_token_store',
    'PackedCorpora',
    'LMBlock',
    'LMDataLoader',
    'LMDataLoaders',
    'lm_datablock',
    'pack_corpora',
    'lm_dataloaders',
    'load_model',
    'load_tokenizer',
    'CausalLMLoss',
    'Perplexity',
    'CorpusPerplexity',
    'corpus_perplexity',
    'CausalLMLearner',
    'causal_lm_learner',
    'generate',
    'SaveCheckpoint',
    'plot_run',
    'target_data_curve',
    'share_sweep',
]
