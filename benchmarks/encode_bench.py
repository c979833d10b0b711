"""Encoding throughput: bge-index end to end (files in, Parquet out) against FlagEmbedding's encode call.

    python benchmarks/encode_bench.py --corpus ../shared/eval/cranfield-beir/corpus.jsonl \\
        (--model DIR | --build-checkpoint DIR --tokenizer ../shared/xlmr-tokenizer
                       [--layers 6 --hidden 384 --heads 6 --intermediate 1536])
        [--reference-python ../venv-flag/bin/python] [--queries ../shared/eval/cranfield-beir/queries.jsonl]
        [--dtypes auto,fp32] [--device cpu] [--limit N] [--max-length 8192] [--json OUT]

In one run, one after another, each as its own process (so peak RSS is its own):
- the matmul peak of this device in each dtype used (the best of a few large square products);
- `bge-index index CORPUS` once per --dtypes entry: the whole command is timed, interpreter start, model
  load, reading, encoding, Parquet writing and the manifest commit included;
- with --reference-python (a Python that imports FlagEmbedding, e.g. a venv with `flagembedding
  "transformers<5" "sentence-transformers<6" "datasets<4.5"`): BGEM3FlagModel.encode on the same texts,
  same model, same max length, dense + sparse, its default batch size; only the encode call is timed.

It prints documents/s, tokens/s, the ratio to the reference, model FLOP utilisation (FLOPs of the real,
unpadded tokens over elapsed time, divided by the measured peak in the run's dtype) and peak RSS; then how
closely the vectors agree (dense cosine, sparse token sets and weights) and, with --queries, the top-10
overlap between the dtypes' indexes. Model FLOPs per text of n tokens: layers x (2n(4h^2 + 2hi) + 4n^2 h)
+ 2nh for the sparse head (embedding look-ups are not FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bge_index.input.documents import FieldNames, Skipped, iter_documents  # noqa: E402

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass
class Run:
    tool: str
    dtype: str
    documents: int
    tokens: int
    seconds: float
    peak_rss_bytes: int
    flops: float
    peak_flops: float
    detail: dict = field(default_factory=dict)

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def mfu(self) -> float:
        return self.flops / self.seconds / self.peak_flops

    @property
    def streaming_seconds(self) -> float:
        """Seconds after the model is loaded (reading, encoding, writing); the reference's encode call."""
        if "run_seconds" in self.detail:
            return self.detail["run_seconds"] - self.detail["load_seconds"]
        return self.seconds

    @property
    def streaming_mfu(self) -> float:
        return self.flops / self.streaming_seconds / self.peak_flops


# ---------------------------------------------------------------------------
# Inputs


def prepare_corpus(paths: list[str], limit: int | None, work: Path) -> tuple[list[str], list[str], list[str]]:
    """(inputs for bge-index, ids, texts): the texts exactly as bge-index reads them, for the reference too.

    The inputs are used as they are unless a subset is asked for or ids repeat across files (XQuAD's
    languages share ids); then one JSONL file is written, ids prefixed by their folder where they repeat.
    """
    documents = [d for d in iter_documents(paths, FieldNames()) if not isinstance(d, Skipped)]
    subset_only = limit is not None and limit < len(documents)
    documents = documents[:limit] if subset_only else documents
    ids = [d.id for d in documents]
    if len(set(ids)) < len(ids):
        ids = [f"{Path(d.source).parent.name}/{d.id}" for d in documents]
    if ids == [d.id for d in documents] and not subset_only:
        return paths, ids, [d.text for d in documents]
    subset = work / "corpus.jsonl"
    with subset.open("w", encoding="utf-8") as stream:
        for doc_id, document in zip(ids, documents):
            stream.write(json.dumps({"id": doc_id, "text": document.text}, ensure_ascii=False) + "\n")
    return [str(subset)], ids, [d.text for d in documents]


def build_checkpoint(args: argparse.Namespace) -> Path:
    out = Path(args.build_checkpoint)
    if not (out / "config.json").exists():
        tool = Path(args.checkpoint_tool)
        subprocess.run([sys.executable, str(tool), str(out), "--layers", str(args.layers), "--hidden", str(args.hidden),
                        "--heads", str(args.heads), "--intermediate", str(args.intermediate),
                        "--tokenizer", str(args.tokenizer)], check=True, stdout=subprocess.DEVNULL)
    return out


