"""What the commands print, and where: the two consoles and the printing more than one command shares.

Results go to stdout, everything else (progress, warnings, notes, errors) to
stderr, so `bge-index search ... --format jsonl > hits.jsonl` stays clean.
This module owns
- the consoles and the one-line message styles (`error`, `warning`, `note`);
- `shown`: what came from outside (file and folder names, document ids,
  query texts, error messages that quote them) is printed through it, so a
  name holding a newline or an escape sequence is shown escaped (`\n`,
  `\x1b`) and can neither forge a line nor drive the terminal;
- search results in each output format (table, json, jsonl, tsv, trec);
- the index run's progress display and its closing summary;
- writing a file a command was asked for (`write_output`: an OSError becomes
  an OutputError, one line, exit 1);
- sizes for people (`human_bytes`).

Nothing here imports torch or runs the model.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bge_index.cli.options import ResultFormat
from bge_index.input.types import SkipReason, Skipped
from bge_index.errors import OutputError
from bge_index.search.query import QueryResult, hit_record, results_json
from bge_index.run.index_run import IndexEvents, IndexProgress, IndexSummary

SNIPPET_CHARS = 90

# emoji=False: a name holding `:smile:` is printed as it is, not as an emoji
stdout = Console(highlight=False, soft_wrap=True, emoji=False)
stderr = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)

# C0 and C1 control characters and DEL, line and paragraph separators, bidirectional overrides and isolates (they
# reorder what follows them on screen), and lone surrogates (undecodable bytes of a file name)
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
# what json.dumps leaves raw in strings (it escapes C0 controls itself; newlines between values are its layout)
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: object) -> str:
    """`text` safe to print: characters that would act on the terminal instead of showing escaped as Python
    writes them, every other character (any script, emoji, accents) unchanged.

        >>> shown("x\\nbge-index: error: forged\\x1b[31m")
        'x\\\\nbge-index: error: forged\\\\x1b[31m'
        >>> print(shown("café/日本語 ✓.txt"), shown("tab\\there"), shown("\\udcff"))
        café/日本語 ✓.txt tab\\there \\udcff
    """
    return _UNPRINTABLE.sub(_escaped, str(text))


def _escaped(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


# ---------------------------------------------------------------------------
# Messages


def error(message: str) -> None:
    """`bge-index: error: MESSAGE` on stderr, one line whatever the message holds (the caller exits)."""
    stderr.print(f"bge-index: error: {shown(message)}", markup=False)


def warning(message: str) -> None:
    """`bge-index: warning: MESSAGE` on stderr, one line."""
    stderr.print(f"bge-index: warning: {shown(message)}", markup=False)


def note(message: str) -> None:
    """`bge-index: note: MESSAGE` on stderr, one line."""
    stderr.print(f"bge-index: note: {shown(message)}", markup=False)


def write_output(path: Path, text: str, option: str) -> None:
    """Write a file the user asked for (`--report`); failing to is an OutputError naming the option."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as failure:
        raise OutputError(f"{option} {path}: cannot write it: {failure.strerror or failure}") from None


