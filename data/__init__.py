"""
The data room: the corpora and tasks a model trains on, their tokenizers, and the batches.

    load_dataset(dataset, tokenizer, block_size, pretrained)   train and val data, encode, decode, vocab size
    decodable_size(dataset, tokenizer, vocab_size)   how many ids, from 0, the decoder turns into text
    get_batch(data, batch_size, block_size, seed, device)   one batch of inputs and targets
    seed_of(seed, stream, index)                   the seed of one batch of one random stream

Shakespeare (shakespeare.txt, see data/README.md) comes as a token stream, cached in data/cache/
by tokenizer and text; the recall tasks (recall.py) are drawn from seeds.
"""
import hashlib
import os
import zipfile

import numpy as np
import torch

from data import recall
from data.tokenizers import (GPT2_PADDED_VOCAB, GPT2_VOCAB, char_tokenizer, checked, gpt2_tokenizer,
                             pretrained_tokenizer)

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
DATASETS = ("shakespeare", "recall", "far_recall")
TOKENIZERS = ("char", "gpt2", "pretrained")  # Shakespeare's; the recall tasks have their own symbols
BOM = "\ufeff"  # a byte-order mark, as some editors save at a file's start: no character of the corpus
RECALL_TASKS = {"recall": recall.make_sequences, "far_recall": recall.make_far_sequences}  # dataset: generator


def load_dataset(dataset, tokenizer, block_size, pretrained=""):
    """(train, val, encode, decode, vocab_size) of one of DATASETS: token arrays for Shakespeare
    (load_corpus; tokenizer "pretrained" is the own one of the pretrained model at `pretrained`), a
    generator and a fixed val set for the recall tasks (load_recall, sequences of block_size + 1).
    Raises SystemExit naming the corpus or --dataset for a context it cannot fill (or hold in
    memory), ValueError for a dataset, tokenizer or block_size (an int >= 1) that is none, a recall
    task's tokenizer other than "char", or tokenizer "pretrained" without `pretrained`."""
    if dataset not in DATASETS or tokenizer not in TOKENIZERS:
        raise ValueError(f"dataset must be one of {DATASETS} and tokenizer one of {TOKENIZERS}; got {dataset!r}, "
                         f"{tokenizer!r}")
    if dataset != "shakespeare" and tokenizer != "char":
        raise ValueError(f"tokenizer must be 'char' for dataset {dataset!r}: its sequences are of its own alphabet's "
                         f"symbols; got {tokenizer!r}")
    recall.check_counts(block_size=(block_size, 1))
    if dataset == "shakespeare":
        corpus = load_corpus(tokenizer, pretrained)
        val = corpus[1]  # the shorter split: a tenth
        if len(val) < block_size + 2:  # get_batch draws a window's start from len - block_size - 1
            fix = f"a --block_size up to {len(val) - 2} or " if len(val) > 2 else ""
            raise SystemExit(f"{corpus_path()}: its val split (the last 10 %) has {len(val)} tokens ({tokenizer}), "
                             f"fewer than a context of --block_size={block_size} needs ({block_size + 2}): pass "
                             f"{fix}a longer corpus")
        return corpus
    try:
        return load_recall(RECALL_TASKS[dataset], block_size + 1)
    except ValueError as e:
        raise SystemExit(f"--dataset={dataset}: {e}") from None
    except MemoryError:  # numpy's message names an array's shape, not the setting
        raise SystemExit(f"--dataset={dataset}: its val set of sequences of --block_size={block_size} + 1 tokens does "
                         f"not fit in memory; pass a smaller --block_size") from None


