"""Tokenizers: tiktoken encodings by name.

- ``bytes``: built in and offline. Every byte is its own token (ids 0..255) and ``<|endoftext|>`` is
  id 256. Nothing is merged, so any UTF-8 text round-trips exactly. The embedded world uses it.
- ``gpt2``: GPT-2's BPE from tiktoken. tiktoken downloads its ranks file once into its cache; offline,
  ``get_tokenizer`` says how to provide that file instead of failing deep inside tiktoken.

A checkpoint records its tokenizer's name (``config.json``); ``check_pairing`` refuses a model that
is paired with a tokenizer of another vocabulary.
"""
import tiktoken

EOT = "<|endoftext|>"


class TokenizerError(RuntimeError):
    """A tokenizer cannot be built or does not fit the model it is paired with."""


def _bytes_encoding() -> tiktoken.Encoding:
    ranks = {bytes([i]): i for i in range(256)}
    # The split pattern only chunks text before BPE; with no merges any pattern gives one token per byte.
    return tiktoken.Encoding(name="bytes", pat_str=r"[\s\S]", mergeable_ranks=ranks,
                             special_tokens={EOT: 256})


class Tokenizer:
    """A thin wrapper over a tiktoken ``Encoding`` that knows its end-of-text id."""

    def __init__(self, name: str, encoding: tiktoken.Encoding):
        self.name = name
        self.encoding = encoding
        self.eot = encoding.encode_single_token(EOT)
        self.vocab_size = encoding.n_vocab
        self._byte_lengths = {}

    def encode(self, text: str) -> list[int]:
        """Text to ids; the literal string ``<|endoftext|>`` in user text stays plain text."""
        return self.encoding.encode_ordinary(text)

    def byte_length(self, token: int) -> int:
        """How many bytes of text one token stands for (cached: a vocabulary is fixed)."""
        if token not in self._byte_lengths:
            self._byte_lengths[token] = len(self.encoding.decode_single_token_bytes(token))
        return self._byte_lengths[token]

    def decode(self, ids) -> str:
        """Ids to text; a byte sequence cut mid-character decodes with replacement characters."""
        return self.encoding.decode([int(i) for i in ids if int(i) != self.eot], errors="replace")

    def token_id(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token (e.g. the self-evaluation letters A, B)."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise TokenizerError(f"{text!r} is {len(ids)} tokens in the {self.name} tokenizer, expected 1.")
        return ids[0]


def get_tokenizer(name: str) -> Tokenizer:
    """Build the tokenizer called ``name`` ("bytes" or "gpt2")."""
    if name == "bytes":
        return Tokenizer("bytes", _bytes_encoding())
    if name == "gpt2":
        try:
            return Tokenizer("gpt2", tiktoken.get_encoding("gpt2"))
        except Exception as err:  # tiktoken raises requests/OS errors of several kinds offline
            raise TokenizerError(
                "The gpt2 tokenizer could not be loaded (offline?): run once with internet access, or copy "
                "tiktoken's cached vocab.bpe/encoder.json files into the folder named by TIKTOKEN_CACHE_DIR "
                f"({type(err).__name__}: {err})") from None
    raise TokenizerError(f"Unknown tokenizer {name!r}: choose 'bytes' or 'gpt2'.")


VOCAB_PADDING = 128  # a model may round its vocabulary up for speed (GPT-2's 50257 to 50304)
VOCAB_SIZES = {"bytes": 257, "gpt2": 50257}  # each tokenizer's ids, known without building it (gpt2 needs a download)


def pairing_defect(name: str, tokenizer_vocab: int, model_vocab: int) -> str | None:
    """Why a model and a tokenizer do not fit each other, either way, or None: a model whose
    vocabulary cannot hold the tokenizer's ids, or one whose vocabulary is far larger (more than
    padding), which would emit ids the tokenizer cannot decode."""
    if tokenizer_vocab > model_vocab:
        return (f"the model has a vocabulary of {model_vocab} but the {name} tokenizer needs {tokenizer_vocab}; "
                "use the tokenizer the checkpoint was trained with")
    if model_vocab >= tokenizer_vocab + VOCAB_PADDING:
        return (f"the model has a vocabulary of {model_vocab} but the {name} tokenizer knows only {tokenizer_vocab} "
                "ids, so the model would emit ids it cannot decode; use the tokenizer the model was trained with "
                "(--tokenizer gpt2 for GPT-2 weights)")
    return None


def check_pairing(tokenizer: Tokenizer, model_vocab_size: int, source: str) -> None:
    """Refuse a model and tokenizer that do not fit each other (``pairing_defect``), naming ``source``."""
    defect = pairing_defect(tokenizer.name, tokenizer.vocab_size, model_vocab_size)
    if defect:
        raise TokenizerError(f"{source}: {defect}.")
