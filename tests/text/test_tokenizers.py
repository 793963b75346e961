"""Tokenizers against the reference fixtures' ids, plus round trips, edge cases and bad files.

The vocabulary files are the real ones (`vocab_dir()`: the bundled ones, or env CODI_TOKENIZERS).
"""

import gzip
import json

import numpy as np
import pytest

from codi_jax.text import (BertTokenizer, BytePairEncoding, CLIPTokenizer, GPT2Tokenizer,
                           clean_generated, remove_duplicate_ngrams, vocab_dir)
from codi_jax.text.bpe import byte_to_unicode, clip_clean
from codi_jax.text.common import BUNDLED_VOCAB
from tests.conftest import FIXTURES

VOCAB = vocab_dir()


@pytest.fixture(scope="module")
def bert():
  return BertTokenizer.from_file(VOCAB / "bert-base-cased-vocab.txt")


@pytest.fixture(scope="module")
def gpt2():
  return GPT2Tokenizer.from_files(VOCAB / "gpt2-vocab.json", VOCAB / "gpt2-merges.txt")


@pytest.fixture(scope="module")
def clip():
  return CLIPTokenizer.from_file(VOCAB / "clip_bpe_simple_vocab_16e6.txt.gz")


def test_vocab_dir_is_the_flag_else_the_environment_else_the_bundled_files(monkeypatch, tmp_path):
  monkeypatch.delenv("CODI_TOKENIZERS", raising=False)
  assert vocab_dir() == vocab_dir("") == BUNDLED_VOCAB
  assert {p.name for p in BUNDLED_VOCAB.iterdir()} >= {  # the vocabularies and their licences
      "bert-base-cased-vocab.txt", "clip_bpe_simple_vocab_16e6.txt.gz", "gpt2-merges.txt",
      "gpt2-vocab.json", "LICENSE-BERT", "LICENSE-CLIP", "LICENSE-GPT2"}
  monkeypatch.setenv("CODI_TOKENIZERS", str(tmp_path / "env"))
  assert vocab_dir() == tmp_path / "env"
  assert vocab_dir(tmp_path / "flag") == tmp_path / "flag"


def _stored(fixture: str, *keys: str) -> list:
  with np.load(FIXTURES / fixture) as z:
    return [z[k] for k in keys]


# ------------------------------------------------------------------------------- fixture ids

def test_bert_codi_ids_match_optimus_fixture(bert):
  texts, expected = _stored("optimus.npz", "meta/texts", "input/bert_token_ids")
  ids = bert.codi_token_ids(json.loads(str(texts)))
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, expected)


def test_clip_ids_match_clip_fixture(clip):
  texts, expected = _stored("clip.npz", "meta/tokenizer_texts", "input/tokenizer_ids_full_vocab")
  ids = clip.encode_batch(json.loads(str(texts)))
  assert ids.shape == (5, 77) and ids.dtype == np.int32
  np.testing.assert_array_equal(ids, expected)


# ------------------------------------------------------------------------------------- BERT

def test_bert_basic_tokenization(bert):
  # Control characters dropped, punctuation split one character at a time, each CJK ideograph a
  # word of its own ("你", "好": two [UNK]s, not one), accents kept (cased vocab, no lower-casing).
  # Expected tokens from the original `BertTokenizer(do_lower_case=False)`.
  assert bert.tokenize("Héllo,\tworld!!\x00 你好 a\u200b") == [
      "H", "##é", "##llo", ",", "world", "!", "!", "[UNK]", "[UNK]", "a"]
  assert bert.decode(bert.encode("Hello, world!")) == "Hello , world !"
  assert bert.decode(bert.encode("café résumé")) == "café résumé"  # cased vocab keeps accents


def test_bert_special_tokens_and_unknowns(bert):
  ids = bert.encode("a [MASK] b")
  assert ids[0] == bert.cls_id and ids[-1] == bert.sep_id
  assert bert.vocab["[MASK]"] in ids  # written special tokens stay whole
  assert bert.tokenize("x" * 101) == ["[UNK]"]  # longer than 100 characters
  assert bert.tokenize("x" * 100) != ["[UNK]"]
  assert bert.tokenize("🙂") == ["[UNK]"]  # no word piece matches


