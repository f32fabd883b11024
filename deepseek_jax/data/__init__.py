"""Training data: the embedded default corpus, a SentencePiece tokenizer and a packed, resumable grain pipeline."""

from deepseek_jax.data.corpus import default_documents
from deepseek_jax.data.errors import DataError
from deepseek_jax.data.hf_tokenizer import HFTokenizer, StreamDecoder, encode_prompt
from deepseek_jax.data.pipeline import DataIterator, make_iterator
from deepseek_jax.data.sources import DataStats, source_documents
from deepseek_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer, load_tokenizer, run_tokenizer

__all__ = ["DataError", "DataIterator", "DataStats", "HFTokenizer", "StreamDecoder", "Tokenizer", "default_documents",
           "encode_prompt", "load_or_train_tokenizer", "load_tokenizer", "make_iterator", "run_tokenizer",
           "source_documents"]