def decodable_size(dataset, tokenizer, vocab_size):
    """How many token ids, from 0, the decoder of load_dataset's data turns into text: GPT-2's
    50257 under its output layer's padded vocab_size; every id for the other tokenizers. Raises
    ValueError for an unknown dataset or tokenizer, or a vocab_size that is no int >= 1."""
    if dataset not in DATASETS or tokenizer not in TOKENIZERS:
        raise ValueError(f"dataset must be one of {DATASETS} and tokenizer one of {TOKENIZERS}; got {dataset!r}, "
                         f"{tokenizer!r}")
    recall.check_counts(vocab_size=(vocab_size, 1))
    return min(GPT2_VOCAB, vocab_size) if dataset == "shakespeare" and tokenizer == "gpt2" else vocab_size


def corpus_path():
    """Shakespeare's text, in DATA_DIR (read when called: tests point it elsewhere)."""
    return os.path.join(DATA_DIR, "shakespeare.txt")


def load_corpus(tokenizer, pretrained=""):
    """Token arrays of the train and val splits (last 10 %), plus encode/decode and vocab size.
    Raises SystemExit naming the corpus when it is missing, empty or not UTF-8 text, ValueError for
    tokenizer "pretrained" without the pretrained model (its tokenizer is that model's own)."""
    if tokenizer == "pretrained" and not pretrained:
        raise ValueError(f"tokenizer 'pretrained' is a pretrained model's own, but pretrained={pretrained!r} names "
                         f"none: pass pretrained=<its GGUF file, HF folder or hub name> (train_shakespeare.py's "
                         f"--init_from), or tokenizer 'char' or 'gpt2'")
    path = corpus_path()
    if not os.path.isfile(path):
        what = (f"{path} is a folder, not the corpus" if os.path.isdir(path) else f"{path} is no regular file (a pipe "
                f"or a device?), not the corpus" if os.path.exists(path) else f"missing corpus {path}")
        raise SystemExit(f"{what}; rebuild it as data/README.md describes")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().removeprefix(BOM)
    except UnicodeDecodeError as e:
        raise SystemExit(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}): the corpus is a text file; "
                         f"convert it (iconv -t UTF-8) or rebuild it as data/README.md describes") from None
    if not text:
        raise SystemExit(f"{path} is empty: the corpus is a text file; rebuild it as data/README.md describes")
    if tokenizer == "char":
        encode, decode, vocab_size = char_tokenizer(text)
    elif tokenizer == "gpt2":
        encode, decode = gpt2_tokenizer()
        vocab_size = GPT2_PADDED_VOCAB
    else:
        encode, decode, vocab_size, tokenizer = pretrained_tokenizer(pretrained)
    # the cache is named by the text it encodes: an edited corpus gets a new one, never a stale one
    tokens = cached(os.path.join(DATA_DIR, "cache", f"shakespeare_{tokenizer}_{text_digest(text)}.npz"),
                    lambda: np.array(encode(text), dtype=np.uint16 if vocab_size <= 2**16 else np.uint32), vocab_size)
    split = int(0.9 * len(tokens))
    return tokens[:split], tokens[split:], encode, decode, vocab_size


def text_digest(text):
    """16 hex digits of the sha256 of a text (a str; else ValueError): its token cache's name, and the
    corpus a checkpoint trained on."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def ids_digest(array):
    """The sha256 (hex) of a token array's bytes: what its cache saves beside it."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def corpus_digest():
    """text_digest of the corpus as load_corpus reads it."""
    with open(corpus_path(), encoding="utf-8") as f:
        return text_digest(f.read().removeprefix(BOM))


