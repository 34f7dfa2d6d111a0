"""Translate a text file line by line through a running BayLing server, with the prompts of
BayLing's original batch script (scripts/translate.py).

One sentence per line in, one translation per line out, in the same order (empty lines stay
empty). Finished lines are written to a journal next to the output (OUTPUT.journal.jsonl) as
they arrive, so a run that is stopped or killed loses nothing: run the same command again and
it skips the lines already translated. A line that fails is reported on stderr and in
OUTPUT.failures.jsonl (line number, error, source), left empty in the output, and retried by
the next run; the exit code is 1 while any line is failing.

examples:
  bayling translate --input news.zh --output news.en --target-lang en
  bayling translate --input talk.en --output talk.de --target-lang German --instruction-lang en --concurrency 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from bayling.errors import BaylingError
from bayling.files import write_atomically
from bayling.translation import translation_prompt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", type=Path, required=True, help="text file, one sentence per line (UTF-8)")
    parser.add_argument("--output", type=Path, required=True, help="translations, one per line, same order")
    parser.add_argument("--target-lang", required=True,
                        help="zh, en, de, fr, ja, ru, or a language name as the instruction should say it")
    parser.add_argument("--instruction-lang", choices=("zh", "en"), default="zh",
                        help="language of the instruction (default zh, as the original script)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    parser.add_argument("--url", default="localhost:8001", help="server: host:port (gRPC) or http://host:port")
    parser.add_argument("--protocol", choices=("grpc", "http"))
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per translation (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="default 0: greedy, reproducible")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per line (default 600)")


@dataclass
class Failure:
    line: int          # 1-based
    error: str
    source: str


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + ".journal.jsonl")


def failures_path(output: Path) -> Path:
    return output.with_name(output.name + ".failures.jsonl")


def line_key(prompt: str, params: dict) -> str:
    """What a journal entry is valid for: the exact prompt and generation parameters."""
    blob = json.dumps([prompt, params], ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:24]


def read_journal(path: Path) -> dict[tuple[int, str], str]:
    """(line, key) -> translation; a torn last line (killed mid-write) is ignored."""
    done: dict[tuple[int, str], str] = {}
    if not path.is_file():
        return done
    with open(path, encoding="utf-8") as f:
        for raw in f:
            try:
                entry = json.loads(raw)
                done[(int(entry["line"]), str(entry["key"]))] = str(entry["text"])
            except (ValueError, KeyError, TypeError):
                continue
    return done


def one_line(text: str) -> str:
    """A translation on one output line."""
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def translate_file(client, source: Path, output: Path, target_lang: str, instruction_lang: str = "zh",
                   concurrency: int = 4, params: dict | None = None, log=sys.stderr) -> list[Failure]:
    """Translate `source` into `output` (resumably); returns the lines that failed."""
    from bayling.progress import progress

    params = dict(params or {})
    concurrency = max(1, concurrency)
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BaylingError(f"cannot read {source}: {exc}") from None
    output.parent.mkdir(parents=True, exist_ok=True)
    prompts = [translation_prompt(line.strip(), target_lang, instruction_lang) if line.strip() else None
               for line in lines]
    keys = [line_key(p, params) if p else None for p in prompts]
    journal = journal_path(output)
    known = read_journal(journal)
    results: dict[int, str] = {}
    todo: list[int] = []
    for i, key in enumerate(keys):
        if key is None:
            results[i] = ""
        elif (i + 1, key) in known:
            results[i] = known[(i + 1, key)]
        else:
            todo.append(i)
    skipped = len(lines) - len(todo) - sum(1 for k in keys if k is None)
    print(f"{len(lines)} lines: {len(todo)} to translate, {skipped} already translated (skipped)",
          file=log, flush=True)

    failures: list[Failure] = []

    def work(i: int) -> str:
        return one_line(client.chat([{"role": "user", "content": prompts[i]}], **params).text)

    with open(journal, "a", encoding="utf-8") as journal_file, \
            progress(f"translating {source.name}", total=len(todo), unit="lines") as bar, \
            ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: dict[Future, int] = {}
        queue = iter(todo)
        try:
            while True:
                while len(pending) < 2 * concurrency and (i := next(queue, None)) is not None:
                    pending[pool.submit(work, i)] = i
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    i = pending.pop(future)
                    try:
                        results[i] = future.result()
                    except BaylingError as exc:
                        failures.append(Failure(i + 1, str(exc), lines[i]))
                        print(f"line {i + 1} failed: {exc}", file=log, flush=True)
                    else:   # journaled at once: a kill after this loses nothing
                        journal_file.write(json.dumps({"line": i + 1, "key": keys[i], "text": results[i]},
                                                      ensure_ascii=False) + "\n")
                        journal_file.flush()
                        os.fsync(journal_file.fileno())
                    bar.advance(1)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)   # what is in the journal stays done
            raise

    write_atomically(output, "".join(results.get(i, "") + "\n" for i in range(len(lines))))
    failed = failures_path(output)
    if failures:
        failures.sort(key=lambda f: f.line)
        write_atomically(failed, "".join(json.dumps(f.__dict__, ensure_ascii=False) + "\n" for f in failures))
    else:
        failed.unlink(missing_ok=True)
    return failures


def main(args: argparse.Namespace) -> int:
    from bayling.client.library import BayLingClient
    from bayling.params import validate

    if args.concurrency < 1:
        raise BaylingError("--concurrency must be at least 1")
    if not args.input.is_file():
        raise BaylingError(f"{args.input} does not exist")
    if args.input.resolve() == args.output.resolve():
        raise BaylingError("--output must differ from --input")
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    validate(params)
    with BayLingClient(args.url, args.protocol, timeout=args.timeout) as client:
        if not client.health():
            raise BaylingError(f"the server at {args.url} is not ready")
        failures = translate_file(client, args.input, args.output, args.target_lang, args.instruction_lang,
                                  args.concurrency, params)
    if failures:
        print(f"{len(failures)} line(s) failed (left empty in {args.output}): see {failures_path(args.output)}; "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    print(f"wrote {args.output}", file=sys.stderr)
    return 0