def test_bert_codi_entry_lower_cases_pads_and_rejects_long_text(bert):
  ids = bert.codi_token_ids(["A CAT", "Heavy raining on a mat."])
  np.testing.assert_array_equal(ids, bert.encode_batch(["a cat", "heavy raining on a mat."]))
  assert ids.shape == (2, 9) and ids[0, 3:].tolist() == [bert.sep_id, 0, 0, 0, 0, 0]
  assert bert.codi_token_ids(["word " * 510]).shape == (1, 512)
  with pytest.raises(ValueError, match="text 0 is too long .* 602 tokens .* at most 512"):
    bert.codi_token_ids(["word " * 600])  # the original would silently drop [SEP]
  long = bert.encode_batch(["word " * 600])
  assert long.shape == (1, 512) and long[0, -1] != bert.sep_id  # plain BERT truncation


@pytest.mark.parametrize("text", ["", "   ", "\t\n", "\x00\x01"])
def test_bert_codi_entry_rejects_empty_text(bert, text):
  with pytest.raises(ValueError, match="text 1 .* no tokens"):
    bert.codi_token_ids(["fine", text])
  assert bert.encode(text) == [bert.cls_id, bert.sep_id]


# ------------------------------------------------------------------------------------ GPT-2

def test_gpt2_added_tokens_and_known_ids(gpt2):
  assert (gpt2.pad_id, gpt2.bos_id, gpt2.eos_id, gpt2.vocab_size) == (50257, 50258, 50259, 50260)
  assert gpt2.encode("<BOS>") == [50258] and gpt2.encode("<EOS>") == [50259]  # optimus decode
  assert gpt2.encode("Hello world", add_prefix_space=False) == [15496, 995]
  assert gpt2.encode("Hello world") == [18435, 995]  # the original puts a space first
  assert gpt2.encode("<BOS> a cat<EOS>") == [50258, 257, 3797, 50259]
  assert gpt2.encode("") == [] and gpt2.encode(" \t\n") == []  # the original: [] and [<PAD>]


@pytest.mark.parametrize("text", [
    "A man rides a horse on the beach.", "It's 5 o'clock; don't   panic!?", "tabs\tand\nnewlines",
    "café naïve Ångström", "日本語のテキスト 你好", "emoji 🙂👍🏽 mix", "x<y>z & 100%"])
def test_gpt2_round_trip(gpt2, text):
  assert gpt2.decode(gpt2.encode(text, add_prefix_space=False)) == text
  assert gpt2.decode(gpt2.encode(text)) == " " + text


def test_gpt2_decode_specials_and_clean_up(gpt2):
  ids = [gpt2.bos_id, *gpt2.encode("a cat , sitting ."), gpt2.eos_id]
  assert gpt2.decode(ids) == " <BOS> a cat , sitting . <EOS>"
  assert gpt2.decode(ids, skip_special_tokens=True) == " a cat , sitting ."
  assert gpt2.decode(ids, clean_up_tokenization_spaces=True) == " <BOS> a cat, sitting. <EOS>"
  assert gpt2.decode_generated(ids) == "a cat, sitting."
  # As in the original: a first token without a leading space is glued to "<BOS>" and dropped.
  glued = [gpt2.bos_id, *gpt2.encode("a cat", add_prefix_space=False), gpt2.eos_id]
  assert gpt2.decode_generated(glued) == "cat"
  with pytest.raises(ValueError, match="outside the GPT-2 vocabulary"):
    gpt2.decode([50260])


@pytest.mark.parametrize("text, expected", [
    ("a cat cat sitting sitting on a mat mat.", "a cat sitting on a mat."),
    ("a dog on a dog on a mat", "a dog on a mat"),
    ("the the the", "the"),
    ("(a) (a)", "(a)"),
    ("a. a. b", "a. b"),
    ("red red, blue", "red, blue"),
    ("", ""),
])
def test_clean_generated(text, expected):
  # Expected values are the original `model_module_infer` post-processing of the same strings.
  assert clean_generated(text) == expected


def test_remove_duplicate_ngrams_keeps_non_adjacent_repeats():
  assert remove_duplicate_ngrams("a b a c") == "a b a c"
  assert remove_duplicate_ngrams("[x] [x] y") == "[x] y"


# ------------------------------------------------------------------------------------- CLIP

