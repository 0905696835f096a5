"""Long-document QA through vLLM with lmcache: cold, warm, and after a restart.

``make demo`` runs this. Several long documents (Python standard-library modules, a few
thousand tokens each, present on every machine) get several questions each; every
prompt is the document followed by the question, so all questions about one document
share its KV cache. vLLM runs with lmcache's embedded default configuration: the CPU
tier plus a disk tier in ``./.lmcache``. vLLM's own prefix cache is off, so every hit
in the table is lmcache's.

1. ``first`` — a fresh vLLM, empty cache: the first question about each document is a
   miss (prefill from scratch, then stored); the later ones load the document's KV.
2. ``restart`` — vLLM is stopped and started again: the CPU tier is gone, the disk
   tier is not; every question is asked again.

TTFT is measured per request as the time of a generation of one token. The answers
(greedy) are generated once per document in both runs and must be identical.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

DOCUMENTS = ["argparse", "textwrap", "heapq", "shlex"]
QUESTIONS = [
    "What is the purpose of this module, in one sentence?",
    "Name one function or class defined in this module.",
    "Which other modules does this code import?",
]
ANSWER_TOKENS = 24


def _documents(tokens_per_doc: int, tokenizer) -> list[tuple[str, str]]:
    docs = []
    for name in DOCUMENTS:
        text = Path(importlib.import_module(name).__file__).read_text()
        ids = tokenizer.encode(text)[:tokens_per_doc]
        docs.append((name, tokenizer.decode(ids)))
    return docs


def _prompt_ids(tokenizer, document: str, question: str) -> list[int]:
    messages = [{"role": "user", "content": f"Read this source file.\n\n{document}\n\n"
                 f"Question: {question}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def run_phase(phase: str, model: str, tokens_per_doc: int, out: Path) -> None:
    """One vLLM process: ask every question, write the measurements to ``out``."""
    from rich.progress import Progress
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    llm = LLM(model=model, enforce_eager=True, enable_prefix_caching=False,
              max_model_len=8192, seed=0,
              kv_transfer_config=KVTransferConfig(kv_connector="LMCacheConnectorV1",
                                                  kv_role="kv_both"))
    tokenizer = llm.get_tokenizer()
    docs = _documents(tokens_per_doc, tokenizer)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    answer = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0)
    records, answers = [], {}
    with Progress(transient=True) as progress:
        task = progress.add_task(f"[{phase}] asking questions", total=len(docs) * len(QUESTIONS))
        for doc_name, doc in docs:
            for qi, question in enumerate(QUESTIONS):
                ids = _prompt_ids(tokenizer, doc, question)
                started = time.perf_counter()
                result = llm.generate([{"prompt_token_ids": ids}], one, use_tqdm=False)[0]
                ttft = time.perf_counter() - started
                records.append({"doc": doc_name, "question": qi, "tokens": len(ids),
                                "cached": result.num_cached_tokens or 0, "ttft": ttft})
                if qi == 0:
                    text = llm.generate([{"prompt_token_ids": ids}], answer,
                                        use_tqdm=False)[0].outputs[0].text
                    answers[doc_name] = text.strip()
                progress.advance(task)
    out.write_text(json.dumps({"records": records, "answers": answers}))
    llm.llm_engine.engine_core.shutdown()  # a clean stop: the disk tier is flushed


def _disk_usage(path: Path) -> tuple[int, int]:
    files = [p for p in path.glob("*.kvobj")] if path.is_dir() else []
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / ".demo" / "smollm2-135m-instruct"))
    parser.add_argument("--tokens-per-doc", type=int, default=3000)
    parser.add_argument("--keep-cache", action="store_true",
                        help="do not empty ./.lmcache first (the first run is then warm)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        run_phase(args.phase, args.model, args.tokens_per_doc, Path(args.out))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    sys.path.insert(0, str(HERE))
    from prepare_model import prepare

    model = prepare(Path(args.model))
    cache = Path.cwd() / ".lmcache"
    if cache.exists() and not args.keep_cache:
        shutil.rmtree(cache)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
           "LMCACHE_LOG_LEVEL": os.environ.get("LMCACHE_LOG_LEVEL", "WARNING"),
           "TQDM_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE":
               os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    results = {}
    for phase, title in (("first", "first run (empty cache)"),
                         ("restart", "after a restart of vLLM")):
        console.rule(f"[bold]{title}")
        console.print("starting vLLM (about 20 s)...")
        out = Path.cwd() / f".demo-{phase}.json"
        subprocess.run([sys.executable, __file__, "--phase", phase, "--out", str(out),
                        "--model", str(model), "--tokens-per-doc", str(args.tokens_per_doc)],
                       check=True, env=env)
        results[phase] = json.loads(out.read_text())
        out.unlink()
        n, size = _disk_usage(cache)
        results[phase]["disk"] = (n, size)
        console.print(f"done; disk tier holds {n} chunks, {size / 2**20:.1f} MiB")

    first, restart = results["first"]["records"], results["restart"]["records"]
    cold = [r for r in first if r["question"] == 0]
    warm = [r for r in first if r["question"] > 0]
    rows = [("without cache", cold, "- (miss)"),
            ("with cache", warm, "local_cpu"),
            ("after restart", restart, "local_disk")]
    table = Table(title="Long-document QA: time to first token")
    for col in ("", "requests", "median TTFT", "speed-up", "hit rate", "tier"):
        table.add_column(col, justify="right" if col else "left")
    base = statistics.median(r["ttft"] for r in cold)
    for label, recs, tier in rows:
        ttft = statistics.median(r["ttft"] for r in recs)
        hit = sum(r["cached"] for r in recs) / sum(r["tokens"] for r in recs)
        table.add_row(label, str(len(recs)), f"{ttft * 1000:.0f} ms", f"{base / ttft:.1f}x",
                      f"{hit:.0%}", tier)
    console.print(table)
    n, size = results["restart"]["disk"]
    tokens = sum(r["tokens"] for r in cold)
    console.print(f"stored: {n} chunks, {size / 2**20:.1f} MiB on disk in {cache} "
                  f"(the CPU tier held the same chunks during the first run); "
                  f"{tokens} prompt tokens in {len(cold)} documents")
    same = results["first"]["answers"] == results["restart"]["answers"]
    console.print(f"answers identical before and after the restart: "
                  f"{'[green]yes' if same else '[red]no'}")
    for doc, text in results["restart"]["answers"].items():
        console.print(f"[bold]{doc}[/bold]: {QUESTIONS[0]} -> {text!r}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
