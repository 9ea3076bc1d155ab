"""
Synthetic associative-recall tasks, where only a few early tokens matter for a prediction far away.

Each sequence (characters): key-value pairs (a lowercase key, a digit), a bar, then filler
(uppercase and spaces) with queries of half the keys at random places,

    c7q2x0f5k9a1m4t3|QWERTYm4UIOP ... XCVc7ASDF GHJt3 ... KLx0ZU

A query is a key again; only the digit after it is scored: to get it right the model must keep the
pairs in its cache until their query, which may come a few or a few hundred characters later.
Querying every key would allow a shortcut: a model answering the last queries by elimination (the
values not yet asked for) reached 46 % accuracy that way without learning any lookup. Key and
value sit side by side, as in token-level recall, so the lookup is one induction step (with a
separator, "k=v" and "?k=v", it is two).

The far-query variant (make_far_sequences, `--dataset=far_recall`) puts the pairs at random places
in the first quarter of the context, among filler, and asks half of them in the second half, so
every query is at least a quarter of the context after its pair (128 characters at context 512):
a sliding window of W < that sees no pair from any query, and whatever keeps a pair visible must
have chosen it when the pair went by.

    RZc7 KQq2WFx0 PLf5ZXk9a1 TWm4 t3 ... (filler) ... VBNm4DFG ... x0 ... HJKLc7 ... SDt3 ...

Generated from seeds: every training batch draws fresh sequences from its own seed, the held-out
val set comes from VAL_SEED; `python data/recall.py` prints examples of both.
"""
import os
import sys

import numpy as np

KEYS = "abcdefghijklmnopqrstuvwxyz"
VALUES = "0123456789"
FILLER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ "
ALPHABET = KEYS + VALUES + FILLER + "|"
N_PAIRS, N_QUERIES = 8, 4
VAL_SEED = 5678  # the held-out set; training sequences come from each batch's own seed


def check_counts(**counts):
    """Raise a ValueError naming the first of counts {name: (value, least)} that is not an int (a
    bool is none) >= its least: numpy's own errors name no argument."""
    for name, (value, least) in counts.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def machine_memory():
    """The bytes of this machine's memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # Windows has no sysconf
        return None


def check_size(n, length, per_token=9, names=("n", "length")):
    """Raise a MemoryError naming n and length (as `names`) where n sequences of `length` tokens of
    per_token bytes (9: uint8 ids and the int64 draws made for them) would not fit in this
    machine's memory (numpy's and torch's own errors name a shape or a byte count)."""
    total = machine_memory()
    if total is not None and per_token * n * length > total:
        raise MemoryError(f"{names[0]}={n} sequences of {names[1]}={length} need about "
                          f"{per_token * n * length / 2**30:.3g} GiB, more than this machine's {total / 2**30:.3g} "
                          f"GiB: pass a smaller {names[0]} or {names[1]}")


def make_sequences(n, length, seed):
    """n encoded sequences [n, length] (uint8 indices into ALPHABET), reproducible from the seed:
    the pairs, a bar, then filler with the queries. Raises ValueError for counts that are no ints
    (n >= 1, seed >= 0) and if length cannot hold them, MemoryError if they do not fit (check_size)."""
    check_counts(n=(n, 1), length=(length, 0), seed=(seed, 0))
    check_size(n, length)
    fixed = N_PAIRS * 2 + 1 + N_QUERIES * 2  # the pairs, the bar, the queries with their answers
    if length < fixed + 1:
        raise ValueError(f"recall sequences need at least {fixed + 1} characters (block_size >= {fixed}), got "
                         f"{length} (block_size {length - 1})")
    rng = np.random.default_rng(seed)
    pairs, queries = draw_pairs(rng, n)
    bar = np.full((n, 1), ALPHABET.index("|"))
    rest = filler(rng, n, length - N_PAIRS * 2 - 1)
    place(rng, rest, queries, 0, rest.shape[1])
    return np.concatenate([pairs, bar, rest], axis=1).astype(np.uint8)


