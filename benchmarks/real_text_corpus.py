"""The real-text corpus of the search benchmark's real-text index: every BEIR corpus under an eval folder (Cranfield
and XQuAD's 12 languages in ../shared/eval) as one JSONL file, ids prefixed with their corpus (XQuAD's languages
share ids), title and text joined.

    python benchmarks/real_text_corpus.py ../shared/eval /tmp/real.jsonl
    bge-index index /tmp/real.jsonl -o /tmp/real-index --model CHECKPOINT --chunk-tokens 20 --chunk-overlap 12 --no-store-text
    python benchmarks/search_bench.py --index /tmp/real-index --queries ../shared/eval/cranfield-beir/queries.jsonl --count 64

Prints the documents written per corpus.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_dir", type=Path, help="a folder of BEIR corpora (corpus.jsonl files, any depth)")
    parser.add_argument("out", type=Path, help="the JSONL file to write")
    args = parser.parse_args()
    corpora = sorted(args.eval_dir.rglob("corpus.jsonl"))
    if not corpora:
        raise SystemExit(f"{args.eval_dir}: no corpus.jsonl below it")
    with args.out.open("w", encoding="utf-8") as out:
        for corpus in corpora:
            tag = corpus.parent.relative_to(args.eval_dir).as_posix()  # cranfield-beir, xquad-beir/de, ...
            written = 0
            with corpus.open(encoding="utf-8") as lines:
                for line in lines:
                    document = json.loads(line)
                    text = f"{document.get('title', '')}\n{document.get('text', '')}".strip()
                    out.write(json.dumps({"id": f"{tag}/{document['_id']}", "text": text}, ensure_ascii=False) + "\n")
                    written += 1
            print(f"{tag}: {written:,} documents")


if __name__ == "__main__":
    main()
