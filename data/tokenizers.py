"""
Tokenizers: encode(str) -> list of ids, decode(list of ids) -> str, and the vocabulary size the
model's embedding gets.

    char   one id per distinct character of the corpus, in sorted order
    gpt2   tiktoken's GPT-2 BPE (50257 tokens; its files are downloaded once and cached)
"""
GPT2_PADDED_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64: faster matrix products


def char_tokenizer(text):
    """encode, decode and the vocabulary size of the characters of text."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda s: [stoi[c] for c in s]), (lambda ids: "".join(chars[i] for i in ids)), len(chars)


def gpt2_tokenizer():
    """encode, decode of tiktoken's GPT-2 BPE, whose files tiktoken downloads on first use."""
    import tiktoken
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as e:  # requests' connection errors, a hash mismatch of a partial download, ...
        raise SystemExit(f"--tokenizer=gpt2: tiktoken could not get the GPT-2 BPE files ({type(e).__name__}). "
                         f"It downloads them on first use; offline, copy a tiktoken cache folder from a "
                         f"machine that has one and set TIKTOKEN_CACHE_DIR=<that folder>") from None
    return enc.encode_ordinary, enc.decode