def make_far_sequences(n, length, seed):
    """n encoded sequences [n, length] (uint8 indices into ALPHABET), reproducible from the seed:
    the pairs at random places in the first quarter, the queries at random places in the second
    half, filler around them. Raises ValueError for counts that are no ints (n >= 1, seed >= 0) and
    if length cannot hold them (length >= 64), MemoryError if they do not fit (check_size)."""
    check_counts(n=(n, 1), length=(length, 0), seed=(seed, 0))
    check_size(n, length)
    if length < 64:
        raise ValueError(f"far-query recall needs at least 64 characters (block_size >= 63), got {length} "
                         f"(block_size {length - 1})")
    rng = np.random.default_rng(seed)
    pairs, queries = draw_pairs(rng, n)
    rows = filler(rng, n, length)
    place(rng, rows, pairs, 0, length // 4)
    place(rng, rows, queries, length // 2, length)
    return rows.astype(np.uint8)


def draw_pairs(rng, n):
    """Key-value pairs [n, 2 N_PAIRS] (distinct keys per row, as key, value, key, value, ...) and
    the queries [n, 2 N_QUERIES] of a random half of them with their answers."""
    keys = rng.random((n, len(KEYS))).argsort(axis=1)[:, :N_PAIRS]  # distinct keys per row
    values = len(KEYS) + rng.integers(0, len(VALUES), (n, N_PAIRS))
    asked = rng.random((n, N_PAIRS)).argsort(axis=1)[:, :N_QUERIES]
    queries = np.stack([np.take_along_axis(keys, asked, 1), np.take_along_axis(values, asked, 1)], axis=2)
    return np.stack([keys, values], axis=2).reshape(n, -1), queries.reshape(n, -1)


def filler(rng, n, length):
    """Random filler characters [n, length] (int64 indices into ALPHABET)."""
    return ALPHABET.index(FILLER[0]) + rng.integers(0, len(FILLER), (n, length))


def place(rng, rows, items, start, end):
    """Write items [n, 2 k] (k two-character items) into rows [n, L] at random places in
    start .. end - 1, in order and apart: the i-th begins after the i earlier ones and a sorted
    random amount of filler, so their distances to what came before vary."""
    n, k = items.shape[0], items.shape[1] // 2
    starts = start + np.sort(rng.integers(0, end - start - 2 * k + 1, (n, k)), axis=1) + 2 * np.arange(k)
    np.put_along_axis(rows, (starts[:, :, None] + np.arange(2)).reshape(n, -1), items, axis=1)


def query_mask(sequences):
    """True where a character is a query: a key that came before in its row (every key appears
    once in the pairs and at most once as a query; the filler holds none). sequences: [n, length]
    indices into ALPHABET; raises ValueError for another shape, dtype or index."""
    sequences = np.asarray(sequences)
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be [n, length] indices into ALPHABET, got shape {sequences.shape}")
    if sequences.size and (sequences.dtype.kind not in "iu" or sequences.min() < 0 or sequences.max() >= len(ALPHABET)):
        raise ValueError(f"sequences must be integer indices into ALPHABET, 0..{len(ALPHABET) - 1}; got "
                         f"{sequences.dtype} {sequences.min()}..{sequences.max()}")
    mask = np.zeros(sequences.shape, dtype=bool)
    for key in range(len(KEYS)):
        is_key = sequences == key
        mask |= is_key & (np.cumsum(is_key, axis=1) > 1)
    return mask


def answer_mask(sequences):
    """True where a character is the answer to a query: the digit after it. sequences as query_mask's."""
    queries = query_mask(sequences)
    mask = np.zeros(queries.shape, dtype=bool)
    mask[:, 1:] = queries[:, :-1]
    return mask


def roles(sequences):
    """Boolean masks [n, length] of where each role sits: the pairs' keys and values, the bar (in
    make_sequences' layout; none in the far-query one), the query keys, their answers and the filler.
    sequences as query_mask's."""
    sequences = np.asarray(sequences)
    query_keys, answers = query_mask(sequences), answer_mask(sequences)
    pair_keys = (sequences < len(KEYS)) & ~query_keys
    pair_values = np.zeros(sequences.shape, dtype=bool)
    pair_values[:, 1:] = pair_keys[:, :-1]
    bar = sequences == ALPHABET.index("|")
    return {"pair keys": pair_keys, "pair values": pair_values, "bar": bar, "query keys": query_keys,
            "answers": answers, "filler": ~(pair_keys | pair_values | bar | query_keys | answers)}


if __name__ == "__main__":
    if sys.argv[1:]:
        sys.exit("python data/recall.py takes no arguments: it prints three sequences of each task")
    for make in (make_sequences, make_far_sequences):
        for row in make(3, 128, VAL_SEED):
            print("".join(ALPHABET[i] for i in row))
