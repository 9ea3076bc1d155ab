"""
A synthetic associative-recall task, where only a few early tokens matter for a prediction far away.

Each sequence (characters): key=value pairs, a bar, filler, then a query for every key, in a new order,

    c=7 q=2 x=0 f=5 k=9 a=1 m=4 t=3|QWE RTZ UIOP ... ASDF?m=4?c=7?t=3?x=0?a=1?q=2?k=9?f=5

and only the value after each "?key=" is scored: to get it right the model must keep the pairs in
its cache across the filler. Generated from seeds: every training batch draws fresh sequences
from its own seed, the held-out val set comes from VAL_SEED; `python data/recall.py` prints examples.
"""
import numpy as np

KEYS = "abcdefghijklmnopqrstuvwxyz"
VALUES = "0123456789"
FILLER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ "
ALPHABET = KEYS + VALUES + FILLER + "=?|"
N_PAIRS, N_QUERIES = 8, 8
VAL_SEED = 5678  # the held-out set; training sequences come from each batch's own seed


def make_sequences(n, length, seed):
    """n encoded sequences [n, length] (uint8 indices into ALPHABET), reproducible from the seed."""
    fixed = N_PAIRS * 4 + N_QUERIES * 4  # "k=v " per pair (the last one ends in "|"), "?k=v" per query
    if length < fixed + 1:
        raise ValueError(f"recall sequences need at least {fixed + 1} characters (block_size >= {fixed}), got {length}")
    rng = np.random.default_rng(seed)
    keys = rng.random((n, len(KEYS))).argsort(axis=1)[:, :N_PAIRS]  # distinct keys per row
    values = len(KEYS) + rng.integers(0, len(VALUES), (n, N_PAIRS))
    asked = rng.random((n, N_PAIRS)).argsort(axis=1)[:, :N_QUERIES]
    char = lambda c: np.full((n, N_PAIRS), ALPHABET.index(c))
    pairs = np.stack([keys, char("="), values, char(" ")], axis=2).reshape(n, -1)
    pairs[:, -1] = ALPHABET.index("|")
    filler = ALPHABET.index(FILLER[0]) + rng.integers(0, len(FILLER), (n, length - fixed))
    pick = lambda a: np.take_along_axis(a, asked, axis=1)
    queries = np.stack([char("?")[:, :N_QUERIES], pick(keys), char("=")[:, :N_QUERIES], pick(values)], axis=2)
    return np.concatenate([pairs, filler, queries.reshape(n, -1)], axis=1).astype(np.uint8)


def answer_mask(sequences):
    """True where a character is the answer to a query: a value right after "?key="."""
    mask = np.zeros(sequences.shape, dtype=bool)
    mask[:, 3:] = (sequences[:, :-3] == ALPHABET.index("?")) & (sequences[:, 2:-1] == ALPHABET.index("="))
    return mask


if __name__ == "__main__":
    for row in make_sequences(3, 128, VAL_SEED):
        print("".join(ALPHABET[i] for i in row))
