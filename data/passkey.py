"""
Passkey retrieval: a 5-digit key hidden at a random depth in repeated filler text, asked for at
the end. A model answers right when, reading greedily, it continues the prompt with the key: the
key is far from the question, so a KV cache that dropped it cannot answer.

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there. The grass is green. The sky is blue.
    ... The pass key is 60417. Remember it. 60417 is the pass key. ... The grass is green. ...
    What is the pass key? The pass key is 60417

The wording is the common one of the passkey test (Mohtashami & Jaggi, "Landmark Attention",
2023), written here anew; no licence restrictions. `python -m data.passkey` prints an example.
"""
import sys

import numpy as np

try:
    from data.recall import check_counts
except ModuleNotFoundError as e:  # run as a file, whose folder is on the path, not the repository's
    if e.name != "data":
        raise
    sys.exit("run it as a module, from the repository's folder: python -m data.passkey")

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def make_passkey(encode, length, seed):
    """One trial of about `length` tokens (the filler in whole blocks of its five sentences: up to
    one block, about 20 GPT-2 tokens, short): (prompt ids, answer ids), the key at a depth drawn
    uniformly in the filler. encode: str -> list of ids (the model's tokenizer). The answer is
    the key as the tokenizer writes it after the question (" 60417"). Raises ValueError for a
    length or seed that is no int >= 0, an encode that gives no list of ids, or if `length` cannot
    hold the intro, the key and the question."""
    check_counts(length=(length, 0), seed=(seed, 0))
    if not callable(encode):
        raise ValueError(f"encode must be the tokenizer's str -> list of ids, like tiktoken's encode_ordinary; got "
                         f"{encode!r}")
    rng = np.random.default_rng(seed)
    key = str(rng.integers(10_000, 100_000))
    intro, needle, question, filler = (encode(text) for text in (INTRO, NEEDLE.format(key=key), QUESTION, FILLER))
    if not all(isinstance(ids, list) and ids and all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids)
               for ids in (intro, needle, question, filler)):
        raise ValueError(f"encode must turn text into a non-empty list of token ids, as tiktoken's encode_ordinary "
                         f"does; got {type(filler).__name__} {str(filler)[:40]} for {FILLER[:20]!r}...")
    room = length - len(intro) - len(needle) - len(question)
    if room < len(filler):
        raise ValueError(f"a passkey trial needs more than {length - room + len(filler)} tokens, got length={length}")
    n = room // len(filler)
    depth = int(rng.integers(0, n + 1))  # filler sentences before the key
    prompt = intro + filler * depth + needle + filler * (n - depth) + question
    return prompt, encode(" " + key)


if __name__ == "__main__":
    from data.tokenizers import gpt2_tokenizer
    if sys.argv[1:]:
        sys.exit("python -m data.passkey takes no arguments: it prints one trial of about 200 GPT-2 tokens")
    try:
        encode, decode = gpt2_tokenizer()
    except SystemExit as e:  # offline without a cache: the training script's message, less its flag
        sys.exit(str(e).removeprefix("--tokenizer=gpt2: "))
    prompt, answer = make_passkey(encode, 200, seed=0)
    print(decode(prompt) + " ->" + decode(answer))