def cached(path, make, vocab_size):
    """The token ids saved at path, or make()'s, saved there on first use (never committed), as an
    .npz of the ids and their sha256. A file there that does not load so, holds ids not below
    vocab_size, or ids whose digest is not the one saved with them (cut short, edited, overwritten)
    is derived data: it is made again, with a line saying so. Where it cannot be saved (a read-only
    data/cache, a full disk) the run goes on with it unsaved and a line says which folder to make
    writable."""
    if os.path.exists(path):
        try:
            saved = np.load(path)
            if not isinstance(saved, np.lib.npyio.NpzFile):
                raise ValueError(f"one {type(saved).__name__}, not an .npz")
            with saved:
                array, digest = saved["ids"], str(saved["sha256"])
            if array.ndim != 1 or not array.size or array.dtype.kind != "u" or array.max() >= vocab_size:
                problem = "ids that are not this tokenizer's"
            elif digest != ids_digest(array):
                problem = "ids that are not the ones saved (cut short or edited: their sha256 differs)"
            else:
                return array
        except OSError as e:
            problem = f"a file that cannot be read ({e.strerror or e})"
        except (ValueError, EOFError, KeyError, zipfile.BadZipFile):  # numpy's reasons speak of pickles and zips
            problem = "no .npz of ids and their sha256 (damaged, or not written by this script)"
        print(f"note: the cached tokens {path} hold {problem}: encoding the corpus again")
    array = make()
    tmp = path + f".{os.getpid()}.tmp.npz"  # parallel runs (sweep --jobs) each write their own
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(tmp, ids=array, sha256=ids_digest(array))
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        folder = os.path.dirname(path)
        if os.path.isdir(path):  # (the folder itself is writable)
            print(f"could not cache the encoded corpus: {path} is a folder, where the cache file goes; remove it "
                  f"(the corpus is encoded again on every run until then)")
        else:
            fix = "a folder, writable" if os.path.exists(folder) and not os.path.isdir(folder) else "writable"
            print(f"could not cache the encoded corpus in {folder} ({e.strerror or e}): it is encoded again on every "
                  f"run until that is {fix}")
    return array


def load_recall(make, length, n_val=2000):
    """A recall task (make: one of RECALL_TASKS' generators): a function drawing n fresh training
    sequences [n, length] from a seed (a fixed pool gets memorized: on 20,000 sequences a 2-layer
    model learned their answers by heart and not the rule), and a fixed held-out val set."""
    train = lambda n, seed: make(n, length, seed)
    encode, decode = checked(lambda s: [recall.ALPHABET.index(c) for c in s],
                             lambda ids: "".join(recall.ALPHABET[i] for i in ids), len(recall.ALPHABET),
                             "the recall symbols' indices")
    return train, make(n_val, length, recall.VAL_SEED), encode, decode, len(recall.ALPHABET)


TRAIN_BATCH, TRAIN_NOISE, EVAL_BATCH, EVAL_NOISE, PASSKEY = 0, 1, 2, 3, 4  # the random streams seed_of names


def seed_of(seed, stream, index):
    """The seed of batch `index` of one random stream: every micro-batch's data and Gumbel/dropout
    noise depend on its index alone, so runs resume exactly and a multi-GPU run sees the batches
    and noise a single-GPU run would. Raises ValueError for one that is no int >= 0, or a seed
    past 2**63 - 1 (the seeds made are 63-bit: seed + 2**63 would repeat seed's batches)."""
    recall.check_counts(seed=(seed, 0), stream=(stream, 0), index=(index, 0))
    seed, stream, index = int(seed), int(stream), int(index)  # numpy's ints would overflow
    if seed >= 2**63:
        raise ValueError(f"seed must be an int in 0 .. 2**63 - 1, got {seed}")
    return ((seed * 4_000_037 + stream) * 1_000_000_007 + index) % 2**63


