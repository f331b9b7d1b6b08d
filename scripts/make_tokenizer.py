"""Generate the tiny CLIP BPE tokenizer shipped in ``lora_ops/testing/tokenizer/`` (vocab.json + merges.txt).

Layout follows OpenAI CLIP's: the 256 byte-level characters, the same with ``</w>`` (end of word), the merged
tokens in merge order, then ``<|startoftext|>`` and ``<|endoftext|>`` last. The merges are learned by plain BPE
on a short word list (ties broken by the pair's text), so the output is deterministic. Run from the repo root:

    python scripts/make_tokenizer.py
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "lora_ops" / "testing" / "tokenizer"
NUM_MERGES = 120
WORDS = (
    "a photo of sks dog cat the in style painting portrait person man woman landscape with and on by an "
    "picture drawing sketch anime art realistic high quality detailed red blue green black white "
    "background cute small big house tree sky mountain"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair text)."""
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs = Counter(pair for s in seqs for pair in zip(s, s[1:]))
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(s[j] + s[j + 1])
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
    return merges


def build() -> tuple[dict[str, int], list[str]]:
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = learn_merges(WORDS, NUM_MERGES)
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in merges]


def main() -> None:
    vocab, merges = build()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {OUT}")  # noqa: T201 (a script, not library code)


if __name__ == "__main__":
    main()