def token_lengths(model: Path, texts: list[str], max_length: int) -> np.ndarray:
    """Tokens per text, <s> and </s> included, after truncation: what the model actually runs on."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_length)
    return np.array([len(e.ids) for e in tokenizer.encode_batch(texts)], dtype=np.int64)


def model_flops(model: Path, lengths: np.ndarray) -> float:
    config = json.loads((model / "config.json").read_text())
    layers, hidden, inner = config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]
    n = lengths.astype(np.float64)
    per_layer = 2 * n * (4 * hidden * hidden + 2 * hidden * inner) + 4 * n * n * hidden
    return float(np.sum(layers * per_layer + 2 * n * hidden))


# ---------------------------------------------------------------------------
# Measuring


def matmul_peak(device: str, dtype: str) -> float:
    """Best FLOP/s of large square products in this dtype on this device (several sizes, best of repeats)."""
    import torch

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    best = 0.0
    sizes = (4096, 8192) if device.startswith("cuda") else (2048, 4096)
    for size in sizes:
        a = torch.randn(size, size, device=device).to(torch_dtype)
        b = torch.randn(size, size, device=device).to(torch_dtype)
        for attempt in range(4):
            _sync(device)
            started = time.perf_counter()
            repeats = 0
            while time.perf_counter() - started < (0.2 if attempt == 0 else 1.0):
                a @ b
                repeats += 1
                if device.startswith("cuda") and repeats % 10 == 0:
                    _sync(device)
            _sync(device)
            if attempt:  # the first round warms up
                best = max(best, 2 * size ** 3 * repeats / (time.perf_counter() - started))
    return best


def kernel_ceiling(model: Path, lengths: np.ndarray, device: str, dtype: str, batch_tokens: int) -> dict:
    """The best MFU the two kernels a forward pass is made of allow here: time every batch bge-index would
    run through its attention kernel (SDPA, padded, masked) and its linear layers (at their measured rate),
    nothing else (no GELU, layer norm or residual adds), and divide the model FLOPs by that time."""
    import torch
    import torch.nn.functional as F

    from bge_index.model.batching import token_budget_batches

    config = json.loads((model / "config.json").read_text())
    layers, hidden, inner, heads = (config[k] for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                        "num_attention_heads"))
    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    batches = token_budget_batches(lengths.tolist(), batch_tokens)
    padded_tokens = sum(len(b) * int(lengths[b[0]]) for b in batches)
    # Linear layers: q, k, v, o (h x h) and the feed-forward pair (h x i, i x h) on a full token budget.
    x = torch.randn(batch_tokens, hidden, device=device).to(torch_dtype)
    weights = [torch.randn(o, i, device=device).to(torch_dtype) for o, i in
               ((hidden, hidden),) * 4 + ((inner, hidden),)]
    down = torch.randn(hidden, inner, device=device).to(torch_dtype)
    with torch.inference_mode():
        def linear_pass():
            for w in weights[:4]:
                F.linear(x, w)
            F.linear(F.linear(x, weights[4]), down)
        linear_pass()
        _sync(device)
        started = time.perf_counter()
        for _ in range(3):
            linear_pass()
        _sync(device)
        linear_rate = 3 * 2 * batch_tokens * (4 * hidden * hidden + 2 * hidden * inner) / (time.perf_counter() - started)
        attention_seconds = 0.0
        for batch in batches:
            rows, longest = len(batch), int(lengths[batch[0]])
            q, k, v = (torch.randn(rows, heads, longest, hidden // heads, device=device).to(torch_dtype)
                       for _ in range(3))
            mask = torch.arange(longest, device=device)[None, :] < torch.as_tensor(lengths[batch], device=device)[:, None]
            mask = mask[:, None, None, :]  # [B, 1, 1, L]: padded keys masked, as the model masks them
            _sync(device)
            started = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            _sync(device)
            attention_seconds += time.perf_counter() - started
    linear_flops = layers * 2 * padded_tokens * (4 * hidden * hidden + 2 * hidden * inner)
    seconds = linear_flops / linear_rate + layers * attention_seconds
    n = lengths.astype(np.float64)
    attention_flops = float(layers * np.sum(4 * n * n * hidden))
    return {"linear_rate": linear_rate, "attention_rate": attention_flops / (layers * attention_seconds),
            "attention_share_of_flops": attention_flops / model_flops(model, lengths),
            "attention_share_of_time": layers * attention_seconds / seconds,
            "seconds": seconds, "mfu_ceiling": model_flops(model, lengths) / seconds / matmul_peak(device, dtype)}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def wrapped(command: list[str]) -> list[str]:
    """Run `command` under a small Python wrapper that prints the child's own peak RSS on stderr's last line."""
    wrapper = ("import os,resource,subprocess,sys;"
               "r=subprocess.run(sys.argv[1:]);"
               "sys.stderr.write('\\nPEAK_RSS %d\\n' % (resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024));"
               "sys.exit(r.returncode)")
    return [sys.executable, "-c", wrapper, *command]


def run_child(command: list[str], env: dict | None = None) -> tuple[float, int, str]:
    started = time.perf_counter()
    process = subprocess.run(wrapped(command), capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:5])} ... failed ({process.returncode}):\n{process.stderr[-4000:]}")
    peak = int(process.stderr.rsplit("PEAK_RSS", 1)[1].split()[0])
    return seconds, peak, process.stdout


def run_bge_index(model: Path, inputs: list[str], out: Path, dtype: str, device: str, max_length: int,
                  batch_tokens: int | None) -> tuple[float, int, dict]:
    report = out.with_suffix(".report.json")
    command = [sys.executable, "-m", "bge_index", "index", *inputs, "--out", str(out), "--model", str(model),
               "--dtype", dtype, "--device", device, "--max-length", str(max_length), "--quiet",
               "--report", str(report)]
    if batch_tokens:
        command += ["--batch-tokens", str(batch_tokens)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BGE_INDEX_")}
    seconds, peak, _ = run_child(command, env)
    return seconds, peak, json.loads(report.read_text())


def run_reference(python: str, pythonpath: str | None, model: Path, texts: list[str], work: Path, device: str,
                  max_length: int, precision: str) -> tuple[float, int, dict, Path]:
    texts_file, vectors_file = work / "reference-texts.jsonl", work / "reference-vectors.npz"
    texts_file.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    command = [python, str(REPO / "benchmarks" / "reference_encode.py"), "--model", str(model),
               "--texts", str(texts_file), "--out", str(vectors_file), "--max-length", str(max_length),
               "--device", device]
    if precision in ("fp16", "bf16"):
        command.append(f"--{precision}")
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    seconds, peak, stdout = run_child(command, env)
    return seconds, peak, json.loads(stdout.strip().splitlines()[-1]), vectors_file


# ---------------------------------------------------------------------------
# Agreement


def our_vectors(index: Path, ids: list[str]) -> tuple[np.ndarray, list[dict[int, float]]]:
    from bge_index.store.manifest import read_manifest
    from bge_index.store.shard_reader import iter_live_rows

    found: dict[str, tuple[np.ndarray, dict[int, float]]] = {}
    for batch in iter_live_rows(index, read_manifest(index)):
        for row, doc_id in enumerate(batch.ids):
            start, end = batch.sparse_indptr[row], batch.sparse_indptr[row + 1]
            found[doc_id] = (batch.dense[row].astype(np.float32),
                             dict(zip(batch.sparse_indices[start:end].tolist(), batch.sparse_values[start:end].tolist())))
    dense = np.stack([found[doc_id][0] for doc_id in ids])
    sparse = [found[doc_id][1] for doc_id in ids]
    return dense, sparse


def reference_vectors(path: Path) -> tuple[np.ndarray, list[dict[int, float]]]:
    data = np.load(path)
    offsets = data["sparse_offsets"]
    sparse = [dict(zip(data["sparse_ids"][a:b].tolist(), data["sparse_weights"][a:b].tolist()))
              for a, b in zip(offsets[:-1], offsets[1:])]
    return data["dense"], sparse


def agreement(a: tuple[np.ndarray, list[dict]], b: tuple[np.ndarray, list[dict]]) -> dict:
    dense_a, sparse_a = a
    dense_b, sparse_b = b
    cosine = np.sum(dense_a * dense_b, axis=1) / (np.linalg.norm(dense_a, axis=1) * np.linalg.norm(dense_b, axis=1))
    same_sets = sum(x.keys() == y.keys() for x, y in zip(sparse_a, sparse_b))
    jaccard = [len(x.keys() & y.keys()) / max(len(x.keys() | y.keys()), 1) for x, y in zip(sparse_a, sparse_b)]
    weight_errors = [abs(x[t] - y[t]) for x, y in zip(sparse_a, sparse_b) for t in x.keys() & y.keys()]
    largest = max((w for s in sparse_b for w in s.values()), default=1.0)
    # Tokens only one side kept: how heavy were they? (near-zero weights flip under reduced precision)
    lone = [w for x, y in zip(sparse_a, sparse_b) for t, w in list(x.items()) + list(y.items())
            if (t in x) != (t in y)]
    return {"dense_cosine_min": float(cosine.min()), "dense_cosine_mean": float(cosine.mean()),
            "sparse_same_sets": same_sets, "documents": len(sparse_a), "sparse_jaccard_min": float(min(jaccard)),
            "sparse_weight_max_abs_error": float(max(weight_errors, default=0.0)),
            "sparse_weight_max_relative_error": float(max(weight_errors, default=0.0) / largest),
            "sparse_lone_token_weight_max": float(max(lone, default=0.0))}


def top10_overlap(index_a: Path, index_b: Path, queries_file: str) -> dict:
    from bge_index.input.documents import read_queries
    from bge_index.search.local_index import LocalIndex
    from bge_index.search.query import Query, SearchRequest

    queries = [Query(q.id, q.text) for q in read_queries(queries_file)]
    overlaps = {}
    results = {}
    for index in (index_a, index_b):
        opened = LocalIndex(index, device="cpu")
        results[index] = {mode: opened.search(queries, SearchRequest(k=11, mode=mode, with_text=False))
                          for mode in ("dense", "sparse", "hybrid")}
    for mode in ("dense", "sparse", "hybrid"):
        shares = [len({h.id for h in ra.hits[:10]} & {h.id for h in rb.hits[:10]}) / 10
                  for ra, rb in zip(results[index_a][mode], results[index_b][mode])]
        overlaps[mode] = statistics.mean(shares)
        # How far apart neighbouring ranks are: a precision change flips ranks closer than its error.
        overlaps[f"{mode}_gap"] = statistics.median(
            r.hits[i].hit.score - r.hits[i + 1].hit.score for r in results[index_a][mode] for i in range(10)
            if len(r.hits) > i + 1)
    overlaps["queries"] = len(queries)
    return overlaps


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--model", help="a BGE-M3-layout model folder")
    model_source.add_argument("--build-checkpoint", help="folder for a random-weight checkpoint (built if absent)")
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "xlmr-tokenizer"))
    parser.add_argument("--checkpoint-tool", default=str(REPO.parent / "shared" / "tools" / "make_m3_checkpoint.py"))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6, help="6 keeps BGE-M3's 64-wide attention heads at 384")
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--corpus", nargs="+", required=True)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="auto,fp32", help="bge-index runs, comma-separated")
    parser.add_argument("--batch-tokens", type=int, help="bge-index --batch-tokens (default: its own)")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--reference-python", help="a Python that imports FlagEmbedding")
    parser.add_argument("--reference-pythonpath", help="PYTHONPATH for it (e.g. carried wheels)")
    parser.add_argument("--reference-dtype", default="auto",
                        help="auto: FlagEmbedding's default (fp16 on GPU; it forces fp32 on CPU)")
    parser.add_argument("--queries", help="queries file: top-10 overlap between the first two dtypes' indexes")
    parser.add_argument("--work", help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        model = Path(args.model) if args.model else build_checkpoint(args)
        inputs, ids, texts = prepare_corpus(args.corpus, args.limit, work)
        lengths = token_lengths(model, texts, args.max_length)
        flops = model_flops(model, lengths)
        device = args.device
        runs: list[Run] = []
        peaks: dict[str, float] = {}
        indexes: dict[str, Path] = {}

        for dtype in args.dtypes.split(","):
            out = work / f"index-{dtype}"
            seconds, rss, report = run_bge_index(model, inputs, out, dtype, device, args.max_length,
                                                 args.batch_tokens)
            from bge_index.store.manifest import read_manifest

            used = read_manifest(out).model["dtype"]
            peaks.setdefault(used, matmul_peak(device, used))
            indexes[dtype] = out
            runs.append(Run("bge-index", f"{used}" + (" (auto)" if dtype == "auto" else ""),
                            report["documents"]["added"], report["encoded"]["tokens"], seconds, rss, flops,
                            peaks[used], {"run_seconds": report["timings"]["total_seconds"],
                                          "load_seconds": report["timings"]["model_load_seconds"]}))

        reference = None
        if args.reference_python:
            precision = args.reference_dtype
            if precision == "auto":
                precision = "fp16" if device.startswith("cuda") else "fp32"
            seconds, rss, output, vectors_file = run_reference(args.reference_python, args.reference_pythonpath,
                                                               model, texts, work, device, args.max_length, precision)
            used = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[output["dtype"]]
            peaks.setdefault(used, matmul_peak(device, used))
            runs.append(Run("FlagEmbedding", used, output["documents"], output["tokens"], seconds, rss, flops,
                            peaks[used]))
            reference = reference_vectors(vectors_file)

        print(f"model {model.name}: {json.loads((model / 'config.json').read_text())['num_hidden_layers']} layers, "
              f"hidden {json.loads((model / 'config.json').read_text())['hidden_size']}; device {device}; "
              f"{len(texts)} documents, {int(lengths.sum())} tokens (mean {lengths.mean():.0f}, max {lengths.max()}); "
              f"{flops / 1e12:.2f} TFLOP")
        print("matmul peak: " + ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in peaks.items()))
        reference_run = next((r for r in runs if r.tool == "FlagEmbedding"), None)
        header = f"{'tool':<14}{'dtype':<12}{'docs':>6}{'tokens':>9}{'seconds':>9}{'docs/s':>9}{'tokens/s':>10}" \
                 f"{'vs ref':>8}{'MFU':>6}{'loaded':>8}{'MFU':>6}{'peak RSS':>10}"
        print(header)
        for run in runs:
            ratio = f"{run.documents_per_second / reference_run.documents_per_second:.2f}x" if reference_run else "-"
            print(f"{run.tool:<14}{run.dtype:<12}{run.documents:>6}{run.tokens:>9}{run.seconds:>9.1f}"
                  f"{run.documents_per_second:>9.1f}{run.tokens_per_second:>10.0f}{ratio:>8}{run.mfu:>6.0%}"
                  f"{run.streaming_seconds:>8.1f}{run.streaming_mfu:>6.0%}"
                  f"{run.peak_rss_bytes / 2**30:>8.2f}GB")
        print("bge-index seconds are the whole command (start, model load, read, encode, write, commit); "
              "FlagEmbedding's are its encode call alone. 'loaded': seconds after the model load (bge-index: "
              "reading, encoding, writing; FlagEmbedding: its encode call) and the MFU over them.")

        agreements, ceilings = {}, {}
        if reference is not None:
            for dtype, index in indexes.items():
                agreements[f"{dtype} vs FlagEmbedding"] = agreement(our_vectors(index, ids), reference)
        dtypes = list(indexes)
        if len(dtypes) >= 2:
            agreements[f"{dtypes[0]} vs {dtypes[1]}"] = agreement(our_vectors(indexes[dtypes[0]], ids),
                                                                  our_vectors(indexes[dtypes[1]], ids))
        for label, result in agreements.items():
            print(f"{label}: dense cosine min {result['dense_cosine_min']:.6f} (mean {result['dense_cosine_mean']:.6f}); "
                  f"sparse token sets identical {result['sparse_same_sets']}/{result['documents']}, "
                  f"Jaccard min {result['sparse_jaccard_min']:.4f}, weight max error {result['sparse_weight_max_abs_error']:.2e} "
                  f"({result['sparse_weight_max_relative_error']:.2%} of the largest weight), "
                  f"heaviest token kept by one side only {result['sparse_lone_token_weight_max']:.2e}")
        for dtype in sorted({run.dtype.split()[0] for run in runs}):
            ceiling = kernel_ceiling(model, lengths, device, dtype, args.batch_tokens or 16384)
            print(f"kernel ceiling {dtype}: linear layers {ceiling['linear_rate'] / 1e9:.0f} GFLOP/s, attention (SDPA) "
                  f"{ceiling['attention_rate'] / 1e9:.0f} GFLOP/s: attention is {ceiling['attention_share_of_flops']:.0%} "
                  f"of the FLOPs and {ceiling['attention_share_of_time']:.0%} of the time; with nothing else, "
                  f"{ceiling['seconds']:.1f} s, MFU at most {ceiling['mfu_ceiling']:.0%}")
            ceilings[dtype] = ceiling
        overlap = None
        if args.queries and len(dtypes) >= 2:
            overlap = top10_overlap(indexes[dtypes[0]], indexes[dtypes[1]], args.queries)
            print(f"top-10 overlap {dtypes[0]} vs {dtypes[1]} over {overlap['queries']} queries: "
                  + ", ".join(f"{mode} {overlap[mode]:.3f} (median gap between neighbouring ranks "
                              f"{overlap[mode + '_gap']:.1e})" for mode in ("dense", "sparse", "hybrid")))
        if args.json:
            Path(args.json).write_text(json.dumps({
                "runs": [{**run.__dict__, "documents_per_second": run.documents_per_second,
                          "tokens_per_second": run.tokens_per_second, "mfu": run.mfu,
                          "streaming_seconds": run.streaming_seconds, "streaming_mfu": run.streaming_mfu} for run in runs],
                "peaks": peaks, "agreement": agreements, "ceilings": ceilings, "top10_overlap": overlap}, indent=2))


if __name__ == "__main__":
    main()
