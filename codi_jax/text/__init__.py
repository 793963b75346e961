"""Host-side tokenizers of CoDi's text paths, built from vocabulary files (`vocab_dir`: bundled
with the package unless the user points elsewhere).

`BertTokenizer` (Optimus encoder, WordPiece), `GPT2Tokenizer` (Optimus decoder) and `CLIPTokenizer`
(CLIP text encoder), the last two on one byte-level BPE engine. Nothing is downloaded.
"""

from codi_jax.text.bpe import (BytePairEncoding, CLIPTokenizer, GPT2Tokenizer, clean_generated,
                               remove_duplicate_ngrams)
from codi_jax.text.common import vocab_dir
from codi_jax.text.wordpiece import BertTokenizer

__all__ = ["BertTokenizer", "BytePairEncoding", "CLIPTokenizer", "GPT2Tokenizer",
           "clean_generated", "remove_duplicate_ngrams", "vocab_dir"]