def write_json(path: Path, data: dict, option: str) -> None:
    """`write_output` of an indented JSON document."""
    write_output(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n", option)


def human_bytes(size: int) -> str:
    """1536 -> '1.5 KB' (binary units, up to GB)."""
    if size < 1024:
        return f"{size} B"
    value = size / 1024
    for unit in ("KB", "MB"):
        if value < 1024:
            return f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GB"


# ---------------------------------------------------------------------------
# Search results


def print_results(results: list[QueryResult], output_format: ResultFormat, mode: str, run_tag: str) -> None:
    """Print search results on stdout in `output_format`; `mode` titles tables, `run_tag` ends TREC lines."""
    if output_format is ResultFormat.table:
        _print_table(results, mode)
    elif output_format is ResultFormat.json:
        sys.stdout.write(_json_shown(results_json(results, mode)))
    elif output_format is ResultFormat.jsonl:
        for result in results:
            for ranked in result.hits:
                sys.stdout.write(_json_shown(json.dumps(hit_record(result, ranked), ensure_ascii=False)) + "\n")
    elif output_format is ResultFormat.tsv:
        sys.stdout.write("query_id\trank\tid\tscore\tdense\tsparse\tsource\n")
        for result in results:
            for r in result.hits:
                sys.stdout.write(f"{_tsv_field(result.query.id)}\t{r.rank}\t{_tsv_field(r.id)}\t{r.hit.score:.6f}\t"
                                 f"{r.hit.dense:.6f}\t{r.hit.sparse:.6f}\t{_tsv_field(r.source or '')}\n")
    else:  # TREC run format: qid Q0 docid rank score tag (whitespace-separated, so no spaces in ids)
        for result in results:
            for r in result.hits:
                sys.stdout.write(f"{_trec_token(result.query.id)} Q0 {_trec_token(r.id)} {r.rank} "
                                 f"{r.hit.score:.6f} {_trec_token(run_tag)}\n")


def _print_table(results: list[QueryResult], mode: str) -> None:
    for result in results:
        table = Table(title=f"{escape(shown(result.query.text))}  [dim]({mode})[/dim]", title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        table.add_column("id", overflow="fold")
        table.add_column("snippet")
        explain = any(r.top_tokens for r in result.hits)
        if explain:
            table.add_column("matching tokens (q_w·d_w)")
        for ranked in result.hits:
            snippet = escape(shown(_snippet(ranked.text)))
            if ranked.source:  # under the snippet: a column of its own leaves ids no room on a terminal
                snippet += f"\n[dim]{escape(shown(_short_source(ranked.source)))}[/dim]"
            row = [str(ranked.rank), f"{ranked.hit.score:.4f}", escape(shown(ranked.id)), snippet]
            if explain:
                row.append(escape(shown(", ".join(f"{t} {c:.3f}" for t, c in ranked.top_tokens))))
            table.add_row(*row)
        stdout.print(table)


def _short_source(source: str | None) -> str:
    """A hit's source for a table: the file's name and line (the full path is in json/jsonl/tsv)."""
    return source.rsplit("/", 1)[-1] if source else ""


def _snippet(text: str | None) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= SNIPPET_CHARS else flat[: SNIPPET_CHARS - 1] + "…"


def _tsv_field(value: str) -> str:
    return shown(value.replace("\t", " ").replace("\n", " "))


def _trec_token(value: str) -> str:
    return shown(re.sub(r"\s", "_", value))


def _json_shown(text: str) -> str:
    """JSON text with the characters `shown` escapes written as JSON escapes (`\\u001b`): the same JSON value,
    safe on a terminal (json.dumps leaves DEL, C1 controls, separators and lone surrogates raw)."""
    return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


# ---------------------------------------------------------------------------
# Index runs


class IndexDisplay(IndexEvents):
    """An index run's progress on stderr: a live line on a terminal, else a plain line every `every` seconds.

    Plain lines suit cron logs; skipped records and warnings are printed as they come, unless quiet.
    """

    def __init__(self, quiet: bool, every: float) -> None:
        self.quiet = quiet
        self.every = every
        self.live = stderr.is_terminal and not quiet
        self.last_line = float("-inf")  # the first progress line comes at once, then one every `every` s
        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                            console=stderr, transient=True, disable=not self.live)
        self.task = self.bar.add_task("reading documents…", total=None)

    def __enter__(self) -> "IndexDisplay":
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def skipped(self, item: Skipped) -> None:
        """A record that could not be indexed: `file:line: skipped: reason`."""
        if not self.quiet:
            self.bar.console.print(f"{shown(item.location)}: skipped: {shown(item.reason)}", markup=False)

    def warning(self, message: str) -> None:
        """Something the user should know that does not stop the run."""
        if not self.quiet:
            self.bar.console.print(f"bge-index: warning: {shown(message)}", markup=False)

    def stage(self, description: str) -> None:
        """A long step with no progress to count (loading the model): shown on the live line."""
        if self.live:
            self.bar.update(self.task, description=f"{escape(shown(description))}…")
        elif not self.quiet and self.last_line > float("-inf"):
            # Off a terminal, only a run that is already logging progress says so (a quick run stays quiet).
            stderr.print(f"bge-index: {log_time()} {shown(description)}", markup=False)

    def progress(self, state: IndexProgress) -> None:
        """Update the live line, or print a plain one when `every` seconds have passed."""
        if self.live:
            self.bar.update(self.task, description=_progress_line(state))
        elif not self.quiet and time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            stderr.print(f"bge-index: {log_time()} {_progress_line(state)} "
                         f"({state.elapsed:,.0f} s)", markup=False)


def _progress_line(state: IndexProgress) -> str:
    working = state.elapsed - state.loading  # rates over encoding time, not the model load
    rate = state.encoded / working if working > 0 else 0.0
    token_rate = state.tokens / working if working > 0 else 0.0
    return (f"{state.documents:,} documents read, {state.encoded:,} encoded · {rate:,.1f} docs/s · "
            f"{token_rate:,.0f} tokens/s")


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """`1 row`, `2 rows`, `1,024 documents`: a count and its noun in the right number."""
    return f"{count:,} {noun if count == 1 else (plural_noun or noun + 's')}"


def log_time() -> str:
    """Now as ISO 8601 with the UTC offset (`2026-11-30T09:41:07+00:00`), for lines that end up in logs."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def print_index_summary(summary: IndexSummary) -> None:
    """What an index run did, on stdout: counts, speed, skips, truncations, the index's size.

    A run that changed nothing (and skipped nothing) is one line. Off a terminal (cron, pipes) the first
    line starts with the ISO 8601 date-time, so a log shows when each run happened.
    """
    lines = []
    if summary.dry_run:
        verb = "Would change" if summary.changed else "Would not change"
    elif summary.interrupted:
        verb = "Interrupted; saved"
    elif summary.created:
        verb = "Created"
    elif summary.changed:
        verb = "Updated"
    else:
        verb = "No changes to"
    counts = (f"{verb} {summary.index_dir}: {summary.added:,} added, {summary.updated:,} updated, "
              f"{summary.unchanged:,} unchanged, {summary.removed:,} removed")
    index_line = (f"index: {plural(summary.live_rows, 'row')} in {plural(summary.shards, 'shard')} "
                  f"({human_bytes(summary.bytes)}); model: {summary.model}")
    skipped = sum(summary.skipped.values())
    quiet_run = (not summary.dry_run and not summary.interrupted and not summary.rows and not skipped
                 and not summary.duplicates and not summary.truncated and not summary.failed_inputs
                 and not summary.removal_refused and not summary.wrote)
    if quiet_run:
        lines.append(f"{counts}; {index_line}")
    else:
        lines.append(counts)
        if not summary.dry_run and summary.rows:
            load = f"; model loaded in {summary.load_seconds:.1f} s" if summary.load_seconds else ""
            lines.append(f"  encoded {plural(summary.rows, 'row')} ({plural(summary.tokens, 'token')}) "
                         f"in {summary.working_seconds:.1f} s: {summary.documents_per_second:,.1f} docs/s, "
                         f"{summary.tokens_per_second:,.0f} tokens/s{load}; the whole run {summary.elapsed:.1f} s")
        reasons = ", ".join(f"{SkipReason.label_of(code)}: {count}" for code, count in summary.skipped.most_common())
        lines.append(f"  skipped: {skipped:,}" + (f" ({reasons})" if reasons else ""))
        for failed in summary.failed_inputs:
            lines.append(f"  not read whole (its documents were kept): {failed['location']}: {failed['reason']}")
        if summary.duplicates:
            lines.append(f"  duplicate ids (last occurrence kept): {summary.duplicates:,}")
        lines.append(f"  truncated to {summary.max_length:,} tokens: {summary.truncated:,}")
        if summary.held_back:
            lines.append(f"  removals held back (inputs not read whole may hold them): {summary.held_back:,}")
        if summary.removal_refused:
            lines.append("  removals held back by --max-remove")
        if not summary.dry_run:
            lines.append(f"  {index_line}" + ("" if summary.wrote else ", nothing to write"))
        if summary.interrupted:
            lines.append("  stopped early: run the same command again to finish")
    if not stdout.is_terminal:
        lines[0] = f"{log_time()} {lines[0]}"
    for line in lines:
        stdout.print(shown(line), markup=False)
