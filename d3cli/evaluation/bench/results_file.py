"""The JSONL file a bench run appends every finished example to (one a process in a data-parallel run), read back
by `--resume`, merged into the one file in one process's order."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

from d3cli import __version__
from d3cli.base.errors import UserError
from d3cli.base.files import write_atomically
from d3cli.evaluation.bench.methods import (
    MethodRun,
)
from d3cli.evaluation.tasks.base import Example


def prompt_digest(example: Example) -> str:
    return hashlib.sha256(f"{example.chat}\n{example.prompt}".encode()).hexdigest()[:16]


def rank_file(path: Path, rank: int, size: int) -> Path:
    """The file process `rank` of `size` appends to in a data-parallel run with --output `path`."""
    return path.with_name(f"{path.name}.rank-{rank}-of-{size}")


def rank_files(path: Path) -> list[Path]:
    """The rank files beside `path` (left by a running, killed or interrupted data-parallel run), by size and rank."""
    pattern = re.compile(re.escape(path.name) + r"\.rank-(\d+)-of-(\d+)")
    found = []
    if path.parent.is_dir():
        for candidate in path.parent.iterdir():
            match = pattern.fullmatch(candidate.name)
            if match and candidate.is_file():
                found.append(((int(match[2]), int(match[1])), candidate))
    return [candidate for _, candidate in sorted(found)]


def record_key(record: dict) -> tuple:
    return record["method"], record["id"], record.get("prompt_sha256")


class ResultsFile:
    """The JSONL file of a bench: a "run" line per session, then one "example" line per finished example.

    Reading takes OUTPUT and the rank files of a data-parallel run beside it; appending goes to one file, the
    journal (OUTPUT itself, or this process's rank file). `start=False` only reads, so that every process of a
    data-parallel run has read before any of them writes."""

    def __init__(self, path: Path, identity: dict, resume: bool, start: bool = True):
        self.path = path
        self.identity = identity
        self.records: list[dict] = []
        self.run_lines: list[dict] = []
        self.handle = None
        self.session: dict | None = None
        self.rank_sources = rank_files(path)
        sources = ([path] if path.exists() else []) + self.rank_sources
        if sources and not resume:
            what = "already holds results" if sources[0] == path else "holds results of a data-parallel run"
            raise UserError(f"{sources[0]} {what}: add --resume to continue that run, or pick another --output")
        if not sources and resume:
            raise UserError(f"nothing to resume: {path} does not exist")
        seen: set[tuple] = set()
        for source in sources:
            self._read(source, identity, seen)
        if start:
            self.start(path)

    def _read(self, source: Path, identity: dict, seen: set[tuple]) -> None:
        lines = source.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # the last line of a killed run may be cut short
                    break
                raise UserError(f"{source}:{number}: not a d3 bench record") from None
            if record.get("type") == "run":
                mismatch = [key for key in identity if key not in ("methods", "alphas") and
                            record.get(key) != identity[key]]
                if mismatch:
                    raise UserError(f"{source} is a run with other settings ({', '.join(mismatch)} differ): "
                                    "resume it with the same options, or pick another --output")
                self.run_lines.append(record)
            elif record.get("type") == "example" and record_key(record) not in seen:
                seen.add(record_key(record))  # a record in OUTPUT and in a rank file: a merge cut short
                self.records.append(record)

    def start(self, journal: Path, **run_fields) -> None:
        """Append from now on to `journal`, beginning with this session's "run" line."""
        journal.parent.mkdir(parents=True, exist_ok=True)
        if journal.exists():
            with open(journal, "rb+") as handle:  # drop a cut-short last line so the file stays valid JSONL
                content = handle.read()
                if content and not content.endswith(b"\n"):
                    handle.truncate(content.rfind(b"\n") + 1)
        self.handle = open(journal, "a", encoding="utf-8")
        self.session = {"type": "run", "d3": __version__, "started": time.time(), **self.identity, **run_fields}
        self._append(self.session)

    def _append(self, record: dict) -> None:
        self.handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def add(self, record: dict) -> None:
        self._append(record)
        self.records.append(record)

    def extend(self, records: Sequence[dict]) -> None:
        """Records another process wrote (to its own rank file): known here, not written again."""
        self.records.extend(records)

    def done(self, key: str, examples: Sequence[Example]) -> dict[str, dict]:
        """This method's finished records of these examples (with the same prompt), by example id."""
        wanted = {example.id: prompt_digest(example) for example in examples}
        return {record["id"]: record for record in self.records
                if record["method"] == key and wanted.get(record["id"]) == record["prompt_sha256"]}

    def merge(self, runs: Sequence[MethodRun], examples: Sequence[Example], size: int = 1) -> None:
        """Write every record into OUTPUT, in one process's order (`merged_order`), after every "run" line read and
        this session's; then remove the rank files read and those of this session's `size` processes."""
        session = {key: value for key, value in (self.session or {}).items() if key != "rank"}
        self.records = merged_order(self.records, runs, examples)
        lines = [*self.run_lines, *([session] if session else []), *self.records]
        write_atomically(self.path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
        stale = {*self.rank_sources, *(rank_file(self.path, rank, size) for rank in range(size) if size > 1)}
        for path in sorted(stale):
            path.unlink(missing_ok=True)
        self.rank_sources = []

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def merged_order(records: Sequence[dict], runs: Sequence[MethodRun], examples: Sequence[Example]) -> list[dict]:
    """Records of these runs and examples method by method in run order, each in example order (what one process
    with --batch-size 1 writes); other records (another --limit, α or method of an earlier session) after them, as
    they came. One record per (method, example, prompt)."""
    run_index = {run.key: index for index, run in enumerate(runs)}
    example_index = {example.id: (index, prompt_digest(example)) for index, example in enumerate(examples)}
    unique, seen = [], set()
    for record in records:
        if record_key(record) not in seen:
            seen.add(record_key(record))
            unique.append(record)

    def position(numbered: tuple[int, dict]) -> tuple:
        arrival, record = numbered
        method = run_index.get(record["method"])
        example = example_index.get(record["id"])
        if method is not None and example is not None and example[1] == record.get("prompt_sha256"):
            return 0, method, example[0]
        return 1, arrival, 0

    return [record for _, record in sorted(enumerate(unique), key=position)]