def get_batch(data, batch_size, block_size, seed, device):
    """Random windows of a token stream (1-d data); or recall sequences, drawn fresh from the seed
    (data a function: training) or picked from a fixed set (2-d data, one a row: val), whose
    targets are -1 (not scored) except at the answers. Returns x, y: long [batch_size, block_size].
    Raises ValueError for data that is none of these (or a function that returns no integer array
    [batch_size, block_size + 1]), token ids < 0, counts that are no ints (batch_size, block_size
    >= 1, seed in 0 .. 2**64 - 1), a device that is none or not here, or a stream shorter than a window;
    MemoryError for a batch past this machine's memory."""
    if not (callable(data) or isinstance(data, np.ndarray) and data.ndim in (1, 2)):
        raise ValueError(f"data must be a 1-d or 2-d numpy array of token ids or a sequence generator, got "
                         f"{type(data).__name__}")
    recall.check_counts(batch_size=(batch_size, 1), block_size=(block_size, 1), seed=(seed, 0))
    recall.check_size(batch_size, block_size + 1, 24, ("batch_size", "block_size"))  # long x, y and the draws
    if seed >= 2**64:
        raise ValueError(f"seed must be an int in 0 .. 2**64 - 1 (torch's generator takes 64 bits), got {seed}")
    check_device(device)
    ids = data(batch_size, seed) if callable(data) else data  # fresh sequences are checked as a fixed set is
    if callable(data) and not (isinstance(ids, np.ndarray) and ids.shape == (batch_size, block_size + 1)):
        got = f"shape {ids.shape}" if isinstance(ids, np.ndarray) else type(ids).__name__
        raise ValueError(f"data, a sequence generator, must return a numpy array [batch_size, block_size + 1] = "
                         f"[{batch_size}, {block_size + 1}] of token ids, got {got}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"data must hold token ids (integers), got {ids.dtype}")
    if ids.ndim == 2 and (ids.shape[1] != block_size + 1 or not len(ids)):
        raise ValueError(f"data's rows must be sequences of block_size + 1 = {block_size + 1} tokens, at least one, "
                         f"got shape {ids.shape}")
    if ids.ndim == 1 and len(ids) < block_size + 2:
        raise ValueError(f"data has {len(ids)} tokens, fewer than a window of block_size={block_size} needs "
                         f"({block_size + 2})")
    if ids.dtype.kind == "i" and ids.min() < 0:  # the embedding would read it from its end (unsigned ones need no look)
        raise ValueError(f"data's token ids must be >= 0 (indices into the vocabulary), got {ids.min()}")
    if ids.dtype == np.uint64 and ids.max() >= 2**63:  # as int64, torch's ids, it would wrap to a negative one
        raise ValueError(f"data's token ids must be below 2**63 (torch's int64 ids), got {ids.max()}")
    generator = torch.Generator().manual_seed(int(seed))  # it takes no numpy int
    if callable(data):
        rows = ids
    elif data.ndim == 2:
        rows = data[torch.randint(len(data), (batch_size,), generator=generator).numpy()]
    else:
        ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator).tolist()
        x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
        return x.to(device), y.to(device)
    x = torch.from_numpy(rows[:, :-1].astype(np.int64))
    y = torch.from_numpy(np.where(recall.answer_mask(rows), rows.astype(np.int64), -1)[:, 1:])
    return x.to(device), y.to(device)


def check_device(name):
    """name as a torch.device, or a ValueError naming a device that is none, one of a kind other than
    cpu and cuda, or one this torch cannot reach (a CPU-only build, a GPU index past the last):
    torch's own errors name no argument and what to pass."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r} is not a device; pass 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cpu" and device.index:  # torch takes cpu:1 as a device, which a checkpoint cannot load to
        raise ValueError(f"device={name!r}: the CPU is one device; pass 'cpu'")
    if device.type not in ("cpu", "cuda"):  # meta, mps, xpu, ...: devices this project is not run on
        raise ValueError(f"device={name!r}: the model runs on 'cpu' or 'cuda' ('cuda:N' for one GPU); pass 'cpu'")
    count = torch.cuda.device_count() if device.type == "cuda" else 0  # 0 on a CPU-only build
    if device.type == "cuda" and (device.index or 0) >= count:
        gpus = f" or one of 'cuda:0' .. 'cuda:{count - 1}'" if count else ""
        raise ValueError(f"device={name!r} is not here: torch sees {count} CUDA devices; pass 'cpu'{gpus}")
    return device
