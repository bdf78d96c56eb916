"""Token data for moebench: corpora, synthetic skewed streams, BPE, prepared token files.

`prepare(cfg.data, out_dir, seed)` writes a data directory; `TokenStream(data_dir, split)`
reads one split of it for training and evaluation. See the modules for the conventions.
"""

from moebench.data.build import MANIFEST, TOKENIZER_FILE, prepare
from moebench.data.dataset import TokenStream, load_manifest, load_tokenizer
from moebench.data.sources import Document, assign_val, load_documents
from moebench.data.synthetic import SyntheticCorpus, synthetic_corpus, zipf_probs
from moebench.data.tokenizer import EOS_ID, EOS_TOKEN, token_dtype, train_bpe

__all__ = [
    "EOS_ID",
    "EOS_TOKEN",
    "MANIFEST",
    "TOKENIZER_FILE",
    "Document",
    "SyntheticCorpus",
    "TokenStream",
    "assign_val",
    "load_documents",
    "load_manifest",
    "load_tokenizer",
    "prepare",
    "synthetic_corpus",
    "token_dtype",
    "train_bpe",
    "zipf_probs",
]