def test_clip_empty_long_and_special(clip):
  sot, eot = clip.sot_id, clip.eot_id
  assert (sot, eot, clip.vocab_size) == (49406, 49407, 49408)
  empty = clip.encode_batch(["", "  \n\t "])
  np.testing.assert_array_equal(empty, np.array([[sot] + [eot] * 76] * 2))
  text = " ".join(["a photo of a cat"] * 40)
  ids = clip.encode_batch([text])[0]
  assert ids.shape == (77,) and ids[-1] == eot and ids[-2] != eot  # EOT kept last
  assert ids[1:76].tolist() == clip.encode(text)[:75]
  assert clip.encode("a<|endoftext|>b") == [320, eot, 321]
  assert clip.encode("<|ENDOFTEXT|>") == [eot]


@pytest.mark.parametrize("variant", [
    "A   PHOTO\tof\n a Cat", "a photo of a cat ", "&#97; photo of a cat",
    "&amp;#97; photo of a cat", "ａ photo of a cat"])
def test_clip_cleaning(clip, variant):
  # whitespace runs, case, HTML entities and full-width forms normalise away
  assert clip.encode(variant) == clip.encode("a photo of a cat")


def test_clip_html_entities_and_non_ascii(clip):
  # ftfy unescapes HTML entities (nested ones too), but not in text that contains "<".
  assert clip_clean("Fish &amp;amp;  Chips") == "fish & chips"
  assert clip_clean("<b> &amp;") == "<b> &amp;"
  assert clip.decode(clip.encode("Crème brûlée 🙂 日本")) == "crème brûlée 🙂 日本"
  assert clip.decode(clip.encode_batch(["a photo, of a cat!"])[0]) == "a photo , of a cat !"


# -------------------------------------------------------------------------------- BPE engine

def test_bpe_engine_merges_by_rank_left_to_right():
  bpe = BytePairEncoding([("a", "b"), ("b", "c"), ("ab", "c"), ("a", "a")])
  assert bpe("abcbc") == ("abc", "bc")  # (a,b) outranks (b,c); then (ab,c)
  assert bpe("aaa") == ("aa", "a")
  assert bpe("x") == ("x",)
  eow = BytePairEncoding([("b", "c</w>"), ("a", "bc</w>")], end_of_word="</w>")
  assert eow("abc") == ("abc</w>",) and eow("a") == ("a</w>",)
  table = byte_to_unicode()
  assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "Ġ"


# ------------------------------------------------------------------------------- bad inputs

def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="BERT vocabulary not found"):
    BertTokenizer.from_file(tmp_path / "nope.txt")
  (tmp_path / "v.txt").write_text("[PAD]\n[CLS]\n[SEP]\n[MASK]\nhello\n")
  with pytest.raises(ValueError, match=r"lacks the special tokens \['\[UNK\]'\]"):
    BertTokenizer.from_file(tmp_path / "v.txt")
  (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00junk")
  with pytest.raises(ValueError, match="not UTF-8"):
    BertTokenizer.from_file(tmp_path / "bin.txt")
  (tmp_path / "vocab.json").write_text("{not json")
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n")
  with pytest.raises(ValueError, match="not valid JSON"):
    GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
  (tmp_path / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "<|endoftext|>": 2}))
  (tmp_path / "no_header.txt").write_text("a b\n")
  with pytest.raises(ValueError, match="must start with a '#version' line"):
    GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "no_header.txt")
  with pytest.raises(ValueError, match="lacks 254 single-byte symbols"):
    GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
  (tmp_path / "bpe.txt.gz").write_bytes(b"plain text, not gzip")
  with pytest.raises(ValueError, match="not a gzip file"):
    CLIPTokenizer.from_file(tmp_path / "bpe.txt.gz")
  (tmp_path / "short.txt.gz").write_bytes(gzip.compress(b"#version: 0.2\na b\nab c\n"))
  with pytest.raises(ValueError, match="needs 48894 merges, the file has 2"):
    CLIPTokenizer.from_file(tmp_path / "short.txt.gz")
  (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"#version: 0.2\na b c\n"))
  with pytest.raises(ValueError, match="merge line 2 is 'a b c'"):
    CLIPTokenizer.from_file(tmp_path / "bad.txt.gz")


def test_bad_batches(bert, clip):
  with pytest.raises(ValueError, match="single string"):
    clip.encode_batch("a photo of a cat")
  with pytest.raises(ValueError, match="text 1 is a int"):
    bert.encode_batch(["ok", 3])
  with pytest.raises(ValueError, match="empty batch"):
    bert.codi_token_ids([])
  with pytest.raises(ValueError, match="outside the CLIP vocabulary"):
    clip.decode([49408])
