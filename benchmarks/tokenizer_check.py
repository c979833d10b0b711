"""Check that bge_index.model.tokenizer (tokenizer.json read straight into Rust) gives transformers' AutoTokenizer's ids.

    python benchmarks/tokenizer_check.py ../shared/xlmr-tokenizer ../shared/eval/xquad-beir/*/corpus.jsonl

Tokenises every text (and every query beside each corpus file) both ways, with special tokens, and prints
how many texts were compared, how many differ (must be 0), and each way's load time.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bge_index.model.tokenizer import load_tokenizer


def main() -> None:
    folder, files = Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]
    started = time.perf_counter()
    ours = load_tokenizer(folder)
    ours_seconds = time.perf_counter() - started
    from transformers import AutoTokenizer

    started = time.perf_counter()
    reference = AutoTokenizer.from_pretrained(folder)
    reference_seconds = time.perf_counter() - started
    texts = []
    for path in files:
        for source in (path, path.with_name("queries.jsonl")):
            if source.exists():
                with open(source, encoding="utf-8") as lines:
                    texts += [json.loads(line)["text"] for line in lines]
    got = ours.encode_batch(texts)
    expected = reference(texts, add_special_tokens=True)["input_ids"]
    differ = sum(a != b for a, b in zip(got, expected))
    special = (ours.cls_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id)
    print(f"| texts compared | {len(texts):,} ({sum(map(len, got)):,} tokens) |")
    print(f"| texts whose ids differ | {differ} |")
    print(f"| special ids equal (cls, eos, pad, unk) | {special == (reference.cls_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id)} |")
    print(f"| load: tokenizer.json straight / AutoTokenizer | {ours_seconds:.2f} s / {reference_seconds:.2f} s |")


if __name__ == "__main__":
    main()
