"""
A synthetic associative-recall task, where only a few early tokens matter for a prediction far away.

Each sequence (characters): key=value pairs, a bar, then filler with queries of half the keys at
random places,

    c=7 q=2 x=0 f=5 k=9 a=1 m=4 t=3|QWE RTZ?m=4UIOP ... XCV?c=7ASDF GHJ?t=3 ... KL?x=0ZU

and only the value after each "?key=" is scored: to get it right the model must keep the pairs in
its cache until their query, which may come a few or a few hundred characters later. Querying
every key would allow a shortcut: a model answering the last queries by elimination (the values
not yet asked for) reached 46 % accuracy that way without learning any lookup. Generated from seeds: every training batch draws fresh sequences
from its own seed, the held-out val set comes from VAL_SEED; `python data/recall.py` prints examples.
"""
import numpy as np

KEYS = "abcdefghijklmnopqrstuvwxyz"
VALUES = "0123456789"
FILLER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ "
ALPHABET = KEYS + VALUES + FILLER + "=?|"
N_PAIRS, N_QUERIES = 8, 4
VAL_SEED = 5678  # the held-out set; training sequences come from each batch's own seed


def make_sequences(n, length, seed):
    """n encoded sequences [n, length] (uint8 indices into ALPHABET), reproducible from the seed."""
    fixed = N_PAIRS * 4 + N_QUERIES * 4  # "k=v " per pair (the last one ends in "|"), "?k=v" per query
    if length < fixed + 1:
        raise ValueError(f"recall sequences need at least {fixed + 1} characters (block_size >= {fixed}), got {length}")
    rng = np.random.default_rng(seed)
    keys = rng.random((n, len(KEYS))).argsort(axis=1)[:, :N_PAIRS]  # distinct keys per row
    values = len(KEYS) + rng.integers(0, len(VALUES), (n, N_PAIRS))
    char = lambda c, m: np.full((n, m), ALPHABET.index(c))
    pairs = np.stack([keys, char("=", N_PAIRS), values, char(" ", N_PAIRS)], axis=2).reshape(n, -1)
    pairs[:, -1] = ALPHABET.index("|")
    rest = ALPHABET.index(FILLER[0]) + rng.integers(0, len(FILLER), (n, length - N_PAIRS * 4))
    asked = rng.random((n, N_PAIRS)).argsort(axis=1)[:, :N_QUERIES]
    ask = lambda a: np.take_along_axis(a, asked, axis=1)
    queries = np.stack([char("?", N_QUERIES), ask(keys), char("=", N_QUERIES), ask(values)], axis=2)
    # the queries at random places in the filler, in order and apart: the i-th starts after i
    # earlier queries and a sorted random amount of filler, so their distances to the pairs vary
    starts = np.sort(rng.integers(0, length - fixed + 1, (n, N_QUERIES)), axis=1) + 4 * np.arange(N_QUERIES)
    np.put_along_axis(rest, (starts[:, :, None] + np.arange(4)).reshape(n, -1), queries.reshape(n, -1), axis=1)
    return np.concatenate([pairs, rest], axis=1).astype(np.uint8)


def answer_mask(sequences):
    """True where a character is the answer to a query: a value right after "?key="."""
    mask = np.zeros(sequences.shape, dtype=bool)
    mask[:, 3:] = (sequences[:, :-3] == ALPHABET.index("?")) & (sequences[:, 2:-1] == ALPHABET.index("="))
    return mask


if __name__ == "__main__":
    for row in make_sequences(3, 128, VAL_SEED):
        print("".join(ALPHABET[i] for i in row))
