"""The reference side of encode_bench.py: FlagEmbedding's BGEM3FlagModel.encode on a list of texts.

Runs in FlagEmbedding's own virtual environment (it needs transformers<5), so
it imports nothing from bge_index:

    VENV/bin/python benchmarks/reference_encode.py --model DIR --texts TEXTS.jsonl --out VECTORS.npz
        [--max-length 8192] [--batch-size 256] [--device cpu] [--fp16|--bf16]

TEXTS.jsonl has one JSON string per line. Only the `encode` call is timed;
the model load is not. Prints one JSON line: seconds, documents, tokens,
dtype. Writes the dense matrix and the sparse vectors (ids, weights, offsets)
to VECTORS.npz for comparison.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=256)  # BGEM3FlagModel's default
    parser.add_argument("--device", default=None)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--bf16", action="store_true")
    args = parser.parse_args()

    from FlagEmbedding import BGEM3FlagModel

    with open(args.texts, encoding="utf-8") as stream:
        texts = [json.loads(line) for line in stream]
    # use_fp16 is the library's default, but it forces fp32 on CPU itself.
    model = BGEM3FlagModel(args.model, use_fp16=args.fp16, use_bf16=args.bf16,
                           devices=args.device)
    tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"])
    started = time.perf_counter()
    output = model.encode(texts, batch_size=args.batch_size, max_length=args.max_length,
                          return_dense=True, return_sparse=True, return_colbert_vecs=False)
    seconds = time.perf_counter() - started

    sparse_ids, sparse_weights, offsets = [], [], [0]
    for weights in output["lexical_weights"]:
        ids = sorted(int(token) for token in weights)
        sparse_ids.extend(ids)
        sparse_weights.extend(float(weights[str(token)]) for token in ids)
        offsets.append(len(sparse_ids))
    np.savez(args.out, dense=np.asarray(output["dense_vecs"], dtype=np.float32),
             sparse_ids=np.asarray(sparse_ids, dtype=np.uint32),
             sparse_weights=np.asarray(sparse_weights, dtype=np.float32),
             sparse_offsets=np.asarray(offsets, dtype=np.int64))
    dtype = next(p.dtype for p in model.model.parameters())
    print(json.dumps({"seconds": seconds, "documents": len(texts), "tokens": tokens,
                      "dtype": str(dtype).removeprefix("torch.")}))


if __name__ == "__main__":
    main()
