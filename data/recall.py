"""
A synthetic associative-recall task, where only a few early tokens matter for a prediction far away.

Each sequence (characters): key=value pairs, a bar, filler, then queries that repeat some keys,

    c=7 q=2 x=0 f=5 k=9 a=1 m=4 t=3|QWE RTZ UIOP ... ASDF?m=4?c=7?t=3?x=0

and only the value after each "?key=" is scored: to get it right the model must keep the pairs in
its cache across the filler. Generated from seeds: every training batch draws fresh sequences
from its own seed, the held-out val set comes from VAL_SEED (train_shakespeare.py
--dataset=recall caches it in data/cache/); `python data/recall.py` prints examples.
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
    rows = []
    for _ in range(n):
        keys = rng.choice(len(KEYS), N_PAIRS, replace=False)
        values = rng.integers(0, len(VALUES), N_PAIRS)
        pairs = " ".join(f"{KEYS[k]}={VALUES[v]}" for k, v in zip(keys, values)) + "|"
        asked = rng.choice(N_PAIRS, N_QUERIES, replace=False)
        queries = "".join(f"?{KEYS[keys[i]]}={VALUES[values[i]]}" for i in asked)
        filler = "".join(FILLER[c] for c in rng.integers(0, len(FILLER), length - len(pairs) - len(queries)))
        rows.append([ALPHABET.index(c) for c in pairs + filler + queries])
    return np.array(rows, dtype=np.uint8)


def answer_mask(sequences):
    """True where a character is the answer to a query: a value right after "?key="."""
    mask = np.zeros(sequences.shape, dtype=bool)
    mask[:, 3:] = (sequences[:, :-3] == ALPHABET.index("?")) & (sequences[:, 2:-1] == ALPHABET.index("="))
    return mask


if __name__ == "__main__":
    for row in make_sequences(3, 128, VAL_SEED):
        print("".join(ALPHABET[i] for i in row))
