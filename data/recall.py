"""
A synthetic associative-recall task, where only a few early tokens matter for a prediction far away.

Each sequence (characters): key-value pairs (a lowercase key, a digit), a bar, then filler
(uppercase and spaces) with queries of half the keys at random places,

    c7q2x0f5k9a1m4t3|QWERTYm4UIOP ... XCVc7ASDF GHJt3 ... KLx0ZU

A query is a key again; only the digit after it is scored: to get it right the model must keep the
pairs in its cache until their query, which may come a few or a few hundred characters later.
Querying every key would allow a shortcut: a model answering the last queries by elimination (the
values not yet asked for) reached 46 % accuracy that way without learning any lookup. Key and
value sit side by side, as in token-level recall, so the lookup is one induction step (with a
separator, "k=v" and "?k=v", it is two).
Generated from seeds: every training batch draws fresh sequences from its own seed, the held-out
val set comes from VAL_SEED; `python data/recall.py` prints examples.
"""
import numpy as np

KEYS = "abcdefghijklmnopqrstuvwxyz"
VALUES = "0123456789"
FILLER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ "
ALPHABET = KEYS + VALUES + FILLER + "|"
N_PAIRS, N_QUERIES = 8, 4
VAL_SEED = 5678  # the held-out set; training sequences come from each batch's own seed


def make_sequences(n, length, seed):
    """n encoded sequences [n, length] (uint8 indices into ALPHABET), reproducible from the seed."""
    fixed = N_PAIRS * 2 + 1 + N_QUERIES * 2  # the pairs, the bar, the queries with their answers
    if length < fixed + 1:
        raise ValueError(f"recall sequences need at least {fixed + 1} characters (block_size >= {fixed}), got {length}")
    rng = np.random.default_rng(seed)
    keys = rng.random((n, len(KEYS))).argsort(axis=1)[:, :N_PAIRS]  # distinct keys per row
    values = len(KEYS) + rng.integers(0, len(VALUES), (n, N_PAIRS))
    pairs = np.stack([keys, values], axis=2).reshape(n, -1)
    bar = np.full((n, 1), ALPHABET.index("|"))
    rest = ALPHABET.index(FILLER[0]) + rng.integers(0, len(FILLER), (n, length - N_PAIRS * 2 - 1))
    asked = rng.random((n, N_PAIRS)).argsort(axis=1)[:, :N_QUERIES]
    queries = np.stack([np.take_along_axis(keys, asked, 1), np.take_along_axis(values, asked, 1)], axis=2)
    # the queries at random places in the filler, in order and apart: the i-th starts after i
    # earlier queries and a sorted random amount of filler, so their distances to the pairs vary
    starts = np.sort(rng.integers(0, length - fixed + 1, (n, N_QUERIES)), axis=1) + 2 * np.arange(N_QUERIES)
    np.put_along_axis(rest, (starts[:, :, None] + np.arange(2)).reshape(n, -1), queries.reshape(n, -1), axis=1)
    return np.concatenate([pairs, bar, rest], axis=1).astype(np.uint8)


def query_mask(sequences):
    """True where a character is a query: a key past the bar."""
    past_bar = np.cumsum(sequences == ALPHABET.index("|"), axis=1) > 0
    return (sequences < len(KEYS)) & past_bar


def answer_mask(sequences):
    """True where a character is the answer to a query: the digit after it."""
    mask = np.zeros(sequences.shape, dtype=bool)
    mask[:, 1:] = query_mask(sequences)[:, :-1]
    return mask


def roles(sequences):
    """Boolean masks [n, length] of where each role sits: the pairs' keys and values, the bar, the
    query keys, their answers and the filler."""
    pos = np.broadcast_to(np.arange(sequences.shape[1]), sequences.shape)
    in_pairs, bar = pos < 2 * N_PAIRS, pos == 2 * N_PAIRS
    query_keys, answers = query_mask(sequences), answer_mask(sequences)
    return {"pair keys": in_pairs & (pos % 2 == 0), "pair values": in_pairs & (pos % 2 == 1), "bar": bar,
            "query keys": query_keys, "answers": answers, "filler": ~in_pairs & ~bar & ~query_keys & ~answers}


if __name__ == "__main__":
    for row in make_sequences(3, 128, VAL_SEED):
        print("".join(ALPHABET[i] for i in row))
