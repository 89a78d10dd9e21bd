"""A tiny offline tokenizer and corpus, for tests and the built-in example.

Nothing here downloads anything: the tokenizer is trained on the spot from the given texts, so
tests run on a machine with no network and no model cache.

Example:
    >>> from influencekit.tiny import TINY_CORPUS, build_tokenizer
    >>> tok = build_tokenizer(TINY_CORPUS)
    >>> tok.decode(tok("The ship left the harbour.")["input_ids"])
    'The ship left the harbour.'
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .errors import DataError

EOS_TOKEN = "<|endoftext|>"

# Four themes, ten sentences each, so that influence tests can check that a query about one
# theme is most influenced by training sentences of the same theme.
TINY_CORPUS: list[str] = [
    # cooking
    "The cook chops the onions before the soup goes on the stove.",
    "Fresh bread rises slowly in a warm kitchen.",
    "She adds a pinch of salt to the boiling pasta water.",
    "Garlic and butter make the mushrooms taste rich.",
    "The oven must be hot before the cake goes in.",
    "He stirs the tomato sauce with a wooden spoon.",
    "A sharp knife makes slicing vegetables quick and safe.",
    "The pancakes turn golden in the buttered pan.",
    "Simmer the beans gently until they are soft.",
    "The chef tastes the stew and adds more pepper.",
    # astronomy
    "The telescope points at a faint galaxy far away.",
    "Jupiter is the largest planet in our solar system.",
    "On a clear night the stars of the Milky Way shine brightly.",
    "The moon shows its phases as it circles the earth.",
    "A comet grows a long tail when it nears the sun.",
    "Astronomers measure the light of distant stars.",
    "Saturn has bright rings made of ice and rock.",
    "A solar eclipse happens when the moon hides the sun.",
    "The astronomer records the orbit of a small asteroid.",
    "Mars looks red because its dust is full of rust.",
    # sailing
    "The sailors raise the mainsail as the wind picks up.",
    "The ship left the harbour at dawn with the tide.",
    "A good sailor watches the clouds for a coming storm.",
    "They tie the boat to the dock with a strong rope.",
    "The captain steers the yacht toward the open sea.",
    "Waves splash over the deck of the small boat.",
    "The crew lowers the anchor in a quiet bay.",
    "A steady breeze fills the sails and the boat heels over.",
    "The lighthouse guides the ships safely past the rocks.",
    "She reads the chart to plan the voyage along the coast.",
    # music
    "The pianist plays a gentle melody in a minor key.",
    "The orchestra tunes up before the concert begins.",
    "He practices the guitar chords every evening.",
    "The choir sings in four part harmony.",
    "A steady drum beat keeps the band in time.",
    "The violinist draws the bow slowly across the strings.",
    "The song ends with a long and quiet chord.",
    "She composes music for the flute and the cello.",
    "The conductor raises his baton and the music starts.",
    "Jazz musicians often improvise a solo over the chords.",
]


def build_tokenizer(texts: Iterable[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """Train a small byte-level BPE tokenizer on ``texts``, GPT-2 style, offline.

    Like GPT-2's tokenizer it uses ``<|endoftext|>`` as eos, bos and unk token, adds no special
    tokens when encoding, and has no pad token. Byte-level means every string can be encoded,
    even with characters never seen in ``texts``.

    Example:
        >>> tok = build_tokenizer(["the cat sat", "the dog ran"], vocab_size=270)
        >>> tok.eos_token, tok.pad_token, tok("the cat")["input_ids"] == tok.encode("the cat")
        ('<|endoftext|>', None, True)
    """
    texts = list(texts)
    if not texts:
        raise DataError("build_tokenizer: no texts to train on")
    bpe = Tokenizer(models.BPE())
    # No prefix space, so "The" at the start of a text encodes as it does mid-text after a
    # newline: the same convention as GPT-2.
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # The full byte alphabet up front, so unseen characters still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        # Keep decode(encode(text)) == text exactly.
        clean_up_tokenization_spaces=False,
    )
